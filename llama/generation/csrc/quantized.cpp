// Group-wise int8 and int4 weight products for the CPU (llama/quantize.py builds and loads this file).
//
// Decoding multiplies a few rows of activations by every weight once, so its speed is the speed at
// which the weights stream from memory, provided turning codes into numbers costs less than reading
// them. So the inner loop does the least per weight: it multiplies each block of 32 codes with the
// activations rounded to integers (below) in a few integer instructions, turns the block's sum into
// a float once and applies the weight scale times the activation step; int4's zero comes in once
// per group through the sum of x over the group. The loop asks for the weights ahead of use
// (prefetch), and the product's output features are split between the calling thread and helper
// threads of this file's own (below: why not torch's OpenMP threads).
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
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define LLAMA_FORK_SAFE 1
#endif

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

// ---------------------------------------------------------------- threads
// A decode step makes ~200 products back to back, each tens of microseconds, and on one core the
// loops below are limited by arithmetic, not by memory: a second core nearly halves a product. torch's
// OpenMP threads could split them (at::parallel_for), but the command lines make OpenMP threads sleep
// as soon as they wait (OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads starve other processes,
// docs/performance.md), so each product would first wake a sleeping thread, which on a virtual machine
// costs more than half a small product saves. So the products have helper threads of their own, which
// poll for the next product for kPoll after each one and only then sleep: awake through a decode
// step, asleep between requests, never polling longer than kPoll at a time; a chunk whose helper has
// not started it (waiting for a core) the caller takes back. The thread count is
// torch's (torch.set_num_threads; 1 under torchrun), and every output feature is computed whole by one
// thread, so a product gives the same bits however it is split.
constexpr auto kPoll = std::chrono::microseconds(200);
constexpr int64_t kChunkWeights = int64_t(1) << 15;  // the least work worth another thread: ~2-4 us here

inline void relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

class Helpers {
 public:
  static Helpers& get() {  // one per process; a forked child makes its own (its parent's threads are gone)
    static std::once_flag once;
    std::call_once(once, [] {
#ifdef LLAMA_FORK_SAFE
      pthread_atfork(nullptr, nullptr, [] { instance = new Helpers(); });
#endif
    });
    return *instance;
  }

  // work(c) for each chunk c in [0, chunks): chunk 0 on the calling thread, the others on helpers.
  // work must not throw. A call made while another runs (another Python thread) runs alone.
  void run(int64_t chunks, const std::function<void(int64_t)>& work) {
    std::unique_lock<std::mutex> mine(calls, std::defer_lock);
    if (chunks <= 1 || !mine.try_lock()) {  // most small products: no lock taken at all
      for (int64_t c = 0; c < chunks; ++c) work(c);
      return;
    }
    while (int64_t(boxes.size()) < chunks - 1) {
      boxes.push_back(std::make_unique<Mailbox>());  // never freed: a helper may outlive main at exit
      std::thread(&Helpers::serve, boxes.back().get()).detach();
    }
    for (int64_t c = 1; c < chunks; ++c) boxes[c - 1]->post(&work, c);
    work(0);
    // A chunk its helper has not started (on a busy CPU a helper may wait for a core) this thread
    // takes back and runs itself, rather than wait.
    for (int64_t c = 1; c < chunks; ++c) {
      Mailbox& box = *boxes[c - 1];
      if (box.claim(box.ticket.load(std::memory_order_relaxed)))
        work(c);
      else
        box.wait_done();
    }
  }

 private:
  struct alignas(64) Mailbox {
    std::atomic<uint64_t> ticket{0}, claimed{0}, done{0};  // the last ticket posted, taken, finished
    std::atomic<bool> sleeping{false};
    const std::function<void(int64_t)>* work = nullptr;
    int64_t chunk = 0;
    std::mutex mutex;
    std::condition_variable wake;

    bool claim(uint64_t t) {  // ticket t's chunk is run by whoever claims it first
      uint64_t before = t - 1;
      return claimed.compare_exchange_strong(before, t);
    }
    void post(const std::function<void(int64_t)>* w, int64_t c) {
      work = w, chunk = c;
      ticket.store(ticket.load() + 1);  // seq_cst, as are the loads of `sleeping` and `ticket` below:
      if (sleeping.load()) {            // either the helper sees the new ticket or we see it sleeping
        std::lock_guard<std::mutex> lock(mutex);
        wake.notify_one();
      }
    }
    void wait_done() {
      const auto deadline = std::chrono::steady_clock::now() + kPoll;
      for (int64_t spins = 0; done.load(std::memory_order_acquire) != ticket.load(std::memory_order_relaxed); ++spins) {
        if (spins < 64 || std::chrono::steady_clock::now() < deadline) relax();
        else std::this_thread::yield();  // the helper lost its core: let it have ours
      }
    }
  };

