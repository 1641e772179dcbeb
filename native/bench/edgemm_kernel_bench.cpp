// edgemm kernel microbenchmark.
//
//   edgemm_kernel_bench [--json] [--threads 1,2] [--reps 5] [--min-ms 50] [--filter substr] [--quick]
//                       [--isa scalar|avx2|avx512_vnni|neon_dotprod]
//
// Sections: machine peaks (vpdpbusd / FMA loops, streaming read bandwidth), W8A8 prefill GEMMs at
// Qwen1.5-1.8B shapes (M = 128/256/512), decode GEMVs (int4 g32/g128, int8, 2:4 sparse), fp32 GEMM,
// attention, elementwise. Every number is the median of --reps repetitions (each repetition loops the
// kernel for at least --min-ms); min and max are reported too. Decode GEMVs are measured "hot" (one
// weight matrix reused: it stays in the L3) and "cold" (rotating over copies totalling >= 1 GiB, so
// weights stream from DRAM as in a real decode step), each against the stream bandwidth measured with
// the same working-set size.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_features.h"
#include "kernels.h"

using namespace edgemm;
using namespace edgemm::kernels;

namespace {

struct Options {
  bool json = false, quick = false;
  std::vector<int> threads = {1, 2};
  int reps = 5;
  double min_ms = 50;
  std::string filter;
} opt;

struct Timing {
  double median_s, min_s, max_s;
  double ref_ratio = 0;  // median over repetitions of (ref per-call time / this per-call time), if a ref ran
};

double time_loop(const std::function<void()>& fn, double min_ms) {
  int iters = 0;
  auto t0 = std::chrono::steady_clock::now();
  double el;
  do {
    fn();
    ++iters;
    el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (el * 1e3 < min_ms);
  return el / iters;
}

// Runs fn repeatedly: `reps` repetitions, each looping until min_ms elapsed; per-call seconds.
// If ref is given, each repetition is preceded by a run of ref (e.g. the peak loop) and the ratio of
// the two is recorded: on a shared, noisy machine the ratio is steadier than either number alone.
Timing measure(const std::function<void()>& fn, const std::function<void()>& ref = nullptr, int reps = -1,
               double min_ms = -1) {
  if (reps < 0) reps = opt.reps;
  if (min_ms < 0) min_ms = opt.min_ms;
  fn();  // warm-up
  std::vector<double> per, ratio;
  for (int r = 0; r < reps; ++r) {
    double tr = ref ? time_loop(ref, min_ms / 2) : 0;
    double t = time_loop(fn, min_ms);
    per.push_back(t);
    if (ref) ratio.push_back(tr / t);
  }
  std::sort(per.begin(), per.end());
  std::sort(ratio.begin(), ratio.end());
  Timing tm{per[per.size() / 2], per.front(), per.back()};
  if (!ratio.empty()) tm.ref_ratio = ratio[ratio.size() / 2];
  return tm;
}

struct Record {
  std::string section, name, shape;
  int threads;
  Timing t;
  std::map<std::string, double> metrics;
};
std::vector<Record> g_records;

void emit(const Record& r) {
  g_records.push_back(r);
  if (opt.json) return;
  std::printf("%-10s %-34s %-22s T=%d  %9.3f ms (min %.3f max %.3f)", r.section.c_str(), r.name.c_str(),
              r.shape.c_str(), r.threads, r.t.median_s * 1e3, r.t.min_s * 1e3, r.t.max_s * 1e3);
  for (const auto& m : r.metrics) std::printf("  %s=%.4g", m.first.c_str(), m.second);
  std::printf("\n");
  std::fflush(stdout);
}

bool selected(const std::string& name) { return opt.filter.empty() || name.find(opt.filter) != std::string::npos; }

// ---------------------------------------------------------------------------------------------------
// Peaks
// ---------------------------------------------------------------------------------------------------
#if defined(__x86_64__)
__attribute__((target("avx512f,avx512vnni"), noinline)) void vnni_loop(long iters) {
  __asm__ volatile(
      "vpxord %%zmm0,%%zmm0,%%zmm0\n vpternlogd $0xff,%%zmm14,%%zmm14,%%zmm14\n"
      "vpternlogd $0xff,%%zmm15,%%zmm15,%%zmm15\n"
      "1:\n"
      "vpdpbusd %%zmm14,%%zmm15,%%zmm0\n vpdpbusd %%zmm14,%%zmm15,%%zmm1\n vpdpbusd %%zmm14,%%zmm15,%%zmm2\n"
      "vpdpbusd %%zmm14,%%zmm15,%%zmm3\n vpdpbusd %%zmm14,%%zmm15,%%zmm4\n vpdpbusd %%zmm14,%%zmm15,%%zmm5\n"
      "vpdpbusd %%zmm14,%%zmm15,%%zmm6\n vpdpbusd %%zmm14,%%zmm15,%%zmm7\n vpdpbusd %%zmm14,%%zmm15,%%zmm8\n"
      "vpdpbusd %%zmm14,%%zmm15,%%zmm9\n vpdpbusd %%zmm14,%%zmm15,%%zmm10\n vpdpbusd %%zmm14,%%zmm15,%%zmm11\n"
      "dec %0\n jnz 1b\n"
      : "+r"(iters)
      :
      : "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10", "zmm11",
        "zmm14", "zmm15", "cc");
}
// AMX-INT8: 4 independent accumulator tiles, each TDPBSSD = 16 x 16 x 64 MACs, operands from tiles only.
struct alignas(64) AmxCfg {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
__attribute__((target("amx-tile,amx-int8"), noinline)) void amx_loop(long iters) {
  static const AmxCfg c = [] {  // in memory before ldtilecfg reads it (a local can lose its stores)
    AmxCfg k;
    for (int i = 0; i < 8; ++i) {
      k.colsb[i] = 64;
      k.rows[i] = 16;
    }
    return k;
  }();
  _tile_loadconfig(&c);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (long i = 0; i < iters; ++i) {
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_release();
}
bool amx_active() { return active_isa() == Isa::kAvx512Amx; }
__attribute__((target("avx512f"), noinline)) void fma_loop(long iters) {
  __asm__ volatile(
      "vxorps %%zmm14,%%zmm14,%%zmm14\n vxorps %%zmm15,%%zmm15,%%zmm15\n"
      "1:\n"
      "vfmadd231ps %%zmm14,%%zmm15,%%zmm0\n vfmadd231ps %%zmm14,%%zmm15,%%zmm1\n"
      "vfmadd231ps %%zmm14,%%zmm15,%%zmm2\n vfmadd231ps %%zmm14,%%zmm15,%%zmm3\n"
      "vfmadd231ps %%zmm14,%%zmm15,%%zmm4\n vfmadd231ps %%zmm14,%%zmm15,%%zmm5\n"
      "vfmadd231ps %%zmm14,%%zmm15,%%zmm6\n vfmadd231ps %%zmm14,%%zmm15,%%zmm7\n"
      "vfmadd231ps %%zmm14,%%zmm15,%%zmm8\n vfmadd231ps %%zmm14,%%zmm15,%%zmm9\n"
      "vfmadd231ps %%zmm14,%%zmm15,%%zmm10\n vfmadd231ps %%zmm14,%%zmm15,%%zmm11\n"
      "dec %0\n jnz 1b\n"
      : "+r"(iters)
      :
      : "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10", "zmm11",
        "zmm14", "zmm15", "cc");
}
__attribute__((target("avx512f"), noinline)) uint64_t read_stream(const char* p, size_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 256 <= n; i += 256) {
    a0 = _mm512_xor_si512(a0, _mm512_load_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_load_si512(p + i + 64));
    a2 = _mm512_xor_si512(a2, _mm512_load_si512(p + i + 128));
    a3 = _mm512_xor_si512(a3, _mm512_load_si512(p + i + 192));
  }
  __m512i s = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
  return uint64_t(_mm_cvtsi128_si64(_mm512_castsi512_si128(s)));
}
#endif

// Runs body(tid) on nt threads of the pool (each thread does the same work).
[[maybe_unused]] void on_threads(ThreadPool& pool, const std::function<void(int)>& body) {
  parallel_for(&pool, pool.size(), 1, [&](int64_t b, int64_t e, int) {
    for (int64_t t = b; t < e; ++t) body(int(t));
  });
}

std::map<std::string, double> g_peak;  // "int8_T1", "fp32_T2", "bw_l3_T2", "bw_dram_T2"...

void bench_peaks() {
#if defined(__x86_64__)
  const CpuFeatures& f = cpu_features();
  for (int nt : opt.threads) {
    ThreadPool pool(nt);
    const long it = 2000000;
    if (f.avx512vnni) {
      Timing t = measure([&] { on_threads(pool, [&](int) { vnni_loop(it); }); });
      double g = double(it) * 12 * 64 * nt / t.median_s / 1e9;
      g_peak["int8_T" + std::to_string(nt)] = g;
      g_peak["int8_vnni_T" + std::to_string(nt)] = g;
      emit({"peak", "vpdpbusd_zmm_loop", "12 chains", nt, t, {{"GMAC/s", g}}});
    }
    if (amx_active()) {  // the W8A8 GEMM runs on AMX: its peak is the int8 peak
      const long ai = it / 8;
      Timing t = measure([&] { on_threads(pool, [&](int) { amx_loop(ai); }); });
      double g = double(ai) * 4 * 16 * 16 * 64 * nt / t.median_s / 1e9;
      g_peak["int8_T" + std::to_string(nt)] = g;
      emit({"peak", "tdpbssd_tile_loop", "4 tiles", nt, t, {{"GMAC/s", g}}});
    }
    if (f.avx512f) {
      Timing t = measure([&] { on_threads(pool, [&](int) { fma_loop(it); }); });
      double g = double(it) * 12 * 32 * nt / t.median_s / 1e9;
      g_peak["fp32_T" + std::to_string(nt)] = g;
      emit({"peak", "vfmadd231ps_zmm_loop", "12 chains", nt, t, {{"GFLOP/s", g}}});
    }
    if (f.avx512f) {
      for (size_t mb : {size_t(32), size_t(1024)}) {
        if (opt.quick && mb > 32) continue;
        const size_t bytes = mb << 20;
        AlignedBuffer<char> buf;
        buf.resize(bytes);
        std::memset(buf.data(), 1, bytes);
        volatile uint64_t sink = 0;
        Timing t = measure([&] {
          on_threads(pool, [&](int tid) {
            size_t per = bytes / nt;
            sink = sink + read_stream(buf.data() + tid * per, per);
          });
        });
        double gbs = double(bytes) / t.median_s / 1e9;
        g_peak[std::string(mb > 32 ? "bw_dram_T" : "bw_l3_T") + std::to_string(nt)] = gbs;
        emit({"peak", "stream_read", std::to_string(mb) + " MiB", nt, t, {{"GB/s", gbs}}});
      }
    }
  }
#endif
}

// Reference workloads run next to each kernel (see measure()).
const long kRefIters = 200000;
std::function<void()> int8_ref(ThreadPool& pool) {
#if defined(__x86_64__)
  if (amx_active()) return [&pool] { on_threads(pool, [](int) { amx_loop(kRefIters / 8); }); };
  if (cpu_features().avx512vnni) return [&pool] { on_threads(pool, [](int) { vnni_loop(kRefIters); }); };
#endif
  return nullptr;
}
double int8_ref_macs(int nt) {
#if defined(__x86_64__)
  if (amx_active()) return double(kRefIters / 8) * 4 * 16 * 16 * 64 * nt;
#endif
  return double(kRefIters) * 12 * 64 * nt;
}
std::function<void()> fp32_ref(ThreadPool& pool) {
#if defined(__x86_64__)
  if (cpu_features().avx512f) return [&pool] { on_threads(pool, [](int) { fma_loop(kRefIters); }); };
#endif
  return nullptr;
}
double fp32_ref_flops(int nt) { return double(kRefIters) * 12 * 32 * nt; }
// Streams `bytes` of buf per call: always the same bytes (rotate = false: cache-resident like a "hot"
// weight) or the next chunk of a large buffer (rotate = true: from DRAM like a "cold" weight).
std::function<void()> stream_ref(ThreadPool& pool, const AlignedBuffer<char>& buf, size_t bytes, bool rotate) {
#if defined(__x86_64__)
  if (cpu_features().avx512f) {
    auto pos = std::make_shared<size_t>(0);
    return [&pool, &buf, bytes, pos, rotate] {
      const size_t base = *pos;
      if (rotate) *pos = (base + bytes + bytes <= buf.size()) ? base + bytes : 0;
      const int nt = pool.size();
      on_threads(pool, [&](int tid) {
        static thread_local volatile uint64_t sink = 0;
        size_t per = bytes / nt / 256 * 256;
        sink = sink + read_stream(buf.data() + base + tid * per, per);
      });
    };
  }
#endif
  return nullptr;
}

double peak(const std::string& key, int nt) {
  auto it = g_peak.find(key + "_T" + std::to_string(nt));
  return it == g_peak.end() ? 0.0 : it->second;
}

// ---------------------------------------------------------------------------------------------------
// Shapes (Qwen1.5-1.8B): hidden 2048, intermediate 5504, 16 heads x 128.
// ---------------------------------------------------------------------------------------------------
struct LinShape {
  const char* name;
  int64_t K, N;
};
const LinShape kShapes[] = {{"qkv", 2048, 6144}, {"o_proj", 2048, 2048}, {"gate_up", 2048, 11008}, {"down", 5504, 2048}};

// ---------------------------------------------------------------------------------------------------
// W8A8 prefill GEMM
// ---------------------------------------------------------------------------------------------------
// The vision encoder's linears (CLIP-ViT-L/14-336: 577 tokens, or 145 after an in-encoder selection
// keeping a quarter of the patches), named vit_*.
struct W8A8Case {
  LinShape s;
  std::vector<int64_t> Ms;
  int64_t quick_M;
};
std::vector<W8A8Case> w8a8_cases() {
  std::vector<W8A8Case> c;
  for (const LinShape& s : kShapes) c.push_back({s, {128, 256, 512}, 256});
  for (LinShape s : {LinShape{"vit_qkv", 1024, 3072}, LinShape{"vit_out", 1024, 1024},
                     LinShape{"vit_fc1", 1024, 4096}, LinShape{"vit_fc2", 4096, 1024}})
    c.push_back({s, {577, 145}, 577});
  return c;
}

void bench_w8a8() {
  std::mt19937 rng(1);
  for (const W8A8Case& wc : w8a8_cases()) {
    const LinShape& s = wc.s;
    bool any = false;
    for (const char* k : {"w8a8_gemm.", "w8a8_linear_fused.", "w8a8_quantize.", "w8a8_shadow.", "w8a8_shadow_scattered."})
      any = any || selected(k + std::string(s.name));
    if (!any) continue;
    std::vector<int8_t> qw(s.N * s.K);
    for (auto& v : qw) v = int8_t(int(rng() % 255) - 127);
    std::vector<float> ws(s.N, 0.01f), bias(s.N, 0.1f);
    W8A8Weights w;
    // The 4 outlier channels of the "hot" pattern below are declared, as calibration would.
    const int32_t hot[4] = {11, 517, int32_t(std::min<int64_t>(1023, s.K - 1)), int32_t(std::min<int64_t>(1999, s.K - 49))};
    if (w8a8_pack(qw.data(), s.K, ws.data(), s.N, s.K, hot, 4, &w) != Status::kOk) std::abort();
    for (int64_t M : wc.Ms) {
      if (opt.quick && M != wc.quick_M) continue;
      std::string shape = "M" + std::to_string(M) + " K" + std::to_string(s.K) + " N" + std::to_string(s.N);
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<float> x(M * s.K);
      for (auto& v : x) v = nd(rng);
      // Outliers as calibration with a clipped scale leaves them: concentrated in a few channels
      // (4 channels, a quarter of the rows each) plus 0.01% scattered elements ("hot" pattern); and a
      // worst case of 0.1% uniformly scattered elements ("scattered").
      const float s_a = 4.0f / 127.0f;
      std::vector<float> xs = x;
      for (int64_t m = 0; m < M; ++m)
        for (int32_t c : hot)
          if ((m + c) % 4 == 0) x[m * s.K + c] = 25.0f;
      for (size_t i = 0; i < x.size(); i += 9973) x[i] = -30.0f;
      for (size_t i = 0; i < xs.size(); i += 997) xs[i] = 20.0f;
      std::vector<float> y(M * s.N);
      for (int nt : opt.threads) {
        ThreadPool pool(nt);
        W8A8Act a, as;
        if (w8a8_quantize(x.data(), M, s.K, s.K, s_a, &a, &pool) != Status::kOk) std::abort();
        if (w8a8_quantize(xs.data(), M, s.K, s.K, s_a, &as, &pool) != Status::kOk) std::abort();
        const double macs = double(M) * s.N * s.K;
        if (selected(std::string("w8a8_gemm.") + s.name)) {
          Timing t = measure([&] { (void)w8a8_gemm(a, w, bias.data(), y.data(), s.N, false, &pool); },
                             int8_ref(pool));
          double g = macs / t.median_s / 1e9;
          emit({"w8a8", std::string("w8a8_gemm.") + s.name, shape, nt, t,
                {{"GMAC/s", g}, {"pct_peak", 100 * g / peak("int8", nt)},
                 {"pct_vnni_peak", 100 * g / peak("int8_vnni", nt)},
                 {"pct_peak_interleaved", 100 * macs / int8_ref_macs(nt) * t.ref_ratio}}});
        }
        if (selected(std::string("w8a8_linear_fused.") + s.name)) {
          Timing t = measure([&] { (void)w8a8_linear(a, w, bias.data(), y.data(), s.N, false, &pool); },
                             int8_ref(pool));
          double g = macs / t.median_s / 1e9;
          emit({"w8a8", std::string("w8a8_linear_fused.") + s.name, shape, nt, t,
                {{"GMAC/s", g}, {"outliers", double(a.outliers.size())},
                 {"pct_peak_interleaved", 100 * macs / int8_ref_macs(nt) * t.ref_ratio}}});
        }
        if (selected(std::string("w8a8_quantize.") + s.name)) {
          Timing t = measure([&] { (void)w8a8_quantize(x.data(), M, s.K, s.K, s_a, &a, &pool); });
          emit({"w8a8", std::string("w8a8_quantize.") + s.name, shape, nt, t,
                {{"GB/s_in", double(M) * s.K * 4 / t.median_s / 1e9}, {"outliers", double(a.outliers.size())}}});
        }
        for (int pat = 0; pat < 2; ++pat) {
          const W8A8Act& act = pat ? as : a;
          const std::string nm = std::string(pat ? "w8a8_shadow_scattered." : "w8a8_shadow.") + s.name;
          if (!selected(nm)) continue;
          std::set<int32_t> chans;
          for (const Outlier& o : act.outliers) chans.insert(o.k);
          Timing t = measure([&] { (void)w8a8_shadow(act, w, y.data(), s.N, &pool); });
          emit({"w8a8", nm, shape, nt, t,
                {{"outliers", double(act.outliers.size())}, {"channels", double(chans.size())},
                 {"pct_of_gemm_time", 0.0}}});
        }
      }
    }
  }
  // Fill pct_of_gemm_time for shadow rows.
  for (auto& r : g_records) {
    if (r.name.rfind("w8a8_shadow", 0) != 0) continue;
    const std::string lin = r.name.substr(r.name.find('.') + 1);
    for (const auto& g : g_records)
      if (g.name == "w8a8_gemm." + lin && g.shape == r.shape && g.threads == r.threads)
        r.metrics["pct_of_gemm_time"] = 100 * r.t.median_s / g.t.median_s;
  }
}

// ---------------------------------------------------------------------------------------------------
// Decode GEMVs
// ---------------------------------------------------------------------------------------------------
struct WoqVariant {
  std::string name;
  WFormat fmt;
  int64_t G;  // 0 = per-channel
  bool sparse;
};

WoqWeights make_woq_weights(const WoqVariant& v, int64_t N, int64_t K, std::mt19937& rng) {
  const int64_t G = v.G ? v.G : K;
  std::vector<uint16_t> sc(N * (K / G), fp32_to_fp16(0.01f));
  WoqWeights w;
  Status st;
  if (v.fmt == WFormat::kInt4) {
    std::vector<uint8_t> q(N * K / 2);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; k += 2) {
        int c0 = int(rng() % 16), c1 = int(rng() % 16);
        if (v.sparse) {  // 2 of every 4 at the zero point
          int ph = int((k / 4 + n) % 2);
          if (((k % 4) / 2) == ph) c0 = c1 = 8;
        }
        q[n * K / 2 + k / 2] = uint8_t(c0 | c1 << 4);
      }
    st = v.sparse ? woq_pack_int4_sparse24(q.data(), sc.data(), nullptr, N, K, G, &w)
                  : woq_pack_int4(q.data(), sc.data(), nullptr, N, K, G, &w);
  } else {
    std::vector<int8_t> q(N * K);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        int c = int(rng() % 255) - 127;
        if (v.sparse && ((k % 4) / 2) == int((k / 4 + n) % 2)) c = 0;
        q[n * K + k] = int8_t(c);
      }
    st = v.sparse ? woq_pack_int8_sparse24(q.data(), sc.data(), nullptr, N, K, G, &w)
                  : woq_pack_int8(q.data(), sc.data(), nullptr, N, K, G, &w);
  }
  if (st != Status::kOk) std::abort();
  return w;
}

// Copies of a packed weight (same numbers, distinct memory).
WoqWeights clone(const WoqWeights& w) {
  WoqWeights c;
  c.format = w.format;
  c.sparse24 = w.sparse24;
  c.has_zeros = w.has_zeros;
  c.N = w.N;
  c.K = w.K;
  c.Np = w.Np;
  c.G = w.G;
  c.group_bytes = w.group_bytes;
  c.block_bytes = w.block_bytes;
  c.data.resize(w.data.size());
  std::memcpy(c.data.data(), w.data.data(), w.data.size());
  return c;
}

void bench_decode() {
  const std::vector<WoqVariant> variants = {
      {"int4_g32", WFormat::kInt4, 32, false},      {"int4_g128", WFormat::kInt4, 128, false},
      {"int8_perchannel", WFormat::kInt8, 0, false}, {"int8_g32", WFormat::kInt8, 32, false},
      {"sp24_int4_g32", WFormat::kInt4, 32, true},   {"sp24_int4_g64", WFormat::kInt4, 64, true},
      {"sp24_int4_g128", WFormat::kInt4, 128, true},
      {"sp24_int8_perchannel", WFormat::kInt8, 0, true},
  };
  std::mt19937 rng(2);
  // Stream-read references: a buffer as large as the largest matrix (hot) and 1 GiB (cold, rotating).
  AlignedBuffer<char> hot_buf, cold_buf;
  hot_buf.resize(size_t(64) << 20);
  cold_buf.resize(opt.quick ? (size_t(256) << 20) : (size_t(1) << 30));
  std::memset(hot_buf.data(), 1, hot_buf.size());
  std::memset(cold_buf.data(), 1, cold_buf.size());
  for (const LinShape& s : kShapes) {
    std::vector<float> x(s.K);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& v : x) v = nd(rng);
    std::vector<float> y(s.N);
    for (const WoqVariant& v : variants) {
      const bool run_hot = selected("gemv_hot." + v.name + "." + s.name);
      const bool run_cold = selected("gemv_cold." + v.name + "." + s.name);
      if (!run_hot && !run_cold) continue;
      WoqWeights w = make_woq_weights(v, s.N, s.K, rng);
      const double bytes = double(woq_bytes(w)) + double(s.K) * 4;  // weights + fp32 activations
      // Cold set: copies totalling >= 1 GiB (fewer with --quick).
      const size_t target = opt.quick ? (size_t(256) << 20) : (size_t(1) << 30);
      const size_t ncopies = run_cold ? std::max<size_t>(2, target / woq_bytes(w)) : 0;
      std::vector<WoqWeights> copies;
      copies.reserve(ncopies);
      for (size_t i = 0; i < ncopies; ++i) copies.push_back(clone(w));
      std::string shape = "N" + std::to_string(s.N) + " K" + std::to_string(s.K);
      for (int nt : opt.threads) {
        ThreadPool pool(nt);
        WoqAct a;
        if (run_hot) {
        // Hot: the same matrix every call, next to a stream read of a buffer of the same size.
        Timing hot = measure([&] { (void)woq_linear(x.data(), 1, s.K, w, nullptr, y.data(), s.N, &a, &pool); },
                             stream_ref(pool, hot_buf, size_t(bytes), false));
        double gbs = bytes / hot.median_s / 1e9;
        emit({"decode", "gemv_hot." + v.name + "." + s.name, shape, nt, hot,
              {{"GB/s", gbs}, {"pct_of_29GBs", 100 * gbs / 29.0},
               {"pct_of_stream_same_size_interleaved", 100 * hot.ref_ratio},
               {"MB_read", bytes / 1e6}}});
        }
        if (!run_cold) continue;
        size_t idx = 0;
        Timing cold = measure(
            [&] {
              (void)woq_linear(x.data(), 1, s.K, copies[idx], nullptr, y.data(), s.N, &a, &pool);
              idx = (idx + 1) % copies.size();
            },
            stream_ref(pool, cold_buf, size_t(bytes), true));
        double gbs = bytes / cold.median_s / 1e9;
        emit({"decode", "gemv_cold." + v.name + "." + s.name, shape, nt, cold,
              {{"GB/s", gbs}, {"pct_of_DRAM_stream_interleaved", 100 * cold.ref_ratio},
               {"MB_read", bytes / 1e6}}});
      }
    }
  }
  // Sparse speedups vs dense at the same shape, group and mode.
  for (const auto& r : g_records) {
    if (r.section != "decode" || r.name.find("sp24_") == std::string::npos) continue;
    std::string dense = r.name;
    dense.erase(dense.find("sp24_"), 5);
    for (const auto& d : g_records)
      if (d.name == dense && d.threads == r.threads) {
        Record sp{"decode", "speedup_sparse_vs_dense." + r.name, r.shape, r.threads, r.t,
                  {{"speedup", d.t.median_s / r.t.median_s},
                   {"byte_ratio", d.metrics.at("MB_read") / r.metrics.at("MB_read")}}};
        emit(sp);
      }
  }
}

