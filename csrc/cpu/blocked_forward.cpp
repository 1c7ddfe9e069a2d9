// The register-blocked forward engine (blocked.h): one correlation problem, run as the plan's
// tasks of output rows, each task's rows cut into register tiles.
//
// The tile: 32 output channels (two AVX-512 registers) x up to 14 output pixels (a piece of one
// row, or the same columns of two rows of at most 7), 28 accumulators held in registers. Each
// step loads two weight vectors and, per pixel, broadcasts one input value into two FMAs: 16
// loads feed 28 FMAs, so the loop is bound by the FMA ports rather than by loads. Vectorising
// over output channels, not width, makes stride and width-7 layers cost nothing extra. A narrow
// tile (problems of at most 16 output channels per group) holds 16 channels x up to 28 pixels in
// the same 28 registers: one weight vector a step, one FMA per pixel.
//
// Per task (a group's run of output rows, which may cross from one image into the next), the input
// rows the tiles read are first copied into zero-padded strips, so the inner loop needs no bounds
// tests and padding costs nothing.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "blocked.h"

namespace channelconv {

#if defined(__x86_64__) && defined(__GNUC__)

namespace {

using blocked::v16;

// How far ahead (floats of packed weights, 16 taps) the tile prefetches its weights: a block's
// weights outgrow L1 on wide layers and are streamed from L2 on every tile, which the hardware
// prefetcher alone does not hide (benchmarks/NOTES.md).
constexpr int64_t kWeightPrefetch = 512;

// A tile: Rows (1 to kMaxTileRows) output rows of A consecutive pixels each, the same columns on
// each row. All its rows read the same kernel rows [r_begin, r_end) (the union of theirs).
struct Tile {
  const float* x[kMaxTileRows];  // each row's strip at (input channel 0, kernel row r_begin, the tile's first pixel)
  int64_t channel_step;   // floats from one input channel's (or pair's) strip rows to the next
  int64_t kernel_row_step;  // floats from one kernel row's strip to the next
  int64_t kernel_rows;    // r_end - r_begin
  int64_t taps_w, dil_w, stride_w, packs;  // packs: input channels, or pairs of them
  const float* weights;   // this channel block's [c][r][s][block] at (0, r_begin, 0)
  int64_t weight_channel_step;
  const float* init;      // the block's initial values
  float* acc;             // [pixel][block] result, row after row; unless out[0] is set:
  float* out[kMaxTileRows];  // each row's first pixel in a float32 channels_last output, the block
  int64_t out_pixel_step;    // whole, its pixels out_pixel_step floats apart
};

// SW: the stride along the row as a constant (0: t.stride_w). With the stride known, every pixel's
// input is a fixed displacement from one pointer per row, so the loop needs an address register per
// row instead of one per pixel (a pointer per pixel spilled to the stack: three reloads per tap).
// V: vectors of 16 channels per pixel (2: a 32-channel tile; 1: a narrow one).
// Pack: input channels per step, 1 (float32 FMAs) or 2 (bfloat16 pairs, dot_pairs).
template <int A, int Rows, int SW, int V, int Pack>
__attribute__((target("avx512f,fma"))) void tile_kernel(const Tile& t) {
  constexpr int P = A * Rows, block = 16 * V;
  const int64_t sw = SW > 0 ? SW : t.stride_w;
  v16 acc[V][P];
#pragma GCC unroll 2
  for (int v = 0; v < V; ++v) {
    const v16 init = *reinterpret_cast<const v16*>(t.init + 16 * v);
#pragma GCC unroll 28
    for (int p = 0; p < P; ++p) acc[v][p] = init;
  }
  // One tap: the block's weights times each pixel's input, row r's at x[r] + offset.
  const auto tap = [&](const float* w, const float* const* x, int64_t offset) __attribute__((always_inline)) {
    v16 wv[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      wv[v] = *reinterpret_cast<const v16*>(w + 16 * v);
      __builtin_prefetch(w + kWeightPrefetch + 16 * v, 0, 3);
    }
#pragma GCC unroll 4
    for (int r = 0; r < Rows; ++r) {
      const float* row = x[r] + offset;
#pragma GCC unroll 28
      for (int p = 0; p < A; ++p) {
        if constexpr (Pack == 2) {
#pragma GCC unroll 2
          for (int v = 0; v < V; ++v) blocked::dot_pairs(acc[v][r * A + p], wv[v], row + p * sw);
        } else {
          const float xv = row[p * sw];
#pragma GCC unroll 2
          for (int v = 0; v < V; ++v) acc[v][r * A + p] += wv[v] * xv;
        }
      }
    }
  };
  const float* x[Rows];
  if (t.kernel_rows == 1 && t.taps_w == 1) {  // one tap per input channel (1x1): one loop
#pragma GCC unroll 4
    for (int r = 0; r < Rows; ++r) x[r] = t.x[r];
    const float* w = t.weights;
    for (int64_t c = 0; c < t.packs; ++c, w += t.weight_channel_step) {
      tap(w, x, 0);
#pragma GCC unroll 4
      for (int r = 0; r < Rows; ++r) x[r] += t.channel_step;
    }
  } else {
    for (int64_t c = 0; c < t.packs; ++c) {
#pragma GCC unroll 4
      for (int r = 0; r < Rows; ++r) x[r] = t.x[r] + c * t.channel_step;
      const float* w = t.weights + c * t.weight_channel_step;
      for (int64_t kr = 0; kr < t.kernel_rows; ++kr) {
        for (int64_t s = 0; s < t.taps_w; ++s, w += block) tap(w, x, s * t.dil_w);
#pragma GCC unroll 4
        for (int r = 0; r < Rows; ++r) x[r] += t.kernel_row_step;
      }
    }
  }
  if (t.out[0] != nullptr) {  // straight into the output, where a copy through acc cost a pass over it
#pragma GCC unroll 4
    for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 28
      for (int p = 0; p < A; ++p)
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v)
          *reinterpret_cast<v16*>(t.out[r] + p * t.out_pixel_step + 16 * v) = acc[v][r * A + p];
    return;
  }
#pragma GCC unroll 28
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) *reinterpret_cast<v16*>(t.acc + p * block + 16 * v) = acc[v][p];
}

