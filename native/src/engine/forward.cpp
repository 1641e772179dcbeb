// EdgeVLM forward: ViT, projector, decoder chunk, session evaluation.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "engine.h"

namespace edgemm {

void run_linear(const Linear& L, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, Scratch* s,
                ThreadPool* pool) {
  if (!L.parts.empty()) {
    int64_t off = 0;
    for (const Linear& p : L.parts) {
      run_linear(p, x, M, ldx, y + off, ldy, s, pool);
      off += p.N;
    }
    return;
  }
  const float* b = L.bias.empty() ? nullptr : L.bias.data();
  pool = pool_for(pool, double(M) * double(L.N) * double(L.K));
  switch (L.kind) {
    case Linear::kF32:
      check_kernel(kernels::f32_gemm(x, M, ldx, L.f32, b, y, ldy, false, pool), "f32_gemm");
      break;
    case Linear::kW8A8:
      check_kernel(kernels::w8a8_quantize(x, M, L.K, ldx, L.input_scale, &s->act, pool), "w8a8_quantize");
      check_kernel(kernels::w8a8_linear(s->act, L.w8, b, y, ldy, false, pool), "w8a8_linear");
      break;
    case Linear::kWoq:
      check_kernel(kernels::woq_linear(x, M, ldx, L.woq, b, y, ldy, &s->wact, pool), "woq_linear");
      break;
    default:
      fail(EDGEMM_ERR_INTERNAL, "linear layer not loaded");
  }
}

static void activation(const std::string& act, float* x, int64_t n, ThreadPool* pool) {
  if (act == "gelu") {
    check_kernel(kernels::gelu_erf(x, x, n, pool), "gelu");
  } else if (act == "gelu_tanh") {
    check_kernel(kernels::gelu_tanh(x, x, n, pool), "gelu_tanh");
  } else if (act == "silu") {
    check_kernel(kernels::silu(x, x, n, pool), "silu");
  } else {  // quick_gelu: x * sigmoid(1.702 x)
    check_kernel(kernels::quick_gelu(x, x, n, pool), "quick_gelu");
  }
}

Session::Session(Model* model) : m(model) {
  const TextCfg& t = m->cfg.t;
  size_t n = size_t(t.layers) * t.kv_heads * size_t(m->max_context) * t.head_dim;
  bool ok;
  if (m->kv_fp16) {
    kcache16.reset(static_cast<uint16_t*>(std::calloc(n, sizeof(uint16_t))));
    vcache16.reset(static_cast<uint16_t*>(std::calloc(n, sizeof(uint16_t))));
    ok = kcache16 && vcache16;
  } else {
    kcache.reset(static_cast<float*>(std::calloc(n, sizeof(float))));
    vcache.reset(static_cast<float*>(std::calloc(n, sizeof(float))));
    ok = kcache && vcache;
  }
  if (!ok)
    fail(EDGEMM_ERR_OUT_OF_MEMORY, "cannot allocate the KV cache (" +
                                       std::to_string(2 * n * (m->kv_fp16 ? 2 : 4) >> 20) + " MiB)");
}

void Session::reset() {
  n_past = 0;
  image_used = false;
}

void Session::record(const std::string& name, const float* data, std::vector<int64_t> shape) {
  if (!debug) return;
  DebugTensor& t = records[name];
  int64_t n = 1;
  for (auto d : shape) n *= d;
  t.shape = std::move(shape);
  t.data.assign(data, data + n);
}

// ------------------------------------------------------------------------------------------ vision
void vision_forward(Model& m, Session& s, const float* pixels, std::vector<float>* hidden,
                    const std::vector<int>& attn_blocks, std::map<int, std::vector<float>>* cls_attn, int early,
                    int64_t k, std::vector<int32_t>* early_index) {
  const VisionCfg& v = m.cfg.v;
  ThreadPool* pool = m.pool.get();
  const int64_t g = v.grid(), p = v.patch_size, P = v.patches(), D = v.hidden, C = v.num_channels;
  int64_t S = P + 1;  // tokens in the blocks: 1 + k after an early selection
  const int64_t pin = C * p * p, img = v.image_size;
  std::vector<float> patches(static_cast<size_t>(P * pin));
  for (int64_t gy = 0; gy < g; ++gy)
    for (int64_t gx = 0; gx < g; ++gx) {
      float* dst = &patches[size_t((gy * g + gx) * pin)];
      for (int64_t c = 0; c < C; ++c)
        for (int64_t y = 0; y < p; ++y)
          for (int64_t x = 0; x < p; ++x) dst[(c * p + y) * p + x] = pixels[(c * img + gy * p + y) * img + gx * p + x];
    }
  std::vector<float>& X = *hidden;
  X.assign(size_t(S * D), 0.f);
  run_linear(m.patch_embed, patches.data(), P, pin, X.data() + D, D, &s.scratch, pool);
  for (int64_t d = 0; d < D; ++d) X[size_t(d)] = m.cls[size_t(d)];
  for (int64_t i = 0; i < S * D; ++i) X[size_t(i)] += m.pos_embed[size_t(i)];
  if (v.pre_layernorm)
    check_kernel(kernels::layernorm(X.data(), D, m.pre_ln_w.data(), m.pre_ln_b.data(), X.data(), D, S, D, v.eps, pool), "layernorm");
  s.record("vision.embed", X.data(), {S, D});
  std::vector<float> h(static_cast<size_t>(S * D)), qkv(size_t(S * 3 * D)), att(size_t(S * D)), tmp(size_t(S * D)),
      f(size_t(S * v.inter));
  const int64_t H = v.heads, hd = v.head_dim();
  const float scale = float(std::pow(double(hd), -0.5));
  for (int i = 0; i < m.cfg.feature_blocks; ++i) {
    const VitBlock& b = m.vit[size_t(i)];
    check_kernel(kernels::layernorm(X.data(), D, b.ln1_w.data(), b.ln1_b.data(), h.data(), D, S, D, v.eps, pool), "layernorm");
    run_linear(b.qkv, h.data(), S, D, qkv.data(), 3 * D, &s.scratch, pool);
    if (std::find(attn_blocks.begin(), attn_blocks.end(), i) != attn_blocks.end()) {
      // [CLS] query's softmax over [CLS] + patches, per head; head mean restricted to the patches.
      std::vector<float> mean(static_cast<size_t>(P), 0.f), sc(static_cast<size_t>(S));
      const float sq = std::sqrt(float(hd));
      std::vector<float> acc(size_t(P), 0.f);
      for (int64_t hh = 0; hh < H; ++hh) {
        const float* q0 = &qkv[size_t(hh * hd)];
        float mx = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          const float* kj = &qkv[size_t(j * 3 * D + D + hh * hd)];
          float dot = 0.f;
          for (int64_t d = 0; d < hd; ++d) dot += q0[d] * kj[d];
          sc[size_t(j)] = dot / sq;
          mx = std::max(mx, sc[size_t(j)]);
        }
        float sum = 0.f;
        for (int64_t j = 0; j < S; ++j) {
          sc[size_t(j)] = std::exp(sc[size_t(j)] - mx);
          sum += sc[size_t(j)];
        }
        for (int64_t j = 1; j < S; ++j) acc[size_t(j - 1)] += sc[size_t(j)] / sum;
      }
      for (int64_t j = 0; j < P; ++j) mean[size_t(j)] = acc[size_t(j)] / float(H);
      (*cls_attn)[i] = std::move(mean);
    }
    kernels::AttentionArgs a;
    a.q = qkv.data();
    a.q_ld = 3 * D;
    a.k = qkv.data() + D;
    a.k_ld = 3 * D;
    a.k_head_stride = hd;
    a.v = qkv.data() + 2 * D;
    a.v_ld = 3 * D;
    a.v_head_stride = hd;
    a.out = att.data();
    a.out_ld = D;
    a.n_q = S;
    a.n_kv = S;
    a.q_pos0 = 0;
    a.n_heads = H;
    a.n_kv_heads = H;
    a.head_dim = hd;
    a.causal = false;
    a.scale = scale;
    a.allow_bf16 = m.vit_attn_bf16;
    check_kernel(kernels::attention(a, pool), "vit attention");
    run_linear(b.out, att.data(), S, D, tmp.data(), D, &s.scratch, pool);
    for (int64_t j = 0; j < S * D; ++j) X[size_t(j)] += tmp[size_t(j)];
    check_kernel(kernels::layernorm(X.data(), D, b.ln2_w.data(), b.ln2_b.data(), h.data(), D, S, D, v.eps, pool), "layernorm");
    run_linear(b.fc1, h.data(), S, D, f.data(), v.inter, &s.scratch, pool);
    activation(v.act, f.data(), S * v.inter, pool);
    run_linear(b.fc2, f.data(), S, v.inter, tmp.data(), D, &s.scratch, pool);
    for (int64_t j = 0; j < S * D; ++j) X[size_t(j)] += tmp[size_t(j)];
    s.record("vision.layer." + std::to_string(i), X.data(), {S, D});
    if (i == early) {  // keep [CLS] + the top-k patches of this block's [CLS] attention, in raster order
      std::vector<int32_t> idx = keep_top_k(cls_attn->at(i), k);
      std::vector<float> kept(static_cast<size_t>((k + 1) * D));
      std::copy(X.begin(), X.begin() + D, kept.begin());
      for (int64_t r = 0; r < k; ++r)
        std::copy(X.begin() + (idx[size_t(r)] + 1) * D, X.begin() + (idx[size_t(r)] + 2) * D, kept.begin() + (r + 1) * D);
      X.swap(kept);
      S = k + 1;
      *early_index = std::move(idx);
    }
  }
}

