// 2:4-sparse weight-only GEMV/GEMM with AVX-512 VNNI + VBMI. Per 8 inputs, the activations become a
// 32-byte table indexed by (pattern code, which kept value, which group of 4) (woq_sp_tab, once per
// call); per slab, vpermb spreads the 48 bytes of 3-bit pattern codes to one row pair per qword,
// vpmultishiftqb + vpternlogd turn them into table indices, a second vpermb gathers the kept
// activations, and vpdpbusd multiplies. Compiled with the AVX-512 flags plus -mavx512vbmi; only called
// when cpuid reports VBMI.
#include <immintrin.h>

#include <algorithm>

#include "cpu_features.h"
#include "layout.h"
#include "x86_avx512_common.h"

namespace edgemm {
namespace kernels {
namespace impl {

bool avx512_vbmi_supported() { return cpu_features().avx512vbmi; }

void avx512vbmi_woq_sp_tab(const int8_t* q, int64_t K, int8_t* tab) {
  // Two 8-input chunks per vpermb: output bytes 0-31 from q[0..8), 32-63 from q[8..16).
  alignas(64) uint8_t ix[64];
  for (int t = 0; t < 64; ++t) ix[t] = uint8_t(8 * (t >> 5) + layout::sp24_table_pos(t & 31));
  const __m512i idx = _mm512_load_si512(ix);
  for (int64_t c = 0; c < K / 8; c += 2) {  // K is a multiple of 32 (woq_prepare: G % 32 == 0, K % G == 0)
    const __m512i a = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 8 * c)));
    _mm512_storeu_si512(tab + 32 * c, _mm512_permutexvar_epi8(idx, a));
  }
}

