// Public entry points: argument validation, work splitting over the thread pool, ISA dispatch.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "aligned_buffer.h"
#include "cpu_features.h"
#include "isa_impl.h"
#include "layout.h"

namespace edgemm {
namespace kernels {

using layout::round_up;

#define EDGEMM_CHECK(cond) \
  do {                     \
    if (!(cond)) return Status::kInvalidArgument; \
  } while (0)
#define EDGEMM_ALLOC(buf, n, zero) \
  do {                             \
    if (!(buf).resize((n), (zero))) return Status::kOutOfMemory; \
  } while (0)

// ---------------------------------------------------------------------------------------------------
// ISA selection
// ---------------------------------------------------------------------------------------------------
namespace impl {
#if !defined(EDGEMM_HAVE_AVX2)
const KernelTable* table_avx2() { return nullptr; }
#endif
#if !defined(EDGEMM_HAVE_AVX512)
const KernelTable* table_avx512() { return nullptr; }
#endif
#if !defined(EDGEMM_HAVE_NEON)
const KernelTable* table_neon() { return nullptr; }
#endif
#if !defined(EDGEMM_HAVE_AMX)
const KernelTable* table_amx() { return nullptr; }
bool amx_supported() { return false; }
#endif

namespace {
const KernelTable* table_for(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::kScalar: return table_scalar();
    case Isa::kAvx2: return (f.avx2 && f.fma && f.f16c) ? table_avx2() : nullptr;
    case Isa::kAvx512Vnni:
      return (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni && f.fma && f.f16c)
                 ? table_avx512()
                 : nullptr;
    case Isa::kNeonDot: return (f.neon && f.dotprod) ? table_neon() : nullptr;
    case Isa::kAvx512Amx:
      return (table_for(Isa::kAvx512Vnni) && table_amx() && amx_supported()) ? table_amx() : nullptr;
  }
  return nullptr;
}
std::atomic<const KernelTable*> g_table{nullptr};
constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512Vnni, Isa::kNeonDot, Isa::kAvx512Amx};
}  // namespace

// EDGEMM_ISA=<isa_name> picks the initial ISA (e.g. avx512_vnni to compare with or avoid AMX); a name
// this machine cannot run is ignored (best_isa() is used).
const KernelTable* env_table() {
  const char* e = std::getenv("EDGEMM_ISA");
  if (!e || !*e) return nullptr;
  for (Isa i : kAllIsas)
    if (std::strcmp(e, isa_name(i)) == 0) return table_for(i);
  return nullptr;
}

const KernelTable& active_table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = env_table();
    if (!t) t = table_for(best_isa());
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}
}  // namespace impl

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kNeonDot: return "neon_dotprod";
    case Isa::kAvx512Amx: return "avx512_amx";
  }
  return "unknown";
}

Isa best_isa() {
  for (Isa i : {Isa::kAvx512Amx, Isa::kAvx512Vnni, Isa::kNeonDot, Isa::kAvx2})
    if (impl::table_for(i)) return i;
  return Isa::kScalar;
}

Isa active_isa() { return impl::active_table().isa; }

Status set_isa(Isa isa) {
  const impl::KernelTable* t = impl::table_for(isa);
  if (!t) return Status::kUnsupported;
  impl::g_table.store(t, std::memory_order_release);
  return Status::kOk;
}

std::vector<Isa> available_isas() {
  std::vector<Isa> v;
  for (Isa i : impl::kAllIsas)
    if (impl::table_for(i)) v.push_back(i);
  return v;
}

