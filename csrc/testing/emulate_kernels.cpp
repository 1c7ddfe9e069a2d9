// CPU emulation of the CUDA kernels, for machines without a GPU. NOT part of the extension
// (setup.py does not build csrc/testing/): csrc/testing/emulate_kernels.py builds it as a separate
// test module with torch.utils.cpp_extension.load and compares it with F.conv2d.
//
// Each emulated launch runs the HOST_DEVICE bodies of kernel_bodies.h exactly as the __global__
// kernels in direct.cu / im2col.cu do, with one CPU loop standing in for the threads between two
// barriers. Shared-memory tiles are poisoned with NaN before every stage, so a read of an entry the
// stage did not write shows up in the result; outputs are allocated inside NaN guard zones that
// must survive the call. Built with -fsanitize=address (emulate_kernels.py --asan), every
// out-of-bounds access to a tensor or a shared tile is reported.
#include <torch/extension.h>

#include <ATen/Dispatch.h>

#include <cstring>
#include <deque>
#include <limits>
#include <type_traits>
#include <vector>

#include "../lowered.h"
#include "../cuda/implicit_gemm.h"
#include "../cuda/kernel_bodies.h"

namespace channelconv {
namespace gpu {
namespace {

// Index type forced by the caller: 32, 64, or 0 for what the CUDA host code would pick.
int g_index_bits = 0;

bool pick_int32(bool fits) {
  TORCH_CHECK(g_index_bits != 32 || fits, "emulate: int32 forced but indices do not fit");
  return g_index_bits == 32 || (g_index_bits == 0 && fits);
}

// A tensor of `sizes` in the middle of a NaN-filled buffer; check_guards verifies the margins.
constexpr int64_t kGuard = 64;
struct Guarded {
  at::Tensor buffer, tensor;
};
Guarded guarded_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t d : sizes) numel *= d;
  Guarded g;
  g.buffer = at::full({numel + 2 * kGuard}, std::numeric_limits<double>::quiet_NaN(), options);
  g.tensor = g.buffer.narrow(0, kGuard, numel).view(sizes);
  return g;
}
void check_guards(const Guarded& g) {
  const int64_t numel = g.tensor.numel();
  const at::Tensor head = g.buffer.narrow(0, 0, kGuard), tail = g.buffer.narrow(0, kGuard + numel, kGuard);
  TORCH_CHECK(head.isnan().all().item<bool>() && tail.isnan().all().item<bool>(),
              "emulate: a kernel wrote outside its output tensor");
}

template <typename acc_t>
void poison(std::vector<acc_t>& v) {
  std::fill(v.begin(), v.end(), std::numeric_limits<acc_t>::quiet_NaN());
}

// ---- direct forward: one block at a time, its threads stage by stage --------------------------
template <typename Cfg, typename scalar_t, typename index_t>
void emulate_forward(const scalar_t* x, const scalar_t* w, const scalar_t* bias, scalar_t* y, const ConvShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const ConvDims<index_t> d = make_dims<index_t>(s);
  const int64_t tiles = s.batch * s.groups * int64_t(forward_channel_tiles<Cfg>(d)) * int64_t(forward_pixel_tiles<Cfg>(d));
  std::vector<acc_t> ws(Cfg::kWeightTile), xs(Cfg::kInputTile);
  struct Regs {
    acc_t acc[Cfg::TM][Cfg::TN];
  };
  std::vector<Regs> regs(Cfg::kThreads);
  const index_t R = d.reduction();
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const TilePos<index_t> t = forward_tile_pos<Cfg>(d, index_t(tile));
    for (int tid = 0; tid < Cfg::kThreads; ++tid) forward_init<Cfg>(tid, bias, d, t, regs[tid].acc);
    for (index_t q0 = 0; q0 < R; q0 += Cfg::BR) {
      poison(ws);
      poison(xs);
      for (int tid = 0; tid < Cfg::kThreads; ++tid) forward_load_stage<Cfg>(tid, x, w, d, t, q0, ws.data(), xs.data());
      // __syncthreads()
      for (int tid = 0; tid < Cfg::kThreads; ++tid) forward_multiply_stage<Cfg>(tid, ws.data(), xs.data(), regs[tid].acc);
      // __syncthreads()
    }
    for (int tid = 0; tid < Cfg::kThreads; ++tid) forward_store<Cfg>(tid, y, d, t, regs[tid].acc);
  }
}

