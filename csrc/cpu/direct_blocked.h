// The register-blocked float32 direct kernel (AVX-512, chosen at run time).
//
// One correlation problem covers both the forward pass and, at stride 1, the input gradient
// (which is the forward kernel run on grad_output with the weight flipped and transposed):
//   out[n, g*out_pg + k, oh, ow] = init[k] + sum_{c, r, s} packed(g, k, c, r, s)
//                                  * in[n, g*in_pg + c, oh*stride_h + r*dil_h + offset_h, ow*stride_w + s*dil_w + offset_w]
// with input taps outside the plane reading zero.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace channelconv {

struct BlockedProblem {
  int64_t batch, groups;
  int64_t in_per_group, in_h, in_w;     // input planes
  int64_t out_per_group, out_h, out_w;  // output planes
  int64_t taps_h, taps_w;
  int64_t stride_h, stride_w, dil_h, dil_w;
  int64_t offset_h, offset_w;           // input coordinate of tap 0 at output 0 (minus the padding)
  // Where output pixel (oh, ow) is stored: (origin + o*step) in planes of plane_h x plane_w.
  // The defaults store densely; the strided input gradient writes one stride phase at a time.
  int64_t out_origin_h = 0, out_origin_w = 0, out_step_h = 1, out_step_w = 1;
  int64_t out_plane_h = -1, out_plane_w = -1;  // -1: out_h, out_w

  int64_t plane_h() const { return out_plane_h < 0 ? out_h : out_plane_h; }
  int64_t plane_w() const { return out_plane_w < 0 ? out_w : out_plane_w; }
};

// Output channels per register tile: two 16-float registers.
constexpr int64_t kBlockedChannels = 32;

// Whether this CPU runs the blocked kernel (AVX-512F); otherwise callers use the plain loops.
bool blocked_kernel_available();

// Which weight element each of the problem's taps multiplies. The weight is a conv weight
// (K, C/groups, kernel_h, kernel_w), contiguous. Forward (transposed = false): the problem's
// output channels are the weight's K, its input channels the weight's C, and it reads every tap
// in order. Input gradient (transposed = true): the other way round, and tap (t, u) reads kernel
// row first_h + t*step_h, column first_w + u*step_w (flipped: step -1; one stride phase's taps:
// step -stride).
struct WeightTaps {
  int64_t kernel_h, kernel_w;
  bool transposed = false;
  int64_t first_h = 0, step_h = 1, first_w = 0, step_w = 1;
};

// Weights in the kernel's order, [group][channel block][c][r][s][32], zero-filled past
// out_per_group, by 16 x 16 transposes in AVX-512 registers (call only when
// blocked_kernel_available()). One task per (group, block). (A scalar packer writing one channel's
// taps at a time, 128 bytes apart, missed the cache on every write once a block's weights outgrew
// L2, and cost a third of a 512 -> 512 3x3 forward pass at 7x7; writing tap by tap, 8 %; the
// transposes, 6 %.)
void pack_blocked_weight(const BlockedProblem& p, const float* w, const WeightTaps& taps, float* packed);

inline int64_t blocked_weight_numel(const BlockedProblem& p) {
  const int64_t blocks = (p.out_per_group + kBlockedChannels - 1) / kBlockedChannels;
  return p.groups * blocks * p.in_per_group * p.taps_h * p.taps_w * kBlockedChannels;
}

// out (N, groups*out_per_group, plane_h, plane_w), NCHW contiguous; init: per output channel
// (groups*out_per_group values) or null for zero.
void blocked_correlation(const BlockedProblem& p, const float* in, const float* packed, const float* init, float* out);

// Weight gradient, float32, AVX-512 (call only when blocked_kernel_available() and
// blocked_weight_grad_applies()): dw (K, C/groups, k_h, k_w) = sum over images and output pixels
// of dy[n, k, oh, ow] * x[n, c, oh*stride_h + r*dil_h - pad_h, ow*stride_w + s*dil_w - pad_w].
// `problem` is the forward problem (input x, output dy).
bool blocked_weight_grad_applies(const BlockedProblem& problem);
void blocked_weight_grad(const BlockedProblem& problem, const float* dy, const float* x, float* dw);

}  // namespace channelconv
