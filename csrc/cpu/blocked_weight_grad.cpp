// The register-blocked weight-gradient engine (blocked.h), blocked like a GEMM whose reduction
// runs over output pixels:
//   dW[k, c, r, s] = sum over (n, oh, ow) of dy[n, k, oh, ow] * x[n, c, ih(oh, r), iw(ow, s)].
// The pixels go by in the plan's chunks (a band of output rows of one image, or several whole
// images). Per chunk, the input rows the chunk reads are copied channel-last and zero-padded (each
// tile's G channels in one stream: [row][column][G]), and each block of 32 dy channels is
// transposed to [pixel][32]. A tile holds 32 output channels x G input channels x S taps of one
// kernel row in 2*G*S registers; per pixel it loads two dy vectors and broadcasts G*S input values:
// 2 + G*S loads feed 2*G*S FMAs (G*S up to 12, so at most 14 loads per 24 FMAs: bound by the FMA
// ports). (With at most 16 output channels per group, narrow tiles of 16: one vector of dy, G * S up
// to 24.) The tile adds into a [c][r][s][32] copy of dW, so each weight element is summed over the
// chunks in order, the pixels within a chunk in order, whatever the tiling or the thread count:
// the result is deterministic.
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

struct GradTile {
  // Pack 2 (bfloat16 pairs, plan.h channel_pack): dy holds pairs of a row's consecutive pixels,
  // [image][row][pixel / 2][block], and x pairs of columns stride_w apart, with the layout and
  // steps of the float rows; a row's odd last pixel runs on dy_single and x_single (float32).
  const float* dy;     // [image][pixel][block]: the chunk's output pixels, row after row,
  int64_t dy_step;     // dy_step floats apart (block, or a channels_last float32 dy's channels)
  const float* x;      // channel-last rows at (image 0, kernel row r's first input row, column 0, first channel)
  int64_t images, image_step;  // the chunk's images, image_step floats apart in x
  int64_t rows, out_w;         // output rows and columns per image
  int64_t row_step;    // floats from one output row's input row to the next
  int64_t pixel_step;  // floats from one output pixel's input column to the next
  int64_t tap_step;    // floats from tap s to tap s + 1
  float* dw;           // [g][..][s][block] at dw_channel_step per input channel
  int64_t dw_channel_step;
  const float* dy_single = nullptr;  // Pack 2: the float32 dy ([image][pixel][block]) and x
  const float* x_single = nullptr;
};

// One pixel's multiply-adds: acc[v][g][s] += dy's vectors times x at s * tap_step + g (float32),
// or, for Pack 2, the pair's dot products (dot_pairs).
template <int S, int G, int V, int Pack>
inline __attribute__((always_inline)) void grad_pixel(v16 (&acc)[V][G][S], const float* d, const float* x,
                                                      int64_t tap_step) {
  v16 dv[V];
#pragma GCC unroll 2
  for (int v = 0; v < V; ++v) dv[v] = *reinterpret_cast<const v16*>(d + 16 * v);
#pragma GCC unroll 24
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 24
    for (int g = 0; g < G; ++g) {
      if constexpr (Pack == 2) {
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) blocked::dot_pairs(acc[v][g][s], dv[v], x + s * tap_step + g);
      } else {
        const float xv = x[s * tap_step + g];
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) acc[v][g][s] += dv[v] * xv;
      }
    }
}

