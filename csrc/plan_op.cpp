// channelconv::_plan (schema in channelconv.cpp): the plan a kernel would run, for Python (cost(), 'auto''s time model,
// explain()). It computes nothing itself: it calls the plan functions the kernels call and
// counts what that plan does, so Python never restates a kernel's rule or constant.
//
//   _plan(algorithm, which, input_size, weight_size, stride, padding, dilation, groups, dtype,
//         device, workspace_limit, threads, channels_last) -> Dict(str, int)
//
// algorithm: 'direct', 'im2col' or '1x1'; which: 'forward', 'input_grad' or 'weight_grad'
// (direct plans each pass apart; im2col and 1x1 run one band plan in all three). It throws what
// the op would throw for these arguments: F.conv2d's shape errors, '1x1' on another kernel, a
// workspace limit below one output row of columns. channels_last: whether the input is
// channels_last-contiguous; every summary says, as channels_last, whether the kernels see it as
// NHWC (plan.h, sees_nhwc), and the CPU's lowered algorithms then run their NHWC driver.
//
// Keys, im2col and 1x1 (the forward pass's GEMMs, per group):
//   input_is_columns, images, rows, side_by_side, nhwc, workspace_bytes, gemm_m, gemm_k, gemm_n,
//   gemm_calls, column_elements
// Keys, direct (what one pass does):
//   blocked      1: register-blocked tiles (CPU) or the tiled CUDA kernel; 0: the plain loops
//   depthwise    1: of those, the depthwise engine (16 channels of an image at a time)
//   mac          multiply-adds the kernel performs (blocked: output channels padded to its tile)
//   mac_1x1      of those, a 1x1 kernel's (its tile streams the input, with no reuse across taps)
//   inner_loop   innermost loops started (blocked: one per tile and kernel row or input channel)
//   weight_read  packed weights streamed (once per task of output rows; the dW tiles per chunk)
//   weight_pack  weights packed for the tiles, once per correlation: a read across the weight's rows
//                and a write, which on deep layers at small batches cost more than the tiles
//   strip        input elements copied into zero-padded strips (weight gradient: x and dy packed)
//   output       elements written
//   row          the plain loops' inner length (a short row wastes vector lanes)
//   strided      1: the plain loops step through memory with a stride along the row
//   runs, tasks, tiles, chunks, parts: the plan's structure (correlations, tasks, tiles, weight-
//   gradient chunks and input-channel parts)
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <string>

#include "cuda/kernel_bodies.h"
#include "plan.h"

namespace channelconv {
namespace {

using Summary = c10::Dict<std::string, int64_t>;

Summary describe(const LoweredPlan& p) {
  Summary d;
  d.insert("input_is_columns", p.input_is_columns);
  d.insert("images", p.images);
  d.insert("rows", p.rows);
  d.insert("side_by_side", p.side_by_side);
  d.insert("nhwc", p.nhwc);
  d.insert("workspace_bytes", p.workspace_bytes);
  d.insert("gemm_m", p.gemm_m);
  d.insert("gemm_k", p.gemm_k);
  d.insert("gemm_n", p.gemm_n);
  d.insert("gemm_calls", p.gemm_calls);
  d.insert("column_elements", p.column_elements);
  return d;
}

// Counts in double: their products reach past int64 on shapes whose buffers could never be
// allocated (the op then fails with the allocator's message), and the time model reads them as
// floats anyway. A count past int64 is reported as INT64_MAX.
struct Counts {
  double mac = 0, mac_1x1 = 0, mac_amx = 0, inner_loop = 0, weight_read = 0, weight_pack = 0, strip = 0, output = 0;
  double tiles = 0;
  int64_t blocked = 0, depthwise = 0, row = 0, strided = 0, runs = 0, tasks = 0, chunks = 0, parts = 0;
  int64_t pairs = 0;  // 1: bfloat16 channel pairs (plan.h, channel_pack)

