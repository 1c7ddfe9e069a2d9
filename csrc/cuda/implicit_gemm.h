// The direct forward as an implicit GEMM (float32, SIMT), written as HOST_DEVICE pieces in the
// style of kernel_bodies.h: direct.cu's __global__ kernel and csrc/testing/emulate_kernels.cpp
// both run exactly these functions, the kernel with real threads, barriers and cp.async, the
// emulator thread by thread with shared tiles poisoned until their copies land.
//
// Per group the forward is the GEMM
//   y[k, p] = sum_q w[k, q] * cols[q, p],   M = K/G (rows k), N = batch * H_o * W_o (columns p,
//   the batch folded in), K = C/G * k_h * k_w (q = (c, r, s)),
// where cols, the im2col matrix, is never built: a block gathers its B tile from x directly.
//
//   tiles      a block owns BM output channels x BN output pixels of one group; split z of
//              `splits` walks k-tiles [z*per_split, (z+1)*per_split) of BK reduction steps
//   loads      every element is one 4-byte cp.async with zero-fill (padding, ragged edges, and
//              the rows or columns past the GEMM's end arrive as 0, so the multiply never tests);
//              the pixel of a thread's B column is decoded once per block, the reduction index
//              (c, r, s) per stage by fast divmod (no division in the main loop)
//   pipeline   kStages shared buffers; k-tile t+kStages-1 is issued while t is multiplied
//              (pipeline_step below is the one statement of that order)
//   multiply   each thread an 8 x 8 register tile from 128-bit shared loads: channels
//              {4*tm..4*tm+3} and {BM/2 + 4*tm..}, pixels {4*tn..} and {BN/2 + 4*tn..}
//   epilogue   one split: y (+ bias) directly; several: float32 partials [split][K][N], which
//              splitk_reduce_element adds in split order 0, 1, ... (deterministic), then bias
//
// The host uses this kernel only when every index fits int32 (indices_fit_int32).
#pragma once

#include <algorithm>
#include <cstdint>

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

// Everything the kernel knows about the convolution, computed once on the host.
struct IgemmParams {
  int32_t C, H, W;                 // input channels and extent
  int32_t K, P, Q;                 // output channels and extent
  int32_t groups, Cg, Kg;          // groups, channels per group in and out
  int32_t R, S;                    // kernel extent
  int32_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int32_t gemm_n;                  // batch * P * Q
  int32_t gemm_k;                  // Cg * R * S, one weight row
  int32_t c_blocks;                // ceil(Cg / BK): k-tiles per filter tap
  int32_t k_tiles;                 // R * S * c_blocks
  int32_t splits, k_tiles_per_split;
  FastDivmod div_pq, div_q;        // pixel p -> (n, ho*Q + wo) -> (ho, wo)
  FastDivmod div_cblocks, div_s;   // k-tile -> (tap r*S + s, channel block) ; tap -> (r, s)
};

template <int BM_, int BN_, int BK_, int Stages_>
struct IgemmConfig {
  static constexpr int BM = BM_;  // output channels per block tile
  static constexpr int BN = BN_;  // output pixels per block tile
  static constexpr int BK = BK_;  // reduction steps per stage
  static constexpr int kStages = Stages_;
  static constexpr int TM = 8, TN = 8;  // per-thread register tile, two 4-wide halves each way
  static constexpr int kThreadsM = BM / TM, kThreadsN = BN / TN;
  static constexpr int kThreads = kThreadsM * kThreadsN;
  // A is stored transposed, As[i][m] at i * kAStride + m. The +4 keeps 128-bit rows aligned and
  // spreads a warp's stores (i = tid % BK varies fastest) over all 32 banks.
  static constexpr int kAStride = BM + 4;
  static constexpr int kAFloats = BK * kAStride;
  static constexpr int kBFloats = BK * BN;  // Bs[i][j] at i * BN + j
  static constexpr int kStageFloats = kAFloats + kBFloats;
  static constexpr int kSharedFloats = kStages * kStageFloats;
  static constexpr int kAPerThread = BM * BK / kThreads;  // A elements each thread copies per stage
  static constexpr int kBPerThread = BN * BK / kThreads;
  static constexpr int kBRowsPerPass = kThreads / BN;     // B rows one pass of the threads covers
  static_assert(BM % 8 == 0 && BN % 8 == 0, "two 4-wide halves per thread each way");
  static_assert((BM * BK) % kThreads == 0 && kThreads % BK == 0, "A copies split evenly");
  static_assert(kThreads % BN == 0 && (BN * BK) % kThreads == 0, "each thread copies one B column");
  static_assert(Stages_ >= 2, "at least double buffering");
};

