#include "plan.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace channelconv {

namespace {

// Input positions that a run of `outputs` consecutive outputs reads through `taps` taps, from the
// first output's first tap to the last output's last: a strip's width, a chunk's input rows.
int64_t input_span(int64_t outputs, int64_t taps, int64_t stride, int64_t dilation) {
  return (outputs - 1) * stride + (taps - 1) * dilation + 1;
}

// ---- im2col / 1x1 ----------------------------------------------------------------------------

// Column buffer sizes im2col prefers below the workspace limit. A GEMM with few output channels
// per group reads each column element only M times, so streaming its columns from L3 shows: its
// bands stay within about a core's L2. Wider GEMMs do better with more columns per call.
// (benchmarks/NOTES.md has the measurements behind both sizes.)
constexpr int64_t kNarrowColumnBytes = int64_t(2) << 20;
constexpr int64_t kWideColumnBytes = int64_t(8) << 20;
constexpr int64_t kWideGemmChannels = 128;
// Side by side pays where over 10 % of a map's 16-pixel vector rows would idle in the per-image
// GEMM, and only with enough images per GEMM (NOTES.md v7: 2 images did not pay).
constexpr int64_t kPixelVector = 16;
constexpr int64_t kSideBySideImages = 4;
// The NHWC driver runs one GEMM per group: with fewer output channels per group than this, each is
// little more than a call (a depthwise 3x3 @112: 4x slower than the NCHW driver's batched GEMMs),
// and such layers take the NCHW driver, converting channels_last operands.
constexpr int64_t kNhwcGroupChannels = 4;

bool side_by_side_pays(int64_t pixels) {
  const int64_t lanes = ceil_div(pixels, kPixelVector) * kPixelVector;
  return pixels > 0 && (lanes - pixels) * 10 > pixels;
}

void check_lowering(Lowering lowering, const ConvShape& s, int64_t workspace_limit) {
  if (lowering == Lowering::OneByOne) {
    TORCH_CHECK_VALUE(s.kernel_h == 1 && s.kernel_w == 1, "channelconv: algorithm '1x1' accepts only 1x1 kernels, ",
                      "but got weight of size ", at::IntArrayRef(s.weight_sizes()), " (a ", s.kernel_h, "x",
                      s.kernel_w, " kernel); use algorithm='im2col' or 'direct'");
  }
  TORCH_CHECK_VALUE(workspace_limit > 0, "channelconv: workspace_limit must be a positive number of bytes, got ",
                    "workspace_limit=", workspace_limit);
}

// Images and rows per band, and whether the band's images sit side by side.
void plan_bands(const ConvShape& s, int64_t element_size, int64_t limit_bytes, bool cpu, LoweredPlan& plan) {
  const int64_t bytes_per_row = product({plan.column_rows, s.out_w, element_size});
  if (bytes_per_row == 0) {
    plan.rows = std::max<int64_t>(s.out_h, 1);
    return;
  }
  plan.row_bytes = bytes_per_row;
  // A GPU reads its columns from memory at terabytes a second and pays per launch instead: its
  // bands take all the workspace limit allows (whole batches where they fit, so a pass is one
  // batched GEMM, not one per image).
  const int64_t preferred = !cpu                                  ? limit_bytes
                            : s.out_per_group() < kWideGemmChannels ? kNarrowColumnBytes
                                                                    : kWideColumnBytes;
  const int64_t budget = std::min(limit_bytes, preferred);
  plan.rows = std::max<int64_t>(1, std::min(s.out_h, budget / bytes_per_row));
  const int64_t image_bytes = product({bytes_per_row, s.out_h});
  // NCHW bands of several images run one batched GEMM over images and groups; NHWC ones one GEMM
  // per group over the band's pixels, whose rows are the output's own.
  const bool whole_images = plan.rows == s.out_h && (s.groups == 1 || plan.nhwc);
  if (whole_images && cpu && !plan.nhwc && side_by_side_pays(s.out_h * s.out_w)) {
    const int64_t scratch_bytes = product({s.out_channels, s.out_h, s.out_w, element_size});
    const int64_t images = std::min(s.batch, budget / std::max(image_bytes, image_bytes + scratch_bytes));
    if (images >= kSideBySideImages) {
      plan.images = images;
      plan.side_by_side = true;
      return;
    }
  }
  plan.images = whole_images ? std::max<int64_t>(1, std::min(s.batch, budget / image_bytes)) : 1;
}

// ---- direct ----------------------------------------------------------------------------------

// Input strips one blocked task holds: about half of a 2 MiB per-core L2.
constexpr int64_t kStripBytes = int64_t(1) << 20;
// Channel-last input rows per weight-gradient chunk: with the chunk's dy, resident in a core's L2.
constexpr int64_t kGradChunkBytes = int64_t(1) << 20;
// Work items the weight gradient cuts its chunks into slices for, where it has fewer units: a
// one-channel stem (1 -> 16 3x3) is a single unit, which one thread ran while the others waited.
constexpr int64_t kGradWorkItems = 8;

// A tile spans 32 output channels: with fewer than 4 per group (depthwise) most lanes would idle,
// and the plain loops, vectorised along the width, do better.
bool runs_blocked(at::ScalarType dtype, int64_t out_per_group) {
  return engine_dtype(dtype) && out_per_group >= 4 && blocked_kernel_available();
}

// Fewer output channels per group than a narrow tile's 16 lanes: the weight gradient vectorised
// along output rows fills its lanes with pixels instead (plan.h), where a row fills more of its
// vectors than the group's channels fill a narrow tile (32 -> 12 channels on an 8-pixel row ran at
// a third of the narrow tile's speed). At a stride along the row, only with few input channels per
// group: each unit copies its input plane, st times the output's columns, in phases, which a tile
// of many input channels amortises better (32 -> 12 3x3/s2 @56 ran at 0.3x against its 1.1x;
// 1 -> 6 5x5/s2 and stride-2 depthwise layers gained: benchmarks/NOTES.md v10).
// Any layout and engine dtype: a unit reads its input plane and dy block into float32 rows (a
// widened copy of a whole half-precision input would double its memory: tests/test_large.py's
// 4.6 GB bfloat16 input ran CI out of memory).
// Its row copy is the padded row rounded up to whole strides: only where that at most doubles it
// (a stride of 2^31 - 1 on a 1-pixel row asked for an 8 GB row: std::bad_alloc, found by the fuzz).
bool runs_row_weight_grad(const ConvShape& s, at::ScalarType dtype) {
  const bool fills_more = s.out_per_group() < kNarrowBlockChannels &&
                          s.out_w * kNarrowBlockChannels >= s.out_per_group() * row_lanes(s.out_w);
  const bool copy_pays = s.stride[1] == 1 || s.in_per_group() <= kRowStridedInChannels;
  // Kernel rows wider than the blocked tile holds (an AlexNet's 11x11) would otherwise run the
  // plain loops (0.06x F.conv2d at 1 -> 24 11x11/s4): the row engine takes them at any channel count.
  const bool only_engine = s.kernel_w > kMaxGradTaps;
  return engine_dtype(dtype) && ((fills_more && copy_pays) || only_engine) && s.kernel_w <= kMaxRowTaps &&
         s.stride[1] <= s.in_w + 2 * s.padding[1] && blocked_kernel_available();
}

// Output channels per unit: as few units as the registers allow, in even shares.
int64_t row_block(int64_t taps, int64_t out_per_group) {
  int64_t most = kMaxRowBlock;
  while (most > 1 && !row_tile_fits(most, taps)) --most;
  const int64_t units = ceil_div(out_per_group, most);
  return ceil_div(out_per_group, units);
}

// Blocks of a plane's output channels that one unit runs. A unit copies its input plane once per
// image for all its blocks, so a plane's blocks are split among units only as far as the threads
// need (1 -> 24 11x11/s4 as 24 units of one channel copied each 224-pixel plane 24 times: most of
// its time).
int64_t row_unit_blocks(const ConvShape& s, int64_t block, int64_t threads) {
  const int64_t blocks = ceil_div(s.out_per_group(), block), planes = s.groups * s.in_per_group();
  const int64_t splits = std::min(blocks, ceil_div(2 * std::max<int64_t>(threads, 1), planes));
  return ceil_div(blocks, splits);
}

// One input channel per output channel (a channel multiplier of 1): the depthwise engine, which
// vectorises across channels instead.
bool runs_depthwise(const ConvShape& s, at::ScalarType dtype) {
  return engine_dtype(dtype) && s.groups > 1 && s.in_channels == s.groups && s.out_channels == s.groups &&
         blocked_kernel_available();
}

// As many tasks as keep each task's strips within kStripBytes (cache-resident), at least two per
// thread, and a multiple of the thread count; in even shares of the rows (a fixed row count per
// task left 14 rows as 4 + 4 + 4 + 2, one thread idle an eighth of the time).
TaskRows task_rows(const BlockedProblem& p, int64_t threads) {
  TaskRows plan;
  plan.rows_per_group = product({p.batch, p.out_h});
  plan.unit = p.tile_rows();  // a task's rows fill its tiles
  plan.units = ceil_div(plan.rows_per_group, plan.unit);
  const int64_t strip_bytes = product({p.packs(), p.taps_h, p.strip_width(), int64_t(sizeof(float))});
  const int64_t rows_by_cache = std::max<int64_t>(1, kStripBytes / strip_bytes);
  int64_t tasks = std::max(2 * threads, ceil_div(product({p.groups, plan.rows_per_group}), rows_by_cache));
  tasks = ceil_div(tasks, threads) * threads;
  plan.group_tasks = std::clamp<int64_t>(tasks / p.groups, 1, std::max<int64_t>(1, plan.units));
  return plan;
}

// A problem with at most 16 output channels per group runs narrow tiles (plan.h).
BlockedProblem with_tile_width(BlockedProblem p) {
  p.block = p.out_per_group <= kNarrowBlockChannels ? kNarrowBlockChannels : kBlockedChannels;
  return p;
}

// bfloat16 runs in pairs where their dot product pays (plan.h, channel_pack; bf16_pairs_pay).
int64_t channel_pack_for(at::ScalarType dtype) { return dtype == at::kBFloat16 && bf16_pairs_pay() ? 2 : 1; }

BlockedRun correlation_run(const BlockedProblem& problem, const WeightTaps& taps, at::ScalarType dtype,
                           int64_t threads) {
  BlockedProblem p = with_tile_width(problem);
  p.channel_pack = channel_pack_for(dtype);
  // Too few tasks for the threads (a 3x3 map at batch 1 has 3 rows, one tile of 4): split each
  // task's channel blocks among threads, which then read each block's weights once in all, not once
  // per thread; with one block, tiles of fewer rows (down to pairs) instead.
  TaskRows tasks = task_rows(p, threads);
  while (p.most_tile_rows > 2 && p.blocks() == 1 && p.groups * tasks.units < 2 * threads) {
    --p.most_tile_rows;
    tasks = task_rows(p, threads);
  }
  tasks.block_parts = std::clamp<int64_t>(ceil_div(2 * threads, p.groups * tasks.group_tasks), 1, p.blocks());
  return {p, taps, tasks};
}

// With stride > 1 the input gradient splits into stride_h x stride_w phases (hi % stride_h,
// wi % stride_w). Within a phase only the taps r with (hi + pad - r*dil) % stride == 0 reach it,
// and they form a dense stride-1 correlation of grad_output with that sub-kernel, flipped. The CPU
// engines take the phases where those taps read unit-spaced grad_output rows along any strided axis
// (stride 1 or dilation 1); elsewhere the scatter loop serves. The CUDA implicit GEMM takes any.
bool input_grad_phases_apply(const ConvShape& s) {
  return (s.stride[0] == 1 || s.dilation[0] == 1) && (s.stride[1] == 1 || s.dilation[1] == 1);
}

int64_t gcd(int64_t a, int64_t b) { return b == 0 ? a : gcd(b, a % b); }

// Tap r reaches hi = phase + i*stride from ho = i + (phase + pad - r*dil) / stride when the division
// is exact: the reaching taps are stride/gcd(stride, dil) apart in the kernel, and their reads
// dil/gcd apart in grad_output. (Stride 1: every tap, reads dil apart; dilation 1: taps stride apart,
// reads consecutive.)
PhaseAxis phase_axis(int64_t phase, int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dil) {
  PhaseAxis a;
  a.out = phase < in ? ceil_div(in - phase, stride) : 0;
  for (int64_t r = kernel - 1; r >= 0; --r) {
    if ((phase + pad - r * dil) % stride == 0) {
      if (a.first_tap < 0) a.first_tap = r;
      ++a.taps;
    }
  }
  const int64_t common = gcd(stride, dil);
  a.tap_step = stride / common;
  a.dilation = dil / common;
  a.offset = a.first_tap < 0 ? 0 : (phase + pad - a.first_tap * dil) / stride;
  return a;
}

}  // namespace

