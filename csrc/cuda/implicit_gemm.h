// The direct passes as implicit GEMMs (float32: SIMT, or TF32 tensor cores), written as
// HOST_DEVICE pieces in the style of kernel_bodies.h: direct.cu's __global__ kernel and
// csrc/testing/emulate_kernels.cpp both run exactly these functions, the kernel with real
// threads, barriers and cp.async, the emulator thread by thread (warp by warp for mma.sync) with
// shared tiles poisoned until their copies land.
//
// Per group, with cols the im2col matrix of a correlation's source (rows q = (c, tap), columns
// p = its grid positions over the whole batch), which is never built (blocks gather their tiles
// from the source directly):
//   correlation      out[m, p] = sum_q w[m, q] * cols[q, p]    M = destination channels / G,
//                    N = batch * grid positions, K = source channels / G * taps. The forward pass
//                    (x -> y, every tap) and each stride phase of the input gradient (dy -> that
//                    phase's positions of dx, through the taps that reach it, weight transposed
//                    and flipped) are both this problem (CorrelationProblem).
//   weight gradient  dw[k, q] = sum_p dy[k, p] * cols[q, p]    M = K/G, N = C/G*k_h*k_w,   K = batch*H_o*W_o
//
//   tiles      a block owns BM rows x BN columns of one group; split z of `splits` walks k-tiles
//              [z*per_split, (z+1)*per_split). Correlation k-tiles are BK source channels of one
//              tap (igemm_stage_pos); weight-gradient k-tiles BK consecutive pixels.
//   loads      every element is one 4-byte cp.async with zero-fill (padding, ragged edges, and
//              the rows or columns past the GEMM's end arrive as 0, so the multiply never tests).
//              What a thread can decode once per block it does (the correlation's pixel, the weight
//              gradient's columns (c, r, s)); the rest once per stage by fast divmod, never per
//              element, and no division anywhere in the main loop.
//   pipeline   kStages shared buffers; k-tile t+kStages-1 is issued while t is multiplied
//              (pipeline_step below is the one statement of that order)
//   multiply   SimtMath: each thread an 8 x 8 register tile from 128-bit shared loads; or, where
//              cuDNN would use TF32 (torch.backends.cudnn.allow_tf32), Tf32Math: mma.sync
//              tensor-core tiles over the same shared buffers (see both below)
//   epilogue   one split: the result directly (the forward adds its bias); several: float32
//              partials [split][G*M][N], which the reduce adds in split order 0, 1, ...
//              (deterministic), then the bias
//
// The host uses these kernels only when every index fits int32 (indices_fit_int32).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../plan.h"
#include "kernel_bodies.h"

namespace channelconv {
namespace gpu {

// Unsigned division by a divisor fixed at launch, as a multiply-high and a shift (the round-up
// method of Granlund and Montgomery): with l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1,
// n / d = (mulhi(m, n) + n) >> l for every n < 2^31 (the sum then fits 32 bits). d = 1 gives
// l = 0, m = 1: mulhi(1, n) = 0 and the quotient is n.
struct FastDivmod {
  uint32_t divisor = 1, multiplier = 1, shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t(1) << shift) < d) ++shift;
    multiplier = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  CC_HOST_DEVICE uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t high = __umulhi(multiplier, n);
#else
    const uint32_t high = uint32_t((uint64_t(multiplier) * n) >> 32);
#endif
    return (high + n) >> shift;
  }
  // quotient and remainder of n < 2^31
  CC_HOST_DEVICE void divmod(int32_t n, int32_t& quotient, int32_t& remainder) const {
    quotient = int32_t(div(uint32_t(n)));
    remainder = n - quotient * int32_t(divisor);
  }
};

// Everything the kernels know about the problem, computed once on the host. The forward pass and
// each stride phase of the input gradient are correlations, a BlockedProblem with its WeightTaps
// (plan.h, the same description the CPU's blocked engines run): the source (x, or dy) is read at
// grid position (i, j) through tap (t, u) at (i*stride_h + offset_h + t*dil_h, likewise w), and the
// result goes to destination (y, or dx) position (origin_h + i*step_h, likewise w), i and j running
// over the problem's out_h x out_w grid (all of y, or one phase of dx). The weight
// gradient reads the forward's correlation: its source x, its destination dy.
struct IgemmParams {
  int32_t groups;
  int32_t src_channels, src_group_channels, src_h, src_w;  // x (C, H, W) or dy (K, H_o, W_o)
  int32_t dst_channels, dst_h, dst_w;                      // y or dy (K, H_o, W_o), or dx (C, H, W)
  int32_t stride_h, stride_w, dil_h, dil_w, offset_h, offset_w;
  int32_t origin_h, origin_w, step_h, step_w;
  int32_t taps_h, taps_w;
  // The weight (K, C/G, kernel_h, kernel_w), contiguous: tap (t, u) multiplies kernel element
  // (first_r + t*step_r, first_s + u*step_s); GEMM row m and reduction channel c of group g sit at
  // g*w_group + m*w_row + c*w_channel (transposed for the input gradient).
  int32_t kernel_w, first_r, step_r, first_s, step_s;
  int32_t w_group, w_row, w_channel;
  // The GEMM, per group: rows x cols, reduced over k_tiles of BK.
  int32_t rows;                  // destination channels per group: y's or dx's (correlation), dy's K/G (weight gradient)
  int32_t pixels;                // grid positions of the whole batch
  int32_t cols;                  // pixels (correlation), src_group_channels * taps (weight gradient)
  int32_t channel_blocks;        // correlation: ceil(src_group_channels / BK), k-tiles per tap
  int32_t k_tiles;               // correlation: taps * channel_blocks; weight gradient: ceil(pixels / BK)
  int32_t splits, k_tiles_per_split;
  FastDivmod div_grid, div_grid_w;  // pixel -> (n, i*grid_w + j) -> (i, j)
  FastDivmod div_channel_blocks;    // correlation k-tile -> (tap, channel block)
  FastDivmod div_taps_w;            // tap -> (t, u)
  FastDivmod div_taps;              // weight-gradient column -> (c, tap)
};

