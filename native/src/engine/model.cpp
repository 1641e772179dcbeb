// Model file -> Model: header/KV validation, config parsing, tensor validation against the config,
// packing into the kernels' layouts.
#include <sys/stat.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "engine.h"

namespace edgemm {

void check_kernel(kernels::Status s, const char* what) {
  if (s == kernels::Status::kOk) return;
  edgemm_status c = s == kernels::Status::kOutOfMemory ? EDGEMM_ERR_OUT_OF_MEMORY
                    : s == kernels::Status::kUnsupported ? EDGEMM_ERR_UNSUPPORTED
                    : s == kernels::Status::kInvalidArgument ? EDGEMM_ERR_INTERNAL
                                                             : EDGEMM_ERR_FORMAT;
  fail(c, std::string(what) + ": " + kernels::status_string(s));
}

// ---------------------------------------------------------------------------------------- config
namespace {

const json::Value& req(const json::Value& o, const char* key, const std::string& where) {
  const json::Value* v = o.get(key);
  if (!v) fail(EDGEMM_ERR_FORMAT, "edgemm.config: missing " + where + key);
  return *v;
}
int64_t get_int(const json::Value& o, const char* key, const std::string& where, int64_t lo, int64_t hi,
                bool required = true, int64_t dflt = 0) {
  const json::Value* v = o.get(key);
  if (!v) {
    if (required) fail(EDGEMM_ERR_FORMAT, "edgemm.config: missing " + where + key);
    return dflt;
  }
  if (!v->is_number() || !v->is_int || v->i < lo || v->i > hi)
    fail(EDGEMM_ERR_FORMAT, "edgemm.config: " + where + key + " must be an integer in [" + std::to_string(lo) + ", " +
                                std::to_string(hi) + "]");
  return v->i;
}
double get_num(const json::Value& o, const char* key, const std::string& where, double dflt) {
  const json::Value* v = o.get(key);
  if (!v) return dflt;
  if (!v->is_number() || !std::isfinite(v->num)) fail(EDGEMM_ERR_FORMAT, "edgemm.config: " + where + key + " must be a number");
  return v->num;
}
bool get_bool(const json::Value& o, const char* key, const std::string& where, bool dflt) {
  const json::Value* v = o.get(key);
  if (!v) return dflt;
  if (!v->is_bool()) fail(EDGEMM_ERR_FORMAT, "edgemm.config: " + where + key + " must be a boolean");
  return v->b;
}
std::string get_str(const json::Value& o, const char* key, const std::string& where, const std::string& dflt) {
  const json::Value* v = o.get(key);
  if (!v) return dflt;
  if (!v->is_string()) fail(EDGEMM_ERR_FORMAT, "edgemm.config: " + where + key + " must be a string");
  return v->str;
}
bool known_act(const std::string& a) { return a == "gelu" || a == "gelu_tanh" || a == "quick_gelu" || a == "silu"; }

void parse_quant(const json::Value* q, const char* what, std::map<std::string, LayerQuant>* out) {
  if (!q || q->is_null()) return;
  if (!q->is_object()) fail(EDGEMM_ERR_FORMAT, std::string(what) + " must be an object");
  const json::Value* layers = q->get("layers");
  if (!layers) {
    if (q->obj.empty()) return;
    fail(EDGEMM_ERR_FORMAT, std::string(what) + " has no 'layers' object");
  }
  if (!layers->is_object()) fail(EDGEMM_ERR_FORMAT, std::string(what) + ".layers must be an object");
  for (const auto& kv : layers->obj) {
    const json::Value& e = kv.second;
    std::string where = std::string(what) + ".layers[" + kv.first + "].";
    if (!e.is_object()) fail(EDGEMM_ERR_FORMAT, where + " must be an object");
    LayerQuant lq;
    const json::Value* f = e.get("format");
    if (!f || !f->is_string() || (f->str != "int4" && f->str != "int8" && f->str != "w8a8"))
      fail(EDGEMM_ERR_FORMAT, where + "format must be int4, int8 or w8a8");
    lq.format = f->str;
    if (lq.format != "w8a8") {
      const json::Value* g = e.get("group_size");
      if (!g || !g->is_int || g->i < 1 || g->i > 65536) fail(EDGEMM_ERR_FORMAT, where + "group_size must be a positive integer");
      lq.group_size = g->i;
      const json::Value* s = e.get("symmetric");
      lq.symmetric = !s || !s->is_bool() || s->b;
    }
    (*out)[kv.first] = lq;
  }
}

}  // namespace

void parse_token_setting(const json::Value& d, const Config& cfg, TokenSetting* s) {
  *s = TokenSetting();
  if (d.is_null()) return;
  if (!d.is_object()) fail(EDGEMM_ERR_FORMAT, "visual_tokens must be an object");
  const json::Value* m = d.get("method");
  const json::Value* k = d.get("keep");
  if (!m || !m->is_string() || !k || !k->is_number()) fail(EDGEMM_ERR_FORMAT, "visual_tokens needs 'method' and 'keep'");
  std::string name = m->str;
  std::transform(name.begin(), name.end(), name.begin(), ::tolower);
  static const std::map<std::string, std::string> alias = {
      {"vtc-cls", "vtccls"}, {"vtc_cls", "vtccls"}, {"avgpool", "pool"}, {"pooling", "pool"},
      {"faster-vlm", "fastervlm"}, {"rand", "random"}, {"bipartite", "tome"}};
  if (alias.count(name)) name = alias.at(name);
  static const std::set<std::string> methods = {"fastervlm", "vtccls", "divprune", "tome", "pool", "random", "clsdiv", "clsmerge"};
  if (!methods.count(name)) fail(EDGEMM_ERR_UNSUPPORTED, "unknown visual-token method '" + m->str + "'");
  s->method = name;
  if (k->is_int) {
    if (k->i < 1) fail(EDGEMM_ERR_FORMAT, "visual_tokens keep count must be >= 1");
    s->keep_count = k->i;
  } else {
    if (!(k->num > 0 && k->num <= 1)) fail(EDGEMM_ERR_FORMAT, "visual_tokens keep ratio must be in (0, 1]");
    s->keep_is_ratio = true;
    s->keep_ratio = k->num;
  }
  for (const auto& kv : d.obj) {
    const std::string& o = kv.first;
    const json::Value& v = kv.second;
    if (o == "method" || o == "keep") continue;
    auto want_int = [&](bool nullable) {
      if (nullable && v.is_null()) return false;
      if (!v.is_int) fail(EDGEMM_ERR_FORMAT, "visual_tokens option " + o + " must be an integer");
      return true;
    };
    if (o == "layer" && (name == "fastervlm" || name == "clsdiv" || name == "clsmerge")) {
      if (want_int(true)) { s->has_layer = true; s->layer = v.i; }
    } else if (o == "start" && name == "vtccls") {
      want_int(false);
      s->start = v.i;
    } else if (o == "end" && name == "vtccls") {
      if (want_int(true)) { s->has_end = true; s->end = v.i; }
    } else if (o == "seed" && name == "random") {
      want_int(false);
      if (v.i < 0) fail(EDGEMM_ERR_FORMAT, "visual_tokens seed must be >= 0");
      s->seed = uint64_t(v.i);
    } else if (o == "early" && name == "fastervlm") {
      if (!v.is_bool()) fail(EDGEMM_ERR_FORMAT, "visual_tokens option early must be true or false");
      s->early = v.b;
    } else if (o == "alpha" && name == "clsdiv") {
      if (!v.is_number() || !(v.num >= 0) || !std::isfinite(v.num)) fail(EDGEMM_ERR_FORMAT, "visual_tokens alpha must be >= 0");
      s->alpha = v.num;
    } else {
      fail(EDGEMM_ERR_FORMAT, "visual_tokens: method " + name + " has no option '" + o + "'");
    }
  }
  (void)cfg;
}

void parse_config(const std::string& text, Config* c) {
  json::Value root;
  std::string err;
  if (!json::parse(text, &root, &err)) fail(EDGEMM_ERR_FORMAT, "edgemm.config is not valid JSON: " + err);
  if (!root.is_object()) fail(EDGEMM_ERR_FORMAT, "edgemm.config must be a JSON object");
  const json::Value* fmt = root.get("format");
  if (fmt && (!fmt->is_string() || fmt->str != "edgemm")) fail(EDGEMM_ERR_FORMAT, "edgemm.config: format is not 'edgemm'");
  c->raw = root;
  const json::Value& v = req(root, "vision", "");
  const json::Value& t = req(root, "text", "");
  if (!v.is_object() || !t.is_object()) fail(EDGEMM_ERR_FORMAT, "edgemm.config: vision and text must be objects");
  VisionCfg& vc = c->v;
  vc.image_size = int(get_int(v, "image_size", "vision.", 1, 4096));
  vc.patch_size = int(get_int(v, "patch_size", "vision.", 1, 1024));
  vc.num_channels = int(get_int(v, "num_channels", "vision.", 3, 3, false, 3));
  vc.hidden = int(get_int(v, "hidden_size", "vision.", 1, 1 << 16));
  vc.layers = int(get_int(v, "num_layers", "vision.", 1, 1024));
  vc.heads = int(get_int(v, "num_heads", "vision.", 1, 1024));
  vc.inter = int(get_int(v, "intermediate_size", "vision.", 1, 1 << 18));
  vc.eps = float(get_num(v, "layer_norm_eps", "vision.", 1e-5));
  vc.act = get_str(v, "hidden_act", "vision.", "gelu");
  vc.patch_bias = get_bool(v, "patch_bias", "vision.", true);
  vc.pre_layernorm = get_bool(v, "pre_layernorm", "vision.", false);
  vc.resize = get_str(v, "image_resize", "vision.", "pad");
  for (const char* key : {"image_mean", "image_std"}) {
    const json::Value* a = v.get(key);
    if (!a) continue;
    if (!a->is_array() || a->arr.size() != 3) fail(EDGEMM_ERR_FORMAT, std::string("edgemm.config: vision.") + key + " must have 3 numbers");
    for (int i = 0; i < 3; ++i) {
      if (!a->arr[i].is_number()) fail(EDGEMM_ERR_FORMAT, std::string("edgemm.config: vision.") + key + " must have 3 numbers");
      (key[6] == 'm' ? vc.mean : vc.stdv)[i] = float(a->arr[i].num);
    }
  }
  if (vc.image_size % vc.patch_size) fail(EDGEMM_ERR_FORMAT, "edgemm.config: vision.image_size must be a multiple of patch_size");
  if (vc.hidden % vc.heads) fail(EDGEMM_ERR_FORMAT, "edgemm.config: vision.hidden_size must be a multiple of num_heads");
  if (vc.head_dim() > 256) fail(EDGEMM_ERR_UNSUPPORTED, "vision head_dim > 256 is not supported");
  if (!known_act(vc.act)) fail(EDGEMM_ERR_UNSUPPORTED, "vision.hidden_act '" + vc.act + "' is not supported");
  if (vc.resize != "pad" && vc.resize != "crop" && vc.resize != "squash")
    fail(EDGEMM_ERR_FORMAT, "edgemm.config: vision.image_resize must be pad, crop or squash");
  for (int i = 0; i < 3; ++i)
    if (!(vc.stdv[i] != 0.f) || !std::isfinite(vc.stdv[i]) || !std::isfinite(vc.mean[i]))
      fail(EDGEMM_ERR_FORMAT, "edgemm.config: vision.image_std must be nonzero");
  TextCfg& tc = c->t;
  tc.vocab = int(get_int(t, "vocab_size", "text.", 4, 1 << 22));
  tc.hidden = int(get_int(t, "hidden_size", "text.", 1, 1 << 16));
  tc.layers = int(get_int(t, "num_layers", "text.", 1, 1024));
  tc.heads = int(get_int(t, "num_heads", "text.", 1, 1024));
  tc.kv_heads = int(get_int(t, "num_kv_heads", "text.", 1, 1024));
  tc.head_dim = int(get_int(t, "head_dim", "text.", 2, 256));
  tc.inter = int(get_int(t, "intermediate_size", "text.", 1, 1 << 18));
  tc.max_pos = int(get_int(t, "max_position_embeddings", "text.", 1, 1 << 20, false, 2048));
  tc.eps = float(get_num(t, "rms_norm_eps", "text.", 1e-5));
  tc.rope_theta = float(get_num(t, "rope_theta", "text.", 10000.0));
  tc.tie = get_bool(t, "tie_word_embeddings", "text.", false);
  if (tc.heads % tc.kv_heads) fail(EDGEMM_ERR_FORMAT, "edgemm.config: text.num_heads must be a multiple of num_kv_heads");
  if (tc.head_dim % 2) fail(EDGEMM_ERR_FORMAT, "edgemm.config: text.head_dim must be even");
  if (!(tc.rope_theta > 0)) fail(EDGEMM_ERR_FORMAT, "edgemm.config: text.rope_theta must be > 0");
  if (const json::Value* p = root.get("projector")) {
    if (!p->is_object()) fail(EDGEMM_ERR_FORMAT, "edgemm.config: projector must be an object");
    c->proj_act = get_str(*p, "hidden_act", "projector.", "gelu");
    c->proj_bias = get_bool(*p, "bias", "projector.", true);
  }
  if (!known_act(c->proj_act)) fail(EDGEMM_ERR_UNSUPPORTED, "projector.hidden_act '" + c->proj_act + "' is not supported");
  c->feature_layer = int(get_int(root, "vision_feature_layer", "", -100000, 100000, false, -2));
  c->feature_blocks = c->feature_layer < 0 ? vc.layers + 1 + c->feature_layer : c->feature_layer;
  if (c->feature_blocks < 0 || c->feature_blocks > vc.layers)
    fail(EDGEMM_ERR_FORMAT, "edgemm.config: vision_feature_layer out of range");
  std::string sel = get_str(root, "vision_feature_select", "", "default");
  if (sel != "default" && sel != "full") fail(EDGEMM_ERR_FORMAT, "edgemm.config: vision_feature_select must be default or full");
  c->select_full = sel == "full";
  c->image_token = int(get_int(root, "image_token_id", "", 0, tc.vocab - 1, false, 3));
  c->bos = int(get_int(root, "bos_token_id", "", 0, tc.vocab - 1, false, 1));
  c->eos = int(get_int(root, "eos_token_id", "", 0, tc.vocab - 1, false, 2));
  c->pad = int(get_int(root, "pad_token_id", "", 0, tc.vocab - 1, false, 0));
  c->prompt_template = get_str(root, "prompt_template", "", "USER: <image>\n{question} ASSISTANT:");
  const json::Value* extras = root.get("extras");
  if (extras && !extras->is_null()) {
    if (!extras->is_object()) fail(EDGEMM_ERR_FORMAT, "edgemm.config: extras must be an object");
    parse_quant(extras->get("quantization"), "extras.quantization", &c->quant);
    if (const json::Value* sp = extras->get("sparsity"); sp && !sp->is_null()) {
      const json::Value* layers = sp->get("layers");
      if (layers && layers->is_object())
        for (const auto& kv : layers->obj) {
          const json::Value* n = kv.second.get("n");
          const json::Value* mm = kv.second.get("m");
          if (!n || !mm || !n->is_int || !mm->is_int || n->i < 0 || mm->i < 1 || n->i > mm->i)
            fail(EDGEMM_ERR_FORMAT, "extras.sparsity.layers[" + kv.first + "] needs integers n <= m");
          c->sparsity[kv.first] = {int(n->i), int(mm->i)};
        }
    }
    if (const json::Value* vt = extras->get("visual_tokens")) parse_token_setting(*vt, *c, &c->tokens);
  }
  if (!c->tokens.method.empty() && c->feature_blocks == 0 &&
      (c->tokens.method == "fastervlm" || c->tokens.method == "vtccls" || c->tokens.method == "clsdiv" ||
       c->tokens.method == "clsmerge"))
    fail(EDGEMM_ERR_FORMAT, "visual_tokens: " + c->tokens.method + " needs [CLS] attention but no ViT block runs");
  token_blocks(*c);            // validates layer options
  (void)c->num_visual_tokens();  // validates counts
}

// ---------------------------------------------------------------------------------------- tensors
namespace {

// Tensors are read in place from the file's mapping wherever the kernels use the file layout (the
// embedding table, norm weights, position/class embeddings, biases); the rest is packed straight from
// the mapping (no canonical copy; fused quantized groups, F16 or misaligned data go through one transient
// buffer of the group or chunk). Source pages are released from the RSS (Mapping::release) once packed
// or validated.

template <class T>
bool aligned_for(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(T) == 0;
}

[[noreturn]] void non_finite(const std::string& name) {
  fail(EDGEMM_ERR_FORMAT, "tensor '" + name + "' holds a non-finite value");
}
void check_finite(const float* p, size_t n, const std::string& name) {
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) non_finite(name);
}
// Elements [i0, i0 + n) of an F32 or F16 tensor as fp32 into out (any alignment), checked finite.
void convert_floats(const gguf::TensorInfo& t, size_t i0, size_t n, float* out) {
  if (t.type == 0) {
    std::memcpy(out, t.data + 4 * i0, n * 4);
  } else {
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * (i0 + i), 2);
      out[i] = kernels::fp16_to_fp32(h);
    }
  }
  check_finite(out, n, t.name);
}

