// Kernel tests: every ISA available on this machine against the scalar references (kernels.h ref::).
// Usage: test_kernels [group ...]   (no argument = all groups)
#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <set>

#include "test_util.h"

using namespace edgemm;
using namespace edgemm::kernels;
using etest::Rng;

namespace {

ThreadPool& pool2() {
  static ThreadPool p(2);
  return p;
}

// ---------------------------------------------------------------------------------------------------
// Thread pool
// ---------------------------------------------------------------------------------------------------
void test_thread_pool() {
  etest::context() = "threadpool";
  for (int nt : {1, 2, 3, 5}) {
    ThreadPool pool(nt, nt == 3 ? 0 : -1);
    CHECK(pool.size() == nt);
    for (int64_t n : {0, 1, 7, 64, 1000, 4097}) {
      for (int64_t grain : {1, 3, 16}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        for (auto& h : hits) h = 0;
        bool ok = true;
        parallel_for(&pool, n, grain, [&](int64_t b, int64_t e, int tid) {
          if (tid < 0 || tid >= nt || b >= e || (b % grain) != 0) ok = false;
          for (int64_t i = b; i < e; ++i) hits[i]++;
        });
        CHECK(ok);
        for (int64_t i = 0; i < n; ++i) CHECK(hits[i] == 1);
      }
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      for (auto& h : hits) h = 0;
      parallel_for_dynamic(&pool, n, [&](int64_t i, int) { hits[i]++; });
      for (int64_t i = 0; i < n; ++i) CHECK(hits[i] == 1);
    }
    // Nested calls run inline.
    std::atomic<int64_t> total{0};
    parallel_for(&pool, 8, 1, [&](int64_t b, int64_t e, int) {
      for (int64_t i = b; i < e; ++i)
        parallel_for(&pool, 10, 1, [&](int64_t b2, int64_t e2, int) { total += e2 - b2; });
    });
    CHECK(total == 80);
    // Many small back-to-back jobs (decode pattern).
    std::atomic<int64_t> cnt{0};
    for (int it = 0; it < 2000; ++it)
      parallel_for(&pool, 2, 1, [&](int64_t b, int64_t e, int) { cnt += e - b; });
    CHECK(cnt == 4000);
  }
  parallel_for(nullptr, 5, 1, [&](int64_t b, int64_t e, int tid) { CHECK(b == 0 && e == 5 && tid == 0); });
}

// ---------------------------------------------------------------------------------------------------
// fp16
// ---------------------------------------------------------------------------------------------------
void test_fp16() {
  etest::context() = "fp16";
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = fp16_to_fp32(uint16_t(h));
    if (std::isnan(f)) continue;
    CHECK(fp32_to_fp16(f) == h);
  }
  CHECK(fp16_to_fp32(0x3c00) == 1.0f);
  CHECK(fp16_to_fp32(0xc000) == -2.0f);
  CHECK(fp16_to_fp32(0x0001) == std::ldexp(1.0f, -24));
  CHECK(fp32_to_fp16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);  // tie -> even
  CHECK(fp32_to_fp16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);
  CHECK(fp32_to_fp16(70000.0f) == 0x7c00);
}

// ---------------------------------------------------------------------------------------------------
// W8A8
// ---------------------------------------------------------------------------------------------------
struct W8A8Case {
  int64_t M, K, N;
};

std::vector<int8_t> random_qweight(Rng& rng, int64_t N, int64_t K) {
  std::vector<int8_t> q(N * K);
  for (auto& v : q) v = static_cast<int8_t>(rng.integer(-127, 127));
  return q;
}

void test_w8a8() {
  const W8A8Case cases[] = {{1, 16, 16},   {7, 37, 17},    {8, 64, 48},   {13, 100, 50},
                            {16, 128, 96}, {33, 256, 112}, {64, 2048, 64}, {130, 96, 300}};
  etest::for_each_isa([&](Isa isa) {
    Rng rng(1234);
    for (const auto& c : cases) {
      for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &pool2()}) {
        const float s_a = 0.05f;
        std::vector<float> x = rng.normals(c.M * c.K, 1.0f);  // int8 range is +-6.4 sd: no clipping
        // Exact ties for the rounding rule.
        x[0] = 2.5f * s_a;
        if (c.K > 1) x[1] = -3.5f * s_a;
        std::vector<int8_t> qw = random_qweight(rng, c.N, c.K);
        std::vector<float> ws(c.N), bias(c.N);
        for (auto& v : ws) v = rng.uniform(0.001f, 0.02f);
        for (auto& v : bias) v = rng.normal();
        W8A8Weights w;
        CHECK_OK(w8a8_pack(qw.data(), c.K, ws.data(), c.N, c.K, nullptr, 0, &w, pool));
        W8A8Act a;
        CHECK_OK(w8a8_quantize(x.data(), c.M, c.K, c.K, s_a, &a, pool));
        // Codes and row sums exactly.
        bool codes_ok = true;
        for (int64_t m = 0; m < c.M; ++m) {
          int32_t s = 0;
          for (int64_t k = 0; k < c.K; ++k) {
            int8_t want = ref::w8a8_code(x[m * c.K + k], s_a, nullptr);
            codes_ok &= w8a8_act_code(a, m, k) == want;
            s += want;
          }
          codes_ok &= a.row_sum[m] == s;
        }
        CHECK(codes_ok);
        CHECK(a.outliers.empty());
        std::vector<float> y(c.M * c.N), yr(c.M * c.N);
        CHECK_OK(w8a8_gemm(a, w, bias.data(), y.data(), c.N, false, pool));
        ref::w8a8_linear(x.data(), c.M, c.K, s_a, qw.data(), ws.data(), bias.data(), c.N, false, yr.data());
        CHECK_CLOSE(y.data(), yr.data(), y.size(), 1e-4, 2e-6);
        // accumulate + strided output
        std::vector<float> y2(c.M * (c.N + 3), 1.0f);
        CHECK_OK(w8a8_gemm(a, w, nullptr, y2.data(), c.N + 3, true, pool));
        bool acc_ok = true;
        for (int64_t m = 0; m < c.M; ++m) {
          for (int64_t n = 0; n < c.N; ++n) {
            float want = 1.0f + (yr[m * c.N + n] - bias[n]);
            acc_ok &= std::fabs(y2[m * (c.N + 3) + n] - want) <= 1e-4f + 1e-5f * std::fabs(want);
          }
          for (int64_t n = c.N; n < c.N + 3; ++n) acc_ok &= y2[m * (c.N + 3) + n] == 1.0f;
        }
        CHECK(acc_ok);
      }
    }
    (void)isa;
  });
}

