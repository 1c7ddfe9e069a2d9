// The direct forward and weight gradient as implicit GEMMs (float32, SIMT), written as
// HOST_DEVICE pieces in the style of kernel_bodies.h: direct.cu's __global__ kernel and
// csrc/testing/emulate_kernels.cpp both run exactly these functions, the kernel with real
// threads, barriers and cp.async, the emulator thread by thread with shared tiles poisoned until
// their copies land.
//
// Per group, with cols the im2col matrix (rows q = (c, r, s), columns p = output pixels of the
// whole batch), which is never built (blocks gather their tiles from x directly):
//   forward          y[k, p]  = sum_q w[k, q] * cols[q, p]     M = K/G, N = batch*H_o*W_o, K = C/G*k_h*k_w
//   weight gradient  dw[k, q] = sum_p dy[k, p] * cols[q, p]    M = K/G, N = C/G*k_h*k_w,   K = batch*H_o*W_o
//
//   tiles      a block owns BM output channels x BN columns of one group; split z of `splits`
//              walks k-tiles [z*per_split, (z+1)*per_split). Forward k-tiles are BK channels of one
//              filter tap (igemm_stage_pos); weight-gradient k-tiles BK consecutive pixels.
//   loads      every element is one 4-byte cp.async with zero-fill (padding, ragged edges, and
//              the rows or columns past the GEMM's end arrive as 0, so the multiply never tests).
//              What a thread can decode once per block it does (the forward's pixel, the weight
//              gradient's columns (c, r, s)); the rest once per stage by fast divmod, never per
//              element, and no division anywhere in the main loop.
//   pipeline   kStages shared buffers; k-tile t+kStages-1 is issued while t is multiplied
//              (pipeline_step below is the one statement of that order)
//   multiply   each thread an 8 x 8 register tile from 128-bit shared loads: rows
//              {4*tm..4*tm+3} and {BM/2 + 4*tm..}, columns {4*tn..} and {BN/2 + 4*tn..}
//   epilogue   one split: the result directly (the forward adds its bias); several: float32
//              partials [split][K][N], which the reduce adds in split order 0, 1, ...
//              (deterministic), then the bias
//
// The host uses these kernels only when every index fits int32 (indices_fit_int32).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

// Everything the kernels know about the convolution, computed once on the host.
struct IgemmParams {
  int32_t C, H, W;                 // input channels and extent
  int32_t K, P, Q;                 // output channels and extent
  int32_t groups, Cg, Kg;          // groups, channels per group in and out
  int32_t R, S;                    // kernel extent
  int32_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int32_t pixels;                  // batch * P * Q
  int32_t gemm_k;                  // Cg * R * S, one weight row
  int32_t cols;                    // GEMM columns: pixels (forward), gemm_k (weight gradient)
  int32_t c_blocks;                // forward: ceil(Cg / BK), k-tiles per filter tap
  int32_t k_tiles;                 // forward: R * S * c_blocks; weight gradient: ceil(pixels / BK)
  int32_t splits, k_tiles_per_split;
  FastDivmod div_pq, div_q;        // pixel -> (n, ho*Q + wo) -> (ho, wo)
  FastDivmod div_cblocks, div_s;   // forward k-tile -> (tap r*S + s, channel block); tap -> (r, s)
  FastDivmod div_rs;               // weight-gradient column (c, r*S + s)
};

// The tensors one launch reads and writes. Forward: a = w, b = x, out = y. Weight gradient:
// a = dy, b = x, out = dw (no bias).
struct IgemmOperands {
  const float* a;
  const float* b;
  const float* bias;
  float* out;
  float* partial;  // [splits][K][cols], only when splits > 1
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
  // copies run i fastest (BPad = 4, the weight gradient's); the forward's run j fastest (BPad = 0).
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
CC_HOST_DEVICE int32_t igemm_m_tiles(const IgemmParams& p) { return (p.Kg + Cfg::BM - 1) / Cfg::BM; }
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

// Output pixel `pixel` of the folded batch: its image, its offset in the image's output plane,
// and the input coordinates tap (0, 0) reads.
struct IgemmPixel {
  int32_t n, pq, hi0, wi0;
};
CC_HOST_DEVICE IgemmPixel igemm_pixel(const IgemmParams& p, int32_t pixel) {
  IgemmPixel px;
  int32_t ho = 0, wo = 0;
  p.div_pq.divmod(pixel, px.n, px.pq);
  p.div_q.divmod(px.pq, ho, wo);
  px.hi0 = ho * p.stride_h - p.pad_h;
  px.wi0 = wo * p.stride_w - p.pad_w;
  return px;
}

// ---- forward ----------------------------------------------------------------------------------

// The forward's reduction runs filter tap by filter tap: k-tile t covers tap rs = t / c_blocks
// and the BK channels from c0 = (t % c_blocks) * BK of the group (channels past C/G arrive as
// 0). Within a stage every row then has the same tap, so a thread decodes one position per stage
// (not one per element), tests its pixel's padding once, and steps through channels by H*W.
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

template <typename Cfg_>
struct ForwardProblem {
  using Cfg = Cfg_;

