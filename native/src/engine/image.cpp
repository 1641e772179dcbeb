#include "image.h"

#include <algorithm>
#include <cmath>

namespace edgemm {
namespace {

double bicubic(double x) {
  const double a = -0.5;
  if (x < 0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

constexpr int kPrecisionBits = 32 - 8 - 2;

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // [out][2]: xmin, xcount
  std::vector<int32_t> kk;  // [out][ksize] fixed point
};

// Pillow's precompute_coeffs (support 2 for bicubic) + normalize_coeffs_8bpc.
Coeffs precompute(int in_size, int out_size) {
  double scale = double(in_size) / out_size;
  double filterscale = std::max(scale, 1.0);
  double support = 2.0 * filterscale;
  int ksize = int(std::ceil(support)) * 2 + 1;
  Coeffs c;
  c.ksize = ksize;
  c.bounds.assign(size_t(out_size) * 2, 0);
  c.kk.assign(size_t(out_size) * ksize, 0);
  std::vector<double> k(ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    double center = (xx + 0.5) * scale;
    double ww = 0.0;
    double ss = 1.0 / filterscale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      double w = bicubic((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) k[x] /= ww;
    }
    for (int x = xmax; x < ksize; ++x) k[x] = 0;
    for (int x = 0; x < ksize; ++x) {
      double v = k[x] * (1 << kPrecisionBits);
      c.kk[size_t(xx) * ksize + x] = int32_t(v < 0 ? -0.5 + v : 0.5 + v);
    }
    c.bounds[size_t(xx) * 2] = xmin;
    c.bounds[size_t(xx) * 2 + 1] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t in) {
  int32_t v = in >> kPrecisionBits;
  if (v < 0) return 0;
  if (v > 255) return 255;
  return uint8_t(v);
}

RgbImage horizontal(const RgbImage& in, int out_w) {
  Coeffs c = precompute(in.w, out_w);
  RgbImage o;
  o.w = out_w;
  o.h = in.h;
  o.px.resize(size_t(o.w) * o.h * 3);
  for (int y = 0; y < in.h; ++y)
    for (int xx = 0; xx < out_w; ++xx) {
      int xmin = c.bounds[size_t(xx) * 2], xmax = c.bounds[size_t(xx) * 2 + 1];
      const int32_t* k = &c.kk[size_t(xx) * c.ksize];
      for (int ch = 0; ch < 3; ++ch) {
        int32_t ss = 1 << (kPrecisionBits - 1);
        for (int x = 0; x < xmax; ++x) ss += int32_t(in.px[(size_t(y) * in.w + x + xmin) * 3 + ch]) * k[x];
        o.px[(size_t(y) * out_w + xx) * 3 + ch] = clip8(ss);
      }
    }
  return o;
}

RgbImage vertical(const RgbImage& in, int out_h) {
  Coeffs c = precompute(in.h, out_h);
  RgbImage o;
  o.w = in.w;
  o.h = out_h;
  o.px.resize(size_t(o.w) * o.h * 3);
  for (int yy = 0; yy < out_h; ++yy) {
    int ymin = c.bounds[size_t(yy) * 2], ymax = c.bounds[size_t(yy) * 2 + 1];
    const int32_t* k = &c.kk[size_t(yy) * c.ksize];
    for (int xx = 0; xx < in.w; ++xx)
      for (int ch = 0; ch < 3; ++ch) {
        int32_t ss = 1 << (kPrecisionBits - 1);
        for (int y = 0; y < ymax; ++y) ss += int32_t(in.px[(size_t(y + ymin) * in.w + xx) * 3 + ch]) * k[y];
        o.px[(size_t(yy) * in.w + xx) * 3 + ch] = clip8(ss);
      }
  }
  return o;
}

// Python's round() (half to even) for the crop sizes.
long py_round(double v) { return long(std::nearbyint(v)); }

}  // namespace

RgbImage resize_bicubic(const RgbImage& in, int out_w, int out_h) {
  RgbImage cur = in;
  if (out_w != cur.w) cur = horizontal(cur, out_w);
  if (out_h != cur.h) cur = vertical(cur, out_h);
  return cur;
}

std::vector<float> preprocess_rgb(const RgbImage& src, int s, const std::string& mode, const float mean[3],
                                  const float stdv[3]) {
  RgbImage im = src;
  if (im.w != s || im.h != s) {
    int w = im.w, h = im.h;
    if (mode == "pad" && w != h) {
      int side = std::max(w, h);
      RgbImage canvas;
      canvas.w = canvas.h = side;
      canvas.px.resize(size_t(side) * side * 3);
      uint8_t fill[3];
      for (int ch = 0; ch < 3; ++ch) fill[ch] = uint8_t(py_round(double(mean[ch]) * 255));
      for (size_t i = 0; i < size_t(side) * side; ++i)
        for (int ch = 0; ch < 3; ++ch) canvas.px[i * 3 + ch] = fill[ch];
      int ox = (side - w) / 2, oy = (side - h) / 2;
      for (int y = 0; y < h; ++y)
        std::copy(&im.px[size_t(y) * w * 3], &im.px[size_t(y) * w * 3] + size_t(w) * 3,
                  &canvas.px[(size_t(y + oy) * side + ox) * 3]);
      im = std::move(canvas);
    } else if (mode == "crop" && w != h) {
      double scale = double(s) / std::min(w, h);
      int nw = int(std::max<long>(s, py_round(w * scale))), nh = int(std::max<long>(s, py_round(h * scale)));
      im = resize_bicubic(im, nw, nh);
      int left = (nw - s) / 2, top = (nh - s) / 2;
      RgbImage c;
      c.w = c.h = s;
      c.px.resize(size_t(s) * s * 3);
      for (int y = 0; y < s; ++y)
        std::copy(&im.px[(size_t(y + top) * nw + left) * 3], &im.px[(size_t(y + top) * nw + left) * 3] + size_t(s) * 3,
                  &c.px[size_t(y) * s * 3]);
      im = std::move(c);
    }
    if (im.w != s || im.h != s) im = resize_bicubic(im, s, s);
  }
  std::vector<float> out(size_t(3) * s * s);
  for (int y = 0; y < s; ++y)
    for (int x = 0; x < s; ++x)
      for (int ch = 0; ch < 3; ++ch) {
        float v = float(im.px[(size_t(y) * s + x) * 3 + ch]) / 255.0f;
        out[(size_t(ch) * s + y) * s + x] = (v - mean[ch]) / stdv[ch];
      }
  return out;
}

}  // namespace edgemm