// The tensors one launch reads and writes. Correlation: a = w, b = the source, out = the
// destination (bias: the forward's, or null). Weight gradient: a = dy, b = x, out = dw (no bias).
struct IgemmOperands {
  const float* a;
  const float* b;
  const float* bias;
  float* out;
  float* partial;  // [splits][groups * rows][cols], only when splits > 1
};

template <int BM_, int BN_, int BK_, int Stages_, int BPad_>
struct IgemmConfig {
  static constexpr int BM = BM_;  // output channels per block tile
  static constexpr int BN = BN_;  // GEMM columns per block tile
  static constexpr int BK = BK_;  // reduction steps per stage
  static constexpr int kStages = Stages_;
  static constexpr int TM = 8, TN = 8;  // per-thread register tile, two 4-wide halves each way
  static constexpr int kThreadsM = BM / TM, kThreadsN = BN / TN;
  static constexpr int kThreads = kThreadsM * kThreadsN;
  // A is stored transposed, As[i][m] at i * kAStride + m. The +4 keeps 128-bit rows aligned and
  // spreads a warp's stores (i = tid % BK varies fastest) over all 32 banks. B likewise when its
  // copies run i fastest (BPad = 4, the weight gradient's); the correlation's run j fastest
  // (BPad = 0), except under Tf32Math, whose B fragment loads (rows t and t + 4 of one column
  // group) need the padding to spread over the banks (BPad = 4).
  static constexpr int kAStride = BM + 4;
  static constexpr int kBStride = BN + BPad_;
  static constexpr int kAFloats = BK * kAStride;
  static constexpr int kBFloats = BK * kBStride;
  static constexpr int kStageFloats = kAFloats + kBFloats;
  static constexpr int kSharedFloats = kStages * kStageFloats;
  static constexpr int kAPerThread = BM * BK / kThreads;  // A elements each thread copies per stage
  static constexpr int kBPerThread = BN * BK / kThreads;
  static_assert(BM % 8 == 0 && BN % 8 == 0, "two 4-wide halves per thread each way");
  static_assert((BM * BK) % kThreads == 0 && (BN * BK) % kThreads == 0, "copies split evenly");
  static_assert(kThreads % BK == 0 && kThreads % BN == 0, "each thread copies one row or column");
  static_assert(BPad_ % 4 == 0 && Stages_ >= 2, "aligned rows, at least double buffering");
};

// 128 x 128 for many output channels per group; 64 x 128 when a group has fewer than 128.
template <int BPad>
using IgemmLarge = IgemmConfig<128, 128, 8, 4, BPad>;
template <int BPad>
using IgemmMedium = IgemmConfig<64, 128, 8, 4, BPad>;

// The pipeline's order, the one place it is stated. Before the loop, k-tiles 0 .. kStages-2 are
// issued into buffers 0 .. kStages-2, one commit group each. At step t (after waiting until at
// most kStages-2 groups are in flight, then a barrier), k-tile t is in buffer t % kStages, and
// k-tile t + kStages-1 is issued into the buffer that step t-1 read, which the barrier freed.
struct PipelineStep {
  int read_buffer;   // the buffer multiplied at this step
  int load_ktile;    // the k-tile issued at this step (a count past the split's end issues nothing)
  int load_buffer;   // where it lands
};
template <typename Cfg>
CC_HOST_DEVICE PipelineStep pipeline_step(int t) {
  return PipelineStep{t % Cfg::kStages, t + Cfg::kStages - 1, (t + Cfg::kStages - 1) % Cfg::kStages};
}
// Commit groups still allowed in flight when step t's buffer must have landed.
template <typename Cfg>
constexpr int pipeline_wait_groups() { return Cfg::kStages - 2; }

// Where block (tile, split) works.
struct IgemmTile {
  int32_t group;
  int32_t m0;        // first output channel, within the group
  int32_t n0;        // first GEMM column
  int32_t kt_begin;  // first k-tile of this split
  int32_t kt_count;  // k-tiles of this split (0 when splits over-cover the reduction)
  int32_t split;
};