struct Loader {
  const gguf::File& f;
  std::set<std::string> used;
  ThreadPool* pool;

  const gguf::TensorInfo& get(const std::string& name, const std::vector<int64_t>& shape) {
    const gguf::TensorInfo* t = f.find_tensor(name);
    if (!t) fail(EDGEMM_ERR_FORMAT, "missing tensor '" + name + "'");
    if (t->shape != shape) {
      std::string a = "[", b = "[";
      for (size_t i = 0; i < t->shape.size(); ++i) a += (i ? ", " : "") + std::to_string(t->shape[i]);
      for (size_t i = 0; i < shape.size(); ++i) b += (i ? ", " : "") + std::to_string(shape[i]);
      fail(EDGEMM_ERR_FORMAT, "tensor '" + name + "' has shape " + a + "] but the config implies " + b + "]");
    }
    used.insert(name);
    return *t;
  }
  bool has(const std::string& name) const { return f.find_tensor(name) != nullptr; }
  void want_type(const gguf::TensorInfo& t, std::initializer_list<uint32_t> types, const char* what) {
    for (uint32_t ty : types)
      if (t.type == ty) return;
    fail(EDGEMM_ERR_FORMAT, "tensor '" + t.name + "' has dtype " + gguf::tensor_type_name(t.type) + ", expected " + what);
  }
  // An F32/F16 tensor as fp32, checked finite: in place when F32 and 4-byte aligned, else converted.
  FloatSpan floats(const std::string& name, const std::vector<int64_t>& shape) {
    const gguf::TensorInfo& t = get(name, shape);
    want_type(t, {0, 1}, "F32 or F16");
    const size_t n = static_cast<size_t>(t.numel());
    if (t.type == 0 && aligned_for<float>(t.data)) {
      const float* p = reinterpret_cast<const float*>(t.data);
      check_finite(p, n, name);
      return FloatSpan::view(p, n);
    }
    std::vector<float> out(n);
    convert_floats(t, 0, n, out.data());
    return FloatSpan::owned(std::move(out));
  }
  // A raw tensor of element type T (GGUF dtype `type`): in place when aligned for T, else copied to *own.
  // The mapped bytes are appended to *src (released after packing).
  template <class T>
  const T* raw(const std::string& name, const std::vector<int64_t>& shape, uint32_t type, const char* what,
               std::vector<T>* own, std::vector<std::pair<const uint8_t*, size_t>>* src) {
    const gguf::TensorInfo& t = get(name, shape);
    want_type(t, {type}, what);
    if (src) src->emplace_back(t.data, size_t(t.nbytes));
    if (aligned_for<T>(t.data)) return reinterpret_cast<const T*>(t.data);
    own->resize(static_cast<size_t>(t.numel()));
    std::memcpy(own->data(), t.data, own->size() * sizeof(T));
    return own->data();
  }
};

