// Group-wise int8 and int4 weight products for the CPU (llama/quantize.py builds and loads this file).
//
// Decoding multiplies a few rows of activations by every weight once, so its speed is the speed at
// which the weights stream from memory, provided turning codes into numbers costs less than reading
// them. So the inner loop does the least per weight: it multiplies each block of 32 codes with the
// activations rounded to integers (below) in a few integer instructions, turns the block's sum into
// a float once and applies the weight scale times the activation step; int4's zero comes in once
// per group through the sum of x over the group.
// Threads split the output features (at::parallel_for: torch's own thread pool and thread count).
// Without AVX2 the same arithmetic runs in plain loops (tested too: simd=False).
//
// Layouts, per weight row n (output feature) and group j of `group_size` inputs:
//   int8: codes int8 (N, K), w = code * scale[n, j]                               (absmax, as Q8_0)
//   int4: codes uint8 (N, K / 2), w = (code - 8) * scale[n, j] + zero[n, j], code 0..15 (as Q4_1)
//         each block of 32 weights is 16 bytes: byte l holds weight l (low 4 bits), l + 16 (high)
//   scales and zeros bf16 (N, K / group_size); activations and outputs float32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLAMA_AVX2 1
#endif

namespace {

constexpr int64_t kBlock = 32;  // weights per block: the smallest group size, and activations' rounding unit

inline float bf16_to_float(uint16_t bits) {  // bf16 is the top half of a float32
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Each scheme multiplies its codes with activations rounded to integers per block of 32:
//   int8 weights x int16 activations (x ~ q * step, step = max |x| / 32767): the rounding is ~1e-5 of
//     each value, below fp32 rounding of the sum, so the product is the weights' error alone;
//   int4 weights x int8 activations (step = max |x| / 127, as llama.cpp does for its 4-bit kinds):
//     twice as many products per instruction; the rounding costs a fraction of the 4-bit weights' own
//     error (docs/quantization.md measures both).
// Integer products are exact; each block's int32 sum becomes a float once and is multiplied by the
// block's weight scale times its activation step.

// One weight matrix: codes, bf16 scales (and zeros) per group, K inputs per row.
template <typename Code>
struct GroupWeights {
  const Code* codes;
  const uint16_t* scales;
  const uint16_t* zeros;  // int4 only
  int64_t K, group_size;
};

struct Int8Weights : GroupWeights<int8_t> {
  using Activation = int16_t;
  static constexpr float kActivationMax = 32767;
  static constexpr bool kHasZero = false;

  const int8_t* block(int64_t n, int64_t k) const { return codes + n * K + k; }
  void codes_as_ints(int64_t n, int64_t k, int32_t* c) const {  // the 32 codes from input k of row n
    for (int64_t l = 0; l < kBlock; ++l) c[l] = block(n, k)[l];
  }
#ifdef LLAMA_AVX2
  struct Loaded { __m256i low, high; };  // codes 0..15 and 16..31 as int16
  Loaded load(int64_t n, int64_t k) const {
    const int8_t* q = block(n, k);
    return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)))};
  }
  // 8 int32 lanes, each the sum of 4 products: |code| <= 127, |x| <= 32767 keep it below 2^24 (exact as a float).
  static __m256i dot(const Loaded& w, const int16_t* x) {
    const __m256i x_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    const __m256i x_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
    return _mm256_add_epi32(_mm256_madd_epi16(w.low, x_low), _mm256_madd_epi16(w.high, x_high));
  }
#endif
};

struct Int4Weights : GroupWeights<uint8_t> {
  using Activation = int8_t;
  static constexpr float kActivationMax = 127;
  static constexpr bool kHasZero = true;

  const uint8_t* block(int64_t n, int64_t k) const { return codes + (n * K + k) / 2; }
  void codes_as_ints(int64_t n, int64_t k, int32_t* c) const {  // code - 8: centred, -8..7
    const uint8_t* q = block(n, k);
    for (int64_t l = 0; l < kBlock / 2; ++l) {
      c[l] = (q[l] & 15) - 8;
      c[l + kBlock / 2] = (q[l] >> 4) - 8;
    }
  }
#ifdef LLAMA_AVX2
  using Loaded = __m256i;  // 32 codes - 8 as bytes
  Loaded load(int64_t n, int64_t k) const {  // 16 bytes: the low halves are codes 0..15, the high 16..31
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block(n, k)));
    const __m128i low = _mm_set1_epi8(15);
    const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
    return _mm256_sub_epi8(codes, _mm256_set1_epi8(8));
  }
  // The instruction multiplies unsigned by signed bytes, so |code| times x with code's sign moved onto
  // x; its 16-bit pair sums cannot overflow: |code| <= 8, |x| <= 127.
  static __m256i dot(const Loaded& w, const int8_t* x) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
  }
