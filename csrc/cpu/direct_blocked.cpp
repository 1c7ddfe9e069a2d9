// Register-blocked float32 direct correlation (see direct_blocked.h).
//
// The tile: 32 output channels (two AVX-512 registers) x up to 14 output pixels (a piece of one
// row, or the same columns of two rows of at most 7), 28 accumulators held in registers. Each
// step loads two weight vectors and, per pixel, broadcasts one input value into two FMAs: 16
// loads feed 28 FMAs, so the loop is bound by the FMA ports rather than by loads (PERFORMANCE.md,
// "a register tile of outputs"). Vectorising over output channels, not width, makes stride and
// width-7 layers cost nothing extra.
//
// Per task (a group's run of output rows, which may cross from one image into the next), the input
// rows the tiles read are first copied into zero-padded strips, so the inner loop needs no bounds
// tests and padding costs nothing. The weight gradient (further down) has its own tile.
// The code is compiled for AVX-512 through a target attribute and used only when the CPU has it
// (blocked_kernel_available); no -march flag is involved.
#include "direct_blocked.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

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
// How far ahead (floats of packed weights, 16 taps) the tile prefetches its weights: a block's
// weights outgrow L1 (512 input channels x 3x3: 590 KB) and are streamed from L2 on every tile.
// The hardware prefetcher alone left 512 -> 512 3x3 @7 at 270 GFLOP/s; with this, about 300.
constexpr int64_t kWeightPrefetch = 512;
// Input strips one task holds: about half of this machine's 2 MiB per-core L2.
constexpr int64_t kStripBytes = int64_t(1) << 20;
typedef float v16 __attribute__((vector_size(64), aligned(4)));  // unaligned loads allowed

// Input positions that a run of `outputs` consecutive outputs reads through `taps` taps, from the
// first output's first tap to the last output's last: a strip's width, a chunk's input rows.
int64_t input_span(int64_t outputs, int64_t taps, int64_t stride, int64_t dilation) {
  return (outputs - 1) * stride + (taps - 1) * dilation + 1;
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols, 16 x 16 at a time in
// registers (masked at the edges): the forward tile's [pixel][32] result into NCHW planes, and the
// packing of x and dy for the weight gradient. A plain double loop cost more than the multiply-adds
// on 1x1 layers, and writing with a stride of 1 KiB (256 channels) evicted each line before its
// next write.
// (GCC 12 takes the "undefined" pass-through operand of the unpack intrinsics for an uninitialised
// variable: a false -Wmaybe-uninitialized, silenced for this function only.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) void transpose(const float* src, int64_t src_stride, int64_t rows, int64_t cols,
                                                  float* dst, int64_t dst_stride) {
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const int block_rows = static_cast<int>(std::min<int64_t>(16, rows - i0));
    const __mmask16 row_mask = static_cast<__mmask16>((1u << block_rows) - 1);
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      const int block_cols = static_cast<int>(std::min<int64_t>(16, cols - j0));
      const __mmask16 col_mask = static_cast<__mmask16>((1u << block_cols) - 1);
      __m512 a[16], b[16];
      for (int i = 0; i < 16; ++i)
        a[i] = i < block_rows ? _mm512_maskz_loadu_ps(col_mask, src + (i0 + i) * src_stride + j0) : _mm512_setzero_ps();
      // Interleave pairs of rows, then pairs of pairs, then 128-bit lanes twice: b[j] = column j.
      for (int i = 0; i < 16; i += 2) {
        b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
        b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
      }
      for (int i = 0; i < 16; i += 4) {
        a[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b[i]), _mm512_castps_pd(b[i + 2])));
        a[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b[i]), _mm512_castps_pd(b[i + 2])));
        a[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b[i + 1]), _mm512_castps_pd(b[i + 3])));
        a[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b[i + 1]), _mm512_castps_pd(b[i + 3])));
      }
      for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; ++i) {
          b[h + i] = _mm512_shuffle_f32x4(a[h + i], a[h + i + 4], 0x88);
          b[h + i + 4] = _mm512_shuffle_f32x4(a[h + i], a[h + i + 4], 0xdd);
        }
      for (int i = 0; i < 8; ++i) {
        a[i] = _mm512_shuffle_f32x4(b[i], b[i + 8], 0x88);
        a[i + 8] = _mm512_shuffle_f32x4(b[i], b[i + 8], 0xdd);
      }
      for (int j = 0; j < block_cols; ++j) _mm512_mask_storeu_ps(dst + (j0 + j) * dst_stride + i0, row_mask, a[j]);
    }
  }
}
#pragma GCC diagnostic pop

