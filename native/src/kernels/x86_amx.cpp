// AMX-INT8 W8A8 GEMM (Intel Advanced Matrix Extensions: TDPBSSD on 16 x 64-byte tiles). Compiled with
// the AVX-512 flags plus -mamx-tile -mamx-int8; the table is only used when cpuid reports AMX-TILE and
// AMX-INT8, the OS enables the tile state (XCR0 bits 17-18) and, on Linux, grants it to this process
// (arch_prctl ARCH_REQ_XCOMP_PERM). Everything except the W8A8 activation quantization and GEMM is the
// AVX-512 VNNI table's.
//
// Layouts. Activations are row-major signed codes (W8A8Act::lda bytes per row, a multiple of 64, rows
// padded to a multiple of 16 with zero codes): one A tile is 16 rows x 64 codes, loaded with stride lda.
// Weights are the common W8A8 panel layout (layout.h): a panel's k4 steps are 64-byte rows
// [16 channels][4 k] at stride k4_stride, which is exactly AMX's B-tile format ("VNNI-packed" K/4 x N x 4),
// so one B tile is 16 consecutive k4 steps of one panel, loaded with stride k4_stride; no repacking.
// A K that is not a multiple of 64 reads up to 15 k4 rows past the panel's last one (the packed buffer
// carries that much zero slack, pack.cpp); their products meet zero activation codes, so they add 0.
//
// Numbers: TDPBSSD accumulates the exact int32 sum of code x qweight (no +128 offset, no column-sum
// correction); the epilogue is the VNNI kernel's (float(acc) * (s_a * s_w[n]) + bias with one FMA), so
// results are bit-identical to the AVX-512 VNNI table. Shadow outliers run after the GEMM (w8a8_shadow:
// same bits as the VNNI kernel's fused epilogue, see kernels.h).
//
// AMX-BF16 attention (AttentionArgs::allow_bf16, on CPUs that also have AMX-BF16 and AVX512-BF16): per kv
// head, K and V are converted once per call to bf16 tiles; per block of 16 query rows, S = Q K^T runs on
// TDPBF16PS into fp32, the softmax is exact over all keys in fp32 (masked keys get probability 0), P is
// rounded to bf16 and O = P V accumulates in fp32 tiles. Layouts (bf16 elements, T padded to 32 keys):
//   K: blocks of 16 keys, each [head_dim/2][16 keys][2]: the B tile of a 32-deep d slice s of block b
//      starts at b*16*D + s*512, stride 64 bytes;
//   V: blocks of 32 keys, each [16 key pairs][D][2]: the B tile of 16 output columns j*16.. of block c
//      starts at c*32*D + j*32, stride 4*D bytes.
#include <immintrin.h>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>

#include "aligned_buffer.h"

#include "cpu_features.h"
#include "layout.h"
#include "portable.h"
#include "x86_avx512_common.h"

