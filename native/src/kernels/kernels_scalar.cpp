// Portable (scalar / auto-vectorized baseline) kernel table: the fallback for every kernel.
#include "portable.h"

namespace edgemm {
namespace kernels {
namespace impl {

const KernelTable* table_scalar() {
  static const KernelTable t = portable_table(Isa::kScalar);
  return &t;
}

}  // namespace impl
}  // namespace kernels
}  // namespace edgemm
