// The depthwise engine (blocked.h): one input channel per output channel, vectorised across 16
// channels of an image rather than along a row, so that a small map (MobileNet's 7x7 and 14x14)
// wastes no lanes. Per task (an image and a block of 16 channels) the block's input planes are
// transposed into one zero-padded [row][column][16] buffer, every output pixel is a chain of one
// FMA per tap on 16 channels at once (the tap's 16 weights held in registers), and the
// [pixel][16] result is written back. The buffers are channel-last, so channels_last operands are
// read and written with plain copies, and any layout or dtype converts on the way (activations.h).
// channels_last float32 runs without the buffers: straight from the input to the output.
#include <ATen/Parallel.h>

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

// channels_last float32 in and out, every output pixel stored in order (the forward pass, the
// stride-1 input gradient): no window and no copies. One output row of one 16-channel block at a
// time, the block's taps held in registers; each output pixel is a chain of FMAs over the taps that
// fall inside the input, each one masked vector load of the pixel's 16 channels where they lie.
template <int TH, int TW>
__attribute__((target("avx512f,fma"))) void correlate_nhwc_row(const BlockedProblem& p, const float* image,
                                                               const float* w_t, const float* init, int64_t c0,
                                                               int64_t oh, float* out_row) {
  const int64_t taps_h = TH > 0 ? TH : p.taps_h, taps_w = TW > 0 ? TW : p.taps_w, C = p.groups;
  const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(kLanes, C - c0)) - 1u);
  const __m512 bias = _mm512_loadu_ps(init);
  __m512 w[TH > 0 && TW > 0 ? TH * TW : 1];  // a fixed kernel's taps in registers (the stores cannot alias them)
  if constexpr (TH > 0 && TW > 0) {
    for (int tap = 0; tap < TH * TW; ++tap) w[tap] = _mm512_loadu_ps(w_t + tap * kLanes);
  }
  for (int64_t ow = 0; ow < p.out_w; ++ow) {
    __m512 acc = bias;
#pragma GCC unroll 7
    for (int64_t r = 0; r < taps_h; ++r) {
      const int64_t ih = p.offset_h + oh * p.stride_h + r * p.dil_h;
      if (ih < 0 || ih >= p.in_h) continue;
      const float* row = image + ih * p.in_w * C + c0;
#pragma GCC unroll 7
      for (int64_t s = 0; s < taps_w; ++s) {
        const int64_t iw = p.offset_w + ow * p.stride_w + s * p.dil_w;
        if (iw < 0 || iw >= p.in_w) continue;
        const __m512 tap = TH > 0 && TW > 0 ? w[r * TW + s] : _mm512_loadu_ps(w_t + (r * taps_w + s) * kLanes);
        acc = _mm512_fmadd_ps(tap, _mm512_maskz_loadu_ps(mask, row + iw * C), acc);
      }
    }
    blocked::store_lanes(out_row + ow * C + c0, acc, std::min<int64_t>(kLanes, C - c0));
  }
}

using NhwcRowFn = void (*)(const BlockedProblem&, const float*, const float*, const float*, int64_t, int64_t,
                           float*);

NhwcRowFn nhwc_row_for(const BlockedProblem& p) {
  if (p.taps_h == 3 && p.taps_w == 3) return &correlate_nhwc_row<3, 3>;
  if (p.taps_h == 5 && p.taps_w == 5) return &correlate_nhwc_row<5, 5>;
  return &correlate_nhwc_row<0, 0>;
}

bool runs_in_place(const BlockedProblem& p, const Activations& in, const Activations& out) {
  return in.channels_last && out.channels_last && in.dtype == at::kFloat && out.dtype == at::kFloat &&
         p.out_step_h == 1 && p.out_step_w == 1 && p.out_origin_h == 0 && p.out_origin_w == 0 &&
         p.plane_h() == p.out_h && p.plane_w() == p.out_w;
}

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
  const float* x = static_cast<const float*>(in.data);
  float* y = static_cast<float*>(out.data);
  const NhwcRowFn fn = nhwc_row_for(p);
  at::parallel_for(0, p.batch * p.out_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / p.out_h, oh = task % p.out_h;
      const float* image = x + n * p.in_h * p.in_w * p.groups;
      float* out_row = y + (n * p.out_h + oh) * p.out_w * p.groups;
      for (int64_t b = 0; b < blocks; ++b)
        fn(p, image, w_t.data() + b * taps * kLanes, init_t.data() + b * kLanes, b * kLanes, oh, out_row);
    }
  });
}

