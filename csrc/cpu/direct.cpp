// Direct convolution on the CPU: loops over output (or input / weight) elements, no copies,
// no workspace beyond one accumulator plane per thread.
//
// Every loop over output positions runs over the range whose taps read real input (Axis::first_valid
// / last_valid), so the innermost loop has no bounds test and the compiler can vectorise it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../conv_params.h"
#include "blocked.h"

namespace channelconv {
namespace {

using Geo = Geometry<int64_t>;

// For one (image, output channel) plane: acc[ho, wo] += sum_c,r,s w[c, r, s] * x[c, hi, wi].
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void accumulate_output_plane(acc_t* acc, const scalar_t* x_group, const scalar_t* w_k, int64_t channels, const Geo& g) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* x_c = x_group + c * g.in_area();
    for (int64_t r = 0; r < g.h.taps; ++r) {
      const int64_t ho_end = g.h.last_valid(r);
      for (int64_t t = 0; t < g.w.taps; ++t) {
        const acc_t wv = static_cast<acc_t>(w_k[(c * g.h.taps + r) * g.w.taps + t]);
        const int64_t wo_begin = g.w.first_valid(t), wo_end = g.w.last_valid(t);
        const int64_t wi_offset = g.w.input_at(0, t);  // wi = wo * stride + wi_offset
        for (int64_t ho = g.h.first_valid(r); ho < ho_end; ++ho) {
          const int64_t x_row = g.h.input_at(ho, r) * g.w.in + wi_offset;
          acc_t* acc_row = acc + ho * g.w.out;
          for (int64_t wo = wo_begin; wo < wo_end; ++wo) {
            acc_row[wo] += wv * static_cast<acc_t>(x_c[x_row + wo * g.w.stride]);
          }
        }
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// float32 planes the blocked kernel leaves to the plain loops (depthwise, narrow groups): compiled
// for AVX-512 and AVX2 as well, the best clone picked at load time (GCC function multiversioning).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void accumulate_output_plane_f32(float* acc, const float* x_group, const float* w_k, int64_t channels, const Geo& g) {
  accumulate_output_plane<float, float>(acc, x_group, w_k, channels, g);
}
#define CHANNELCONV_PLANE_CLONES 1
#endif

template <typename scalar_t, typename acc_t>
void output_plane(acc_t* acc, const scalar_t* x_group, const scalar_t* w_k, int64_t channels, const Geo& g) {
#ifdef CHANNELCONV_PLANE_CLONES
  if constexpr (std::is_same_v<scalar_t, float>) {
    accumulate_output_plane_f32(acc, x_group, w_k, channels, g);
    return;
  }
#endif
  accumulate_output_plane<scalar_t, acc_t>(acc, x_group, w_k, channels, g);
}

template <typename scalar_t>
void forward_kernel(const scalar_t* x, const scalar_t* w, const scalar_t* bias, scalar_t* y, const ConvShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geo g = s.geometry<int64_t>();
  const int64_t in_per_group = s.in_per_group(), out_per_group = s.out_per_group();
  const int64_t weight_per_k = in_per_group * g.kernel_area();
  at::parallel_for(0, s.batch * s.out_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(g.out_area());
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / s.out_channels, k = nk % s.out_channels;
      const int64_t group = k / out_per_group;
      std::fill(acc.begin(), acc.end(), bias ? static_cast<acc_t>(bias[k]) : acc_t(0));
      output_plane<scalar_t, acc_t>(acc.data(), x + (n * s.in_channels + group * in_per_group) * g.in_area(),
                                    w + k * weight_per_k, in_per_group, g);
      std::copy(acc.begin(), acc.end(), y + nk * g.out_area());
    }
  });
}

// Input gradient, one (image, input channel) plane per task: every output element that read
// x[c, hi, wi] through tap (r, s) sends back w[k, c, r, s] * dy[k, ho, wo]. The plane belongs to
// one task, so the scatter inside it needs no atomics and the sum order is fixed.
template <typename scalar_t>
void backward_input_kernel(const scalar_t* dy, const scalar_t* w, scalar_t* dx, const ConvShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geo g = s.geometry<int64_t>();
  const int64_t in_per_group = s.in_per_group(), out_per_group = s.out_per_group();
  at::parallel_for(0, s.batch * s.in_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc_plane(g.in_area());
    acc_t* acc = acc_plane.data();
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / s.in_channels, c = nc % s.in_channels;
      const int64_t group = c / in_per_group, c_in_group = c % in_per_group;
      std::fill(acc, acc + g.in_area(), acc_t(0));
      for (int64_t k = group * out_per_group; k < (group + 1) * out_per_group; ++k) {
        const scalar_t* dy_k = dy + (n * s.out_channels + k) * g.out_area();
        const scalar_t* w_kc = w + (k * in_per_group + c_in_group) * g.kernel_area();
        for (int64_t r = 0; r < g.h.taps; ++r) {
          const int64_t ho_end = g.h.last_valid(r);
          for (int64_t t = 0; t < g.w.taps; ++t) {
            const acc_t wv = static_cast<acc_t>(w_kc[r * g.w.taps + t]);
            const int64_t wo_begin = g.w.first_valid(t), wo_end = g.w.last_valid(t);
            const int64_t wi_offset = g.w.input_at(0, t);
            for (int64_t ho = g.h.first_valid(r); ho < ho_end; ++ho) {
              const int64_t acc_row = g.h.input_at(ho, r) * g.w.in + wi_offset;
              const scalar_t* dy_row = dy_k + ho * g.w.out;
              for (int64_t wo = wo_begin; wo < wo_end; ++wo) {
                acc[acc_row + wo * g.w.stride] += wv * static_cast<acc_t>(dy_row[wo]);
              }
            }
          }
        }
      }
      std::copy(acc, acc + g.in_area(), dx + nc * g.in_area());
    }
  });
}

