#include "lowered.h"

#include <ATen/OpMathType.h>

namespace channelconv {
namespace {

void check_lowering(Lowering lowering, const ConvShape& s, at::IntArrayRef weight_sizes, int64_t workspace_limit) {
  if (lowering == Lowering::OneByOne) {
    TORCH_CHECK_VALUE(s.kernel_h == 1 && s.kernel_w == 1, "channelconv: algorithm '1x1' accepts only 1x1 kernels, ",
                      "but got weight of size ", weight_sizes, " (a ", s.kernel_h, "x", s.kernel_w,
                      " kernel); use algorithm='im2col' or 'direct'");
  }
  TORCH_CHECK_VALUE(workspace_limit > 0, "channelconv: workspace_limit must be a positive number of bytes, got ",
                    "workspace_limit=", workspace_limit);
}

// With a 1x1 kernel, stride 1 and no padding, each image (C, H*W) already is its column
// matrix: the GEMM reads the input where it lies. (Dilation does not move a 1x1 tap.)
bool input_is_columns(Lowering lowering, const ConvShape& s) {
  return lowering == Lowering::OneByOne && s.stride[0] == 1 && s.stride[1] == 1 && s.padding[0] == 0 &&
         s.padding[1] == 0;
}

// channels_last data of a 1x1, stride-1, unpadded, single-group convolution is already a row-major
// (N*H*W, C) matrix: one GEMM over the whole batch, no copy in or out, the output channels_last.
bool nhwc_gemm(Lowering lowering, const ConvShape& s, std::initializer_list<at::Tensor> operands) {
  if (!input_is_columns(lowering, s) || s.groups != 1) return false;
  for (const at::Tensor& t : operands) {
    if (!t.is_contiguous(at::MemoryFormat::ChannelsLast) || t.is_contiguous()) return false;
  }
  return true;
}

// (N, C, H, W) channels_last as its (N*H*W, C) matrix (a view).
at::Tensor nhwc_rows(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

// One column buffer, reused for every band of output rows of every image.
class ColumnBands {
 public:
  ColumnBands(const ConvShape& s, const at::TensorOptions& options, int64_t workspace_limit)
      : shape_(s), rows_(rows_per_band(s, options.dtype().itemsize(), workspace_limit)) {
    const int64_t numel = s.in_channels * s.kernel_h * s.kernel_w * rows_ * s.out_w;
    const int64_t bytes = numel * static_cast<int64_t>(options.dtype().itemsize());
    try {
      buffer_ = at::empty({numel}, options);
    } catch (const c10::Error& e) {  // the allocator's "can't allocate memory" (a c10::Error on the CPU)
      TORCH_CHECK_WITH(OutOfMemoryError, false, "channelconv: cannot allocate the im2col workspace: a column buffer of ",
                       bytes, " bytes (", rows_, " output row(s); workspace limit ", workspace_limit,
                       " bytes) could not be allocated; use algorithm='direct', which needs no workspace, or free ",
                       "memory. Allocator: ", e.what_without_backtrace());
    }
    note_workspace(bytes);
  }

  // Calls fn(row0, rows, columns) for each band of output rows; columns is (C*k_h*k_w, rows*W_o).
  template <typename Fn>
  void for_each(Fn fn) const {
    const int64_t column_rows = shape_.in_channels * shape_.kernel_h * shape_.kernel_w;
    for (int64_t row0 = 0; row0 < shape_.out_h; row0 += rows_) {
      const int64_t rows = std::min(rows_, shape_.out_h - row0);
      fn(row0, rows, buffer_.narrow(0, 0, column_rows * rows * shape_.out_w).view({column_rows, rows * shape_.out_w}));
    }
  }

 private:
  const ConvShape& shape_;
  int64_t rows_;
  at::Tensor buffer_;
};

// Image n's output-pixel range [row0, row0+rows) of a (N, channels, H_o, W_o) tensor, as (groups, channels/groups, pixels).
at::Tensor band_view(const at::Tensor& t, int64_t n, const ConvShape& s, int64_t row0, int64_t rows) {
  return t[n].view({s.groups, t.size(1) / s.groups, s.out_h * s.out_w}).narrow(2, row0 * s.out_w, rows * s.out_w);
}

// Image n of an (N, channels, H, W) tensor as (groups, channels/groups, H*W).
at::Tensor group_view(const at::Tensor& t, int64_t n, int64_t groups) {
  return t[n].view({groups, t.size(1) / groups, t.size(2) * t.size(3)});
}

}  // namespace

at::Tensor lowered_forward(const BandKernels& kernels, Lowering lowering, const at::Tensor& input,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t workspace_limit) {
  const ConvShape s = check_forward(input, weight, bias, stride, padding, dilation, groups);
  check_lowering(lowering, s, weight.sizes(), workspace_limit);
  const bool has_bias = bias.has_value() && bias->defined();
  if (nhwc_gemm(lowering, s, {input})) {
    at::Tensor y = at::empty(s.output_sizes(), input.options().memory_format(at::MemoryFormat::ChannelsLast));
    at::Tensor y_rows = nhwc_rows(y);
    const at::Tensor w_t = weight.reshape({s.out_channels, s.in_channels}).t();
    if (has_bias) {
      at::addmm_out(y_rows, *bias, nhwc_rows(input), w_t);
    } else {
      at::mm_out(y_rows, nhwc_rows(input), w_t);
    }
    return y;
  }
  const at::Tensor x = as_nchw(input);
  const at::Tensor w = weight.contiguous().view({s.groups, s.out_per_group(), s.column_rows()});
  const at::Tensor b = has_bias ? bias->view({s.groups, s.out_per_group(), 1}) : at::Tensor();
  at::Tensor y = at::empty(s.output_sizes(), input.options());

  // y_slice (G, K/G, pixels) = w (G, K/G, rows) . columns (G, rows, pixels) [+ bias]: one batched
  // GEMM over the groups, written straight into the output, the bias as its initial value.
  auto gemm_into = [&](at::Tensor y_slice, const at::Tensor& columns) {
    if (has_bias) {
      at::baddbmm_out(y_slice, b.expand_as(y_slice), w, columns);
    } else {
      at::bmm_out(y_slice, w, columns);
    }
  };
  if (input_is_columns(lowering, s)) {
    for (int64_t n = 0; n < s.batch; ++n) gemm_into(group_view(y, n, s.groups), group_view(x, n, s.groups));
  } else if (s.batch > 0) {
    const ColumnBands bands(s, input.options(), workspace_limit);
    for (int64_t n = 0; n < s.batch; ++n) {
      bands.for_each([&](int64_t row0, int64_t rows, const at::Tensor& columns) {
        kernels.im2col(x[n], columns, s, row0, rows);
        gemm_into(band_view(y, n, s, row0, rows), columns.view({s.groups, s.column_rows(), rows * s.out_w}));
      });
    }
  }
  return y.contiguous(result_format(input, weight));
}

at::Tensor lowered_backward_input(const BandKernels& kernels, Lowering lowering, const at::Tensor& grad_output,
                                  const at::Tensor& weight, at::IntArrayRef input_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                  int64_t workspace_limit) {
  const ConvShape s = check_backward_input(grad_output, weight, input_size, stride, padding, dilation, groups);
  check_lowering(lowering, s, weight.sizes(), workspace_limit);
  const at::Tensor dy = as_nchw(grad_output);
  // (G, C/G*k_h*k_w, K/G): the transposed weight, a view (the GEMM reads it transposed).
  const at::Tensor w_t = weight.contiguous().view({s.groups, s.out_per_group(), s.column_rows()}).transpose(1, 2);
  at::Tensor dx;
  if (nhwc_gemm(lowering, s, {grad_output})) {
    dx = at::empty(s.input_sizes(), grad_output.options().memory_format(at::MemoryFormat::ChannelsLast));
    at::Tensor dx_rows = nhwc_rows(dx);
    at::mm_out(dx_rows, nhwc_rows(grad_output), weight.reshape({s.out_channels, s.in_channels}));
    return dx;
  }
  if (input_is_columns(lowering, s)) {
    dx = at::empty(s.input_sizes(), grad_output.options());
    for (int64_t n = 0; n < s.batch; ++n) {
      at::Tensor dx_n = group_view(dx, n, s.groups);
      at::bmm_out(dx_n, w_t, group_view(dy, n, s.groups));
    }
  } else {
    // col2im adds band after band into dx: accumulate in the op-math type (float for halves).
    dx = at::zeros(s.input_sizes(), grad_output.options().dtype(at::toOpMathType(grad_output.scalar_type())));
    if (s.batch > 0) {
      const ColumnBands bands(s, grad_output.options(), workspace_limit);
      for (int64_t n = 0; n < s.batch; ++n) {
        bands.for_each([&](int64_t row0, int64_t rows, const at::Tensor& columns) {
          at::Tensor grouped_columns = columns.view({s.groups, s.column_rows(), rows * s.out_w});
          at::bmm_out(grouped_columns, w_t, band_view(dy, n, s, row0, rows));
          kernels.col2im(columns, dx[n], s, row0, rows);
        });
      }
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
  check_lowering(lowering, s, weight_size, workspace_limit);
  if (nhwc_gemm(lowering, s, {input, grad_output})) {  // dW (K, C) = dy_rows^T . x_rows over the whole batch
    return at::mm(nhwc_rows(grad_output).t(), nhwc_rows(input)).view(s.weight_sizes());
  }
  const at::Tensor x = as_nchw(input), dy = as_nchw(grad_output);
  const at::ScalarType acc_type = at::toOpMathType(input.scalar_type());
  // dW (G, K/G, C/G*k_h*k_w) = sum over images and bands of dy_band . columns_band^T.
  at::Tensor dw = at::zeros({s.groups, s.out_per_group(), s.column_rows()}, input.options().dtype(acc_type));
  auto accumulate = [&](const at::Tensor& dy_slice, const at::Tensor& columns) {
    if (acc_type == input.scalar_type()) {
      dw.baddbmm_(dy_slice, columns.transpose(1, 2));
    } else {
      dw.add_(at::bmm(dy_slice, columns.transpose(1, 2)));
    }
  };
  if (input_is_columns(lowering, s)) {
    for (int64_t n = 0; n < s.batch; ++n) accumulate(group_view(dy, n, s.groups), group_view(x, n, s.groups));
  } else if (s.batch > 0) {
    const ColumnBands bands(s, input.options(), workspace_limit);
    for (int64_t n = 0; n < s.batch; ++n) {
      bands.for_each([&](int64_t row0, int64_t rows, const at::Tensor& columns) {
        kernels.im2col(x[n], columns, s, row0, rows);
        accumulate(band_view(dy, n, s, row0, rows), columns.view({s.groups, s.column_rows(), rows * s.out_w}));
      });
    }
  }
  return dw.to(input.scalar_type()).view(s.weight_sizes()).contiguous(result_format(input, grad_output));
}

}  // namespace channelconv
