// Group-wise int8 and int4 weight products for the CPU (llama/quantize.py builds and loads this file).
//
// Decoding multiplies a few rows of activations by every weight once, so its speed is the speed at
// which the weights stream from memory: the loop below reads each block of 32 codes once, turns it
// into floats in registers (code * scale, + min for int4) and multiplies it with every activation row.
// Plain loops over 32 lanes that the compiler vectorizes for the host (-O3 -march=native); threads
// split the output features (at::parallel_for: torch's own thread pool and thread count).
//
// Layouts, per weight row n (output feature) and group j of `group_size` inputs:
//   int8: codes int8 (N, K), w = code * scale[n, j]                          (absmax, as Q8_0)
//   int4: codes uint8 (N, K / 2), w = code * scale[n, j] + min[n, j], code 0..15  (as Q4_1)
//         each block of 32 weights is 16 bytes: byte l holds weight l (low nibble), l + 16 (high)
//   scales and mins bf16 (N, K / group_size); activations and outputs float32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLAMA_AVX2 1
#endif

namespace {

constexpr int64_t kBlock = 32;  // weights per block: the smallest group size

inline float bf16_to_float(uint16_t bits) {  // bf16 is the top half of a float32
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct Int8Weights {
  const int8_t* codes;
  const uint16_t* scales;
  int64_t K, groups_per_row, blocks_per_group;

  const int8_t* block_codes(int64_t n, int64_t b) const { return codes + n * K + b * kBlock; }
  float scale(int64_t n, int64_t b) const { return bf16_to_float(scales[n * groups_per_row + b / blocks_per_group]); }

  // Block b of row n as floats: code * scale.
  void block(int64_t n, int64_t b, float* w) const {
    const int8_t* q = block_codes(n, b);
    const float s = scale(n, b);
    for (int64_t l = 0; l < kBlock; ++l) w[l] = float(q[l]) * s;
  }
#ifdef LLAMA_AVX2
  void block(int64_t n, int64_t b, __m256* w) const {  // the same, 8 lanes at a time
    const int8_t* q = block_codes(n, b);
    const __m256 s = _mm256_set1_ps(scale(n, b));
    for (int i = 0; i < 4; ++i) {
      const __m128i codes8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i));
      w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes8)), s);
    }
  }
#endif
};

struct Int4Weights {
  const uint8_t* codes;
  const uint16_t* scales;
  const uint16_t* mins;
  int64_t K, groups_per_row, blocks_per_group;

  const uint8_t* block_codes(int64_t n, int64_t b) const { return codes + (n * K + b * kBlock) / 2; }
  int64_t group(int64_t n, int64_t b) const { return n * groups_per_row + b / blocks_per_group; }

  // Block b of row n: 16 bytes, the low nibbles are weights 0..15, the high ones 16..31; code * scale + min.
  void block(int64_t n, int64_t b, float* w) const {
    const uint8_t* q = block_codes(n, b);
    const float s = bf16_to_float(scales[group(n, b)]), m = bf16_to_float(mins[group(n, b)]);
    for (int64_t l = 0; l < kBlock / 2; ++l) {
      w[l] = float(q[l] & 15) * s + m;
      w[l + kBlock / 2] = float(q[l] >> 4) * s + m;
    }
  }
#ifdef LLAMA_AVX2
  void block(int64_t n, int64_t b, __m256* w) const {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block_codes(n, b)));
    const __m128i nibble = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    const __m256 s = _mm256_set1_ps(bf16_to_float(scales[group(n, b)]));
    const __m256 m = _mm256_set1_ps(bf16_to_float(mins[group(n, b)]));
    const __m128i halves[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};  // 8 codes each
    for (int i = 0; i < 4; ++i) w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(halves[i])), s, m);
  }
#endif
};

// y[m, n] = sum_k x[m, k] w[n, k] for R rows of x at once (R known at compile time, so the R x 32
// accumulators stay in registers) and the output features [n0, n1). Plain loops: any CPU.
template <int R, typename Weights>
void rows_portable(const float* x, float* y, int64_t N, int64_t n0, int64_t n1, const Weights& weights) {
  const int64_t K = weights.K;
  for (int64_t n = n0; n < n1; ++n) {
    float acc[R][kBlock] = {};
    float w[kBlock];
    for (int64_t b = 0; b < K / kBlock; ++b) {
      weights.block(n, b, w);
      for (int r = 0; r < R; ++r)
        for (int64_t l = 0; l < kBlock; ++l) acc[r][l] += x[r * K + b * kBlock + l] * w[l];
    }
    for (int r = 0; r < R; ++r) {
      float sum = 0;
      for (int64_t l = 0; l < kBlock; ++l) sum += acc[r][l];
      y[r * N + n] = sum;
    }
  }
}