// The AMX table claims bit-identical W8A8 results to the AVX-512 VNNI one (kernels.h, x86_amx.cpp):
// compare whole linear outputs (GEMM + shadow outliers, bias, accumulate) byte for byte.
void test_w8a8_amx_bits() {
  const auto isas = available_isas();
  const bool have = std::find(isas.begin(), isas.end(), Isa::kAvx512Amx) != isas.end() &&
                    std::find(isas.begin(), isas.end(), Isa::kAvx512Vnni) != isas.end();
  if (!have) {
    std::printf("amx_bits: not run: this machine has no AMX-INT8 (or the OS withholds the tile state)\n");
    return;
  }
  const W8A8Case cases[] = {{1, 16, 16},   {7, 37, 17},     {16, 64, 48},  {17, 100, 50},  {31, 128, 96},
                            {33, 260, 112}, {64, 2048, 64}, {130, 96, 300}, {40, 704, 256}};
  Rng rng(99);
  for (const auto& c : cases) {
    const float s_a = 0.03f;
    std::vector<float> x = rng.normals(c.M * c.K, 1.0f);
    for (int64_t m = 0; m < c.M; m += 3) x[m * c.K + (m % c.K)] = 40.0f;  // clipped -> shadow outliers
    std::vector<int8_t> qw = random_qweight(rng, c.N, c.K);
    std::vector<float> ws(c.N), bias(c.N);
    for (auto& v : ws) v = rng.uniform(0.001f, 0.02f);
    for (auto& v : bias) v = rng.normal();
    std::vector<std::vector<float>> out;
    for (Isa isa : {Isa::kAvx512Vnni, Isa::kAvx512Amx}) {
      CHECK(set_isa(isa) == Status::kOk);
      for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &pool2()}) {
        W8A8Weights w;
        CHECK_OK(w8a8_pack(qw.data(), c.K, ws.data(), c.N, c.K, nullptr, 0, &w, pool));
        W8A8Act a;
        CHECK_OK(w8a8_quantize(x.data(), c.M, c.K, c.K, s_a, &a, pool));
        CHECK(!a.outliers.empty());
        std::vector<float> y(c.M * (c.N + 5), 0.5f);
        CHECK_OK(w8a8_linear(a, w, bias.data(), y.data(), c.N + 5, false, pool));
        CHECK_OK(w8a8_linear(a, w, nullptr, y.data(), c.N + 5, true, pool));
        out.push_back(y);
      }
    }
    for (size_t i = 1; i < out.size(); ++i)
      CHECK(std::memcmp(out[0].data(), out[i].data(), out[0].size() * sizeof(float)) == 0);
  }
  set_isa(best_isa());
}

// Shadow outliers: inject values far beyond the int8 range of s_a.
void test_w8a8_shadow() {
  etest::for_each_isa([&](Isa) {
    Rng rng(77);
    const int64_t M = 21, K = 260, N = 70;
    const float s_a = 0.02f;  // int8 range +-2.56
    std::vector<float> x = rng.normals(M * K, 0.5f);
    std::vector<int32_t> hot = {3, 100, 259};
    // Channel outliers (hot channels) and scattered ones (cold channels).
    for (int64_t m = 0; m < M; ++m) {
      x[m * K + 3] = rng.uniform(30.0f, 80.0f) * (m % 2 ? 1 : -1);
      if (m % 3 == 0) x[m * K + 100] = -60.0f;
      if (m % 4 == 1) x[m * K + 259] = 9.0f;
    }
    x[5 * K + 17] = 123.0f;   // cold
    x[20 * K + 200] = -7.5f;  // cold
    x[0 * K + 1] = 127.5f * s_a;   // rounds to 128 (even) -> clips by 0.5 step
    x[0 * K + 2] = -128.5f * s_a;  // rounds to -128 (even) -> no clip
    std::vector<int8_t> qw = random_qweight(rng, N, K);
    std::vector<float> ws(N);
    for (auto& v : ws) v = rng.uniform(0.001f, 0.01f);
    W8A8Weights w_cold, w_hot;
    CHECK_OK(w8a8_pack(qw.data(), K, ws.data(), N, K, nullptr, 0, &w_cold));
    CHECK_OK(w8a8_pack(qw.data(), K, ws.data(), N, K, hot.data(), int64_t(hot.size()), &w_hot));
    W8A8Act a;
    CHECK_OK(w8a8_quantize(x.data(), M, K, K, s_a, &a, &pool2()));
    // Outlier list = exactly the clipped elements, sorted, with exact residuals.
    std::vector<Outlier> want;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        bool clipped;
        int8_t code = ref::w8a8_code(x[m * K + k], s_a, &clipped);
        if (clipped) want.push_back({int32_t(m), int32_t(k), x[m * K + k] - float(code) * s_a});
      }
    CHECK(a.outliers.size() == want.size());
    bool list_ok = a.outliers.size() == want.size();
    for (size_t i = 0; list_ok && i < want.size(); ++i)
      list_ok = a.outliers[i].m == want[i].m && a.outliers[i].k == want[i].k &&
                a.outliers[i].residual == want[i].residual;
    CHECK(list_ok);
    CHECK(want.size() > 30);

    std::vector<float> plain(M * N), sh_cold(M * N), sh_hot(M * N), ref_sh(M * N), truth(M * N);
    CHECK_OK(w8a8_gemm(a, w_cold, nullptr, plain.data(), N, false, &pool2()));
    sh_cold = plain;
    CHECK_OK(w8a8_shadow(a, w_cold, sh_cold.data(), N, &pool2()));
    CHECK_OK(w8a8_gemm(a, w_hot, nullptr, sh_hot.data(), N, false, nullptr));
    CHECK_OK(w8a8_shadow(a, w_hot, sh_hot.data(), N, nullptr));
    ref::w8a8_linear(x.data(), M, K, s_a, qw.data(), ws.data(), nullptr, N, true, ref_sh.data());
    CHECK_CLOSE(sh_cold.data(), ref_sh.data(), sh_cold.size(), 1e-4, 1e-5);
    // Fused (CPU-only) path: bit-identical to GEMM + separate shadow, with and without accumulate/bias.
    {
      std::vector<float> bias = rng.normals(N), y1(M * N, 0.5f), y2(M * N, 0.5f);
      CHECK_OK(w8a8_gemm(a, w_hot, bias.data(), y1.data(), N, true, &pool2()));
      CHECK_OK(w8a8_shadow(a, w_hot, y1.data(), N, &pool2()));
      CHECK_OK(w8a8_linear(a, w_hot, bias.data(), y2.data(), N, true, &pool2()));
      CHECK(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)) == 0);
      CHECK_OK(w8a8_linear(a, w_cold, nullptr, y2.data(), N, false, nullptr));
      CHECK(std::memcmp(sh_cold.data(), y2.data(), y2.size() * sizeof(float)) == 0);
    }
    CHECK_CLOSE(sh_hot.data(), ref_sh.data(), sh_hot.size(), 1e-4, 1e-5);
    // Against the float product with the dequantized weights: the only error left is the rounding of
    // in-range activations, |x - code*s_a| <= s_a/2, so |err| <= s_a/2 * sum_k |W[n,k]| (+ fp slack).
    double worst_shadow = 0, min_plain_rowmax = INFINITY;
    for (int64_t m = 0; m < M; ++m) {
      double plain_rowmax = 0;
      for (int64_t n = 0; n < N; ++n) {
        double t = 0, wabs = 0;
        for (int64_t k = 0; k < K; ++k) {
          double wd = double(qw[n * K + k]) * ws[n];
          t += double(x[m * K + k]) * wd;
          wabs += std::fabs(wd);
        }
        double bound = 0.5 * s_a * wabs + 1e-4;
        worst_shadow = std::max(worst_shadow, std::fabs(sh_cold[m * N + n] - t) / bound);
        plain_rowmax = std::max(plain_rowmax, std::fabs(plain[m * N + n] - t) / bound);
      }
      min_plain_rowmax = std::min(min_plain_rowmax, plain_rowmax);
    }
    CHECK(worst_shadow <= 1.0);       // shadow: within the rounding bound everywhere
    CHECK(min_plain_rowmax > 5.0);    // plain W8A8 clips: every row (all have outliers) far off
  });
}

