// Group-wise int8 and int4 weight products for the CPU (llama/generation/quantize.py builds and loads
// this file), on our own layouts and on llama.cpp's Q8_0 / Q4_0 blocks as a GGUF file stores them
// (layouts.h), the quantizers that turn float weights into our layouts (quantize.h), and the
// dequantization of llama.cpp's other common types for loading (kquants.h).
//
// Decoding multiplies a few rows of activations by every weight once, so its speed is the speed at
// which the weights stream from memory, provided turning codes into numbers costs less than reading
// them. So the inner loop does the least per weight: it multiplies each block of 32 codes with the
// activations rounded to integers (below) in a few integer instructions, turns the block's sum into
// a float once and applies the weight scale times the activation step; int4's zero comes in once
// per group through the sum of x over the group. The loop asks for the weights ahead of use
// (prefetch), and the product's output features are split between the calling thread and helper
// threads of this file's own (threads.h: why not torch's OpenMP threads).
// Without AVX2 the same arithmetic runs in plain loops (tested too: simd=False).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "bf16.h"
#include "kquants.h"
#include "layouts.h"
#include "quantize.h"
#include "threads.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLAMA_AVX2 1
#endif
#if defined(LLAMA_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLAMA_VNNI 1  // the 256-bit forms of the dot-product instructions: two products in one
#endif