// V: vectors of 16 output channels (2: the 32-channel tile; 1: a narrow one, for at most 16).
// Pack: output pixels per step (GradTile).
template <int S, int G, int V, int Pack>
__attribute__((target("avx512f,fma"))) void grad_tile_kernel(const GradTile& t) {
  constexpr int block = 16 * V;
  v16 acc[V][G][S];
#pragma GCC unroll 24
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 24
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v)
        acc[v][g][s] = *reinterpret_cast<const v16*>(t.dw + g * t.dw_channel_step + s * block + 16 * v);
  const float* d = t.dy;
  const int64_t steps = t.out_w / Pack;  // whole pairs for Pack 2
  for (int64_t m = 0; m < t.images; ++m) {
    for (int64_t j = 0; j < t.rows; ++j) {
      const int64_t row = m * t.image_step + j * t.row_step;
      const float* x = t.x + row;
      for (int64_t i = 0; i < steps; ++i, x += Pack * t.pixel_step, d += t.dy_step)
        grad_pixel<S, G, V, Pack>(acc, d, x, t.tap_step);
      if constexpr (Pack == 2) {
        if (t.out_w % 2 == 1)  // the row's last pixel alone, in float32
          grad_pixel<S, G, V, 1>(acc, t.dy_single + ((m * t.rows + j + 1) * t.out_w - 1) * block,
                                 t.x_single + row + (t.out_w - 1) * t.pixel_step, t.tap_step);
      }
    }
  }
#pragma GCC unroll 24
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 24
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v)
        *reinterpret_cast<v16*>(t.dw + g * t.dw_channel_step + s * block + 16 * v) = acc[v][g][s];
}

using GradTileFn = void (*)(const GradTile&);

// GradTiles<V, Pack>::table[S - 1][G - 1]: S taps, G input channels, G * S <= Values (the
// accumulators of 24 registers: 12 values of two vectors, 24 of one); null past that.
template <int V, int Pack, int Values = kGradTileValues * 2 / V>
struct GradTiles {
  template <int S, int... G>
  static constexpr std::array<GradTileFn, Values> row(std::integer_sequence<int, G...>) {
    return {(S * (G + 1) <= Values ? &grad_tile_kernel<S, (S * (G + 1) <= Values ? G + 1 : 1), V, Pack>
                                   : nullptr)...};
  }
  template <int... S>
  static constexpr std::array<std::array<GradTileFn, Values>, sizeof...(S)> make(std::integer_sequence<int, S...>) {
    return {row<S + 1>(std::make_integer_sequence<int, Values>{})...};
  }
  static constexpr auto table = make(std::make_integer_sequence<int, kMaxGradTaps>{});
};

GradTileFn grad_tile_for(const BlockedProblem& p, int64_t taps, int64_t channels) {
  const bool wide = p.block == kBlockedChannels;
  if (p.channel_pack == 2)
    return wide ? GradTiles<2, 2>::table[taps - 1][channels - 1] : GradTiles<1, 2>::table[taps - 1][channels - 1];
  return wide ? GradTiles<2, 1>::table[taps - 1][channels - 1] : GradTiles<1, 1>::table[taps - 1][channels - 1];
}

// The unit's place: group g, input channels [c0, c0 + channels) (its part), channel block b.
struct Unit {
  int64_t g, b, c0, channels;
};
Unit unit_at(const BlockedProblem& p, const GradChunks& k, int64_t unit) {
  const int64_t blocks = p.blocks();
  const int64_t b = unit % blocks, part = (unit / blocks) % k.parts, g = unit / (blocks * k.parts);
  const int64_t c0 = part * k.part_channels;
  return {g, b, c0, std::min(k.part_channels, p.in_per_group - c0)};
}

// One chunk: images [n0, n0 + images), output rows [oh0, oh0 + rows) of each.
struct Chunk {
  int64_t n0, images, oh0, rows, in_rows, ih0;
};