  static void serve(Mailbox* box) {
    for (uint64_t seen = 0;;) {
      auto deadline = std::chrono::steady_clock::now() + kPoll;
      for (int64_t spins = 1; box->ticket.load(std::memory_order_acquire) == seen; ++spins) {
        relax();
        if (spins % 64 == 0 && std::chrono::steady_clock::now() > deadline) {
          std::unique_lock<std::mutex> lock(box->mutex);
          box->sleeping.store(true);
          box->wake.wait(lock, [&] { return box->ticket.load() != seen; });
          box->sleeping.store(false);
          deadline = std::chrono::steady_clock::now() + kPoll;
        }
      }
      seen = box->ticket.load(std::memory_order_acquire);
      if (!box->claim(seen)) continue;  // the caller ran it: it, work and chunk may be gone
      (*box->work)(box->chunk);
      box->done.store(seen, std::memory_order_release);
    }
  }

  static Helpers* instance;
  std::mutex calls;
  std::vector<std::unique_ptr<Mailbox>> boxes;
};
Helpers* Helpers::instance = new Helpers();  // never freed, for the same reason

// How many threads share a product of N output features of K weights each.
inline int64_t chunk_count(int64_t N, int64_t K) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  return std::max<int64_t>(1, std::min({threads, N, N * K / kChunkWeights}));
}

// Rows [n0, n1) of N split in `chunks` nearly equal parts: work(n0, n1) for each, on the helpers.
template <typename Work>
void split_rows(int64_t N, int64_t K, const Work& rows) {
  const int64_t chunks = chunk_count(N, K);
  Helpers::get().run(chunks, [&](int64_t c) { rows(N * c / chunks, N * (c + 1) / chunks); });
}

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
// The same with AVX2 integer instructions (compilers do not find them for the loops above). Each
// weight row is read once however many activation rows there are (they stay in the first-level cache).

// Weights stream from memory once per token, too fast for the hardware prefetcher alone to keep up:
// ask for the codes 4 KB ahead and for the scales (and zeros) of the row 8 rows ahead. Prefetching
// past the end of a tensor is harmless (a hint, not a load). docs/quantization.md has the measurements.
constexpr int64_t kBytesAhead = 4096, kRowsAhead = 8;

inline void prefetch_row(const uint16_t* row, int64_t G) {  // a row of G bf16 scales: its first and last bytes
  _mm_prefetch(reinterpret_cast<const char*>(row), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(row + G - 1), _MM_HINT_T0);
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

// int8 x int16, block by block: 8 int32 lanes of 4 products each (|code| <= 127, |x| <= 32767 keep a
// lane below 2^24: exact as a float), scaled by the group's scale times the block's step. Two sums (even and odd blocks) so each multiply-add need not wait for the last.
// The rows are taken from the two halves of [n0, n1) in turn: two streams through memory keep more
// reads in flight than one (int8 reads the most bytes per weight; int4 gained nothing from it).
void int8_rows_avx2(const RoundedRows<int16_t>& x, int64_t M, float* y, int64_t N, int64_t n0, int64_t n1,
                    const Int8Weights& weights) {
  const int64_t K = weights.K, G = K / weights.group_size, B = K / kBlock;
  const int shift = __builtin_ctzll(weights.group_size / kBlock);  // b >> shift: the group of block b
  const int64_t half = (n1 - n0 + 1) / 2;
  for (int64_t i = 0; i < 2 * half; ++i) {
    const int64_t n = n0 + (i & 1) * half + i / 2;  // n0, n0 + half, n0 + 1, n0 + half + 1, ...
    if (n >= n1) continue;  // an odd count: the second half is one row shorter
    const int8_t* codes = weights.block(n, 0);
    const uint16_t* scales = weights.scales + n * G;
    prefetch_row(scales + kRowsAhead * G, G);
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* xq = x.q.data() + m * K;
      const float* step = x.step.data() + m * B;
      auto block = [&](int64_t b, __m256 total) {
        const __m128i* q = reinterpret_cast<const __m128i*>(codes + b * kBlock);
        _mm_prefetch(reinterpret_cast<const char*>(codes + b * kBlock + kBytesAhead), _MM_HINT_T1);  // to L2: measured faster here
        const __m256i* xb = reinterpret_cast<const __m256i*>(xq + b * kBlock);
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(q)), _mm256_loadu_si256(xb)),
                                             _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(q + 1)), _mm256_loadu_si256(xb + 1)));
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(bf16_to_float(scales[b >> shift]) * step[b]), total);
      };
      __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 1 < B; b += 2) {
        even = block(b, even);
        odd = block(b + 1, odd);
      }
      if (b < B) even = block(b, even);
      y[m * N + n] = hsum(_mm256_add_ps(even, odd));
    }
  }
}

// int4 x int8, two blocks at a time: the 32 bytes of blocks b, b + 1 hold their codes 0..15 in the low
// halves and 16..31 in the high halves, so the activations are laid out to match once per call:
// [b: 0..15, b+1: 0..15, b: 16..31, b+1: 16..31]. `vpmaddubsw` multiplies the unsigned codes 0..15
// by the signed activations (pair sums <= 2 * 15 * 127, the low and high halves' sum below 2^15: no
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
  const __m256i eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
  for (int64_t p = 0; p < M * P; ++p) {  // the same lanes as the products in int4_rows_avx2
    const __m256i* xq = reinterpret_cast<const __m256i*>(&rows.q[p * 64]);
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(eight, _mm256_loadu_si256(xq)),
                                           _mm256_maddubs_epi16(eight, _mm256_loadu_si256(xq + 1)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&rows.eights[p * 8]), _mm256_madd_epi16(pairs, ones));
  }
  return rows;
}