template <typename Cfg>
CC_HOST_DEVICE int32_t igemm_n_tiles(const IgemmParams& p) { return (p.cols + Cfg::BN - 1) / Cfg::BN; }
template <typename Cfg>
CC_HOST_DEVICE int32_t igemm_m_tiles(const IgemmParams& p) { return (p.rows + Cfg::BM - 1) / Cfg::BM; }
template <typename Cfg>
CC_HOST_DEVICE int64_t igemm_tiles(const IgemmParams& p) {
  return int64_t(igemm_m_tiles<Cfg>(p)) * igemm_n_tiles<Cfg>(p) * p.groups;
}

// Tiles are ordered (group, channel tile, column tile), column tile fastest, so neighbouring
// blocks read the same A rows.
template <typename Cfg>
CC_HOST_DEVICE IgemmTile igemm_tile(const IgemmParams& p, int32_t tile, int32_t split) {
  const int32_t n_tiles = igemm_n_tiles<Cfg>(p), m_tiles = igemm_m_tiles<Cfg>(p);
  IgemmTile t;
  t.n0 = (tile % n_tiles) * Cfg::BN;
  t.m0 = ((tile / n_tiles) % m_tiles) * Cfg::BM;
  t.group = tile / (n_tiles * m_tiles);
  t.split = split;
  t.kt_begin = split * p.k_tiles_per_split;
  const int32_t left = p.k_tiles - t.kt_begin;
  t.kt_count = left < 0 ? 0 : (left < p.k_tiles_per_split ? left : p.k_tiles_per_split);
  return t;
}

// Grid position `pixel` of the folded batch: its image, its offset in the image's grid, and the
// source coordinates tap (0, 0) reads.
struct IgemmPixel {
  int32_t n, ij, hi0, wi0;
};
CC_HOST_DEVICE IgemmPixel igemm_pixel(const IgemmParams& p, int32_t pixel) {
  IgemmPixel px;
  int32_t i = 0, j = 0;
  p.div_grid.divmod(pixel, px.n, px.ij);
  p.div_grid_w.divmod(px.ij, i, j);
  px.hi0 = i * p.stride_h + p.offset_h;
  px.wi0 = j * p.stride_w + p.offset_w;
  return px;
}

// ---- correlation: the forward pass, a phase of the input gradient -----------------------------

// The reduction runs tap by tap: k-tile kt covers tap kt / channel_blocks and the BK source
// channels from c0 = (kt % channel_blocks) * BK of the group (channels past the group's arrive as
// 0). Within a stage every row then has the same tap, so a thread decodes one position per stage
// (not one per element), tests its pixel's bounds once, and steps through channels by a plane.
struct IgemmStagePos {
  int32_t c0;      // first source channel of the stage, within the group
  int32_t rs;      // the weight's tap, r * kernel_w + s
  int32_t dh, dw;  // t * dil_h, u * dil_w: the tap's displacement in the source
};
CC_HOST_DEVICE IgemmStagePos igemm_stage_pos(const IgemmParams& p, int32_t ktile, int BK) {
  IgemmStagePos pos;
  int32_t tap = 0, cb = 0, t = 0, u = 0;
  p.div_channel_blocks.divmod(ktile, tap, cb);
  p.div_taps_w.divmod(tap, t, u);
  pos.c0 = cb * BK;
  pos.rs = (p.first_r + t * p.step_r) * p.kernel_w + p.first_s + u * p.step_s;
  pos.dh = t * p.dil_h;
  pos.dw = u * p.dil_w;
  return pos;
}

template <typename Cfg_>
struct CorrelationProblem {
  using Cfg = Cfg_;

  // Per block, a thread's B column: its pixel's offset in the source and tap (0, 0)'s coordinates.
  struct Thread {
    int32_t src_offset;  // source[n, group's channel 0, hi0, wi0] (may point into the padding)
    int32_t hi0, wi0;
    bool valid;          // the pixel exists
  };
  static CC_HOST_DEVICE Thread thread_state(const IgemmParams& p, const IgemmTile& t, int tid) {
    Thread th;
    const int32_t pixel = t.n0 + tid % Cfg::BN;
    th.valid = pixel < p.pixels;
    const IgemmPixel px = igemm_pixel(p, th.valid ? pixel : 0);
    th.hi0 = px.hi0;
    th.wi0 = px.wi0;
    th.src_offset = ((px.n * p.src_channels + t.group * p.src_group_channels) * p.src_h + px.hi0) * p.src_w + px.wi0;
    return th;
  }