// Per tile's channels [c, c + tile_g), image m:
//   rows_t[c * images * in_rows * cols + ((m * in_rows + i) * cols + col) * tile_g + c'] =
//   x[n0 + m, c0 + c + c', ih0 + i, col + offset_w], zero outside the plane,
// so that a tile reads one contiguous stream.
void pack_input_rows(const BlockedProblem& p, const GradChunks& k, const Chunk& ch, const Unit& u,
                     const Activations& x, float* rows_t) {
  const int64_t col_begin = std::clamp<int64_t>(-p.offset_w, 0, k.cols);
  const int64_t col_end = std::clamp(p.in_w - p.offset_w, col_begin, k.cols);
  for (int64_t c = 0; c < u.channels; c += k.tile_channels) {
    const int64_t tile_g = std::min<int64_t>(k.tile_channels, u.channels - c);
    float* tile_rows = rows_t + c * ch.images * ch.in_rows * k.cols;
    for (int64_t m = 0; m < ch.images; ++m) {
      for (int64_t i = 0; i < ch.in_rows; ++i) {
        float* row = tile_rows + (m * ch.in_rows + i) * k.cols * tile_g;
        const int64_t ih = ch.ih0 + i;
        if (ih < 0 || ih >= p.in_h || col_begin == col_end) {
          std::fill(row, row + k.cols * tile_g, 0.0f);
          continue;
        }
        // zero the padding columns alone: a fill of the whole buffer first was a pass over it
        std::fill(row, row + col_begin * tile_g, 0.0f);
        std::fill(row + col_end * tile_g, row + k.cols * tile_g, 0.0f);
        read_pixel_major(x, ch.n0 + m, u.g * p.in_per_group + u.c0 + c, tile_g, ih * p.in_w + p.offset_w + col_begin,
                         col_end - col_begin, row + col_begin * tile_g, tile_g);
      }
    }
  }
}

// dy_t[m][pixel][j] = dy[n0 + m, block channel j, pixel of the band], zero past the group's channels.
void pack_output_grad(const BlockedProblem& p, const Chunk& ch, const Unit& u, const Activations& dy, float* dy_t) {
  const int64_t band_pixels = ch.rows * p.out_w;
  const int64_t block_channels = p.block_channels(u.b);
  if (block_channels < p.block) std::fill(dy_t, dy_t + ch.images * band_pixels * p.block, 0.0f);
  for (int64_t m = 0; m < ch.images; ++m)
    read_pixel_major(dy, ch.n0 + m, u.g * p.out_per_group + u.b * p.block, block_channels, ch.oh0 * p.out_w,
                     band_pixels, dy_t + m * band_pixels * p.block, p.block);
}

// Pack 2: word (col, c) of each packed input row holds columns col and col + stride_w (zero past
// the row), so that a pixel pair's taps read one word each, at the float rows' offsets.
void pair_input_columns(const BlockedProblem& p, const GradChunks& k, const Chunk& ch, const Unit& u,
                        const float* rows_t, uint32_t* pairs) {
  for (int64_t c = 0; c < u.channels; c += k.tile_channels) {
    const int64_t tile_g = std::min<int64_t>(k.tile_channels, u.channels - c);
    const int64_t base = c * ch.images * ch.in_rows * k.cols;
    for (int64_t row = 0; row < ch.images * ch.in_rows; ++row) {
      const float* src = rows_t + base + row * k.cols * tile_g;
      uint32_t* dst = pairs + base + row * k.cols * tile_g;
      for (int64_t col = 0; col < k.cols; ++col)
        for (int64_t g = 0; g < tile_g; ++g)
          dst[col * tile_g + g] = blocked::bf16_pair(
              src[col * tile_g + g], col + p.stride_w < k.cols ? src[(col + p.stride_w) * tile_g + g] : 0.0f);
    }
  }
}

// Pack 2: dy_pairs[m][j][q][channel] holds pixels 2q and 2q + 1 of row j (a row's odd last pixel
// stays in dy_t).
void pair_output_pixels(const BlockedProblem& p, const Chunk& ch, const float* dy_t, uint32_t* pairs) {
  const int64_t half = p.out_w / 2;
  for (int64_t row = 0; row < ch.images * ch.rows; ++row)
    for (int64_t q = 0; q < half; ++q) {
      const float* first = dy_t + (row * p.out_w + 2 * q) * p.block;
      for (int64_t j = 0; j < p.block; ++j)
        pairs[(row * half + q) * p.block + j] = blocked::bf16_pair(first[j], first[p.block + j]);
    }
}