using TileFn = void (*)(const Tile&);

template <int Rows, int SW, int V, int Pack, int... A>
constexpr std::array<TileFn, sizeof...(A)> make_tile_row(std::integer_sequence<int, A...>) {
  return {&tile_kernel<A + 1, Rows, SW, V, Pack>...};
}
// Tiles of V vectors of channels (pixels up to Pixels = 28 / V), by stride SW (0: any other):
// rows<R>[SW][A - 1], A pixels on each of R rows.
template <int V, int Pack, int Pixels = kMaxNarrowPixels / V>
struct TileTable {
  template <int Rows>
  static constexpr std::array<std::array<TileFn, Pixels / Rows>, 3> rows = {
      make_tile_row<Rows, 0, V, Pack>(std::make_integer_sequence<int, Pixels / Rows>{}),
      make_tile_row<Rows, 1, V, Pack>(std::make_integer_sequence<int, Pixels / Rows>{}),
      make_tile_row<Rows, 2, V, Pack>(std::make_integer_sequence<int, Pixels / Rows>{})};
};
static_assert(kMaxNarrowPixels / 2 == kMaxPixels, "a 32-channel tile holds half a narrow tile's pixels");
static_assert(kMaxTileRows == 4, "tile_of covers 1 to 4 rows");

template <int V, int Pack>
TileFn tile_of(int stride_index, int rows, int64_t width) {
  using Table = TileTable<V, Pack>;
  switch (rows) {
    case 1: return Table::template rows<1>[stride_index][width - 1];
    case 2: return Table::template rows<2>[stride_index][width - 1];
    case 3: return Table::template rows<3>[stride_index][width - 1];
    default: return Table::template rows<4>[stride_index][width - 1];
  }
}

TileFn tile_for(const BlockedProblem& p, int rows, int64_t width) {
  const int stride_index = p.stride_w == 1 || p.stride_w == 2 ? static_cast<int>(p.stride_w) : 0;
  const bool wide = p.block == kBlockedChannels, pairs = p.channel_pack == 2;
  if (pairs) return wide ? tile_of<2, 2>(stride_index, rows, width) : tile_of<1, 2>(stride_index, rows, width);
  return wide ? tile_of<2, 1>(stride_index, rows, width) : tile_of<1, 1>(stride_index, rows, width);
}

// A tile of a task: `width` pixels from column `col` of the task's rows row[0], ..., row[rows - 1].
struct TilePlace {
  int64_t row[kMaxTileRows];
  int rows;
  int64_t col, width;
};