// The phases that hold input positions and taps. Phases exist only for positions that do, so at
// most `in` per axis (a stride of 2^31 - 1 on a small image must not mean 2^31 phases to walk).
std::vector<Phase> input_grad_phases(const ConvShape& s) {
  std::vector<Phase> phases;
  for (int64_t h = 0; h < std::min(s.stride[0], s.in_h); ++h) {
    for (int64_t w = 0; w < std::min(s.stride[1], s.in_w); ++w) {
      const PhaseAxis a = phase_axis(h, s.in_h, s.kernel_h, s.stride[0], s.padding[0], s.dilation[0]);
      const PhaseAxis b = phase_axis(w, s.in_w, s.kernel_w, s.stride[1], s.padding[1], s.dilation[1]);
      if (a.out > 0 && b.out > 0 && a.taps > 0 && b.taps > 0) phases.push_back({h, w, a, b});
    }
  }
  return phases;
}

bool input_grad_phases_cover(const ConvShape& s, const std::vector<Phase>& phases) {
  return int64_t(phases.size()) == std::min(s.stride[0], s.in_h) * std::min(s.stride[1], s.in_w);
}

BlockedProblem forward_problem(const ConvShape& s) {
  return {s.batch, s.groups, s.in_per_group(), s.in_h, s.in_w, s.out_per_group(), s.out_h, s.out_w,
          s.kernel_h, s.kernel_w, s.stride[0], s.stride[1], s.dilation[0], s.dilation[1],
          -s.padding[0], -s.padding[1]};
}

