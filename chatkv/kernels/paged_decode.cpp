// Decode attention read straight from the paged KV pool, for CPUs with AVX-512.
//
// One query token per sequence attends over that sequence's cached keys and values, found through its
// block table; nothing is gathered into a padded copy first. Work is split over (sequence, KV head)
// pairs; each pair reads its keys and values once, for all the query heads that share that KV head
// (grouped-query attention), with those queries and the value sums held in registers. Scores, softmax
// and sums are float32 whatever the pool's dtype; the scores of 16 keys are reduced together (one
// transpose-and-add tree instead of 16 horizontal sums) and the softmax uses a polynomial exp
// (relative error ~2e-7).
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

#if defined(__AVX512F__)
inline void store_row(const float* source, float* target, int64_t n) { std::memcpy(target, source, n * sizeof(float)); }

inline void store_row(const float* source, c10::BFloat16* target, int64_t n) {
  for (int64_t i = 0; i < n; ++i) target[i] = c10::BFloat16(source[i]);  // round to nearest even
}

inline __m512 load16(const float* source) { return _mm512_loadu_ps(source); }

inline __m512 load16(const c10::BFloat16* source) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// [sum(v[0]), ..., sum(v[15])]
inline __m512 sum_each(__m512 v[16]) {
  __m512 pairs[8];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  __m512 quads[4];
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [a, b, c, d], each the sum of that lane of its vector
    const __m512d low = _mm512_castps_pd(pairs[2 * i]), high = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(low, high)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(low, high)));
  }
  // add the four 128-bit lanes of each quad: lanes 0+1 and 2+3, then the two halves
  const __m512 first = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88), _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 second = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88), _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(first, second, 0x88), _mm512_shuffle_f32x4(first, second, 0xDD));
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

// Ask for the 16 rows of keys (or values) of one KV head that start at ``first`` rows before they are
// needed: blocks lie anywhere in the pool, so the hardware prefetcher cannot guess the next one.
template <typename scalar_t>
inline void prefetch_tile(const scalar_t* first, int64_t rows, int64_t slot_stride, int64_t row_bytes, int hint) {
  for (int64_t k = 0; k < rows; ++k) {
    const char* row = reinterpret_cast<const char*>(first + k * slot_stride);
    for (int64_t line = 0; line < row_bytes; line += 64) {
      if (hint == _MM_HINT_T0) _mm_prefetch(row + line, _MM_HINT_T0);
      else _mm_prefetch(row + line, _MM_HINT_T1);
    }
  }
}

