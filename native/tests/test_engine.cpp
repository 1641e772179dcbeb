// Engine tests through the C ABI: a tiny random EdgeVLM written as a GGUF model file by an in-test writer
// (fp32, W8A8 prefill + int4 decode, token compression variants), end-to-end generation, chunking and
// two-lane equivalence, context limits, argument errors, and malformed / truncated files (every
// corruption must give a status + message naming the key or tensor, never a crash). The memory group
// checks the tensors served from the file mapping (F16 embedding rows, tied head, misaligned data,
// chunked packing, a file replaced while loaded) against the plain paths, bit for bit.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "edgemm.h"
#include "engine.h"  // internal: pack_f32_rows, g_pack_chunk_bytes (the memory group)
#include "gguf.h"

static int g_fail = 0;
#define CHECK(c)                                                              \
  do {                                                                        \
    if (!(c)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #c); \
      ++g_fail;                                                               \
    }                                                                         \
  } while (0)

// ------------------------------------------------------------------------------- tiny GGUF writer
struct T {
  std::string name;
  std::vector<int64_t> shape;  // numpy order
  uint32_t type;               // 0 F32, 1 F16, 24 I8, 26 I32
  std::vector<uint8_t> bytes;
};
struct Spec {
  std::map<std::string, std::string> skv;  // string keys
  std::map<std::string, uint32_t> ukv;     // u32 keys
  std::vector<T> tensors;
  uint64_t misalign = 0;  // added to one tensor offset
  uint64_t align = 32;    // data alignment (write general.alignment too when not 32)
};

static void put(std::string& o, const void* p, size_t n) { o.append(static_cast<const char*>(p), n); }
static void put_u32(std::string& o, uint32_t v) { put(o, &v, 4); }
static void put_u64(std::string& o, uint64_t v) { put(o, &v, 8); }
static void put_str(std::string& o, const std::string& s) {
  put_u64(o, s.size());
  o += s;
}

static std::string write_gguf(const Spec& s) {
  std::string o = "GGUF";
  put_u32(o, 3);
  put_u64(o, s.tensors.size());
  put_u64(o, s.skv.size() + s.ukv.size());
  for (auto& kv : s.skv) {
    put_str(o, kv.first);
    put_u32(o, 8);
    put_str(o, kv.second);
  }
  for (auto& kv : s.ukv) {
    put_str(o, kv.first);
    put_u32(o, 4);
    put_u32(o, kv.second);
  }
  uint64_t off = 0;
  std::vector<uint64_t> offs;
  for (auto& t : s.tensors) {
    put_str(o, t.name);
    put_u32(o, uint32_t(t.shape.size()));
    for (size_t i = t.shape.size(); i-- > 0;) put_u64(o, uint64_t(t.shape[i]));
    put_u32(o, t.type);
    offs.push_back(off);
    put_u64(o, off + (&t == &s.tensors[0] ? s.misalign : 0));
    off += (t.bytes.size() + s.align - 1) / s.align * s.align;
  }
  while (o.size() % s.align) o += '\0';
  for (size_t i = 0; i < s.tensors.size(); ++i) {
    o += std::string(s.tensors[i].bytes.begin(), s.tensors[i].bytes.end());
    while ((o.size()) % s.align) o += '\0';
  }
  return o;
}

static uint16_t f16(float f) {  // round-to-nearest for normal range values used here
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  int32_t e = int32_t((x >> 23) & 0xFF) - 127 + 15;
  uint32_t m = x & 0x7FFFFF;
  if (e <= 0) return uint16_t(sign);
  uint32_t h = sign | (uint32_t(e) << 10) | (m >> 13);
  if ((m >> 12) & 1) h += 1;
  return uint16_t(h);
}

struct Builder {
  std::mt19937 rng{123};
  Spec s;
  float rnd(float a) { return std::uniform_real_distribution<float>(-a, a)(rng); }
  void f32(const std::string& n, std::vector<int64_t> shape, float a, float base = 0.f) {
    int64_t k = 1;
    for (auto d : shape) k *= d;
    T t{n, shape, 0, std::vector<uint8_t>(size_t(k) * 4)};
    for (int64_t i = 0; i < k; ++i) {
      float v = base + rnd(a);
      std::memcpy(&t.bytes[size_t(i) * 4], &v, 4);
    }
    s.tensors.push_back(t);
  }
  void raw(const std::string& n, std::vector<int64_t> shape, uint32_t type, size_t es, std::function<void(uint8_t*, int64_t)> fill) {
    int64_t k = 1;
    for (auto d : shape) k *= d;
    T t{n, shape, type, std::vector<uint8_t>(size_t(k) * es)};
    for (int64_t i = 0; i < k; ++i) fill(&t.bytes[size_t(i) * es], i);
    s.tensors.push_back(t);
  }
  void linear(const std::string& n, int64_t N, int64_t K, bool bias) {
    f32(n + ".weight", {N, K}, 1.0f / std::sqrt(float(K)));
    if (bias) f32(n + ".bias", {N}, 0.02f);
  }
  void w8a8(const std::string& n, int64_t N, int64_t K) {
    raw(n + ".qweight", {N, K}, 24, 1, [&](uint8_t* p, int64_t) { *reinterpret_cast<int8_t*>(p) = int8_t(int(rng() % 255) - 127); });
    raw(n + ".weight_scale", {N}, 0, 4, [&](uint8_t* p, int64_t) { float v = 1.0f / (127 * std::sqrt(float(K))); std::memcpy(p, &v, 4); });
    raw(n + ".input_scale", {1}, 0, 4, [&](uint8_t* p, int64_t) { float v = 0.02f; std::memcpy(p, &v, 4); });
    raw(n + ".outlier_channels", {2}, 26, 4, [&](uint8_t* p, int64_t i) { int32_t v = int32_t(i * 3); std::memcpy(p, &v, 4); });
  }
  void int4(const std::string& n, int64_t N, int64_t K) {
    raw(n + ".qweight", {N, K / 2}, 24, 1, [&](uint8_t* p, int64_t) { *p = uint8_t(rng()); });
    raw(n + ".scales", {N, K / 32}, 1, 2, [&](uint8_t* p, int64_t) { uint16_t h = f16(0.5f / (8 * std::sqrt(float(K)))); std::memcpy(p, &h, 2); });
  }
};

