// AVX-512 attention (fp32). Two paths:
//  * many query rows per task (chunked prefill, ViT): rows become the 32 lanes of two zmm registers;
//    S^T = K . Q^T is computed 8 keys x 32 rows at a time (Q^T packed once per task, K read in place),
//    online softmax runs vertically over the lanes (flash-attention style, key blocks of 64), and
//    O += P V runs per pair of rows with O in registers.
//  * few rows (decode, small GQA groups): per row, 16 keys at a time with a transpose-reduce of 16 dot
//    products, two-pass softmax, then O += p V. It reads K/V as fp32 or, from an fp16 KV cache, as fp16
//    widened in registers (vcvtph2ps), which gives the same result as on rows widened beforehand.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "portable.h"
#include "x86_avx512_common.h"

namespace edgemm {
namespace kernels {
namespace impl {
namespace {

// Sums each of 16 vectors: result lane i = sum of all lanes of v[i].
EDGEMM_INLINE __m512 hsum16(__m512 (&v)[16]) {
  __m512 x[8];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  // x[i] per 128-bit lane: (a02, b02, a13, b13) for a = v[2i], b = v[2i+1]
  __m512 y[4];
  for (int i = 0; i < 4; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
  // y[i] per 128-bit lane L: partial sums (over lane L) of v[4i..4i+3]
  __m512 z[2];
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88),   // L0, L2 | L0, L2
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));  // L1, L3 | L1, L3
  // z[i] = (v[8i..8i+3] over L0+L1, v[8i..] over L2+L3, v[8i+4..] over L0+L1, v[8i+4..] over L2+L3)
  // final 128-bit lane c holds the totals of v[4c..4c+3]
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

EDGEMM_INLINE __m512 load_kv(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
EDGEMM_INLINE __m512 load_kv(const uint16_t* p, __mmask16 m) { return load_fp16(p, m); }

// KV = float (a.k / a.v) or uint16_t (fp16, a.k16 / a.v16). False if the score buffer cannot be had.
template <int ND, typename KV>
bool attn_rows_direct(const AttentionArgs& a, int64_t kvh, int64_t i0, int64_t i1) {
  const int64_t grp = a.n_heads / a.n_kv_heads, D = a.head_dim;
  const __mmask16 dm = tail_mask(D - (ND - 1) * 16);
  thread_local AlignedBuffer<float> sbuf;
  if (!sbuf.resize(size_t(a.n_kv + 16))) return false;
  float* s = sbuf.data();
  const KV* kb;
  const KV* vb;
  if constexpr (std::is_same_v<KV, float>) {
    kb = a.k + kvh * a.k_head_stride;
    vb = a.v + kvh * a.v_head_stride;
  } else {
    kb = a.k16 + kvh * a.k_head_stride;
    vb = a.v16 + kvh * a.v_head_stride;
  }
  for (int64_t hh = 0; hh < grp; ++hh) {
    const int64_t h = kvh * grp + hh;
    for (int64_t i = i0; i < i1; ++i) {
      const float* q = a.q + i * a.q_ld + h * D;
      float* out = a.out + i * a.out_ld + h * D;
      const int64_t T = a.causal ? std::min(a.n_kv, a.q_pos0 + i + 1) : a.n_kv;
      if (T <= 0) {
        for (int64_t d = 0; d < D; ++d) out[d] = 0;
        continue;
      }
      __m512 qv[ND];
      const __m512 vsc = _mm512_set1_ps(a.scale);
      for (int j = 0; j < ND; ++j)
        qv[j] = _mm512_mul_ps(vsc, _mm512_maskz_loadu_ps(j == ND - 1 ? dm : __mmask16(0xffff), q + 16 * j));
      __m512 vmax = _mm512_set1_ps(-INFINITY);
      for (int64_t t0 = 0; t0 < T; t0 += 16) {
        const int64_t nt = std::min<int64_t>(16, T - t0);
        __m512 acc[16];
#pragma GCC unroll 16
        for (int tt = 0; tt < 16; ++tt) {
          const KV* kr = kb + std::min<int64_t>(t0 + tt, T - 1) * a.k_ld;
          __m512 s0 = _mm512_mul_ps(qv[0], load_kv(kr, ND == 1 ? dm : __mmask16(0xffff)));
#pragma GCC unroll 16
          for (int j = 1; j < ND; ++j)
            s0 = _mm512_fmadd_ps(qv[j], load_kv(kr + 16 * j, j == ND - 1 ? dm : __mmask16(0xffff)), s0);
          acc[tt] = s0;
        }
        const __mmask16 tm = tail_mask(nt);
        const __m512 sv = hsum16(acc);
        vmax = _mm512_mask_max_ps(vmax, tm, vmax, sv);
        _mm512_mask_storeu_ps(s + t0, tm, sv);
      }
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
      __m512 lsum = _mm512_setzero_ps();
      for (int64_t t0 = 0; t0 < T; t0 += 16) {
        const __mmask16 tm = tail_mask(T - t0);
        __m512 p = _mm512_maskz_mov_ps(tm, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tm, s + t0), mx)));
        lsum = _mm512_add_ps(lsum, p);
        _mm512_mask_storeu_ps(s + t0, tm, p);
      }
      __m512 o[ND];
      for (int j = 0; j < ND; ++j) o[j] = _mm512_setzero_ps();
      for (int64_t t = 0; t < T; ++t) {
        const KV* vr = vb + t * a.v_ld;
        const __m512 p = _mm512_set1_ps(s[t]);
#pragma GCC unroll 16
        for (int j = 0; j < ND; ++j)
          o[j] = _mm512_fmadd_ps(p, load_kv(vr + 16 * j, j == ND - 1 ? dm : __mmask16(0xffff)), o[j]);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(lsum));
      for (int j = 0; j < ND; ++j)
        _mm512_mask_storeu_ps(out + 16 * j, j == ND - 1 ? dm : __mmask16(0xffff), _mm512_mul_ps(o[j], inv));
    }
  }
  return true;
}

constexpr int64_t kKeyBlock = 64;

// O rows (l0, l1) += sum_t P[t][l] * V[t]; O rows first scaled by alpha. NR = 1 or 2 rows.
template <int ND, int NR>
EDGEMM_INLINE void attn_pv(float* O, int64_t D, const float* P, const float* alpha, int l0,
                           const float* vb, int64_t v_ld, int64_t nk, __mmask16 dm) {
  __m512 o[NR][ND];
  for (int r = 0; r < NR; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[l0 + r]);
    for (int j = 0; j < ND; ++j) o[r][j] = _mm512_mul_ps(al, _mm512_load_ps(O + (l0 + r) * 256 + 16 * j));
  }
  for (int64_t t = 0; t < nk; ++t) {
    const float* vr = vb + t * v_ld;
    __m512 p[NR];
    for (int r = 0; r < NR; ++r) p[r] = _mm512_set1_ps(P[t * 32 + l0 + r]);
#pragma GCC unroll 16
    for (int j = 0; j < ND; ++j) {
      const __m512 v = _mm512_maskz_loadu_ps(j == ND - 1 ? dm : __mmask16(0xffff), vr + 16 * j);
      for (int r = 0; r < NR; ++r) o[r][j] = _mm512_fmadd_ps(p[r], v, o[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < ND; ++j) _mm512_store_ps(O + (l0 + r) * 256 + 16 * j, o[r][j]);
  (void)D;
}

template <int ND>
void attn_rows_block(const AttentionArgs& a, int64_t kvh, int64_t i0, int64_t i1) {
  const int64_t grp = a.n_heads / a.n_kv_heads, D = a.head_dim, nrows = i1 - i0, R = grp * nrows;
  const __mmask16 dm = tail_mask(D - (ND - 1) * 16);
  thread_local AlignedBuffer<float> qt_buf, o_buf, p_buf;
  if (!qt_buf.resize(size_t(256 * 32)) || !o_buf.resize(size_t(32 * 256)) ||
      !p_buf.resize(size_t(kKeyBlock * 32)))
    return p_attn_task(a, kvh, i0, i1);
  float* QT = qt_buf.data();
  float* O = o_buf.data();
  float* P = p_buf.data();
  const float* kbase = a.k + kvh * a.k_head_stride;
  const float* vbase = a.v + kvh * a.v_head_stride;
  alignas(64) float alpha[32];
  alignas(64) int32_t lim[32];
  for (int64_t rb = 0; rb < R; rb += 32) {
    const int nl = static_cast<int>(std::min<int64_t>(32, R - rb));
    // Lane l <-> query row i0 + (rb + l) / grp, head kvh * grp + (rb + l) % grp.
    int64_t tmax = 1;
    for (int l = 0; l < 32; ++l) {
      if (l < nl) {
        const int64_t r = rb + l, i = i0 + r / grp, h = kvh * grp + r % grp;
        const float* q = a.q + i * a.q_ld + h * D;
        for (int64_t d = 0; d < D; ++d) QT[d * 32 + l] = q[d] * a.scale;
        const int64_t T = a.causal ? std::min(a.n_kv, a.q_pos0 + i + 1) : a.n_kv;
        lim[l] = static_cast<int32_t>(T);
        tmax = std::max(tmax, T);
      } else {
        for (int64_t d = 0; d < D; ++d) QT[d * 32 + l] = 0.0f;
        lim[l] = 1;
      }
    }
    for (int l = 0; l < nl; ++l)
      for (int j = 0; j < ND; ++j) _mm512_store_ps(O + l * 256 + 16 * j, _mm512_setzero_ps());
    const __m512i lim0 = _mm512_load_si512(lim), lim1 = _mm512_load_si512(lim + 16);
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    __m512 l0 = _mm512_setzero_ps(), l1 = l0;
    for (int64_t kb = 0; kb < tmax; kb += kKeyBlock) {
      const int64_t nk = std::min(kKeyBlock, tmax - kb);
      // S^T[t][lane] for 8 keys at a time.
      for (int64_t t8 = 0; t8 < nk; t8 += 8) {
        const float* kr[8];
        for (int tt = 0; tt < 8; ++tt) kr[tt] = kbase + (kb + std::min<int64_t>(t8 + tt, nk - 1)) * a.k_ld;
        __m512 acc[8][2];
#pragma GCC unroll 8
        for (int tt = 0; tt < 8; ++tt) acc[tt][0] = acc[tt][1] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; ++d) {
          const __m512 qa = _mm512_load_ps(QT + d * 32), qb = _mm512_load_ps(QT + d * 32 + 16);
#pragma GCC unroll 8
          for (int tt = 0; tt < 8; ++tt) {
            const __m512 kv = _mm512_set1_ps(kr[tt][d]);
            acc[tt][0] = _mm512_fmadd_ps(kv, qa, acc[tt][0]);
            acc[tt][1] = _mm512_fmadd_ps(kv, qb, acc[tt][1]);
          }
        }
#pragma GCC unroll 8
        for (int tt = 0; tt < 8; ++tt) {
          _mm512_store_ps(P + (t8 + tt) * 32, acc[tt][0]);
          _mm512_store_ps(P + (t8 + tt) * 32 + 16, acc[tt][1]);
        }
      }
      // Mask, new max, probabilities.
      const __m512 ninf = _mm512_set1_ps(-INFINITY);
      __m512 n0 = m0, n1 = m1;
      for (int64_t t = 0; t < nk; ++t) {
        const __m512i key = _mm512_set1_epi32(static_cast<int32_t>(kb + t));
        const __mmask16 k0 = _mm512_cmpgt_epi32_mask(lim0, key), k1 = _mm512_cmpgt_epi32_mask(lim1, key);
        const __m512 s0 = _mm512_mask_mov_ps(ninf, k0, _mm512_load_ps(P + t * 32));
        const __m512 s1 = _mm512_mask_mov_ps(ninf, k1, _mm512_load_ps(P + t * 32 + 16));
        _mm512_store_ps(P + t * 32, s0);
        _mm512_store_ps(P + t * 32 + 16, s1);
        n0 = _mm512_max_ps(n0, s0);
        n1 = _mm512_max_ps(n1, s1);
      }
      const __m512 a0 = exp512(_mm512_sub_ps(m0, n0)), a1 = exp512(_mm512_sub_ps(m1, n1));
      __m512 s0sum = _mm512_setzero_ps(), s1sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < nk; ++t) {
        const __m512 p0 = exp512(_mm512_sub_ps(_mm512_load_ps(P + t * 32), n0));
        const __m512 p1 = exp512(_mm512_sub_ps(_mm512_load_ps(P + t * 32 + 16), n1));
        s0sum = _mm512_add_ps(s0sum, p0);
        s1sum = _mm512_add_ps(s1sum, p1);
        _mm512_store_ps(P + t * 32, p0);
        _mm512_store_ps(P + t * 32 + 16, p1);
      }
      l0 = _mm512_fmadd_ps(l0, a0, s0sum);
      l1 = _mm512_fmadd_ps(l1, a1, s1sum);
      m0 = n0;
      m1 = n1;
      _mm512_store_ps(alpha, a0);
      _mm512_store_ps(alpha + 16, a1);
      const float* vb = vbase + kb * a.v_ld;
      int l = 0;
      if (ND <= 8)
        for (; l + 2 <= nl; l += 2) attn_pv<ND, 2>(O, D, P, alpha, l, vb, a.v_ld, nk, dm);
      for (; l < nl; ++l) attn_pv<ND, 1>(O, D, P, alpha, l, vb, a.v_ld, nk, dm);
    }
    alignas(64) float lsum[32];
    _mm512_store_ps(lsum, l0);
    _mm512_store_ps(lsum + 16, l1);
    for (int l = 0; l < nl; ++l) {
      const int64_t r = rb + l, i = i0 + r / grp, h = kvh * grp + r % grp;
      float* out = a.out + i * a.out_ld + h * D;
      const __m512 inv = _mm512_set1_ps(1.0f / lsum[l]);
      for (int j = 0; j < ND; ++j)
        _mm512_mask_storeu_ps(out + 16 * j, j == ND - 1 ? dm : __mmask16(0xffff),
                              _mm512_mul_ps(_mm512_load_ps(O + l * 256 + 16 * j), inv));
    }
  }
}

template <int ND>
void attn_nd(const AttentionArgs& a, int64_t kvh, int64_t i0, int64_t i1) {
  const int64_t grp = a.n_heads / a.n_kv_heads;
  if (grp * (i1 - i0) >= kAttnFewRows)
    attn_rows_block<ND>(a, kvh, i0, i1);
  else if (!attn_rows_direct<ND, float>(a, kvh, i0, i1))
    p_attn_task(a, kvh, i0, i1);
}

template <int ND>
bool attn_nd_f16(const AttentionArgs& a, int64_t kvh, int64_t i0, int64_t i1) {
  return attn_rows_direct<ND, uint16_t>(a, kvh, i0, i1);
}

// head_dim rounded up to a multiple of 16 -> the ND instantiation of `fn`.
#define EDGEMM_ATTN_BY_ND(fn)                                          \
  switch ((a.head_dim + 15) / 16) {                                    \
    case 1: return fn<1>(a, kvh, i0, i1);                              \
    case 2: return fn<2>(a, kvh, i0, i1);                              \
    case 3: return fn<3>(a, kvh, i0, i1);                              \
    case 4: return fn<4>(a, kvh, i0, i1);                              \
    case 5: return fn<5>(a, kvh, i0, i1);                              \
    case 6: return fn<6>(a, kvh, i0, i1);                              \
    case 7: return fn<7>(a, kvh, i0, i1);                              \
    case 8: return fn<8>(a, kvh, i0, i1);                              \
    case 9: return fn<9>(a, kvh, i0, i1);                              \
    case 10: return fn<10>(a, kvh, i0, i1);                            \
    case 11: return fn<11>(a, kvh, i0, i1);                            \
    case 12: return fn<12>(a, kvh, i0, i1);                            \
    case 13: return fn<13>(a, kvh, i0, i1);                            \
    case 14: return fn<14>(a, kvh, i0, i1);                            \
    case 15: return fn<15>(a, kvh, i0, i1);                            \
    default: return fn<16>(a, kvh, i0, i1);                            \
  }

}  // namespace

void avx512_attn_task(const AttentionArgs& a, int64_t kvh, int64_t i0, int64_t i1) { EDGEMM_ATTN_BY_ND(attn_nd) }
bool avx512_attn_task_f16(const AttentionArgs& a, int64_t kvh, int64_t i0, int64_t i1) { EDGEMM_ATTN_BY_ND(attn_nd_f16) }
#undef EDGEMM_ATTN_BY_ND

}  // namespace impl
}  // namespace kernels
}  // namespace edgemm
