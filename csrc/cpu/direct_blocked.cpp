// Register-blocked float32 direct correlation (see direct_blocked.h).
//
// The tile: 32 output channels (two AVX-512 registers) x up to 14 output pixels of one row,
// 28 accumulators held in registers. Each step loads two weight vectors and, per pixel,
// broadcasts one input value into two FMAs: 16 loads feed 28 FMAs, so the loop is bound by the
// FMA ports rather than by loads (PERFORMANCE.md, "a register tile of outputs"). Vectorising over
// output channels, not width, makes stride and width-7 layers cost nothing extra.
//
// Per task (image, group, output row), the input rows the tile reads are first copied into a
// zero-padded strip, so the inner loop needs no bounds tests and padding costs nothing.
// The code is compiled for AVX-512 through a target attribute and used only when the CPU has it
// (blocked_kernel_available); no -march flag is involved.
#include "direct_blocked.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

namespace channelconv {

#if defined(__x86_64__) && defined(__GNUC__)

namespace {

constexpr int kMaxPixels = 14;
typedef float v16 __attribute__((vector_size(64), aligned(4)));  // unaligned loads allowed

struct Tile {
  const float* rows;      // strip rows [c][r][width], advanced to the tile's first pixel
  int64_t strip_width;
  int64_t r_begin, r_end;  // kernel rows whose input row lies inside the plane
  int64_t taps_h, taps_w, in_per_group;
  int64_t pixel_stride, dil_w;
  const float* weights;  // [c][r][s][32] of this channel block
  const float* init;     // 32 initial values
  float* acc;            // [pixels][32] result
};

template <int P>
__attribute__((target("avx512f,fma"))) void tile_kernel(const Tile& t) {
  v16 acc0[P], acc1[P];
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
          const float xv = x[p * t.pixel_stride];
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
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return available;
}

void blocked_correlation(const BlockedProblem& p, const float* in, const float* packed, const float* init, float* out) {
  const int64_t blocks = (p.out_per_group + kBlockedChannels - 1) / kBlockedChannels;
  const int64_t strip_width = (p.out_w - 1) * p.stride_w + (p.taps_w - 1) * p.dil_w + 1;
  const int64_t in_area = p.in_h * p.in_w, out_area = p.out_h * p.out_w;
  const int64_t weights_per_block = p.in_per_group * p.taps_h * p.taps_w * kBlockedChannels;

  // Initial values per (group, padded channel): the bias, zero past the group's channels.
  std::vector<float> init_padded(p.groups * blocks * kBlockedChannels, 0.0f);
  if (init != nullptr) {
    for (int64_t g = 0; g < p.groups; ++g)
      std::copy(init + g * p.out_per_group, init + (g + 1) * p.out_per_group,
                init_padded.begin() + g * blocks * kBlockedChannels);
  }

  at::parallel_for(0, p.batch * p.groups * p.out_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> strip(p.in_per_group * p.taps_h * strip_width);
    std::vector<float> row_acc(p.out_w * kBlockedChannels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t oh = task % p.out_h, g = (task / p.out_h) % p.groups, n = task / (p.out_h * p.groups);
      // Kernel rows r whose input row ih = oh*stride + r*dil + offset lies in [0, in_h).
      int64_t r_begin = p.taps_h, r_end = 0;
      for (int64_t r = 0; r < p.taps_h; ++r) {
        const int64_t ih = oh * p.stride_h + r * p.dil_h + p.offset_h;
        if (ih >= 0 && ih < p.in_h) {
          r_begin = std::min(r_begin, r);
          r_end = r + 1;
        }
      }
      // The zero-padded strip: strip[c][r][j] = in[ih(r), offset_w + j] (0 outside the plane).
      const float* in_group = in + (n * p.groups + g) * p.in_per_group * in_area;
      const int64_t j_begin = std::max<int64_t>(0, -p.offset_w);
      const int64_t j_end = std::min(strip_width, p.in_w - p.offset_w);
      for (int64_t c = 0; c < p.in_per_group; ++c) {
        for (int64_t r = r_begin; r < r_end; ++r) {
          float* dst = strip.data() + (c * p.taps_h + r) * strip_width;
          const int64_t src = c * in_area + (oh * p.stride_h + r * p.dil_h + p.offset_h) * p.in_w + p.offset_w;
          std::fill(dst, dst + strip_width, 0.0f);
          if (j_end > j_begin) std::memcpy(dst + j_begin, in_group + src + j_begin, (j_end - j_begin) * sizeof(float));
        }
      }
      for (int64_t b = 0; b < blocks; ++b) {
        Tile t{nullptr, strip_width, r_begin, r_end, p.taps_h, p.taps_w, p.in_per_group, p.stride_w, p.dil_w,
               packed + (g * blocks + b) * weights_per_block,
               init_padded.data() + (g * blocks + b) * kBlockedChannels, nullptr};
        for (int64_t ow = 0; ow < p.out_w; ow += kMaxPixels) {
          const int64_t pixels = std::min<int64_t>(kMaxPixels, p.out_w - ow);
          t.rows = strip.data() + ow * p.stride_w;
          t.acc = row_acc.data() + ow * kBlockedChannels;
          tile_table[pixels - 1](t);
        }
        // Transpose the row block [ow][32] into the NCHW output rows of this block's channels.
        const int64_t channels = std::min(kBlockedChannels, p.out_per_group - b * kBlockedChannels);
        float* out_row = out + ((n * p.groups + g) * p.out_per_group + b * kBlockedChannels) * out_area + oh * p.out_w;
        for (int64_t j = 0; j < channels; ++j, out_row += out_area) {
          for (int64_t ow = 0; ow < p.out_w; ++ow) out_row[ow] = row_acc[ow * kBlockedChannels + j];
        }
      }
    }
  });
}

#else  // not x86-64 with GCC/Clang: the plain loops serve every case

bool blocked_kernel_available() { return false; }
void blocked_correlation(const BlockedProblem&, const float*, const float*, const float*, float*) {}

#endif

}  // namespace channelconv
