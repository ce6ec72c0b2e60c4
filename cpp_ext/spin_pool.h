// A persistent worker pool for sub-millisecond jobs (one decode-step matmul is 5-100 us).
//
// The preprocessing pool sleeps on a condition variable between frames; a wake-up there costs tens of
// microseconds, more than a small GEMV itself. Here workers spin on a generation counter for a short
// while after each job (the next matmul of a decode step usually follows within microseconds) and only
// then sleep, so torch's own threads get the cores back between decode steps.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EVLM_PAUSE() _mm_pause()
#else
#define EVLM_PAUSE() std::this_thread::yield()
#endif

namespace evlm {

class SpinPool {
 public:
  // How long an idle worker keeps spinning before it sleeps.
  static constexpr std::chrono::microseconds kSpin{200};

  int size() const { return int(workers_.size()) + 1; }

  void grow(int n) {  // only from the thread that calls run(), never during a run
    while (size() < n) {
      const int id = size();
      const uint64_t now = generation_.load(std::memory_order_acquire);  // before any run it must take part in
      workers_.emplace_back([this, id, now] { loop(id, now); });
      workers_.back().detach();  // lives for the process, like the preprocessing pool
    }
  }

  // Runs fn(0..nt-1), fn(0) on the caller; returns when all are done. fn must not throw.
  void run(int nt, const std::function<void(int)>& fn) {
    fn_ = &fn;
    active_ = nt;
    remaining_.store(nt - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(m_);
      if (sleepers_) cv_.notify_all();
    }
    fn(0);
    while (remaining_.load(std::memory_order_acquire) != 0) EVLM_PAUSE();
  }

 private:
  void loop(int id, uint64_t seen) {
    for (;;) {
      auto until = std::chrono::steady_clock::now() + kSpin;
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        EVLM_PAUSE();
        if (++spins % 64 == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lk(m_);
          ++sleepers_;
          cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          --sleepers_;
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (id < active_) {
        (*fn_)(id);
        remaining_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_;
  int sleepers_ = 0;
  const std::function<void(int)>* fn_ = nullptr;
  int active_ = 0;
  std::atomic<int> remaining_{0};
  std::atomic<uint64_t> generation_{0};
};

}  // namespace evlm