#endif
};

// Activations rounded per block of 32: x ~ q * step.
template <typename Activation>
struct RoundedRows {
  std::vector<Activation> q;  // (M, K)
  std::vector<float> step;    // (M, K / 32)
  std::vector<float> sums;    // (M, K / group_size): sum of x (not rounded) over each group, for int4's zero
};

template <typename Weights>
RoundedRows<typename Weights::Activation> round_rows(const float* x, int64_t M, int64_t K, int64_t group_size) {
  RoundedRows<typename Weights::Activation> rows{std::vector<typename Weights::Activation>(M * K),
                                                 std::vector<float>(M * K / kBlock), std::vector<float>(M * K / group_size)};
  for (int64_t b = 0; b < M * K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0;
    for (int64_t l = 0; l < kBlock; ++l) amax = std::max(amax, std::fabs(xb[l]));
    const float step = amax / Weights::kActivationMax;
    rows.step[b] = step;
    for (int64_t l = 0; l < kBlock; ++l) {
      rows.q[b * kBlock + l] = step > 0 ? typename Weights::Activation(std::nearbyint(xb[l] / step)) : 0;
      rows.sums[b * kBlock / group_size] += xb[l];
    }
  }
  return rows;
}

// int4's zero times the sum of x over each group, for weight row n and activation row m; 0 for int8.
template <typename Weights, typename X>
float zero_term(const Weights& weights, const X& x, int64_t n, int64_t m) {
  if (!Weights::kHasZero) return 0.0f;
  const int64_t G = weights.K / weights.group_size;
  float sum = 0;
  for (int64_t j = 0; j < G; ++j) sum += bf16_to_float(weights.zeros[n * G + j]) * x.sums[m * G + j];
  return sum;
}

// y[m, n] for R rows of x at once (R known at compile time, so the accumulators stay in registers;
// the rows share each block's load) and the output features [n0, n1). Plain loops: any CPU.
template <int R, typename Weights, typename X>
void rows_portable(const X& x, int64_t m, float* y, int64_t N, int64_t n0, int64_t n1, const Weights& weights) {
  const int64_t K = weights.K, G = K / weights.group_size;
  int32_t c[kBlock];
  for (int64_t n = n0; n < n1; ++n) {
    float total[R] = {};
    for (int64_t j = 0; j < G; ++j) {  // group j: inputs [k0, k1)
      const float scale = bf16_to_float(weights.scales[n * G + j]);
      const int64_t k0 = j * weights.group_size, k1 = k0 + weights.group_size;
      for (int64_t k = k0; k < k1; k += kBlock) {
        weights.codes_as_ints(n, k, c);
        for (int r = 0; r < R; ++r) {
          const auto* xq = x.q.data() + (m + r) * K + k;
          int32_t dot = 0;
          for (int64_t l = 0; l < kBlock; ++l) dot += c[l] * xq[l];
          total[r] += scale * x.step[((m + r) * K + k) / kBlock] * float(dot);
        }
      }
    }
    for (int r = 0; r < R; ++r) y[(m + r) * N + n] = total[r] + zero_term(weights, x, n, m + r);
  }
}

#ifdef LLAMA_AVX2
// The same with AVX2 integer instructions (compilers do not find them for the loop above).
template <int R, typename Weights, typename X>
void rows_avx2(const X& x, int64_t m, float* y, int64_t N, int64_t n0, int64_t n1, const Weights& weights) {
  const int64_t K = weights.K, G = K / weights.group_size;
  const int shift = __builtin_ctzll(weights.group_size);  // k >> shift: the group of input k (a power of 2)
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* scales = weights.scales + n * G;
    // Two sums per row, for even and odd blocks: each block's multiply-add need not wait for the last.
    __m256 total[R][2];
    for (int r = 0; r < R; ++r) total[r][0] = total[r][1] = _mm256_setzero_ps();
    auto block = [&](int64_t k, int half) {  // block k into sum `half`
      const typename Weights::Loaded w = weights.load(n, k);
      const float scale = bf16_to_float(scales[k >> shift]);
      for (int r = 0; r < R; ++r) {
        const int64_t at = (m + r) * K + k;
        const __m256 dot = _mm256_cvtepi32_ps(Weights::dot(w, x.q.data() + at));
        total[r][half] = _mm256_fmadd_ps(dot, _mm256_set1_ps(scale * x.step[at / kBlock]), total[r][half]);
      }
    };
    int64_t k = 0;
    for (; k + 2 * kBlock <= K; k += 2 * kBlock) {
      block(k, 0);
      block(k + kBlock, 1);
    }
    if (k < K) block(k, 0);
    for (int r = 0; r < R; ++r) {
      float lanes[8], sum = zero_term(weights, x, n, m + r);
      _mm256_storeu_ps(lanes, _mm256_add_ps(total[r][0], total[r][1]));
      for (int l = 0; l < 8; ++l) sum += lanes[l];
      y[(m + r) * N + n] = sum;
    }
  }
}
#endif

