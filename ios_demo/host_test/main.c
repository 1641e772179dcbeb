/* Host twin of the iOS demo's engine calls: the same edgemm_* C ABI calls, in the same order, as
 * ios_demo/EdgemmDemo/Engine.swift, run on a real bundle by tests/test_ios_bridge.py (which also checks that
 * the sequence of edgemm_* calls in this file equals the one in Engine.swift).
 *
 * Mapping (this file's function -> the Swift call site in Engine.swift):
 *   report_version     -> Engine.version()                   edgemm_abi_version, edgemm_version
 *   engine_open        -> Engine.init(bundlePath:threads:npuLane:)
 *                           edgemm_load_options_init, edgemm_model_load, edgemm_model_info_json (size query),
 *                           edgemm_model_info_json (fill), edgemm_model_free (if the info call failed),
 *                           edgemm_session_create, edgemm_model_free (if the session failed)
 *   engine_set_image   -> Engine.setImage(_:)                edgemm_session_set_image_rgb8 (packed RGB, stride 3*w)
 *   engine_clear_image -> Engine.clearImage()                edgemm_session_clear_image
 *   engine_generate    -> Engine.generate(_:settings:sink:)  edgemm_generate_options_init, edgemm_generate
 *                           (callback: the closure literal; nonzero = TokenSink.stop(); CANCELLED is not an error)
 *   engine_close       -> Engine.deinit                      edgemm_session_free, edgemm_model_free
 *   status_error       -> Engine.error(_:)                   edgemm_status_name, edgemm_last_error
 * main() drives them in the app's order (EngineHost.load, then EngineHost.ask per question).
 *
 * The picture: Swift draws a CGImage into packed RGB8 bytes (Engine.rgb8); here a binary PPM (P6, maxval
 * 255) holds the same bytes.
 *
 * Usage: edgemm_ios_host BUNDLE IMAGE.ppm MAX_NEW_TOKENS QUESTION...
 * Output: one JSON object per line. Exit status 0 when every expected call behaved, 1 otherwise.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgemm.h"

typedef struct {
  edgemm_model* model;
  edgemm_session* session;
  char* info;
} engine;

typedef struct { /* the Swift TokenSink */
  char* text;
  size_t len, cap;
  int32_t ids[1024];
  int n;
  int stop_after; /* stop() after this many pieces; < 0: never */
} sink;

typedef struct { /* GenerateSettings */
  int32_t max_new_tokens;
  float temperature;
  int32_t top_k;
  float top_p;
  uint64_t seed;
} settings;

static void status_error(edgemm_status st, const char* what); /* Engine.error(_:), defined last like in Swift */

static void json_str(FILE* f, const char* s, size_t n) {
  size_t i;
  fputc('"', f);
  for (i = 0; i < n; ++i) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
    else if (c < 0x20) fprintf(f, "\\u%04x", c);
    else fputc(c, f); /* UTF-8 passes through */
  }
  fputc('"', f);
}

/* ---- Engine.version() */
static void report_version(void) {
  int abi = edgemm_abi_version();
  const char* v = edgemm_version();
  printf("{\"event\":\"version\",\"abi\":%d,\"version\":", abi);
  json_str(stdout, v, strlen(v));
  printf("}\n");
}

/* ---- Engine.init(bundlePath:threads:npuLane:) */
static edgemm_status engine_open(engine* e, const char* path, int32_t threads, int npu_lane) {
  edgemm_load_options opts;
  edgemm_model* m = NULL;
  edgemm_session* s = NULL;
  edgemm_status st;
  size_t needed = 0;
  char* buf;
  edgemm_load_options_init(&opts);
  opts.n_threads = threads;
  opts.npu_lane = npu_lane ? 1 : 0;
  st = edgemm_model_load(path, &opts, &m);
  if (st != EDGEMM_OK) { status_error(st, "edgemm_model_load"); return st; }
  (void)edgemm_model_info_json(m, NULL, 0, &needed); /* size query */
  buf = (char*)calloc(needed > 0 ? needed : 1, 1);
  st = buf ? edgemm_model_info_json(m, buf, needed > 0 ? needed : 1, &needed) : EDGEMM_ERR_OUT_OF_MEMORY;
  if (st != EDGEMM_OK) {
    if (buf) status_error(st, "edgemm_model_info_json");
    free(buf);
    edgemm_model_free(m);
    return st;
  }
  st = edgemm_session_create(m, &s);
  if (st != EDGEMM_OK) {
    status_error(st, "edgemm_session_create");
    free(buf);
    edgemm_model_free(m);
    return st;
  }
  e->model = m;
  e->session = s;
  e->info = buf;
  return EDGEMM_OK;
}