// The unit's tiles over the chunk, added into its part of the [c][r][s][32] copy of dW; the block's
// dy pixel-major, dy_step floats apart. Pack 2: dy_pairs and x_pairs as the tiles read them (the
// float32 dy_t and rows_t for odd last pixels).
void run_unit_tiles(const BlockedProblem& p, const GradChunks& k, const Chunk& ch, const Unit& u, const float* dy_t,
                    int64_t dy_step, const float* rows_t, const uint32_t* dy_pairs, const uint32_t* x_pairs,
                    float* dw_unit) {
  const int64_t R = p.taps_h, S = p.taps_w;
  const bool pairs = p.channel_pack == 2;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < u.channels; c += k.tile_channels) {
      const int64_t tile_g = std::min<int64_t>(k.tile_channels, u.channels - c);
      const int64_t x_offset = c * ch.images * ch.in_rows * k.cols + r * p.dil_h * k.cols * tile_g;
      GradTile t{dy_t, dy_step, rows_t + x_offset,
                 ch.images, ch.in_rows * k.cols * tile_g, ch.rows, p.out_w,
                 p.stride_h * k.cols * tile_g, p.stride_w * tile_g, p.dil_w * tile_g,
                 dw_unit + ((u.c0 + c) * R + r) * S * p.block, R * S * p.block};
      if (pairs) {
        t.dy = reinterpret_cast<const float*>(dy_pairs);
        t.dy_step = p.block;
        t.x = reinterpret_cast<const float*>(x_pairs + x_offset);
        t.dy_single = dy_t;
        t.x_single = rows_t + x_offset;
      }
      grad_tile_for(p, S, tile_g)(t);
    }
  }
}

// A float32 channels_last dy of at most this many channels is read where it lies: its pixels'
// channels lie together already (a copy of it was a third of a one-channel stem's gradient). With
// more, a block's pixels lie far apart, and the copy, which packs them, is faster (NOTES v18).
constexpr int64_t kInPlaceChannels = 64;

// One work item: units [begin, end) over chunks [chunk_begin, chunk_end) (a slice); it packs the
// input rows of its parts only, once per (group, part) and chunk.
void run_units(const BlockedProblem& p, const GradChunks& k, int64_t begin, int64_t end, int64_t chunk_begin,
               int64_t chunk_end, const Activations& dy, const Activations& x, float* dw_t) {
  // (Left uninitialised: every element is written before it is read.)
  const int64_t rows_floats = k.images * p.input_rows(k.rows) * k.cols * k.part_channels;
  const int64_t dy_floats = k.images * k.rows * p.out_w * p.block;
  const bool pairs = p.channel_pack == 2;  // (the pairs are sized like the float buffers)
  // (in place for blocks of whole width only)
  const bool dy_in_place = !pairs && dy.dtype == at::kFloat && dy.channels_last && dy.channels <= kInPlaceChannels;
  float* const rows_t = thread_buffer(Scratch::GradRows, rows_floats);
  float* const dy_t = thread_buffer(Scratch::GradOutput, dy_floats);
  float* const x_pairs = pairs ? thread_buffer(Scratch::GradRowPairs, rows_floats) : nullptr;
  float* const dy_pairs = pairs ? thread_buffer(Scratch::GradOutputPairs, dy_floats) : nullptr;
  const int64_t dw_block = p.in_per_group * p.taps_h * p.taps_w * p.block;
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t n0 = chunk / k.bands * k.images, band = chunk % k.bands;
    Chunk ch{n0, std::min(k.images, p.batch - n0), band * k.rows, std::min(k.rows, p.out_h - band * k.rows), 0, 0};
    ch.in_rows = p.input_rows(ch.rows);
    ch.ih0 = ch.oh0 * p.stride_h + p.offset_h;
    int64_t packed = -1;  // the (group, part) whose input rows rows_t holds
    for (int64_t unit = begin; unit < end; ++unit) {
      const Unit u = unit_at(p, k, unit);
      if (u.channels <= 0) continue;
      if (packed != unit / p.blocks()) {
        pack_input_rows(p, k, ch, u, x, rows_t);
        if (pairs) pair_input_columns(p, k, ch, u, rows_t, reinterpret_cast<uint32_t*>(x_pairs));
        packed = unit / p.blocks();
      }
      float* dw_unit = dw_t + (u.g * p.blocks() + u.b) * dw_block;
      if (dy_in_place && p.block_channels(u.b) == p.block) {
        const float* d = static_cast<const float*>(dy.data) +
                         dy.offset(ch.n0, u.g * p.out_per_group + u.b * p.block, ch.oh0 * p.out_w);
        run_unit_tiles(p, k, ch, u, d, dy.channels, rows_t, nullptr, nullptr, dw_unit);
        continue;
      }
      pack_output_grad(p, ch, u, dy, dy_t);
      if (pairs) pair_output_pixels(p, ch, dy_t, reinterpret_cast<uint32_t*>(dy_pairs));
      run_unit_tiles(p, k, ch, u, dy_t, p.block, rows_t, reinterpret_cast<uint32_t*>(dy_pairs),
                     reinterpret_cast<uint32_t*>(x_pairs), dw_unit);
    }
  }
}

}  // namespace

