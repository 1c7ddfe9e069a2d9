// The bfloat16 forward correlation on AMX tiles (Intel's Advanced Matrix Extensions: 16 x 64-byte
// tile registers and a 16 x 16 x 32 bfloat16 dot product into float32, TDPBF16PS), for stride-1
// layers of one group. An implicit GEMM: M = output pixels, N = output channels, K = input
// channels x taps, with no column matrix.
//
// The input is copied once into a zero-padded NHWC buffer, channels padded to 32 (one tile row).
// Output pixels are numbered over the padded width ("the wide grid": q = ho * padded_w + wo,
// wo < padded_w), so that for a tap (r, t) the input pixels of 16 consecutive q are 16 consecutive
// buffer pixels, even across output rows: one strided tile load per tap and 32 channels. The
// q with wo >= out_w are computed and dropped (2 * pad of each padded row, 22 % on a 7x7 map).
// A task computes 32 pixels x 32 output channels in four accumulator tiles; the weights are
// packed per (tap, 32 input channels, 16 output channels) as the B tiles TDPBF16PS reads
// (pairs of input channels interleaved). Each output element is one tile's float32 sum, rounded
// once: no dependence on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
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
  int64_t channels;            // padded input channels (a multiple of 32)
  int64_t chunks, output_tiles;
  int64_t padded_w, image_pixels;
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
      for (int64_t chunk = 0; chunk < p.chunks; ++chunk) {
        _tile_loadd(4, a + chunk * kTileChannels, pixel_bytes);
        _tile_loadd(5, a + kTilePixels * p.channels + chunk * kTileChannels, pixel_bytes);
        const at::BFloat16* b_chunk = b + chunk * p.output_tiles * b_tile;
        _tile_loadd(6, b_chunk, 64);
        _tile_loadd(7, b_chunk + b_tile, 64);
        _tile_dpbf16ps(0, 4, 6);
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

// out[k] = bfloat16(row[k] + bias[k]) for the block's 32 outputs, rounded to nearest even as
// c10::BFloat16 does (vcvtneps2bf16: every AMX CPU has AVX512_BF16).
__attribute__((target("avx512f,avx512bf16"))) void store_outputs(const float* row, const float* bias,
                                                                  at::BFloat16* out) {
  for (int64_t k = 0; k < kAmxOutputs; k += 16) {
    const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(row + k), _mm512_loadu_ps(bias + k));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), (__m256i)_mm512_cvtneps_pbh(sum));
  }
}

// Tiles are per thread; a parallel region's threads configure their own.
__attribute__((target("amx-tile,amx-bf16"))) void release_tiles() { _tile_release(); }

// The operands are rebuilt on every call into buffers the calling thread keeps (as the blocked
// engine's packed weights, direct.cpp): a fresh multi-MB allocation costs its page faults again.
at::BFloat16* amx_buffer(int which, int64_t numel) {
  thread_local std::vector<at::BFloat16> buffers[2];
  if (static_cast<int64_t>(buffers[which].size()) < numel) buffers[which].resize(numel);
  return buffers[which].data();
}

// padded[n][i][j][c] = input[n, c, i - pad_h, j - pad_w], zero in the padding and past in_channels;
// every element written once (no fill first), from either layout.
void pad_input(const at::Tensor& input, const ConvShape& s, const AmxGeometry& g, at::BFloat16* padded) {
  const at::BFloat16* x = input.const_data_ptr<at::BFloat16>();
  const int64_t x_n = input.stride(0), x_c = input.stride(1), x_h = input.stride(2), x_w = input.stride(3);
  at::parallel_for(0, s.batch * g.padded_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.padded_h, i = row % g.padded_h - s.padding[0];
      at::BFloat16* dst = padded + row * g.padded_w * g.channels;
      if (i < 0 || i >= s.in_h) {
        std::fill(dst, dst + g.padded_w * g.channels, at::BFloat16(0.0f));
        continue;
      }
      const at::BFloat16* src = x + n * x_n + i * x_h;
      for (int64_t j = 0; j < g.padded_w; ++j) {  // the padding columns, and channels past in_channels
        const int64_t wi = j - s.padding[1], first = wi >= 0 && wi < s.in_w ? s.in_channels : 0;
        std::fill(dst + j * g.channels + first, dst + (j + 1) * g.channels, at::BFloat16(0.0f));
      }
      dst += s.padding[1] * g.channels;
      if (x_c == 1) {  // channels_last: a pixel's channels are one run
        for (int64_t wi = 0; wi < s.in_w; ++wi) {
          std::copy(src + wi * x_w, src + wi * x_w + s.in_channels, dst + wi * g.channels);
        }
      } else {  // NCHW: along each channel's row, into every pixel's slot
        for (int64_t c = 0; c < s.in_channels; ++c)
          for (int64_t wi = 0; wi < s.in_w; ++wi) dst[wi * g.channels + c] = src[c * x_c + wi * x_w];
      }
    }
  });
}