// The task's tiles. A row wider than a tile is cut into equal pieces (56 -> 4 x 14, 20 -> 2 x 10).
// Rows of at most half a tile go tile_rows() to a tile, grouped among rows that read the same
// kernel rows (sorted by [r_begin, r_end): on 7x7 maps the top rows of two images pair, and so do
// their bottom rows), so that few tiles run a kernel row that one of their rows does not need; a
// group left short of rows of its range fills up with the next range's (its tile runs the union
// of the ranges), and the last tile may hold fewer rows. (BlockedProblem::tiles counts them.)
void plan_tiles(const BlockedProblem& p, int64_t rows, const int64_t* r_begin, const int64_t* r_end,
                std::vector<TilePlace>& tiles) {
  tiles.clear();
  const int64_t out_w = p.out_w;
  if (p.grouped_rows()) {
    std::vector<int64_t> order(rows);
    for (int64_t j = 0; j < rows; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return std::make_pair(r_begin[a], r_end[a]) < std::make_pair(r_begin[b], r_end[b]);
    });
    const int64_t per_tile = p.tile_rows();
    for (int64_t i = 0; i < rows; i += per_tile) {
      TilePlace place{{}, static_cast<int>(std::min(per_tile, rows - i)), 0, out_w};
      for (int k = 0; k < place.rows; ++k) place.row[k] = order[i + k];
      tiles.push_back(place);
    }
    return;
  }
  const int64_t pieces = p.row_pieces();
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t i = 0, col = 0; i < pieces; ++i) {
      const int64_t width = out_w / pieces + (i < out_w % pieces ? 1 : 0);
      tiles.push_back(TilePlace{{j}, 1, col, width});
      col += width;
    }
}

// Where one task's rows are and what they read: task row j is output row plane_row[j] of image
// image[j] (its plane position: origin + oh * step), and [r_begin[j], r_end[j]) are the kernel rows
// whose input row lies in the plane. Row j's kernel row r reads strips[row_offset[j] + r * dil_h *
// strip_width + c * channel_step + x] for input channel (or pair) c.
struct TaskState {
  std::vector<float> strips;
  int64_t channel_step = 0;
  std::vector<int64_t> r_begin, r_end, image, plane_row, row_offset;
  std::vector<int64_t> segment_first;  // each segment's first task row, then the task's row count
  std::vector<TilePlace> tiles;
  std::vector<float> tile_acc;
};

// The task's input rows as zero-padded strips, strip[x] = in[ih, offset_w + x] (0 outside the
// plane). Consecutive rows of one image whose input rows overlap (stride_h below the kernel's
// height) share a segment, [channel][input row][x], that holds each input row once: a strip per
// output row and kernel row copied a 3x3 layer's input three times over, as many small copies that
// cost a fifth of the time on 8x8 maps (benchmarks/NOTES.md v15). Every segment is given the rows of
// the longest, so one channel step serves all (a tile's rows may come from different images).
void fill_strips(const BlockedProblem& p, const Activations& in, int64_t g, int64_t row0, int64_t rows,
                 TaskState& st) {
  const int64_t strip_width = p.strip_width(), span_h = p.input_rows(1);
  const bool share = p.stride_h < span_h;
  std::vector<int64_t>& segment_first = st.segment_first;
  segment_first.clear();
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t n = (row0 + j) / p.out_h, oh = (row0 + j) % p.out_h;
    st.image[j] = n;
    st.plane_row[j] = p.out_origin_h + oh * p.out_step_h;
    st.r_begin[j] = p.taps_h;
    st.r_end[j] = 0;
    for (int64_t r = 0; r < p.taps_h; ++r) {
      const int64_t ih = oh * p.stride_h + r * p.dil_h + p.offset_h;
      if (ih >= 0 && ih < p.in_h) {
        st.r_begin[j] = std::min(st.r_begin[j], r);
        st.r_end[j] = r + 1;
      }
    }
    if (j == 0 || !share || n != st.image[j - 1]) segment_first.push_back(j);
  }
  const int64_t segments = static_cast<int64_t>(segment_first.size());
  segment_first.push_back(rows);
  int64_t segment_rows = 0;  // input rows of the longest segment
  for (int64_t i = 0; i < segments; ++i)
    segment_rows = std::max(segment_rows, p.input_rows(segment_first[i + 1] - segment_first[i]));
  st.channel_step = segment_rows * strip_width;
  const int64_t segment_floats = p.packs() * st.channel_step;
  if (static_cast<int64_t>(st.strips.size()) < segments * segment_floats) st.strips.resize(segments * segment_floats);
  for (int64_t i = 0; i < segments; ++i) {
    const int64_t first = segment_first[i], oh_first = (row0 + first) % p.out_h;
    float* segment = st.strips.data() + i * segment_floats;
    for (int64_t j = first; j < segment_first[i + 1]; ++j)
      st.row_offset[j] = i * segment_floats + ((row0 + j) % p.out_h - oh_first) * p.stride_h * strip_width;
    read_padded_rows(in, st.image[first], g * p.in_per_group, p.in_per_group, p.channel_pack == 2,
                     oh_first * p.stride_h + p.offset_h, p.input_rows(segment_first[i + 1] - first), p.offset_w,
                     strip_width, segment, st.channel_step);
  }
}

