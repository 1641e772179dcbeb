// Minimal test harness: CHECK macros, random data, error metrics. No third-party dependency.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"

namespace etest {

inline int& failures() {
  static int f = 0;
  return f;
}
inline std::string& context() {
  static std::string c;
  return c;
}

#define CHECK(cond)                                                                       \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "FAIL %s:%d [%s] %s\n", __FILE__, __LINE__,                    \
                   etest::context().c_str(), #cond);                                      \
      ++etest::failures();                                                                \
    }                                                                                     \
  } while (0)
#define CHECK_OK(expr)                                                                    \
  do {                                                                                    \
    edgemm::kernels::Status _s = (expr);                                                  \
    if (_s != edgemm::kernels::Status::kOk) {                                             \
      std::fprintf(stderr, "FAIL %s:%d [%s] %s -> %s\n", __FILE__, __LINE__,              \
                   etest::context().c_str(), #expr, edgemm::kernels::status_string(_s));  \
      ++etest::failures();                                                                \
    }                                                                                     \
  } while (0)
#define CHECK_STATUS(expr, want)                                                          \
  do {                                                                                    \
    edgemm::kernels::Status _s = (expr);                                                  \
    if (_s != (want)) {                                                                   \
      std::fprintf(stderr, "FAIL %s:%d [%s] %s -> %s, want %s\n", __FILE__, __LINE__,     \
                   etest::context().c_str(), #expr, edgemm::kernels::status_string(_s),   \
                   edgemm::kernels::status_string(want));                                 \
      ++etest::failures();                                                                \
    }                                                                                     \
  } while (0)

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t seed) : g(seed) {}
  float normal(float sd = 1.0f) { return std::normal_distribution<float>(0.0f, sd)(g); }
  float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(g); }
  int64_t integer(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); }
  std::vector<float> normals(size_t n, float sd = 1.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = normal(sd);
    return v;
  }
};

// Max over elements of |a - b| / (atol + rtol * |b|); <= 1 means within tolerance.
inline double tol_ratio(const float* a, const float* b, size_t n, double atol, double rtol,
                        size_t* worst = nullptr) {
  double r = 0;
  for (size_t i = 0; i < n; ++i) {
    double e = std::fabs(double(a[i]) - double(b[i]));
    double t = e / (atol + rtol * std::fabs(double(b[i])));
    if (!(t <= r)) {  // catches NaN
      r = std::isnan(t) ? INFINITY : t;
      if (worst) *worst = i;
    }
  }
  return r;
}
inline double max_abs(const float* a, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(double(a[i])));
  return m;
}

#define CHECK_CLOSE(a, b, n, atol, rtol)                                                      \
  do {                                                                                        \
    size_t _w = 0;                                                                            \
    double _r = etest::tol_ratio((a), (b), (n), (atol), (rtol), &_w);                         \
    if (!(_r <= 1.0)) {                                                                       \
      std::fprintf(stderr, "FAIL %s:%d [%s] %s vs %s: ratio %.3g at %zu (%.9g vs %.9g)\n",    \
                   __FILE__, __LINE__, etest::context().c_str(), #a, #b, _r, _w,              \
                   double((a)[_w]), double((b)[_w]));                                         \
      ++etest::failures();                                                                    \
    }                                                                                         \
  } while (0)

// Runs body once per available ISA (scalar first), setting the context string.
inline void for_each_isa(const std::function<void(edgemm::kernels::Isa)>& body) {
  using namespace edgemm::kernels;
  for (Isa isa : available_isas()) {
    if (set_isa(isa) != Status::kOk) {
      ++failures();
      continue;
    }
    context() = isa_name(isa);
    body(isa);
  }
  set_isa(best_isa());
  context().clear();
}

}  // namespace etest