// A phase of the input gradient: grad_output (K/G channels a group) correlated with the flipped,
// transposed sub-kernel of the taps that reach the phase, into the phase's positions of dx.
BlockedProblem input_grad_problem(const ConvShape& s, const Phase& ph) {
  const PhaseAxis &a = ph.a, &b = ph.b;
  BlockedProblem p{s.batch, s.groups, s.out_per_group(), s.out_h, s.out_w, s.in_per_group(), a.out, b.out,
                   a.taps, b.taps, 1, 1, a.dilation, b.dilation, a.offset, b.offset};
  p.out_origin_h = ph.h, p.out_origin_w = ph.w, p.out_step_h = s.stride[0], p.out_step_w = s.stride[1];
  p.out_plane_h = s.in_h, p.out_plane_w = s.in_w;
  return p;
}
WeightTaps input_grad_taps(const ConvShape& s, const Phase& ph) {
  return WeightTaps{s.kernel_h, s.kernel_w, true, ph.a.first_tap, -ph.a.tap_step, ph.b.first_tap, -ph.b.tap_step};
}

namespace {

BlockedRun input_grad_run(const ConvShape& s, const Phase& ph, at::ScalarType dtype, int64_t threads) {
  return correlation_run(input_grad_problem(s, ph), input_grad_taps(s, ph), dtype, threads);
}

// The weight gradient's chunks and work units. The chunking depends on the shape only, not on the
// thread count, so neither does the summation order (the result is deterministic).
GradChunks grad_chunks(const BlockedProblem& p, int64_t threads) {
  GradChunks g{};
  const int64_t C = p.in_per_group, S = p.taps_w;
  g.tile_channels = std::max<int64_t>(1, kGradTileValues * kBlockedChannels / p.block / S);
  g.cols = input_span(p.out_w, S, p.stride_w, p.dil_w);
  const auto chunk_bytes = [&](int64_t out_rows) {  // its input rows and a block of its dy
    return (product({p.input_rows(out_rows), g.cols, C}) + product({out_rows, p.out_w, p.block})) *
           int64_t(sizeof(float));
  };
  // A band of output rows of one image, as many rows as keep the band's input rows within
  // kGradChunkBytes; or, when a whole image fits, several whole images (the dW tiles are loaded and
  // stored once per chunk, so fewer, larger chunks save that traffic), evened out over the chunks.
  // Whole images go no more to a chunk than leave the chunks the slices want (below): LeNet's
  // 6 -> 16 at batch 64 fitted in one chunk, a single work item, and ran on one thread.
  const int64_t blocks = p.blocks();
  const int64_t wanted = ceil_div(kGradWorkItems, std::max<int64_t>(p.groups * blocks, 1));
  g.rows = std::max<int64_t>(1, p.out_h);
  while (g.rows > 1 && chunk_bytes(g.rows) > kGradChunkBytes) --g.rows;
  g.bands = ceil_div(p.out_h, g.rows);
  g.images = 1;
  if (g.bands == 1 && p.batch > 1) {
    const int64_t fit = std::clamp<int64_t>(kGradChunkBytes / chunk_bytes(p.out_h), 1, ceil_div(p.batch, wanted));
    g.images = ceil_div(p.batch, ceil_div(p.batch, fit));
  }
  // With more input than output channels the input channels are split among the threads, so that
  // each packs its share of x (the larger operand) and all of dy rather than all of x and its share
  // of dy. They are also split when there are fewer (group, block) pairs than threads.
  int64_t parts = C > p.out_per_group && p.groups < threads ? ceil_div(threads, p.groups) : 1;
  while ((p.groups * blocks * parts) % threads != 0 && p.groups * blocks * parts < 4 * threads &&
         C / (parts + 1) >= g.tile_channels)
    ++parts;
  g.parts = std::min(parts, std::max<int64_t>(1, C / g.tile_channels));
  g.part_channels = ceil_div(C, g.parts);
  // Runs of consecutive units, one per thread, as at::parallel_for would share them out.
  g.units = p.groups * g.parts * blocks;
  g.units_per_range = ceil_div(std::max<int64_t>(g.units, 1), std::min(threads, std::max<int64_t>(g.units, 1)));
  g.ranges = ceil_div(g.units, g.units_per_range);
  // Slices from the shape only, like the chunks, so that the sums' order does not depend on the
  // thread count either: by (group, block) pairs, as the parts split among threads are not.
  g.chunks = ceil_div(p.batch, g.images) * g.bands;
  const int64_t slices = std::clamp<int64_t>(wanted, 1, std::max<int64_t>(g.chunks, 1));
  g.slice_chunks = std::max<int64_t>(1, ceil_div(g.chunks, slices));
  g.slices = std::max<int64_t>(1, ceil_div(g.chunks, g.slice_chunks));
  return g;
}

}  // namespace