// 128 x 128 for many output channels per group; 64 x 128 when a group has fewer than 128.
using IgemmLarge = IgemmConfig<128, 128, 8, 4>;
using IgemmMedium = IgemmConfig<64, 128, 8, 4>;

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
  int32_t n0;        // first GEMM column (pixel of the folded batch)
  int32_t kt_begin;  // first k-tile of this split
  int32_t kt_count;  // k-tiles of this split (0 when splits over-cover the reduction)
  int32_t split;
};

template <typename Cfg>
CC_HOST_DEVICE int32_t igemm_n_tiles(const IgemmParams& p) { return (p.gemm_n + Cfg::BN - 1) / Cfg::BN; }
template <typename Cfg>
CC_HOST_DEVICE int32_t igemm_m_tiles(const IgemmParams& p) { return (p.Kg + Cfg::BM - 1) / Cfg::BM; }

// Tiles are ordered (group, channel tile, pixel tile), pixel tile fastest, so neighbouring
// blocks read the same weights.
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

// The reduction runs filter tap by filter tap: k-tile t covers tap rs = t / c_blocks and the BK
// channels from c0 = (t % c_blocks) * BK of the group (channels past C/G arrive as 0). Within a
// stage every row then has the same tap, so a thread decodes one position per stage (not one per
// element), tests its pixel's padding once, and steps through channels by adding H*W.
struct IgemmStagePos {
  int32_t c0;      // first channel of the stage, within the group
  int32_t rs;      // the tap, r * S + s
  int32_t dh, dw;  // r * dilation_h, s * dilation_w
};
CC_HOST_DEVICE IgemmStagePos igemm_stage_pos(const IgemmParams& p, int32_t ktile, int BK) {
  IgemmStagePos pos;
  int32_t cb = 0, r = 0, s = 0;
  p.div_cblocks.divmod(ktile, pos.rs, cb);
  p.div_s.divmod(pos.rs, r, s);
  pos.c0 = cb * BK;
  pos.dh = r * p.dil_h;
  pos.dw = s * p.dil_w;
  return pos;
}

// What a thread needs, per block, to gather its B column: its pixel's offset in x and the
// input coordinates of tap (0, 0), decoded once.
struct IgemmColumn {
  int32_t x_offset;  // x[n, group's channel 0, hi0, wi0] (may point into the padding)
  int32_t hi0, wi0;  // ho * stride - pad, wo * stride - pad
  bool valid;        // the pixel exists (p < gemm_n)
};

template <typename Cfg>
CC_HOST_DEVICE IgemmColumn igemm_column(const IgemmParams& p, const IgemmTile& t, int tid) {
  IgemmColumn col;
  const int32_t pixel = t.n0 + tid % Cfg::BN;
  col.valid = pixel < p.gemm_n;
  int32_t n = 0, pq = 0, ho = 0, wo = 0;
  if (col.valid) {
    p.div_pq.divmod(pixel, n, pq);
    p.div_q.divmod(pq, ho, wo);
  }
  col.hi0 = ho * p.stride_h - p.pad_h;
  col.wi0 = wo * p.stride_w - p.pad_w;
  col.x_offset = ((n * p.C + t.group * p.Cg) * p.H + col.hi0) * p.W + col.wi0;
  return col;
}

// Issues thread tid's copies of k-tile `ktile` (absolute) into buffer `smem_stage`:
//   As[i][m] = w[group*Kg + m0 + m, c0 + i, r, s]        (0 past Kg or C/G)
//   Bs[i][j] = x[n, group's channel c0 + i, hi0 + r*dil_h, wi0 + s*dil_w] of pixel n0 + j
//                                                         (0 in the padding, past C/G or gemm_n)
// Copier::copy(dst, src, valid) is cp.async with zero-fill on the GPU; src is dereferenced
// only when valid.
template <typename Cfg, typename Copier>
CC_HOST_DEVICE void igemm_load_stage(Copier& copier, int tid, const IgemmParams& p, const IgemmTile& t,
                                     const IgemmColumn& col, const float* x, const float* w, int32_t ktile,
                                     float* smem_stage) {
  const IgemmStagePos pos = igemm_stage_pos(p, ktile, Cfg::BK);
  float* As = smem_stage;
  float* Bs = smem_stage + Cfg::kAFloats;
  {
    // Weights: a warp reads BK channels (stride R*S) of 32 / BK output channels.
    const int i = tid % Cfg::BK;
    const int32_t c = pos.c0 + i;
    const float* w_tap = w + (int64_t(t.group) * p.Kg + t.m0) * p.gemm_k + int64_t(c) * (p.R * p.S) + pos.rs;
    CC_UNROLL
    for (int a = 0; a < Cfg::kAPerThread; ++a) {
      const int m = tid / Cfg::BK + a * (Cfg::kThreads / Cfg::BK);
      const bool valid = t.m0 + m < p.Kg && c < p.Cg;
      copier.copy(As + i * Cfg::kAStride + m, valid ? w_tap + int64_t(m) * p.gemm_k : w, valid);
    }
  }
  {
    // Input: a warp reads 32 consecutive pixels of one channel at the stage's tap.
    const int j = tid % Cfg::BN;
    const bool inside = col.valid && uint32_t(col.hi0 + pos.dh) < uint32_t(p.H) &&
                        uint32_t(col.wi0 + pos.dw) < uint32_t(p.W);
    const int32_t plane = p.H * p.W;
    const float* x_tap = x + col.x_offset + pos.dh * p.W + pos.dw;  // formed only for use when inside
    CC_UNROLL
    for (int b = 0; b < Cfg::kBPerThread; ++b) {
      const int i = tid / Cfg::BN + b * Cfg::kBRowsPerPass;
      const int32_t c = pos.c0 + i;
      const bool valid = inside && c < p.Cg;
      copier.copy(Bs + i * Cfg::BN + j, valid ? x_tap + c * plane : x, valid);
    }
  }
}

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

