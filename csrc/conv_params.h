// Arguments of one convolution: the checks every op runs on them, the output-size rule and
// the memory-format rule. The one place in C++ for these; every kernel (CPU and CUDA) calls it.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <limits>
#include <optional>
#include <string>

#include "conv_index.h"

namespace channelconv {

// Everything a kernel needs to know about one convolution, in host integers.
struct ConvShape {
  int64_t batch = 0, in_channels = 0, in_h = 0, in_w = 0;   // input  N, C, H, W
  int64_t out_channels = 0, kernel_h = 0, kernel_w = 0;     // weight K, (C / groups), k_h, k_w
  int64_t groups = 1;
  int64_t out_h = 0, out_w = 0;                             // output H_o, W_o
  std::array<int64_t, 2> stride{1, 1}, padding{0, 0}, dilation{1, 1};

  int64_t in_per_group() const { return in_channels / groups; }
  int64_t out_per_group() const { return out_channels / groups; }
  std::array<int64_t, 4> input_sizes() const { return {batch, in_channels, in_h, in_w}; }
  int64_t image_numel() const { return in_channels * in_h * in_w; }  // elements of one input image
  std::array<int64_t, 4> weight_sizes() const { return {out_channels, in_per_group(), kernel_h, kernel_w}; }
  std::array<int64_t, 4> output_sizes() const { return {batch, out_channels, out_h, out_w}; }
  // Rows of one group's column matrix: (c, r, s) over the group's input channels.
  int64_t column_rows() const { return in_per_group() * kernel_h * kernel_w; }

  template <typename index_t>
  Geometry<index_t> geometry() const {
    return Geometry<index_t>{
        Axis<index_t>{index_t(in_h), index_t(out_h), index_t(kernel_h), index_t(stride[0]),
                      index_t(padding[0]), index_t(dilation[0])},
        Axis<index_t>{index_t(in_w), index_t(out_w), index_t(kernel_w), index_t(stride[1]),
                      index_t(padding[1]), index_t(dilation[1])}};
  }
};

// Output extent of one axis: floor((in + 2*pad - dilation*(k-1) - 1) / stride) + 1.
inline int64_t output_extent(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  return (in + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

// The checks F.conv2d makes, with its message phrases, on sizes alone. Every op funnels here.
ConvShape make_shape(at::IntArrayRef input_sizes, at::IntArrayRef weight_sizes, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// A tensor argument: defined, 4-D, a supported floating dtype, on `like`'s device and dtype.
void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name);

// Op entry checks: the tensors, then make_shape; backward ops also check grad_output's size.
ConvShape check_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
ConvShape check_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups);
ConvShape check_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups);

// A result is channels_last when either operand it is computed from is (as F.conv2d does; on
// CUDA not for float64, again as F.conv2d);
// kernels compute in NCHW and hand back `result.contiguous(format)`.
at::MemoryFormat result_format(const at::Tensor& a, const at::Tensor& b);

// The kernels loop in NCHW; accept any strides by making a contiguous copy only when needed.
inline at::Tensor as_nchw(const at::Tensor& t) { return t.contiguous(); }

inline bool fits_in_int32(int64_t n) { return n <= std::numeric_limits<int32_t>::max(); }

// Largest column buffer any op has allocated since the last reset (a statistic for tests and
// cost reports; the workspace limit is a promise about it).
void note_workspace(int64_t bytes);
int64_t workspace_peak();
void reset_workspace_peak();

}  // namespace channelconv
