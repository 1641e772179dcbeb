// AVX-512 (F/BW/VL/DQ) + VNNI kernels. Compiled with -mavx512{f,bw,vl,dq,vnni}; only called when
// cpuid reports those features. The 2:4 sparse kernels (which need VBMI) are in x86_avx512_vbmi.cpp.
#include <immintrin.h>

#include "cpu_features.h"
#include "portable.h"
#include "x86_avx512_common.h"

namespace edgemm {
namespace kernels {
namespace impl {
namespace {

// ------------------------------------------------------------------------------------------------
// W8A8 activation quantization into the [Mp/8][Kp/4][8][4] tile layout
// ------------------------------------------------------------------------------------------------
void w8a8_quant(const float* x, int64_t ldx, int64_t K, float s_a, uint8_t* packed, int64_t Kp,
                int32_t* row_sum, int64_t r0, int64_t r1, std::vector<Outlier>* outliers) {
  const __m512i c128 = _mm512_set1_epi32(128);
  // Transpose 8 rows x 4 dwords (one 16-byte vector per row) into 4 k4-chunks x 8 rows.
  const __m512i perm = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const __m512i perm2 = _mm512_add_epi32(perm, _mm512_set1_epi32(2));
  std::vector<Outlier> row_out[8];
  for (int64_t t0 = r0 - r0 % 8; t0 < r1; t0 += 8) {
    uint8_t* tile = packed + (t0 / 8) * Kp * 8;
    const int nrows = static_cast<int>(std::min<int64_t>(8, r1 - t0));
    __m512i rsum[8];
    for (int r = 0; r < 8; ++r) rsum[r] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 lm = tail_mask(K - k);
      __m128i bytes[8];
      for (int r = 0; r < 8; ++r) {
        if (r >= nrows) {
          bytes[r] = _mm_set1_epi8(char(128));
          continue;
        }
        const __m512i c = w8a8_codes16(x + (t0 + r) * ldx, k, lm, s_a, t0 + r, &row_out[r]);
        rsum[r] = _mm512_add_epi32(rsum[r], c);
        bytes[r] = _mm512_cvtepi32_epi8(_mm512_add_epi32(c, c128));
      }
      __m512i za = _mm512_inserti32x4(_mm512_castsi128_si512(bytes[0]), bytes[1], 1);
      za = _mm512_inserti32x4(za, bytes[2], 2);
      za = _mm512_inserti32x4(za, bytes[3], 3);
      __m512i zb = _mm512_inserti32x4(_mm512_castsi128_si512(bytes[4]), bytes[5], 1);
      zb = _mm512_inserti32x4(zb, bytes[6], 2);
      zb = _mm512_inserti32x4(zb, bytes[7], 3);
      __m512i o0 = _mm512_permutex2var_epi32(za, perm, zb);   // chunks k/4, k/4+1
      __m512i o1 = _mm512_permutex2var_epi32(za, perm2, zb);  // chunks k/4+2, k/4+3
      uint8_t* dst = tile + (k / 4) * 32;
      const int64_t chunks = std::min<int64_t>(4, (Kp - k) / 4);
      if (chunks == 4) {
        _mm512_storeu_si512(dst, o0);
        _mm512_storeu_si512(dst + 64, o1);
      } else {
        const __mmask16 m0 = chunks >= 2 ? __mmask16(0xffff) : __mmask16(0x00ff);
        _mm512_mask_storeu_epi32(dst, m0, o0);
        if (chunks > 2) _mm512_mask_storeu_epi32(dst + 64, __mmask16(0x00ff), o1);
      }
    }
    for (int r = 0; r < nrows; ++r) {
      row_sum[t0 + r] = _mm512_reduce_add_epi32(rsum[r]);
      if (!row_out[r].empty()) {
        outliers->insert(outliers->end(), row_out[r].begin(), row_out[r].end());
        row_out[r].clear();
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// W8A8 GEMM: 8 rows x NP panels (16 columns each) micro-kernel, full K in registers. Accumulators are
// named locals (GCC spills arrays of vectors passed by reference).
// ------------------------------------------------------------------------------------------------
#define EDGEMM_W8A8_ROW(r)                                              \
  {                                                                     \
    const __m512i av = _mm512_set1_epi32(ap[r]);                        \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, av, b0);                     \
    if (NP > 1) c##r##1 = _mm512_dpbusd_epi32(c##r##1, av, b1);         \
    if (NP > 2) c##r##2 = _mm512_dpbusd_epi32(c##r##2, av, b2);         \
  }
#define EDGEMM_W8A8_STORE(r)                                                               \
  if (r < rows) {                                                                          \
    float* yr = y + r * ldy;                                                               \
    store(yr, r, 0, c##r##0);                                                              \
    if (NP > 1) store(yr, r, 1, c##r##1);                                                  \
    if (NP > 2) store(yr, r, 2, c##r##2);                                                  \
  }

struct W8A8Epi {
  __m512 scale[3], bias[3], wscale[3];
  __m512i corr[3];
  __mmask16 nmask[3];
  bool accumulate;
  // Fused shadow: outliers of row m are outliers[orow[m] .. orow[m+1]); wg = this panel group's packed
  // weights, np its panel count.
  const Outlier* outliers;
  const int32_t* orow;
  const int8_t* wg;
  int np;
};

// One 8-row tile (rows m0..m0+7) over all k4 steps, then the dequant epilogue into y.
template <int NP>
EDGEMM_INLINE void w8a8_tile(const uint8_t* a, const int8_t* w, int64_t k4n, const W8A8Epi& e, int rows,
                             float* y, int64_t ldy, int64_t m0) {
  const __m512i z = _mm512_setzero_si512();
  __m512i c00 = z, c01 = z, c02 = z, c10 = z, c11 = z, c12 = z, c20 = z, c21 = z, c22 = z, c30 = z,
          c31 = z, c32 = z, c40 = z, c41 = z, c42 = z, c50 = z, c51 = z, c52 = z, c60 = z, c61 = z,
          c62 = z, c70 = z, c71 = z, c72 = z;
  const int32_t* ap = reinterpret_cast<const int32_t*>(a);
  // The NP panels of a group are interleaved: each k4 step reads NP * 64 contiguous bytes.
  for (int64_t k4 = 0; k4 < k4n; ++k4) {
    const __m512i b0 = _mm512_load_si512(w);
    const __m512i b1 = NP > 1 ? _mm512_load_si512(w + 64) : b0;
    const __m512i b2 = NP > 2 ? _mm512_load_si512(w + 128) : b0;
    EDGEMM_W8A8_ROW(0) EDGEMM_W8A8_ROW(1) EDGEMM_W8A8_ROW(2) EDGEMM_W8A8_ROW(3)
    EDGEMM_W8A8_ROW(4) EDGEMM_W8A8_ROW(5) EDGEMM_W8A8_ROW(6) EDGEMM_W8A8_ROW(7)
    w += NP * 64;
    ap += 8;
  }
  auto store = [&](float* yr, int r, int q, __m512i acc) {
    __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, e.corr[q]));
    v = _mm512_fmadd_ps(v, e.scale[q], e.bias[q]);
    if (e.accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(e.nmask[q], yr + q * 16));
    if (e.orow) {  // fused shadow outliers of this row (same operations as w8a8_shadow)
      const int64_t m = m0 + r;
      for (int32_t i = e.orow[m]; i < e.orow[m + 1]; ++i) {
        const int32_t k = e.outliers[i].k;
        __m512i c = _mm512_load_si512(e.wg + (k / 4) * e.np * 64 + q * 64);
        c = _mm512_srai_epi32(_mm512_sll_epi32(c, _mm_cvtsi32_si128(24 - 8 * (k % 4))), 24);
        const __m512 col = _mm512_mul_ps(_mm512_cvtepi32_ps(c), e.wscale[q]);
        v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_set1_ps(e.outliers[i].residual), col));
      }
    }
    _mm512_mask_storeu_ps(yr + q * 16, e.nmask[q], v);
  };
  EDGEMM_W8A8_STORE(0) EDGEMM_W8A8_STORE(1) EDGEMM_W8A8_STORE(2) EDGEMM_W8A8_STORE(3)
  EDGEMM_W8A8_STORE(4) EDGEMM_W8A8_STORE(5) EDGEMM_W8A8_STORE(6) EDGEMM_W8A8_STORE(7)
}

template <int NP>
void w8a8_panels(const W8A8GemmArgs& g, int64_t p, int64_t t0, int64_t t1) {
  const int64_t k4n = g.Kp / 4;
  const int8_t* w = g.w + layout::w8a8_panel(p, g.Kp, g.Np).base;
  W8A8Epi e;
  e.accumulate = g.accumulate;
  e.outliers = g.outliers;
  e.orow = g.orow;
  e.wg = w;
  e.np = NP;
  const __m512 sa = _mm512_set1_ps(g.s_a);
  for (int q = 0; q < 3; ++q) {
    const int64_t n0 = (p + std::min(q, NP - 1)) * 16;
    e.wscale[q] = _mm512_loadu_ps(g.wscale + n0);
    e.scale[q] = _mm512_mul_ps(sa, e.wscale[q]);
    e.corr[q] = _mm512_slli_epi32(_mm512_loadu_si512(g.col_sum + n0), 7);
    e.nmask[q] = tail_mask(g.N - n0);
    e.bias[q] = g.bias ? _mm512_maskz_loadu_ps(e.nmask[q], g.bias + n0) : _mm512_setzero_ps();
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int rows = static_cast<int>(std::min<int64_t>(8, g.M - t * 8));
    w8a8_tile<NP>(g.a + t * g.Kp * 8, w, k4n, e, rows, g.y + t * 8 * g.ldy + p * 16, g.ldy, t * 8);
  }
}

void w8a8_gemm(const W8A8GemmArgs& g, int64_t p0, int64_t p1, int64_t t0, int64_t t1) {
  int64_t p = p0;
  for (; p + 3 <= p1; p += 3) w8a8_panels<3>(g, p, t0, t1);
  if (p1 - p == 2) w8a8_panels<2>(g, p, t0, t1);
  if (p1 - p == 1) w8a8_panels<1>(g, p, t0, t1);
}

// ------------------------------------------------------------------------------------------------
// Shadow outliers: y[m, n0:n1] += r * W[:, k] * s_w
// ------------------------------------------------------------------------------------------------
void w8a8_shadow(const ShadowArgs& s, int64_t n0, int64_t n1) {
  const W8A8Weights& w = *s.w;
  n1 = std::min(n1, w.N);
  const int64_t P = w.Np / 16;
  // One panel group (48 outputs) at a time: the cold columns are decoded from that group's packed
  // region (ascending channels = ascending addresses, TLB/prefetch friendly) straight into registers and
  // applied to every outlier of the channel; the touched y segments stay in L1/L2.
  for (int64_t p = n0 / 16; p * 16 < n1; p += 3) {
    const int64_t np = std::min<int64_t>(3, P - p);
    const int8_t* gbase = w.data.data() + layout::w8a8_panel(p, w.Kp, w.Np).base;
    __mmask16 nm[3];
    __m512 ws[3];
    for (int q = 0; q < 3; ++q) {
      nm[q] = q < np ? tail_mask(n1 - (p + q) * 16) : __mmask16(0);
      ws[q] = q < np ? _mm512_loadu_ps(w.weight_scale.data() + (p + q) * 16) : _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < s.n_k; ++g) {
      const int32_t k = s.outliers[s.k_begin[g]].k;
      const int32_t hi = w.hot_index.empty() ? -1 : w.hot_index[k];
      __m512 col[3];
      if (hi >= 0) {
        const float* hc = w.hot_cols.data() + int64_t(hi) * w.Np + p * 16;
        for (int q = 0; q < 3; ++q) col[q] = _mm512_maskz_loadu_ps(nm[q], hc + 16 * q);
      } else {
        const __m128i vshift = _mm_cvtsi32_si128(24 - 8 * (k % 4)), v24 = _mm_cvtsi32_si128(24);
        const int8_t* src = gbase + (k / 4) * np * 64;
        for (int q = 0; q < 3; ++q) {
          if (q >= np) {
            col[q] = _mm512_setzero_ps();
            continue;
          }
          __m512i v = _mm512_load_si512(src + q * 64);
          v = _mm512_sra_epi32(_mm512_sll_epi32(v, vshift), v24);
          col[q] = _mm512_mul_ps(_mm512_cvtepi32_ps(v), ws[q]);
        }
      }
      for (int64_t i = s.k_begin[g]; i < s.k_begin[g + 1]; ++i) {
        float* y = s.y + int64_t(s.outliers[i].m) * s.ldy + p * 16;
        const __m512 r = _mm512_set1_ps(s.outliers[i].residual);
        for (int q = 0; q < np; ++q) {
          const __m512 yv = _mm512_maskz_loadu_ps(nm[q], y + 16 * q);
          _mm512_mask_storeu_ps(y + 16 * q, nm[q], _mm512_add_ps(yv, _mm512_mul_ps(r, col[q])));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Weight-only activation quantization
// ------------------------------------------------------------------------------------------------
// fp16 rows (round to nearest even, as the scalar helper).
void f16_to_f32(const uint16_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, m, load_fp16(x + i, m));
  }
}
void f32_to_f16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm256_mask_storeu_epi16(y + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, x + i), _MM_FROUND_TO_NEAREST_INT));
  }
}

void woq_quant_row(const float* x, int64_t K, int64_t QB, int8_t* q, float* d, int32_t* asum) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t b = 0; b * QB < K; ++b) {
    const float* xb = x + b * QB;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t i = 0; i < QB; i += 16)
      mx = _mm512_max_ps(mx, _mm512_and_ps(_mm512_loadu_ps(xb + i), absmask));
    const float amax = _mm512_reduce_max_ps(mx);
    d[b] = amax / 127.0f;
    const __m512 id = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
    __m512i s = _mm512_setzero_si512();
    for (int64_t i = 0; i < QB; i += 16) {
      __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), id));
      s = _mm512_add_epi32(s, c);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * QB + i), _mm512_cvtepi32_epi8(c));
    }
    asum[b] = _mm512_reduce_add_epi32(s);
  }
}