// Tokenizer: 4 specials + the 256 byte symbols (GPT-2 byte->unicode map), a few merges.
static std::string tokenizer_json() {
  std::vector<std::string> sym(256);
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    bool direct = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    uint32_t cp = direct ? uint32_t(b) : uint32_t(256 + n++);
    std::string u;
    if (cp < 0x80) u += char(cp);
    else {
      u += char(0xC0 | (cp >> 6));
      u += char(0x80 | (cp & 0x3F));
    }
    sym[size_t(b)] = u;
  }
  auto q = [](const std::string& s) {
    std::string o = "\"";
    for (char c : s) {
      if (c == '"' || c == '\\') o += '\\';
      o += c;
    }
    return o + "\"";
  };
  std::string v = "{\"<pad>\":0,\"<s>\":1,\"</s>\":2,\"<image>\":3";
  for (int b = 0; b < 256; ++b) v += "," + q(sym[size_t(b)]) + ":" + std::to_string(4 + b);
  v += ",\"\xc4\xa0t\":260,\"\xc4\xa0th\":261,\"he\":262";
  v += "}";
  std::string added;
  const char* sp[] = {"<pad>", "<s>", "</s>", "<image>"};
  for (int i = 0; i < 4; ++i)
    added += std::string(i ? "," : "") + "{\"id\":" + std::to_string(i) + ",\"content\":\"" + sp[i] +
             "\",\"single_word\":false,\"lstrip\":false,\"rstrip\":false,\"normalized\":false,\"special\":true}";
  return "{\"version\":\"1.0\",\"added_tokens\":[" + added +
         "],\"normalizer\":null,\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":true,"
         "\"use_regex\":true},\"decoder\":{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"BPE\",\"vocab\":" +
         v + ",\"merges\":[[\"\xc4\xa0\",\"t\"],\"\xc4\xa0t h\",[\"h\",\"e\"]]}}";
}

struct ModelOpts {
  bool w8a8 = false;
  bool decode_head = false;  // with w8a8: an int4 decode-set LM head (the main f32 head stays in the file)
  std::string visual_tokens;  // JSON or ""
  int chunk = 4, max_context = 128;
};

static Spec build(const ModelOpts& mo) {
  Builder b;
  const int Dv = 32, P = 4, Lv = 2, Iv = 64, Dt = 64, Lt = 2, H = 2, Hkv = 1, hd = 32, It = 128, V = 264;
  std::string quant, dquant;
  b.linear("vision.patch_embed", Dv, 3 * 8 * 8, true);
  b.f32("vision.class_embedding", {Dv}, 0.5f);
  b.f32("vision.position_embedding", {P + 1, Dv}, 0.5f);
  for (int i = 0; i < Lv; ++i) {
    std::string p = "vision.layers." + std::to_string(i) + ".";
    b.f32(p + "layer_norm1.weight", {Dv}, 0.1f, 1.f);
    b.f32(p + "layer_norm1.bias", {Dv}, 0.1f);
    b.f32(p + "layer_norm2.weight", {Dv}, 0.1f, 1.f);
    b.f32(p + "layer_norm2.bias", {Dv}, 0.1f);
    for (const char* n : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"}) b.linear(p + n, Dv, Dv, true);
    b.linear(p + "mlp.fc1", Iv, Dv, true);
    b.linear(p + "mlp.fc2", Dv, Iv, true);
  }
  b.linear("projector.linear_1", Dt, Dv, true);
  b.linear("projector.linear_2", Dt, Dt, true);
  b.f32("text.embed_tokens.weight", {V, Dt}, 1.0f);
  for (int i = 0; i < Lt; ++i) {
    std::string p = "text.layers." + std::to_string(i) + ".";
    b.f32(p + "input_layernorm.weight", {Dt}, 0.1f, 1.f);
    b.f32(p + "post_attention_layernorm.weight", {Dt}, 0.1f, 1.f);
    struct L { const char* n; int N, K; } ls[] = {{"self_attn.q_proj", H * hd, Dt}, {"self_attn.k_proj", Hkv * hd, Dt},
                                                 {"self_attn.v_proj", Hkv * hd, Dt}, {"self_attn.o_proj", Dt, H * hd},
                                                 {"mlp.gate_proj", It, Dt}, {"mlp.up_proj", It, Dt}, {"mlp.down_proj", Dt, It}};
    for (auto& l : ls) {
      std::string name = p + l.n;
      if (mo.w8a8) {
        b.w8a8(name, l.N, l.K);
        b.int4("decode." + name, l.N, l.K);
        quant += std::string(quant.empty() ? "" : ",") + "\"" + name + "\":{\"format\":\"w8a8\",\"bits\":8}";
        dquant += std::string(dquant.empty() ? "" : ",") + "\"" + name + "\":{\"format\":\"int4\",\"bits\":4,\"group_size\":32,\"symmetric\":true}";
      } else {
        b.linear(name, l.N, l.K, false);
      }
    }
  }
  b.f32("text.norm.weight", {Dt}, 0.1f, 1.f);
  b.linear("text.lm_head", V, Dt, false);
  if (mo.w8a8 && mo.decode_head) {
    b.int4("decode.text.lm_head", V, Dt);
    dquant += ",\"text.lm_head\":{\"format\":\"int4\",\"bits\":4,\"group_size\":32,\"symmetric\":true}";
  }
  std::string extras = "{";
  if (!quant.empty()) extras += "\"quantization\":{\"format_version\":1,\"layers\":{" + quant + "}}";
  if (!mo.visual_tokens.empty()) extras += std::string(extras.size() > 1 ? "," : "") + "\"visual_tokens\":" + mo.visual_tokens;
  extras += "}";
  std::string cfg =
      "{\"format\":\"edgemm\",\"format_version\":1,\"architecture\":\"EdgeVLM\",\"vision\":{\"image_size\":16,\"patch_size\":8,"
      "\"num_channels\":3,\"hidden_size\":32,\"num_layers\":2,\"num_heads\":2,\"intermediate_size\":64,\"layer_norm_eps\":1e-05,"
      "\"hidden_act\":\"gelu\",\"patch_bias\":true,\"pre_layernorm\":false,\"image_mean\":[0.5,0.5,0.5],\"image_std\":[0.5,0.5,0.5],"
      "\"image_resize\":\"pad\"},\"text\":{\"vocab_size\":264,\"hidden_size\":64,\"num_layers\":2,\"num_heads\":2,\"num_kv_heads\":1,"
      "\"head_dim\":32,\"intermediate_size\":128,\"rms_norm_eps\":1e-05,\"rope_theta\":10000.0,\"max_position_embeddings\":256,"
      "\"tie_word_embeddings\":false},\"projector\":{\"hidden_act\":\"gelu\",\"bias\":true},\"vision_feature_layer\":-1,"
      "\"vision_feature_select\":\"default\",\"image_token_id\":3,\"bos_token_id\":1,\"eos_token_id\":2,\"pad_token_id\":0,"
      "\"prompt_template\":\"USER: <image>\\n{question} ASSISTANT:\",\"extras\":" + extras + "}";
  b.s.skv["general.architecture"] = "edgemm";
  b.s.skv["edgemm.config"] = cfg;
  b.s.skv["edgemm.tokenizer"] = tokenizer_json();
  b.s.skv["edgemm.preprocess"] = "{\"image_size\":16,\"resize\":\"pad\",\"mean\":[0.5,0.5,0.5],\"std\":[0.5,0.5,0.5]}";
  b.s.skv["edgemm.prompt_template"] = "USER: <image>\n{question} ASSISTANT:";
  b.s.skv["edgemm.decode_quantization"] = dquant.empty() ? "{}" : "{\"format_version\":1,\"layers\":{" + dquant + "}}";
  b.s.ukv["edgemm.format_version"] = 1;
  b.s.ukv["edgemm.chunk_size"] = uint32_t(mo.chunk);
  b.s.ukv["edgemm.max_context"] = uint32_t(mo.max_context);
  return b.s;
}

static std::string g_dir;
static std::string save(const std::string& name, const std::string& bytes) {
  std::string p = g_dir + "/" + name;
  FILE* f = std::fopen(p.c_str(), "wb");
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
  return p;
}

static edgemm_model* load(const std::string& path, int npu = 0, int chunk = 0, int maxc = 0,
                          int attention = EDGEMM_ATTENTION_AUTO) {
  edgemm_load_options o;
  edgemm_load_options_init(&o);
  o.attention = attention;
  o.n_threads = 2;
  o.npu_lane = npu;
  o.chunk_size = chunk;
  o.max_context = maxc;
  edgemm_model* m = nullptr;
  edgemm_status s = edgemm_model_load(path.c_str(), &o, &m);
  if (s != EDGEMM_OK) std::fprintf(stderr, "load %s: %s\n", path.c_str(), edgemm_last_error());
  return m;
}

static std::vector<uint8_t> test_image(int w, int h) {
  std::vector<uint8_t> px(size_t(w) * h * 3);
  for (size_t i = 0; i < px.size(); ++i) px[i] = uint8_t((i * 37 + i / 7) & 0xFF);
  return px;
}

static std::vector<float> logits_of(edgemm_model* m, const std::vector<int32_t>& ids, bool image) {
  edgemm_session* s = nullptr;
  CHECK(edgemm_session_create(m, &s) == EDGEMM_OK);
  if (image) {
    auto px = test_image(20, 12);
    CHECK(edgemm_session_set_image_rgb8(s, px.data(), 20, 12, 60) == EDGEMM_OK);
  }
  std::vector<float> lg(264);
  edgemm_status st = edgemm_session_eval(s, ids.data(), ids.size(), lg.data(), lg.size());
  if (st != EDGEMM_OK) std::fprintf(stderr, "eval: %s\n", edgemm_last_error());
  CHECK(st == EDGEMM_OK);
  edgemm_session_free(s);
  return lg;
}

static double maxdiff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, double(std::fabs(a[i] - b[i])));
  return d;
}