// One (output channel, input channel) pair's k_h x k_w weight-gradient taps: for each tap, the sum
// over the batch and the output plane of dy[n, ho, wo] * x[n, ih(ho), iw(wo)], kept in kLanes
// independent partial sums (lane j: the columns wo = j mod kLanes of each row) so that the compiler
// vectorises the rows (one accumulator is a chain of dependent additions it may not reorder: the
// plain loops ran at 2-3 GFLOP/s). The lanes are added in a fixed order at the end, so the result
// does not depend on the thread count.
constexpr int kLanes = 16;

template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void weight_taps_of_pair(acc_t* taps, acc_t* lanes, const scalar_t* dy_k,
                                                               const scalar_t* x_c, int64_t batch, int64_t dy_image,
                                                               int64_t x_image, const Geo& g) {
  std::fill(lanes, lanes + g.kernel_area() * kLanes, acc_t(0));
  for (int64_t n = 0; n < batch; ++n) {  // image by image: its two planes stay in cache for every tap
    const scalar_t* dy_n = dy_k + n * dy_image;
    const scalar_t* x_n = x_c + n * x_image;
    for (int64_t r = 0; r < g.h.taps; ++r) {
      const int64_t ho_begin = g.h.first_valid(r), ho_end = g.h.last_valid(r);
      for (int64_t t = 0; t < g.w.taps; ++t) {
        const int64_t wo_begin = g.w.first_valid(t), wo_end = g.w.last_valid(t);
        const int64_t wi_offset = g.w.input_at(0, t), stride = g.w.stride;
        acc_t* tap_lanes = lanes + (r * g.w.taps + t) * kLanes;
        if (wo_end - wo_begin < kLanes) {  // rows shorter than the lanes: one running sum does better
          acc_t sum = 0;
          for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
            const scalar_t* dy_row = dy_n + ho * g.w.out;
            const int64_t x_row = g.h.input_at(ho, r) * g.w.in + wi_offset;
            for (int64_t wo = wo_begin; wo < wo_end; ++wo)
              sum += static_cast<acc_t>(dy_row[wo]) * static_cast<acc_t>(x_n[x_row + wo * stride]);
          }
          tap_lanes[0] += sum;
          continue;
        }
        acc_t l[kLanes];
        std::copy(tap_lanes, tap_lanes + kLanes, l);
        for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
          const scalar_t* dy_row = dy_n + ho * g.w.out;
          const int64_t x_row = g.h.input_at(ho, r) * g.w.in + wi_offset;  // (it may start in the padding)
          int64_t wo = wo_begin;
          for (; wo + kLanes <= wo_end; wo += kLanes) {
            for (int j = 0; j < kLanes; ++j)
              l[j] += static_cast<acc_t>(dy_row[wo + j]) * static_cast<acc_t>(x_n[x_row + (wo + j) * stride]);
          }
          for (int j = 0; wo + j < wo_end; ++j)
            l[j] += static_cast<acc_t>(dy_row[wo + j]) * static_cast<acc_t>(x_n[x_row + (wo + j) * stride]);
        }
        std::copy(l, l + kLanes, tap_lanes);
      }
    }
  }
  for (int64_t tap = 0; tap < g.kernel_area(); ++tap) {
    acc_t sum = 0;
    for (int j = 0; j < kLanes; ++j) sum += lanes[tap * kLanes + j];
    taps[tap] = sum;
  }
}