// ---------------------------------------------------------------------------------------------------
// fp32 GEMM
// ---------------------------------------------------------------------------------------------------
void bench_f32() {
  struct S {
    const char* name;
    int64_t M, K, N;
  };
  const S shapes[] = {{"vit_qkv(576x1024->3072)", 576, 1024, 3072},
                      {"vit_mlp(576x1024->4096)", 576, 1024, 4096},
                      {"llm_qkv(128x2048->6144)", 128, 2048, 6144},
                      {"llm_down(256x5504->2048)", 256, 5504, 2048}};
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (const S& s : shapes) {
    if (!selected(std::string("f32_gemm.") + s.name)) continue;
    std::vector<float> W(s.N * s.K), x(s.M * s.K), y(s.M * s.N);
    for (auto& v : W) v = nd(rng);
    for (auto& v : x) v = nd(rng);
    F32Weights w;
    if (f32_pack(W.data(), s.K, s.N, s.K, &w) != Status::kOk) std::abort();
    for (int nt : opt.threads) {
      ThreadPool pool(nt);
      Timing t = measure([&] { (void)f32_gemm(x.data(), s.M, s.K, w, nullptr, y.data(), s.N, false, &pool); },
                         fp32_ref(pool));
      const double flops = 2.0 * s.M * s.N * s.K;
      double gf = flops / t.median_s / 1e9;
      emit({"f32", std::string("f32_gemm.") + s.name, "", nt, t,
            {{"GFLOP/s", gf}, {"pct_peak", 100 * gf / peak("fp32", nt)},
             {"pct_peak_interleaved", 100 * flops / fp32_ref_flops(nt) * t.ref_ratio}}});
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------------
void bench_attention() {
  struct S {
    const char* name;
    int64_t n_q, q_pos0, H, Hkv, D;
    bool causal;
  };
  const S shapes[] = {{"chunk256@768(16x128)", 256, 768, 16, 16, 128, true},
                      {"chunk128@1920(16x128)", 128, 1920, 16, 16, 128, true},
                      {"decode@1024(16x128)", 1, 1023, 16, 16, 128, true},
                      {"decode@4096(16x128)", 1, 4095, 16, 16, 128, true},
                      {"decode@2048(GQA32/8x128)", 1, 2047, 32, 8, 128, true},
                      {"vit576(16x64)", 576, 0, 16, 16, 64, false}};
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (const S& s : shapes) {
    if (!selected(std::string("attention.") + s.name)) continue;
    const int64_t n_kv = s.causal ? s.q_pos0 + s.n_q : s.n_q, D = s.D;
    std::vector<float> q(s.n_q * s.H * D), k(s.Hkv * n_kv * D), v(s.Hkv * n_kv * D), o(s.n_q * s.H * D);
    for (auto& x : q) x = nd(rng);
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    AttentionArgs a;
    a.q = q.data();
    a.q_ld = s.H * D;
    a.k = k.data();
    a.k_ld = D;
    a.k_head_stride = n_kv * D;
    a.v = v.data();
    a.v_ld = D;
    a.v_head_stride = n_kv * D;
    a.out = o.data();
    a.out_ld = s.H * D;
    a.n_q = s.n_q;
    a.n_kv = n_kv;
    a.q_pos0 = s.q_pos0;
    a.n_heads = s.H;
    a.n_kv_heads = s.Hkv;
    a.head_dim = D;
    a.causal = s.causal;
    a.scale = 1.0f / std::sqrt(float(D));
    double pairs = 0;
    for (int64_t i = 0; i < s.n_q; ++i) pairs += s.causal ? double(std::min(n_kv, s.q_pos0 + i + 1)) : double(n_kv);
    const double flops = 4.0 * pairs * s.H * D;
    const double kv_bytes = 2.0 * s.Hkv * n_kv * D * 4;
    // fp32, and bf16 where the CPU has AVX512-BF16 (AMX tiles or vdpbf16ps) (AttentionArgs::allow_bf16; decode stays fp32)
    for (bool bf16 : {false, true}) {
      if (bf16 && !attention_bf16_available()) continue;
      a.allow_bf16 = bf16;
      for (int nt : opt.threads) {
        ThreadPool pool(nt);
        Timing t = measure([&] { (void)attention(a, &pool); });
        emit({"attention", std::string("attention.") + s.name, bf16 ? "bf16" : "fp32", nt, t,
              {{"GFLOP/s", flops / t.median_s / 1e9}, {"pct_fp32_peak", 100 * flops / t.median_s / 1e9 / peak("fp32", nt)},
               {"KV_GB/s", kv_bytes / t.median_s / 1e9}}});
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------------
void bench_elementwise() {
  const int64_t rows = 512, dim = 2048, inter = 5504;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(rows * dim), w(dim), y(rows * dim), gu(rows * 2 * inter), act(rows * inter);
  for (auto& v : x) v = nd(rng);
  for (auto& v : w) v = nd(rng);
  for (auto& v : gu) v = nd(rng);
  RopeTable rt;
  (void)rope_init(4096, 128, 1e6f, &rt);
  std::vector<int32_t> pos(rows);
  for (int64_t i = 0; i < rows; ++i) pos[i] = int32_t(i);
  for (int nt : opt.threads) {
    ThreadPool pool(nt);
    auto rec = [&](const char* name, double bytes, const std::function<void()>& fn) {
      if (!selected(std::string("elementwise.") + name)) return;
      Timing t = measure(fn);
      emit({"elementwise", std::string("elementwise.") + name, "512 rows", nt, t, {{"GB/s", bytes / t.median_s / 1e9}}});
    };
    rec("rmsnorm(2048)", 2.0 * rows * dim * 4, [&] { (void)rmsnorm(x.data(), dim, w.data(), y.data(), dim, rows, dim, 1e-6f, &pool); });
    rec("layernorm(2048)", 2.0 * rows * dim * 4,
        [&] { (void)layernorm(x.data(), dim, w.data(), w.data(), y.data(), dim, rows, dim, 1e-6f, &pool); });
    rec("rope(16x128)", 2.0 * rows * dim * 4, [&] { (void)rope_apply(y.data(), dim, rows, 16, 128, pos.data(), rt, &pool); });
    rec("swiglu(5504)", 3.0 * rows * inter * 4,
        [&] { (void)swiglu(gu.data(), 2 * inter, gu.data() + inter, 2 * inter, act.data(), inter, rows, inter, &pool); });
    rec("silu", 2.0 * rows * dim * 4, [&] { (void)silu(x.data(), y.data(), rows * dim, &pool); });
    rec("gelu_erf", 2.0 * rows * dim * 4, [&] { (void)gelu_erf(x.data(), y.data(), rows * dim, &pool); });
    rec("gelu_tanh", 2.0 * rows * dim * 4, [&] { (void)gelu_tanh(x.data(), y.data(), rows * dim, &pool); });
    rec("softmax(2048)", 2.0 * rows * dim * 4, [&] {
      std::memcpy(y.data(), x.data(), x.size() * 4);
      (void)softmax(y.data(), dim, rows, dim, &pool);
    });
  }
}

void print_json() {
  std::printf("{\n  \"isa\": \"%s\",\n  \"peaks\": {", isa_name(active_isa()));
  bool first = true;
  for (const auto& p : g_peak) {
    std::printf("%s\n    \"%s\": %.4g", first ? "" : ",", p.first.c_str(), p.second);
    first = false;
  }
  std::printf("\n  },\n  \"results\": [");
  for (size_t i = 0; i < g_records.size(); ++i) {
    const Record& r = g_records[i];
    std::printf("%s\n    {\"section\": \"%s\", \"name\": \"%s\", \"shape\": \"%s\", \"threads\": %d, "
                "\"median_ms\": %.5g, \"min_ms\": %.5g, \"max_ms\": %.5g",
                i ? "," : "", r.section.c_str(), r.name.c_str(), r.shape.c_str(), r.threads, r.t.median_s * 1e3,
                r.t.min_s * 1e3, r.t.max_s * 1e3);
    for (const auto& m : r.metrics) std::printf(", \"%s\": %.5g", m.first.c_str(), m.second);
    std::printf("}");
  }
  std::printf("\n  ]\n}\n");
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value for %s\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      std::printf("usage: %s [--json] [--quick] [--threads 1,2] [--reps N] [--min-ms X] [--filter S] [--isa NAME]\n"
                  "  --filter S   run only kernels whose name contains S (e.g. w8a8_gemm.qkv, gemv_hot.int4_g32)\n"
                  "  --quick      fewer shapes/copies (smoke run)\n",
                  argv[0]);
      return 0;
    }
    if (a == "--json") opt.json = true;
    else if (a == "--quick") opt.quick = true;
    else if (a == "--reps") opt.reps = std::atoi(next().c_str());
    else if (a == "--min-ms") opt.min_ms = std::atof(next().c_str());
    else if (a == "--filter") opt.filter = next();
    else if (a == "--threads") {
      opt.threads.clear();
      std::string v = next();
      for (size_t p = 0; p < v.size();) {
        size_t c = v.find(',', p);
        opt.threads.push_back(std::atoi(v.substr(p, c - p).c_str()));
        p = c == std::string::npos ? v.size() : c + 1;
      }
    } else if (a == "--isa") {
      std::string v = next();
      bool ok = false;
      for (Isa isa : available_isas())
        if (v == isa_name(isa)) ok = set_isa(isa) == Status::kOk;
      if (!ok) {
        std::fprintf(stderr, "ISA %s not available\n", v.c_str());
        return 2;
      }
    } else {
      std::fprintf(stderr,
                   "usage: %s [--json] [--quick] [--threads 1,2] [--reps N] [--min-ms X] [--filter S] [--isa NAME]\n",
                   argv[0]);
      return 2;
    }
  }
  if (!opt.json) std::printf("edgemm_kernel_bench: ISA %s, hardware threads %u\n", isa_name(active_isa()),
                             std::thread::hardware_concurrency());
  bench_peaks();
  bench_w8a8();
  bench_decode();
  bench_f32();
  bench_attention();
  bench_elementwise();
  if (opt.json) print_json();
  return 0;
}
