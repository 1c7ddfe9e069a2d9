// The depthwise engine (blocked.h): one input channel per output channel, vectorised across 16
// channels of an image rather than along a row, so that a small map (MobileNet's 7x7 and 14x14)
// wastes no lanes. Per task (an image and a block of 16 channels) the block's input planes are
// transposed into one zero-padded [row][column][16] buffer, every output pixel is a chain of one
// FMA per tap on 16 channels at once (the tap's 16 weights held in registers), and the
// [pixel][16] result is written back. The buffers are channel-last, so channels_last operands are
// read and written with plain copies, and any layout or dtype converts on the way (activations.h).
// channels_last in and out runs without the window: from the input to the output through a few
// converted rows (below).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <climits>

#include <algorithm>
#include <vector>

#include "blocked.h"

namespace channelconv {

#if defined(__x86_64__) && defined(__GNUC__)

namespace {

using blocked::v16;
constexpr int64_t kLanes = 16;

// The input a task's outputs read, as a padded [row][column][16] buffer: rows from the first
// output's first tap to the last output's last, likewise the columns.
struct Window {
  int64_t rows, cols, row0, col0;  // its extent and the input coordinate of its (0, 0)
};

Window window_of(const BlockedProblem& p) {
  return {p.input_rows(p.out_h), p.strip_width(), p.offset_h, p.offset_w};
}

// buf[(i * cols + j) * 16 + c] = in[n, c0 + c, row0 + i, col0 + j] for the block's `channels`, 0 outside.
void gather(const BlockedProblem& p, const Window& win, const Activations& in, int64_t n, int64_t c0,
            int64_t channels, float* buf) {
  std::fill(buf, buf + win.rows * win.cols * kLanes, 0.0f);
  const int64_t col_begin = std::max<int64_t>(0, -win.col0), col_end = std::min(win.cols, p.in_w - win.col0);
  if (col_end <= col_begin) return;
  for (int64_t i = 0; i < win.rows; ++i) {
    const int64_t ih = win.row0 + i;
    if (ih < 0 || ih >= p.in_h) continue;
    read_pixel_major(in, n, c0, channels, ih * p.in_w + win.col0 + col_begin, col_end - col_begin,
                     buf + (i * win.cols + col_begin) * kLanes, kLanes);
  }
}

// out_t[(oh * out_w + ow) * 16 + c] = init[c] + sum over the taps of w_t[tap][c] * buf[...]. TH x TW:
// the taps as constants (0: the problem's), so that a 3x3 or 5x5 kernel's weights stay in registers.
template <int TH, int TW>
__attribute__((target("avx512f,fma"))) void correlate(const BlockedProblem& p, const Window& win, const float* buf,
                                                      const float* w_t, const float* init, float* out_t) {
  const int64_t taps_h = TH > 0 ? TH : p.taps_h, taps_w = TW > 0 ? TW : p.taps_w;
  const int64_t row_step = p.dil_h * win.cols * kLanes, tap_step = p.dil_w * kLanes;
  const v16 b = *reinterpret_cast<const v16*>(init);
  for (int64_t oh = 0; oh < p.out_h; ++oh) {
    for (int64_t ow = 0; ow < p.out_w; ++ow) {
      const float* x = buf + (oh * p.stride_h * win.cols + ow * p.stride_w) * kLanes;
      v16 acc = b;
#pragma GCC unroll 7
      for (int64_t r = 0; r < taps_h; ++r)
#pragma GCC unroll 7
        for (int64_t s = 0; s < taps_w; ++s)
          acc += *reinterpret_cast<const v16*>(w_t + (r * taps_w + s) * kLanes) *
                 *reinterpret_cast<const v16*>(x + r * row_step + s * tap_step);
      *reinterpret_cast<v16*>(out_t + (oh * p.out_w + ow) * kLanes) = acc;
    }
  }
}

using CorrelateFn = void (*)(const BlockedProblem&, const Window&, const float*, const float*, const float*, float*);

CorrelateFn correlate_for(const BlockedProblem& p) {
  if (p.taps_h == 3 && p.taps_w == 3) return &correlate<3, 3>;
  if (p.taps_h == 5 && p.taps_w == 5) return &correlate<5, 5>;
  if (p.taps_h == 2 && p.taps_w == 2) return &correlate<2, 2>;  // a 3x3 stride-2 gradient's largest phase
  return &correlate<0, 0>;
}

// The block's weights, [problem tap][16]: channel c's tap (t, u) reads kernel row
// first_h + t*step_h, column first_w + u*step_w (the forward's in order, or a phase's flipped).
void pack_taps(const BlockedProblem& p, const float* w, const WeightTaps& taps, int64_t c0, int64_t channels,
               float* w_t) {
  std::fill(w_t, w_t + p.taps_h * p.taps_w * kLanes, 0.0f);
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < p.taps_h; ++t)
      for (int64_t u = 0; u < p.taps_w; ++u)
        w_t[(t * p.taps_w + u) * kLanes + c] =
            w[((c0 + c) * taps.kernel_h + taps.first_h + t * taps.step_h) * taps.kernel_w + taps.first_w +
              u * taps.step_w];
}

// The [pixel][16] result into the block's channels of image n, at the problem's output positions.
void scatter(const BlockedProblem& p, const float* out_t, const Activations& out, int64_t n, int64_t c0,
             int64_t channels) {
  for (int64_t oh = 0; oh < p.out_h; ++oh)
    write_pixel_major(out, n, c0, channels, (p.out_origin_h + oh * p.out_step_h) * p.plane_w() + p.out_origin_w,
                      p.out_step_w, p.out_w, out_t + oh * p.out_w * kLanes, kLanes);
}

// ---- channels_last in and out, read and written where they lie ----
//
// Every output pixel stored in order (the forward pass, the stride-1 input gradient), any of the
// engines' dtypes: a task is one image's band of output rows for a group of 16-channel blocks. The
// input rows it reads are converted once each into a ring of zero-padded float32 rows [column][16]
// per block (the kernel's span of rows, a few KB; the group's rings within L2), and each output row
// is computed from the ring in groups of 8 pixels, 8 independent chains of FMAs (one chain a pixel
// was bound by the FMA's latency), with no bounds test. 144 channels @56, batch 8, forward: float32 0.58x F.conv2d ->
// 0.95x; bfloat16, which went through the window and its conversions pixel by pixel, 0.38x -> 0.85x
// (benchmarks/NOTES.md v21).

// 16 channels (the lanes of `mask`) of one pixel as float32, and back rounded to T (bfloat16 to
// nearest even with NaN kept quiet, as c10::BFloat16; float16 by the hardware's conversion).
// (GCC 12 takes the pass-through operand of the 256-bit load/convert intrinsics for an
// uninitialised variable: a false -Wmaybe-uninitialized, silenced down to the weight gradient.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define CHANNELCONV_LANES_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) inline
CHANNELCONV_LANES_TARGET __m512 load_lanes(const float* src, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, src); }
CHANNELCONV_LANES_TARGET __m512 load_lanes(const c10::BFloat16* src, __mmask16 mask) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
CHANNELCONV_LANES_TARGET __m512 load_lanes(const c10::Half* src, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src));
}
CHANNELCONV_LANES_TARGET void store_lanes(float* dst, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(dst, mask, v); }
CHANNELCONV_LANES_TARGET void store_lanes(c10::BFloat16* dst, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(dst, mask, blocked::bfloat16_bits(v));
}
CHANNELCONV_LANES_TARGET void store_lanes(c10::Half* dst, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#undef CHANNELCONV_LANES_TARGET

inline __mmask16 lanes_mask(int64_t lanes) { return static_cast<__mmask16>((1u << std::min(kLanes, lanes)) - 1u); }

// G output pixels from column ow of the ring's rows (rows[r]: kernel row r's padded row, or null
// where it lies outside the input), each a chain of FMAs over the taps; TH x TW: the taps as
// constants (0: the problem's).
template <int G, int TH, int TW>
__attribute__((target("avx512f,fma"), always_inline)) inline void pixels(const BlockedProblem& p,
                                                                       const float* const* rows, const float* w_t,
                                                                       __m512 bias, int64_t ow, __m512* acc) {
  const int64_t taps_h = TH > 0 ? TH : p.taps_h, taps_w = TW > 0 ? TW : p.taps_w;
  const int64_t step = p.stride_w * kLanes, tap_step = p.dil_w * kLanes;
#pragma GCC unroll 8
  for (int j = 0; j < G; ++j) acc[j] = bias;
#pragma GCC unroll 7
  for (int64_t r = 0; r < taps_h; ++r) {
    if (rows[r] == nullptr) continue;
    const float* x = rows[r] + ow * step;
#pragma GCC unroll 7
    for (int64_t s = 0; s < taps_w; ++s) {
      const __m512 tap = _mm512_loadu_ps(w_t + (r * taps_w + s) * kLanes);
#pragma GCC unroll 8
      for (int j = 0; j < G; ++j) acc[j] = _mm512_fmadd_ps(tap, _mm512_load_ps(x + j * step + s * tap_step), acc[j]);
    }
  }
}

// One image's output rows [oh_begin, oh_end) for channel blocks [b_begin, b_end), each block's
// input rows in its own ring (ring + (b - b_begin) * ring_floats): an input row is converted for
// all the blocks at once, one pass along it, rather than block by block (a 16-channel block's
// pass reads one 64-byte line of every pixel: a stride-2 layer ran 0.76x -> 0.53x F.conv2d so).
template <typename T, int TH, int TW>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void depthwise_nhwc_band(
    const BlockedProblem& p, const T* image, const float* w_t, const float* init, int64_t b_begin, int64_t b_end,
    int64_t oh_begin, int64_t oh_end, float* ring, T* out_image) {
  const int64_t C = p.groups, width = p.strip_width(), span = p.input_rows(1);
  const int64_t row_floats = width * kLanes, ring_floats = span * row_floats, taps = p.taps_h * p.taps_w;
  const int64_t col_begin = std::max<int64_t>(0, -p.offset_w), col_end = std::min(width, p.in_w - p.offset_w);
  std::fill(ring, ring + (b_end - b_begin) * ring_floats, 0.0f);  // (the padding columns stay zero)
  int64_t next_row = INT64_MIN;  // the next input row the rings lack
  const float* rows[TH > 0 ? TH : 1];
  std::vector<const float*> many_rows(TH > 0 ? 0 : p.taps_h);
  const float** row_of = TH > 0 ? rows : many_rows.data();
  for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
    const int64_t first = oh * p.stride_h + p.offset_h;  // input row of kernel row 0
    for (int64_t ih = std::max(first, next_row); ih <= first + span - 1; ++ih) {
      if (ih < 0 || ih >= p.in_h) continue;
      float* slot = ring + (ih % span) * row_floats;
      const T* src = image + (ih * p.in_w + p.offset_w) * C;
      for (int64_t col = col_begin; col < col_end; ++col) {
        for (int64_t b = b_begin; b < b_end; ++b) {
          _mm512_store_ps(slot + (b - b_begin) * ring_floats + col * kLanes,
                          load_lanes(src + col * C + b * kLanes, lanes_mask(C - b * kLanes)));
        }
      }
    }
    next_row = first + span;
    for (int64_t b = b_begin; b < b_end; ++b) {
      for (int64_t r = 0; r < p.taps_h; ++r) {
        const int64_t ih = first + r * p.dil_h;
        row_of[r] = ih >= 0 && ih < p.in_h ? ring + (b - b_begin) * ring_floats + (ih % span) * row_floats : nullptr;
      }
      const __mmask16 mask = lanes_mask(C - b * kLanes);
      const float* block_taps = w_t + b * taps * kLanes;
      const __m512 bias = _mm512_loadu_ps(init + b * kLanes);
      T* out_row = out_image + oh * p.out_w * C + b * kLanes;
      int64_t ow = 0;
      __m512 acc[8];
      for (; ow + 8 <= p.out_w; ow += 8) {
        pixels<8, TH, TW>(p, row_of, block_taps, bias, ow, acc);
        for (int j = 0; j < 8; ++j) store_lanes(out_row + (ow + j) * C, acc[j], mask);
      }
      for (; ow < p.out_w; ++ow) {
        pixels<1, TH, TW>(p, row_of, block_taps, bias, ow, acc);
        store_lanes(out_row + ow * C, acc[0], mask);
      }
    }
  }
}

