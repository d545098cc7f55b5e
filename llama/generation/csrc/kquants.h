// llama.cpp's "K" types dequantized to float32, for loading them into other layouts (quantized.cpp
// includes this file). The gguf package dequantizes them in numpy, ~30 ns a weight here: 20 s for the
// Q6_K output matrix that llama.cpp's quantizer puts in an 8B Q4_0 file. The same arithmetic in C++
// takes ~1 ns a weight (tests/test_load_quantized.py compares it with the gguf package's).
// Each super-block holds 256 weights (format: ggml's ggml-common.h), rows of whole super-blocks:
//   Q4_K (144 bytes): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 groups of 32, 128 bytes
//         of 4-bit codes; w = d * scale * code - dmin * min
//   Q5_K (176 bytes): as Q4_K, plus 32 bytes holding each code's fifth bit
//   Q6_K (210 bytes): 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales (groups of 16),
//         fp16 d; w = d * scale * (code - 32)
#pragma once

#include <cstdint>

#include "layouts.h"

namespace llama_quantized {

constexpr int64_t kSuper = 256;
constexpr int64_t kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;  // ggml's type ids

inline int64_t kquant_bytes(int64_t kind) { return kind == kQ4_K ? 144 : kind == kQ5_K ? 176 : kind == kQ6_K ? 210 : 0; }

// Group j's 6-bit scale and min of a Q4_K / Q5_K super-block (ggml's get_scale_min_k4).
inline void scale_min(int j, const uint8_t* q, uint8_t& scale, uint8_t& min) {
  if (j < 4) {
    scale = q[j] & 63, min = q[j + 4] & 63;
  } else {
    scale = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// One super-block `x` -> 256 floats `y`.
inline void dequantize_q4_k(const uint8_t* x, float* y, bool fifth_bit) {
  const float d = fp16_to_float(load16(x)), dmin = fp16_to_float(load16(x + 2));
  const uint8_t* scales = x + 4;
  const uint8_t* qh = x + 16;  // Q5_K only
  const uint8_t* q = x + (fifth_bit ? 48 : 16);
  for (int j = 0, shift = 0; j < kSuper; j += 64, q += 32, shift += 2) {
    uint8_t s1, m1, s2, m2;
    scale_min(j / 32, scales, s1, m1);
    scale_min(j / 32 + 1, scales, s2, m2);
    const float d1 = d * s1, min1 = dmin * m1, d2 = d * s2, min2 = dmin * m2;
    for (int l = 0; l < 32; ++l) {
      const int high1 = fifth_bit ? ((qh[l] >> shift) & 1) << 4 : 0, high2 = fifth_bit ? ((qh[l] >> (shift + 1)) & 1) << 4 : 0;
      y[j + l] = d1 * float((q[l] & 0xF) + high1) - min1;
      y[j + 32 + l] = d2 * float((q[l] >> 4) + high2) - min2;
    }
  }
}

inline void dequantize_q6_k(const uint8_t* x, float* y) {
  const uint8_t* ql = x;
  const uint8_t* qh = x + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(x + 192);
  const float d = fp16_to_float(load16(x + 208));
  for (int n = 0; n < kSuper; n += 128, ql += 64, qh += 32, scales += 8) {
    for (int g = 0; g < 2; ++g) {  // 16 weights of each quarter at a time, one scale each (vectorizes)
      const float s1 = d * float(scales[g]), s2 = d * float(scales[g + 2]), s3 = d * float(scales[g + 4]),
                  s4 = d * float(scales[g + 6]);
      for (int l = 16 * g; l < 16 * g + 16; ++l) {
        y[n + l] = s1 * float(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
        y[n + l + 32] = s2 * float(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
        y[n + l + 64] = s3 * float(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
        y[n + l + 96] = s4 * float(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
      }
    }
  }
}

inline void dequantize_kquant(int64_t kind, const uint8_t* x, float* y) {
  if (kind == kQ6_K) dequantize_q6_k(x, y);
  else dequantize_q4_k(x, y, kind == kQ5_K);
}

}  // namespace llama_quantized
