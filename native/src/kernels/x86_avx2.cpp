// AVX2 + FMA + F16C kernels (x86-64 without AVX-512 VNNI: Zen 2/3, Haswell..Comet Lake, Alder Lake
// P+E). Integer dot products use vpmaddubsw (u8 x s8 -> saturating int16 pairs) + vpmaddwd:
//  * W8A8: the sign trick |a| x sign(w, a) keeps every int16 pair sum <= 2*128*127 (no saturation).
//  * int4: nibbles (<= 15) x int8 pairs are <= 3810, so 8 pair sums accumulate in int16 exactly.
//  * int8 weight-only: stored (q + 128) is turned back to q and the sign trick is used.
// Everything else (quantizers, 2:4 sparse, attention, elementwise) is the portable code compiled with
// the AVX2 flags.
#include <immintrin.h>

#include "portable.h"

namespace edgemm {
namespace kernels {
namespace impl {
namespace {

#define EDGEMM_INLINE inline __attribute__((always_inline))

EDGEMM_INLINE __m256i tail_store_mask(int64_t rem) {  // lanes < rem set
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(rem < 8 ? (rem < 0 ? 0 : rem) : 8)), idx);
}

// ------------------------------------------------------------------------------------------------
// W8A8 GEMM: 4 rows x 16 columns (one panel) per micro-tile.
// ------------------------------------------------------------------------------------------------
#define EDGEMM_AVX2_ROW(r)                                                                   \
  {                                                                                          \
    const __m256i as = _mm256_xor_si256(_mm256_set1_epi32(ap[r]), flip);                     \
    const __m256i ua = _mm256_abs_epi8(as);                                                  \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(_mm256_maddubs_epi16(ua, _mm256_sign_epi8(b0, as)), ones)); \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(_mm256_maddubs_epi16(ua, _mm256_sign_epi8(b1, as)), ones)); \
  }

// The packed 16x4 block of a k4 step holds column c at bytes 4c..4c+3: a ymm covers columns 0-7, the
// next columns 8-15, so int32 lane i of the results is column i (+8).
void w8a8_tile(const W8A8GemmArgs& g, const int8_t* w, int64_t k4_stride, const uint8_t* a, int rows, int64_t n0,
               float* y) {
  const __m256i flip = _mm256_set1_epi8(char(0x80)), ones = _mm256_set1_epi16(1);
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00;
  const int64_t k4n = g.Kp / 4;
  for (int half = 0; half < 2; ++half) {  // rows 0-3, then 4-7 of the 8-row activation tile
    if (half == 1 && rows <= 4) break;
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = _mm256_setzero_si256();
    const int32_t* ap = reinterpret_cast<const int32_t*>(a) + half * 4;
    const int8_t* wp = w;
    for (int64_t k4 = 0; k4 < k4n; ++k4) {
      const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wp));
      const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wp + 32));
      EDGEMM_AVX2_ROW(0) EDGEMM_AVX2_ROW(1) EDGEMM_AVX2_ROW(2) EDGEMM_AVX2_ROW(3)
      wp += k4_stride;
      ap += 8;
    }
    const __m256 sa = _mm256_set1_ps(g.s_a);
    __m256 sc0 = _mm256_mul_ps(sa, _mm256_loadu_ps(g.wscale + n0));
    __m256 sc1 = _mm256_mul_ps(sa, _mm256_loadu_ps(g.wscale + n0 + 8));
    __m256 bi0 = _mm256_setzero_ps(), bi1 = bi0;
    const __m256i m0 = tail_store_mask(g.N - n0), m1 = tail_store_mask(g.N - n0 - 8);
    if (g.bias) {
      bi0 = _mm256_maskload_ps(g.bias + n0, m0);
      bi1 = _mm256_maskload_ps(g.bias + n0 + 8, m1);
    }
    __m256i acc[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    for (int r = 0; r < 4; ++r) {
      const int row = half * 4 + r;
      if (row >= rows) break;
      float* yr = y + row * g.ldy + n0;
      __m256 v0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]), sc0, bi0);
      __m256 v1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][1]), sc1, bi1);
      if (g.accumulate) {
        v0 = _mm256_add_ps(v0, _mm256_maskload_ps(yr, m0));
        v1 = _mm256_add_ps(v1, _mm256_maskload_ps(yr + 8, m1));
      }
      _mm256_maskstore_ps(yr, m0, v0);
      _mm256_maskstore_ps(yr + 8, m1, v1);
    }
  }
}