static int32_t count_cb(const char*, int32_t, void* u) {
  ++*static_cast<int*>(u);
  return 0;
}
static int32_t stop_cb(const char*, int32_t, void*) { return 1; }

static void test_end_to_end() {
  for (int w8 = 0; w8 < 2; ++w8) {
    ModelOpts mo;
    mo.w8a8 = w8;
    std::string path = save(w8 ? "w8a8.gguf" : "fp32.gguf", write_gguf(build(mo)));
    edgemm_model* m = load(path);
    CHECK(m);
    if (!m) continue;
    size_t need = 0;
    CHECK(edgemm_model_info_json(m, nullptr, 0, &need) == EDGEMM_ERR_INVALID_ARGUMENT && need > 10);
    std::vector<char> info(need);
    CHECK(edgemm_model_info_json(m, info.data(), info.size(), &need) == EDGEMM_OK);
    CHECK(std::string(info.data()).find(w8 ? "\"prefill_weights\":\"w8a8\"" : "\"prefill_weights\":\"f32\"") != std::string::npos);
    if (w8) CHECK(std::string(info.data()).find("\"decode_weights\":\"int4-g32\"") != std::string::npos);
    // tokenizer: the template with the image token, merges applied
    int32_t ids[64];
    size_t n = 0;
    CHECK(edgemm_encode_prompt(m, "the thing", 1, ids, 64, &n) == EDGEMM_OK);
    CHECK(n > 3 && ids[0] == 1);
    bool has_img = false, has_merge = false;
    for (size_t i = 0; i < n; ++i) {
      has_img = has_img || ids[i] == 3;
      has_merge = has_merge || ids[i] == 261;
    }
    CHECK(has_img && has_merge);
    const char* utf = "caf\xc3\xa9 \xf0\x9f\x98\x80 it's 42";
    CHECK(edgemm_tokenize(m, utf, ids, 64, &n) == EDGEMM_OK);
    char buf[128];
    CHECK(edgemm_detokenize(m, ids, n, buf, sizeof buf, &need) == EDGEMM_OK && std::string(buf) == utf);
    CHECK(edgemm_tokenize(m, utf, ids, 2, &n) == EDGEMM_ERR_INVALID_ARGUMENT && n > 2);
    // generation with an image, stats, determinism
    edgemm_session* s = nullptr;
    CHECK(edgemm_session_create(m, &s) == EDGEMM_OK);
    auto px = test_image(20, 12);
    CHECK(edgemm_session_set_image_rgb8(s, px.data(), 20, 12, 60) == EDGEMM_OK);
    edgemm_generate_options go;
    edgemm_generate_options_init(&go);
    go.max_new_tokens = 6;
    edgemm_stats st;
    std::memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    int count = 0;
    edgemm_status g = edgemm_generate(s, "what is this?", &go, count_cb, &count, &st);
    CHECK(g == EDGEMM_OK);
    CHECK(st.visual_tokens == 4 && st.prefill_tokens > 4 && st.ttft_ms > 0);
    CHECK(count >= 1 && count <= 6);
    CHECK(st.decode_tokens == count - 1 || st.decode_tokens == count);
    int count2 = 0;
    CHECK(edgemm_generate(s, "what is this?", &go, count_cb, &count2, &st) == EDGEMM_OK && count2 == count);
    CHECK(st.image_encode_ms == 0.0);  // cached encoding reused
    CHECK(edgemm_generate(s, "what is this?", &go, stop_cb, nullptr, &st) == EDGEMM_ERR_CANCELLED);
    go.temperature = 0.8f;
    go.top_k = 20;
    go.top_p = 0.9f;
    go.seed = 7;
    CHECK(edgemm_generate(s, "what is this?", &go, nullptr, nullptr, nullptr) == EDGEMM_OK);
    // the prompt may not contain <image>; empty prompt
    go.temperature = 0;
    CHECK(edgemm_generate(s, "a <image> b", &go, nullptr, nullptr, nullptr) == EDGEMM_ERR_INVALID_ARGUMENT);
    CHECK(edgemm_generate(s, "   ", &go, nullptr, nullptr, nullptr) == EDGEMM_ERR_INVALID_ARGUMENT);
    CHECK(std::strlen(edgemm_last_error()) > 0);
    // debug records
    CHECK(edgemm_session_set_debug(s, 1) == EDGEMM_OK);
    CHECK(edgemm_session_set_image_rgb8(s, px.data(), 20, 12, 60) == EDGEMM_OK);  // new image: re-encoded, recorded
    CHECK(edgemm_encode_prompt(m, "hi", 1, ids, 64, &n) == EDGEMM_OK);
    CHECK(edgemm_session_reset(s) == EDGEMM_OK);
    std::vector<float> lg(264);
    CHECK(edgemm_session_eval(s, ids, n, lg.data(), lg.size()) == EDGEMM_OK);
    int64_t shape[4];
    int32_t nd = 0;
    CHECK(edgemm_session_get_tensor(s, "logits", nullptr, 0, &need, shape, &nd) == EDGEMM_OK);
    CHECK(nd == 2 && shape[0] == int64_t(n) - 1 + 4 && shape[1] == 264);
    std::vector<float> all(need);
    CHECK(edgemm_session_get_tensor(s, "logits", all.data(), all.size(), &need, shape, &nd) == EDGEMM_OK);
    CHECK(maxdiff(std::vector<float>(all.end() - 264, all.end()), lg) == 0.0);
    CHECK(edgemm_session_get_tensor(s, "text.layer.1", nullptr, 0, &need, shape, &nd) == EDGEMM_OK && shape[1] == 64);
    CHECK(edgemm_session_get_tensor(s, "vision.layer.1", nullptr, 0, &need, shape, &nd) == EDGEMM_OK && shape[0] == 5);
    CHECK(edgemm_session_get_tensor(s, "nope", nullptr, 0, &need, shape, &nd) == EDGEMM_ERR_INVALID_ARGUMENT);
    // once the context holds the image, an image-token id is an ordinary token (a generated one);
    // out-of-vocabulary ids are refused
    int32_t img = 3, bad = 999;
    int32_t np = 0;
    CHECK(edgemm_session_n_past(s, &np) == EDGEMM_OK && np == int32_t(n) - 1 + 4);
    CHECK(edgemm_session_eval(s, &bad, 1, nullptr, 0) == EDGEMM_ERR_INVALID_ARGUMENT);
    CHECK(edgemm_session_eval(s, &img, 1, nullptr, 0) == EDGEMM_OK);
    CHECK(edgemm_session_n_past(s, &np) == EDGEMM_OK && np == int32_t(n) - 1 + 4 + 1);
    int32_t two_img[2] = {3, 3};
    CHECK(edgemm_session_reset(s) == EDGEMM_OK);
    CHECK(edgemm_session_eval(s, two_img, 2, nullptr, 0) == EDGEMM_ERR_INVALID_ARGUMENT);
    // pixels input must match image_size
    std::vector<float> pix(3 * 16 * 16, 0.1f);
    CHECK(edgemm_session_set_image_pixels(s, pix.data(), 3, 16, 16) == EDGEMM_OK);
    CHECK(edgemm_session_set_image_pixels(s, pix.data(), 3, 8, 8) == EDGEMM_ERR_INVALID_ARGUMENT);
    CHECK(edgemm_session_clear_image(s) == EDGEMM_OK);
    CHECK(edgemm_generate(s, "text only", &go, nullptr, nullptr, &st) == EDGEMM_OK && st.visual_tokens == 0);
    edgemm_session_free(s);

    // chunking does not change the result; the two-lane scheduler equals the sequential path
    std::vector<int32_t> pr(ids, ids + n);
    for (int k = 0; k < 20; ++k) pr.push_back(4 + (k * 13) % 250);
    // (with fp32 attention: bf16 attention runs only for chunks of >= 16 rows, so it is chunk-dependent)
    edgemm_model* m0 = load(path, 0, 4, 0, EDGEMM_ATTENTION_FP32);
    auto a = logits_of(m0, pr, true);
    edgemm_model* m1 = load(path, 0, 1, 0, EDGEMM_ATTENTION_FP32);
    edgemm_model* m2 = load(path, 1, 3, 0, EDGEMM_ATTENTION_FP32);
    edgemm_model* m3 = load(path, 1, 64, 0, EDGEMM_ATTENTION_FP32);
    edgemm_model* m4 = load(path, 0, 64);  // auto: bf16 attention for a quantized model on AVX512-BF16 CPUs
    CHECK(m0 && m1 && m2 && m3 && m4);
    if (m0 && m1 && m2 && m3 && m4) {
      double d1 = maxdiff(a, logits_of(m1, pr, true)), d2 = maxdiff(a, logits_of(m2, pr, true)),
             d3 = maxdiff(a, logits_of(m3, pr, true)), d4 = maxdiff(a, logits_of(m4, pr, true));
      size_t need = 0;
      edgemm_model_info_json(m4, nullptr, 0, &need);
      std::string info(need, '\0');
      CHECK(edgemm_model_info_json(m4, &info[0], info.size(), &need) == EDGEMM_OK);
      const bool bf16 = info.find("\"text_prefill\":\"bf16\"") != std::string::npos;
      std::printf("  %s: chunk 1 vs 4: %.3g, two-lane chunk 3: %.3g, two-lane chunk 64: %.3g, auto attention (%s) chunk 64: %.3g\n",
                  w8 ? "w8a8" : "fp32", d1, d2, d3, bf16 ? "bf16" : "fp32", d4);
      CHECK(d1 < 1e-4 && d2 < 1e-4 && d3 < 1e-4);
      if (!w8) CHECK(!bf16);  // auto keeps fp32 attention next to fp32 linears
      CHECK(d4 < (bf16 ? 0.05 : 1e-4));
    }
    edgemm_model_free(m0);
    edgemm_model_free(m1);
    edgemm_model_free(m2);
    edgemm_model_free(m3);
    edgemm_model_free(m4);
    // context limit
    edgemm_model* mc = load(path, 0, 0, 8);
    CHECK(mc);
    if (mc) {
      edgemm_session* sc = nullptr;
      CHECK(edgemm_session_create(mc, &sc) == EDGEMM_OK);
      CHECK(edgemm_session_set_image_rgb8(sc, px.data(), 20, 12, 60) == EDGEMM_OK);
      CHECK(edgemm_generate(sc, "what is this?", &go, nullptr, nullptr, nullptr) == EDGEMM_ERR_CONTEXT_FULL);
      CHECK(std::string(edgemm_last_error()).find("context") != std::string::npos);
      CHECK(edgemm_session_clear_image(sc) == EDGEMM_OK);
      go.max_new_tokens = 100;
      edgemm_status r = edgemm_generate(sc, "hi", &go, nullptr, nullptr, nullptr);  // 5-token prompt, room for 3
      CHECK(r == EDGEMM_ERR_CONTEXT_FULL || r == EDGEMM_OK);
      edgemm_session_free(sc);
      edgemm_model_free(mc);
    }
    edgemm_model_free(m);
  }
}