// packed[r][t][chunk][output tile][pair][k][e] = w[tile * 16 + k, chunk * 32 + 2 * pair + e, r, t]
// (TDPBF16PS's B operand: pairs of input channels side by side), zero past the real channels.
// From the weight as [r][t][c][k] (one ATen copy), each pair of input channels interleaves two
// contiguous runs of outputs.
void pack_weight(const at::Tensor& weight, const ConvShape& s, const AmxGeometry& g, at::BFloat16* packed) {
  const at::Tensor by_tap = weight.permute({2, 3, 1, 0}).contiguous();  // [r][t][c][k]
  const at::BFloat16* w = by_tap.const_data_ptr<at::BFloat16>();
  const int64_t taps = s.kernel_h * s.kernel_w, chunks = g.channels / kTileChannels;
  const int64_t tiles = g.outputs / kTileOutputs, b_tile = kTileChannels * kTileOutputs;
  const at::BFloat16 zero(0.0f);
  at::parallel_for(0, taps * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t chunk = index % chunks, tap = index / chunks;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        at::BFloat16* dst = packed + (index * tiles + tile) * b_tile;
        const int64_t k0 = tile * kTileOutputs, k_count = std::clamp<int64_t>(s.out_channels - k0, 0, kTileOutputs);
        for (int64_t pair = 0; pair < kTileChannels / 2; ++pair, dst += 2 * kTileOutputs) {
          const int64_t c = chunk * kTileChannels + 2 * pair;
          const at::BFloat16* even = c < s.in_channels ? w + (tap * s.in_channels + c) * s.out_channels + k0 : nullptr;
          const at::BFloat16* odd = c + 1 < s.in_channels ? even + s.out_channels : nullptr;
          for (int64_t j = 0; j < kTileOutputs; ++j) {
            dst[2 * j] = even && j < k_count ? even[j] : zero;
            dst[2 * j + 1] = odd && j < k_count ? odd[j] : zero;
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor amx_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const ConvShape& s,
                       at::MemoryFormat format) {
  TORCH_INTERNAL_ASSERT(input.scalar_type() == at::kBFloat16 && s.groups == 1 && s.stride[0] == 1 &&
                        s.stride[1] == 1);
  const AmxGeometry g = amx_geometry(s);
  const int64_t channels = g.channels, outputs = g.outputs, padded_w = g.padded_w;
  // Past the last image, the pixels the last block's dropped q read.
  const int64_t slack = kAmxPixels + (s.kernel_w - 1) * s.dilation[1];
  const int64_t padded_pixels = s.batch * g.image_pixels, padded_numel = (padded_pixels + slack) * channels;
  at::BFloat16* padded = amx_buffer(0, padded_numel);
  at::BFloat16* packed = amx_buffer(1, s.kernel_h * s.kernel_w * channels * outputs);
  pad_input(input, s, g, padded);
  std::fill(padded + padded_pixels * channels, padded + padded_numel, at::BFloat16(0.0f));
  pack_weight(weight, s, g, packed);
  std::vector<float> bias_values(outputs, 0.0f);  // zero past out_channels, and without a bias
  if (bias.defined()) {
    const at::Tensor b = bias.to(at::kFloat).contiguous();
    std::copy(b.const_data_ptr<float>(), b.const_data_ptr<float>() + s.out_channels, bias_values.begin());
  }

  at::Tensor y = at::empty(s.output_sizes(), input.options().memory_format(format));
  at::BFloat16* y_data = y.mutable_data_ptr<at::BFloat16>();
  const int64_t y_n = y.stride(0), y_c = y.stride(1), y_h = y.stride(2), y_w = y.stride(3);
  const AmxProblem p{padded, packed, channels,
                     channels / kTileChannels, outputs / kTileOutputs, padded_w, g.image_pixels,
                     s.kernel_h, s.kernel_w, s.dilation[0], s.dilation[1]};
  const int64_t channel_blocks = outputs / kAmxOutputs, blocks = g.blocks, tasks = s.batch * blocks * channel_blocks;
  // Whichever operand is larger is read once: with the weights larger (wide layers on small maps:
  // 4.7 MB at 512 -> 512 3x3), channel blocks outermost, so that a thread streams its blocks' weights
  // once; otherwise innermost, consecutive tasks reusing the same input pixels.
  const bool weights_outer = outputs * s.kernel_h * s.kernel_w > s.batch * g.image_pixels;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    alignas(64) float sums[kAmxPixels * kAmxOutputs];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pixel_task = weights_outer ? task % (s.batch * blocks) : task / channel_blocks;
      const int64_t channel_block = weights_outer ? task / (s.batch * blocks) : task % channel_blocks;
      const int64_t n = pixel_task / blocks, q0 = pixel_task % blocks * kAmxPixels;
      tile_block(p, n, q0, 2 * channel_block, sums);
      const int64_t k0 = channel_block * kAmxOutputs;
      const int64_t k_count = std::min<int64_t>(kAmxOutputs, s.out_channels - k0);
      const float* bias_block = bias_values.data() + k0;
      int64_t ho = q0 / padded_w, wo = q0 % padded_w;
      for (int64_t i = 0; i < kAmxPixels; ++i, ++wo) {
        if (wo == padded_w) wo = 0, ++ho;
        if (ho >= s.out_h || wo >= s.out_w) continue;  // a dropped pixel of the wide grid
        at::BFloat16* out = y_data + n * y_n + ho * y_h + wo * y_w + k0 * y_c;
        const float* row = sums + i * kAmxOutputs;
        if (y_c == 1 && k_count == kAmxOutputs) {  // channels_last: the block's outputs are one run
          store_outputs(row, bias_block, out);
          continue;
        }
        for (int64_t k = 0; k < k_count; ++k) out[k * y_c] = static_cast<at::BFloat16>(row[k] + bias_block[k]);
      }
    }
    release_tiles();
  });
  return y;
}

#else  // no AMX code on this compiler or system: never called (amx_available is false)

at::Tensor amx_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const ConvShape&, at::MemoryFormat) {
  TORCH_INTERNAL_ASSERT(false, "AMX is not available");
}

#endif

}  // namespace channelconv