void project_tokens(Model& m, Session& s, const float* feats, int64_t n, std::vector<float>* out) {
  const int64_t Dv = m.cfg.v.hidden, Dt = m.cfg.t.hidden;
  ThreadPool* pool = m.pool.get();
  std::vector<float> h(static_cast<size_t>(n * Dt));
  out->assign(size_t(n * Dt), 0.f);
  if (n == 0) return;
  run_linear(m.proj1, feats, n, Dv, h.data(), Dt, &s.scratch, pool);
  activation(m.cfg.proj_act, h.data(), n * Dt, pool);
  run_linear(m.proj2, h.data(), n, Dt, out->data(), Dt, &s.scratch, pool);
}

void Session::encode_image() {
  if (pixels.empty()) fail(EDGEMM_ERR_INVALID_ARGUMENT, "no image is set");
  double t0 = now_ms();
  const Config& c = m->cfg;
  const int64_t P = c.v.patches(), Dv = c.v.hidden, Dt = c.t.hidden;
  std::vector<float> hidden;
  std::map<int, std::vector<float>> attn;
  std::vector<int> blocks = c.tokens.method.empty() ? std::vector<int>() : token_blocks(c);
  const int64_t total = c.num_visual_tokens();
  const int64_t k = total - (c.select_full ? 1 : 0);
  const int early = c.tokens.method.empty() ? -1 : early_block(c, k);
  std::vector<int32_t> early_idx;
  vision_forward(*m, *this, pixels.data(), &hidden, blocks, &attn, early, k, &early_idx);
  const int64_t nfeat = (early >= 0 ? k : P) + (c.select_full ? 1 : 0);
  const float* feats = hidden.data() + (c.select_full ? 0 : Dv);
  record("vision.features", feats, {nfeat, Dv});
  enc = ImageEncoding();
  if (early >= 0) {  // selected inside the ViT: the features are the kept tokens already
    project_tokens(*m, *this, feats, nfeat, &enc.embeds);
    if (c.select_full) enc.index.push_back(0);
    for (int32_t i : early_idx) enc.index.push_back(i + (c.select_full ? 1 : 0));
  } else if (c.tokens.method.empty() || k >= P) {
    project_tokens(*m, *this, feats, nfeat, &enc.embeds);
    enc.index.resize(size_t(nfeat));
    for (int64_t i = 0; i < nfeat; ++i) enc.index[size_t(i)] = int32_t(i);
  } else {
    std::vector<float> emb;
    std::vector<int32_t> idx;
    compress_tokens(*m, *this, hidden.data() + Dv, P, attn, k, &emb, &idx);
    if (c.select_full) {
      std::vector<float> clsproj;
      project_tokens(*m, *this, hidden.data(), 1, &clsproj);
      enc.embeds = clsproj;
      enc.embeds.insert(enc.embeds.end(), emb.begin(), emb.end());
      enc.index.push_back(0);
      for (int32_t i : idx) enc.index.push_back(i + 1);
    } else {
      enc.embeds = std::move(emb);
      enc.index = std::move(idx);
    }
  }
  enc.k = int64_t(enc.index.size());
  if (enc.k != total) fail(EDGEMM_ERR_INTERNAL, "token compression produced the wrong number of tokens");
  record("image.embeds", enc.embeds.data(), {enc.k, Dt});
  std::vector<float> fi(enc.index.begin(), enc.index.end());
  record("image.token_index", fi.data(), {enc.k});
  have_encoding = true;
  last_encode_ms = now_ms() - t0;
}