  // Thread tid's copies of k-tile `ktile` (absolute) into buffer `stage`:
  //   As[i][m] = the weight of row m0 + m and source channel c0 + i at the stage's tap
  //                                                   (0 past the rows or the group's channels)
  //   Bs[i][j] = source[n, group's channel c0 + i, hi0 + dh, wi0 + dw] of pixel n0 + j
  //                                                   (0 outside the plane, past the channels or the pixels)
  // Copier::copy(dst, src, valid) is cp.async with zero-fill on the GPU; src is dereferenced
  // only when valid.
  template <typename Copier>
  static CC_HOST_DEVICE void load_stage(Copier& copier, int tid, const IgemmParams& p, const IgemmTile& t,
                                        const Thread& th, const IgemmOperands& o, int32_t ktile, float* stage) {
    const IgemmStagePos pos = igemm_stage_pos(p, ktile, Cfg::BK);
    float* As = stage;
    float* Bs = stage + Cfg::kAFloats;
    {
      // Weights: a warp reads BK channels of 32 / BK rows.
      const int i = tid % Cfg::BK;
      const int32_t c = pos.c0 + i;
      const float* w_tap = o.a + int64_t(t.group) * p.w_group + int64_t(t.m0) * p.w_row + int64_t(c) * p.w_channel + pos.rs;
      CC_UNROLL
      for (int a = 0; a < Cfg::kAPerThread; ++a) {
        const int m = tid / Cfg::BK + a * (Cfg::kThreads / Cfg::BK);
        const bool valid = t.m0 + m < p.rows && c < p.src_group_channels;
        copier.copy(As + i * Cfg::kAStride + m, valid ? w_tap + int64_t(m) * p.w_row : o.a, valid);
      }
    }
    {
      // Source: a warp reads 32 consecutive pixels of one channel at the stage's tap.
      const int j = tid % Cfg::BN;
      const bool inside = th.valid && uint32_t(th.hi0 + pos.dh) < uint32_t(p.src_h) &&
                          uint32_t(th.wi0 + pos.dw) < uint32_t(p.src_w);
      const int32_t plane = p.src_h * p.src_w;
      const float* src_tap = o.b + th.src_offset + pos.dh * p.src_w + pos.dw;  // used only when inside
      CC_UNROLL
      for (int b = 0; b < Cfg::kBPerThread; ++b) {
        const int i = tid / Cfg::BN + b * (Cfg::kThreads / Cfg::BN);
        const int32_t c = pos.c0 + i;
        const bool valid = inside && c < p.src_group_channels;
        copier.copy(Bs + i * Cfg::kBStride + j, valid ? src_tap + c * plane : o.b, valid);
      }
    }
  }

  // Where destination channel `channel` of grid position `pixel` lies.
  static CC_HOST_DEVICE int64_t destination(const IgemmParams& p, int32_t channel, int32_t pixel) {
    int32_t image = 0, ij = 0, i = 0, j = 0;
    p.div_grid.divmod(pixel, image, ij);
    p.div_grid_w.divmod(ij, i, j);
    return ((int64_t(image) * p.dst_channels + channel) * p.dst_h + p.origin_h + i * p.step_h) * p.dst_w +
           p.origin_w + j * p.step_w;
  }

  // The result (one split) or its partial, for tile row `row` (channel) and column `col` (pixel).
  static CC_HOST_DEVICE void store(const IgemmParams& p, const IgemmTile& t, int row, int col, float value,
                                   const IgemmOperands& o) {
    const int32_t pixel = t.n0 + col, m = t.m0 + row;
    if (pixel >= p.pixels || m >= p.rows) return;
    const int32_t channel = t.group * p.rows + m;
    if (p.splits > 1) {
      o.partial[(int64_t(t.split) * p.dst_channels + channel) * p.cols + pixel] = value;
      return;
    }
    o.out[destination(p, channel, pixel)] = value + (o.bias != nullptr ? o.bias[channel] : 0.f);
  }

  static CC_HOST_DEVICE int64_t output_elements(const IgemmParams& p) { return int64_t(p.pixels) * p.dst_channels; }

  // Element e = (channel, pixel) after a split launch: the partials in split order, then the bias.
  static CC_HOST_DEVICE void reduce_element(const IgemmParams& p, const IgemmOperands& o, int64_t e) {
    const int32_t channel = int32_t(e / p.pixels), pixel = int32_t(e % p.pixels);
    float sum = 0.f;
    for (int32_t z = 0; z < p.splits; ++z) sum += o.partial[z * output_elements(p) + e];
    o.out[destination(p, channel, pixel)] = sum + (o.bias != nullptr ? o.bias[channel] : 0.f);
  }
};

// ---- weight gradient ---------------------------------------------------------------------------

template <typename Cfg_>
struct WeightGradProblem {
  using Cfg = Cfg_;
  static constexpr int kColumns = Cfg::kBPerThread;  // B columns a thread copies, kThreads / BK apart

  // Per block, the weight positions (c, r, s) of a thread's B columns: their offset in an image
  // relative to the pixel's tap (0, 0), and the tap's displacement for the padding test. A
  // column past C/G*R*S gets dh = kNoRow, which fails every padding test.
  static constexpr int32_t kNoRow = -(1 << 30);
  struct Thread {
    int32_t x_offset[kColumns];
    int32_t dh[kColumns], dw[kColumns];
  };
  static CC_HOST_DEVICE Thread thread_state(const IgemmParams& p, const IgemmTile& t, int tid) {
    Thread th;
    CC_UNROLL
    for (int b = 0; b < kColumns; ++b) {
      const int32_t q = t.n0 + tid / Cfg::BK + b * (Cfg::kThreads / Cfg::BK);
      const bool valid = q < p.cols;
      int32_t c = 0, rs = 0, r = 0, s = 0;
      p.div_taps.divmod(valid ? q : 0, c, rs);
      p.div_taps_w.divmod(rs, r, s);
      th.dh[b] = r * p.dil_h;
      th.dw[b] = s * p.dil_w;
      th.x_offset[b] = ((t.group * p.src_group_channels + c) * p.src_h + th.dh[b]) * p.src_w + th.dw[b];
      if (!valid) th.dh[b] = kNoRow;
    }
    return th;
  }