bool lanes_available() {
  static const bool available = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return available;
}

bool runs_in_place(const BlockedProblem& p, const Activations& in, const Activations& out) {
  return in.channels_last && out.channels_last && in.dtype == out.dtype && lanes_available() &&
         p.out_step_h == 1 && p.out_step_w == 1 && p.out_origin_h == 0 && p.out_origin_w == 0 &&
         p.plane_h() == p.out_h && p.plane_w() == p.out_w;
}

template <typename T>
void depthwise_nhwc(const BlockedRun& run, const Activations& in, const float* w, const float* init,
                    const Activations& out) {
  const BlockedProblem& p = run.problem;
  const int64_t blocks = (p.groups + kLanes - 1) / kLanes, taps = p.taps_h * p.taps_w;
  std::vector<float> w_t(blocks * taps * kLanes), init_t(blocks * kLanes, 0.0f);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c0 = b * kLanes, channels = std::min(kLanes, p.groups - c0);
    pack_taps(p, w, run.taps, c0, channels, w_t.data() + b * taps * kLanes);
    if (init != nullptr) std::copy(init + c0, init + c0 + channels, init_t.begin() + b * kLanes);
  }
  using BandFn = void (*)(const BlockedProblem&, const T*, const float*, const float*, int64_t, int64_t, int64_t,
                          int64_t, float*, T*);
  const BandFn band_fn = p.taps_h == 3 && p.taps_w == 3   ? &depthwise_nhwc_band<T, 3, 3>
                         : p.taps_h == 5 && p.taps_w == 5 ? &depthwise_nhwc_band<T, 5, 5>
                                                          : &depthwise_nhwc_band<T, 0, 0>;
  // A task: one image's band of rows for a group of channel blocks, whose rings take up to
  // kRingBytes (L2); enough tasks for every thread four times over (each band reads its kernel's
  // span of rows again).
  constexpr int64_t kRingBytes = 256 << 10;
  const int64_t span = p.input_rows(1), ring_floats = span * p.strip_width() * kLanes;
  const int64_t group_blocks = std::clamp<int64_t>(kRingBytes / (ring_floats * int64_t(sizeof(float))), 1, blocks);
  const int64_t block_groups = ceil_div(blocks, group_blocks);
  const int64_t bands = std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), p.batch * block_groups), 1, p.out_h);
  const T* x = static_cast<const T*>(in.data);
  T* y = static_cast<T*>(out.data);
  at::parallel_for(0, p.batch * block_groups * bands, 1, [&](int64_t begin, int64_t end) {
    float* ring = thread_buffer(Scratch::Widened, group_blocks * ring_floats + kLanes);
    ring += (-reinterpret_cast<uintptr_t>(ring) % 64) / sizeof(float);  // whole 64-byte lines
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / (block_groups * bands), group = task / bands % block_groups, band = task % bands;
      const int64_t b_begin = group * group_blocks, b_end = std::min(blocks, b_begin + group_blocks);
      band_fn(p, x + n * p.in_h * p.in_w * p.groups, w_t.data(), init_t.data(), b_begin, b_end,
              band * p.out_h / bands, (band + 1) * p.out_h / bands, ring, y + n * p.out_h * p.out_w * p.groups);
    }
  });
}

