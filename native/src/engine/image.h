// Image preprocessing for rgb8 input, matching edgemm.processor.preprocess_image (PIL): pad / crop / squash
// to image_size with PIL's bicubic resampling (8-bit fixed-point two-pass convolution, same coefficients
// and rounding as Pillow's ImagingResample), then x / 255, (x - mean) / std in fp32, CHW.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace edgemm {

struct RgbImage {
  int w = 0, h = 0;
  std::vector<uint8_t> px;  // h * w * 3
};

// Pillow-compatible bicubic resize of an 8-bit RGB image.
RgbImage resize_bicubic(const RgbImage& in, int out_w, int out_h);
// mode: "pad" | "crop" | "squash". Returns CHW float [3][size][size].
std::vector<float> preprocess_rgb(const RgbImage& in, int size, const std::string& mode, const float mean[3],
                                  const float stdv[3]);

}  // namespace edgemm