  // Thread tid's copies of k-tile `ktile` (pixels p0 = ktile*BK ..) into buffer `stage`; each
  // thread copies one pixel i = tid % BK (decoded once here) for all its rows and columns:
  //   As[i][m] = dy[n, group*K/G + m0 + m, pq]                   (0 past K/G or the pixels)
  //   Bs[i][j] = x[n, group's c, hi0 + r*dil_h, wi0 + s*dil_w]   for column n0 + j = (c, r, s)
  //                                                              (0 in the padding or past C/G*R*S)
  template <typename Copier>
  static CC_HOST_DEVICE void load_stage(Copier& copier, int tid, const IgemmParams& p, const IgemmTile& t,
                                        const Thread& th, const IgemmOperands& o, int32_t ktile, float* stage) {
    const int i = tid % Cfg::BK;
    const int32_t pixel = ktile * Cfg::BK + i;
    const bool pixel_valid = pixel < p.pixels;
    const IgemmPixel px = igemm_pixel(p, pixel_valid ? pixel : 0);
    float* As = stage;
    float* Bs = stage + Cfg::kAFloats;
    const int32_t pq_area = p.dst_h * p.dst_w;
    const float* dy_pixel = o.a + (int64_t(px.n) * p.dst_channels + t.group * p.rows + t.m0) * pq_area + px.ij;
    CC_UNROLL
    for (int a = 0; a < Cfg::kAPerThread; ++a) {
      const int m = tid / Cfg::BK + a * (Cfg::kThreads / Cfg::BK);
      const bool valid = pixel_valid && t.m0 + m < p.rows;
      copier.copy(As + i * Cfg::kAStride + m, valid ? dy_pixel + int64_t(m) * pq_area : o.a, valid);
    }
    const float* x_pixel = o.b + (int64_t(px.n) * p.src_channels * p.src_h + px.hi0) * p.src_w + px.wi0;  // used only when valid
    CC_UNROLL
    for (int b = 0; b < kColumns; ++b) {
      const int j = tid / Cfg::BK + b * (Cfg::kThreads / Cfg::BK);
      const bool valid = pixel_valid && uint32_t(px.hi0 + th.dh[b]) < uint32_t(p.src_h) &&
                         uint32_t(px.wi0 + th.dw[b]) < uint32_t(p.src_w);
      copier.copy(Bs + i * Cfg::kBStride + j, valid ? x_pixel + th.x_offset[b] : o.b, valid);
    }
  }

  // dw[k, q] (one split) or its partial, for tile row `row` (channel) and column `col` (q).
  static CC_HOST_DEVICE void store(const IgemmParams& p, const IgemmTile& t, int row, int col, float value,
                                   const IgemmOperands& o) {
    const int32_t q = t.n0 + col, k_in_group = t.m0 + row;
    if (q >= p.cols || k_in_group >= p.rows) return;
    const int64_t at = (int64_t(t.group) * p.rows + k_in_group) * p.cols + q;
    if (p.splits > 1) {
      o.partial[t.split * output_elements(p) + at] = value;
    } else {
      o.out[at] = value;
    }
  }

  static CC_HOST_DEVICE int64_t output_elements(const IgemmParams& p) { return int64_t(p.dst_channels) * p.cols; }

  static CC_HOST_DEVICE void reduce_element(const IgemmParams& p, const IgemmOperands& o, int64_t e) {
    float sum = 0.f;
    for (int32_t z = 0; z < p.splits; ++z) sum += o.partial[z * output_elements(p) + e];
    o.out[e] = sum;
  }
};

// ---- shared by both problems --------------------------------------------------------------------

// Four floats from 16-byte-aligned shared memory: one 128-bit load on the GPU.
CC_HOST_DEVICE void load4(const float* src, float (&dst)[8], int at) {
#if defined(__CUDA_ARCH__)
  const float4 v = *reinterpret_cast<const float4*>(src);
  dst[at] = v.x;
  dst[at + 1] = v.y;
  dst[at + 2] = v.z;
  dst[at + 3] = v.w;
#else
  for (int e = 0; e < 4; ++e) dst[at + e] = src[e];
#endif
}

