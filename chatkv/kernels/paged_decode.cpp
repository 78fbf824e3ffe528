// Decode attention read straight from the paged KV pool, for CPUs with AVX-512.
//
// One query token per sequence attends over that sequence's cached keys and values, found through its
// block table; nothing is gathered into a padded copy first. Work is split over (sequence, KV head)
// pairs; each pair first stores the token's own key and value in the pool (with keys dimension-major,
// one token's key touches every line of its tile: as a separate op that write cost ~1 ms of a 16-session
// step, on lines the attention reads anyway), then reads its keys and values once, for all the query
// heads that share that KV head (grouped-query attention), in one pass (online softmax). Scores,
// softmax and sums are float32 whatever the pool's dtype; the softmax uses a polynomial exp (relative
// error ~2e-7).
//
// The key layout is what makes the scores cheap. Within a block, one KV head's keys are stored
// dimension-major: [head_dim / pack, block_size, pack], pack = 1 for float32 and 2 for bfloat16 (a pair
// of dimensions per 32-bit element). So one 64-byte line holds the same (pair of) dimension(s) of 16
// consecutive keys, and a query head's 16 scores grow lane by lane, one multiply-add per line, with no
// horizontal sums (they took more instructions than the products when keys were stored token-major).
// Values are token-major, [block_size, head_dim] per KV head: the weighted sum adds whole rows. One KV
// head's part of a block is one contiguous run of keys, then one of values. The key layout is the one
// vLLM's first paged-attention kernels used, for the same reason.
//
// Shapes it serves (paged_decode_supported says which): head_dim 16, 32, 64 or 128; 1 to 8 query heads
// per KV head; blocks of a multiple of 16 tokens; float32 or bfloat16. Anything else is attended by the
// engine's gather + SDPA path. Registered as torch.ops.chatkv.*; built on first use by
// chatkv/kernels/__init__.py (with int8_linear.cpp); chatkv/engine/paged_kernel.py decides when it is used.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

bool supported(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size) {
#if defined(__AVX512F__)
  const bool head_size = head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
  return head_size && kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= 8 && block_size % 16 == 0;
#else
  return false;  // built without AVX-512: the engine keeps its gather + SDPA path
#endif
}

// One call's tensors, as paged_decode_attention takes them (shapes there)
struct DecodeCall {
  const at::Tensor &query, &key, &value, &key_cache, &value_cache, &block_tables, &context_lens, &query_rows;
  at::Tensor& output;
  double scale;
};

#if defined(__AVX512F__)
inline void store_row(const float* source, float* target, int64_t n) { std::memcpy(target, source, n * sizeof(float)); }

inline void store_row(const float* source, c10::BFloat16* target, int64_t n) {  // n: a multiple of 16
#if defined(__AVX512BF16__)
  for (int64_t i = 0; i < n; i += 16) {  // round to nearest even, as c10::BFloat16 does
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(target + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(source + i)));
  }
#else
  for (int64_t i = 0; i < n; ++i) target[i] = c10::BFloat16(source[i]);  // round to nearest even
#endif
}

// Dimensions per 32-bit element of the key layout: keys are stored so that 16 consecutive keys of one
// (pair of) dimension(s) fill one 64-byte line (see the layout at the top of the file)
template <typename scalar_t>
constexpr int64_t key_pack() { return 4 / static_cast<int64_t>(sizeof(scalar_t)); }

// Whether a value row is widened a line at a time: a bfloat16 line of 32 dimensions gives its even
// dimensions (each 16-bit half shifted up) and its odd ones (the low half cleared) as two float32
// vectors, one instruction each, and the weighted sums keep that order until the end (values_in_order).
template <typename scalar_t, int VECTORS>
constexpr bool values_by_pairs() { return std::is_same_v<scalar_t, c10::BFloat16> && VECTORS % 2 == 0; }