// acc += the buffer's BK steps of A^T B for thread tid's 8 x 8 outputs.
template <typename Cfg>
CC_HOST_DEVICE void igemm_multiply_stage(int tid, const float* smem_stage, float (&acc)[8][8]) {
  const float* As = smem_stage;
  const float* Bs = smem_stage + Cfg::kAFloats;
  const int tm = tid / Cfg::kThreadsN, tn = tid % Cfg::kThreadsN;
  CC_UNROLL
  for (int i = 0; i < Cfg::BK; ++i) {
    float a[8], b[8];
    load4(As + i * Cfg::kAStride + 4 * tm, a, 0);
    load4(As + i * Cfg::kAStride + Cfg::BM / 2 + 4 * tm, a, 4);
    load4(Bs + i * Cfg::BN + 4 * tn, b, 0);
    load4(Bs + i * Cfg::BN + Cfg::BN / 2 + 4 * tn, b, 4);
    CC_UNROLL
    for (int m = 0; m < 8; ++m) {
      CC_UNROLL
      for (int n = 0; n < 8; ++n) acc[m][n] += a[m] * b[n];
    }
  }
}

// The tile-relative channel and pixel of thread tid's register acc[m][n].
template <typename Cfg>
CC_HOST_DEVICE int igemm_row_of(int tid, int m) { return (m / 4) * (Cfg::BM / 2) + 4 * (tid / Cfg::kThreadsN) + m % 4; }
template <typename Cfg>
CC_HOST_DEVICE int igemm_col_of(int tid, int n) { return (n / 4) * (Cfg::BN / 2) + 4 * (tid % Cfg::kThreadsN) + n % 4; }

// Thread tid's outputs that exist. One split: y[n, group*Kg + k, ho, wo] = acc + bias, in
// scalar_t. Several: partial[split][group*Kg + k][pixel] = acc, for splitk_reduce_element.
template <typename Cfg, typename scalar_t>
CC_HOST_DEVICE void igemm_store(int tid, const IgemmParams& p, const IgemmTile& t, const float (&acc)[8][8],
                                const scalar_t* bias, scalar_t* y, float* partial) {
  const int32_t pq_area = p.P * p.Q;
  CC_UNROLL
  for (int n = 0; n < 8; ++n) {
    const int32_t pixel = t.n0 + igemm_col_of<Cfg>(tid, n);
    if (pixel >= p.gemm_n) continue;
    int32_t image = 0, pq = 0;
    p.div_pq.divmod(pixel, image, pq);
    CC_UNROLL
    for (int m = 0; m < 8; ++m) {
      const int32_t k_in_group = t.m0 + igemm_row_of<Cfg>(tid, m);
      if (k_in_group >= p.Kg) continue;
      const int32_t k = t.group * p.Kg + k_in_group;
      if (p.splits == 1) {
        const float b = bias != nullptr ? static_cast<float>(bias[k]) : 0.f;
        y[(int64_t(image) * p.K + k) * pq_area + pq] = static_cast<scalar_t>(acc[m][n] + b);
      } else {
        partial[(int64_t(t.split) * p.K + k) * p.gemm_n + pixel] = acc[m][n];
      }
    }
  }
}