template <typename scalar_t, int GROUPS, int VECTORS>  // VECTORS = head_dim / 16
void attend_simd(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                 const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& query_rows,
                 at::Tensor& output, int64_t block_size, double scale) {
  constexpr int64_t head_dim = VECTORS * 16;
#if defined(__AVX512BF16__)
  // bfloat16 keys and queries meet in AVX512-BF16 dot products (no widening of the keys)
  constexpr bool bf16_dot = std::is_same_v<scalar_t, c10::BFloat16> && VECTORS % 2 == 0;
#else
  constexpr bool bf16_dot = false;
#endif
  const int64_t sequences = block_tables.size(0);
  const int64_t table_width = block_tables.size(1);
  const int64_t heads = query.size(1);
  const int64_t kv_heads = key_cache.size(1);
  const int64_t query_row_stride = query.stride(0), query_head_stride = query.stride(1);
  const int64_t slot_stride = kv_heads * head_dim;
  const scalar_t* query_data = query.data_ptr<scalar_t>();
  const scalar_t* key_data = key_cache.data_ptr<scalar_t>();
  const scalar_t* value_data = value_cache.data_ptr<scalar_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lengths = context_lens.data_ptr<int64_t>();
  const int64_t* rows = query_rows.data_ptr<int64_t>();
  scalar_t* output_data = output.data_ptr<scalar_t>();
  const __m512 scale_v = _mm512_set1_ps(static_cast<float>(scale));

  at::parallel_for(0, sequences * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [GROUPS, length rounded up to 16]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sequence = task / kv_heads, kv_head = task % kv_heads;
      const int64_t length = lengths[sequence];
      const int64_t* table = tables + sequence * table_width;
      const int64_t query_row = rows[sequence];
      const int64_t head_offset = kv_head * head_dim, row_bytes = head_dim * sizeof(scalar_t);
      // tiles of 16 keys never straddle a block (block_size is a multiple of 16): a tile's rows are consecutive slots
      auto tile_start = [&](int64_t first) {
        return (table[first / block_size] * block_size + first % block_size) * slot_stride + head_offset;
      };
      __m512 q[GROUPS][VECTORS], sums[GROUPS][VECTORS], products[GROUPS][16];
#if defined(__AVX512BF16__)
      __m512bh q_bh[GROUPS][VECTORS / 2 > 0 ? VECTORS / 2 : 1];
#endif
      for (int g = 0; g < GROUPS; ++g) {
        const scalar_t* row = query_data + query_row * query_row_stride + (kv_head * GROUPS + g) * query_head_stride;
        for (int v = 0; v < VECTORS; ++v) {
          q[g][v] = _mm512_mul_ps(load16(row + 16 * v), scale_v);
          sums[g][v] = _mm512_setzero_ps();
        }
#if defined(__AVX512BF16__)
        if constexpr (bf16_dot) {
          for (int v = 0; v < VECTORS / 2; ++v) q_bh[g][v] = (__m512bh)_mm512_loadu_si512(row + 32 * v);
        }
#endif
      }
      const int64_t padded = (length + 15) / 16 * 16;
      scores.resize(GROUPS * padded);
      const __m512 minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      __m512 peaks[GROUPS];
      for (int g = 0; g < GROUPS; ++g) peaks[g] = minus_infinity;
      for (int64_t ahead = 0; ahead < std::min<int64_t>(32, length); ahead += 16) {
        prefetch_tile(key_data + tile_start(ahead), std::min<int64_t>(16, length - ahead), slot_stride, row_bytes, _MM_HINT_T0);
      }
      // 1. scores, 16 keys at a time; each key row is read once for all the query heads of this KV head
      for (int64_t first = 0; first < length; first += 16) {
        const int64_t count = std::min<int64_t>(16, length - first);
        if (first + 32 < length) {  // two tiles ahead
          prefetch_tile(key_data + tile_start(first + 32), std::min<int64_t>(16, length - first - 32), slot_stride, row_bytes, _MM_HINT_T0);
        }
        const int64_t start = tile_start(first);
        prefetch_tile(value_data + start, count, slot_stride, row_bytes, _MM_HINT_T1);  // for step 3
        const scalar_t* keys = key_data + start;
        for (int64_t k = 0; k < 16; ++k) {
          if (k >= count) {
            for (int g = 0; g < GROUPS; ++g) products[g][k] = _mm512_setzero_ps();
            continue;
          }
          const scalar_t* key = keys + k * slot_stride;
#if defined(__AVX512BF16__)
          if constexpr (bf16_dot) {  // bfloat16 pairs multiplied exactly and summed in float32, 32 at a time
            __m512bh key_bh[VECTORS / 2];
            for (int v = 0; v < VECTORS / 2; ++v) key_bh[v] = (__m512bh)_mm512_loadu_si512(key + 32 * v);
            for (int g = 0; g < GROUPS; ++g) {
              __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), q_bh[g][0], key_bh[0]);
              for (int v = 1; v < VECTORS / 2; ++v) acc = _mm512_dpbf16_ps(acc, q_bh[g][v], key_bh[v]);
              products[g][k] = acc;
            }
            continue;
          }
#endif
          __m512 key_v[VECTORS];
          for (int v = 0; v < VECTORS; ++v) key_v[v] = load16(key + 16 * v);
          for (int g = 0; g < GROUPS; ++g) {
            __m512 acc = _mm512_mul_ps(q[g][0], key_v[0]);
            for (int v = 1; v < VECTORS; ++v) acc = _mm512_fmadd_ps(q[g][v], key_v[v], acc);
            products[g][k] = acc;
          }
        }
        const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1);
        for (int g = 0; g < GROUPS; ++g) {
          // (bfloat16 dot products leave the scale for here; the float path folded it into q)
          const __m512 dots = bf16_dot ? _mm512_mul_ps(sum_each(products[g]), scale_v) : sum_each(products[g]);
          const __m512 tile = _mm512_mask_mov_ps(minus_infinity, valid, dots);
          _mm512_storeu_ps(scores.data() + g * padded + first, tile);
          peaks[g] = _mm512_max_ps(peaks[g], tile);
        }
      }
      // 2. softmax numerators in place; the division by their total waits for the output
      float inverse_totals[GROUPS];
      for (int g = 0; g < GROUPS; ++g) {
        const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(peaks[g]));
        float* s = scores.data() + g * padded;
        __m512 total = _mm512_setzero_ps();
        for (int64_t t = 0; t < padded; t += 16) {
          const __m512 tile = _mm512_loadu_ps(s + t);
          // masked lanes (-inf) give exactly 0, not the polynomial's e^-87
          const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(tile, minus_infinity, _CMP_NEQ_OQ),
                                               exp_nonpositive(_mm512_sub_ps(tile, peak)));
          _mm512_storeu_ps(s + t, e);
          total = _mm512_add_ps(total, e);
        }
        inverse_totals[g] = 1.0f / _mm512_reduce_add_ps(total);
      }
      // 3. weighted sums of the value rows, each read once for all the query heads
      for (int64_t first = 0; first < length; first += 16) {
        const int64_t count = std::min<int64_t>(16, length - first);
        if (first + 16 < length) {
          prefetch_tile(value_data + tile_start(first + 16), std::min<int64_t>(16, length - first - 16), slot_stride, row_bytes, _MM_HINT_T0);
        }
        const scalar_t* values = value_data + tile_start(first);
        for (int64_t k = 0; k < count; ++k) {
          const scalar_t* value = values + k * slot_stride;
          __m512 value_v[VECTORS];
          for (int v = 0; v < VECTORS; ++v) value_v[v] = load16(value + 16 * v);
          for (int g = 0; g < GROUPS; ++g) {
            const __m512 weight = _mm512_set1_ps(scores[g * padded + first + k]);
            for (int v = 0; v < VECTORS; ++v) sums[g][v] = _mm512_fmadd_ps(weight, value_v[v], sums[g][v]);
          }
        }
      }
      for (int g = 0; g < GROUPS; ++g) {
        alignas(64) float out[head_dim];
        const __m512 inverse = _mm512_set1_ps(inverse_totals[g]);
        for (int v = 0; v < VECTORS; ++v) _mm512_store_ps(out + 16 * v, _mm512_mul_ps(sums[g][v], inverse));
        store_row(out, output_data + (query_row * heads + kv_head * GROUPS + g) * head_dim, head_dim);
      }
    }
  });
}