// ------------------------------------------------------------------------------------------- text
namespace {
void ensure(std::vector<float>& b, size_t n) {
  if (b.size() < n) b.resize(n);
}
}  // namespace
void record_rows(Session& s, const std::string& name, int64_t row0, const float* data, int64_t rows, int64_t cols,
                 int64_t total_rows) {
  if (!s.debug) return;
  DebugTensor& t = s.records[name];
  if (row0 == 0 || t.shape.size() != 2 || t.shape[0] != total_rows || t.shape[1] != cols) {
    t.shape = {total_rows, cols};
    t.data.assign(size_t(total_rows * cols), 0.f);
  }
  std::memcpy(&t.data[size_t(row0 * cols)], data, size_t(rows * cols) * sizeof(float));
}

void cache_attention(Model& m, Session& s, int l, const float* qkv, int64_t W, int64_t T, int64_t pos0, float* out,
                     ThreadPool* pool) {
  const TextCfg& t = m.cfg.t;
  const int64_t H = t.heads, Hkv = t.kv_heads, hd = t.head_dim, MC = m.max_context;
  const size_t base = size_t(l) * Hkv * MC * hd;
  for (int64_t i = 0; i < T; ++i)
    for (int64_t kh = 0; kh < Hkv; ++kh) {
      const size_t at = base + size_t((kh * MC + pos0 + i) * hd);
      const float* kr = qkv + i * W + (H + kh) * hd;
      const float* vr = qkv + i * W + (H + Hkv + kh) * hd;
      if (m.kv_fp16) {
        kernels::fp32_to_fp16_n(kr, &s.kcache16[at], hd);
        kernels::fp32_to_fp16_n(vr, &s.vcache16[at], hd);
      } else {
        std::memcpy(&s.kcache[at], kr, size_t(hd) * 4);
        std::memcpy(&s.vcache[at], vr, size_t(hd) * 4);
      }
    }
  kernels::AttentionArgs a;
  a.q = qkv;
  a.q_ld = W;
  if (m.kv_fp16) {
    a.k16 = &s.kcache16[base];
    a.v16 = &s.vcache16[base];
  } else {
    a.k = &s.kcache[base];
    a.v = &s.vcache[base];
  }
  a.k_ld = a.v_ld = hd;
  a.k_head_stride = a.v_head_stride = MC * hd;
  a.out = out;
  a.out_ld = H * hd;
  a.n_q = T;
  a.n_kv = pos0 + T;
  a.q_pos0 = pos0;
  a.n_heads = H;
  a.n_kv_heads = Hkv;
  a.head_dim = hd;
  a.causal = true;
  a.scale = float(std::pow(double(hd), -0.5));
  a.allow_bf16 = m.text_attn_bf16;
  check_kernel(kernels::attention(a, pool), "attention");
}

