// BF16 attention with AVX512-BF16 dot products (vdpbf16ps), for CPUs that have AVX512_BF16 but no
// AMX (AMD Zen 4, Intel Cooper Lake). The numeric contract is the AMX path's (kernels.h, allow_bf16):
// q * scale, K and V rounded to bf16 (nearest even), fp32 scores, online softmax in fp32, probabilities
// rounded to bf16 for P V with fp32 accumulation, normalized by the fp32 sum of the unrounded ones.
//
// Structure follows the fp32 block path of x86_avx512_attn.cpp (32 query rows in the lanes of two zmm,
// O rows in memory, P V per key block of 64), with each multiply-add over a *pair* of elements:
//  * S^T = K . Q^T: Q^T packed once per row block as bf16 pairs [D/2][32 lanes] (one dword per lane and
//    pair of dims); a key's pair of dims is broadcast as one dword: one vdpbf16ps = 16 rows x 2 dims.
//    Every score of the row block is kept ([T][32] fp32), so the probabilities are rounded against the
//    final row maximum (two passes, as the AMX path and the contract's reference), not a running one.
//  * O += P V: P converted to bf16 pairs over keys [nk/2][32 lanes]; V packed as [T/2][D][2] (a pair of
//    keys per dword): one vdpbf16ps = 16 dims x 2 keys.
// Packed per kv head by avx512bf16_attn_pack (dispatch.cpp's attention() owns the buffers):
//   kp: [Tp][D] bf16 row-major; vp: [Tp/2][D][2] bf16; rows >= T are zero (Tp = attn_bf16_padded(T)).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "portable.h"
#include "x86_avx512_common.h"