// One token's value row as VECTORS float32 vectors, in the order the weighted sums keep: dimension order,
// or for values_by_pairs, per line of 32 dimensions its even dimensions and then its odd ones
template <typename scalar_t, int VECTORS>
inline void load_values(const scalar_t* row, __m512 (&out)[VECTORS]) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int v = 0; v < VECTORS; ++v) out[v] = _mm512_loadu_ps(row + 16 * v);
  } else if constexpr (values_by_pairs<scalar_t, VECTORS>()) {
    const __m512i high_halves = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int line = 0; line < VECTORS / 2; ++line) {
      const __m512i bits = _mm512_loadu_si512(row + 32 * line);
      out[2 * line] = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
      out[2 * line + 1] = _mm512_castsi512_ps(_mm512_and_si512(bits, high_halves));
    }
  } else {
    for (int v = 0; v < VECTORS; ++v) {
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * v));
      out[v] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
  }
}

// Weighted sums kept in load_values' order, written out in dimension order
template <typename scalar_t, int VECTORS>
inline void values_in_order(const __m512 (&sums)[VECTORS], float* out) {
  if constexpr (values_by_pairs<scalar_t, VECTORS>()) {
    const __m512i low = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i high = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int line = 0; line < VECTORS / 2; ++line) {
      _mm512_storeu_ps(out + 32 * line, _mm512_permutex2var_ps(sums[2 * line], low, sums[2 * line + 1]));
      _mm512_storeu_ps(out + 32 * line + 16, _mm512_permutex2var_ps(sums[2 * line], high, sums[2 * line + 1]));
    }
  } else {
    for (int v = 0; v < VECTORS; ++v) _mm512_storeu_ps(out + 16 * v, sums[v]);
  }
}

// e^x for x <= 0 (scores minus their maximum); below -87 (and -inf) it gives e^-87, about 1e-38, so callers
// mask the lanes that must be exactly 0
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // x - n ln2, in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);  // p * 2^n
}

// Ask for ``rows`` lines of 64 bytes, ``stride`` elements apart, before they are needed: blocks lie anywhere
// in the pool, so the hardware prefetcher cannot guess the next one.
template <typename scalar_t>
inline void prefetch_rows(const scalar_t* first, int64_t rows, int64_t stride, int64_t row_bytes) {
  for (int64_t k = 0; k < rows; ++k) {
    const char* row = reinterpret_cast<const char*>(first + k * stride);
    for (int64_t line = 0; line < row_bytes; line += 64) _mm_prefetch(row + line, _MM_HINT_T0);
  }
}

// Scores of one query head for the 16 keys of a tile: in the key layout each line of 64 bytes holds one
// dimension (float32) or one pair of dimensions (bfloat16) of 16 consecutive keys, so 16 dot products
// grow side by side, lane by lane, with no horizontal sums. ACCUMULATORS independent sums per head keep
// the multiply-adds from waiting on each other. A bfloat16 line is widened to two float32 vectors (its
// even and its odd dimensions): AVX512-BF16's pair dot products were slower here, by 4-8%.
constexpr int ACCUMULATORS = 4;