static void test_token_compression() {
  const char* settings[] = {"{\"method\":\"fastervlm\",\"keep\":2}", "{\"method\":\"vtccls\",\"keep\":0.5}",
                            "{\"method\":\"divprune\",\"keep\":2}", "{\"method\":\"tome\",\"keep\":3}",
                            "{\"method\":\"pool\",\"keep\":2}", "{\"method\":\"random\",\"keep\":1,\"seed\":3}",
                            "{\"method\":\"clsdiv\",\"keep\":2,\"alpha\":0.5}", "{\"method\":\"clsmerge\",\"keep\":2}"};
  int want[] = {2, 2, 2, 3, 2, 1, 2, 2};
  for (int i = 0; i < 8; ++i) {
    ModelOpts mo;
    mo.visual_tokens = settings[i];
    std::string path = save("tok.gguf", write_gguf(build(mo)));
    edgemm_model* m = load(path);
    CHECK(m);
    if (!m) continue;
    edgemm_session* s = nullptr;
    CHECK(edgemm_session_create(m, &s) == EDGEMM_OK);
    auto px = test_image(16, 16);
    CHECK(edgemm_session_set_image_rgb8(s, px.data(), 16, 16, 48) == EDGEMM_OK);
    CHECK(edgemm_session_set_debug(s, 1) == EDGEMM_OK);
    edgemm_generate_options go;
    edgemm_generate_options_init(&go);
    go.max_new_tokens = 2;
    edgemm_stats st;
    std::memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    CHECK(edgemm_generate(s, "hi", &go, nullptr, nullptr, &st) == EDGEMM_OK);
    CHECK(st.visual_tokens == want[i]);
    float idx[8];
    size_t need = 0;
    CHECK(edgemm_session_get_tensor(s, "image.token_index", idx, 8, &need, nullptr, nullptr) == EDGEMM_OK && need == size_t(want[i]));
    for (size_t j = 1; j < need; ++j) CHECK(idx[j] > idx[j - 1]);  // raster order
    edgemm_session_free(s);
    edgemm_model_free(m);
  }
  ModelOpts bad;
  bad.visual_tokens = "{\"method\":\"pool\",\"keep\":3}";  // 3 = 1x3 does not fit a 2x2 grid
  edgemm_model* m = nullptr;
  CHECK(edgemm_model_load(save("bad.gguf", write_gguf(build(bad))).c_str(), nullptr, &m) == EDGEMM_ERR_FORMAT && !m);
  bad.visual_tokens = "{\"method\":\"magic\",\"keep\":3}";
  CHECK(edgemm_model_load(save("bad.gguf", write_gguf(build(bad))).c_str(), nullptr, &m) == EDGEMM_ERR_UNSUPPORTED);
}

