// CPU data movement for the GEMM-lowered algorithms (im2col, 1x1): im2col by contiguous row
// copies (NCHW) or channel runs (NHWC), col2im as a gather. The GEMM driver they plug into is csrc/lowered.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../lowered.h"

namespace channelconv {
namespace {

// Column row (c, r, t) holds, for each output pixel of the band, the input element that tap (r, t)
// of channel c reads, or 0 in the padding. Filled one output row at a time: the valid stretch
// [first_valid, last_valid) is a strided (contiguous for stride 1) run of one input row.
// `pitch`: elements from one column row to the next (the band's pixels, or more when images sit
// side by side in one column matrix).
template <typename scalar_t>
void im2col_band(const scalar_t* image, scalar_t* columns, const ConvShape& s, int64_t row0, int64_t rows,
                 int64_t pitch) {
  const Geometry<int64_t> g = s.geometry<int64_t>();
  at::parallel_for(0, s.in_channels * g.kernel_area(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % g.w.taps, r = (row / g.w.taps) % g.h.taps, c = row / g.kernel_area();
      const scalar_t* x_c = image + c * g.in_area();
      const int64_t wo_begin = g.w.first_valid(t), wo_end = g.w.last_valid(t);
      const int64_t wi_offset = g.w.input_at(0, t);
      scalar_t* dst = columns + row * pitch;
      for (int64_t ho = row0; ho < row0 + rows; ++ho, dst += g.w.out) {
        const int64_t hi = g.h.input_at(ho, r);
        if (hi < 0 || hi >= g.h.in) {
          std::fill(dst, dst + g.w.out, scalar_t(0));
          continue;
        }
        std::fill(dst, dst + wo_begin, scalar_t(0));
        const int64_t src = hi * g.w.in + wi_offset;
        if (g.w.stride == 1) {
          std::copy(x_c + src + wo_begin, x_c + src + wo_end, dst + wo_begin);
        } else {
          for (int64_t wo = wo_begin; wo < wo_end; ++wo) dst[wo] = x_c[src + wo * g.w.stride];
        }
        std::fill(dst + wo_end, dst + g.w.out, scalar_t(0));
      }
    }
  });
}

// The input row of grad_image a task sums into, in the op-math type acc_t: the row itself when
// grad_image holds acc_t, else a buffer widened from it (or zeros when not accumulating), which
// finish() writes back, rounded once.
template <typename out_t, typename acc_t>
class SumRow {
 public:
  explicit SumRow(int64_t length) : length_(length) {
    if constexpr (!kInPlace) buffer_.resize(length);
  }

  acc_t* start(out_t* row, bool accumulate) {
    row_ = row;
    acc_t* sum;
    if constexpr (kInPlace) {
      sum = row;
    } else {
      sum = buffer_.data();
      if (accumulate) std::copy(row, row + length_, sum);  // widened
    }
    if (!accumulate) std::fill(sum, sum + length_, acc_t(0));
    return sum;
  }

  void finish() {
    if constexpr (!kInPlace) std::copy(buffer_.begin(), buffer_.end(), row_);  // rounded
  }

 private:
  static constexpr bool kInPlace = std::is_same_v<out_t, acc_t>;
  int64_t length_;
  std::vector<acc_t> buffer_;
  out_t* row_ = nullptr;
};

// grad_image[c, hi, wi] = (itself if `accumulate`, else 0) + sum over taps (r, t) whose output
// pixel lies in the band of columns[(c, r, t), pixel]. Each task owns whole input rows: no
// atomics, fixed order, and every row is written. `pitch` as for im2col_band.
template <typename scalar_t, typename out_t>
void col2im_band(const scalar_t* columns, out_t* grad_image, const ConvShape& s, int64_t row0, int64_t rows,
                 int64_t pitch, bool accumulate) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry<int64_t> g = s.geometry<int64_t>();
  at::parallel_for(0, s.in_channels * g.h.in, 16, [&](int64_t begin, int64_t end) {
    SumRow<out_t, acc_t> sum_row(g.w.in);
    for (int64_t c_hi = begin; c_hi < end; ++c_hi) {
      const int64_t c = c_hi / g.h.in, hi = c_hi % g.h.in;
      acc_t* grad_row = sum_row.start(grad_image + c_hi * g.w.in, accumulate);
      for (int64_t r = 0; r < g.h.taps; ++r) {
        const int64_t ho = g.h.output_reading(hi, r);
        if (ho < row0 || ho >= row0 + rows) continue;  // also rejects -1
        const scalar_t* column_base = columns + (c * g.h.taps + r) * g.w.taps * pitch + (ho - row0) * g.w.out;
        for (int64_t t = 0; t < g.w.taps; ++t) {
          // Tap t sends output wo to input wi = wi0 + wo*stride: one input per output, so walking
          // the valid outputs adds each input's term once, in the same (r, t) order as a gather
          // over wi would; at stride 1 it is a contiguous, vectorised add.
          const scalar_t* column_row = column_base + t * pitch;
          const int64_t wi0 = g.w.input_at(0, t), wo_end = g.w.last_valid(t);
          if (g.w.stride == 1) {
            for (int64_t wo = g.w.first_valid(t); wo < wo_end; ++wo) {
              grad_row[wi0 + wo] += static_cast<acc_t>(column_row[wo]);
            }
          } else {
            for (int64_t wo = g.w.first_valid(t); wo < wo_end; ++wo) {
              grad_row[wi0 + wo * g.w.stride] += static_cast<acc_t>(column_row[wo]);
            }
          }
        }
      }
      sum_row.finish();
    }
  });
}

