// Load-time repacking of the canonical weight formats (docs/formats.md) into the kernel layouts
// (kernels.h), plus fp16 conversion and the RoPE table. All ISA-independent.
#include <algorithm>
#include <atomic>
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
                 const int32_t* outlier_channels, int64_t n_outlier, W8A8Weights* out, ThreadPool* pool) {
  EDGEMM_CHECK(qweight && weight_scale && out && N > 0 && K > 0 && ldw >= K && n_outlier >= 0);
  EDGEMM_CHECK(n_outlier == 0 || outlier_channels);
  if (K > 65536) return Status::kOverflow;  // 255 * 127 * K must fit in int32
  for (int64_t n = 0; n < N; ++n)
    if (!std::isfinite(weight_scale[n])) return Status::kInvalidArgument;
  for (int64_t i = 0; i < n_outlier; ++i)
    EDGEMM_CHECK(outlier_channels[i] >= 0 && outlier_channels[i] < K);
  W8A8Weights& w = *out;
  w.N = N;
  w.K = K;
  w.Np = round_up(N, 16);
  w.Kp = round_up(K, 4);
  // + zero slack: the AMX GEMM reads whole 64-deep K blocks, up to 15 k4 rows past a panel's end.
  EDGEMM_ALLOC(w.data, size_t(w.Np * w.Kp + 16 * 3 * 64), true);
  EDGEMM_ALLOC(w.weight_scale, size_t(w.Np), true);
  EDGEMM_ALLOC(w.col_sum, size_t(w.Np), true);
  std::atomic<bool> bad{false};
  // One panel (16 channels) per task: each k4 step copies 16 x 4 bytes into 64 contiguous bytes.
  parallel_for(pool, w.Np / 16, 1, [&](int64_t p0, int64_t p1, int) {
    for (int64_t p = p0; p < p1; ++p) {
      const layout::W8A8PanelPos pp = layout::w8a8_panel(p, w.Kp, w.Np);
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t n = p * 16 + c;
        if (n >= N) break;
        const int8_t* src = qweight + n * ldw;
        int8_t* dst = w.data.data() + pp.base + c * 4;
        int32_t sum = 0;
        bool has_min = false;
        for (int64_t k = 0; k < K; ++k) {
          sum += src[k];
          has_min |= src[k] == -128;
        }
        int64_t k4 = 0;
        for (; k4 < K / 4; ++k4) std::memcpy(dst + k4 * pp.k4_stride, src + 4 * k4, 4);
        for (int64_t k = 4 * k4; k < K; ++k) dst[k4 * pp.k4_stride + (k - 4 * k4)] = src[k];
        if (has_min) bad = true;
        w.col_sum[n] = sum;
        w.weight_scale[n] = weight_scale[n];
      }
    }
  });
  if (bad) return Status::kInvalidArgument;  // code -128 (see kernels.h)
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

// Dense packers work on 32-bit words: 4 consecutive inputs of a row become one lane of a 64-byte chunk.
inline uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

Status pack_dense_int4(const Int4Src& s, int64_t N, WoqWeights* w, ThreadPool* pool) {
  const int64_t K = s.K, G = s.G, ng = K / G;
  const bool z = s.zr != nullptr;
  const int64_t wbytes = layout::woq_weight_bytes(WFormat::kInt4, false, G);
  parallel_for(pool, w->Np / 16, 1, [&](int64_t b0, int64_t b1, int) {
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t g = 0; g < ng; ++g) {
        uint8_t* gp = w->data.data() + blk * w->block_bytes + g * w->group_bytes;
        for (int r = 0; r < 16; ++r) {
          const int64_t n = blk * 16 + r;
          const uint8_t* src = s.qw + n * (K / 2) + g * G / 2;
          for (int64_t c = 0; c < G / 8; ++c) {
            // Source bytes s0..s3 hold inputs 8c..8c+7 (low nibble = even input); the packed lane wants
            // byte j = input 8c+j (low) | input 8c+4+j (high).
            uint32_t o = 0x88888888u;  // padding rows: zero point 8 (their scale is 0 anyway)
            if (n < N) {
              const uint32_t x = load_u32(src + 4 * c);
              const uint32_t s0 = x & 0xff, s1 = (x >> 8) & 0xff, s2 = (x >> 16) & 0xff, s3 = x >> 24;
              o = ((s0 & 0x0f) | ((s2 & 0x0f) << 4)) | (((s0 >> 4) | (s2 & 0xf0)) << 8) |
                  (((s1 & 0x0f) | ((s3 & 0x0f) << 4)) << 16) | (((s1 >> 4) | (s3 & 0xf0)) << 24);
            }
            std::memcpy(gp + c * 64 + r * 4, &o, 4);
          }
        }
        put_scales(s, N, blk, g, gp, wbytes, z);
      }
  });
  return Status::kOk;
}