void w8a8_gemm(const W8A8GemmArgs& g, int64_t p0, int64_t p1, int64_t t0, int64_t t1) {
  for (int64_t p = p0; p < p1; ++p) {
    const layout::W8A8PanelPos pp = layout::w8a8_panel(p, g.Kp, g.Np);
    for (int64_t t = t0; t < t1; ++t) {
      const int rows = static_cast<int>(std::min<int64_t>(8, g.M - t * 8));
      w8a8_tile(g, g.w + pp.base, pp.k4_stride, g.a + t * g.Kp * 8, rows, p * 16, g.y + t * 8 * g.ldy);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Weight-only dense: one 16-row block, one activation row at a time (M is small in decode).
// ------------------------------------------------------------------------------------------------
template <bool kInt4>
void woq_dense(const WoqGemmArgs& g, int64_t b0, int64_t b1) {
  const WoqWeights& w = *g.w;
  const WoqAct& a = *g.a;
  const int64_t G = w.G, QB = a.QB, ngroups = w.K / G, nb = w.K / QB, bpg = G / QB;
  const int64_t wbytes = layout::woq_weight_bytes(w.format, false, G);
  const __m256i nib = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint8_t* base = w.data.data() + blk * w.block_bytes;
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* q = a.q.data() + m * w.K;
      const float* d = a.d.data() + m * nb;
      const int32_t* as = a.asum.data() + m * nb;
      __m256 f0 = _mm256_setzero_ps(), f1 = f0;
      for (int64_t gi = 0; gi < ngroups; ++gi) {
        const uint8_t* gp = base + gi * w.group_bytes;
        const __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gp + wbytes)));
        const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gp + wbytes + 16)));
        // Zero point as seen by this kernel: int4 codes are used as stored; int8 codes as q = stored - 128.
        __m256i z0, z1;
        if (w.has_zeros) {
          z0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(gp + wbytes + 32)));
          z1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(gp + wbytes + 40)));
          if (!kInt4) {
            z0 = _mm256_sub_epi32(z0, _mm256_set1_epi32(128));
            z1 = _mm256_sub_epi32(z1, _mm256_set1_epi32(128));
          }
        } else {
          z0 = z1 = _mm256_set1_epi32(kInt4 ? 8 : 0);
        }
        __m256 t0 = _mm256_setzero_ps(), t1 = t0;
        for (int64_t bb = 0; bb < bpg; ++bb) {
          const int64_t b = gi * bpg + bb, k0 = b * QB;
          __m256i i0 = _mm256_setzero_si256(), i1 = i0;
          if (kInt4) {
            const uint8_t* cp = gp + bb * (QB / 8) * 64;
            for (int64_t c0 = 0; c0 < QB / 8; c0 += 4) {  // 4 chunks = 8 maddubs per half: exact in int16
              __m256i h0 = _mm256_setzero_si256(), h1 = h0;
              const int64_t cend = std::min<int64_t>(c0 + 4, QB / 8);
              for (int64_t c = c0; c < cend; ++c) {
                const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp + c * 64));
                const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp + c * 64 + 32));
                const int32_t* qa = reinterpret_cast<const int32_t*>(q + k0 + c * 8);
                const __m256i alo = _mm256_set1_epi32(qa[0]), ahi = _mm256_set1_epi32(qa[1]);
                h0 = _mm256_add_epi16(h0, _mm256_maddubs_epi16(_mm256_and_si256(v0, nib), alo));
                h0 = _mm256_add_epi16(h0, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), nib), ahi));
                h1 = _mm256_add_epi16(h1, _mm256_maddubs_epi16(_mm256_and_si256(v1, nib), alo));
                h1 = _mm256_add_epi16(h1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), nib), ahi));
              }
              i0 = _mm256_add_epi32(i0, _mm256_madd_epi16(h0, ones));
              i1 = _mm256_add_epi32(i1, _mm256_madd_epi16(h1, ones));
            }
          } else {
            const uint8_t* cp = gp + bb * (QB / 4) * 64;
            for (int64_t c = 0; c < QB / 4; ++c) {
              const __m256i x0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp + c * 64)), flip);
              const __m256i x1 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp + c * 64 + 32)), flip);
              const __m256i av = _mm256_set1_epi32(reinterpret_cast<const int32_t*>(q + k0)[c]);
              i0 = _mm256_add_epi32(i0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x0), _mm256_sign_epi8(av, x0)), ones));
              i1 = _mm256_add_epi32(i1, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x1), _mm256_sign_epi8(av, x1)), ones));
            }
          }
          const __m256i asb = _mm256_set1_epi32(as[b]);
          i0 = _mm256_sub_epi32(i0, _mm256_mullo_epi32(z0, asb));
          i1 = _mm256_sub_epi32(i1, _mm256_mullo_epi32(z1, asb));
          const __m256 db = _mm256_set1_ps(d[b]);
          t0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), db, t0);
          t1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), db, t1);
        }
        f0 = _mm256_fmadd_ps(s0, t0, f0);
        f1 = _mm256_fmadd_ps(s1, t1, f1);
      }
      const int64_t n0 = blk * 16;
      const __m256i m0 = tail_store_mask(w.N - n0), m1 = tail_store_mask(w.N - n0 - 8);
      if (g.bias) {
        f0 = _mm256_add_ps(f0, _mm256_maskload_ps(g.bias + n0, m0));
        f1 = _mm256_add_ps(f1, _mm256_maskload_ps(g.bias + n0 + 8, m1));
      }
      _mm256_maskstore_ps(g.y + m * g.ldy + n0, m0, f0);
      _mm256_maskstore_ps(g.y + m * g.ldy + n0 + 8, m1, f1);
    }
  }
}
void woq_int4(const WoqGemmArgs& g, int64_t b0, int64_t b1) { woq_dense<true>(g, b0, b1); }
void woq_int8(const WoqGemmArgs& g, int64_t b0, int64_t b1) { woq_dense<false>(g, b0, b1); }

