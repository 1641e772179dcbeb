// Load-time repacking of the canonical weight formats (docs/formats.md) into the kernel layouts
// (kernels.h), plus fp16 conversion and the RoPE table. All ISA-independent.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "kernels.h"
#include "layout.h"

namespace edgemm {
namespace kernels {

using layout::round_up;

const char* status_string(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kUnsupported: return "unsupported";
    case Status::kNotSparse: return "weights are not 2:4 sparse";
    case Status::kOutOfMemory: return "out of memory";
    case Status::kOverflow: return "dimension too large for int32 accumulation";
  }
  return "unknown status";
}

float fp16_to_fp32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400) == 0);
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t fp32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t absx = x & 0x7fffffff;
  if (absx >= 0x7f800000) return uint16_t(sign | 0x7c00 | (absx > 0x7f800000 ? 0x200 : 0));
  if (absx >= 0x477ff000) return uint16_t(sign | 0x7c00);  // rounds to >= 65520: inf
  if (absx < 0x38800000) {                                  // subnormal half or zero
    float a;
    std::memcpy(&a, &absx, 4);
    // a * 2^24 rounded to nearest even gives the subnormal mantissa.
    float m = a * 16777216.0f;
    uint32_t mi = static_cast<uint32_t>(std::nearbyint(m));
    return uint16_t(sign | mi);
  }
  uint32_t mant = absx & 0x7fffff;
  uint32_t exp = (absx >> 23) - 127 + 15;
  uint32_t h = exp << 10 | mant >> 13;
  uint32_t rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;  // may carry into the exponent: still correct
  return uint16_t(sign | h);
}

#define EDGEMM_CHECK(cond) \
  do {                     \
    if (!(cond)) return Status::kInvalidArgument; \
  } while (0)
#define EDGEMM_ALLOC(buf, n, zero) \
  do {                             \
    if (!(buf).resize((n), (zero))) return Status::kOutOfMemory; \
  } while (0)

// ---------------------------------------------------------------------------------------------------
// W8A8
// ---------------------------------------------------------------------------------------------------
Status w8a8_pack(const int8_t* qweight, int64_t ldw, const float* weight_scale, int64_t N, int64_t K,
                 const int32_t* outlier_channels, int64_t n_outlier, W8A8Weights* out) {
  EDGEMM_CHECK(qweight && weight_scale && out && N > 0 && K > 0 && ldw >= K && n_outlier >= 0);
  EDGEMM_CHECK(n_outlier == 0 || outlier_channels);
  if (K > 65536) return Status::kOverflow;  // 255 * 127 * K must fit in int32
  for (int64_t n = 0; n < N; ++n) {
    if (!std::isfinite(weight_scale[n])) return Status::kInvalidArgument;
    for (int64_t k = 0; k < K; ++k)
      if (qweight[n * ldw + k] == -128) return Status::kInvalidArgument;
  }
  for (int64_t i = 0; i < n_outlier; ++i)
    EDGEMM_CHECK(outlier_channels[i] >= 0 && outlier_channels[i] < K);
  W8A8Weights& w = *out;
  w.N = N;
  w.K = K;
  w.Np = round_up(N, 16);
  w.Kp = round_up(K, 4);
  EDGEMM_ALLOC(w.data, size_t(w.Np * w.Kp), true);
  EDGEMM_ALLOC(w.weight_scale, size_t(w.Np), true);
  EDGEMM_ALLOC(w.col_sum, size_t(w.Np), true);
  for (int64_t n = 0; n < N; ++n) {
    const layout::W8A8PanelPos pp = layout::w8a8_panel(n / 16, w.Kp, w.Np);
    int8_t* panel = w.data.data() + pp.base + (n % 16) * 4;
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) {
      int8_t q = qweight[n * ldw + k];
      panel[(k / 4) * pp.k4_stride + (k % 4)] = q;
      s += q;
    }
    w.col_sum[n] = s;
    w.weight_scale[n] = weight_scale[n];
  }
  try {
    w.hot_channel.clear();
    w.hot_index.assign(size_t(K), -1);
    for (int64_t i = 0; i < n_outlier; ++i) {
      int32_t c = outlier_channels[i];
      if (w.hot_index[c] >= 0) continue;
      w.hot_index[c] = static_cast<int32_t>(w.hot_channel.size());
      w.hot_channel.push_back(c);
    }
  } catch (const std::bad_alloc&) {
    return Status::kOutOfMemory;
  }
  if (w.hot_channel.empty()) {
    w.hot_index.clear();
    w.hot_cols.release();
  } else {
    EDGEMM_ALLOC(w.hot_cols, w.hot_channel.size() * size_t(w.Np), true);
    for (size_t i = 0; i < w.hot_channel.size(); ++i)
      for (int64_t n = 0; n < N; ++n)
        w.hot_cols[i * w.Np + n] =
            static_cast<float>(qweight[n * ldw + w.hot_channel[i]]) * weight_scale[n];
  }
  return Status::kOk;
}