// A linear as stored in the file, before packing: f32 weights as row segments of mapped tensors (one per
// fused part), quantized arrays as pointers into the mapping or into the own_* storage (misaligned data,
// fused concatenations). Move-only: the pointers may point into its own vectors.
struct Canon {
  std::string kind;  // f32 | w8a8 | int4 | int8
  std::string name;
  int64_t N = 0, K = 0, G = 0;
  bool has_zeros = false, sparse24 = false;
  struct Seg {
    const gguf::TensorInfo* t;  // F32 or F16 [rows, K]
    int64_t rows;
  };
  std::vector<Seg> segs;            // f32 W [N, K] = the segments' rows in order
  const int8_t* q8 = nullptr;       // int8 / w8a8 [N, K]
  const uint8_t* q4 = nullptr;      // int4 [N, K/2]
  const uint16_t* scales = nullptr; // [N, K/G]
  const uint8_t* zeros = nullptr;   // [N, K/G] raw bytes
  const float* wscale = nullptr;    // w8a8 [N]
  std::vector<int8_t> own_q8;
  std::vector<uint8_t> own_q4, own_zeros;
  std::vector<uint16_t> own_scales;
  std::vector<float> own_wscale;
  float input_scale = 0.f;
  std::vector<int32_t> outliers;
  FloatSpan bias;
  std::vector<std::pair<const uint8_t*, size_t>> src;  // mapped bytes of the quantized arrays

  Canon() = default;
  Canon(Canon&&) = default;
  Canon& operator=(Canon&&) = default;
  Canon(const Canon&) = delete;
  Canon& operator=(const Canon&) = delete;
};

// Rows [n0, n1) of an f32 Canon (row stride K), checked finite: in place when they lie in one aligned
// F32 segment, else copied / converted into *tmp.
const float* f32_rows(const Canon& c, int64_t n0, int64_t n1, std::vector<float>* tmp) {
  int64_t base = 0;
  for (const Canon::Seg& s : c.segs) {
    if (n0 >= base && n1 <= base + s.rows && s.t->type == 0 && aligned_for<float>(s.t->data)) {
      const float* p = reinterpret_cast<const float*>(s.t->data) + (n0 - base) * c.K;
      check_finite(p, size_t((n1 - n0) * c.K), s.t->name);
      return p;
    }
    base += s.rows;
  }
  tmp->resize(size_t((n1 - n0) * c.K));
  base = 0;
  for (const Canon::Seg& s : c.segs) {
    const int64_t a = std::max(n0, base), b = std::min(n1, base + s.rows);
    if (a < b) convert_floats(*s.t, size_t((a - base) * c.K), size_t((b - a) * c.K), tmp->data() + (a - n0) * c.K);
    base += s.rows;
  }
  return tmp->data();
}
// Releases the mapped source pages of rows [n0, n1) of an f32 Canon.
void release_rows(const gguf::File& f, const Canon& c, int64_t n0, int64_t n1) {
  int64_t base = 0;
  for (const Canon::Seg& s : c.segs) {
    const int64_t a = std::max(n0, base), b = std::min(n1, base + s.rows);
    const size_t es = gguf::tensor_type_size(s.t->type);
    if (a < b) f.release(s.t->data + size_t((a - base) * c.K) * es, size_t((b - a) * c.K) * es);
    base += s.rows;
  }
}
int64_t chunk_rows_for(int64_t K) { return std::max<int64_t>(16, g_pack_chunk_bytes / (K * 4) / 16 * 16); }

// Validates the f32 weights of a linear that is not packed (ViT blocks past the feature layer).
void validate_f32(const gguf::File& f, const Canon& c) {
  std::vector<float> tmp;
  const int64_t step = chunk_rows_for(c.K);
  for (int64_t n0 = 0; n0 < c.N; n0 += step) {
    const int64_t n1 = std::min(c.N, n0 + step);
    f32_rows(c, n0, n1, &tmp);
    release_rows(f, c, n0, n1);
  }
}

