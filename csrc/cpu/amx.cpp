// The bfloat16 forward correlation on AMX tiles (Intel's Advanced Matrix Extensions: 16 x 64-byte
// tile registers and a 16 x 16 x 32 bfloat16 dot product into float32, TDPBF16PS), for layers of
// one group, at stride 1 or, split into their input's phases, strided (plan.h, amx_shape). An
// implicit GEMM: M = output pixels, N = output channels, K = input channels x taps, with no column
// matrix.
//
// The input is copied once into a zero-padded NHWC buffer, channels padded to 32 (one tile row;
// at most 16 channels, several neighbouring pixels' channels: plan.h, AmxGeometry::fold).
// Output pixels are numbered over the padded width ("the wide grid": q = ho * padded_w + wo,
// wo < padded_w), so that for a tap (r, t) the input pixels of 16 consecutive q are 16 consecutive
// buffer pixels, even across output rows: one strided tile load per tap and 32 channels. The
// q with wo >= out_w are computed and dropped (2 * pad of each padded row, 22 % on a 7x7 map).
// A task computes 32 pixels x 32 output channels in four accumulator tiles (64 x 16 where there are
// at most 16 outputs); the weights are packed per (tap, 32 input channels, 16 output channels) as
// the B tiles TDPBF16PS reads (pairs of input channels interleaved). Each output element is one
// tile's float32 sum, rounded once: no dependence on the thread count. The weight gradient, further down, is the same kind of
// implicit GEMM with pixels as its reduction.
//
// Every tile row lies on a whole 64-byte line (buffers aligned, rows of 64 bytes at multiples of
// 64): a row across two lines loads at under half the speed, and tile loads, not the products,
// bound these loops (one 1 KB load per TDPBF16PS in the 2 x 2 blocking).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "blocked.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#define CHANNELCONV_AMX 1
#endif

