// Portable C++ implementations of every table entry, written so that compilers auto-vectorize the hot
// loops. Included by each ISA translation unit inside an anonymous namespace, so each TU gets its own
// copy compiled with its own target flags (no ODR clash between, e.g., the AVX-512 and scalar copies).
// The packed-layout helpers here are the single definition of the layouts documented in kernels.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "isa_impl.h"
#include "layout.h"

namespace {

using namespace edgemm;
using namespace edgemm::kernels;
using namespace edgemm::kernels::impl;

// ------------------------------------------------------------------------------------------------
// Vectorizable math (fp-contract is off library-wide, so these give the same bits on every ISA that
// does not override them).
// ------------------------------------------------------------------------------------------------
inline float p_round_even(float x) {  // exact round-half-even for |x| < 2^22
  const float magic = 12582912.0f;     // 1.5 * 2^23
  return (x + magic) - magic;
}

inline float p_exp(float x) {  // Cephes expf, ~1 ulp; 0 below -87.3
  const float hi = 88.3762626647949f, lo = -87.3365447505531f;
  float xc = std::min(std::max(x, lo), hi);
  float n = p_round_even(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, 4);
  float res = p * s;
  return x < lo ? 0.0f : res;
}

inline float p_sigmoid_den(float x) { return 1.0f + p_exp(-x); }
inline float p_silu(float x) { return x / (1.0f + p_exp(-x)); }

// erfc(z) with fractional error < 1.2e-7 (Numerical Recipes erfcc, Chebyshev fit), all z.
inline float p_erfc(float x) {
  float z = std::fabs(x);
  float t = 1.0f / (1.0f + 0.5f * z);
  float poly =
      -1.26551223f +
      t * (1.00002368f +
           t * (0.37409196f +
                t * (0.09678418f +
                     t * (-0.18628806f +
                          t * (0.27886807f +
                               t * (-1.13520398f +
                                    t * (1.48851587f + t * (-0.82215223f + t * 0.17087277f))))))));
  float ans = t * p_exp(-z * z + poly);
  return x >= 0.0f ? ans : 2.0f - ans;
}
inline float p_gelu_erf(float x) { return 0.5f * x * p_erfc(-0.70710678118654752f * x); }
inline float p_gelu_tanh(float x) {
  float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + p_exp(-2.0f * u));
}

// ------------------------------------------------------------------------------------------------
// Elementwise rows
// ------------------------------------------------------------------------------------------------
constexpr int kLanes = 16;

inline float p_sum_sq(const float* x, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l] * x[i + l];
  float s = 0;
  for (; i < n; ++i) s += x[i] * x[i];
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}
inline float p_sum(const float* x, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l];
  float s = 0;
  for (; i < n; ++i) s += x[i];
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}
inline float p_max(const float* x, int64_t n) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = std::max(acc[l], x[i + l]);
  float s = -std::numeric_limits<float>::infinity();
  for (; i < n; ++i) s = std::max(s, x[i]);
  for (int l = 0; l < kLanes; ++l) s = std::max(s, acc[l]);
  return s;
}

void p_rmsnorm_row(const float* x, const float* w, float* y, int64_t dim, float eps) {
  float ms = p_sum_sq(x, dim) / static_cast<float>(dim);
  float inv = 1.0f / std::sqrt(ms + eps);
  if (w)
    for (int64_t i = 0; i < dim; ++i) y[i] = w[i] * (x[i] * inv);
  else
    for (int64_t i = 0; i < dim; ++i) y[i] = x[i] * inv;
}

void p_layernorm_row(const float* x, const float* g, const float* b, float* y, int64_t dim, float eps) {
  float mean = p_sum(x, dim) / static_cast<float>(dim);
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      float d = x[i + l] - mean;
      acc[l] += d * d;
    }
  float var = 0;
  for (; i < dim; ++i) var += (x[i] - mean) * (x[i] - mean);
  for (int l = 0; l < kLanes; ++l) var += acc[l];
  var /= static_cast<float>(dim);
  float inv = 1.0f / std::sqrt(var + eps);
  for (int64_t j = 0; j < dim; ++j) {
    float v = (x[j] - mean) * inv;
    if (g) v *= g[j];
    if (b) v += b[j];
    y[j] = v;
  }
}