// dW[c, r, s] = sum over images and output pixels of dy[n, oh, ow, c] * x[n, ih, iw, c] for a
// TH x TW kernel, channels_last: a block's 16 channels in one vector, read where they lie, one
// accumulator register per tap; the sums of output rows [row_begin, row_end) (of all images, row
// n * out_h + oh) added to `sums` [tap][16].
template <typename T, int TH, int TW>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void weight_grad_nhwc_rows(
    const ConvShape& s, const T* dy, const T* x, int64_t c0, int64_t row_begin, int64_t row_end, float* sums) {
  const int64_t C = s.in_channels;
  const __mmask16 mask = lanes_mask(C - c0);
  __m512 acc[TH * TW];
  for (int tap = 0; tap < TH * TW; ++tap) acc[tap] = _mm512_loadu_ps(sums + tap * kLanes);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / s.out_h, oh = row % s.out_h;
    const T* x_rows[TH];  // each kernel row's input row, or null outside the input
    for (int r = 0; r < TH; ++r) {
      const int64_t ih = oh * s.stride[0] - s.padding[0] + r * s.dilation[0];
      x_rows[r] = ih >= 0 && ih < s.in_h ? x + (n * s.in_h + ih) * s.in_w * C + c0 : nullptr;
    }
    const T* dy_row = dy + row * s.out_w * C + c0;
    for (int64_t ow = 0; ow < s.out_w; ++ow) {
      const __m512 g = load_lanes(dy_row + ow * C, mask);
#pragma GCC unroll 7
      for (int r = 0; r < TH; ++r) {
        if (x_rows[r] == nullptr) continue;
#pragma GCC unroll 7
        for (int t = 0; t < TW; ++t) {
          const int64_t iw = ow * s.stride[1] - s.padding[1] + t * s.dilation[1];
          if (iw < 0 || iw >= s.in_w) continue;
          acc[r * TW + t] = _mm512_fmadd_ps(g, load_lanes(x_rows[r] + iw * C, mask), acc[r * TW + t]);
        }
      }
    }
  }
  for (int tap = 0; tap < TH * TW; ++tap) _mm512_storeu_ps(sums + tap * kLanes, acc[tap]);
}