// tile: "wide", "narrow" or "auto" (what the CUDA host code picks).
at::Tensor direct_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                          int64_t groups, const std::string& tile) {
  const ConvShape s = check_forward(input, weight, bias, stride, padding, dilation, groups);
  const at::Tensor x = as_nchw(input), w = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  Guarded y = guarded_empty(s.output_sizes(), input.options());
  if (y.tensor.numel() > 0) {
    const bool int32 = pick_int32(indices_fit_int32(s, {x.numel(), w.numel(), y.tensor.numel()}));
    const bool wide = tile == "auto" ? use_wide_tile(s) : tile == "wide";
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "emulate_forward", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* yp = y.tensor.mutable_data_ptr<scalar_t>();
      if (wide && int32) emulate_forward<WideTile, scalar_t, int32_t>(xp, wp, bp, yp, s);
      else if (wide) emulate_forward<WideTile, scalar_t, int64_t>(xp, wp, bp, yp, s);
      else if (int32) emulate_forward<NarrowTile, scalar_t, int32_t>(xp, wp, bp, yp, s);
      else emulate_forward<NarrowTile, scalar_t, int64_t>(xp, wp, bp, yp, s);
    });
  }
  check_guards(y);
  return y.tensor.clone();
}

// ---- implicit GEMMs: cp.async modelled, the pipeline in pipeline_step's order ----

// cp.async as the emulator sees it: a copy issued now lands only when a wait retires its commit
// group; until then its destination holds NaN, so a multiply that reads a buffer before its
// wait (or a buffer another stage is being copied into) poisons the result. All threads issue
// and commit at the same program points, so one queue of groups stands for every thread's.
struct EmulatedCopy {
  struct Pending {
    float* dst;
    const float* src;
    bool valid;
  };
  std::vector<Pending> open;
  std::deque<std::vector<Pending>> committed;

  void copy(float* dst, const float* src, bool valid) {
    *dst = std::numeric_limits<float>::quiet_NaN();
    open.push_back({dst, src, valid});
  }
  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }
  void wait(int in_flight) {
    while (int(committed.size()) > in_flight) {
      for (const Pending& c : committed.front()) *c.dst = c.valid ? *c.src : 0.f;
      committed.pop_front();
    }
  }
};

// Planted bugs, to show this emulation catches each kind (emulate_kernels.py --planted):
//   1 waits for one commit group too few (multiplies a buffer still in flight)
//   2 multiplies the buffer being loaded instead of the one that landed
//   3 leaves the last split out of the split-K reduction
//   4 skips the zero-fill (a masked copy leaves the buffer as it was)
//   5 (TF32) loads the A fragment's a1 and a2 swapped (a layout that disagrees with the PTX table)
int g_plant = 0;

// mma.sync.m16n8k8 .tf32 as the PTX ISA's fragment table says (implicit_gemm.h, Tf32Math): the
// warp's 32 lanes' fragments assembled into A (16 x 8), B (8 x 8) and C (16 x 8), D = A B + C in
// float32, and D handed back to the lanes in C's layout.
template <typename Cfg>
void emulated_mma_tf32(const std::vector<Tf32Math::Fragments<Cfg>>& lanes, std::vector<float*>& acc, int mf,
                       int nf) {
  float A[16][8], B[8][8], C[16][8];
  auto value = [](uint32_t bits) {
    float x;
    std::memcpy(&x, &bits, 4);
    return x;
  };
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const uint32_t* a = lanes[lane].a[mf];
    const bool swapped = g_plant == 5;
    A[g][t] = value(a[0]);
    A[g + 8][t] = value(a[swapped ? 2 : 1]);
    A[g][t + 4] = value(a[swapped ? 1 : 2]);
    A[g + 8][t + 4] = value(a[3]);
    B[t][g] = value(lanes[lane].b[nf][0]);
    B[t + 4][g] = value(lanes[lane].b[nf][1]);
    const float* c = acc[lane] + (mf * Tf32Math::Shape<Cfg>::NF + nf) * 4;
    C[g][2 * t] = c[0];
    C[g][2 * t + 1] = c[1];
    C[g + 8][2 * t] = c[2];
    C[g + 8][2 * t + 1] = c[3];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    float* d = acc[lane] + (mf * Tf32Math::Shape<Cfg>::NF + nf) * 4;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
      float sum = C[rows[i]][cols[i]];
      for (int k = 0; k < 8; ++k) sum += A[rows[i]][k] * B[k][cols[i]];
      d[i] = sum;
    }
  }
}