// ---------------------------------------------------------------------------------------------------
// W8A8
// ---------------------------------------------------------------------------------------------------
Status w8a8_quantize(const float* x, int64_t M, int64_t K, int64_t ldx, float s_a, W8A8Act* out,
                     ThreadPool* pool) {
  EDGEMM_CHECK(x && out && M > 0 && K > 0 && ldx >= K && s_a > 0 && std::isfinite(s_a));
  if (K > 65536) return Status::kOverflow;
  W8A8Act& a = *out;
  const impl::KernelTable& t = impl::active_table();
  a.M = M;
  a.K = K;
  a.Kp = round_up(K, 4);
  a.lda = t.w8a8_rowmajor ? round_up(K, 64) : 0;
  a.Mp = round_up(M, t.w8a8_rowmajor ? 16 : 8);
  a.scale = s_a;
  const int64_t row_bytes = t.w8a8_rowmajor ? a.lda : a.Kp;
  EDGEMM_ALLOC(a.data, size_t(a.Mp * row_bytes), false);
  EDGEMM_ALLOC(a.row_sum, size_t(a.Mp), false);
  // Padding rows: code 0 (byte 128 in the tile layout, 0 in the row-major one).
  for (int64_t r = M; r < a.Mp; ++r) {
    if (t.w8a8_rowmajor) {
      std::fill(a.data.data() + r * a.lda, a.data.data() + (r + 1) * a.lda, uint8_t(0));
    } else {
      uint8_t* tile = a.data.data() + (r / 8) * a.Kp * 8 + (r % 8) * 4;
      for (int64_t k4 = 0; k4 < a.Kp / 4; ++k4)
        for (int j = 0; j < 4; ++j) tile[k4 * 32 + j] = 128;
    }
    a.row_sum[r] = 0;
  }
  const int nt = pool_threads(pool);
  try {
    std::vector<std::vector<Outlier>> parts(static_cast<size_t>(nt));
    parallel_for(pool, M, 8, [&](int64_t r0, int64_t r1, int tid) {
      t.w8a8_quant(x, ldx, K, s_a, a.data.data(), row_bytes, a.row_sum.data(), r0, r1, &parts[tid]);
    });
    a.outliers.clear();
    for (auto& p : parts) a.outliers.insert(a.outliers.end(), p.begin(), p.end());
    a.outlier_row_begin.assign(size_t(M + 1), 0);
    for (const Outlier& o : a.outliers) a.outlier_row_begin[o.m + 1]++;
    for (int64_t m = 0; m < M; ++m) a.outlier_row_begin[m + 1] += a.outlier_row_begin[m];
  } catch (const std::bad_alloc&) {
    return Status::kOutOfMemory;
  }
  return Status::kOk;
}

namespace {
Status w8a8_gemm_impl(const W8A8Act& a, const W8A8Weights& w, const float* bias, float* y, int64_t ldy,
                      bool accumulate, bool fuse, ThreadPool* pool) {
  EDGEMM_CHECK(y && a.M > 0 && w.N > 0 && a.K == w.K && a.Kp == w.Kp && ldy >= w.N);
  const impl::KernelTable& t = impl::active_table();
  // The activations must be in the active table's layout (quantized after the last set_isa()).
  EDGEMM_CHECK(t.w8a8_rowmajor ? (a.lda >= a.Kp && a.lda % 64 == 0 && a.Mp % 16 == 0) : a.lda == 0);
  const int64_t tile_rows = t.w8a8_rowmajor ? 16 : 8;
  EDGEMM_CHECK(a.data.size() >= size_t(a.Mp * (a.lda ? a.lda : a.Kp)) && w.data.size() >= size_t(w.Np * w.Kp));
  EDGEMM_CHECK(!fuse || a.outlier_row_begin.size() == size_t(a.M + 1));
  impl::W8A8GemmArgs g{a.data.data(), w.data.data(), w.col_sum.data(), w.weight_scale.data(), bias,
                       a.scale, a.M, w.N, a.Mp, w.Np, w.Kp, y, ldy, accumulate,
                       fuse ? a.outliers.data() : nullptr, fuse ? a.outlier_row_begin.data() : nullptr, a.lda};
  const int64_t tiles = a.Mp / tile_rows, panels = w.Np / 16;
  // Default: threads take row tiles and walk the same weight panels, so threads on SMT siblings (the
  // benchmark machine's two vCPUs are) share each weight panel in L1/L2; measured faster than splitting
  // the columns. EDGEMM_W8A8_SPLIT=n forces the column split (also used when there are few row tiles).
  static const char* split_env = std::getenv("EDGEMM_W8A8_SPLIT");
  const bool split_m = !(split_env && split_env[0] == 'n');
  const int64_t nt = pool_threads(pool);
  if (split_m && tiles >= 2 * nt) {
    // Dynamic chunks of row tiles (2 per thread): on an idle machine the threads still walk the
    // panels together; on a busy one a descheduled thread does not hold the GEMM up.
    const int64_t n_chunks = nt > 1 ? 2 * nt : 1, per = (tiles + n_chunks - 1) / n_chunks;
    parallel_for_dynamic(pool, (tiles + per - 1) / per, [&](int64_t c, int) {
      t.w8a8_gemm(g, 0, panels, c * per, std::min(tiles, (c + 1) * per));
    });
  } else {
    parallel_for(pool, panels, 3, [&](int64_t p0, int64_t p1, int) { t.w8a8_gemm(g, p0, p1, 0, tiles); });
  }
  return Status::kOk;
}
}  // namespace