// The multiply of a stage, acc += the buffer's BK steps of A^T B, and where each of a thread's 64
// accumulators sits in the block tile. Two ways:
//
//   SimtMath  float32 FFMA: each thread an 8 x 8 register tile, rows {4*tm..4*tm+3} and
//             {BM/2 + 4*tm..}, columns {4*tn..} and {BN/2 + 4*tn..}, from 128-bit shared loads.
//   Tf32Math  TF32 tensor cores (mma.sync m16n8k8, float32 accumulate; sm_80+), taken when
//             float32 convolutions may use TF32 as cuDNN's do (torch.backends.cudnn.allow_tf32).
//             Warps 2 x (warps / 2) over the tile; a warp's tile is MF x NF mma tiles of 16 x 8.
//             Operands are rounded to TF32 (to nearest, ties away: cvt.rna) as they leave shared
//             memory. The fragment layout is the PTX ISA's (mma.m16n8k8 .tf32): with lane's
//             group g = lane / 4 and t = lane % 4,
//               a0 = A(g, t), a1 = A(g + 8, t), a2 = A(g, t + 4), a3 = A(g + 8, t + 4)
//               b0 = B(t, g), b1 = B(t + 4, g)
//               c0 = C(g, 2t), c1 = C(g, 2t + 1), c2 = C(g + 8, 2t), c3 = C(g + 8, 2t + 1)
//             csrc/testing/emulate_kernels.cpp runs the mma as that table says, over the
//             fragments these functions load.
constexpr int kAccumulators = 64;

struct SimtMath {
  template <typename Cfg>
  static CC_HOST_DEVICE void multiply_stage(int tid, const float* stage, float (&acc)[kAccumulators]) {
    const float* As = stage;
    const float* Bs = stage + Cfg::kAFloats;
    const int tm = tid / Cfg::kThreadsN, tn = tid % Cfg::kThreadsN;
    CC_UNROLL
    for (int i = 0; i < Cfg::BK; ++i) {
      float a[8], b[8];
      load4(As + i * Cfg::kAStride + 4 * tm, a, 0);
      load4(As + i * Cfg::kAStride + Cfg::BM / 2 + 4 * tm, a, 4);
      load4(Bs + i * Cfg::kBStride + 4 * tn, b, 0);
      load4(Bs + i * Cfg::kBStride + Cfg::BN / 2 + 4 * tn, b, 4);
      CC_UNROLL
      for (int m = 0; m < 8; ++m) {
        CC_UNROLL
        for (int n = 0; n < 8; ++n) acc[m * 8 + n] += a[m] * b[n];
      }
    }
  }
  template <typename Cfg>
  static CC_HOST_DEVICE void position(int tid, int e, int& row, int& col) {
    const int tm = tid / Cfg::kThreadsN, tn = tid % Cfg::kThreadsN, m = e / 8, n = e % 8;
    row = (m / 4) * (Cfg::BM / 2) + 4 * tm + m % 4;
    col = (n / 4) * (Cfg::BN / 2) + 4 * tn + n % 4;
  }
};

// A float32 rounded to TF32 (10 mantissa bits; to nearest, ties away from zero), as cvt.rna.tf32.f32.
CC_HOST_DEVICE uint32_t to_tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(out) : "f"(x));
  return out;
#else
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits += 0x1000u;  // Inf and NaN stay as they are
  return bits & 0xffffe000u;
#endif
}

struct Tf32Math {
  template <typename Cfg>
  struct Shape {
    static constexpr int kWarps = Cfg::kThreads / 32, kWarpsM = 2, kWarpsN = kWarps / kWarpsM;
    static constexpr int WM = Cfg::BM / kWarpsM, WN = Cfg::BN / kWarpsN;  // a warp's tile
    static constexpr int MF = WM / 16, NF = WN / 8;                       // its mma tiles
    static_assert(MF * NF * 4 == kAccumulators && Cfg::BK % 8 == 0, "64 accumulators, k-steps of 8");
  };
  // A lane's operands of one k-step (8 of the stage's BK), rounded to TF32.
  template <typename Cfg>
  struct Fragments {
    uint32_t a[Shape<Cfg>::MF][4];
    uint32_t b[Shape<Cfg>::NF][2];
  };
  template <typename Cfg>
  static CC_HOST_DEVICE void load_fragments(int tid, const float* stage, int k, Fragments<Cfg>& f) {
    using S = Shape<Cfg>;
    const float* As = stage + k * Cfg::kAStride;
    const float* Bs = stage + Cfg::kAFloats + k * Cfg::kBStride;
    const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int row0 = (warp / S::kWarpsN) * S::WM + g, col0 = (warp % S::kWarpsN) * S::WN + g;
    CC_UNROLL
    for (int mf = 0; mf < S::MF; ++mf) {
      const int row = row0 + mf * 16;
      f.a[mf][0] = to_tf32(As[t * Cfg::kAStride + row]);
      f.a[mf][1] = to_tf32(As[t * Cfg::kAStride + row + 8]);
      f.a[mf][2] = to_tf32(As[(t + 4) * Cfg::kAStride + row]);
      f.a[mf][3] = to_tf32(As[(t + 4) * Cfg::kAStride + row + 8]);
    }
    CC_UNROLL
    for (int nf = 0; nf < S::NF; ++nf) {
      f.b[nf][0] = to_tf32(Bs[t * Cfg::kBStride + col0 + nf * 8]);
      f.b[nf][1] = to_tf32(Bs[(t + 4) * Cfg::kBStride + col0 + nf * 8]);
    }
  }
  // Accumulators (mf, nf, i) at e = (mf * NF + nf) * 4 + i.
  template <typename Cfg>
  static CC_HOST_DEVICE void position(int tid, int e, int& row, int& col) {
    using S = Shape<Cfg>;
    const int warp = tid / 32, lane = tid % 32, i = e % 4, mf = e / 4 / S::NF, nf = e / 4 % S::NF;
    row = (warp / S::kWarpsN) * S::WM + mf * 16 + lane / 4 + 8 * (i / 2);
    col = (warp % S::kWarpsN) * S::WN + nf * 8 + 2 * (lane % 4) + i % 2;
  }
#if defined(__CUDA_ARCH__)
  template <typename Cfg>
  static __device__ __forceinline__ void multiply_stage(int tid, const float* stage, float (&acc)[kAccumulators]) {
    using S = Shape<Cfg>;
    CC_UNROLL
    for (int k = 0; k < Cfg::BK; k += 8) {
      Fragments<Cfg> f;
      load_fragments<Cfg>(tid, stage, k, f);
      CC_UNROLL
      for (int mf = 0; mf < S::MF; ++mf) {
        CC_UNROLL
        for (int nf = 0; nf < S::NF; ++nf) {
          float* c = acc + (mf * S::NF + nf) * 4;
#if __CUDA_ARCH__ >= 800
          asm volatile(
              "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
              "{%0,%1,%2,%3};\n"
              : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
              : "r"(f.a[mf][0]), "r"(f.a[mf][1]), "r"(f.a[mf][2]), "r"(f.a[mf][3]), "r"(f.b[nf][0]),
                "r"(f.b[nf][1]));
#else
          __trap();  // the host takes Tf32Math on sm_80+ only
#endif
        }
      }
    }
  }
#endif
};

