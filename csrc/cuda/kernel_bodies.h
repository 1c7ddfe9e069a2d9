// What one CUDA thread (or one block stage) of each channelconv kernel does, written as
// HOST_DEVICE functions. The __global__ kernels in direct.cu / im2col.cu are thin loops around
// these; csrc/testing/emulate_kernels.cpp runs the very same functions on the CPU, thread by
// thread and stage by stage, so the kernels' index math is tested on machines without a GPU.
//
// Nothing here may use CUDA-only constructs (__shared__, threadIdx, __syncthreads): shared
// tiles arrive as pointers, thread ids as arguments, and the caller owns the barriers.
//
// All tensors are contiguous NCHW (weights K x C/G x k_h x k_w). index_t is int32_t only when
// the host has checked that every index below fits (indices_fit_int32 at the end of this file).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>

#include "../conv_index.h"
#include "../conv_params.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CC_UNROLL _Pragma("unroll")
#else
#define CC_UNROLL
#endif

namespace channelconv {
namespace gpu {

// Sizes the direct kernels need besides the spatial geometry.
template <typename index_t>
struct ConvDims {
  Geometry<index_t> g;
  index_t batch, groups;
  index_t in_channels, out_channels;    // C, K
  index_t in_per_group, out_per_group;  // C/G, K/G

