#include "json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace edgemm {
namespace json {

const Value* Value::get(const std::string& key) const {
  if (type != Type::kObject) return nullptr;
  for (const auto& kv : obj)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

void append_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += char(0xE0 | (cp >> 12));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xF0 | (cp >> 18));
    s += char(0x80 | ((cp >> 12) & 0x3F));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  }
}

namespace {

struct Parser {
  const char* p;
  const char* begin;
  const char* end;
  std::string err;
  int depth = 0;

  bool fail(const char* msg) {
    if (err.empty()) err = std::string(msg) + " at byte " + std::to_string(p - begin);
    return false;
  }
  void ws() {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p;
  }

  bool hex4(uint32_t* v) {
    if (end - p < 4) return fail("truncated \\u escape");
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) {
      char c = p[i];
      r <<= 4;
      if (c >= '0' && c <= '9') r |= uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') r |= uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') r |= uint32_t(c - 'A' + 10);
      else return fail("bad \\u escape");
    }
    p += 4;
    *v = r;
    return true;
  }
  bool string(std::string* s) {
    // at opening quote
    ++p;
    s->clear();
    while (true) {
      if (p >= end) return fail("unterminated string");
      unsigned char c = (unsigned char)*p;
      if (c == '"') {
        ++p;
        return true;
      }
      if (c < 0x20) return fail("control character in string");
      if (c != '\\') {
        *s += char(c);
        ++p;
        continue;
      }
      ++p;
      if (p >= end) return fail("unterminated escape");
      char e = *p++;
      switch (e) {
        case '"': *s += '"'; break;
        case '\\': *s += '\\'; break;
        case '/': *s += '/'; break;
        case 'b': *s += '\b'; break;
        case 'f': *s += '\f'; break;
        case 'n': *s += '\n'; break;
        case 'r': *s += '\r'; break;
        case 't': *s += '\t'; break;
        case 'u': {
          uint32_t cp;
          if (!hex4(&cp)) return false;
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
              p += 2;
              uint32_t lo;
              if (!hex4(&lo)) return false;
              if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
              else return fail("unpaired surrogate");
            } else {
              return fail("unpaired surrogate");
            }
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            return fail("unpaired surrogate");
          }
          append_utf8(*s, cp);
          break;
        }
        default: return fail("bad escape");
      }
    }
  }
  bool number(Value* v) {
    const char* s = p;
    bool frac = false;
    if (p < end && *p == '-') ++p;
    if (p >= end || !(*p >= '0' && *p <= '9')) return fail("bad number");
    while (p < end && *p >= '0' && *p <= '9') ++p;
    if (p < end && *p == '.') {
      frac = true;
      ++p;
      if (p >= end || !(*p >= '0' && *p <= '9')) return fail("bad number");
      while (p < end && *p >= '0' && *p <= '9') ++p;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
      frac = true;
      ++p;
      if (p < end && (*p == '+' || *p == '-')) ++p;
      if (p >= end || !(*p >= '0' && *p <= '9')) return fail("bad number");
      while (p < end && *p >= '0' && *p <= '9') ++p;
    }
    std::string lit(s, p);
    v->type = Type::kNumber;
    v->num = std::strtod(lit.c_str(), nullptr);
    if (!frac && lit.size() < 19) {
      v->is_int = true;
      v->i = std::strtoll(lit.c_str(), nullptr, 10);
    }
    return true;
  }
  bool lit(const char* w) {
    size_t n = std::strlen(w);
    if (size_t(end - p) < n || std::memcmp(p, w, n) != 0) return fail("bad literal");
    p += n;
    return true;
  }
  bool value(Value* v) {
    ws();
    if (p >= end) return fail("unexpected end");
    if (++depth > 256) return fail("nesting too deep");
    bool ok = true;
    char c = *p;
    if (c == '{') {
      v->type = Type::kObject;
      ++p;
      ws();
      if (p < end && *p == '}') {
        ++p;
      } else {
        while (true) {
          ws();
          if (p >= end || *p != '"') { ok = fail("expected object key"); break; }
          std::string key;
          if (!string(&key)) { ok = false; break; }
          ws();
          if (p >= end || *p != ':') { ok = fail("expected ':'"); break; }
          ++p;
          v->obj.emplace_back(std::move(key), Value());
          if (!value(&v->obj.back().second)) { ok = false; break; }
          ws();
          if (p < end && *p == ',') { ++p; continue; }
          if (p < end && *p == '}') { ++p; break; }
          ok = fail("expected ',' or '}'");
          break;
        }
      }
    } else if (c == '[') {
      v->type = Type::kArray;
      ++p;
      ws();
      if (p < end && *p == ']') {
        ++p;
      } else {
        while (true) {
          v->arr.emplace_back();
          if (!value(&v->arr.back())) { ok = false; break; }
          ws();
          if (p < end && *p == ',') { ++p; continue; }
          if (p < end && *p == ']') { ++p; break; }
          ok = fail("expected ',' or ']'");
          break;
        }
      }
    } else if (c == '"') {
      v->type = Type::kString;
      ok = string(&v->str);
    } else if (c == 't') {
      v->type = Type::kBool;
      v->b = true;
      ok = lit("true");
    } else if (c == 'f') {
      v->type = Type::kBool;
      ok = lit("false");
    } else if (c == 'n') {
      ok = lit("null");
    } else if (c == 'N') {  // Python's json.dumps writes NaN/Infinity by default
      v->type = Type::kNumber;
      v->num = NAN;
      ok = lit("NaN");
    } else if (c == 'I') {
      v->type = Type::kNumber;
      v->num = INFINITY;
      ok = lit("Infinity");
    } else {
      ok = number(v);
    }
    --depth;
    return ok;
  }
};

}  // namespace

