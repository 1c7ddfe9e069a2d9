// Direct convolution on CUDA: no column buffer, no atomics.
//
//   float32 forward, input gradient and weight gradient: implicit GEMMs (implicit_gemm.h), the
//                    batch folded into the GEMM, a 4-stage cp.async pipeline, 8 x 8 register
//                    tiles, and split-K with a fixed-order reduction when the tiles alone do not
//                    fill the GPU. The input gradient runs one correlation per stride phase (dy
//                    with the phase's taps of the flipped, transposed weight), like the CPU's.
//   Otherwise (other dtypes, 64-bit indices, fewer than 32 GEMM rows per group):
//   forward          a tiled kernel: a block computes BK output channels x BP output pixels
//                    of one (image, group), staging weight and input tiles in shared memory; each
//                    thread accumulates a TM x TN register tile in at::opmath_type<scalar_t>.
//   backward_input   a gather: one thread per input element sums over (k, r, s) the outputs that
//                    read it (Axis::output_reading).
//   backward_weight  (not float32) one block per weight element reduces over N x H_o x W_o: each thread a
//                    strided partial sum, then a fixed-order tree in shared memory (deterministic).
//
// The per-thread work is in kernel_bodies.h (shared with the CPU emulation in csrc/testing/emulate_kernels.cpp).
// Same op signatures, checks and result layout as csrc/cpu/direct.cpp.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "../conv_params.h"
#include "implicit_gemm.h"

namespace channelconv {
namespace gpu {
namespace {

// Global -> shared copies of 4 bytes, asynchronous on sm_80+ (cp.async, zero-filled when not
// valid: a source size of 0 reads nothing); a plain load and store before that, where commit and
// wait have nothing to do.
struct AsyncCopy {
  __device__ __forceinline__ void copy(float* dst, const float* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared), "l"(src), "r"(valid ? 4 : 0));
#else
    *dst = valid ? __ldg(src) : 0.f;
#endif
  }
  __device__ __forceinline__ void commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
  }
  template <int kInFlight>
  __device__ __forceinline__ void wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kInFlight));
#endif
  }
};

// One block per (tile, split): blockIdx.x the tile, blockIdx.y the split. The loop follows
// pipeline_step; csrc/testing/emulate_kernels.cpp runs the same order.
template <typename Problem, typename Math>
__global__ void __launch_bounds__(Problem::Cfg::kThreads) igemm_kernel(IgemmOperands o, IgemmParams p) {
  using Cfg = typename Problem::Cfg;
  __shared__ __align__(16) float smem[Cfg::kSharedFloats];
  const int tid = threadIdx.x;
  const IgemmTile t = igemm_tile<Cfg>(p, int32_t(blockIdx.x), int32_t(blockIdx.y));
  const typename Problem::Thread th = Problem::thread_state(p, t, tid);
  AsyncCopy copier;
  CC_UNROLL
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < t.kt_count) Problem::load_stage(copier, tid, p, t, th, o, t.kt_begin + s, smem + s * Cfg::kStageFloats);
    copier.commit();
  }
  float acc[kAccumulators] = {};
  for (int step = 0; step < t.kt_count; ++step) {
    copier.wait<pipeline_wait_groups<Cfg>()>();
    __syncthreads();  // this step's buffer has landed for every thread; the last step's is free
    const PipelineStep ps = pipeline_step<Cfg>(step);
    if (ps.load_ktile < t.kt_count) {
      Problem::load_stage(copier, tid, p, t, th, o, t.kt_begin + ps.load_ktile, smem + ps.load_buffer * Cfg::kStageFloats);
    }
    copier.commit();
    Math::template multiply_stage<Cfg>(tid, smem + ps.read_buffer * Cfg::kStageFloats, acc);
  }
  igemm_store<Problem, Math>(tid, p, t, acc, o);
}

template <typename Problem>
__global__ void __launch_bounds__(kThreads) splitk_reduce_kernel(IgemmOperands o, IgemmParams p, int64_t total) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    Problem::reduce_element(p, o, e);
  }
}

int multiprocessors(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return count;
}

// Blocks of the kernel one SM holds, asked of the runtime once per process (the answer depends
// on the kernel's registers and shared memory and on the architecture, the same for every GPU of
// one build in practice).
template <typename Problem, typename Math>
int igemm_blocks_per_sm() {
  static const int blocks = [] {
    int n = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, igemm_kernel<Problem, Math>, Problem::Cfg::kThreads, 0));
    return std::max(n, 1);
  }();
  return blocks;
}

