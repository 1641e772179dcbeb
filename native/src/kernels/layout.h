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

// W8A8 packed weights: 16-column panels grouped in threes (the last group may hold 1 or 2), a group
// interleaved per k4 step so that the 3 x 64 bytes a micro-kernel step reads are contiguous.
struct W8A8PanelPos {
  int64_t base;       // byte offset of (panel, k4 = 0)
  int64_t k4_stride;  // bytes between consecutive k4 steps of this panel
};
inline W8A8PanelPos w8a8_panel(int64_t p, int64_t Kp, int64_t Np) {
  const int64_t P = Np / 16, g = p / 3, np = (P - 3 * g) < 3 ? (P - 3 * g) : 3;
  return {3 * g * Kp * 16 + (p % 3) * 64, np * 64};
}
// Offset of weight (n, k).
inline int64_t w8a8_offset(int64_t n, int64_t k, int64_t Kp, int64_t Np) {
  W8A8PanelPos pp = w8a8_panel(n / 16, Kp, Np);
  return pp.base + (k / 4) * pp.k4_stride + (n % 16) * 4 + (k % 4);
}

}  // namespace layout
}  // namespace kernels
}  // namespace edgemm