std::vector<int64_t> row_copy_slots(const ConvShape& s, int64_t& rows_read) {
  std::vector<int64_t> slot(s.in_h, -1);
  for (int64_t oh = 0; oh < s.out_h; ++oh)
    for (int64_t r = 0; r < s.kernel_h; ++r) {
      const int64_t ih = oh * s.stride[0] + r * s.dilation[0] - s.padding[0];
      if (ih >= 0 && ih < s.in_h) slot[ih] = 0;
    }
  rows_read = 0;
  for (int64_t& v : slot)
    if (v == 0) v = rows_read++;
  return slot;
}

int64_t BlockedProblem::strip_width() const { return input_span(out_w, taps_w, stride_w, dil_w); }
int64_t BlockedProblem::input_rows(int64_t out_rows) const { return input_span(out_rows, taps_h, stride_h, dil_h); }

bool input_is_columns(const ConvShape& s) {
  return s.kernel_h == 1 && s.kernel_w == 1 && s.stride[0] == 1 && s.stride[1] == 1 && s.padding[0] == 0 &&
         s.padding[1] == 0;
}

void check_workspace_fits(const LoweredPlan& plan, const ConvShape& s, int64_t workspace_limit) {
  // A call without images allocates nothing, so no limit binds it.
  TORCH_CHECK(s.batch == 0 || plan.row_bytes <= workspace_limit, "channelconv: the im2col workspace limit (",
              workspace_limit, " bytes) is smaller than one output row's column buffer (", plan.row_bytes,
              " bytes); raise it with channelconv.set_workspace_limit() or use algorithm='direct'");
}