// ---------------------------------------------------------------------------------------------------
// Weight-only int4 / int8, dense and 2:4
// ---------------------------------------------------------------------------------------------------
struct WoqData {
  int64_t N, K, G;
  std::vector<uint8_t> q4;   // [N, K/2]
  std::vector<int8_t> q8;    // [N, K]
  std::vector<uint16_t> sc;  // [N, K/G]
  std::vector<uint8_t> z4;
  std::vector<int8_t> z8;
};

// sparse: enforce 2:4 (zero = zero point) with some groups having 0 or 1 nonzeros.
WoqData make_woq(Rng& rng, int64_t N, int64_t K, int64_t G, bool sparse) {
  WoqData d{N, K, G, {}, {}, {}, {}, {}};
  const int64_t ng = K / G;
  d.sc.resize(N * ng);
  d.z4.resize(N * ng);
  d.z8.resize(N * ng);
  for (int64_t i = 0; i < N * ng; ++i) {
    d.sc[i] = fp32_to_fp16(rng.uniform(0.002f, 0.05f));
    d.z4[i] = uint8_t(rng.integer(0, 15));
    d.z8[i] = int8_t(rng.integer(-20, 20));
  }
  std::vector<int> c4(N * K), c8(N * K);
  for (int64_t i = 0; i < N * K; ++i) {
    c4[i] = int(rng.integer(0, 15));
    c8[i] = int(rng.integer(-127, 127));
  }
  if (sparse) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k0 = 0; k0 < K; k0 += 4) {
        int keep = int(rng.integer(0, 2));  // 0, 1 or 2 nonzeros
        int p0 = int(rng.integer(0, 3)), p1 = (p0 + 1 + int(rng.integer(0, 2))) % 4;
        for (int j = 0; j < 4; ++j) {
          bool kept = (keep >= 1 && j == p0) || (keep == 2 && j == p1);
          if (!kept) {
            c4[n * K + k0 + j] = -1;  // marker: zero
            c8[n * K + k0 + j] = -1000;
          }
        }
      }
  }
  d.q4.assign(N * K / 2, 0);
  d.q8.resize(N * K);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      int64_t g = k / G;
      int v4 = c4[n * K + k], v8 = c8[n * K + k];
      // The zero code depends on sym/asym: store the marker resolution in both variants later.
      d.q4[n * K / 2 + k / 2] |= uint8_t((v4 < 0 ? 0xF0 : v4) & 15) << (4 * (k & 1));
      d.q8[n * K + k] = int8_t(v8 == -1000 ? 0 : v8);
      (void)g;
    }
  if (sparse) {
    // Re-resolve zeros: symmetric zero = 8 (int4) / 0 (int8); asymmetric handled by make_asym_sparse.
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        if (c4[n * K + k] < 0) {
          uint8_t& b = d.q4[n * K / 2 + k / 2];
          b = uint8_t((b & ~(15 << (4 * (k & 1)))) | (8 << (4 * (k & 1))));
        }
    d.z4.clear();  // sparse asym variant built separately
    d.z8.clear();
    // Keep the zero masks to build the asym variants.
    std::vector<int8_t> mask(N * K);
    for (int64_t i = 0; i < N * K; ++i) mask[i] = c4[i] < 0;
    d.z8.assign(mask.begin(), mask.end());  // reuse storage: 1 = pruned
  }
  return d;
}

// Asymmetric 2:4 variant: zero points random, pruned weights hold their zero point.
void make_asym_sparse(Rng& rng, WoqData& d, std::vector<uint8_t>& q4, std::vector<uint8_t>& z4,
                      std::vector<int8_t>& q8, std::vector<int8_t>& z8) {
  const int64_t N = d.N, K = d.K, G = d.G, ng = K / G;
  z4.resize(N * ng);
  z8.resize(N * ng);
  for (int64_t i = 0; i < N * ng; ++i) {
    z4[i] = uint8_t(rng.integer(0, 15));
    z8[i] = int8_t(rng.integer(-20, 20));
  }
  q4.assign(N * K / 2, 0);
  q8.resize(N * K);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      bool pruned = d.z8[n * K + k] != 0;
      int v4 = pruned ? z4[n * ng + k / G] : int(rng.integer(0, 15));
      int v8 = pruned ? z8[n * ng + k / G] : int(rng.integer(-127, 127));
      q4[n * K / 2 + k / 2] |= uint8_t(v4 << (4 * (k & 1)));
      q8[n * K + k] = int8_t(v8);
    }
}