// ---------------------------------------------------------------------------------------------------
// Weight-only int4 / int8, dense and 2:4
// ---------------------------------------------------------------------------------------------------
namespace {

// Canonical accessors.
struct Int4Src {
  const uint8_t* qw;
  const uint16_t* sc;
  const uint8_t* zr;
  int64_t K, G;
  int code(int64_t n, int64_t k) const { return (qw[n * (K / 2) + k / 2] >> (4 * (k & 1))) & 15; }
  int zero(int64_t n, int64_t g) const { return zr ? zr[n * (K / G) + g] : 8; }
  uint8_t stored(int64_t n, int64_t k) const { return uint8_t(code(n, k)); }
  uint8_t stored_zero(int64_t n, int64_t g) const { return uint8_t(zero(n, g)); }
};
struct Int8Src {
  const int8_t* qw;
  const uint16_t* sc;
  const int8_t* zr;
  int64_t K, G;
  int code(int64_t n, int64_t k) const { return qw[n * K + k]; }
  int zero(int64_t n, int64_t g) const { return zr ? zr[n * (K / G) + g] : 0; }
  uint8_t stored(int64_t n, int64_t k) const { return uint8_t(code(n, k) + 128); }
  uint8_t stored_zero(int64_t n, int64_t g) const { return uint8_t(zero(n, g) + 128); }
};

Status woq_prepare(WFormat f, bool sparse, bool zeros, int64_t N, int64_t K, int64_t G, WoqWeights* w) {
  EDGEMM_CHECK(w && N > 0 && K > 0 && G > 0 && G % 32 == 0 && K % G == 0);
  if (K > 65536) return Status::kOverflow;
  w->format = f;
  w->sparse24 = sparse;
  w->has_zeros = zeros;
  w->N = N;
  w->K = K;
  w->G = G;
  w->Np = round_up(N, 16);
  w->group_bytes = layout::woq_group_bytes(f, sparse, G, zeros);
  w->block_bytes = (K / G) * w->group_bytes;
  EDGEMM_ALLOC(w->data, size_t((w->Np / 16) * w->block_bytes), true);
  return Status::kOk;
}

// Writes scales (and zeros) of group g of block blk.
template <class Src>
void put_scales(const Src& s, int64_t N, int64_t blk, int64_t g, uint8_t* gp, int64_t wbytes,
                bool zeros) {
  uint16_t* sc = reinterpret_cast<uint16_t*>(gp + wbytes);
  for (int r = 0; r < 16; ++r) {
    int64_t n = blk * 16 + r;
    uint16_t v = n < N ? s.sc[n * (s.K / s.G) + g] : 0;
    std::memcpy(sc + r, &v, 2);
    if (zeros) gp[wbytes + 32 + r] = n < N ? s.stored_zero(n, g) : s.stored_zero(0, g);
  }
}

template <class Src>
Status pack_dense(const Src& s, WFormat f, int64_t N, WoqWeights* w) {
  const int64_t K = s.K, G = s.G, ng = K / G;
  const bool z = s.zr != nullptr;
  const int64_t wbytes = layout::woq_weight_bytes(f, false, G);
  for (int64_t blk = 0; blk < w->Np / 16; ++blk) {
    for (int64_t g = 0; g < ng; ++g) {
      uint8_t* gp = w->data.data() + blk * w->block_bytes + g * w->group_bytes;
      for (int r = 0; r < 16; ++r) {
        int64_t n = blk * 16 + r;
        for (int64_t kk = 0; kk < G; ++kk) {
          int64_t k = g * G + kk;
          // Padding rows hold the zero point of row 0 (scale 0 anyway).
          uint8_t v = n < N ? s.stored(n, k) : s.stored_zero(0, g);
          if (f == WFormat::kInt4) {
            uint8_t& b = gp[(kk / 8) * 64 + r * 4 + (kk % 4)];
            b |= (kk % 8) < 4 ? v : uint8_t(v << 4);
          } else {
            gp[(kk / 4) * 64 + r * 4 + (kk % 4)] = v;
          }
        }
      }
      put_scales(s, N, blk, g, gp, wbytes, z);
    }
  }
  return Status::kOk;
}

template <class Src>
Status pack_sparse(const Src& s, WFormat f, int64_t N, WoqWeights* w) {
  const int64_t K = s.K, G = s.G, ng = K / G;
  const bool z = s.zr != nullptr;
  const bool i4 = f == WFormat::kInt4;
  const int64_t wbytes = layout::woq_weight_bytes(f, true, G), slab = i4 ? 192 : 320;
  // Validate first so a failure leaves no half-packed result that looks valid.
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k0 = 0; k0 < K; k0 += 4) {
      int zp = s.zero(n, k0 / G), nz = 0;
      for (int j = 0; j < 4; ++j) nz += s.code(n, k0 + j) != zp;
      if (nz > 2) return Status::kNotSparse;
    }
  for (int64_t blk = 0; blk < w->Np / 16; ++blk) {
    for (int64_t g = 0; g < ng; ++g) {
      uint8_t* gp = w->data.data() + blk * w->block_bytes + g * w->group_bytes;
      for (int64_t sl = 0; sl < G / 32; ++sl) {
        uint8_t* sp = gp + sl * slab;
        uint8_t* ip = sp + (i4 ? 128 : 256);
        for (int r = 0; r < 16; ++r) {
          int64_t n = blk * 16 + r;
          for (int st = 0; st < 4; ++st) {
            uint8_t ib = 0;
            for (int h = 0; h < 2; ++h) {
              int64_t k0 = g * G + sl * 32 + st * 8 + h * 4;
              int pos[2], cnt = 0;
              uint8_t zs = n < N ? s.stored_zero(n, g) : s.stored_zero(0, g);
              if (n < N) {
                int zp = s.zero(n, g);
                for (int j = 0; j < 4; ++j)
                  if (s.code(n, k0 + j) != zp) pos[cnt++] = j;
              }
              // Fill with unused positions holding the zero code.
              for (int j = 0; cnt < 2 && j < 4; ++j) {
                bool used = false;
                for (int c = 0; c < cnt; ++c) used |= pos[c] == j;
                if (!used) pos[cnt++] = j;
              }
              std::sort(pos, pos + 2);
              for (int c = 0; c < 2; ++c) {
                int slot = h * 2 + c;
                uint8_t v = zs;
                if (n < N && s.code(n, k0 + pos[c]) != s.zero(n, g)) v = s.stored(n, k0 + pos[c]);
                ib |= uint8_t(pos[c] << (2 * slot));
                if (i4) {
                  uint8_t& b = sp[(st / 2) * 64 + r * 4 + slot];
                  b |= (st % 2 == 0) ? v : uint8_t(v << 4);
                } else {
                  sp[st * 64 + r * 4 + slot] = v;
                }
              }
            }
            ip[(r / 2) * 8 + st * 2 + (r % 2)] = ib;
          }
        }
      }
      put_scales(s, N, blk, g, gp, wbytes, z);
    }
  }
  return Status::kOk;
}

}  // namespace