static void expect_fail(const std::string& what, const std::string& bytes, edgemm_status want, const std::string& needle) {
  edgemm_model* m = nullptr;
  edgemm_status s = edgemm_model_load(save("bad.gguf", bytes).c_str(), nullptr, &m);
  std::string msg = edgemm_last_error();
  bool ok = s == want && !m && (needle.empty() || msg.find(needle) != std::string::npos);
  if (!ok) std::fprintf(stderr, "  malformed case '%s': status %s, message '%s'\n", what.c_str(), edgemm_status_name(s), msg.c_str());
  CHECK(ok);
  edgemm_model_free(m);
}

static void test_malformed() {
  ModelOpts mo;
  mo.w8a8 = true;
  const Spec base = build(mo);
  const std::string good = write_gguf(base);
  // truncation anywhere: never a crash, never success
  int n_trunc = 0;
  for (size_t len = 0; len < good.size(); len += (len < 4096 ? 61 : 4093)) {
    edgemm_model* m = nullptr;
    edgemm_status s = edgemm_model_load(save("bad.gguf", good.substr(0, len)).c_str(), nullptr, &m);
    CHECK(s == EDGEMM_ERR_FORMAT && !m);
    ++n_trunc;
  }
  std::printf("  %d truncations rejected\n", n_trunc);
  expect_fail("bad magic", "GGUX" + good.substr(4), EDGEMM_ERR_FORMAT, "magic");
  {
    std::string b = good;
    uint32_t v = 9;
    std::memcpy(&b[4], &v, 4);
    expect_fail("version", b, EDGEMM_ERR_FORMAT, "version");
    uint64_t huge = 1ull << 60;
    b = good;
    std::memcpy(&b[8], &huge, 8);
    expect_fail("tensor count", b, EDGEMM_ERR_FORMAT, "tensor count");
    b = good;
    std::memcpy(&b[16], &huge, 8);
    expect_fail("kv count", b, EDGEMM_ERR_FORMAT, "kv count");
  }
  auto variant = [&](const std::string& what, std::function<void(Spec&)> f, edgemm_status want, const std::string& needle) {
    Spec s = base;
    f(s);
    expect_fail(what, write_gguf(s), want, needle);
  };
  auto find = [](Spec& s, const std::string& n) -> T& {
    for (auto& t : s.tensors)
      if (t.name == n) return t;
    std::fprintf(stderr, "no tensor %s\n", n.c_str());
    std::abort();
  };
  variant("misaligned offset", [](Spec& s) { s.misalign = 4; }, EDGEMM_ERR_FORMAT, "aligned");
  variant("offset past end", [](Spec& s) { s.misalign = 1ull << 32; }, EDGEMM_ERR_FORMAT, "past the end");
  variant("wrong shape", [&](Spec& s) { find(s, "text.norm.weight").shape = {32, 2}; }, EDGEMM_ERR_FORMAT, "text.norm.weight");
  variant("wrong dtype", [&](Spec& s) {
    T& t = find(s, "text.layers.0.mlp.up_proj.qweight");
    t.type = 26;
    t.bytes.resize(t.bytes.size() * 4);
  }, EDGEMM_ERR_FORMAT, "text.layers.0.mlp.up_proj.qweight");
  variant("unsupported dtype", [&](Spec& s) { find(s, "text.norm.weight").type = 12; }, EDGEMM_ERR_FORMAT, "text.norm.weight");
  variant("missing tensor", [&](Spec& s) {
    for (size_t i = 0; i < s.tensors.size(); ++i)
      if (s.tensors[i].name == "vision.class_embedding") s.tensors.erase(s.tensors.begin() + long(i));
  }, EDGEMM_ERR_FORMAT, "vision.class_embedding");
  variant("unexpected tensor", [&](Spec& s) { s.tensors.push_back(find(s, "text.norm.weight")); s.tensors.back().name = "text.extra"; },
          EDGEMM_ERR_FORMAT, "text.extra");
  variant("duplicate tensor", [&](Spec& s) { s.tensors.push_back(find(s, "text.norm.weight")); }, EDGEMM_ERR_FORMAT, "duplicate");
  variant("w8a8 code -128", [&](Spec& s) { find(s, "text.layers.1.self_attn.o_proj.qweight").bytes[5] = 0x80; }, EDGEMM_ERR_FORMAT, "-128");
  variant("bad input_scale", [&](Spec& s) {
    float v = -1.f;
    std::memcpy(find(s, "text.layers.0.mlp.down_proj.input_scale").bytes.data(), &v, 4);
  }, EDGEMM_ERR_FORMAT, "input_scale");
  variant("outlier channel out of range", [&](Spec& s) {
    int32_t v = 100000;
    std::memcpy(find(s, "text.layers.0.mlp.down_proj.outlier_channels").bytes.data(), &v, 4);
  }, EDGEMM_ERR_FORMAT, "outlier_channels");
  variant("nan weight", [&](Spec& s) {
    float v = NAN;
    std::memcpy(find(s, "text.norm.weight").bytes.data(), &v, 4);
  }, EDGEMM_ERR_FORMAT, "text.norm.weight");
  variant("config not JSON", [](Spec& s) { s.skv["edgemm.config"] = "{\"vision\": [1, 2"; }, EDGEMM_ERR_FORMAT, "edgemm.config");
  variant("config missing", [](Spec& s) { s.skv.erase("edgemm.config"); }, EDGEMM_ERR_FORMAT, "edgemm.config");
  variant("config bad field", [](Spec& s) {
    std::string& c = s.skv["edgemm.config"];
    c.replace(c.find("\"num_kv_heads\":1"), 16, "\"num_kv_heads\":3");
  }, EDGEMM_ERR_FORMAT, "num_kv_heads");
  variant("format_version", [](Spec& s) { s.ukv["edgemm.format_version"] = 2; }, EDGEMM_ERR_UNSUPPORTED, "format_version");
  variant("chunk_size 0", [](Spec& s) { s.ukv["edgemm.chunk_size"] = 0; }, EDGEMM_ERR_FORMAT, "chunk_size");
  variant("architecture", [](Spec& s) { s.skv["general.architecture"] = "llama"; }, EDGEMM_ERR_FORMAT, "architecture");
  variant("tokenizer", [](Spec& s) { s.skv["edgemm.tokenizer"] = "{\"model\":{\"type\":\"Unigram\"}}"; }, EDGEMM_ERR_FORMAT, "tokenizer");
  variant("template", [](Spec& s) { s.skv["edgemm.prompt_template"] = "no image here {question}"; }, EDGEMM_ERR_FORMAT, "prompt_template");
  variant("decode set partial", [](Spec& s) {
    std::string& d = s.skv["edgemm.decode_quantization"];
    d.replace(d.find("\"text.layers.0.self_attn.k_proj\""), 32, "\"text.layers.0.self_attn.zz_proj\"");
  }, EDGEMM_ERR_FORMAT, "zz_proj");
  // missing files / directories / bad arguments
  edgemm_model* m = nullptr;
  CHECK(edgemm_model_load("/nonexistent/model.gguf", nullptr, &m) == EDGEMM_ERR_IO && !m);
  CHECK(edgemm_model_load(g_dir.c_str(), nullptr, &m) == EDGEMM_ERR_IO);  // directory without manifest.json
  CHECK(edgemm_model_load(nullptr, nullptr, &m) == EDGEMM_ERR_INVALID_ARGUMENT);
  CHECK(edgemm_model_load("x", nullptr, nullptr) == EDGEMM_ERR_INVALID_ARGUMENT);
  CHECK(edgemm_session_create(nullptr, nullptr) == EDGEMM_ERR_INVALID_ARGUMENT);
  CHECK(edgemm_generate(nullptr, "x", nullptr, nullptr, nullptr, nullptr) == EDGEMM_ERR_INVALID_ARGUMENT);
  edgemm_model_free(nullptr);
  edgemm_session_free(nullptr);
  // bundle directory with manifest.json
  std::string bdir = g_dir + "/bundle";
  std::string cmd = "mkdir -p " + bdir + "/native";
  CHECK(std::system(cmd.c_str()) == 0);
  FILE* f = std::fopen((bdir + "/native/model.gguf").c_str(), "wb");
  std::fwrite(good.data(), 1, good.size(), f);
  std::fclose(f);
  f = std::fopen((bdir + "/manifest.json").c_str(), "wb");
  std::fputs("{\"artifacts\": [{\"file\": \"native/model.gguf\", \"format\": \"edgemm-native\"}]}", f);
  std::fclose(f);
  CHECK(edgemm_model_load(bdir.c_str(), nullptr, &m) == EDGEMM_OK && m);
  edgemm_model_free(m);
  m = nullptr;
  f = std::fopen((bdir + "/manifest.json").c_str(), "wb");
  std::fputs("{\"artifacts\": [{\"file\": \"../../etc/passwd\", \"format\": \"edgemm-native\"}]}", f);
  std::fclose(f);
  CHECK(edgemm_model_load(bdir.c_str(), nullptr, &m) == EDGEMM_ERR_FORMAT && !m);
}