namespace channelconv {

#ifdef CHANNELCONV_AMX

namespace {

constexpr int64_t kTilePixels = kAmxPixels / 2;    // rows of an A tile: output pixels
constexpr int64_t kTileChannels = kAmxChannels;     // bfloat16 input channels per tile row (64 bytes)
constexpr int64_t kTileOutputs = kAmxOutputs / 2;   // float32 output channels per accumulator row (64 bytes)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3 accumulate (pixel tile i, channel tile j) at 2 * i + j; 4-5 hold A (pixels x input
// channels), 6-7 hold B (input channel pairs x output channels).
__attribute__((target("amx-tile,amx-bf16"))) void configure_tiles() {
  TileConfig config;
  for (int tile = 0; tile < 8; ++tile) {
    config.rows[tile] = kTilePixels;
    config.bytes_per_row[tile] = 64;
  }
  // GCC's ldtilecfg builtin does not tell it that the 64 bytes are read: without the barrier it
  // dropped the stores of the rows and widths (ldtilecfg then faulted on a garbage config).
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

struct AmxProblem {
  const at::BFloat16* input;  // padded NHWC image 0; image n at n * image_pixels pixels
  const at::BFloat16* packed;  // [tap][input chunk][output tile][16 pairs][16][2]
  const uint8_t* live;         // [tap][output block][input chunk]: 0 where every product is a phantom tap's; or null
  int64_t channels;            // padded input channels (a multiple of 32)
  int64_t chunks, output_tiles;
  int64_t padded_w, image_pixels;
  // Folded (plan.h, AmxGeometry), taps_w counts a kernel row's steps, dilation_w the pixels between them.
  int64_t taps_h, taps_w, dilation_h, dilation_w;
};

// 32 wide-grid pixels [q0, q0 + 32) x 32 output channels from output tile `tile0`, of image n,
// into `sums` (32 x 32 float32, row = pixel).
__attribute__((target("amx-tile,amx-bf16"))) void tile_block(const AmxProblem& p, int64_t n, int64_t q0,
                                                             int64_t tile0, float* sums) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t pixel_bytes = p.channels * int64_t(sizeof(at::BFloat16));
  const int64_t b_tile = kTileChannels * kTileOutputs;  // bfloat16 elements of one B tile
  for (int64_t r = 0; r < p.taps_h; ++r) {
    for (int64_t t = 0; t < p.taps_w; ++t) {
      const at::BFloat16* a = p.input + (n * p.image_pixels + q0 + r * p.dilation_h * p.padded_w + t * p.dilation_w) *
                                            p.channels;
      const at::BFloat16* b = p.packed + ((r * p.taps_w + t) * p.chunks * p.output_tiles + tile0) * b_tile;
      const uint8_t* live = p.live ? p.live + ((r * p.taps_w + t) * p.output_tiles + tile0) / 2 * p.chunks : nullptr;
      for (int64_t chunk = 0; chunk < p.chunks; ++chunk) {
        if (live && !live[chunk]) continue;
        // (oneDNN's order: the second A tile loads while the first product runs)
        const at::BFloat16* b_chunk = b + chunk * p.output_tiles * b_tile;
        _tile_loadd(4, a + chunk * kTileChannels, pixel_bytes);
        _tile_loadd(6, b_chunk, 64);
        _tile_loadd(7, b_chunk + b_tile, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(5, a + kTilePixels * p.channels + chunk * kTileChannels, pixel_bytes);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  constexpr int64_t row_bytes = kAmxOutputs * sizeof(float);
  _tile_stored(0, sums, row_bytes);
  _tile_stored(1, sums + kTileOutputs, row_bytes);
  _tile_stored(2, sums + kTilePixels * kAmxOutputs, row_bytes);
  _tile_stored(3, sums + kTilePixels * kAmxOutputs + kTileOutputs, row_bytes);
}

// Where the outputs are at most 16 (plan.h, AmxGeometry::narrow_outputs): 64 wide-grid pixels [q0,
// q0 + 64) x output tile 0, four accumulators of 16 pixels, into `sums` of [q0, q0 + 32) and
// `more_sums` of the next 32 (32 x 32 float32, row = pixel, its first 16 columns written). Half the
// products of tile_block's 2 x 2 blocking would be the padded outputs'. The A tiles rotate through
// tiles 4, 5 and 7, so that a load need not wait for the product reading its tile.
__attribute__((target("amx-tile,amx-bf16"))) void narrow_tile_block(const AmxProblem& p, int64_t n, int64_t q0,
                                                                    float* sums, float* more_sums) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t pixel_bytes = p.channels * int64_t(sizeof(at::BFloat16));
  const int64_t b_tile = kTileChannels * kTileOutputs, a_step = kTilePixels * p.channels;
  for (int64_t r = 0; r < p.taps_h; ++r) {
    for (int64_t t = 0; t < p.taps_w; ++t) {
      const at::BFloat16* a = p.input + (n * p.image_pixels + q0 + r * p.dilation_h * p.padded_w + t * p.dilation_w) *
                                            p.channels;
      const at::BFloat16* b = p.packed + (r * p.taps_w + t) * p.chunks * p.output_tiles * b_tile;
      const uint8_t* live = p.live ? p.live + (r * p.taps_w + t) * p.output_tiles / 2 * p.chunks : nullptr;
      for (int64_t chunk = 0; chunk < p.chunks; ++chunk) {
        if (live && !live[chunk]) continue;
        const at::BFloat16* a_chunk = a + chunk * kTileChannels;
        _tile_loadd(6, b + chunk * p.output_tiles * b_tile, 64);
        _tile_loadd(4, a_chunk, pixel_bytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(5, a_chunk + a_step, pixel_bytes);
        _tile_dpbf16ps(1, 5, 6);
        _tile_loadd(7, a_chunk + 2 * a_step, pixel_bytes);
        _tile_dpbf16ps(2, 7, 6);
        _tile_loadd(4, a_chunk + 3 * a_step, pixel_bytes);
        _tile_dpbf16ps(3, 4, 6);
      }
    }
  }
  constexpr int64_t row_bytes = kAmxOutputs * sizeof(float);
  _tile_stored(0, sums, row_bytes);
  _tile_stored(1, sums + kTilePixels * kAmxOutputs, row_bytes);
  _tile_stored(2, more_sums, row_bytes);
  _tile_stored(3, more_sums + kTilePixels * kAmxOutputs, row_bytes);
}

// Tiles are per thread; a parallel region's threads configure their own.
__attribute__((target("amx-tile,amx-bf16"))) void release_tiles() { _tile_release(); }

// The operands are rebuilt on every call into buffers the calling thread keeps (as the blocked
// engine's packed weights, direct.cpp): a fresh multi-MB allocation costs its page faults again.
// On 64-byte lines: a tile row across two lines loads at under half the speed (the tile loops
// ran 2.5x slower from a vector's 16-byte aligned storage).
at::BFloat16* amx_buffer(int which, int64_t numel) {
  constexpr int64_t kLine = 64 / sizeof(at::BFloat16);
  thread_local std::vector<at::BFloat16> buffers[2];
  if (static_cast<int64_t>(buffers[which].size()) < numel + kLine) buffers[which].resize(numel + kLine);
  const auto address = reinterpret_cast<uintptr_t>(buffers[which].data());
  return buffers[which].data() + (-address % 64) / sizeof(at::BFloat16);
}

// _mm512_permutex2var_epi16 picks lane i of its result from a (index < 32) or b (index >= 32):
// these interleave lanes 0-15 (low) or 16-31 (high) of a and b.
alignas(64) constexpr int16_t kInterleaveLow[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};

// Lanes [0, count) of 32 (count may be 0 or negative: none).
inline __mmask32 first_lanes(int64_t count) {
  return count >= 32 ? ~__mmask32(0) : count > 0 ? (__mmask32(1) << count) - 1 : 0;
}

// out[k] = bfloat16(row[k] + bias[k]) for the block's first `count` outputs (of 32), rounded to
// nearest even as c10::BFloat16 does (vcvtneps2bf16: every AMX CPU has AVX512_BF16).
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) void store_outputs(const float* row, const float* bias,
                                                                                   int64_t count, at::BFloat16* out) {
  for (int64_t k = 0; k < std::min(count, kAmxOutputs); k += 16) {
    const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(row + k), _mm512_loadu_ps(bias + k));
    _mm256_mask_storeu_epi16(out + k, __mmask16(first_lanes(count - k)), (__m256i)_mm512_cvtneps_pbh(sum));
  }
}

// dst[j] = src[j] for j < count (at most 32): one masked load and store.
__attribute__((target("avx512f,avx512bw"))) inline void copy_run(const at::BFloat16* src, int64_t count,
                                                                at::BFloat16* dst) {
  const __mmask32 lanes = first_lanes(count);
  _mm512_mask_storeu_epi16(dst, lanes, _mm512_maskz_loadu_epi16(lanes, src));
}

// The bfloat16 lanes of v that hold an Inf or a NaN (every exponent bit set).
__attribute__((target("avx512f,avx512bw"), always_inline)) inline __mmask32 non_finite_lanes(__m512i v) {
  const __m512i exponent = _mm512_set1_epi16(0x7F80);
  return _mm512_cmpeq_epi16_mask(_mm512_and_si512(v, exponent), exponent);
}

// rows[i] lane j <- rows[j] lane i, for 16 rows of 16 32-bit lanes: four butterfly stages, each
// swapping one bit of the row and lane indices.
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void transpose_lanes(__m512i* rows) {
  for (int bit = 8; bit >= 1; bit /= 2) {
    alignas(64) int32_t keep[16], swap[16];
    for (int j = 0; j < 16; ++j) {
      keep[j] = j & bit ? 16 + j - bit : j;  // row i (bit clear): its own lanes, and row i + bit's
      swap[j] = j & bit ? 16 + j : j + bit;  // row i + bit: row i's lanes, and its own
    }
    const __m512i keep_index = _mm512_load_si512(keep), swap_index = _mm512_load_si512(swap);
    for (int i = 0; i < 16; ++i) {
      if (i & bit) continue;
      const __m512i a = rows[i], b = rows[i + bit];
      rows[i] = _mm512_permutex2var_epi32(a, keep_index, b);
      rows[i + bit] = _mm512_permutex2var_epi32(a, swap_index, b);
    }
  }
}

// The split input's indices [first, end) along one axis (of `extent`) whose pixel i * stride +
// phase - pad lies inside the input's `in`.
struct PhaseSpan {
  int64_t first, end;
};
PhaseSpan phase_span(int64_t in, int64_t pad, int64_t stride, int64_t phase, int64_t extent) {
  const int64_t low = pad - phase, high = in - 1 + pad - phase;  // i * stride in [low, high]
  const int64_t first = low <= 0 ? 0 : ceil_div(low, stride);
  return {first, high < 0 ? first : std::max(first, std::min(extent, high / stride + 1))};
}

// tile_row[j] = the `fold` pixels dense[j], dense[j + 1], ... (of `channels` each, one run), zero
// after them, for the padded row's pixels j (dense runs on `fold` zero pixels past the row). Returns
// whether a value read is an Inf or a NaN.
__attribute__((target("avx512f,avx512bw"))) bool fold_row(const at::BFloat16* dense, int64_t channels, int64_t fold,
                                                          int64_t pixels, at::BFloat16* tile_rows) {
  const __mmask32 lanes = first_lanes(fold * channels);
  __mmask32 non_finite = 0;
  for (int64_t j = 0; j < pixels; ++j) {
    const __m512i v = _mm512_maskz_loadu_epi16(lanes, dense + j * channels);
    non_finite |= non_finite_lanes(v);
    _mm512_store_si512(tile_rows + j * kTileChannels, v);
  }
  return non_finite != 0;
}

// padded[n][i][j][p * C + c] = input[n, c, i * stride_h + a - pad_h, j * stride_w + b - pad_w] for
// the phases p = a * stride_w + b (one at stride 1), zero outside the input and past the phases'
// channels: the input of amx_shape(s), padded, from either layout. (Each row is zeroed first: one
// memset in L1 cost less than zeroing pixel by pixel around the copies, 2.5x this copy's time.)
// Folded (g.fold > 1), each row is padded densely first, its pixels' channels one run, and then
// pixel j's tile row holds pixels j to j + fold - 1 (plan.h, AmxGeometry). Returns whether a folded
// row met an Inf or a NaN (unfolded: false, unchecked).
bool pad_input(const at::Tensor& input, const ConvShape& s, const AmxGeometry& g, at::BFloat16* padded) {
  const at::BFloat16* x = input.const_data_ptr<at::BFloat16>();
  const int64_t x_n = input.stride(0), x_c = input.stride(1), x_h = input.stride(2), x_w = input.stride(3);
  const int64_t stride_h = s.stride[0], stride_w = s.stride[1];
  const bool folded = g.fold > 1;
  // A pixel's distance in the row the copies write: the tile rows, or the dense row.
  const int64_t pixel_stride = folded ? s.in_channels * stride_h * stride_w : g.channels;
  const int64_t row_numel = (g.padded_w + (folded ? g.fold : 0)) * pixel_stride;
  std::atomic<bool> any_non_finite{false};
  at::parallel_for(0, s.batch * g.padded_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> dense(folded ? row_numel : 0);
    bool non_finite = false;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.padded_h, i = row % g.padded_h;
      at::BFloat16* tile_rows = padded + row * g.padded_w * g.channels;
      at::BFloat16* dst = folded ? dense.data() : tile_rows;
      std::memset(static_cast<void*>(dst), 0, row_numel * sizeof(at::BFloat16));
      for (int64_t phase = 0; phase < stride_h * stride_w; ++phase) {
        const int64_t a = phase / stride_w, b = phase % stride_w, h = i * stride_h + a - s.padding[0];
        const PhaseSpan columns = phase_span(s.in_w, s.padding[1], stride_w, b, g.padded_w);
        if (h < 0 || h >= s.in_h || columns.first == columns.end) continue;
        at::BFloat16* phase_dst = dst + phase * s.in_channels;
        const at::BFloat16* src = x + n * x_n + h * x_h + (columns.first * stride_w + b - s.padding[1]) * x_w;
        const int64_t step = stride_w * x_w;  // from one column's source pixel to the next's
        if (x_c == 1 && stride_h * stride_w == 1 && step == pixel_stride) {
          // channels_last at stride 1 where the row's pixels lie as densely as in the input: one run
          // (a copy call per pixel of 16 channels was a tenth of 16 -> 16 3x3 @32's time)
          std::copy(src, src + (columns.end - columns.first) * step, phase_dst + columns.first * pixel_stride);
        } else if (x_c == 1) {  // channels_last: a pixel's channels are one run
          for (int64_t j = columns.first; j < columns.end; ++j, src += step) {
            std::copy(src, src + s.in_channels, phase_dst + j * pixel_stride);
          }
        } else {  // NCHW: along each channel's row, into every pixel's slot
          for (int64_t c = 0; c < s.in_channels; ++c)
            for (int64_t j = columns.first; j < columns.end; ++j)
              phase_dst[j * pixel_stride + c] = src[c * x_c + (j - columns.first) * step];
        }
      }
      if (folded) non_finite |= fold_row(dense.data(), pixel_stride, g.fold, g.padded_w, tile_rows);
    }
    if (non_finite) any_non_finite = true;
  });
  return any_non_finite;
}

// Whether any of n bfloat16 values is an Inf or a NaN.
__attribute__((target("avx512f,avx512bw"))) bool any_non_finite(const at::BFloat16* data, int64_t n) {
  __mmask32 non_finite = 0;
  for (int64_t j = 0; j < n; j += 32) {
    non_finite |= non_finite_lanes(_mm512_maskz_loadu_epi16(first_lanes(n - j), data + j));
  }
  return non_finite != 0;
}

bool has_non_finite(const at::Tensor& t) {
  const at::Tensor dense = t.is_non_overlapping_and_dense() ? t : t.contiguous();
  const at::BFloat16* data = dense.const_data_ptr<at::BFloat16>();
  std::atomic<bool> found{false};
  at::parallel_for(0, dense.numel(), int64_t(1) << 16, [&](int64_t begin, int64_t end) {
    if (any_non_finite(data + begin, end - begin)) found = true;
  });
  return found;
}

// v[i] = src[first + i * stride] for i < count (zero past it), 32 bfloat16 values: 32-bit gathers
// of each element with its neighbour, the element's half then picked. The neighbour is the element
// before it (after it for the first element of src), so nothing outside the tensor is read.
__attribute__((target("avx512f,avx512bw"))) __m512i gather_row(const at::BFloat16* src, int64_t first,
                                                                int64_t stride, int64_t count) {
  if (stride == 1) return _mm512_maskz_loadu_epi16(first_lanes(count), src + first);
  alignas(64) static constexpr int16_t kLowHalves[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20,
                                                         22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
                                                         44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i words[2];
  for (int h = 0; h < 2; ++h) {
    __m512i element = _mm512_add_epi32(_mm512_set1_epi32(int32_t(first + 16 * h * stride)),
                                       _mm512_mullo_epi32(lane, _mm512_set1_epi32(int32_t(stride))));
    const __mmask16 valid = __mmask16(first_lanes(count - 16 * h));
    const __mmask16 later = _mm512_cmpgt_epi32_mask(element, _mm512_setzero_si512());
    element = _mm512_mask_sub_epi32(element, later, element, _mm512_set1_epi32(1));
    const __m512i pairs = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, element, src, 2);
    words[h] = _mm512_mask_srli_epi32(pairs, later, pairs, 16);
  }
  return _mm512_permutex2var_epi16(words[0], _mm512_load_si512(kLowHalves), words[1]);
}

// How the weight of a correlation's amx_shape lies in the layer's own weight (plan.h): at stride 1
// it is that weight; a strided layer's split side (its input channels in the forward, the outputs
// of the input gradient's correlation) holds stride_h x stride_w phases of `channels` each.
struct WeightPhases {
  int64_t stride_h = 1, stride_w = 1, channels = 0;
  bool outputs = false;  // the split side: the correlation's outputs, or its input channels
};

// Where element (k, c, r, t) of the weight of correlation s (its amx_shape; taps flipped where
// `flip`) lies in the layer's `weight` (any strided view) as `phases` says, or -1 past its channels
// and at phantom taps.
struct WeightReader {
  const at::Tensor& weight;
  const ConvShape& s;
  WeightPhases phases;
  bool flip;