namespace llama_quantized {
namespace {

// Each scheme multiplies its codes with activations rounded to integers per block of 32:
//   int8 weights x int16 activations (x ~ q * step, step = max |x| / 32767): the rounding is ~1e-5 of
//     each value, below fp32 rounding of the sum, so the product is the weights' error alone;
//   int4 weights x int8 activations (step = max |x| / 127, as llama.cpp does for its 4-bit kinds):
//     twice as many products per instruction; the rounding costs a fraction of the 4-bit weights' own
//     error (docs/quantization.md measures both).
// Integer products are exact; each block's int32 sum becomes a float once and is multiplied by the
// block's weight scale times its activation step.

// Activations rounded per block of 32: x ~ q * step.
template <typename Activation>
struct RoundedRows {
  std::vector<Activation> q;  // (M, K)
  std::vector<float> step;    // (M, K / 32)
  std::vector<float> sums;    // (M, K / group_size): sum of x (not rounded) over each group, for int4's zero
};

template <typename Weights>
RoundedRows<typename Weights::Activation> round_rows(const float* x, int64_t M, int64_t K, int64_t group_size) {
  using Activation = typename Weights::Activation;
  RoundedRows<Activation> rows{std::vector<Activation>(M * K), std::vector<float>(M * K / kBlock),
                               std::vector<float>(Weights::kHasZero ? M * K / group_size : 0)};
  for (int64_t b = 0; b < M * K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0;
    for (int64_t l = 0; l < kBlock; ++l) amax = std::max(amax, std::fabs(xb[l]));
    const float step = amax / Weights::kActivationMax;
    rows.step[b] = step;
    for (int64_t l = 0; l < kBlock; ++l) {
      rows.q[b * kBlock + l] = step > 0 ? Activation(std::nearbyint(xb[l] / step)) : 0;
      if constexpr (Weights::kHasZero) rows.sums[b * kBlock / group_size] += xb[l];
    }
  }
  return rows;
}

// int4's zero times the sum of x over each group, for weight row n and activation row m; 0 without zeros.
template <typename Weights, typename X>
float zero_term(const Weights& weights, const X& x, int64_t n, int64_t m) {
  if constexpr (!Weights::kHasZero) {
    return 0.0f;
  } else {
    const int64_t G = weights.K / weights.group_size;
    float sum = 0;
    for (int64_t j = 0; j < G; ++j) sum += bf16_to_float(weights.zeros[n * G + j]) * x.sums[m * G + j];
    return sum;
  }
}

// y[m, n] for R rows of x at once (R known at compile time, so the accumulators stay in registers;
// the rows share each block's load) and the output features [n0, n1). Plain loops: any CPU.
template <int R, typename Weights, typename X>
void rows_portable(const X& x, int64_t m, float* y, int64_t N, int64_t n0, int64_t n1, const Weights& weights) {
  const int64_t K = weights.K;
  int32_t c[kBlock];
  for (int64_t n = n0; n < n1; ++n) {
    float total[R] = {};
    for (int64_t b = 0; b < K / kBlock; ++b) {
      const float scale = weights.scale(n, b);
      codes_as_ints(weights, n, b, c);
      for (int r = 0; r < R; ++r) {
        const auto* xq = x.q.data() + (m + r) * K + b * kBlock;
        int32_t dot = 0;
        for (int64_t l = 0; l < kBlock; ++l) dot += c[l] * xq[l];
        total[r] += scale * x.step[(m + r) * (K / kBlock) + b] * float(dot);
      }
    }
    for (int r = 0; r < R; ++r) y[(m + r) * N + n] = total[r] + zero_term(weights, x, n, m + r);
  }
}

#ifdef LLAMA_AVX2
// The same with AVX2 integer instructions (compilers do not find them for the loops above). Each
// weight row is read once however many activation rows there are (they stay in the first-level cache).

// Weights stream from memory once per token, too fast for the hardware prefetcher alone to keep up:
// ask for the codes 4 KB ahead and for the scales (and zeros) of the row 8 rows ahead. Prefetching
// past the end of a tensor is harmless (a hint, not a load). docs/quantization.md has the measurements.
constexpr int64_t kBytesAhead = 4096, kRowsAhead = 8;

template <typename Weights>
inline void prefetch_scales(const Weights& weights, int64_t n) {  // a row's scales: its first and last bytes
  const auto* row = static_cast<const uint16_t*>(weights.row_scales(n + kRowsAhead));
  _mm_prefetch(reinterpret_cast<const char*>(row), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(row + weights.row_scale_count() - 1), _MM_HINT_T0);
}

inline __m256 bf16x8(const uint16_t* p) {  // 8 bf16 -> 8 floats
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// sum over groups of coefficient (bf16, one weight row) times x's sum over the group: int4's zero term
inline float group_dot(const uint16_t* coefficient, const float* sums, int64_t G) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= G; j += 8) acc = _mm256_fmadd_ps(bf16x8(coefficient + j), _mm256_loadu_ps(sums + j), acc);
  float sum = hsum(acc);
  for (; j < G; ++j) sum += bf16_to_float(coefficient[j]) * sums[j];
  return sum;
}

// int32 lanes of sums of 4 adjacent products: unsigned bytes x signed bytes (int4), int16 x int16 (int8)
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef LLAMA_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// int8 x int16, block by block: 8 int32 lanes of 4 products each (|code| <= 127, |x| <= 32767 keep a
// lane below 2^24: exact as a float), scaled by the block's scale times its step. Each block's codes
// are widened once and multiplied with R activation rows (R <= 4: a prefill's rows share the load);
// two sums per row (even and odd blocks) so each multiply-add need not wait for the last.
template <int R, typename Weights>
void int8_row_avx2(const RoundedRows<int16_t>& x, int64_t m0, float* y, int64_t N, int64_t n, const Weights& weights) {
  const int64_t K = weights.K, B = K / kBlock;
  __m256 sums[R][2];
  for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_ps();
  auto block = [&](int64_t b, int parity) {
    const int8_t* codes = weights.block(n, b);
    const __m128i* q = reinterpret_cast<const __m128i*>(codes);
    _mm_prefetch(reinterpret_cast<const char*>(codes + kBytesAhead), _MM_HINT_T1);  // to L2: measured faster here
    const __m256i a = _mm256_cvtepi8_epi16(_mm_loadu_si128(q)), c = _mm256_cvtepi8_epi16(_mm_loadu_si128(q + 1));
    const float scale = weights.scale(n, b);
    for (int r = 0; r < R; ++r) {
      const __m256i* xb = reinterpret_cast<const __m256i*>(x.q.data() + (m0 + r) * K + b * kBlock);
#ifdef LLAMA_VNNI
      const __m256i dot = _mm256_dpwssd_epi32(_mm256_madd_epi16(a, _mm256_loadu_si256(xb)), c, _mm256_loadu_si256(xb + 1));
#else
      const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(a, _mm256_loadu_si256(xb)), _mm256_madd_epi16(c, _mm256_loadu_si256(xb + 1)));
#endif
      sums[r][parity] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale * x.step[(m0 + r) * B + b]), sums[r][parity]);
    }
  };
  prefetch_scales(weights, n);
  int64_t b = 0;
  for (; b + 1 < B; b += 2) {
    block(b, 0);
    block(b + 1, 1);
  }
  if (b < B) block(b, 0);
  for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = hsum(_mm256_add_ps(sums[r][0], sums[r][1]));
}

