// Scalar references on the canonical formats of docs/formats.md. Deliberately simple; used by the
// tests and by the benchmark's correctness checks, never by the engine.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace edgemm {
namespace kernels {
namespace ref {

int8_t w8a8_code(float x, float s_a, bool* clipped) {
  float q = std::nearbyint(x / s_a);  // default rounding mode: half to even
  bool c = !(q >= -128.0f && q <= 127.0f);
  if (clipped) *clipped = c;
  q = std::min(std::max(q, -128.0f), 127.0f);
  return static_cast<int8_t>(q);
}

void w8a8_linear(const float* x, int64_t M, int64_t K, float s_a, const int8_t* qw, const float* ws,
                 const float* bias, int64_t N, bool shadow, float* y) {
  std::vector<int32_t> codes(K);
  std::vector<float> resid(K);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      bool clipped;
      codes[k] = w8a8_code(x[m * K + k], s_a, &clipped);
      resid[k] = clipped ? x[m * K + k] - static_cast<float>(codes[k]) * s_a : 0.0f;
    }
    for (int64_t n = 0; n < N; ++n) {
      int64_t acc = 0;
      double sh = 0;
      for (int64_t k = 0; k < K; ++k) {
        acc += int64_t(codes[k]) * qw[n * K + k];
        if (shadow && resid[k] != 0.0f) sh += double(resid[k]) * (double(qw[n * K + k]) * ws[n]);
      }
      double v = double(acc) * (double(s_a) * ws[n]) + sh;
      if (bias) v += bias[n];
      y[m * N + n] = static_cast<float>(v);
    }
  }
}

void woq_quantize_row(const float* x, int64_t K, int64_t QB, int8_t* q, float* d, int32_t* asum) {
  for (int64_t b = 0; b < K / QB; ++b) {
    float amax = 0;
    for (int64_t i = 0; i < QB; ++i) amax = std::max(amax, std::fabs(x[b * QB + i]));
    d[b] = amax / 127.0f;
    float id = amax > 0 ? 127.0f / amax : 0.0f;
    int32_t s = 0;
    for (int64_t i = 0; i < QB; ++i) {
      float v = x[b * QB + i] * id;
      int32_t c = static_cast<int32_t>(std::nearbyint(v));
      q[b * QB + i] = static_cast<int8_t>(c);
      s += c;
    }
    asum[b] = s;
  }
}

namespace {
template <class CodeFn, class ZeroFn>
void woq_linear(const float* x, int64_t M, int64_t K, int64_t G, const uint16_t* scales,
                const float* bias, int64_t N, float* y, CodeFn code, ZeroFn zero) {
  const int64_t QB = woq_act_block(G), nb = K / QB;
  std::vector<int8_t> q(K);
  std::vector<float> d(nb);
  std::vector<int32_t> as(nb);
  for (int64_t m = 0; m < M; ++m) {
    woq_quantize_row(x + m * K, K, QB, q.data(), d.data(), as.data());
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t g = 0; g < K / G; ++g) {
        double t = 0;
        for (int64_t b = g * G / QB; b < (g + 1) * G / QB; ++b) {
          int64_t dot = 0;
          for (int64_t k = b * QB; k < (b + 1) * QB; ++k) dot += int64_t(code(n, k) - zero(n, g)) * q[k];
          t += double(d[b]) * double(dot);
        }
        acc += double(fp16_to_fp32(scales[n * (K / G) + g])) * t;
      }
      if (bias) acc += bias[n];
      y[m * N + n] = static_cast<float>(acc);
    }
  }
}
}  // namespace

void woq_int4_linear(const float* x, int64_t M, int64_t K, const uint8_t* qw, const uint16_t* scales,
                     const uint8_t* zeros, int64_t G, const float* bias, int64_t N, float* y) {
  woq_linear(
      x, M, K, G, scales, bias, N, y,
      [&](int64_t n, int64_t k) { return int((qw[n * (K / 2) + k / 2] >> (4 * (k & 1))) & 15); },
      [&](int64_t n, int64_t g) { return zeros ? int(zeros[n * (K / G) + g]) : 8; });
}

void woq_int8_linear(const float* x, int64_t M, int64_t K, const int8_t* qw, const uint16_t* scales,
                     const int8_t* zeros, int64_t G, const float* bias, int64_t N, float* y) {
  woq_linear(
      x, M, K, G, scales, bias, N, y, [&](int64_t n, int64_t k) { return int(qw[n * K + k]); },
      [&](int64_t n, int64_t g) { return zeros ? int(zeros[n * (K / G) + g]) : 0; });
}