// One stage's multiply for every thread of the block: SimtMath thread by thread; Tf32Math warp by
// warp, each lane loading its fragments with the kernel's code, then the mma stand-in.
template <typename Cfg, typename Math, typename Regs>
void emulate_multiply_stage(const float* stage, std::vector<Regs>& regs) {
  if constexpr (std::is_same_v<Math, SimtMath>) {
    for (int tid = 0; tid < Cfg::kThreads; ++tid) SimtMath::multiply_stage<Cfg>(tid, stage, regs[tid].acc);
  } else {
    using S = Tf32Math::Shape<Cfg>;
    std::vector<Tf32Math::Fragments<Cfg>> lanes(32);
    std::vector<float*> acc(32);
    for (int warp = 0; warp < S::kWarps; ++warp) {
      for (int k = 0; k < Cfg::BK; k += 8) {
        for (int lane = 0; lane < 32; ++lane) {
          Tf32Math::load_fragments<Cfg>(warp * 32 + lane, stage, k, lanes[lane]);
          acc[lane] = regs[warp * 32 + lane].acc;
        }
        for (int mf = 0; mf < S::MF; ++mf) {
          for (int nf = 0; nf < S::NF; ++nf) emulated_mma_tf32<Cfg>(lanes, acc, mf, nf);
        }
      }
    }
  }
}

template <typename Problem, typename Math>
void emulate_igemm_block(const IgemmParams& p, int32_t tile, int32_t split, const IgemmOperands& o) {
  using Cfg = typename Problem::Cfg;
  std::vector<float> smem(Cfg::kSharedFloats, std::numeric_limits<float>::quiet_NaN());
  const IgemmTile t = igemm_tile<Cfg>(p, tile, split);
  std::vector<typename Problem::Thread> threads(Cfg::kThreads);
  for (int tid = 0; tid < Cfg::kThreads; ++tid) threads[tid] = Problem::thread_state(p, t, tid);
  struct Regs {
    float acc[kAccumulators] = {};
  };
  std::vector<Regs> regs(Cfg::kThreads);
  EmulatedCopy copier;
  struct PlantedCopy {  // plant 4: a masked copy issues nothing (no zero lands)
    EmulatedCopy& inner;
    void copy(float* dst, const float* src, bool valid) {
      if (valid) inner.copy(dst, src, valid);
    }
  } planted{copier};
  auto load = [&](int tid, int32_t ktile, int buffer) {
    float* stage = smem.data() + buffer * Cfg::kStageFloats;
    if (g_plant == 4) {
      Problem::load_stage(planted, tid, p, t, threads[tid], o, ktile, stage);
    } else {
      Problem::load_stage(copier, tid, p, t, threads[tid], o, ktile, stage);
    }
  };
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < t.kt_count) {
      for (int tid = 0; tid < Cfg::kThreads; ++tid) load(tid, t.kt_begin + s, s);
    }
    copier.commit();
  }
  for (int step = 0; step < t.kt_count; ++step) {
    copier.wait(pipeline_wait_groups<Cfg>() + (g_plant == 1 ? 1 : 0));
    // __syncthreads(): then every thread issues before any multiplies (the order that exposes a
    // buffer read while it is being refilled)
    const PipelineStep ps = pipeline_step<Cfg>(step);
    if (ps.load_ktile < t.kt_count) {
      for (int tid = 0; tid < Cfg::kThreads; ++tid) load(tid, t.kt_begin + ps.load_ktile, ps.load_buffer);
    }
    copier.commit();
    const int read = g_plant == 2 ? ps.load_buffer : ps.read_buffer;
    emulate_multiply_stage<Cfg, Math>(smem.data() + read * Cfg::kStageFloats, regs);
  }
  for (int tid = 0; tid < Cfg::kThreads; ++tid) igemm_store<Problem, Math>(tid, p, t, regs[tid].acc, o);
}

