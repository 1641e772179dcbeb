/* edgemm native engine: the public C ABI (C99).
 *
 * Conventions
 *   - Every fallible call returns an edgemm_status; EDGEMM_OK is 0. On failure, edgemm_last_error()
 *     returns a one-line message for the calling thread (valid until that thread's next edgemm call).
 *     No C++ exception ever crosses this boundary; malformed input is a status, never a crash.
 *   - Handles are opaque. A model is immutable after load and may be shared by several sessions on
 *     different threads; one session must be used by one thread at a time.
 *   - Option structs start with struct_size (set by the *_init functions) so fields can be appended
 *     without breaking older callers: the library reads only the first struct_size bytes.
 *   - Buffers returned through (buf, cap, needed): the call writes at most cap bytes/elements and always
 *     stores the full size in *needed (strings: including the terminating NUL). If cap is too small the
 *     call returns EDGEMM_ERR_INVALID_ARGUMENT after setting *needed (call again with a larger buffer).
 *
 * See native/README.md ("C ABI") for the semantics of every call.
 */
#ifndef EDGEMM_H
#define EDGEMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define EDGEMM_API __declspec(dllexport)
#else
#define EDGEMM_API __attribute__((visibility("default")))
#endif

#define EDGEMM_ABI_VERSION 1

typedef enum {
  EDGEMM_OK = 0,
  EDGEMM_ERR_INVALID_ARGUMENT = 1,
  EDGEMM_ERR_IO = 2,
  EDGEMM_ERR_FORMAT = 3,
  EDGEMM_ERR_UNSUPPORTED = 4,
  EDGEMM_ERR_OUT_OF_MEMORY = 5,
  EDGEMM_ERR_CONTEXT_FULL = 6,
  EDGEMM_ERR_CANCELLED = 7,
  EDGEMM_ERR_INTERNAL = 8
} edgemm_status;

typedef struct edgemm_model edgemm_model;
typedef struct edgemm_session edgemm_session;

/* Message of the last failed call on this thread ("" if none). Never NULL. */
EDGEMM_API const char* edgemm_last_error(void);
/* Library version string, e.g. "0.2.0 (avx512_vnni)". */
EDGEMM_API const char* edgemm_version(void);
/* EDGEMM_ABI_VERSION the library was built with. */
EDGEMM_API int edgemm_abi_version(void);
/* Name of a status ("EDGEMM_ERR_FORMAT", ...). Never NULL. */
EDGEMM_API const char* edgemm_status_name(edgemm_status s);

/* ------------------------------------------------------------------------------------------ model */
typedef struct {
  uint32_t struct_size;
  int32_t n_threads;   /* worker threads incl. the caller; 0 = number of online CPUs (max 8) */
  int32_t npu_lane;    /* 1 = run the W8A8 prefill GEMMs on the NPU-lane backend concurrently with the
                          CPU lane (two-lane scheduler); 0 = everything on the CPU lane, in order */
  int32_t chunk_size;  /* prefill chunk length in tokens; 0 = the file's edgemm.chunk_size */
  int32_t max_context; /* KV cache length; 0 = the file's edgemm.max_context */
  int32_t attention;   /* precision of the ViT's and the prefill's attention (decode steps are fp32):
                          EDGEMM_ATTENTION_AUTO (0, default): bf16 in a part (ViT, decoder) whose linear
                          layers are quantized, fp32 in a part with fp32 linears;
                          EDGEMM_ATTENTION_FP32: fp32 everywhere; EDGEMM_ATTENTION_BF16: bf16 everywhere.
                          bf16 means bf16 Q, K, V and probabilities with fp32 scores, softmax and
                          accumulation, on CPUs with AVX512-BF16 only (AMX-BF16 tiles, else vdpbf16ps;
                          elsewhere attention stays fp32). The KV cache follows the same rule in
                          fp16 storage: fp16 under AUTO with quantized text linears and under BF16
                          (on every CPU), fp32 otherwise. */
} edgemm_load_options;
#define EDGEMM_ATTENTION_AUTO 0
#define EDGEMM_ATTENTION_FP32 1
#define EDGEMM_ATTENTION_BF16 2
EDGEMM_API void edgemm_load_options_init(edgemm_load_options* opts);

/* path: a model file (GGUF container, see README "File format"), or a bundle directory containing
 * manifest.json, whose first artifact with format "edgemm-native" is loaded. opts may be NULL (defaults). */
