// Index math of a 2-D cross-correlation, shared by the CPU and CUDA kernels.
//
// Everything here is HOST_DEVICE so the CPU tests exercise the very code the GPU runs.
// index_t is int64_t on the host; CUDA kernels may instantiate it with int32_t when the host
// has checked that every index fits (see fits_in_int32 in conv_params.h).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CC_HOST_DEVICE inline
#endif

namespace channelconv {

// Floor division for a positive divisor, correct for negative numerators (C++ truncates).
template <typename index_t>
CC_HOST_DEVICE index_t floor_div(index_t a, index_t b) {
  const index_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// One spatial axis of the correlation: input extent, output extent, kernel tap count and
// the stride / padding / dilation that map an output position and a tap to an input position.
template <typename index_t>
struct Axis {
  index_t in;       // input extent (H or W)
  index_t out;      // output extent (H_o or W_o)
  index_t taps;     // kernel extent (k_h or k_w)
  index_t stride;
  index_t pad;
  index_t dilation;

  // Input coordinate read by output position o through kernel tap t (may fall in the padding).
  CC_HOST_DEVICE index_t input_at(index_t o, index_t t) const {
    return o * stride - pad + t * dilation;
  }

  // Output positions o in [first, last) whose tap t reads a real (non-padding) input element:
  // 0 <= o*stride - pad + t*dilation < in. Lets the loops run without a bounds test inside.
  CC_HOST_DEVICE index_t first_valid(index_t t) const {
    const index_t lo = floor_div<index_t>(pad - t * dilation + stride - 1, stride);
    return lo < 0 ? index_t(0) : (lo > out ? out : lo);
  }
  CC_HOST_DEVICE index_t last_valid(index_t t) const {
    const index_t hi = floor_div<index_t>(in - 1 + pad - t * dilation, stride) + 1;
    const index_t first = first_valid(t);
    return hi < first ? first : (hi > out ? out : hi);
  }

  // The output position that reads input coordinate i through tap t, or -1 when none does
  // (i is between strided samples or the position lies outside [0, out)). This is the
  // inverse map a gather-style col2im needs.
  CC_HOST_DEVICE index_t output_reading(index_t i, index_t t) const {
    const index_t num = i + pad - t * dilation;
    if (num < 0 || num % stride != 0) return -1;
    const index_t o = num / stride;
    return o < out ? o : index_t(-1);
  }
};

// Shape of one convolution viewed as a lowered GEMM per group: the column matrix has
// rows (c, r, s) over the channels of one group and columns (h_o, w_o) over output pixels.
template <typename index_t>
struct Geometry {
  Axis<index_t> h;
  Axis<index_t> w;

  CC_HOST_DEVICE index_t kernel_area() const { return h.taps * w.taps; }
  CC_HOST_DEVICE index_t out_area() const { return h.out * w.out; }
  CC_HOST_DEVICE index_t in_area() const { return h.in * w.in; }

  // im2col element map. Column row `row` = (c * k_h + r) * k_w + s, column `col` = output pixel
  // ho * w_o + wo. Returns the offset of the input element inside its image (channel-major,
  // relative to channel 0 of the group), or -1 where the tap falls in the zero padding.
  CC_HOST_DEVICE index_t im2col_source(index_t row, index_t col) const {
    const index_t s = row % w.taps;
    const index_t r = (row / w.taps) % h.taps;
    const index_t c = row / kernel_area();
    const index_t hi = h.input_at(col / w.out, r);
    const index_t wi = w.input_at(col % w.out, s);
    if (hi < 0 || hi >= h.in || wi < 0 || wi >= w.in) return -1;
    return (c * h.in + hi) * w.in + wi;
  }
};

}  // namespace channelconv
