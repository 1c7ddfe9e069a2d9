// Convolution lowered to GEMM: the im2col and 1x1 algorithms.
//
// The driver (chunking by workspace, the GEMM calls through ATen, gradients) is device-neutral;
// only the two data-movement kernels below differ by device. Each backend passes its own.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "conv_params.h"
#include "plan.h"

namespace channelconv {

// Calls fn(out) with col2im's output `grad_images` as a pointer to the columns' element type
// scalar_t or to its op-math type: the two dtypes BandKernels::col2im may write.
template <typename scalar_t, typename Fn>
void with_col2im_output(const at::Tensor& grad_images, Fn fn) {
  if (grad_images.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    fn(grad_images.mutable_data_ptr<scalar_t>());
  } else {
    TORCH_INTERNAL_ASSERT(grad_images.scalar_type() == c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value);
    fn(grad_images.mutable_data_ptr<at::opmath_type<scalar_t>>());
  }
}

// Each kernel moves one band, output rows [row0, row0+rows), of a run of images at once: one
// launch per band on the GPU.
struct BandKernels {
  // columns (images, C*k_h*k_w, rows*W_o), each image's matrix with unit-stride rows  <-  images
  // (images, C, H, W), NCHW-contiguous. Contiguous, except on the CPU, whose side-by-side bands
  // space the rows further apart (plan.h, LoweredPlan).
  void (*im2col)(const at::Tensor& images, const at::Tensor& columns, const ConvShape& s, int64_t row0, int64_t rows);
  // grad_images (images, C, H, W) = (grad_images if `accumulate`, else 0) + what each element of
  // `columns` (laid out as above) contributed to. A gather: every input element sums the column
  // entries that read it (no atomics), and is written even if none does, so a band that does not
  // accumulate needs no zero fill before it. The sum runs in the op-math type; grad_images holds
  // the columns' dtype or the op-math type (when several bands are summed into it).
  void (*col2im)(const at::Tensor& columns, const at::Tensor& grad_images, const ConvShape& s, int64_t row0,
                 int64_t rows, bool accumulate);
  // The same for channels_last data (plan.h, NHWC): columns (images*rows*W_o, C*k_h*k_w),
  // contiguous, one row per output pixel, laid out (group, r, t, channel of the group)  <-  images,
  // channels_last. A backend without them (nullptr) runs channels_last operands through the NCHW kernels.
  void (*im2col_nhwc)(const at::Tensor& images, const at::Tensor& columns, const ConvShape& s, int64_t row0,
                      int64_t rows) = nullptr;
  void (*col2im_nhwc)(const at::Tensor& columns, const at::Tensor& grad_images, const ConvShape& s, int64_t row0,
                      int64_t rows, bool accumulate) = nullptr;
  // The GPU's kernels (or their emulation): the driver runs the GPU's plan (plan.h, plan_lowered).
  bool gpu = false;
};

at::Tensor lowered_forward(const BandKernels& kernels, Lowering lowering, const at::Tensor& input,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t workspace_limit);

at::Tensor lowered_backward_input(const BandKernels& kernels, Lowering lowering, const at::Tensor& grad_output,
                                  const at::Tensor& weight, at::IntArrayRef input_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                  int64_t workspace_limit);

at::Tensor lowered_backward_weight(const BandKernels& kernels, Lowering lowering, const at::Tensor& grad_output,
                                   const at::Tensor& input, at::IntArrayRef weight_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                   int64_t workspace_limit);

// The six op kernels of one device, given its band kernels: each backend registers these.
// The drivers make many views of their operands and outputs (bands, images, groups); none of
// them is seen by autograd, so they are made below ADInplaceOrView, without the view tracking
// that would otherwise cost a good part of a small call (benchmarks/NOTES.md v7).
template <const BandKernels& kernels, Lowering lowering>
struct LoweredOps {
  static at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            int64_t workspace_limit) {
    const at::AutoDispatchBelowADInplaceOrView untracked_views;
    return lowered_forward(kernels, lowering, input, weight, bias, stride, padding, dilation, groups,
                           workspace_limit);
  }
  static at::Tensor backward_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                   at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, int64_t workspace_limit) {
    const at::AutoDispatchBelowADInplaceOrView untracked_views;
    return lowered_backward_input(kernels, lowering, grad_output, weight, input_size, stride, padding, dilation,
                                  groups, workspace_limit);
  }
  static at::Tensor backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                    at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, int64_t workspace_limit) {
    const at::AutoDispatchBelowADInplaceOrView untracked_views;
    return lowered_backward_weight(kernels, lowering, grad_output, input, weight_size, stride, padding, dilation,
                                   groups, workspace_limit);
  }
};

// Registers im2col_* and conv1x1_* for one dispatch key (used inside TORCH_LIBRARY_IMPL).
template <const BandKernels& kernels>
void register_lowered_ops(torch::Library& m) {
  using Im2col = LoweredOps<kernels, Lowering::Im2col>;
  using OneByOne = LoweredOps<kernels, Lowering::OneByOne>;
  m.impl("im2col_forward", &Im2col::forward);
  m.impl("im2col_backward_input", &Im2col::backward_input);
  m.impl("im2col_backward_weight", &Im2col::backward_weight);
  m.impl("conv1x1_forward", &OneByOne::forward);
  m.impl("conv1x1_backward_input", &OneByOne::backward_input);
  m.impl("conv1x1_backward_weight", &OneByOne::backward_weight);
}

}  // namespace channelconv
