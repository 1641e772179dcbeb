// Byte-level BPE tokenizer read from a Hugging Face tokenizers `tokenizer.json` (model type BPE, pre-
// tokenizer ByteLevel with the GPT-2 split regex, ByteLevel decoder), with added/special tokens matched
// literally before pre-tokenization (leftmost, longest), as tokenizers does.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace edgemm {

class Tokenizer {
 public:
  // Parses tokenizer.json text. Returns false with *err on anything unsupported or malformed.
  bool load(const std::string& json_text, std::string* err);
  std::vector<int32_t> encode(const std::string& text) const;  // no BOS
  // Decoded UTF-8 bytes of ids (special tokens skipped when skip_special).
  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const;
  std::string token_bytes(int32_t id, bool skip_special) const;  // one token's bytes
  int32_t vocab_size() const { return int32_t(id_to_token_.size()); }  // max id + 1
  int32_t token_id(const std::string& tok) const;  // -1 if absent
  bool is_special(int32_t id) const;

 private:
  void bpe_word(const std::string& mapped, std::vector<int32_t>* out) const;
  void encode_segment(const std::string& text, std::vector<int32_t>* out) const;
  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;  // byte-level unicode form; added tokens: their content
  std::vector<uint8_t> special_;          // per id: 1 = special added token, 2 = non-special added token
  std::unordered_map<std::string, int32_t> merge_rank_;  // "left\x01right" -> rank
  struct Added {
    std::string content;
    int32_t id;
  };
  std::vector<Added> added_;
  bool add_prefix_space_ = false;
  bool use_regex_ = true;
  std::string byte_to_unicode_[256];
  std::unordered_map<uint32_t, uint8_t> unicode_to_byte_;
};

}  // namespace edgemm