Status pack_dense_int8(const Int8Src& s, int64_t N, WoqWeights* w, ThreadPool* pool) {
  const int64_t K = s.K, G = s.G, ng = K / G;
  const bool z = s.zr != nullptr;
  const int64_t wbytes = layout::woq_weight_bytes(WFormat::kInt8, false, G);
  parallel_for(pool, w->Np / 16, 1, [&](int64_t b0, int64_t b1, int) {
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t g = 0; g < ng; ++g) {
        uint8_t* gp = w->data.data() + blk * w->block_bytes + g * w->group_bytes;
        for (int r = 0; r < 16; ++r) {
          const int64_t n = blk * 16 + r;
          const int8_t* src = s.qw + n * K + g * G;
          const uint32_t zpad = 0x01010101u * s.stored_zero(0, g);
          for (int64_t c = 0; c < G / 4; ++c) {
            const uint32_t o = n < N ? (load_u32(src + 4 * c) ^ 0x80808080u) : zpad;  // q + 128
            std::memcpy(gp + c * 64 + r * 4, &o, 4);
          }
        }
        put_scales(s, N, blk, g, gp, wbytes, z);
      }
  });
  return Status::kOk;
}

template <class Src>
Status pack_sparse(const Src& s, WFormat f, int64_t N, WoqWeights* w, ThreadPool* pool) {
  const int64_t K = s.K, G = s.G, ng = K / G;
  const bool z = s.zr != nullptr;
  const bool i4 = f == WFormat::kInt4;
  const int64_t wbytes = layout::woq_weight_bytes(f, true, G), slab = layout::sp24_slab_bytes(f);
  // Validate first so a failure leaves no half-packed result that looks valid.
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k0 = 0; k0 < K; k0 += 4) {
      int zp = s.zero(n, k0 / G), nz = 0;
      for (int j = 0; j < 4; ++j) nz += s.code(n, k0 + j) != zp;
      if (nz > 2) return Status::kNotSparse;
    }
  parallel_for(pool, w->Np / 16, 1, [&](int64_t b0, int64_t b1, int) {
  for (int64_t blk = b0; blk < b1; ++blk) {
    for (int64_t g = 0; g < ng; ++g) {
      uint8_t* gp = w->data.data() + blk * w->block_bytes + g * w->group_bytes;
      for (int64_t sl = 0; sl < G / 32; ++sl) {
        uint8_t* sp = gp + sl * slab;
        uint8_t* cp = sp + layout::sp24_code_offset(f);
        for (int r = 0; r < 16; ++r) {
          const int64_t n = blk * 16 + r;
          const uint8_t zs = n < N ? s.stored_zero(n, g) : s.stored_zero(0, g);
          uint32_t word = 0;  // row r's 8 pattern codes
          for (int t = 0; t < 8; ++t) {  // group of 4 inputs k0..k0+3; step st = t / 2 holds 8 inputs
            const int64_t k0 = g * G + sl * 32 + 4 * t;
            const int st = t / 2, h = t % 2;
            int pos[2], cnt = 0;
            if (n < N) {
              const int zp = s.zero(n, g);
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
            word |= uint32_t(layout::pair_code(pos[0], pos[1])) << (3 * t);
            for (int c = 0; c < 2; ++c) {
              const int slot = h * 2 + c;
              uint8_t v = zs;
              if (n < N && s.code(n, k0 + pos[c]) != s.zero(n, g)) v = s.stored(n, k0 + pos[c]);
              if (i4) {
                uint8_t& b = sp[(st / 2) * 64 + r * 4 + slot];
                b |= (st % 2 == 0) ? v : uint8_t(v << 4);
              } else {
                sp[st * 64 + r * 4 + slot] = v;
              }
            }
          }
          for (int i = 0; i < 3; ++i) cp[3 * r + i] = uint8_t(word >> (8 * i));
        }
      }
      put_scales(s, N, blk, g, gp, wbytes, z);
    }
  }
  });
  return Status::kOk;
}

}  // namespace

