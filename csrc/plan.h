// The plans of channelconv's kernels: the one place where each algorithm decides how it runs a
// convolution (bands of columns, side-by-side images, register tiles, tasks, stride phases,
// weight-gradient chunks, workspace bytes). The kernels run exactly the plan these functions
// return; Python reads the same plans through the channelconv::_plan op (plan_op.cpp), so 'auto'
// and cost() never restate a rule or a constant of the kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "conv_params.h"

namespace channelconv {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// a * b * ..., or INT64_MAX where that does not fit. The plans size buffers and count work for any
// shape the op accepts, also one whose buffers could never be allocated: a saturated size exceeds
// every workspace limit, and the allocation of the op's result fails with the allocator's message.
inline int64_t product(std::initializer_list<int64_t> factors) {
  for (int64_t f : factors) {
    if (f == 0) return 0;
  }
  int64_t p = 1;
  for (int64_t f : factors) {
    if (__builtin_mul_overflow(p, f, &p)) return std::numeric_limits<int64_t>::max();
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// im2col and 1x1: the GEMM driver (lowered.cpp)
// ---------------------------------------------------------------------------------------------

enum class Lowering {
  Im2col,    // unroll patches into a column buffer (except where that is the identity)
  OneByOne,  // 1x1 kernels only; the input itself is the column matrix at stride 1, no padding
};

// With a 1x1 kernel, stride 1 and no padding the unrolling is the identity: each image (C, H*W)
// already is its column matrix, and both lowerings read the input where it lies (as Caffe's and
// PyTorch's own im2col paths do). Dilation does not move a 1x1 tap.
bool input_is_columns(const ConvShape& s);

// How the driver runs a layer. Unless the input is its own column matrix, one column buffer is
// reused for every band: a band of output rows of one image, as many rows as fit the buffer size
// it prefers below the workspace limit; or, when whole images fit and there is one group, several
// whole images, which then run as one batched GEMM.
//
// Side by side (CPU only): a small map's images sit side by side in one (C*k_h*k_w,
// images*H_o*W_o) column matrix, and each pass runs one GEMM over all of them, with a scratch of
// (C_o, images*H_o*W_o) in the same workspace: the forward pass's output, copied out to each
// image, or the gradients' output gradient, copied in. Chosen where the per-image GEMM wastes
// MKL's 16-pixel vector rows (a 7x7 map: 49 pixels in 64 lanes) and enough images fit.
//
// NHWC (CPU, a channels_last operand): the columns are (pixels, C*k_h*k_w) rows, one per output
// pixel, each tap's C channels one contiguous run of the input (groups side by side in a row), and
// a band's pixels are consecutive rows of the NHWC output: whole images stack with no scratch and
// no copy, and every band, of any number of groups, is one GEMM per group over all its pixels
// (groups of fewer than 4 output channels take the NCHW driver: plan.cpp, kNhwcGroupChannels).
struct LoweredPlan {
  bool input_is_columns = false;
  int64_t images = 1;  // images per batched GEMM: per band, or per run when the input is the columns
  int64_t rows = 1;    // output rows per band (the last band may be shorter)
  bool side_by_side = false;
  bool nhwc = false;
  int64_t column_rows = 0;    // C * k_h * k_w: every group's column rows
  int64_t row_bytes = 0;      // one output row's columns: the least workspace a band needs
  int64_t column_numel = 0;   // elements of one band's columns
  int64_t scratch_numel = 0;  // side by side: a band's outputs (or output gradients)
  int64_t workspace_bytes = 0;
  // The forward pass's GEMMs: gemm_calls batched calls, each (M x K) . (K x N) per group.
  int64_t gemm_m = 0, gemm_k = 0, gemm_n = 0, gemm_calls = 0;
  int64_t column_elements = 0;  // elements the unrolling writes in one pass (0: the input is read as is)
};

// Throws, with the op's own message, what the lowering refuses: '1x1' on another kernel, a
// non-positive workspace limit.
// Whether channels_last data of `channels` x `pixels` per image is NHWC to the kernels: with one
// channel or one pixel it is NCHW-contiguous as well, and the NCHW paths read it as it lies. The
// one rule for the layout the lowered driver runs on an operand and the plan op reports for the
// input (Python reads it from there).
inline bool sees_nhwc(int64_t channels, int64_t pixels, bool channels_last) {
  return channels_last && channels > 1 && pixels > 1;
}
// Whether 'auto' prices a layer whose activations are channels_last in that layout: when the kernels
// see its input or its output as NHWC. A one-channel input is NCHW as well, but its output of 16
// channels is not, and the direct kernels write it as NHWC (the lowered driver follows its input
// alone: its NHWC columns of one channel ran at a tenth of F.conv2d's speed; benchmarks/NOTES.md v18).
inline bool layer_sees_nhwc(const ConvShape& s, bool channels_last) {
  // (pixels as 0, 1 or 2: a plan may be asked for sizes whose product overflows)
  const auto pixels = [](int64_t h, int64_t w) -> int64_t { return h < 1 || w < 1 ? 0 : h > 1 || w > 1 ? 2 : 1; };
  return sees_nhwc(s.in_channels, pixels(s.in_h, s.in_w), channels_last) ||
         sees_nhwc(s.out_channels, pixels(s.out_h, s.out_w), channels_last);
}
// `nhwc`: the CPU's channels_last driver (above).
LoweredPlan plan_lowered(const ConvShape& s, Lowering lowering, int64_t element_size, int64_t workspace_limit,
                         bool cpu, bool nhwc);
// Throws when the plan's column buffer needs more than the limit (one output row's columns do not
// fit): checked where the buffer is made, after the op's result is allocated.
void check_workspace_fits(const LoweredPlan& plan, const ConvShape& s, int64_t workspace_limit);

// ---------------------------------------------------------------------------------------------
// direct on the CPU (cpu/direct.cpp, cpu/blocked_*.cpp)
// ---------------------------------------------------------------------------------------------

// The register-blocked engine's tile: 32 output channels (two AVX-512 registers) x up to 14
// output pixels, a piece of one row or the same columns of 2-4 rows of at most 7. A problem with at
// most 16 output channels per group takes narrow tiles: 16 channels (one register) x up to 28
// pixels, so that half the lanes do not multiply padding.
constexpr int64_t kBlockedChannels = 32;
constexpr int64_t kNarrowBlockChannels = 16;
constexpr int kMaxPixels = 14;  // of a 32-channel tile
constexpr int kMaxNarrowPixels = kMaxPixels * kBlockedChannels / kNarrowBlockChannels;
// Rows per tile on small maps: a 3-pixel row's tile of 2 rows held 6 of 14 pixels, and streamed a
// block's weights from L2 for 12 multiply-adds per tap; 4 rows hold 12 (benchmarks/NOTES.md v13).
constexpr int kMaxTileRows = 4;
// The weight-gradient tile: 32 output channels x G input channels x S taps of one kernel row,
// G * S <= kGradTileValues (24 accumulators of the 32 registers), S <= kMaxGradTaps; a narrow
// tile, 16 channels, holds twice the values.
constexpr int kMaxGradTaps = 7;
constexpr int kGradTileValues = 12;
// The row weight-gradient tile (few output channels per group): KB output channels x S taps of 16
// pixel lanes, plus the S input vectors or the KB dy vectors (the fewer) and one of the others, in
// the 32 registers.
constexpr int kRowLanes = 16;
constexpr int kMaxRowBlock = 8;
constexpr bool row_tile_fits(int64_t kb, int64_t s) { return kb * s + (s < kb ? s : kb) + 1 <= 32; }
// Its widest kernel row (the tile's table is instantiated for each width up to it).
constexpr int kMaxRowTaps = 15;
static_assert(row_tile_fits(1, kMaxRowTaps));
// At a stride along the row it runs for at most this many input channels per group (plan.cpp).
constexpr int64_t kRowStridedInChannels = 4;
// The lanes a row of output pixels takes: whole vectors, the last one masked.
constexpr int64_t row_lanes(int64_t out_w) { return (out_w + kRowLanes - 1) / kRowLanes * kRowLanes; }
// Floats per input row the row engine copies: the zero-padded row, as stride_w phases of equal length.
inline int64_t row_copy_width(const ConvShape& s) {
  const int64_t st = s.stride[1];
  return (s.in_w + 2 * s.padding[1] + st - 1) / st * st;
}
// The input rows it copies, those some tap reads, each given a row of its copy in order: slot[ih],
// or -1 (a stride along the height skips rows: tests/test_large.py reads 178 of 34000).
std::vector<int64_t> row_copy_slots(const ConvShape& s, int64_t& rows_read);

// One blocked correlation, the forward pass and each stride phase of the input gradient alike:
//   out[n, g*out_pg + k, oh, ow] = init[k] + sum_{c, r, s} packed(g, k, c, r, s)
//       * in[n, g*in_pg + c, oh*stride_h + r*dil_h + offset_h, ow*stride_w + s*dil_w + offset_w]
// with input taps outside the plane reading zero.
struct BlockedProblem {
  int64_t batch, groups;
  int64_t in_per_group, in_h, in_w;     // input planes
  int64_t out_per_group, out_h, out_w;  // output planes
  int64_t taps_h, taps_w;
  int64_t stride_h, stride_w, dil_h, dil_w;
  int64_t offset_h, offset_w;  // input coordinate of tap 0 at output 0 (minus the padding)
  // Where output pixel (oh, ow) is stored: (origin + o*step) in planes of plane_h x plane_w.
  // The defaults store densely; the strided input gradient writes one stride phase at a time.
  int64_t out_origin_h = 0, out_origin_w = 0, out_step_h = 1, out_step_w = 1;
  int64_t out_plane_h = -1, out_plane_w = -1;  // -1: out_h, out_w
  int64_t block = kBlockedChannels;              // output channels per tile (kNarrowBlockChannels: narrow)
  // Input channels one multiply step of a tile takes: 1 (a float32 FMA), or 2 where bfloat16 pairs
  // of channels go into one dot-product instruction (vdpbf16ps, twice the FMA's multiply-adds).
  // Strips and packed weights then hold packs(): pairs of channels, 32 bits each like a float.
  // In the weight gradient, whose reduction runs over output pixels, 2 pairs a row's consecutive
  // output pixels instead (a row's odd last pixel runs in float32).
  int64_t channel_pack = 1;
  // Rows a tile may take (kMaxTileRows; fewer where neither the tasks nor their channel blocks
  // would keep the threads busy).
  int64_t most_tile_rows = kMaxTileRows;

  int64_t plane_h() const { return out_plane_h < 0 ? out_h : out_plane_h; }
  int64_t plane_w() const { return out_plane_w < 0 ? out_w : out_plane_w; }
  int64_t blocks() const { return (out_per_group + block - 1) / block; }
  int64_t block_channels(int64_t b) const { return std::min(block, out_per_group - b * block); }  // of block b
  int64_t packs() const { return (in_per_group + channel_pack - 1) / channel_pack; }
  // The weights packed for the tiles (cpu/blocked.h): a channel block's, [c][r][s][block], and all
  // of them, [group][channel block][...].
  int64_t block_weight_floats() const { return packs() * taps_h * taps_w * block; }
  int64_t packed_weight_floats() const { return product({groups, blocks(), block_weight_floats()}); }
  int64_t max_pixels() const { return block == kBlockedChannels ? kMaxPixels : kMaxNarrowPixels; }
  // Rows of at most half a tile go several to a tile, as many as fit, up to kMaxTileRows; wider
  // rows are cut into row_pieces() tiles.
  int64_t tile_rows() const {
    return std::clamp<int64_t>(max_pixels() / std::max<int64_t>(out_w, 1), 1, most_tile_rows);
  }
  bool grouped_rows() const { return tile_rows() > 1; }
  int64_t row_pieces() const { return grouped_rows() ? 1 : (out_w + max_pixels() - 1) / max_pixels(); }
  int64_t tiles(int64_t rows) const {
    return grouped_rows() ? (rows + tile_rows() - 1) / tile_rows() : product({rows, row_pieces()});
  }
  int64_t strip_width() const;                  // input columns one output row's strip holds
  int64_t input_rows(int64_t out_rows) const;  // input rows a band of out_rows output rows reads
};

// Which weight element each of the problem's taps multiplies. The weight is a conv weight
// (K, C/groups, kernel_h, kernel_w), contiguous. Forward (transposed = false): the problem's
// output channels are the weight's K, its input channels the weight's C, and it reads every tap
// in order. Input gradient (transposed = true): the other way round, and tap (t, u) reads kernel
// row first_h + t*step_h, column first_w + u*step_w (flipped: step -1; one stride phase's taps:
// step -stride).
struct WeightTaps {
  int64_t kernel_h, kernel_w;
  bool transposed = false;
  int64_t first_h = 0, step_h = 1, first_w = 0, step_w = 1;
};

// How a group's output rows (which run on from one image into the next) are shared among its
// tasks: task t takes units [t * units / tasks, (t + 1) * units / tasks), a unit being one row,
// or a tile's rows when rows share tiles. Each task runs every channel block over its rows, so a
// block's packed weights are read once per task. Where there are too few tasks to keep the
// threads busy (small maps at batch 1), each task's channel blocks are split into block_parts
// work items, which run on different threads over the same rows.
struct TaskRows {
  int64_t rows_per_group, unit, units, group_tasks;
  int64_t block_parts = 1;
  int64_t begin(int64_t t) const { return std::min(rows_per_group, t * units / group_tasks * unit); }
  int64_t end(int64_t t) const { return begin(t + 1); }
  int64_t max_rows() const { return (units + group_tasks - 1) / group_tasks * unit; }
};

struct BlockedRun {
  BlockedProblem problem;
  WeightTaps taps;
  TaskRows tasks;
};

// The blocked weight gradient's reduction over output pixels, in chunks: a band of output rows of
// one image, or several whole images. Work units (group, input-channel part, channel block) each
// own their part of dW; `ranges` threads take runs of units_per_range consecutive units. Where the
// units are too few to share out, the chunks are cut into `slices` of slice_chunks consecutive
// chunks, each summed into its own copy of dW; the copies are then added in slice order.
struct GradChunks {
  int64_t rows, bands, images;            // output rows per band, bands per image, images per chunk
  int64_t cols;                           // input columns of a chunk's channel-last rows
  int64_t parts, part_channels;           // input channels split into parts of part_channels
  int64_t tile_channels;                  // G: input channels per tile
  int64_t units, ranges, units_per_range;
  int64_t chunks, slices, slice_chunks;   // chunks in all (image runs x bands, image-major)
};

// One stride phase of the input gradient along one axis: the input positions phase, phase +
// stride, ... and the kernel taps that reach them (largest first: the flipped order).
struct PhaseAxis {
  int64_t out = 0;         // input positions in the phase
  int64_t first_tap = -1;  // largest kernel tap reaching the phase (-1: none)
  int64_t taps = 0;        // how many taps reach it, tap_step apart in the kernel
  int64_t tap_step = 1;
  int64_t dilation = 1;    // spacing of those taps' reads in grad_output
  int64_t offset = 0;      // grad_output position read by the first tap at the phase's position 0
};
struct Phase {
  int64_t h, w;  // the phase: input positions (h + i*stride_h, w + j*stride_w)
  PhaseAxis a, b;
};

// The phases that hold input positions and taps (for any stride and dilation), and whether they
// are all the phases holding input positions (otherwise dx is zero at the others' positions).
std::vector<Phase> input_grad_phases(const ConvShape& s);
bool input_grad_phases_cover(const ConvShape& s, const std::vector<Phase>& phases);

// The forward pass, and one phase of the input gradient, as correlations: what the CPU's blocked
// engines and the CUDA implicit GEMM (cuda/implicit_gemm.h) both run.
BlockedProblem forward_problem(const ConvShape& s);
BlockedProblem input_grad_problem(const ConvShape& s, const Phase& phase);
WeightTaps input_grad_taps(const ConvShape& s, const Phase& phase);

enum class DirectPass { Forward, InputGrad, WeightGrad };

enum class DirectKernel {
  Blocked,            // register-blocked correlations: `runs` (the forward pass, or one per phase)
  Depthwise,          // depthwise correlations, 16 channels at a time: `runs` (likewise)
  BlockedWeightGrad,  // the blocked weight-gradient reduction: `chunks`
  RowWeightGrad,      // the weight gradient vectorised along output rows: `row_block` channels a block
  Amx,                // bfloat16 on AMX tiles (cpu/amx.cpp): the forward, the weight gradient, or the input
                      // gradient as one more forward correlation
  Loops,              // the plain loops, vectorised along the row
  LoopPhases,         // the plain loops, input gradient phase by phase: `phases`
};

struct DirectPlan {
  DirectKernel kernel = DirectKernel::Loops;
  std::vector<BlockedRun> runs;
  BlockedProblem grad_problem{};  // BlockedWeightGrad: the forward problem (input x, output dy)
  GradChunks chunks{};            // and how its reduction runs
  int64_t row_block = 0;          // RowWeightGrad: output channels per block
  int64_t row_unit_blocks = 1;    // and blocks per unit (which copies its input plane once for them all)
  std::vector<Phase> phases;      // the input gradient's phases that hold positions and taps
};

// The engines compute in float32 and take float32, bfloat16 and float16 operands, converted where
// they are read and written (cpu/activations.h); float64 runs the plain loops.
inline bool engine_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// Whether this CPU runs the blocked engine (AVX-512F with FMA, and not disabled by
// CHANNELCONV_DISABLE_AVX512); otherwise every pass runs the plain loops.
bool blocked_kernel_available();
// Whether the CPU has AVX512_BF16's dot product (vdpbf16ps), and CHANNELCONV_DISABLE_BF16_DOT is
// unset (the tests use it to cover the widening path).
bool bf16_dot_available();
// Whether the blocked engines run bfloat16 in pairs (BlockedProblem::channel_pack) rather than
// widened to float32: where the dot product is available and pays. On AMD's Zen 4 it does two
// products a lane at the FMA's rate, 1.7-1.8x the widened tile (benchmarks/NOTES.md v11). On
// Intel's Sapphire Rapids the pairs ran every layer measured slower than widening (NOTES v19:
// 0.59 -> 0.68x F.conv2d forward, 0.37 -> 0.61 dW at 16 channels a group): its FMAs issue on two
// ports, so the dot product's two products a lane buy nothing, and the pair interleave costs.
// CHANNELCONV_BF16_PAIRS=1 or 0 forces the choice where the instruction exists (the tests cover both).
bool bf16_pairs_pay();
// Whether this CPU and OS run AMX tiles with bfloat16 (and CHANNELCONV_DISABLE_AMX is unset).
bool amx_available();
// The layers the AMX forward takes (cpu/amx.cpp): bfloat16, one group; stride 1, or a strided
// layer of dilation 1 whose kernel spans the stride both ways (every input phase meets a tap).
bool runs_amx(const ConvShape& s, at::ScalarType dtype);
// The stride-1 layer AMX runs for s: s itself at stride 1. A strided layer runs over its input split
// into its stride_h x stride_w phases (space to depth), unpadded: channel p * C + c, pixel (i, j) of
// the split input is the padded input's x[c][i * stride_h + a][j * stride_w + b], phase
// p = a * stride_w + b. Its kernel is ceil(k / stride) taps each way, tap (i, j) of phase p being
// w[.., c, i * stride_h + a, j * stride_w + b], or a phantom (zero) past the kernel: a 3x3/s2
// layer has 4C channels and 2 x 2 taps, 16 products where 9 are real. The kernels skip a phantom
// tap wherever a block of 32 channels is one phase (C a multiple of 32): amx_real_taps.
ConvShape amx_shape(const ConvShape& s);
// For each tap of amx_shape(s) and block of 32 of its input channels, [tap][block]: whether a
// channel of the block has a real tap there (every one, at stride 1).
std::vector<uint8_t> amx_real_taps(const ConvShape& s);
// A stride-1 layer's input gradient as a forward correlation: of grad_output (K channels) with the
// weight flipped and transposed, at padding (k - 1) * dilation - pad; AMX runs it where that
// padding is not negative (every 'same' or 'valid' layer), and a strided layer's as that of its
// amx_shape, where no block of 32 input channels mixes phases (its phantom taps skipped exactly).
ConvShape transposed_correlation(const ConvShape& s);
bool runs_amx_input_grad(const ConvShape& s, at::ScalarType dtype);

// The AMX forward's blocks: 32 output pixels (two tiles of 16) x 32 output channels (two of 16),
// reducing 32 input channels (a 64-byte tile row) a step; the pixels run over the padded width
// (the "wide grid", cpu/amx.cpp), those past out_w computed and dropped.
constexpr int64_t kAmxPixels = 32, kAmxOutputs = 32, kAmxChannels = 32;
// Whether AMX runs s split into its input's phases (amx_shape), and whether those phases share
// blocks of 32 channels (C not a multiple of 32): there the phantom taps cannot be skipped, and
// they multiply real pixels by zero (0 * Inf: the kernels check, or decline).
inline bool amx_splits(const ConvShape& s) { return s.stride[0] > 1 || s.stride[1] > 1; }
inline bool amx_phases_mix(const ConvShape& s) { return amx_splits(s) && s.in_channels % kAmxChannels != 0; }
// Folding (the forward correlation only): a layer of at most 16 input channels would fill a tile
// row of 32 with as many zeros, so each row of its padded input holds `fold` neighbouring pixels'
// channels instead (pixel P's row: x[P], x[P + 1], ..., C channels each), and one product step
// covers `fold` taps of a kernel row: ceil(kernel_w / fold) steps a kernel row instead of
// kernel_w (16 -> 16 3x3: 6 steps for 9; 6 -> 16 5x5: 5 for 25). Without dilation along the row.
struct AmxGeometry {
  int64_t channels, outputs;  // padded to kAmxChannels and kAmxOutputs
  int64_t padded_h, padded_w, image_pixels;
  int64_t grid, blocks;       // wide-grid pixels per image (out_h * padded_w), and their blocks
  int64_t fold = 1;           // pixels a tile row of the forward's padded input holds
  int64_t row_steps = 1;      // product steps a kernel row: ceil(kernel_w / fold)
  // The forward's blocks: 32 pixels x 32 outputs, or 64 pixels x 16 where the outputs are at most 16.
  bool narrow_outputs = false;
};
inline AmxGeometry amx_geometry(const ConvShape& s) {
  AmxGeometry g;
  if (s.in_channels > 0 && 2 * s.in_channels <= kAmxChannels && s.dilation[1] == 1 && s.kernel_w > 1) {
    g.fold = std::min(s.kernel_w, kAmxChannels / s.in_channels);
  }
  g.row_steps = ceil_div(s.kernel_w, g.fold);
  g.narrow_outputs = s.out_channels <= kAmxOutputs / 2;
  g.channels = ceil_div(s.in_channels, kAmxChannels) * kAmxChannels;
  g.outputs = ceil_div(s.out_channels, kAmxOutputs) * kAmxOutputs;
  g.padded_h = s.in_h + 2 * s.padding[0];
  g.padded_w = s.in_w + 2 * s.padding[1];
  g.image_pixels = product({g.padded_h, g.padded_w});
  g.grid = product({s.out_h, g.padded_w});
  g.blocks = ceil_div(g.grid, kAmxPixels);
  return g;
}

// The AMX weight gradient (cpu/amx.cpp) reads x as padded planes of this many pixels: a block of
// 32 wide-grid pixels shifted by the last tap runs up to 31 + (k_w - 1) * dil_w pixels past the
// padded image (those zero), rounded up to whole 64-byte lines.
inline int64_t amx_grad_plane(const ConvShape& s, const AmxGeometry& g) {
  return ceil_div(g.image_pixels + kAmxPixels + (s.kernel_w - 1) * s.dilation[1], kAmxChannels) * kAmxChannels;
}
// Its units of work: (output-channel block, input-channel block, group of taps), each summing its
// dW elements over the whole batch in one fixed order (the result does not depend on the split).
// Blocks are 32 x 32 (four accumulators: 2 x 2 tiles), or, where the layer is one such block and
// at least half of it padding ("narrow": 16 -> 16, 16 -> 32), 16 x 16 with up to four taps in the
// accumulators, one dy tile serving them all (16 -> 16 3x3 @32: 0.28x F.conv2d -> 0.39x; at
// 16 -> 64, 64 -> 16 it lost 5-10 %). Taps are split into more groups only where the units are too
// few to keep the threads busy.
struct AmxGradUnits {
  bool narrow;
  int64_t output_blocks, channel_blocks, tap_groups, group_taps;
  int64_t width() const { return narrow ? kAmxOutputs / 2 : kAmxOutputs; }  // channels of a block, each side
  int64_t count() const { return output_blocks * channel_blocks * tap_groups; }
};
inline AmxGradUnits amx_grad_units(const ConvShape& s, int64_t threads) {
  threads = std::max<int64_t>(1, threads);
  const int64_t taps = s.kernel_h * s.kernel_w;
  AmxGradUnits u{};
  u.narrow = std::min(s.in_channels, s.out_channels) <= kAmxChannels / 2 &&
             std::max(s.in_channels, s.out_channels) <= kAmxChannels;
  u.output_blocks = ceil_div(s.out_channels, u.width());
  u.channel_blocks = ceil_div(s.in_channels, u.width());
  const int64_t blocks = u.output_blocks * u.channel_blocks;
  if (u.narrow) {  // as many taps to a unit (up to 4) as leave two units a thread
    u.group_taps = 4;
    while (u.group_taps > 1 && blocks * ceil_div(taps, u.group_taps) < 2 * threads) --u.group_taps;
    u.tap_groups = ceil_div(taps, u.group_taps);
  } else {
    u.tap_groups = std::min(taps, ceil_div(4 * threads, blocks));
    u.group_taps = ceil_div(taps, u.tap_groups);
  }
  return u;
}
// It declines layers of at most 16 channels each way (one narrow block: 6 -> 16 5x5 @14 ran at
// 0.36x F.conv2d, the blocked engine widened to float32 0.55x; 16 -> 16 3x3 @56 0.55x, 0.62x), and
// strided ones of half-padded blocks (16 -> 32 3x3/s2 @32: 0.45x, 0.56x; benchmarks/NOTES.md v19).
// 16 -> 32 at stride 1 stays (@112: 0.55x against 0.37x).
bool runs_amx_weight_grad(const ConvShape& s, at::ScalarType dtype);

DirectPlan plan_direct(const ConvShape& s, DirectPass pass, at::ScalarType dtype, int64_t threads);
// The forward's plan on the AVX-512 engines or the plain loops: what plan_direct gives where AMX
// does not run, and what runs where AMX's strided forward declines (non-finite input).
DirectPlan plan_forward_engines(const ConvShape& s, at::ScalarType dtype, int64_t threads);
// The weight gradient's plan on the AVX-512 engines or the plain loops: what plan_direct gives
// where AMX does not run, and what runs where AMX's weight gradient declines (non-finite input).
DirectPlan plan_weight_grad_engines(const ConvShape& s, at::ScalarType dtype, int64_t threads);

// The channelconv::_plan op (plan_op.cpp): what these plans do, counted, for Python.
c10::Dict<std::string, int64_t> plan_summary(const std::string& algorithm, const std::string& which,
                                             at::IntArrayRef input_size, at::IntArrayRef weight_size,
                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                             at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype,
                                             c10::Device device, int64_t workspace_limit, int64_t threads,
                                             bool channels_last);

}  // namespace channelconv