// NHWC (plan.h): column row p, output pixel (row0 + p / W_o, p % W_o), holds for each group and
// tap (r, t) the group's channels of the input pixel the tap reads, one contiguous run, or zeros
// in the padding.
template <typename scalar_t>
void im2col_nhwc_band(const scalar_t* image, scalar_t* columns, const ConvShape& s, int64_t row0, int64_t rows) {
  const Geometry<int64_t> g = s.geometry<int64_t>();
  const int64_t per_group = s.in_per_group(), taps = g.kernel_area(), row_length = s.in_channels * taps;
  at::parallel_for(0, rows * g.w.out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t ho = row0 + p / g.w.out, wo = p % g.w.out;
      scalar_t* dst = columns + p * row_length;
      for (int64_t r = 0; r < g.h.taps; ++r) {
        const int64_t hi = g.h.input_at(ho, r);
        for (int64_t t = 0; t < g.w.taps; ++t) {
          const int64_t wi = g.w.input_at(wo, t), tap = r * g.w.taps + t;
          const bool inside = hi >= 0 && hi < g.h.in && wi >= 0 && wi < g.w.in;
          for (int64_t group = 0; group < s.groups; ++group) {
            scalar_t* run = dst + (group * taps + tap) * per_group;
            if (inside) {
              const scalar_t* src = image + (hi * g.w.in + wi) * s.in_channels + group * per_group;
              std::copy(src, src + per_group, run);
            } else {
              std::fill(run, run + per_group, scalar_t(0));
            }
          }
        }
      }
    }
  });
}

// grad_image[hi, wi, c] = (itself if `accumulate`, else 0) + every NHWC column entry that read it,
// for the band. Each task owns whole input rows (a gather: no atomics, a fixed (r, t) order, every
// row written); each entry is a contiguous channel run.
template <typename scalar_t, typename out_t>
void col2im_nhwc_band(const scalar_t* columns, out_t* grad_image, const ConvShape& s, int64_t row0, int64_t rows,
                      bool accumulate) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry<int64_t> g = s.geometry<int64_t>();
  const int64_t per_group = s.in_per_group(), taps = g.kernel_area(), row_length = s.in_channels * taps;
  const int64_t image_row = g.w.in * s.in_channels;
  at::parallel_for(0, g.h.in, 1, [&](int64_t begin, int64_t end) {
    SumRow<out_t, acc_t> sum_row(image_row);
    for (int64_t hi = begin; hi < end; ++hi) {
      acc_t* grad_row = sum_row.start(grad_image + hi * image_row, accumulate);
      for (int64_t r = 0; r < g.h.taps; ++r) {
        const int64_t ho = g.h.output_reading(hi, r);
        if (ho < row0 || ho >= row0 + rows) continue;  // also rejects -1
        for (int64_t t = 0; t < g.w.taps; ++t) {
          const int64_t tap = r * g.w.taps + t, wi0 = g.w.input_at(0, t), wo_end = g.w.last_valid(t);
          for (int64_t wo = g.w.first_valid(t); wo < wo_end; ++wo) {
            acc_t* dst = grad_row + (wi0 + wo * g.w.stride) * s.in_channels;
            const scalar_t* src = columns + ((ho - row0) * g.w.out + wo) * row_length + tap * per_group;
            for (int64_t group = 0; group < s.groups; ++group) {
              acc_t* dst_run = dst + group * per_group;
              const scalar_t* src_run = src + group * taps * per_group;
              for (int64_t c = 0; c < per_group; ++c) dst_run[c] += static_cast<acc_t>(src_run[c]);
            }
          }
        }
      }
      sum_row.finish();
    }
  });
}

