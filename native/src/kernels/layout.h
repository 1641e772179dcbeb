// Internal: sizes of the packed layouts documented in kernels.h.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace edgemm {
namespace kernels {
namespace layout {

// 2:4 pattern codes: a group of 4 inputs keeps the pair (kPairFirst[c], kPairSecond[c]), c = 0..5 in
// the order (0,1) (0,2) (0,3) (1,2) (1,3) (2,3). The packer never writes 6 or 7; they decode as (0,1)
// so that no code can index outside its group.
constexpr uint8_t kPairFirst[8] = {0, 0, 0, 1, 1, 2, 0, 0};
constexpr uint8_t kPairSecond[8] = {1, 2, 3, 2, 3, 3, 1, 1};
inline int pair_code(int i1, int i2) {  // i1 < i2, both in 0..3
  return i1 == 0 ? i2 - 1 : i1 == 1 ? i2 + 1 : 5;
}
// A 2:4 slab (16 rows x 32 inputs): the kept values (int4: 2 x 64 B of nibbles; int8: 4 x 64 B), then
// at sp24_code_offset 16 x 3 bytes of pattern codes (row r: a 24-bit little-endian word at byte 3r,
// code of inputs 4t..4t+3 at bits 3t).
// The 2:4 gather tables (WoqAct::sp_tab, NEON's per-step table): entry t = code | p << 3 | g << 4 holds
// the activation at position 4g + (p ? second : first)(code) of its 8 inputs.
inline uint8_t sp24_table_pos(int t) {
  const int code = t & 7, p = (t >> 3) & 1, g = (t >> 4) & 1;
  return uint8_t(4 * g + (p ? kPairSecond[code] : kPairFirst[code]));
}
inline int64_t sp24_code_offset(WFormat f) { return f == WFormat::kInt4 ? 128 : 256; }
inline int64_t sp24_slab_bytes(WFormat f) { return sp24_code_offset(f) + 48; }

// Bytes of packed weight codes per (16-row block, group of G inputs), scales/zeros excluded.
inline int64_t woq_weight_bytes(WFormat f, bool sparse, int64_t G) {
  if (sparse) return sp24_slab_bytes(f) * (G / 32);
  return f == WFormat::kInt4 ? 8 * G : 16 * G;
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