  // Per block, a thread's B column: its pixel's offset in x and tap (0, 0)'s coordinates.
  struct Thread {
    int32_t x_offset;  // x[n, group's channel 0, hi0, wi0] (may point into the padding)
    int32_t hi0, wi0;
    bool valid;        // the pixel exists
  };
  static CC_HOST_DEVICE Thread thread_state(const IgemmParams& p, const IgemmTile& t, int tid) {
    Thread th;
    const int32_t pixel = t.n0 + tid % Cfg::BN;
    th.valid = pixel < p.pixels;
    const IgemmPixel px = igemm_pixel(p, th.valid ? pixel : 0);
    th.hi0 = px.hi0;
    th.wi0 = px.wi0;
    th.x_offset = ((px.n * p.C + t.group * p.Cg) * p.H + px.hi0) * p.W + px.wi0;
    return th;
  }

  // Thread tid's copies of k-tile `ktile` (absolute) into buffer `stage`:
  //   As[i][m] = w[group*Kg + m0 + m, c0 + i, r, s]        (0 past Kg or C/G)
  //   Bs[i][j] = x[n, group's channel c0 + i, hi0 + r*dil_h, wi0 + s*dil_w] of pixel n0 + j
  //                                                         (0 in the padding, past C/G or the pixels)
  // Copier::copy(dst, src, valid) is cp.async with zero-fill on the GPU; src is dereferenced
  // only when valid.
  template <typename Copier>
  static CC_HOST_DEVICE void load_stage(Copier& copier, int tid, const IgemmParams& p, const IgemmTile& t,
                                        const Thread& th, const IgemmOperands& o, int32_t ktile, float* stage) {
    const IgemmStagePos pos = igemm_stage_pos(p, ktile, Cfg::BK);
    float* As = stage;
    float* Bs = stage + Cfg::kAFloats;
    {
      // Weights: a warp reads BK channels (stride R*S) of 32 / BK output channels.
      const int i = tid % Cfg::BK;
      const int32_t c = pos.c0 + i;
      const float* w_tap = o.a + (int64_t(t.group) * p.Kg + t.m0) * p.gemm_k + int64_t(c) * (p.R * p.S) + pos.rs;
      CC_UNROLL
      for (int a = 0; a < Cfg::kAPerThread; ++a) {
        const int m = tid / Cfg::BK + a * (Cfg::kThreads / Cfg::BK);
        const bool valid = t.m0 + m < p.Kg && c < p.Cg;
        copier.copy(As + i * Cfg::kAStride + m, valid ? w_tap + int64_t(m) * p.gemm_k : o.a, valid);
      }
    }
    {
      // Input: a warp reads 32 consecutive pixels of one channel at the stage's tap.
      const int j = tid % Cfg::BN;
      const bool inside = th.valid && uint32_t(th.hi0 + pos.dh) < uint32_t(p.H) &&
                          uint32_t(th.wi0 + pos.dw) < uint32_t(p.W);
      const int32_t plane = p.H * p.W;
      const float* x_tap = o.b + th.x_offset + pos.dh * p.W + pos.dw;  // used only when inside
      CC_UNROLL
      for (int b = 0; b < Cfg::kBPerThread; ++b) {
        const int i = tid / Cfg::BN + b * (Cfg::kThreads / Cfg::BN);
        const int32_t c = pos.c0 + i;
        const bool valid = inside && c < p.Cg;
        copier.copy(Bs + i * Cfg::kBStride + j, valid ? x_tap + c * plane : o.b, valid);
      }
    }
  }

  // y[n, k, pq] (one split) or its partial, for tile row `row` (channel) and column `col` (pixel).
  static CC_HOST_DEVICE void store(const IgemmParams& p, const IgemmTile& t, int row, int col, float value,
                                   const IgemmOperands& o) {
    const int32_t pixel = t.n0 + col, k_in_group = t.m0 + row;
    if (pixel >= p.pixels || k_in_group >= p.Kg) return;
    const int32_t k = t.group * p.Kg + k_in_group;
    if (p.splits > 1) {
      o.partial[(int64_t(t.split) * p.K + k) * p.cols + pixel] = value;
      return;
    }
    int32_t image = 0, pq = 0;
    p.div_pq.divmod(pixel, image, pq);
    o.out[(int64_t(image) * p.K + k) * (p.P * p.Q) + pq] = value + (o.bias != nullptr ? o.bias[k] : 0.f);
  }