EDGEMM_API edgemm_status edgemm_model_load(const char* path, const edgemm_load_options* opts,
                                           edgemm_model** out);
EDGEMM_API void edgemm_model_free(edgemm_model* model); /* NULL is a no-op */
/* JSON object describing the loaded model: {"abi_version", "version", "isa", "n_threads", "chunk_size",
 * "max_context", "vocab_size", "image_size", "num_visual_tokens", "hidden_size", "num_layers",
 * "prefill_weights", "decode_weights", "visual_tokens", "config": {...the edgemm config...}, ...}. */
EDGEMM_API edgemm_status edgemm_model_info_json(const edgemm_model* model, char* buf, size_t cap,
                                                size_t* needed);

/* Tokenizer (byte-level BPE from the file's tokenizer.json). Special tokens written literally in text
 * (e.g. "<image>") map to their ids, as HF tokenizers' added tokens do; no BOS is added.
 * ids: capacity cap; *n_ids receives the number of ids (see the buffer convention above). */
EDGEMM_API edgemm_status edgemm_tokenize(const edgemm_model* model, const char* text, int32_t* ids,
                                         size_t cap, size_t* n_ids);
/* The ids edgemm_generate feeds for a question: BOS + tokenize(template with the question), where the
 * template's "<image>\n" (or "<image>") is removed when with_image == 0 (edgemm.processor.encode_prompt). */
EDGEMM_API edgemm_status edgemm_encode_prompt(const edgemm_model* model, const char* question,
                                              int32_t with_image, int32_t* ids, size_t cap,
                                              size_t* n_ids);
/* ids -> UTF-8 text, special tokens skipped (no strip). NUL-terminated. */
EDGEMM_API edgemm_status edgemm_detokenize(const edgemm_model* model, const int32_t* ids, size_t n_ids,
                                           char* buf, size_t cap, size_t* needed);

/* ---------------------------------------------------------------------------------------- session */
EDGEMM_API edgemm_status edgemm_session_create(edgemm_model* model, edgemm_session** out);
EDGEMM_API void edgemm_session_free(edgemm_session* session); /* NULL is a no-op */

/* Image input. rgb8: HxW interleaved RGB bytes, row_stride in bytes (>= 3*width); the engine resizes
 * (config vision.image_resize: pad / crop / squash, bicubic like PIL) and normalizes.
 * pixels: already preprocessed float CHW [c][h][w], c == 3 and h == w == vision.image_size.
 * Setting an image clears the KV cache; the image is encoded lazily by the next generate/prefill and the
 * visual tokens are kept until the image changes. */
EDGEMM_API edgemm_status edgemm_session_set_image_rgb8(edgemm_session* session, const uint8_t* rgb,
                                                       int32_t width, int32_t height, int32_t row_stride);
EDGEMM_API edgemm_status edgemm_session_set_image_pixels(edgemm_session* session, const float* chw,
                                                         int32_t c, int32_t h, int32_t w);
EDGEMM_API edgemm_status edgemm_session_clear_image(edgemm_session* session);

/* ------------------------------------------------------------------------------------- generation */
typedef struct {
  uint32_t struct_size;
  int32_t max_new_tokens; /* default 32 */
  float temperature;      /* <= 0: greedy (argmax, lowest id on ties). default 0 */
  int32_t top_k;          /* 0 = off. default 0 */
  float top_p;            /* 1 = off. default 1 */
  uint64_t seed;          /* sampling RNG seed. default 0 */
  int32_t apply_template; /* 1 (default): prompt is a question, laid out with the prompt template (and the
                             image, if one is set) as edgemm_encode_prompt; 0: prompt is raw text,
                             tokenized as is after BOS; if it contains "<image>" an image must be set */
} edgemm_generate_options;
EDGEMM_API void edgemm_generate_options_init(edgemm_generate_options* opts);

/* Called once per generated token (EOS is not reported). piece: the token's UTF-8 text (bytes of an
 * incomplete UTF-8 sequence are held back and delivered with the token that completes it); "" for
 * special tokens. Return nonzero to stop: edgemm_generate then returns EDGEMM_ERR_CANCELLED. */
typedef int32_t (*edgemm_token_callback)(const char* piece, int32_t token_id, void* user);