Status woq_pack_int4(const uint8_t* qweight, const uint16_t* scales, const uint8_t* zeros, int64_t N,
                     int64_t K, int64_t G, WoqWeights* out, ThreadPool* pool) {
  EDGEMM_CHECK(qweight && scales && K % 2 == 0);
  Status st = woq_prepare(WFormat::kInt4, false, zeros != nullptr, N, K, G, out);
  if (st != Status::kOk) return st;
  if (zeros)
    for (int64_t i = 0; i < N * (K / G); ++i) EDGEMM_CHECK(zeros[i] <= 15);
  return pack_dense_int4(Int4Src{qweight, scales, zeros, K, G}, N, out, pool);
}

Status woq_pack_int8(const int8_t* qweight, const uint16_t* scales, const int8_t* zeros, int64_t N,
                     int64_t K, int64_t G, WoqWeights* out, ThreadPool* pool) {
  EDGEMM_CHECK(qweight && scales);
  Status st = woq_prepare(WFormat::kInt8, false, zeros != nullptr, N, K, G, out);
  if (st != Status::kOk) return st;
  return pack_dense_int8(Int8Src{qweight, scales, zeros, K, G}, N, out, pool);
}

Status woq_pack_int4_sparse24(const uint8_t* qweight, const uint16_t* scales, const uint8_t* zeros,
                              int64_t N, int64_t K, int64_t G, WoqWeights* out, ThreadPool* pool) {
  EDGEMM_CHECK(qweight && scales && K % 2 == 0);
  Status st = woq_prepare(WFormat::kInt4, true, zeros != nullptr, N, K, G, out);
  if (st != Status::kOk) return st;
  if (zeros)
    for (int64_t i = 0; i < N * (K / G); ++i) EDGEMM_CHECK(zeros[i] <= 15);
  st = pack_sparse(Int4Src{qweight, scales, zeros, K, G}, WFormat::kInt4, N, out, pool);
  if (st != Status::kOk) *out = WoqWeights();
  return st;
}

Status woq_pack_int8_sparse24(const int8_t* qweight, const uint16_t* scales, const int8_t* zeros,
                              int64_t N, int64_t K, int64_t G, WoqWeights* out, ThreadPool* pool) {
  EDGEMM_CHECK(qweight && scales);
  Status st = woq_prepare(WFormat::kInt8, true, zeros != nullptr, N, K, G, out);
  if (st != Status::kOk) return st;
  st = pack_sparse(Int8Src{qweight, scales, zeros, K, G}, WFormat::kInt8, N, out, pool);
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
Status f32_pack(const float* W, int64_t ldw, int64_t N, int64_t K, F32Weights* out, ThreadPool* pool) {
  EDGEMM_CHECK(W && out && N > 0 && K > 0 && ldw >= K);
  out->N = N;
  out->K = K;
  out->Np = round_up(N, 16);
  EDGEMM_ALLOC(out->data, size_t(out->Np * K), true);
  parallel_for(pool, out->Np / 16, 1, [&](int64_t p0, int64_t p1, int) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t k0 = 0; k0 < K; k0 += 64) {  // 16 rows x 64 inputs at a time
        const int64_t k1 = std::min(K, k0 + 64);
        for (int64_t c = 0; c < 16 && p * 16 + c < N; ++c) {
          const float* src = W + (p * 16 + c) * ldw;
          float* dst = out->data.data() + p * K * 16 + c;
          for (int64_t k = k0; k < k1; ++k) dst[k * 16] = src[k];
        }
      }
  });
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
