// Minimal JSON reader (RFC 8259) for the model file's embedded documents (config, tokenizer, preprocess,
// bundle manifest). Never throws out of parse(); depth-limited; strings are UTF-8 (\u escapes decoded,
// surrogate pairs joined).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace edgemm {
namespace json {

// Appends code point cp to s as UTF-8 (shared by the JSON parser and the tokenizer's byte map).
void append_utf8(std::string& s, uint32_t cp);

enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

struct Value {
  Type type = Type::kNull;
  bool b = false;
  double num = 0.0;
  bool is_int = false;  // number literal without fraction/exponent (and fits int64)
  int64_t i = 0;
  std::string str;
  std::vector<Value> arr;
  std::vector<std::pair<std::string, Value>> obj;

  bool is_null() const { return type == Type::kNull; }
  bool is_object() const { return type == Type::kObject; }
  bool is_array() const { return type == Type::kArray; }
  bool is_string() const { return type == Type::kString; }
  bool is_number() const { return type == Type::kNumber; }
  bool is_bool() const { return type == Type::kBool; }
  // Object member or nullptr.
  const Value* get(const std::string& key) const;
};

// Parses text; on failure returns false and sets *err (with the byte offset).
bool parse(const std::string& text, Value* out, std::string* err);
// Serializes (compact). Numbers: integers as integers, others with 17 significant digits.
std::string dump(const Value& v);
std::string quote(const std::string& s);  // JSON string literal

}  // namespace json
}  // namespace edgemm
