// Internal: the per-ISA kernel table. Entry points in dispatch.cpp validate arguments, split work over
// the thread pool and call these; every entry of every table is implemented (an ISA file fills what it
// accelerates and takes the portable versions for the rest).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"

namespace edgemm {
namespace kernels {
namespace impl {

struct W8A8GemmArgs {
  const uint8_t* a;        // packed activations [Mp/8][Kp/4][8][4] (code + 128), or row-major codes
                           // (tables with w8a8_rowmajor: lda bytes per row, Mp a multiple of 16)
  const int8_t* w;         // packed weights [Np/16][Kp/4][16][4]
  const int32_t* col_sum;  // [Np]
  const float* wscale;     // [Np]
  const float* bias;       // [N] or null
  float s_a;
  int64_t M, N, Mp, Np, Kp;
  float* y;
  int64_t ldy;
  bool accumulate;
  // Fused shadow outliers (only read when the table sets w8a8_gemm_fuses_shadow): outliers sorted by
  // (m, k), orow[m]..orow[m+1] the outliers of row m; null = plain GEMM.
  const Outlier* outliers;
  const int32_t* orow;
  int64_t lda;  // row stride of the row-major activation layout (0 for the tile layout)
};
// Computes the output columns of 16-column panels [p0, p1) (p0 a multiple of 3) for the row tiles
// [t0, t1) (8 rows each; 16 with w8a8_rowmajor).
using W8A8GemmFn = void (*)(const W8A8GemmArgs&, int64_t p0, int64_t p1, int64_t t0, int64_t t1);
// Quantizes rows [r0, r1) (r0 a multiple of 8) into the packed layout, writes row_sum, appends clipped
// elements (sorted by m, k) to *outliers.
using W8A8QuantFn = void (*)(const float* x, int64_t ldx, int64_t K, float s_a, uint8_t* packed,
                             int64_t Kp, int32_t* row_sum, int64_t r0, int64_t r1,
                             std::vector<Outlier>* outliers);
struct ShadowArgs {
  const Outlier* outliers;  // sorted by (k, m)
  const int64_t* k_begin;   // n_k + 1 offsets: outliers[k_begin[g] .. k_begin[g+1]) share one channel k
  int64_t n_k;
  const W8A8Weights* w;
  float* y;
  int64_t ldy;
};
// Adds the outlier contributions to output columns [n0, n1) (n0 a multiple of 48): per distinct
// channel, the weight column is fetched once (hot float copy or decoded from the packed int8), then
// y[m, n0:n1] += r * col[n0:n1] for each outlier of that channel (mul then add, no FMA: every ISA gives
// the same bits).
using ShadowFn = void (*)(const ShadowArgs&, int64_t n0, int64_t n1);

struct WoqGemmArgs {
  const WoqAct* a;
  const WoqWeights* w;
  const float* bias;
  float* y;
  int64_t ldy;
};
// Computes output rows of 16-row blocks [b0, b1) for all activation rows.
using WoqGemmFn = void (*)(const WoqGemmArgs&, int64_t b0, int64_t b1);
using WoqQuantRowFn = void (*)(const float* x, int64_t K, int64_t QB, int8_t* q, float* d,
                              int32_t* asum);

struct F32GemmArgs {
  const float* x;
  int64_t M, K, ldx;
  const F32Weights* w;
  const float* bias;
  float* y;
  int64_t ldy;
  bool accumulate;
};
// Computes 16-column panels [p0, p1) for all rows (uses thread-local scratch).
using F32GemmFn = void (*)(const F32GemmArgs&, int64_t p0, int64_t p1);

// Elementwise (per row / per span)
using RmsNormRowFn = void (*)(const float* x, const float* w, float* y, int64_t dim, float eps);
using LayerNormRowFn = void (*)(const float* x, const float* g, const float* b, float* y, int64_t dim,
                                float eps);
using SoftmaxRowFn = void (*)(float* x, int64_t n);
using UnaryFn = void (*)(const float* x, float* y, int64_t n);
using SwigluFn = void (*)(const float* g, const float* u, float* y, int64_t n);
using RopeRowFn = void (*)(float* x, int64_t n_heads, int64_t head_dim, int64_t half, const float* cos,
                           const float* sin);
// Attention for one task: kv head `kvh`, query rows [i0, i1) of every q-head of the group.
using AttnTaskFn = void (*)(const AttentionArgs&, int64_t kvh, int64_t i0, int64_t i1);
using AttnTaskF16Fn = bool (*)(const AttentionArgs&, int64_t kvh, int64_t i0, int64_t i1);  // false: out of memory
// BF16 attention (AttentionArgs::allow_bf16): keys [0, T) of kv head `kvh` packed into `kp`/`vp`
// (each kAttnBf16Pad-rounded T x head_dim bf16, layouts in x86_amx.cpp / x86_avx512_bf16.cpp), then tasks as AttnTaskFn
// reading the packed head.
constexpr int64_t kAttnBf16Pad = 32;
// Tasks with fewer than kAttnFewRows (query rows x heads per kv head) take the per-row path (decode).
constexpr int64_t kAttnFewRows = 16;
inline int64_t attn_bf16_padded(int64_t T) { return (T + kAttnBf16Pad - 1) / kAttnBf16Pad * kAttnBf16Pad; }
using WoqSpTabFn = void (*)(const int8_t* q, int64_t K, int8_t* tab);
using AttnBf16PackFn = void (*)(const AttentionArgs&, int64_t kvh, int64_t T, uint16_t* kp, uint16_t* vp);
using AttnBf16TaskFn = void (*)(const AttentionArgs&, const uint16_t* kp, const uint16_t* vp, int64_t kvh,
                                int64_t i0, int64_t i1);

struct KernelTable {
  Isa isa;
  W8A8QuantFn w8a8_quant;
  W8A8GemmFn w8a8_gemm;
  bool w8a8_gemm_fuses_shadow;  // w8a8_gemm applies W8A8GemmArgs::outliers in its epilogue
  bool w8a8_rowmajor;           // W8A8 activations are row-major int8 codes (AMX), not the 8-row tiles
  ShadowFn w8a8_shadow;
  WoqQuantRowFn woq_quant_row;
  WoqGemmFn woq_int4;
  WoqGemmFn woq_int8;
  WoqGemmFn woq_int4_sp;
  WoqGemmFn woq_int8_sp;
  WoqSpTabFn woq_sp_tab = nullptr;  // builds WoqAct::sp_tab for one row (set where the 2:4 kernels use it)
  void (*f16_to_f32)(const uint16_t* x, float* y, int64_t n);  // KV-cache rows
  void (*f32_to_f16)(const float* x, uint16_t* y, int64_t n);
  F32GemmFn f32_gemm;
  RmsNormRowFn rmsnorm_row;
  LayerNormRowFn layernorm_row;
  SoftmaxRowFn softmax_row;
  UnaryFn silu;
  UnaryFn gelu_erf;
  UnaryFn gelu_tanh;
  SwigluFn swiglu;
  RopeRowFn rope_row;
  AttnTaskFn attn_task;
  // Few-row tasks (< kAttnFewRows) on an fp16 KV cache, reading AttentionArgs::k16/v16 in place (null:
  // the rows are widened to fp32 first). Same arithmetic as attn_task on the widened rows.
  AttnTaskF16Fn attn_task_f16 = nullptr;
  AttnBf16PackFn attn_bf16_pack = nullptr;  // both set only where the CPU has AVX512-BF16 (AMX-BF16 tiles or vdpbf16ps)
  AttnBf16TaskFn attn_bf16_task = nullptr;
};

// Per-ISA tables (null when not compiled in).
const KernelTable* table_scalar();
const KernelTable* table_avx2();
const KernelTable* table_avx512();
const KernelTable* table_neon();
const KernelTable* table_amx();  // AVX-512 VNNI + the AMX-INT8 W8A8 GEMM
bool amx_supported();            // cpuid, XCR0 and (Linux) the process's tile-state permission
const KernelTable& active_table();

}  // namespace impl
}  // namespace kernels
}  // namespace edgemm
