// Two-lane chunked prefill after mllm-NPU.
//
// The prompt is cut into chunks of chunk_size rows. Each (chunk c, layer l) is a chain of 9 steps that
// alternate between the CPU lane (norms, activation quantization, shadow outliers, RoPE, KV-cache writes,
// attention, SwiGLU, residuals, and any non-W8A8 linear) and the NPU lane (the W8A8 GEMMs of QKV, O,
// gate|up, down, through the NpuBackend vtable):
//   0 C: rmsnorm, quantize -> 1 N: QKV GEMM -> 2 C: shadow, RoPE, KV write, attention, quantize ->
//   3 N: O GEMM -> 4 C: shadow, residual, rmsnorm, quantize -> 5 N: gate|up GEMM -> 6 C: shadow, SwiGLU,
//   quantize -> 7 N: down GEMM -> 8 C: shadow, residual.
// Dependencies: the chain itself; step 0 of (c, l) after step 8 of (c, l-1); the attention step 2 of
// (c, l) after step 2 of (c-1, l) (the earlier chunks' keys/values of layer l are in the cache); a chunk
// slot's buffers are reused every kWindow chunks. Each lane runs the ready step of its kind with the
// lowest (chunk, layer) out of order, so the NPU lane multiplies chunk c+1's QKV while the CPU lane runs
// chunk c's attention, and so on. Busy time per lane is accumulated for the utilisation figures.
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "engine.h"

