#include "tokenizer.h"

#include <algorithm>
#include <climits>

#include "json.h"

namespace edgemm {
namespace {

// Decodes one UTF-8 code point at s[i]; invalid bytes decode as U+FFFD consuming one byte.
uint32_t next_cp(const std::string& s, size_t i, size_t* len) {
  unsigned char c = (unsigned char)s[i];
  size_t n = s.size() - i;
  if (c < 0x80) { *len = 1; return c; }
  int k = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (k == 0 || size_t(k) > n) { *len = 1; return 0xFFFD; }
  uint32_t cp = c & (k == 2 ? 0x1F : k == 3 ? 0x0F : 0x07);
  for (int j = 1; j < k; ++j) {
    unsigned char d = (unsigned char)s[i + j];
    if ((d & 0xC0) != 0x80) { *len = 1; return 0xFFFD; }
    cp = (cp << 6) | (d & 0x3F);
  }
  *len = size_t(k);
  return cp;
}

bool is_space(uint32_t c) {
  return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}
bool is_number(uint32_t c) {
  if (c < 128) return c >= '0' && c <= '9';
  return c == 0xB2 || c == 0xB3 || c == 0xB9 || (c >= 0xBC && c <= 0xBE) || (c >= 0x660 && c <= 0x669) ||
         (c >= 0x6F0 && c <= 0x6F9) || (c >= 0x966 && c <= 0x96F) || (c >= 0x2070 && c <= 0x2079 && c != 0x2071 && c != 0x2072 && c != 0x2073) ||
         (c >= 0x2080 && c <= 0x2089) || (c >= 0x2150 && c <= 0x2189) || (c >= 0x2460 && c <= 0x249B) ||
         (c >= 0x24EA && c <= 0x24FF) || c == 0x3007 || (c >= 0x3021 && c <= 0x3029) || (c >= 0xFF10 && c <= 0xFF19);
}
// Approximation of \p{L} outside ASCII: everything that is not whitespace, a number, a combining mark, or
// in the main punctuation / symbol / private-use blocks (see README "Tokenizer").
bool is_letter(uint32_t c) {
  if (c < 128) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  if (is_space(c) || is_number(c)) return false;
  if (c < 0xC0) return c == 0xAA || c == 0xB5 || c == 0xBA;
  if (c == 0xD7 || c == 0xF7) return false;
  if ((c >= 0x2C2 && c <= 0x2C5) || (c >= 0x2D2 && c <= 0x2DF) || (c >= 0x2E5 && c <= 0x2EB) || c == 0x2ED ||
      (c >= 0x2EF && c <= 0x2FF))
    return false;
  if (c >= 0x300 && c <= 0x36F) return false;                                   // combining marks
  if (c == 0x37E || c == 0x387 || (c >= 0x55A && c <= 0x55F) || c == 0x589) return false;
  if (c >= 0x2000 && c <= 0x2BFF) return (c >= 0x2100 && c <= 0x214F && c != 0x2118);  // punct/symbols (letterlike kept)
  if (c >= 0x2E00 && c <= 0x2E7F) return false;
  if (c >= 0x3000 && c <= 0x303F) return c == 0x3005 || c == 0x3006 || (c >= 0x3031 && c <= 0x3035) || c == 0x303B || c == 0x303C;
  if (c >= 0xE000 && c <= 0xF8FF) return false;                                 // private use
  if (c >= 0xFE10 && c <= 0xFE6F) return false;
  if ((c >= 0xFF01 && c <= 0xFF0F) || (c >= 0xFF1A && c <= 0xFF20) || (c >= 0xFF3B && c <= 0xFF40) ||
      (c >= 0xFF5B && c <= 0xFF65))
    return false;
  if (c >= 0xFFF0 && c <= 0xFFFF) return false;
  if (c >= 0x1F000 && c <= 0x1FAFF) return false;                               // emoji, symbols
  if (c >= 0xD800 && c <= 0xDFFF) return false;
  return true;
}

struct Cp {
  uint32_t c;
  size_t off, len;
};

// GPT-2 split: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
void gpt2_split(const std::string& s, std::vector<std::string>* pieces) {
  std::vector<Cp> cps;
  for (size_t i = 0; i < s.size();) {
    size_t l;
    uint32_t c = next_cp(s, i, &l);
    cps.push_back({c, i, l});
    i += l;
  }
  const size_t n = cps.size();
  auto emit = [&](size_t a, size_t b) {  // code points [a, b)
    size_t o0 = cps[a].off, o1 = b < n ? cps[b].off : s.size();
    pieces->push_back(s.substr(o0, o1 - o0));
  };
  auto other = [](uint32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); };
  size_t i = 0;
  while (i < n) {
    uint32_t c = cps[i].c;
    // contractions
    if (c == '\'' && i + 1 < n) {
      uint32_t d = cps[i + 1].c;
      if (d == 's' || d == 't' || d == 'm' || d == 'd') { emit(i, i + 2); i += 2; continue; }
      if (i + 2 < n) {
        uint32_t e = cps[i + 2].c;
        if ((d == 'r' && e == 'e') || (d == 'v' && e == 'e') || (d == 'l' && e == 'l')) { emit(i, i + 3); i += 3; continue; }
      }
    }
    size_t j = i + ((c == ' ' && i + 1 < n) ? 1 : 0);
    if (is_letter(cps[j].c) && (j > i || is_letter(c))) {
      size_t k = j;
      while (k < n && is_letter(cps[k].c)) ++k;
      emit(i, k); i = k; continue;
    }
    if (is_number(cps[j].c)) {
      size_t k = j;
      while (k < n && is_number(cps[k].c)) ++k;
      emit(i, k); i = k; continue;
    }
    if (other(cps[j].c)) {
      size_t k = j;
      while (k < n && other(cps[k].c)) ++k;
      emit(i, k); i = k; continue;
    }
    // whitespace run
    size_t k = i;
    while (k < n && is_space(cps[k].c)) ++k;
    if (k == n) { emit(i, k); i = k; continue; }
    // followed by non-space: \s+(?!\S) takes the run minus its last char (if >= 2), else \s+ takes one char
    if (k - i >= 2) { emit(i, k - 1); i = k - 1; }
    else { emit(i, k); i = k; }
  }
}

}  // namespace

