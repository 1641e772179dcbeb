// GGUF container reader: mmaps the file, validates the header, every KV and every tensor info (name,
// rank, dims, dtype, offset, alignment, size, bounds, overlap) before anything is used. Never throws out
// of open(); errors are returned with a message naming the key or tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace edgemm {
namespace gguf {

enum class ValueType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8,
  kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};
// Tensor types this engine reads (GGML type ids).
enum class TensorType : uint32_t { kF32 = 0, kF16 = 1, kI8 = 24, kI16 = 25, kI32 = 26, kI64 = 27, kF64 = 28 };
const char* tensor_type_name(uint32_t t);
size_t tensor_type_size(uint32_t t);  // 0 if unsupported

struct KV {
  ValueType type = ValueType::kU8;
  uint64_t u = 0;     // unsigned integers / bool
  int64_t i = 0;      // signed integers (also set for unsigned that fit)
  double f = 0;       // floats
  std::string s;      // strings
  ValueType arr_type = ValueType::kU8;
  uint64_t arr_len = 0;  // arrays are validated and skipped (length kept)
};

struct TensorInfo {
  std::string name;
  std::vector<int64_t> shape;  // numpy order (outermost first): the reverse of GGUF's ne[]
  uint32_t type = 0;
  uint64_t offset = 0;         // relative to the data section
  uint64_t nbytes = 0;
  const uint8_t* data = nullptr;  // into the mapping
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

// A read-only (PROT_READ, MAP_PRIVATE) mapping of a model file. The File that parsed it and the model that
// serves tensors from it share it; it is unmapped when the last owner goes.
class Mapping {
 public:
  Mapping(void* addr, size_t size) : addr_(addr), size_(size) {}
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  const uint8_t* data() const { return static_cast<const uint8_t*>(addr_); }
  size_t size() const { return size_; }
  // Drops this process's references to the pages lying entirely inside [p, p + n) (MADV_DONTNEED), so
  // they stop counting in its RSS. The content is unchanged: the mapping is never written, so a later
  // access faults the same bytes back in from the page cache. No-op for ranges outside the mapping.
  void release(const void* p, size_t n) const;

 private:
  void* addr_;
  size_t size_;
};

class File {
 public:
  File() = default;
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  // Maps and parses path. Returns 0 on success, else an error class (2 = IO, 3 = FORMAT) with *err set.
  int open(const std::string& path, std::string* err);
  // Parses an in-memory image (not copied; must outlive the File). Same return codes. For the fuzzer/tests.
  int open_memory(const uint8_t* data, size_t size, std::string* err);

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::map<std::string, KV>& kv() const { return kv_; }
  const KV* find_kv(const std::string& key) const;
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(const std::string& name) const;
  size_t file_size() const { return size_; }
  // The mapping behind tensors()' data pointers (null after open_memory). Holding it keeps them valid
  // after this File is gone.
  const std::shared_ptr<const Mapping>& mapping() const { return map_; }
  void release(const void* p, size_t n) const {
    if (map_) map_->release(p, n);
  }

 private:
  int parse(std::string* err);
  void unmap();
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  std::shared_ptr<const Mapping> map_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::map<std::string, KV> kv_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

}  // namespace gguf
}  // namespace edgemm
