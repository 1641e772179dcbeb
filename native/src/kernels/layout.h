// Internal: sizes of the packed layouts documented in kernels.h.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace edgemm {
namespace kernels {
namespace layout {

// Bytes of packed weight codes per (16-row block, group of G inputs), scales/zeros excluded.
inline int64_t woq_weight_bytes(WFormat f, bool sparse, int64_t G) {
  if (f == WFormat::kInt4) return sparse ? 6 * G : 8 * G;  // 2:4: per 32 inputs 128 B nibbles + 64 B idx
  return sparse ? 10 * G : 16 * G;                         // 2:4: per 32 inputs 256 B values + 64 B idx
}
inline int64_t woq_group_bytes(WFormat f, bool sparse, int64_t G, bool zeros) {
  return woq_weight_bytes(f, sparse, G) + 32 + (zeros ? 16 : 0);
}
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace layout
}  // namespace kernels
}  // namespace edgemm