  Summary summary() const {
    Summary d;
    for (const auto& [key, value] : {std::pair<const char*, double>{"mac", mac}, {"mac_1x1", mac_1x1},
                                     {"mac_amx", mac_amx},
                                     {"inner_loop", inner_loop}, {"weight_read", weight_read},
                                     {"weight_pack", weight_pack}, {"strip", strip},
                                     {"output", output}, {"tiles", tiles}})
      d.insert(key, value < 9.2e18 ? static_cast<int64_t>(value) : std::numeric_limits<int64_t>::max());
    for (const auto& [key, value] : {std::pair<const char*, int64_t>{"blocked", blocked}, {"depthwise", depthwise},
                                     {"row", row},
                                     {"strided", strided}, {"runs", runs}, {"tasks", tasks}, {"chunks", chunks},
                                     {"parts", parts}, {"pairs", pairs}})
      d.insert(key, value);
    return d;
  }
};

// One blocked correlation: every task's tiles (rows paired on narrow maps, else cut into pieces).
// Counted in the tile's steps: a bfloat16 pair of channels is one step (one instruction per lane).
void count_run(const BlockedRun& run, Counts& c) {
  const BlockedProblem& p = run.problem;
  const double blocks = double(p.blocks()), taps = double(p.taps_h) * p.taps_w;
  double group_tiles = 0;
  for (int64_t t = 0; t < run.tasks.group_tasks; ++t) {
    group_tiles += double(p.tiles(run.tasks.end(t) - run.tasks.begin(t)));
  }
  const double tiles = p.groups * blocks * group_tiles;
  const double mac = double(p.batch) * p.groups * blocks * p.block * p.out_h * p.out_w * p.packs() * taps;
  c.runs += 1;
  c.pairs = p.channel_pack == 2 ? 1 : c.pairs;
  c.tasks += p.groups * run.tasks.group_tasks;
  c.tiles += tiles;
  c.mac += mac;
  c.mac_1x1 += taps == 1 ? mac : 0;
  c.inner_loop += tiles * (taps == 1 ? 1 : double(p.packs()) * p.taps_h);
  c.weight_read += double(run.tasks.group_tasks) * p.packed_weight_floats();  // (every task its group's)
  c.weight_pack += double(p.packed_weight_floats());
  c.strip += double(p.groups) * p.batch * p.out_h * p.packs() * p.taps_h * p.strip_width();
  c.output += double(p.batch) * p.groups * p.out_per_group * p.out_h * p.out_w;
}

// One depthwise correlation: a task per image and block of 16 channels, its input window gathered
// channel-last.
void count_depthwise(const BlockedRun& run, Counts& c) {
  const BlockedProblem& p = run.problem;
  const double blocks = double((p.groups + 15) / 16), taps = double(p.taps_h) * p.taps_w;
  c.runs += 1;
  c.tasks += p.batch * ((p.groups + 15) / 16);
  c.mac += double(p.batch) * blocks * 16 * p.out_h * p.out_w * taps;
  c.inner_loop += double(p.batch) * blocks * p.out_h;
  c.strip += double(p.batch) * blocks * 16 * p.input_rows(p.out_h) * p.strip_width();
  c.output += double(p.batch) * p.groups * p.out_h * p.out_w;
}

// The blocked weight gradient, chunk by chunk and unit by unit, as blocked_weight_grad runs it.
void count_weight_grad(const BlockedProblem& p, const GradChunks& g, Counts& c) {
  const int64_t blocks = p.blocks(), C = p.in_per_group;
  const double taps = double(p.taps_h) * p.taps_w;
  c.runs = 1;
  c.parts = g.parts;
  // In the tile's steps: a bfloat16 pixel pair is one (a row's odd last pixel one more).
  const double row_steps = p.channel_pack == 2 ? double(p.out_w / 2 + p.out_w % 2) : double(p.out_w);
  c.mac = double(p.batch) * p.groups * blocks * p.block * p.out_h * row_steps * C * taps;
  c.pairs = p.channel_pack == 2 ? 1 : 0;
  c.output = double(g.slices) * p.groups * p.out_per_group * C * taps;  // (each slice's copy is added)
  for (int64_t n0 = 0; n0 < p.batch; n0 += g.images) {
    const int64_t images = std::min(g.images, p.batch - n0);
    for (int64_t band = 0; band < g.bands; ++band) {
      const int64_t rows = std::min(g.rows, p.out_h - band * g.rows);
      c.chunks += 1;
      for (int64_t range = 0; range < g.ranges; ++range) {
        int64_t packed_part = -1;
        for (int64_t unit = range * g.units_per_range; unit < std::min(g.units, (range + 1) * g.units_per_range);
             ++unit) {
          const int64_t part = (unit / blocks) % g.parts;
          const int64_t channels = std::min(g.part_channels, C - part * g.part_channels);
          if (channels <= 0) continue;
          if (packed_part != unit / blocks) {  // the unit's (group, part) input rows, channel-last
            c.strip += double(channels) * images * p.input_rows(rows) * g.cols;
            packed_part = unit / blocks;
          }
          c.strip += double(images) * rows * p.out_w * p.block;  // the block's dy, pixel-major
          c.inner_loop += double(p.taps_h) * ceil_div(channels, g.tile_channels);
          c.weight_read += channels * taps * p.block;
        }
      }
    }
  }
}

// The row weight gradient, unit by unit as row_weight_grad runs it: every lane of a row's last
// vector is counted (it runs masked).
void count_row_weight_grad(const ConvShape& s, int64_t block, int64_t unit_blocks, Counts& c) {
  const int64_t blocks = ceil_div(s.out_per_group(), block);
  const int64_t units = s.groups * s.in_per_group() * ceil_div(blocks, unit_blocks);
  const double taps = double(s.kernel_h) * s.kernel_w, lanes = double(row_lanes(s.out_w));
  c.tasks = units;
  c.mac = double(s.batch) * s.groups * s.in_per_group() * s.out_per_group() * taps * s.out_h * lanes;
  c.inner_loop = double(s.batch) * s.groups * s.in_per_group() * blocks * s.kernel_h * s.out_h;
  int64_t rows_read = 0;
  row_copy_slots(s, rows_read);
  c.strip = double(s.batch) * units * rows_read * row_copy_width(s);
  c.output = double(s.out_channels) * s.in_per_group() * taps;
}

// The plain loops of one pass: each innermost loop runs along a row of `row` elements.
void count_loops(const ConvShape& s, DirectPass pass, const DirectPlan& plan, Counts& c) {
  const double outputs = double(s.batch) * s.out_channels * s.out_h * s.out_w;
  c.mac = outputs * s.column_rows();
  c.row = s.out_w;
  c.strided = s.stride[1] > 1;
  switch (pass) {
    case DirectPass::Forward:
      c.inner_loop = double(s.batch) * s.out_channels * s.column_rows() * s.out_h;
      c.output = outputs;
      return;
    case DirectPass::WeightGrad:
      c.inner_loop = double(s.batch) * s.out_channels * s.column_rows() * s.out_h;
      c.output = double(s.out_channels) * s.column_rows();
      return;
    case DirectPass::InputGrad:
      c.output = double(s.batch) * s.in_channels * s.in_h * s.in_w;
      if (plan.kernel == DirectKernel::Loops) {  // the scatter: along output rows, per output channel
        c.inner_loop = double(s.batch) * s.in_channels * s.out_per_group() * s.kernel_h * s.kernel_w * s.out_h;
        return;
      }
      // Phase by phase, each a stride-1 correlation into a compact plane of the phase's positions.
      c.mac = c.inner_loop = 0;
      c.strided = 0;
      c.row = plan.phases.empty() ? 0 : plan.phases.front().b.out;
      for (const Phase& ph : plan.phases) {
        const double loops = double(s.batch) * s.in_channels * s.out_per_group() * ph.a.taps * ph.b.taps * ph.a.out;
        c.inner_loop += loops;
        c.mac += loops * ph.b.out;
        c.runs += 1;
      }
      return;
  }
}

// Padded channels and dropped pixels included (a folded step's padding too: plan.h AmxGeometry),
// phantom taps (a strided layer's, plan.h amx_shape) where the kernels skip them not. The copies:
// the forward's zero-padded NHWC input and its packed weight (every call; 4.7 MB for 512 -> 512
// 3x3, more than the products on small maps); the weight gradient's x in pixel pairs (twice, one
// for each parity) and dy in blocks, and a strided layer's split input where blocks of 32 channels
// mix phases.
void count_amx(const ConvShape& s, DirectPass pass, int64_t threads, Counts& c) {
  const ConvShape a = amx_shape(s);
  const std::vector<uint8_t> real = amx_real_taps(s);
  const double real_share = double(std::count(real.begin(), real.end(), 1)) / double(real.size());
  const double split = amx_phases_mix(s) ? double(a.batch) * a.in_channels * a.in_h * a.in_w : 0.0;
  if (pass == DirectPass::WeightGrad) {
    const AmxGeometry g = amx_geometry(a);
    const AmxGradUnits units = amx_grad_units(a, threads);
    c.mac_amx = double(a.batch) * g.blocks * kAmxPixels * units.output_blocks * units.channel_blocks *
                units.width() * units.width() * a.kernel_h * a.kernel_w * (units.narrow ? 1.0 : real_share);
    c.strip = double(a.batch) * (2 * amx_grad_plane(a, g) * g.channels + g.blocks * kAmxPixels * g.outputs) + split;
    c.output = double(a.out_channels) * a.in_channels * a.kernel_h * a.kernel_w;
    c.tasks = units.count();
    return;
  }
  const ConvShape t = pass == DirectPass::InputGrad ? transposed_correlation(a) : a;
  const AmxGeometry g = amx_geometry(t);
  const double block_pixels = g.narrow_outputs ? 2.0 * kAmxPixels * ceil_div(g.blocks, 2) : double(kAmxPixels) * g.blocks;
  const double block_outputs = g.narrow_outputs ? kAmxOutputs / 2 : g.outputs;
  c.mac_amx = double(t.batch) * block_pixels * block_outputs * g.channels * t.kernel_h * g.row_steps * real_share;
  c.strip = double(t.batch) * g.image_pixels * g.channels + double(t.kernel_h) * g.row_steps * g.channels * g.outputs;
  c.output = double(t.batch) * t.out_channels * t.out_h * t.out_w;
  c.tasks = t.batch * (g.narrow_outputs ? ceil_div(g.blocks, 2) : g.blocks) * (g.outputs / kAmxOutputs);
}

Summary describe_direct_cpu(const ConvShape& s, DirectPass pass, at::ScalarType dtype, int64_t threads) {
  const DirectPlan plan = plan_direct(s, pass, dtype, threads);
  Counts c;
  c.blocked = plan.kernel == DirectKernel::Blocked || plan.kernel == DirectKernel::BlockedWeightGrad ||
              plan.kernel == DirectKernel::RowWeightGrad || plan.kernel == DirectKernel::Depthwise;
  if (plan.kernel == DirectKernel::Blocked) {
    for (const BlockedRun& run : plan.runs) count_run(run, c);
  } else if (plan.kernel == DirectKernel::Depthwise) {
    c.depthwise = 1;
    for (const BlockedRun& run : plan.runs) count_depthwise(run, c);
  } else if (plan.kernel == DirectKernel::BlockedWeightGrad) {
    count_weight_grad(plan.grad_problem, plan.chunks, c);
  } else if (plan.kernel == DirectKernel::RowWeightGrad) {
    count_row_weight_grad(s, plan.row_block, plan.row_unit_blocks, c);
  } else if (plan.kernel == DirectKernel::Amx) {
    count_amx(s, pass, threads, c);
  } else {
    count_loops(s, pass, plan, c);
  }
  return c.summary();
}

// The CUDA kernels (cuda/direct.cu): forward tiles of BK channels x BP pixels staging BR reduction
// steps at a time; the input gradient a gather per dx element, the weight gradient a reduction
// per dW element.
template <typename Cfg>
Counts cuda_forward_tiles(const ConvShape& s) {
  Counts c;
  const int64_t tiles = product({s.batch, s.groups, ceil_div(s.out_per_group(), Cfg::BK),
                                 ceil_div(product({s.out_h, s.out_w}), Cfg::BP)});
  const double R = double(s.column_rows());  // one output channel's reduction
  c.blocked = 1;
  c.runs = 1;
  c.tiles = double(tiles);
  c.mac = double(tiles) * Cfg::BK * Cfg::BP * R;
  c.inner_loop = double(tiles) * ceil_div(s.column_rows(), Cfg::BR);
  c.weight_read = double(tiles) * Cfg::BK * R;
  c.strip = double(tiles) * Cfg::BP * R;
  c.output = double(s.batch) * s.out_channels * s.out_h * s.out_w;
  return c;
}

Summary describe_direct_cuda(const ConvShape& s, DirectPass pass) {
  if (pass == DirectPass::Forward) {
    return (gpu::use_wide_tile(s) ? cuda_forward_tiles<gpu::WideTile>(s) : cuda_forward_tiles<gpu::NarrowTile>(s))
        .summary();
  }
  Counts c;
  c.blocked = 1;
  c.runs = 1;
  c.mac = double(s.batch) * s.out_channels * s.out_h * s.out_w * s.column_rows();
  c.output = pass == DirectPass::InputGrad ? double(s.batch) * s.in_channels * s.in_h * s.in_w
                                           : double(s.out_channels) * s.column_rows();
  return c.summary();
}

DirectPass pass_named(const std::string& which) {
  if (which == "forward") return DirectPass::Forward;
  if (which == "input_grad") return DirectPass::InputGrad;
  TORCH_CHECK_VALUE(which == "weight_grad", "channelconv::_plan: expected which to be 'forward', 'input_grad' or ",
                    "'weight_grad', but got which='", which, "'");
  return DirectPass::WeightGrad;
}

}  // namespace

c10::Dict<std::string, int64_t> plan_summary(const std::string& algorithm, const std::string& which,
                                             at::IntArrayRef input_size, at::IntArrayRef weight_size,
                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                             at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype,
                                             c10::Device device, int64_t workspace_limit, int64_t threads,
                                             bool channels_last) {
  const ConvShape s = make_shape(input_size, weight_size, stride, padding, dilation, groups);
  const DirectPass pass = pass_named(which);
  // The layout the time model prices the layer in; the lowered driver's own, by its input.
  const bool nhwc_data = layer_sees_nhwc(s, channels_last);
  if (algorithm == "direct") {
    Summary d = device.is_cpu() ? describe_direct_cpu(s, pass, dtype, threads) : describe_direct_cuda(s, pass);
    d.insert("channels_last", nhwc_data);
    return d;
  }
  TORCH_CHECK_VALUE(algorithm == "im2col" || algorithm == "1x1", "channelconv::_plan: expected algorithm to be ",
                    "'direct', 'im2col' or '1x1', but got algorithm='", algorithm, "'");
  const Lowering lowering = algorithm == "im2col" ? Lowering::Im2col : Lowering::OneByOne;
  const LoweredPlan plan = plan_lowered(s, lowering, c10::elementSize(dtype), workspace_limit, device.is_cpu(),
                                          sees_nhwc(s.in_channels, s.in_h * s.in_w, channels_last));
  if (!plan.input_is_columns) check_workspace_fits(plan, s, workspace_limit);
  Summary d = describe(plan);
  d.insert("channels_last", nhwc_data);
  return d;
}

}  // namespace channelconv