namespace edgemm {
namespace kernels {
namespace impl {

const KernelTable* table_avx512();

namespace {

// ------------------------------------------------------------------------------------------------
// Activation quantization into the row-major layout (rows [r0, r1), all lda columns written)
// ------------------------------------------------------------------------------------------------
void amx_w8a8_quant(const float* x, int64_t ldx, int64_t K, float s_a, uint8_t* packed, int64_t lda,
                    int32_t* row_sum, int64_t r0, int64_t r1, std::vector<Outlier>* outliers) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * ldx;
    int8_t* dst = reinterpret_cast<int8_t*>(packed + r * lda);
    __m512i rsum = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 lm = tail_mask(K - k);
      const __m512i c = w8a8_codes16(xr, k, lm, s_a, r, outliers);
      rsum = _mm512_add_epi32(rsum, c);  // masked-off lanes loaded 0.0 -> code 0
      _mm_mask_storeu_epi8(dst + k, lm, _mm512_cvtepi32_epi8(c));
    }
    std::memset(dst + K, 0, size_t(lda - K));
    row_sum[r] = _mm512_reduce_add_epi32(rsum);
  }
}

// ------------------------------------------------------------------------------------------------
// GEMM: 32 x 32 output blocks (2 A tiles x 2 B tiles -> 4 accumulator tiles), full K per block
// ------------------------------------------------------------------------------------------------
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: int32 accumulators (16 x 16); 4-5: A (16 rows x 64 codes); 6-7: B (16 k4 rows x 64 bytes).
const TileConfig& tile_config() {
  static const TileConfig c = [] {
    TileConfig t;
    for (int i = 0; i < 8; ++i) {
      t.colsb[i] = 64;
      t.rows[i] = 16;
    }
    return t;
  }();
  return c;
}

struct PanelRef {
  const int8_t* base;  // k4 = 0 of this panel
  int64_t stride;      // bytes between k4 rows
  int64_t n0;          // first output column
};

inline PanelRef panel_ref(const W8A8GemmArgs& g, int64_t p) {
  const layout::W8A8PanelPos pp = layout::w8a8_panel(p, g.Kp, g.Np);
  return {g.w + pp.base, pp.k4_stride, p * 16};
}

// Dequantizes one 16 x 16 int32 block (rows m0.., columns n0..) into y.
EDGEMM_INLINE void epilogue(const W8A8GemmArgs& g, const int32_t* acc, int64_t m0, int64_t n0) {
  const __mmask16 nm = tail_mask(g.N - n0);
  const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(g.s_a), _mm512_loadu_ps(g.wscale + n0));
  const __m512 bias = g.bias ? _mm512_maskz_loadu_ps(nm, g.bias + n0) : _mm512_setzero_ps();
  const int rows = static_cast<int>(std::min<int64_t>(16, g.M - m0));
  for (int r = 0; r < rows; ++r) {
    float* yr = g.y + (m0 + r) * g.ldy + n0;
    __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc + r * 16)), scale, bias);
    if (g.accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(nm, yr));
    _mm512_mask_storeu_ps(yr, nm, v);
  }
}