int32_t w8a8_act_code(const W8A8Act& a, int64_t m, int64_t k) {
  if (a.lda > 0) return static_cast<int8_t>(a.data[size_t(m * a.lda + k)]);
  return int32_t(a.data[size_t((m / 8) * a.Kp * 8 + (k / 4) * 32 + (m % 8) * 4 + (k % 4))]) - 128;
}

Status w8a8_gemm(const W8A8Act& a, const W8A8Weights& w, const float* bias, float* y, int64_t ldy,
                 bool accumulate, ThreadPool* pool) {
  return w8a8_gemm_impl(a, w, bias, y, ldy, accumulate, false, pool);
}

Status w8a8_linear(const W8A8Act& a, const W8A8Weights& w, const float* bias, float* y, int64_t ldy,
                   bool accumulate, ThreadPool* pool) {
  const bool fused = impl::active_table().w8a8_gemm_fuses_shadow && !a.outliers.empty();
  Status s = w8a8_gemm_impl(a, w, bias, y, ldy, accumulate, fused, pool);
  if (s != Status::kOk || fused) return s;
  return w8a8_shadow(a, w, y, ldy, pool);
}

Status w8a8_shadow(const W8A8Act& a, const W8A8Weights& w, float* y, int64_t ldy, ThreadPool* pool) {
  EDGEMM_CHECK(y && a.K == w.K && ldy >= w.N);
  if (a.outliers.empty()) return Status::kOk;
  for (const Outlier& o : a.outliers) EDGEMM_CHECK(o.m >= 0 && o.m < a.M && o.k >= 0 && o.k < w.K);
  try {
    // Group by channel (outliers concentrate in a few channels): each column is fetched once.
    std::vector<Outlier> by_k(a.outliers);
    std::stable_sort(by_k.begin(), by_k.end(), [](const Outlier& x, const Outlier& y) { return x.k < y.k; });
    std::vector<int64_t> k_begin;
    for (size_t i = 0; i < by_k.size(); ++i)
      if (i == 0 || by_k[i].k != by_k[i - 1].k) k_begin.push_back(static_cast<int64_t>(i));
    k_begin.push_back(static_cast<int64_t>(by_k.size()));
    impl::ShadowArgs s{by_k.data(), k_begin.data(), static_cast<int64_t>(k_begin.size()) - 1, &w, y, ldy};
    const impl::KernelTable& t = impl::active_table();
    // Ranges of whole panel groups (48 outputs).
    parallel_for(pool, w.Np, 48, [&](int64_t n0, int64_t n1, int) { t.w8a8_shadow(s, n0, n1); });
  } catch (const std::bad_alloc&) {
    return Status::kOutOfMemory;
  }
  return Status::kOk;
}