// One channel block's tiles over the task's strips, each tile's [pixel][block] result written into
// the output of the block's channels, row by row.
void run_block(const BlockedProblem& p, int64_t g, int64_t b, const float* packed, const float* init,
               const Activations& out, TaskState& st) {
  const int64_t strip_width = p.strip_width();
  const int64_t channels = p.block_channels(b);
  const int64_t first_channel = g * p.out_per_group + b * p.block;
  const float* block_weights = packed + (g * p.blocks() + b) * p.block_weight_floats();
  const bool direct_out = out.dtype == at::kFloat && out.channels_last && channels == p.block;
  // What every tile shares; each sets its rows, kernel rows and outputs.
  Tile t{{}, st.channel_step, p.dil_h * strip_width, 0, p.taps_w, p.dil_w, p.stride_w, p.packs(), nullptr,
         p.taps_h * p.taps_w * p.block, init + (g * p.blocks() + b) * p.block, st.tile_acc.data(), {},
         out.channels * p.out_step_w};
  for (const TilePlace& place : st.tiles) {
    int64_t rb = st.r_begin[place.row[0]], re = st.r_end[place.row[0]];
    for (int i = 1; i < place.rows; ++i) {
      rb = std::min(rb, st.r_begin[place.row[i]]), re = std::max(re, st.r_end[place.row[i]]);
    }
    const int64_t first = rb * p.dil_h * strip_width + place.col * p.stride_w;
    t.kernel_rows = std::max<int64_t>(0, re - rb);
    t.weights = block_weights + rb * p.taps_w * p.block;
    for (int i = 0; i < place.rows; ++i) t.x[i] = st.strips.data() + st.row_offset[place.row[i]] + first;
    const auto first_pixel = [&](int i) {
      return st.plane_row[place.row[i]] * p.plane_w() + p.out_origin_w + place.col * p.out_step_w;
    };
    if (direct_out) {
      for (int i = 0; i < place.rows; ++i)
        t.out[i] = static_cast<float*>(out.data) + out.offset(st.image[place.row[i]], first_channel, first_pixel(i));
    }
    tile_for(p, place.rows, place.width)(t);
    if (direct_out) continue;
    for (int i = 0; i < place.rows; ++i) {
      write_pixel_major(out, st.image[place.row[i]], first_channel, channels, first_pixel(i), p.out_step_w,
                        place.width, st.tile_acc.data() + i * place.width * p.block, p.block);
    }
  }
}

// Packed weights [group][block][c][r][s][block] (float32) as bfloat16 pairs of channels
// [group][block][c / 2][r][s][block], channel 2q in the low half and a zero past the group's
// channels. The weights of a bfloat16 op are bfloat16 values, so the rounding is exact.
void pair_channels(const BlockedProblem& p, const float* single, uint32_t* pairs) {
  const int64_t taps = p.taps_h * p.taps_w * p.block;  // values per input channel of a block
  for (int64_t gb = 0; gb < p.groups * p.blocks(); ++gb) {
    const float* src = single + gb * p.in_per_group * taps;
    uint32_t* dst = pairs + gb * p.packs() * taps;
    for (int64_t q = 0; q < p.packs(); ++q) {
      const float* first = src + 2 * q * taps;
      const bool has_second = 2 * q + 1 < p.in_per_group;
      for (int64_t i = 0; i < taps; ++i)
        dst[q * taps + i] = blocked::bf16_pair(first[i], has_second ? first[taps + i] : 0.0f);
    }
  }
}

}  // namespace

