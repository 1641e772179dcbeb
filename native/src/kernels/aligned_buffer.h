// 64-byte aligned, non-copyable, movable buffer of trivially copyable T. Allocation failure is reported
// through the return value of resize(), never by an exception.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

namespace edgemm {

template <class T>
class AlignedBuffer {
  static_assert(std::is_trivially_copyable<T>::value, "AlignedBuffer holds plain data only");

 public:
  static constexpr size_t kAlign = 64;
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& o) noexcept : p_(o.p_), n_(o.n_), cap_(o.cap_) {
    o.p_ = nullptr;
    o.n_ = o.cap_ = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = o.p_;
      n_ = o.n_;
      cap_ = o.cap_;
      o.p_ = nullptr;
      o.n_ = o.cap_ = 0;
    }
    return *this;
  }
  ~AlignedBuffer() { release(); }

  // Resizes to n elements; contents are unspecified unless zero is true (then all zero).
  // Keeps the allocation when it is large enough. Returns false on allocation failure.
  bool resize(size_t n, bool zero = false) {
    if (n > cap_) {
      release();
      size_t bytes = n * sizeof(T);
      if (bytes / sizeof(T) != n) return false;
      bytes = (bytes + kAlign - 1) / kAlign * kAlign;
      void* p = nullptr;
      if (posix_memalign(&p, kAlign, bytes ? bytes : kAlign) != 0) return false;
      p_ = static_cast<T*>(p);
      cap_ = n;
    }
    n_ = n;
    if (zero && n) std::memset(static_cast<void*>(p_), 0, n * sizeof(T));
    return true;
  }
  void release() {
    std::free(p_);
    p_ = nullptr;
    n_ = cap_ = 0;
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  T& operator[](size_t i) { return p_[i]; }
  const T& operator[](size_t i) const { return p_[i]; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0, cap_ = 0;
};

}  // namespace edgemm