// ---------------------------------------------------------------------------------------------------
// Weight-only
// ---------------------------------------------------------------------------------------------------
Status woq_quantize(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t QB, WoqAct* out,
                    ThreadPool* pool) {
  EDGEMM_CHECK(x && out && M > 0 && K > 0 && ldx >= K);
  EDGEMM_CHECK((QB == 32 || QB == 64 || QB == 128) && K % QB == 0);
  WoqAct& a = *out;
  a.M = M;
  a.K = K;
  a.QB = QB;
  const int64_t nb = K / QB;
  EDGEMM_ALLOC(a.q, size_t(M * K), false);
  EDGEMM_ALLOC(a.d, size_t(M * nb), false);
  EDGEMM_ALLOC(a.asum, size_t(M * nb), false);
  a.sp_tab_ready = false;
  const impl::KernelTable& t = impl::active_table();
  int64_t grain = std::max<int64_t>(1, 16384 / K);
  parallel_for(pool, M, grain, [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r)
      t.woq_quant_row(x + r * ldx, K, QB, a.q.data() + r * K, a.d.data() + r * nb,
                      a.asum.data() + r * nb);
  });
  return Status::kOk;
}

Status woq_gemm(const WoqAct& a, const WoqWeights& w, const float* bias, float* y, int64_t ldy,
                ThreadPool* pool) {
  EDGEMM_CHECK(y && a.M > 0 && w.N > 0 && a.K == w.K && ldy >= w.N && a.QB == woq_act_block(w.G));
  EDGEMM_CHECK(w.data.size() >= woq_bytes(w));
  const impl::KernelTable& t = impl::active_table();
  impl::WoqGemmFn fn;
  if (w.format == WFormat::kInt4)
    fn = w.sparse24 ? t.woq_int4_sp : t.woq_int4;
  else
    fn = w.sparse24 ? t.woq_int8_sp : t.woq_int8;
  if (w.sparse24 && t.woq_sp_tab && !a.sp_tab_ready) {
    EDGEMM_ALLOC(a.sp_tab, size_t(a.M * (a.K / 8) * 32 + 64), false);
    for (int64_t m = 0; m < a.M; ++m) t.woq_sp_tab(a.q.data() + m * a.K, a.K, a.sp_tab.data() + m * (a.K / 8) * 32);
    a.sp_tab_ready = true;
  }
  impl::WoqGemmArgs g{&a, &w, bias, y, ldy};
  // Dynamic chunks of >= 64 KiB of contiguous weights (about 8 per thread): as fast as a static split
  // on an idle machine, and a descheduled thread no longer holds the whole GEMV up on a busy one.
  const int64_t blocks = w.Np / 16, nt = pool_threads(pool);
  const int64_t min_blocks = std::max<int64_t>(1, (int64_t(64) << 10) / std::max<int64_t>(1, w.block_bytes));
  const int64_t chunk = std::max(min_blocks, blocks / (8 * nt));
  const int64_t n_chunks = (blocks + chunk - 1) / chunk;
  parallel_for_dynamic(pool, n_chunks, [&](int64_t c, int) {
    fn(g, c * chunk, std::min(blocks, (c + 1) * chunk));
  });
  return Status::kOk;
}

Status woq_linear(const float* x, int64_t M, int64_t ldx, const WoqWeights& w, const float* bias,
                  float* y, int64_t ldy, WoqAct* scratch, ThreadPool* pool) {
  EDGEMM_CHECK(scratch);
  Status s = woq_quantize(x, M, w.K, ldx, woq_act_block(w.G), scratch, pool);
  if (s != Status::kOk) return s;
  return woq_gemm(*scratch, w, bias, y, ldy, pool);
}

