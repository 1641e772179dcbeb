// A tiny C shim over the kernel library for the numpy cross-check (tests/numpy_crosscheck.py loads it
// with ctypes). Test-only: the real public C ABI (include/edgemm.h) is a separate, later piece.
// Every function takes canonical-format inputs (docs/formats.md), packs, runs, and returns a Status code.
#include <cstdint>
#include <vector>

#include "kernels.h"

using namespace edgemm;
using namespace edgemm::kernels;

namespace {
ThreadPool* pool() {
  static ThreadPool p(2);
  return &p;
}
int st(Status s) { return static_cast<int>(s); }
}  // namespace

extern "C" {

int etest_num_isas() { return static_cast<int>(available_isas().size()); }
int etest_isa_at(int i) { return static_cast<int>(available_isas()[i]); }
const char* etest_isa_name(int isa) { return isa_name(static_cast<Isa>(isa)); }
int etest_set_isa(int isa) { return st(set_isa(static_cast<Isa>(isa))); }

int etest_w8a8_linear(const float* x, int64_t M, int64_t K, float s_a, const int8_t* qw, const float* ws,
                      const float* bias, int64_t N, int shadow, float* y, int64_t* n_outliers) {
  W8A8Weights w;
  Status s = w8a8_pack(qw, K, ws, N, K, nullptr, 0, &w);
  if (s != Status::kOk) return st(s);
  W8A8Act a;
  if ((s = w8a8_quantize(x, M, K, K, s_a, &a, pool())) != Status::kOk) return st(s);
  *n_outliers = static_cast<int64_t>(a.outliers.size());
  if ((s = w8a8_gemm(a, w, bias, y, N, false, pool())) != Status::kOk) return st(s);
  if (shadow) s = w8a8_shadow(a, w, y, N, pool());
  return st(s);
}

int etest_woq_int4(const float* x, int64_t M, int64_t K, const uint8_t* qw, const uint16_t* sc,
                   const uint8_t* zeros, int64_t G, const float* bias, int64_t N, int sparse, float* y) {
  WoqWeights w;
  Status s = sparse ? woq_pack_int4_sparse24(qw, sc, zeros, N, K, G, &w) : woq_pack_int4(qw, sc, zeros, N, K, G, &w);
  if (s != Status::kOk) return st(s);
  WoqAct a;
  return st(woq_linear(x, M, K, w, bias, y, N, &a, pool()));
}

int etest_woq_int8(const float* x, int64_t M, int64_t K, const int8_t* qw, const uint16_t* sc,
                   const int8_t* zeros, int64_t G, const float* bias, int64_t N, int sparse, float* y) {
  WoqWeights w;
  Status s = sparse ? woq_pack_int8_sparse24(qw, sc, zeros, N, K, G, &w) : woq_pack_int8(qw, sc, zeros, N, K, G, &w);
  if (s != Status::kOk) return st(s);
  WoqAct a;
  return st(woq_linear(x, M, K, w, bias, y, N, &a, pool()));
}

int etest_f32_linear(const float* x, int64_t M, int64_t K, const float* W, const float* bias, int64_t N, float* y) {
  F32Weights w;
  Status s = f32_pack(W, K, N, K, &w);
  if (s != Status::kOk) return st(s);
  return st(f32_gemm(x, M, K, w, bias, y, N, false, pool()));
}

int etest_rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps) {
  return st(rmsnorm(x, dim, w, y, dim, rows, dim, eps, pool()));
}
int etest_layernorm(const float* x, const float* g, const float* b, float* y, int64_t rows, int64_t dim, float eps) {
  return st(layernorm(x, dim, g, b, y, dim, rows, dim, eps, pool()));
}
int etest_softmax(float* x, int64_t rows, int64_t n) { return st(softmax(x, n, rows, n, pool())); }
// kind: 0 silu, 1 gelu (erf), 2 gelu (tanh)
int etest_act(int kind, const float* x, float* y, int64_t n) {
  switch (kind) {
    case 0: return st(silu(x, y, n, pool()));
    case 1: return st(gelu_erf(x, y, n, pool()));
    case 2: return st(gelu_tanh(x, y, n, pool()));
  }
  return st(Status::kInvalidArgument);
}
int etest_swiglu(const float* gate_up, float* y, int64_t rows, int64_t n) {
  return st(swiglu(gate_up, 2 * n, gate_up + n, 2 * n, y, n, rows, n, pool()));
}
int etest_rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, int64_t rot_dim, const int32_t* pos,
               float theta, int64_t max_pos) {
  RopeTable t;
  Status s = rope_init(max_pos, rot_dim, theta, &t);
  if (s != Status::kOk) return st(s);
  return st(rope_apply(x, n_heads * head_dim, rows, n_heads, head_dim, pos, t, pool()));
}
// q [n_q][H*D], k/v [Hkv][n_kv][D], out [n_q][H*D]
int etest_attention(const float* q, const float* k, const float* v, float* out, int64_t n_q, int64_t n_kv,
                    int64_t q_pos0, int64_t H, int64_t Hkv, int64_t D, int causal, float scale) {
  AttentionArgs a;
  a.q = q;
  a.q_ld = H * D;
  a.k = k;
  a.k_ld = D;
  a.k_head_stride = n_kv * D;
  a.v = v;
  a.v_ld = D;
  a.v_head_stride = n_kv * D;
  a.out = out;
  a.out_ld = H * D;
  a.n_q = n_q;
  a.n_kv = n_kv;
  a.q_pos0 = q_pos0;
  a.n_heads = H;
  a.n_kv_heads = Hkv;
  a.head_dim = D;
  a.causal = causal != 0;
  a.scale = scale;
  return st(attention(a, pool()));
}

}  // extern "C"