// ------------------------------------------------------------------------------------------------
// Weight-only dense GEMV / GEMM over 16-row blocks. MT activation rows share each unpacked chunk.
// ------------------------------------------------------------------------------------------------
template <bool kInt4, int MT>
EDGEMM_INLINE void woq_dense_rows(const WoqGemmArgs& g, const uint8_t* base, int64_t blk, int64_t m0) {
  const WoqWeights& w = *g.w;
  const WoqAct& a = *g.a;
  const int64_t G = w.G, QB = a.QB, ngroups = w.K / G, nb = w.K / QB, bpg = G / QB;
  const int64_t wbytes = layout::woq_weight_bytes(w.format, false, G);
  const int32_t zsym = kInt4 ? 8 : 128;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  const int8_t* q[MT];
  const float* d[MT];
  const int32_t* as[MT];
  __m512 facc[MT];
  for (int i = 0; i < MT; ++i) {
    q[i] = a.q.data() + (m0 + i) * w.K;
    d[i] = a.d.data() + (m0 + i) * nb;
    as[i] = a.asum.data() + (m0 + i) * nb;
    facc[i] = _mm512_setzero_ps();
  }
  for (int64_t gi = 0; gi < ngroups; ++gi) {
    const uint8_t* gp = base + gi * w.group_bytes;
    prefetch_group(gp, w.group_bytes, 2048);
    const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gp + wbytes)));
    __m512i zv = _mm512_set1_epi32(zsym);
    if (w.has_zeros)
      zv = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gp + wbytes + 32)));
    __m512 tsum[MT];
    for (int i = 0; i < MT; ++i) tsum[i] = _mm512_setzero_ps();
    for (int64_t bb = 0; bb < bpg; ++bb) {
      const int64_t b = gi * bpg + bb;
      const int64_t k0 = b * QB;
      __m512i acc0[MT], acc1[MT];
      for (int i = 0; i < MT; ++i) acc0[i] = acc1[i] = _mm512_setzero_si512();
      if (kInt4) {
        const uint8_t* cp = gp + bb * (QB / 8) * 64;
        for (int64_t c = 0; c < QB / 8; ++c) {
          const __m512i v = _mm512_loadu_si512(cp + c * 64);
          const __m512i lo = _mm512_and_si512(v, nib);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
          for (int i = 0; i < MT; ++i) {
            const int32_t* qa = reinterpret_cast<const int32_t*>(q[i] + k0 + c * 8);
            acc0[i] = _mm512_dpbusd_epi32(acc0[i], lo, _mm512_set1_epi32(qa[0]));
            acc1[i] = _mm512_dpbusd_epi32(acc1[i], hi, _mm512_set1_epi32(qa[1]));
          }
        }
      } else {
        const uint8_t* cp = gp + bb * (QB / 4) * 64;
        for (int64_t c = 0; c < QB / 4; c += 2) {
          const __m512i v0 = _mm512_loadu_si512(cp + c * 64);
          const __m512i v1 = _mm512_loadu_si512(cp + c * 64 + 64);
          for (int i = 0; i < MT; ++i) {
            const int32_t* qa = reinterpret_cast<const int32_t*>(q[i] + k0 + c * 4);
            acc0[i] = _mm512_dpbusd_epi32(acc0[i], v0, _mm512_set1_epi32(qa[0]));
            acc1[i] = _mm512_dpbusd_epi32(acc1[i], v1, _mm512_set1_epi32(qa[1]));
          }
        }
      }
      for (int i = 0; i < MT; ++i) {
        __m512i s = _mm512_add_epi32(acc0[i], acc1[i]);
        s = _mm512_sub_epi32(s, _mm512_mullo_epi32(zv, _mm512_set1_epi32(as[i][b])));
        tsum[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(d[i][b]), tsum[i]);
      }
    }
    for (int i = 0; i < MT; ++i) facc[i] = _mm512_fmadd_ps(sc, tsum[i], facc[i]);
  }
  const int64_t n0 = blk * 16, rem = w.N - n0;
  const __mmask16 m = rem >= 16 ? __mmask16(0xffff) : __mmask16((1u << rem) - 1);
  const __m512 bias = g.bias ? _mm512_maskz_loadu_ps(m, g.bias + n0) : _mm512_setzero_ps();
  for (int i = 0; i < MT; ++i)
    _mm512_mask_storeu_ps(g.y + (m0 + i) * g.ldy + n0, m, _mm512_add_ps(facc[i], bias));
}