// ---------------------------------------------------------------------------------------------------
// fp32 GEMM
// ---------------------------------------------------------------------------------------------------
Status f32_gemm(const float* x, int64_t M, int64_t ldx, const F32Weights& w, const float* bias,
                float* y, int64_t ldy, bool accumulate, ThreadPool* pool) {
  EDGEMM_CHECK(x && y && M > 0 && w.N > 0 && ldx >= w.K && ldy >= w.N);
  EDGEMM_CHECK(w.data.size() >= size_t(w.Np * w.K));
  impl::F32GemmArgs g{x, M, w.K, ldx, &w, bias, y, ldy, accumulate};
  const impl::KernelTable& t = impl::active_table();
  parallel_for(pool, w.Np / 16, 3, [&](int64_t p0, int64_t p1, int) { t.f32_gemm(g, p0, p1); });
  return Status::kOk;
}

// ---------------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------------
namespace {
int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(dim, 1)); }
}  // namespace

Status rmsnorm(const float* x, int64_t ldx, const float* weight, float* y, int64_t ldy, int64_t rows,
               int64_t dim, float eps, ThreadPool* pool) {
  EDGEMM_CHECK(x && y && rows > 0 && dim > 0 && ldx >= dim && ldy >= dim && eps >= 0);
  const impl::KernelTable& t = impl::active_table();
  parallel_for(pool, rows, row_grain(dim), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) t.rmsnorm_row(x + r * ldx, weight, y + r * ldy, dim, eps);
  });
  return Status::kOk;
}

Status layernorm(const float* x, int64_t ldx, const float* gamma, const float* beta, float* y,
                 int64_t ldy, int64_t rows, int64_t dim, float eps, ThreadPool* pool) {
  EDGEMM_CHECK(x && y && rows > 0 && dim > 0 && ldx >= dim && ldy >= dim && eps >= 0);
  const impl::KernelTable& t = impl::active_table();
  parallel_for(pool, rows, row_grain(dim), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r)
      t.layernorm_row(x + r * ldx, gamma, beta, y + r * ldy, dim, eps);
  });
  return Status::kOk;
}

Status softmax(float* x, int64_t ld, int64_t rows, int64_t n, ThreadPool* pool) {
  EDGEMM_CHECK(x && rows > 0 && n > 0 && ld >= n);
  const impl::KernelTable& t = impl::active_table();
  parallel_for(pool, rows, row_grain(n), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) t.softmax_row(x + r * ld, n);
  });
  return Status::kOk;
}

namespace {
Status unary(impl::UnaryFn fn, const float* x, float* y, int64_t n, ThreadPool* pool) {
  EDGEMM_CHECK(x && y && n >= 0);
  parallel_for(pool, n, 16384, [&](int64_t i0, int64_t i1, int) { fn(x + i0, y + i0, i1 - i0); });
  return Status::kOk;
}
}  // namespace

Status silu(const float* x, float* y, int64_t n, ThreadPool* pool) {
  return unary(impl::active_table().silu, x, y, n, pool);
}
Status gelu_erf(const float* x, float* y, int64_t n, ThreadPool* pool) {
  return unary(impl::active_table().gelu_erf, x, y, n, pool);
}
Status gelu_tanh(const float* x, float* y, int64_t n, ThreadPool* pool) {
  return unary(impl::active_table().gelu_tanh, x, y, n, pool);
}
// x sigmoid(1.702 x) = silu(1.702 x) / 1.702: the table's SiLU on a scaled span (a few ulp from the
// direct form).
Status quick_gelu(const float* x, float* y, int64_t n, ThreadPool* pool) {
  EDGEMM_CHECK(x && y && n >= 0);
  const impl::UnaryFn fn = impl::active_table().silu;
  constexpr float a = 1.702f, inv = 1.0f / 1.702f;
  parallel_for(pool, n, 16384, [&](int64_t i0, int64_t i1, int) {
    for (int64_t i = i0; i < i1; ++i) y[i] = a * x[i];
    fn(y + i0, y + i0, i1 - i0);
    for (int64_t i = i0; i < i1; ++i) y[i] *= inv;
  });
  return Status::kOk;
}

