// The blocked engines' reads and writes of activation tensors (activations.h).
#include "activations.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "blocked.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace channelconv {

Activations activations_of(const at::Tensor& t, at::Tensor& layout_source) {
  layout_source = t;
  bool channels_last = false;
  if (!t.is_contiguous()) {
    channels_last = t.is_contiguous(at::MemoryFormat::ChannelsLast);
    if (!channels_last) layout_source = t.contiguous();
  }
  return {const_cast<void*>(layout_source.const_data_ptr()), t.scalar_type(), channels_last, t.size(1), t.size(2),
          t.size(3)};
}

#if defined(__x86_64__) && defined(__GNUC__)

namespace {

// n elements to or from float32, 16 at a time in AVX-512 registers. bfloat16 rounds to nearest
// even with NaN kept quiet (as c10::BFloat16 does); float16 by the hardware's conversion.
// (GCC 12 takes the pass-through operand of the 256-bit load/convert intrinsics for an
// uninitialised variable: a false -Wmaybe-uninitialized, silenced for these functions.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) void to_float(const c10::BFloat16* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx512f"))) void to_float(const c10::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx512f"))) void from_float(const float* src, int64_t n, c10::BFloat16* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), blocked::bfloat16_bits(_mm512_loadu_ps(src + i)));
  }
  for (; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

__attribute__((target("avx512f"))) void from_float(const float* src, int64_t n, c10::Half* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}

#pragma GCC diagnostic pop

void to_float(const float* src, int64_t n, float* dst) { std::memcpy(dst, src, n * sizeof(float)); }
void from_float(const float* src, int64_t n, float* dst) { std::memcpy(dst, src, n * sizeof(float)); }

// dst[x] = lo <= x < hi ? src[x] : 0 for x < width, in masked vectors (no lane outside [lo, hi) is
// read): a zero-padded strip row without the two fills and a copy, three library calls, that a
// short row cost.
__attribute__((target("avx512f"))) void pad_row(const float* src, int64_t lo, int64_t hi, int64_t width, float* dst) {
  const auto lanes = [](int64_t from, int64_t to) {  // the mask of lanes [from, to) of a vector, clamped to 16
    from = std::clamp<int64_t>(from, 0, 16), to = std::clamp<int64_t>(to, from, 16);
    return static_cast<__mmask16>(((1u << to) - 1u) & ~((1u << from) - 1u));
  };
  if (width < 16) return blocked::store_lanes(dst, _mm512_maskz_loadu_ps(lanes(lo, hi), src), width);
  // Whole vectors, the last one overlapping the one before (a masked store is slow on Zen 4:
  // blocked_common.cpp); src + x is read only in the lanes of [lo, hi).
  for (int64_t x = 0;; x += 16) {
    x = std::min(x, width - 16);
    const bool whole = x >= lo && x + 16 <= hi;  // (masked loads are slower too)
    _mm512_storeu_ps(dst + x, whole ? _mm512_loadu_ps(src + x) : _mm512_maskz_loadu_ps(lanes(lo - x, hi - x), src + x));
    if (x + 16 == width) return;
  }
}

// copy_pixels for a channel count known at compile time: plain moves, inlined.
template <int64_t Channels>
void copy_pixels_of(const float* src, int64_t src_step, int64_t count, float* dst, int64_t dst_step) {
  for (int64_t i = 0; i < count; ++i) std::memcpy(dst + i * dst_step, src + i * src_step, Channels * sizeof(float));
}

// dst[i * dst_step + c] = src[i * src_step + c] for c < channels. A memcpy call per pixel (a tile's
// 16 or 32 channels) cost as much as the copy: 16 % of a channels_last 1x1 layer's time. The
// channel counts the engines copy most (the weight gradient's tiles of 1, 2, 4 or 12 input
// channels, blocks of 16 and 32) copy in inlined moves; others as pad_row copies a row, which cost
// the weight gradient of a 3x3 layer a sixth of its time on 4 channels.
__attribute__((target("avx512f"))) void copy_pixels(const float* src, int64_t src_step, int64_t count,
                                                    int64_t channels, float* dst, int64_t dst_step) {
  if (src_step == channels && dst_step == channels) {  // one run (a block of all the tensor's channels)
    std::memcpy(dst, src, count * channels * sizeof(float));
    return;
  }
  switch (channels) {
    case 1: return copy_pixels_of<1>(src, src_step, count, dst, dst_step);
    case 2: return copy_pixels_of<2>(src, src_step, count, dst, dst_step);
    case 4: return copy_pixels_of<4>(src, src_step, count, dst, dst_step);
    case 12: return copy_pixels_of<12>(src, src_step, count, dst, dst_step);
    case 16: return copy_pixels_of<16>(src, src_step, count, dst, dst_step);
    case 32: return copy_pixels_of<32>(src, src_step, count, dst, dst_step);
    default:
      for (int64_t i = 0; i < count; ++i) pad_row(src + i * src_step, 0, channels, channels, dst + i * dst_step);
  }
}

template <typename T>
void read_channel_major_as(const Activations& a, int64_t n, int64_t c0, int64_t channels, int64_t pixel0,
                           int64_t count, float* dst, int64_t dst_stride) {
  const T* src = static_cast<const T*>(a.data) + a.offset(n, c0, pixel0);
  if (!a.channels_last) {
    for (int64_t c = 0; c < channels; ++c) to_float(src + c * a.plane(), count, dst + c * dst_stride);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    blocked::transpose(src, a.channels, count, channels, dst, dst_stride);
  } else {
    float* wide = thread_buffer(Scratch::Widened, count * channels);  // [pixel][channel], then transposed
    for (int64_t i = 0; i < count; ++i) to_float(src + i * a.channels, channels, wide + i * channels);
    blocked::transpose(wide, channels, count, channels, dst, dst_stride);
  }
}

template <typename T>
void read_pixel_major_as(const Activations& a, int64_t n, int64_t c0, int64_t channels, int64_t pixel0,
                         int64_t count, float* dst, int64_t dst_stride) {
  const T* src = static_cast<const T*>(a.data) + a.offset(n, c0, pixel0);
  if (a.channels_last) {
    if constexpr (std::is_same_v<T, float>) return copy_pixels(src, a.channels, count, channels, dst, dst_stride);
    for (int64_t i = 0; i < count; ++i) to_float(src + i * a.channels, channels, dst + i * dst_stride);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    blocked::transpose(src, a.plane(), channels, count, dst, dst_stride);
  } else {
    float* wide = thread_buffer(Scratch::Widened, channels * count);  // [channel][pixel], then transposed
    for (int64_t c = 0; c < channels; ++c) to_float(src + c * a.plane(), count, wide + c * count);
    blocked::transpose(wide, count, channels, count, dst, dst_stride);
  }
}

template <typename T>
void write_pixel_major_as(const Activations& a, int64_t n, int64_t c0, int64_t channels, int64_t pixel0,
                          int64_t pixel_step, int64_t count, const float* src, int64_t src_stride) {
  T* dst = static_cast<T*>(a.data) + a.offset(n, c0, pixel0);
  if (a.channels_last) {
    if constexpr (std::is_same_v<T, float>) {
      return copy_pixels(src, src_stride, count, channels, dst, pixel_step * a.channels);
    }
    for (int64_t i = 0; i < count; ++i) from_float(src + i * src_stride, channels, dst + i * pixel_step * a.channels);
    return;
  }
  if (std::is_same_v<T, float> && pixel_step == 1) {
    blocked::transpose(src, src_stride, count, channels, reinterpret_cast<float*>(dst), a.plane());
    return;
  }
  float* planes = thread_buffer(Scratch::Widened, channels * count);  // [channel][pixel]
  blocked::transpose(src, src_stride, count, channels, planes, count);
  for (int64_t c = 0; c < channels; ++c) {
    T* dst_c = dst + c * a.plane();
    if (pixel_step == 1) {
      from_float(planes + c * count, count, dst_c);
    } else {
      for (int64_t i = 0; i < count; ++i) dst_c[i * pixel_step] = static_cast<T>(planes[c * count + i]);
    }
  }
}

template <typename Fn>
void by_dtype(at::ScalarType dtype, Fn fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, "channelconv: the blocked engines take float32, bfloat16 or float16, got ", dtype);
  }
}

}  // namespace