LoweredPlan plan_lowered(const ConvShape& s, Lowering lowering, int64_t element_size, int64_t workspace_limit,
                         bool cpu, bool nhwc) {
  check_lowering(lowering, s, workspace_limit);
  LoweredPlan plan;
  plan.nhwc = cpu && nhwc && (s.groups == 1 || s.out_per_group() >= kNhwcGroupChannels);
  plan.column_rows = s.in_channels * s.kernel_h * s.kernel_w;
  plan.gemm_m = s.out_per_group();
  plan.gemm_k = s.column_rows();
  if (input_is_columns(s)) {  // runs of images share one GEMM: the whole batch with one group, or in NHWC
    plan.input_is_columns = true;
    plan.images = s.groups == 1 || plan.nhwc ? std::max<int64_t>(s.batch, 1) : 1;
    plan.rows = s.out_h;
    plan.gemm_n = product({s.out_h, s.out_w, plan.nhwc ? plan.images : 1});  // NHWC: the batch is one matrix
    plan.gemm_calls = ceil_div(s.batch, plan.images);
    return plan;
  }
  plan_bands(s, element_size, workspace_limit, cpu, plan);
  plan.column_numel = product({plan.images, plan.column_rows, plan.rows, s.out_w});
  plan.scratch_numel = plan.side_by_side ? product({plan.images, s.out_channels, s.out_h, s.out_w}) : 0;
  // (Side by side only where both fit the buffer budget: the sum cannot overflow.)
  plan.workspace_bytes = s.batch > 0 ? product({plan.column_numel + plan.scratch_numel, element_size}) : 0;
  plan.gemm_n = product({plan.rows, s.out_w, plan.side_by_side || plan.nhwc ? plan.images : 1});
  plan.gemm_calls = product({ceil_div(s.batch, plan.images), ceil_div(s.out_h, plan.rows)});
  plan.column_elements = product({s.batch, plan.column_rows, s.out_h, s.out_w});
  return plan;
}