#ifdef CHANNELCONV_PLANE_CLONES
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void weight_taps_of_pair_f32(float* taps, float* lanes, const float* dy_k, const float* x_c, int64_t batch,
                             int64_t dy_image, int64_t x_image, const Geo& g) {
  weight_taps_of_pair<float, float>(taps, lanes, dy_k, x_c, batch, dy_image, x_image, g);
}
#endif

// Weight gradient, one (output channel, input channel of its group) pair per task: its k_h x k_w
// taps are sums over the batch and the output plane. Each task owns its slice of dW, so there
// is no reduction across threads and the result is deterministic.
template <typename scalar_t>
void backward_weight_kernel(const scalar_t* dy, const scalar_t* x, scalar_t* dw, const ConvShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geo g = s.geometry<int64_t>();
  const int64_t in_per_group = s.in_per_group(), out_per_group = s.out_per_group();
  const int64_t dy_image = s.out_channels * g.out_area(), x_image = s.in_channels * g.in_area();
  at::parallel_for(0, s.out_channels * in_per_group, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> taps(g.kernel_area()), lanes(g.kernel_area() * kLanes);
    for (int64_t kc = begin; kc < end; ++kc) {
      const int64_t k = kc / in_per_group, c = (k / out_per_group) * in_per_group + kc % in_per_group;
      const scalar_t* dy_k = dy + k * g.out_area();
      const scalar_t* x_c = x + c * g.in_area();
#ifdef CHANNELCONV_PLANE_CLONES
      if constexpr (std::is_same_v<scalar_t, float>) {
        weight_taps_of_pair_f32(taps.data(), lanes.data(), dy_k, x_c, s.batch, dy_image, x_image, g);
      } else
#endif
      {
        weight_taps_of_pair<scalar_t, acc_t>(taps.data(), lanes.data(), dy_k, x_c, s.batch, dy_image, x_image, g);
      }
      for (int64_t tap = 0; tap < g.kernel_area(); ++tap)
        dw[kc * g.kernel_area() + tap] = static_cast<scalar_t>(taps[tap]);
    }
  });
}

// On an AVX-512 CPU: the register-blocked engines (blocked.h), as plan_direct decides. They compute
// in float32. The blocked and depthwise correlations and the blocked weight gradient read their
// operands where they lie (NCHW or channels_last, float32 or half precision) and write F.conv2d's
// memory format (activations.h); the row engine takes float32 only, in NCHW (a copy where the
// operand is channels_last).

// The packed weight is rebuilt on every call, into a buffer each calling thread keeps. (A cache
// keyed on the weight's version was tried and dropped: writes through `.data` do not bump the
// version, so it could return a stale packing, a silently wrong answer.)

// The plan's correlations: the forward pass, or the input gradient one stride phase at a time.
// w and init are float32.
void run_blocked(const DirectPlan& plan, const at::Tensor& in, const at::Tensor& w, const float* init,
                 const at::Tensor& out) {
  at::Tensor in_source, out_source;
  const Activations in_act = activations_of(in, in_source), out_act = activations_of(out, out_source);
  for (const BlockedRun& run : plan.runs) {
    if (plan.kernel == DirectKernel::Depthwise) {  // (packs its 16 channels' taps per task)
      depthwise_correlation(run, in_act, w.const_data_ptr<float>(), init, out_act);
      continue;
    }
    float* packed = thread_buffer(Scratch::PackedWeights, run.problem.packed_weight_floats());
    pack_blocked_weight(run.problem, w.const_data_ptr<float>(), run.taps, packed);
    blocked_correlation(run, in_act, packed, init, out_act);
  }
}

