// An int8 weight-only linear map for the few rows of a decode step, for CPUs with AVX-512.
//
// y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]; q int8 [N, K] (symmetric, per output channel), scales
// float32 [N]; x float32 or bfloat16 [rows, K] with 1 to 8 rows; y has x's dtype; sums are float32.
// It serves SmolLM2's output head (49152 x 576, int8 under --quant int4 and int8) at about twice the
// speed of torch's _weight_int8pack_mm for one row, where that head alone was a quarter of a decode step:
// the weights stream through once and every sum stays in a register.
//
// Every row m is computed by the same instructions in the same order whatever the number of rows, so a
// token's logits do not depend on what else is in the step (speculative decoding verifies several rows
// at once and must give what one row gives). Registered as torch.ops.chatkv.int8_linear; built with the
// attention kernel (chatkv/kernels/__init__.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;

bool int8_linear_supported(int64_t in_features) {
#if defined(__AVX512F__)
  return in_features % 16 == 0;
#else
  return false;
#endif
}

// x as float32 [rows, K], contiguous
std::vector<float> rows_as_float(const at::Tensor& x) {
  const int64_t rows = x.size(0), k = x.size(1);
  std::vector<float> out(rows * k);
  if (x.scalar_type() == at::kFloat) {
    const float* source = x.data_ptr<float>();
    std::copy(source, source + rows * k, out.begin());
  } else {
    const c10::BFloat16* source = x.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < rows * k; ++i) out[i] = static_cast<float>(source[i]);
  }
  return out;
}

void check_rows(const at::Tensor& x, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU [rows, in] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "int8_linear takes 1 to 8 rows");
  TORCH_CHECK(x.size(1) == in_features, "x has ", x.size(1), " inputs, the weights ", in_features);
}

void store(const float* values, const at::Tensor& y, int64_t rows, int64_t n, int64_t out_features) {
  if (y.scalar_type() == at::kFloat) {
    float* target = y.data_ptr<float>();
    for (int64_t m = 0; m < rows; ++m) target[m * out_features + n] = values[m];
  } else {
    c10::BFloat16* target = y.data_ptr<c10::BFloat16>();
    for (int64_t m = 0; m < rows; ++m) target[m * out_features + n] = c10::BFloat16(values[m]);
  }
}

#if defined(__AVX512F__)
// Rows and output features are template constants, so every accumulator lives in a register: TILE output
// features at a time, TILE * ROWS independent chains of FMAs (at most 16) while the next weights stream in.
template <int ROWS>
constexpr int tile_for() { return ROWS <= 2 ? 4 : ROWS <= 4 ? 2 : 1; }

// Output features n0 .. n0 + TILE - 1 for all ROWS rows; each feature's sums run in the same order whatever TILE is.
template <int ROWS, int TILE>
inline void int8_tile(const float* xf, const int8_t* weights, const float* scale, int64_t k, int64_t out_features,
                      const at::Tensor& y, int64_t n0) {
  __m512 acc[TILE][ROWS];
  for (int t = 0; t < TILE; ++t)
    for (int m = 0; m < ROWS; ++m) acc[t][m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    for (int t = 0; t < TILE; ++t) {
      const int8_t* w = weights + (n0 + t) * k + i;
      _mm_prefetch(reinterpret_cast<const char*>(w) + TILE * k, _MM_HINT_T0);
      const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
      for (int m = 0; m < ROWS; ++m) acc[t][m] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(xf + m * k + i), acc[t][m]);
    }
  }
  for (int t = 0; t < TILE; ++t) {
    float values[ROWS];
    for (int m = 0; m < ROWS; ++m) values[m] = _mm512_reduce_add_ps(acc[t][m]) * scale[n0 + t];
    store(values, y, ROWS, n0 + t, out_features);
  }
}

template <int ROWS>
void int8_rows(const float* xf, const int8_t* weights, const float* scale, int64_t k, int64_t out_features,
               const at::Tensor& y) {
  constexpr int TILE = tile_for<ROWS>();
  at::parallel_for(0, (out_features + TILE - 1) / TILE, 64, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * TILE;
      if (n0 + TILE <= out_features) {
        int8_tile<ROWS, TILE>(xf, weights, scale, k, out_features, y, n0);
      } else {  // the last, partial tile: one feature at a time
        for (int64_t n = n0; n < out_features; ++n) int8_tile<ROWS, 1>(xf, weights, scale, k, out_features, y, n);
      }
    }
  });
}

template <typename Kernel>
void by_rows(int64_t rows, Kernel&& kernel) {
  switch (rows) {
    case 1: kernel(std::integral_constant<int, 1>{}); break;
    case 2: kernel(std::integral_constant<int, 2>{}); break;
    case 3: kernel(std::integral_constant<int, 3>{}); break;
    case 4: kernel(std::integral_constant<int, 4>{}); break;
    case 5: kernel(std::integral_constant<int, 5>{}); break;
    case 6: kernel(std::integral_constant<int, 6>{}); break;
    case 7: kernel(std::integral_constant<int, 7>{}); break;
    default: kernel(std::integral_constant<int, 8>{}); break;
  }
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be contiguous int8 [out, in]");
  TORCH_CHECK(q.size(1) % 16 == 0, "int8_linear needs a multiple of 16 inputs");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == q.size(0),
              "scales must be float32 [out]");
  check_rows(x, q.size(1));
  const int64_t rows = x.size(0), k = q.size(1), out_features = q.size(0);
  const std::vector<float> xf = rows_as_float(x);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  by_rows(rows, [&](auto r) {
    int8_rows<decltype(r)::value>(xf.data(), q.data_ptr<int8_t>(), scales.data_ptr<float>(), k, out_features, y);
  });
  return y;
}

#else
at::Tensor int8_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "built without AVX-512");
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatkv, m) {
  m.def("int8_linear_supported(int in_features) -> bool", int8_linear_supported);
  m.def("int8_linear(Tensor x, Tensor q, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatkv, CPU, m) {
  m.impl("int8_linear", int8_linear);
}