Status woq_pack_int4(const uint8_t* qweight, const uint16_t* scales, const uint8_t* zeros, int64_t N,
                     int64_t K, int64_t G, WoqWeights* out) {
  EDGEMM_CHECK(qweight && scales && K % 2 == 0);
  Status st = woq_prepare(WFormat::kInt4, false, zeros != nullptr, N, K, G, out);
  if (st != Status::kOk) return st;
  if (zeros)
    for (int64_t i = 0; i < N * (K / G); ++i) EDGEMM_CHECK(zeros[i] <= 15);
  return pack_dense(Int4Src{qweight, scales, zeros, K, G}, WFormat::kInt4, N, out);
}

Status woq_pack_int8(const int8_t* qweight, const uint16_t* scales, const int8_t* zeros, int64_t N,
                     int64_t K, int64_t G, WoqWeights* out) {
  EDGEMM_CHECK(qweight && scales);
  Status st = woq_prepare(WFormat::kInt8, false, zeros != nullptr, N, K, G, out);
  if (st != Status::kOk) return st;
  return pack_dense(Int8Src{qweight, scales, zeros, K, G}, WFormat::kInt8, N, out);
}

Status woq_pack_int4_sparse24(const uint8_t* qweight, const uint16_t* scales, const uint8_t* zeros,
                              int64_t N, int64_t K, int64_t G, WoqWeights* out) {
  EDGEMM_CHECK(qweight && scales && K % 2 == 0);
  Status st = woq_prepare(WFormat::kInt4, true, zeros != nullptr, N, K, G, out);
  if (st != Status::kOk) return st;
  if (zeros)
    for (int64_t i = 0; i < N * (K / G); ++i) EDGEMM_CHECK(zeros[i] <= 15);
  st = pack_sparse(Int4Src{qweight, scales, zeros, K, G}, WFormat::kInt4, N, out);
  if (st != Status::kOk) *out = WoqWeights();
  return st;
}