// One K slice [k0, k0 + nk) (in 64-deep steps) of a 32 x 32 block: row tiles a0 (and a1 if TWO_A) x
// panels pa (and pb if TWO_B). The accumulators start from zero (first slice) or from `acc` (4 x 256
// int32); the last slice runs the epilogue, the others store back to `acc`. Tile registers must be
// compile-time constants, hence the template.
template <bool TWO_A, bool TWO_B>
EDGEMM_INLINE void block(const W8A8GemmArgs& g, const int8_t* a0, const int8_t* a1, int64_t lda, const PanelRef& pa,
                         const PanelRef& pb, int64_t k0, int64_t nk, bool first, bool last, int64_t m0, int32_t* acc) {
  if (first) {
    _tile_zero(0);
    if (TWO_B) _tile_zero(1);
    if (TWO_A) _tile_zero(2);
    if (TWO_A && TWO_B) _tile_zero(3);
  } else {
    _tile_loadd(0, acc, 64);
    if (TWO_B) _tile_loadd(1, acc + 256, 64);
    if (TWO_A) _tile_loadd(2, acc + 512, 64);
    if (TWO_A && TWO_B) _tile_loadd(3, acc + 768, 64);
  }
  for (int64_t k = k0; k < k0 + nk; ++k) {
    _tile_loadd(4, a0 + k * 64, lda);
    if (TWO_A) _tile_loadd(5, a1 + k * 64, lda);
    _tile_loadd(6, pa.base + k * 16 * pa.stride, pa.stride);
    _tile_dpbssd(0, 4, 6);
    if (TWO_A) _tile_dpbssd(2, 5, 6);
    if (TWO_B) {
      _tile_loadd(7, pb.base + k * 16 * pb.stride, pb.stride);
      _tile_dpbssd(1, 4, 7);
      if (TWO_A) _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, acc, 64);
  if (TWO_B) _tile_stored(1, acc + 256, 64);
  if (TWO_A) _tile_stored(2, acc + 512, 64);
  if (TWO_A && TWO_B) _tile_stored(3, acc + 768, 64);
  if (!last) return;
  epilogue(g, acc, m0, pa.n0);
  if (TWO_B) epilogue(g, acc + 256, m0, pb.n0);
  if (TWO_A) epilogue(g, acc + 512, m0 + 16, pa.n0);
  if (TWO_A && TWO_B) epilogue(g, acc + 768, m0 + 16, pb.n0);
}

// Cache blocking: up to kRowTiles row tiles (128 rows) share each panel pair's weights; K is cut in
// slices of kSliceSteps x 64 so that a panel pair's slice (2 x 16 x 64 x kSliceSteps bytes = 16 KB) stays
// in L1 while the row pairs of the block stream their A slices from L2, with the int32 accumulators
// parked in a small L1 buffer between slices.
constexpr int64_t kRowTiles = 8, kSliceSteps = 8;

// Panels [p0, p1) x 16-row tiles [t0, t1). g.a is the row-major activation buffer, g.lda its row stride.
void amx_w8a8_gemm(const W8A8GemmArgs& g, int64_t p0, int64_t p1, int64_t t0, int64_t t1) {
  _tile_loadconfig(&tile_config());
  alignas(64) int32_t acc[kRowTiles / 2][4 * 256];
  const int64_t lda = g.lda, kb = (g.Kp + 63) / 64;
  const int8_t* a = reinterpret_cast<const int8_t*>(g.a);
  for (int64_t tb = t0; tb < t1; tb += kRowTiles) {
    const int64_t te = std::min(t1, tb + kRowTiles);
    for (int64_t p = p0; p < p1; p += 2) {
      const bool two_b = p + 1 < p1;
      const PanelRef pa = panel_ref(g, p), pb = two_b ? panel_ref(g, p + 1) : pa;
      for (int64_t k0 = 0; k0 < kb; k0 += kSliceSteps) {
        const int64_t nk = std::min(kSliceSteps, kb - k0);
        const bool first = k0 == 0, last = k0 + nk == kb;
        for (int64_t t = tb; t < te; t += 2) {
          const bool two_a = t + 1 < te;
          const int8_t* a0 = a + t * 16 * lda;
          const int8_t* a1 = a0 + 16 * lda;
          int32_t* c = acc[(t - tb) / 2];
          if (two_a && two_b) block<true, true>(g, a0, a1, lda, pa, pb, k0, nk, first, last, t * 16, c);
          else if (two_a) block<true, false>(g, a0, a1, lda, pa, pb, k0, nk, first, last, t * 16, c);
          else if (two_b) block<false, true>(g, a0, a1, lda, pa, pb, k0, nk, first, last, t * 16, c);
          else block<false, false>(g, a0, a1, lda, pa, pb, k0, nk, first, last, t * 16, c);
        }
      }
    }
  }
  _tile_release();
}

#if defined(__linux__)
constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;
#endif

bool os_grants_amx() {
#if defined(__linux__)
  // Linux >= 5.16 keeps the 8 KB tile state off until a process asks for it.
  unsigned long bits = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bits) == 0 && (bits >> kXfeatureXtiledata) & 1) return true;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  bits = 0;
  return syscall(SYS_arch_prctl, kArchGetXcompPerm, &bits) == 0 && ((bits >> kXfeatureXtiledata) & 1);
#else
  return false;  // other OSes: not enabled until tested there
#endif
}

// ------------------------------------------------------------------------------------------------
// BF16 attention
// ------------------------------------------------------------------------------------------------
EDGEMM_INLINE void bf16_store16(uint16_t* dst, __m512 v, __mmask16 m = 0xffff) {
  _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(v));
}