// Runs rows x[T, D] (residual stream, updated in place) at positions n_past.. through every layer.
void forward_chunk(Model& m, Session& s, float* x, int64_t T, bool decode) {
  const TextCfg& t = m.cfg.t;
  ThreadPool* lin_pool = m.pool.get();
  const int64_t D = t.hidden, H = t.heads, Hkv = t.kv_heads, hd = t.head_dim, I = t.inter;
  const int64_t W = (H + 2 * Hkv) * hd;
  ThreadPool* pool = pool_for(lin_pool, double(T) * double(2 * I) * 8);  // elementwise work
  ThreadPool* attn_pool = pool_for(lin_pool, double(T) * double(s.n_past + T) * double(H * hd), kParallelAttn);
  ensure(s.buf_h, size_t(T * D));
  ensure(s.buf_qkv, size_t(T * W));
  ensure(s.buf_attn, size_t(T * H * hd));
  ensure(s.buf_gu, size_t(T * 2 * I));
  ensure(s.buf_tmp, size_t(T * std::max(D, I)));
  float *h = s.buf_h.data(), *qkv = s.buf_qkv.data(), *att = s.buf_attn.data(), *gu = s.buf_gu.data(),
        *tmp = s.buf_tmp.data();
  std::vector<int32_t> pos(static_cast<size_t>(T));
  for (int64_t i = 0; i < T; ++i) pos[size_t(i)] = int32_t(s.n_past + i);
  for (int l = 0; l < t.layers; ++l) {
    const TextBlock& b = m.blocks[size_t(l)];
    check_kernel(kernels::rmsnorm(x, D, b.ln_in.data(), h, D, T, D, t.eps, pool), "rmsnorm");
    run_linear(decode ? b.dec_qkv() : b.qkv, h, T, D, qkv, W, &s.scratch, lin_pool);
    check_kernel(kernels::rope_apply(qkv, W, T, H, hd, pos.data(), m.rope, pool), "rope");
    check_kernel(kernels::rope_apply(qkv + H * hd, W, T, Hkv, hd, pos.data(), m.rope, pool), "rope");
    cache_attention(m, s, l, qkv, W, T, s.n_past, att, attn_pool);
    run_linear(decode ? b.dec_o() : b.o, att, T, H * hd, tmp, D, &s.scratch, lin_pool);
    for (int64_t j = 0; j < T * D; ++j) x[j] += tmp[j];
    check_kernel(kernels::rmsnorm(x, D, b.ln_post.data(), h, D, T, D, t.eps, pool), "rmsnorm");
    run_linear(decode ? b.dec_gate_up() : b.gate_up, h, T, D, gu, 2 * I, &s.scratch, lin_pool);
    check_kernel(kernels::swiglu(gu, 2 * I, gu + I, 2 * I, gu, 2 * I, T, I, pool), "swiglu");
    run_linear(decode ? b.dec_down() : b.down, gu, T, 2 * I, tmp, D, &s.scratch, lin_pool);
    for (int64_t j = 0; j < T * D; ++j) x[j] += tmp[j];
    if (s.debug) record_rows(s, "text.layer." + std::to_string(l), s.n_past - s.dbg_start, x, T, D, s.dbg_rows);
  }
}