bool Tokenizer::load(const std::string& text, std::string* err) {
  // GPT-2 bytes_to_unicode
  {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool direct = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      uint32_t cp = direct ? uint32_t(b) : uint32_t(256 + n++);
      byte_to_unicode_[b].clear();
      json::append_utf8(byte_to_unicode_[b], cp);
      unicode_to_byte_[cp] = uint8_t(b);
    }
  }
  json::Value root;
  std::string perr;
  if (!json::parse(text, &root, &perr)) { *err = "tokenizer JSON: " + perr; return false; }
  const json::Value* model = root.get("model");
  if (!model || !model->is_object()) { *err = "tokenizer: no 'model' object"; return false; }
  const json::Value* type = model->get("type");
  if (type && (!type->is_string() || type->str != "BPE")) { *err = "tokenizer: model type must be BPE"; return false; }
  if (const json::Value* bf = model->get("byte_fallback"); bf && bf->is_bool() && bf->b) {
    *err = "tokenizer: byte_fallback BPE is not supported (byte-level BPE expected)"; return false;
  }
  const json::Value* pre = root.get("pre_tokenizer");
  if (!pre || !pre->is_object() || !pre->get("type") || pre->get("type")->str != "ByteLevel") {
    *err = "tokenizer: pre_tokenizer must be ByteLevel"; return false;
  }
  if (const json::Value* a = pre->get("add_prefix_space"); a && a->is_bool()) add_prefix_space_ = a->b;
  if (const json::Value* a = pre->get("use_regex"); a && a->is_bool()) use_regex_ = a->b;
  const json::Value* vocab = model->get("vocab");
  if (!vocab || !vocab->is_object()) { *err = "tokenizer: model.vocab must be an object"; return false; }
  int64_t max_id = -1;
  for (const auto& kv : vocab->obj) {
    if (!kv.second.is_number() || !kv.second.is_int || kv.second.i < 0 || kv.second.i >= (1 << 24)) {
      *err = "tokenizer: bad id for vocab entry " + json::quote(kv.first); return false;
    }
    max_id = std::max<int64_t>(max_id, kv.second.i);
  }
  const json::Value* added = root.get("added_tokens");
  if (added && added->is_array()) {
    for (const auto& a : added->arr) {
      const json::Value* id = a.get("id");
      const json::Value* content = a.get("content");
      if (!id || !id->is_int || id->i < 0 || id->i >= (1 << 24) || !content || !content->is_string() || content->str.empty()) {
        *err = "tokenizer: malformed added_tokens entry"; return false;
      }
      max_id = std::max<int64_t>(max_id, id->i);
    }
  }
  if (max_id < 0) { *err = "tokenizer: empty vocabulary"; return false; }
  id_to_token_.assign(size_t(max_id + 1), std::string());
  special_.assign(size_t(max_id + 1), 0);
  for (const auto& kv : vocab->obj) {
    vocab_[kv.first] = int32_t(kv.second.i);
    id_to_token_[size_t(kv.second.i)] = kv.first;
  }
  if (added && added->is_array()) {
    for (const auto& a : added->arr) {
      int32_t id = int32_t(a.get("id")->i);
      const json::Value* sp = a.get("special");
      bool special = sp && sp->is_bool() && sp->b;
      added_.push_back({a.get("content")->str, id});
      id_to_token_[size_t(id)] = a.get("content")->str;
      special_[size_t(id)] = special ? 1 : 2;
    }
    std::stable_sort(added_.begin(), added_.end(),
                     [](const Added& x, const Added& y) { return x.content.size() > y.content.size(); });
  }
  const json::Value* merges = model->get("merges");
  if (!merges || !merges->is_array()) { *err = "tokenizer: model.merges must be an array"; return false; }
  int32_t rank = 0;
  for (const auto& m : merges->arr) {
    std::string l, r;
    if (m.is_string()) {
      size_t sp = m.str.find(' ', 1);
      if (sp == std::string::npos) { *err = "tokenizer: bad merge " + json::quote(m.str); return false; }
      l = m.str.substr(0, sp);
      r = m.str.substr(sp + 1);
    } else if (m.is_array() && m.arr.size() == 2 && m.arr[0].is_string() && m.arr[1].is_string()) {
      l = m.arr[0].str;
      r = m.arr[1].str;
    } else {
      *err = "tokenizer: bad merge entry #" + std::to_string(rank); return false;
    }
    merge_rank_.emplace(l + '\x01' + r, rank++);
  }
  return true;
}

