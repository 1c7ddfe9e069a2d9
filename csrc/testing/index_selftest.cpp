// Debug op for tests/test_index.py: evaluates the index helpers of conv_index.h on the host
// (index_t = int64_t, as the CPU kernels use them) for given integers, so a test can compare them
// with a plain-Python model of the same math at sizes past 2^31. Tensor-free; not part of the API.
//
//   channelconv::_index_probe(int[] args) -> int[]
//   args = [what, <axes>, a0, b0, a1, b1, ...]; one result per (a, b) query:
//     what 0: axis.input_at(a, b)        (a = output position, b = tap)
//     what 1: axis.first_valid(a)        (b ignored)
//     what 2: axis.last_valid(a)         (b ignored)
//     what 3: axis.output_reading(a, b)  (a = input coordinate, b = tap)
//     what 4: geometry.im2col_source(a, b)  (a = column row, b = column)
//     what 5: floor_div(a, b)            (no axes)
//   <axes>: one Axis {in, out, taps, stride, pad, dilation} for 0-3, two (h then w) for 4, none for 5.
#include <torch/library.h>

#include <vector>

#include "../conv_index.h"

namespace channelconv {
namespace {

Axis<int64_t> read_axis(c10::IntArrayRef f) {
  TORCH_CHECK_VALUE(f[3] > 0, "_index_probe: stride must be positive, got ", f[3]);
  return Axis<int64_t>{f[0], f[1], f[2], f[3], f[4], f[5]};
}

std::vector<int64_t> index_probe(c10::IntArrayRef args) {
  TORCH_CHECK_VALUE(!args.empty() && args[0] >= 0 && args[0] <= 5, "_index_probe: unknown function ", args);
  const int64_t what = args[0];
  const size_t axis_fields = what == 4 ? 12 : what == 5 ? 0 : 6;
  TORCH_CHECK_VALUE(args.size() >= 1 + axis_fields && (args.size() - 1 - axis_fields) % 2 == 0,
                    "_index_probe: expected ", axis_fields, " axis fields and (a, b) pairs, got ", args);
  Geometry<int64_t> g{};
  if (what == 4) {
    g = Geometry<int64_t>{read_axis(args.slice(1, 6)), read_axis(args.slice(7, 6))};
    TORCH_CHECK_VALUE(g.h.taps > 0 && g.w.taps > 0 && g.w.out > 0, "_index_probe: im2col_source needs taps, out > 0");
  } else if (what != 5) {
    g.h = read_axis(args.slice(1, 6));
  }
  std::vector<int64_t> results;
  for (size_t q = 1 + axis_fields; q < args.size(); q += 2) {
    const int64_t a = args[q], b = args[q + 1];
    switch (what) {
      case 0: results.push_back(g.h.input_at(a, b)); break;
      case 1: results.push_back(g.h.first_valid(a)); break;
      case 2: results.push_back(g.h.last_valid(a)); break;
      case 3: results.push_back(g.h.output_reading(a, b)); break;
      case 4: results.push_back(g.im2col_source(a, b)); break;
      default:
        TORCH_CHECK_VALUE(b > 0, "_index_probe: floor_div needs a positive divisor, got ", b);
        results.push_back(floor_div<int64_t>(a, b));
    }
  }
  return results;
}

}  // namespace
}  // namespace channelconv

TORCH_LIBRARY(channelconv_testing, m) { m.def("_index_probe(int[] args) -> int[]", &channelconv::index_probe); }
