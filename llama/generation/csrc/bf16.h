// bf16 weights times a few rows of float32 activations, for a bf16 model's decode step on the CPU
// (quantized.cpp includes this file; llama/generation/bf16.py is its layer). torch's bf16 product at
// one row streams the weights at about half what the memory delivers (Llama 3.1 8B: ~16 of ~33 GB/s);
// here each weight is read once for all the rows and multiplied in float32: in bf16 pairs where the CPU
// has AVX512-BF16 (the activations rounded to bf16, as llama.cpp's BF16 product does: exact for a bf16
// model, whose activations are bf16), else widened to float32 (a bf16 is the top half of a float32: a
// shift); each output feature on one thread (threads.h).
#pragma once

#include <cstdint>
#include <vector>

#include "layouts.h"
#include "threads.h"

namespace llama_quantized {


// y[m, n] = sum_k x[m, k] * w[n, k] for rows [m0, m0 + R) and features [n0, n1); `xb`: x rounded to bf16
// (exactly x, for a bf16 model's activations), read where the CPU multiplies bf16 pairs natively.
// Two accumulators per row, alternating, so that one product's latency does not stall the next.
template <int R>
void bf16_rows(const float* x, const uint16_t* xb, const uint16_t* w, int64_t w_stride, float* y, int64_t N,
               int64_t K, int64_t m0, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wn = w + n * w_stride;
    float sums[R] = {};
    int64_t k = 0;
#if defined(__AVX512BF16__)
    __m512 acc[2][R];
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    for (; k + 64 <= K; k += 64)  // 32 bf16 pairs per instruction, multiplied and summed in float32
      for (int half = 0; half < 2; ++half) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wn + k + 32 * half);
        for (int r = 0; r < R; ++r)
          acc[half][r] = _mm512_dpbf16_ps(acc[half][r], wv, (__m512bh)_mm512_loadu_si512(xb + (m0 + r) * K + k + 32 * half));
      }
    for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
#elif defined(__AVX512F__)
    __m512 acc[2][R];
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32)
      for (int half = 0; half < 2; ++half) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + k + 16 * half));
        const __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        for (int r = 0; r < R; ++r)
          acc[half][r] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + (m0 + r) * K + k + 16 * half), acc[half][r]);
      }
    for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[2][R];
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16)
      for (int half = 0; half < 2; ++half) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wn + k + 8 * half));
        const __m256 wf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        for (int r = 0; r < R; ++r)
          acc[half][r] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + (m0 + r) * K + k + 8 * half), acc[half][r]);
      }
    for (int r = 0; r < R; ++r) {
      float lanes[8];
      _mm256_storeu_ps(lanes, _mm256_add_ps(acc[0][r], acc[1][r]));
      for (float v : lanes) sums[r] += v;
    }
#endif
    for (; k < K; ++k) {  // the tail, or everything without SIMD
      const float wk = bf16_to_float(wn[k]);
      for (int r = 0; r < R; ++r) sums[r] += wk * x[(m0 + r) * K + k];
    }
    for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = sums[r];
  }
  (void)xb;
}

// x (M, K) float32 times w (N, K) bf16, rows `w_stride` apart: (M, N) float32.
inline void bf16_product(const float* x, const uint16_t* w, int64_t w_stride, float* y, int64_t M, int64_t N,
                         int64_t K) {
  std::vector<uint16_t> xb;  // x as the bf16-pairs instruction reads it; only CPUs that have it pay for it
#if defined(__AVX512BF16__)
  xb.resize(M * K);
  for (int64_t i = 0; i < M * K; ++i) xb[i] = float_to_bf16(x[i]);
#endif
  split_rows(N, K, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) bf16_rows<4>(x, xb.data(), w, w_stride, y, N, K, m, n0, n1);
    for (; m + 2 <= M; m += 2) bf16_rows<2>(x, xb.data(), w, w_stride, y, N, K, m, n0, n1);
    for (; m < M; ++m) bf16_rows<1>(x, xb.data(), w, w_stride, y, N, K, m, n0, n1);
  });
}

}  // namespace llama_quantized
