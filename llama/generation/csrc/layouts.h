// How each weight layout stores a block of 32 weights: where its codes are and what its scale is
// (quantized.cpp includes this file). The product loops are written once, against these accessors.
//
// Ours (llama/generation/quantize.py builds them from float weights), per row n and group j of
// `group_size` inputs:
//   int8: codes int8 (N, K), w = code * scale[n, j]                               (absmax, as Q8_0)
//   int4: codes uint8 (N, K / 2), w = (code - 8) * scale[n, j] + zero[n, j], code 0..15 (as Q4_1)
//         each block of 32 weights is 16 bytes: byte l holds weight l (low 4 bits), l + 16 (high)
//   scales and zeros bf16 (N, K / group_size).
// llama.cpp's (GGUF files, used as they are: the tensor is a view of the file's bytes), blocks of 32
// one after the other along each row, each an fp16 scale d followed by its codes:
//   Q8_0: 34 bytes, w = code * d, codes int8
//   Q4_0: 18 bytes, w = (code - 8) * d, 16 bytes of codes 0..15 in the int4 layout above
// A row of blocks may be part of a longer row (a model-parallel rank's share of the inputs): rows
// are `row_bytes` apart.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace llama_quantized {

constexpr int64_t kBlock = 32;  // weights per block: the smallest group size, and activations' rounding unit

inline float bf16_to_float(uint16_t bits) {  // bf16 is the top half of a float32
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest, ties to even (as torch's .bfloat16())
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float fp16_to_float(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else  // IEEE half: 1 sign, 5 exponent, 10 mantissa bits
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 31, mantissa = h & 1023;
  uint32_t u;
  if (exponent == 31) {
    u = sign | 0x7F800000 | (mantissa << 13);
  } else if (exponent) {
    u = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {  // zero or subnormal: mantissa * 2^-24
    float f = float(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&u, &f, sizeof u);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

inline uint16_t load16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// ---------------------------------------------------------------- ours

struct Int8Weights {
  using Activation = int16_t;  // int8 weights take int16 activations (quantized.cpp: why)
  static constexpr float kActivationMax = 32767;
  static constexpr bool kHasZero = false, kNibbles = false;
  const int8_t* codes;
  const uint16_t* scales;
  int64_t K, group_size;
  int64_t G = K / group_size;  // groups per row
  int shift = __builtin_ctzll(group_size / kBlock);  // block b is in group b >> shift (no division in the loops)

  const int8_t* block(int64_t n, int64_t b) const { return codes + n * K + b * kBlock; }
  float scale(int64_t n, int64_t b) const { return bf16_to_float(scales[n * G + (b >> shift)]); }
  const void* row_scales(int64_t n) const { return scales + n * G; }  // to prefetch
  int64_t row_scale_count() const { return G; }
};

struct Int4Weights {
  using Activation = int8_t;  // as llama.cpp does for its 4-bit kinds
  static constexpr float kActivationMax = 127;
  static constexpr bool kHasZero = true, kNibbles = true;
  const uint8_t* codes;
  const uint16_t* scales;
  const uint16_t* zeros;
  int64_t K, group_size;
  int64_t G = K / group_size;
  int shift = __builtin_ctzll(group_size / kBlock);

  const uint8_t* block(int64_t n, int64_t b) const { return codes + n * (K / 2) + b * (kBlock / 2); }
  float scale(int64_t n, int64_t b) const { return bf16_to_float(scales[n * G + (b >> shift)]); }
  float zero(int64_t n, int64_t b) const { return bf16_to_float(zeros[n * G + (b >> shift)]); }
  const void* row_scales(int64_t n) const { return scales + n * G; }
  int64_t row_scale_count() const { return G; }
};

// ---------------------------------------------------------------- llama.cpp's

template <int kCodeBytes>
struct GGUFBlocks {
  static constexpr int64_t kBytes = 2 + kCodeBytes;  // fp16 d, then the codes
  const uint8_t* data;
  int64_t K, row_bytes;
  static constexpr int64_t group_size = kBlock;

  const uint8_t* at(int64_t n, int64_t b) const { return data + n * row_bytes + b * kBytes; }
  float scale(int64_t n, int64_t b) const { return fp16_to_float(load16(at(n, b))); }
  const void* row_scales(int64_t n) const { return at(n, 0); }  // inline with the codes
  int64_t row_scale_count() const { return 1; }
};

struct Q8_0Weights : GGUFBlocks<32> {
  using Activation = int16_t;  // as our int8: more exact than llama.cpp's int8 activations, as fast
  static constexpr float kActivationMax = 32767;
  static constexpr bool kHasZero = false, kNibbles = false;
  const int8_t* block(int64_t n, int64_t b) const { return reinterpret_cast<const int8_t*>(at(n, b) + 2); }
};

struct Q4_0Weights : GGUFBlocks<16> {
  using Activation = int8_t;
  static constexpr float kActivationMax = 127;
  static constexpr bool kHasZero = false, kNibbles = true;
  const uint8_t* block(int64_t n, int64_t b) const { return at(n, b) + 2; }
  float zero(int64_t, int64_t) const { return 0.0f; }
};

// The 32 codes of block b of row n as integers, centred for 4-bit codes (code - 8: -8..7).
template <typename Weights>
inline void codes_as_ints(const Weights& weights, int64_t n, int64_t b, int32_t* c) {
  const auto* q = weights.block(n, b);
  if constexpr (Weights::kNibbles) {
    for (int64_t l = 0; l < kBlock / 2; ++l) {
      c[l] = (q[l] & 15) - 8;
      c[l + kBlock / 2] = (q[l] >> 4) - 8;
    }
  } else {
    for (int64_t l = 0; l < kBlock; ++l) c[l] = q[l];
  }
}

}  // namespace llama_quantized
