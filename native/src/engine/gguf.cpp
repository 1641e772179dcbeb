#include "gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>

namespace edgemm {
namespace gguf {

const char* tensor_type_name(uint32_t t) {
  switch (t) {
    case 0: return "F32";
    case 1: return "F16";
    case 24: return "I8";
    case 25: return "I16";
    case 26: return "I32";
    case 27: return "I64";
    case 28: return "F64";
    default: return "unsupported";
  }
}

size_t tensor_type_size(uint32_t t) {
  switch (t) {
    case 0: return 4;
    case 1: return 2;
    case 24: return 1;
    case 25: return 2;
    case 26: return 4;
    case 27: return 8;
    case 28: return 8;
    default: return 0;
  }
}

Mapping::~Mapping() {
  if (addr_) munmap(addr_, size_);
}

void Mapping::release(const void* p, size_t n) const {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(addr_), hi = lo + size_;
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (!addr_ || n == 0 || a < lo || a > hi || n > hi - a) return;
  static const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE) > 0 ? sysconf(_SC_PAGESIZE) : 4096);
  uintptr_t b = (a + n) / page * page;
  a = (a + page - 1) / page * page;
  if (b > a) madvise(reinterpret_cast<void*>(a), size_t(b - a), MADV_DONTNEED);
}

File::~File() { unmap(); }

void File::unmap() {
  map_.reset();
  base_ = nullptr;
  size_ = 0;
}

const KV* File::find_kv(const std::string& key) const {
  auto it = kv_.find(key);
  return it == kv_.end() ? nullptr : &it->second;
}

const TensorInfo* File::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

int File::open(const std::string& path, std::string* err) {
  unmap();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *err = "cannot open " + path + ": " + std::strerror(errno);
    return 2;
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    *err = "cannot stat " + path + ": " + std::strerror(errno);
    ::close(fd);
    return 2;
  }
  if (S_ISDIR(st.st_mode)) {
    *err = path + " is a directory, not a model file";
    ::close(fd);
    return 2;
  }
  if (st.st_size <= 0) {
    ::close(fd);
    *err = path + ": empty file (not a GGUF model file)";
    return 3;
  }
  size_t n = size_t(st.st_size);
  void* m = mmap(nullptr, n, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) {
    *err = "cannot mmap " + path + ": " + std::strerror(errno);
    return 2;
  }
  try {
    map_ = std::make_shared<const Mapping>(m, n);
  } catch (...) {
    munmap(m, n);
    *err = "out of memory mapping " + path;
    return 2;
  }
  base_ = map_->data();
  size_ = n;
  int rc = parse(err);
  if (rc != 0) {
    *err = path + ": " + *err;
    unmap();
  }
  return rc;
}

int File::open_memory(const uint8_t* data, size_t size, std::string* err) {
  unmap();
  base_ = data;
  size_ = size;
  int rc = parse(err);
  if (rc != 0) {
    base_ = nullptr;
    size_ = 0;
  }
  return rc;
}