namespace {

template <bool kInt4, int MT>
EDGEMM_INLINE void sparse_rows(const WoqGemmArgs& g, const uint8_t* base, int64_t blk, int64_t m0) {
  const WoqWeights& w = *g.w;
  const WoqAct& a = *g.a;
  const int64_t G = w.G, QB = a.QB, ngroups = w.K / G, nb = w.K / QB, bpg = G / QB;
  const int64_t wbytes = layout::woq_weight_bytes(w.format, true, G);
  const int64_t slab = layout::sp24_slab_bytes(w.format), coff = layout::sp24_code_offset(w.format);
  const __m512i nib = _mm512_set1_epi8(0x0f), m7 = _mm512_set1_epi8(7);
  // Byte 4h + j of a dword: j = 2 * (group of 4) + (second kept value) -> table index bits 3 and 4.
  const __m512i pg = _mm512_set1_epi32(0x18100800);
  // Qword q of the spread codes holds rows 2q (bits 0-23) and 2q+1 (bits 24-47).
  alignas(64) uint8_t spread_ix[64];
  for (int i = 0; i < 64; ++i) spread_ix[i] = uint8_t(6 * (i / 8) + std::min(i % 8, 5));
  const __m512i spread = _mm512_load_si512(spread_ix);
  alignas(64) uint8_t zrep_ix[64];
  for (int i = 0; i < 64; ++i) zrep_ix[i] = uint8_t(i / 4);
  const __m512i zrep = _mm512_load_si512(zrep_ix);
  __m512i ctrl[4];  // step st, byte 4h + j: the code of group 2st + j/2 of row h
  for (int st = 0; st < 4; ++st) {
    uint64_t c = 0;
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j) c |= uint64_t(24 * h + 3 * (2 * st + j / 2)) << (8 * (4 * h + j));
    ctrl[st] = _mm512_set1_epi64(static_cast<long long>(c));
  }
  const int8_t* tb[MT];
  const float* d[MT];
  __m512 facc[MT];
  for (int i = 0; i < MT; ++i) {
    tb[i] = a.sp_tab.data() + (m0 + i) * (w.K / 8) * 32;
    d[i] = a.d.data() + (m0 + i) * nb;
    facc[i] = _mm512_setzero_ps();
  }
  for (int64_t gi = 0; gi < ngroups; ++gi) {
    const uint8_t* gp = base + gi * w.group_bytes;
    prefetch_group(gp, w.group_bytes, 4096);  // 4 KiB beat 2 KiB in 4 of 4 whole-model rounds (+2-11%); 6 KiB was worse
    const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gp + wbytes)));
    __m512i zb = _mm512_set1_epi8(static_cast<char>(kInt4 ? 8 : 128));
    if (w.has_zeros)  // row r's zero in every byte of dword r
      zb = _mm512_permutexvar_epi8(
          zrep, _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gp + wbytes + 32))));
    __m512 tsum[MT];
    for (int i = 0; i < MT; ++i) tsum[i] = _mm512_setzero_ps();
    for (int64_t bb = 0; bb < bpg; ++bb) {
      // Two accumulator pairs (even / odd steps) halve the vpdpbusd dependency chains.
      __m512i acc[2][MT], zacc[2][MT];
      for (int i = 0; i < MT; ++i) acc[0][i] = acc[1][i] = zacc[0][i] = zacc[1][i] = _mm512_setzero_si512();
      for (int64_t s = 0; s < QB / 32; ++s) {
        const uint8_t* sp = gp + (bb * (QB / 32) + s) * slab;
        __m512i wv[4];
        if (kInt4) {  // odd steps keep the high nibble in place (16x): acc[1] is scaled back per block
          const __m512i va = _mm512_loadu_si512(sp), vb = _mm512_loadu_si512(sp + 64);
          wv[0] = _mm512_and_si512(va, nib);
          wv[1] = _mm512_andnot_si512(nib, va);
          wv[2] = _mm512_and_si512(vb, nib);
          wv[3] = _mm512_andnot_si512(nib, vb);
        } else {
          for (int st = 0; st < 4; ++st) wv[st] = _mm512_loadu_si512(sp + st * 64);
        }
        const __m512i codes = _mm512_permutexvar_epi8(spread, _mm512_loadu_si512(sp + coff));
        const int64_t c0 = (gi * G + (bb * (QB / 32) + s) * 32) / 8;
#pragma GCC unroll 4
        for (int st = 0; st < 4; ++st) {
          __m512i idx = _mm512_multishift_epi64_epi8(ctrl[st], codes);
          idx = _mm512_ternarylogic_epi32(idx, m7, pg, 0xEA);  // (code & 7) | which-value bits
          for (int i = 0; i < MT; ++i) {
            const __m512i tab = _mm512_loadu_si512(tb[i] + (c0 + st) * 32);
            const __m512i gth = _mm512_permutexvar_epi8(idx, tab);
            acc[st & 1][i] = _mm512_dpbusd_epi32(acc[st & 1][i], wv[st], gth);
            zacc[st & 1][i] = _mm512_dpbusd_epi32(zacc[st & 1][i], zb, gth);
          }
        }
      }
      const int64_t b = gi * bpg + bb;
      for (int i = 0; i < MT; ++i)
        tsum[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(acc[0][i], kInt4 ? _mm512_srai_epi32(acc[1][i], 4) : acc[1][i]),  // exact: 16 x sum
                                                                     _mm512_add_epi32(zacc[0][i], zacc[1][i]))),
                                  _mm512_set1_ps(d[i][b]), tsum[i]);
    }
    for (int i = 0; i < MT; ++i) facc[i] = _mm512_fmadd_ps(sc, tsum[i], facc[i]);
  }
  const int64_t n0 = blk * 16;
  const __mmask16 m = tail_mask(w.N - n0);
  const __m512 bias = g.bias ? _mm512_maskz_loadu_ps(m, g.bias + n0) : _mm512_setzero_ps();
  for (int i = 0; i < MT; ++i)
    _mm512_mask_storeu_ps(g.y + (m0 + i) * g.ldy + n0, m, _mm512_add_ps(facc[i], bias));
}

template <bool kInt4>
void sparse(const WoqGemmArgs& g, int64_t b0, int64_t b1) {
  const WoqWeights& w = *g.w;
  const int64_t M = g.a->M;
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint8_t* base = w.data.data() + blk * w.block_bytes;
    int64_t m0 = 0;
    for (; m0 + 2 <= M; m0 += 2) sparse_rows<kInt4, 2>(g, base, blk, m0);
    for (; m0 < M; ++m0) sparse_rows<kInt4, 1>(g, base, blk, m0);
  }
}

}  // namespace

void avx512vbmi_woq_int4_sparse(const WoqGemmArgs& g, int64_t b0, int64_t b1) { sparse<true>(g, b0, b1); }
void avx512vbmi_woq_int8_sparse(const WoqGemmArgs& g, int64_t b0, int64_t b1) { sparse<false>(g, b0, b1); }

}  // namespace impl
}  // namespace kernels
}  // namespace edgemm
