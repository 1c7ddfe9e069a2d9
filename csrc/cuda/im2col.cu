// CUDA data movement for the GEMM-lowered algorithms (im2col, 1x1): the two band kernels of
// BandKernels (lowered.h). The GEMMs stay in csrc/lowered.cpp and run on cuBLAS through ATen.
//
//   im2col: one thread per column element (row, pixel) of the (C*k_h*k_w, rows*W_o) band.
//   col2im: one thread per input element (c, hi, wi), gathering what the band's columns hold
//           for it (no atomics, a fixed summation order, so the result is deterministic).
//
// The per-thread work is in kernel_bodies.h (shared with the CPU emulation in csrc/testing/emulate_kernels.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../lowered.h"
#include "kernel_bodies.h"

namespace channelconv {
namespace gpu {
namespace {

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    im2col_kernel(const scalar_t* __restrict__ image, scalar_t* __restrict__ columns, Geometry<index_t> g,
                  index_t row0, index_t band_pixels, int64_t total) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    im2col_element(image, columns, g, row0, band_pixels, index_t(e));
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    col2im_kernel(const scalar_t* __restrict__ columns, acc_t* __restrict__ grad_image, Geometry<index_t> g,
                  index_t row0, index_t rows, int64_t total) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    col2im_element(columns, grad_image, g, row0, rows, index_t(e));
  }
}

template <typename scalar_t, typename index_t>
void launch_im2col(const at::Tensor& image, const at::Tensor& columns, const ConvShape& s, int64_t row0,
                   int64_t rows) {
  const int64_t total = columns.numel();
  im2col_kernel<scalar_t, index_t><<<grid_size(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      image.const_data_ptr<scalar_t>(), columns.mutable_data_ptr<scalar_t>(), s.geometry<index_t>(), index_t(row0),
      index_t(rows * s.out_w), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, typename index_t>
void launch_col2im(const at::Tensor& columns, const at::Tensor& grad_image, const ConvShape& s, int64_t row0,
                   int64_t rows) {
  const int64_t total = grad_image.numel();
  col2im_kernel<scalar_t, acc_t, index_t><<<grid_size(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      columns.const_data_ptr<scalar_t>(), grad_image.mutable_data_ptr<acc_t>(), s.geometry<index_t>(), index_t(row0),
      index_t(rows), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The layouts lowered.cpp hands over: image / grad_image one contiguous (C, H, W) image,
// columns the contiguous (C*k_h*k_w, rows*W_o) band.
void check_band(const at::Tensor& image, const at::Tensor& columns, const ConvShape& s, int64_t row0, int64_t rows) {
  TORCH_INTERNAL_ASSERT(image.is_cuda() && columns.device() == image.device());
  TORCH_INTERNAL_ASSERT(image.is_contiguous() && columns.is_contiguous());
  TORCH_INTERNAL_ASSERT(image.numel() == s.in_channels * s.in_h * s.in_w);
  TORCH_INTERNAL_ASSERT(columns.numel() == s.in_channels * s.kernel_h * s.kernel_w * rows * s.out_w);
  TORCH_INTERNAL_ASSERT(row0 >= 0 && rows > 0 && row0 + rows <= s.out_h);
}

void im2col_cuda(const at::Tensor& image, const at::Tensor& columns, const ConvShape& s, int64_t row0, int64_t rows) {
  check_band(image, columns, s, row0, rows);
  TORCH_INTERNAL_ASSERT(columns.scalar_type() == image.scalar_type());
  if (columns.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(image.device());
  const bool int32 = indices_fit_int32(s, {image.numel(), columns.numel()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, image.scalar_type(), "channelconv::im2col_cuda", [&] {
    if (int32) {
      launch_im2col<scalar_t, int32_t>(image, columns, s, row0, rows);
    } else {
      launch_im2col<scalar_t, int64_t>(image, columns, s, row0, rows);
    }
  });
}

void col2im_cuda(const at::Tensor& columns, const at::Tensor& grad_image, const ConvShape& s, int64_t row0,
                 int64_t rows) {
  check_band(grad_image, columns, s, row0, rows);
  TORCH_INTERNAL_ASSERT(grad_image.scalar_type() == at::toOpMathType(columns.scalar_type()));
  if (grad_image.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad_image.device());
  const bool int32 = indices_fit_int32(s, {grad_image.numel(), columns.numel()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, columns.scalar_type(), "channelconv::col2im_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (int32) {
      launch_col2im<scalar_t, acc_t, int32_t>(columns, grad_image, s, row0, rows);
    } else {
      launch_col2im<scalar_t, acc_t, int64_t>(columns, grad_image, s, row0, rows);
    }
  });
}

constexpr BandKernels kCudaBands{&im2col_cuda, &col2im_cuda, nullptr, nullptr, /*gpu=*/true};

}  // namespace
}  // namespace gpu
}  // namespace channelconv

TORCH_LIBRARY_IMPL(channelconv, CUDA, m) { channelconv::register_lowered_ops<channelconv::gpu::kCudaBands>(m); }