void read_channel_pairs(const Activations& a, int64_t n, int64_t c0, int64_t channels, int64_t pixel0, int64_t count,
                        uint32_t* dst, int64_t dst_stride) {
  TORCH_CHECK(a.dtype == at::kBFloat16, "channelconv: channel pairs are bfloat16, got ", a.dtype);
  const uint16_t* src = static_cast<const uint16_t*>(a.data) + a.offset(n, c0, pixel0);
  const int64_t pairs = channels / 2;
  if (a.channels_last && a.channels % 2 == 0 && c0 % 2 == 0) {
    // Each pixel's channels are consecutive: its pairs already are aligned 32-bit words.
    blocked::transpose(reinterpret_cast<const float*>(src), a.channels / 2, count, pairs,
                       reinterpret_cast<float*>(dst), dst_stride);
  } else {
    for (int64_t q = 0; q < pairs; ++q) {
      const uint16_t *first = src + 2 * q * a.channel_stride(), *second = first + a.channel_stride();
      uint32_t* row = dst + q * dst_stride;
      if (!a.channels_last) {  // unit stride: a loop the compiler vectorises (interleaving two rows)
        for (int64_t i = 0; i < count; ++i) row[i] = uint32_t(first[i]) | uint32_t(second[i]) << 16;
        continue;
      }
      for (int64_t i = 0; i < count; ++i)
        row[i] = uint32_t(first[i * a.pixel_stride()]) | uint32_t(second[i * a.pixel_stride()]) << 16;
    }
  }
  if (channels % 2 == 1) {  // the last channel pairs with a zero
    const uint16_t* last = src + (channels - 1) * a.channel_stride();
    uint32_t* row = dst + pairs * dst_stride;
    for (int64_t i = 0; i < count; ++i) row[i] = last[i * a.pixel_stride()];
  }
}