namespace {
struct Cursor {
  const uint8_t* p;
  size_t n, off = 0;
  bool take(void* dst, size_t k) {
    if (k > n - off) return false;
    std::memcpy(dst, p + off, k);
    off += k;
    return true;
  }
  bool skip(uint64_t k) {
    if (k > n - off) return false;
    off += size_t(k);
    return true;
  }
  bool u32(uint32_t* v) { return take(v, 4); }
  bool u64(uint64_t* v) { return take(v, 8); }
  bool str(std::string* s) {
    uint64_t len;
    if (!u64(&len)) return false;
    if (len > n - off || len > (1ull << 31)) return false;
    s->assign(reinterpret_cast<const char*>(p + off), size_t(len));
    off += size_t(len);
    return true;
  }
};

size_t scalar_size(ValueType t) {
  switch (t) {
    case ValueType::kU8: case ValueType::kI8: case ValueType::kBool: return 1;
    case ValueType::kU16: case ValueType::kI16: return 2;
    case ValueType::kU32: case ValueType::kI32: case ValueType::kF32: return 4;
    case ValueType::kU64: case ValueType::kI64: case ValueType::kF64: return 8;
    default: return 0;
  }
}

bool read_scalar(Cursor& c, ValueType t, KV* kv) {
  uint8_t b[8] = {0};
  size_t k = scalar_size(t);
  if (!k || !c.take(b, k)) return false;
  switch (t) {
    case ValueType::kU8: kv->u = b[0]; kv->i = b[0]; break;
    case ValueType::kBool: kv->u = b[0]; kv->i = b[0]; break;
    case ValueType::kI8: { int8_t v; std::memcpy(&v, b, 1); kv->i = v; kv->u = uint64_t(v); break; }
    case ValueType::kU16: { uint16_t v; std::memcpy(&v, b, 2); kv->u = v; kv->i = v; break; }
    case ValueType::kI16: { int16_t v; std::memcpy(&v, b, 2); kv->i = v; kv->u = uint64_t(v); break; }
    case ValueType::kU32: { uint32_t v; std::memcpy(&v, b, 4); kv->u = v; kv->i = v; break; }
    case ValueType::kI32: { int32_t v; std::memcpy(&v, b, 4); kv->i = v; kv->u = uint64_t(v); break; }
    case ValueType::kF32: { float v; std::memcpy(&v, b, 4); kv->f = v; break; }
    case ValueType::kU64: { uint64_t v; std::memcpy(&v, b, 8); kv->u = v; kv->i = int64_t(v); break; }
    case ValueType::kI64: { int64_t v; std::memcpy(&v, b, 8); kv->i = v; kv->u = uint64_t(v); break; }
    case ValueType::kF64: { double v; std::memcpy(&v, b, 8); kv->f = v; break; }
    default: return false;
  }
  return true;
}
}  // namespace

