// Internal helpers shared by the AVX-512 translation units (include only from files compiled with the
// AVX-512 flags).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "isa_impl.h"

#define EDGEMM_INLINE inline __attribute__((always_inline))

namespace edgemm {
namespace kernels {
namespace impl {

// Weight-only GEMVs stream one block of groups per thread: software-prefetch every cache line of the
// group that starts `ahead` bytes past `group` (prefetching only a group's first lines, as the kernels
// once did, measured 15-35% slower on Zen 4 than this).
EDGEMM_INLINE void prefetch_group(const uint8_t* group, int64_t group_bytes, int64_t ahead) {
  for (int64_t o = 0; o < group_bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(group + ahead + o), _MM_HINT_T0);
}

// Defined in x86_avx512_attn.cpp: the fp32 attention task.
void avx512_attn_task(const AttentionArgs& a, int64_t kvh, int64_t i0, int64_t i1);
bool avx512_attn_task_f16(const AttentionArgs& a, int64_t kvh, int64_t i0, int64_t i1);
// Defined in x86_avx512_bf16.cpp (compiled when the compiler has -mavx512bf16: EDGEMM_HAVE_AVX512BF16):
// bf16 attention with vdpbf16ps, for AVX512_BF16 CPUs without AMX-BF16.
void avx512bf16_attn_pack(const AttentionArgs& a, int64_t kvh, int64_t T, uint16_t* kp, uint16_t* vp);
void avx512bf16_attn_task(const AttentionArgs& a, const uint16_t* kp, const uint16_t* vp, int64_t kvh, int64_t i0,
                          int64_t i1);
// Defined in x86_avx512_vbmi.cpp.
bool avx512_vbmi_supported();
void avx512vbmi_woq_int4_sparse(const WoqGemmArgs& g, int64_t b0, int64_t b1);
void avx512vbmi_woq_int8_sparse(const WoqGemmArgs& g, int64_t b0, int64_t b1);
void avx512vbmi_woq_sp_tab(const int8_t* q, int64_t K, int8_t* tab);

namespace {

// Cephes-style expf: ~1 ulp on [-87.3, 88.4]; 0 below, clamped above.
EDGEMM_INLINE __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3365447505531f), hi = _mm512_set1_ps(88.3762626647949f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(~under, p, n);
}

// erfc with fractional error ~1.2e-7 (Numerical Recipes erfcc).
EDGEMM_INLINE __m512 erfc512(__m512 x) {
  const __m512 z = _mm512_abs_ps(x);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_set1_ps(0.5f), z, _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(0.17087277f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.82215223f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.48851587f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.13520398f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.27886807f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.18628806f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.09678418f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.37409196f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.00002368f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.26551223f));
  const __m512 e = exp512(_mm512_fnmadd_ps(z, z, p));
  const __m512 ans = _mm512_mul_ps(t, e);
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_sub_ps(ans, neg, _mm512_set1_ps(2.0f), ans);
}

EDGEMM_INLINE __mmask16 tail_mask(int64_t rem) {
  return rem >= 16 ? __mmask16(0xffff) : rem <= 0 ? __mmask16(0) : __mmask16((1u << rem) - 1);
}

// 16 fp16 values (masked lanes: 0) widened to fp32, exact.
EDGEMM_INLINE __m512 load_fp16(const uint16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// W8A8 codes (kernels.h contract) of the activations xr[k .. k+16) under mask lm (masked lanes: code 0):
// clamp(round_half_even(x / s_a), -128, 127), true division; every clipped element is appended to
// *outliers as (row, k, x - code * s_a). Shared by the VNNI and AMX quantizers (one numeric contract).
EDGEMM_INLINE __m512i w8a8_codes16(const float* xr, int64_t k, __mmask16 lm, float s_a, int64_t row,
                                   std::vector<Outlier>* outliers) {
  const __m512i cmin = _mm512_set1_epi32(-128), cmax = _mm512_set1_epi32(127);
  __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(lm, xr + k), _mm512_set1_ps(s_a));
  q = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-256.0f)), _mm512_set1_ps(256.0f));
  __m512i c = _mm512_cvtps_epi32(q);  // MXCSR default: round to nearest even
  const __mmask16 clip = _mm512_cmpgt_epi32_mask(c, cmax) | _mm512_cmplt_epi32_mask(c, cmin);
  c = _mm512_min_epi32(_mm512_max_epi32(c, cmin), cmax);
  if (clip) {
    alignas(64) int32_t cc[16];
    _mm512_store_si512(cc, c);
    for (int l = 0; l < 16; ++l)
      if ((clip >> l) & 1)
        outliers->push_back({static_cast<int32_t>(row), static_cast<int32_t>(k + l),
                             xr[k + l] - static_cast<float>(cc[l]) * s_a});
  }
  return c;
}

}  // namespace
}  // namespace impl
}  // namespace kernels
}  // namespace edgemm