// ---------------------------------------------------------------------------------------- memory
static T& tensor(Spec& s, const std::string& n) {
  for (auto& t : s.tensors)
    if (t.name == n) return t;
  std::fprintf(stderr, "no tensor %s\n", n.c_str());
  std::abort();
}
static std::vector<float> text_logits(edgemm_model* m) {
  int32_t ids[64];
  size_t n = 0;
  CHECK(edgemm_encode_prompt(m, "the thing is here", 1, ids, 64, &n) == EDGEMM_OK);
  std::vector<int32_t> pr(ids, ids + n);
  for (int k = 0; k < 12; ++k) pr.push_back(4 + (k * 29) % 250);
  return logits_of(m, pr, true);
}
static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}
static std::vector<float> logits_of_file(const std::string& name, const std::string& bytes) {
  edgemm_model* m = load(save(name, bytes));
  CHECK(m);
  if (!m) return {};
  auto lg = text_logits(m);
  edgemm_model_free(m);
  return lg;
}

static long long mapped_bytes(const std::string& bytes) {  // the model's info "mapped_weight_bytes"
  edgemm_model* m = load(save("mem_info.gguf", bytes));
  CHECK(m);
  if (!m) return -1;
  size_t need = 0;
  std::vector<char> info(1 << 16);
  CHECK(edgemm_model_info_json(m, info.data(), info.size(), &need) == EDGEMM_OK);
  edgemm_model_free(m);
  std::string js(info.data());
  size_t at = js.find("\"mapped_weight_bytes\":");
  CHECK(at != std::string::npos);
  return at == std::string::npos ? -1 : std::atoll(js.c_str() + at + 22);
}