template <bool kInt4>
void woq_dense(const WoqGemmArgs& g, int64_t b0, int64_t b1) {
  const WoqWeights& w = *g.w;
  const int64_t M = g.a->M;
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint8_t* base = w.data.data() + blk * w.block_bytes;
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) woq_dense_rows<kInt4, 4>(g, base, blk, m0);
    for (; m0 + 2 <= M; m0 += 2) woq_dense_rows<kInt4, 2>(g, base, blk, m0);
    for (; m0 < M; ++m0) woq_dense_rows<kInt4, 1>(g, base, blk, m0);
  }
}
void woq_int4(const WoqGemmArgs& g, int64_t b0, int64_t b1) { woq_dense<true>(g, b0, b1); }
void woq_int8(const WoqGemmArgs& g, int64_t b0, int64_t b1) { woq_dense<false>(g, b0, b1); }

// ------------------------------------------------------------------------------------------------
// fp32 GEMM: K blocks of KC; A block packed [M/8][KC][8]; 8 x 48 register tile accumulated into y.
// ------------------------------------------------------------------------------------------------
constexpr int64_t kF32Kc = 128;

#define EDGEMM_F32_ROW(r)                                              \
  {                                                                    \
    const __m512 av = _mm512_set1_ps(ap[r]);                           \
    c##r##0 = _mm512_fmadd_ps(av, b0, c##r##0);                        \
    if (NP > 1) c##r##1 = _mm512_fmadd_ps(av, b1, c##r##1);            \
    if (NP > 2) c##r##2 = _mm512_fmadd_ps(av, b2, c##r##2);            \
  }