// int4 x int8, two blocks at a time: a 256-bit register holds blocks b, b + 1 (16 bytes each), their
// codes 0..15 in the low halves and 16..31 in the high halves, so the activations are laid out to
// match once per call: [b: 0..15, b+1: 0..15, b: 16..31, b+1: 16..31]. The unsigned codes multiply
// the signed activations (`vpmaddubsw` or VNNI's `vpdpbusd`: pair sums <= 2 * 15 * 127, no
// saturation); each int32 lane then holds 4 + 4 products of one block, from which 8 times the
// activations it covers is taken away: exactly the products with code - 8.
struct PairedRows {
  std::vector<int8_t> q;        // (M, pairs, 64), laid out as above
  std::vector<float> step;      // (M, pairs, 8): block b's step in lanes 0..3, b + 1's in 4..7
  std::vector<int32_t> eights;  // (M, pairs, 8): 8 x the activations each lane's products cover
};

PairedRows pair_rows(const RoundedRows<int8_t>& x, int64_t M, int64_t K) {
  const int64_t B = K / kBlock, P = (B + 1) / 2;
  PairedRows rows{std::vector<int8_t>(M * P * 64), std::vector<float>(M * P * 8), std::vector<int32_t>(M * P * 8)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {  // block b is the first (lanes 0..3) or second (4..7) of its pair
      const int64_t p = m * P + b / 2, half = b % 2;
      const int8_t* from = x.q.data() + (m * K + b * kBlock);
      std::memcpy(&rows.q[p * 64 + half * 16], from, 16);
      std::memcpy(&rows.q[p * 64 + 32 + half * 16], from + 16, 16);
      for (int l = 0; l < 4; ++l) rows.step[p * 8 + half * 4 + l] = x.step[m * B + b];
    }
  const __m256i eight = _mm256_set1_epi8(8);
  for (int64_t p = 0; p < M * P; ++p) {  // the same lanes as the products in int4_row_avx2
    const __m256i* xq = reinterpret_cast<const __m256i*>(&rows.q[p * 64]);
    const __m256i sums = _mm256_add_epi32(dot_u8s8(eight, _mm256_loadu_si256(xq)), dot_u8s8(eight, _mm256_loadu_si256(xq + 1)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&rows.eights[p * 8]), sums);
  }
  return rows;
}

const __m256i kLaneBlock = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);

// Blocks 2p and 2p + 1 of row n: their codes in one register, their scales in lanes 0..3 and 4..7.
inline __m256i pair_codes(const Int4Weights& w, int64_t n, int64_t p) {  // adjacent in our layout
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.block(n, 2 * p)));
}
inline __m256i pair_codes(const Q4_0Weights& w, int64_t n, int64_t p) {  // 18 bytes apart in a GGUF row
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.block(n, 2 * p)));
  return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.block(n, 2 * p + 1))), 1);
}
inline __m256 pair_scales(const Int4Weights& w, int64_t n, int64_t p) {
  if (w.shift) return _mm256_set1_ps(w.scale(n, 2 * p));  // groups of 64 or more: one scale for both
  uint32_t two;  // group 32: the two blocks' own scales
  std::memcpy(&two, w.scales + n * w.G + 2 * p, sizeof two);
  const __m128i floats = _mm_unpacklo_epi16(_mm_setzero_si128(), _mm_cvtsi32_si128(int(two)));
  return _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(_mm256_castsi128_si256(floats), kLaneBlock));
}
inline __m256 pair_scales(const Q4_0Weights& w, int64_t n, int64_t p) {
  const uint32_t two = load16(w.at(n, 2 * p)) | uint32_t(load16(w.at(n, 2 * p + 1))) << 16;
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(int(two)))), kLaneBlock);
}

