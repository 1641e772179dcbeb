// AVX2 + FMA + F16C kernels (placeholder: portable code compiled for AVX2).
#include <immintrin.h>

#include "portable.h"

namespace edgemm {
namespace kernels {
namespace impl {

const KernelTable* table_avx2() {
  static const KernelTable t = portable_table(Isa::kAvx2);
  return &t;
}

}  // namespace impl
}  // namespace kernels
}  // namespace edgemm