template <typename scalar_t, int GROUPS, int VECTORS>  // VECTORS = head_dim / 16
void attend_simd(const DecodeCall& call) {
  const at::Tensor &query = call.query, &key_cache = call.key_cache, &block_tables = call.block_tables;
  constexpr int64_t head_dim = VECTORS * 16;
  constexpr int64_t pack = key_pack<scalar_t>();  // dimensions per 32-bit key element
  constexpr int64_t lines = head_dim / pack;  // 64-byte lines per tile of keys
  static_assert(lines % ACCUMULATORS == 0, "every sum gets the same number of lines");
  const int64_t sequences = block_tables.size(0);
  const int64_t table_width = block_tables.size(1);
  const int64_t heads = query.size(1);
  const int64_t kv_heads = key_cache.size(1);
  const int64_t block_size = key_cache.size(3);
  const int64_t query_row_stride = query.stride(0), query_head_stride = query.stride(1);
  const int64_t key_line_stride = block_size * pack;  // elements from one line of a tile to the next
  const int64_t tile_bytes = 16 * head_dim * sizeof(scalar_t);  // one KV head's keys (or values) of 16 positions
  const scalar_t* query_data = query.data_ptr<scalar_t>();
  const scalar_t* new_keys = call.key.data_ptr<scalar_t>();
  const scalar_t* new_values = call.value.data_ptr<scalar_t>();
  scalar_t* key_data = key_cache.data_ptr<scalar_t>();
  scalar_t* value_data = call.value_cache.data_ptr<scalar_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lengths = call.context_lens.data_ptr<int64_t>();
  const int64_t* rows = call.query_rows.data_ptr<int64_t>();
  scalar_t* output_data = call.output.data_ptr<scalar_t>();
  const float scale_f = static_cast<float>(call.scale);

  at::parallel_for(0, sequences * kv_heads, 1, [&](int64_t begin, int64_t end) {
    // where a task's tile of 16 keys (and of their values) starts; tiles never straddle a block (block_size
    // is a multiple of 16)
    auto block_of = [&](int64_t task, int64_t first) {
      return tables[(task / kv_heads) * table_width + first / block_size] * kv_heads + task % kv_heads;
    };
    auto key_tile = [&](int64_t task, int64_t first) {
      return key_data + block_of(task, first) * lines * key_line_stride + (first % block_size) * pack;
    };
    auto value_tile = [&](int64_t task, int64_t first) {
      return value_data + (block_of(task, first) * block_size + first % block_size) * head_dim;
    };
    for (int64_t ahead = 0; ahead < std::min<int64_t>(32, lengths[begin / kv_heads]); ahead += 16) {
      prefetch_rows(key_tile(begin, ahead), lines, key_line_stride, 64);
      prefetch_rows(value_tile(begin, ahead), tile_bytes / 64, 64 / sizeof(scalar_t), 64);
    }
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sequence = task / kv_heads, kv_head = task % kv_heads;
      const int64_t length = lengths[sequence];
      const int64_t padded = (length + 15) / 16 * 16;
      const int64_t query_row = rows[sequence];
      // The token's own key and value go into the pool first, into the last tile this task reads. The
      // stores drain while the first tiles are read, and that tile's lines are in cache when it comes.
      {
        // (line_bytes is a copy: the stores may alias anything, so a captured value would be read again per line)
        const int64_t line_bytes = key_line_stride * sizeof(scalar_t);
        const char* key = reinterpret_cast<const char*>(new_keys + query_row * call.key.stride(0) + kv_head * call.key.stride(1));
        char* key_slot = reinterpret_cast<char*>(key_tile(task, length - 1));
        for (int64_t line = 0; line < lines; ++line) std::memcpy(key_slot + line * line_bytes, key + line * 4, 4);
        const scalar_t* value = new_values + query_row * call.value.stride(0) + kv_head * call.value.stride(1);
        std::memcpy(value_tile(task, length - 1), value, head_dim * sizeof(scalar_t));
      }
      // the queries, scaled, as float32 dimensions for the scores loop to broadcast
      alignas(64) float q[GROUPS][head_dim];
      __m512 sums[GROUPS][VECTORS], totals[GROUPS];
      float peaks[GROUPS];
      for (int g = 0; g < GROUPS; ++g) {
        const scalar_t* row = query_data + query_row * query_row_stride + (kv_head * GROUPS + g) * query_head_stride;
        for (int64_t d = 0; d < head_dim; ++d) q[g][d] = static_cast<float>(row[d]) * scale_f;
        for (int v = 0; v < VECTORS; ++v) sums[g][v] = _mm512_setzero_ps();
        totals[g] = _mm512_setzero_ps();
        peaks[g] = -std::numeric_limits<float>::infinity();
      }
      const __m512 minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      // One pass over the keys and values, 16 at a time (online softmax): a tile's scores, then its
      // weights against the highest score so far, then its values weighted into the sums. Sums and
      // totals made against a lower peak are scaled down when a higher one appears.
      for (int64_t first = 0; first < length; first += 16) {
        const int64_t count = std::min<int64_t>(16, length - first);
        // the tile after next (this task's, else the next task's first ones), one line of keys and one of
        // values per line of keys read: prefetches in a burst stall on the fill buffers while there is
        // arithmetic to do (the kernel took 13% longer with a burst per tile, 10% more with one per task)
        int64_t ahead_task = task, ahead_first = first + 32;
        if (ahead_first >= length) ahead_task = task + 1, ahead_first -= padded;
        const bool ahead = ahead_task < end && ahead_first < lengths[ahead_task / kv_heads];
        const char* keys_ahead = ahead ? reinterpret_cast<const char*>(key_tile(ahead_task, ahead_first)) : nullptr;
        const char* values_ahead = ahead ? reinterpret_cast<const char*>(value_tile(ahead_task, ahead_first)) : nullptr;
        // 1. scores; each line of keys is read once for all the query heads of this KV head
        const scalar_t* keys = key_tile(task, first);
        __m512 acc[GROUPS][ACCUMULATORS];
        for (int g = 0; g < GROUPS; ++g)
          for (int a = 0; a < ACCUMULATORS; ++a) acc[g][a] = _mm512_setzero_ps();
        for (int64_t base = 0; base < lines; base += ACCUMULATORS) {
#pragma GCC unroll 4
          for (int a = 0; a < ACCUMULATORS; ++a) {  // unrolled, so the sums stay in registers
            const int64_t line = base + a;
            const scalar_t* source = keys + line * key_line_stride;
            if (ahead) {
              _mm_prefetch(keys_ahead + line * key_line_stride * sizeof(scalar_t), _MM_HINT_T0);
              _mm_prefetch(values_ahead + line * 64, _MM_HINT_T0);  // (value lines: as many as key lines)
            }
            if constexpr (std::is_same_v<scalar_t, float>) {
              const __m512 k = _mm512_loadu_ps(source);
              for (int g = 0; g < GROUPS; ++g) acc[g][a] = _mm512_fmadd_ps(_mm512_set1_ps(q[g][line]), k, acc[g][a]);
            } else {  // bfloat16: each pair's two halves widened to float32
              const __m512i k = _mm512_loadu_si512(source);
              const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(k, 16));
              const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(k, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
              for (int g = 0; g < GROUPS; ++g) {
                acc[g][a] = _mm512_fmadd_ps(_mm512_set1_ps(q[g][2 * line]), even, acc[g][a]);
                acc[g][a] = _mm512_fmadd_ps(_mm512_set1_ps(q[g][2 * line + 1]), odd, acc[g][a]);
              }
            }
          }
        }
        // 2. softmax numerators against the running peak; masked lanes give exactly 0
        const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1);
        alignas(64) float weights[GROUPS][16];
        for (int g = 0; g < GROUPS; ++g) {
          __m512 dots = acc[g][0];
          for (int a = 1; a < ACCUMULATORS; ++a) dots = _mm512_add_ps(dots, acc[g][a]);
          // a new peak only where some score is above the running one (after the first tiles, rarely): one
          // comparison per tile, and the sixteen-lane maximum only then
          const __m512 scores = _mm512_mask_mov_ps(minus_infinity, valid, dots);
          if (_mm512_cmp_ps_mask(scores, _mm512_set1_ps(peaks[g]), _CMP_GT_OQ)) {
            const float tile_peak = _mm512_reduce_max_ps(scores);
            if (first > 0) {  // (the first tile has no sums to scale down)
              const __m512 shrink = _mm512_set1_ps(std::exp(peaks[g] - tile_peak));
              for (int v = 0; v < VECTORS; ++v) sums[g][v] = _mm512_mul_ps(sums[g][v], shrink);
              totals[g] = _mm512_mul_ps(totals[g], shrink);
            }
            peaks[g] = tile_peak;
          }
          const __m512 e = _mm512_maskz_mov_ps(valid, exp_nonpositive(_mm512_sub_ps(dots, _mm512_set1_ps(peaks[g]))));
          totals[g] = _mm512_add_ps(totals[g], e);
          _mm512_store_ps(weights[g], e);
        }
        // 3. the tile's value rows, each read once for all the query heads, added with those weights. A whole
        // tile is unrolled: in a loop GCC stores every sum back to the stack after each row. (The empty asm
        // hides what the weights are, so each is broadcast from memory, a load; GCC would otherwise permute
        // it out of the vector it stored, an instruction on the ports the sums need.)
        const scalar_t* values = value_tile(task, first);
        const float* weight_of = weights[0];
        asm("" : "+r"(weight_of));
        auto add_row = [&](int64_t k) {
          __m512 value_v[VECTORS];
          load_values<scalar_t, VECTORS>(values + k * head_dim, value_v);
#pragma GCC unroll 8
          for (int g = 0; g < GROUPS; ++g) {
            const __m512 weight = _mm512_set1_ps(weight_of[g * 16 + k]);
#pragma GCC unroll 8
            for (int v = 0; v < VECTORS; ++v) sums[g][v] = _mm512_fmadd_ps(weight, value_v[v], sums[g][v]);
          }
        };
        if (count == 16) {
#pragma GCC unroll 16
          for (int k = 0; k < 16; ++k) add_row(k);
        } else {
          for (int64_t k = 0; k < count; ++k) add_row(k);
        }
      }
      for (int g = 0; g < GROUPS; ++g) {
        alignas(64) float out[head_dim];
        const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(totals[g]));
        for (int v = 0; v < VECTORS; ++v) sums[g][v] = _mm512_mul_ps(sums[g][v], inverse);
        values_in_order<scalar_t, VECTORS>(sums[g], out);
        store_row(out, output_data + (query_row * heads + kv_head * GROUPS + g) * head_dim, head_dim);
      }
    }
  });
}