void read_padded_rows(const Activations& a, int64_t n, int64_t c0, int64_t channels, bool pairs, int64_t ih0,
                      int64_t rows, int64_t col0, int64_t width, float* dst, int64_t dst_stride) {
  const int64_t planes = pairs ? (channels + 1) / 2 : channels;
  const int64_t lo = std::clamp<int64_t>(-col0, 0, width), hi = std::clamp(a.w - col0, lo, width);
  // Strip columns [lo, hi) of input rows [row_lo, row_hi) lie in the plane.
  const int64_t row_lo = std::clamp<int64_t>(-ih0, 0, rows), row_hi = std::clamp(a.h - ih0, row_lo, rows);
  const auto inside = [&](int64_t k) { return k >= row_lo && k < row_hi && hi > lo; };
  if (a.dtype == at::kFloat && !a.channels_last && !pairs) {
    // Plane by plane: a plane's rows lie one after the other in memory, which the prefetcher
    // follows (row after row across the planes missed the cache on most rows of short maps).
    for (int64_t c = 0; c < planes; ++c)
      for (int64_t k = 0; k < rows; ++k) {
        float* row = dst + c * dst_stride + k * width;
        // (a row outside the plane reads no lane: its source is the destination, for a valid pointer)
        const float* src =
            inside(k) ? static_cast<const float*>(a.data) + a.offset(n, c0 + c, (ih0 + k) * a.w + col0) : row;
        if (inside(k) && lo == 0 && hi == width) {
          std::memcpy(row, src, width * sizeof(float));
        } else {
          pad_row(src, lo, inside(k) ? hi : lo, width, row);
        }
      }
    return;
  }
  for (int64_t k = 0; k < rows; ++k) {  // a channels_last row's channels lie together
    float* rows_k = dst + k * width;
    if (inside(k)) {
      const int64_t pixel0 = (ih0 + k) * a.w + col0 + lo;
      if (pairs) {
        read_channel_pairs(a, n, c0, channels, pixel0, hi - lo, reinterpret_cast<uint32_t*>(rows_k + lo), dst_stride);
      } else {
        read_channel_major(a, n, c0, channels, pixel0, hi - lo, rows_k + lo, dst_stride);
      }
    }
    if (inside(k) && lo == 0 && hi == width) continue;  // no padding
    for (int64_t c = 0; c < planes; ++c) {  // the padding alone: a pass over the whole row (the copied
      float* row = rows_k + c * dst_stride;  // columns through) was a tenth of a 16-pixel layer's time
      if (!inside(k)) {
        std::fill(row, row + width, 0.0f);
        continue;
      }
      std::fill(row, row + lo, 0.0f);
      std::fill(row + hi, row + width, 0.0f);
    }
  }
}

void read_channel_major(const Activations& a, int64_t n, int64_t c0, int64_t channels, int64_t pixel0, int64_t count,
                        float* dst, int64_t dst_stride) {
  by_dtype(a.dtype, [&](auto tag) {
    read_channel_major_as<decltype(tag)>(a, n, c0, channels, pixel0, count, dst, dst_stride);
  });
}

void read_pixel_major(const Activations& a, int64_t n, int64_t c0, int64_t channels, int64_t pixel0, int64_t count,
                      float* dst, int64_t dst_stride) {
  by_dtype(a.dtype, [&](auto tag) {
    read_pixel_major_as<decltype(tag)>(a, n, c0, channels, pixel0, count, dst, dst_stride);
  });
}

void write_pixel_major(const Activations& a, int64_t n, int64_t c0, int64_t channels, int64_t pixel0,
                       int64_t pixel_step, int64_t count, const float* src, int64_t src_stride) {
  by_dtype(a.dtype, [&](auto tag) {
    write_pixel_major_as<decltype(tag)>(a, n, c0, channels, pixel0, pixel_step, count, src, src_stride);
  });
}

#else  // not x86-64 with GCC/Clang: the engines are never called (blocked_kernel_available)

void read_channel_pairs(const Activations&, int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t*, int64_t) {}
void read_channel_major(const Activations&, int64_t, int64_t, int64_t, int64_t, int64_t, float*, int64_t) {}
void read_padded_rows(const Activations&, int64_t, int64_t, int64_t, bool, int64_t, int64_t, int64_t, int64_t, float*,
                      int64_t) {}
void read_pixel_major(const Activations&, int64_t, int64_t, int64_t, int64_t, int64_t, float*, int64_t) {}
void write_pixel_major(const Activations&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const float*,
                       int64_t) {}

#endif

}  // namespace channelconv