Canon load_canon(Loader& L, const Config& cfg, const std::string& name, const std::string& prefix,
                 const std::map<std::string, LayerQuant>& quant, int64_t N, int64_t K, bool bias) {
  Canon c;
  c.name = name;
  c.N = N;
  c.K = K;
  const std::string p = prefix + name;
  auto it = quant.find(name);
  if (it == quant.end()) {
    c.kind = "f32";
    const gguf::TensorInfo& t = L.get(p + ".weight", {N, K});
    L.want_type(t, {0, 1}, "F32 or F16");
    c.segs.push_back({&t, N});  // checked finite when packed (or by validate_f32)
  } else {
    const LayerQuant& q = it->second;
    c.kind = q.format;
    if (q.format == "w8a8") {
      c.q8 = L.raw<int8_t>(p + ".qweight", {N, K}, 24, "I8", &c.own_q8, &c.src);
      for (int64_t i = 0; i < N * K; ++i)
        if (c.q8[i] == -128) fail(EDGEMM_ERR_FORMAT, "tensor '" + p + ".qweight' holds code -128 (W8A8 codes must be in [-127, 127])");
      c.wscale = L.raw<float>(p + ".weight_scale", {N}, 0, "F32", &c.own_wscale, nullptr);
      std::vector<float> is;
      c.input_scale = *L.raw<float>(p + ".input_scale", {1}, 0, "F32", &is, nullptr);
      if (!(c.input_scale > 0) || !std::isfinite(c.input_scale))
        fail(EDGEMM_ERR_FORMAT, "tensor '" + p + ".input_scale' must be a finite positive scale");
      for (int64_t i = 0; i < N; ++i)
        if (!std::isfinite(c.wscale[i])) fail(EDGEMM_ERR_FORMAT, "tensor '" + p + ".weight_scale' holds a non-finite value");
      if (const gguf::TensorInfo* t = L.f.find_tensor(p + ".outlier_channels")) {
        if (t->shape.size() != 1) fail(EDGEMM_ERR_FORMAT, "tensor '" + t->name + "' must be 1-D");
        std::vector<int32_t> own;
        const int32_t* o = L.raw<int32_t>(p + ".outlier_channels", {t->shape[0]}, 26, "I32", &own, nullptr);
        c.outliers.assign(o, o + t->shape[0]);
        for (int32_t ch : c.outliers)
          if (ch < 0 || ch >= K) fail(EDGEMM_ERR_FORMAT, "tensor '" + t->name + "' holds channel " + std::to_string(ch) + " outside [0, " + std::to_string(K) + ")");
      }
    } else {
      c.G = q.group_size;
      if (K % c.G) fail(EDGEMM_ERR_FORMAT, "layer '" + p + "': group_size " + std::to_string(c.G) + " does not divide " + std::to_string(K));
      if (c.G % 32) fail(EDGEMM_ERR_UNSUPPORTED, "layer '" + p + "': group_size " + std::to_string(c.G) + " (the kernels need a multiple of 32)");
      if (q.format == "int4") {
        if (K % 2) fail(EDGEMM_ERR_FORMAT, "layer '" + p + "': int4 needs an even in_features");
        c.q4 = L.raw<uint8_t>(p + ".qweight", {N, K / 2}, 24, "I8 (raw int4 bytes)", &c.own_q4, &c.src);
      } else {
        c.q8 = L.raw<int8_t>(p + ".qweight", {N, K}, 24, "I8", &c.own_q8, &c.src);
      }
      const int64_t ng = N * (K / c.G);
      c.scales = L.raw<uint16_t>(p + ".scales", {N, K / c.G}, 1, "F16", &c.own_scales, &c.src);
      for (int64_t i = 0; i < ng; ++i)
        if ((c.scales[i] & 0x7C00) == 0x7C00) fail(EDGEMM_ERR_FORMAT, "tensor '" + p + ".scales' holds a non-finite value");
      if (!q.symmetric || L.has(p + ".zeros")) {
        c.zeros = L.raw<uint8_t>(p + ".zeros", {N, K / c.G}, 24, "I8", &c.own_zeros, &c.src);
        c.has_zeros = true;
        if (q.format == "int4")
          for (int64_t i = 0; i < ng; ++i)
            if (c.zeros[i] > 15) fail(EDGEMM_ERR_FORMAT, "tensor '" + p + ".zeros' holds an int4 zero point > 15");
      }
      auto sp = cfg.sparsity.find(name);
      c.sparse24 = sp != cfg.sparsity.end() && sp->second.first == 2 && sp->second.second == 4;
    }
  }
  if (bias) c.bias = L.floats(p + ".bias", {N});
  return c;
}

bool can_fuse(const Canon& a, const Canon& b) {
  if (a.kind != b.kind || a.K != b.K) return false;
  if (a.kind == "w8a8") return a.input_scale == b.input_scale;
  if (a.kind == "int4" || a.kind == "int8") return a.G == b.G && a.has_zeros == b.has_zeros && a.sparse24 == b.sparse24;
  return true;
}

// Concatenates compatible parts along N: f32 by segments (no copy); quantized arrays and biases into one
// transient buffer each (the group's size, freed after packing).
Canon concat(std::vector<Canon> parts) {
  Canon c;
  c.kind = parts[0].kind;
  c.name = parts[0].name;
  c.K = parts[0].K;
  c.G = parts[0].G;
  c.has_zeros = parts[0].has_zeros;
  c.sparse24 = parts[0].sparse24;
  c.input_scale = parts[0].input_scale;
  bool any_bias = false;
  for (size_t i = 0; i < parts.size(); ++i) {
    any_bias = any_bias || !parts[i].bias.empty();
    if (i) c.name += "+" + parts[i].name;
  }
  std::vector<float> bias;
  const int64_t gpr = c.G ? c.K / c.G : 0;  // groups per row
  for (Canon& p : parts) {
    c.segs.insert(c.segs.end(), p.segs.begin(), p.segs.end());
    if (p.q8) c.own_q8.insert(c.own_q8.end(), p.q8, p.q8 + p.N * p.K);
    if (p.q4) c.own_q4.insert(c.own_q4.end(), p.q4, p.q4 + p.N * (p.K / 2));
    if (p.scales) c.own_scales.insert(c.own_scales.end(), p.scales, p.scales + p.N * gpr);
    if (p.zeros) c.own_zeros.insert(c.own_zeros.end(), p.zeros, p.zeros + p.N * gpr);
    if (p.wscale) c.own_wscale.insert(c.own_wscale.end(), p.wscale, p.wscale + p.N);
    for (int32_t ch : p.outliers)
      if (std::find(c.outliers.begin(), c.outliers.end(), ch) == c.outliers.end()) c.outliers.push_back(ch);
    if (any_bias) {
      if (p.bias.empty()) bias.insert(bias.end(), size_t(p.N), 0.f);
      else bias.insert(bias.end(), p.bias.data(), p.bias.data() + p.bias.size());
    }
    c.src.insert(c.src.end(), p.src.begin(), p.src.end());
    c.N += p.N;
  }
  if (parts[0].q8) c.q8 = c.own_q8.data();
  if (parts[0].q4) c.q4 = c.own_q4.data();
  if (parts[0].scales) c.scales = c.own_scales.data();
  if (parts[0].zeros) c.zeros = c.own_zeros.data();
  if (parts[0].wscale) c.wscale = c.own_wscale.data();
  if (any_bias) c.bias = FloatSpan::owned(std::move(bias));
  return c;
}