// dW[c, r, s] = sum over images and output pixels of dy[n, oh, ow, c] * x[n, ih, iw, c] for a
// TH x TW kernel, channels_last float32: a block's 16 channels in one vector, read where they lie,
// one accumulator register per tap. A task owns a block (its slice of dW) and sums images and
// pixels in a fixed order.
template <int TH, int TW>
__attribute__((target("avx512f,fma"))) void weight_grad_nhwc_block(const ConvShape& s, const float* dy,
                                                                   const float* x, int64_t c0, float* dw) {
  const int64_t C = s.in_channels, channels = std::min(kLanes, C - c0);
  const __mmask16 mask = static_cast<__mmask16>((1u << channels) - 1u);
  __m512 acc[TH * TW];
  for (int tap = 0; tap < TH * TW; ++tap) acc[tap] = _mm512_setzero_ps();
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t oh = 0; oh < s.out_h; ++oh) {
      const float* dy_row = dy + (n * s.out_h + oh) * s.out_w * C + c0;
      for (int64_t ow = 0; ow < s.out_w; ++ow) {
        const __m512 g = _mm512_maskz_loadu_ps(mask, dy_row + ow * C);
#pragma GCC unroll 7
        for (int r = 0; r < TH; ++r) {
          const int64_t ih = oh * s.stride[0] - s.padding[0] + r * s.dilation[0];
          if (ih < 0 || ih >= s.in_h) continue;
          const float* x_row = x + (n * s.in_h + ih) * s.in_w * C + c0;
#pragma GCC unroll 7
          for (int t = 0; t < TW; ++t) {
            const int64_t iw = ow * s.stride[1] - s.padding[1] + t * s.dilation[1];
            if (iw < 0 || iw >= s.in_w) continue;
            acc[r * TW + t] = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(mask, x_row + iw * C), acc[r * TW + t]);
          }
        }
      }
    }
  alignas(64) float lanes[kLanes];
  for (int tap = 0; tap < TH * TW; ++tap) {
    _mm512_store_ps(lanes, acc[tap]);
    for (int64_t c = 0; c < channels; ++c) dw[(c0 + c) * TH * TW + tap] = lanes[c];
  }
}

}  // namespace

bool depthwise_weight_grad_nhwc(const ConvShape& s, const Activations& dy, const Activations& x, float* dw) {
  using BlockFn = void (*)(const ConvShape&, const float*, const float*, int64_t, float*);
  const BlockFn fn = s.kernel_h == 3 && s.kernel_w == 3   ? &weight_grad_nhwc_block<3, 3>
                     : s.kernel_h == 5 && s.kernel_w == 5 ? &weight_grad_nhwc_block<5, 5>
                                                          : nullptr;
  const bool depthwise = s.groups == s.in_channels && s.out_channels == s.in_channels;
  if (fn == nullptr || !depthwise || !dy.channels_last || !x.channels_last || dy.dtype != at::kFloat ||
      x.dtype != at::kFloat) {
    return false;
  }
  const float *dy_data = static_cast<const float*>(dy.data), *x_data = static_cast<const float*>(x.data);
  at::parallel_for(0, (s.in_channels + kLanes - 1) / kLanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fn(s, dy_data, x_data, b * kLanes, dw);
  });
  return true;
}

void depthwise_correlation(const BlockedRun& run, const Activations& in, const float* w, const float* init,
                           const Activations& out) {
  const BlockedProblem& p = run.problem;
  if (runs_in_place(p, in, out)) return depthwise_nhwc(run, in, w, init, out);
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