#define EDGEMM_F32_STORE(r)                    \
  if (r < rows) {                              \
    float* yr = y + r * ldy;                   \
    store(yr, 0, c##r##0);                     \
    if (NP > 1) store(yr, 1, c##r##1);         \
    if (NP > 2) store(yr, 2, c##r##2);         \
  }

// 8 rows x NP panels over kc inputs; adds into y (or overwrites when `first` and not accumulating).
template <int NP>
EDGEMM_INLINE void f32_tile(const float* ap, const float* w, int64_t pstride, int64_t kc, int rows, float* y,
                            int64_t ldy, const __m512 (&bias)[3], const __mmask16 (&nmask)[3], bool load_y) {
  const __m512 z = _mm512_setzero_ps();
  __m512 c00 = z, c01 = z, c02 = z, c10 = z, c11 = z, c12 = z, c20 = z, c21 = z, c22 = z, c30 = z, c31 = z,
         c32 = z, c40 = z, c41 = z, c42 = z, c50 = z, c51 = z, c52 = z, c60 = z, c61 = z, c62 = z, c70 = z,
         c71 = z, c72 = z;
  const float* w1 = w + (NP > 1 ? pstride : 0);
  const float* w2 = w + (NP > 2 ? 2 * pstride : 0);
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(w);
    const __m512 b1 = NP > 1 ? _mm512_load_ps(w1) : b0;
    const __m512 b2 = NP > 2 ? _mm512_load_ps(w2) : b0;
    EDGEMM_F32_ROW(0) EDGEMM_F32_ROW(1) EDGEMM_F32_ROW(2) EDGEMM_F32_ROW(3)
    EDGEMM_F32_ROW(4) EDGEMM_F32_ROW(5) EDGEMM_F32_ROW(6) EDGEMM_F32_ROW(7)
    w += 16;
    w1 += 16;
    w2 += 16;
    ap += 8;
  }
  auto store = [&](float* yr, int q, __m512 acc) {
    __m512 v = _mm512_add_ps(acc, bias[q]);
    if (load_y) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(nmask[q], yr + q * 16));
    _mm512_mask_storeu_ps(yr + q * 16, nmask[q], v);
  };
  EDGEMM_F32_STORE(0) EDGEMM_F32_STORE(1) EDGEMM_F32_STORE(2) EDGEMM_F32_STORE(3)
  EDGEMM_F32_STORE(4) EDGEMM_F32_STORE(5) EDGEMM_F32_STORE(6) EDGEMM_F32_STORE(7)
}

template <int NP>
void f32_panels(const F32GemmArgs& g, const float* apack, int64_t p, int64_t kb, int64_t kc, bool first,
                bool last) {
  const F32Weights& w = *g.w;
  const int64_t pstride = w.K * 16;
  const float* wp = w.data.data() + p * pstride + kb * 16;
  __mmask16 nmask[3];
  __m512 bias[3];
  for (int q = 0; q < 3; ++q) {
    const int64_t n0 = (p + std::min(q, NP - 1)) * 16;
    nmask[q] = tail_mask(w.N - n0);
    bias[q] = (last && g.bias) ? _mm512_maskz_loadu_ps(nmask[q], g.bias + n0) : _mm512_setzero_ps();
  }
  const int64_t mt = (g.M + 7) / 8;
  const bool load_y = !first || g.accumulate;
  for (int64_t t = 0; t < mt; ++t) {
    const int rows = static_cast<int>(std::min<int64_t>(8, g.M - t * 8));
    f32_tile<NP>(apack + t * kc * 8, wp, pstride, kc, rows, g.y + t * 8 * g.ldy + p * 16, g.ldy, bias, nmask,
                 load_y);
  }
}

void f32_gemm(const F32GemmArgs& g, int64_t p0, int64_t p1) {
  thread_local AlignedBuffer<float> apack;
  const int64_t mt = (g.M + 7) / 8;
  if (!apack.resize(size_t(mt * 8 * kF32Kc))) return p_f32_gemm(g, p0, p1);
  for (int64_t kb = 0; kb < g.K; kb += kF32Kc) {
    const int64_t kc = std::min(kF32Kc, g.K - kb);
    // Pack A[:, kb:kb+kc] as [tile][k][8 rows] (rows past M are zero).
    for (int64_t t = 0; t < mt; ++t) {
      float* dst = apack.data() + t * kc * 8;
      for (int r = 0; r < 8; ++r) {
        const int64_t m = t * 8 + r;
        if (m < g.M) {
          const float* src = g.x + m * g.ldx + kb;
          for (int64_t k = 0; k < kc; ++k) dst[k * 8 + r] = src[k];
        } else {
          for (int64_t k = 0; k < kc; ++k) dst[k * 8 + r] = 0.0f;
        }
      }
    }
    const bool first = kb == 0, last = kb + kc >= g.K;
    int64_t p = p0;
    for (; p + 3 <= p1; p += 3) f32_panels<3>(g, apack.data(), p, kb, kc, first, last);
    if (p1 - p == 2) f32_panels<2>(g, apack.data(), p, kb, kc, first, last);
    if (p1 - p == 1) f32_panels<1>(g, apack.data(), p, kb, kc, first, last);
  }
}

// ------------------------------------------------------------------------------------------------
// Elementwise: exp-based activations and softmax with a vector exp.
// ------------------------------------------------------------------------------------------------
void silu_n(const float* x, float* y, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), v));
    _mm512_mask_storeu_ps(y + i, m, _mm512_div_ps(v, _mm512_add_ps(one, e)));
  }
}
void swiglu_n(const float* gt, const float* up, float* y, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, gt + i);
    __m512 u = _mm512_maskz_loadu_ps(m, up + i);
    __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), v));
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(one, e)), u));
  }
}
void gelu_tanh_n(const float* x, float* y, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f), c0 = _mm512_set1_ps(-2.0f * 0.7978845608028654f),
               c1 = _mm512_set1_ps(0.044715f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(c1, v), _mm512_mul_ps(v, v), v);
    __m512 e = exp512(_mm512_mul_ps(c0, inner));
    _mm512_mask_storeu_ps(y + i, m, _mm512_div_ps(v, _mm512_add_ps(one, e)));
  }
}
void gelu_erf_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    __m512 e = erfc512(_mm512_mul_ps(_mm512_set1_ps(-0.70710678118654752f), v));
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), e));
  }
}
void softmax_row(float* x, int64_t n) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, x + i));
  }
  float mv = _mm512_reduce_max_ps(mx);
  if (mv == -INFINITY) mv = 0;
  const __m512 vm = _mm512_set1_ps(mv);
  __m512 s = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vm));
    e = _mm512_maskz_mov_ps(m, e);
    s = _mm512_add_ps(s, e);
    _mm512_mask_storeu_ps(x + i, m, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(s));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv));
  }
}

}  // namespace

