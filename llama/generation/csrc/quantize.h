// Float weights -> our int8 and int4 layouts (layouts.h), the arithmetic of int8_codes / int4_codes in
// llama/generation/quantize.py step for step (tests/test_quantize.py checks they agree bit for bit),
// in one pass over the weights and on the kernels' threads: the Python reference makes ~10 passes
// and takes ~5 minutes for an 8B model on 2 cores, this ~10 s. Weights: float32, bf16 or fp16 (N, K),
// each row contiguous (a row may be part of a wider one: a model-parallel shard of the inputs).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "layouts.h"
#include "threads.h"

namespace llama_quantized {
namespace {

template <typename T>
inline float as_float(T v) { return static_cast<float>(v); }

// Run f(row pointer as const T*, n) for rows [n0, n1) of w, dispatching on its dtype once.
template <typename F>
void for_rows(const at::Tensor& w, int64_t group_size, const F& f) {
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "weights: 2-D, each row contiguous");
  TORCH_CHECK(group_size >= kBlock && (group_size & (group_size - 1)) == 0 && w.size(1) % group_size == 0,
              "group size must be a power of 2 >= 32 dividing ", w.size(1));
  const int64_t N = w.size(0), K = w.size(1), stride = w.stride(0);
  auto run = [&](const auto* data) {
    split_rows(N, K, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) f(data + n * stride, n);
    });
  };
  switch (w.scalar_type()) {
    case at::kFloat: return run(w.data_ptr<float>());
    case at::kBFloat16: return run(w.data_ptr<c10::BFloat16>());
    case at::kHalf: return run(w.data_ptr<c10::Half>());
    default: TORCH_CHECK(false, "weights: float32, bfloat16 or float16, not ", w.scalar_type());
  }
}

void check_out(const at::Tensor& t, int64_t rows, int64_t cols, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols,
              what, ": contiguous ", dtype, " (", rows, ", ", cols, ")");
}

// Each group's largest |w| onto 127: scale = bf16(max(amax / 127, 1e-12)), code = round(w / scale).
// Written into `codes` (N, K) and `scales` (N, K / group_size), e.g. rows of a larger layer's buffers.
void int8_quantize(const at::Tensor& w, int64_t group_size, at::Tensor codes, at::Tensor scales) {
  const int64_t N = w.size(0), K = w.size(1), G = K / group_size;
  check_out(codes, N, K, at::kChar, "codes");
  check_out(scales, N, G, at::kBFloat16, "scales");
  int8_t* q = codes.data_ptr<int8_t>();
  uint16_t* s = reinterpret_cast<uint16_t*>(scales.data_ptr());
  for_rows(w, group_size, [&](const auto* row, int64_t n) {
    for (int64_t j = 0; j < G; ++j) {
      const auto* g = row + j * group_size;
      float amax = 0;
      for (int64_t l = 0; l < group_size; ++l) amax = std::max(amax, std::fabs(as_float(g[l])));
      const uint16_t bits = float_to_bf16(std::max(amax / 127.0f, 1e-12f));
      const float scale = bf16_to_float(bits);
      s[n * G + j] = bits;
      for (int64_t l = 0; l < group_size; ++l)
        q[n * K + j * group_size + l] = int8_t(std::clamp(std::nearbyint(as_float(g[l]) / scale), -127.0f, 127.0f));
    }
  });
}

// Each group's [min, max] onto 0..15: scale = bf16(max((max - min) / 15, 1e-12)), zero = bf16(min + 8 scale),
// code = round((w - zero) / scale + 8), packed two per byte (weights l and l + 16 of each block of 32),
// into codes (N, K / 2), scales and zeros (N, K / group_size).
void int4_quantize(const at::Tensor& w, int64_t group_size, at::Tensor codes, at::Tensor scales, at::Tensor zeros) {
  const int64_t N = w.size(0), K = w.size(1), G = K / group_size;
  check_out(codes, N, K / 2, at::kByte, "codes");
  check_out(scales, N, G, at::kBFloat16, "scales");
  check_out(zeros, N, G, at::kBFloat16, "zeros");
  uint8_t* q = codes.data_ptr<uint8_t>();
  uint16_t* s = reinterpret_cast<uint16_t*>(scales.data_ptr());
  uint16_t* z = reinterpret_cast<uint16_t*>(zeros.data_ptr());
  for_rows(w, group_size, [&](const auto* row, int64_t n) {
    for (int64_t j = 0; j < G; ++j) {
      const auto* g = row + j * group_size;
      float lo = as_float(g[0]), hi = lo;
      for (int64_t l = 1; l < group_size; ++l) {
        lo = std::min(lo, as_float(g[l]));
        hi = std::max(hi, as_float(g[l]));
      }
      const uint16_t scale_bits = float_to_bf16(std::max((hi - lo) / 15.0f, 1e-12f));
      const float scale = bf16_to_float(scale_bits);
      const uint16_t zero_bits = float_to_bf16(lo + 8.0f * scale);
      const float zero = bf16_to_float(zero_bits);
      s[n * G + j] = scale_bits;
      z[n * G + j] = zero_bits;
      uint8_t* out = q + (n * K + j * group_size) / 2;
      for (int64_t b = 0; b < group_size; b += kBlock)
        for (int64_t l = 0; l < kBlock / 2; ++l) {
          auto code = [&](int64_t i) { return uint8_t(std::clamp(std::nearbyint((as_float(g[b + i]) - zero) / scale + 8.0f), 0.0f, 15.0f)); };
          out[b / 2 + l] = uint8_t(code(l) | (code(l + kBlock / 2) << 4));
        }
    }
  });
}

}  // namespace
}  // namespace llama_quantized