DirectPlan plan_for(const ConvShape& s, DirectPass pass, const at::Tensor& t) {
  return plan_direct(s, pass, t.scalar_type(), at::get_num_threads());
}

// The input gradient on the plain loops at stride > 1 (few input channels per group, other dtypes,
// or no AVX-512): scattering with a stride does not vectorise. Each of the plan's phases is a
// stride-1 correlation of grad_output with its flipped sub-kernel (plan.h, Phase): the forward
// plane loop, vectorised along the row, computes it into a compact plane, which is then placed
// into dx. One (image, input channel) per task.
template <typename scalar_t>
void backward_input_phases(const scalar_t* dy, const scalar_t* w, scalar_t* dx, const ConvShape& s,
                           const std::vector<Phase>& phases) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t in_per_group = s.in_per_group(), out_per_group = s.out_per_group();
  const int64_t in_area = s.in_h * s.in_w, out_area = s.out_h * s.out_w;
  at::parallel_for(0, s.batch * s.in_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc;
    std::vector<scalar_t> sub_kernel;
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / s.in_channels, c = nc % s.in_channels, group = c / in_per_group;
      scalar_t* dx_plane = dx + nc * in_area;
      std::fill(dx_plane, dx_plane + in_area, scalar_t(0));  // phases no tap reaches stay zero
      for (const Phase& phase : phases) {
        const PhaseAxis &a = phase.a, &b = phase.b;
        // The phase as a forward problem: grad_output (out_per_group channels) in, the phase's
        // compact plane out; tap t reads grad_output at o + offset + t * dilation.
        const Geo g{{s.out_h, a.out, a.taps, 1, -a.offset, a.dilation},
                    {s.out_w, b.out, b.taps, 1, -b.offset, b.dilation}};
        sub_kernel.resize(out_per_group * a.taps * b.taps);
        for (int64_t k = 0; k < out_per_group; ++k)
          for (int64_t t = 0; t < a.taps; ++t)
            for (int64_t u = 0; u < b.taps; ++u)
              sub_kernel[(k * a.taps + t) * b.taps + u] =
                  w[(((group * out_per_group + k) * in_per_group + c % in_per_group) * s.kernel_h + a.first_tap -
                     t * a.tap_step) * s.kernel_w + b.first_tap - u * b.tap_step];
        acc.assign(a.out * b.out, acc_t(0));
        output_plane<scalar_t, acc_t>(acc.data(), dy + (n * s.out_channels + group * out_per_group) * out_area,
                                      sub_kernel.data(), out_per_group, g);
        for (int64_t i = 0; i < a.out; ++i)
          for (int64_t j = 0; j < b.out; ++j)
            dx_plane[(phase.h + i * s.stride[0]) * s.in_w + phase.w + j * s.stride[1]] =
                static_cast<scalar_t>(acc[i * b.out + j]);
      }
    }
  });
}

#define CHANNELCONV_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, __VA_ARGS__)

at::Tensor direct_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvShape s = check_forward(input, weight, bias, stride, padding, dilation, groups);
  DirectPlan plan = plan_for(s, DirectPass::Forward, input);
  const at::MemoryFormat format = result_format(input, weight);
  const bool has_bias = bias.has_value() && bias->defined();
  if (plan.kernel == DirectKernel::Amx) {
    const at::Tensor y = amx_forward(input, weight, has_bias ? *bias : at::Tensor(), s, format);
    if (y.defined()) return y;
    plan = plan_forward_engines(s, input.scalar_type(), at::get_num_threads());
  }
  if (plan.kernel == DirectKernel::Blocked || plan.kernel == DirectKernel::Depthwise) {
    const at::Tensor b = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor y = at::empty(s.output_sizes(), input.options().memory_format(format));
    run_blocked(plan, input, weight.to(at::kFloat).contiguous(), has_bias ? b.const_data_ptr<float>() : nullptr, y);
    return y;
  }
  const at::Tensor x = as_nchw(input), w = weight.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(s.output_sizes(), input.options());
  CHANNELCONV_DISPATCH(input.scalar_type(), "channelconv::direct_forward", [&] {
    forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                             has_bias ? b.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), s);
  });
  return y.contiguous(format);
}