  int64_t offset(int64_t k, int64_t c, int64_t r, int64_t t) const {
    if (k >= s.out_channels || c >= s.in_channels) return -1;
    if (flip) r = s.kernel_h - 1 - r, t = s.kernel_w - 1 - t;
    if (phases.stride_h * phases.stride_w > 1) {
      int64_t& split = phases.outputs ? k : c;  // the channel of the split side, and its phase
      const int64_t phase = split / phases.channels;
      split %= phases.channels;
      r = r * phases.stride_h + phase / phases.stride_w;
      t = t * phases.stride_w + phase % phases.stride_w;
      if (r >= weight.size(2) || t >= weight.size(3)) return -1;
    }
    return k * weight.stride(0) + c * weight.stride(1) + r * weight.stride(2) + t * weight.stride(3);
  }
};

// One B tile: 16 outputs (rows of `channels` elements at first[j], -1: zeros) x 32 channels.
__attribute__((target("avx512f,avx512bw"))) void pack_block(const at::BFloat16* w, const int64_t* first,
                                                            int64_t channel_stride, int64_t channels,
                                                            at::BFloat16* dst) {
  __m512i rows[16];
  for (int j = 0; j < 16; ++j) {
    rows[j] = first[j] < 0 ? _mm512_setzero_si512() : gather_row(w, first[j], channel_stride, channels);
  }
  transpose_lanes(rows);
  for (int pair = 0; pair < 16; ++pair) _mm512_storeu_si512(dst + pair * 2 * kTileOutputs, rows[pair]);
}

// packed[r][t][chunk][output tile][pair][k][e] = w[tile * 16 + k, chunk * 32 + 2 * pair + e, r, t]
// (TDPBF16PS's B operand: pairs of input channels side by side) for w the weight of correlation s
// (WeightReader), zero past the real channels and at phantom taps; read in place, where a block of
// 32 input channels is one phase (numel < 2^31). Each 16 outputs x 32 channels of a tap: one row of
// 32 channels an output, then their 32-bit lanes (channel pairs) transposed.
void pack_weight(const WeightReader& reader, const AmxGeometry& g, at::BFloat16* packed) {
  const ConvShape& s = reader.s;
  const WeightPhases& phases = reader.phases;
  const at::BFloat16* w = reader.weight.const_data_ptr<at::BFloat16>();
  const int64_t taps = s.kernel_h * s.kernel_w, chunks = g.channels / kTileChannels;
  const int64_t tiles = g.outputs / kTileOutputs, b_tile = kTileChannels * kTileOutputs;
  // A task's 16 outputs x 32 channels, every tap: the gathers read the same lines tap after tap.
  at::parallel_for(0, chunks * tiles * taps, taps, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t tap = index % taps, chunk = index / taps / tiles, tile = index / taps % tiles;
      const int64_t c0 = chunk * kTileChannels;
      const int64_t phase_channels = phases.outputs ? s.in_channels : phases.channels;
      const int64_t count = std::min(kTileChannels, phase_channels - c0 % phase_channels);
      int64_t first[16];  // each output's first element, or -1
      for (int64_t j = 0; j < 16; ++j) {
        first[j] = reader.offset(tile * kTileOutputs + j, c0, tap / s.kernel_w, tap % s.kernel_w);
      }
      pack_block(w, first, reader.weight.stride(1), count, packed + ((tap * chunks + chunk) * tiles + tile) * b_tile);
    }
  });
}

// The B tiles of a folded correlation (plan.h, AmxGeometry; one chunk of 32): packed[r][step][output
// tile][pair][k][e] = w[tile * 16 + k, c, r, step * fold + i] for element f = 2 * pair + e of a tile
// row, pixel i = f / C and channel c = f % C of it; zero past the fold's pixels, the kernel row and
// the real outputs. Each element f's 16 outputs in one gather (a tile's outputs lie in one phase:
// its channels are a multiple of 32), two elements' interleaved into a row of pairs. (Element by
// element, the packing took longer than the products on 6x6 maps: 16 -> 64 5x5 ran 1.3x F.conv2d
// unfolded, 0.3x folded.)
__attribute__((target("avx512f,avx512bw"))) void pack_folded_tile(const WeightReader& reader, const AmxGeometry& g,
                                                                  int64_t index, at::BFloat16* dst) {
  const ConvShape& s = reader.s;
  const int64_t tiles = g.outputs / kTileOutputs;
  const int64_t tile = index % tiles, r = index / tiles / g.row_steps, step = index / tiles % g.row_steps;
  const int64_t outputs = std::min(kTileOutputs, s.out_channels - tile * kTileOutputs);
  const __m512i pick_low = _mm512_load_si512(kInterleaveLow);
  for (int64_t pair = 0; pair < kTileChannels / 2; ++pair) {
    __m512i element[2];
    for (int64_t e = 0; e < 2; ++e) {
      const int64_t f = 2 * pair + e, i = f / s.in_channels, t = step * g.fold + i;
      const int64_t first =
          i < g.fold && t < s.kernel_w && outputs > 0 ? reader.offset(tile * kTileOutputs, f % s.in_channels, r, t) : -1;
      element[e] = first < 0 ? _mm512_setzero_si512()
                             : gather_row(reader.weight.const_data_ptr<at::BFloat16>(), first, reader.weight.stride(0),
                                          outputs);
    }
    _mm512_storeu_si512(dst + pair * 2 * kTileOutputs, _mm512_permutex2var_epi16(element[0], pick_low, element[1]));
  }
}

void pack_folded_weight(const WeightReader& reader, const AmxGeometry& g, at::BFloat16* packed) {
  const int64_t b_tile = kTileChannels * kTileOutputs;
  at::parallel_for(0, reader.s.kernel_h * g.row_steps * (g.outputs / kTileOutputs), 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) pack_folded_tile(reader, g, index, packed + index * b_tile);
  });
}

// ---- The weight gradient ----
//
// dW[k][c][r][t] = sum over images n and wide-grid pixels q of dy[n][k][q] * x[n][c][q + r * dil_h *
// padded_w + t * dil_w], x over the flattened padded image: an implicit GEMM with M = output
// channels, N = input channels and K = pixels, in tiles that keep every row on whole 64-byte lines.
// - A tiles are dy in blocks of 32 outputs x 32 wide-grid pixels, 2 KB each in one run; zero at
//   the grid's dropped pixels (wo >= out_w) and past its end, so that those add nothing.
// - B tiles are x in pixel pairs, [pair][channel][2] as TDPBF16PS reads them. A tap shifts x by
//   whole pairs, or by a pair and a half: x is kept twice, in pairs from even and from odd pixels.
// A dropped pixel multiplies dy = 0 by whatever x it meets; exact while x is finite (0 * Inf would
// add a NaN no real product makes), which the copy checks.