template <int R, typename Weights, typename X>
void rows(bool simd, const X& x, int64_t m, float* y, int64_t N, int64_t n0, int64_t n1, const Weights& weights) {
#ifdef LLAMA_AVX2
  if (simd) return rows_avx2<R>(x, m, y, N, n0, n1, weights);
#endif
  rows_portable<R>(x, m, y, N, n0, n1, weights);
}

template <typename Weights>
at::Tensor matmul(const at::Tensor& x, int64_t N, const Weights& weights, bool simd) {
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const auto rows_x = round_rows<Weights>(x.data_ptr<float>(), M, weights.K, weights.group_size);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;  // four rows at a time share each block's load; the rest one by one
    for (; m + 4 <= M; m += 4) rows<4>(simd, rows_x, m, yp, N, n0, n1, weights);
    for (; m < M; ++m) rows<1>(simd, rows_x, m, yp, N, n0, n1, weights);
  });
  return y;
}

template <typename Weights>
at::Tensor dequantize(int64_t N, const Weights& weights) {
  at::Tensor w = at::empty({N, weights.K}, at::TensorOptions().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
  const int64_t K = weights.K, G = K / weights.group_size;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int32_t c[kBlock];
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; k += kBlock) {
        const int64_t j = n * G + k / weights.group_size;  // once per block: not the hot loop
        const float scale = bf16_to_float(weights.scales[j]), zero = Weights::kHasZero ? bf16_to_float(weights.zeros[j]) : 0.0f;
        weights.codes_as_ints(n, k, c);
        for (int64_t l = 0; l < kBlock; ++l) wp[n * K + k + l] = float(c[l]) * scale + zero;
      }
  });
  return w;
}

void check(const at::Tensor& codes, const at::Tensor& scales, int64_t K, int64_t group_size, at::ScalarType code_type) {
  TORCH_CHECK(codes.scalar_type() == code_type && codes.is_contiguous() && codes.dim() == 2, "codes: contiguous 2-D ", code_type);
  TORCH_CHECK(group_size >= kBlock && (group_size & (group_size - 1)) == 0 && K % group_size == 0,
              "group size must be a power of 2 >= 32 dividing ", K);  // the SIMD loop finds a block's group by a shift
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
  return {{codes.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr()), nullptr, K, group_size}};
}

Int4Weights int4_weights(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, int64_t group_size) {
  const int64_t K = codes.size(1) * 2;
  check(codes, scales, K, group_size, at::kByte);
  TORCH_CHECK(zeros.sizes() == scales.sizes() && zeros.scalar_type() == at::kBFloat16 && zeros.is_contiguous(),
              "zeros: like scales");
  return {{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr()),
           reinterpret_cast<const uint16_t*>(zeros.data_ptr()), K, group_size}};
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t group_size,
                   bool simd) {
  Int8Weights weights = int8_weights(codes, scales, group_size);
  check_x(x, weights.K);
  return matmul(x, codes.size(0), weights, simd);
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t group_size, bool simd) {
  Int4Weights weights = int4_weights(codes, scales, zeros, group_size);
  check_x(x, weights.K);
  return matmul(x, codes.size(0), weights, simd);
}

at::Tensor int8_dequantize(const at::Tensor& codes, const at::Tensor& scales, int64_t group_size) {
  return dequantize(codes.size(0), int8_weights(codes, scales, group_size));
}

at::Tensor int4_dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                           int64_t group_size) {
  return dequantize(codes.size(0), int4_weights(codes, scales, zeros, group_size));
}

}  // namespace

TORCH_LIBRARY(llama_quantized, m) {
  m.def("int8_mm(Tensor x, Tensor codes, Tensor scales, int group_size, bool simd=True) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int group_size, bool simd=True) -> Tensor");
  m.def("int8_dequantize(Tensor codes, Tensor scales, int group_size) -> Tensor");
  m.def("int4_dequantize(Tensor codes, Tensor scales, Tensor zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_quantized, CPU, m) {
  m.impl("int8_mm", int8_mm);
  m.impl("int4_mm", int4_mm);
  m.impl("int8_dequantize", int8_dequantize);
  m.impl("int4_dequantize", int4_dequantize);
}