// Weight row n times R activation rows (R <= 4): each pair's codes are loaded and split into low and
// high halves once, then multiplied with every row (a prefill's rows share the load).
template <int R, typename Weights>
void int4_row_avx2(const RoundedRows<int8_t>& x, const PairedRows& paired, int64_t m0, float* y, int64_t N, int64_t n,
                   const Weights& weights) {
  const int64_t K = weights.K, B = K / kBlock, P = (B + 1) / 2;
  const __m256i low_bits = _mm256_set1_epi8(15);
  __m256 sums[R][2];
  for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_ps();
  auto pair = [&](int64_t p, __m256i bytes, __m256 scale, int parity) {
    const __m256i low = _mm256_and_si256(bytes, low_bits), high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_bits);
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * P + p;
      const __m256i* xp = reinterpret_cast<const __m256i*>(paired.q.data() + at * 64);
#ifdef LLAMA_VNNI
      const __m256i dots = _mm256_dpbusd_epi32(dot_u8s8(low, _mm256_loadu_si256(xp)), high, _mm256_loadu_si256(xp + 1));
#else
      const __m256i dots = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_loadu_si256(xp)),
                                                              _mm256_maddubs_epi16(high, _mm256_loadu_si256(xp + 1))),
                                             _mm256_set1_epi16(1));
#endif
      const __m256i centred = _mm256_sub_epi32(dots, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(paired.eights.data() + at * 8)));
      sums[r][parity] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(centred), _mm256_mul_ps(scale, _mm256_loadu_ps(paired.step.data() + at * 8)),
                                        sums[r][parity]);
    }
  };
  auto full_pair = [&](int64_t p, int parity) {
    _mm_prefetch(reinterpret_cast<const char*>(weights.block(n, 2 * p)) + kBytesAhead, _MM_HINT_T0);
    pair(p, pair_codes(weights, n, p), pair_scales(weights, n, p), parity);
  };
  prefetch_scales(weights, n);
  if constexpr (Weights::kHasZero) _mm_prefetch(reinterpret_cast<const char*>(weights.zeros + (n + kRowsAhead) * weights.G), _MM_HINT_T0);
  int64_t p = 0;
  for (; p + 1 < B / 2; p += 2) {
    full_pair(p, 0);
    full_pair(p + 1, 1);
  }
  if (p < B / 2) full_pair(p++, 0);
  if (p < P)  // an odd number of blocks: the last one alone (its partner's activations are 0)
    pair(p, _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weights.block(n, 2 * p)))),
         _mm256_set1_ps(weights.scale(n, 2 * p)), 1);
  for (int r = 0; r < R; ++r) {
    float zero = 0;
    if constexpr (Weights::kHasZero) zero = group_dot(weights.zeros + n * weights.G, x.sums.data() + (m0 + r) * weights.G, weights.G);
    y[(m0 + r) * N + n] = hsum(_mm256_add_ps(sums[r][0], sums[r][1])) + zero;
  }
}

// Output features [n0, n1) of all M rows: row(R, m0, n) computes rows m0 .. m0 + R - 1 of feature n.
// Few rows (decoding): each weight row once, for all of them; with `two_streams`, taken from the two
// halves of [n0, n1) in turn: two streams through memory keep more reads in flight than one (int8
// reads the most bytes per weight; int4 gained nothing from it). Many rows (a prefill chunk): tiles
// of kTileRows weight rows, which stay in the core's caches while every group of 4 activation rows
// passes over them, so the weights are read from memory once however many rows there are.
constexpr int64_t kTileRows = 16;

