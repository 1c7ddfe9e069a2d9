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

// Weights in the kernel's order, [group][channel block][c][r][s][32], zero-filled past out_per_group.
// `weight_at(g, k, c, r, s)` gives each element (so one packer serves forward and input gradient).
// One task per (group, block); within it, the packed weights are written in order, 32 channels
// of one tap at a time: the 32 rows they read stay in L1 from one tap to the next. (Writing one
// channel's taps at a time, 128 bytes apart, missed the cache on every write once a block's
// weights outgrew L2, and cost a third of a 512 -> 512 3x3 forward pass at 7x7.)
template <typename WeightAt>
void pack_blocked_weight(const BlockedProblem& p, float* packed, WeightAt weight_at) {
  const int64_t blocks = (p.out_per_group + kBlockedChannels - 1) / kBlockedChannels;
  const int64_t taps = p.in_per_group * p.taps_h * p.taps_w;
  at::parallel_for(0, p.groups * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gb = begin; gb < end; ++gb) {
      const int64_t g = gb / blocks, b = gb % blocks;
      const int64_t channels = std::min(kBlockedChannels, p.out_per_group - b * kBlockedChannels);
      float* dst = packed + gb * taps * kBlockedChannels;
      for (int64_t c = 0; c < p.in_per_group; ++c)
        for (int64_t r = 0; r < p.taps_h; ++r)
          for (int64_t s = 0; s < p.taps_w; ++s, dst += kBlockedChannels) {
            for (int64_t j = 0; j < channels; ++j) dst[j] = weight_at(g, b * kBlockedChannels + j, c, r, s);
            std::fill(dst + channels, dst + kBlockedChannels, 0.0f);
          }
    }
  });
}

// The same packing of a weight stored as the problem's (groups * out_per_group, in_per_group,
// taps_h, taps_w), contiguous (the forward pass's weight as it is): per block a transpose of the
// block's 32 rows, 16 x 16 at a time in registers (AVX-512; call only when blocked_kernel_available()).
void pack_blocked_weight_dense(const BlockedProblem& p, const float* w, float* packed);

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