// out = the GEMM of operands a and b (see IgemmOperands) for each correlation of the pass, split as
// the wave model says.
template <typename Problem, typename Math>
void launch_igemm(const at::Tensor& a, const at::Tensor& b, const float* bias, const at::Tensor& out,
                  const ConvShape& s, DirectPass pass) {
  const IgemmPass launches = igemm_pass(s, pass);
  if (launches.zero_first) out.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = multiprocessors(a), blocks_per_sm = igemm_blocks_per_sm<Problem, Math>();
  for (const auto& [correlation, taps] : launches.correlations) {
    const IgemmParams p = make_igemm_params<Problem>(correlation, taps, sms, blocks_per_sm, 0);
    at::Tensor partial;
    if (p.splits > 1) partial = at::empty({p.splits, Problem::output_elements(p)}, a.options().dtype(at::kFloat));
    const IgemmOperands o{a.const_data_ptr<float>(), b.const_data_ptr<float>(), bias, out.mutable_data_ptr<float>(),
                          p.splits > 1 ? partial.mutable_data_ptr<float>() : nullptr};
    const dim3 grid(static_cast<unsigned int>(igemm_tiles<typename Problem::Cfg>(p)), static_cast<unsigned int>(p.splits));
    igemm_kernel<Problem, Math><<<grid, Problem::Cfg::kThreads, 0, stream>>>(o, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.splits > 1) {
      const int64_t total = Problem::output_elements(p);
      splitk_reduce_kernel<Problem><<<grid_size(total), kThreads, 0, stream>>>(o, p, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// Whether float32 convolutions on this tensor's GPU run on TF32 tensor cores: where cuDNN's would
// (torch.backends.cudnn.allow_tf32, on by default; F.conv2d reads the same flag), on sm_80+.
bool use_tf32(const at::Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  return major >= 8 && at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
}

// The pass on the implicit GEMM of `choice`'s tile, with TF32 tensor cores where use_tf32 says
// (their B tiles padded for conflict-free fragment loads), otherwise float32 FFMA.
template <template <typename> class Problem, int SimtBPad>
void launch_igemm_tile(IgemmChoice choice, const at::Tensor& a, const at::Tensor& b, const float* bias,
                       const at::Tensor& out, const ConvShape& s, DirectPass pass) {
  const bool large = choice == IgemmChoice::Large;
  if (use_tf32(a)) {
    if (large) launch_igemm<Problem<IgemmLarge<4>>, Tf32Math>(a, b, bias, out, s, pass);
    else launch_igemm<Problem<IgemmMedium<4>>, Tf32Math>(a, b, bias, out, s, pass);
  } else {
    if (large) launch_igemm<Problem<IgemmLarge<SimtBPad>>, SimtMath>(a, b, bias, out, s, pass);
    else launch_igemm<Problem<IgemmMedium<SimtBPad>>, SimtMath>(a, b, bias, out, s, pass);
  }
}

// Blocks loop over tiles (grid-stride); every thread of a block takes the same trip count, so
// the barriers inside are reached by all of them.
template <typename Cfg, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(Cfg::kThreads)
    direct_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                          const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, ConvDims<index_t> d,
                          int64_t tiles) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t ws[Cfg::kWeightTile];
  __shared__ acc_t xs[Cfg::kInputTile];
  const int tid = threadIdx.x;
  const index_t R = d.reduction();
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TilePos<index_t> t = forward_tile_pos<Cfg>(d, index_t(tile));
    acc_t acc[Cfg::TM][Cfg::TN];
    forward_init<Cfg>(tid, bias, d, t, acc);
    for (index_t q0 = 0; q0 < R; q0 += Cfg::BR) {
      forward_load_stage<Cfg>(tid, x, w, d, t, q0, ws, xs);
      __syncthreads();  // the stage is in shared memory
      forward_multiply_stage<Cfg>(tid, ws, xs, acc);
      __syncthreads();  // everyone is done reading it before the next stage overwrites it
    }
    forward_store<Cfg>(tid, y, d, t, acc);
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    direct_backward_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ w,
                                 scalar_t* __restrict__ dx, ConvDims<index_t> d, int64_t total) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    direct_backward_input_element(dy, w, dx, d, index_t(e));
  }
}

// Launched with exactly kThreads threads per block (the tree below assumes it).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    direct_backward_weight_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ dw, ConvDims<index_t> d, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert((kThreads & (kThreads - 1)) == 0, "the tree reduction halves a power of two");
  __shared__ acc_t partial[kThreads];
  const int tid = threadIdx.x;
  for (int64_t e = blockIdx.x; e < total; e += gridDim.x) {
    partial[tid] = direct_backward_weight_partial(dy, x, d, index_t(e), index_t(tid), index_t(kThreads));
    __syncthreads();
    for (int offset = kThreads / 2; offset > 0; offset /= 2) {
      if (tid < offset) partial[tid] += partial[tid + offset];
      __syncthreads();
    }
    if (tid == 0) dw[e] = static_cast<scalar_t>(partial[0]);
    __syncthreads();  // partial[0] is read before the next element overwrites the array
  }
}