constexpr int64_t kGradBlock = kAmxOutputs * kAmxPixels;  // bfloat16 elements of a dy block

struct AmxGradProblem {
  const at::BFloat16* dy;    // [n][output block][grid block][32 outputs][32 pixels]
  const at::BFloat16* x[2];  // [n][channel block][pair][32 channels][2], pairs from even / odd pixels
  int64_t channel_blocks, output_blocks, grid_blocks, plane_pairs;
  int64_t padded_w, taps_w, dilation_h, dilation_w;

  // How far a tap shifts x along the flattened padded image.
  int64_t tap_offset(int64_t tap) const { return tap / taps_w * dilation_h * padded_w + tap % taps_w * dilation_w; }
  // The B tile of x for grid block `block` of image n, channel block c_block, shifted by `offset`:
  // the pairs that start at the first pixel it meets, from whichever copy has them.
  const at::BFloat16* x_tile(int64_t n, int64_t c_block, int64_t block, int64_t offset) const {
    const int64_t first = block * kAmxPixels + offset;
    return x[first & 1] + ((n * channel_blocks + c_block) * plane_pairs + first / 2) * kAmxChannels * 2;
  }
};

// One tap's 32 outputs (block k_block) x 32 input channels (block c_block), summed over the wide
// grids of images [n_begin, n_end) onto the float32 sums in acc (32 x 32, row = output).
__attribute__((target("amx-tile,amx-bf16"))) void grad_block(const AmxGradProblem& p, int64_t n_begin, int64_t n_end,
                                                             int64_t k_block, int64_t c_block, int64_t tap,
                                                             float* acc) {
  constexpr int64_t row_bytes = kAmxChannels * sizeof(float), tile_half = kTilePixels * kAmxChannels;
  constexpr int64_t b_stride = kAmxChannels * 2 * sizeof(at::BFloat16);
  _tile_loadd(0, acc, row_bytes);
  _tile_loadd(1, acc + kTileOutputs, row_bytes);
  _tile_loadd(2, acc + tile_half, row_bytes);
  _tile_loadd(3, acc + tile_half + kTileOutputs, row_bytes);
  const int64_t offset = p.tap_offset(tap);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const at::BFloat16* a = p.dy + (n * p.output_blocks + k_block) * p.grid_blocks * kGradBlock;
    for (int64_t block = 0; block < p.grid_blocks; ++block) {
      const at::BFloat16* a_block = a + block * kGradBlock;
      const at::BFloat16* b_block = p.x_tile(n, c_block, block, offset);
      _tile_loadd(4, a_block, 64);
      _tile_loadd(6, b_block, b_stride);
      _tile_loadd(7, b_block + 2 * kTileOutputs, b_stride);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(5, a_block + kGradBlock / 2, 64);  // (in tile_block's order)
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, acc, row_bytes);
  _tile_stored(1, acc + kTileOutputs, row_bytes);
  _tile_stored(2, acc + tile_half, row_bytes);
  _tile_stored(3, acc + tile_half + kTileOutputs, row_bytes);
}

