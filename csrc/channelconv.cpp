// The op schemas of namespace `channelconv`, in one place. Each backend file (cpu/*.cpp,
// cuda/*.cu) registers its kernels for them with TORCH_LIBRARY_IMPL; Python registers the
// fake (meta) kernels and autograd (channelconv/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include "conv_params.h"
#include "plan.h"

// `import channelconv._C` loads this shared object, which runs the static registrations below.
// There is nothing to call from Python directly: everything goes through torch.ops.channelconv.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(channelconv, m) {
  // The three ops of an algorithm are closed under differentiation (see DESIGN.md), which
  // is what gives double backward. Sizes are SymInt so torch.compile(dynamic=True) traces them.
  // im2col and conv1x1 take the workspace byte limit explicitly, so an op's result depends on
  // its arguments alone.
#define CHANNELCONV_DEF_OPS(algo, extra)                                                              \
  m.def(#algo "_forward(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "      \
              "int[2] dilation, int groups" extra ") -> Tensor");                                          \
  m.def(#algo "_backward_input(Tensor grad_output, Tensor weight, SymInt[4] input_size, int[2] stride, " \
              "int[2] padding, int[2] dilation, int groups" extra ") -> Tensor");                          \
  m.def(#algo "_backward_weight(Tensor grad_output, Tensor input, SymInt[4] weight_size, "              \
              "int[2] stride, int[2] padding, int[2] dilation, int groups" extra ") -> Tensor");
  CHANNELCONV_DEF_OPS(direct, "")
  CHANNELCONV_DEF_OPS(im2col, ", int workspace_limit")
  CHANNELCONV_DEF_OPS(conv1x1, ", int workspace_limit")
#undef CHANNELCONV_DEF_OPS

  // The largest column buffer allocated since the last reset: the workspace limit's witness.
  m.def("workspace_peak() -> int", [] { return channelconv::workspace_peak(); });
  m.def("reset_workspace_peak() -> ()", [] { channelconv::reset_workspace_peak(); });
  // The plan a kernel runs for given arguments, counted (plan_op.cpp): what cost() and 'auto' read.
  m.def("_plan(str algorithm, str which, int[] input_size, int[] weight_size, int[] stride, int[] padding, "
        "int[] dilation, int groups, ScalarType dtype, Device device, int workspace_limit, int threads, "
        "bool channels_last=False) "
        "-> Dict(str, int)",
        &channelconv::plan_summary);
}