// A tile: Rows (1 or 2) output rows of A consecutive pixels each, the same columns on each row.
// Both rows read the same kernel rows [r_begin, r_end), so no multiply-add reads a zero row.
struct Tile {
  const float* x[2];      // each row's strip at (input channel 0, kernel row r_begin, the tile's first pixel)
  int64_t channel_step;   // floats from one input channel's strip rows to the next
  int64_t strip_width;    // floats from one kernel row to the next
  int64_t kernel_rows;    // r_end - r_begin
  int64_t taps_w, dil_w, stride_w, in_per_group;
  const float* weights;   // this channel block's [c][r][s][32] at (0, r_begin, 0)
  int64_t weight_channel_step;
  const float* init;      // 32 initial values
  float* acc;             // [pixel][32] result, row after row
};

// SW: the stride along the row as a constant (0: t.stride_w). With the stride known, every pixel's
// input is a fixed displacement from one pointer per row, so the loop needs two address registers
// instead of one per pixel (a pointer per pixel spilled to the stack: three reloads per tap).
template <int A, int Rows, int SW>
__attribute__((target("avx512f,fma"))) void tile_kernel(const Tile& t) {
  constexpr int P = A * Rows;
  const int64_t sw = SW > 0 ? SW : t.stride_w;
  v16 acc0[P], acc1[P];
  const v16 init0 = *reinterpret_cast<const v16*>(t.init);
  const v16 init1 = *reinterpret_cast<const v16*>(t.init + 16);
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    acc0[p] = init0;
    acc1[p] = init1;
  }
  // One tap: 32 weights times each pixel's input at x0 (first row) or x1 (second row).
  const auto tap = [&](const float* w, const float* x0, const float* x1) __attribute__((always_inline)) {
    const v16 w0 = *reinterpret_cast<const v16*>(w);
    const v16 w1 = *reinterpret_cast<const v16*>(w + 16);
    __builtin_prefetch(w + kWeightPrefetch, 0, 3);
    __builtin_prefetch(w + kWeightPrefetch + 16, 0, 3);
#pragma GCC unroll 16
    for (int p = 0; p < A; ++p) {
      const float xv = x0[p * sw];
      acc0[p] += w0 * xv;
      acc1[p] += w1 * xv;
    }
    if constexpr (Rows == 2) {
#pragma GCC unroll 16
      for (int p = 0; p < A; ++p) {
        const float xv = x1[p * sw];
        acc0[A + p] += w0 * xv;
        acc1[A + p] += w1 * xv;
      }
    }
  };
  if (t.kernel_rows == 1 && t.taps_w == 1) {  // one tap per input channel (1x1): one loop
    const float *x0 = t.x[0], *x1 = t.x[Rows - 1], *w = t.weights;
    for (int64_t c = 0; c < t.in_per_group; ++c, x0 += t.channel_step, x1 += t.channel_step, w += t.weight_channel_step)
      tap(w, x0, x1);
  } else {
    for (int64_t c = 0; c < t.in_per_group; ++c) {
      const float* x0 = t.x[0] + c * t.channel_step;
      const float* x1 = t.x[Rows - 1] + c * t.channel_step;
      const float* w = t.weights + c * t.weight_channel_step;
      for (int64_t r = 0; r < t.kernel_rows; ++r, x0 += t.strip_width, x1 += t.strip_width)
        for (int64_t s = 0; s < t.taps_w; ++s, w += kBlockedChannels) tap(w, x0 + s * t.dil_w, x1 + s * t.dil_w);
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    *reinterpret_cast<v16*>(t.acc + p * kBlockedChannels) = acc0[p];
    *reinterpret_cast<v16*>(t.acc + p * kBlockedChannels + 16) = acc1[p];
  }
}

using TileFn = void (*)(const Tile&);

template <int Rows, int SW, int... A>
constexpr std::array<TileFn, sizeof...(A)> make_tile_row(std::integer_sequence<int, A...>) {
  return {&tile_kernel<A + 1, Rows, SW>...};
}
// one_row_tiles[SW][A - 1]: A pixels of one row at stride SW (0: any other stride);
// two_row_tiles[SW][A - 1]: A pixels on each of two rows (2A <= kMaxPixels).
constexpr std::array<std::array<TileFn, kMaxPixels>, 3> one_row_tiles = {
    make_tile_row<1, 0>(std::make_integer_sequence<int, kMaxPixels>{}),
    make_tile_row<1, 1>(std::make_integer_sequence<int, kMaxPixels>{}),
    make_tile_row<1, 2>(std::make_integer_sequence<int, kMaxPixels>{})};