// ------------------------------------------------------------------------------------------------
// fp32 GEMM: 6 rows x 16 columns, A broadcast from the row-major input, full K per tile.
// ------------------------------------------------------------------------------------------------
#define EDGEMM_F32_ROW(r)                                          \
  if (MR > r) {                                                    \
    const __m256 av = _mm256_broadcast_ss(x##r + k);               \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);                    \
    c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);                    \
  }

template <int MR>
void f32_tile(const F32GemmArgs& g, const float* wp, int64_t m0, int64_t n0) {
  const float* x0 = g.x + m0 * g.ldx;
  const float* x1 = x0 + (MR > 1 ? g.ldx : 0);
  const float* x2 = x0 + (MR > 2 ? 2 * g.ldx : 0);
  const float* x3 = x0 + (MR > 3 ? 3 * g.ldx : 0);
  const float* x4 = x0 + (MR > 4 ? 4 * g.ldx : 0);
  const float* x5 = x0 + (MR > 5 ? 5 * g.ldx : 0);
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < g.K; ++k) {
    const __m256 b0 = _mm256_load_ps(wp + k * 16), b1 = _mm256_load_ps(wp + k * 16 + 8);
    EDGEMM_F32_ROW(0) EDGEMM_F32_ROW(1) EDGEMM_F32_ROW(2) EDGEMM_F32_ROW(3) EDGEMM_F32_ROW(4) EDGEMM_F32_ROW(5)
  }
  const __m256i nm0 = tail_store_mask(g.w->N - n0), nm1 = tail_store_mask(g.w->N - n0 - 8);
  __m256 bi0 = _mm256_setzero_ps(), bi1 = bi0;
  if (g.bias) {
    bi0 = _mm256_maskload_ps(g.bias + n0, nm0);
    bi1 = _mm256_maskload_ps(g.bias + n0 + 8, nm1);
  }
  __m256 acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < MR; ++r) {
    float* yr = g.y + (m0 + r) * g.ldy + n0;
    __m256 v0 = _mm256_add_ps(acc[r][0], bi0), v1 = _mm256_add_ps(acc[r][1], bi1);
    if (g.accumulate) {
      v0 = _mm256_add_ps(v0, _mm256_maskload_ps(yr, nm0));
      v1 = _mm256_add_ps(v1, _mm256_maskload_ps(yr + 8, nm1));
    }
    _mm256_maskstore_ps(yr, nm0, v0);
    _mm256_maskstore_ps(yr + 8, nm1, v1);
  }
}

void f32_gemm(const F32GemmArgs& g, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* wp = g.w->data.data() + p * g.K * 16;
    int64_t m = 0;
    for (; m + 6 <= g.M; m += 6) f32_tile<6>(g, wp, m, p * 16);
    switch (g.M - m) {
      case 5: f32_tile<5>(g, wp, m, p * 16); break;
      case 4: f32_tile<4>(g, wp, m, p * 16); break;
      case 3: f32_tile<3>(g, wp, m, p * 16); break;
      case 2: f32_tile<2>(g, wp, m, p * 16); break;
      case 1: f32_tile<1>(g, wp, m, p * 16); break;
      default: break;
    }
  }
}

// fp16 rows with F16C (round to nearest even, as the scalar helper).
void f16_to_f32(const uint16_t* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  for (; i < n; ++i) y[i] = fp16_to_fp32(x[i]);
}
void f32_to_f16(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}

}  // namespace

const KernelTable* table_avx2() {
  static const KernelTable t = [] {
    KernelTable k = portable_table(Isa::kAvx2);
    k.w8a8_gemm = w8a8_gemm;
    k.woq_int4 = woq_int4;
    k.woq_int8 = woq_int8;
    k.f32_gemm = f32_gemm;
    k.f16_to_f32 = f16_to_f32;
    k.f32_to_f16 = f32_to_f16;
    return k;
  }();
  return &t;
}

}  // namespace impl
}  // namespace kernels
}  // namespace edgemm