void run_woq(const WoqWeights& w, const std::vector<float>& x, int64_t M, const float* bias,
             std::vector<float>& y, ThreadPool* pool) {
  WoqAct a;
  y.assign(M * w.N, 0.0f);
  CHECK_OK(woq_linear(x.data(), M, w.K, w, bias, y.data(), w.N, &a, pool));
}

void test_woq_dense() {
  struct C {
    int64_t N, K, G;
  };
  const C cases[] = {{16, 128, 32}, {40, 256, 64}, {33, 384, 128}, {48, 512, 256}, {20, 160, 160}};
  etest::for_each_isa([&](Isa) {
    Rng rng(99);
    for (const C& c : cases) {
      WoqData d = make_woq(rng, c.N, c.K, c.G, false);
      std::vector<float> bias = rng.normals(c.N);
      for (int64_t M : {1, 2, 3, 5}) {
        std::vector<float> x = rng.normals(M * c.K);
        x[0] = 0.0f;
        for (bool asym : {false, true}) {
          std::vector<float> y, yr(M * c.N);
          WoqWeights w;
          const uint8_t* z4 = asym ? d.z4.data() : nullptr;
          CHECK_OK(woq_pack_int4(d.q4.data(), d.sc.data(), z4, c.N, c.K, c.G, &w, M == 2 ? &pool2() : nullptr));
          run_woq(w, x, M, bias.data(), y, M % 2 ? &pool2() : nullptr);
          ref::woq_int4_linear(x.data(), M, c.K, d.q4.data(), d.sc.data(), z4, c.G, bias.data(), c.N, yr.data());
          CHECK_CLOSE(y.data(), yr.data(), y.size(), 1e-4, 1e-5);
          // Against the float product with dequantized weights: activation quantization error only.
          std::vector<float> wd(c.N * c.K), yf(M * c.N);
          for (int64_t n = 0; n < c.N; ++n)
            for (int64_t k = 0; k < c.K; ++k) {
              int u = (d.q4[n * c.K / 2 + k / 2] >> (4 * (k & 1))) & 15;
              int z = asym ? d.z4[n * (c.K / c.G) + k / c.G] : 8;
              wd[n * c.K + k] = float(u - z) * fp16_to_fp32(d.sc[n * (c.K / c.G) + k / c.G]);
            }
          ref::f32_linear(x.data(), M, c.K, wd.data(), bias.data(), c.N, yf.data());
          double scale = etest::max_abs(yf.data(), yf.size());
          CHECK_CLOSE(y.data(), yf.data(), y.size(), 0.02 * scale, 0.0);

          WoqWeights w8;
          const int8_t* z8 = asym ? d.z8.data() : nullptr;
          CHECK_OK(woq_pack_int8(d.q8.data(), d.sc.data(), z8, c.N, c.K, c.G, &w8, M == 3 ? &pool2() : nullptr));
          run_woq(w8, x, M, bias.data(), y, M % 2 ? nullptr : &pool2());
          ref::woq_int8_linear(x.data(), M, c.K, d.q8.data(), d.sc.data(), z8, c.G, bias.data(), c.N, yr.data());
          CHECK_CLOSE(y.data(), yr.data(), y.size(), 1e-4, 1e-5);
        }
      }
    }
  });
}