Status swiglu(const float* gate, int64_t ldg, const float* up, int64_t ldu, float* y, int64_t ldy,
              int64_t rows, int64_t n, ThreadPool* pool) {
  EDGEMM_CHECK(gate && up && y && rows > 0 && n > 0 && ldg >= n && ldu >= n && ldy >= n);
  const impl::KernelTable& t = impl::active_table();
  if (rows == 1) {
    parallel_for(pool, n, 16384, [&](int64_t i0, int64_t i1, int) {
      t.swiglu(gate + i0, up + i0, y + i0, i1 - i0);
    });
    return Status::kOk;
  }
  parallel_for(pool, rows, row_grain(n), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) t.swiglu(gate + r * ldg, up + r * ldu, y + r * ldy, n);
  });
  return Status::kOk;
}

Status rope_apply(float* x, int64_t ld, int64_t rows, int64_t n_heads, int64_t head_dim,
                  const int32_t* positions, const RopeTable& table, ThreadPool* pool) {
  EDGEMM_CHECK(x && positions && rows > 0 && n_heads > 0 && head_dim > 0);
  EDGEMM_CHECK(table.rot_dim > 0 && table.rot_dim <= head_dim && ld >= n_heads * head_dim);
  for (int64_t r = 0; r < rows; ++r) EDGEMM_CHECK(positions[r] >= 0 && positions[r] < table.max_pos);
  const impl::KernelTable& t = impl::active_table();
  const int64_t half = table.rot_dim / 2;
  parallel_for(pool, rows, row_grain(n_heads * head_dim), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r)
      t.rope_row(x + r * ld, n_heads, head_dim, half, table.cos.data() + positions[r] * half,
                 table.sin.data() + positions[r] * half);
  });
  return Status::kOk;
}

// ---------------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------------
void fp16_to_fp32_n(const uint16_t* x, float* y, int64_t n) { impl::active_table().f16_to_f32(x, y, n); }
void fp32_to_fp16_n(const float* x, uint16_t* y, int64_t n) { impl::active_table().f32_to_f16(x, y, n); }

namespace {
// fp16 K/V: kv head `kvh`'s first T rows widened into a thread-local fp32 buffer; returns args that read
// them there (head stride 0, so any kvh indexes the same rows).
bool widen_kv(const AttentionArgs& a, int64_t kvh, int64_t T, AttentionArgs* b) {
  thread_local AlignedBuffer<float> kw, vw;
  const int64_t D = a.head_dim;
  if (!kw.resize(size_t(T * D)) || !vw.resize(size_t(T * D))) return false;
  const impl::KernelTable& t = impl::active_table();
  auto widen = [&](const uint16_t* src, int64_t ld, float* dst) {
    if (ld == D) return t.f16_to_f32(src, dst, T * D);
    for (int64_t r = 0; r < T; ++r) t.f16_to_f32(src + r * ld, dst + r * D, D);
  };
  widen(a.k16 + kvh * a.k_head_stride, a.k_ld, kw.data());
  widen(a.v16 + kvh * a.v_head_stride, a.v_ld, vw.data());
  *b = a;
  b->k = kw.data();
  b->v = vw.data();
  b->k16 = b->v16 = nullptr;
  b->k_ld = b->v_ld = D;
  b->k_head_stride = b->v_head_stride = 0;
  return true;
}
}  // namespace