void f32_linear(const float* x, int64_t M, int64_t K, const float* W, const float* bias, int64_t N,
                float* y) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = bias ? bias[n] : 0.0;
      for (int64_t k = 0; k < K; ++k) acc += double(x[m * K + k]) * W[n * K + k];
      y[m * N + n] = static_cast<float>(acc);
    }
}

void rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += double(x[r * dim + i]) * x[r * dim + i];
    double inv = 1.0 / std::sqrt(ss / dim + eps);
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = float(x[r * dim + i] * inv * (w ? w[i] : 1.0f));
  }
}

void layernorm(const float* x, const float* g, const float* b, float* y, int64_t rows, int64_t dim,
               float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    double mean = 0, var = 0;
    for (int64_t i = 0; i < dim; ++i) mean += xr[i];
    mean /= dim;
    for (int64_t i = 0; i < dim; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= dim;
    double inv = 1.0 / std::sqrt(var + eps);
    for (int64_t i = 0; i < dim; ++i)
      y[r * dim + i] = float((xr[i] - mean) * inv * (g ? g[i] : 1.0f) + (b ? b[i] : 0.0f));
  }
}

void softmax(float* x, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * n;
    double m = -INFINITY, s = 0;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, double(xr[i]));
    for (int64_t i = 0; i < n; ++i) s += std::exp(double(xr[i]) - m);
    for (int64_t i = 0; i < n; ++i) xr[i] = float(std::exp(double(xr[i]) - m) / s);
  }
}

float silu(float x) { return float(double(x) / (1.0 + std::exp(-double(x)))); }
float quick_gelu(float x) { return float(double(x) / (1.0 + std::exp(-1.702 * double(x)))); }
// Written without the cancellation of 1 + erf / 1 + tanh for large negative x.
float gelu_erf(float x) { return float(0.5 * x * std::erfc(-double(x) / std::sqrt(2.0))); }
float gelu_tanh(float x) {
  double u = std::sqrt(2.0 / M_PI) * (x + 0.044715 * double(x) * x * x);
  return float(double(x) / (1.0 + std::exp(-2.0 * u)));  // = 0.5 x (1 + tanh(u))
}

void rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, int64_t rot_dim,
          const int32_t* positions, float theta) {
  const int64_t half = rot_dim / 2;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = x + (r * n_heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        float inv = 1.0f / std::pow(theta, float(2 * i) / float(rot_dim));
        double ang = double(float(positions[r]) * inv);
        double c = std::cos(ang), s = std::sin(ang);
        double x0 = v[i], x1 = v[i + half];
        v[i] = float(x0 * c - x1 * s);
        v[i + half] = float(x1 * c + x0 * s);
      }
    }
}

void attention(const AttentionArgs& a) {
  const int64_t grp = a.n_heads / a.n_kv_heads, D = a.head_dim;
  std::vector<double> s(a.n_kv), o(D);
  for (int64_t i = 0; i < a.n_q; ++i)
    for (int64_t h = 0; h < a.n_heads; ++h) {
      const int64_t kvh = h / grp;
      const float* q = a.q + i * a.q_ld + h * D;
      int64_t T = a.causal ? std::min(a.n_kv, a.q_pos0 + i + 1) : a.n_kv;
      double m = -INFINITY, l = 0;
      for (int64_t t = 0; t < T; ++t) {
        const float* k = a.k + kvh * a.k_head_stride + t * a.k_ld;
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(q[d]) * k[d];
        s[t] = dot * a.scale;
        m = std::max(m, s[t]);
      }
      std::fill(o.begin(), o.end(), 0.0);
      for (int64_t t = 0; t < T; ++t) {
        double p = std::exp(s[t] - m);
        l += p;
        const float* v = a.v + kvh * a.v_head_stride + t * a.v_ld;
        for (int64_t d = 0; d < D; ++d) o[d] += p * v[d];
      }
      float* out = a.out + i * a.out_ld + h * D;
      for (int64_t d = 0; d < D; ++d) out[d] = T > 0 ? float(o[d] / l) : 0.0f;
    }
}

}  // namespace ref
}  // namespace kernels
}  // namespace edgemm
