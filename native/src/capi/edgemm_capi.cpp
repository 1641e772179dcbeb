// The C ABI (include/edgemm.h): argument checks, exception -> status translation, thread-local errors,
// prompt layout, generation loop and sampling.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <random>
#include <string>

#include "../engine/engine.h"
#include "../engine/image.h"

struct edgemm_model {
  std::unique_ptr<edgemm::Model> m;
};
struct edgemm_session {
  std::unique_ptr<edgemm::Session> s;
};

namespace {

thread_local std::string g_error;

edgemm_status set_error(edgemm_status s, const std::string& msg) {
  g_error = msg;
  return s;
}

template <class F>
edgemm_status guard(F&& f) {
  try {
    g_error.clear();
    return f();
  } catch (const edgemm::Error& e) {
    return set_error(e.code, e.what());
  } catch (const std::bad_alloc&) {
    return set_error(EDGEMM_ERR_OUT_OF_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return set_error(EDGEMM_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return set_error(EDGEMM_ERR_INTERNAL, "internal error");
  }
}

#define ARG(cond, msg) \
  if (!(cond)) return set_error(EDGEMM_ERR_INVALID_ARGUMENT, msg)

edgemm_status copy_string(const std::string& s, char* buf, size_t cap, size_t* needed) {
  if (needed) *needed = s.size() + 1;
  if (!buf || cap < s.size() + 1) {
    if (buf && cap) buf[0] = '\0';
    return set_error(EDGEMM_ERR_INVALID_ARGUMENT, "buffer too small: " + std::to_string(s.size() + 1) + " bytes needed");
  }
  std::memcpy(buf, s.c_str(), s.size() + 1);
  return EDGEMM_OK;
}

edgemm_status copy_ids(const std::vector<int32_t>& v, int32_t* ids, size_t cap, size_t* n) {
  if (n) *n = v.size();
  if (v.size() > cap || (!ids && !v.empty()))
    return set_error(EDGEMM_ERR_INVALID_ARGUMENT, "id buffer too small: " + std::to_string(v.size()) + " ids needed");
  if (!v.empty()) std::memcpy(ids, v.data(), v.size() * sizeof(int32_t));
  return EDGEMM_OK;
}

std::vector<int32_t> encode_prompt(const edgemm::Model& m, const std::string& question, bool with_image) {
  std::string q = question;
  // strip (Python str.strip: whitespace)
  auto ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
  size_t a = 0, b = q.size();
  while (a < b && ws(q[a])) ++a;
  while (b > a && ws(q[b - 1])) --b;
  q = q.substr(a, b - a);
  if (q.empty()) edgemm::fail(EDGEMM_ERR_INVALID_ARGUMENT, "the prompt is empty");
  if (q.find("<image>") != std::string::npos)
    edgemm::fail(EDGEMM_ERR_INVALID_ARGUMENT, "the prompt may not contain <image>: the image goes where the template puts it");
  std::string text = m.cfg.prompt_template;
  size_t p = text.find("{question}");
  while (p != std::string::npos) {
    text.replace(p, 10, q);
    p = text.find("{question}", p + q.size());
  }
  if (!with_image) {
    size_t i = text.find("<image>\n");
    if (i != std::string::npos) text.erase(i, 8);
    i = text.find("<image>");
    if (i != std::string::npos) text.erase(i, 7);
  }
  std::vector<int32_t> ids = {int32_t(m.cfg.bos)};
  std::vector<int32_t> t = m.tok.encode(text);
  ids.insert(ids.end(), t.begin(), t.end());
  return ids;
}

int32_t sample(const std::vector<float>& logits, const edgemm_generate_options& o, std::mt19937_64& rng) {
  const size_t V = logits.size();
  if (!(o.temperature > 0)) {
    size_t best = 0;
    for (size_t i = 1; i < V; ++i)
      if (logits[i] > logits[best]) best = i;
    return int32_t(best);
  }
  std::vector<float> l(V);
  for (size_t i = 0; i < V; ++i) l[i] = logits[i] / o.temperature;
  if (o.top_k > 0 && size_t(o.top_k) < V) {
    std::vector<float> s = l;
    std::nth_element(s.begin(), s.begin() + (o.top_k - 1), s.end(), std::greater<float>());
    float kth = s[size_t(o.top_k - 1)];
    for (auto& v : l)
      if (v < kth) v = -INFINITY;
  }
  if (o.top_p < 1.0f) {
    std::vector<size_t> order(V);
    for (size_t i = 0; i < V; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return l[a] > l[b]; });
    float mx = l[order[0]];
    double sum = 0;
    for (size_t i : order) sum += std::isinf(l[i]) ? 0.0 : std::exp(double(l[i] - mx));
    double cum = 0;
    for (size_t r = 0; r < V; ++r) {
      size_t i = order[r];
      double p = std::isinf(l[i]) ? 0.0 : std::exp(double(l[i] - mx)) / sum;
      if (cum >= o.top_p && r > 0) l[i] = -INFINITY;
      cum += p;
    }
  }
  float mx = -INFINITY;
  for (float v : l) mx = std::max(mx, v);
  std::vector<double> p(V);
  double sum = 0;
  for (size_t i = 0; i < V; ++i) {
    p[i] = std::isinf(l[i]) ? 0.0 : std::exp(double(l[i] - mx));
    sum += p[i];
  }
  double u = double(rng() >> 11) * (1.0 / 9007199254740992.0) * sum;
  double acc = 0;
  size_t last = 0;
  for (size_t i = 0; i < V; ++i) {
    if (p[i] <= 0) continue;
    last = i;
    acc += p[i];
    if (u < acc) return int32_t(i);
  }
  return int32_t(last);
}

// Length of the longest prefix of s made of complete UTF-8 sequences.
size_t complete_utf8(const std::string& s) {
  size_t i = 0, ok = 0;
  while (i < s.size()) {
    unsigned char c = (unsigned char)s[i];
    size_t k = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (i + k > s.size()) break;
    i += k;
    ok = i;
  }
  return ok;
}

}  // namespace

extern "C" {

const char* edgemm_last_error(void) { return g_error.c_str(); }

const char* edgemm_version(void) {
  static std::string v = std::string("0.2.0 (") + edgemm::kernels::isa_name(edgemm::kernels::best_isa()) + ")";
  return v.c_str();
}

int edgemm_abi_version(void) { return EDGEMM_ABI_VERSION; }

const char* edgemm_status_name(edgemm_status s) {
  switch (s) {
    case EDGEMM_OK: return "EDGEMM_OK";
    case EDGEMM_ERR_INVALID_ARGUMENT: return "EDGEMM_ERR_INVALID_ARGUMENT";
    case EDGEMM_ERR_IO: return "EDGEMM_ERR_IO";
    case EDGEMM_ERR_FORMAT: return "EDGEMM_ERR_FORMAT";
    case EDGEMM_ERR_UNSUPPORTED: return "EDGEMM_ERR_UNSUPPORTED";
    case EDGEMM_ERR_OUT_OF_MEMORY: return "EDGEMM_ERR_OUT_OF_MEMORY";
    case EDGEMM_ERR_CONTEXT_FULL: return "EDGEMM_ERR_CONTEXT_FULL";
    case EDGEMM_ERR_CANCELLED: return "EDGEMM_ERR_CANCELLED";
    case EDGEMM_ERR_INTERNAL: return "EDGEMM_ERR_INTERNAL";
  }
  return "EDGEMM_ERR_UNKNOWN";
}

void edgemm_load_options_init(edgemm_load_options* o) {
  if (!o) return;
  std::memset(o, 0, sizeof *o);
  o->struct_size = sizeof *o;
}

edgemm_status edgemm_model_load(const char* path, const edgemm_load_options* opts, edgemm_model** out) {
  ARG(out, "out is NULL");
  *out = nullptr;
  ARG(path && *path, "path is NULL or empty");
  edgemm_load_options o;
  edgemm_load_options_init(&o);
  if (opts) {
    ARG(opts->struct_size >= sizeof(uint32_t) && opts->struct_size <= 4096, "edgemm_load_options.struct_size is not set");
    std::memcpy(&o, opts, std::min<size_t>(opts->struct_size, sizeof o));
    o.struct_size = sizeof o;
  }
  return guard([&] {
    auto* h = new edgemm_model;
    try {
      h->m = edgemm::load_model(path, o);
    } catch (...) {
      delete h;
      throw;
    }
    *out = h;
    return EDGEMM_OK;
  });
}

void edgemm_model_free(edgemm_model* m) { delete m; }

edgemm_status edgemm_model_info_json(const edgemm_model* m, char* buf, size_t cap, size_t* needed) {
  ARG(m, "model is NULL");
  return guard([&] { return copy_string(m->m->info_json(), buf, cap, needed); });
}

edgemm_status edgemm_tokenize(const edgemm_model* m, const char* text, int32_t* ids, size_t cap, size_t* n) {
  ARG(m && text, "model or text is NULL");
  return guard([&] { return copy_ids(m->m->tok.encode(text), ids, cap, n); });
}

edgemm_status edgemm_encode_prompt(const edgemm_model* m, const char* question, int32_t with_image, int32_t* ids,
                                   size_t cap, size_t* n) {
  ARG(m && question, "model or question is NULL");
  return guard([&] { return copy_ids(encode_prompt(*m->m, question, with_image != 0), ids, cap, n); });
}

edgemm_status edgemm_detokenize(const edgemm_model* m, const int32_t* ids, size_t n, char* buf, size_t cap,
                                size_t* needed) {
  ARG(m, "model is NULL");
  ARG(ids || n == 0, "ids is NULL");
  return guard([&] {
    std::vector<int32_t> v(ids, ids + n);
    for (int32_t id : v)
      if (id < 0 || id >= m->m->cfg.t.vocab)
        return set_error(EDGEMM_ERR_INVALID_ARGUMENT, "token id " + std::to_string(id) + " is outside the vocabulary");
    return copy_string(m->m->tok.decode(v, true), buf, cap, needed);
  });
}

edgemm_status edgemm_session_create(edgemm_model* m, edgemm_session** out) {
  ARG(out, "out is NULL");
  *out = nullptr;
  ARG(m, "model is NULL");
  return guard([&] {
    auto* h = new edgemm_session;
    try {
      h->s = std::make_unique<edgemm::Session>(m->m.get());
    } catch (...) {
      delete h;
      throw;
    }
    *out = h;
    return EDGEMM_OK;
  });
}

void edgemm_session_free(edgemm_session* s) { delete s; }

edgemm_status edgemm_session_set_image_rgb8(edgemm_session* s, const uint8_t* rgb, int32_t w, int32_t h, int32_t stride) {
  ARG(s && rgb, "session or rgb is NULL");
  ARG(w > 0 && h > 0 && w <= 16384 && h <= 16384, "image width/height must be in [1, 16384]");
  ARG(stride >= 3 * w, "row_stride must be >= 3 * width");
  return guard([&] {
    const edgemm::VisionCfg& v = s->s->m->cfg.v;
    edgemm::RgbImage im;
    im.w = w;
    im.h = h;
    im.px.resize(size_t(w) * h * 3);
    for (int32_t y = 0; y < h; ++y) std::memcpy(&im.px[size_t(y) * w * 3], rgb + size_t(y) * stride, size_t(w) * 3);
    s->s->pixels = edgemm::preprocess_rgb(im, v.image_size, v.resize, v.mean, v.stdv);
    s->s->have_encoding = false;
    s->s->reset();
    return EDGEMM_OK;
  });
}

edgemm_status edgemm_session_set_image_pixels(edgemm_session* s, const float* chw, int32_t c, int32_t h, int32_t w) {
  ARG(s && chw, "session or pixels is NULL");
  const edgemm::VisionCfg& v = s->s->m->cfg.v;
  if (c != 3 || h != v.image_size || w != v.image_size)
    return set_error(EDGEMM_ERR_INVALID_ARGUMENT, "pixels must be [3, " + std::to_string(v.image_size) + ", " +
                                                      std::to_string(v.image_size) + "], got [" + std::to_string(c) + ", " +
                                                      std::to_string(h) + ", " + std::to_string(w) + "]");
  size_t n = size_t(3) * h * w;
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(chw[i])) return set_error(EDGEMM_ERR_INVALID_ARGUMENT, "pixels hold a non-finite value");
  return guard([&] {
    s->s->pixels.assign(chw, chw + n);
    s->s->have_encoding = false;
    s->s->reset();
    return EDGEMM_OK;
  });
}

edgemm_status edgemm_session_clear_image(edgemm_session* s) {
  ARG(s, "session is NULL");
  s->s->pixels.clear();
  s->s->have_encoding = false;
  s->s->reset();
  return EDGEMM_OK;
}

void edgemm_generate_options_init(edgemm_generate_options* o) {
  if (!o) return;
  std::memset(o, 0, sizeof *o);
  o->struct_size = sizeof *o;
  o->max_new_tokens = 32;
  o->temperature = 0.f;
  o->top_k = 0;
  o->top_p = 1.f;
  o->seed = 0;
  o->apply_template = 1;
}

edgemm_status edgemm_generate(edgemm_session* sh, const char* prompt, const edgemm_generate_options* opts,
                              edgemm_token_callback cb, void* user, edgemm_stats* stats) {
  ARG(sh && prompt, "session or prompt is NULL");
  edgemm_generate_options o;
  edgemm_generate_options_init(&o);
  if (opts) {
    ARG(opts->struct_size >= sizeof(uint32_t) && opts->struct_size <= 4096, "edgemm_generate_options.struct_size is not set");
    std::memcpy(&o, opts, std::min<size_t>(opts->struct_size, sizeof o));
  }
  ARG(o.max_new_tokens >= 1, "max_new_tokens must be >= 1");
  ARG(o.temperature >= 0 && std::isfinite(o.temperature), "temperature must be >= 0");
  ARG(o.top_k >= 0, "top_k must be >= 0");
  ARG(o.top_p > 0 && o.top_p <= 1, "top_p must be in (0, 1]");
  if (stats) ARG(stats->struct_size >= sizeof(uint32_t) && stats->struct_size <= 4096, "edgemm_stats.struct_size is not set");
  edgemm_stats st;
  std::memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  auto publish = [&] {
    if (stats) {
      uint32_t sz = stats->struct_size;
      std::memcpy(stats, &st, std::min<size_t>(sz, sizeof st));
      stats->struct_size = sz;
    }
  };
  edgemm_status rc = guard([&] {
    edgemm::Session& s = *sh->s;
    edgemm::Model& m = *s.m;
    s.reset();
    const bool with_image = !s.pixels.empty();
    std::vector<int32_t> ids;
    if (o.apply_template) {
      ids = encode_prompt(m, prompt, with_image);
    } else {
      ids = {int32_t(m.cfg.bos)};
      auto t = m.tok.encode(prompt);
      ids.insert(ids.end(), t.begin(), t.end());
    }
    double t0 = edgemm::now_ms();
    bool has_img = std::find(ids.begin(), ids.end(), m.cfg.image_token) != ids.end();
    if (has_img && !with_image)
      edgemm::fail(EDGEMM_ERR_INVALID_ARGUMENT, "the prompt has an <image> token but no image was set");
    if (has_img && !s.have_encoding) {
      s.encode_image();
      st.image_encode_ms = s.last_encode_ms;
    }
    st.visual_tokens = has_img ? int32_t(s.enc.k) : 0;
    double t1 = edgemm::now_ms();
    s.npu_busy_ms = s.cpu_busy_ms = s.prefill_wall_ms = 0;
    std::vector<float> logits;
    s.eval(ids.data(), ids.size(), &logits);
    double t2 = edgemm::now_ms();
    st.prefill_ms = t2 - t1;
    st.prefill_tokens = int32_t(s.n_past);
    if (s.prefill_wall_ms > 0) {
      st.npu_lane_busy = s.npu_busy_ms / s.prefill_wall_ms;
      st.cpu_lane_busy = s.cpu_busy_ms / s.prefill_wall_ms;
    } else {
      st.npu_lane_busy = 0;
      st.cpu_lane_busy = 1;
    }
    std::mt19937_64 rng(o.seed);
    int32_t tok = sample(logits, o, rng);
    st.ttft_ms = edgemm::now_ms() - t0;
    std::string pending;
    int32_t produced = 0;
    while (true) {
      if (tok == m.cfg.eos) break;
      ++produced;
      if (cb) {
        pending += m.tok.token_bytes(tok, true);
        size_t k = complete_utf8(pending);
        std::string piece = pending.substr(0, k);
        pending.erase(0, k);
        if (cb(piece.c_str(), tok, user) != 0) return set_error(EDGEMM_ERR_CANCELLED, "generation stopped by the callback");
      }
      if (produced >= o.max_new_tokens) break;
      if (s.n_past + 1 > m.max_context)
        return set_error(EDGEMM_ERR_CONTEXT_FULL, "context full: max_context " + std::to_string(m.max_context) +
                                                      " reached after " + std::to_string(produced) + " generated tokens");
      double t3 = edgemm::now_ms();
      s.eval(&tok, 1, &logits, /*splice_image=*/false);
      tok = sample(logits, o, rng);
      st.decode_ms += edgemm::now_ms() - t3;
      st.decode_tokens += 1;
    }
    return EDGEMM_OK;
  });
  publish();
  return rc;
}

edgemm_status edgemm_session_reset(edgemm_session* s) {
  ARG(s, "session is NULL");
  s->s->reset();
  return EDGEMM_OK;
}

edgemm_status edgemm_session_eval(edgemm_session* s, const int32_t* ids, size_t n, float* logits, size_t cap) {
  ARG(s && ids, "session or ids is NULL");
  ARG(n > 0 && n <= (1u << 24), "n must be in [1, 2^24]");
  const size_t V = size_t(s->s->m->cfg.t.vocab);
  ARG(!logits || cap >= V, "logits buffer smaller than vocab_size");
  return guard([&] {
    std::vector<float> lg;
    s->s->eval(ids, n, &lg);
    if (logits) std::memcpy(logits, lg.data(), V * sizeof(float));
    return EDGEMM_OK;
  });
}

edgemm_status edgemm_session_n_past(const edgemm_session* s, int32_t* n) {
  ARG(s && n, "session or n_past is NULL");
  *n = int32_t(s->s->n_past);
  return EDGEMM_OK;
}

edgemm_status edgemm_session_set_debug(edgemm_session* s, int32_t flags) {
  ARG(s, "session is NULL");
  s->s->debug = flags != 0;
  if (!flags) s->s->records.clear();
  return EDGEMM_OK;
}

edgemm_status edgemm_session_get_tensor(const edgemm_session* s, const char* name, float* data, size_t cap,
                                        size_t* needed, int64_t* shape, int32_t* ndim) {
  ARG(s && name, "session or name is NULL");
  auto it = s->s->records.find(name);
  if (it == s->s->records.end()) return set_error(EDGEMM_ERR_INVALID_ARGUMENT, std::string("no recorded tensor '") + name + "'");
  const edgemm::DebugTensor& t = it->second;
  if (needed) *needed = t.data.size();
  if (ndim) *ndim = int32_t(t.shape.size());
  if (shape)
    for (size_t i = 0; i < t.shape.size() && i < 4; ++i) shape[i] = t.shape[i];
  if (cap == 0) return EDGEMM_OK;
  ARG(data, "data is NULL");
  if (cap < t.data.size()) return set_error(EDGEMM_ERR_INVALID_ARGUMENT, "buffer too small: " + std::to_string(t.data.size()) + " floats needed");
  std::memcpy(data, t.data.data(), t.data.size() * sizeof(float));
  return EDGEMM_OK;
}

}  // extern "C"
