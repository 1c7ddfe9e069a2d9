// CUDA data movement for the GEMM-lowered algorithms (im2col, 1x1): the two band kernels of
// BandKernels (lowered.h). The GEMMs stay in csrc/lowered.cpp and run on cuBLAS through ATen.
//
//   im2col: one thread per column element (image, row, pixel) of a band's (C*k_h*k_w, rows*W_o)
//           matrices, one launch for all the band's images.
//   col2im: one thread per input element (image, c, hi, wi), gathering what the band's columns
//           hold for it (no atomics, a fixed summation order, so the result is deterministic).
//
// The per-thread work is in kernel_bodies.h (shared with the CPU emulation in csrc/testing/emulate_kernels.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "../lowered.h"
#include "kernel_bodies.h"

namespace channelconv {
namespace gpu {
namespace {

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    im2col_kernel(const scalar_t* __restrict__ images, scalar_t* __restrict__ columns, Geometry<index_t> g,
                  index_t row0, index_t band_pixels, index_t image_numel, int64_t total) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    im2col_element(images, columns, g, row0, band_pixels, image_numel, index_t(e));
  }
}

template <typename scalar_t, typename out_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    col2im_kernel(const scalar_t* __restrict__ columns, out_t* __restrict__ grad_images, Geometry<index_t> g,
                  index_t row0, index_t rows, index_t image_numel, bool accumulate, int64_t total) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    col2im_element(columns, grad_images, g, row0, rows, image_numel, accumulate, index_t(e));
  }
}

// The layouts lowered.cpp hands over: images / grad_images (images, C, H, W), contiguous; columns
// (images, C*k_h*k_w, rows*W_o), contiguous.
void check_band(const at::Tensor& images, const at::Tensor& columns, const ConvShape& s, int64_t row0, int64_t rows) {
  TORCH_INTERNAL_ASSERT(images.is_cuda() && columns.device() == images.device());
  TORCH_INTERNAL_ASSERT(images.is_contiguous() && columns.is_contiguous());
  TORCH_INTERNAL_ASSERT(images.dim() == 4 && images.size(1) == s.in_channels && images.size(2) == s.in_h &&
                        images.size(3) == s.in_w);
  TORCH_INTERNAL_ASSERT(columns.numel() ==
                        images.size(0) * s.in_channels * s.kernel_h * s.kernel_w * rows * s.out_w);
  TORCH_INTERNAL_ASSERT(row0 >= 0 && rows > 0 && row0 + rows <= s.out_h);
}

void im2col_cuda(const at::Tensor& images, const at::Tensor& columns, const ConvShape& s, int64_t row0, int64_t rows) {
  check_band(images, columns, s, row0, rows);
  TORCH_INTERNAL_ASSERT(columns.scalar_type() == images.scalar_type());
  const int64_t total = columns.numel();
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(images.device());
  const bool int32 = indices_fit_int32(s, {images.numel(), total});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "channelconv::im2col_cuda", [&] {
    auto launch = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      im2col_kernel<scalar_t, index_t><<<grid_size(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          images.const_data_ptr<scalar_t>(), columns.mutable_data_ptr<scalar_t>(), s.geometry<index_t>(),
          index_t(row0), index_t(rows * s.out_w), index_t(s.image_numel()), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (int32) {
      launch(int32_t{0});
    } else {
      launch(int64_t{0});
    }
  });
}

void col2im_cuda(const at::Tensor& columns, const at::Tensor& grad_images, const ConvShape& s, int64_t row0,
                 int64_t rows, bool accumulate) {
  check_band(grad_images, columns, s, row0, rows);
  const int64_t total = grad_images.numel();
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(grad_images.device());
  const bool int32 = indices_fit_int32(s, {total, columns.numel()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, columns.scalar_type(), "channelconv::col2im_cuda", [&] {
    auto launch = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      with_col2im_output<scalar_t>(grad_images, [&](auto* out) {
        using out_t = std::remove_pointer_t<decltype(out)>;
        col2im_kernel<scalar_t, out_t, index_t>
            <<<grid_size(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                columns.const_data_ptr<scalar_t>(), out, s.geometry<index_t>(), index_t(row0), index_t(rows),
                index_t(s.image_numel()), accumulate, total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (int32) {
      launch(int32_t{0});
    } else {
      launch(int64_t{0});
    }
  });
}

constexpr BandKernels kCudaBands{&im2col_cuda, &col2im_cuda, nullptr, nullptr, /*gpu=*/true};

}  // namespace
}  // namespace gpu
}  // namespace channelconv

TORCH_LIBRARY_IMPL(channelconv, CUDA, m) { channelconv::register_lowered_ops<channelconv::gpu::kCudaBands>(m); }