// The output rows (of all images) in slices, each summed apart and then added in slice order: the
// same sums whatever the thread count (the slices follow the shape alone). A slice runs in bands
// of rows whose dy and x stay in L2 (1 MB), every channel block over a band before the next, so
// that the rows stream from memory once, in order (a block over all rows read one 64-byte line of
// every pixel, a stride the prefetchers lose: 144 channels @56 float32 ran at 0.40x F.conv2d).
template <typename T>
void depthwise_weight_grad_nhwc_as(const ConvShape& s, const Activations& dy, const Activations& x, float* dw) {
  using RowsFn = void (*)(const ConvShape&, const T*, const T*, int64_t, int64_t, int64_t, float*);
  const int64_t taps = s.kernel_h * s.kernel_w;
  const RowsFn fn = taps == 9 ? &weight_grad_nhwc_rows<T, 3, 3> : &weight_grad_nhwc_rows<T, 5, 5>;
  const int64_t blocks = (s.in_channels + kLanes - 1) / kLanes, block_floats = taps * kLanes;
  // Up to 16 slices, each of at least 4096 pixel vectors (16 slices of 3.5 rows at 960 channels
  // @7 ran 20 % slower than 4, each unit's setup on too little work).
  constexpr int64_t kMaxSlices = 16, kSliceWork = 4096, kBandBytes = 1 << 20;
  const int64_t rows = s.batch * s.out_h;
  const int64_t slices = std::clamp<int64_t>(product({rows, s.out_w, blocks}) / kSliceWork, 1, std::min(rows, kMaxSlices));
  // One output row's dy and the input rows its stride brings in.
  const int64_t row_bytes = (s.out_w + s.stride[0] * s.in_w) * s.in_channels * int64_t(sizeof(T));
  const int64_t band = std::max<int64_t>(1, kBandBytes / std::max<int64_t>(1, row_bytes));
  std::vector<float> sums(slices * blocks * block_floats, 0.0f);  // [slice][block][tap][16]
  const T *dy_data = static_cast<const T*>(dy.data), *x_data = static_cast<const T*>(x.data);
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slice = begin; slice < end; ++slice) {
      const int64_t slice_end = (slice + 1) * rows / slices;
      for (int64_t row = slice * rows / slices; row < slice_end; row += band) {
        for (int64_t b = 0; b < blocks; ++b) {
          fn(s, dy_data, x_data, b * kLanes, row, std::min(slice_end, row + band),
             sums.data() + (slice * blocks + b) * block_floats);
        }
      }
    }
  });
  // The slices added into the first in slice order, whole vectors at a time; then [c][tap].
  const int64_t slice_floats = blocks * block_floats;
  for (int64_t slice = 1; slice < slices; ++slice) {
    const float* part = sums.data() + slice * slice_floats;
    for (int64_t i = 0; i < slice_floats; ++i) sums[i] += part[i];
  }
  for (int64_t c = 0; c < s.in_channels; ++c) {
    for (int64_t tap = 0; tap < taps; ++tap) dw[c * taps + tap] = sums[c / kLanes * block_floats + tap * kLanes + c % kLanes];
  }
}