constexpr std::array<std::array<TileFn, kMaxPixels / 2>, 3> two_row_tiles = {
    make_tile_row<2, 0>(std::make_integer_sequence<int, kMaxPixels / 2>{}),
    make_tile_row<2, 1>(std::make_integer_sequence<int, kMaxPixels / 2>{}),
    make_tile_row<2, 2>(std::make_integer_sequence<int, kMaxPixels / 2>{})};

}  // namespace

bool blocked_kernel_available() {
  // CHANNELCONV_DISABLE_AVX512=1 forces the portable loops (what a CPU without AVX-512 runs);
  // the tests use it to cover that path on this machine.
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") &&
                                std::getenv("CHANNELCONV_DISABLE_AVX512") == nullptr;
  return available;
}

void pack_blocked_weight(const BlockedProblem& p, const float* w, const WeightTaps& taps, float* packed) {
  const int64_t blocks = (p.out_per_group + kBlockedChannels - 1) / kBlockedChannels;
  const int64_t block_floats = p.in_per_group * p.taps_h * p.taps_w * kBlockedChannels;
  const int64_t kernel_taps = taps.kernel_h * taps.kernel_w;
  at::parallel_for(0, p.groups * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tap_major(kernel_taps * kBlockedChannels);  // [kernel tap][32]
    for (int64_t gb = begin; gb < end; ++gb) {
      const int64_t g = gb / blocks, b = gb % blocks;
      const int64_t channels = std::min(kBlockedChannels, p.out_per_group - b * kBlockedChannels);
      float* dst = packed + gb * block_floats;
      if (!taps.transposed) {  // forward: every tap in order, so the block's rows of w transposed whole
        if (channels < kBlockedChannels) std::fill(dst, dst + block_floats, 0.0f);
        const int64_t row = p.in_per_group * kernel_taps;  // [c][r][s] of one output channel
        transpose(w + (g * p.out_per_group + b * kBlockedChannels) * row, row, channels, row, dst, kBlockedChannels);
        continue;
      }
      // Input gradient: per weight output channel c (the problem's input channel), the block's 32
      // weight input channels as [kernel tap][32] (lanes past the group's channels zero), then the
      // phase's taps in the problem's order.
      if (channels < kBlockedChannels) std::fill(tap_major.begin(), tap_major.end(), 0.0f);
      for (int64_t c = 0; c < p.in_per_group; ++c) {
        transpose(w + ((g * p.in_per_group + c) * p.out_per_group + b * kBlockedChannels) * kernel_taps, kernel_taps,
                  channels, kernel_taps, tap_major.data(), kBlockedChannels);
        for (int64_t t = 0; t < p.taps_h; ++t)
          for (int64_t u = 0; u < p.taps_w; ++u, dst += kBlockedChannels)
            std::copy_n(tap_major.data() +
                            ((taps.first_h + t * taps.step_h) * taps.kernel_w + taps.first_w + u * taps.step_w) *
                                kBlockedChannels,
                        kBlockedChannels, dst);
      }
    }
  });
}

