// The kernels' own helper threads (quantized.cpp includes this file; llama/generation/quantize.py builds it).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define LLAMA_FORK_SAFE 1
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace llama_quantized {

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
Helpers* Helpers::instance = new Helpers();  // never freed, for the same reason (one translation unit includes this)

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

}  // namespace llama_quantized
