// aarch64 NEON + dot-product (sdot) kernels. Compiled with -march=armv8.2-a+dotprod; used only when
// HWCAP_ASIMDDP (Linux/Android) or hw.optional.arm.FEAT_DotProd (Apple) is set.
//  * W8A8: sdot is s8 x s8, so activations are used as signed codes (stored code + 128, flipped back);
//    no column-sum correction is needed.
//  * int4: nibbles (0..15) are valid non-negative s8 values; the zero point is subtracted as z * asum.
//  * int8 weight-only: stored (q + 128) is flipped back to q.
//  * 2:4 sparse: 3-bit pattern codes index a per-8-input activation table (vqtbl2q), sdot multiplies.
// Other kernels are the portable code compiled for this target (NEON auto-vectorization).
#include <arm_neon.h>

#include "portable.h"

namespace edgemm {
namespace kernels {
namespace impl {
namespace {

inline void store_tail(float* dst, float32x4_t v, int64_t rem) {
  if (rem >= 4) {
    vst1q_f32(dst, v);
  } else if (rem > 0) {
    float tmp[4];
    vst1q_f32(tmp, v);
    for (int64_t i = 0; i < rem; ++i) dst[i] = tmp[i];
  }
}
inline float32x4_t load_tail(const float* src, int64_t rem) {
  if (rem >= 4) return vld1q_f32(src);
  float tmp[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < rem && i < 4; ++i) tmp[i] = src[i];
  return vld1q_f32(tmp);
}

// ------------------------------------------------------------------------------------------------
// W8A8 GEMM: 4 rows x 16 columns per micro-tile (16 int32x4 accumulators).
// ------------------------------------------------------------------------------------------------
#define EDGEMM_NEON_ROW(r)                               \
  c##r##0 = vdotq_laneq_s32(c##r##0, b0, av, r);         \
  c##r##1 = vdotq_laneq_s32(c##r##1, b1, av, r);         \
  c##r##2 = vdotq_laneq_s32(c##r##2, b2, av, r);         \
  c##r##3 = vdotq_laneq_s32(c##r##3, b3, av, r);

void w8a8_tile(const W8A8GemmArgs& g, const int8_t* w, int64_t k4_stride, const uint8_t* a, int rows,
               int64_t n0, float* y) {
  const uint8x16_t flip = vdupq_n_u8(0x80);
  const int64_t k4n = g.Kp / 4;
  for (int half = 0; half < 2; ++half) {
    if (half == 1 && rows <= 4) break;
    int32x4_t z = vdupq_n_s32(0);
    int32x4_t c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z, c20 = z, c21 = z,
              c22 = z, c23 = z, c30 = z, c31 = z, c32 = z, c33 = z;
    const uint8_t* ap = a + half * 16;
    const int8_t* wp = w;
    for (int64_t k4 = 0; k4 < k4n; ++k4) {
      const int8x16_t av = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(ap), flip));
      const int8x16_t b0 = vld1q_s8(wp), b1 = vld1q_s8(wp + 16), b2 = vld1q_s8(wp + 32), b3 = vld1q_s8(wp + 48);
      EDGEMM_NEON_ROW(0) EDGEMM_NEON_ROW(1) EDGEMM_NEON_ROW(2) EDGEMM_NEON_ROW(3)
      ap += 32;
      wp += k4_stride;
    }
    int32x4_t acc[4][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
    for (int r = 0; r < 4; ++r) {
      const int row = half * 4 + r;
      if (row >= rows) break;
      float* yr = y + row * g.ldy;
      for (int c = 0; c < 4; ++c) {
        const int64_t n = n0 + 4 * c, rem = g.N - n;
        if (rem <= 0) break;
        float32x4_t sc = vmulq_n_f32(load_tail(g.wscale + n, rem), g.s_a);
        float32x4_t v = vmulq_f32(vcvtq_f32_s32(acc[r][c]), sc);
        if (g.bias) v = vaddq_f32(v, load_tail(g.bias + n, rem));
        if (g.accumulate) v = vaddq_f32(v, load_tail(yr + n, rem));
        store_tail(yr + n, v, rem);
      }
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
// Weight-only dense (16-row blocks), one activation row at a time.
// ------------------------------------------------------------------------------------------------
inline float32x4_t load_f16x4(const uint8_t* p) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
}

template <bool kInt4>
void woq_dense(const WoqGemmArgs& g, int64_t b0, int64_t b1) {
  const WoqWeights& w = *g.w;
  const WoqAct& a = *g.a;
  const int64_t G = w.G, QB = a.QB, ngroups = w.K / G, nb = w.K / QB, bpg = G / QB;
  const int64_t wbytes = layout::woq_weight_bytes(w.format, false, G);
  const uint8x16_t nib = vdupq_n_u8(0x0f), flip = vdupq_n_u8(0x80);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint8_t* base = w.data.data() + blk * w.block_bytes;
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* q = a.q.data() + m * w.K;
      const float* d = a.d.data() + m * nb;
      const int32_t* as = a.asum.data() + m * nb;
      float32x4_t f[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
      for (int64_t gi = 0; gi < ngroups; ++gi) {
        const uint8_t* gp = base + gi * w.group_bytes;
        int32x4_t zv[4];
        for (int i = 0; i < 4; ++i) {
          if (w.has_zeros) {
            const uint8_t* zp = gp + wbytes + 32 + 4 * i;
            int32_t zz[4] = {zp[0], zp[1], zp[2], zp[3]};
            zv[i] = vld1q_s32(zz);
            if (!kInt4) zv[i] = vsubq_s32(zv[i], vdupq_n_s32(128));
          } else {
            zv[i] = vdupq_n_s32(kInt4 ? 8 : 0);
          }
        }
        float32x4_t t[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
        for (int64_t bb = 0; bb < bpg; ++bb) {
          const int64_t b = gi * bpg + bb, k0 = b * QB;
          int32x4_t acc[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
          if (kInt4) {
            const uint8_t* cp = gp + bb * (QB / 8) * 64;
            for (int64_t c = 0; c < QB / 8; c += 2) {  // 2 chunks per 16 activation bytes
              const int8x16_t av = vld1q_s8(q + k0 + c * 8);
              for (int cc = 0; cc < 2; ++cc) {
                const uint8_t* ch = cp + (c + cc) * 64;
                for (int i = 0; i < 4; ++i) {
                  const uint8x16_t v = vld1q_u8(ch + 16 * i);
                  const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, nib));
                  const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                  if (cc == 0) {
                    acc[i] = vdotq_laneq_s32(acc[i], lo, av, 0);
                    acc[i] = vdotq_laneq_s32(acc[i], hi, av, 1);
                  } else {
                    acc[i] = vdotq_laneq_s32(acc[i], lo, av, 2);
                    acc[i] = vdotq_laneq_s32(acc[i], hi, av, 3);
                  }
                }
              }
            }
          } else {
            const uint8_t* cp = gp + bb * (QB / 4) * 64;
            for (int64_t c = 0; c < QB / 4; c += 4) {  // 4 chunks per 16 activation bytes
              const int8x16_t av = vld1q_s8(q + k0 + c * 4);
              for (int cc = 0; cc < 4; ++cc) {
                const uint8_t* ch = cp + (c + cc) * 64;
                for (int i = 0; i < 4; ++i) {
                  const int8x16_t v = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(ch + 16 * i), flip));
                  switch (cc) {
                    case 0: acc[i] = vdotq_laneq_s32(acc[i], v, av, 0); break;
                    case 1: acc[i] = vdotq_laneq_s32(acc[i], v, av, 1); break;
                    case 2: acc[i] = vdotq_laneq_s32(acc[i], v, av, 2); break;
                    default: acc[i] = vdotq_laneq_s32(acc[i], v, av, 3); break;
                  }
                }
              }
            }
          }
          const int32x4_t asb = vdupq_n_s32(as[b]);
          for (int i = 0; i < 4; ++i) {
            const int32x4_t s = vsubq_s32(acc[i], vmulq_s32(zv[i], asb));
            t[i] = vfmaq_n_f32(t[i], vcvtq_f32_s32(s), d[b]);
          }
        }
        for (int i = 0; i < 4; ++i) f[i] = vfmaq_f32(f[i], load_f16x4(gp + wbytes + 8 * i), t[i]);
      }
      const int64_t n0 = blk * 16;
      for (int i = 0; i < 4; ++i) {
        const int64_t n = n0 + 4 * i, rem = w.N - n;
        if (rem <= 0) break;
        float32x4_t v = f[i];
        if (g.bias) v = vaddq_f32(v, load_tail(g.bias + n, rem));
        store_tail(g.y + m * g.ldy + n, v, rem);
      }
    }
  }
}
void woq_int4(const WoqGemmArgs& g, int64_t b0, int64_t b1) { woq_dense<true>(g, b0, b1); }
void woq_int8(const WoqGemmArgs& g, int64_t b0, int64_t b1) { woq_dense<false>(g, b0, b1); }

// ------------------------------------------------------------------------------------------------
// 2:4 sparse weight-only: per 8 inputs, two vqtbl1q turn the activations into a 32-byte table indexed
// by (pattern code, which kept value, which group of 4); per 4 rows, each row's 24-bit code word sits
// in a 32-bit lane, shifts and masks make the 4 table indices of a step, vqtbl2q gathers the kept
// activations and sdot multiplies. The zero point is subtracted with a second sdot on the gathered
// activations (exact in int32).
// ------------------------------------------------------------------------------------------------
template <bool kInt4>
void woq_sparse(const WoqGemmArgs& g, int64_t b0, int64_t b1) {
  const WoqWeights& w = *g.w;
  const WoqAct& a = *g.a;
  const int64_t G = w.G, QB = a.QB, ngroups = w.K / G, nb = w.K / QB, bpg = G / QB;
  const int64_t wbytes = layout::woq_weight_bytes(w.format, true, G);
  const int64_t slab = layout::sp24_slab_bytes(w.format), coff = layout::sp24_code_offset(w.format);
  const uint8x16_t nib = vdupq_n_u8(0x0f), flip = vdupq_n_u8(0x80);
  const uint32x4_t seven = vdupq_n_u32(7), pg = vdupq_n_u32(0x18100800u);
  uint8_t tix[32];  // table entry -> position in the 8 inputs (layout::sp24_table_pos)
  for (int t = 0; t < 32; ++t) tix[t] = layout::sp24_table_pos(t);
  const uint8x16_t tix0 = vld1q_u8(tix), tix1 = vld1q_u8(tix + 16);
  // Rows 4i..4i+3's code words (12 bytes) -> four 32-bit lanes.
  const uint8_t wv_ix[16] = {0, 1, 2, 255, 3, 4, 5, 255, 6, 7, 8, 255, 9, 10, 11, 255};
  const uint8x16_t words_ix = vld1q_u8(wv_ix);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint8_t* base = w.data.data() + blk * w.block_bytes;
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* q = a.q.data() + m * w.K;
      const float* d = a.d.data() + m * nb;
      float32x4_t f[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
      for (int64_t gi = 0; gi < ngroups; ++gi) {
        const uint8_t* gp = base + gi * w.group_bytes;
        int8x16_t zv[4];
        for (int i = 0; i < 4; ++i) {
          if (w.has_zeros) {
            uint8_t zz[16];
            for (int l = 0; l < 4; ++l)
              for (int j = 0; j < 4; ++j) zz[4 * l + j] = gp[wbytes + 32 + 4 * i + l];
            uint8x16_t z = vld1q_u8(zz);
            if (!kInt4) z = veorq_u8(z, flip);  // stored z + 128 -> z
            zv[i] = vreinterpretq_s8_u8(z);
          } else {
            zv[i] = vdupq_n_s8(kInt4 ? 8 : 0);
          }
        }
        float32x4_t t[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
        for (int64_t bb = 0; bb < bpg; ++bb) {
          int32x4_t acc[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
          int32x4_t zacc[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
          for (int64_t sl = 0; sl < QB / 32; ++sl) {
            const uint8_t* sp = gp + (bb * (QB / 32) + sl) * slab;
            const int64_t k0 = gi * G + (bb * (QB / 32) + sl) * 32;
            uint32x4_t words[4];
            for (int i = 0; i < 4; ++i) {
              uint8_t cw[16] = {0};
              std::memcpy(cw, sp + coff + 12 * i, 12);
              words[i] = vreinterpretq_u32_u8(vqtbl1q_u8(vld1q_u8(cw), words_ix));
            }
            for (int st = 0; st < 4; ++st) {
              const int8x8_t win = vld1_s8(q + k0 + 8 * st);
              const int8x16_t w16 = vcombine_s8(win, win);
              const int8x16x2_t table = {{vqtbl1q_s8(w16, tix0), vqtbl1q_s8(w16, tix1)}};
              const int32x4_t sh0 = vdupq_n_s32(-6 * st), sh1 = vdupq_n_s32(-6 * st - 3);
              for (int i = 0; i < 4; ++i) {
                const uint32x4_t c0 = vandq_u32(vshlq_u32(words[i], sh0), seven);
                const uint32x4_t c1 = vandq_u32(vshlq_u32(words[i], sh1), seven);
                const uint32x4_t ix = vorrq_u32(vorrq_u32(vmulq_n_u32(c0, 0x0101u), vmulq_n_u32(c1, 0x01010000u)), pg);
                const int8x16_t gth = vqtbl2q_s8(table, vreinterpretq_u8_u32(ix));
                int8x16_t wv;
                if (kInt4) {
                  const uint8x16_t v = vld1q_u8(sp + (st / 2) * 64 + 16 * i);
                  wv = vreinterpretq_s8_u8((st % 2 == 0) ? vandq_u8(v, nib) : vshrq_n_u8(v, 4));
                } else {
                  wv = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(sp + st * 64 + 16 * i), flip));
                }
                acc[i] = vdotq_s32(acc[i], wv, gth);
                zacc[i] = vdotq_s32(zacc[i], zv[i], gth);
              }
            }
          }
          const float db = d[gi * bpg + bb];
          for (int i = 0; i < 4; ++i) t[i] = vfmaq_n_f32(t[i], vcvtq_f32_s32(vsubq_s32(acc[i], zacc[i])), db);
        }
        for (int i = 0; i < 4; ++i) f[i] = vfmaq_f32(f[i], load_f16x4(gp + wbytes + 8 * i), t[i]);
      }
      const int64_t n0 = blk * 16;
      for (int i = 0; i < 4; ++i) {
        const int64_t n = n0 + 4 * i, rem = w.N - n;
        if (rem <= 0) break;
        float32x4_t v = f[i];
        if (g.bias) v = vaddq_f32(v, load_tail(g.bias + n, rem));
        store_tail(g.y + m * g.ldy + n, v, rem);
      }
    }
  }
}
void woq_int4_sp(const WoqGemmArgs& g, int64_t b0, int64_t b1) { woq_sparse<true>(g, b0, b1); }
void woq_int8_sp(const WoqGemmArgs& g, int64_t b0, int64_t b1) { woq_sparse<false>(g, b0, b1); }

// ------------------------------------------------------------------------------------------------
// fp32 GEMM: 4 rows x 16 columns, 4 k per step (vfmaq_laneq_f32).
// ------------------------------------------------------------------------------------------------
template <int MR>
void f32_tile(const F32GemmArgs& g, const float* wp, int64_t m0, int64_t n0) {
  float32x4_t acc[4][4];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = vdupq_n_f32(0);
  const float* xr[4];
  for (int r = 0; r < 4; ++r) xr[r] = g.x + (m0 + (r < MR ? r : 0)) * g.ldx;
  int64_t k = 0;
  for (; k + 4 <= g.K; k += 4) {
    float32x4_t av[MR];
    for (int r = 0; r < MR; ++r) av[r] = vld1q_f32(xr[r] + k);
    for (int kk = 0; kk < 4; ++kk) {
      const float* b = wp + (k + kk) * 16;
      const float32x4_t b0 = vld1q_f32(b), b1 = vld1q_f32(b + 4), b2 = vld1q_f32(b + 8), b3 = vld1q_f32(b + 12);
      for (int r = 0; r < MR; ++r) {
        float32x4_t x;
        switch (kk) {
          case 0: x = vdupq_laneq_f32(av[r], 0); break;
          case 1: x = vdupq_laneq_f32(av[r], 1); break;
          case 2: x = vdupq_laneq_f32(av[r], 2); break;
          default: x = vdupq_laneq_f32(av[r], 3); break;
        }
        acc[r][0] = vfmaq_f32(acc[r][0], b0, x);
        acc[r][1] = vfmaq_f32(acc[r][1], b1, x);
        acc[r][2] = vfmaq_f32(acc[r][2], b2, x);
        acc[r][3] = vfmaq_f32(acc[r][3], b3, x);
      }
    }
  }
  for (; k < g.K; ++k) {
    const float* b = wp + k * 16;
    for (int r = 0; r < MR; ++r) {
      const float32x4_t x = vdupq_n_f32(xr[r][k]);
      for (int c = 0; c < 4; ++c) acc[r][c] = vfmaq_f32(acc[r][c], vld1q_f32(b + 4 * c), x);
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* yr = g.y + (m0 + r) * g.ldy;
    for (int c = 0; c < 4; ++c) {
      const int64_t n = n0 + 4 * c, rem = g.w->N - n;
      if (rem <= 0) break;
      float32x4_t v = acc[r][c];
      if (g.bias) v = vaddq_f32(v, load_tail(g.bias + n, rem));
      if (g.accumulate) v = vaddq_f32(v, load_tail(yr + n, rem));
      store_tail(yr + n, v, rem);
    }
  }
}

void f32_gemm(const F32GemmArgs& g, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* wp = g.w->data.data() + p * g.K * 16;
    int64_t m = 0;
    for (; m + 4 <= g.M; m += 4) f32_tile<4>(g, wp, m, p * 16);
    switch (g.M - m) {
      case 3: f32_tile<3>(g, wp, m, p * 16); break;
      case 2: f32_tile<2>(g, wp, m, p * 16); break;
      case 1: f32_tile<1>(g, wp, m, p * 16); break;
      default: break;
    }
  }
}

// fp16 rows (FPCR default rounding: to nearest even, as the scalar helper).
void f16_to_f32(const uint16_t* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(x + i))));
  for (; i < n; ++i) y[i] = fp16_to_fp32(x[i]);
}
void f32_to_f16(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
  for (; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}

}  // namespace

const KernelTable* table_neon() {
  static const KernelTable t = [] {
    KernelTable k = portable_table(Isa::kNeonDot);
    k.w8a8_gemm = w8a8_gemm;
    k.woq_int4 = woq_int4;
    k.woq_int8 = woq_int8;
    k.woq_int4_sp = woq_int4_sp;
    k.woq_int8_sp = woq_int8_sp;
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