void pack(const gguf::File& f, Canon&& c, Linear* L, ThreadPool* pool) {
  L->N = c.N;
  L->K = c.K;
  L->bias = std::move(c.bias);
  std::string what = "packing '" + c.name + "'";
  if (c.kind == "f32") {
    L->kind = Linear::kF32;
    pack_f32_rows([&](int64_t n0, int64_t n1, std::vector<float>* tmp) { return f32_rows(c, n0, n1, tmp); },
                  [&](int64_t n0, int64_t n1) { release_rows(f, c, n0, n1); }, c.N, c.K, chunk_rows_for(c.K),
                  &L->f32, pool, what.c_str());
    L->desc = "f32";
    L->bytes = c.N * c.K * 4;
  } else if (c.kind == "w8a8") {
    L->kind = Linear::kW8A8;
    L->input_scale = c.input_scale;
    check_kernel(kernels::w8a8_pack(c.q8, c.K, c.wscale, c.N, c.K, c.outliers.data(), int64_t(c.outliers.size()),
                                    &L->w8, pool),
                 what.c_str());
    L->desc = "w8a8";
    L->bytes = c.N * c.K;
  } else {
    L->kind = Linear::kWoq;
    kernels::Status s;
    const uint8_t* z4 = c.has_zeros ? c.zeros : nullptr;
    const int8_t* z8 = c.has_zeros ? reinterpret_cast<const int8_t*>(c.zeros) : nullptr;
    if (c.kind == "int4")
      s = c.sparse24 ? kernels::woq_pack_int4_sparse24(c.q4, c.scales, z4, c.N, c.K, c.G, &L->woq, pool)
                     : kernels::woq_pack_int4(c.q4, c.scales, z4, c.N, c.K, c.G, &L->woq, pool);
    else
      s = c.sparse24 ? kernels::woq_pack_int8_sparse24(c.q8, c.scales, z8, c.N, c.K, c.G, &L->woq, pool)
                     : kernels::woq_pack_int8(c.q8, c.scales, z8, c.N, c.K, c.G, &L->woq, pool);
    if (s == kernels::Status::kNotSparse)
      fail(EDGEMM_ERR_FORMAT, "layer '" + c.name + "' is marked 2:4 sparse in extras.sparsity but a group of 4 has more than 2 nonzeros");
    check_kernel(s, what.c_str());
    L->desc = c.kind + "-g" + std::to_string(c.G) + (c.has_zeros ? "-asym" : "") + (c.sparse24 ? "-2:4" : "");
    L->bytes = int64_t(kernels::woq_bytes(L->woq));
  }
  for (const auto& s : c.src) f.release(s.first, s.second);
}

// Loads the named linears (main set, or decode set with prefix "decode."), fusing when compatible.
void load_fused(Loader& L, const Config& cfg, const std::vector<std::string>& names, const std::vector<int64_t>& Ns,
                int64_t K, bool bias, const std::string& prefix, const std::map<std::string, LayerQuant>& quant,
                Linear* fused_out, ThreadPool* pool) {
  std::vector<Canon> parts;
  for (size_t i = 0; i < names.size(); ++i) parts.push_back(load_canon(L, cfg, names[i], prefix, quant, Ns[i], K, bias));
  bool ok = true;
  for (size_t i = 1; i < parts.size(); ++i) ok = ok && can_fuse(parts[0], parts[i]);
  if (!ok) {
    // Mixed formats or W8A8 input scales: run the parts one after another into their column ranges.
    fused_out->N = 0;
    fused_out->K = K;
    fused_out->parts.resize(parts.size());
    std::string d;
    for (size_t i = 0; i < parts.size(); ++i) {
      pack(L.f, std::move(parts[i]), &fused_out->parts[i], pool);
      fused_out->N += fused_out->parts[i].N;
      fused_out->bytes += fused_out->parts[i].bytes;
      d += (i ? "|" : "") + fused_out->parts[i].desc;
    }
    fused_out->kind = fused_out->parts[0].kind;
    fused_out->desc = d;
    return;
  }
  pack(L.f, concat(std::move(parts)), fused_out, pool);
}

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(EDGEMM_ERR_IO, "cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

const std::string& kv_string(const gguf::File& f, const char* key, bool required) {
  static const std::string empty;
  const gguf::KV* kv = f.find_kv(key);
  if (!kv) {
    if (required) fail(EDGEMM_ERR_FORMAT, std::string("missing key '") + key + "'");
    return empty;
  }
  if (kv->type != gguf::ValueType::kString) fail(EDGEMM_ERR_FORMAT, std::string("key '") + key + "' must be a string");
  return kv->s;
}
uint32_t kv_u32(const gguf::File& f, const char* key) {
  const gguf::KV* kv = f.find_kv(key);
  if (!kv) fail(EDGEMM_ERR_FORMAT, std::string("missing key '") + key + "'");
  if (kv->type != gguf::ValueType::kU32) fail(EDGEMM_ERR_FORMAT, std::string("key '") + key + "' must be a u32");
  return uint32_t(kv->u);
}

}  // namespace

int64_t g_pack_chunk_bytes = int64_t(16) << 20;

void EmbedTable::row(int64_t i, float* out) const {
  const size_t n = size_t(cols);
  if (type == 0) {
    std::memcpy(out, data + size_t(i) * n * 4, n * 4);
  } else {
    const uint8_t* p = data + size_t(i) * n * 2;
    for (size_t k = 0; k < n; ++k) {
      uint16_t h;
      std::memcpy(&h, p + 2 * k, 2);
      out[k] = kernels::fp16_to_fp32(h);
    }
  }
}

void pack_f32_rows(const RowSource& rows, const std::function<void(int64_t, int64_t)>& done, int64_t N, int64_t K,
                   int64_t chunk_rows, kernels::F32Weights* out, ThreadPool* pool, const char* what) {
  if (N <= 0 || K <= 0 || chunk_rows <= 0 || chunk_rows % 16) fail(EDGEMM_ERR_INTERNAL, std::string(what) + ": bad chunking");
  std::vector<float> tmp;
  if (N <= chunk_rows) {
    check_kernel(kernels::f32_pack(rows(0, N, &tmp), K, N, K, out, pool), what);
    done(0, N);
    return;
  }
  // [Np/16][K][16]: the panels of rows [n0, n1) (n0 % 16 == 0) are the contiguous range from n0 * K.
  kernels::F32Weights part;
  size_t slack = 0;  // elements f32_pack allocates past Np * K (zero), kept as they are
  for (int64_t n0 = 0; n0 < N; n0 += chunk_rows) {
    const int64_t n1 = std::min(N, n0 + chunk_rows);
    check_kernel(kernels::f32_pack(rows(n0, n1, &tmp), K, n1 - n0, K, &part, pool), what);
    const size_t body = size_t(part.Np * K);
    if (part.N != n1 - n0 || part.K != K || part.Np != (n1 - n0 + 15) / 16 * 16 || part.data.size() < body)
      fail(EDGEMM_ERR_INTERNAL, std::string(what) + ": unexpected f32 packed layout");
    if (n0 == 0) {
      slack = part.data.size() - body;
      out->N = N;
      out->K = K;
      out->Np = (N + 15) / 16 * 16;
      if (!out->data.resize(size_t(out->Np * K) + slack))
        fail(EDGEMM_ERR_OUT_OF_MEMORY, std::string(what) + ": out of memory");
      if (slack) std::memset(out->data.data() + out->Np * K, 0, slack * sizeof(float));
    } else if (part.data.size() - body != slack) {
      fail(EDGEMM_ERR_INTERNAL, std::string(what) + ": unexpected f32 packed layout");
    }
    std::memcpy(out->data.data() + n0 * K, part.data.data(), body * sizeof(float));
    done(n0, n1);
  }
}

NpuBackend cpu_int8_backend(ThreadPool* lane_pool) {
  NpuBackend b;
  b.name = "cpu-int8";
  b.ctx = lane_pool;
  b.upload_w8a8 = [](void*, const kernels::W8A8Weights* w, const char*) -> void* {
    return const_cast<kernels::W8A8Weights*>(w);
  };
  b.gemm = [](void* ctx, void* w, const kernels::W8A8Act* a, const float* bias, float* y, int64_t ldy) -> int32_t {
    return int32_t(kernels::w8a8_gemm(*a, *static_cast<const kernels::W8A8Weights*>(w), bias, y, ldy, false,
                                      static_cast<ThreadPool*>(ctx)));
  };
  b.release = [](void*, void*) {};
  return b;
}