template <typename Row>
void tiled_rows(int64_t M, int64_t n0, int64_t n1, bool two_streams, const Row& row) {
  auto rows_of = [&](int64_t m0, int64_t count, int64_t n) {
    switch (count) {
      case 4: return row(std::integral_constant<int, 4>(), m0, n);
      case 3: return row(std::integral_constant<int, 3>(), m0, n);
      case 2: return row(std::integral_constant<int, 2>(), m0, n);
      default: return row(std::integral_constant<int, 1>(), m0, n);
    }
  };
  if (M <= 4 && two_streams) {
    const int64_t half = (n1 - n0 + 1) / 2;
    for (int64_t i = 0; i < 2 * half; ++i) {
      const int64_t n = n0 + (i & 1) * half + i / 2;  // n0, n0 + half, n0 + 1, n0 + half + 1, ...
      if (n < n1) rows_of(0, M, n);  // an odd count: the second half is one row shorter
    }
    return;
  }
  if (M <= 4) {
    for (int64_t n = n0; n < n1; ++n) rows_of(0, M, n);
    return;
  }
  for (int64_t t = n0; t < n1; t += kTileRows)
    for (int64_t m0 = 0; m0 < M; m0 += 4)
      for (int64_t n = t; n < std::min(t + kTileRows, n1); ++n) rows_of(m0, std::min<int64_t>(4, M - m0), n);
}
#endif

template <typename Weights>
at::Tensor matmul(const at::Tensor& x, int64_t N, const Weights& weights, bool simd) {
  const int64_t M = x.size(0), K = weights.K;
  at::Tensor y = at::empty({M, N}, x.options());
  const auto rows_x = round_rows<Weights>(x.data_ptr<float>(), M, K, weights.group_size);
  float* yp = y.data_ptr<float>();
#ifdef LLAMA_AVX2
  if (simd) {
    if constexpr (Weights::kNibbles) {
      const PairedRows paired = pair_rows(rows_x, M, K);
      split_rows(N, K, [&](int64_t n0, int64_t n1) {
        tiled_rows(M, n0, n1, false, [&](auto R, int64_t m0, int64_t n) { int4_row_avx2<R()>(rows_x, paired, m0, yp, N, n, weights); });
      });
    } else {
      split_rows(N, K, [&](int64_t n0, int64_t n1) {
        tiled_rows(M, n0, n1, true, [&](auto R, int64_t m0, int64_t n) { int8_row_avx2<R()>(rows_x, m0, yp, N, n, weights); });
      });
    }
    return y;
  }
#endif
  split_rows(N, K, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;  // four rows at a time share each block's load; the rest one by one
    for (; m + 4 <= M; m += 4) rows_portable<4>(rows_x, m, yp, N, n0, n1, weights);
    for (; m < M; ++m) rows_portable<1>(rows_x, m, yp, N, n0, n1, weights);
  });
  return y;
}

// The weights as float32, or bf16 (rounded to nearest even, as torch's .bfloat16()) for a bf16 GEMM:
// one pass that writes half the bytes, instead of float32 then a second pass to round it.
template <typename Weights>
at::Tensor dequantize(int64_t N, const Weights& weights, bool bf16) {
  const int64_t K = weights.K;
  at::Tensor w = at::empty({N, K}, at::TensorOptions().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  float* wf = bf16 ? nullptr : w.data_ptr<float>();
  uint16_t* wb = bf16 ? reinterpret_cast<uint16_t*>(w.data_ptr()) : nullptr;
  split_rows(N, K, [&](int64_t n0, int64_t n1) {
    int32_t c[kBlock];
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < K / kBlock; ++b) {
        const float scale = weights.scale(n, b);
        float zero = 0.0f;
        if constexpr (Weights::kHasZero) zero = weights.zero(n, b);
        codes_as_ints(weights, n, b, c);
        const int64_t at = n * K + b * kBlock;
        if (bf16) {
          for (int64_t l = 0; l < kBlock; ++l) wb[at + l] = float_to_bf16(float(c[l]) * scale + zero);
        } else {
          for (int64_t l = 0; l < kBlock; ++l) wf[at + l] = float(c[l]) * scale + zero;
        }
      }
  });
  return w;
}