// Thread tid's outputs, each at its place in the block tile.
template <typename Problem, typename Math>
CC_HOST_DEVICE void igemm_store(int tid, const IgemmParams& p, const IgemmTile& t, const float (&acc)[kAccumulators],
                                const IgemmOperands& o) {
  using Cfg = typename Problem::Cfg;
  CC_UNROLL
  for (int e = 0; e < kAccumulators; ++e) {
    int row = 0, col = 0;
    Math::template position<Cfg>(tid, e, row, col);
    Problem::store(p, t, row, col, acc[e], o);
  }
}

// ---- host side -------------------------------------------------------------------------------

// The wave model. With at least one tile per multiprocessor the reduction stays whole: a split
// would add a partial write and read of the output for the last, partly filled wave at most.
// With fewer, the reduction is split until the blocks fill every SM `blocks_per_sm` deep,
// keeping at least kMinKTilesPerSplit k-tiles (64 reduction steps) per split so each block still
// amortises its prologue and epilogue; at most kMaxSplits.
constexpr int32_t kMinKTilesPerSplit = 8;
constexpr int32_t kMaxSplits = 16;
inline int32_t choose_splits(int64_t tiles, int32_t k_tiles, int32_t sms, int32_t blocks_per_sm) {
  if (tiles >= sms) return 1;
  const int64_t slots = int64_t(sms) * blocks_per_sm;
  int64_t splits = (slots + tiles - 1) / tiles;
  splits = std::min<int64_t>(splits, std::max<int32_t>(1, k_tiles / kMinKTilesPerSplit));
  return int32_t(std::max<int64_t>(1, std::min<int64_t>(splits, kMaxSplits)));
}

// Which implicit GEMM tile a pass takes, if any. Only float32 layers whose indices fit int32 and
// whose GEMM has at least 32 rows per group (output channels; the input gradient's: input
// channels; fewer leave most of a 64-row tile idle, where the tiled kernels do better); the
// 128-row tile when it pads the rows no more than the 64-row one does. The weight gradient also
// wants 32 weight positions per output channel.
enum class IgemmChoice { None, Large, Medium };
inline IgemmChoice choose_igemm(const ConvShape& s, bool indices_fit_int32, bool float32, DirectPass pass) {
  const int64_t rows = pass == DirectPass::InputGrad ? s.in_per_group() : s.out_per_group();
  if (!float32 || !indices_fit_int32 || rows < 32 || (pass == DirectPass::WeightGrad && s.column_rows() < 32)) {
    return IgemmChoice::None;
  }
  const auto padded = [rows](int64_t tile) { return (rows + tile - 1) / tile * tile; };
  return padded(IgemmLarge<0>::BM) <= padded(IgemmMedium<0>::BM) ? IgemmChoice::Large : IgemmChoice::Medium;
}

// The registers per thread scripts/check_cuda_kernels.py allows (it reads the rule below): two
// 256-thread blocks or three 128-thread blocks in an SM's 64K registers. Blocks of Cfg one SM
// holds at that ceiling: the CUDA host code asks the runtime instead, the emulator uses this.
template <typename Cfg>
constexpr int32_t igemm_register_ceiling() { return Cfg::kThreads >= 256 ? 128 : 168; }
template <typename Cfg>
constexpr int32_t igemm_blocks_per_sm_at_ceiling() { return 65536 / (igemm_register_ceiling<Cfg>() * Cfg::kThreads); }