at::Tensor direct_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  const ConvShape s = check_backward_input(grad_output, weight, input_size, stride, padding, dilation, groups);
  const DirectPlan plan = plan_for(s, DirectPass::InputGrad, grad_output);
  const at::MemoryFormat format = result_format(grad_output, weight);
  if (plan.kernel == DirectKernel::Amx) return amx_input_grad(grad_output, weight, s, format);
  if (plan.kernel == DirectKernel::Blocked || plan.kernel == DirectKernel::Depthwise) {
    at::Tensor dx = at::empty(s.input_sizes(), grad_output.options().memory_format(format));
    if (!input_grad_phases_cover(s, plan.phases)) dx.zero_();  // phases no tap reaches stay zero
    run_blocked(plan, grad_output, weight.to(at::kFloat).contiguous(), nullptr, dx);
    return dx;
  }
  const at::Tensor dy = as_nchw(grad_output), w = weight.contiguous();
  at::Tensor dx = at::empty(s.input_sizes(), grad_output.options());
  CHANNELCONV_DISPATCH(grad_output.scalar_type(), "channelconv::direct_backward_input", [&] {
    if (plan.kernel == DirectKernel::LoopPhases) {
      backward_input_phases<scalar_t>(dy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                      dx.mutable_data_ptr<scalar_t>(), s, plan.phases);
    } else {
      backward_input_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                      dx.mutable_data_ptr<scalar_t>(), s);
    }
  });
  return dx.contiguous(format);
}

at::Tensor direct_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  const ConvShape s = check_backward_weight(grad_output, input, weight_size, stride, padding, dilation, groups);
  DirectPlan plan = plan_for(s, DirectPass::WeightGrad, input);
  const at::MemoryFormat format = result_format(input, grad_output);
  if (plan.kernel == DirectKernel::Amx) {
    const at::Tensor dw = amx_weight_grad(grad_output, input, s);
    if (dw.defined()) return dw.to(input.scalar_type()).contiguous(format);
    plan = plan_weight_grad_engines(s, input.scalar_type(), at::get_num_threads());
  }
  // The engines sum dW in float32 across the whole batch and round it to the dtype once.
  if (plan.kernel == DirectKernel::BlockedWeightGrad || plan.kernel == DirectKernel::RowWeightGrad) {
    at::Tensor dw = at::empty(s.weight_sizes(), input.options().dtype(at::kFloat));
    at::Tensor dy_source, x_source;
    const Activations dy = activations_of(grad_output, dy_source), x = activations_of(input, x_source);
    if (plan.kernel == DirectKernel::BlockedWeightGrad) {
      blocked_weight_grad(plan.grad_problem, plan.chunks, dy, x, dw.mutable_data_ptr<float>());
    } else if (!depthwise_weight_grad_nhwc(s, dy, x, dw.mutable_data_ptr<float>())) {
      // The row engine reads one channel's plane at a time: from NHWC a gather at a stride of C
      // elements, C times the tensor's traffic (a depthwise 32-channel layer ran 40x slower), so
      // channels_last operands are copied to NCHW first, in their own dtype. (A channels_last
      // depthwise 3x3 or 5x5 layer, its operands of one dtype, reads its vectors of 16 channels
      // where they lie instead.)
      auto nchw = [](const Activations& a, at::Tensor& source) {
        if (!a.channels_last) return a;
        source = source.contiguous();
        return activations_of(source, source);
      };
      row_weight_grad(s, plan.row_block, plan.row_unit_blocks, nchw(dy, dy_source), nchw(x, x_source),
                      dw.mutable_data_ptr<float>());
    }
    return dw.to(input.scalar_type()).contiguous(format);
  }
  const at::Tensor dy = as_nchw(grad_output), x = as_nchw(input);
  at::Tensor dw = at::empty(s.weight_sizes(), input.options());
  CHANNELCONV_DISPATCH(input.scalar_type(), "channelconv::direct_backward_weight", [&] {
    backward_weight_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                     dw.mutable_data_ptr<scalar_t>(), s);
  });
  return dw.contiguous(format);
}

}  // namespace
}  // namespace channelconv

TORCH_LIBRARY_IMPL(channelconv, CPU, m) {
  m.impl("direct_forward", &channelconv::direct_forward);
  m.impl("direct_backward_input", &channelconv::direct_backward_input);
  m.impl("direct_backward_weight", &channelconv::direct_backward_weight);
}