void int4_rows_avx2(const RoundedRows<int8_t>& x, const PairedRows& paired, int64_t M, float* y, int64_t N,
                    int64_t n0, int64_t n1, const Int4Weights& weights) {
  const int64_t K = weights.K, G = K / weights.group_size, B = K / kBlock, P = (B + 1) / 2;
  const int shift = __builtin_ctzll(weights.group_size);  // k >> shift: the group of input k (a power of 2)
  const __m256i low_bits = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i lane_block = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* codes = weights.block(n, 0);
    const uint16_t* scales = weights.scales + n * G;
    prefetch_row(scales + kRowsAhead * G, G);
    prefetch_row(weights.zeros + (n + kRowsAhead) * G, G);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xq = paired.q.data() + m * P * 64;
      const float* step = paired.step.data() + m * P * 8;
      const int32_t* eights = paired.eights.data() + m * P * 8;
      auto pair = [&](int64_t p, __m256i bytes, __m256 scale, __m256 total) {
        const __m256i* xp = reinterpret_cast<const __m256i*>(xq + p * 64);
        const __m256i products = _mm256_add_epi16(
            _mm256_maddubs_epi16(_mm256_and_si256(bytes, low_bits), _mm256_loadu_si256(xp)),
            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_bits), _mm256_loadu_si256(xp + 1)));
        const __m256i centred = _mm256_sub_epi32(_mm256_madd_epi16(products, ones),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(eights + p * 8)));
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(centred), _mm256_mul_ps(scale, _mm256_loadu_ps(step + p * 8)), total);
      };
      auto full_pair = [&](int64_t p, __m256 total) {
        _mm_prefetch(reinterpret_cast<const char*>(codes + p * 32 + kBytesAhead), _MM_HINT_T0);
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + p * 32));
        if (shift != 5) return pair(p, bytes, _mm256_set1_ps(bf16_to_float(scales[(p * 2 * kBlock) >> shift])), total);
        uint32_t two;  // group 32: the two blocks' own scales, into lanes 0..3 and 4..7
        std::memcpy(&two, scales + 2 * p, sizeof two);
        const __m128i floats = _mm_unpacklo_epi16(_mm_setzero_si128(), _mm_cvtsi32_si128(int(two)));
        return pair(p, bytes, _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(_mm256_castsi128_si256(floats), lane_block)), total);
      };
      __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();  // two sums: each multiply-add need not wait for the last
      int64_t p = 0;
      for (; p + 1 < B / 2; p += 2) {
        even = full_pair(p, even);
        odd = full_pair(p + 1, odd);
      }
      if (p < B / 2) even = full_pair(p++, even);
      if (p < P)  // an odd number of blocks: the last one alone (its partner's activations are 0)
        odd = pair(p, _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + p * 32)), 0),
                   _mm256_set1_ps(bf16_to_float(scales[(p * 2 * kBlock) >> shift])), odd);
      y[m * N + n] = hsum(_mm256_add_ps(even, odd)) + group_dot(weights.zeros + n * G, x.sums.data() + m * G, G);
    }
  }
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
    if constexpr (Weights::kHasZero) {
      const PairedRows paired = pair_rows(rows_x, M, K);
      split_rows(N, K, [&](int64_t n0, int64_t n1) { int4_rows_avx2(rows_x, paired, M, yp, N, n0, n1, weights); });
    } else {
      split_rows(N, K, [&](int64_t n0, int64_t n1) { int8_rows_avx2(rows_x, M, yp, N, n0, n1, weights); });
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

template <typename Weights>
at::Tensor dequantize(int64_t N, const Weights& weights) {
  at::Tensor w = at::empty({N, weights.K}, at::TensorOptions().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
  const int64_t K = weights.K, G = K / weights.group_size;
  split_rows(N, weights.K, [&](int64_t n0, int64_t n1) {
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

TORCH_LIBRARY(llama_quantized, m) {
  m.def("int8_mm(Tensor x, Tensor codes, Tensor scales, int group_size, bool simd=True) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int group_size, bool simd=True) -> Tensor");
  m.def("int8_dequantize(Tensor codes, Tensor scales, int group_size) -> Tensor");
  m.def("int4_dequantize(Tensor codes, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("product_threads(int rows, int row_weights) -> int");
}

TORCH_LIBRARY_IMPL(llama_quantized, CPU, m) {
  m.impl("int8_mm", int8_mm);
  m.impl("int4_mm", int4_mm);
  m.impl("int8_dequantize", int8_dequantize);
  m.impl("int4_dequantize", int4_dequantize);
}

TORCH_LIBRARY_IMPL(llama_quantized, CompositeExplicitAutograd, m) { m.impl("product_threads", product_threads); }