namespace edgemm {
namespace {

constexpr int kSteps = 9;
constexpr int kWindow = 3;

struct Slot {
  std::vector<float> h, qkv, att, gu, tmp;
  kernels::W8A8Act act[4];
  Scratch scratch;
};

bool is_npu(const Linear& L) { return L.kind == Linear::kW8A8 && L.parts.empty(); }

}  // namespace

void prefill_two_lane(Model& m, Session& s, float* x, int64_t T) {
  const TextCfg& t = m.cfg.t;
  const int64_t D = t.hidden, H = t.heads, Hkv = t.kv_heads, hd = t.head_dim, I = t.inter;
  const int64_t W = (H + 2 * Hkv) * hd, C = m.chunk_size;
  const int64_t n_chunks = (T + C - 1) / C;
  const int L = t.layers;
  const int64_t start = s.n_past;
  ThreadPool* cpu_lane_pool = m.cpu_pool.get();
  ThreadPool* cpu_pool = pool_for(cpu_lane_pool, double(C) * double(2 * I) * 8);
  NpuBackend npu = cpu_int8_backend(m.npu_pool.get());  // the kernels split big GEMMs only

  std::vector<Slot> slots(static_cast<size_t>(std::min<int64_t>(kWindow, n_chunks)));
  for (auto& sl : slots) {
    sl.h.resize(size_t(C * D));
    sl.qkv.resize(size_t(C * W));
    sl.att.resize(size_t(C * H * hd));
    sl.gu.resize(size_t(C * 2 * I));
    sl.tmp.resize(size_t(C * std::max(D, I)));
  }
  std::vector<int> progress(size_t(n_chunks * L), 0);
  std::vector<char> running(size_t(n_chunks * L), 0);
  std::mutex mu;
  std::condition_variable cv;
  std::exception_ptr error;
  bool abort = false;
  int64_t remaining = n_chunks * L * kSteps;
  double busy[2] = {0, 0};

  auto lane_of = [](int step) { return (step % 2 == 1) ? 1 : 0; };  // 1 = NPU
  auto ready = [&](int64_t c, int l) -> bool {
    int st = progress[size_t(c * L + l)];
    if (st >= kSteps || running[size_t(c * L + l)]) return false;
    if (st == 0) {
      if (l > 0 && progress[size_t(c * L + l - 1)] < kSteps) return false;
      if (l == 0 && c >= kWindow && progress[size_t((c - kWindow) * L + L - 1)] < kSteps) return false;
    }
    if (st == 2 && c > 0 && progress[size_t((c - 1) * L + l)] < 3) return false;
    return true;
  };

  auto run_step = [&](int64_t c, int l, int step) {
    Slot& sl = slots[size_t(c % kWindow)];
    const TextBlock& b = m.blocks[size_t(l)];
    const int64_t r0 = c * C, n = std::min(C, T - r0), p0 = start + r0;
    float* xc = x + r0 * D;
    auto prep = [&](const Linear& lin, int ai, const float* in, int64_t ldin, float* out, int64_t ldout) {
      if (is_npu(lin))
        check_kernel(kernels::w8a8_quantize(in, n, lin.K, ldin, lin.input_scale, &sl.act[ai], cpu_pool), "w8a8_quantize");
      else
        run_linear(lin, in, n, ldin, out, ldout, &sl.scratch, cpu_lane_pool);
    };
    auto gemm = [&](const Linear& lin, int ai, float* out, int64_t ldout) {
      if (!is_npu(lin)) return;
      const float* bias = lin.bias.empty() ? nullptr : lin.bias.data();
      int32_t rc = npu.gemm(npu.ctx, npu.upload_w8a8(npu.ctx, &lin.w8, ""), &sl.act[ai], bias, out, ldout);
      check_kernel(kernels::Status(rc), "npu gemm");
    };
    auto shadow = [&](const Linear& lin, int ai, float* out, int64_t ldout) {
      if (is_npu(lin)) check_kernel(kernels::w8a8_shadow(sl.act[ai], lin.w8, out, ldout, cpu_pool), "w8a8_shadow");
    };
    switch (step) {
      case 0:
        check_kernel(kernels::rmsnorm(xc, D, b.ln_in.data(), sl.h.data(), D, n, D, t.eps, cpu_pool), "rmsnorm");
        prep(b.qkv, 0, sl.h.data(), D, sl.qkv.data(), W);
        break;
      case 1: gemm(b.qkv, 0, sl.qkv.data(), W); break;
      case 2: {
        shadow(b.qkv, 0, sl.qkv.data(), W);
        std::vector<int32_t> pos(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) pos[size_t(i)] = int32_t(p0 + i);
        float* qkv = sl.qkv.data();
        check_kernel(kernels::rope_apply(qkv, W, n, H, hd, pos.data(), m.rope, cpu_pool), "rope");
        check_kernel(kernels::rope_apply(qkv + H * hd, W, n, Hkv, hd, pos.data(), m.rope, cpu_pool), "rope");
        cache_attention(m, s, l, qkv, W, n, p0, sl.att.data(),
                        pool_for(cpu_lane_pool, double(n) * double(p0 + n) * double(H * hd)));
        prep(b.o, 1, sl.att.data(), H * hd, sl.tmp.data(), D);
        break;
      }
      case 3: gemm(b.o, 1, sl.tmp.data(), D); break;
      case 4:
        shadow(b.o, 1, sl.tmp.data(), D);
        for (int64_t j = 0; j < n * D; ++j) xc[j] += sl.tmp[size_t(j)];
        check_kernel(kernels::rmsnorm(xc, D, b.ln_post.data(), sl.h.data(), D, n, D, t.eps, cpu_pool), "rmsnorm");
        prep(b.gate_up, 2, sl.h.data(), D, sl.gu.data(), 2 * I);
        break;
      case 5: gemm(b.gate_up, 2, sl.gu.data(), 2 * I); break;
      case 6:
        shadow(b.gate_up, 2, sl.gu.data(), 2 * I);
        check_kernel(kernels::swiglu(sl.gu.data(), 2 * I, sl.gu.data() + I, 2 * I, sl.gu.data(), 2 * I, n, I, cpu_pool), "swiglu");
        prep(b.down, 3, sl.gu.data(), 2 * I, sl.tmp.data(), D);
        break;
      case 7: gemm(b.down, 3, sl.tmp.data(), D); break;
      case 8:
        shadow(b.down, 3, sl.tmp.data(), D);
        for (int64_t j = 0; j < n * D; ++j) xc[j] += sl.tmp[size_t(j)];
        if (s.debug) record_rows(s, "text.layer." + std::to_string(l), start + r0 - s.dbg_start, xc, n, D, s.dbg_rows);
        break;
    }
  };

  auto lane_main = [&](int lane) {
    std::unique_lock<std::mutex> lk(mu);
    while (true) {
      if (abort || remaining == 0) break;
      int64_t bc = -1;
      int bl = -1;
      for (int64_t c = 0; c < n_chunks && bc < 0; ++c)
        for (int l = 0; l < L; ++l) {
          if (ready(c, l) && lane_of(progress[size_t(c * L + l)]) == lane) {
            bc = c;
            bl = l;
            break;
          }
        }
      if (bc < 0) {
        cv.wait(lk);
        continue;
      }
      int step = progress[size_t(bc * L + bl)];
      running[size_t(bc * L + bl)] = 1;
      lk.unlock();
      double t0 = now_ms();
      try {
        run_step(bc, bl, step);
      } catch (...) {
        lk.lock();
        if (!error) error = std::current_exception();
        abort = true;
        cv.notify_all();
        break;
      }
      double dt = now_ms() - t0;
      lk.lock();
      busy[lane] += dt;
      running[size_t(bc * L + bl)] = 0;
      progress[size_t(bc * L + bl)] = step + 1;
      --remaining;
      cv.notify_all();
    }
  };

  double t0 = now_ms();
  std::thread npu_thread;
  try {
    npu_thread = std::thread(lane_main, 1);
  } catch (...) {
    fail(EDGEMM_ERR_INTERNAL, "cannot start the NPU lane thread");
  }
  lane_main(0);
  npu_thread.join();
  double wall = now_ms() - t0;
  if (error) std::rethrow_exception(error);
  s.cpu_busy_ms += busy[0];
  s.npu_busy_ms += busy[1];
  s.prefill_wall_ms += wall;
}

}  // namespace edgemm
