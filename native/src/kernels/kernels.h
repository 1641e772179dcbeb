// edgemm native kernel library: internal C++ API.
//
// Everything here is internal to the native engine (the public C ABI, include/edgemm.h, comes later and
// will wrap these). Conventions:
//   * No function throws. Every fallible function returns a Status; callers must check it.
//   * Matrices are row-major. `ld*` arguments are row strides in elements (>= the row length).
//   * A linear layer computes y[M,N] = x[M,K] @ W[N,K]^T (+ bias), W in the canonical formats of
//     docs/formats.md. Weights are repacked once at load time (the *_pack functions) into layouts that are
//     the same for every instruction set, so a packed weight can be run by any ISA path.
//   * Kernels take a ThreadPool* (nullptr = run on the calling thread only).
//   * The ISA is chosen at run time from CPU features (see cpu_features.h); set_isa() can force a lower
//     one (tests run every available ISA against the scalar reference).
//   * Thread safety: packed weights are read-only after packing and may be shared by concurrent calls;
//     an activation object (W8A8Act, WoqAct) or output buffer must not be used by two calls at once.
//     One ThreadPool runs one job at a time (concurrent callers are serialized).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "aligned_buffer.h"
#include "thread_pool.h"

namespace edgemm {
namespace kernels {

enum class Status : int32_t {
  kOk = 0,
  kInvalidArgument = 1,  // bad shape, null pointer, stride too small, unsupported group size...
  kUnsupported = 2,      // valid request the library cannot do on this build/CPU
  kNotSparse = 3,        // 2:4 packing found a group of 4 with more than 2 nonzeros
  kOutOfMemory = 4,
  kOverflow = 5,         // a dimension would overflow the int32 accumulators
};
const char* status_string(Status s);

// ---------------------------------------------------------------------------------------------------
// Instruction-set dispatch
// ---------------------------------------------------------------------------------------------------
enum class Isa : int32_t {
  kScalar = 0,      // portable C++ (always available; the fallback for every kernel)
  kAvx2 = 1,        // x86-64 AVX2 + FMA + F16C
  kAvx512Vnni = 2,  // AVX-512 F/BW/VL/DQ + VNNI (+ VBMI for the 2:4 sparse kernels, else AVX2 for those)
  kNeonDot = 3,     // aarch64 NEON with the dot-product extension (sdot/udot)
  kAvx512Amx = 4,   // kAvx512Vnni + AMX-TILE/AMX-INT8 for the W8A8 GEMM (Sapphire Rapids and later)
};
const char* isa_name(Isa isa);
Isa best_isa();           // best ISA this CPU (and build) supports
Isa active_isa();         // ISA currently used by the kernels (defaults to best_isa())
// Forces an ISA (must be supported: returns kUnsupported otherwise). Process-global; not meant to be
// switched while kernels run on other threads.
Status set_isa(Isa isa);
std::vector<Isa> available_isas();  // every ISA usable on this machine, scalar first

// ---------------------------------------------------------------------------------------------------
// fp16 helpers (IEEE binary16 stored as uint16_t)
// ---------------------------------------------------------------------------------------------------
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);  // round to nearest even
// Rows of n values (the KV cache's fp16 storage); same results as the scalar helpers on every ISA.
void fp16_to_fp32_n(const uint16_t* x, float* y, int64_t n);
void fp32_to_fp16_n(const float* x, uint16_t* y, int64_t n);

// ---------------------------------------------------------------------------------------------------
// 1. W8A8 GEMM (prefill "NPU lane") + shadow outliers ("CPU lane")
// ---------------------------------------------------------------------------------------------------
// Numeric contract:
//   code[m,k] = clamp(round_half_even(x[m,k] / s_a), -128, 127)            (true IEEE division)
//   y[m,n]    = float(sum_k code[m,k] * qw[n,k]) * (s_a * s_w[n]) + bias[n]  (exact int32 accumulation,
//               one fp32 rounding for the int32->float conversion, s_a*s_w[n] rounded once to fp32)
//   shadow:   r[m,k] = x[m,k] - code[m,k] * s_a for every element whose unclamped code left [-128,127];
//             y[m,n] += sum over those elements of r[m,k] * (qw[n,k] * s_w[n])     (fp32)
// AVX-512 VNNI computes the u8 x s8 product as (code+128) x qw and subtracts 128 * colsum(qw[n,:]) (exact).

// Packed int8 weights: panels of 16 output channels, [Kp/4][16][4] int8 each (Np = N rounded up to 16,
// Kp = K rounded up to 4, padding zero); panels are grouped in threes (the last group may hold 1 or 2)
// and a group is interleaved per k4 step: [group][Kp/4][panel in group][16][4] (see layout.h), so one
// micro-kernel step reads 192 contiguous bytes. Per-channel scale and column sums kept alongside.
struct W8A8Weights {
  int64_t N = 0, K = 0, Np = 0, Kp = 0;
  AlignedBuffer<int8_t> data;         // packed codes
  AlignedBuffer<float> weight_scale;  // [Np] (0 in padding)
  AlignedBuffer<int32_t> col_sum;     // [Np] sum_k qw[n,k]
  // Optional float copies of the "hot" outlier columns (docs/formats.md outlier_channels):
  // hot_cols[i*Np + n] = qw[n, hot_channel[i]] * s_w[n]; hot_index[k] = i or -1.
  std::vector<int32_t> hot_channel;
  std::vector<int32_t> hot_index;
  AlignedBuffer<float> hot_cols;
};
// qweight: int8 [N, K] (row stride ldw), codes in [-127, 127] (-128 is rejected: kInvalidArgument).
// outlier_channels may be null when n_outlier == 0.
// Packing runs at load time; pool (optional) parallelizes it over output blocks.
Status w8a8_pack(const int8_t* qweight, int64_t ldw, const float* weight_scale, int64_t N, int64_t K,
                 const int32_t* outlier_channels, int64_t n_outlier, W8A8Weights* out,
                 ThreadPool* pool = nullptr);

// One clipped activation element, for the shadow path.
struct Outlier {
  int32_t m, k;
  float residual;  // x - code * s_a
};
// Quantized activations, in the layout the active ISA's GEMM reads:
// - lda == 0: row tiles of 8, [Mp/8][Kp/4][8][4] uint8 holding code + 128, Mp = M rounded up to 8
//   (padding rows/cols hold code 0, i.e. byte 128);
// - lda > 0 (AMX): row-major int8 codes, lda = K rounded up to 64 bytes per row, Mp = M rounded up to 16
//   (padding rows/cols hold code 0).
// row_sum[m] = sum_k code[m,k]. w8a8_act_code() reads one code from either layout.
struct W8A8Act {
  int64_t M = 0, K = 0, Mp = 0, Kp = 0, lda = 0;
  float scale = 0.f;
  AlignedBuffer<uint8_t> data;
  AlignedBuffer<int32_t> row_sum;
  std::vector<Outlier> outliers;           // sorted by (m, k)
  std::vector<int32_t> outlier_row_begin;  // [M + 1]: outliers of row m are [begin[m], begin[m+1])
};
// Quantizes x [M, K] (row stride ldx) with the static per-tensor scale s_a (> 0, finite).
// Buffers of `out` are reused when large enough. Collects every clipped element into out->outliers.
Status w8a8_quantize(const float* x, int64_t M, int64_t K, int64_t ldx, float s_a, W8A8Act* out,
                     ThreadPool* pool);
// The code of element (m, k) of a quantized activation (tests and debugging).
int32_t w8a8_act_code(const W8A8Act& a, int64_t m, int64_t k);
// y[M, N] (row stride ldy) = dequant(int8 GEMM) (+ bias[N] if non-null); if accumulate, adds into y.
// Requires a.K == w.K.
Status w8a8_gemm(const W8A8Act& a, const W8A8Weights& w, const float* bias, float* y, int64_t ldy,
                 bool accumulate, ThreadPool* pool);
// Shadow outlier execution: y[m, :] += sum over a.outliers of residual * W[:, k] * s_w. Uses hot_cols
// for hot channels and decodes the column from the packed int8 weights otherwise. This is the "CPU
// lane" half of a W8A8 linear whose int8 GEMM may run elsewhere (an NPU), concurrently.
Status w8a8_shadow(const W8A8Act& a, const W8A8Weights& w, float* y, int64_t ldy, ThreadPool* pool);
// CPU-only W8A8 linear: the int8 GEMM with the shadow outliers applied in its epilogue (AVX-512: the
// outlier columns are decoded from the weight panels already in cache; other ISAs run w8a8_gemm then
// w8a8_shadow). Bit-identical to w8a8_gemm followed by w8a8_shadow.
Status w8a8_linear(const W8A8Act& a, const W8A8Weights& w, const float* bias, float* y, int64_t ldy,
                   bool accumulate, ThreadPool* pool);

// ---------------------------------------------------------------------------------------------------
// 2-4. Weight-only int4 / int8 (dense or 2:4 sparse) GEMV and GEMM (decode)
// ---------------------------------------------------------------------------------------------------
// Numeric contract (llama.cpp Q8_0/Q8_K style):
//   activations are quantized per row in blocks of QB = largest of {128, 64, 32} dividing G:
//     amax = max|x| over the block, d = amax / 127, id = amax > 0 ? 127 / amax : 0,
//     q = round_half_even(x * id) in [-127, 127]
//   y[m,n] = sum_groups scale[n,g] * sum_{blocks b in g} (d_b * float(dot_int32(wcode - zero, q_b)))
//            (+ bias). The integer dot per block (zero point included) is exact; everything after is
//            fp32 (summation order varies by ISA).
//   So the result differs from the fp32 product x @ dequant(W)^T by the activation quantization error
//   only (relative ~1/254 of each block's max per element, averaging out over K).
enum class WFormat : int32_t { kInt4 = 0, kInt8 = 1 };

// Packed layout: blocks of 16 output rows (Np = N rounded up to 16); inside a block, for every group g:
//   dense int4 : G/8 chunks of 64 bytes; byte 4*r + j of chunk c: low nibble = u[r, g*G+8c+j],
//                high nibble = u[r, g*G+8c+4+j]  (r = row in block, j = 0..3)
//   dense int8 : G/4 chunks of 64 bytes; byte 4*r + j of chunk s = q[r, g*G+4s+j] + 128 (uint8)
//   2:4 int4   : per 32 inputs ("slab", 176 bytes): 2 x 64 bytes of kept nibbles (byte 4*r + j of
//                chunk c: low nibble = kept value j of inputs 16c..16c+7, high = of 16c+8..16c+15;
//                j = 2 * (group of 4) + (0: first kept, 1: second)), then 48 bytes of 3-bit pattern
//                codes (layout.h: row r's 8 codes in a 24-bit word at byte 3*r)
//   2:4 int8   : per 32 inputs (304 bytes): 4 x 64 bytes of kept (q + 128), byte 4*r + j of chunk s =
//                kept value j of inputs 8s..8s+7, then the 48 bytes of pattern codes
//   then 16 fp16 scales (32 bytes) and, if asymmetric, 16 zero bytes (int4: 0..15, int8: z + 128).
// Blocks are contiguous, so a thread streams one sequential range of memory.
struct WoqWeights {
  WFormat format = WFormat::kInt4;
  bool sparse24 = false;
  bool has_zeros = false;
  int64_t N = 0, K = 0, Np = 0, G = 0;
  int64_t group_bytes = 0;  // bytes per (16-row block, group), scales/zeros included
  int64_t block_bytes = 0;  // bytes per 16-row block = (K / G) * group_bytes
  AlignedBuffer<uint8_t> data;
};
// int4: qweight uint8 [N, K/2] (docs/formats.md nibble order), scales fp16 [N, K/G], zeros uint8
// [N, K/G] or null (symmetric, zero = 8). Requires K % G == 0, G % 32 == 0.
Status woq_pack_int4(const uint8_t* qweight, const uint16_t* scales, const uint8_t* zeros, int64_t N,
                     int64_t K, int64_t G, WoqWeights* out, ThreadPool* pool = nullptr);
// int8: qweight int8 [N, K], scales fp16 [N, K/G], zeros int8 [N, K/G] or null. G = K is per-channel.
Status woq_pack_int8(const int8_t* qweight, const uint16_t* scales, const int8_t* zeros, int64_t N,
                     int64_t K, int64_t G, WoqWeights* out, ThreadPool* pool = nullptr);
// 2:4 variants: same inputs (dense with zeros); a weight is zero when its code equals its zero point.
// Returns kNotSparse if some aligned group of 4 inputs in a row has more than 2 nonzeros.
Status woq_pack_int4_sparse24(const uint8_t* qweight, const uint16_t* scales, const uint8_t* zeros,
                              int64_t N, int64_t K, int64_t G, WoqWeights* out, ThreadPool* pool = nullptr);
Status woq_pack_int8_sparse24(const int8_t* qweight, const uint16_t* scales, const int8_t* zeros,
                              int64_t N, int64_t K, int64_t G, WoqWeights* out, ThreadPool* pool = nullptr);

// Activations quantized for the weight-only kernels: q int8 [M][K], per block d (float) and the code
// sum asum (int32) [M][K/QB]; the zero-point correction z * asum is applied in int32 (exact).
struct WoqAct {
  int64_t M = 0, K = 0, QB = 0;
  AlignedBuffer<int8_t> q;
  AlignedBuffer<float> d;
  AlignedBuffer<int32_t> asum;
  // 2:4 gather tables, built by woq_gemm on first use with 2:4 weights on ISAs that use them (VBMI):
  // per row and 8 inputs, 32 bytes: entry code | p << 3 | g << 4 = q[8c + 4g + (p ? second : first)(code)].
  // woq_quantize invalidates them.
  mutable AlignedBuffer<int8_t> sp_tab;
  mutable bool sp_tab_ready = false;
};
int64_t woq_act_block(int64_t G);  // QB for a group size
Status woq_quantize(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t QB, WoqAct* out,
                    ThreadPool* pool);
// y[M, N] = x @ W^T (+ bias). a.QB must equal woq_act_block(w.G).
Status woq_gemm(const WoqAct& a, const WoqWeights& w, const float* bias, float* y, int64_t ldy,
                ThreadPool* pool);
// Convenience: quantize x into `scratch` and run woq_gemm.
Status woq_linear(const float* x, int64_t M, int64_t ldx, const WoqWeights& w, const float* bias,
                  float* y, int64_t ldy, WoqAct* scratch, ThreadPool* pool);
size_t woq_bytes(const WoqWeights& w);  // packed bytes read by one GEMV

// ---------------------------------------------------------------------------------------------------
// 7. fp32 GEMM (vision encoder float layers, anything unquantized)
// ---------------------------------------------------------------------------------------------------
// Packed weights: panels of 16 output channels, [Np/16][K][16] float (padding zero).
struct F32Weights {
  int64_t N = 0, K = 0, Np = 0;
  AlignedBuffer<float> data;
};
Status f32_pack(const float* W, int64_t ldw, int64_t N, int64_t K, F32Weights* out, ThreadPool* pool = nullptr);
// y[M,N] = x[M,K] @ W^T (+ bias) (accumulate: y += ...). fp32 FMA accumulation, K-blocked (order differs
// from a naive loop: compare with relative tolerance ~1e-5 * sqrt(K)).
Status f32_gemm(const float* x, int64_t M, int64_t ldx, const F32Weights& w, const float* bias,
                float* y, int64_t ldy, bool accumulate, ThreadPool* pool);

// ---------------------------------------------------------------------------------------------------
// 5. Elementwise / normalization (fp32). Row-wise functions take row strides; in-place allowed (x == y).
// ---------------------------------------------------------------------------------------------------
// RMSNorm (HF Llama): y = x * (1 / sqrt(mean(x^2) + eps)) * weight. weight may be null (= 1).
Status rmsnorm(const float* x, int64_t ldx, const float* weight, float* y, int64_t ldy, int64_t rows,
               int64_t dim, float eps, ThreadPool* pool);
// LayerNorm: y = (x - mean) / sqrt(var + eps) * gamma + beta (biased variance). gamma/beta may be null.
Status layernorm(const float* x, int64_t ldx, const float* gamma, const float* beta, float* y,
                 int64_t ldy, int64_t rows, int64_t dim, float eps, ThreadPool* pool);
// Softmax over each row of n elements, in place.
Status softmax(float* x, int64_t ld, int64_t rows, int64_t n, ThreadPool* pool);
// y = act(x) over n contiguous elements (x == y allowed).
Status silu(const float* x, float* y, int64_t n, ThreadPool* pool);
Status gelu_erf(const float* x, float* y, int64_t n, ThreadPool* pool);   // 0.5 x (1 + erf(x/sqrt2))
Status gelu_tanh(const float* x, float* y, int64_t n, ThreadPool* pool);  // tanh approximation
Status quick_gelu(const float* x, float* y, int64_t n, ThreadPool* pool); // x sigmoid(1.702 x) (CLIP)
// SwiGLU combine: y[r, i] = silu(gate[r, i]) * up[r, i], i < n. For a fused gate+up GEMM output
// [rows, 2n] pass gate = out, up = out + n, ld = 2n.
Status swiglu(const float* gate, int64_t ldg, const float* up, int64_t ldu, float* y, int64_t ldy,
              int64_t rows, int64_t n, ThreadPool* pool);

// RoPE, Hugging Face Llama convention (rotate_half): within the first rot_dim entries of each head,
// entry i < rot_dim/2 pairs with i + rot_dim/2; angle = pos * inv_freq[i], inv_freq[i] = theta^(-2i/rot_dim)
// computed in fp32 as HF does (1 / theta ** (float(2i) / rot_dim), pos * inv_freq in fp32).
struct RopeTable {
  int64_t max_pos = 0, rot_dim = 0;
  AlignedBuffer<float> cos, sin;  // [max_pos][rot_dim/2]
};
Status rope_init(int64_t max_pos, int64_t rot_dim, float theta, RopeTable* out);
// In place on rows r < rows: x[r*ld + h*head_dim + ...] for h < n_heads, position positions[r].
Status rope_apply(float* x, int64_t ld, int64_t rows, int64_t n_heads, int64_t head_dim,
                  const int32_t* positions, const RopeTable& table, ThreadPool* pool);

// ---------------------------------------------------------------------------------------------------
// 6. Attention (fp32)
// ---------------------------------------------------------------------------------------------------
// Query row i (i < n_q) of head h reads q[i*q_ld + h*head_dim + d]; it attends to keys t of kv head
// h / (n_heads / n_kv_heads) at k[kvh*k_head_stride + t*k_ld + d] (same for v), for
//   causal:     t <= q_pos0 + i  (and t < n_kv)      -- chunked prefill against a KV cache, decode (n_q=1)
//   non-causal: t < n_kv                              -- ViT
// out[i*out_ld + h*head_dim + d]. scale is usually 1/sqrt(head_dim). head_dim <= 256.
// A KV cache laid out [n_kv_heads][max_seq][head_dim] has k_head_stride = max_seq*head_dim, k_ld = head_dim;
// a fused QKV output [S][(H + 2Hkv) * D] has k_ld = row width, k_head_stride = head_dim.
struct AttentionArgs {
  const float* q = nullptr;
  int64_t q_ld = 0;
  const float* k = nullptr;
  int64_t k_ld = 0, k_head_stride = 0;
  const float* v = nullptr;
  int64_t v_ld = 0, v_head_stride = 0;
  float* out = nullptr;
  int64_t out_ld = 0;
  int64_t n_q = 0, n_kv = 0, q_pos0 = 0;
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  bool causal = true;
  float scale = 0.f;
  // fp16 K and V (IEEE binary16, same ld / head strides in elements): when set, k and v are not read.
  // Decode-shaped tasks widen them in registers where the ISA can (KernelTable::attn_task_f16), others
  // widen the rows they need to fp32 first; either way the result equals fp32 attention on the
  // fp16-rounded keys and values.
  const uint16_t* k16 = nullptr;
  const uint16_t* v16 = nullptr;
  // Permits bf16 Q, K, V and probabilities (fp32 accumulation, scores and softmax) on CPUs with AVX512-BF16 (AMX-BF16 tiles, else vdpbf16ps),
  // for calls with at least 16 query rows per kv head and head_dim a multiple of 32; fp32 otherwise.
  bool allow_bf16 = false;
};
Status attention(const AttentionArgs& args, ThreadPool* pool);
// True when attention() can take the bf16 path on this CPU (the CPU has AVX512-BF16: AMX-BF16 or vdpbf16ps kernels).
bool attention_bf16_available();

// ---------------------------------------------------------------------------------------------------
// Scalar references on the canonical formats (used by tests and the benchmark's correctness checks).
// They are slow and simple on purpose; double accumulation where it is the contract's ideal.
// ---------------------------------------------------------------------------------------------------
namespace ref {
int8_t w8a8_code(float x, float s_a, bool* clipped);
// W8A8 with or without shadow outliers, on the canonical [N,K] weights.
void w8a8_linear(const float* x, int64_t M, int64_t K, float s_a, const int8_t* qweight,
                 const float* weight_scale, const float* bias, int64_t N, bool shadow, float* y);
void woq_quantize_row(const float* x, int64_t K, int64_t QB, int8_t* q, float* d, int32_t* asum);
// Weight-only int4/int8 linear with the activation-quantization contract above.
void woq_int4_linear(const float* x, int64_t M, int64_t K, const uint8_t* qweight,
                     const uint16_t* scales, const uint8_t* zeros, int64_t G, const float* bias,
                     int64_t N, float* y);
void woq_int8_linear(const float* x, int64_t M, int64_t K, const int8_t* qweight,
                     const uint16_t* scales, const int8_t* zeros, int64_t G, const float* bias,
                     int64_t N, float* y);
void f32_linear(const float* x, int64_t M, int64_t K, const float* W, const float* bias, int64_t N,
                float* y);  // double accumulation
void rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps);
void layernorm(const float* x, const float* g, const float* b, float* y, int64_t rows, int64_t dim,
               float eps);
void softmax(float* x, int64_t rows, int64_t n);
float silu(float x);
float gelu_erf(float x);
float gelu_tanh(float x);
float quick_gelu(float x);
void rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, int64_t rot_dim,
          const int32_t* positions, float theta);
void attention(const AttentionArgs& a);
}  // namespace ref

}  // namespace kernels
}  // namespace edgemm
