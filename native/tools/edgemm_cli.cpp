// edgemm-cli MODEL [--image FILE.ppm|FILE.rgb --width W --height H] --prompt TEXT [options]
// A small command-line front end of the C ABI (images: binary PPM (P6) or raw interleaved RGB).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "edgemm.h"

static int usage() {
  std::fprintf(stderr,
               "usage: edgemm-cli MODEL --prompt TEXT [--image FILE.ppm | --image FILE.rgb --width W --height H]\n"
               "                  [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]\n"
               "                  [--threads N] [--npu-lane] [--chunk-size C] [--max-context N] [--raw] [--info] [--stats]\n");
  return 2;
}

static bool read_file(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::stringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  return true;
}

// Minimal binary PPM (P6, maxval 255) reader.
static bool read_ppm(const std::string& data, int* w, int* h, std::vector<uint8_t>* px, std::string* err) {
  size_t i = 0;
  auto token = [&](std::string* t) {
    while (i < data.size()) {
      if (data[i] == '#') {
        while (i < data.size() && data[i] != '\n') ++i;
      } else if (std::isspace((unsigned char)data[i])) {
        ++i;
      } else {
        break;
      }
    }
    size_t s = i;
    while (i < data.size() && !std::isspace((unsigned char)data[i])) ++i;
    *t = data.substr(s, i - s);
    return !t->empty();
  };
  std::string magic, ws, hs, ms;
  if (!token(&magic) || magic != "P6") { *err = "not a binary PPM (P6)"; return false; }
  if (!token(&ws) || !token(&hs) || !token(&ms)) { *err = "truncated PPM header"; return false; }
  *w = std::atoi(ws.c_str());
  *h = std::atoi(hs.c_str());
  if (*w <= 0 || *h <= 0 || *w > 16384 || *h > 16384 || ms != "255") { *err = "unsupported PPM size/maxval"; return false; }
  ++i;  // single whitespace after maxval
  size_t n = size_t(*w) * size_t(*h) * 3;
  if (i + n > data.size()) { *err = "truncated PPM pixel data"; return false; }
  px->assign(data.begin() + long(i), data.begin() + long(i + n));
  return true;
}

static int32_t on_token(const char* piece, int32_t, void*) {
  std::fputs(piece, stdout);
  std::fflush(stdout);
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  std::string model = argv[1], prompt, image;
  int width = 0, height = 0;
  bool info = false, show_stats = false;
  edgemm_load_options lo;
  edgemm_load_options_init(&lo);
  edgemm_generate_options go;
  edgemm_generate_options_init(&go);
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "error: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--prompt") prompt = next();
    else if (a == "--image") image = next();
    else if (a == "--width") width = std::atoi(next());
    else if (a == "--height") height = std::atoi(next());
    else if (a == "--max-new-tokens") go.max_new_tokens = std::atoi(next());
    else if (a == "--temperature") go.temperature = float(std::atof(next()));
    else if (a == "--top-k") go.top_k = std::atoi(next());
    else if (a == "--top-p") go.top_p = float(std::atof(next()));
    else if (a == "--seed") go.seed = std::strtoull(next(), nullptr, 10);
    else if (a == "--threads") lo.n_threads = std::atoi(next());
    else if (a == "--npu-lane") lo.npu_lane = 1;
    else if (a == "--chunk-size") lo.chunk_size = std::atoi(next());
    else if (a == "--max-context") lo.max_context = std::atoi(next());
    else if (a == "--raw") go.apply_template = 0;
    else if (a == "--info") info = true;
    else if (a == "--stats") show_stats = true;
    else return usage();
  }
  edgemm_model* m = nullptr;
  if (edgemm_model_load(model.c_str(), &lo, &m) != EDGEMM_OK) {
    std::fprintf(stderr, "error: %s\n", edgemm_last_error());
    return 1;
  }
  int rc = 0;
  if (info) {
    size_t need = 0;
    edgemm_model_info_json(m, nullptr, 0, &need);
    std::vector<char> buf(need);
    edgemm_model_info_json(m, buf.data(), buf.size(), &need);
    std::printf("%s\n", buf.data());
  }
  if (!prompt.empty()) {
    edgemm_session* s = nullptr;
    if (edgemm_session_create(m, &s) != EDGEMM_OK) {
      std::fprintf(stderr, "error: %s\n", edgemm_last_error());
      edgemm_model_free(m);
      return 1;
    }
    if (!image.empty()) {
      std::string data, err;
      if (!read_file(image, &data)) {
        std::fprintf(stderr, "error: cannot read image %s\n", image.c_str());
        rc = 1;
      } else {
        std::vector<uint8_t> px;
        int w = width, h = height;
        bool ok = true;
        if (data.size() >= 2 && data[0] == 'P' && data[1] == '6') {
          ok = read_ppm(data, &w, &h, &px, &err);
        } else if (w > 0 && h > 0 && data.size() == size_t(w) * size_t(h) * 3) {
          px.assign(data.begin(), data.end());
        } else {
          ok = false;
          err = "not a P6 PPM, and not raw RGB of --width x --height";
        }
        if (!ok) {
          std::fprintf(stderr, "error: %s: %s\n", image.c_str(), err.c_str());
          rc = 1;
        } else if (edgemm_session_set_image_rgb8(s, px.data(), w, h, 3 * w) != EDGEMM_OK) {
          std::fprintf(stderr, "error: %s\n", edgemm_last_error());
          rc = 1;
        }
      }
    }
    if (rc == 0) {
      edgemm_stats st;
      std::memset(&st, 0, sizeof st);
      st.struct_size = sizeof st;
      edgemm_status g = edgemm_generate(s, prompt.c_str(), &go, on_token, nullptr, &st);
      std::printf("\n");
      if (g != EDGEMM_OK) {
        std::fprintf(stderr, "error: %s\n", edgemm_last_error());
        rc = 1;
      }
      if (show_stats)
        std::fprintf(stderr,
                     "{\"image_encode_ms\": %.3f, \"prefill_ms\": %.3f, \"decode_ms\": %.3f, \"ttft_ms\": %.3f, "
                     "\"visual_tokens\": %d, \"prefill_tokens\": %d, \"decode_tokens\": %d, \"npu_lane_busy\": %.3f, "
                     "\"cpu_lane_busy\": %.3f}\n",
                     st.image_encode_ms, st.prefill_ms, st.decode_ms, st.ttft_ms, st.visual_tokens, st.prefill_tokens,
                     st.decode_tokens, st.npu_lane_busy, st.cpu_lane_busy);
    }
    edgemm_session_free(s);
  }
  edgemm_model_free(m);
  return rc;
}