static void test_memory() {
  // 1. chunked f32 packing equals one f32_pack of the whole matrix (layout [Np/16][K][16] + any slack)
  for (int64_t N : {16, 83, 160}) {
    const int64_t K = 37;
    std::vector<float> W(size_t(N * K));
    for (size_t i = 0; i < W.size(); ++i) W[i] = float(int(i * 7919 % 1001) - 500) / 37.f;
    edgemm::kernels::F32Weights whole, chunked;
    CHECK(edgemm::kernels::f32_pack(W.data(), K, N, K, &whole) == edgemm::kernels::Status::kOk);
    for (int64_t chunk : {16, 32, 48, 4096}) {
      int64_t covered = 0;
      edgemm::pack_f32_rows(
          [&](int64_t n0, int64_t n1, std::vector<float>* tmp) -> const float* {
            if (n0 % 32) return W.data() + n0 * K;  // in place, or through the scratch vector
            tmp->assign(W.begin() + n0 * K, W.begin() + n1 * K);
            return tmp->data();
          },
          [&](int64_t n0, int64_t n1) { CHECK(n0 == covered); covered = n1; }, N, K, chunk, &chunked, nullptr, "test");
      CHECK(covered == N);
      CHECK(chunked.N == whole.N && chunked.K == whole.K && chunked.Np == whole.Np);
      CHECK(chunked.data.size() == whole.data.size() &&
            std::memcmp(chunked.data.data(), whole.data.data(), whole.data.size() * 4) == 0);
    }
  }
  ModelOpts mo;
  const Spec base = build(mo);
  const std::string good = write_gguf(base);
  const auto ref = logits_of_file("mem_ref.gguf", good);
  // the embedding table, norms, position embedding and biases are served from the mapping
  CHECK(mapped_bytes(good) > 264 * 64 * 4);
  // 2. chunked packing + validation in the loader (chunks crossing the fused q/k/v segments): same bits
  edgemm::g_pack_chunk_bytes = 48 * 64 * 4;
  CHECK(same_bits(ref, logits_of_file("mem_chunk.gguf", good)));
  {
    Spec s = base;  // a NaN deep in a chunked weight is still found, naming the tensor
    float v = NAN;
    std::memcpy(tensor(s, "text.lm_head.weight").bytes.data() + 4 * 64 * 200, &v, 4);
    expect_fail("nan in a chunked weight", write_gguf(s), EDGEMM_ERR_FORMAT, "text.lm_head.weight");
    s = base;
    std::memcpy(tensor(s, "text.embed_tokens.weight").bytes.data() + 4 * 64 * 250, &v, 4);
    expect_fail("nan in the embedding", write_gguf(s), EDGEMM_ERR_FORMAT, "text.embed_tokens.weight");
  }
  edgemm::g_pack_chunk_bytes = int64_t(16) << 20;
  {
    Spec s = base;  // ViT blocks past the feature layer are not packed but still validated
    std::string& c = s.skv["edgemm.config"];
    c.replace(c.find("\"vision_feature_layer\":-1"), 25, "\"vision_feature_layer\":-2");
    CHECK(!logits_of_file("mem_fl2.gguf", write_gguf(s)).empty());
    float v = NAN;
    std::memcpy(tensor(s, "vision.layers.1.mlp.fc1.weight").bytes.data() + 4 * 100, &v, 4);
    expect_fail("nan in an unpacked ViT block", write_gguf(s), EDGEMM_ERR_FORMAT, "vision.layers.1.mlp.fc1.weight");
  }
  // 3. F16 embedding rows converted on lookup + the tied head packed from them == F32 embedding and an
  // explicit F32 head holding the same values
  {
    Spec a = base, b = base;
    T& ea = tensor(a, "text.embed_tokens.weight");
    T& eb = tensor(b, "text.embed_tokens.weight");
    eb.type = 1;
    eb.bytes.assign(ea.bytes.size() / 2, 0);
    for (size_t i = 0; i < ea.bytes.size() / 4; ++i) {
      float f;
      std::memcpy(&f, &ea.bytes[4 * i], 4);
      uint16_t h = f16(f);
      std::memcpy(&eb.bytes[2 * i], &h, 2);
      f = edgemm::kernels::fp16_to_fp32(h);
      std::memcpy(&ea.bytes[4 * i], &f, 4);
    }
    tensor(a, "text.lm_head.weight").bytes = ea.bytes;
    for (size_t i = 0; i < b.tensors.size(); ++i)
      if (b.tensors[i].name == "text.lm_head.weight") b.tensors.erase(b.tensors.begin() + long(i));
    std::string& c = b.skv["edgemm.config"];
    c.replace(c.find("\"tie_word_embeddings\":false"), 27, "\"tie_word_embeddings\":true");
    auto la = logits_of_file("mem_f32.gguf", write_gguf(a));
    CHECK(!la.empty() && same_bits(la, logits_of_file("mem_f16.gguf", write_gguf(b))));
    edgemm::g_pack_chunk_bytes = 48 * 64 * 4;  // the tied head packed in chunks from F16 rows
    CHECK(same_bits(la, logits_of_file("mem_f16.gguf", write_gguf(b))));
    edgemm::g_pack_chunk_bytes = int64_t(16) << 20;
  }
  // 4. data only 2-byte aligned (general.alignment = 2): F32 tensors are copied, not viewed; same bits
  for (const bool w8 : {false, true}) {
    ModelOpts o;
    o.w8a8 = w8;
    Spec s = build(o);
    s.align = 2;
    s.ukv["general.alignment"] = 2;
    std::string bytes;
    bool odd = false;
    for (int pad = 0; pad < 4 && !odd; ++pad) {  // pad the header until the data section starts at 2 mod 4
      s.skv["general.name"] = std::string(size_t(pad + 1), 'x');
      bytes = write_gguf(s);
      edgemm::gguf::File f;
      std::string err;
      CHECK(f.open_memory(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), &err) == 0);
      const edgemm::gguf::TensorInfo* t = f.find_tensor("text.norm.weight");
      odd = t && (t->data - reinterpret_cast<const uint8_t*>(bytes.data())) % 4 == 2;
    }
    CHECK(odd);
    CHECK(mapped_bytes(bytes) == 264 * 64 * 4);  // only the embedding rows (read with memcpy) stay in place
    Spec s32 = build(o);
    CHECK(same_bits(logits_of_file("mem_a32.gguf", write_gguf(s32)), logits_of_file("mem_a2.gguf", bytes)));
  }
  // 5. the model file replaced (rename over it, as the exporter does) while the model is loaded: the
  // model keeps reading its own mapping
  {
    std::string path = save("mem_live.gguf", good);
    edgemm_model* m = load(path);
    CHECK(m);
    if (m) {
      ModelOpts o;
      o.w8a8 = true;
      std::string other = save("mem_other.gguf", write_gguf(build(o)));
      CHECK(std::rename(other.c_str(), path.c_str()) == 0);
      CHECK(same_bits(ref, text_logits(m)));
      edgemm_model_free(m);
    }
  }
}

