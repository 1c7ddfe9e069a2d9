// The weight gradient vectorised along output rows, for layers with few output channels per group
// (a Fashion-MNIST network's first layer: 1 -> 6 channels), where a blocked tile, vectorised over
// output channels, would leave most of its 16 lanes empty:
//   dW[k, c, r, s] = sum over (n, oh, ow) of dy[n, k, oh, ow] * x[n, c, ih(oh, r), ow + s*dil_w - pad_w]
// (at stride st along the row, x[..., ow*st + s*dil_w - pad_w]). A tile holds `KB` output channels x S
// taps of one kernel row in KB*S registers of 16 pixel lanes; per 16 output pixels it loads S input
// vectors (the row shifted by each tap) and KB dy vectors for KB*S FMAs, holding the fewer of them.
// At stride st each input row is copied as its st phases (columns j, j + st, ...) one after the
// other, so that every tap reads 16 consecutive floats of one phase. It also takes kernel rows wider
// than the blocked weight-gradient tile's 7 taps, at any channel count (an AlexNet's 11x11).
// Each unit (group, input channel, blocks of output channels) owns its slice of dW and sums each
// block's images, rows and lanes in a fixed order: the result does not depend on the thread count,
// which only decides how many blocks a unit runs on one copy of its input plane. NCHW operands of
// any engine dtype are read per unit and image into float32 rows (the input plane it copies anyway,
// and the block's dy), never widened whole.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "blocked.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace channelconv {

#if defined(__x86_64__) && defined(__GNUC__)

namespace {

struct RowTile {
  const float* dy;     // dy[n, k0, 0, 0]; channel k0 + k at k * dy_channel
  int64_t dy_channel;
  const float* x;      // (n, c)'s input rows that some tap reads, zero-padded (column j: iw = j - pad_w), in phases
  int64_t x_row;       // floats per row
  const int64_t* row_slot;  // input row ih is row row_slot[ih] of x (-1: no tap reads it)
  std::array<int64_t, kMaxRowTaps> tap_offset;  // where tap s's 16 pixels start in a row
  const ConvShape* s;
  float* lanes;        // [KB][R][S][16] partial sums
};

template <int KB, int S>
__attribute__((target("avx512f,fma"))) void row_tile(const RowTile& t) {
  const ConvShape& s = *t.s;
  const int64_t R = s.kernel_h, vectors = row_lanes(s.out_w) / kRowLanes;
  const __mmask16 tail = static_cast<__mmask16>((1u << (s.out_w - (vectors - 1) * kRowLanes)) - 1u);
  for (int64_t r = 0; r < R; ++r) {
    __m512 acc[KB][S];
    for (int k = 0; k < KB; ++k)
      for (int tap = 0; tap < S; ++tap) acc[k][tap] = _mm512_loadu_ps(t.lanes + ((k * R + r) * S + tap) * kRowLanes);
    for (int64_t oh = 0; oh < s.out_h; ++oh) {
      const int64_t ih = oh * s.stride[0] + r * s.dilation[0] - s.padding[0];
      if (ih < 0 || ih >= s.in_h) continue;  // a padding row: no terms
      const float* x_row = t.x + t.row_slot[ih] * t.x_row;
      const float* dy_row = t.dy + oh * s.out_w;
      for (int64_t v = 0; v < vectors; ++v) {
        const __mmask16 mask = v + 1 < vectors ? __mmask16(0xFFFF) : tail;  // (masked lanes load zeros)
        // The fewer of the S input vectors and the KB dy vectors are held; the others stream.
        if constexpr (S <= KB) {
          __m512 xv[S];
          for (int tap = 0; tap < S; ++tap)
            xv[tap] = _mm512_maskz_loadu_ps(mask, x_row + t.tap_offset[tap] + v * kRowLanes);
          for (int k = 0; k < KB; ++k) {
            const __m512 dv = _mm512_maskz_loadu_ps(mask, dy_row + k * t.dy_channel + v * kRowLanes);
            for (int tap = 0; tap < S; ++tap) acc[k][tap] = _mm512_fmadd_ps(dv, xv[tap], acc[k][tap]);
          }
        } else {
          __m512 dv[KB];
          for (int k = 0; k < KB; ++k) dv[k] = _mm512_maskz_loadu_ps(mask, dy_row + k * t.dy_channel + v * kRowLanes);
          for (int tap = 0; tap < S; ++tap) {
            const __m512 xv = _mm512_maskz_loadu_ps(mask, x_row + t.tap_offset[tap] + v * kRowLanes);
            for (int k = 0; k < KB; ++k) acc[k][tap] = _mm512_fmadd_ps(dv[k], xv, acc[k][tap]);
          }
        }
      }
    }
    for (int k = 0; k < KB; ++k)
      for (int tap = 0; tap < S; ++tap) _mm512_storeu_ps(t.lanes + ((k * R + r) * S + tap) * kRowLanes, acc[k][tap]);
  }
}

using RowTileFn = void (*)(const RowTile&);

// kRowTiles[S - 1][KB - 1]; null where the tile would not fit the registers (plan.h).
struct RowTiles {
  template <int S, int... KB>
  static constexpr std::array<RowTileFn, kMaxRowBlock> row(std::integer_sequence<int, KB...>) {
    return {(row_tile_fits(KB + 1, S) ? &row_tile<(row_tile_fits(KB + 1, S) ? KB + 1 : 1), S> : nullptr)...};
  }
  template <int... S>
  static constexpr std::array<std::array<RowTileFn, kMaxRowBlock>, sizeof...(S)> make(
      std::integer_sequence<int, S...>) {
    return {row<S + 1>(std::make_integer_sequence<int, kMaxRowBlock>{})...};
  }
};
constexpr auto kRowTiles = RowTiles::make(std::make_integer_sequence<int, kMaxRowTaps>{});

// Column j of the zero-padded row i of x[n, channel] (x[n, channel, i, j - pad_w], zero in the
// padding) at plane[row_slot[i] * row + (j % st) * phase + j / st]: the row's st phases one after
// the other. `row_buffer`: in_w floats, for a strided row before it is split into phases.
void pad_plane(const ConvShape& s, const Activations& x, int64_t n, int64_t channel, int64_t phase,
               const std::vector<int64_t>& row_slot, float* plane, float* row_buffer) {
  const int64_t st = s.stride[1], pad = s.padding[1], row = st * phase;
  for (int64_t i = 0; i < s.in_h; ++i) {
    if (row_slot[i] < 0) continue;
    float* dst = plane + row_slot[i] * row;
    if (st == 1) {
      std::fill(dst, dst + pad, 0.0f);
      read_channel_major(x, n, channel, 1, i * s.in_w, s.in_w, dst + pad, 0);
      std::fill(dst + pad + s.in_w, dst + row, 0.0f);
      continue;
    }
    read_channel_major(x, n, channel, 1, i * s.in_w, s.in_w, row_buffer, 0);
    for (int64_t p = 0; p < st; ++p)
      for (int64_t q = 0; q < phase; ++q) {
        const int64_t iw = q * st + p - pad;
        dst[p * phase + q] = iw >= 0 && iw < s.in_w ? row_buffer[iw] : 0.0f;
      }
  }
}

}  // namespace