// By 16 x 16 transposes in registers, one task per (group, block): a scalar packer writing one
// channel's taps at a time, 128 bytes apart, missed the cache on every write once a block's
// weights outgrew L2 (benchmarks/NOTES.md).
void pack_blocked_weight(const BlockedProblem& p, const float* w, const WeightTaps& taps, float* packed) {
  if (p.channel_pack == 2) {  // packed channel by channel, then paired
    BlockedProblem by_channel = p;
    by_channel.channel_pack = 1;
    std::vector<float> single(by_channel.packed_weight_floats());
    pack_blocked_weight(by_channel, w, taps, single.data());
    pair_channels(p, single.data(), reinterpret_cast<uint32_t*>(packed));
    return;
  }
  const int64_t blocks = p.blocks();
  const int64_t block_floats = p.block_weight_floats();
  const int64_t kernel_taps = taps.kernel_h * taps.kernel_w;
  at::parallel_for(0, p.groups * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tap_major(kernel_taps * p.block);  // [kernel tap][block]
    for (int64_t gb = begin; gb < end; ++gb) {
      const int64_t g = gb / blocks, b = gb % blocks;
      const int64_t channels = p.block_channels(b);
      float* dst = packed + gb * block_floats;
      if (!taps.transposed) {  // forward: every tap in order, so the block's rows of w transposed whole
        if (channels < p.block) std::fill(dst, dst + block_floats, 0.0f);
        const int64_t row = p.in_per_group * kernel_taps;  // [c][r][s] of one output channel
        blocked::transpose(w + (g * p.out_per_group + b * p.block) * row, row, channels, row, dst,
                           p.block);
        continue;
      }
      // Input gradient: per weight output channel c (the problem's input channel), the block's 32
      // weight input channels as [kernel tap][block] (lanes past the group's channels zero), then the
      // phase's taps in the problem's order.
      if (channels < p.block) std::fill(tap_major.begin(), tap_major.end(), 0.0f);
      for (int64_t c = 0; c < p.in_per_group; ++c) {
        blocked::transpose(w + ((g * p.in_per_group + c) * p.out_per_group + b * p.block) * kernel_taps,
                           kernel_taps, channels, kernel_taps, tap_major.data(), p.block);
        for (int64_t t = 0; t < p.taps_h; ++t)
          for (int64_t u = 0; u < p.taps_w; ++u, dst += p.block)
            std::copy_n(tap_major.data() +
                            ((taps.first_h + t * taps.step_h) * taps.kernel_w + taps.first_w + u * taps.step_w) *
                                p.block,
                        p.block, dst);
      }
    }
  });
}

// A task runs every channel block over all its rows, so a block's packed weights are read from
// memory once per task instead of once per row: on small maps with many channels the weights
// dominate the traffic.
void blocked_correlation(const BlockedRun& run, const Activations& in, const float* packed, const float* init,
                         const Activations& out) {
  const BlockedProblem& p = run.problem;
  const TaskRows& tasks = run.tasks;
  // Initial values per (group, padded channel): the bias, zero past the group's channels.
  std::vector<float> init_padded(p.groups * p.blocks() * p.block, 0.0f);
  if (init != nullptr) {
    for (int64_t g = 0; g < p.groups; ++g)
      std::copy(init + g * p.out_per_group, init + (g + 1) * p.out_per_group,
                init_padded.begin() + g * p.blocks() * p.block);
  }
  const int64_t task_rows = tasks.max_rows();
  // Work items: (task, part of its channel blocks); a thread's consecutive items of one task share its strips.
  const int64_t parts = tasks.block_parts, blocks_per_part = (p.blocks() + parts - 1) / parts;
  at::parallel_for(0, p.groups * tasks.group_tasks * parts, 1, [&](int64_t begin, int64_t end) {
    TaskState st;
    st.r_begin.resize(task_rows), st.r_end.resize(task_rows), st.row_offset.resize(task_rows);
    st.image.resize(task_rows), st.plane_row.resize(task_rows);
    st.tile_acc.resize(p.max_pixels() * p.block);
    int64_t filled = -1;  // the task whose strips st holds
    for (int64_t item = begin; item < end; ++item) {
      const int64_t task = item / parts, part = item % parts;
      const int64_t g = task / tasks.group_tasks, row0 = tasks.begin(task % tasks.group_tasks);
      if (task != filled) {
        const int64_t rows = tasks.end(task % tasks.group_tasks) - row0;
        fill_strips(p, in, g, row0, rows, st);
        plan_tiles(p, rows, st.r_begin.data(), st.r_end.data(), st.tiles);
        filled = task;
      }
      const int64_t b_end = std::min(p.blocks(), (part + 1) * blocks_per_part);
      for (int64_t b = part * blocks_per_part; b < b_end; ++b) run_block(p, g, b, packed, init_padded.data(), out, st);
    }
  });
}


#else  // not x86-64 with GCC/Clang: never called (blocked_kernel_available is false)

void pack_blocked_weight(const BlockedProblem&, const float*, const WeightTaps&, float*) {}
void blocked_correlation(const BlockedRun&, const Activations&, const float*, const float*, const Activations&) {}

#endif

}  // namespace channelconv