// A pass of the implicit GEMM, as launch_igemm in direct.cu runs it: each correlation's launch and,
// with splits, its reduce. splits: 0 for the wave model's choice on `sms` multiprocessors.
template <typename Problem, typename Math>
void emulate_igemm(const ConvShape& s, DirectPass pass, const float* a, const float* b, const float* bias,
                   const at::Tensor& out, int64_t splits, int64_t sms) {
  using Cfg = typename Problem::Cfg;
  const IgemmPass launches = igemm_pass(s, pass);
  if (launches.zero_first) out.zero_();
  for (const auto& [correlation, taps] : launches.correlations) {
    const IgemmParams p = make_igemm_params<Problem>(correlation, taps, int32_t(sms),
                                                     igemm_blocks_per_sm_at_ceiling<Cfg>(), int32_t(splits));
    std::vector<float> partial;
    if (p.splits > 1) partial.assign(size_t(p.splits * Problem::output_elements(p)), std::numeric_limits<float>::quiet_NaN());
    const IgemmOperands o{a, b, bias, out.mutable_data_ptr<float>(), partial.data()};
    const int32_t launched = p.splits - (g_plant == 3 && p.splits > 1 ? 1 : 0);
    for (int32_t split = 0; split < launched; ++split) {
      for (int32_t tile = 0; tile < int32_t(igemm_tiles<Cfg>(p)); ++tile) emulate_igemm_block<Problem, Math>(p, tile, split, o);
    }
    if (p.splits > 1) {
      if (g_plant == 3) {  // the left-out split's partials stay 0 instead of NaN, so only the sum is wrong
        std::fill(partial.begin() + launched * Problem::output_elements(p), partial.end(), 0.f);
      }
      for (int64_t e = 0; e < Problem::output_elements(p); ++e) Problem::reduce_element(p, o, e);
    }
  }
}

IgemmChoice igemm_config(const std::string& config) {
  TORCH_CHECK(config == "large" || config == "medium", "emulate: config is large or medium, not ", config);
  return config == "large" ? IgemmChoice::Large : IgemmChoice::Medium;
}

// The pass on the implicit GEMM of `config`'s tile, as launch_igemm_tile in direct.cu ("large" or
// "medium", then "/tf32" for the tensor-core multiply).
template <template <typename> class Problem, int SimtBPad>
void emulate_igemm_tile(const std::string& config, const ConvShape& s, DirectPass pass, const at::Tensor& a,
                        const at::Tensor& b, const float* bias, const at::Tensor& out, int64_t splits, int64_t sms) {
  TORCH_CHECK(a.scalar_type() == at::kFloat, "emulate: the implicit GEMM is float32");
  TORCH_CHECK(indices_fit_int32(s, {a.numel(), b.numel(), out.numel()}), "emulate: the implicit GEMM needs int32 indices");
  if (out.numel() == 0) return;
  const bool tf32 = config.size() > 5 && config.substr(config.size() - 5) == "/tf32";
  const bool large = igemm_config(tf32 ? config.substr(0, config.size() - 5) : config) == IgemmChoice::Large;
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  if (tf32) {
    if (large) emulate_igemm<Problem<IgemmLarge<4>>, Tf32Math>(s, pass, ap, bp, bias, out, splits, sms);
    else emulate_igemm<Problem<IgemmMedium<4>>, Tf32Math>(s, pass, ap, bp, bias, out, splits, sms);
  } else {
    if (large) emulate_igemm<Problem<IgemmLarge<SimtBPad>>, SimtMath>(s, pass, ap, bp, bias, out, splits, sms);
    else emulate_igemm<Problem<IgemmMedium<SimtBPad>>, SimtMath>(s, pass, ap, bp, bias, out, splits, sms);
  }
}

at::Tensor igemm_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                         int64_t groups, const std::string& config, int64_t splits, int64_t sms) {
  const ConvShape s = check_forward(input, weight, bias, stride, padding, dilation, groups);
  const at::Tensor x = as_nchw(input), w = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  Guarded y = guarded_empty(s.output_sizes(), input.options());
  emulate_igemm_tile<CorrelationProblem, 0>(config, s, DirectPass::Forward, w, x,
                                            has_bias ? b.const_data_ptr<float>() : nullptr, y.tensor, splits, sms);
  check_guards(y);
  return y.tensor.clone();
}