void Session::forward_embeds(const float* x_in, int64_t T, std::vector<float>* logits) {
  const TextCfg& t = m->cfg.t;
  const int64_t D = t.hidden, V = t.vocab;
  if (T <= 0) fail(EDGEMM_ERR_INVALID_ARGUMENT, "no tokens to evaluate");
  if (n_past + T > m->max_context)
    fail(EDGEMM_ERR_CONTEXT_FULL, "context full: " + std::to_string(n_past) + " + " + std::to_string(T) +
                                      " tokens exceed max_context " + std::to_string(m->max_context));
  std::vector<float> x(x_in, x_in + T * D);
  const int64_t start = n_past;
  dbg_start = start;  // per-layer row records of this call
  dbg_rows = T;
  const bool decode = T == 1;
  bool two_lane = false;
  if (!decode && m->npu_lane) {
    for (const auto& b : m->blocks)
      two_lane = two_lane || b.qkv.kind == Linear::kW8A8 || b.gate_up.kind == Linear::kW8A8 ||
                 b.o.kind == Linear::kW8A8 || b.down.kind == Linear::kW8A8;
  }
  if (two_lane) {
    prefill_two_lane(*m, *this, x.data(), T);
    n_past = start + T;
  } else {
    const int64_t C = decode ? 1 : m->chunk_size;
    for (int64_t r = 0; r < T; r += C) {
      int64_t n = std::min(C, T - r);
      forward_chunk(*m, *this, x.data() + r * D, n, decode);
      n_past += n;
    }
  }
  ThreadPool* pool = m->pool.get();
  const Linear& head = m->lm_head;
  if (debug) {
    std::vector<float> hn(static_cast<size_t>(T * D)), lg(size_t(T * V));
    check_kernel(kernels::rmsnorm(x.data(), D, m->norm_w.data(), hn.data(), D, T, D, t.eps, pool), "rmsnorm");
    run_linear(head, hn.data(), T, D, lg.data(), V, &scratch, pool);
    record("text.norm", hn.data(), {T, D});
    record("logits", lg.data(), {T, V});
    logits->assign(lg.end() - V, lg.end());
    return;
  }
  std::vector<float> hn(static_cast<size_t>(D));
  check_kernel(kernels::rmsnorm(x.data() + (T - 1) * D, D, m->norm_w.data(), hn.data(), D, 1, D, t.eps, pool), "rmsnorm");
  logits->assign(size_t(V), 0.f);
  run_linear(head, hn.data(), 1, D, logits->data(), V, &scratch, pool);
}

