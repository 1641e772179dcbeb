// Fuzz target for the model-file parser (GGUF container + embedded JSON documents).
// With clang -fsanitize=fuzzer, define EDGEMM_LIBFUZZER and link as a libFuzzer target. Without libFuzzer
// (gcc), main() is a standalone AFL-style driver: it mutates seed files (bit flips, byte sets, truncation,
// length-field corruption, splices) for a bounded number of iterations or seconds and runs every input
// through the same entry point; crashes surface as signals / sanitizer reports.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gguf.h"
#include "json.h"
#include "tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  edgemm::gguf::File f;
  std::string err;
  if (f.open_memory(data, size, &err) == 0) {
    // Touch every tensor's bytes (the reader promised they are in bounds) and parse the JSON documents.
    volatile uint8_t sink = 0;
    for (const auto& t : f.tensors())
      if (t.nbytes) sink ^= t.data[0] ^ t.data[t.nbytes - 1];
    (void)sink;
    for (const char* k : {"edgemm.config", "edgemm.preprocess", "edgemm.decode_quantization"}) {
      const edgemm::gguf::KV* kv = f.find_kv(k);
      if (kv && kv->type == edgemm::gguf::ValueType::kString) {
        edgemm::json::Value v;
        if (edgemm::json::parse(kv->s, &v, &err)) (void)edgemm::json::dump(v);
      }
    }
    if (const edgemm::gguf::KV* kv = f.find_kv("edgemm.tokenizer"); kv && kv->type == edgemm::gguf::ValueType::kString) {
      edgemm::Tokenizer tok;
      if (tok.load(kv->s, &err)) {
        auto ids = tok.encode("USER: <image>\nhow many red circles? ASSISTANT: caf\xc3\xa9 \xf0\x9f\x98\x80 12 's");
        (void)tok.decode(ids, true);
      }
    }
  }
  return 0;
}

#ifndef EDGEMM_LIBFUZZER
static bool read_file(const char* path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::stringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  return true;
}

int main(int argc, char** argv) {
  long iters = 2000;
  double seconds = 30;
  uint64_t seed = 1;
  std::vector<std::string> seeds;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--iters" && i + 1 < argc) iters = std::atol(argv[++i]);
    else if (a == "--seconds" && i + 1 < argc) seconds = std::atof(argv[++i]);
    else if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else {
      std::string d;
      if (!read_file(argv[i], &d)) {
        std::fprintf(stderr, "cannot read seed %s\n", argv[i]);
        return 2;
      }
      seeds.push_back(d);
    }
  }
  if (seeds.empty()) seeds.push_back(std::string("GGUF\x03\0\0\0", 8));
  std::mt19937_64 rng(seed);
  auto t0 = std::chrono::steady_clock::now();
  long n = 0;
  for (const auto& s : seeds) LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  for (; n < iters; ++n) {
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > seconds) break;
    std::string d = seeds[rng() % seeds.size()];
    int muts = 1 + int(rng() % 8);
    for (int k = 0; k < muts && !d.empty(); ++k) {
      size_t pos = rng() % d.size();
      // bias mutations toward the header (counts, lengths, tensor infos live in the first bytes)
      if (rng() % 2) pos = rng() % std::min<size_t>(d.size(), 4096);
      switch (rng() % 7) {
        case 0: d[pos] = char(d[pos] ^ (1 << (rng() % 8))); break;
        case 1: d[pos] = char(rng()); break;
        case 2: d.resize(pos); break;  // truncation
        case 3: {                      // interesting 64-bit value (length/offset/dim fields)
          static const uint64_t vals[] = {0, 1, 0xFFFFFFFFull, 0xFFFFFFFFFFFFFFFFull, 1ull << 40, 31, 32, 33, 0x7FFFFFFF};
          uint64_t v = vals[rng() % 9];
          if (pos + 8 <= d.size()) std::memcpy(&d[pos], &v, 8);
          break;
        }
        case 4: {  // interesting 32-bit value (types, ranks, version)
          static const uint32_t vals[] = {0, 1, 2, 3, 4, 8, 9, 24, 26, 30, 0xFFFFFFFFu};
          uint32_t v = vals[rng() % 11];
          if (pos + 4 <= d.size()) std::memcpy(&d[pos], &v, 4);
          break;
        }
        case 5: {  // splice from another seed
          const std::string& o = seeds[rng() % seeds.size()];
          size_t a = rng() % o.size(), len = std::min<size_t>(o.size() - a, 1 + rng() % 64);
          d.replace(pos, std::min(len, d.size() - pos), o, a, len);
          break;
        }
        case 6: d.insert(pos, 1 + rng() % 16, char(rng())); break;
      }
    }
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(d.data()), d.size());
  }
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("fuzz_gguf: %ld mutated inputs in %.1f s, no crash\n", n, dt);
  return 0;
}
#endif