// An image's band columns: (C*k_h*k_w, rows*W_o) with unit-stride rows, `pitch` elements apart.
int64_t band_pitch(const at::Tensor& columns, const ConvShape& s, int64_t rows) {
  TORCH_INTERNAL_ASSERT(columns.dim() == 2 && columns.size(1) == rows * s.out_w && columns.stride(1) == 1);
  return columns.stride(0);
}

void im2col_cpu(const at::Tensor& images, const at::Tensor& columns, const ConvShape& s, int64_t row0, int64_t rows) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "channelconv::im2col", [&] {
    for (int64_t i = 0; i < images.size(0); ++i) {
      const at::Tensor image_columns = columns[i];
      im2col_band<scalar_t>(images[i].const_data_ptr<scalar_t>(), image_columns.mutable_data_ptr<scalar_t>(), s, row0,
                            rows, band_pitch(image_columns, s, rows));
    }
  });
}

void col2im_cpu(const at::Tensor& columns, const at::Tensor& grad_images, const ConvShape& s, int64_t row0,
                int64_t rows, bool accumulate) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, columns.scalar_type(), "channelconv::col2im", [&] {
    with_col2im_output<scalar_t>(grad_images, [&](auto* out) {
      for (int64_t i = 0; i < grad_images.size(0); ++i) {
        const at::Tensor image_columns = columns[i];
        col2im_band<scalar_t>(image_columns.const_data_ptr<scalar_t>(), out + i * s.image_numel(), s, row0, rows,
                              band_pitch(image_columns, s, rows), accumulate);
      }
    });
  });
}

// NHWC bands: columns (images*rows*W_o, C*k_h*k_w), contiguous, and the images, channels_last.
void check_nhwc_band(const at::Tensor& images, const at::Tensor& columns, const ConvShape& s, int64_t rows) {
  TORCH_INTERNAL_ASSERT(columns.dim() == 2 && columns.is_contiguous() &&
                        columns.size(0) == images.size(0) * rows * s.out_w &&
                        columns.size(1) == s.in_channels * s.kernel_h * s.kernel_w);
  TORCH_INTERNAL_ASSERT(images.dim() == 4 && images.is_contiguous(at::MemoryFormat::ChannelsLast));
}

void im2col_nhwc_cpu(const at::Tensor& images, const at::Tensor& columns, const ConvShape& s, int64_t row0,
                     int64_t rows) {
  check_nhwc_band(images, columns, s, rows);
  const int64_t column_numel = columns.numel() / images.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "channelconv::im2col_nhwc", [&] {
    for (int64_t i = 0; i < images.size(0); ++i) {
      im2col_nhwc_band<scalar_t>(images.const_data_ptr<scalar_t>() + i * s.image_numel(),
                                 columns.mutable_data_ptr<scalar_t>() + i * column_numel, s, row0, rows);
    }
  });
}

void col2im_nhwc_cpu(const at::Tensor& columns, const at::Tensor& grad_images, const ConvShape& s, int64_t row0,
                     int64_t rows, bool accumulate) {
  check_nhwc_band(grad_images, columns, s, rows);
  const int64_t column_numel = columns.numel() / grad_images.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, columns.scalar_type(), "channelconv::col2im_nhwc", [&] {
    with_col2im_output<scalar_t>(grad_images, [&](auto* out) {
      for (int64_t i = 0; i < grad_images.size(0); ++i) {
        col2im_nhwc_band<scalar_t>(columns.const_data_ptr<scalar_t>() + i * column_numel, out + i * s.image_numel(),
                                   s, row0, rows, accumulate);
      }
    });
  });
}

constexpr BandKernels kCpuBands{&im2col_cpu, &col2im_cpu, &im2col_nhwc_cpu, &col2im_nhwc_cpu};

}  // namespace
}  // namespace channelconv

TORCH_LIBRARY_IMPL(channelconv, CPU, m) { channelconv::register_lowered_ops<channelconv::kCpuBands>(m); }