void Session::eval(const int32_t* ids, size_t n, std::vector<float>* logits, bool splice_image) {
  const Config& c = m->cfg;
  const int64_t D = c.t.hidden;
  if (n == 0) fail(EDGEMM_ERR_INVALID_ARGUMENT, "no token ids");
  size_t n_img = 0;
  for (size_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= c.t.vocab)
      fail(EDGEMM_ERR_INVALID_ARGUMENT, "token id " + std::to_string(ids[i]) + " is outside the vocabulary (size " +
                                            std::to_string(c.t.vocab) + ")");
    n_img += ids[i] == c.image_token;
  }
  const bool splice = splice_image && n_img > 0 && !image_used;
  if (splice) {
    if (n_img > 1) fail(EDGEMM_ERR_INVALID_ARGUMENT, "a prompt holds at most one image token");
    if (pixels.empty()) fail(EDGEMM_ERR_INVALID_ARGUMENT, "the prompt has an <image> token but no image was set");
    if (!have_encoding) encode_image();
  }
  const int64_t T = int64_t(n) + (splice ? enc.k - 1 : 0);
  if (n_past + T > m->max_context)
    fail(EDGEMM_ERR_CONTEXT_FULL, "context full: " + std::to_string(n_past) + " + " + std::to_string(T) +
                                      " tokens exceed max_context " + std::to_string(m->max_context));
  std::vector<float> x(static_cast<size_t>(T * D));
  int64_t r = 0;
  for (size_t i = 0; i < n; ++i) {
    if (splice && ids[i] == c.image_token) {
      std::memcpy(&x[size_t(r * D)], enc.embeds.data(), size_t(enc.k * D) * 4);
      r += enc.k;
    } else {
      m->embed.row(ids[i], &x[size_t(r * D)]);
      ++r;
    }
  }
  record("text.embeds", x.data(), {T, D});
  forward_embeds(x.data(), T, logits);
  if (splice) image_used = true;
}

}  // namespace edgemm