// The LM head of a model with a decode-set head: the decode set's, on the prefill's last row too; a main
// f32 head in the file (older exporters) is accepted and ignored, the same logits without it.
static void test_decode_head() {
  ModelOpts mo;
  mo.w8a8 = true;
  const auto plain = logits_of_file("head_f32.gguf", write_gguf(build(mo)));
  mo.decode_head = true;
  Spec both = build(mo);
  const auto with_main = logits_of_file("head_both.gguf", write_gguf(both));
  for (size_t i = 0; i < both.tensors.size(); ++i)
    if (both.tensors[i].name == "text.lm_head.weight") both.tensors.erase(both.tensors.begin() + long(i));
  const auto no_main = logits_of_file("head_dec.gguf", write_gguf(both));
  CHECK(!with_main.empty() && same_bits(with_main, no_main));
  CHECK(!same_bits(plain, with_main));  // the decode head ran, not the f32 one
  edgemm_model* m = load(save("head_dec.gguf", write_gguf(both)));
  CHECK(m);
  if (!m) return;
  std::vector<char> info(1 << 16);
  size_t need = 0;
  CHECK(edgemm_model_info_json(m, info.data(), info.size(), &need) == EDGEMM_OK);
  const std::string js(info.data());
  CHECK(js.find("\"lm_head\":\"int4") != std::string::npos);
  const size_t at = js.find("\"decode_weight_bytes\":");
  CHECK(at != std::string::npos && std::atoll(js.c_str() + at + 22) > 0);
  edgemm_model_free(m);
}

int main(int argc, char** argv) {
  char tmpl[] = "/tmp/edgemm_engine_test_XXXXXX";
  char* d = mkdtemp(tmpl);
  if (!d) return 1;
  g_dir = d;
  std::string which = argc > 1 ? argv[1] : "all";
  if (which == "write-seed" && argc > 2) {  // a valid W8A8 + int4 model file, the fuzz driver's seed
    ModelOpts mo;
    mo.w8a8 = true;
    std::string b = write_gguf(build(mo));
    FILE* f = std::fopen(argv[2], "wb");
    if (!f) return 1;
    std::fwrite(b.data(), 1, b.size(), f);
    std::fclose(f);
    return 0;
  }
  if (which == "all" || which == "e2e") test_end_to_end();
  if (which == "all" || which == "tokens") test_token_compression();
  if (which == "all" || which == "malformed") test_malformed();
  if (which == "all" || which == "e2e" || which == "memory") test_memory();  // ctest: part of engine.e2e
  if (which == "all" || which == "e2e" || which == "head") test_decode_head();
  std::string rm = "rm -rf " + g_dir;
  if (std::system(rm.c_str()) != 0) std::fprintf(stderr, "cleanup failed\n");
  if (g_fail) {
    std::fprintf(stderr, "%d check(s) failed\n", g_fail);
    return 1;
  }
  std::printf("engine tests (%s): ok\n", which.c_str());
  return 0;
}