  // Length of one output channel's reduction: (c, r, s) over its group's input channels.
  CC_HOST_DEVICE index_t reduction() const { return in_per_group * g.kernel_area(); }
};

// ---------------------------------------------------------------------------------------------
// im2col / col2im for one band of output rows [row0, row0 + rows) of a run of images (BandKernels):
// one launch for all the band's images. Image i's input is `image_numel` elements after image
// i-1's; its columns, (C*k_h*k_w, rows*W_o) row-major, follow image i-1's.
// ---------------------------------------------------------------------------------------------

// Column element e of the band: the input element that column row (c, r, s) of image e / (the
// columns of one image) reads at output pixel row0*W_o + col, or 0.
template <typename scalar_t, typename index_t>
CC_HOST_DEVICE void im2col_element(const scalar_t* images, scalar_t* columns, const Geometry<index_t>& g,
                                   index_t row0, index_t band_pixels, index_t image_numel, index_t e) {
  const index_t column_numel = (image_numel / g.in_area()) * g.kernel_area() * band_pixels;
  const index_t image = e / column_numel, in_image = e % column_numel;
  const index_t row = in_image / band_pixels;
  const index_t col = in_image % band_pixels;
  const index_t src = g.im2col_source(row, row0 * g.w.out + col);
  columns[e] = src < 0 ? scalar_t(0) : images[image * image_numel + src];
}

// Input element e = (image, c, hi, wi): grad_images[e] = (grad_images[e] if `accumulate`, else 0)
// + every band column entry of its image that read it, i.e. for each tap (r, s) whose output
// pixel (ho, wo) lies in the band, columns[(c, r, s), (ho - row0) * W_o + wo]. A gather: each
// thread writes only its own element, and writes it whether or not a tap reads it, so a band that
// does not accumulate leaves nothing unwritten (no zero fill first). The sum runs in acc_t (the
// op-math type), in tap order (r, then s), as the CPU kernel does; grad_images holds out_t (the
// columns' type, or acc_t when bands must be summed).
template <typename scalar_t, typename out_t, typename index_t>
CC_HOST_DEVICE void col2im_element(const scalar_t* columns, out_t* grad_images, const Geometry<index_t>& g,
                                   index_t row0, index_t rows, index_t image_numel, bool accumulate, index_t e) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t band_pixels = rows * g.w.out;
  const index_t image = e / image_numel, in_image = e % image_numel;
  const index_t wi = in_image % g.w.in;
  const index_t hi = (in_image / g.w.in) % g.h.in;
  const index_t c = in_image / g.in_area();
  const scalar_t* image_columns = columns + image * (image_numel / g.in_area()) * g.kernel_area() * band_pixels;
  acc_t acc = accumulate ? static_cast<acc_t>(grad_images[e]) : acc_t(0);
  for (index_t r = 0; r < g.h.taps; ++r) {
    const index_t ho = g.h.output_reading(hi, r);
    if (ho < row0 || ho >= row0 + rows) continue;  // also rejects -1 (no output reads hi via r)
    // Column row (c, r, 0) of the band, at output row ho.
    const index_t base = (c * g.h.taps + r) * g.w.taps * band_pixels + (ho - row0) * g.w.out;
    for (index_t s = 0; s < g.w.taps; ++s) {
      const index_t wo = g.w.output_reading(wi, s);
      if (wo >= 0) acc += static_cast<acc_t>(image_columns[base + s * band_pixels + wo]);
    }
  }
  grad_images[e] = static_cast<out_t>(acc);
}

// ---------------------------------------------------------------------------------------------
// Direct forward: a tiled kernel. Per (image, group) the output is a GEMM
//   y[k, p] = bias[k] + sum_q w[k, q] * cols[q, p],   q = (c, r, s) in [0, R), p = output pixel,
// where cols is the group's (never materialised) im2col matrix. A block owns a tile of BK output
// channels x BP output pixels; it walks q in stages of BR, staging a BR x BK weight tile and a
// BR x BP column tile in shared memory; each thread accumulates TM x TN outputs in registers.
// ---------------------------------------------------------------------------------------------

template <int BK_, int BP_, int BR_, int TM_, int TN_>
struct TileConfig {
  static constexpr int BK = BK_;  // output channels per tile
  static constexpr int BP = BP_;  // output pixels per tile
  static constexpr int BR = BR_;  // reduction steps (c, r, s) per shared-memory stage
  static constexpr int TM = TM_;  // output channels per thread
  static constexpr int TN = TN_;  // output pixels per thread
  static constexpr int kThreadsK = BK / TM;
  static constexpr int kThreadsP = BP / TN;
  static constexpr int kThreads = kThreadsK * kThreadsP;
  // Weight tile stored transposed, ws[i][kk] at i * kWeightStride + kk; the +1 staggers the
  // stage's writes (kk fixed, i consecutive) across shared-memory banks.
  static constexpr int kWeightStride = BK + 1;
  static constexpr int kWeightTile = BR * kWeightStride;
  static constexpr int kInputTile = BR * BP;  // xs[i][j] at i * BP + j
  static_assert(BK % TM == 0 && BP % TN == 0, "a tile splits evenly into per-thread tiles");
};

// Many output channels per group: a square-ish 64 x 64 tile, 16 outputs per thread.
using WideTile = TileConfig<64, 64, 16, 4, 4>;
// Few output channels per group (depthwise, small groups): 4 channels x 256 pixels, so that
// threads are not spent on channels that do not exist.
using NarrowTile = TileConfig<4, 256, 16, 1, 4>;

// Where tile `tile` lies. Tiles are ordered (image, group, channel tile, pixel tile), pixel tile
// fastest, so neighbouring blocks share their weight tile.
template <typename index_t>
struct TilePos {
  index_t n, group;
  index_t k0;       // first output channel of the tile, within its group
  index_t k_count;  // channels of the tile that exist: min(BK, K/G - k0)
  index_t p0;       // first output pixel of the tile
};

template <typename Cfg, typename index_t>
CC_HOST_DEVICE index_t forward_pixel_tiles(const ConvDims<index_t>& d) {
  return (d.g.out_area() + Cfg::BP - 1) / Cfg::BP;
}
template <typename Cfg, typename index_t>
CC_HOST_DEVICE index_t forward_channel_tiles(const ConvDims<index_t>& d) {
  return (d.out_per_group + Cfg::BK - 1) / Cfg::BK;
}

template <typename Cfg, typename index_t>
CC_HOST_DEVICE TilePos<index_t> forward_tile_pos(const ConvDims<index_t>& d, index_t tile) {
  const index_t p_tiles = forward_pixel_tiles<Cfg>(d), k_tiles = forward_channel_tiles<Cfg>(d);
  TilePos<index_t> t;
  t.p0 = (tile % p_tiles) * Cfg::BP;
  index_t rest = tile / p_tiles;
  t.k0 = (rest % k_tiles) * Cfg::BK;
  rest /= k_tiles;
  t.group = rest % d.groups;
  t.n = rest / d.groups;
  const index_t left = d.out_per_group - t.k0;
  t.k_count = left < index_t(Cfg::BK) ? left : index_t(Cfg::BK);
  return t;
}

// Thread `tid`'s register tile before the reduction: the bias of its channels, or 0.
template <typename Cfg, typename scalar_t, typename acc_t, typename index_t>
CC_HOST_DEVICE void forward_init(int tid, const scalar_t* bias, const ConvDims<index_t>& d, const TilePos<index_t>& t,
                                 acc_t (&acc)[Cfg::TM][Cfg::TN]) {
  const int tk = tid / Cfg::kThreadsP;
  CC_UNROLL
  for (int m = 0; m < Cfg::TM; ++m) {
    const int kk = tk + m * Cfg::kThreadsK;
    const acc_t b = (bias != nullptr && kk < t.k_count)
                        ? static_cast<acc_t>(bias[t.group * d.out_per_group + t.k0 + kk])
                        : acc_t(0);
    CC_UNROLL
    for (int n = 0; n < Cfg::TN; ++n) acc[m][n] = b;
  }
}

// Stage [q0, q0 + BR) of the reduction into shared memory, thread `tid` of Cfg::kThreads doing
// every kThreads-th element. Entries past the tile's channels / pixels or past R are 0, so the
// multiply below needs no bounds tests.
//   ws[i][kk] = w[group*K/G + k0 + kk][q0 + i]
//   xs[i][j]  = cols[q0 + i][p0 + j] = x[n, group's channel c, hi, wi] or 0 in the padding
template <typename Cfg, typename scalar_t, typename acc_t, typename index_t>
CC_HOST_DEVICE void forward_load_stage(int tid, const scalar_t* x, const scalar_t* w, const ConvDims<index_t>& d,
                                       const TilePos<index_t>& t, index_t q0, acc_t* ws, acc_t* xs) {
  const index_t R = d.reduction();
  // Weight: consecutive threads read consecutive q of one channel (coalesced runs of BR).
  const index_t w_tile = (t.group * d.out_per_group + t.k0) * R;  // offset of w[k0][0], k0 < K/G
  for (int e = tid; e < Cfg::BR * Cfg::BK; e += Cfg::kThreads) {
    const int kk = e / Cfg::BR, i = e % Cfg::BR;
    const index_t q = q0 + i;
    ws[i * Cfg::kWeightStride + kk] =
        (kk < t.k_count && q < R) ? static_cast<acc_t>(w[w_tile + kk * R + q]) : acc_t(0);
  }
  // Input: consecutive threads read consecutive output pixels (consecutive wi when stride is 1).
  const index_t out_area = d.g.out_area();
  const index_t x_group = (t.n * d.in_channels + t.group * d.in_per_group) * d.g.in_area();
  for (int e = tid; e < Cfg::BR * Cfg::BP; e += Cfg::kThreads) {
    const int i = e / Cfg::BP, j = e % Cfg::BP;
    const index_t q = q0 + i, p = t.p0 + j;
    acc_t v = acc_t(0);
    if (q < R && p < out_area) {
      const index_t src = d.g.im2col_source(q, p);  // relative to the group's channel 0
      if (src >= 0) v = static_cast<acc_t>(x[x_group + src]);
    }
    xs[i * Cfg::BP + j] = v;
  }
}

// acc[m][n] += sum_i ws[i][tk + m*kThreadsK] * xs[i][tp + n*kThreadsP] over the staged BR steps.
// A thread's channels and pixels are strided by the thread counts, so a warp reads consecutive
// shared-memory words (pixels) or a broadcast (channels).
template <typename Cfg, typename acc_t>
CC_HOST_DEVICE void forward_multiply_stage(int tid, const acc_t* ws, const acc_t* xs, acc_t (&acc)[Cfg::TM][Cfg::TN]) {
  const int tk = tid / Cfg::kThreadsP, tp = tid % Cfg::kThreadsP;
  CC_UNROLL
  for (int i = 0; i < Cfg::BR; ++i) {
    acc_t a[Cfg::TM], b[Cfg::TN];
    CC_UNROLL
    for (int m = 0; m < Cfg::TM; ++m) a[m] = ws[i * Cfg::kWeightStride + tk + m * Cfg::kThreadsK];
    CC_UNROLL
    for (int n = 0; n < Cfg::TN; ++n) b[n] = xs[i * Cfg::BP + tp + n * Cfg::kThreadsP];
    CC_UNROLL
    for (int m = 0; m < Cfg::TM; ++m) {
      CC_UNROLL
      for (int n = 0; n < Cfg::TN; ++n) acc[m][n] += a[m] * b[n];
    }
  }
}

// Thread `tid` writes its outputs that exist: y[n, group*K/G + k0 + kk, p].
template <typename Cfg, typename scalar_t, typename acc_t, typename index_t>
CC_HOST_DEVICE void forward_store(int tid, scalar_t* y, const ConvDims<index_t>& d, const TilePos<index_t>& t,
                                  const acc_t (&acc)[Cfg::TM][Cfg::TN]) {
  const int tk = tid / Cfg::kThreadsP, tp = tid % Cfg::kThreadsP;
  const index_t out_area = d.g.out_area();
  const index_t y_tile = (t.n * d.out_channels + t.group * d.out_per_group + t.k0) * out_area;
  CC_UNROLL
  for (int m = 0; m < Cfg::TM; ++m) {
    const int kk = tk + m * Cfg::kThreadsK;
    if (kk >= t.k_count) continue;
    CC_UNROLL
    for (int n = 0; n < Cfg::TN; ++n) {
      const index_t p = t.p0 + tp + n * Cfg::kThreadsP;
      if (p < out_area) y[y_tile + kk * out_area + p] = static_cast<scalar_t>(acc[m][n]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Direct backward, input gradient: a gather. Thread-element e = (n, c, hi, wi) of dx sums
//   w[k, c', r, s] * dy[n, k, ho, wo]  over taps (r, s) with ho = output_reading(hi, r) and
//   wo = output_reading(wi, s) both valid, and over the K/G output channels k of c's group.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename index_t>
CC_HOST_DEVICE void direct_backward_input_element(const scalar_t* dy, const scalar_t* w, scalar_t* dx,
                                                  const ConvDims<index_t>& d, index_t e) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry<index_t>& g = d.g;
  const index_t wi = e % g.w.in;
  index_t rest = e / g.w.in;
  const index_t hi = rest % g.h.in;
  rest /= g.h.in;
  const index_t c = rest % d.in_channels;
  const index_t n = rest / d.in_channels;
  const index_t group = c / d.in_per_group, c_in_group = c % d.in_per_group;
  const index_t out_area = g.out_area(), kernel_area = g.kernel_area();
  const index_t k_begin = group * d.out_per_group;
  const index_t dy_base = (n * d.out_channels + k_begin) * out_area;        // dy[n, k_begin, 0, 0]
  const index_t w_base = (k_begin * d.in_per_group + c_in_group) * kernel_area;  // w[k_begin, c', 0, 0]
  const index_t w_k_stride = d.in_per_group * kernel_area;                 // next output channel
  acc_t acc = acc_t(0);
  for (index_t r = 0; r < g.h.taps; ++r) {
    const index_t ho = g.h.output_reading(hi, r);
    if (ho < 0) continue;
    for (index_t s = 0; s < g.w.taps; ++s) {
      const index_t wo = g.w.output_reading(wi, s);
      if (wo < 0) continue;
      const index_t dy_at = dy_base + ho * g.w.out + wo;
      const index_t w_at = w_base + r * g.w.taps + s;
      for (index_t k = 0; k < d.out_per_group; ++k) {
        acc += static_cast<acc_t>(w[w_at + k * w_k_stride]) * static_cast<acc_t>(dy[dy_at + k * out_area]);
      }
    }
  }
  dx[e] = static_cast<scalar_t>(acc);
}

// ---------------------------------------------------------------------------------------------
// Direct backward, weight gradient: a block per weight element e = (k, c', r, s) reduces
//   dy[n, k, ho, wo] * x[n, c, hi(ho, r), wi(wo, s)]   over n and the output pixels whose tap
// (r, s) reads real input ([first_valid, last_valid) on each axis; no bounds test inside).
// This returns lane `lane`'s partial sum over every lanes-th term; the block adds the partials
// in a fixed tree, so the result does not depend on scheduling (no atomics).
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename index_t>
CC_HOST_DEVICE at::opmath_type<scalar_t> direct_backward_weight_partial(const scalar_t* dy, const scalar_t* x,
                                                                        const ConvDims<index_t>& d, index_t e,
                                                                        index_t lane, index_t lanes) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry<index_t>& g = d.g;
  const index_t s = e % g.w.taps;
  const index_t r = (e / g.w.taps) % g.h.taps;
  const index_t c_in_group = (e / g.kernel_area()) % d.in_per_group;
  const index_t k = e / (g.kernel_area() * d.in_per_group);
  const index_t c = (k / d.out_per_group) * d.in_per_group + c_in_group;
  const index_t ho_begin = g.h.first_valid(r), wo_begin = g.w.first_valid(s);
  const index_t valid_h = g.h.last_valid(r) - ho_begin, valid_w = g.w.last_valid(s) - wo_begin;
  const index_t count = d.batch * valid_h * valid_w;  // 0 when either axis has no valid position
  acc_t acc = acc_t(0);
  for (index_t j = lane; j < count; j += lanes) {
    const index_t wo = wo_begin + j % valid_w;
    const index_t rest = j / valid_w;
    const index_t ho = ho_begin + rest % valid_h;
    const index_t n = rest / valid_h;
    const index_t dy_at = ((n * d.out_channels + k) * g.h.out + ho) * g.w.out + wo;
    const index_t x_at = ((n * d.in_channels + c) * g.h.in + g.h.input_at(ho, r)) * g.w.in + g.w.input_at(wo, s);
    acc += static_cast<acc_t>(dy[dy_at]) * static_cast<acc_t>(x[x_at]);
  }
  return acc;
}

// ---------------------------------------------------------------------------------------------
// Host side: launch shapes and the choice of index type.
// ---------------------------------------------------------------------------------------------

constexpr int kThreads = 256;  // threads per block of every kernel (the tile configs match it)
static_assert(WideTile::kThreads == kThreads && NarrowTile::kThreads == kThreads, "one block size");

// Grid-stride loops cover any amount of work with a capped grid: 8192 blocks of 256 threads is
// several waves on any current GPU (an H100 holds 132 x 2048 threads at once).
constexpr int64_t kMaxBlocks = 8192;

inline unsigned int grid_size(int64_t work_items, int64_t items_per_block = kThreads) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks, kMaxBlocks)));
}