#pragma GCC diagnostic pop

}  // namespace

bool depthwise_weight_grad_nhwc(const ConvShape& s, const Activations& dy, const Activations& x, float* dw) {
  const bool kernel = (s.kernel_h == 3 && s.kernel_w == 3) || (s.kernel_h == 5 && s.kernel_w == 5);
  const bool depthwise = s.groups == s.in_channels && s.out_channels == s.in_channels;
  if (!kernel || !depthwise || !dy.channels_last || !x.channels_last || dy.dtype != x.dtype || !lanes_available()) {
    return false;
  }
  switch (x.dtype) {
    case at::kFloat: depthwise_weight_grad_nhwc_as<float>(s, dy, x, dw); return true;
    case at::kBFloat16: depthwise_weight_grad_nhwc_as<c10::BFloat16>(s, dy, x, dw); return true;
    case at::kHalf: depthwise_weight_grad_nhwc_as<c10::Half>(s, dy, x, dw); return true;
    default: return false;
  }
}

void depthwise_correlation(const BlockedRun& run, const Activations& in, const float* w, const float* init,
                           const Activations& out) {
  const BlockedProblem& p = run.problem;
  if (runs_in_place(p, in, out)) {
    switch (in.dtype) {
      case at::kBFloat16: return depthwise_nhwc<c10::BFloat16>(run, in, w, init, out);
      case at::kHalf: return depthwise_nhwc<c10::Half>(run, in, w, init, out);
      default: return depthwise_nhwc<float>(run, in, w, init, out);
    }
  }
  const Window win = window_of(p);
  const int64_t blocks = (p.groups + kLanes - 1) / kLanes;
  at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(win.rows * win.cols * kLanes), out_t(p.out_h * p.out_w * kLanes);
    std::vector<float> w_t(p.taps_h * p.taps_w * kLanes), init_t(kLanes);
    const CorrelateFn fn = correlate_for(p);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = task % blocks * kLanes;
      const int64_t channels = std::min(kLanes, p.groups - c0);
      std::fill(init_t.begin(), init_t.end(), 0.0f);
      if (init != nullptr) std::copy(init + c0, init + c0 + channels, init_t.begin());
      pack_taps(p, w, run.taps, c0, channels, w_t.data());
      gather(p, win, in, n, c0, channels, buf.data());
      fn(p, win, buf.data(), w_t.data(), init_t.data(), out_t.data());
      scatter(p, out_t.data(), out, n, c0, channels);
    }
  });
}

#else  // not x86-64 with GCC/Clang: never called (blocked_kernel_available is false)

void depthwise_correlation(const BlockedRun&, const Activations&, const float*, const float*, const Activations&) {}
bool depthwise_weight_grad_nhwc(const ConvShape&, const Activations&, const Activations&, float*) { return false; }

#endif

}  // namespace channelconv