bool parse(const std::string& text, Value* out, std::string* err) {
  try {
    Parser ps{text.data(), text.data(), text.data() + text.size(), std::string()};
    *out = Value();
    if (!ps.value(out)) {
      if (err) *err = ps.err;
      return false;
    }
    ps.ws();
    if (ps.p != ps.end) {
      ps.fail("trailing characters");
      if (err) *err = ps.err;
      return false;
    }
    return true;
  } catch (const std::exception&) {
    if (err) *err = "out of memory parsing JSON";
    return false;
  }
}

std::string quote(const std::string& s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': o += "\\\""; break;
      case '\\': o += "\\\\"; break;
      case '\n': o += "\\n"; break;
      case '\r': o += "\\r"; break;
      case '\t': o += "\\t"; break;
      default:
        if (c < 0x20) {
          char b[8];
          std::snprintf(b, sizeof b, "\\u%04x", c);
          o += b;
        } else {
          o += char(c);
        }
    }
  }
  return o + "\"";
}

std::string dump(const Value& v) {
  switch (v.type) {
    case Type::kNull: return "null";
    case Type::kBool: return v.b ? "true" : "false";
    case Type::kNumber: {
      if (v.is_int) return std::to_string(v.i);
      if (!std::isfinite(v.num)) return "null";
      char b[32];
      std::snprintf(b, sizeof b, "%.17g", v.num);
      return b;
    }
    case Type::kString: return quote(v.str);
    case Type::kArray: {
      std::string o = "[";
      for (size_t i = 0; i < v.arr.size(); ++i) o += (i ? "," : "") + dump(v.arr[i]);
      return o + "]";
    }
    case Type::kObject: {
      std::string o = "{";
      for (size_t i = 0; i < v.obj.size(); ++i)
        o += (i ? "," : "") + quote(v.obj[i].first) + ":" + dump(v.obj[i].second);
      return o + "}";
    }
  }
  return "null";
}

}  // namespace json
}  // namespace edgemm