at::Tensor igemm_input_grad(const at::Tensor& grad_output, const at::Tensor& weight, std::vector<int64_t> input_size,
                            std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                            int64_t groups, const std::string& config, int64_t splits, int64_t sms) {
  const ConvShape s = check_backward_input(grad_output, weight, input_size, stride, padding, dilation, groups);
  const at::Tensor dy = as_nchw(grad_output), w = weight.contiguous();
  Guarded dx = guarded_empty(s.input_sizes(), grad_output.options());
  emulate_igemm_tile<CorrelationProblem, 0>(config, s, DirectPass::InputGrad, w, dy, nullptr, dx.tensor, splits, sms);
  check_guards(dx);
  return dx.tensor.clone();
}

at::Tensor igemm_weight_grad(const at::Tensor& grad_output, const at::Tensor& input, std::vector<int64_t> weight_size,
                             std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                             int64_t groups, const std::string& config, int64_t splits, int64_t sms) {
  const ConvShape s = check_backward_weight(grad_output, input, weight_size, stride, padding, dilation, groups);
  const at::Tensor dy = as_nchw(grad_output), x = as_nchw(input);
  Guarded dw = guarded_empty(s.weight_sizes(), input.options());
  emulate_igemm_tile<WeightGradProblem, 4>(config, s, DirectPass::WeightGrad, dy, x, nullptr, dw.tensor, splits, sms);
  check_guards(dw);
  return dw.tensor.clone();
}

DirectPass pass_of(const std::string& pass) {
  TORCH_CHECK(pass == "forward" || pass == "input_grad" || pass == "weight_grad", "emulate: unknown pass ", pass);
  return pass == "forward" ? DirectPass::Forward : pass == "input_grad" ? DirectPass::InputGrad : DirectPass::WeightGrad;
}

// What direct.cu launches for this layer's pass ("forward", "input_grad" or "weight_grad") and,
// for the implicit GEMM, the wave model's splits of each launch on `sms` multiprocessors:
// "large/<splits>[,<splits>...]" (one per stride phase of the input gradient), "medium/...", or
// "tiled" (the tiled kernel, the gather, or the block per weight element).
std::string igemm_choice(std::vector<int64_t> input_size, std::vector<int64_t> weight_size,
                         std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                         int64_t groups, const std::string& dtype, const std::string& pass_name, int64_t sms) {
  const ConvShape s = make_shape(input_size, weight_size, stride, padding, dilation, groups);
  const int64_t x_numel = s.batch * s.in_channels * s.in_h * s.in_w;
  const int64_t y_numel = s.batch * s.out_channels * s.out_h * s.out_w;
  const int64_t w_numel = s.out_channels * s.in_per_group() * s.kernel_h * s.kernel_w;
  const bool int32 = indices_fit_int32(s, {x_numel, w_numel, y_numel});
  const DirectPass pass = pass_of(pass_name);
  const IgemmChoice choice = choose_igemm(s, int32, dtype == "float32", pass);
  if (choice == IgemmChoice::None) return "tiled";
  auto splits = [&](auto problem) {
    using Problem = decltype(problem);
    std::string out;
    for (const auto& [correlation, taps] : igemm_pass(s, pass).correlations) {
      const IgemmParams p = make_igemm_params<Problem>(correlation, taps, int32_t(sms),
                                                       igemm_blocks_per_sm_at_ceiling<typename Problem::Cfg>(), 0);
      out += (out.empty() ? "" : ",") + std::to_string(p.splits);
    }
    return out;
  };
  const bool large = choice == IgemmChoice::Large;
  if (pass == DirectPass::WeightGrad) {
    return large ? "large/" + splits(WeightGradProblem<IgemmLarge<4>>{}) : "medium/" + splits(WeightGradProblem<IgemmMedium<4>>{});
  }
  return large ? "large/" + splits(CorrelationProblem<IgemmLarge<0>>{}) : "medium/" + splits(CorrelationProblem<IgemmMedium<0>>{});
}