void amx_attn_pack(const AttentionArgs& a, int64_t kvh, int64_t T, uint16_t* kp, uint16_t* vp) {
  const int64_t D = a.head_dim, Tp = attn_bf16_padded(T);
  const float* kb = a.k + kvh * a.k_head_stride;
  const float* vb = a.v + kvh * a.v_head_stride;
  alignas(64) uint16_t row[256];
  for (int64_t t = 0; t < Tp; ++t) {
    if (t < T) {
      for (int64_t d = 0; d < D; d += 16) bf16_store16(row + d, _mm512_loadu_ps(kb + t * a.k_ld + d));
    } else {
      std::memset(row, 0, size_t(D) * 2);
    }
    uint16_t* kd = kp + (t / 16) * 16 * D + (t % 16) * 2;
    for (int64_t d = 0; d < D; d += 2) {
      kd[(d / 2) * 32] = row[d];
      kd[(d / 2) * 32 + 1] = row[d + 1];
    }
    if (t < T) {
      for (int64_t d = 0; d < D; d += 16) bf16_store16(row + d, _mm512_loadu_ps(vb + t * a.v_ld + d));
    } else {
      std::memset(row, 0, size_t(D) * 2);
    }
    uint16_t* vd = vp + (t / 32) * 32 * D + ((t % 32) / 2) * 2 * D + (t % 2);
    for (int64_t d = 0; d < D; ++d) vd[2 * d] = row[d];
  }
}