const KernelTable* table_avx512() {
  static const KernelTable t = [] {
    KernelTable k = portable_table(Isa::kAvx512Vnni);
    k.w8a8_quant = w8a8_quant;
    k.w8a8_gemm = w8a8_gemm;
    k.w8a8_gemm_fuses_shadow = true;
    k.w8a8_shadow = w8a8_shadow;
    k.woq_quant_row = woq_quant_row;
    k.f16_to_f32 = f16_to_f32;
    k.f32_to_f16 = f32_to_f16;
    k.woq_int4 = woq_int4;
    k.woq_int8 = woq_int8;
    if (avx512_vbmi_supported()) {
      k.woq_int4_sp = avx512vbmi_woq_int4_sparse;
      k.woq_int8_sp = avx512vbmi_woq_int8_sparse;
      k.woq_sp_tab = avx512vbmi_woq_sp_tab;
    }
    k.f32_gemm = f32_gemm;
    k.silu = silu_n;
    k.swiglu = swiglu_n;
    k.gelu_tanh = gelu_tanh_n;
    k.gelu_erf = gelu_erf_n;
    k.softmax_row = softmax_row;
    k.attn_task = avx512_attn_task;
    k.attn_task_f16 = avx512_attn_task_f16;
#if defined(EDGEMM_HAVE_AVX512BF16)
    if (cpu_features().avx512bf16) {  // the AMX table replaces these where the CPU has AMX-BF16
      k.attn_bf16_pack = avx512bf16_attn_pack;
      k.attn_bf16_task = avx512bf16_attn_task;
    }
#endif
    return k;
  }();
  return &t;
}

}  // namespace impl
}  // namespace kernels
}  // namespace edgemm
