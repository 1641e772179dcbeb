// edgemm native engine internals: model file -> packed weights, EdgeVLM forward (ViT, projector, token
// compression, Llama decoder with KV cache), chunked prefill (optionally two-lane), decode, sampling.
// Internal errors are thrown as edgemm::Error and turned into status codes at the C ABI.
#pragma once

#include <chrono>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../include/edgemm.h"
#include "gguf.h"
#include "json.h"
#include "kernels.h"
#include "npu_backend.h"
#include "tokenizer.h"

namespace edgemm {

struct Error : std::runtime_error {
  edgemm_status code;
  Error(edgemm_status c, const std::string& m) : std::runtime_error(m), code(c) {}
};
[[noreturn]] inline void fail(edgemm_status c, const std::string& m) { throw Error(c, m); }
void check_kernel(kernels::Status s, const char* what);

// Below this much work (multiply-adds or element updates) a kernel runs on the calling thread: waking the
// pool's workers costs tens of microseconds (much more on an oversubscribed machine, where the caller then
// waits for a descheduled worker), more than the work itself.
constexpr double kParallelWork = 1 << 22;
inline ThreadPool* pool_for(ThreadPool* pool, double work, double threshold = kParallelWork) {
  return work >= threshold ? pool : nullptr;
}
// Attention (query rows x keys x heads x head_dim) splits over the pool from a lower threshold: in decode
// it follows a GEMV, so the workers are still spinning, and it streams the whole KV cache (at 1.8B shapes
// and 96 positions, 1.6 MB per layer) -- on one thread that was ~7% of a decode step.
constexpr double kParallelAttn = 1 << 16;

inline double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ------------------------------------------------------------------------------------------- config
struct VisionCfg {
  int image_size = 0, patch_size = 0, num_channels = 3, hidden = 0, layers = 0, heads = 0, inter = 0;
  float eps = 1e-5f;
  std::string act = "gelu";
  bool patch_bias = true, pre_layernorm = false;
  float mean[3] = {0.5f, 0.5f, 0.5f}, stdv[3] = {0.5f, 0.5f, 0.5f};
  std::string resize = "pad";
  int grid() const { return image_size / patch_size; }
  int patches() const { return grid() * grid(); }
  int head_dim() const { return hidden / heads; }
};
struct TextCfg {
  int vocab = 0, hidden = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, inter = 0, max_pos = 0;
  float eps = 1e-5f, rope_theta = 10000.f;
  bool tie = false;
};
struct TokenSetting {
  std::string method;  // "" = off
  bool keep_is_ratio = false;
  double keep_ratio = 1.0;
  int64_t keep_count = 0;
  // options
  bool has_layer = false;
  int64_t layer = 0;
  int64_t start = 0;
  bool has_end = false;
  int64_t end = 0;
  uint64_t seed = 0;
  double alpha = 1.0;
  bool early = false;  // fastervlm: select after block `layer` inside the ViT, later blocks on the kept tokens
};
struct LayerQuant {
  std::string format;  // "int4" | "int8" | "w8a8"
  int64_t group_size = 0;
  bool symmetric = true;
};
struct Config {
  VisionCfg v;
  TextCfg t;
  std::string proj_act = "gelu";
  bool proj_bias = true;
  int feature_layer = -2;  // as in the config
  int feature_blocks = 0;  // blocks that run
  bool select_full = false;
  int image_token = 3, bos = 1, eos = 2, pad = 0;
  std::string prompt_template;
  TokenSetting tokens;
  std::map<std::string, LayerQuant> quant, decode_quant;
  std::map<std::string, std::pair<int, int>> sparsity;  // name -> (n, m)
  json::Value raw;                                      // the config JSON
  int num_visual_tokens() const;                        // after compression
};
void parse_config(const std::string& text, Config* cfg);            // throws FORMAT
void parse_token_setting(const json::Value& v, const Config& cfg, TokenSetting* s);

// ------------------------------------------------------------------------------------------ weights
// An fp32 vector the kernels read in place: either a view into the model file's mapping (an F32 tensor
// whose data is 4-byte aligned) or owned storage (F16 converted, misaligned data, concatenations).
class FloatSpan {
 public:
  FloatSpan() = default;
  static FloatSpan view(const float* p, size_t n) {
    FloatSpan s;
    s.p_ = p;
    s.n_ = n;
    return s;
  }
  static FloatSpan owned(std::vector<float> v) {
    FloatSpan s;
    s.own_ = std::move(v);
    s.p_ = s.own_.data();
    s.n_ = s.own_.size();
    return s;
  }
  FloatSpan(const FloatSpan& o) : p_(o.p_), n_(o.n_), own_(o.own_) {
    if (o.is_owned()) p_ = own_.data();
  }
  FloatSpan(FloatSpan&& o) noexcept : p_(o.p_), n_(o.n_), own_(std::move(o.own_)) {
    o.p_ = nullptr;
    o.n_ = 0;
  }
  FloatSpan& operator=(FloatSpan o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    own_.swap(o.own_);  // a vector swap keeps the buffers, so p_ stays valid
    return *this;
  }
  const float* data() const { return p_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  const float& operator[](size_t i) const { return p_[i]; }
  bool is_owned() const { return !own_.empty(); }

 private:
  const float* p_ = nullptr;
  size_t n_ = 0;
  std::vector<float> own_;
};

// The token embedding table, read in place from the mapping (F32 or F16 rows; only the rows of the
// prompts are ever touched). row() converts F16 per element with kernels::fp16_to_fp32.
struct EmbedTable {
  const uint8_t* data = nullptr;  // [rows, cols] in the file's dtype (validated: in bounds, finite)
  uint32_t type = 0;              // gguf::TensorType: 0 F32, 1 F16
  int64_t rows = 0, cols = 0;
  void row(int64_t i, float* out) const;  // i in [0, rows) (the caller checks)
};

// Source bytes per validation / packing chunk of a large f32 tensor (16 MiB; tests lower it to run the
// chunked paths on tiny models).
extern int64_t g_pack_chunk_bytes;
// Packs W [N, K] (fp32 rows supplied by `rows`) into `out` (the kernels' F32 layout, [Np/16][K][16]) in
// chunks of chunk_rows (a multiple of 16): rows(n0, n1, tmp) returns rows [n0, n1) (row stride K), either
// in place or in *tmp; done(n0, n1) is called once they are packed (the loader releases their source
// pages there). The result is byte-identical to one f32_pack of the whole matrix (tests check); at most
// one chunk of source and of packed scratch is alive besides `out`.
using RowSource = std::function<const float*(int64_t n0, int64_t n1, std::vector<float>* tmp)>;
void pack_f32_rows(const RowSource& rows, const std::function<void(int64_t, int64_t)>& done, int64_t N, int64_t K,
                   int64_t chunk_rows, kernels::F32Weights* out, ThreadPool* pool, const char* what);

struct Linear {
  enum Kind { kNone, kF32, kW8A8, kWoq } kind = kNone;
  int64_t N = 0, K = 0;
  kernels::F32Weights f32;
  kernels::W8A8Weights w8;
  float input_scale = 0.f;
  kernels::WoqWeights woq;
  FloatSpan bias;           // empty or N
  std::string desc;         // "f32", "w8a8", "int4-g32", "int8-g256-2:4", ...
  int64_t bytes = 0;        // packed bytes
  std::vector<Linear> parts;  // non-empty: a group that could not be fused; part i writes columns [off_i, off_i + N_i)
  bool valid() const { return kind != kNone; }
};

struct Scratch {
  kernels::W8A8Act act;
  kernels::WoqAct wact;
};
// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W^T + b
void run_linear(const Linear& L, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, Scratch* s,
                ThreadPool* pool);

struct VitBlock {
  FloatSpan ln1_w, ln1_b, ln2_w, ln2_b;
  Linear qkv, out, fc1, fc2;
};
struct TextBlock {
  FloatSpan ln_in, ln_post;
  Linear qkv, o, gate_up, down;        // prefill (main) set
  Linear d_qkv, d_o, d_gate_up, d_down;  // decode set (kind kNone = use the main set)
  const Linear& dec_qkv() const { return d_qkv.valid() ? d_qkv : qkv; }
  const Linear& dec_o() const { return d_o.valid() ? d_o : o; }
  const Linear& dec_gate_up() const { return d_gate_up.valid() ? d_gate_up : gate_up; }
  const Linear& dec_down() const { return d_down.valid() ? d_down : down; }
};

struct Model {
  // The model file's mapping: the embedding table, norm weights, position embedding, biases (every
  // FloatSpan view) point into it. First member, so it is unmapped after everything else is gone.
  std::shared_ptr<const gguf::Mapping> mapping;
  int64_t mapped_bytes = 0;  // tensor bytes served in place from the mapping
  Config cfg;
  Tokenizer tok;
  std::string path;
  int chunk_size = 32, max_context = 512, n_threads = 1;
  bool npu_lane = false;
  bool vit_attn_bf16 = false, text_attn_bf16 = false;  // AttentionArgs::allow_bf16 of each part (load option)
  // KV cache in fp16 (half the memory and half the bytes a decode step's attention streams): load option
  // attention auto with quantized text linears, or bf16; fp32 otherwise (the fp32 bundle stays exact).
  bool kv_fp16 = false;
  std::string prefill_desc, decode_desc;
  // vision
  Linear patch_embed;
  FloatSpan cls, pos_embed, pre_ln_w, pre_ln_b;
  std::vector<VitBlock> vit;
  Linear proj1, proj2;
  // text
  EmbedTable embed;  // [V, D], in the mapping
  std::vector<TextBlock> blocks;
  FloatSpan norm_w;
  Linear lm_head;  // the decode set's when there is one (forward_embeds: one row per step)
  kernels::RopeTable rope;
  // threads
  std::unique_ptr<ThreadPool> pool;                // everything when npu_lane == 0
  std::unique_ptr<ThreadPool> npu_pool, cpu_pool;  // the two lanes
  const NpuBackend* npu = nullptr;
  std::string info_json() const;
};
// Loads a model file or a bundle directory. Throws Error.
std::unique_ptr<Model> load_model(const std::string& path, const edgemm_load_options& opts);

// ------------------------------------------------------------------------------------------ session
struct DebugTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};
struct ImageEncoding {
  std::vector<float> embeds;  // [K, Dt]
  std::vector<int32_t> index; // [K]
  int64_t k = 0;
};
struct Session {
  Model* m = nullptr;
  // KV cache [layer][kv_head][max_context][head_dim]
  struct FreeDeleter {
    void operator()(void* p) const { std::free(p); }
  };
  // calloc'ed: zero, and (large allocations) backed by untouched pages until positions fill
  std::unique_ptr<float[], FreeDeleter> kcache, vcache;        // fp32 KV cache, or
  std::unique_ptr<uint16_t[], FreeDeleter> kcache16, vcache16;  // fp16 (Model::kv_fp16)
  int64_t n_past = 0;
  bool image_used = false;  // the current context already holds the visual tokens
  std::vector<float> pixels;  // preprocessed CHW, empty = no image
  bool have_encoding = false;
  ImageEncoding enc;
  double last_encode_ms = 0;
  bool debug = false;
  std::map<std::string, DebugTensor> records;
  Scratch scratch;
  std::vector<float> buf_x, buf_h, buf_qkv, buf_attn, buf_gu, buf_tmp;
  double npu_busy_ms = 0, cpu_busy_ms = 0, prefill_wall_ms = 0;
  int64_t dbg_start = 0, dbg_rows = 0;