int File::parse(std::string* err) {
  kv_.clear();
  tensors_.clear();
  tensor_index_.clear();
  alignment_ = 32;
  Cursor c{base_, size_};
  char magic[4];
  if (!c.take(magic, 4) || std::memcmp(magic, "GGUF", 4) != 0) {
    *err = "not a GGUF file (bad magic)";
    return 3;
  }
  if (!c.u32(&version_)) { *err = "truncated GGUF header (version)"; return 3; }
  if (version_ != 2 && version_ != 3) {
    *err = "unsupported GGUF version " + std::to_string(version_) + " (this engine reads 2 and 3)";
    return 3;
  }
  uint64_t n_tensors, n_kv;
  if (!c.u64(&n_tensors) || !c.u64(&n_kv)) { *err = "truncated GGUF header (counts)"; return 3; }
  // Every KV takes >= 8 + 4 bytes, every tensor info >= 8 + 4 + 8 + 4 + 8 bytes: bound the counts by the size.
  if (n_kv > size_ / 12) { *err = "GGUF header: kv count " + std::to_string(n_kv) + " exceeds the file size"; return 3; }
  if (n_tensors > size_ / 32) {
    *err = "GGUF header: tensor count " + std::to_string(n_tensors) + " exceeds the file size";
    return 3;
  }
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key;
    if (!c.str(&key)) { *err = "truncated or invalid key #" + std::to_string(i); return 3; }
    if (key.empty()) { *err = "empty key #" + std::to_string(i); return 3; }
    uint32_t t;
    if (!c.u32(&t)) { *err = "truncated value type of key '" + key + "'"; return 3; }
    KV kv;
    kv.type = ValueType(t);
    if (t == uint32_t(ValueType::kString)) {
      if (!c.str(&kv.s)) { *err = "truncated or invalid string value of key '" + key + "'"; return 3; }
    } else if (t == uint32_t(ValueType::kArray)) {
      uint32_t at;
      uint64_t len;
      if (!c.u32(&at) || !c.u64(&len)) { *err = "truncated array header of key '" + key + "'"; return 3; }
      kv.arr_type = ValueType(at);
      kv.arr_len = len;
      if (at == uint32_t(ValueType::kString)) {
        if (len > size_) { *err = "array length of key '" + key + "' exceeds the file size"; return 3; }
        for (uint64_t j = 0; j < len; ++j) {
          std::string s;
          if (!c.str(&s)) { *err = "truncated string array of key '" + key + "'"; return 3; }
        }
      } else {
        size_t es = scalar_size(ValueType(at));
        if (!es) { *err = "unsupported array element type " + std::to_string(at) + " of key '" + key + "'"; return 3; }
        if (len > size_ / es || !c.skip(len * es)) { *err = "truncated array of key '" + key + "'"; return 3; }
      }
    } else {
      if (!scalar_size(kv.type)) { *err = "unknown value type " + std::to_string(t) + " of key '" + key + "'"; return 3; }
      if (!read_scalar(c, kv.type, &kv)) { *err = "truncated value of key '" + key + "'"; return 3; }
      if (kv.type == ValueType::kBool && kv.u > 1) { *err = "bool key '" + key + "' is not 0/1"; return 3; }
    }
    if (kv_.count(key)) { *err = "duplicate key '" + key + "'"; return 3; }
    kv_.emplace(key, std::move(kv));
  }
  if (const KV* a = find_kv("general.alignment")) {
    if (a->type != ValueType::kU32 || a->u == 0 || (a->u & (a->u - 1)) != 0 || a->u > 65536) {
      *err = "general.alignment must be a u32 power of two <= 65536";
      return 3;
    }
    alignment_ = a->u;
  }
  tensors_.reserve(size_t(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo ti;
    if (!c.str(&ti.name) || ti.name.empty() || ti.name.size() > 1024) {
      *err = "truncated or invalid name of tensor #" + std::to_string(i);
      return 3;
    }
    uint32_t nd;
    if (!c.u32(&nd)) { *err = "tensor '" + ti.name + "': truncated rank"; return 3; }
    if (nd < 1 || nd > 4) { *err = "tensor '" + ti.name + "': rank " + std::to_string(nd) + " (must be 1..4)"; return 3; }
    std::vector<int64_t> ne(nd);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      uint64_t v;
      if (!c.u64(&v)) { *err = "tensor '" + ti.name + "': truncated dims"; return 3; }
      if (v == 0 || v > (1ull << 40)) { *err = "tensor '" + ti.name + "': invalid dim " + std::to_string(v); return 3; }
      if (numel > (1ull << 48) / v) { *err = "tensor '" + ti.name + "': element count overflows"; return 3; }
      numel *= v;
      ne[d] = int64_t(v);
    }
    ti.shape.assign(ne.rbegin(), ne.rend());
    if (!c.u32(&ti.type)) { *err = "tensor '" + ti.name + "': truncated type"; return 3; }
    size_t es = tensor_type_size(ti.type);
    if (!es) { *err = "tensor '" + ti.name + "': unsupported tensor type " + std::to_string(ti.type); return 3; }
    if (!c.u64(&ti.offset)) { *err = "tensor '" + ti.name + "': truncated offset"; return 3; }
    ti.nbytes = numel * es;
    if (tensor_index_.count(ti.name)) { *err = "duplicate tensor '" + ti.name + "'"; return 3; }
    tensor_index_[ti.name] = tensors_.size();
    tensors_.push_back(std::move(ti));
  }
  uint64_t data_start = (uint64_t(c.off) + alignment_ - 1) / alignment_ * alignment_;
  if (data_start > size_) {
    if (!tensors_.empty()) { *err = "truncated file: no tensor data section"; return 3; }
    data_start = size_;
  }
  uint64_t data_size = size_ - data_start;
  std::vector<std::pair<uint64_t, size_t>> spans;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    TensorInfo& ti = tensors_[i];
    if (ti.offset % alignment_ != 0) {
      *err = "tensor '" + ti.name + "': offset " + std::to_string(ti.offset) + " is not aligned to " +
             std::to_string(alignment_);
      return 3;
    }
    if (ti.offset > data_size || ti.nbytes > data_size - ti.offset) {
      *err = "tensor '" + ti.name + "': data [" + std::to_string(ti.offset) + ", +" + std::to_string(ti.nbytes) +
             ") extends past the end of the file (truncated?)";
      return 3;
    }
    ti.data = base_ + data_start + ti.offset;
    spans.emplace_back(ti.offset, i);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t j = 1; j < spans.size(); ++j) {
    const TensorInfo& a = tensors_[spans[j - 1].second];
    if (a.offset + a.nbytes > spans[j].first) {
      *err = "tensors '" + a.name + "' and '" + tensors_[spans[j].second].name + "' overlap";
      return 3;
    }
  }
  return 0;
}

}  // namespace gguf
}  // namespace edgemm