void check(const at::Tensor& codes, const at::Tensor& scales, int64_t K, int64_t group_size, at::ScalarType code_type) {
  TORCH_CHECK(codes.scalar_type() == code_type && codes.is_contiguous() && codes.dim() == 2, "codes: contiguous 2-D ", code_type);
  TORCH_CHECK(group_size >= kBlock && (group_size & (group_size - 1)) == 0 && K % group_size == 0,
              "group size must be a power of 2 >= 32 dividing ", K);
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
  return {codes.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr()), K, group_size};
}

Int4Weights int4_weights(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, int64_t group_size) {
  const int64_t K = codes.size(1) * 2;
  check(codes, scales, K, group_size, at::kByte);
  TORCH_CHECK(zeros.sizes() == scales.sizes() && zeros.scalar_type() == at::kBFloat16 && zeros.is_contiguous(),
              "zeros: like scales");
  return {codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr()),
          reinterpret_cast<const uint16_t*>(zeros.data_ptr()), K, group_size};
}

// GGUF blocks: uint8 (N, K / 32, bytes per block), rows possibly apart (a view of a wider row).
constexpr int64_t kQ8_0 = 8, kQ4_0 = 2;  // ggml's type ids

template <typename Weights>
Weights gguf_weights(const at::Tensor& blocks) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 3 && blocks.size(2) == Weights::kBytes &&
                  blocks.stride(2) == 1 && blocks.stride(1) == Weights::kBytes,
              "blocks: uint8 (N, K / 32, ", Weights::kBytes, "), each row's blocks contiguous");
  Weights w;
  w.data = blocks.data_ptr<uint8_t>();
  w.K = blocks.size(1) * kBlock;
  w.row_bytes = blocks.stride(0);
  return w;
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

at::Tensor gguf_mm(const at::Tensor& x, const at::Tensor& blocks, int64_t kind, bool simd) {
  check_x(x, blocks.size(1) * kBlock);
  if (kind == kQ8_0) return matmul(x, blocks.size(0), gguf_weights<Q8_0Weights>(blocks), simd);
  TORCH_CHECK(kind == kQ4_0, "GGUF kind ", kind, ": only Q8_0 (8) and Q4_0 (2) are multiplied as they are");
  return matmul(x, blocks.size(0), gguf_weights<Q4_0Weights>(blocks), simd);
}

at::Tensor bf16_mm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.stride(1) == 1,
              "w: bf16 (N, K), each row contiguous");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  check_x(x, K);
  at::Tensor y = at::empty({M, N}, x.options());
  bf16_product(x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(w.data_ptr()), w.stride(0),
               y.data_ptr<float>(), M, N, K);
  return y;
}

at::Tensor int8_dequantize(const at::Tensor& codes, const at::Tensor& scales, int64_t group_size, bool bf16) {
  return dequantize(codes.size(0), int8_weights(codes, scales, group_size), bf16);
}

at::Tensor int4_dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                           int64_t group_size, bool bf16) {
  return dequantize(codes.size(0), int4_weights(codes, scales, zeros, group_size), bf16);
}