#ifdef LLAMA_AVX2
// The same with AVX2 vectors of 8 floats (the compiler does not vectorize the code conversions well).
template <int R, typename Weights>
void rows_avx2(const float* x, float* y, int64_t N, int64_t n0, int64_t n1, const Weights& weights) {
  const int64_t K = weights.K;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
    __m256 w[4];
    for (int64_t b = 0; b < K / kBlock; ++b) {
      weights.block(n, b, w);
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + b * kBlock + 8 * i), w[i], acc[r][i]);
    }
    for (int r = 0; r < R; ++r) {
      float lanes[8];
      _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
      float sum = 0;
      for (int l = 0; l < 8; ++l) sum += lanes[l];
      y[r * N + n] = sum;
    }
  }
}
#endif

template <int R, typename Weights>
void rows(bool simd, const float* x, float* y, int64_t N, int64_t n0, int64_t n1, const Weights& weights) {
#ifdef LLAMA_AVX2
  if (simd) return rows_avx2<R>(x, y, N, n0, n1, weights);
#endif
  rows_portable<R>(x, y, N, n0, n1, weights);
}

template <typename Weights>
at::Tensor matmul(const at::Tensor& x, int64_t N, const Weights& weights, bool simd) {
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;  // four rows at a time share each block's conversion; the rest one by one
    for (; m + 4 <= M; m += 4) rows<4>(simd, xp + m * weights.K, yp + m * N, N, n0, n1, weights);
    for (; m < M; ++m) rows<1>(simd, xp + m * weights.K, yp + m * N, N, n0, n1, weights);
  });
  return y;
}

template <typename Weights>
at::Tensor dequantize(int64_t N, const Weights& weights) {
  at::Tensor w = at::empty({N, weights.K}, at::TensorOptions().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < weights.K / kBlock; ++b) weights.block(n, b, wp + n * weights.K + b * kBlock);
  });
  return w;
}

void check(const at::Tensor& codes, const at::Tensor& scales, int64_t K, int64_t group_size, at::ScalarType code_type) {
  TORCH_CHECK(codes.scalar_type() == code_type && codes.is_contiguous() && codes.dim() == 2, "codes: contiguous 2-D ", code_type);
  TORCH_CHECK(group_size % kBlock == 0 && K % group_size == 0, "group size must be a multiple of 32 dividing ", K);
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() && scales.size(0) == codes.size(0) &&
                  scales.size(1) == K / group_size, "scales: contiguous bf16 (N, K / group_size)");
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == K,
              "x: contiguous float32 (M, ", K, ")");
}

Int8Weights int8_weights(const at::Tensor& codes, const at::Tensor& scales, int64_t group_size) {
  const int64_t K = codes.size(1);
  check(codes, scales, K, group_size, at::kChar);
  return {codes.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr()), K, K / group_size,
          group_size / kBlock};
}

Int4Weights int4_weights(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins, int64_t group_size) {
  const int64_t K = codes.size(1) * 2;
  check(codes, scales, K, group_size, at::kByte);
  TORCH_CHECK(mins.sizes() == scales.sizes() && mins.scalar_type() == at::kBFloat16 && mins.is_contiguous(),
              "mins: like scales");
  return {codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr()),
          reinterpret_cast<const uint16_t*>(mins.data_ptr()), K, K / group_size, group_size / kBlock};
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t group_size,
                   bool simd) {
  Int8Weights weights = int8_weights(codes, scales, group_size);
  check_x(x, weights.K);
  return matmul(x, codes.size(0), weights, simd);
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                   int64_t group_size, bool simd) {
  Int4Weights weights = int4_weights(codes, scales, mins, group_size);
  check_x(x, weights.K);
  return matmul(x, codes.size(0), weights, simd);
}

at::Tensor int8_dequantize(const at::Tensor& codes, const at::Tensor& scales, int64_t group_size) {
  return dequantize(codes.size(0), int8_weights(codes, scales, group_size));
}

at::Tensor int4_dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                           int64_t group_size) {
  return dequantize(codes.size(0), int4_weights(codes, scales, mins, group_size));
}

}  // namespace

TORCH_LIBRARY(llama_quantized, m) {
  m.def("int8_mm(Tensor x, Tensor codes, Tensor scales, int group_size, bool simd=True) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor codes, Tensor scales, Tensor mins, int group_size, bool simd=True) -> Tensor");
  m.def("int8_dequantize(Tensor codes, Tensor scales, int group_size) -> Tensor");
  m.def("int4_dequantize(Tensor codes, Tensor scales, Tensor mins, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_quantized, CPU, m) {
  m.impl("int8_mm", int8_mm);
  m.impl("int4_mm", int4_mm);
  m.impl("int8_dequantize", int8_dequantize);
  m.impl("int4_dequantize", int4_dequantize);
}