// Taps [tap0, tap0 + kTaps) of one 16-output x 16-channel tile (the halves k_tile and c_tile of
// their 32-channel blocks), each tap's sums in its own accumulator (tiles 0-3, acc[i]: 16 x 16,
// row = output): one dy tile serves every tap, for the narrow layers where a 32 x 32 block would
// be half padding. The x tiles rotate through tiles 5-7.
template <int kTaps>
__attribute__((target("amx-tile,amx-bf16"))) void grad_taps(const AmxGradProblem& p, int64_t n_begin, int64_t n_end,
                                                            int64_t k_tile, int64_t c_tile, int64_t tap0,
                                                            float* const* acc) {
  constexpr int64_t row_bytes = kTileOutputs * sizeof(float);
  constexpr int64_t b_stride = kAmxChannels * 2 * sizeof(at::BFloat16);
  int64_t offset[4] = {};
  for (int i = 0; i < kTaps; ++i) offset[i] = p.tap_offset(tap0 + i);
  _tile_loadd(0, acc[0], row_bytes);
  if constexpr (kTaps > 1) _tile_loadd(1, acc[1], row_bytes);
  if constexpr (kTaps > 2) _tile_loadd(2, acc[2], row_bytes);
  if constexpr (kTaps > 3) _tile_loadd(3, acc[3], row_bytes);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const at::BFloat16* a = p.dy + (n * p.output_blocks + k_tile / 2) * p.grid_blocks * kGradBlock +
                            k_tile % 2 * kGradBlock / 2;
    const int64_t x_half = c_tile % 2 * 2 * kTileOutputs;  // (the channel block's second 16)
    auto b_tile = [&](int64_t block, int i) { return p.x_tile(n, c_tile / 2, block, offset[i]) + x_half; };
    for (int64_t block = 0; block < p.grid_blocks; ++block) {
      _tile_loadd(4, a + block * kGradBlock, 64);
      _tile_loadd(5, b_tile(block, 0), b_stride);
      _tile_dpbf16ps(0, 4, 5);
      if constexpr (kTaps > 1) {
        _tile_loadd(6, b_tile(block, 1), b_stride);
        _tile_dpbf16ps(1, 4, 6);
      }
      if constexpr (kTaps > 2) {
        _tile_loadd(7, b_tile(block, 2), b_stride);
        _tile_dpbf16ps(2, 4, 7);
      }
      if constexpr (kTaps > 3) {
        _tile_loadd(5, b_tile(block, 3), b_stride);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
  }
  _tile_stored(0, acc[0], row_bytes);
  if constexpr (kTaps > 1) _tile_stored(1, acc[1], row_bytes);
  if constexpr (kTaps > 2) _tile_stored(2, acc[2], row_bytes);
  if constexpr (kTaps > 3) _tile_stored(3, acc[3], row_bytes);
}

// dst[c / 32 * block_stride + 2 * (c % 32) + e] = source e's channel c (zero where source e is null
// or c >= count), c < padded. Returns whether a value read is an Inf or a NaN (every exponent bit set).
__attribute__((target("avx512f,avx512bw"))) bool interleave_pair(const at::BFloat16* even_source,
                                                                 const at::BFloat16* odd_source, int64_t count,
                                                                 int64_t padded, int64_t block_stride,
                                                                 at::BFloat16* dst) {
  const __m512i pick_low = _mm512_load_si512(kInterleaveLow);
  const __m512i pick_high = _mm512_add_epi16(pick_low, _mm512_set1_epi16(16));
  __mmask32 non_finite = 0;
  for (int64_t c = 0; c < padded; c += 32) {
    const __mmask32 lanes = first_lanes(count - c);
    const __m512i even = even_source ? _mm512_maskz_loadu_epi16(lanes, even_source + c) : _mm512_setzero_si512();
    const __m512i odd = odd_source ? _mm512_maskz_loadu_epi16(lanes, odd_source + c) : _mm512_setzero_si512();
    non_finite |= non_finite_lanes(even) | non_finite_lanes(odd);
    at::BFloat16* block = dst + c / 32 * block_stride;
    _mm512_storeu_si512(block, _mm512_permutex2var_epi16(even, pick_low, odd));
    _mm512_storeu_si512(block + 32, _mm512_permutex2var_epi16(even, pick_high, odd));
  }
  return non_finite != 0;
}

// dst[c][q] = rows[q][k0 + c] for 32 pixel rows q (zero where rows[q] is null or c >= count) and
// 32 channels c: pixel pairs interleaved as 32-bit lanes, then those lanes transposed.
__attribute__((target("avx512f,avx512bw"))) void transpose_block(const at::BFloat16* const* rows, int64_t k0,
                                                                 int64_t count, at::BFloat16* dst) {
  const __m512i pick_low = _mm512_load_si512(kInterleaveLow);
  const __m512i pick_high = _mm512_add_epi16(pick_low, _mm512_set1_epi16(16));
  const __mmask32 lanes = first_lanes(count);
  __m512i half[2][16];  // [channels 0-15 or 16-31][pixel pair j]: lane c holds pixels 2j, 2j + 1
  for (int j = 0; j < 16; ++j) {
    const __m512i even = rows[2 * j] ? _mm512_maskz_loadu_epi16(lanes, rows[2 * j] + k0) : _mm512_setzero_si512();
    const __m512i odd =
        rows[2 * j + 1] ? _mm512_maskz_loadu_epi16(lanes, rows[2 * j + 1] + k0) : _mm512_setzero_si512();
    half[0][j] = _mm512_permutex2var_epi16(even, pick_low, odd);
    half[1][j] = _mm512_permutex2var_epi16(even, pick_high, odd);
  }
  transpose_lanes(half[0]);
  transpose_lanes(half[1]);
  for (int c = 0; c < 16; ++c) {
    _mm512_storeu_si512(dst + c * kAmxPixels, half[0][c]);
    _mm512_storeu_si512(dst + (16 + c) * kAmxPixels, half[1][c]);
  }
}

// The odd pairs between two rows of even pairs: (pixel 2j + 1, pixel 2j + 2) in each 32-bit lane,
// the high half of first's lane and the low half of next's.
alignas(64) constexpr int16_t kOddPairs[32] = {1,  32, 3,  34, 5,  36, 7,  38, 9,  40, 11, 42, 13, 44, 15, 46,
                                               17, 48, 19, 50, 21, 52, 23, 54, 25, 56, 27, 58, 29, 60, 31, 62};
__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m512i odd_pair(__m512i first, __m512i next) {
  return _mm512_permutex2var_epi16(first, _mm512_load_si512(kOddPairs), next);
}

// even[j][c][e] = planes[c][2 * j + e] and odd[j][c][e] = planes[c][2 * j + 1 + e], the pixel
// pairs of `plane` pixels (a multiple of 32, zero past them) for 32 channels c (planes[c] at
// c * plane_stride; those past `channels` zero): 32 pixels at a time, each plane's pixel pairs as
// 32-bit lanes transposed into even pairs, and odd pair j made of even pairs j and j + 1 (the high
// half of one lane and the low half of the next).
__attribute__((target("avx512f,avx512bw"))) void pair_planes(const at::BFloat16* planes, int64_t plane_stride,
                                                             int64_t plane, int64_t channels, at::BFloat16* even,
                                                             at::BFloat16* odd) {
  constexpr int64_t row = 2 * kAmxChannels;  // elements of a pair row: 32 channels x 2 pixels
  const int halves = channels > 16 ? 2 : 1;   // (a half of zero channels is not transposed)
  __m512i last[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};  // the previous block's even pair 15
  for (int64_t p0 = 0; p0 < plane; p0 += kAmxPixels) {
    __m512i half[2][16];  // [channels 0-15 or 16-31][pixel pair j]: lane c holds pixels 2j, 2j + 1
    for (int h = 0; h < 2; ++h) {
      for (int c = 0; c < 16; ++c) {
        const bool real = 16 * h + c < channels;
        half[h][c] = real ? _mm512_loadu_si512(planes + (16 * h + c) * plane_stride + p0) : _mm512_setzero_si512();
      }
      if (h < halves) transpose_lanes(half[h]);
    }
    const int64_t pair0 = p0 / 2;
    for (int h = 0; h < 2; ++h) {
      if (p0 > 0) _mm512_storeu_si512(odd + (pair0 - 1) * row + 32 * h, odd_pair(last[h], half[h][0]));
      for (int j = 0; j < 16; ++j) {
        _mm512_storeu_si512(even + (pair0 + j) * row + 32 * h, half[h][j]);
        if (j < 15) _mm512_storeu_si512(odd + (pair0 + j) * row + 32 * h, odd_pair(half[h][j], half[h][j + 1]));
      }
      last[h] = half[h][15];
    }
  }
  for (int h = 0; h < 2; ++h) {
    _mm512_storeu_si512(odd + (plane / 2 - 1) * row + 32 * h, odd_pair(last[h], _mm512_setzero_si512()));
  }
}

// Copies n bfloat16 values; returns whether any is an Inf or a NaN.
__attribute__((target("avx512f,avx512bw"))) bool copy_checked(const at::BFloat16* src, int64_t n,
                                                              at::BFloat16* dst) {
  __mmask32 non_finite = 0;
  for (int64_t j = 0; j < n; j += 32) {
    const __mmask32 lanes = first_lanes(n - j);
    const __m512i v = _mm512_maskz_loadu_epi16(lanes, src + j);
    non_finite |= non_finite_lanes(v);  // (the masked-off lanes are zero)
    _mm512_mask_storeu_epi16(dst + j, lanes, v);
  }
  return non_finite != 0;
}

// dst[i] = dy_plane[q0 + i] over the wide grid (q = ho * padded_w + wo), zero where wo >= out_w or
// q past the grid, for the 32 pixels of one block: a masked load for each output row it meets.
__attribute__((target("avx512f,avx512bw"))) void wide_row(const at::BFloat16* dy_plane, const ConvShape& s,
                                                          const AmxGeometry& g, int64_t q0, at::BFloat16* dst) {
  __m512i v = _mm512_setzero_si512();
  for (int64_t i = 0; i < kAmxPixels;) {
    const int64_t q = q0 + i, ho = q / g.padded_w, wo = q % g.padded_w;
    if (ho >= s.out_h) break;
    const int64_t run = std::min(kAmxPixels - i, g.padded_w - wo);  // to the padded row's end
    const int64_t valid = std::min(run, s.out_w - wo);
    if (valid > 0) {  // lanes [i, i + valid) from dy row ho, columns [wo, wo + valid)
      const __mmask32 lanes = first_lanes(valid) << i;
      v = _mm512_mask_loadu_epi16(v, lanes, dy_plane + ho * s.out_w + wo - i);
    }
    i += run;
  }
  _mm512_storeu_si512(dst, v);
}

// x in pixel pairs over each flattened padded image of amx_shape(layer) (of geometry g),
// [n][channel block][pair][32 channels][2], in both parities (paired[0]: pairs from even pixels,
// paired[1]: from odd), channels padded to 32, zeros in the padding and past the image. A strided
// layer's phases are read in place (pad_input's indexing), where each block of 32 channels is one
// phase's. Returns whether x holds an Inf or a NaN.
bool pair_input(const at::Tensor& input, const ConvShape& layer, const AmxGeometry& g, int64_t plane_pairs,
                at::BFloat16* const* paired) {
  const int64_t channel_blocks = g.channels / kAmxChannels, plane = 2 * plane_pairs, channels = layer.in_channels;
  const int64_t stride_h = layer.stride[0], stride_w = layer.stride[1], phases = stride_h * stride_w;
  TORCH_INTERNAL_ASSERT(!amx_phases_mix(layer));
  std::atomic<bool> any_non_finite{false};
  if (input.is_contiguous(at::MemoryFormat::ChannelsLast)) {  // interleave two pixels' channel runs
    const at::BFloat16* x = input.const_data_ptr<at::BFloat16>();
    auto pixel = [&](int64_t n, int64_t p, int64_t phase) -> const at::BFloat16* {
      const int64_t h = p / g.padded_w * stride_h + phase / stride_w - layer.padding[0];
      const int64_t w = p % g.padded_w * stride_w + phase % stride_w - layer.padding[1];
      const bool inside = p < g.image_pixels && h >= 0 && h < layer.in_h && w >= 0 && w < layer.in_w;
      return inside ? x + ((n * layer.in_h + h) * layer.in_w + w) * channels : nullptr;
    };
    const int64_t block_stride = plane_pairs * kAmxChannels * 2;
    at::parallel_for(0, 2 * layer.batch * plane_pairs, 16, [&](int64_t begin, int64_t end) {
      bool non_finite = false;
      for (int64_t index = begin; index < end; ++index) {
        const int64_t parity = index / (layer.batch * plane_pairs), pair = index % (layer.batch * plane_pairs);
        const int64_t n = pair / plane_pairs, p = pair % plane_pairs * 2 + parity;
        at::BFloat16* dst = paired[parity] + (n * channel_blocks * plane_pairs + p / 2) * kAmxChannels * 2;
        for (int64_t phase = 0; phase < phases; ++phase) {
          non_finite |= interleave_pair(pixel(n, p, phase), pixel(n, p + 1, phase), channels,
                                        phases == 1 ? g.channels : channels, block_stride,
                                        dst + phase * channels / kAmxChannels * block_stride);
        }
      }
      if (non_finite) any_non_finite = true;
    });
    return any_non_finite;
  }
  // NCHW: a block's 32 channels padded into planes first, then 32 pixels at a time transposed into pairs.
  const at::Tensor contiguous = input.contiguous();
  const at::BFloat16* x = contiguous.const_data_ptr<at::BFloat16>();
  const int64_t stride = plane;
  at::parallel_for(0, layer.batch * channel_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> planes(kAmxChannels * stride);
    std::vector<at::BFloat16> row(stride_w > 1 ? layer.in_w : 0);  // a strided row's phase, gathered
    bool non_finite = false;
    for (int64_t index = begin; index < end; ++index) {
      const int64_t n = index / channel_blocks, block_channel = index % channel_blocks * kAmxChannels;
      const int64_t phase = block_channel / channels, c0 = block_channel % channels;
      const int64_t a = phase / stride_w, b = phase % stride_w;
      const PhaseSpan rows = phase_span(layer.in_h, layer.padding[0], stride_h, a, g.padded_h);
      const PhaseSpan columns = phase_span(layer.in_w, layer.padding[1], stride_w, b, g.padded_w);
      const int64_t block_channels = std::min(kAmxChannels, channels - c0);
      std::fill(planes.begin(), planes.begin() + block_channels * stride, at::BFloat16(0.0f));
      for (int64_t c = c0; c < c0 + block_channels; ++c) {
        const at::BFloat16* src = x + (n * channels + c) * layer.in_h * layer.in_w;
        at::BFloat16* dst = planes.data() + (c - c0) * stride + columns.first;
        const int64_t w = columns.first * stride_w + b - layer.padding[1], count = columns.end - columns.first;
        for (int64_t i = rows.first; i < rows.end; ++i) {
          const at::BFloat16* src_row = src + (i * stride_h + a - layer.padding[0]) * layer.in_w + w;
          if (stride_w > 1) {
            for (int64_t j = 0; j < count; ++j) row[j] = src_row[j * stride_w];
            src_row = row.data();
          }
          non_finite |= copy_checked(src_row, count, dst + i * g.padded_w);
        }
      }
      const int64_t offset = index * plane_pairs * kAmxChannels * 2;
      pair_planes(planes.data(), stride, plane, block_channels, paired[0] + offset, paired[1] + offset);
    }
    if (non_finite) any_non_finite = true;
  });
  return any_non_finite;
}