/* ---- Engine.setImage(_:) */
static edgemm_status engine_set_image(engine* e, const uint8_t* rgb, int32_t w, int32_t h) {
  edgemm_status st = edgemm_session_set_image_rgb8(e->session, rgb, w, h, 3 * w);
  if (st != EDGEMM_OK) status_error(st, "edgemm_session_set_image_rgb8");
  return st;
}

/* ---- Engine.clearImage() */
static edgemm_status engine_clear_image(engine* e) {
  edgemm_status st = edgemm_session_clear_image(e->session);
  if (st != EDGEMM_OK) status_error(st, "edgemm_session_clear_image");
  return st;
}

static int32_t on_token(const char* piece, int32_t token_id, void* user) { /* the Swift closure literal */
  sink* k = (sink*)user;
  size_t n = piece ? strlen(piece) : 0;
  if (k->len + n + 1 > k->cap) {
    size_t cap = (k->len + n + 1) * 2;
    char* t = (char*)realloc(k->text, cap);
    if (!t) return 1;
    k->text = t;
    k->cap = cap;
  }
  memcpy(k->text + k->len, piece ? piece : "", n);
  k->len += n;
  k->text[k->len] = '\0';
  if (k->n < (int)(sizeof k->ids / sizeof k->ids[0])) k->ids[k->n] = token_id;
  k->n++;
  return (k->stop_after >= 0 && k->n >= k->stop_after) ? 1 : 0; /* sink.isStopped ? 1 : 0 */
}

/* ---- Engine.generate(_:settings:sink:) */
static edgemm_status engine_generate(engine* e, const char* prompt, const settings* cfg, sink* k, edgemm_stats* st) {
  edgemm_generate_options opts;
  edgemm_status status;
  edgemm_generate_options_init(&opts);
  opts.max_new_tokens = cfg->max_new_tokens;
  opts.temperature = cfg->temperature;
  opts.top_k = cfg->top_k;
  opts.top_p = cfg->top_p;
  opts.seed = cfg->seed;
  memset(st, 0, sizeof *st);
  st->struct_size = (uint32_t)sizeof *st;
  status = edgemm_generate(e->session, prompt, &opts, on_token, k, st);
  if (status != EDGEMM_OK && status != EDGEMM_ERR_CANCELLED) status_error(status, "edgemm_generate");
  return status;
}

/* ---- Engine.deinit */
static void engine_close(engine* e) {
  edgemm_session_free(e->session);
  edgemm_model_free(e->model);
  free(e->info);
  e->session = NULL;
  e->model = NULL;
  e->info = NULL;
}

/* ---- Engine.error(_:) */
static void status_error(edgemm_status st, const char* what) {
  const char* name = edgemm_status_name(st);
  const char* msg = edgemm_last_error();
  printf("{\"event\":\"error\",\"what\":");
  json_str(stdout, what, strlen(what));
  printf(",\"status\":%d,\"name\":", (int)st);
  json_str(stdout, name, strlen(name));
  printf(",\"message\":");
  json_str(stdout, msg, strlen(msg));
  printf("}\n");
}

/* ------------------------------------------------------------------------------------ the app's flow */

static uint8_t* read_ppm(const char* path, int32_t* w, int32_t* h) {
  FILE* f = fopen(path, "rb");
  char magic[3] = {0};
  int vals[3], i, c;
  uint8_t* px;
  size_t n;
  if (!f) return NULL;
  if (fread(magic, 1, 2, f) != 2 || strcmp(magic, "P6") != 0) { fclose(f); return NULL; }
  for (i = 0; i < 3; ++i) {
    while ((c = fgetc(f)) != EOF && (c == ' ' || c == '\n' || c == '\r' || c == '\t' || c == '#')) {
      if (c == '#') while ((c = fgetc(f)) != EOF && c != '\n') {}
    }
    if (c == EOF) { fclose(f); return NULL; }
    ungetc(c, f);
    if (fscanf(f, "%d", &vals[i]) != 1) { fclose(f); return NULL; }
  }
  fgetc(f); /* the single whitespace after maxval */
  if (vals[0] <= 0 || vals[1] <= 0 || vals[2] != 255 || vals[0] > 16384 || vals[1] > 16384) { fclose(f); return NULL; }
  n = (size_t)vals[0] * (size_t)vals[1] * 3;
  px = (uint8_t*)malloc(n);
  if (!px || fread(px, 1, n, f) != n) { free(px); fclose(f); return NULL; }
  fclose(f);
  *w = vals[0];
  *h = vals[1];
  return px;
}