// Kernels form indices up to a tensor's element count, plus a little: a tile's or a grid-stride
// loop's step past its end (at most kMaxBlocks * kThreads), and the axis intermediates below.
constexpr int64_t kIndexHeadroom = kMaxBlocks * kThreads;

// Whether int32 indexing is safe for this convolution and these tensors' element counts:
// every tensor offset, the products n*C and n*K, and every Axis intermediate
// (o*stride - pad + t*dilation and its inverse lie within [-(dilation*(k-1)), in + 2*pad + stride]).
// CHANNELCONV_FORCE_INT64_INDEX=1 in the environment makes it answer false, so tests and the
// sanitizer runs (scripts/sanitize_kernels.py) reach the 64-bit kernels with small tensors.
inline bool indices_fit_int32(const ConvShape& s, std::initializer_list<int64_t> numels) {
  const char* force64 = std::getenv("CHANNELCONV_FORCE_INT64_INDEX");
  if (force64 != nullptr && force64[0] == '1') return false;
  auto fits = [](int64_t v) { return v >= 0 && fits_in_int32(v + kIndexHeadroom); };
  for (int64_t n : numels) {
    if (!fits(n)) return false;
  }
  const int64_t axes[2][6] = {{s.in_h, s.out_h, s.kernel_h, s.stride[0], s.padding[0], s.dilation[0]},
                              {s.in_w, s.out_w, s.kernel_w, s.stride[1], s.padding[1], s.dilation[1]}};
  for (const auto& a : axes) {
    for (int64_t v : a) {
      if (!fits(v)) return false;
    }
  }
  if (!fits(s.batch) || !fits(s.in_channels) || !fits(s.out_channels)) return false;
  // Every factor below fits in 31 bits, so no product or sum here overflows int64.
  if (!fits(s.batch * s.in_channels) || !fits(s.batch * s.out_channels)) return false;
  if (!fits(s.in_h * s.in_w) || !fits(s.out_h * s.out_w)) return false;  // plane offsets, even in a band
  if (!fits(s.kernel_h * s.kernel_w) || !fits(s.kernel_h * s.kernel_w * s.in_per_group())) return false;
  for (const auto& a : axes) {
    const int64_t in = a[0], kernel = a[2], stride = a[3], pad = a[4], dilation = a[5];
    if (!fits(in + 2 * pad + stride + dilation * (kernel - 1))) return false;
  }
  return true;
}

template <typename index_t>
ConvDims<index_t> make_dims(const ConvShape& s) {
  ConvDims<index_t> d;
  d.g = s.geometry<index_t>();
  d.batch = index_t(s.batch);
  d.groups = index_t(s.groups);
  d.in_channels = index_t(s.in_channels);
  d.out_channels = index_t(s.out_channels);
  d.in_per_group = index_t(s.in_per_group());
  d.out_per_group = index_t(s.out_per_group());
  return d;
}

// The direct forward's tile shape: wide when a group has enough output channels to fill it.
inline bool use_wide_tile(const ConvShape& s) { return s.out_per_group() >= WideTile::BK / 2; }

}  // namespace gpu
}  // namespace channelconv