// dy in the A tiles' blocks, [n][output block][grid block][32 outputs][32 pixels]: pixel q of image
// n is dy[n, :, q / padded_w, q % padded_w], or zero where that column is past out_w or q past the
// grid. From channels_last dy a transpose of 32 pixels' channel runs; from NCHW, rows of the planes.
void block_grad_output(const at::Tensor& grad_output, const ConvShape& s, const AmxGeometry& g, at::BFloat16* blocks) {
  const int64_t output_blocks = g.outputs / kAmxOutputs;
  if (grad_output.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    const at::BFloat16* dy = grad_output.const_data_ptr<at::BFloat16>();
    at::parallel_for(0, s.batch * g.blocks, 1, [&](int64_t begin, int64_t end) {
      const at::BFloat16* rows[kAmxPixels];
      for (int64_t index = begin; index < end; ++index) {
        const int64_t n = index / g.blocks, block = index % g.blocks;
        for (int64_t i = 0; i < kAmxPixels; ++i) {
          const int64_t q = block * kAmxPixels + i, ho = q / g.padded_w, wo = q % g.padded_w;
          rows[i] =
              ho < s.out_h && wo < s.out_w ? dy + ((n * s.out_h + ho) * s.out_w + wo) * s.out_channels : nullptr;
        }
        for (int64_t k_block = 0; k_block < output_blocks; ++k_block) {
          transpose_block(rows, k_block * kAmxOutputs, s.out_channels - k_block * kAmxOutputs,
                          blocks + ((n * output_blocks + k_block) * g.blocks + block) * kGradBlock);
        }
      }
    });
    return;
  }
  const at::Tensor contiguous = grad_output.contiguous();
  const at::BFloat16* dy = contiguous.const_data_ptr<at::BFloat16>();
  const int64_t out_plane = s.out_h * s.out_w;
  at::parallel_for(0, s.batch * output_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t n = index / output_blocks, k0 = index % output_blocks * kAmxOutputs;
      at::BFloat16* dst = blocks + index * g.blocks * kGradBlock;
      for (int64_t block = 0; block < g.blocks; ++block, dst += kGradBlock) {
        for (int64_t k = 0; k < kAmxOutputs; ++k) {
          at::BFloat16* row = dst + k * kAmxPixels;
          if (k0 + k < s.out_channels) {
            wide_row(dy + (n * s.out_channels + k0 + k) * out_plane, s, g, block * kAmxPixels, row);
          } else {
            std::fill(row, row + kAmxPixels, at::BFloat16(0.0f));
          }
        }
      }
    }
  });
}

// The weight gradient of amx_shape(layer), with the input of `layer` (a strided one's where each
// block of 32 channels is one phase's); `real` (amx_real_taps, or null) marks the taps of each
// 32-channel block that are not all phantoms: the others are left zero.
at::Tensor weight_grad_tiles(const at::Tensor& grad_output, const at::Tensor& input, const ConvShape& layer,
                             const uint8_t* real) {
  TORCH_INTERNAL_ASSERT(input.scalar_type() == at::kBFloat16 && layer.groups == 1);
  const ConvShape s = amx_shape(layer);
  const AmxGeometry g = amx_geometry(s);
  const int64_t plane_pairs = amx_grad_plane(s, g) / 2, x_numel = s.batch * plane_pairs * g.channels * 2;
  at::BFloat16* x_buffer = amx_buffer(0, 2 * x_numel);
  at::BFloat16* const x_pairs[2] = {x_buffer, x_buffer + x_numel};
  at::BFloat16* dy_blocks = amx_buffer(1, s.batch * g.blocks * kGradBlock * (g.outputs / kAmxOutputs));
  if (pair_input(input, layer, g, plane_pairs, x_pairs)) return at::Tensor();
  block_grad_output(grad_output, s, g, dy_blocks);

  const AmxGradProblem p{dy_blocks, {x_pairs[0], x_pairs[1]}, g.channels / kAmxChannels, g.outputs / kAmxOutputs,
                         g.blocks, plane_pairs, g.padded_w, s.kernel_w, s.dilation[0], s.dilation[1]};
  const int64_t taps = s.kernel_h * s.kernel_w;
  const AmxGradUnits units = amx_grad_units(s, at::get_num_threads());
  const int64_t width = units.width(), group_images = ceil_div(64, g.blocks);
  at::Tensor dw = at::empty(s.weight_sizes(), input.options().dtype(at::kFloat));
  float* dw_data = dw.mutable_data_ptr<float>();
  // Consecutive units share the larger operand's blocks (x's pairs, or dy's), read from memory
  // once: x is 4x dy's size at stride 2 (its 4 phases), 4x the traffic read in dy's order.
  const bool x_outer = 2 * plane_pairs * g.channels > g.blocks * kAmxPixels * g.outputs;
  at::parallel_for(0, units.count(), 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    struct alignas(64) TapSums {  // a block's sums, [output][channel] (tile rows on whole lines)
      float values[kAmxOutputs * kAmxChannels];
    };
    std::vector<TapSums> tap_sums(units.group_taps);
    float* narrow_sums[4];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t tap_group = unit % units.tap_groups, block_pair = unit / units.tap_groups;
      const int64_t k_block = x_outer ? block_pair % units.output_blocks : block_pair / units.channel_blocks;
      const int64_t c_block = x_outer ? block_pair / units.output_blocks : block_pair % units.channel_blocks;
      const int64_t tap0 = tap_group * units.group_taps, tap_end = std::min(taps, tap0 + units.group_taps);
      for (TapSums& t : tap_sums) std::fill(std::begin(t.values), std::end(t.values), 0.0f);
      if (units.narrow) std::transform(tap_sums.begin(), tap_sums.begin() + (tap_end - tap0), narrow_sums,
                                       [](TapSums& t) { return t.values; });
      // A few images at a time (one, or enough of a small map's for 64 blocks), every tap of the
      // group: their dy and x blocks are read from L2 once a tap (a group of taps, narrow); the
      // sums stay in tiles across the images' blocks, and go through memory between groups.
      for (int64_t n = 0; n < s.batch; n += group_images) {
        const int64_t n_end = std::min(s.batch, n + group_images);
        if (!units.narrow) {
          for (int64_t tap = tap0; tap < tap_end; ++tap) {
            if (real && !real[tap * units.channel_blocks + c_block]) continue;
            grad_block(p, n, n_end, k_block, c_block, tap, tap_sums[tap - tap0].values);
          }
          continue;
        }
        switch (tap_end - tap0) {
          case 1: grad_taps<1>(p, n, n_end, k_block, c_block, tap0, narrow_sums); break;
          case 2: grad_taps<2>(p, n, n_end, k_block, c_block, tap0, narrow_sums); break;
          case 3: grad_taps<3>(p, n, n_end, k_block, c_block, tap0, narrow_sums); break;
          default: grad_taps<4>(p, n, n_end, k_block, c_block, tap0, narrow_sums); break;
        }
      }
      // dw[k][c][tap] from the sums [tap][k][c] (width x width), inside the real channels.
      const int64_t k0 = k_block * width, c0 = c_block * width;
      for (int64_t tap = tap0; tap < tap_end; ++tap) {
        const float* sums = tap_sums[tap - tap0].values;
        for (int64_t k = k0; k < std::min(k0 + width, s.out_channels); ++k) {
          for (int64_t c = c0; c < std::min(c0 + width, s.in_channels); ++c) {
            dw_data[(k * s.in_channels + c) * taps + tap] = sums[(k - k0) * width + c - c0];
          }
        }
      }
    }
    release_tiles();
  });
  return dw;
}