void p_softmax_row(float* x, int64_t n) {
  float m = p_max(x, n);
  if (m == -std::numeric_limits<float>::infinity()) m = 0;  // all masked: gives uniform 0/0 -> NaN-free
  for (int64_t i = 0; i < n; ++i) x[i] = p_exp(x[i] - m);
  float s = p_sum(x, n);
  float inv = 1.0f / s;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void p_silu_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = p_silu(x[i]);
}
void p_gelu_erf_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = p_gelu_erf(x[i]);
}
void p_gelu_tanh_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = p_gelu_tanh(x[i]);
}
void p_swiglu_n(const float* g, const float* u, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = p_silu(g[i]) * u[i];
}

void p_rope_row(float* x, int64_t n_heads, int64_t head_dim, int64_t half, const float* cs,
                const float* sn) {
  for (int64_t h = 0; h < n_heads; ++h) {
    float* a = x + h * head_dim;
    float* b = a + half;
    for (int64_t i = 0; i < half; ++i) {
      float x0 = a[i], x1 = b[i];
      a[i] = x0 * cs[i] - x1 * sn[i];
      b[i] = x1 * cs[i] + x0 * sn[i];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// W8A8
// ------------------------------------------------------------------------------------------------
void p_w8a8_quant(const float* x, int64_t ldx, int64_t K, float s_a, uint8_t* packed, int64_t Kp,
                  int32_t* row_sum, int64_t r0, int64_t r1, std::vector<Outlier>* outliers) {
  std::vector<int32_t> codes(static_cast<size_t>(K));
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * ldx;
    uint8_t* tile = packed + (r / 8) * Kp * 8 + (r % 8) * 4;
    int32_t sum = 0;
    bool any = false;
    for (int64_t k = 0; k < K; ++k) {
      float q = p_round_even(std::min(std::max(xr[k] / s_a, -256.0f), 256.0f));
      int32_t c = static_cast<int32_t>(q);
      any |= (c < -128) | (c > 127);
      codes[k] = c;
    }
    for (int64_t k = 0; k < K; ++k) {
      int32_t c = codes[k];
      if (any && (c < -128 || c > 127)) {
        int32_t cc = std::min(std::max(c, -128), 127);
        outliers->push_back({static_cast<int32_t>(r), static_cast<int32_t>(k),
                             xr[k] - static_cast<float>(cc) * s_a});
        c = cc;
      }
      sum += c;
      tile[(k >> 2) * 32 + (k & 3)] = static_cast<uint8_t>(c + 128);
    }
    for (int64_t k = K; k < Kp; ++k) tile[(k >> 2) * 32 + (k & 3)] = 128;
    row_sum[r] = sum;
  }
}

void p_w8a8_epilogue(const W8A8GemmArgs& g, int64_t m, int64_t n0, const int32_t* acc, int64_t cnt) {
  float* y = g.y + m * g.ldy;
  for (int64_t c = 0; c < cnt; ++c) {
    int64_t n = n0 + c;
    float v = static_cast<float>(acc[c] - 128 * g.col_sum[n]) * (g.s_a * g.wscale[n]);
    if (g.bias) v += g.bias[n];
    y[n] = g.accumulate ? y[n] + v : v;
  }
}

void p_w8a8_gemm(const W8A8GemmArgs& g, int64_t p0, int64_t p1, int64_t t0, int64_t t1) {
  for (int64_t p = p0; p < p1; ++p) {
    const layout::W8A8PanelPos pp = layout::w8a8_panel(p, g.Kp, g.Np);
    const int8_t* wp = g.w + pp.base;
    int64_t n0 = p * 16, cnt = std::min<int64_t>(16, g.N - n0);
    if (cnt <= 0) continue;
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* ap = g.a + t * g.Kp * 8;
      int32_t acc[8][16] = {{0}};
      for (int64_t k4 = 0; k4 < g.Kp / 4; ++k4) {
        const uint8_t* a4 = ap + k4 * 32;
        const int8_t* w4 = wp + k4 * pp.k4_stride;
        for (int r = 0; r < 8; ++r)
          for (int c = 0; c < 16; ++c) {
            int32_t s = 0;
            for (int j = 0; j < 4; ++j) s += int32_t(a4[r * 4 + j]) * int32_t(w4[c * 4 + j]);
            acc[r][c] += s;
          }
      }
      for (int r = 0; r < 8 && t * 8 + r < g.M; ++r) p_w8a8_epilogue(g, t * 8 + r, n0, acc[r], cnt);
    }
  }
}

// Decodes column k of the packed weights times the channel scale, for channels [n0, n1).
inline float p_w8a8_col(const W8A8Weights& w, int64_t n, int64_t k) {
  int8_t q = w.data[layout::w8a8_offset(n, k, w.Kp, w.Np)];
  return static_cast<float>(q) * w.weight_scale[n];
}

void p_w8a8_shadow(const ShadowArgs& s, int64_t n0, int64_t n1) {
  const W8A8Weights& w = *s.w;
  n1 = std::min(n1, w.N);
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < w.Np) buf.resize(static_cast<size_t>(w.Np));
  for (int64_t g = 0; g < s.n_k; ++g) {
    const int32_t k = s.outliers[s.k_begin[g]].k;
    const int32_t hi = w.hot_index.empty() ? -1 : w.hot_index[k];
    const float* col = buf.data();
    if (hi >= 0) {
      col = w.hot_cols.data() + int64_t(hi) * w.Np;
    } else {
      for (int64_t n = n0; n < n1; ++n) buf[n] = p_w8a8_col(w, n, k);
    }
    for (int64_t i = s.k_begin[g]; i < s.k_begin[g + 1]; ++i) {
      float* y = s.y + int64_t(s.outliers[i].m) * s.ldy;
      const float r = s.outliers[i].residual;
      for (int64_t n = n0; n < n1; ++n) y[n] += r * col[n];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Weight-only
// ------------------------------------------------------------------------------------------------
void p_woq_quant_row(const float* x, int64_t K, int64_t QB, int8_t* q, float* d, int32_t* asum) {
  for (int64_t b = 0; b * QB < K; ++b) {
    const float* xb = x + b * QB;
    float amax = 0;
    for (int64_t i = 0; i < QB; ++i) amax = std::max(amax, std::fabs(xb[i]));
    float db = amax / 127.0f;
    float id = amax > 0 ? 127.0f / amax : 0.0f;
    int32_t s = 0;
    for (int64_t i = 0; i < QB; ++i) {
      int32_t c = static_cast<int32_t>(p_round_even(xb[i] * id));
      q[b * QB + i] = static_cast<int8_t>(c);
      s += c;
    }
    d[b] = db;
    asum[b] = s;
  }
}

// Generic weight-only GEMM over the packed layout. `code(gp, r, k)` returns the stored unsigned code of
// row r at input k within the group (dense) -- the sparse variant is separate.
template <bool kInt4>
void p_woq_dense(const WoqGemmArgs& g, int64_t b0, int64_t b1) {
  const WoqWeights& w = *g.w;
  const WoqAct& a = *g.a;
  const int64_t G = w.G, QB = a.QB, ngroups = w.K / G, nb = w.K / QB, bpg = G / QB;
  const int64_t wbytes = layout::woq_weight_bytes(w.format, false, G);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint8_t* base = w.data.data() + blk * w.block_bytes;
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* q = a.q.data() + m * w.K;
      const float* d = a.d.data() + m * nb;
      const int32_t* as = a.asum.data() + m * nb;
      float acc[16] = {0};
      for (int64_t gi = 0; gi < ngroups; ++gi) {
        const uint8_t* gp = base + gi * w.group_bytes;
        const uint16_t* sc = reinterpret_cast<const uint16_t*>(gp + wbytes);
        const uint8_t* zp = gp + wbytes + 32;
        for (int r = 0; r < 16; ++r) {
          int32_t z = w.has_zeros ? int32_t(zp[r]) : (kInt4 ? 8 : 128);
          float t = 0;
          for (int64_t bb = 0; bb < bpg; ++bb) {
            int32_t dot = 0;
            for (int64_t kk = bb * QB; kk < (bb + 1) * QB; ++kk) {
              int32_t u;
              if (kInt4) {
                const uint8_t byte = gp[(kk / 8) * 64 + r * 4 + (kk % 4)];
                u = ((kk % 8) < 4) ? (byte & 15) : (byte >> 4);
              } else {
                u = gp[(kk / 4) * 64 + r * 4 + (kk % 4)];
              }
              dot += u * int32_t(q[gi * G + kk]);
            }
            int64_t b = gi * bpg + bb;
            t += d[b] * static_cast<float>(dot - z * as[b]);
          }
          acc[r] += fp16_to_fp32(sc[r]) * t;
        }
      }
      for (int r = 0; r < 16; ++r) {
        int64_t n = blk * 16 + r;
        if (n < w.N) g.y[m * g.ldy + n] = acc[r] + (g.bias ? g.bias[n] : 0.0f);
      }
    }
  }
}

template <bool kInt4>
void p_woq_sparse(const WoqGemmArgs& g, int64_t b0, int64_t b1) {
  const WoqWeights& w = *g.w;
  const WoqAct& a = *g.a;
  const int64_t G = w.G, QB = a.QB, ngroups = w.K / G, nb = w.K / QB, bpg = G / QB;
  const int64_t wbytes = layout::woq_weight_bytes(w.format, true, G);
  const int64_t sb = layout::sp24_slab_bytes(w.format);  // bytes per 32 inputs (16 rows)
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint8_t* base = w.data.data() + blk * w.block_bytes;
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* q = a.q.data() + m * w.K;
      const float* d = a.d.data() + m * nb;
      float acc[16] = {0};
      for (int64_t gi = 0; gi < ngroups; ++gi) {
        const uint8_t* gp = base + gi * w.group_bytes;
        const uint16_t* sc = reinterpret_cast<const uint16_t*>(gp + wbytes);
        const uint8_t* zp = gp + wbytes + 32;
        for (int r = 0; r < 16; ++r) {
          int32_t z = w.has_zeros ? int32_t(zp[r]) : (kInt4 ? 8 : 128);
          float t = 0;
          for (int64_t bb = 0; bb < bpg; ++bb) {
            int32_t dot = 0;
            for (int64_t s32 = bb * QB / 32; s32 < (bb + 1) * QB / 32; ++s32) {
              const uint8_t* sp = gp + s32 * sb;
              const uint8_t* cp = sp + layout::sp24_code_offset(w.format) + 3 * r;
              const uint32_t word = uint32_t(cp[0]) | uint32_t(cp[1]) << 8 | uint32_t(cp[2]) << 16;
              for (int st = 0; st < 4; ++st) {
                for (int j = 0; j < 4; ++j) {
                  const int grp = 2 * st + j / 2, code = int((word >> (3 * grp)) & 7);
                  const int64_t k = s32 * 32 + 4 * grp + (j % 2 ? layout::kPairSecond[code] : layout::kPairFirst[code]);
                  int32_t u;
                  if (kInt4) {
                    uint8_t byte = sp[(st / 2) * 64 + r * 4 + j];
                    u = (st % 2 == 0) ? (byte & 15) : (byte >> 4);
                  } else {
                    u = sp[st * 64 + r * 4 + j];
                  }
                  dot += (u - z) * int32_t(q[gi * G + k]);
                }
              }
            }
            t += d[gi * bpg + bb] * static_cast<float>(dot);
          }
          acc[r] += fp16_to_fp32(sc[r]) * t;
        }
      }
      for (int r = 0; r < 16; ++r) {
        int64_t n = blk * 16 + r;
        if (n < w.N) g.y[m * g.ldy + n] = acc[r] + (g.bias ? g.bias[n] : 0.0f);
      }
    }
  }
}