typedef struct {
  uint32_t struct_size;
  double image_encode_ms; /* ViT + projector + token compression (0 if the cached encoding was reused) */
  double prefill_ms;      /* prompt prefill (chunked), excluding the image encode */
  double decode_ms;       /* all single-token decode steps */
  double ttft_ms;         /* call start -> first generated token available (encode + prefill + 1 step) */
  int32_t visual_tokens;  /* visual tokens in the prompt (after compression) */
  int32_t prefill_tokens; /* prompt length in tokens (visual tokens included) */
  int32_t decode_tokens;  /* single-token decode steps run (decode tok/s = decode_tokens / decode_ms); the
                             first generated token comes from the prefill */
  double npu_lane_busy;   /* fraction of prefill wall time the NPU lane was busy */
  double cpu_lane_busy;   /* fraction of prefill wall time the CPU lane was busy */
} edgemm_stats;

/* Starts a fresh conversation (clears the KV cache), prefills the prompt in chunks, then decodes until
 * EOS, max_new_tokens, or the callback stops it. Prompt + generated tokens beyond max_context ->
 * EDGEMM_ERR_CONTEXT_FULL (tokens already streamed stay valid; stats are filled). cb may be NULL.
 * opts may be NULL (defaults). stats may be NULL; if given, its struct_size must be set. */
EDGEMM_API edgemm_status edgemm_generate(edgemm_session* session, const char* prompt,
                                         const edgemm_generate_options* opts, edgemm_token_callback cb,
                                         void* user, edgemm_stats* stats);

/* --------------------------------------------------------------- low-level stepping (tests, tools) */
/* Clears the KV cache (the image and its cached encoding stay). */
EDGEMM_API edgemm_status edgemm_session_reset(edgemm_session* session);
/* Appends n token ids to the context at positions n_past.. and runs them: n > 1 uses chunked prefill
 * with the prefill weight set, n == 1 the decode weight set. An id equal to config.image_token_id is
 * replaced by the image's visual tokens (an image must be set; at most one such id per call) while the
 * context does not hold the image yet; after that it is an ordinary token (e.g. a generated one).
 * logits (may be NULL): receives the last position's logits [vocab_size] (cap elements). */
EDGEMM_API edgemm_status edgemm_session_eval(edgemm_session* session, const int32_t* ids, size_t n,
                                             float* logits, size_t cap);
/* Tokens currently in the KV cache (visual tokens included). */
EDGEMM_API edgemm_status edgemm_session_n_past(const edgemm_session* session, int32_t* n_past);

/* Debug capture for per-layer tolerance tests. With flags != 0 the following evaluations record named
 * fp32 tensors (replacing earlier records of the same name):
 *   "vision.embed"           [1+P, Dv]  patch embedding + [CLS] + positions (+ pre-LayerNorm)
 *   "vision.layer.<i>"       [1+P, Dv]  output of ViT block i (0-based), blocks up to the feature layer
 *   "vision.features"        [P or 1+P, Dv]  features fed to the projector (after vision_feature_select)
 *   "image.embeds"           [K, Dt]    projected visual tokens after token compression
 *   "image.token_index"      [K]        index of each kept token in the uncompressed sequence (as float)
 *   "text.embeds"            [T, Dt]    input embeddings of the last edgemm_session_eval call
 *   "text.layer.<i>"         [T, Dt]    output of decoder layer i for that call
 *   "text.norm"              [T, Dt]    final RMSNorm output
 *   "logits"                 [T, V]     logits of every position of that call
 * flags == 0 stops recording and frees the records. */
EDGEMM_API edgemm_status edgemm_session_set_debug(edgemm_session* session, int32_t flags);
/* Copies a recorded tensor: data (may be NULL when cap == 0) gets at most cap floats, *needed the element
 * count; shape (may be NULL) receives up to 4 dims, *ndim (may be NULL) their number. cap == 0 is a size
 * query (returns EDGEMM_OK); 0 < cap < size -> EDGEMM_ERR_INVALID_ARGUMENT. Unknown name ->
 * EDGEMM_ERR_INVALID_ARGUMENT. Records of the vision side are made when the image is (re-)encoded. */
EDGEMM_API edgemm_status edgemm_session_get_tensor(const edgemm_session* session, const char* name,
                                                   float* data, size_t cap, size_t* needed,
                                                   int64_t* shape, int32_t* ndim);

#ifdef __cplusplus
}
#endif
#endif /* EDGEMM_H */
