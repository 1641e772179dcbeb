// 2:4-sparse weight-only GEMV/GEMM with AVX-512 VNNI + VBMI (vpmultishiftqb expands the 2-bit in-group
// indices, vpshufb gathers the matching activation bytes, vpdpbusd multiplies).
// Compiled with the AVX-512 flags plus -mavx512vbmi; only called when cpuid reports VBMI.
#include <immintrin.h>

#include <algorithm>

#include "cpu_features.h"
#include "layout.h"
#include "x86_avx512_common.h"

namespace edgemm {
namespace kernels {
namespace impl {

bool avx512_vbmi_supported() { return cpu_features().avx512vbmi; }

namespace {

template <bool kInt4, int MT>
EDGEMM_INLINE void sparse_rows(const WoqGemmArgs& g, const uint8_t* base, int64_t blk, int64_t m0) {
  const WoqWeights& w = *g.w;
  const WoqAct& a = *g.a;
  const int64_t G = w.G, QB = a.QB, ngroups = w.K / G, nb = w.K / QB, bpg = G / QB;
  const int64_t wbytes = layout::woq_weight_bytes(w.format, true, G);
  const int64_t slab = kInt4 ? 192 : 320;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  const __m512i m3 = _mm512_set1_epi32(0x03030303), pat = _mm512_set1_epi32(0x04040000);
  __m512i ctrl[4];
  for (int st = 0; st < 4; ++st) {
    uint64_t c = 0;
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j) c |= uint64_t(16 * st + 8 * h + 2 * j) << (8 * (4 * h + j));
    ctrl[st] = _mm512_set1_epi64(static_cast<long long>(c));
  }
  const int8_t* q[MT];
  const float* d[MT];
  __m512 facc[MT];
  for (int i = 0; i < MT; ++i) {
    q[i] = a.q.data() + (m0 + i) * w.K;
    d[i] = a.d.data() + (m0 + i) * nb;
    facc[i] = _mm512_setzero_ps();
  }
  for (int64_t gi = 0; gi < ngroups; ++gi) {
    const uint8_t* gp = base + gi * w.group_bytes;
    prefetch_group(gp, w.group_bytes, 4096);  // 4 KiB beat 2 KiB in 4 of 4 whole-model rounds (+2-11%); 6 KiB was worse
    const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gp + wbytes)));
    __m512i zb = _mm512_set1_epi8(static_cast<char>(kInt4 ? 8 : 128));
    if (w.has_zeros)
      zb = _mm512_mullo_epi32(
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gp + wbytes + 32))),
          _mm512_set1_epi32(0x01010101));
    __m512 tsum[MT];
    for (int i = 0; i < MT; ++i) tsum[i] = _mm512_setzero_ps();
    for (int64_t bb = 0; bb < bpg; ++bb) {
      __m512i acc[MT], zacc[MT];
      for (int i = 0; i < MT; ++i) acc[i] = zacc[i] = _mm512_setzero_si512();
      for (int64_t s = 0; s < QB / 32; ++s) {
        const uint8_t* sp = gp + (bb * (QB / 32) + s) * slab;
        __m512i wv[4], vi;
        if (kInt4) {
          const __m512i va = _mm512_loadu_si512(sp), vb = _mm512_loadu_si512(sp + 64);
          wv[0] = _mm512_and_si512(va, nib);
          wv[1] = _mm512_and_si512(_mm512_srli_epi16(va, 4), nib);
          wv[2] = _mm512_and_si512(vb, nib);
          wv[3] = _mm512_and_si512(_mm512_srli_epi16(vb, 4), nib);
          vi = _mm512_loadu_si512(sp + 128);
        } else {
          for (int st = 0; st < 4; ++st) wv[st] = _mm512_loadu_si512(sp + st * 64);
          vi = _mm512_loadu_si512(sp + 256);
        }
        const int64_t k0 = gi * G + (bb * (QB / 32) + s) * 32;
#pragma GCC unroll 4
        for (int st = 0; st < 4; ++st) {
          __m512i idx = _mm512_multishift_epi64_epi8(ctrl[st], vi);
          idx = _mm512_ternarylogic_epi32(idx, m3, pat, 0xEA);  // (idx & 3) | (4 for 2nd group of 4)
          for (int i = 0; i < MT; ++i) {
            int64_t a8;
            std::memcpy(&a8, q[i] + k0 + st * 8, 8);
            const __m512i gth = _mm512_shuffle_epi8(_mm512_set1_epi64(a8), idx);
            acc[i] = _mm512_dpbusd_epi32(acc[i], wv[st], gth);
            zacc[i] = _mm512_dpbusd_epi32(zacc[i], zb, gth);
          }
        }
      }
      const int64_t b = gi * bpg + bb;
      for (int i = 0; i < MT; ++i)
        tsum[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i], zacc[i])),
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