// The launches of a pass: the forward's one correlation, or the input gradient's one per stride
// phase that some tap reaches (plan.h); `zero_first` when other phases hold positions no tap
// reaches, whose dx stays zero. The weight gradient's one launch reads the forward's correlation.
struct IgemmPass {
  std::vector<std::pair<BlockedProblem, WeightTaps>> correlations;
  bool zero_first = false;
};
inline IgemmPass igemm_pass(const ConvShape& s, DirectPass pass) {
  IgemmPass launches;
  if (pass != DirectPass::InputGrad) {
    launches.correlations.push_back({forward_problem(s), WeightTaps{s.kernel_h, s.kernel_w}});
    return launches;
  }
  const std::vector<Phase> phases = input_grad_phases(s);
  for (const Phase& ph : phases) launches.correlations.push_back({input_grad_problem(s, ph), input_grad_taps(s, ph)});
  launches.zero_first = !input_grad_phases_cover(s, phases);
  return launches;
}

// splits = 0: the wave model's choice for `sms` multiprocessors holding `blocks_per_sm` blocks
// each; otherwise forced (the emulator).
template <typename Problem>
IgemmParams make_igemm_params(const BlockedProblem& c, const WeightTaps& taps, int32_t sms, int32_t blocks_per_sm,
                              int32_t splits) {
  using Cfg = typename Problem::Cfg;
  constexpr bool weight_grad = std::is_same_v<Problem, WeightGradProblem<Cfg>>;
  IgemmParams p;
  p.groups = int32_t(c.groups);
  p.src_group_channels = int32_t(c.in_per_group);
  p.src_channels = int32_t(c.groups * c.in_per_group);
  p.src_h = int32_t(c.in_h);
  p.src_w = int32_t(c.in_w);
  p.dst_channels = int32_t(c.groups * c.out_per_group);
  p.dst_h = int32_t(c.plane_h());
  p.dst_w = int32_t(c.plane_w());
  p.stride_h = int32_t(c.stride_h);
  p.stride_w = int32_t(c.stride_w);
  p.dil_h = int32_t(c.dil_h);
  p.dil_w = int32_t(c.dil_w);
  p.offset_h = int32_t(c.offset_h);
  p.offset_w = int32_t(c.offset_w);
  p.origin_h = int32_t(c.out_origin_h);
  p.origin_w = int32_t(c.out_origin_w);
  p.step_h = int32_t(c.out_step_h);
  p.step_w = int32_t(c.out_step_w);
  p.taps_h = int32_t(c.taps_h);
  p.taps_w = int32_t(c.taps_w);
  p.kernel_w = int32_t(taps.kernel_w);
  p.first_r = int32_t(taps.first_h);
  p.step_r = int32_t(taps.step_h);
  p.first_s = int32_t(taps.first_w);
  p.step_s = int32_t(taps.step_w);
  // The weight's K/G and C/G: the problem's output and input channels, or (transposed) the reverse.
  const int64_t w_k = taps.transposed ? c.in_per_group : c.out_per_group;
  const int64_t w_c = taps.transposed ? c.out_per_group : c.in_per_group;
  const int64_t kernel_area = taps.kernel_h * taps.kernel_w;
  p.w_group = int32_t(w_k * w_c * kernel_area);
  p.w_row = int32_t(taps.transposed ? kernel_area : w_c * kernel_area);
  p.w_channel = int32_t(taps.transposed ? w_c * kernel_area : kernel_area);
  p.rows = int32_t(c.out_per_group);
  p.pixels = int32_t(c.batch * c.out_h * c.out_w);
  const int32_t taps_count = p.taps_h * p.taps_w;
  p.channel_blocks = (p.src_group_channels + Cfg::BK - 1) / Cfg::BK;
  if (weight_grad) {
    p.cols = p.src_group_channels * taps_count;
    p.k_tiles = (p.pixels + Cfg::BK - 1) / Cfg::BK;
  } else {
    p.cols = p.pixels;
    p.k_tiles = taps_count * p.channel_blocks;
  }
  p.splits = splits > 0 ? splits : choose_splits(igemm_tiles<Cfg>(p), p.k_tiles, sms, blocks_per_sm);
  p.k_tiles_per_split = std::max(1, (p.k_tiles + p.splits - 1) / p.splits);
  // The wave model's splits never leave one empty (a forced count may, and must still be right).
  if (splits <= 0) p.splits = std::max(1, (p.k_tiles + p.k_tiles_per_split - 1) / p.k_tiles_per_split);
  p.div_grid = FastDivmod(uint32_t(c.out_h * c.out_w));
  p.div_grid_w = FastDivmod(uint32_t(c.out_w));
  p.div_channel_blocks = FastDivmod(uint32_t(p.channel_blocks));
  p.div_taps_w = FastDivmod(uint32_t(p.taps_w));
  p.div_taps = FastDivmod(uint32_t(taps_count));
  return p;
}

}  // namespace gpu
}  // namespace channelconv