bool blocked_kernel_available() {
#if defined(__x86_64__) && defined(__GNUC__)
  // CHANNELCONV_DISABLE_AVX512=1 forces the portable loops (what a CPU without AVX-512 runs);
  // the tests use it to cover that path on this machine.
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") &&
                                std::getenv("CHANNELCONV_DISABLE_AVX512") == nullptr;
  return available;
#else
  return false;
#endif
}

bool bf16_dot_available() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool available = blocked_kernel_available() && __builtin_cpu_supports("avx512bf16") &&
                                std::getenv("CHANNELCONV_DISABLE_BF16_DOT") == nullptr;
  return available;
#else
  return false;
#endif
}

bool bf16_pairs_pay() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool pay = [] {
    if (!bf16_dot_available()) return false;
    if (const char* forced = std::getenv("CHANNELCONV_BF16_PAIRS")) return std::strcmp(forced, "0") != 0;
    return !__builtin_cpu_is("intel");
  }();
  return pay;
#else
  return false;
#endif
}

// The AMX kernels' buffers (padded input, packed weight; the weight gradient's x pairs and dy
// blocks) below 2^40 elements: no index of the kernels can overflow (larger inputs take the blocked
// engines, which stream them).
constexpr int64_t kMaxAmxBuffer = int64_t(1) << 40;