  static CC_HOST_DEVICE int64_t output_elements(const IgemmParams& p) { return int64_t(p.pixels) * p.K; }

  // y element e = (n, k, ho, wo) after a split launch: the partials in split order, then the bias.
  static CC_HOST_DEVICE void reduce_element(const IgemmParams& p, const IgemmOperands& o, int64_t e) {
    const int64_t pq_area = int64_t(p.P) * p.Q;
    const int64_t pq = e % pq_area, k = (e / pq_area) % p.K, image = e / (pq_area * p.K);
    const int64_t pixel = image * pq_area + pq;
    float sum = 0.f;
    for (int32_t z = 0; z < p.splits; ++z) sum += o.partial[(z * int64_t(p.K) + k) * p.cols + pixel];
    o.out[e] = sum + (o.bias != nullptr ? o.bias[k] : 0.f);
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
      const bool valid = q < p.gemm_k;
      int32_t c = 0, rs = 0, r = 0, s = 0;
      p.div_rs.divmod(valid ? q : 0, c, rs);
      p.div_s.divmod(rs, r, s);
      th.dh[b] = r * p.dil_h;
      th.dw[b] = s * p.dil_w;
      th.x_offset[b] = ((t.group * p.Cg + c) * p.H + th.dh[b]) * p.W + th.dw[b];
      if (!valid) th.dh[b] = kNoRow;
    }
    return th;
  }

  // Thread tid's copies of k-tile `ktile` (pixels p0 = ktile*BK ..) into buffer `stage`; each
  // thread copies one pixel i = tid % BK (decoded once here) for all its rows and columns:
  //   As[i][m] = dy[n, group*Kg + m0 + m, pq]                    (0 past Kg or the pixels)
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
    const int32_t pq_area = p.P * p.Q;
    const float* dy_pixel = o.a + (int64_t(px.n) * p.K + t.group * p.Kg + t.m0) * pq_area + px.pq;
    CC_UNROLL
    for (int a = 0; a < Cfg::kAPerThread; ++a) {
      const int m = tid / Cfg::BK + a * (Cfg::kThreads / Cfg::BK);
      const bool valid = pixel_valid && t.m0 + m < p.Kg;
      copier.copy(As + i * Cfg::kAStride + m, valid ? dy_pixel + int64_t(m) * pq_area : o.a, valid);
    }
    const float* x_pixel = o.b + (int64_t(px.n) * p.C * p.H + px.hi0) * p.W + px.wi0;  // used only when valid
    CC_UNROLL
    for (int b = 0; b < kColumns; ++b) {
      const int j = tid / Cfg::BK + b * (Cfg::kThreads / Cfg::BK);
      const bool valid = pixel_valid && uint32_t(px.hi0 + th.dh[b]) < uint32_t(p.H) &&
                         uint32_t(px.wi0 + th.dw[b]) < uint32_t(p.W);
      copier.copy(Bs + i * Cfg::kBStride + j, valid ? x_pixel + th.x_offset[b] : o.b, valid);
    }
  }

  // dw[k, q] (one split) or its partial, for tile row `row` (channel) and column `col` (q).
  static CC_HOST_DEVICE void store(const IgemmParams& p, const IgemmTile& t, int row, int col, float value,
                                   const IgemmOperands& o) {
    const int32_t q = t.n0 + col, k_in_group = t.m0 + row;
    if (q >= p.gemm_k || k_in_group >= p.Kg) return;
    const int64_t at = (int64_t(t.group) * p.Kg + k_in_group) * p.gemm_k + q;
    if (p.splits > 1) {
      o.partial[int64_t(t.split) * p.K * p.gemm_k + at] = value;
    } else {
      o.out[at] = value;
    }
  }

  static CC_HOST_DEVICE int64_t output_elements(const IgemmParams& p) { return int64_t(p.K) * p.gemm_k; }

  static CC_HOST_DEVICE void reduce_element(const IgemmParams& p, const IgemmOperands& o, int64_t e) {
    float sum = 0.f;
    for (int32_t z = 0; z < p.splits; ++z) sum += o.partial[z * int64_t(p.K) * p.gemm_k + e];
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

// acc += the buffer's BK steps of A^T B for thread tid's 8 x 8 outputs.
template <typename Cfg>
CC_HOST_DEVICE void igemm_multiply_stage(int tid, const float* stage, float (&acc)[8][8]) {
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
      for (int n = 0; n < 8; ++n) acc[m][n] += a[m] * b[n];
    }
  }
}