namespace {

// How blocked_correlation shares a group's output rows (rows run on from one image into the next)
// among its tasks: task t of a group takes units [t * units / tasks, (t + 1) * units / tasks), a
// unit being one row, or two on maps of at most 7 columns (rows pair into tiles). Even shares: a
// fixed row count per task left 14 rows as 4 + 4 + 4 + 2, one thread idle an eighth of the time.
struct TaskRows {
  int64_t rows_per_group, unit, units, group_tasks;
  int64_t begin(int64_t t) const { return std::min(rows_per_group, t * units / group_tasks * unit); }
  int64_t end(int64_t t) const { return begin(t + 1); }
  int64_t max_rows() const { return (units + group_tasks - 1) / group_tasks * unit; }
};

// As many tasks as keep each task's strips within kStripBytes (cache-resident), at least two per
// thread, and a multiple of the thread count.
TaskRows blocked_task_rows(const BlockedProblem& p, int64_t strip_floats, int64_t threads) {
  TaskRows plan;
  plan.rows_per_group = p.batch * p.out_h;
  plan.unit = 2 * p.out_w <= kMaxPixels ? 2 : 1;
  plan.units = (plan.rows_per_group + plan.unit - 1) / plan.unit;
  const int64_t rows_by_cache = std::max<int64_t>(1, kStripBytes / (strip_floats * int64_t(sizeof(float))));
  int64_t tasks = std::max(2 * threads, (p.groups * plan.rows_per_group + rows_by_cache - 1) / rows_by_cache);
  tasks = (tasks + threads - 1) / threads * threads;
  plan.group_tasks = std::clamp<int64_t>(tasks / p.groups, 1, std::max<int64_t>(1, plan.units));
  return plan;
}

// A tile of a task: `width` pixels from column `col` of the task's row `row[0]` (and of row[1]
// when two rows share the tile).
struct TilePlace {
  int64_t row[2];
  int rows;
  int64_t col, width;
};

// The task's tiles. A row wider than a tile is cut into equal pieces (56 -> 4 x 14, 20 -> 2 x 10).
// Rows of at most half a tile go two to a tile, paired among rows that read the same kernel rows
// (sorted by [r_begin, r_end): on 7x7 maps the top rows of two images pair, and so do their bottom
// rows), so that no tile runs a kernel row that one of its rows does not need; a row left without
// a partner of its range pairs with the next row anyway (its tile runs the union of the ranges).
void plan_tiles(int64_t rows, int64_t out_w, const int64_t* r_begin, const int64_t* r_end,
                std::vector<TilePlace>& tiles) {
  tiles.clear();
  if (2 * out_w <= kMaxPixels) {
    std::vector<int64_t> order(rows);
    for (int64_t j = 0; j < rows; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return std::make_pair(r_begin[a], r_end[a]) < std::make_pair(r_begin[b], r_end[b]);
    });
    for (int64_t i = 0; i < rows; i += 2)
      tiles.push_back(i + 1 < rows ? TilePlace{{order[i], order[i + 1]}, 2, 0, out_w}
                                   : TilePlace{{order[i], order[i]}, 1, 0, out_w});
    return;
  }
  const int64_t pieces = (out_w + kMaxPixels - 1) / kMaxPixels;
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t i = 0, col = 0; i < pieces; ++i) {
      const int64_t width = out_w / pieces + (i < out_w % pieces ? 1 : 0);
      tiles.push_back(TilePlace{{j, j}, 1, col, width});
      col += width;
    }
}

}  // namespace