template <typename scalar_t, int VECTORS>
void attend_simd_groups(const DecodeCall& call) {
#define CHATKV_GROUPS(G) \
  case G: attend_simd<scalar_t, G, VECTORS>(call); return;
  switch (call.query.size(1) / call.key_cache.size(1)) {
    CHATKV_GROUPS(1) CHATKV_GROUPS(2) CHATKV_GROUPS(3) CHATKV_GROUPS(4) CHATKV_GROUPS(5) CHATKV_GROUPS(6) CHATKV_GROUPS(7) CHATKV_GROUPS(8)
    default: TORCH_CHECK(false, "unsupported query heads per KV head: ", call.query.size(1) / call.key_cache.size(1));
  }
#undef CHATKV_GROUPS
}

template <typename scalar_t>
void attend(const DecodeCall& call) {
  switch (call.query.size(2)) {
    case 16: attend_simd_groups<scalar_t, 1>(call); return;
    case 32: attend_simd_groups<scalar_t, 2>(call); return;
    case 64: attend_simd_groups<scalar_t, 4>(call); return;
    default: attend_simd_groups<scalar_t, 8>(call); return;
  }
}
#endif

// Stores each decode token's key and value in the pool, then attends it over its sequence, itself included.
// query [T, heads, head_dim] and key, value [T, kv_heads, head_dim]: the step's packed rows (any strides
// within a row: the packed step's transposed views); key_cache [blocks, kv_heads, head_dim / pack,
// block_size, pack] and value_cache [blocks, kv_heads, block_size, head_dim], both contiguous (pack = 1 for
// float32, 2 for bfloat16); block_tables int64 [n, width]; context_lens int64 [n] (keys each sequence attends
// over, its new token included: that token's key and value are stored at position context_lens - 1);
// query_rows int64 [n] (each sequence's row in query, key, value and output); output [T, heads, head_dim]
// contiguous. Rows not named in query_rows are neither stored nor attended.
void paged_decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            at::Tensor key_cache, at::Tensor value_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, const at::Tensor& query_rows, at::Tensor output,
                            double scale) {
  TORCH_CHECK(query.device().is_cpu(), "paged_decode_attention runs on the CPU");
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16,
              "paged_decode_attention supports float32 and bfloat16, not ", query.scalar_type());
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() && query.scalar_type() == value_cache.scalar_type() &&
                  output.scalar_type() == query.scalar_type(),
              "query, caches and output must share one dtype");
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [T, heads, head_dim] with unit last stride");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              "key and value must have the query's dtype");
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes() && key.size(0) == query.size(0) &&
                  key.size(2) == query.size(2) && key.stride(2) == 1 && value.stride(2) == 1,
              "key and value must be [T, kv_heads, head_dim] like the query's rows, with unit last stride");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "the KV caches must be contiguous");
  TORCH_CHECK(output.is_contiguous() && output.sizes() == query.sizes(), "output must be contiguous, shaped like query");
  const int64_t pack = 4 / query.element_size(), head_dim = query.size(2);
  TORCH_CHECK(key_cache.dim() == 5 && key_cache.size(2) * pack == head_dim && key_cache.size(4) == pack,
              "key_cache must be [blocks, kv_heads, head_dim / ", pack, ", block_size, ", pack, "]");
  const int64_t blocks = key_cache.size(0), kv_heads = key_cache.size(1), block_size = key_cache.size(3);
  TORCH_CHECK(value_cache.dim() == 4 && value_cache.size(0) == blocks && value_cache.size(1) == kv_heads &&
                  value_cache.size(2) == block_size && value_cache.size(3) == head_dim,
              "value_cache must be [blocks, kv_heads, block_size, head_dim], the key cache's blocks");
  TORCH_CHECK(key.size(1) == kv_heads, "key and value must have the caches' ", kv_heads, " KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
                  query_rows.scalar_type() == at::kLong && block_tables.is_contiguous(),
              "block tables, lengths and rows must be contiguous int64");
  TORCH_CHECK(supported(query.size(1), kv_heads, head_dim, block_size),
              "paged_decode_attention does not serve these shapes (see paged_decode_supported)");
  TORCH_CHECK(context_lens.numel() == block_tables.size(0) && query_rows.numel() == block_tables.size(0),
              "one length and one query row per block table");
  const int64_t* lengths = context_lens.data_ptr<int64_t>();
  const int64_t* rows = query_rows.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t i = 0; i < block_tables.size(0); ++i) {  // every read stays inside the pool, the rows inside query
    TORCH_CHECK(lengths[i] >= 1 && lengths[i] <= block_tables.size(1) * block_size, "sequence ", i,
                " attends over ", lengths[i], " keys, beyond its block table");
    TORCH_CHECK(rows[i] >= 0 && rows[i] < query.size(0), "query row ", rows[i], " is outside the query");
    for (int64_t b = 0; b < (lengths[i] + block_size - 1) / block_size; ++b) {
      const int64_t block = tables[i * block_tables.size(1) + b];
      TORCH_CHECK(block >= 0 && block < blocks, "sequence ", i, " names block ", block, ", outside the pool");
    }
  }