// FastDivmod against / and % for the given divisors and numerators (< 2^31); returns the count of
// mismatches.
int64_t check_fast_divmod(std::vector<int64_t> divisors, std::vector<int64_t> numerators) {
  int64_t wrong = 0;
  for (int64_t d : divisors) {
    const FastDivmod f{uint32_t(d)};
    for (int64_t n : numerators) {
      int32_t q = 0, r = 0;
      f.divmod(int32_t(n), q, r);
      wrong += (q != n / d || r != n % d) ? 1 : 0;
    }
  }
  return wrong;
}

// ---- direct backward ----------------------------------------------------------------------------
at::Tensor direct_backward_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                 std::vector<int64_t> input_size, std::vector<int64_t> stride,
                                 std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
  const ConvShape s = check_backward_input(grad_output, weight, input_size, stride, padding, dilation, groups);
  const at::Tensor dy = as_nchw(grad_output), w = weight.contiguous();
  Guarded dx = guarded_empty(s.input_sizes(), grad_output.options());
  const int64_t total = dx.tensor.numel();
  if (total > 0) {
    const bool int32 = pick_int32(indices_fit_int32(s, {dy.numel(), w.numel(), total}));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_output.scalar_type(), "emulate_bi", [&] {
      auto run = [&](auto index_tag) {
        using index_t = decltype(index_tag);
        const ConvDims<index_t> d = make_dims<index_t>(s);
        for (int64_t e = 0; e < total; ++e) {
          direct_backward_input_element(dy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                        dx.tensor.mutable_data_ptr<scalar_t>(), d, index_t(e));
        }
      };
      if (int32) run(int32_t{0});
      else run(int64_t{0});
    });
  }
  check_guards(dx);
  return dx.tensor.clone();
}

at::Tensor direct_backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                  std::vector<int64_t> weight_size, std::vector<int64_t> stride,
                                  std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
  const ConvShape s = check_backward_weight(grad_output, input, weight_size, stride, padding, dilation, groups);
  const at::Tensor dy = as_nchw(grad_output), x = as_nchw(input);
  Guarded dw = guarded_empty(s.weight_sizes(), input.options());
  const int64_t total = dw.tensor.numel();
  if (total > 0) {
    const bool int32 = pick_int32(indices_fit_int32(s, {dy.numel(), x.numel(), total}));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "emulate_bw", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto run = [&](auto index_tag) {
        using index_t = decltype(index_tag);
        const ConvDims<index_t> d = make_dims<index_t>(s);
        std::vector<acc_t> partial(kThreads);
        for (int64_t e = 0; e < total; ++e) {  // one block
          for (int tid = 0; tid < kThreads; ++tid) {
            partial[tid] = direct_backward_weight_partial(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                          d, index_t(e), index_t(tid), index_t(kThreads));
          }
          for (int offset = kThreads / 2; offset > 0; offset /= 2) {
            for (int tid = 0; tid < offset; ++tid) partial[tid] += partial[tid + offset];
          }
          dw.tensor.mutable_data_ptr<scalar_t>()[e] = static_cast<scalar_t>(partial[0]);
        }
      };
      if (int32) run(int32_t{0});
      else run(int64_t{0});
    });
  }
  check_guards(dw);
  return dw.tensor.clone();
}

// ---- band kernels, plugged into the real GEMM driver (lowered.cpp) ------------------------------
void im2col_emulated(const at::Tensor& images, const at::Tensor& columns, const ConvShape& s, int64_t row0,
                     int64_t rows) {
  TORCH_CHECK(images.is_contiguous() && columns.is_contiguous());
  TORCH_CHECK(columns.numel() == images.size(0) * s.in_channels * s.kernel_h * s.kernel_w * rows * s.out_w);
  const int64_t total = columns.numel();
  const bool int32 = pick_int32(indices_fit_int32(s, {images.numel(), total}));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "emulate_im2col", [&] {
    auto run = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const Geometry<index_t> g = s.geometry<index_t>();
      for (int64_t e = 0; e < total; ++e) {
        im2col_element(images.const_data_ptr<scalar_t>(), columns.mutable_data_ptr<scalar_t>(), g, index_t(row0),
                       index_t(rows * s.out_w), index_t(s.image_numel()), index_t(e));
      }
    };
    if (int32) run(int32_t{0});
    else run(int64_t{0});
  });
}