void blocked_correlation(const BlockedProblem& p, const float* in, const float* packed, const float* init, float* out) {
  const int64_t blocks = (p.out_per_group + kBlockedChannels - 1) / kBlockedChannels;
  const int64_t strip_width = input_span(p.out_w, p.taps_w, p.stride_w, p.dil_w);
  const int64_t in_area = p.in_h * p.in_w, out_area = p.plane_h() * p.plane_w();
  const int64_t weights_per_block = p.in_per_group * p.taps_h * p.taps_w * kBlockedChannels;
  const int stride_index = p.stride_w == 1 || p.stride_w == 2 ? static_cast<int>(p.stride_w) : 0;

  // Initial values per (group, padded channel): the bias, zero past the group's channels.
  std::vector<float> init_padded(p.groups * blocks * kBlockedChannels, 0.0f);
  if (init != nullptr) {
    for (int64_t g = 0; g < p.groups; ++g)
      std::copy(init + g * p.out_per_group, init + (g + 1) * p.out_per_group,
                init_padded.begin() + g * blocks * kBlockedChannels);
  }

  // A task covers a run of output rows of one group, image after image, and runs every channel
  // block over all of them, so a block's packed weights are read from memory once per task instead
  // of once per row: on small maps with many channels (512 -> 512 at 7x7: 9.4 MB of weights, 0.2 MB
  // of input per image) the weights dominate the traffic. Rows per task: as many as keep their
  // strips within kStripBytes (cache-resident), in a number of tasks that shares out evenly over
  // the threads (at least two each), in even shares (blocked_task_rows).
  const int64_t strip_floats = p.in_per_group * p.taps_h * strip_width;
  const TaskRows plan = blocked_task_rows(p, strip_floats, at::get_num_threads());
  const int64_t group_tasks = plan.group_tasks, task_rows = plan.max_rows();

  // Strip columns [x_begin, x_end) hold input columns; the rest is padding.
  const int64_t x_begin = std::max<int64_t>(0, -p.offset_w);
  const int64_t x_end = std::min(strip_width, p.in_w - p.offset_w);

  at::parallel_for(0, p.groups * group_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> strips(task_rows * strip_floats);
    std::vector<int64_t> r_begin(task_rows), r_end(task_rows), row_out(task_rows);
    std::vector<float> tile_acc(kMaxPixels * kBlockedChannels);
    std::vector<TilePlace> tiles;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / group_tasks, row0 = plan.begin(task % group_tasks);
      const int64_t rows = plan.end(task % group_tasks) - row0;
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t n = (row0 + j) / p.out_h, oh = (row0 + j) % p.out_h;
        const float* in_group = in + (n * p.groups + g) * p.in_per_group * in_area;
        // Where the row's first pixel goes, from its group's first output channel in image 0.
        row_out[j] = n * p.groups * p.out_per_group * out_area + (p.out_origin_h + oh * p.out_step_h) * p.plane_w() +
                     p.out_origin_w;
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
        // Row j's zero-padded strip: strip[c][r][x] = in[ih(r), offset_w + x] (0 outside the plane),
        // for the kernel rows inside the plane; a tile whose rows need different ranges runs the
        // union, so the rows outside read zeros too.
        for (int64_t c = 0; c < p.in_per_group; ++c) {
          for (int64_t r = 0; r < p.taps_h; ++r) {
            float* dst = strips.data() + j * strip_floats + (c * p.taps_h + r) * strip_width;
            if (r < r_begin[j] || r >= r_end[j] || x_end <= x_begin) {
              std::fill(dst, dst + strip_width, 0.0f);
              continue;
            }
            std::fill(dst, dst + x_begin, 0.0f);
            const int64_t src = c * in_area + (oh * p.stride_h + r * p.dil_h + p.offset_h) * p.in_w + p.offset_w;
            std::memcpy(dst + x_begin, in_group + src + x_begin, (x_end - x_begin) * sizeof(float));
            std::fill(dst + x_end, dst + strip_width, 0.0f);
          }
        }
      }
      plan_tiles(rows, p.out_w, r_begin.data(), r_end.data(), tiles);
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t channels = std::min(kBlockedChannels, p.out_per_group - b * kBlockedChannels);
        float* out_block = out + (g * p.out_per_group + b * kBlockedChannels) * out_area;
        const float* block_weights = packed + (g * blocks + b) * weights_per_block;
        for (const TilePlace& place : tiles) {
          const int64_t j0 = place.row[0], j1 = place.row[1];
          const int64_t rb = std::min(r_begin[j0], r_begin[j1]), re = std::max(r_end[j0], r_end[j1]);
          const int64_t first = rb * strip_width + place.col * p.stride_w;
          Tile t{{strips.data() + j0 * strip_floats + first, strips.data() + j1 * strip_floats + first},
                 p.taps_h * strip_width, strip_width, std::max<int64_t>(0, re - rb), p.taps_w, p.dil_w, p.stride_w,
                 p.in_per_group, block_weights + rb * p.taps_w * kBlockedChannels,
                 p.taps_h * p.taps_w * kBlockedChannels, init_padded.data() + (g * blocks + b) * kBlockedChannels,
                 tile_acc.data()};
          if (place.rows == 2)
            two_row_tiles[stride_index][place.width - 1](t);
          else
            one_row_tiles[stride_index][place.width - 1](t);
          // The tile's [pixel][32] result into the NCHW output of this block's channels, row by row.
          for (int i = 0; i < place.rows; ++i) {
            const float* acc = tile_acc.data() + i * place.width * kBlockedChannels;
            float* dst = out_block + row_out[place.row[i]] + place.col * p.out_step_w;
            if (p.out_step_w == 1) {
              transpose(acc, kBlockedChannels, place.width, channels, dst, out_area);
            } else {
              for (int64_t k = 0; k < channels; ++k)
                for (int64_t q = 0; q < place.width; ++q)
                  dst[k * out_area + q * p.out_step_w] = acc[q * kBlockedChannels + k];
            }
          }
        }
      }
    }
  });
}

