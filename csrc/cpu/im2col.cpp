// CPU data movement for the GEMM-lowered algorithms (im2col, 1x1): im2col by contiguous row
// copies (NCHW) or channel runs (NHWC), col2im as a gather. The GEMM driver they plug into is csrc/lowered.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../lowered.h"

namespace channelconv {
namespace {

// Along one axis, each tap's valid outputs [first, last) and the input coordinate output 0 reads:
// computed once per call (each takes divisions; per column row they cost more than a small map's
// few elements).
struct TapSpan {
  int64_t first, last, input_at_0;
};

std::vector<TapSpan> tap_spans(const Axis<int64_t>& axis) {
  std::vector<TapSpan> spans(axis.taps);
  for (int64_t t = 0; t < axis.taps; ++t) spans[t] = {axis.first_valid(t), axis.last_valid(t), axis.input_at(0, t)};
  return spans;
}

// Small maps: each column row is a gather through a table, built once per call, of the offsets
// within a channel plane that tap (r, t) reads for the band's pixels (-1 in the padding). A row of
// a few pixels otherwise costs more in per-row work (bounds, three library calls) than in
// elements moved: a 3x3 map's columns took 2x its GEMM.
template <typename scalar_t>
void im2col_small_bands(const scalar_t* images, int64_t images_count, scalar_t* columns, int64_t image_pitch,
                        int64_t pitch, const ConvShape& s, int64_t row0, int64_t rows) {
  const Geometry<int64_t> g = s.geometry<int64_t>();
  const int64_t band_pixels = rows * g.w.out, taps = g.kernel_area(), column_rows = s.in_channels * taps;
  std::vector<int32_t> sources(taps * band_pixels);
  for (int64_t tap = 0; tap < taps; ++tap) {
    for (int64_t p = 0; p < band_pixels; ++p) {
      const int64_t hi = g.h.input_at(row0 + p / g.w.out, tap / g.w.taps);
      const int64_t wi = g.w.input_at(p % g.w.out, tap % g.w.taps);
      const bool inside = hi >= 0 && hi < g.h.in && wi >= 0 && wi < g.w.in;
      sources[tap * band_pixels + p] = inside ? static_cast<int32_t>(hi * g.w.in + wi) : -1;
    }
  }
  at::parallel_for(0, images_count * column_rows, 16, [&](int64_t begin, int64_t end) {
    // Images innermost: side by side, consecutive tasks then write consecutive pixels of a
    // column row (the other order has the two threads writing alternating short pieces of each).
    for (int64_t index = begin; index < end; ++index) {
      const int64_t row = index / images_count, image = index % images_count;
      const scalar_t* x_c = images + image * s.image_numel() + row / taps * g.in_area();
      const int32_t* source = sources.data() + row % taps * band_pixels;
      scalar_t* dst = columns + image * image_pitch + row * pitch;
      for (int64_t p = 0; p < band_pixels; ++p) {  // branch-free: which taps pad follows no pattern
        const int32_t at = source[p];
        const scalar_t value = x_c[at < 0 ? 0 : at];
        dst[p] = at < 0 ? scalar_t(0) : value;
      }
    }
  });
}

// Column row (c, r, t) holds, for each output pixel of the band, the input element that tap (r, t)
// of channel c reads, or 0 in the padding. Filled one output row at a time: the valid stretch
// [first, last) of the tap's span is a strided (contiguous for stride 1) run of one input row. One
// parallel loop covers every image's column rows: on small maps an image has too few for a
// parallel region of its own. `pitch`: elements from one column row to the next (the band's
// pixels, or more when images sit side by side in one column matrix); `image_pitch`: from one
// image's columns to the next's.
template <typename scalar_t>
void im2col_bands(const scalar_t* images, int64_t images_count, scalar_t* columns, int64_t image_pitch,
                  int64_t pitch, const ConvShape& s, int64_t row0, int64_t rows) {
  const Geometry<int64_t> g = s.geometry<int64_t>();
  // Rows shorter than this, in bands whose table stays small, take the gather through a table.
  constexpr int64_t kShortRow = 16, kMaxTable = 1 << 16;
  if (g.w.out < kShortRow && g.kernel_area() * rows * g.w.out <= kMaxTable && g.in_area() > 0 &&
      g.in_area() <= INT32_MAX) {
    im2col_small_bands(images, images_count, columns, image_pitch, pitch, s, row0, rows);
    return;
  }
  const int64_t column_rows = s.in_channels * g.kernel_area();
  const std::vector<TapSpan> spans = tap_spans(g.w);
  at::parallel_for(0, images_count * column_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t image = index / column_rows, row = index % column_rows;
      const int64_t c = row / g.kernel_area(), r = row / g.w.taps % g.h.taps, t = row % g.w.taps;
      const scalar_t* x_c = images + image * s.image_numel() + c * g.in_area();
      const TapSpan span = spans[t];
      scalar_t* dst = columns + image * image_pitch + row * pitch;
      for (int64_t ho = row0; ho < row0 + rows; ++ho, dst += g.w.out) {
        const int64_t hi = g.h.input_at(ho, r);
        if (hi < 0 || hi >= g.h.in) {
          std::fill(dst, dst + g.w.out, scalar_t(0));
          continue;
        }
        const scalar_t* src = x_c + hi * g.w.in + span.input_at_0;  // src[wo * stride] for valid wo
        std::fill(dst, dst + span.first, scalar_t(0));
        if (g.w.stride == 1) {
          std::copy(src + span.first, src + span.last, dst + span.first);
        } else {
          for (int64_t wo = span.first; wo < span.last; ++wo) dst[wo] = src[wo * g.w.stride];
        }
        std::fill(dst + span.last, dst + g.w.out, scalar_t(0));
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
// atomics, fixed order, and every row is written. One parallel loop covers every image's rows;
// `pitch` and `image_pitch` as for im2col_bands, `image_numel` apart in grad_images.
template <typename scalar_t, typename out_t>
void col2im_bands(const scalar_t* columns, int64_t images_count, int64_t image_pitch, int64_t pitch,
                  out_t* grad_images, const ConvShape& s, int64_t row0, int64_t rows, bool accumulate) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry<int64_t> g = s.geometry<int64_t>();
  const std::vector<TapSpan> spans = tap_spans(g.w);
  std::vector<int64_t> band_row_reading(g.h.taps * g.h.in);  // [r][hi]: the band's output row reading hi, or -1
  for (int64_t r = 0; r < g.h.taps; ++r) {
    for (int64_t hi = 0; hi < g.h.in; ++hi) {
      const int64_t ho = g.h.output_reading(hi, r);  // -1 when none
      band_row_reading[r * g.h.in + hi] = ho >= row0 && ho < row0 + rows ? ho - row0 : -1;
    }
  }
  const int64_t image_rows = s.in_channels * g.h.in;
  at::parallel_for(0, images_count * image_rows, 16, [&](int64_t begin, int64_t end) {
    SumRow<out_t, acc_t> sum_row(g.w.in);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t image = index / image_rows, c_hi = index % image_rows;
      const int64_t c = c_hi / g.h.in, hi = c_hi % g.h.in;
      acc_t* grad_row = sum_row.start(grad_images + index * g.w.in, accumulate);
      for (int64_t r = 0; r < g.h.taps; ++r) {
        const int64_t band_row = band_row_reading[r * g.h.in + hi];
        if (band_row < 0) continue;
        const scalar_t* column_base =
            columns + image * image_pitch + (c * g.h.taps + r) * g.w.taps * pitch + band_row * g.w.out;
        for (int64_t t = 0; t < g.w.taps; ++t) {
          // Tap t sends output wo to input wi = wi0 + wo*stride: one input per output, so walking
          // the valid outputs adds each input's term once, in the same (r, t) order as a gather
          // over wi would; at stride 1 it is a contiguous, vectorised add.
          const scalar_t* column_row = column_base + t * pitch;
          const TapSpan span = spans[t];
          if (g.w.stride == 1) {
            for (int64_t wo = span.first; wo < span.last; ++wo) {
              grad_row[span.input_at_0 + wo] += static_cast<acc_t>(column_row[wo]);
            }
          } else {
            for (int64_t wo = span.first; wo < span.last; ++wo) {
              grad_row[span.input_at_0 + wo * g.w.stride] += static_cast<acc_t>(column_row[wo]);
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
  TORCH_INTERNAL_ASSERT(images.is_contiguous() && columns.dim() == 3);
  if (images.size(0) == 0) return;
  const int64_t pitch = band_pitch(columns[0], s, rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "channelconv::im2col", [&] {
    im2col_bands<scalar_t>(images.const_data_ptr<scalar_t>(), images.size(0), columns.mutable_data_ptr<scalar_t>(),
                           columns.stride(0), pitch, s, row0, rows);
  });
}

void col2im_cpu(const at::Tensor& columns, const at::Tensor& grad_images, const ConvShape& s, int64_t row0,
                int64_t rows, bool accumulate) {
  TORCH_INTERNAL_ASSERT(grad_images.is_contiguous() && columns.dim() == 3);
  if (grad_images.size(0) == 0) return;
  const int64_t pitch = band_pitch(columns[0], s, rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, columns.scalar_type(), "channelconv::col2im", [&] {
    with_col2im_output<scalar_t>(grad_images, [&](auto* out) {
      col2im_bands<scalar_t>(columns.const_data_ptr<scalar_t>(), grad_images.size(0), columns.stride(0), pitch, out,
                             s, row0, rows, accumulate);
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
