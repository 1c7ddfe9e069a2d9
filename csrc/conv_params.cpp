#include "conv_params.h"

#include <atomic>

namespace channelconv {

namespace {

std::string sizes_str(at::IntArrayRef sizes) { return c10::str(sizes); }

void check_pair(at::IntArrayRef values, const char* name) {
  TORCH_CHECK_VALUE(values.size() == 2, "channelconv: expected ", name, " to have 2 elements (height, width), got ",
                    name, "=", sizes_str(values));
  // Bounded so that the size arithmetic below cannot overflow int64.
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(values[0] <= kMax && values[1] <= kMax, "channelconv: ", name, "=", sizes_str(values),
                    " is too large (at most ", kMax, ")");
}

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

ConvShape make_shape(at::IntArrayRef input_sizes, at::IntArrayRef weight_sizes, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_pair(stride, "stride");
  check_pair(padding, "padding");
  check_pair(dilation, "dilation");
  TORCH_CHECK(input_sizes.size() == 4, "channelconv: expected 4-D input (N, C, H, W), but got input of size: ",
              sizes_str(input_sizes));
  TORCH_CHECK(weight_sizes.size() == 4, "channelconv: expected 4-D weight (C_out, C_in / groups, k_h, k_w), ",
              "but got weight of size: ", sizes_str(weight_sizes));
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0, "non-positive stride is not supported: stride=",
                    sizes_str(stride));
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "negative padding is not supported: padding=",
                    sizes_str(padding));
  TORCH_CHECK_VALUE(dilation[0] > 0 && dilation[1] > 0, "dilation should be greater than zero: dilation=",
                    sizes_str(dilation));
  TORCH_CHECK_VALUE(groups > 0, "non-positive groups is not supported: groups=", groups);
  for (int64_t d : input_sizes) {
    TORCH_CHECK(d >= 0, "channelconv: input has a negative size: ", sizes_str(input_sizes));
  }
  for (int64_t d : weight_sizes) {
    TORCH_CHECK(d >= 0, "channelconv: weight has a negative size: ", sizes_str(weight_sizes));
  }

  ConvShape s;
  s.batch = input_sizes[0];
  s.in_channels = input_sizes[1];
  s.in_h = input_sizes[2];
  s.in_w = input_sizes[3];
  s.out_channels = weight_sizes[0];
  s.kernel_h = weight_sizes[2];
  s.kernel_w = weight_sizes[3];
  s.groups = groups;
  s.stride = {stride[0], stride[1]};
  s.padding = {padding[0], padding[1]};
  s.dilation = {dilation[0], dilation[1]};

  TORCH_CHECK(s.kernel_h > 0 && s.kernel_w > 0, "channelconv: weight must have a non-empty kernel, but got weight of size ",
              sizes_str(weight_sizes));
  TORCH_CHECK(s.out_channels >= groups, "Given groups=", groups, ", expected weight to be at least ", groups,
              " at dimension 0, but got weight of size ", sizes_str(weight_sizes), " instead");
  TORCH_CHECK(s.out_channels % groups == 0, "Given groups=", groups, ", expected weight to be divisible by ", groups,
              " at dimension 0, but got weight of size ", sizes_str(weight_sizes), " instead");
  TORCH_CHECK(s.in_channels == weight_sizes[1] * groups, "Given groups=", groups, ", weight of size ",
              sizes_str(weight_sizes), ", expected input", sizes_str(input_sizes), " to have ",
              weight_sizes[1] * groups, " channels, but got ", s.in_channels, " channels instead");
  TORCH_CHECK(s.in_channels > 0, "channelconv: input must have at least one channel, but got input of size ",
              sizes_str(input_sizes));