  explicit Session(Model* model);
  void reset();
  void record(const std::string& name, const float* data, std::vector<int64_t> shape);
  void encode_image();  // fills enc (ViT, projector, compression)
  // Runs ids and returns the last position's logits. An image-token id is replaced by the visual tokens
  // when splice_image and the context does not hold the image yet; otherwise it is an ordinary token
  // (a generated <image> id is embedded like any token, as the torch reference does).
  void eval(const int32_t* ids, size_t n, std::vector<float>* logits, bool splice_image = true);
  // Runs precomputed embeddings rows [T, D] at n_past (chunked). Fills logits of the last row.
  void forward_embeds(const float* x, int64_t T, std::vector<float>* logits);
};

// ViT forward up to the feature layer; writes the [CLS]-attention head means of the requested blocks.
// early >= 0 (fastervlm early=true): after block `early` only [CLS] + the top `k` patches of that block's
// [CLS] attention go on (their indices in *early_index); *hidden is then [1 + k, Dv].
void vision_forward(Model& m, Session& s, const float* pixels, std::vector<float>* hidden,
                    const std::vector<int>& attn_blocks, std::map<int, std::vector<float>>* cls_attn,
                    int early = -1, int64_t k = 0, std::vector<int32_t>* early_index = nullptr);
// Visual token compression (docs/tokens.md). feats [P, Dv] patch features; returns projected tokens.
void compress_tokens(Model& m, Session& s, const float* feats, int64_t P, const std::map<int, std::vector<float>>& attn,
                     int64_t k, std::vector<float>* embeds, std::vector<int32_t>* index);
std::vector<int> token_blocks(const Config& cfg);  // ViT blocks whose [CLS] attention the method needs
// fastervlm early=true: the block after which the patches are selected inside the ViT, or -1
int early_block(const Config& cfg, int64_t k);
std::vector<int32_t> keep_top_k(const std::vector<float>& score, int64_t k);  // ties: lower index; ascending
void project_tokens(Model& m, Session& s, const float* feats, int64_t n, std::vector<float>* out);

// Two-lane chunked prefill (scheduler.cpp). x [T, D] in/out is the residual stream of the new rows.
void prefill_two_lane(Model& m, Session& s, float* x, int64_t T);
void record_rows(Session& s, const std::string& name, int64_t row0, const float* data, int64_t rows, int64_t cols,
                 int64_t total_rows);
// Sequential prefill/decode of one chunk (all work on m.pool).
void forward_chunk(Model& m, Session& s, float* x, int64_t T, bool decode);
// Layer l's K and V rows of qkv [T][W] (after RoPE) into the cache at positions pos0.., then the cache
// attention of those T rows against positions [0, pos0 + T) into out [T][H*hd].
void cache_attention(Model& m, Session& s, int l, const float* qkv, int64_t W, int64_t T, int64_t pos0, float* out,
                     ThreadPool* pool);

}  // namespace edgemm