namespace {

// Weight gradient, blocked like a GEMM whose reduction runs over output pixels:
//   dW[k, c, r, s] = sum over (n, oh, ow) of dy[n, k, oh, ow] * x[n, c, ih(oh, r), iw(ow, s)].
// The pixels go by in chunks (a band of output rows of one image, or several whole images). Per
// chunk, the input rows the chunk reads are copied channel-last and zero-padded (each tile's G
// channels in one stream: [row][column][G]), and each 32-channel block of dy is transposed to
// [pixel][32]. A tile holds 32 output channels x G input channels x S taps of one kernel row in
// 2*G*S registers; per pixel it loads two dy vectors and broadcasts G*S input values: 2 + G*S
// loads feed 2*G*S FMAs (G*S up to 12, so at most 14 loads per 24 FMAs: bound by the FMA ports).
// The tile adds into a [c][r][s][32] copy of dW, so each weight element is summed over the chunks
// in order, the pixels within a chunk in order, whatever the tiling or the thread count: the
// result is deterministic.
constexpr int kMaxGradTaps = 7;
constexpr int kGradTileValues = 12;  // G * S: 24 accumulators of the 32 registers
// Bytes of channel-last input rows per chunk: with the chunk's dy, resident in a core's L2.
constexpr int64_t kGradChunkBytes = int64_t(1) << 20;

struct GradTile {
  const float* dy;     // [image][pixel][32]: the chunk's output pixels, row after row
  const float* x;      // channel-last rows at (image 0, kernel row r's first input row, column 0, first channel)
  int64_t images, image_step;  // the chunk's images, image_step floats apart in x
  int64_t rows, out_w;         // output rows and columns per image
  int64_t row_step;    // floats from one output row's input row to the next
  int64_t pixel_step;  // floats from one output pixel's input column to the next
  int64_t tap_step;    // floats from tap s to tap s + 1
  float* dw;           // [g][..][s][32] at dw_channel_step per input channel
  int64_t dw_channel_step;
};

template <int S, int G>
__attribute__((target("avx512f,fma"))) void grad_tile_kernel(const GradTile& t) {
  v16 acc0[G][S], acc1[G][S];
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
      acc0[g][s] = *reinterpret_cast<const v16*>(t.dw + g * t.dw_channel_step + s * kBlockedChannels);
      acc1[g][s] = *reinterpret_cast<const v16*>(t.dw + g * t.dw_channel_step + s * kBlockedChannels + 16);
    }
  const float* d = t.dy;
  for (int64_t m = 0; m < t.images; ++m) {
    for (int64_t j = 0; j < t.rows; ++j) {
      const float* x = t.x + m * t.image_step + j * t.row_step;
      for (int64_t ow = 0; ow < t.out_w; ++ow, x += t.pixel_step, d += kBlockedChannels) {
        const v16 d0 = *reinterpret_cast<const v16*>(d);
        const v16 d1 = *reinterpret_cast<const v16*>(d + 16);
#pragma GCC unroll 16
        for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
          for (int g = 0; g < G; ++g) {
            const float xv = x[s * t.tap_step + g];
            acc0[g][s] += d0 * xv;
            acc1[g][s] += d1 * xv;
          }
      }
    }
  }
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
      *reinterpret_cast<v16*>(t.dw + g * t.dw_channel_step + s * kBlockedChannels) = acc0[g][s];
      *reinterpret_cast<v16*>(t.dw + g * t.dw_channel_step + s * kBlockedChannels + 16) = acc1[g][s];
    }
}

using GradTileFn = void (*)(const GradTile&);

// grad_tiles[S - 1][G - 1]: S taps, G input channels (G * S <= kGradTileValues; null past that).
template <int S, int... G>
constexpr std::array<GradTileFn, kGradTileValues> grad_tile_row(std::integer_sequence<int, G...>) {
  return {(S * (G + 1) <= kGradTileValues ? &grad_tile_kernel<S, (S * (G + 1) <= kGradTileValues ? G + 1 : 1)>
                                          : nullptr)...};
}
template <int... S>
constexpr std::array<std::array<GradTileFn, kGradTileValues>, sizeof...(S)> make_grad_tiles(
    std::integer_sequence<int, S...>) {
  return {grad_tile_row<S + 1>(std::make_integer_sequence<int, kGradTileValues>{})...};
}
constexpr auto grad_tiles = make_grad_tiles(std::make_integer_sequence<int, kMaxGradTaps>{});

}  // namespace

bool blocked_weight_grad_applies(const BlockedProblem& p) {
  return p.taps_w <= kMaxGradTaps && p.out_per_group >= kBlockedChannels / 2;
}

