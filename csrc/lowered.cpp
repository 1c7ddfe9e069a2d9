#include "lowered.h"

#include <ATen/OpMathType.h>

namespace channelconv {
namespace {

// Whether a lowered op may run the NHWC driver (plan.h; the plan has the last word) on the operand
// `t`: on a backend with NHWC band kernels, for data the kernels see as NHWC.
bool runs_nhwc(const BandKernels& kernels, const at::Tensor& t) {
  return kernels.im2col_nhwc != nullptr &&
         sees_nhwc(t.size(1), t.size(2) * t.size(3), t.is_contiguous(at::MemoryFormat::ChannelsLast));
}

// (N, C, H, W) channels_last as its (N*H*W, C) matrix, one row per pixel (a view).
at::Tensor nhwc_rows(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

// Of such a matrix, the rows of output rows [row0, row0+rows) of images [n0, n0+images): consecutive
// rows, since a band of several images holds them whole.
at::Tensor band_rows(const at::Tensor& rows_matrix, const ConvShape& s, int64_t n0, int64_t images, int64_t row0,
                     int64_t rows) {
  return rows_matrix.narrow(0, (n0 * s.out_h + row0) * s.out_w, images * rows * s.out_w);
}

// The weight (K, C/G, k_h, k_w) as (K, k_h*k_w*C/G) rows in the NHWC columns' (r, t, channel) order:
// a view of a channels_last weight, a copy of another.
at::Tensor nhwc_weight_rows(const at::Tensor& weight) {
  return weight.permute({0, 2, 3, 1}).reshape({weight.size(0), -1});
}

// For each group g: out_g = a_g . right(g) (+ bias_g), where out_g and a_g are the group's blocks
// of columns of `out` and `a`, which the GEMM reads and writes in place at their row strides.
template <typename Right>
void grouped_mm(const at::Tensor& out, const at::Tensor& a, int64_t groups, Right right,
                const at::Tensor& bias = at::Tensor()) {
  const int64_t out_width = out.size(1) / groups, a_width = a.size(1) / groups;
  for (int64_t g = 0; g < groups; ++g) {
    at::Tensor out_g = out.narrow(1, g * out_width, out_width);
    const at::Tensor a_g = a.narrow(1, g * a_width, a_width);
    if (bias.defined()) {
      at::addmm_out(out_g, bias.narrow(0, g * out_width, out_width), a_g, right(g));
    } else {
      at::mm_out(out_g, a_g, right(g));
    }
  }
}

// One column buffer, reused for every band of the plan (plan.h, LoweredPlan: rows of one image,
// or whole images; on the CPU possibly side by side, with a scratch for the band's output or
// output gradient).
class ColumnBands {
 public:
  ColumnBands(const ConvShape& s, const LoweredPlan& plan, const at::TensorOptions& options, int64_t workspace_limit)
      : shape_(s), plan_(plan) {
    check_workspace_fits(plan, s, workspace_limit);
    try {
      buffer_ = at::empty({plan.column_numel + plan.scratch_numel}, options);
    } catch (const c10::Error& e) {  // the allocator's "can't allocate memory" (a c10::Error on the CPU)
      TORCH_CHECK_WITH(OutOfMemoryError, false, "channelconv: cannot allocate the im2col workspace: a column ",
                       "buffer of ", plan.workspace_bytes, " bytes (", plan.images, " image(s) x ", plan.rows,
                       " output row(s); workspace limit ", workspace_limit, " bytes) could not be allocated; use ",
                       "algorithm='direct', which needs no workspace, or free memory. Allocator: ",
                       e.what_without_backtrace());
    }
    note_workspace(plan.workspace_bytes);
  }

  bool side_by_side() const { return plan_.side_by_side; }

  // Calls fn(n0, images, row0, rows, columns) for each band: output rows [row0, row0+rows) of
  // images [n0, n0+images); columns is (images, C*k_h*k_w, rows*W_o), each image's matrix with
  // unit-stride rows: contiguous, or side by side (then columns.transpose(0, 1) is contiguous);
  // NHWC: (images*rows*W_o, C*k_h*k_w), contiguous, a row per output pixel.
  template <typename Fn>
  void for_each(Fn fn) const {
    const int64_t column_rows = plan_.column_rows;
    for (int64_t n0 = 0; n0 < shape_.batch; n0 += plan_.images) {
      const int64_t images = std::min(plan_.images, shape_.batch - n0);
      for (int64_t row0 = 0; row0 < shape_.out_h; row0 += plan_.rows) {
        const int64_t rows = std::min(plan_.rows, shape_.out_h - row0);
        const int64_t pixels = rows * shape_.out_w;
        const at::Tensor columns = buffer_.narrow(0, 0, images * column_rows * pixels);
        fn(n0, images, row0, rows,
           plan_.nhwc           ? columns.view({images * pixels, column_rows})
           : plan_.side_by_side ? columns.view({column_rows, images, pixels}).transpose(0, 1)
                                : columns.view({images, column_rows, pixels}));
      }
    }
  }

  // A side-by-side band's output (forward) or output gradient, (C_o, images*H_o*W_o), and the
  // same memory as (images, C_o, H_o*W_o): what is copied from or to the images' own tensors.
  at::Tensor scratch(int64_t images) const {
    const int64_t pixels = shape_.out_h * shape_.out_w;
    return buffer_.narrow(0, plan_.column_numel, shape_.out_channels * images * pixels)
        .view({shape_.out_channels, images * pixels});
  }
  at::Tensor scratch_by_image(int64_t images) const {
    return scratch(images).view({shape_.out_channels, images, shape_.out_h * shape_.out_w}).transpose(0, 1);
  }

 private:
  const ConvShape& shape_;
  const LoweredPlan& plan_;
  at::Tensor buffer_;
};

// A side-by-side band's columns (images, C*k_h*k_w, P) as the one (C*k_h*k_w, images*P) matrix they form (a view).
at::Tensor side_by_side_matrix(const at::Tensor& columns) {
  return columns.transpose(0, 1).reshape({columns.size(1), columns.size(0) * columns.size(2)});
}

// Output pixels [row0, row0+rows) of images [n0, n0+images) of an (N, channels, H_o, W_o)
// tensor, as (images*groups, channels/groups, pixels): the batch of one batched GEMM.
at::Tensor band_view(const at::Tensor& t, const ConvShape& s, int64_t n0, int64_t images, int64_t row0, int64_t rows) {
  return t.narrow(0, n0, images)
      .view({images * s.groups, t.size(1) / s.groups, s.out_h * s.out_w})
      .narrow(2, row0 * s.out_w, rows * s.out_w);
}

// Images [n0, n0+images) of an (N, channels, H, W) tensor as (images*groups, channels/groups, H*W).
at::Tensor images_view(const at::Tensor& t, const ConvShape& s, int64_t n0, int64_t images) {
  return t.narrow(0, n0, images).view({images * s.groups, t.size(1) / s.groups, t.size(2) * t.size(3)});
}

// A per-group matrix (G, a, b) shared by `images` images, as (images*G, a, b). A view (stride 0
// over the images) when G == 1 or images == 1, which is when the driver batches images.
at::Tensor per_image(const at::Tensor& m, int64_t images) {
  return m.unsqueeze(0).expand({images, m.size(0), m.size(1), m.size(2)}).reshape({-1, m.size(1), m.size(2)});
}

// When the input itself is the column matrix: calls fn(n0, images) for the plan's runs of images
// that share one batched GEMM (the weight is then shared as a view).
template <typename Fn>
void for_each_image_run(const ConvShape& s, const LoweredPlan& plan, Fn fn) {
  for (int64_t n0 = 0; n0 < s.batch; n0 += plan.images) fn(n0, std::min(plan.images, s.batch - n0));
}

LoweredPlan plan_for(const BandKernels& kernels, const ConvShape& s, Lowering lowering, const at::Tensor& t,
                     int64_t workspace_limit, bool nhwc) {
  return plan_lowered(s, lowering, t.element_size(), workspace_limit, !kernels.gpu, nhwc);
}

// The dtype col2im sums dx in: an image's first band of rows writes its dx (no zero fill), later
// bands add to it, and a sum over bands is kept in the op-math type (float for halves) and rounded
// once at the end. With one band per image (the GPU's plan, and small maps on the CPU) dx is
// written once, in its own dtype, the sum still run in the op-math type.
at::ScalarType col2im_dtype(const ConvShape& s, const LoweredPlan& plan, const at::Tensor& grad_output) {
  return plan.rows >= s.out_h ? grad_output.scalar_type() : at::toOpMathType(grad_output.scalar_type());
}

// ---- the NHWC driver (plan.h): channels_last operands and results, no layout copies ----------

// For each band: its columns unrolled from the images of `input` (NHWC), then
// fn(n0, images, row0, rows, columns).
template <typename Fn>
void unroll_nhwc_bands(const BandKernels& kernels, const ColumnBands& bands, const ConvShape& s,
                       const at::Tensor& input, Fn fn) {
  bands.for_each([&](int64_t n0, int64_t images, int64_t row0, int64_t rows, const at::Tensor& columns) {
    kernels.im2col_nhwc(input.narrow(0, n0, images), columns, s, row0, rows);
    fn(n0, images, row0, rows, columns);
  });
}

at::Tensor nhwc_forward(const BandKernels& kernels, const ConvShape& s, const LoweredPlan& plan,
                        const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                        int64_t workspace_limit) {
  at::Tensor y = at::empty(s.output_sizes(), input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const at::Tensor y_rows = nhwc_rows(y), w_rows = nhwc_weight_rows(weight);
  const int64_t k = s.out_per_group();
  auto gemm_into = [&](const at::Tensor& out, const at::Tensor& columns) {
    grouped_mm(out, columns, s.groups, [&](int64_t g) { return w_rows.narrow(0, g * k, k).t(); }, bias);
  };
  if (plan.input_is_columns) {  // the input's pixel rows are the columns: one GEMM per group, the whole batch
    gemm_into(y_rows, nhwc_rows(input));
  } else if (s.batch > 0) {
    const ColumnBands bands(s, plan, input.options(), workspace_limit);
    unroll_nhwc_bands(kernels, bands, s, input,
                      [&](int64_t n0, int64_t images, int64_t row0, int64_t rows, const at::Tensor& columns) {
                        gemm_into(band_rows(y_rows, s, n0, images, row0, rows), columns);
                      });
  }
  return y;
}

at::Tensor nhwc_backward_input(const BandKernels& kernels, const ConvShape& s, const LoweredPlan& plan,
                               const at::Tensor& grad_output, const at::Tensor& weight, int64_t workspace_limit) {
  const at::Tensor dy_rows = nhwc_rows(grad_output), w_rows = nhwc_weight_rows(weight);
  const int64_t k = s.out_per_group();
  auto weight_of = [&](int64_t g) { return w_rows.narrow(0, g * k, k); };
  const auto channels_last = grad_output.options().memory_format(at::MemoryFormat::ChannelsLast);
  if (plan.input_is_columns) {
    at::Tensor dx = at::empty(s.input_sizes(), channels_last);
    grouped_mm(nhwc_rows(dx), dy_rows, s.groups, weight_of);
    return dx;
  }
  at::Tensor dx = at::empty(s.input_sizes(), channels_last.dtype(col2im_dtype(s, plan, grad_output)));
  if (s.batch > 0) {
    const ColumnBands bands(s, plan, grad_output.options(), workspace_limit);
    bands.for_each([&](int64_t n0, int64_t images, int64_t row0, int64_t rows, const at::Tensor& columns) {
      grouped_mm(columns, band_rows(dy_rows, s, n0, images, row0, rows), s.groups, weight_of);
      kernels.col2im_nhwc(columns, dx.narrow(0, n0, images), s, row0, rows, /*accumulate=*/row0 > 0);
    });
  }
  return dx.to(grad_output.scalar_type());
}

at::Tensor nhwc_backward_weight(const BandKernels& kernels, const ConvShape& s, const LoweredPlan& plan,
                                const at::Tensor& grad_output, const at::Tensor& input, int64_t workspace_limit) {
  const at::Tensor dy_rows = nhwc_rows(grad_output.contiguous(at::MemoryFormat::ChannelsLast));
  const at::ScalarType acc_type = at::toOpMathType(input.scalar_type());
  const int64_t k = s.out_per_group(), columns_per_group = s.column_rows();
  // dW as (K, k_h*k_w*C/G) rows, the weight's NHWC order: dW_g = sum over bands of dy_g^T . columns_g,
  // the first product written, the later ones added (no zero fill). A band's pixels, of all its
  // images, are the GEMM's inner dimension, which the GEMM sums in float32 also for halves. When
  // the input is the columns, one GEMM sums the whole batch, rounded once; otherwise a band's
  // operands are widened first, as the NCHW driver's are, so that the sum over bands is float32 too.
  const bool one_gemm = plan.input_is_columns;
  at::Tensor dw_rows = at::empty({s.out_channels, columns_per_group},
                                 input.options().dtype(one_gemm ? input.scalar_type() : acc_type));
  bool written = false;
  auto accumulate = [&](const at::Tensor& dy_pixels, const at::Tensor& columns, bool widen) {
    for (int64_t g = 0; g < s.groups; ++g) {
      at::Tensor a = dy_pixels.narrow(1, g * k, k).t(), b = columns.narrow(1, g * columns_per_group,
                                                                               columns_per_group);
      if (widen) a = a.to(acc_type), b = b.to(acc_type);
      at::Tensor out = dw_rows.narrow(0, g * k, k);
      if (written) {
        out.addmm_(a, b);
      } else {
        at::mm_out(out, a, b);
      }
    }
    written = true;
  };
  if (one_gemm) {
    if (s.batch > 0) accumulate(dy_rows, nhwc_rows(input), false);
  } else if (s.batch > 0) {
    const ColumnBands bands(s, plan, input.options(), workspace_limit);
    unroll_nhwc_bands(kernels, bands, s, input,
                      [&](int64_t n0, int64_t images, int64_t row0, int64_t rows, const at::Tensor& columns) {
                        accumulate(band_rows(dy_rows, s, n0, images, row0, rows), columns,
                                   acc_type != input.scalar_type());
                      });
  }
  if (!written) dw_rows.zero_();  // no images, or no output pixels: nothing was summed
  // (K, k_h, k_w, C/G) rows are a channels_last (K, C/G, k_h, k_w) weight.
  return dw_rows.view({s.out_channels, s.kernel_h, s.kernel_w, s.in_per_group()})
      .permute({0, 3, 1, 2})
      .to(input.scalar_type());
}

}  // namespace

at::Tensor lowered_forward(const BandKernels& kernels, Lowering lowering, const at::Tensor& input,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t workspace_limit) {
  const ConvShape s = check_forward(input, weight, bias, stride, padding, dilation, groups);
  const LoweredPlan plan = plan_for(kernels, s, lowering, input, workspace_limit, runs_nhwc(kernels, input));
  const bool has_bias = bias.has_value() && bias->defined();
  if (plan.nhwc) return nhwc_forward(kernels, s, plan, input, weight, has_bias ? *bias : at::Tensor(), workspace_limit);
  const at::Tensor x = as_nchw(input);
  const at::Tensor w = weight.contiguous().view({s.groups, s.out_per_group(), s.column_rows()});
  const at::Tensor b = has_bias ? bias->view({s.groups, s.out_per_group(), 1}) : at::Tensor();
  at::Tensor y = at::empty(s.output_sizes(), input.options());

  // y_slice (images*G, K/G, pixels) = w (G, K/G, rows) . columns (images*G, rows, pixels) [+ bias]:
  // one batched GEMM over images and groups, written straight into the output, the bias as its
  // initial value.
  auto gemm_into = [&](at::Tensor y_slice, const at::Tensor& columns, int64_t images) {
    if (has_bias) {
      at::baddbmm_out(y_slice, per_image(b, images).expand_as(y_slice), per_image(w, images), columns);
    } else {
      at::bmm_out(y_slice, per_image(w, images), columns);
    }
  };
  if (plan.input_is_columns) {
    for_each_image_run(s, plan, [&](int64_t n0, int64_t images) {
      gemm_into(images_view(y, s, n0, images), images_view(x, s, n0, images), images);
    });
  } else if (s.batch > 0) {
    const ColumnBands bands(s, plan, input.options(), workspace_limit);
    bands.for_each([&](int64_t n0, int64_t images, int64_t row0, int64_t rows, const at::Tensor& columns) {
      kernels.im2col(x.narrow(0, n0, images), columns, s, row0, rows);
      if (!bands.side_by_side()) {
        gemm_into(band_view(y, s, n0, images, row0, rows),
                  columns.view({images * s.groups, s.column_rows(), rows * s.out_w}), images);
        return;
      }
      // One group, whole images side by side: one GEMM for the band, then each image's block out.
      at::Tensor out = bands.scratch(images);
      if (has_bias) {
        at::addmm_out(out, b[0], w[0], side_by_side_matrix(columns));
      } else {
        at::mm_out(out, w[0], side_by_side_matrix(columns));
      }
      images_view(y, s, n0, images).copy_(bands.scratch_by_image(images));
    });
  }
  return y.contiguous(result_format(input, weight));
}

at::Tensor lowered_backward_input(const BandKernels& kernels, Lowering lowering, const at::Tensor& grad_output,
                                  const at::Tensor& weight, at::IntArrayRef input_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                  int64_t workspace_limit) {
  const ConvShape s = check_backward_input(grad_output, weight, input_size, stride, padding, dilation, groups);
  const LoweredPlan plan =
      plan_for(kernels, s, lowering, grad_output, workspace_limit, runs_nhwc(kernels, grad_output));
  if (plan.nhwc) return nhwc_backward_input(kernels, s, plan, grad_output, weight, workspace_limit);
  const at::Tensor dy = as_nchw(grad_output);
  // (G, C/G*k_h*k_w, K/G): the transposed weight, a view (the GEMM reads it transposed).
  const at::Tensor w_t = weight.contiguous().view({s.groups, s.out_per_group(), s.column_rows()}).transpose(1, 2);
  at::Tensor dx;
  if (plan.input_is_columns) {
    dx = at::empty(s.input_sizes(), grad_output.options());
    for_each_image_run(s, plan, [&](int64_t n0, int64_t images) {
      at::Tensor dx_images = images_view(dx, s, n0, images);
      at::bmm_out(dx_images, per_image(w_t, images), images_view(dy, s, n0, images));
    });
  } else {
    dx = at::empty(s.input_sizes(), grad_output.options().dtype(col2im_dtype(s, plan, grad_output)));
    if (s.batch > 0) {
      const ColumnBands bands(s, plan, grad_output.options(), workspace_limit);
      bands.for_each([&](int64_t n0, int64_t images, int64_t row0, int64_t rows, const at::Tensor& columns) {
        if (bands.side_by_side()) {  // the band's output gradients side by side, one GEMM
          bands.scratch_by_image(images).copy_(images_view(dy, s, n0, images));
          at::Tensor column_matrix = side_by_side_matrix(columns);
          at::mm_out(column_matrix, w_t[0], bands.scratch(images));
        } else {
          at::Tensor grouped_columns = columns.view({images * s.groups, s.column_rows(), rows * s.out_w});
          at::bmm_out(grouped_columns, per_image(w_t, images), band_view(dy, s, n0, images, row0, rows));
        }
        kernels.col2im(columns, dx.narrow(0, n0, images), s, row0, rows, /*accumulate=*/row0 > 0);
      });
    }
    dx = dx.to(grad_output.scalar_type());
  }
  return dx.contiguous(result_format(grad_output, weight));
}

at::Tensor lowered_backward_weight(const BandKernels& kernels, Lowering lowering, const at::Tensor& grad_output,
                                   const at::Tensor& input, at::IntArrayRef weight_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                   int64_t workspace_limit) {
  const ConvShape s = check_backward_weight(grad_output, input, weight_size, stride, padding, dilation, groups);
  const LoweredPlan plan = plan_for(kernels, s, lowering, input, workspace_limit, runs_nhwc(kernels, input));
  if (plan.nhwc) return nhwc_backward_weight(kernels, s, plan, grad_output, input, workspace_limit);
  const at::Tensor x = as_nchw(input), dy = as_nchw(grad_output);
  const at::ScalarType acc_type = at::toOpMathType(input.scalar_type());
  // dW (G, K/G, C/G*k_h*k_w) = sum over images and bands of dy_band . columns_band^T. The first
  // product is written, the later ones added: zeroing dW first would be one more pass over it, a
  // large one for wide layers (9.4 MB at 512x512x3x3, often in fresh pages that fault when touched).
  at::Tensor dw = at::empty({s.groups, s.out_per_group(), s.column_rows()}, input.options().dtype(acc_type));
  bool written = false;
  // Half-precision operands are widened first: a per-image product rounded to bfloat16 before the
  // sum over images loses the sum's low bits when images cancel (a hypothesis draw: 9 % error).
  auto accumulate = [&](const at::Tensor& dy_slice, const at::Tensor& columns) {
    const at::Tensor a = dy_slice.to(acc_type), b = columns.transpose(1, 2).to(acc_type);
    if (written) {
      dw.baddbmm_(a, b);
    } else {
      at::bmm_out(dw, a, b);
      written = true;
    }
  };
  // A sum over images: one GEMM per image (an image's pixels are the GEMM's inner dimension).
  if (plan.input_is_columns) {
    for (int64_t n = 0; n < s.batch; ++n) accumulate(images_view(dy, s, n, 1), images_view(x, s, n, 1));
  } else if (s.batch > 0) {
    const ColumnBands bands(s, plan, input.options(), workspace_limit);
    bands.for_each([&](int64_t n0, int64_t images, int64_t row0, int64_t rows, const at::Tensor& columns) {
      kernels.im2col(x.narrow(0, n0, images), columns, s, row0, rows);
      if (bands.side_by_side()) {  // one GEMM whose inner dimension runs over all the band's pixels
        bands.scratch_by_image(images).copy_(images_view(dy, s, n0, images));
        accumulate(bands.scratch(images).unsqueeze(0), side_by_side_matrix(columns).unsqueeze(0));
        return;
      }
      for (int64_t i = 0; i < images; ++i) {
        accumulate(band_view(dy, s, n0 + i, 1, row0, rows),
                   columns[i].view({s.groups, s.column_rows(), rows * s.out_w}));
      }
    });
  }
  if (!written) dw.zero_();  // no images, or no output pixels: nothing was summed
  return dw.to(input.scalar_type()).view(s.weight_sizes()).contiguous(result_format(input, grad_output));
}

}  // namespace channelconv