void blocked_weight_grad(const BlockedProblem& p, const GradChunks& k, const Activations& dy, const Activations& x,
                         float* dw) {
  const int64_t C = p.in_per_group, R = p.taps_h, S = p.taps_w;
  if (p.out_h == 0 || p.out_w == 0) {  // no output pixels: a zero gradient
    std::fill(dw, dw + p.groups * p.out_per_group * C * R * S, 0.0f);
    return;
  }
  // dW in the tiles' order, [group][block][c][r][s][32], summed over each slice's chunks: one copy
  // per slice.
  const int64_t dw_block = C * R * S * p.block, dw_floats = p.groups * p.blocks() * dw_block;
  float* const dw_t = thread_buffer(Scratch::GradSums, k.slices * dw_floats);
  std::fill(dw_t, dw_t + k.slices * dw_floats, 0.0f);
  // Items range by range, so that where the ranges are as many as the threads each thread takes one
  // range over all the slices: slice by slice, a thread took one slice of every range, and slices of
  // unequal chunks (8 images as 6 + 2) left the other idle a third of the time (NOTES v20).
  at::parallel_for(0, k.slices * k.ranges, 1, [&](int64_t item_begin, int64_t item_end) {
    for (int64_t item = item_begin; item < item_end; ++item) {
      const int64_t range = item / k.slices, slice = item % k.slices;
      const int64_t begin = range * k.units_per_range, end = std::min(k.units, begin + k.units_per_range);
      const int64_t chunk_begin = slice * k.slice_chunks, chunk_end = std::min(k.chunks, chunk_begin + k.slice_chunks);
      run_units(p, k, begin, end, chunk_begin, chunk_end, dy, x, dw_t + slice * dw_floats);
    }
  });
  // Each unit's part of dW: the slices added in order, then back to (K, C, k_h, k_w).
  at::parallel_for(0, k.units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const Unit u = unit_at(p, k, unit);
      const int64_t channels = p.block_channels(u.b);
      const int64_t taps = std::max<int64_t>(0, u.channels) * R * S;  // the unit's (c, r, s) taps from c0 on
      if (taps == 0) continue;
      float* sum = dw_t + (u.g * p.blocks() + u.b) * dw_block + u.c0 * R * S * p.block;
      for (int64_t slice = 1; slice < k.slices; ++slice) {
        const float* part = sum + slice * dw_floats;
        for (int64_t i = 0; i < taps * p.block; ++i) sum[i] += part[i];
      }
      blocked::transpose(sum, p.block, taps, channels, dw + (u.g * p.out_per_group + u.b * p.block) * C * R * S +
                                                            u.c0 * R * S, C * R * S);
    }
  });
}

#else  // not x86-64 with GCC/Clang: never called (blocked_kernel_available is false)

void blocked_weight_grad(const BlockedProblem&, const GradChunks&, const Activations&, const Activations&, float*) {}

#endif

}  // namespace channelconv