static int print_answer(const char* event, const char* q, edgemm_status status, const sink* k, const edgemm_stats* st) {
  int i;
  printf("{\"event\":\"%s\",\"status\":%d,\"question\":", event, (int)status);
  json_str(stdout, q, strlen(q));
  printf(",\"text\":");
  json_str(stdout, k->text ? k->text : "", k->len);
  printf(",\"ids\":[");
  for (i = 0; i < k->n && i < (int)(sizeof k->ids / sizeof k->ids[0]); ++i) printf("%s%d", i ? "," : "", (int)k->ids[i]);
  printf("],\"stats\":{\"image_encode_ms\":%.6f,\"prefill_ms\":%.6f,\"decode_ms\":%.6f,\"ttft_ms\":%.6f,"
         "\"visual_tokens\":%d,\"prefill_tokens\":%d,\"decode_tokens\":%d,\"npu_lane_busy\":%.6f,\"cpu_lane_busy\":%.6f}}\n",
         st->image_encode_ms, st->prefill_ms, st->decode_ms, st->ttft_ms, (int)st->visual_tokens, (int)st->prefill_tokens,
         (int)st->decode_tokens, st->npu_lane_busy, st->cpu_lane_busy);
  fflush(stdout);
  return status == EDGEMM_OK || status == EDGEMM_ERR_CANCELLED;
}

static edgemm_status ask(engine* e, const char* event, const char* q, const settings* cfg, int stop_after, int* ok) {
  sink k;
  edgemm_stats st;
  edgemm_status status;
  memset(&k, 0, sizeof k);
  k.stop_after = stop_after;
  status = engine_generate(e, q, cfg, &k, &st);
  if (!print_answer(event, q, status, &k, &st)) *ok = 0;
  free(k.text);
  return status;
}

int main(int argc, char** argv) {
  engine e, missing;
  settings greedy = {0, 0.0f, 0, 1.0f, 0};
  int32_t w = 0, h = 0;
  uint8_t* rgb;
  int i, ok = 1;
  edgemm_status st;
  if (argc < 5) {
    fprintf(stderr, "usage: %s BUNDLE IMAGE.ppm MAX_NEW_TOKENS QUESTION...\n", argv[0]);
    return 2;
  }
  greedy.max_new_tokens = (int32_t)atoi(argv[3]);
  rgb = read_ppm(argv[2], &w, &h);
  if (!rgb) { fprintf(stderr, "cannot read %s (binary PPM, maxval 255)\n", argv[2]); return 2; }
  memset(&e, 0, sizeof e);
  memset(&missing, 0, sizeof missing);

  report_version();
  /* EngineHost.load */
  if (engine_open(&e, argv[1], 2, 1) != EDGEMM_OK) /* the app's default: NPU lane on */ { free(rgb); return 1; }
  printf("{\"event\":\"info\",\"info\":%s}\n", e.info);
  /* EngineHost.ask: the picture once, then the questions */
  if (engine_set_image(&e, rgb, w, h) != EDGEMM_OK) ok = 0;
  for (i = 4; i < argc; ++i) ask(&e, "answer", argv[i], &greedy, -1, &ok);
  /* TokenSink.stop() after the first piece: CANCELLED, not an error */
  st = ask(&e, "cancel", argv[4], &greedy, 1, &ok);
  if (st != EDGEMM_ERR_CANCELLED) ok = 0;
  /* "No picture": text only */
  if (engine_clear_image(&e) != EDGEMM_OK) ok = 0;
  ask(&e, "text_only", argv[4], &greedy, -1, &ok);
  /* Errors come back as statuses with a message: an empty question, a bad picture, a missing bundle. */
  {
    int dummy = 1;
    st = ask(&e, "empty_prompt", "   ", &greedy, -1, &dummy);
    if (st == EDGEMM_OK) ok = 0;
    st = engine_set_image(&e, rgb, 0, h);
    if (st == EDGEMM_OK) ok = 0;
    st = engine_open(&missing, "/nonexistent/edgemm-bundle", 1, 0);
    if (st == EDGEMM_OK) { ok = 0; engine_close(&missing); }
  }
  engine_close(&e);
  free(rgb);
  printf("{\"event\":\"done\",\"ok\":%s}\n", ok ? "true" : "false");
  return ok ? 0 : 1;
}