#if defined(__AVX512F__)
  const DecodeCall call{query, key, value, key_cache, value_cache, block_tables, context_lens, query_rows, output, scale};
  if (query.scalar_type() == at::kFloat) attend<float>(call);
  else if (query.scalar_type() == at::kBFloat16) attend<c10::BFloat16>(call);
#endif
}

// Store a step's new keys and values in the pool's layout: key, value [T, kv_heads, head_dim] (unit last
// stride), caches as paged_decode_attention takes them, slots int64 [T] (slot = block * block_size +
// position in the block; -1: a row this op skips, one the decode kernel stores). The same bits
// kv_blocks.write_tokens stores with torch's index_copy_, at a fraction of its cost (0.3 ms a layer for
// a 2,400-token prefill chunk). Bits are copied, never converted. A key is read as 32-bit words (one
// float32 dimension, or a pair of bfloat16 dimensions), each stored on its own line of the block; a value
// row is copied whole.
template <typename element_t>
void write_bits(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                const int64_t* slots) {
  constexpr int64_t pack = 4 / sizeof(element_t);
  const int64_t tokens = key.size(0), kv_heads = key.size(1), head_dim = key.size(2);
  const int64_t block_size = key_cache.size(3), words = head_dim / pack, run = block_size * head_dim;
  const element_t* key_data = static_cast<const element_t*>(key.data_ptr());
  const element_t* value_data = static_cast<const element_t*>(value.data_ptr());
  uint32_t* key_words = static_cast<uint32_t*>(key_cache.data_ptr());
  element_t* values = static_cast<element_t*>(value_cache.data_ptr());
  for (int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;  // a row stored elsewhere (the decode kernel stores its own)
    const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
    for (int64_t h = 0; h < kv_heads; ++h) {
      const element_t* k = key_data + t * key.stride(0) + h * key.stride(1);
      const element_t* v = value_data + t * value.stride(0) + h * value.stride(1);
      const int64_t start = (block * kv_heads + h) * run;  // this head's part of the block, in elements
      uint32_t* key_run = key_words + start / pack + offset;
      for (int64_t w = 0; w < words; ++w) {
        uint32_t word;
        std::memcpy(&word, k + w * pack, sizeof(word));
        key_run[w * block_size] = word;
      }
      std::memcpy(values + start + offset * head_dim, v, head_dim * sizeof(element_t));
    }
  }
}