std::unique_ptr<Model> load_model(const std::string& path_in, const edgemm_load_options& opts) {
  std::string path = path_in;
  struct stat st;
  if (stat(path.c_str(), &st) != 0) fail(EDGEMM_ERR_IO, "model not found: " + path);
  if (S_ISDIR(st.st_mode)) {
    std::string mpath = path + "/manifest.json";
    if (stat(mpath.c_str(), &st) != 0) fail(EDGEMM_ERR_IO, path + " is a directory without manifest.json");
    json::Value man;
    std::string err;
    if (!json::parse(read_text_file(mpath), &man, &err)) fail(EDGEMM_ERR_FORMAT, mpath + ": " + err);
    const json::Value* arts = man.get("artifacts");
    if (!arts || !arts->is_array()) fail(EDGEMM_ERR_FORMAT, mpath + ": no artifacts list");
    std::string file;
    for (const auto& a : arts->arr) {
      const json::Value* fmt = a.get("format");
      const json::Value* f = a.get("file");
      if (fmt && fmt->is_string() && fmt->str == "edgemm-native" && f && f->is_string()) {
        file = f->str;
        break;
      }
    }
    if (file.empty()) fail(EDGEMM_ERR_FORMAT, mpath + ": the bundle has no artifact with format 'edgemm-native'");
    if (file.find("..") != std::string::npos || (!file.empty() && file[0] == '/'))
      fail(EDGEMM_ERR_FORMAT, mpath + ": artifact path escapes the bundle: " + file);
    path = path + "/" + file;
  }
  auto m = std::make_unique<Model>();
  m->path = path;
  gguf::File f;
  std::string err;
  int rc = f.open(path, &err);
  if (rc != 0) fail(rc == 2 ? EDGEMM_ERR_IO : EDGEMM_ERR_FORMAT, err);
  const std::string& arch = kv_string(f, "general.architecture", true);
  if (arch != "edgemm") fail(EDGEMM_ERR_FORMAT, "general.architecture is '" + arch + "', expected 'edgemm'");
  uint32_t fv = kv_u32(f, "edgemm.format_version");
  if (fv != 1) fail(EDGEMM_ERR_UNSUPPORTED, "edgemm.format_version " + std::to_string(fv) + " (this engine reads 1)");
  Config& cfg = m->cfg;
  parse_config(kv_string(f, "edgemm.config", true), &cfg);
  if (!m->tok.load(kv_string(f, "edgemm.tokenizer", true), &err)) fail(EDGEMM_ERR_FORMAT, "edgemm.tokenizer: " + err);
  if (m->tok.vocab_size() > cfg.t.vocab)
    fail(EDGEMM_ERR_FORMAT, "edgemm.tokenizer has " + std::to_string(m->tok.vocab_size()) + " tokens but the model only " + std::to_string(cfg.t.vocab));
  {
    json::Value pp;
    const std::string& pre = kv_string(f, "edgemm.preprocess", true);
    if (!json::parse(pre, &pp, &err) || !pp.is_object()) fail(EDGEMM_ERR_FORMAT, "edgemm.preprocess is not a JSON object");
    if (const json::Value* s = pp.get("image_size"))
      if (!s->is_int || s->i != cfg.v.image_size) fail(EDGEMM_ERR_FORMAT, "edgemm.preprocess image_size disagrees with the config");
    if (const json::Value* r = pp.get("resize")) {
      if (!r->is_string() || (r->str != "pad" && r->str != "crop" && r->str != "squash"))
        fail(EDGEMM_ERR_FORMAT, "edgemm.preprocess resize must be pad, crop or squash");
      cfg.v.resize = r->str;
    }
    for (const char* key : {"mean", "std"}) {
      const json::Value* a = pp.get(key);
      if (!a) continue;
      if (!a->is_array() || a->arr.size() != 3) fail(EDGEMM_ERR_FORMAT, std::string("edgemm.preprocess ") + key + " must have 3 numbers");
      for (int i = 0; i < 3; ++i) {
        if (!a->arr[i].is_number() || !std::isfinite(a->arr[i].num)) fail(EDGEMM_ERR_FORMAT, std::string("edgemm.preprocess ") + key + " must have 3 numbers");
        (key[0] == 'm' ? cfg.v.mean : cfg.v.stdv)[i] = float(a->arr[i].num);
      }
    }
    for (int i = 0; i < 3; ++i)
      if (cfg.v.stdv[i] == 0.f) fail(EDGEMM_ERR_FORMAT, "edgemm.preprocess std must be nonzero");
  }
  const std::string& tmpl = kv_string(f, "edgemm.prompt_template", false);
  if (!tmpl.empty()) cfg.prompt_template = tmpl;
  {
    size_t a = cfg.prompt_template.find("<image>");
    if (a == std::string::npos || cfg.prompt_template.find("<image>", a + 1) != std::string::npos ||
        cfg.prompt_template.find("{question}") == std::string::npos)
      fail(EDGEMM_ERR_FORMAT, "edgemm.prompt_template must contain '<image>' once and '{question}'");
  }
  uint32_t chunk = kv_u32(f, "edgemm.chunk_size");
  uint32_t maxc = kv_u32(f, "edgemm.max_context");
  if (chunk < 1 || chunk > 65536) fail(EDGEMM_ERR_FORMAT, "edgemm.chunk_size must be in [1, 65536]");
  if (maxc < 1 || maxc > (1u << 20)) fail(EDGEMM_ERR_FORMAT, "edgemm.max_context must be in [1, 1048576]");
  {
    const std::string& dq = kv_string(f, "edgemm.decode_quantization", false);
    if (!dq.empty()) {
      json::Value d;
      if (!json::parse(dq, &d, &err)) fail(EDGEMM_ERR_FORMAT, "edgemm.decode_quantization is not valid JSON: " + err);
      parse_quant(&d, "edgemm.decode_quantization", &cfg.decode_quant);
    }
  }
  m->chunk_size = opts.chunk_size > 0 ? opts.chunk_size : int(chunk);
  m->max_context = opts.max_context > 0 ? opts.max_context : int(maxc);
  if (opts.chunk_size < 0 || opts.max_context < 0 || opts.n_threads < 0)
    fail(EDGEMM_ERR_INVALID_ARGUMENT, "load options must be >= 0");
  if (m->max_context > (1 << 20)) fail(EDGEMM_ERR_INVALID_ARGUMENT, "max_context too large");
  int nt = opts.n_threads;
  if (nt <= 0) nt = std::max(1, std::min(8, int(std::thread::hardware_concurrency())));
  m->n_threads = nt;
  m->npu_lane = opts.npu_lane != 0;
  m->pool = std::make_unique<ThreadPool>(nt);
  ThreadPool* pool = m->pool.get();

  Loader L{f, {}, pool};
  const VisionCfg& vc = cfg.v;
  const TextCfg& tc = cfg.t;
  // Every quantization entry must name a real linear.
  std::set<std::string> linears;
  linears.insert("vision.patch_embed");
  for (int i = 0; i < vc.layers; ++i) {
    std::string p = "vision.layers." + std::to_string(i) + ".";
    for (const char* n : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"})
      linears.insert(p + n);
  }
  linears.insert("projector.linear_1");
  linears.insert("projector.linear_2");
  for (int i = 0; i < tc.layers; ++i) {
    std::string p = "text.layers." + std::to_string(i) + ".";
    for (const char* n : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})
      linears.insert(p + n);
  }
  linears.insert("text.lm_head");
  for (const auto& q : cfg.quant)
    if (!linears.count(q.first)) fail(EDGEMM_ERR_FORMAT, "extras.quantization names unknown layer '" + q.first + "'");
  for (const auto& q : cfg.decode_quant)
    if (!linears.count(q.first)) fail(EDGEMM_ERR_FORMAT, "edgemm.decode_quantization names unknown layer '" + q.first + "'");

  const int64_t Dv = vc.hidden, P = vc.patches(), Dt = tc.hidden;
  const int64_t patch_in = int64_t(vc.num_channels) * vc.patch_size * vc.patch_size;
  {
    pack(f, load_canon(L, cfg, "vision.patch_embed", "", cfg.quant, Dv, patch_in, vc.patch_bias), &m->patch_embed, pool);
  }
  m->cls = L.floats("vision.class_embedding", {Dv});
  m->pos_embed = L.floats("vision.position_embedding", {P + 1, Dv});
  if (vc.pre_layernorm) {
    m->pre_ln_w = L.floats("vision.pre_layernorm.weight", {Dv});
    m->pre_ln_b = L.floats("vision.pre_layernorm.bias", {Dv});
  }
  // ViT blocks: the ones that run are packed; the rest are validated (shape/dtype) only.
  m->vit.resize(size_t(cfg.feature_blocks));
  for (int i = 0; i < vc.layers; ++i) {
    std::string p = "vision.layers." + std::to_string(i) + ".";
    bool run = i < cfg.feature_blocks;
    VitBlock tmp;
    VitBlock& b = run ? m->vit[size_t(i)] : tmp;
    b.ln1_w = L.floats(p + "layer_norm1.weight", {Dv});
    b.ln1_b = L.floats(p + "layer_norm1.bias", {Dv});
    b.ln2_w = L.floats(p + "layer_norm2.weight", {Dv});
    b.ln2_b = L.floats(p + "layer_norm2.bias", {Dv});
    if (run) {
      load_fused(L, cfg, {p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"}, {Dv, Dv, Dv}, Dv, true, "",
                 cfg.quant, &b.qkv, pool);
      pack(f, load_canon(L, cfg, p + "self_attn.out_proj", "", cfg.quant, Dv, Dv, true), &b.out, pool);
      pack(f, load_canon(L, cfg, p + "mlp.fc1", "", cfg.quant, vc.inter, Dv, true), &b.fc1, pool);
      pack(f, load_canon(L, cfg, p + "mlp.fc2", "", cfg.quant, Dv, vc.inter, true), &b.fc2, pool);
    } else {
      for (auto& nk : std::vector<std::pair<std::string, std::pair<int64_t, int64_t>>>{
               {"self_attn.q_proj", {Dv, Dv}}, {"self_attn.k_proj", {Dv, Dv}}, {"self_attn.v_proj", {Dv, Dv}},
               {"self_attn.out_proj", {Dv, Dv}}, {"mlp.fc1", {vc.inter, Dv}}, {"mlp.fc2", {Dv, vc.inter}}})
      {
        Canon c = load_canon(L, cfg, p + nk.first, "", cfg.quant, nk.second.first, nk.second.second, true);
        if (c.kind == "f32") validate_f32(f, c);
        for (const auto& r : c.src) f.release(r.first, r.second);
      }
    }
  }
  pack(f, load_canon(L, cfg, "projector.linear_1", "", cfg.quant, Dt, Dv, cfg.proj_bias), &m->proj1, pool);
  pack(f, load_canon(L, cfg, "projector.linear_2", "", cfg.quant, Dt, Dt, cfg.proj_bias), &m->proj2, pool);
  // The embedding table stays in the mapping (validated here in chunks, whose pages are then released:
  // a prompt touches only its own rows).
  const gguf::TensorInfo& embed_t = L.get("text.embed_tokens.weight", {tc.vocab, Dt});
  L.want_type(embed_t, {0, 1}, "F32 or F16");
  {
    Canon e;
    e.name = embed_t.name;
    e.N = tc.vocab;
    e.K = Dt;
    e.segs.push_back({&embed_t, tc.vocab});
    validate_f32(f, e);
    m->embed.data = embed_t.data;
    m->embed.type = embed_t.type;
    m->embed.rows = tc.vocab;
    m->embed.cols = Dt;
  }
  const int64_t H = tc.heads, Hkv = tc.kv_heads, hd = tc.head_dim, I = tc.inter;
  m->blocks.resize(size_t(tc.layers));
  for (int i = 0; i < tc.layers; ++i) {
    std::string p = "text.layers." + std::to_string(i) + ".";
    TextBlock& b = m->blocks[size_t(i)];
    b.ln_in = L.floats(p + "input_layernorm.weight", {Dt});
    b.ln_post = L.floats(p + "post_attention_layernorm.weight", {Dt});
    std::vector<std::string> qkv = {p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"};
    std::vector<std::string> gu = {p + "mlp.gate_proj", p + "mlp.up_proj"};
    load_fused(L, cfg, qkv, {H * hd, Hkv * hd, Hkv * hd}, Dt, false, "", cfg.quant, &b.qkv, pool);
    pack(f, load_canon(L, cfg, p + "self_attn.o_proj", "", cfg.quant, Dt, H * hd, false), &b.o, pool);
    load_fused(L, cfg, gu, {I, I}, Dt, false, "", cfg.quant, &b.gate_up, pool);
    pack(f, load_canon(L, cfg, p + "mlp.down_proj", "", cfg.quant, Dt, I, false), &b.down, pool);
    // decode set: only the layers decode_quantization lists (all of a fused group or none)
    auto dq = [&](const std::string& n) { return cfg.decode_quant.count(n) > 0; };
    auto group = [&](const std::vector<std::string>& names, const std::vector<int64_t>& Ns, int64_t K, Linear* out) {
      size_t c = 0;
      for (auto& n : names) c += dq(n);
      if (c == 0) return;
      if (c != names.size())
        fail(EDGEMM_ERR_FORMAT, "edgemm.decode_quantization must cover all or none of " + names[0] + " ... " + names.back());
      load_fused(L, cfg, names, Ns, K, false, "decode.", cfg.decode_quant, out, pool);
    };
    group(qkv, {H * hd, Hkv * hd, Hkv * hd}, Dt, &b.d_qkv);
    group({p + "self_attn.o_proj"}, {Dt}, H * hd, &b.d_o);
    group(gu, {I, I}, Dt, &b.d_gate_up);
    group({p + "mlp.down_proj"}, {Dt}, I, &b.d_down);
  }
  m->norm_w = L.floats("text.norm.weight", {Dt});
  if (cfg.decode_quant.count("text.lm_head")) {
    // One LM head: with a decode set it is the decode set's. The head only ever computes one row per
    // generation step (a decode step, or the last row of a prefill), a GEMV, so it runs the weight-only
    // GEMV whatever the step; a main-set head, which older exporters also wrote, is never run (accepted
    // unvalidated, not mapped into the resident set).
    pack(f, load_canon(L, cfg, "text.lm_head", "decode.", cfg.decode_quant, tc.vocab, Dt, false), &m->lm_head, pool);
    for (const auto& t : f.tensors())
      if (t.name.rfind("text.lm_head.", 0) == 0) L.used.insert(t.name);
  } else if (tc.tie && !L.has("text.lm_head.weight") && !cfg.quant.count("text.lm_head")) {
    Canon c;
    c.kind = "f32";
    c.name = "text.lm_head (tied)";
    c.N = tc.vocab;
    c.K = Dt;
    c.segs.push_back({&embed_t, tc.vocab});  // packed from the mapped embedding, chunk by chunk
    pack(f, std::move(c), &m->lm_head, pool);
  } else {
    pack(f, load_canon(L, cfg, "text.lm_head", "", cfg.quant, tc.vocab, Dt, false), &m->lm_head, pool);
  }
  for (const auto& t : f.tensors())
    if (!L.used.count(t.name))
      fail(EDGEMM_ERR_FORMAT, "unexpected tensor '" + t.name + "' (not implied by the config / decode_quantization)");
  m->mapping = f.mapping();
  {
    int64_t mb = m->embed.rows * m->embed.cols * int64_t(gguf::tensor_type_size(m->embed.type));
    auto span = [&](const FloatSpan& s) { mb += s.is_owned() ? 0 : int64_t(s.size() * 4); };
    std::function<void(const Linear&)> lin = [&](const Linear& l) {
      span(l.bias);
      for (const Linear& p : l.parts) lin(p);
    };
    for (const FloatSpan* s : {&m->cls, &m->pos_embed, &m->pre_ln_w, &m->pre_ln_b, &m->norm_w}) span(*s);
    for (const Linear* l : {&m->patch_embed, &m->proj1, &m->proj2, &m->lm_head}) lin(*l);
    for (const VitBlock& b : m->vit) {
      for (const FloatSpan* s : {&b.ln1_w, &b.ln1_b, &b.ln2_w, &b.ln2_b}) span(*s);
      for (const Linear* l : {&b.qkv, &b.out, &b.fc1, &b.fc2}) lin(*l);
    }
    for (const TextBlock& b : m->blocks) {
      span(b.ln_in);
      span(b.ln_post);
      for (const Linear* l : {&b.qkv, &b.o, &b.gate_up, &b.down, &b.d_qkv, &b.d_o, &b.d_gate_up, &b.d_down}) lin(*l);
    }
    m->mapped_bytes = mb;
  }
  check_kernel(kernels::rope_init(m->max_context, hd, tc.rope_theta, &m->rope), "RoPE table");
  // descriptions
  auto desc = [&](bool decode) {
    std::map<std::string, int> n;
    for (auto& b : m->blocks) {
      for (const Linear* l : {decode ? &b.dec_qkv() : &b.qkv, decode ? &b.dec_o() : &b.o,
                              decode ? &b.dec_gate_up() : &b.gate_up, decode ? &b.dec_down() : &b.down})
        n[l->desc]++;
    }
    std::string s;
    for (auto& kv : n) s += (s.empty() ? "" : ",") + kv.first;
    return s;
  };
  m->prefill_desc = desc(false);
  m->decode_desc = desc(true);
  if (opts.attention < EDGEMM_ATTENTION_AUTO || opts.attention > EDGEMM_ATTENTION_BF16)
    fail(EDGEMM_ERR_INVALID_ARGUMENT, "load option attention must be 0 (auto), 1 (fp32) or 2 (bf16)");
  // bf16 attention in a part: forced, or auto and the part's linears are quantized; only where the CPU can.
  auto quantized = [](const Linear* qkv) { return qkv && qkv->valid() && qkv->kind != Linear::kF32; };
  auto attn_bf16 = [&](const Linear* qkv) {
    return kernels::attention_bf16_available() &&
           (opts.attention == EDGEMM_ATTENTION_BF16 || (opts.attention == EDGEMM_ATTENTION_AUTO && quantized(qkv)));
  };
  const Linear* text_qkv = m->blocks.empty() ? nullptr : &m->blocks[0].qkv;
  m->vit_attn_bf16 = attn_bf16(m->vit.empty() ? nullptr : &m->vit[0].qkv);
  m->text_attn_bf16 = attn_bf16(text_qkv);
  // fp16 KV cache on the same rule, on every CPU (storage only: attention widens it to fp32 or bf16).
  m->kv_fp16 = opts.attention == EDGEMM_ATTENTION_BF16 || (opts.attention == EDGEMM_ATTENTION_AUTO && quantized(text_qkv));
#if defined(__GLIBC__)
  malloc_trim(0);  // hand the load-time transient buffers back to the OS (glibc keeps freed heap otherwise)
#endif
  if (m->npu_lane) {
    int a = std::max(1, nt / 2), b = std::max(1, nt - a);
    m->npu_pool = std::make_unique<ThreadPool>(a);
    m->cpu_pool = std::make_unique<ThreadPool>(b);
  }
  return m;
}

int Config::num_visual_tokens() const {
  const int64_t P = v.patches();
  const bool full = select_full;
  if (tokens.method.empty()) return int(P + (full ? 1 : 0));
  int64_t k;
  const int g = v.grid();
  auto pool_ok = [&](int64_t c) {
    for (int h = 1; h <= g; ++h)
      if (c % h == 0 && c / h <= g) return true;
    return false;
  };
  if (!tokens.keep_is_ratio) {
    int64_t kc = tokens.keep_count;
    if (full) {
      if (kc < 2) fail(EDGEMM_ERR_FORMAT, "with vision_feature_select 'full' keep at least 2 visual tokens");
      kc -= 1;
    }
    if (tokens.method == "pool" && kc < P && !pool_ok(kc))
      fail(EDGEMM_ERR_FORMAT, "pool cannot make " + std::to_string(kc) + " tokens from a " + std::to_string(g) + "x" + std::to_string(g) + " grid");
    k = std::min(kc, P);
  } else {
    double target = double(P) * tokens.keep_ratio;
    k = std::max<int64_t>(1, int64_t(std::floor(target + 0.5)));
    if (tokens.method == "pool" && k < P) {
      int64_t best = -1;
      double bd = 0;
      for (int64_t c = 1; c <= int64_t(g) * g; ++c) {
        if (!pool_ok(c)) continue;
        double d = std::fabs(double(c) - target);
        if (best < 0 || d < bd) { best = c; bd = d; }  // ascending c: ties keep the smaller
      }
      k = best;
    }
    k = std::min(k, P);
  }
  return int(k + (full ? 1 : 0));
}

std::string Model::info_json() const {
  std::string s = "{";
  auto add = [&](const std::string& k, const std::string& v) { s += (s.size() > 1 ? "," : "") + json::quote(k) + ":" + v; };
  add("abi_version", std::to_string(EDGEMM_ABI_VERSION));
  add("version", json::quote(edgemm_version()));
  add("isa", json::quote(kernels::isa_name(kernels::active_isa())));
  add("path", json::quote(path));
  add("n_threads", std::to_string(n_threads));
  add("npu_lane", npu_lane ? "true" : "false");
  add("npu_backend", json::quote(npu_lane ? "cpu-int8" : ""));
  add("chunk_size", std::to_string(chunk_size));
  add("attention", "{\"vision\":" + json::quote(vit_attn_bf16 ? "bf16" : "fp32") + ",\"text_prefill\":" +
                       json::quote(text_attn_bf16 ? "bf16" : "fp32") + "}");
  add("kv_cache", json::quote(kv_fp16 ? "fp16" : "fp32"));
  add("max_context", std::to_string(max_context));
  add("vocab_size", std::to_string(cfg.t.vocab));
  add("image_size", std::to_string(cfg.v.image_size));
  add("num_visual_tokens", std::to_string(cfg.num_visual_tokens()));
  add("hidden_size", std::to_string(cfg.t.hidden));
  add("num_layers", std::to_string(cfg.t.layers));
  add("vision_blocks_run", std::to_string(cfg.feature_blocks));
  add("prefill_weights", json::quote(prefill_desc));
  add("decode_weights", json::quote(decode_desc));
  add("vision_weights", json::quote(vit.empty() ? patch_embed.desc : vit[0].fc1.desc));
  add("lm_head", json::quote(lm_head.desc));
  int64_t bytes = patch_embed.bytes + proj1.bytes + proj2.bytes + lm_head.bytes;
  for (auto& b : vit) bytes += b.qkv.bytes + b.out.bytes + b.fc1.bytes + b.fc2.bytes;
  for (auto& b : blocks)
    bytes += b.qkv.bytes + b.o.bytes + b.gate_up.bytes + b.down.bytes + b.d_qkv.bytes + b.d_o.bytes + b.d_gate_up.bytes +
             b.d_down.bytes;
  add("packed_weight_bytes", std::to_string(bytes));
  int64_t step = lm_head.bytes;  // what one decode step reads: each layer's decode set (else main), the head
  for (auto& b : blocks) step += b.dec_qkv().bytes + b.dec_o().bytes + b.dec_gate_up().bytes + b.dec_down().bytes;
  add("decode_weight_bytes", std::to_string(step));
  add("mapped_weight_bytes", std::to_string(mapped_bytes));
  const json::Value* ex = cfg.raw.get("extras");
  const json::Value* vt = ex ? ex->get("visual_tokens") : nullptr;
  add("visual_tokens", vt ? json::dump(*vt) : "null");
  add("config", json::dump(cfg.raw));
  return s + "}";
}

}  // namespace edgemm