  const int64_t padded_h = s.in_h + 2 * s.padding[0];
  const int64_t padded_w = s.in_w + 2 * s.padding[1];
  const int64_t extent_h = s.dilation[0] * (s.kernel_h - 1) + 1;
  const int64_t extent_w = s.dilation[1] * (s.kernel_w - 1) + 1;
  TORCH_CHECK(padded_h >= extent_h && padded_w >= extent_w, "Calculated padded input size per channel: (", padded_h,
              " x ", padded_w, "). Kernel size: (", extent_h, " x ", extent_w,
              "). Kernel size can't be greater than actual input size");
  // As F.conv2d: an image with no pixels is only accepted in an empty batch.
  TORCH_CHECK(s.batch == 0 || (s.in_h > 0 && s.in_w > 0),
              "Only zero batch or zero channel inputs are supported, but got input shape: ", sizes_str(input_sizes));
  s.out_h = output_extent(s.in_h, s.kernel_h, s.stride[0], s.padding[0], s.dilation[0]);
  s.out_w = output_extent(s.in_w, s.kernel_w, s.stride[1], s.padding[1], s.dilation[1]);
  return s;
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.defined(), "channelconv: ", name, " is undefined");
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), "channelconv: ", name, " has unsupported dtype ",
                   t.scalar_type(), "; supported: Float, Double, BFloat16, Half");
  TORCH_CHECK(t.layout() == at::kStrided, "channelconv: ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  if (&t != &like) {
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), "channelconv: expected ", name, " and ", like_name,
                " to have the same dtype, but got ", name, " ", t.scalar_type(), " and ", like_name, " ",
                like.scalar_type());
    TORCH_CHECK(t.device() == like.device(), "channelconv: expected ", name, " and ", like_name,
                " to be on the same device, but got ", name, " on ", t.device(), " and ", like_name, " on ",
                like.device());
  }
}

ConvShape check_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_tensor(input, "input", input, "input");
  check_tensor(weight, "weight", input, "input");
  ConvShape s = make_shape(input.sizes(), weight.sizes(), stride, padding, dilation, groups);
  if (bias.has_value() && bias->defined()) {
    check_tensor(*bias, "bias", input, "input");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.out_channels, "Given weight of size ",
                sizes_str(weight.sizes()), ", expected bias to be 1-dimensional with ", s.out_channels,
                " elements, but got bias of size ", sizes_str(bias->sizes()), " instead");
  }
  return s;
}

namespace {
void check_grad_output(const at::Tensor& grad_output, const ConvShape& s) {
  const auto expected = s.output_sizes();
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), "channelconv: expected grad_output of size ",
              sizes_str(expected), " for this convolution, but got grad_output of size ",
              sizes_str(grad_output.sizes()));
}
}  // namespace

ConvShape check_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  check_tensor(grad_output, "grad_output", grad_output, "grad_output");
  check_tensor(weight, "weight", grad_output, "grad_output");
  ConvShape s = make_shape(input_size, weight.sizes(), stride, padding, dilation, groups);
  check_grad_output(grad_output, s);
  return s;
}

ConvShape check_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  check_tensor(grad_output, "grad_output", grad_output, "grad_output");
  check_tensor(input, "input", grad_output, "grad_output");
  ConvShape s = make_shape(input.sizes(), weight_size, stride, padding, dilation, groups);
  check_grad_output(grad_output, s);
  return s;
}

at::MemoryFormat result_format(const at::Tensor& a, const at::Tensor& b) {
  // On CUDA, F.conv2d computes float64 in NCHW whatever its operands' formats (cuDNN's
  // channels_last path takes no doubles).
  if (a.is_cuda() && (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble)) {
    return at::MemoryFormat::Contiguous;
  }
  const bool channels_last = a.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                             b.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

namespace {
std::atomic<int64_t> peak_workspace_bytes{0};
}

void note_workspace(int64_t bytes) {
  int64_t seen = peak_workspace_bytes.load();
  while (bytes > seen && !peak_workspace_bytes.compare_exchange_weak(seen, bytes)) {
  }
}
int64_t workspace_peak() { return peak_workspace_bytes.load(); }
void reset_workspace_peak() { peak_workspace_bytes.store(0); }

}  // namespace channelconv