void paged_kv_write(const at::Tensor& key, const at::Tensor& value, at::Tensor key_cache, at::Tensor value_cache,
                    const at::Tensor& slots) {
  TORCH_CHECK(key.device().is_cpu(), "paged_kv_write runs on the CPU");
  TORCH_CHECK(key.scalar_type() == value.scalar_type() && key.scalar_type() == key_cache.scalar_type() &&
                  key.scalar_type() == value_cache.scalar_type(),
              "keys, values and caches must share one dtype");
  TORCH_CHECK(key.element_size() == 2 || key.element_size() == 4, "paged_kv_write stores 16- and 32-bit elements");
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes() && key.stride(2) == 1 && value.stride(2) == 1,
              "key and value must be [T, kv_heads, head_dim] with unit last stride");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "the KV caches must be contiguous");
  const int64_t pack = 4 / key.element_size(), head_dim = key.size(2), kv_heads = key.size(1);
  TORCH_CHECK(key_cache.dim() == 5 && key_cache.size(1) == kv_heads && key_cache.size(2) * pack == head_dim &&
                  key_cache.size(4) == pack,
              "key_cache must be [blocks, kv_heads, head_dim / ", pack, ", block_size, ", pack, "]");
  const int64_t blocks = key_cache.size(0), block_size = key_cache.size(3);
  TORCH_CHECK(value_cache.dim() == 4 && value_cache.size(0) == blocks && value_cache.size(1) == kv_heads &&
                  value_cache.size(2) == block_size && value_cache.size(3) == head_dim,
              "value_cache must be [blocks, kv_heads, block_size, head_dim], the key cache's blocks");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == key.size(0),
              "slots must be contiguous int64, one per token");
  const int64_t* slot_data = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.numel(); ++t) {
    TORCH_CHECK(slot_data[t] >= -1 && slot_data[t] < blocks * block_size, "slot ", slot_data[t], " is outside the pool");
  }
  if (key.element_size() == 2) write_bits<uint16_t>(key, value, key_cache, value_cache, slot_data);
  else write_bits<uint32_t>(key, value, key_cache, value_cache, slot_data);
}

bool paged_decode_supported(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size) {
  return supported(heads, kv_heads, head_dim, block_size);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatkv, m) {
  m.def("paged_decode_attention(Tensor query, Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor block_tables, Tensor context_lens, Tensor query_rows, Tensor(c!) output, float scale) -> ()");
  m.def("paged_decode_supported(int heads, int kv_heads, int head_dim, int block_size) -> bool", paged_decode_supported);
  m.def("paged_kv_write(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(chatkv, CPU, m) {
  m.impl("paged_decode_attention", paged_decode_attention);
  m.impl("paged_kv_write", paged_kv_write);
}
