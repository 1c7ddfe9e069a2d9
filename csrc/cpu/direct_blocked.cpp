// Register-blocked float32 direct correlation (see direct_blocked.h).
//
// The tile: 32 output channels (two AVX-512 registers) x up to 14 consecutive output pixels
// (of one row, or running on into the next), 28 accumulators held in registers. Each step loads
// two weight vectors and, per pixel, broadcasts one input value into two FMAs: 16 loads feed 28 FMAs, so the loop is bound by the
// FMA ports rather than by loads (PERFORMANCE.md, "a register tile of outputs"). Vectorising over
// output channels, not width, makes stride and width-7 layers cost nothing extra.
//
// Per task (image, group, a few output rows), the input rows the tiles read are first copied into
// zero-padded strips, so the inner loop needs no bounds tests and padding costs nothing.
// The code is compiled for AVX-512 through a target attribute and used only when the CPU has it
// (blocked_kernel_available); no -march flag is involved.
#include "direct_blocked.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

namespace channelconv {

#if defined(__x86_64__) && defined(__GNUC__)

namespace {

constexpr int kMaxPixels = 14;
// Input strips one task holds: about half of this machine's 2 MiB per-core L2.
constexpr int64_t kStripBytes = int64_t(1) << 20;
typedef float v16 __attribute__((vector_size(64), aligned(4)));  // unaligned loads allowed

struct Tile {
  const float* rows;      // the task's strips: [output row j][c][r][width]
  const int64_t* pixels;  // where each of the tile's pixels reads tap (c, r, s) = (0, 0, 0) in `rows`
  int64_t strip_width;
  int64_t r_begin, r_end;  // kernel rows that read inside the plane for some pixel of the tile
  int64_t taps_h, taps_w, in_per_group;
  int64_t dil_w;
  const float* weights;  // [c][r][s][32] of this channel block
  const float* init;     // 32 initial values
  float* acc;            // [pixels][32] result
};

template <int P>
__attribute__((target("avx512f,fma"))) void tile_kernel(const Tile& t) {
  v16 acc0[P], acc1[P];
  int64_t at[P];  // held in registers: the tile's pixels may lie on different output rows
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) at[p] = t.pixels[p];
  const v16 init0 = *reinterpret_cast<const v16*>(t.init);
  const v16 init1 = *reinterpret_cast<const v16*>(t.init + 16);
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    acc0[p] = init0;
    acc1[p] = init1;
  }
  for (int64_t c = 0; c < t.in_per_group; ++c) {
    for (int64_t r = t.r_begin; r < t.r_end; ++r) {
      const float* row = t.rows + (c * t.taps_h + r) * t.strip_width;
      const float* w = t.weights + (c * t.taps_h + r) * t.taps_w * kBlockedChannels;
      for (int64_t s = 0; s < t.taps_w; ++s, w += kBlockedChannels) {
        const v16 w0 = *reinterpret_cast<const v16*>(w);
        const v16 w1 = *reinterpret_cast<const v16*>(w + 16);
        const float* x = row + s * t.dil_w;
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          const float xv = x[at[p]];
          acc0[p] += w0 * xv;
          acc1[p] += w1 * xv;
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    *reinterpret_cast<v16*>(t.acc + p * kBlockedChannels) = acc0[p];
    *reinterpret_cast<v16*>(t.acc + p * kBlockedChannels + 16) = acc1[p];
  }
}

using TileFn = void (*)(const Tile&);

template <int... P>
constexpr std::array<TileFn, sizeof...(P)> make_tile_table(std::integer_sequence<int, P...>) {
  return {&tile_kernel<P + 1>...};
}
// tile_table[P - 1] handles P pixels.
constexpr auto tile_table = make_tile_table(std::make_integer_sequence<int, kMaxPixels>{});

}  // namespace

bool blocked_kernel_available() {
  // CHANNELCONV_DISABLE_AVX512=1 forces the portable loops (what a CPU without AVX-512 runs);
  // the tests use it to cover that path on this machine.
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") &&
                                std::getenv("CHANNELCONV_DISABLE_AVX512") == nullptr;
  return available;
}

void blocked_correlation(const BlockedProblem& p, const float* in, const float* packed, const float* init, float* out) {
  const int64_t blocks = (p.out_per_group + kBlockedChannels - 1) / kBlockedChannels;
  const int64_t strip_width = (p.out_w - 1) * p.stride_w + (p.taps_w - 1) * p.dil_w + 1;
  const int64_t in_area = p.in_h * p.in_w, out_area = p.plane_h() * p.plane_w();
  const int64_t weights_per_block = p.in_per_group * p.taps_h * p.taps_w * kBlockedChannels;

  // Initial values per (group, padded channel): the bias, zero past the group's channels.
  std::vector<float> init_padded(p.groups * blocks * kBlockedChannels, 0.0f);
  if (init != nullptr) {
    for (int64_t g = 0; g < p.groups; ++g)
      std::copy(init + g * p.out_per_group, init + (g + 1) * p.out_per_group,
                init_padded.begin() + g * blocks * kBlockedChannels);
  }

  // A task covers several output rows of one (image, group) and runs every channel block over all
  // of them, so a block's packed weights are read from memory once per task instead of once per
  // row: on small maps with many channels (512 -> 512 at 7x7: 9.4 MB of weights, 0.2 MB of input
  // per image) the weights dominate the traffic. Rows per task: as many as keep their strips
  // within kStripBytes (cache-resident), but at least four tasks per thread, so that whole tasks
  // share out evenly (a batch-1 layer in three tasks would leave one of two threads idle a third
  // of the time).
  const int64_t strip_floats = p.in_per_group * p.taps_h * strip_width;
  const int64_t threads = at::get_num_threads();
  const int64_t rows_by_cache = std::max<int64_t>(1, kStripBytes / (strip_floats * int64_t(sizeof(float))));
  const int64_t min_tasks = 4 * threads;
  const int64_t rows_by_threads = std::max<int64_t>(1, (p.batch * p.groups * p.out_h + min_tasks - 1) / min_tasks);
  const int64_t task_rows = std::min({p.out_h, rows_by_cache, rows_by_threads});
  const int64_t chunks = (p.out_h + task_rows - 1) / task_rows;

  // Strip columns [x_begin, x_end) hold input columns; the rest is padding.
  const int64_t x_begin = std::max<int64_t>(0, -p.offset_w);
  const int64_t x_end = std::min(strip_width, p.in_w - p.offset_w);

  at::parallel_for(0, p.batch * p.groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> strips(task_rows * strip_floats);
    std::vector<int64_t> r_begin(task_rows), r_end(task_rows);
    std::vector<float> tile_acc(kMaxPixels * kBlockedChannels);
    std::vector<int64_t> pixel_at(kMaxPixels), out_at(kMaxPixels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % chunks, g = (task / chunks) % p.groups, n = task / (chunks * p.groups);
      const int64_t oh0 = chunk * task_rows, rows = std::min(task_rows, p.out_h - oh0);
      const float* in_group = in + (n * p.groups + g) * p.in_per_group * in_area;
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t oh = oh0 + j;
        // Kernel rows r whose input row ih = oh*stride + r*dil + offset lies in [0, in_h).
        r_begin[j] = p.taps_h;
        r_end[j] = 0;
        for (int64_t r = 0; r < p.taps_h; ++r) {
          const int64_t ih = oh * p.stride_h + r * p.dil_h + p.offset_h;
          if (ih >= 0 && ih < p.in_h) {
            r_begin[j] = std::min(r_begin[j], r);
            r_end[j] = r + 1;
          }
        }
        // Row j's zero-padded strip: strip[c][r][x] = in[ih(r), offset_w + x] (0 outside the plane).
        // Kernel rows outside the plane read zeros: a tile spanning two output rows runs the
        // kernel rows either of them needs.
        for (int64_t c = 0; c < p.in_per_group; ++c) {
          for (int64_t r = 0; r < p.taps_h; ++r) {
            float* dst = strips.data() + j * strip_floats + (c * p.taps_h + r) * strip_width;
            std::fill(dst, dst + strip_width, 0.0f);
            if (r < r_begin[j] || r >= r_end[j] || x_end <= x_begin) continue;
            const int64_t src = c * in_area + (oh * p.stride_h + r * p.dil_h + p.offset_h) * p.in_w + p.offset_w;
            std::memcpy(dst + x_begin, in_group + src + x_begin, (x_end - x_begin) * sizeof(float));
          }
        }
      }
      // Tiles of up to kMaxPixels consecutive pixels of the task's rows, row after row: a 7-wide
      // map still fills a whole tile (two rows), so each weight load feeds the full 28 FMAs.
      const int64_t task_pixels = rows * p.out_w;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t channels = std::min(kBlockedChannels, p.out_per_group - b * kBlockedChannels);
        float* out_block = out + ((n * p.groups + g) * p.out_per_group + b * kBlockedChannels) * out_area;
        for (int64_t q = 0; q < task_pixels; q += kMaxPixels) {
          const int64_t pixels = std::min<int64_t>(kMaxPixels, task_pixels - q);
          const int64_t j_first = q / p.out_w, j_last = (q + pixels - 1) / p.out_w;
          Tile t{strips.data(), pixel_at.data(), strip_width, p.taps_h, 0, p.taps_h, p.taps_w, p.in_per_group, p.dil_w,
                 packed + (g * blocks + b) * weights_per_block,
                 init_padded.data() + (g * blocks + b) * kBlockedChannels, tile_acc.data()};
          for (int64_t j = j_first; j <= j_last; ++j) {
            t.r_begin = std::min(t.r_begin, r_begin[j]);
            t.r_end = std::max(t.r_end, r_end[j]);
          }
          for (int64_t i = 0; i < pixels; ++i) {
            const int64_t j = (q + i) / p.out_w, ow = (q + i) % p.out_w;
            pixel_at[i] = j * strip_floats + ow * p.stride_w;
            out_at[i] = (p.out_origin_h + (oh0 + j) * p.out_step_h) * p.plane_w() + p.out_origin_w + ow * p.out_step_w;
          }
          tile_table[pixels - 1](t);
          // Transpose the tile [pixel][32] into the NCHW output of this block's channels.
          for (int64_t k = 0; k < channels; ++k) {
            float* out_channel = out_block + k * out_area;
            for (int64_t i = 0; i < pixels; ++i) out_channel[out_at[i]] = tile_acc[i * kBlockedChannels + k];
          }
        }
      }
    }
  });
}

