// Activation tensors (a pass's input, output, or their gradients) as the blocked engines read and
// write them: NCHW or NHWC (channels_last), float32, bfloat16 or float16. The engines compute in
// float32 and convert at these edges, on the rows they copy anyway (input strips, packed rows, tile
// results), so a channels_last or half-precision tensor is never copied whole into another layout
// or dtype first.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace channelconv {

struct Activations {
  void* data;
  at::ScalarType dtype;  // float32, bfloat16 or float16
  bool channels_last;
  int64_t channels, h, w;

  int64_t plane() const { return h * w; }
  int64_t channel_stride() const { return channels_last ? 1 : plane(); }
  int64_t pixel_stride() const { return channels_last ? channels : 1; }
  // Element (n, c, pixel), pixel = row * w + column.
  int64_t offset(int64_t n, int64_t c, int64_t pixel) const {
    return n * channels * plane() + c * channel_stride() + pixel * pixel_stride();
  }
};

// t as the engines read it: itself when NCHW- or channels_last-contiguous (NCHW where it is both),
// else an NCHW copy. `layout_source` keeps the tensor alive.
Activations activations_of(const at::Tensor& t, at::Tensor& layout_source);

// dst[c * dst_stride + i] = a[n, c0 + c, pixel0 + i] for c < channels, i < count: a run of pixels
// (consecutive in the plane), channel after channel (the forward engine's strips).
void read_channel_major(const Activations& a, int64_t n, int64_t c0, int64_t channels, int64_t pixel0, int64_t count,
                        float* dst, int64_t dst_stride);
// bfloat16 only: dst[q * dst_stride + i] = the 32 bits of (a[n, c0 + 2q, pixel0 + i], a[n, c0 + 2q + 1,
// pixel0 + i]), the first channel in the low half, a zero past `channels`: pairs of channels as the
// dot-product tile reads them (plan.h, channel_pack).
void read_channel_pairs(const Activations& a, int64_t n, int64_t c0, int64_t channels, int64_t pixel0, int64_t count,
                        uint32_t* dst, int64_t dst_stride);
// dst[c * dst_stride + k * width + x] = a[n, c0 + c, ih0 + k, col0 + x] for k < rows, x < width, zero
// where (ih0 + k, col0 + x) lies outside the plane: zero-padded input rows of each channel (the
// forward engine's strips), or with `pairs` of each bfloat16 channel pair as read_channel_pairs
// gives them.
void read_padded_rows(const Activations& a, int64_t n, int64_t c0, int64_t channels, bool pairs, int64_t ih0,
                      int64_t rows, int64_t col0, int64_t width, float* dst, int64_t dst_stride);
// dst[i * dst_stride + c] = a[n, c0 + c, pixel0 + i]: pixel after pixel (the weight gradient's rows).
void read_pixel_major(const Activations& a, int64_t n, int64_t c0, int64_t channels, int64_t pixel0, int64_t count,
                      float* dst, int64_t dst_stride);
// a[n, c0 + c, pixel0 + i * pixel_step] = src[i * src_stride + c], rounded to a's dtype (a tile's
// [pixel][channel] result).
void write_pixel_major(const Activations& a, int64_t n, int64_t c0, int64_t channels, int64_t pixel0,
                       int64_t pixel_step, int64_t count, const float* src, int64_t src_stride);

}  // namespace channelconv