void col2im_emulated(const at::Tensor& columns, const at::Tensor& grad_images, const ConvShape& s, int64_t row0,
                     int64_t rows, bool accumulate) {
  TORCH_CHECK(grad_images.is_contiguous() && columns.is_contiguous());
  const int64_t total = grad_images.numel();
  const bool int32 = pick_int32(indices_fit_int32(s, {total, columns.numel()}));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, columns.scalar_type(), "emulate_col2im", [&] {
    auto run = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const Geometry<index_t> g = s.geometry<index_t>();
      with_col2im_output<scalar_t>(grad_images, [&](auto* out) {
        for (int64_t e = 0; e < total; ++e) {
          col2im_element(columns.const_data_ptr<scalar_t>(), out, g, index_t(row0), index_t(rows),
                         index_t(s.image_numel()), accumulate, index_t(e));
        }
      });
    };
    if (int32) run(int32_t{0});
    else run(int64_t{0});
  });
}

// The CUDA band kernels' code, run by the driver on the GPU's plan.
constexpr BandKernels kEmulatedBands{&im2col_emulated, &col2im_emulated, nullptr, nullptr, /*gpu=*/true};

Lowering lowering_of(const std::string& algorithm) {
  TORCH_CHECK(algorithm == "im2col" || algorithm == "1x1", "emulate: unknown lowering ", algorithm);
  return algorithm == "im2col" ? Lowering::Im2col : Lowering::OneByOne;
}

at::Tensor lowered_forward_op(const std::string& algorithm, const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                              std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                              int64_t workspace_limit) {
  return lowered_forward(kEmulatedBands, lowering_of(algorithm), input, weight, bias, stride, padding, dilation,
                         groups, workspace_limit);
}
at::Tensor lowered_backward_input_op(const std::string& algorithm, const at::Tensor& grad_output,
                                     const at::Tensor& weight, std::vector<int64_t> input_size,
                                     std::vector<int64_t> stride, std::vector<int64_t> padding,
                                     std::vector<int64_t> dilation, int64_t groups, int64_t workspace_limit) {
  return lowered_backward_input(kEmulatedBands, lowering_of(algorithm), grad_output, weight, input_size, stride,
                                padding, dilation, groups, workspace_limit);
}
at::Tensor lowered_backward_weight_op(const std::string& algorithm, const at::Tensor& grad_output,
                                      const at::Tensor& input, std::vector<int64_t> weight_size,
                                      std::vector<int64_t> stride, std::vector<int64_t> padding,
                                      std::vector<int64_t> dilation, int64_t groups, int64_t workspace_limit) {
  return lowered_backward_weight(kEmulatedBands, lowering_of(algorithm), grad_output, input, weight_size, stride,
                                 padding, dilation, groups, workspace_limit);
}

bool fits_int32(std::vector<int64_t> input_size, std::vector<int64_t> weight_size, std::vector<int64_t> stride,
                std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                std::vector<int64_t> numels) {
  const ConvShape s = make_shape(input_size, weight_size, stride, padding, dilation, groups);
  bool ok = true;
  for (int64_t n : numels) ok = ok && indices_fit_int32(s, {n});
  return ok && indices_fit_int32(s, {});
}

}  // namespace
}  // namespace gpu
}  // namespace channelconv

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace channelconv::gpu;
  m.def("set_index_bits", [](int bits) {
    TORCH_CHECK(bits == 0 || bits == 32 || bits == 64, "index bits: 0 (auto), 32 or 64");
    g_index_bits = bits;
  });
  m.def("set_plant", [](int plant) { g_plant = plant; });
  m.def("direct_forward", &direct_forward);
  m.def("igemm_forward", &igemm_forward);
  m.def("igemm_input_grad", &igemm_input_grad);
  m.def("igemm_weight_grad", &igemm_weight_grad);
  m.def("igemm_choice", &igemm_choice);
  m.def("check_fast_divmod", &check_fast_divmod);
  m.def("direct_backward_input", &direct_backward_input);
  m.def("direct_backward_weight", &direct_backward_weight);
  m.def("lowered_forward", &lowered_forward_op);
  m.def("lowered_backward_input", &lowered_backward_input_op);
  m.def("lowered_backward_weight", &lowered_backward_weight_op);
  m.def("fits_int32", &fits_int32);
}