Status attention(const AttentionArgs& a, ThreadPool* pool) {
  const bool f16 = a.k16 != nullptr || a.v16 != nullptr;
  EDGEMM_CHECK(a.q && a.out && a.n_q > 0 && a.n_kv > 0 && a.q_pos0 >= 0);
  EDGEMM_CHECK(f16 ? (a.k16 && a.v16) : (a.k && a.v));
  EDGEMM_CHECK(a.n_heads > 0 && a.n_kv_heads > 0 && a.n_heads % a.n_kv_heads == 0);
  EDGEMM_CHECK(a.head_dim > 0 && a.head_dim <= 256 && std::isfinite(a.scale));
  EDGEMM_CHECK(a.q_ld >= a.n_heads * a.head_dim && a.out_ld >= a.n_heads * a.head_dim);
  EDGEMM_CHECK(a.k_ld >= a.head_dim && a.v_ld >= a.head_dim);
  EDGEMM_CHECK(a.k_head_stride >= 0 && a.v_head_stride >= 0);
  const impl::KernelTable& t = impl::active_table();
  const int64_t rows_per_task = 32, grp = a.n_heads / a.n_kv_heads;
  const int64_t row_tasks = (a.n_q + rows_per_task - 1) / rows_per_task;
  const int64_t n_tasks = a.n_kv_heads * row_tasks;
  // Keys past the causal limit of the last of `rows` query rows are never read.
  auto keys = [&](int64_t rows) { return a.causal ? std::min(a.n_kv, a.q_pos0 + rows) : a.n_kv; };
  const int64_t T_all = keys(a.n_q);
  // bf16 path: K and V of every kv head to bf16 tiles first; falls back to fp32 if the buffers cannot
  // be had.
  const uint16_t* kp = nullptr;
  const uint16_t* vp = nullptr;
  const size_t per_head = size_t(impl::attn_bf16_padded(a.n_kv) * a.head_dim);
  if (a.allow_bf16 && t.attn_bf16_task && a.head_dim % 32 == 0 && a.n_q * grp >= 16) {
    thread_local AlignedBuffer<uint16_t> kbuf, vbuf;
    if (kbuf.resize(per_head * size_t(a.n_kv_heads)) && vbuf.resize(per_head * size_t(a.n_kv_heads))) {
      uint16_t* kw = kbuf.data();
      uint16_t* vw = vbuf.data();
      std::atomic<bool> ok{true};
      parallel_for_dynamic(pool, a.n_kv_heads, [&](int64_t h, int) {
        AttentionArgs b;
        if (!f16) {
          t.attn_bf16_pack(a, h, T_all, kw + size_t(h) * per_head, vw + size_t(h) * per_head);
        } else if (widen_kv(a, h, T_all, &b)) {
          t.attn_bf16_pack(b, h, T_all, kw + size_t(h) * per_head, vw + size_t(h) * per_head);
        } else {
          ok = false;
        }
      });
      if (!ok) return Status::kOutOfMemory;
      kp = kw;
      vp = vw;
    }
  }
  std::atomic<bool> ok{true};
  // Later row blocks (more keys under the causal mask) first, for load balance.
  parallel_for_dynamic(pool, n_tasks, [&](int64_t i, int) {
    int64_t kvh = i % a.n_kv_heads, rb = row_tasks - 1 - i / a.n_kv_heads;
    int64_t i0 = rb * rows_per_task, i1 = std::min(a.n_q, i0 + rows_per_task);
    if (kp) {
      t.attn_bf16_task(a, kp + size_t(kvh) * per_head, vp + size_t(kvh) * per_head, kvh, i0, i1);
    } else if (!f16) {
      t.attn_task(a, kvh, i0, i1);
    } else if (t.attn_task_f16 && grp * (i1 - i0) < impl::kAttnFewRows && t.attn_task_f16(a, kvh, i0, i1)) {
      // decode: fp16 rows read in place
    } else {
      AttentionArgs b;
      if (widen_kv(a, kvh, keys(i1), &b))
        t.attn_task(b, kvh, i0, i1);
      else
        ok = false;
    }
  });
  return ok ? Status::kOk : Status::kOutOfMemory;
}

bool attention_bf16_available() { return impl::active_table().attn_bf16_task != nullptr; }

}  // namespace kernels
}  // namespace edgemm