namespace {

// Whether the AMX kernels take s at all, and whether the products of their tiles are at least 1/16
// real: those of the forward correlation's (`forward`: taps folded, plan.h AmxGeometry), or the
// weight gradient's. Channels are padded to 32
// both ways: under 1/16 (3 -> 16, 1 -> 6 unfolded: 5 %, 0.6 %), the blocked engine is faster (1 -> 6 5x5 @28: 0.37x F.conv2d against AMX's 0.17x;
// 6 -> 16: 9 %, AMX 0.49x against 0.40x). Phantom taps count as padding.
bool amx_takes(const ConvShape& s, at::ScalarType dtype, bool forward) {
  // A split layer's kernel must reach every phase, without dilation.
  const bool splits_fully = s.dilation[0] == 1 && s.dilation[1] == 1 && s.kernel_h >= s.stride[0] &&
                            s.kernel_w >= s.stride[1];
  if (dtype != at::kBFloat16 || s.groups != 1 ||
      std::max({s.in_h, s.in_w, s.padding[0], s.padding[1]}) >= kMaxAmxBuffer || (amx_splits(s) && !splits_fully)) {
    return false;
  }
  const ConvShape a = amx_shape(s);
  const AmxGeometry g = amx_geometry(a);
  // One input channel (at stride 1) is copied 32-fold into tile rows, most of each row zeros even
  // folded: 1 -> 16 3x3 @224 ran 0.25x F.conv2d on AMX, 0.6-0.8x on the blocked engine.
  if (a.in_channels == 1) return false;
  const bool fills_tiles = 16 * product({s.in_channels, s.out_channels, s.kernel_h, s.kernel_w}) >=
                           product({g.channels, g.outputs, a.kernel_h, forward ? g.row_steps : a.kernel_w});
  // (The weight's element offsets are 32-bit gather indices: cpu/amx.cpp, gather_row.)
  return fills_tiles && product({a.batch + 1, g.image_pixels, g.channels}) < kMaxAmxBuffer &&
         product({a.out_channels, a.in_channels, a.kernel_h, a.kernel_w}) < (int64_t(1) << 31) &&
         product({a.kernel_h, a.kernel_w, g.channels, g.outputs}) < kMaxAmxBuffer && blocked_kernel_available() &&
         amx_available();
}

}  // namespace

bool runs_amx(const ConvShape& s, at::ScalarType dtype) { return amx_takes(s, dtype, /*forward=*/true); }

ConvShape amx_shape(const ConvShape& s) {
  if (!amx_splits(s)) return s;
  ConvShape a = s;
  a.in_channels = product({s.in_channels, s.stride[0], s.stride[1]});
  a.kernel_h = ceil_div(s.kernel_h, s.stride[0]);
  a.kernel_w = ceil_div(s.kernel_w, s.stride[1]);
  a.in_h = s.out_h + a.kernel_h - 1;  // the rows the output reaches (pixels past the padded input: zero)
  a.in_w = s.out_w + a.kernel_w - 1;
  a.stride = {1, 1};
  a.padding = {0, 0};
  a.dilation = {1, 1};
  return a;
}

std::vector<uint8_t> amx_real_taps(const ConvShape& s) {
  const ConvShape a = amx_shape(s);
  const int64_t taps = a.kernel_h * a.kernel_w, blocks = ceil_div(a.in_channels, kAmxChannels);
  std::vector<uint8_t> real(taps * blocks, 0);
  for (int64_t tap = 0; tap < taps; ++tap) {
    for (int64_t c = 0; c < a.in_channels; c += s.in_channels) {  // each phase's first channel
      const int64_t phase = c / s.in_channels;
      const bool inside = tap / a.kernel_w * s.stride[0] + phase / s.stride[1] < s.kernel_h &&
                          tap % a.kernel_w * s.stride[1] + phase % s.stride[1] < s.kernel_w;
      if (!inside) continue;
      for (int64_t block = c / kAmxChannels; block * kAmxChannels < c + s.in_channels; ++block) {
        real[tap * blocks + block] = 1;
      }
    }
  }
  return real;
}

ConvShape transposed_correlation(const ConvShape& s) {
  ConvShape t = s;
  std::swap(t.in_channels, t.out_channels);
  std::swap(t.in_h, t.out_h);
  std::swap(t.in_w, t.out_w);
  t.padding = {(s.kernel_h - 1) * s.dilation[0] - s.padding[0], (s.kernel_w - 1) * s.dilation[1] - s.padding[1]};
  return t;
}

bool runs_amx_input_grad(const ConvShape& s, at::ScalarType dtype) {
  if (amx_phases_mix(s) || (amx_splits(s) && !runs_amx(s, dtype))) return false;
  const ConvShape t = transposed_correlation(amx_shape(s));
  return t.padding[0] >= 0 && t.padding[1] >= 0 && runs_amx(t, dtype);
}

bool runs_amx_weight_grad(const ConvShape& s, at::ScalarType dtype) {
  const int64_t narrow = kAmxChannels / 2, fewer = std::min(s.in_channels, s.out_channels),
                more = std::max(s.in_channels, s.out_channels);
  if (more <= narrow || (amx_splits(s) && fewer <= narrow && more <= kAmxChannels) ||
      !amx_takes(s, dtype, /*forward=*/false)) {
    return false;
  }
  const ConvShape a = amx_shape(s);
  const AmxGeometry g = amx_geometry(a);
  return product({2, a.batch, g.channels, amx_grad_plane(a, g)}) < kMaxAmxBuffer &&
         product({a.batch, g.blocks, kAmxPixels, g.outputs}) < kMaxAmxBuffer;
}