// Output element e = (n, k, ho, wo) of y after a split-K launch: the splits' partials in split
// order, then the bias.
template <typename scalar_t>
CC_HOST_DEVICE void splitk_reduce_element(const IgemmParams& p, const float* partial, const scalar_t* bias,
                                          scalar_t* y, int64_t e) {
  const int64_t pq_area = int64_t(p.P) * p.Q;
  const int64_t pq = e % pq_area, k = (e / pq_area) % p.K, image = e / (pq_area * p.K);
  const int64_t pixel = image * pq_area + pq;
  float sum = 0.f;
  for (int32_t z = 0; z < p.splits; ++z) sum += partial[(z * int64_t(p.K) + k) * p.gemm_n + pixel];
  if (bias != nullptr) sum += static_cast<float>(bias[k]);
  y[e] = static_cast<scalar_t>(sum);
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

// Which forward kernel direct.cu launches (and the emulator's "auto" picks). The implicit GEMM
// takes float32 layers whose indices fit int32 and whose groups have at least 32 output channels
// (fewer leave most of a 64-row tile idle, where the tiled kernel's narrow tile does better); its
// 128-row tile when that pads the channels no more than the 64-row one does.
enum class ForwardKernel { IgemmLarge, IgemmMedium, WideTile, NarrowTile };
inline ForwardKernel choose_forward_kernel(const ConvShape& s, bool indices_fit_int32, bool float32) {
  const int64_t kg = s.out_per_group();
  if (float32 && indices_fit_int32 && kg >= 32) {
    const auto padded = [kg](int64_t rows) { return (kg + rows - 1) / rows * rows; };
    return padded(IgemmLarge::BM) <= padded(IgemmMedium::BM) ? ForwardKernel::IgemmLarge : ForwardKernel::IgemmMedium;
  }
  return use_wide_tile(s) ? ForwardKernel::WideTile : ForwardKernel::NarrowTile;
}
// Blocks of Cfg one SM holds at the register ceiling scripts/check_cuda_kernels.py enforces (128
// per thread, 64K per SM); the CUDA host code asks the runtime instead, the emulator uses this.
template <typename Cfg>
constexpr int32_t igemm_blocks_per_sm_at_ceiling() { return 65536 / (128 * Cfg::kThreads); }

// splits = 0: the wave model's choice for `sms` multiprocessors holding `blocks_per_sm` blocks
// each; otherwise forced (the emulator).
template <typename Cfg>
IgemmParams make_igemm_params(const ConvShape& s, int32_t sms, int32_t blocks_per_sm, int32_t splits) {
  IgemmParams p;
  p.C = int32_t(s.in_channels);
  p.H = int32_t(s.in_h);
  p.W = int32_t(s.in_w);
  p.K = int32_t(s.out_channels);
  p.P = int32_t(s.out_h);
  p.Q = int32_t(s.out_w);
  p.groups = int32_t(s.groups);
  p.Cg = int32_t(s.in_per_group());
  p.Kg = int32_t(s.out_per_group());
  p.R = int32_t(s.kernel_h);
  p.S = int32_t(s.kernel_w);
  p.stride_h = int32_t(s.stride[0]);
  p.stride_w = int32_t(s.stride[1]);
  p.pad_h = int32_t(s.padding[0]);
  p.pad_w = int32_t(s.padding[1]);
  p.dil_h = int32_t(s.dilation[0]);
  p.dil_w = int32_t(s.dilation[1]);
  p.gemm_n = int32_t(s.batch * s.out_h * s.out_w);
  p.gemm_k = int32_t(s.column_rows());
  p.c_blocks = (p.Cg + Cfg::BK - 1) / Cfg::BK;
  p.k_tiles = p.R * p.S * p.c_blocks;
  const int64_t tiles = int64_t(igemm_m_tiles<Cfg>(p)) * igemm_n_tiles<Cfg>(p) * p.groups;
  p.splits = splits > 0 ? splits : choose_splits(tiles, p.k_tiles, sms, blocks_per_sm);
  p.k_tiles_per_split = (p.k_tiles + p.splits - 1) / p.splits;
  // The wave model's splits never leave one empty (a forced count may, and must still be right).
  if (splits <= 0) p.splits = (p.k_tiles + p.k_tiles_per_split - 1) / p.k_tiles_per_split;
  p.div_pq = FastDivmod(uint32_t(p.P * p.Q));
  p.div_q = FastDivmod(uint32_t(p.Q));
  p.div_cblocks = FastDivmod(uint32_t(p.c_blocks));
  p.div_s = FastDivmod(uint32_t(p.S));
  return p;
}

template <typename Cfg>
int64_t igemm_tiles(const IgemmParams& p) {
  return int64_t(igemm_m_tiles<Cfg>(p)) * igemm_n_tiles<Cfg>(p) * p.groups;
}

}  // namespace gpu
}  // namespace channelconv