template <typename scalar_t, int VECTORS>
void attend_simd_groups(int64_t groups, const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& query_rows,
                        at::Tensor& output, int64_t block_size, double scale) {
#define CHATKV_GROUPS(G) \
  case G: attend_simd<scalar_t, G, VECTORS>(query, key_cache, value_cache, block_tables, context_lens, query_rows, output, block_size, scale); return;
  switch (groups) {
    CHATKV_GROUPS(1) CHATKV_GROUPS(2) CHATKV_GROUPS(3) CHATKV_GROUPS(4) CHATKV_GROUPS(5) CHATKV_GROUPS(6) CHATKV_GROUPS(7) CHATKV_GROUPS(8)
    default: TORCH_CHECK(false, "unsupported query heads per KV head: ", groups);
  }
#undef CHATKV_GROUPS
}

template <typename scalar_t>
void attend(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
            const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& query_rows,
            at::Tensor& output, int64_t block_size, double scale) {
  const int64_t groups = query.size(1) / key_cache.size(1);
  switch (query.size(2)) {
    case 16: attend_simd_groups<scalar_t, 1>(groups, query, key_cache, value_cache, block_tables, context_lens, query_rows, output, block_size, scale); return;
    case 32: attend_simd_groups<scalar_t, 2>(groups, query, key_cache, value_cache, block_tables, context_lens, query_rows, output, block_size, scale); return;
    case 64: attend_simd_groups<scalar_t, 4>(groups, query, key_cache, value_cache, block_tables, context_lens, query_rows, output, block_size, scale); return;
    default: attend_simd_groups<scalar_t, 8>(groups, query, key_cache, value_cache, block_tables, context_lens, query_rows, output, block_size, scale); return;
  }
}
#endif