// y = bias + the correlation of the input of layer s (its strides and padding are where pad_input
// reads) with the weight of amx_shape(s), read from `weight` as pack_weight does; `live` as
// AmxProblem's, or null. Where the phases are on the outputs' side (the input gradient of the
// strided layer `split_output`), each phase's pixels go in place into that layer's dx, zero where no
// phase pixel lands.
at::Tensor forward_tiles(const at::Tensor& input, const at::Tensor& weight, const WeightPhases& phases, bool flip,
                         const at::Tensor& bias, const ConvShape& layer, at::MemoryFormat format, const uint8_t* live,
                         const ConvShape* split_output = nullptr) {
  TORCH_INTERNAL_ASSERT(input.scalar_type() == at::kBFloat16 && layer.groups == 1);
  const ConvShape s = amx_shape(layer);
  AmxGeometry g = amx_geometry(s);
  const int64_t channels = g.channels, outputs = g.outputs, padded_w = g.padded_w;
  // Past the last image, the pixels the last block's dropped q read (and a narrow task's second
  // block past the last).
  const int64_t slack = 2 * kAmxPixels + (s.kernel_w - 1) * s.dilation[1];
  const int64_t padded_pixels = s.batch * g.image_pixels, padded_numel = (padded_pixels + slack) * channels;
  at::BFloat16* padded = amx_buffer(0, padded_numel);
  at::BFloat16* packed = amx_buffer(1, s.kernel_h * s.kernel_w * channels * outputs);
  // Folded, a step's taps past the kernel row, and a phantom tap beside a real one, multiply pixels
  // by zero weights: 0 * Inf would make a NaN no real product makes. Such an input runs unfolded.
  if (pad_input(input, layer, g, padded)) {
    g.fold = 1, g.row_steps = s.kernel_w;
    pad_input(input, layer, g, padded);
  }
  std::fill(padded + padded_pixels * channels, padded + padded_numel, at::BFloat16(0.0f));
  const WeightReader reader{weight, s, phases, flip};
  std::vector<uint8_t> step_live;  // folded: a step is live where one of its taps is
  if (g.fold > 1) {
    pack_folded_weight(reader, g, packed);
    if (live) {
      const int64_t blocks_chunks = g.outputs / kAmxOutputs;  // (one chunk of 32 input channels)
      step_live.assign(s.kernel_h * g.row_steps * blocks_chunks, 0);
      for (int64_t tap = 0; tap < s.kernel_h * s.kernel_w; ++tap) {
        const int64_t step = tap / s.kernel_w * g.row_steps + tap % s.kernel_w / g.fold;
        for (int64_t i = 0; i < blocks_chunks; ++i) step_live[step * blocks_chunks + i] |= live[tap * blocks_chunks + i];
      }
      live = step_live.data();
    }
  } else {
    pack_weight(reader, g, packed);
  }
  std::vector<float> bias_values(outputs, 0.0f);  // zero past out_channels, and without a bias
  if (bias.defined()) {
    const at::Tensor b = bias.to(at::kFloat).contiguous();
    std::copy(b.const_data_ptr<float>(), b.const_data_ptr<float>() + s.out_channels, bias_values.begin());
  }

  // Output pixel (ho, wo) of block k0 goes to y's (ho * stride_h + a - pad_h, wo * stride_w + b -
  // pad_w), channel k0 % phase_outputs, for the block's phase (a, b): y itself at stride 1.
  TORCH_INTERNAL_ASSERT(phases.outputs == (split_output != nullptr));
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, phase_outputs = s.out_channels;
  std::array<int64_t, 4> y_sizes = s.output_sizes();
  if (split_output) {
    stride_h = split_output->stride[0], stride_w = split_output->stride[1];
    pad_h = split_output->padding[0], pad_w = split_output->padding[1];
    phase_outputs = phases.channels;
    y_sizes = split_output->input_sizes();
    TORCH_INTERNAL_ASSERT(phase_outputs % kAmxOutputs == 0);
  }
  const int64_t y_height = y_sizes[2], y_width = y_sizes[3];
  at::Tensor y = at::empty(y_sizes, input.options().memory_format(format));
  if ((y_height - 1 + pad_h) / stride_h >= s.out_h || (y_width - 1 + pad_w) / stride_w >= s.out_w) y.zero_();
  at::BFloat16* y_data = y.mutable_data_ptr<at::BFloat16>();
  const int64_t y_n = y.stride(0), y_c = y.stride(1), y_h = y.stride(2), y_w = y.stride(3);
  const AmxProblem p{padded, packed, live, channels,
                     channels / kTileChannels, outputs / kTileOutputs, padded_w, g.image_pixels,
                     s.kernel_h, g.row_steps, s.dilation[0], g.fold * s.dilation[1]};
  // A task: one block of 32 pixels x 32 outputs, or where the outputs are at most 16, two blocks'
  // pixels (g.narrow_outputs).
  const int64_t channel_blocks = outputs / kAmxOutputs, blocks = g.blocks, task_blocks = g.narrow_outputs ? 2 : 1;
  const int64_t pixel_tasks = ceil_div(blocks, task_blocks), tasks = s.batch * pixel_tasks * channel_blocks;
  // Whichever operand is larger is read once: with the weights larger (wide layers on small maps:
  // 4.7 MB at 512 -> 512 3x3), channel blocks outermost, so that a thread streams its blocks' weights
  // once; otherwise innermost, consecutive tasks reusing the same input pixels.
  const bool weights_outer = outputs * s.kernel_h * g.row_steps > s.batch * g.image_pixels;
  constexpr int64_t kWideRows = 48;
  // Stored by element, a pixel's outputs lie a plane apart. Planes of a multiple of 2 KB put them
  // into at most 2 of L1's 64 sets: over 16 outputs, more lines a set than its 12 ways, and every
  // store missed (8 -> 32 3x3 @32, 2 KB planes, ran at 0.37x F.conv2d forward against @28's
  // 0.91x). There the transpose pays; at 16 outputs it cost 10 % (benchmarks/NOTES.md v19).
  const bool planes_alias = y_c * int64_t(sizeof(at::BFloat16)) % 2048 == 0;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    alignas(64) float sums[2][kAmxPixels * kAmxOutputs];
    alignas(64) at::BFloat16 by_pixel[kAmxPixels][kAmxOutputs], by_output[kAmxOutputs][kAmxPixels];
    const at::BFloat16* by_pixel_rows[kAmxPixels];
    for (int64_t i = 0; i < kAmxPixels; ++i) by_pixel_rows[i] = by_pixel[i];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pixel_task = weights_outer ? task % (s.batch * pixel_tasks) : task / channel_blocks;
      const int64_t channel_block = weights_outer ? task / (s.batch * pixel_tasks) : task % channel_blocks;
      const int64_t n = pixel_task / pixel_tasks, first_block = pixel_task % pixel_tasks * task_blocks;
      if (task_blocks == 2) {
        narrow_tile_block(p, n, first_block * kAmxPixels, sums[0], sums[1]);
      } else {
        tile_block(p, n, first_block * kAmxPixels, 2 * channel_block, sums[0]);
      }
      for (int64_t block = first_block; block < std::min(blocks, first_block + task_blocks); ++block) {
        const int64_t q0 = block * kAmxPixels;
        const float* block_sums = sums[block - first_block];
        const int64_t k0 = channel_block * kAmxOutputs, phase = k0 / phase_outputs, c0 = k0 % phase_outputs;
        const int64_t k_count = std::min<int64_t>(kAmxOutputs, s.out_channels - k0);
        const int64_t row0 = phase / stride_w - pad_h, column0 = phase % stride_w - pad_w;
        const float* bias_block = bias_values.data() + k0;
        const bool transpose = s.out_w >= kWideRows || (planes_alias && k_count > kAmxOutputs / 2);
        if (y_c != 1 && y_w == 1 && !split_output && transpose) {
          // NCHW, long rows: the block transposed, each output's pixels stored along its rows (64 ->
          // 64 3x3 @56 forward: 0.88x F.conv2d -> 1.05x). On shorter rows the transpose costs more
          // than it saves (32 -> 32 @16: 0.98x -> 0.84x; 16 -> 16 @32: 0.63x -> 0.60x); they keep
          // the stores by element, except where the planes alias (below).
          for (int64_t i = 0; i < kAmxPixels; ++i) {
            store_outputs(block_sums + i * kAmxOutputs, bias_block, kAmxOutputs, by_pixel[i]);
          }
          transpose_block(by_pixel_rows, 0, kAmxOutputs, by_output[0]);
          for (int64_t i = 0; i < kAmxPixels;) {  // a run of the block's pixels in one output row
            const int64_t q = q0 + i, ho = q / padded_w, wo = q % padded_w;
            if (ho >= s.out_h) break;
            const int64_t run = std::min(kAmxPixels - i, padded_w - wo), valid = std::min(run, s.out_w - wo);
            for (int64_t k = 0; k < k_count && valid > 0; ++k) {
              copy_run(by_output[k] + i, valid, y_data + n * y_n + (k0 + k) * y_c + ho * y_h + wo);
            }
            i += run;
          }
          continue;
        }
        int64_t ho = q0 / padded_w, wo = q0 % padded_w;
        for (int64_t i = 0; i < kAmxPixels; ++i, ++wo) {
          if (wo == padded_w) wo = 0, ++ho;
          if (ho >= s.out_h || wo >= s.out_w) continue;  // a dropped pixel of the wide grid
          const int64_t h = ho * stride_h + row0, w = wo * stride_w + column0;
          if (h < 0 || h >= y_height || w < 0 || w >= y_width) continue;  // a phase pixel in the padding
          at::BFloat16* out = y_data + n * y_n + h * y_h + w * y_w + c0 * y_c;
          const float* row = block_sums + i * kAmxOutputs;
          if (y_c == 1) {  // channels_last: the block's outputs are one run
            store_outputs(row, bias_block, k_count, out);
            continue;
          }
          for (int64_t k = 0; k < k_count; ++k) out[k * y_c] = static_cast<at::BFloat16>(row[k] + bias_block[k]);
        }
      }
    }
    release_tiles();
  });
  return y;
}