Status woq_pack_int8_sparse24(const int8_t* qweight, const uint16_t* scales, const int8_t* zeros,
                              int64_t N, int64_t K, int64_t G, WoqWeights* out) {
  EDGEMM_CHECK(qweight && scales);
  Status st = woq_prepare(WFormat::kInt8, true, zeros != nullptr, N, K, G, out);
  if (st != Status::kOk) return st;
  st = pack_sparse(Int8Src{qweight, scales, zeros, K, G}, WFormat::kInt8, N, out);
  if (st != Status::kOk) *out = WoqWeights();
  return st;
}

size_t woq_bytes(const WoqWeights& w) { return size_t((w.Np / 16) * w.block_bytes); }

int64_t woq_act_block(int64_t G) {
  if (G % 128 == 0) return 128;
  if (G % 64 == 0) return 64;
  return 32;
}

// ---------------------------------------------------------------------------------------------------
// fp32
// ---------------------------------------------------------------------------------------------------
Status f32_pack(const float* W, int64_t ldw, int64_t N, int64_t K, F32Weights* out) {
  EDGEMM_CHECK(W && out && N > 0 && K > 0 && ldw >= K);
  out->N = N;
  out->K = K;
  out->Np = round_up(N, 16);
  EDGEMM_ALLOC(out->data, size_t(out->Np * K), true);
  for (int64_t n = 0; n < N; ++n) {
    float* p = out->data.data() + (n / 16) * K * 16 + (n % 16);
    for (int64_t k = 0; k < K; ++k) p[k * 16] = W[n * ldw + k];
  }
  return Status::kOk;
}

// ---------------------------------------------------------------------------------------------------
// RoPE table
// ---------------------------------------------------------------------------------------------------
Status rope_init(int64_t max_pos, int64_t rot_dim, float theta, RopeTable* out) {
  EDGEMM_CHECK(out && max_pos > 0 && rot_dim > 0 && rot_dim % 2 == 0 && theta > 0);
  const int64_t half = rot_dim / 2;
  out->max_pos = max_pos;
  out->rot_dim = rot_dim;
  EDGEMM_ALLOC(out->cos, size_t(max_pos * half), false);
  EDGEMM_ALLOC(out->sin, size_t(max_pos * half), false);
  std::vector<float> inv(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    float e = static_cast<float>(2 * i) / static_cast<float>(rot_dim);
    inv[i] = 1.0f / std::pow(theta, e);
  }
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t i = 0; i < half; ++i) {
      float ang = static_cast<float>(p) * inv[i];
      out->cos[p * half + i] = static_cast<float>(std::cos(static_cast<double>(ang)));
      out->sin[p * half + i] = static_cast<float>(std::sin(static_cast<double>(ang)));
    }
  return Status::kOk;
}

}  // namespace kernels
}  // namespace edgemm