template <typename Cfg, typename scalar_t, typename index_t>
void launch_forward(const at::Tensor& x, const at::Tensor& w, const scalar_t* bias, const at::Tensor& y,
                    const ConvShape& s) {
  const ConvDims<index_t> d = make_dims<index_t>(s);
  const int64_t tiles = s.batch * s.groups * int64_t(forward_channel_tiles<Cfg>(d)) * int64_t(forward_pixel_tiles<Cfg>(d));
  direct_forward_kernel<Cfg, scalar_t, index_t><<<grid_size(tiles, 1), Cfg::kThreads, 0,
                                                  c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), bias, y.mutable_data_ptr<scalar_t>(), d, tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void launch_backward_input(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& dx, const ConvShape& s) {
  const int64_t total = dx.numel();
  direct_backward_input_kernel<scalar_t, index_t><<<grid_size(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      dy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
      make_dims<index_t>(s), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void launch_backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dw, const ConvShape& s) {
  const int64_t total = dw.numel();
  direct_backward_weight_kernel<scalar_t, index_t><<<grid_size(total, 1), kThreads, 0,
                                                     c10::cuda::getCurrentCUDAStream()>>>(
      dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dw.mutable_data_ptr<scalar_t>(),
      make_dims<index_t>(s), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define CHANNELCONV_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, __VA_ARGS__)

at::Tensor direct_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvShape s = check_forward(input, weight, bias, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = as_nchw(input), w = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(s.output_sizes(), input.options());
  if (y.numel() > 0) {
    const bool int32 = indices_fit_int32(s, {x.numel(), w.numel(), y.numel()});
    const IgemmChoice igemm = choose_igemm(s, int32, input.scalar_type() == at::kFloat, DirectPass::Forward);
    if (igemm != IgemmChoice::None) {  // float32
      launch_igemm_tile<CorrelationProblem, 0>(igemm, w, x, has_bias ? b.const_data_ptr<float>() : nullptr, y, s,
                                               DirectPass::Forward);
      return y.contiguous(result_format(input, weight));
    }
    const bool wide = use_wide_tile(s);
    CHANNELCONV_DISPATCH(input.scalar_type(), "channelconv::direct_forward_cuda", [&] {
      const scalar_t* bias_ptr = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
      if (wide && int32) {
        launch_forward<WideTile, scalar_t, int32_t>(x, w, bias_ptr, y, s);
      } else if (wide) {
        launch_forward<WideTile, scalar_t, int64_t>(x, w, bias_ptr, y, s);
      } else if (int32) {
        launch_forward<NarrowTile, scalar_t, int32_t>(x, w, bias_ptr, y, s);
      } else {
        launch_forward<NarrowTile, scalar_t, int64_t>(x, w, bias_ptr, y, s);
      }
    });
  }
  return y.contiguous(result_format(input, weight));
}

at::Tensor direct_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  const ConvShape s = check_backward_input(grad_output, weight, input_size, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const at::Tensor dy = as_nchw(grad_output), w = weight.contiguous();
  at::Tensor dx = at::empty(s.input_sizes(), grad_output.options());
  if (dx.numel() > 0) {
    const bool int32 = indices_fit_int32(s, {dy.numel(), w.numel(), dx.numel()});
    const IgemmChoice igemm = choose_igemm(s, int32, grad_output.scalar_type() == at::kFloat, DirectPass::InputGrad);
    if (igemm != IgemmChoice::None) {  // float32
      launch_igemm_tile<CorrelationProblem, 0>(igemm, w, dy, nullptr, dx, s, DirectPass::InputGrad);
      return dx.contiguous(result_format(grad_output, weight));
    }
    CHANNELCONV_DISPATCH(grad_output.scalar_type(), "channelconv::direct_backward_input_cuda", [&] {
      if (int32) {
        launch_backward_input<scalar_t, int32_t>(dy, w, dx, s);
      } else {
        launch_backward_input<scalar_t, int64_t>(dy, w, dx, s);
      }
    });
  }
  return dx.contiguous(result_format(grad_output, weight));
}

at::Tensor direct_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  const ConvShape s = check_backward_weight(grad_output, input, weight_size, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor dy = as_nchw(grad_output), x = as_nchw(input);
  at::Tensor dw = at::empty(s.weight_sizes(), input.options());
  if (dw.numel() > 0) {
    const bool int32 = indices_fit_int32(s, {dy.numel(), x.numel(), dw.numel()});
    const IgemmChoice igemm = choose_igemm(s, int32, input.scalar_type() == at::kFloat, DirectPass::WeightGrad);
    if (igemm != IgemmChoice::None) {  // float32
      launch_igemm_tile<WeightGradProblem, 4>(igemm, dy, x, nullptr, dw, s, DirectPass::WeightGrad);
      return dw.contiguous(result_format(input, grad_output));
    }
    CHANNELCONV_DISPATCH(input.scalar_type(), "channelconv::direct_backward_weight_cuda", [&] {
      if (int32) {
        launch_backward_weight<scalar_t, int32_t>(dy, x, dw, s);
      } else {
        launch_backward_weight<scalar_t, int64_t>(dy, x, dw, s);
      }
    });
  }
  return dw.contiguous(result_format(input, grad_output));
}

}  // namespace
}  // namespace gpu
}  // namespace channelconv

TORCH_LIBRARY_IMPL(channelconv, CUDA, m) {
  m.impl("direct_forward", &channelconv::gpu::direct_forward);
  m.impl("direct_backward_input", &channelconv::gpu::direct_backward_input);
  m.impl("direct_backward_weight", &channelconv::gpu::direct_backward_weight);
}