// query [T, heads, head_dim] (any strides within a row: the packed step's transposed view);
// key_cache, value_cache [slots, kv_heads, head_dim] contiguous; block_tables int64 [n, width];
// context_lens int64 [n] (keys each sequence attends over, its new token included);
// query_rows int64 [n] (each sequence's row in query and output); output [T, heads, head_dim] contiguous.
void paged_decode_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens,
                            const at::Tensor& query_rows, at::Tensor output, int64_t block_size, double scale) {
  TORCH_CHECK(query.device().is_cpu(), "paged_decode_attention runs on the CPU");
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [T, heads, head_dim] with unit last stride");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "the KV caches must be contiguous");
  TORCH_CHECK(output.is_contiguous() && output.sizes() == query.sizes(), "output must be contiguous, shaped like query");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() && output.scalar_type() == query.scalar_type(),
              "query, caches and output must share one dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
                  query_rows.scalar_type() == at::kLong && block_tables.is_contiguous(),
              "block tables, lengths and rows must be contiguous int64");
  TORCH_CHECK(supported(query.size(1), key_cache.size(1), query.size(2), block_size),
              "paged_decode_attention does not serve these shapes (see paged_decode_supported)");
  TORCH_CHECK(context_lens.numel() == block_tables.size(0) && query_rows.numel() == block_tables.size(0),
              "one length and one query row per block table");
  const int64_t* lengths = context_lens.data_ptr<int64_t>();
  const int64_t* rows = query_rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < block_tables.size(0); ++i) {  // every read stays inside the tables, the rows inside query
    TORCH_CHECK(lengths[i] >= 1 && lengths[i] <= block_tables.size(1) * block_size, "sequence ", i,
                " attends over ", lengths[i], " keys, beyond its block table");
    TORCH_CHECK(rows[i] >= 0 && rows[i] < query.size(0), "query row ", rows[i], " is outside the query");
  }
#if defined(__AVX512F__)
  if (query.scalar_type() == at::kFloat) {
    attend<float>(query, key_cache, value_cache, block_tables, context_lens, query_rows, output, block_size, scale);
  } else if (query.scalar_type() == at::kBFloat16) {
    attend<c10::BFloat16>(query, key_cache, value_cache, block_tables, context_lens, query_rows, output, block_size, scale);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16, not ", query.scalar_type());
  }
#endif
}

bool paged_decode_supported(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size) {
  return supported(heads, kv_heads, head_dim, block_size);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatkv, m) {
  m.def("paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor context_lens, Tensor query_rows, Tensor(a!) output, int block_size, float scale) -> ()");
  m.def("paged_decode_supported(int heads, int kv_heads, int head_dim, int block_size) -> bool", paged_decode_supported);
}

TORCH_LIBRARY_IMPL(chatkv, CPU, m) { m.impl("paged_decode_attention", paged_decode_attention); }