at::Tensor kquant_dequantize(const at::Tensor& blocks, int64_t kind) {
  const int64_t N = blocks.size(0), S = blocks.size(1), K = S * kSuper;
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 3 && blocks.size(2) == kquant_bytes(kind) &&
                  blocks.stride(2) == 1 && blocks.stride(1) == blocks.size(2),
              "blocks: uint8 (N, K / 256, ", kquant_bytes(kind), "), each row's super-blocks contiguous");
  at::Tensor w = at::empty({N, K}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* data = blocks.data_ptr<uint8_t>();
  float* wp = w.data_ptr<float>();
  split_rows(N, K, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t s = 0; s < S; ++s) dequantize_kquant(kind, data + n * blocks.stride(0) + s * blocks.size(2), wp + n * K + s * kSuper);
  });
  return w;
}

at::Tensor gguf_dequantize(const at::Tensor& blocks, int64_t kind, bool bf16) {
  if (kind == kQ8_0) return dequantize(blocks.size(0), gguf_weights<Q8_0Weights>(blocks), bf16);
  if (kind == kQ4_0) return dequantize(blocks.size(0), gguf_weights<Q4_0Weights>(blocks), bf16);
  TORCH_CHECK(kquant_bytes(kind), "GGUF kind ", kind, ": only Q8_0 (8), Q4_0 (2), Q4_K (12), Q5_K (13) and Q6_K (14)");
  at::Tensor w = kquant_dequantize(blocks, kind);  // only loading reads these: float32
  return bf16 ? w.to(at::kBFloat16) : w;
}

// How many threads run a product of N features of K weights each at this thread count: each chunk
// records the thread that ran it, and the calling thread's chunk waits (up to a second) for the
// helpers to start theirs, which it would otherwise take back (tests/test_quantize.py: a large
// product uses two threads).
int64_t product_threads(int64_t N, int64_t K) {
  std::vector<std::thread::id> ran(chunk_count(N, K));
  std::atomic<int64_t> started{0};
  Helpers::get().run(int64_t(ran.size()), [&](int64_t c) {
    ran[c] = std::this_thread::get_id();
    if (c > 0) ++started;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    while (c == 0 && started < int64_t(ran.size()) - 1 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::yield();
  });
  std::sort(ran.begin(), ran.end());
  return std::unique(ran.begin(), ran.end()) - ran.begin();
}

}  // namespace
}  // namespace llama_quantized

TORCH_LIBRARY(llama_quantized, m) {
  m.def("int8_mm(Tensor x, Tensor codes, Tensor scales, int group_size, bool simd=True) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int group_size, bool simd=True) -> Tensor");
  m.def("gguf_mm(Tensor x, Tensor blocks, int kind, bool simd=True) -> Tensor");
  m.def("bf16_mm(Tensor x, Tensor w) -> Tensor");
  m.def("int8_dequantize(Tensor codes, Tensor scales, int group_size, bool bf16=False) -> Tensor");
  m.def("int4_dequantize(Tensor codes, Tensor scales, Tensor zeros, int group_size, bool bf16=False) -> Tensor");
  m.def("gguf_dequantize(Tensor blocks, int kind, bool bf16=False) -> Tensor");
  m.def("int8_quantize(Tensor w, int group_size, Tensor(a!) codes, Tensor(b!) scales) -> ()");
  m.def("int4_quantize(Tensor w, int group_size, Tensor(a!) codes, Tensor(b!) scales, Tensor(c!) zeros) -> ()");
  m.def("product_threads(int rows, int row_weights) -> int");
}

TORCH_LIBRARY_IMPL(llama_quantized, CPU, m) {
  using namespace llama_quantized;
  m.impl("int8_mm", int8_mm);
  m.impl("int4_mm", int4_mm);
  m.impl("gguf_mm", gguf_mm);
  m.impl("bf16_mm", bf16_mm);
  m.impl("int8_dequantize", int8_dequantize);
  m.impl("int4_dequantize", int4_dequantize);
  m.impl("gguf_dequantize", gguf_dequantize);
  m.impl("int8_quantize", int8_quantize);
  m.impl("int4_quantize", int4_quantize);
}

TORCH_LIBRARY_IMPL(llama_quantized, CompositeExplicitAutograd, m) { m.impl("product_threads", llama_quantized::product_threads); }
