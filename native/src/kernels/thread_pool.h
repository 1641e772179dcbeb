// A small persistent thread pool (std::thread; no OpenMP so that Apple clang builds it too).
//
// The caller of run()/parallel_for() works too; n_threads - 1 workers are started once. fn(ctx, tid, n) is
// called exactly once for every tid in [0, n), but not necessarily on a distinct thread: a slot is run by
// whichever thread claims it first (the caller claims the slots of workers that have not woken up yet),
// so tid is a work index, never a thread identity.
// Idle workers spin for a short while (spin_us, default 100 us, env EDGEMM_SPIN_US) waiting for the next
// job, then sleep on a condition variable, so back-to-back small kernels (decode GEMVs) do not pay a
// futex wake-up each, and an idle engine does not burn a core.
// Calls from inside a running job execute inline on the calling thread (no nested parallelism).
// One job at a time: concurrent run() calls from different threads are serialized.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace edgemm {

class ThreadPool {
 public:
  using TaskFn = void (*)(void* ctx, int tid, int n_threads);

  // n_threads <= 0 means std::thread::hardware_concurrency(). spin_us < 0 reads EDGEMM_SPIN_US.
  explicit ThreadPool(int n_threads, int spin_us = -1);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }
  // Calls fn(ctx, tid, size()) once on every thread and returns when all have returned.
  void run(TaskFn fn, void* ctx);
  // True on a thread that is currently executing a job of some pool.
  static bool in_job();

 private:
  void worker_main(int tid);
  int n_threads_;
  int spin_us_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // serializes callers
  std::mutex mutex_;
  std::condition_variable cv_;       // workers wait for a new generation
  std::condition_variable done_cv_;  // caller waits for done_ == n_threads_
  std::atomic<uint64_t> generation_{0};
  // Slot claims of the current job: (job id << 32) | next unclaimed slot. Every thread (the caller too)
  // claims slots with a CAS and runs fn(ctx, slot, n); a worker that wakes after the caller has claimed
  // every slot runs nothing, so the caller never waits for a descheduled worker that has not started.
  std::atomic<uint64_t> claim_{0};
  std::atomic<int> done_{0};  // slots finished in the current job
  void run_slots(uint32_t job);
  std::atomic<bool> stop_{false};
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
};

namespace detail {
template <class F>
struct ForCtx {
  F* f;
  int64_t n, grain;
};
template <class F>
void for_trampoline(void* p, int tid, int nt) {
  auto* c = static_cast<ForCtx<F>*>(p);
  const int64_t units = (c->n + c->grain - 1) / c->grain;
  const int64_t u0 = units * tid / nt, u1 = units * (tid + 1) / nt;
  int64_t b = u0 * c->grain, e = u1 * c->grain;
  if (e > c->n) e = c->n;
  if (b < e) (*c->f)(b, e, tid);
}
template <class F>
struct DynCtx {
  F* f;
  int64_t n;
  std::atomic<int64_t> next{0};
};
template <class F>
void dyn_trampoline(void* p, int tid, int) {
  auto* c = static_cast<DynCtx<F>*>(p);
  for (;;) {
    int64_t i = c->next.fetch_add(1, std::memory_order_relaxed);
    if (i >= c->n) break;
    (*c->f)(i, tid);
  }
}
}  // namespace detail

// Static partition of [0, n) into one contiguous range per thread, boundaries multiples of grain:
// f(begin, end, tid). pool may be null (runs f(0, n, 0) inline).
template <class F>
void parallel_for(ThreadPool* pool, int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  if (!pool || pool->size() <= 1 || n <= grain || ThreadPool::in_job()) {
    f(int64_t(0), n, 0);
    return;
  }
  using FD = typename std::remove_reference<F>::type;
  detail::ForCtx<FD> c{&f, n, grain};
  pool->run(&detail::for_trampoline<FD>, &c);
}

// Dynamic schedule: f(i, tid) for every i in [0, n), items handed out one at a time.
template <class F>
void parallel_for_dynamic(ThreadPool* pool, int64_t n, F&& f) {
  if (n <= 0) return;
  if (!pool || pool->size() <= 1 || n == 1 || ThreadPool::in_job()) {
    for (int64_t i = 0; i < n; ++i) f(i, 0);
    return;
  }
  using FD = typename std::remove_reference<F>::type;
  detail::DynCtx<FD> c;
  c.f = &f;
  c.n = n;
  pool->run(&detail::dyn_trampoline<FD>, &c);
}

inline int pool_threads(const ThreadPool* pool) { return pool ? pool->size() : 1; }

}  // namespace edgemm