void p_woq_int4(const WoqGemmArgs& g, int64_t b0, int64_t b1) { p_woq_dense<true>(g, b0, b1); }
void p_woq_int8(const WoqGemmArgs& g, int64_t b0, int64_t b1) { p_woq_dense<false>(g, b0, b1); }
void p_woq_int4_sp(const WoqGemmArgs& g, int64_t b0, int64_t b1) { p_woq_sparse<true>(g, b0, b1); }
void p_woq_int8_sp(const WoqGemmArgs& g, int64_t b0, int64_t b1) { p_woq_sparse<false>(g, b0, b1); }

// ------------------------------------------------------------------------------------------------
// fp32 GEMM on the packed [Np/16][K][16] layout
// ------------------------------------------------------------------------------------------------
void p_f32_gemm(const F32GemmArgs& g, int64_t p0, int64_t p1) {
  const F32Weights& w = *g.w;
  for (int64_t p = p0; p < p1; ++p) {
    const float* wp = w.data.data() + p * w.K * 16;
    int64_t n0 = p * 16, cnt = std::min<int64_t>(16, w.N - n0);
    for (int64_t m0 = 0; m0 < g.M; m0 += 4) {
      int64_t mr = std::min<int64_t>(4, g.M - m0);
      float acc[4][16] = {{0}};
      for (int64_t k = 0; k < g.K; ++k) {
        const float* wk = wp + k * 16;
        for (int64_t r = 0; r < mr; ++r) {
          float xv = g.x[(m0 + r) * g.ldx + k];
          for (int c = 0; c < 16; ++c) acc[r][c] += xv * wk[c];
        }
      }
      for (int64_t r = 0; r < mr; ++r) {
        float* y = g.y + (m0 + r) * g.ldy + n0;
        for (int64_t c = 0; c < cnt; ++c) {
          float v = acc[r][c] + (g.bias ? g.bias[n0 + c] : 0.0f);
          y[c] = g.accumulate ? y[c] + v : v;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Attention (portable): one task = kv head kvh, query rows [i0, i1) of every head in its group.
// ------------------------------------------------------------------------------------------------
void p_attn_task(const AttentionArgs& a, int64_t kvh, int64_t i0, int64_t i1) {
  const int64_t grp = a.n_heads / a.n_kv_heads, D = a.head_dim;
  thread_local std::vector<float> sbuf;
  if (static_cast<int64_t>(sbuf.size()) < a.n_kv) sbuf.resize(static_cast<size_t>(a.n_kv));
  float* s = sbuf.data();
  const float* kb = a.k + kvh * a.k_head_stride;
  const float* vb = a.v + kvh * a.v_head_stride;
  float o[256];
  for (int64_t hh = 0; hh < grp; ++hh) {
    const int64_t h = kvh * grp + hh;
    for (int64_t i = i0; i < i1; ++i) {
      const float* q = a.q + i * a.q_ld + h * D;
      int64_t T = a.causal ? std::min(a.n_kv, a.q_pos0 + i + 1) : a.n_kv;
      float* out = a.out + i * a.out_ld + h * D;
      if (T <= 0) {
        for (int64_t d = 0; d < D; ++d) out[d] = 0;
        continue;
      }
      for (int64_t t = 0; t < T; ++t) {
        const float* kr = kb + t * a.k_ld;
        float acc[kLanes] = {0};
        int64_t d = 0;
        for (; d + kLanes <= D; d += kLanes)
          for (int l = 0; l < kLanes; ++l) acc[l] += q[d + l] * kr[d + l];
        float sum = 0;
        for (; d < D; ++d) sum += q[d] * kr[d];
        for (int l = 0; l < kLanes; ++l) sum += acc[l];
        s[t] = sum * a.scale;
      }
      float mx = p_max(s, T);
      for (int64_t t = 0; t < T; ++t) s[t] = p_exp(s[t] - mx);
      float l = p_sum(s, T);
      for (int64_t d = 0; d < D; ++d) o[d] = 0;
      for (int64_t t = 0; t < T; ++t) {
        const float* vr = vb + t * a.v_ld;
        const float p = s[t];
        for (int64_t d = 0; d < D; ++d) o[d] += p * vr[d];
      }
      const float inv = 1.0f / l;
      for (int64_t d = 0; d < D; ++d) out[d] = o[d] * inv;
    }
  }
}

// A table filled with the portable entries (ISA files override what they accelerate).
inline void p_f16_to_f32(const uint16_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(x[i]);
}
inline void p_f32_to_f16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}

inline KernelTable portable_table(Isa isa) {
  KernelTable t;
  t.isa = isa;
  t.w8a8_quant = p_w8a8_quant;
  t.w8a8_gemm = p_w8a8_gemm;
  t.w8a8_gemm_fuses_shadow = false;
  t.w8a8_rowmajor = false;
  t.w8a8_shadow = p_w8a8_shadow;
  t.woq_quant_row = p_woq_quant_row;
  t.woq_int4 = p_woq_int4;
  t.woq_int8 = p_woq_int8;
  t.woq_int4_sp = p_woq_int4_sp;
  t.woq_int8_sp = p_woq_int8_sp;
  t.f32_gemm = p_f32_gemm;
  t.rmsnorm_row = p_rmsnorm_row;
  t.layernorm_row = p_layernorm_row;
  t.softmax_row = p_softmax_row;
  t.silu = p_silu_n;
  t.gelu_erf = p_gelu_erf_n;
  t.gelu_tanh = p_gelu_tanh_n;
  t.swiglu = p_swiglu_n;
  t.rope_row = p_rope_row;
  t.attn_task = p_attn_task;
  t.f16_to_f32 = p_f16_to_f32;
  t.f32_to_f16 = p_f32_to_f16;
  return t;
}

}  // namespace