void row_weight_grad(const ConvShape& s, int64_t block, int64_t unit_blocks, const Activations& dy,
                     const Activations& x, float* dw) {
  const int64_t C = s.in_per_group(), K = s.out_per_group(), R = s.kernel_h, S = s.kernel_w;
  const int64_t blocks = (K + block - 1) / block, splits = (blocks + unit_blocks - 1) / unit_blocks;
  const int64_t units = s.groups * C * splits;
  const int64_t st = s.stride[1], row = row_copy_width(s), phase = row / st;
  const int64_t out_area = s.out_h * s.out_w, block_lanes = block * R * S * kRowLanes;
  std::array<int64_t, kMaxRowTaps> tap_offset{};
  for (int64_t tap = 0; tap < S; ++tap) {
    const int64_t j = tap * s.dilation[1];  // the padded column of output pixel 0
    tap_offset[tap] = (j % st) * phase + j / st;
  }
  TORCH_INTERNAL_ASSERT(!dy.channels_last && !x.channels_last, "the row engine reads NCHW (direct.cpp)");
  // A float32 dy is read where it lies; a half-precision one widened per block and image (few channels).
  const bool dy_as_is = dy.dtype == at::kFloat;
  int64_t rows_read = 0;
  const std::vector<int64_t> row_slot = row_copy_slots(s, rows_read);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> plane(rows_read * row), lanes(unit_blocks * block_lanes), row_buffer(s.in_w);
    std::vector<float> dy_block(dy_as_is ? 0 : block * out_area);
    for (int64_t unit = begin; unit < end; ++unit) {
      // The unit's blocks [b0, b_end) of output channels of group g, input channel c.
      const int64_t split = unit % splits, c = (unit / splits) % C, g = unit / (splits * C);
      const int64_t b0 = split * unit_blocks, b_end = std::min(blocks, b0 + unit_blocks);
      std::fill(lanes.begin(), lanes.end(), 0.0f);
      for (int64_t n = 0; n < s.batch; ++n) {
        pad_plane(s, x, n, g * C + c, phase, row_slot, plane.data(), row_buffer.data());
        for (int64_t b = b0; b < b_end; ++b) {
          const int64_t k0 = b * block, channels = std::min(block, K - k0);
          const float* dy_rows = static_cast<const float*>(dy.data) + dy.offset(n, g * K + k0, 0);
          if (!dy_as_is) {
            read_channel_major(dy, n, g * K + k0, channels, 0, out_area, dy_block.data(), out_area);
            dy_rows = dy_block.data();
          }
          float* block_sums = lanes.data() + (b - b0) * block_lanes;
          kRowTiles[S - 1][channels - 1]({dy_rows, out_area, plane.data(), row, row_slot.data(), tap_offset, &s,
                                         block_sums});
        }
      }
      for (int64_t b = b0; b < b_end; ++b) {
        const int64_t k0 = b * block, channels = std::min(block, K - k0);
        for (int64_t k = 0; k < channels; ++k)
          for (int64_t tap = 0; tap < R * S; ++tap) {
            const float* l = lanes.data() + (b - b0) * block_lanes + (k * R * S + tap) * kRowLanes;
            float sum = 0.0f;
            for (int j = 0; j < kRowLanes; ++j) sum += l[j];
            dw[((g * K + k0 + k) * C + c) * R * S + tap] = sum;
          }
      }
    }
  });
}

#else  // not x86-64 with GCC/Clang: never called (blocked_kernel_available is false)

void row_weight_grad(const ConvShape&, int64_t, int64_t, const Activations&, const Activations&, float*) {}

#endif

}  // namespace channelconv