namespace edgemm {
namespace kernels {
namespace impl {
namespace {

constexpr int64_t kKeyBlock = 64;

EDGEMM_INLINE uint16_t bf16_bits(float x) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

EDGEMM_INLINE void store_bf16x16(uint16_t* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// 16 dwords (bf16(a[l]) | bf16(b[l]) << 16) for the 16 lanes of a and b.
EDGEMM_INLINE __m512i pair16(__m512 a, __m512 b) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

template <int ND>  // ND = head_dim / 16, even (head_dim % 32 == 0)
void attn_bf16_rows(const AttentionArgs& a, const uint16_t* kp, const uint16_t* vp, int64_t kvh, int64_t i0,
                    int64_t i1) {
  const int64_t grp = a.n_heads / a.n_kv_heads, D = a.head_dim, nrows = i1 - i0, R = grp * nrows;
  constexpr int64_t DP = ND * 8;  // pairs of dims
  thread_local AlignedBuffer<uint32_t> qt_buf, pb_buf;
  thread_local AlignedBuffer<float> o_buf, s_buf;
  const int64_t Tall = attn_bf16_padded(a.n_kv);
  if (!qt_buf.resize(size_t(DP * 32)) || !o_buf.resize(size_t(32 * 256)) || !s_buf.resize(size_t(Tall * 32)) ||
      !pb_buf.resize(size_t(kKeyBlock / 2 * 32)))
    return avx512_attn_task(a, kvh, i0, i1);
  uint32_t* QT = qt_buf.data();
  uint32_t* PB = pb_buf.data();
  float* O = o_buf.data();
  float* S = s_buf.data();  // all scores of the row block, [t][32 lanes]: two passes, as the contract
  alignas(64) int32_t lim[32];
  for (int64_t rb = 0; rb < R; rb += 32) {
    const int nl = static_cast<int>(std::min<int64_t>(32, R - rb));
    // Lane l <-> query row i0 + (rb + l) / grp, head kvh * grp + (rb + l) % grp.
    int64_t tmax = 1;
    for (int l = 0; l < 32; ++l) {
      if (l < nl) {
        const int64_t r = rb + l, i = i0 + r / grp, h = kvh * grp + r % grp;
        const float* q = a.q + i * a.q_ld + h * D;
        for (int64_t p = 0; p < DP; ++p)
          QT[p * 32 + l] = uint32_t(bf16_bits(q[2 * p] * a.scale)) | uint32_t(bf16_bits(q[2 * p + 1] * a.scale)) << 16;
        const int64_t T = a.causal ? std::min(a.n_kv, a.q_pos0 + i + 1) : a.n_kv;
        lim[l] = static_cast<int32_t>(T);
        tmax = std::max(tmax, T);
      } else {
        for (int64_t p = 0; p < DP; ++p) QT[p * 32 + l] = 0;
        lim[l] = 1;
      }
    }
    const __m512i lim0 = _mm512_load_si512(lim), lim1 = _mm512_load_si512(lim + 16);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    // Pass 1: S^T[t][lane] for 8 keys at a time (keys past tmax repeat the last one and are not stored),
    // masked, and the row maxima.
    __m512 m0 = ninf, m1 = ninf;
    for (int64_t t8 = 0; t8 < tmax; t8 += 8) {
      const uint32_t* kr[8];
      for (int tt = 0; tt < 8; ++tt)
        kr[tt] = reinterpret_cast<const uint32_t*>(kp + std::min<int64_t>(t8 + tt, tmax - 1) * D);
      __m512 acc[8][2];
#pragma GCC unroll 8
      for (int tt = 0; tt < 8; ++tt) acc[tt][0] = acc[tt][1] = _mm512_setzero_ps();
      for (int64_t p = 0; p < DP; ++p) {
        const __m512bh qa = (__m512bh)_mm512_load_si512(QT + p * 32);
        const __m512bh qb = (__m512bh)_mm512_load_si512(QT + p * 32 + 16);
#pragma GCC unroll 8
        for (int tt = 0; tt < 8; ++tt) {
          const __m512bh kv = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(kr[tt][p]));
          acc[tt][0] = _mm512_dpbf16_ps(acc[tt][0], qa, kv);
          acc[tt][1] = _mm512_dpbf16_ps(acc[tt][1], qb, kv);
        }
      }
      const int nt = static_cast<int>(std::min<int64_t>(8, tmax - t8));
      for (int tt = 0; tt < nt; ++tt) {
        const __m512i key = _mm512_set1_epi32(static_cast<int32_t>(t8 + tt));
        const __m512 s0 = _mm512_mask_mov_ps(ninf, _mm512_cmpgt_epi32_mask(lim0, key), acc[tt][0]);
        const __m512 s1 = _mm512_mask_mov_ps(ninf, _mm512_cmpgt_epi32_mask(lim1, key), acc[tt][1]);
        _mm512_store_ps(S + (t8 + tt) * 32, s0);
        _mm512_store_ps(S + (t8 + tt) * 32 + 16, s1);
        m0 = _mm512_max_ps(m0, s0);
        m1 = _mm512_max_ps(m1, s1);
      }
    }
    for (int l = 0; l < nl; ++l)
      for (int j = 0; j < ND; ++j) _mm512_store_ps(O + l * 256 + 16 * j, _mm512_setzero_ps());
    // Pass 2, per key block: probabilities against the final maxima (fp32 sums of the unrounded ones),
    // bf16 pairs over keys, O += P V.
    __m512 l0 = _mm512_setzero_ps(), l1 = l0;
    for (int64_t kb = 0; kb < tmax; kb += kKeyBlock) {
      const int64_t nk = std::min(kKeyBlock, tmax - kb), np = (nk + 1) / 2;
      for (int64_t tp = 0; tp < np; ++tp) {  // an odd last key pairs with probability 0
        const float* s = S + (kb + 2 * tp) * 32;
        const bool has1 = 2 * tp + 1 < nk;
        const __m512 z = _mm512_setzero_ps();
        const __m512 a0 = exp512(_mm512_sub_ps(_mm512_load_ps(s), m0));
        const __m512 a1 = exp512(_mm512_sub_ps(_mm512_load_ps(s + 16), m1));
        const __m512 b0 = has1 ? exp512(_mm512_sub_ps(_mm512_load_ps(s + 32), m0)) : z;
        const __m512 b1 = has1 ? exp512(_mm512_sub_ps(_mm512_load_ps(s + 48), m1)) : z;
        l0 = _mm512_add_ps(l0, _mm512_add_ps(a0, b0));
        l1 = _mm512_add_ps(l1, _mm512_add_ps(a1, b1));
        _mm512_store_si512(PB + tp * 32, pair16(a0, b0));
        _mm512_store_si512(PB + tp * 32 + 16, pair16(a1, b1));
      }
      const uint16_t* vb = vp + kb * D;  // key pair kb / 2 (kb is a multiple of kKeyBlock: even)
      for (int l = 0; l < nl; l += 2) {
        const int nr = std::min(2, nl - l);
        __m512 o[2][ND];
        for (int r = 0; r < 2; ++r)
          for (int j = 0; j < ND; ++j) o[r][j] = r < nr ? _mm512_load_ps(O + (l + r) * 256 + 16 * j) : _mm512_setzero_ps();
        for (int64_t tp = 0; tp < np; ++tp) {
          const __m512bh p0 = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(PB[tp * 32 + l]));
          const __m512bh p1 = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(PB[tp * 32 + std::min(l + 1, 31)]));
          const uint16_t* vr = vb + tp * 2 * D;
#pragma GCC unroll 16
          for (int j = 0; j < ND; ++j) {
            const __m512bh v = (__m512bh)_mm512_loadu_si512(vr + 32 * j);
            o[0][j] = _mm512_dpbf16_ps(o[0][j], v, p0);
            o[1][j] = _mm512_dpbf16_ps(o[1][j], v, p1);
          }
        }
        for (int r = 0; r < nr; ++r)
          for (int j = 0; j < ND; ++j) _mm512_store_ps(O + (l + r) * 256 + 16 * j, o[r][j]);
      }
    }
    alignas(64) float lsum[32];
    _mm512_store_ps(lsum, l0);
    _mm512_store_ps(lsum + 16, l1);
    for (int l = 0; l < nl; ++l) {
      const int64_t r = rb + l, i = i0 + r / grp, h = kvh * grp + r % grp;
      float* out = a.out + i * a.out_ld + h * D;
      const __m512 inv = _mm512_set1_ps(1.0f / lsum[l]);
      for (int j = 0; j < ND; ++j) _mm512_storeu_ps(out + 16 * j, _mm512_mul_ps(_mm512_load_ps(O + l * 256 + 16 * j), inv));
    }
  }
}

}  // namespace

void avx512bf16_attn_pack(const AttentionArgs& a, int64_t kvh, int64_t T, uint16_t* kp, uint16_t* vp) {
  const int64_t D = a.head_dim, Tp = attn_bf16_padded(T);
  const float* kb = a.k + kvh * a.k_head_stride;
  const float* vb = a.v + kvh * a.v_head_stride;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < D; d += 16) store_bf16x16(kp + t * D + d, _mm512_loadu_ps(kb + t * a.k_ld + d));
  std::memset(kp + T * D, 0, size_t((Tp - T) * D) * 2);
  const __m512 z = _mm512_setzero_ps();
  for (int64_t t = 0; t < Tp; t += 2) {
    uint16_t* dst = vp + t * D;  // pair t/2: [D][2]
    if (t >= T) {
      std::memset(dst, 0, size_t(2 * D) * 2);
      continue;
    }
    const float* v0 = vb + t * a.v_ld;
    const float* v1 = t + 1 < T ? vb + (t + 1) * a.v_ld : nullptr;
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_si512(dst + 2 * d, pair16(_mm512_loadu_ps(v0 + d), v1 ? _mm512_loadu_ps(v1 + d) : z));
  }
}

void avx512bf16_attn_task(const AttentionArgs& a, const uint16_t* kp, const uint16_t* vp, int64_t kvh, int64_t i0,
                          int64_t i1) {
  switch (a.head_dim / 16) {  // head_dim % 32 == 0 (dispatch.cpp)
    case 2: return attn_bf16_rows<2>(a, kp, vp, kvh, i0, i1);
    case 4: return attn_bf16_rows<4>(a, kp, vp, kvh, i0, i1);
    case 6: return attn_bf16_rows<6>(a, kp, vp, kvh, i0, i1);
    case 8: return attn_bf16_rows<8>(a, kp, vp, kvh, i0, i1);
    case 10: return attn_bf16_rows<10>(a, kp, vp, kvh, i0, i1);
    case 12: return attn_bf16_rows<12>(a, kp, vp, kvh, i0, i1);
    case 14: return attn_bf16_rows<14>(a, kp, vp, kvh, i0, i1);
    default: return attn_bf16_rows<16>(a, kp, vp, kvh, i0, i1);
  }
}

}  // namespace impl
}  // namespace kernels
}  // namespace edgemm