// Tiles: 0-3 fp32 accumulators, 4 Q / P (A), 5-6 K / V (B).
void amx_attn_task(const AttentionArgs& a, const uint16_t* kp, const uint16_t* vp, int64_t kvh, int64_t i0, int64_t i1) {
  _tile_loadconfig(&tile_config());
  const int64_t grp = a.n_heads / a.n_kv_heads, D = a.head_dim;
  const int64_t Tall = attn_bf16_padded(a.n_kv);
  thread_local AlignedBuffer<float> s_buf, o_buf;
  thread_local AlignedBuffer<uint16_t> q_buf, p_buf;
  if (!s_buf.resize(size_t(16 * Tall)) || !p_buf.resize(size_t(16 * Tall)) || !o_buf.resize(size_t(16 * D)) ||
      !q_buf.resize(size_t(16 * D)))
    return table_avx512()->attn_task(a, kvh, i0, i1);
  float* S = s_buf.data();
  float* O = o_buf.data();
  uint16_t* Q = q_buf.data();
  uint16_t* P = p_buf.data();
  const __m512 vscale = _mm512_set1_ps(a.scale);
  for (int64_t hh = 0; hh < grp; ++hh) {
    const int64_t h = kvh * grp + hh;
    for (int64_t r0 = i0; r0 < i1; r0 += 16) {
      const int nr = static_cast<int>(std::min<int64_t>(16, i1 - r0));
      int64_t lim[16];
      int64_t tmax = 1;
      for (int r = 0; r < 16; ++r) {
        uint16_t* qd = Q + r * D;
        if (r < nr) {
          const float* q = a.q + (r0 + r) * a.q_ld + h * D;
          for (int64_t d = 0; d < D; d += 16) bf16_store16(qd + d, _mm512_mul_ps(vscale, _mm512_loadu_ps(q + d)));
          lim[r] = a.causal ? std::min(a.n_kv, a.q_pos0 + r0 + r + 1) : a.n_kv;
          tmax = std::max(tmax, lim[r]);
        } else {
          std::memset(qd, 0, size_t(D) * 2);
          lim[r] = 0;
        }
      }
      const int64_t Tp = attn_bf16_padded(tmax);
      // S = Q K^T, 32 keys per step.
      for (int64_t kb = 0; kb < Tp; kb += 32) {
        _tile_zero(0);
        _tile_zero(1);
        const uint16_t* k0 = kp + (kb / 16) * 16 * D;
        const uint16_t* k1 = k0 + 16 * D;
        for (int64_t sl = 0; sl < D / 32; ++sl) {
          _tile_loadd(4, Q + sl * 32, D * 2);
          _tile_loadd(5, k0 + sl * 512, 64);
          _tile_loadd(6, k1 + sl * 512, 64);
          _tile_dpbf16ps(0, 4, 5);
          _tile_dpbf16ps(1, 4, 6);
        }
        _tile_stored(0, S + kb, Tp * 4);
        _tile_stored(1, S + kb + 16, Tp * 4);
      }
      // Exact softmax per row in fp32; P in bf16 (zero for masked keys and padding rows).
      float inv[16];
      for (int r = 0; r < 16; ++r) {
        float* sr = S + r * Tp;
        uint16_t* pr = P + r * Tp;
        const int64_t T = lim[r];
        if (T <= 0) {
          std::memset(pr, 0, size_t(Tp) * 2);
          inv[r] = 0.f;
          continue;
        }
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t t = 0; t < T; t += 16)
          vmax = _mm512_mask_max_ps(vmax, tail_mask(T - t), vmax, _mm512_loadu_ps(sr + t));
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t = 0; t < Tp; t += 16) {
          const __mmask16 m = t < T ? tail_mask(T - t) : __mmask16(0);
          const __m512 p = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + t), mx)));
          sum = _mm512_add_ps(sum, p);
          bf16_store16(pr + t, p);
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
      }
      // O = P V, 64 output columns (4 tiles) at a time.
      for (int64_t d0 = 0; d0 < D; d0 += 64) {
        const int nt = static_cast<int>(std::min<int64_t>(64, D - d0) / 16);
        _tile_zero(0);
        if (nt > 1) _tile_zero(1);
        if (nt > 2) _tile_zero(2);
        if (nt > 3) _tile_zero(3);
        for (int64_t kb = 0; kb < Tp; kb += 32) {
          _tile_loadd(4, P + kb, Tp * 2);
          const uint16_t* vb = vp + kb * D + d0 * 2;
          _tile_loadd(5, vb, D * 4);
          _tile_dpbf16ps(0, 4, 5);
          if (nt > 1) {
            _tile_loadd(6, vb + 32, D * 4);
            _tile_dpbf16ps(1, 4, 6);
          }
          if (nt > 2) {
            _tile_loadd(5, vb + 64, D * 4);
            _tile_dpbf16ps(2, 4, 5);
          }
          if (nt > 3) {
            _tile_loadd(6, vb + 96, D * 4);
            _tile_dpbf16ps(3, 4, 6);
          }
        }
        _tile_stored(0, O + d0, D * 4);
        if (nt > 1) _tile_stored(1, O + d0 + 16, D * 4);
        if (nt > 2) _tile_stored(2, O + d0 + 32, D * 4);
        if (nt > 3) _tile_stored(3, O + d0 + 48, D * 4);
      }
      for (int r = 0; r < nr; ++r) {
        float* out = a.out + (r0 + r) * a.out_ld + h * D;
        const __m512 vi = _mm512_set1_ps(inv[r]);
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(out + d, _mm512_mul_ps(vi, _mm512_load_ps(O + r * D + d)));
      }
    }
  }
}

}  // namespace

bool amx_supported() {
  static const bool ok = [] {
    const CpuFeatures& f = cpu_features();
    return f.amx_tile && f.amx_int8 && os_grants_amx();
  }();
  return ok;
}

const KernelTable* table_amx() {
  static const KernelTable t = [] {
    KernelTable k = *table_avx512();
    k.isa = Isa::kAvx512Amx;
    k.w8a8_rowmajor = true;
    k.w8a8_quant = amx_w8a8_quant;
    k.w8a8_gemm = amx_w8a8_gemm;
    k.w8a8_gemm_fuses_shadow = false;
    const CpuFeatures& f = cpu_features();
    if (f.amx_bf16 && f.avx512bf16) {
      k.attn_bf16_pack = amx_attn_pack;
      k.attn_bf16_task = amx_attn_task;
    }
    return k;
  }();
  return &t;
}

}  // namespace impl
}  // namespace kernels
}  // namespace edgemm
