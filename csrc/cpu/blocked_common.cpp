// The vector helpers and buffers the blocked engines share (blocked.h).
#include "blocked.h"

#include <vector>

namespace channelconv {

float* thread_buffer(Scratch kind, int64_t floats) {
  thread_local std::vector<float> buffers[static_cast<int>(Scratch::Kinds)];
  std::vector<float>& buffer = buffers[static_cast<int>(kind)];
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

}  // namespace channelconv

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <algorithm>

namespace channelconv {
namespace blocked {

// In registers rather than a plain double loop: that loop cost more than the multiply-adds on 1x1
// layers, and writing with a stride of 1 KiB (256 channels) evicted each line before its next
// write (benchmarks/NOTES.md).
// (GCC 12 takes the "undefined" pass-through operand of the unpack intrinsics for an uninitialised
// variable: a false -Wmaybe-uninitialized, silenced for this function only.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) void transpose(const float* src, int64_t src_stride, int64_t rows, int64_t cols,
                                                  float* dst, int64_t dst_stride) {
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const int block_rows = static_cast<int>(std::min<int64_t>(16, rows - i0));
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      const int block_cols = static_cast<int>(std::min<int64_t>(16, cols - j0));
      const __mmask16 col_mask = static_cast<__mmask16>((1u << block_cols) - 1);
      __m512 a[16], b[16];
      // Whole rows and columns unmasked: a masked store costs several cycles on AMD's Zen 4, and
      // those of the weight packing were a sixth of a 512 -> 512 3x3 layer's time on 3x3 maps.
      for (int i = 0; i < 16; ++i) {
        const float* row = src + (i0 + i) * src_stride + j0;
        a[i] = i >= block_rows ? _mm512_setzero_ps()
               : block_cols == 16 ? _mm512_loadu_ps(row)
                                  : _mm512_maskz_loadu_ps(col_mask, row);
      }
      // Interleave pairs of rows, then pairs of pairs, then 128-bit lanes twice: b[j] = column j.
      for (int i = 0; i < 16; i += 2) {
        b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
        b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
      }
      for (int i = 0; i < 16; i += 4) {
        a[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b[i]), _mm512_castps_pd(b[i + 2])));
        a[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b[i]), _mm512_castps_pd(b[i + 2])));
        a[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b[i + 1]), _mm512_castps_pd(b[i + 3])));
        a[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b[i + 1]), _mm512_castps_pd(b[i + 3])));
      }
      for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; ++i) {
          b[h + i] = _mm512_shuffle_f32x4(a[h + i], a[h + i + 4], 0x88);
          b[h + i + 4] = _mm512_shuffle_f32x4(a[h + i], a[h + i + 4], 0xdd);
        }
      for (int i = 0; i < 8; ++i) {
        a[i] = _mm512_shuffle_f32x4(b[i], b[i + 8], 0x88);
        a[i + 8] = _mm512_shuffle_f32x4(b[i], b[i + 8], 0xdd);
      }
      for (int j = 0; j < block_cols; ++j) store_lanes(dst + (j0 + j) * dst_stride + i0, a[j], block_rows);
    }
  }
}
#pragma GCC diagnostic pop

}  // namespace blocked
}  // namespace channelconv

#else  // not x86-64 with GCC/Clang: the engines are never called (blocked_kernel_available)

namespace channelconv::blocked {
void transpose(const float*, int64_t, int64_t, int64_t, float*, int64_t) {}
}  // namespace channelconv::blocked

#endif