void blocked_weight_grad(const BlockedProblem& p, const float* dy, const float* x, float* dw) {
  if (p.out_h == 0 || p.out_w == 0) {  // no output pixels: a zero gradient
    std::fill(dw, dw + p.groups * p.out_per_group * p.in_per_group * p.taps_h * p.taps_w, 0.0f);
    return;
  }
  const int64_t blocks = (p.out_per_group + kBlockedChannels - 1) / kBlockedChannels;
  const int64_t out_area = p.out_h * p.out_w, in_area = p.in_h * p.in_w;
  const int64_t out_channels = p.groups * p.out_per_group, in_channels = p.groups * p.in_per_group;
  const int64_t C = p.in_per_group, R = p.taps_h, S = p.taps_w;
  const int tile_channels = std::max(1, kGradTileValues / static_cast<int>(S));
  // Channel-last input rows of a chunk: wide enough for every tap of the band's output columns.
  const int64_t cols = input_span(p.out_w, S, p.stride_w, p.dil_w);
  const auto input_rows = [&](int64_t out_rows) { return input_span(out_rows, R, p.stride_h, p.dil_h); };
  // A chunk: a band of output rows of one image, as many rows as keep the band's input rows within
  // kGradChunkBytes; or, when a whole image fits, several whole images (7x7 maps: the dW tiles are
  // loaded and stored once per chunk, so fewer, larger chunks save that traffic). The chunking
  // depends on the shape only, not on the thread count, so neither does the summation order.
  const auto chunk_bytes = [&](int64_t out_rows) { return input_rows(out_rows) * cols * C * int64_t(sizeof(float)); };
  int64_t chunk_rows = p.out_h;
  while (chunk_rows > 1 && chunk_bytes(chunk_rows) > kGradChunkBytes) --chunk_rows;
  const int64_t bands = (p.out_h + chunk_rows - 1) / chunk_rows;
  int64_t chunk_images = 1;
  if (bands == 1 && p.batch > 1) {  // as many images as fit, evened out over the chunks
    const int64_t fit = std::clamp<int64_t>(kGradChunkBytes / chunk_bytes(p.out_h), 1, p.batch);
    const int64_t chunks = (p.batch + fit - 1) / fit;
    chunk_images = (p.batch + chunks - 1) / chunks;
  }

  // Work units (group, input-channel part, channel block), each owning its slice of dW; a thread
  // takes a run of consecutive units and packs the input rows of its parts only. With more input
  // than output channels the input channels are split among the threads, so that each packs its
  // share of x (the larger operand) and all of dy rather than all of x and its share of dy (a
  // 256 -> 64 1x1 gradient spent more time packing x than multiplying). They are also split when
  // there are fewer (group, block) pairs than threads, so that no thread idles.
  const int64_t threads = at::get_num_threads();
  int64_t parts = C > p.out_per_group && p.groups < threads ? (threads + p.groups - 1) / p.groups : 1;
  while ((p.groups * blocks * parts) % threads != 0 && p.groups * blocks * parts < 4 * threads &&
         C / (parts + 1) >= tile_channels)
    ++parts;
  parts = std::min(parts, std::max<int64_t>(1, C / tile_channels));
  const int64_t part_channels = (C + parts - 1) / parts;

  // dW in the tiles' order, [group][block][c][r][s][32], summed over all chunks.
  const int64_t dw_block = C * R * S * kBlockedChannels;
  std::vector<float> dw_t(p.groups * blocks * dw_block, 0.0f);
  at::parallel_for(0, p.groups * parts * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows_t(chunk_images * input_rows(chunk_rows) * cols * part_channels);
    std::vector<float> dy_t(chunk_images * chunk_rows * p.out_w * kBlockedChannels);
    for (int64_t n0 = 0; n0 < p.batch; n0 += chunk_images) {
      const int64_t images = std::min(chunk_images, p.batch - n0);
      for (int64_t band = 0; band < bands; ++band) {
        const int64_t oh0 = band * chunk_rows, rows = std::min(chunk_rows, p.out_h - oh0);
        const int64_t in_rows = input_rows(rows), ih0 = oh0 * p.stride_h + p.offset_h;
        const int64_t band_pixels = rows * p.out_w;
        int64_t built = -1;  // (group, part) whose input rows rows_t holds
        for (int64_t unit = begin; unit < end; ++unit) {
          const int64_t b = unit % blocks, part = (unit / blocks) % parts, g = unit / (blocks * parts);
          const int64_t c0 = part * part_channels, channels = std::min(part_channels, C - c0);
          if (channels <= 0) continue;
          if (built != g * parts + part) {
            // Per tile's channels [c, c + tile_g), image m:
            //   rows_t[c * images * in_rows * cols + ((m * in_rows + i) * cols + col) * tile_g + c'] =
            //   x[n0 + m, c0 + c + c', ih0 + i, col + offset_w], zero outside the plane,
            // so that a tile reads one contiguous stream.
            std::fill(rows_t.begin(), rows_t.begin() + channels * images * in_rows * cols, 0.0f);
            const int64_t col_begin = std::max<int64_t>(0, -p.offset_w);
            const int64_t col_end = std::min(cols, p.in_w - p.offset_w);
            for (int64_t c = 0; c < channels; c += tile_channels) {
              const int64_t tile_g = std::min<int64_t>(tile_channels, channels - c);
              float* tile_rows = rows_t.data() + c * images * in_rows * cols;
              for (int64_t m = 0; m < images; ++m) {
                const float* x_tile = x + ((n0 + m) * in_channels + g * C + c0 + c) * in_area;
                for (int64_t i = 0; i < in_rows; ++i) {
                  const int64_t ih = ih0 + i;
                  if (ih < 0 || ih >= p.in_h) continue;
                  transpose(x_tile + ih * p.in_w + p.offset_w + col_begin, in_area, tile_g, col_end - col_begin,
                            tile_rows + ((m * in_rows + i) * cols + col_begin) * tile_g, tile_g);
                }
              }
            }
            built = g * parts + part;
          }
          // dy_t[m][pixel][j] = dy[n0 + m, block channel j, pixel of the band], zero past the group's channels.
          const int64_t block_channels = std::min(kBlockedChannels, p.out_per_group - b * kBlockedChannels);
          if (block_channels < kBlockedChannels) std::fill(dy_t.begin(), dy_t.end(), 0.0f);
          for (int64_t m = 0; m < images; ++m)
            transpose(dy + ((n0 + m) * out_channels + g * p.out_per_group + b * kBlockedChannels) * out_area +
                          oh0 * p.out_w,
                      out_area, block_channels, band_pixels, dy_t.data() + m * band_pixels * kBlockedChannels,
                      kBlockedChannels);
          float* dw_unit = dw_t.data() + (g * blocks + b) * dw_block;
          for (int64_t r = 0; r < R; ++r) {
            for (int64_t c = 0; c < channels; c += tile_channels) {
              const int64_t tile_g = std::min<int64_t>(tile_channels, channels - c);
              const GradTile t{dy_t.data(), rows_t.data() + c * images * in_rows * cols + r * p.dil_h * cols * tile_g,
                               images, in_rows * cols * tile_g, rows, p.out_w,
                               p.stride_h * cols * tile_g, p.stride_w * tile_g, p.dil_w * tile_g,
                               dw_unit + ((c0 + c) * R + r) * S * kBlockedChannels, R * S * kBlockedChannels};
              grad_tiles[S - 1][tile_g - 1](t);
            }
          }
        }
      }
    }
    // Each unit's dW slice back to (K, C, k_h, k_w).
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit % blocks, part = (unit / blocks) % parts, g = unit / (blocks * parts);
      const int64_t c0 = part * part_channels, c1 = std::min(C, c0 + part_channels);
      const int64_t channels = std::min(kBlockedChannels, p.out_per_group - b * kBlockedChannels);
      const int64_t taps = (c1 - c0) * R * S;  // this unit's (c, r, s) taps, from input channel c0 on
      if (taps > 0)
        transpose(dw_t.data() + (g * blocks + b) * dw_block + c0 * R * S * kBlockedChannels, kBlockedChannels, taps,
                  channels, dw + (g * p.out_per_group + b * kBlockedChannels) * C * R * S + c0 * R * S, C * R * S);
    }
  });
}

#else  // not x86-64 with GCC/Clang: the plain loops serve every case

bool blocked_kernel_available() { return false; }
void blocked_correlation(const BlockedProblem&, const float*, const float*, const float*, float*) {}
void pack_blocked_weight(const BlockedProblem&, const float*, const WeightTaps&, float*) {}
bool blocked_weight_grad_applies(const BlockedProblem&) { return false; }
void blocked_weight_grad(const BlockedProblem&, const float*, const float*, float*) {}

#endif

}  // namespace channelconv