// Thread tid's outputs: acc[m][n] sits at tile row (m / 4) * BM/2 + 4*tm + m % 4 and column
// (n / 4) * BN/2 + 4*tn + n % 4.
template <typename Problem>
CC_HOST_DEVICE void igemm_store(int tid, const IgemmParams& p, const IgemmTile& t, const float (&acc)[8][8],
                                const IgemmOperands& o) {
  using Cfg = typename Problem::Cfg;
  const int tm = tid / Cfg::kThreadsN, tn = tid % Cfg::kThreadsN;
  CC_UNROLL
  for (int n = 0; n < 8; ++n) {
    const int col = (n / 4) * (Cfg::BN / 2) + 4 * tn + n % 4;
    CC_UNROLL
    for (int m = 0; m < 8; ++m) {
      Problem::store(p, t, (m / 4) * (Cfg::BM / 2) + 4 * tm + m % 4, col, acc[m][n], o);
    }
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
// whose groups have at least 32 output channels (fewer leave most of a 64-row tile idle, where
// the tiled kernels do better); the 128-row tile when it pads the channels no more than the
// 64-row one does. The weight gradient also wants 32 weight positions per output channel.
enum class IgemmChoice { None, Large, Medium };
inline IgemmChoice choose_igemm(const ConvShape& s, bool indices_fit_int32, bool float32, bool weight_grad) {
  const int64_t kg = s.out_per_group();
  if (!float32 || !indices_fit_int32 || kg < 32 || (weight_grad && s.column_rows() < 32)) return IgemmChoice::None;
  const auto padded = [kg](int64_t rows) { return (kg + rows - 1) / rows * rows; };
  return padded(IgemmLarge<0>::BM) <= padded(IgemmMedium<0>::BM) ? IgemmChoice::Large : IgemmChoice::Medium;
}

// The registers per thread scripts/check_cuda_kernels.py allows (the same numbers there): two
// 256-thread blocks or three 128-thread blocks in an SM's 64K registers. Blocks of Cfg one SM
// holds at that ceiling: the CUDA host code asks the runtime instead, the emulator uses this.
template <typename Cfg>
constexpr int32_t igemm_register_ceiling() { return Cfg::kThreads >= 256 ? 128 : 168; }
template <typename Cfg>
constexpr int32_t igemm_blocks_per_sm_at_ceiling() { return 65536 / (igemm_register_ceiling<Cfg>() * Cfg::kThreads); }

// splits = 0: the wave model's choice for `sms` multiprocessors holding `blocks_per_sm` blocks
// each; otherwise forced (the emulator).
template <typename Problem>
IgemmParams make_igemm_params(const ConvShape& s, int32_t sms, int32_t blocks_per_sm, int32_t splits) {
  using Cfg = typename Problem::Cfg;
  constexpr bool forward = std::is_same_v<Problem, ForwardProblem<Cfg>>;
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
  p.pixels = int32_t(s.batch * s.out_h * s.out_w);
  p.gemm_k = int32_t(s.column_rows());
  p.cols = forward ? p.pixels : p.gemm_k;
  p.c_blocks = (p.Cg + Cfg::BK - 1) / Cfg::BK;
  p.k_tiles = forward ? p.R * p.S * p.c_blocks : (p.pixels + Cfg::BK - 1) / Cfg::BK;
  p.splits = splits > 0 ? splits : choose_splits(igemm_tiles<Cfg>(p), p.k_tiles, sms, blocks_per_sm);
  p.k_tiles_per_split = (p.k_tiles + p.splits - 1) / p.splits;
  // The wave model's splits never leave one empty (a forced count may, and must still be right).
  if (splits <= 0) p.splits = (p.k_tiles + p.k_tiles_per_split - 1) / p.k_tiles_per_split;
  p.div_pq = FastDivmod(uint32_t(p.P * p.Q));
  p.div_q = FastDivmod(uint32_t(p.Q));
  p.div_cblocks = FastDivmod(uint32_t(p.c_blocks));
  p.div_s = FastDivmod(uint32_t(p.S));
  p.div_rs = FastDivmod(uint32_t(p.R * p.S));
  return p;
}

}  // namespace gpu
}  // namespace channelconv