int32_t Tokenizer::token_id(const std::string& tok) const {
  for (const auto& a : added_)
    if (a.content == tok) return a.id;
  auto it = vocab_.find(tok);
  return it == vocab_.end() ? -1 : it->second;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && size_t(id) < special_.size() && special_[size_t(id)] == 1;
}

void Tokenizer::bpe_word(const std::string& mapped, std::vector<int32_t>* out) const {
  // split into code points (each is one byte-level symbol)
  std::vector<std::string> sym;
  for (size_t i = 0; i < mapped.size();) {
    size_t l;
    next_cp(mapped, i, &l);
    sym.push_back(mapped.substr(i, l));
    i += l;
  }
  while (sym.size() > 1) {
    int32_t best = INT32_MAX;
    size_t at = 0;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      auto it = merge_rank_.find(sym[i] + '\x01' + sym[i + 1]);
      if (it != merge_rank_.end() && it->second < best) {
        best = it->second;
        at = i;
      }
    }
    if (best == INT32_MAX) break;
    const std::string l = sym[at], r = sym[at + 1];
    std::vector<std::string> nxt;
    nxt.reserve(sym.size());
    for (size_t i = 0; i < sym.size();) {
      if (i + 1 < sym.size() && sym[i] == l && sym[i + 1] == r) {
        nxt.push_back(l + r);
        i += 2;
      } else {
        nxt.push_back(sym[i]);
        ++i;
      }
    }
    sym.swap(nxt);
  }
  for (const auto& s : sym) {
    auto it = vocab_.find(s);
    if (it != vocab_.end()) out->push_back(it->second);
    // else: unknown symbol (no unk token in byte-level BPE with a full alphabet): dropped, as tokenizers does
  }
}

void Tokenizer::encode_segment(const std::string& text, std::vector<int32_t>* out) const {
  if (text.empty()) return;
  std::string t = text;
  if (add_prefix_space_ && t[0] != ' ') t = " " + t;
  std::vector<std::string> pieces;
  if (use_regex_) gpt2_split(t, &pieces);
  else pieces.push_back(t);
  for (const auto& p : pieces) {
    std::string mapped;
    for (unsigned char b : p) mapped += byte_to_unicode_[b];
    auto it = vocab_.find(mapped);
    if (it != vocab_.end()) out->push_back(it->second);
    else bpe_word(mapped, out);
  }
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out;
  size_t seg = 0, i = 0;
  while (i < text.size()) {
    const Added* hit = nullptr;
    for (const auto& a : added_) {
      if (text.compare(i, a.content.size(), a.content) == 0) {
        hit = &a;
        break;  // sorted longest first
      }
    }
    if (hit) {
      encode_segment(text.substr(seg, i - seg), &out);
      out.push_back(hit->id);
      i += hit->content.size();
      seg = i;
    } else {
      ++i;
    }
  }
  encode_segment(text.substr(seg), &out);
  return out;
}

std::string Tokenizer::token_bytes(int32_t id, bool skip_special) const {
  if (id < 0 || size_t(id) >= id_to_token_.size()) return std::string();
  uint8_t sp = special_[size_t(id)];
  if (sp == 1) return skip_special ? std::string() : id_to_token_[size_t(id)];
  if (sp == 2) return id_to_token_[size_t(id)];
  const std::string& t = id_to_token_[size_t(id)];
  std::string out;
  for (size_t i = 0; i < t.size();) {
    size_t l;
    uint32_t cp = next_cp(t, i, &l);
    auto it = unicode_to_byte_.find(cp);
    if (it != unicode_to_byte_.end()) out += char(it->second);
    else out.append(t, i, l);
    i += l;
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) out += token_bytes(id, skip_special);
  return out;
}

}  // namespace edgemm