namespace {

// Weight-gradient tile: for one (group, 32-channel block, input channel c, kernel row r), the
// k_w taps x 32 channels of dW, accumulated over every image and output pixel. Per output pixel
// it loads two dy vectors (the block's 32 channels, from a transposed copy) and broadcasts one
// input value per tap: k_w x 2 FMAs. U independent partial sums over interleaved pixels keep
// enough FMAs in flight when k_w is small (FMA latency 4, two ports: 8 chains needed).
template <int S>
struct GradTaps {
  static constexpr int U = S >= 4 ? 1 : (S == 1 ? 4 : 2);
};

struct GradTile {
  const float* dy_t;      // [n][oh][ow][32] of this channel block
  const float* x_plane;   // x[0, c] (image stride: x_image_stride)
  int64_t x_image_stride, batch, in_h, in_w, out_h, out_w;
  int64_t row_offset;     // ih = oh*stride_h + row_offset (r*dil_h - pad_h)
  int64_t stride_h, stride_w, dil_w, pad_w;
  float* strip;           // scratch: one zero-padded input row, strip_width floats
  int64_t strip_width;
  float* dw;              // out: [s][32]
};

template <int S>
__attribute__((target("avx512f,fma"))) void grad_tile_kernel(const GradTile& t) {
  constexpr int U = GradTaps<S>::U;
  v16 acc0[U][S], acc1[U][S];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) acc0[u][s] = acc1[u][s] = v16{};
  const int64_t j_begin = std::min(t.strip_width, t.pad_w);
  const int64_t j_end = std::min(t.strip_width, t.in_w + t.pad_w);
  for (int64_t n = 0; n < t.batch; ++n) {
    for (int64_t oh = 0; oh < t.out_h; ++oh) {
      const int64_t ih = oh * t.stride_h + t.row_offset;
      if (ih < 0 || ih >= t.in_h) continue;
      // strip[j] = x[n, c, ih, j - pad_w], zero outside the plane.
      const float* src = t.x_plane + n * t.x_image_stride + ih * t.in_w;
      std::fill(t.strip, t.strip + j_begin, 0.0f);
      std::memcpy(t.strip + j_begin, src + (j_begin - t.pad_w), (j_end - j_begin) * sizeof(float));
      std::fill(t.strip + j_end, t.strip + t.strip_width, 0.0f);
      const float* dy_row = t.dy_t + (n * t.out_h + oh) * t.out_w * kBlockedChannels;
      int64_t ow = 0;
      for (; ow + U <= t.out_w; ow += U) {
#pragma GCC unroll 16
        for (int u = 0; u < U; ++u) {
          const v16 d0 = *reinterpret_cast<const v16*>(dy_row + (ow + u) * kBlockedChannels);
          const v16 d1 = *reinterpret_cast<const v16*>(dy_row + (ow + u) * kBlockedChannels + 16);
          const float* x = t.strip + (ow + u) * t.stride_w;
#pragma GCC unroll 16
          for (int s = 0; s < S; ++s) {
            acc0[u][s] += d0 * x[s * t.dil_w];
            acc1[u][s] += d1 * x[s * t.dil_w];
          }
        }
      }
      for (; ow < t.out_w; ++ow) {
        const v16 d0 = *reinterpret_cast<const v16*>(dy_row + ow * kBlockedChannels);
        const v16 d1 = *reinterpret_cast<const v16*>(dy_row + ow * kBlockedChannels + 16);
        const float* x = t.strip + ow * t.stride_w;
#pragma GCC unroll 16
        for (int s = 0; s < S; ++s) {
          acc0[0][s] += d0 * x[s * t.dil_w];
          acc1[0][s] += d1 * x[s * t.dil_w];
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s) {
    v16 sum0 = acc0[0][s], sum1 = acc1[0][s];
#pragma GCC unroll 16
    for (int u = 1; u < U; ++u) {
      sum0 += acc0[u][s];
      sum1 += acc1[u][s];
    }
    *reinterpret_cast<v16*>(t.dw + s * kBlockedChannels) = sum0;
    *reinterpret_cast<v16*>(t.dw + s * kBlockedChannels + 16) = sum1;
  }
}

constexpr int kMaxGradTaps = 7;
using GradTileFn = void (*)(const GradTile&);
template <int... S>
constexpr std::array<GradTileFn, sizeof...(S)> make_grad_table(std::integer_sequence<int, S...>) {
  return {&grad_tile_kernel<S + 1>...};
}
constexpr auto grad_table = make_grad_table(std::make_integer_sequence<int, kMaxGradTaps>{});

}  // namespace

bool blocked_weight_grad_applies(const BlockedProblem& p) {
  return p.taps_w <= kMaxGradTaps && p.out_per_group >= kBlockedChannels / 2;
}

void blocked_weight_grad(const BlockedProblem& p, const float* dy, const float* x, float* dw) {
  const int64_t blocks = (p.out_per_group + kBlockedChannels - 1) / kBlockedChannels;
  const int64_t out_area = p.out_h * p.out_w, in_area = p.in_h * p.in_w;
  const int64_t out_channels = p.groups * p.out_per_group, in_channels = p.groups * p.in_per_group;
  const int64_t block_numel = p.batch * out_area * kBlockedChannels;
  // dy transposed once into [group][block][n][oh][ow][32] (zero past the group's channels), so
  // the tile reads 32 channels of one pixel as two vectors.
  std::vector<float> dy_t(p.groups * blocks * block_numel);
  at::parallel_for(0, p.groups * blocks * p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gbn = begin; gbn < end; ++gbn) {
      const int64_t n = gbn % p.batch, gb = gbn / p.batch, g = gb / blocks, b = gb % blocks;
      float* dst = dy_t.data() + gb * block_numel + n * out_area * kBlockedChannels;
      for (int64_t j = 0; j < kBlockedChannels; ++j) {
        const int64_t k = b * kBlockedChannels + j;
        const float* src = dy + (n * out_channels + g * p.out_per_group + k) * out_area;
        for (int64_t i = 0; i < out_area; ++i) dst[i * kBlockedChannels + j] = k < p.out_per_group ? src[i] : 0.0f;
      }
    }
  });
  const int64_t strip_width = (p.out_w - 1) * p.stride_w + (p.taps_w - 1) * p.dil_w + 1;
  const int64_t weights_per_k = p.in_per_group * p.taps_h * p.taps_w;
  // One task per (group, block, input channel, kernel row): each owns its dW slice.
  at::parallel_for(0, p.groups * blocks * p.in_per_group * p.taps_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> strip(strip_width);
    std::vector<float> taps(p.taps_w * kBlockedChannels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task % p.taps_h, c = (task / p.taps_h) % p.in_per_group;
      const int64_t gb = task / (p.taps_h * p.in_per_group), g = gb / blocks, b = gb % blocks;
      const GradTile t{dy_t.data() + gb * block_numel, x + (g * p.in_per_group + c) * in_area, in_channels * in_area,
                       p.batch, p.in_h, p.in_w, p.out_h, p.out_w, r * p.dil_h + p.offset_h, p.stride_h, p.stride_w,
                       p.dil_w, -p.offset_w, strip.data(), strip_width, taps.data()};
      grad_table[p.taps_w - 1](t);
      const int64_t channels = std::min(kBlockedChannels, p.out_per_group - b * kBlockedChannels);
      for (int64_t j = 0; j < channels; ++j) {
        float* dst = dw + (g * p.out_per_group + b * kBlockedChannels + j) * weights_per_k + (c * p.taps_h + r) * p.taps_w;
        for (int64_t s = 0; s < p.taps_w; ++s) dst[s] = taps[s * kBlockedChannels + j];
      }
    }
  });
}

#else  // not x86-64 with GCC/Clang: the plain loops serve every case

bool blocked_kernel_available() { return false; }
void blocked_correlation(const BlockedProblem&, const float*, const float*, const float*, float*) {}
bool blocked_weight_grad_applies(const BlockedProblem&) { return false; }
void blocked_weight_grad(const BlockedProblem&, const float*, const float*, float*) {}

#endif

}  // namespace channelconv