void test_woq_sparse() {
  struct C {
    int64_t N, K, G;
  };
  const C cases[] = {{16, 128, 32}, {40, 256, 64}, {35, 384, 128}, {32, 256, 256}};
  etest::for_each_isa([&](Isa) {
    Rng rng(5);
    for (const C& c : cases) {
      WoqData d = make_woq(rng, c.N, c.K, c.G, true);
      std::vector<uint8_t> q4a, z4a;
      std::vector<int8_t> q8a, z8a;
      make_asym_sparse(rng, d, q4a, z4a, q8a, z8a);
      std::vector<float> bias = rng.normals(c.N);
      for (int64_t M : {1, 2, 3}) {
        std::vector<float> x = rng.normals(M * c.K);
        for (bool asym : {false, true}) {
          const uint8_t* q4 = asym ? q4a.data() : d.q4.data();
          const uint8_t* z4 = asym ? z4a.data() : nullptr;
          const int8_t* q8 = asym ? q8a.data() : d.q8.data();
          const int8_t* z8 = asym ? z8a.data() : nullptr;
          std::vector<float> ys, yd, yr(M * c.N);
          WoqWeights ws, wd;
          CHECK_OK(woq_pack_int4_sparse24(q4, d.sc.data(), z4, c.N, c.K, c.G, &ws, &pool2()));
          CHECK_OK(woq_pack_int4(q4, d.sc.data(), z4, c.N, c.K, c.G, &wd));
          CHECK(woq_bytes(ws) < woq_bytes(wd));
          run_woq(ws, x, M, bias.data(), ys, &pool2());
          run_woq(wd, x, M, bias.data(), yd, nullptr);
          ref::woq_int4_linear(x.data(), M, c.K, q4, d.sc.data(), z4, c.G, bias.data(), c.N, yr.data());
          CHECK_CLOSE(ys.data(), yr.data(), ys.size(), 1e-4, 1e-5);
          CHECK_CLOSE(ys.data(), yd.data(), ys.size(), 1e-4, 1e-5);

          WoqWeights ws8;
          CHECK_OK(woq_pack_int8_sparse24(q8, d.sc.data(), z8, c.N, c.K, c.G, &ws8));
          run_woq(ws8, x, M, bias.data(), ys, M == 1 ? nullptr : &pool2());
          ref::woq_int8_linear(x.data(), M, c.K, q8, d.sc.data(), z8, c.G, bias.data(), c.N, yr.data());
          CHECK_CLOSE(ys.data(), yr.data(), ys.size(), 1e-4, 1e-5);
        }
        // One activation object reused: the gather tables of the first input must not survive the
        // second quantization.
        WoqWeights wsr;
        CHECK_OK(woq_pack_int4_sparse24(d.q4.data(), d.sc.data(), nullptr, c.N, c.K, c.G, &wsr));
        std::vector<float> x2 = rng.normals(M * c.K), y1(M * c.N), y2(M * c.N), yf;
        WoqAct reused;
        CHECK_OK(woq_linear(x.data(), M, c.K, wsr, nullptr, y1.data(), c.N, &reused, nullptr));
        CHECK_OK(woq_linear(x2.data(), M, c.K, wsr, nullptr, y2.data(), c.N, &reused, nullptr));
        run_woq(wsr, x2, M, nullptr, yf, nullptr);
        CHECK_CLOSE(y2.data(), yf.data(), y2.size(), 1e-6, 0.0);
      }
      // A group of 4 with 3 nonzeros must be rejected.
      std::vector<uint8_t> bad4 = d.q4;
      bad4[0] = 0x11;  // k = 0, 1 nonzero (code 1 != 8)
      bad4[1] = 0x81;  // k = 2 nonzero, k = 3 zero  -> 3 nonzeros in group 0
      WoqWeights wb;
      CHECK_STATUS(woq_pack_int4_sparse24(bad4.data(), d.sc.data(), nullptr, c.N, c.K, c.G, &wb),
                   Status::kNotSparse);
      std::vector<int8_t> bad8 = d.q8;
      bad8[c.K + 4] = 1;
      bad8[c.K + 5] = 2;
      bad8[c.K + 6] = 3;
      CHECK_STATUS(woq_pack_int8_sparse24(bad8.data(), d.sc.data(), nullptr, c.N, c.K, c.G, &wb),
                   Status::kNotSparse);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// fp32 GEMM
// ---------------------------------------------------------------------------------------------------
void test_f32_gemm() {
  struct C {
    int64_t M, K, N;
  };
  const C cases[] = {{1, 1, 1}, {3, 17, 5}, {8, 128, 48}, {13, 300, 100}, {64, 257, 200}, {100, 64, 33}};
  etest::for_each_isa([&](Isa) {
    Rng rng(3);
    for (const C& c : cases) {
      std::vector<float> x = rng.normals(c.M * c.K), W = rng.normals(c.N * c.K), b = rng.normals(c.N);
      F32Weights w;
      CHECK_OK(f32_pack(W.data(), c.K, c.N, c.K, &w, &pool2()));
      std::vector<float> y(c.M * c.N), yr(c.M * c.N);
      CHECK_OK(f32_gemm(x.data(), c.M, c.K, w, b.data(), y.data(), c.N, false, &pool2()));
      ref::f32_linear(x.data(), c.M, c.K, W.data(), b.data(), c.N, yr.data());
      const double tol = 1e-6 * std::sqrt(double(c.K)) * 8;
      CHECK_CLOSE(y.data(), yr.data(), y.size(), tol, 1e-5);
      std::vector<float> y2(c.M * c.N, 2.0f);
      CHECK_OK(f32_gemm(x.data(), c.M, c.K, w, nullptr, y2.data(), c.N, true, nullptr));
      for (int64_t i = 0; i < c.M * c.N; ++i) y2[i] -= 2.0f - b[i % c.N];
      CHECK_CLOSE(y2.data(), yr.data(), y.size(), tol * 4, 1e-5);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------------
void test_elementwise() {
  etest::for_each_isa([&](Isa) {
    Rng rng(11);
    for (int64_t dim : {1, 15, 64, 100, 2048}) {
      const int64_t rows = 5;
      std::vector<float> x = rng.normals(rows * dim, 3.0f), w = rng.normals(dim), b = rng.normals(dim);
      for (auto& v : x) v += 0.7f;
      std::vector<float> y(rows * dim), yr(rows * dim);
      CHECK_OK(rmsnorm(x.data(), dim, w.data(), y.data(), dim, rows, dim, 1e-6f, &pool2()));
      ref::rmsnorm(x.data(), w.data(), yr.data(), rows, dim, 1e-6f);
      CHECK_CLOSE(y.data(), yr.data(), y.size(), 1e-6, 1e-5);
      CHECK_OK(layernorm(x.data(), dim, w.data(), b.data(), y.data(), dim, rows, dim, 1e-5f, nullptr));
      ref::layernorm(x.data(), w.data(), b.data(), yr.data(), rows, dim, 1e-5f);
      CHECK_CLOSE(y.data(), yr.data(), y.size(), 1e-5, 1e-5);
      y = x;
      yr = x;
      CHECK_OK(softmax(y.data(), dim, rows, dim, &pool2()));
      ref::softmax(yr.data(), rows, dim);
      CHECK_CLOSE(y.data(), yr.data(), y.size(), 1e-8, 1e-5);
    }
    // Activations over a wide range, including tails.
    const int64_t n = 20001;
    std::vector<float> x(n), y(n), yr(n);
    for (int64_t i = 0; i < n; ++i) x[i] = -30.0f + 60.0f * float(i) / float(n - 1);
    x[17] = -100.0f;
    x[18] = 100.0f;
    x[19] = 0.0f;
    CHECK_OK(silu(x.data(), y.data(), n, &pool2()));
    for (int64_t i = 0; i < n; ++i) yr[i] = ref::silu(x[i]);
    CHECK_CLOSE(y.data(), yr.data(), n, 1e-30, 2e-6);
    CHECK_OK(quick_gelu(x.data(), y.data(), n, &pool2()));
    for (int64_t i = 0; i < n; ++i) yr[i] = ref::quick_gelu(x[i]);
    CHECK_CLOSE(y.data(), yr.data(), n, 1e-30, 4e-6);
    CHECK_OK(gelu_erf(x.data(), y.data(), n, nullptr));
    for (int64_t i = 0; i < n; ++i) yr[i] = ref::gelu_erf(x[i]);
    CHECK_CLOSE(y.data(), yr.data(), n, 1e-30, 1e-5);  // ~erfc accuracy relative, also in the tail
    CHECK_OK(gelu_tanh(x.data(), y.data(), n, &pool2()));
    for (int64_t i = 0; i < n; ++i) yr[i] = ref::gelu_tanh(x[i]);
    CHECK_CLOSE(y.data(), yr.data(), n, 1e-30, 1e-5);  // exp argument ~50 in the far tail: fp32 limit
    // SwiGLU on a fused [rows, 2n] gate|up layout.
    const int64_t rows = 3, h = 1000;
    std::vector<float> gu = rng.normals(rows * 2 * h, 3.0f), o(rows * h);
    CHECK_OK(swiglu(gu.data(), 2 * h, gu.data() + h, 2 * h, o.data(), h, rows, h, &pool2()));
    std::vector<float> orf(rows * h);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < h; ++i) orf[r * h + i] = ref::silu(gu[r * 2 * h + i]) * gu[r * 2 * h + h + i];
    CHECK_CLOSE(o.data(), orf.data(), o.size(), 1e-30, 3e-6);
  });
}

void test_rope() {
  etest::for_each_isa([&](Isa) {
    Rng rng(21);
    for (int64_t head_dim : {64, 128, 80}) {
      for (int64_t rot : {head_dim, head_dim / 2}) {
        const int64_t rows = 6, nh = 3;
        RopeTable t;
        CHECK_OK(rope_init(40000, rot, 10000.0f, &t));
        std::vector<int32_t> pos = {0, 1, 7, 1000, 31999, 39999};
        std::vector<float> x = rng.normals(rows * nh * head_dim), xr = x;
        CHECK_OK(rope_apply(x.data(), nh * head_dim, rows, nh, head_dim, pos.data(), t, &pool2()));
        ref::rope(xr.data(), rows, nh, head_dim, rot, pos.data(), 10000.0f);
        CHECK_CLOSE(x.data(), xr.data(), x.size(), 1e-5, 1e-5);
      }
    }
    RopeTable t;
    CHECK_OK(rope_init(16, 8, 10000.f, &t));
    std::vector<int32_t> bad = {16};
    std::vector<float> x(8);
    CHECK_STATUS(rope_apply(x.data(), 8, 1, 1, 8, bad.data(), t, nullptr), Status::kInvalidArgument);
  });
}

// ---------------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------------
struct AttnCase {
  int64_t n_q, q_pos0, n_heads, n_kv_heads, head_dim;
  bool causal;
  int64_t n_kv;  // for non-causal
};

// Random inputs of a case: a KV cache [n_kv_heads][n_kv + seq_slack][D] and queries [n_q][H*D] at a row
// stride of H*D + q_pad; `args` points into them and at `out`.
struct AttnData {
  std::vector<float> k, v, q, out;
  AttentionArgs args;
};
AttnData make_attention(Rng& rng, const AttnCase& c, int64_t seq_slack, int64_t q_pad) {
  const int64_t D = c.head_dim, n_kv = c.causal ? c.q_pos0 + c.n_q : c.n_kv;
  const int64_t max_seq = n_kv + seq_slack, q_ld = c.n_heads * D + q_pad;
  AttnData t;
  t.k = rng.normals(c.n_kv_heads * max_seq * D);
  t.v = rng.normals(c.n_kv_heads * max_seq * D);
  t.q = rng.normals(c.n_q * q_ld, 2.0f);
  t.out.assign(size_t(c.n_q * c.n_heads * D), 0.f);
  AttentionArgs& a = t.args;
  a.q = t.q.data();
  a.q_ld = q_ld;
  a.k = t.k.data();
  a.k_ld = D;
  a.k_head_stride = max_seq * D;
  a.v = t.v.data();
  a.v_ld = D;
  a.v_head_stride = max_seq * D;
  a.out = t.out.data();
  a.out_ld = c.n_heads * D;
  a.n_q = c.n_q;
  a.n_kv = n_kv;
  a.q_pos0 = c.q_pos0;
  a.n_heads = c.n_heads;
  a.n_kv_heads = c.n_kv_heads;
  a.head_dim = D;
  a.causal = c.causal;
  a.scale = 1.0f / std::sqrt(float(D));
  return t;
}

void test_attention() {
  using C = AttnCase;
  const C cases[] = {
      {1, 0, 4, 4, 64, true, 0},      {1, 99, 8, 2, 128, true, 0},     {1, 300, 16, 1, 64, true, 0},
      {5, 0, 2, 1, 32, true, 0},      {37, 20, 4, 2, 128, true, 0},    {64, 64, 16, 16, 128, true, 0},
      {40, 100, 8, 8, 256, true, 0},  {70, 3, 6, 3, 80, true, 0},      {33, 0, 2, 2, 72, true, 0},
      {50, 0, 4, 4, 64, false, 50},   {17, 0, 3, 3, 80, false, 131},   {8, 10, 32, 4, 128, true, 0},
  };
  etest::for_each_isa([&](Isa) {
    Rng rng(8);
    for (const C& c : cases) {
      AttnData t = make_attention(rng, c, 7, 5);
      const AttentionArgs& a = t.args;
      std::vector<float>& out = t.out;
      std::vector<float> outr(out.size());
      CHECK_OK(attention(a, &pool2()));
      AttentionArgs ar = a;
      ar.out = outr.data();
      ref::attention(ar);
      CHECK_CLOSE(out.data(), outr.data(), out.size(), 2e-5, 1e-4);
    }
    // ViT-style: q, k, v interleaved in one fused QKV buffer [S][3*H*D].
    {
      const int64_t S = 45, H = 4, D = 64;
      std::vector<float> qkv = rng.normals(S * 3 * H * D), out(S * H * D), outr(S * H * D);
      AttentionArgs a;
      a.q = qkv.data();
      a.q_ld = 3 * H * D;
      a.k = qkv.data() + H * D;
      a.k_ld = 3 * H * D;
      a.k_head_stride = D;
      a.v = qkv.data() + 2 * H * D;
      a.v_ld = 3 * H * D;
      a.v_head_stride = D;
      a.out = out.data();
      a.out_ld = H * D;
      a.n_q = S;
      a.n_kv = S;
      a.n_heads = H;
      a.n_kv_heads = H;
      a.head_dim = D;
      a.causal = false;
      a.scale = 0.125f;
      CHECK_OK(attention(a, nullptr));
      AttentionArgs ar = a;
      ar.out = outr.data();
      ref::attention(ar);
      CHECK_CLOSE(out.data(), outr.data(), out.size(), 2e-5, 1e-4);
    }
  });
}

// BF16 attention (allow_bf16): against a scalar emulation of its contract (q*scale, K and V rounded to
// bf16 (nearest even); exact softmax; probabilities rounded to bf16 for P V, normalized by the fp32 sum),
// and close to fp32 attention. ISAs without a bf16 path (scalar, AVX2; CPUs without AVX512-BF16) must give the fp32 results.
float bf16_round(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

void ref_attention_bf16(const AttentionArgs& a) {
  const int64_t grp = a.n_heads / a.n_kv_heads, D = a.head_dim;
  for (int64_t i = 0; i < a.n_q; ++i)
    for (int64_t h = 0; h < a.n_heads; ++h) {
      const int64_t kvh = h / grp, T = a.causal ? std::min(a.n_kv, a.q_pos0 + i + 1) : a.n_kv;
      std::vector<double> sc(static_cast<size_t>(T));
      double mx = -1e300;
      for (int64_t t = 0; t < T; ++t) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d)
          dot += double(bf16_round(a.scale * a.q[i * a.q_ld + h * D + d])) *
                 double(bf16_round(a.k[kvh * a.k_head_stride + t * a.k_ld + d]));
        sc[size_t(t)] = float(dot);  // fp32 scores
        mx = std::max(mx, sc[size_t(t)]);
      }
      double sum = 0;
      std::vector<double> o(static_cast<size_t>(D), 0.0);
      for (int64_t t = 0; t < T; ++t) {
        const float p = std::exp(float(sc[size_t(t)] - mx));
        sum += p;
        for (int64_t d = 0; d < D; ++d)
          o[size_t(d)] += double(bf16_round(p)) * double(bf16_round(a.v[kvh * a.v_head_stride + t * a.v_ld + d]));
      }
      for (int64_t d = 0; d < D; ++d) a.out[i * a.out_ld + h * D + d] = float(o[size_t(d)] / sum);
    }
}

void test_attention_bf16() {
  using C = AttnCase;
  const C cases[] = {
      {16, 0, 2, 2, 32, true, 0},     {37, 20, 4, 2, 128, true, 0}, {64, 64, 4, 4, 128, true, 0},
      {50, 0, 4, 4, 64, false, 50},   {17, 0, 3, 3, 96, false, 131}, {8, 10, 8, 2, 64, true, 0},
      {100, 300, 2, 1, 64, true, 0},  {577, 0, 2, 2, 64, false, 577}, {1, 5, 4, 4, 64, true, 0},
  };
  bool ran_bf16 = false;
  etest::for_each_isa([&](Isa) {
    Rng rng(81);
    const bool bf16 = attention_bf16_available();
    ran_bf16 |= bf16;
    for (const C& c : cases) {
      AttnData t = make_attention(rng, c, 3, 16);
      AttentionArgs& a = t.args;
      std::vector<float>& out = t.out;
      std::vector<float> outr(out.size()), out32(out.size());
      a.allow_bf16 = true;
      CHECK_OK(attention(a, &pool2()));
      AttentionArgs ar = a;
      ar.out = out32.data();
      ref::attention(ar);
      // the bf16 path runs for >= 16 query rows per kv head
      if (bf16 && c.n_q * (c.n_heads / c.n_kv_heads) >= 16) {
        ar.out = outr.data();
        ref_attention_bf16(ar);
        CHECK_CLOSE(out.data(), outr.data(), out.size(), 3e-4, 2e-3);  // exp ulps flip some bf16 roundings of p
        CHECK_CLOSE(out.data(), out32.data(), out.size(), 0.05, 0.05);
      } else {
        CHECK_CLOSE(out.data(), out32.data(), out.size(), 2e-5, 1e-4);
      }
    }
  });
  if (!ran_bf16) std::printf("attn_bf16: this CPU has no AVX512-BF16: only the fp32 fallback was checked\n");
}

// fp16 KV cache: the conversions equal the scalar helpers; attention on fp16 K/V equals fp32 attention on
// the fp16-rounded values (fp32 and bf16 paths), for every ISA.
void test_attention_fp16kv() {
  etest::for_each_isa([&](Isa) {
    Rng rng(17);
    std::vector<float> x = rng.normals(1000, 30.0f);
    const float specials[] = {0.f, -0.f, 1e-7f, -3e-6f, 6.1e-5f, 65504.f, 65519.f, 65520.f, -1e6f, 1.0009765625f,
                              1.00048828125f, INFINITY, -INFINITY};
    for (size_t i = 0; i < sizeof(specials) / sizeof(specials[0]); ++i) x[i * 7] = specials[i];
    for (int64_t n : {int64_t(1000), int64_t(13), int64_t(0)}) {
      std::vector<uint16_t> h(static_cast<size_t>(n) + 1, 0xabcd), href(static_cast<size_t>(n));
      std::vector<float> back(static_cast<size_t>(n) + 1, -7.f);
      fp32_to_fp16_n(x.data(), h.data(), n);
      for (int64_t i = 0; i < n; ++i) href[size_t(i)] = fp32_to_fp16(x[size_t(i)]);
      CHECK(std::equal(href.begin(), href.end(), h.begin()) && h[size_t(n)] == 0xabcd);
      fp16_to_fp32_n(h.data(), back.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const float r = fp16_to_fp32(h[size_t(i)]);
        CHECK(std::memcmp(&back[size_t(i)], &r, 4) == 0);
      }
      CHECK(back[size_t(n)] == -7.f);
    }
    using C = AttnCase;
    const C cases[] = {{1, 99, 8, 2, 128, true, 0}, {37, 20, 4, 2, 128, true, 0}, {50, 0, 4, 4, 64, false, 50},
                       {1, 0, 4, 4, 64, true, 0},   {64, 64, 4, 4, 128, true, 0}, {30, 0, 4, 2, 16, true, 0}, {1, 30, 4, 2, 16, true, 0}};
    for (const C& c : cases)
      for (bool bf16 : {false, true}) {
        AttnData t = make_attention(rng, c, 3, 16);
        std::vector<uint16_t> k16(t.k.size()), v16(t.v.size());
        fp32_to_fp16_n(t.k.data(), k16.data(), int64_t(k16.size()));
        fp32_to_fp16_n(t.v.data(), v16.data(), int64_t(v16.size()));
        fp16_to_fp32_n(k16.data(), t.k.data(), int64_t(k16.size()));  // the fp32 run sees the rounded values
        fp16_to_fp32_n(v16.data(), t.v.data(), int64_t(v16.size()));
        AttentionArgs a = t.args;
        a.allow_bf16 = bf16;
        std::vector<float> o32(t.out.size()), o16(t.out.size());
        a.out = o32.data();
        CHECK_OK(attention(a, &pool2()));
        a.k = a.v = nullptr;
        a.k16 = k16.data();
        a.v16 = v16.data();
        a.out = o16.data();
        CHECK_OK(attention(a, &pool2()));
        CHECK_CLOSE(o16.data(), o32.data(), o16.size(), 1e-6, 1e-6);
        a.v16 = nullptr;
        CHECK_STATUS(attention(a, nullptr), Status::kInvalidArgument);
      }
  });
}

// ---------------------------------------------------------------------------------------------------
// Argument validation: errors come back as statuses.
// ---------------------------------------------------------------------------------------------------
void test_validation() {
  etest::context() = "validation";
  std::vector<int8_t> q(64 * 64, 1);
  std::vector<float> s(64, 0.01f), x(64 * 64, 0.1f), y(64 * 64);
  W8A8Weights w;
  CHECK_STATUS(w8a8_pack(nullptr, 64, s.data(), 64, 64, nullptr, 0, &w), Status::kInvalidArgument);
  CHECK_STATUS(w8a8_pack(q.data(), 10, s.data(), 64, 64, nullptr, 0, &w), Status::kInvalidArgument);
  q[5] = -128;
  CHECK_STATUS(w8a8_pack(q.data(), 64, s.data(), 64, 64, nullptr, 0, &w), Status::kInvalidArgument);
  q[5] = 1;
  int32_t badc = 64;
  CHECK_STATUS(w8a8_pack(q.data(), 64, s.data(), 64, 64, &badc, 1, &w), Status::kInvalidArgument);
  std::vector<int8_t> big(16 * 70000, 0);
  std::vector<float> sb(16, 1.0f);
  CHECK_STATUS(w8a8_pack(big.data(), 70000, sb.data(), 16, 70000, nullptr, 0, &w), Status::kOverflow);
  CHECK_OK(w8a8_pack(q.data(), 64, s.data(), 64, 64, nullptr, 0, &w));
  W8A8Act a;
  CHECK_STATUS(w8a8_quantize(x.data(), 4, 64, 64, 0.0f, &a, nullptr), Status::kInvalidArgument);
  CHECK_STATUS(w8a8_quantize(x.data(), 4, 64, 64, NAN, &a, nullptr), Status::kInvalidArgument);
  CHECK_OK(w8a8_quantize(x.data(), 4, 32, 64, 0.1f, &a, nullptr));
  CHECK_STATUS(w8a8_gemm(a, w, nullptr, y.data(), 64, false, nullptr), Status::kInvalidArgument);  // K mismatch
  CHECK_OK(w8a8_quantize(x.data(), 4, 64, 64, 0.1f, &a, nullptr));
  CHECK_STATUS(w8a8_gemm(a, w, nullptr, y.data(), 63, false, nullptr), Status::kInvalidArgument);
  CHECK_OK(w8a8_gemm(a, w, nullptr, y.data(), 64, false, nullptr));

  std::vector<uint8_t> q4(64 * 32, 0x88);
  std::vector<uint16_t> sc(64 * 2, fp32_to_fp16(0.1f));
  WoqWeights ww;
  CHECK_STATUS(woq_pack_int4(q4.data(), sc.data(), nullptr, 64, 64, 48, &ww), Status::kInvalidArgument);
  CHECK_STATUS(woq_pack_int4(q4.data(), sc.data(), nullptr, 64, 64, 16, &ww), Status::kInvalidArgument);
  CHECK_STATUS(woq_pack_int4(q4.data(), sc.data(), nullptr, 0, 64, 32, &ww), Status::kInvalidArgument);
  std::vector<uint8_t> z(64 * 2, 16);
  CHECK_STATUS(woq_pack_int4(q4.data(), sc.data(), z.data(), 64, 64, 32, &ww), Status::kInvalidArgument);
  CHECK_OK(woq_pack_int4(q4.data(), sc.data(), nullptr, 64, 64, 32, &ww));
  WoqAct wa;
  CHECK_STATUS(woq_quantize(x.data(), 1, 64, 64, 48, &wa, nullptr), Status::kInvalidArgument);
  CHECK_OK(woq_quantize(x.data(), 1, 64, 64, 64, &wa, nullptr));
  CHECK_STATUS(woq_gemm(wa, ww, nullptr, y.data(), 64, nullptr), Status::kInvalidArgument);  // QB mismatch
  CHECK_OK(woq_quantize(x.data(), 1, 64, 64, 32, &wa, nullptr));
  CHECK_OK(woq_gemm(wa, ww, nullptr, y.data(), 64, nullptr));
  for (int i = 0; i < 64; ++i) CHECK(y[i] == 0.0f);  // all codes at the zero point

  F32Weights fw;
  CHECK_STATUS(f32_pack(x.data(), 3, 4, 4, &fw), Status::kInvalidArgument);
  CHECK_STATUS(rmsnorm(x.data(), 10, nullptr, y.data(), 64, 2, 64, 1e-5f, nullptr), Status::kInvalidArgument);
  CHECK_STATUS(softmax(nullptr, 4, 1, 4, nullptr), Status::kInvalidArgument);
  AttentionArgs at;
  CHECK_STATUS(attention(at, nullptr), Status::kInvalidArgument);
  at.q = at.k = at.v = x.data();
  at.out = y.data();
  at.n_q = at.n_kv = 1;
  at.n_heads = 3;
  at.n_kv_heads = 2;
  at.head_dim = 8;
  at.q_ld = at.out_ld = at.k_ld = at.v_ld = 24;
  at.scale = 1.0f;
  CHECK_STATUS(attention(at, nullptr), Status::kInvalidArgument);  // heads not a multiple
  at.n_kv_heads = 3;
  at.head_dim = 300;
  CHECK_STATUS(attention(at, nullptr), Status::kInvalidArgument);  // head_dim > 256
  CHECK(set_isa(Isa::kNeonDot) == Status::kUnsupported || set_isa(Isa::kAvx2) == Status::kUnsupported ||
        available_isas().size() >= 2);
  set_isa(best_isa());
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, void (*)()> groups = {
      {"threadpool", test_thread_pool}, {"fp16", test_fp16},           {"w8a8", test_w8a8},
      {"shadow", test_w8a8_shadow},     {"amx_bits", test_w8a8_amx_bits},     {"woq", test_woq_dense},       {"sparse", test_woq_sparse}, {"attn_fp16kv", test_attention_fp16kv},
      {"f32", test_f32_gemm},           {"elementwise", test_elementwise}, {"rope", test_rope},
      {"attention", test_attention},    {"attn_bf16", test_attention_bf16}, {"validation", test_validation},
  };
  std::printf("best ISA: %s; available:", isa_name(best_isa()));
  for (Isa i : available_isas()) std::printf(" %s", isa_name(i));
  std::printf("\n");
  std::vector<std::string> want;
  for (int i = 1; i < argc; ++i) want.push_back(argv[i]);
  if (want.empty())
    for (auto& g : groups) want.push_back(g.first);
  for (const auto& name : want) {
    auto it = groups.find(name);
    if (it == groups.end()) {
      std::fprintf(stderr, "unknown test group %s\n", name.c_str());
      return 2;
    }
    int before = etest::failures();
    it->second();
    std::printf("%-12s %s\n", name.c_str(), etest::failures() == before ? "ok" : "FAILED");
  }
  return etest::failures() ? 1 : 0;
}
