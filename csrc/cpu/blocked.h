// The register-blocked float32 engines of the direct algorithm (AVX-512, chosen at run time), and
// the vector helpers they share. Each engine runs a plan from plan.h:
//   blocked_forward.cpp       the correlation tiles (the forward pass, and the input gradient as
//                             the same correlation on grad_output with the weight flipped and
//                             transposed, one stride phase at a time)
//   blocked_weight_grad.cpp   the weight-gradient tiles (a reduction over output pixels)
//   row_weight_grad.cpp       the weight gradient of few output channels, along output rows
//   depthwise.cpp             depthwise correlations (forward and input gradient), across channels
// The code is compiled for AVX-512 through target attributes and called only when the CPU has it
// (blocked_kernel_available); no -march flag is involved.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../plan.h"
#include "activations.h"

namespace channelconv {

// Weights in the forward engine's order, [group][channel block][c][r][s][block], zero-filled past
// out_per_group: p.packed_weight_floats() floats.
void pack_blocked_weight(const BlockedProblem& p, const float* w, const WeightTaps& taps, float* packed);

// in (N, groups*in_per_group, in_h, in_w), out (N, groups*out_per_group, plane_h, plane_w), each in
// either layout and dtype (activations.h); init: per output channel (groups*out_per_group values)
// or null for zero.
void blocked_correlation(const BlockedRun& run, const Activations& in, const float* packed, const float* init,
                         const Activations& out);

// On AMX tiles (amx.cpp), the layers runs_amx takes (bfloat16, one group; strided layers split
// into phases, plan.h amx_shape):
// - y = bias + the correlation of the input with the weight (any strided view), y in `format` and
//   bias float32 or undefined; undefined where a strided layer's phantom taps would meet an Inf or
//   a NaN of the input (blocks of 32 channels that mix phases), which the caller runs elsewhere;
// - dx of the layers runs_amx_input_grad takes, in `format`;
// - dW, float32 (K, C, k_h, k_w), summed over the batch in a fixed order; undefined where the input
//   holds an Inf or a NaN (the wide grid's dropped pixels would multiply it by zero).
at::Tensor amx_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const ConvShape& s,
                       at::MemoryFormat format);
at::Tensor amx_input_grad(const at::Tensor& grad_output, const at::Tensor& weight, const ConvShape& s,
                          at::MemoryFormat format);
at::Tensor amx_weight_grad(const at::Tensor& grad_output, const at::Tensor& input, const ConvShape& s);

// dw (K, C/groups, k_h, k_w) = sum over images and output pixels of dy[n, k, oh, ow] *
// x[n, c, oh*stride_h + r*dil_h - pad_h, ow*stride_w + s*dil_w - pad_w]; `problem` is the
// forward problem (input x, output dy); dw float32, dy and x in either layout and dtype.
void blocked_weight_grad(const BlockedProblem& problem, const GradChunks& chunks, const Activations& dy,
                         const Activations& x, float* dw);

// The same weight gradient with 16 output pixels to a register (row_weight_grad.cpp), `block`
// output channels of a group at a time: for few output channels. dy and x NCHW, in any engine dtype.
void row_weight_grad(const ConvShape& s, int64_t block, int64_t unit_blocks, const Activations& dy,
                     const Activations& x, float* dw);

// The same correlation for a depthwise problem (groups channels, one input channel each; the
// weight (groups, 1, kernel_h, kernel_w)), vectorised across 16 channels (depthwise.cpp).
// in and out in either layout and dtype, like blocked_correlation's; w float32.
void depthwise_correlation(const BlockedRun& run, const Activations& in, const float* w, const float* init,
                           const Activations& out);
// A depthwise layer's weight gradient from channels_last dy and x of one dtype, read where they lie,
// 16 channels a vector (3x3 and 5x5 kernels; false, computing nothing, for anything else).
bool depthwise_weight_grad_nhwc(const ConvShape& s, const Activations& dy, const Activations& x, float* dw);

// The engines' scratch buffers: at least `floats` floats, content undefined, that the calling
// thread keeps from call to call, one per kind. Allocated afresh on every call, a multi-MB buffer
// came from mmap and faulted in each of its pages every time, which cost more than the work on it
// (benchmarks/NOTES.md v20). A thread holds each kind only once at a time.
enum class Scratch { PackedWeights, GradSums, GradRows, GradRowPairs, GradOutput, GradOutputPairs, Widened, Kinds };
float* thread_buffer(Scratch kind, int64_t floats);

namespace blocked {

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // unaligned loads allowed

// One step of a bfloat16 tile (plan.h, channel_pack): acc += the dot products of w's 16 pairs with
// the pair at x, broadcast. Inline assembly rather than the intrinsic, so that the float32 and
// bfloat16 tiles share their templates and need no AVX512_BF16 target to compile; it runs only
// where the CPU has the instruction (bf16_dot_available).
inline __attribute__((always_inline)) void dot_pairs(v16& acc, const v16& w, const float* x) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
}

// Two values as a bfloat16 pair in 32 bits, the first in the low half (exact for values that
// are bfloat16 already, as a bfloat16 op's operands are).
inline uint32_t bf16_pair(float first, float second) {
  return uint32_t(c10::BFloat16(first).x) | uint32_t(c10::BFloat16(second).x) << 16;
}

#if defined(__x86_64__) && defined(__GNUC__)
// dst[i] = v[i] for i < n <= 16, in unmasked stores of 8, 4, 2 and 1 lanes: a masked AVX-512 store
// costs several cycles on AMD's Zen 4, and the blocked engines' copies and transposes ran a
// fifth slower with them (benchmarks/NOTES.md v15). (GCC 12 takes the undefined pass-through
// operand of the 512-to-256-bit cast for an uninitialised variable: a false -Wmaybe-uninitialized.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"), always_inline)) inline void store_lanes(float* dst, __m512 v, int64_t n) {
  if (n == 16) return _mm512_storeu_ps(dst, v);
  const __m512 zero = _mm512_setzero_ps();
  if (n & 8) {
    _mm256_storeu_ps(dst, _mm512_castps512_ps256(v));
    v = _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(zero), _mm512_castps_si512(v), 8));
    dst += 8;
  }
  if (n & 4) {
    _mm_storeu_ps(dst, _mm512_castps512_ps128(v));
    v = _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(zero), _mm512_castps_si512(v), 4));
    dst += 4;
  }
  if (n & 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(dst), _mm512_castps512_ps128(v));
    v = _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(zero), _mm512_castps_si512(v), 2));
    dst += 2;
  }
  if (n & 1) _mm_store_ss(dst, _mm512_castps512_ps128(v));
}
#pragma GCC diagnostic pop

// v's 16 floats as bfloat16 bits, rounded to nearest even with NaN kept quiet (as c10::BFloat16),
// without AVX512_BF16's conversion instruction.
__attribute__((target("avx512f"), always_inline)) inline __m256i bfloat16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
#endif

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols, 16 x 16 at a time in
// AVX-512 registers (masked at the edges): the forward tile's [pixel][block] result into NCHW planes,
// the weight packing, and the packing of x and dy for the weight gradient.
void transpose(const float* src, int64_t src_stride, int64_t rows, int64_t cols, float* dst, int64_t dst_stride);

}  // namespace blocked
}  // namespace channelconv