// ---- Strided layers: the phases split and merged (plan.h, amx_shape) ----

// The weight of amx_shape(s), [K][phase][C][i][j] = weight[k][c][i * stride_h + a][j * stride_w + b],
// zero at the phantom taps past the kernel.
at::Tensor split_weight(const at::Tensor& weight, const ConvShape& s) {
  const ConvShape a = amx_shape(s);
  const int64_t stride_h = s.stride[0], stride_w = s.stride[1];
  at::Tensor split = at::zeros({s.out_channels, stride_h * stride_w, s.in_channels, a.kernel_h, a.kernel_w},
                               weight.options().memory_format(at::MemoryFormat::Contiguous));
  for (int64_t phase = 0; phase < stride_h * stride_w; ++phase) {
    const int64_t row = phase / stride_w, column = phase % stride_w;
    const at::Tensor taps = weight.slice(2, row, s.kernel_h, stride_h).slice(3, column, s.kernel_w, stride_w);
    split.select(1, phase).slice(2, 0, taps.size(2)).slice(3, 0, taps.size(3)).copy_(taps);
  }
  return split.view({s.out_channels, a.in_channels, a.kernel_h, a.kernel_w});
}

// The inverse of split_weight for the weight gradient of amx_shape(s): its real taps, in place.
at::Tensor merge_weight(const at::Tensor& split_grad, const ConvShape& s) {
  const int64_t stride_h = s.stride[0], stride_w = s.stride[1];
  const at::Tensor phases = split_grad.view({s.out_channels, stride_h * stride_w, s.in_channels,
                                             split_grad.size(2), split_grad.size(3)});
  at::Tensor dw = at::empty(s.weight_sizes(), split_grad.options());
  for (int64_t phase = 0; phase < stride_h * stride_w; ++phase) {
    const int64_t row = phase / stride_w, column = phase % stride_w;
    at::Tensor taps = dw.slice(2, row, s.kernel_h, stride_h).slice(3, column, s.kernel_w, stride_w);
    taps.copy_(phases.select(1, phase).slice(2, 0, taps.size(2)).slice(3, 0, taps.size(3)));
  }
  return dw;
}

// The input of amx_shape(s), channels_last: the padded input's phases side by side in each pixel.
at::Tensor split_input(const at::Tensor& input, const ConvShape& s) {
  const ConvShape a = amx_shape(s);
  const int64_t stride_h = s.stride[0], stride_w = s.stride[1];
  at::Tensor split = at::zeros({s.batch, a.in_h, a.in_w, stride_h, stride_w, s.in_channels}, input.options());
  const at::Tensor nhwc = input.permute({0, 2, 3, 1});
  for (int64_t row = 0; row < stride_h; ++row) {
    const PhaseSpan rows = phase_span(s.in_h, s.padding[0], stride_h, row, a.in_h);
    for (int64_t column = 0; column < stride_w; ++column) {
      const PhaseSpan columns = phase_span(s.in_w, s.padding[1], stride_w, column, a.in_w);
      if (rows.first == rows.end || columns.first == columns.end) continue;
      const int64_t h = rows.first * stride_h + row - s.padding[0];
      const int64_t w = columns.first * stride_w + column - s.padding[1];
      split.select(3, row).select(3, column).slice(1, rows.first, rows.end).slice(2, columns.first, columns.end)
          .copy_(nhwc.slice(1, h, h + (rows.end - rows.first - 1) * stride_h + 1, stride_h)
                     .slice(2, w, w + (columns.end - columns.first - 1) * stride_w + 1, stride_w));
    }
  }
  return split.view({s.batch, a.in_h, a.in_w, a.in_channels}).permute({0, 3, 1, 2});
}

// AmxProblem::live, [tap][output block][input chunk], from whether each holds a real product.
std::vector<uint8_t> live_steps(int64_t taps, int64_t output_blocks, int64_t chunks,
                                const std::function<bool(int64_t, int64_t, int64_t)>& real) {
  std::vector<uint8_t> live(taps * output_blocks * chunks);
  for (int64_t index = 0; index < static_cast<int64_t>(live.size()); ++index) {
    live[index] = real(index / (output_blocks * chunks), index / chunks % output_blocks, index % chunks);
  }
  return live;
}

}  // namespace

at::Tensor amx_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const ConvShape& s,
                       at::MemoryFormat format) {
  if (!amx_splits(s)) return forward_tiles(input, weight, {1, 1, s.in_channels}, false, bias, s, format, nullptr);
  const ConvShape a = amx_shape(s);
  // A block of 32 input channels that mixes phases multiplies some pixels by a phantom tap's zero
  // weight: 0 * Inf would make a NaN where no real product does. (Its weight is split first: the
  // packing reads one phase a block.)
  if (amx_phases_mix(s)) {
    if (has_non_finite(input)) return at::Tensor();
    return forward_tiles(input, split_weight(weight, s), {1, 1, a.in_channels}, false, bias, s, format, nullptr);
  }
  const std::vector<uint8_t> real = amx_real_taps(s);
  const int64_t chunks = ceil_div(a.in_channels, kAmxChannels);
  const std::vector<uint8_t> live =
      live_steps(a.kernel_h * a.kernel_w, ceil_div(a.out_channels, kAmxOutputs), chunks,
                 [&](int64_t tap, int64_t, int64_t chunk) { return real[tap * chunks + chunk] != 0; });
  return forward_tiles(input, weight, {s.stride[0], s.stride[1], s.in_channels}, false, bias, s, format, live.data());
}

at::Tensor amx_input_grad(const at::Tensor& grad_output, const at::Tensor& weight, const ConvShape& s,
                          at::MemoryFormat format) {
  if (!amx_splits(s)) {
    return forward_tiles(grad_output, weight.transpose(0, 1), {1, 1, s.out_channels}, /*flip=*/true, at::Tensor(),
                         transposed_correlation(s), format, nullptr);
  }
  // The correlation's outputs are the split input's channels, its taps those of amx_shape(s)
  // flipped: a block of 32 outputs is one phase (in_channels % 32 == 0), its phantom taps skipped.
  const ConvShape a = amx_shape(s), t = transposed_correlation(a);
  const std::vector<uint8_t> real = amx_real_taps(s);
  const int64_t taps = a.kernel_h * a.kernel_w, output_blocks = ceil_div(t.out_channels, kAmxOutputs);
  const std::vector<uint8_t> live =
      live_steps(taps, output_blocks, ceil_div(t.in_channels, kAmxChannels), [&](int64_t tap, int64_t block, int64_t) {
        return real[(taps - 1 - tap) * output_blocks + block] != 0;
      });
  const WeightPhases phases{s.stride[0], s.stride[1], s.in_channels, /*outputs=*/true};
  return forward_tiles(grad_output, weight.transpose(0, 1), phases, /*flip=*/true, at::Tensor(), t, format,
                       live.data(), &s);
}

at::Tensor amx_weight_grad(const at::Tensor& grad_output, const at::Tensor& input, const ConvShape& s) {
  if (!amx_splits(s)) return weight_grad_tiles(grad_output, input, s, nullptr);
  const std::vector<uint8_t> real = amx_real_taps(s);
  // Where blocks of 32 channels mix phases, the input is split first (pair_input reads one phase a block).
  const at::Tensor split_grad = amx_phases_mix(s)
                                    ? weight_grad_tiles(grad_output, split_input(input, s), amx_shape(s), real.data())
                                    : weight_grad_tiles(grad_output, input, s, real.data());
  return split_grad.defined() ? merge_weight(split_grad, s) : split_grad;
}

#else  // no AMX code on this compiler or system: never called (amx_available is false)

at::Tensor amx_weight_grad(const at::Tensor&, const at::Tensor&, const ConvShape&) {
  TORCH_INTERNAL_ASSERT(false, "AMX is not available");
}

at::Tensor amx_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const ConvShape&, at::MemoryFormat) {
  TORCH_INTERNAL_ASSERT(false, "AMX is not available");
}

at::Tensor amx_input_grad(const at::Tensor&, const at::Tensor&, const ConvShape&, at::MemoryFormat) {
  TORCH_INTERNAL_ASSERT(false, "AMX is not available");
}

#endif

}  // namespace channelconv