bool amx_available() {
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
  // Linux hands out the tile data registers to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM
  // for XFEATURE_XTILEDATA); the vector conversions of cpu/amx.cpp's results need AVX512_BF16.
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool available = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                                __builtin_cpu_supports("avx512bf16") &&
                                std::getenv("CHANNELCONV_DISABLE_AMX") == nullptr &&
                                syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return available;
#else
  return false;
#endif
}

DirectPlan plan_direct(const ConvShape& s, DirectPass pass, at::ScalarType dtype, int64_t threads) {
  threads = std::max<int64_t>(1, threads);
  DirectPlan plan;
  switch (pass) {
    case DirectPass::Forward:
      if (runs_amx(s, dtype)) {
        plan.kernel = DirectKernel::Amx;
        return plan;
      }
      return plan_forward_engines(s, dtype, threads);
    case DirectPass::InputGrad:
      if (runs_amx_input_grad(s, dtype)) {
        plan.kernel = DirectKernel::Amx;
        return plan;
      }
      if (!input_grad_phases_apply(s)) return plan;  // the scatter loop
      plan.phases = input_grad_phases(s);
      if (runs_depthwise(s, dtype)) {
        plan.kernel = DirectKernel::Depthwise;
        for (const Phase& ph : plan.phases) plan.runs.push_back(input_grad_run(s, ph, dtype, threads));
      } else if (runs_blocked(dtype, s.in_per_group())) {
        plan.kernel = DirectKernel::Blocked;
        for (const Phase& ph : plan.phases) plan.runs.push_back(input_grad_run(s, ph, dtype, threads));
      } else if (s.stride[0] > 1 || s.stride[1] > 1) {
        plan.kernel = DirectKernel::LoopPhases;
      }
      return plan;
    case DirectPass::WeightGrad:
      // Where the row engine runs (few output channels, wide kernel rows), it is faster than
      // AMX's padded tiles (1 -> 6 5x5 @28: 1.9x F.conv2d against 0.09x).
      if (runs_amx_weight_grad(s, dtype) && !runs_row_weight_grad(s, dtype)) {
        plan.kernel = DirectKernel::Amx;
        return plan;
      }
      return plan_weight_grad_engines(s, dtype, threads);
  }
  return plan;
}

DirectPlan plan_forward_engines(const ConvShape& s, at::ScalarType dtype, int64_t threads) {
  threads = std::max<int64_t>(1, threads);
  DirectPlan plan;
  if (runs_depthwise(s, dtype)) {
    plan.kernel = DirectKernel::Depthwise;
    plan.runs.push_back({forward_problem(s), WeightTaps{s.kernel_h, s.kernel_w}, TaskRows{}});
  } else if (runs_blocked(dtype, s.out_per_group())) {
    plan.kernel = DirectKernel::Blocked;
    plan.runs.push_back(correlation_run(forward_problem(s), WeightTaps{s.kernel_h, s.kernel_w}, dtype, threads));
  }
  return plan;
}

DirectPlan plan_weight_grad_engines(const ConvShape& s, at::ScalarType dtype, int64_t threads) {
  threads = std::max<int64_t>(1, threads);
  DirectPlan plan;
  const BlockedProblem p = with_tile_width(forward_problem(s));
  if (runs_row_weight_grad(s, dtype)) {
    plan.kernel = DirectKernel::RowWeightGrad;
    plan.row_block = row_block(s.kernel_w, s.out_per_group());
    plan.row_unit_blocks = row_unit_blocks(s, plan.row_block, threads);
  } else if (runs_blocked(dtype, s.out_per_group()) && p.taps_w <= kMaxGradTaps) {
    plan.kernel = DirectKernel::BlockedWeightGrad;
    plan.grad_problem = p;
    plan.grad_problem.channel_pack = channel_pack_for(dtype);  // (pairs of a row's output pixels)
    plan.chunks = grad_chunks(p, threads);
  }
  return plan;
}

}  // namespace channelconv
