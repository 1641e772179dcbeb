#include "thread_pool.h"

#include <chrono>
#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define EDGEMM_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define EDGEMM_CPU_RELAX() __asm__ __volatile__("yield")
#else
#define EDGEMM_CPU_RELAX() ((void)0)
#endif

namespace edgemm {
namespace {
thread_local bool t_in_job = false;

template <class Pred>
bool spin_until(Pred pred, int spin_us) {
  if (spin_us <= 0) return pred();
  auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (pred()) return true;
      EDGEMM_CPU_RELAX();
    }
    if (std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(spin_us)) return pred();
  }
}
}  // namespace

bool ThreadPool::in_job() { return t_in_job; }

ThreadPool::ThreadPool(int n_threads, int spin_us) {
  if (n_threads <= 0) {
    unsigned hc = std::thread::hardware_concurrency();
    n_threads = hc ? static_cast<int>(hc) : 1;
  }
  if (spin_us < 0) {
    const char* e = std::getenv("EDGEMM_SPIN_US");
    spin_us = e ? std::atoi(e) : 100;
    if (spin_us < 0) spin_us = 0;
  }
  n_threads_ = n_threads;
  spin_us_ = spin_us;
  workers_.reserve(n_threads - 1);
  for (int t = 1; t < n_threads; ++t) workers_.emplace_back(&ThreadPool::worker_main, this, t);
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mutex_);
    stop_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::run_slots(uint32_t job) {
  for (;;) {
    uint64_t v = claim_.load(std::memory_order_acquire);
    if (uint32_t(v >> 32) != job) return;  // a later job: not ours to touch
    uint32_t slot = uint32_t(v);
    if (slot >= uint32_t(n_threads_)) return;
    if (!claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    bool was = t_in_job;
    t_in_job = true;
    fn_(ctx_, int(slot), n_threads_);
    t_in_job = was;
    if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_threads_) {
      std::lock_guard<std::mutex> lk(mutex_);
      done_cv_.notify_one();
    }
  }
}

void ThreadPool::worker_main(int) {
  uint64_t seen = 0;
  for (;;) {
    auto fresh = [&] { return generation_.load(std::memory_order_acquire) != seen; };
    if (!spin_until(fresh, spin_us_)) {
      std::unique_lock<std::mutex> lk(mutex_);
      cv_.wait(lk, fresh);
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load(std::memory_order_acquire)) return;
    run_slots(uint32_t(seen));
  }
}

void ThreadPool::run(TaskFn fn, void* ctx) {
  if (n_threads_ <= 1 || t_in_job) {
    bool was = t_in_job;
    t_in_job = true;
    for (int t = 0; t < n_threads_; ++t) fn(ctx, t, n_threads_);
    t_in_job = was;
    return;
  }
  std::lock_guard<std::mutex> run_lk(run_mutex_);
  uint32_t job;
  {
    std::lock_guard<std::mutex> lk(mutex_);
    fn_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    job = uint32_t(generation_.load(std::memory_order_relaxed) + 1);
    claim_.store(uint64_t(job) << 32, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  cv_.notify_all();
  run_slots(job);  // the caller claims slots too, all of them if the workers are late
  // Wait only for slots that workers claimed and are still running. Spin as long as the workers do;
  // then sleep so that, on an oversubscribed machine, the worker can get this CPU.
  auto done = [&] { return done_.load(std::memory_order_acquire) == n_threads_; };
  if (!spin_until(done, spin_us_)) {
    std::unique_lock<std::mutex> lk(mutex_);
    done_cv_.wait(lk, done);
  }
}

}  // namespace edgemm
