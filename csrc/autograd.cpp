// Autograd for the ops, reverse and forward mode, in C++ as ATen's own ops have it (the kernels
// generated into VariableType): the op's Autograd kernel records a graph node on the tensors of
// whatever level it is called at, and sets the output's tangent from the inputs' tangents. That
// is what torch.func's transforms (grad, vjp, jvp, and their compositions) run under, as they run
// ATen's ops. It replaces a Python autograd.Function per op, whose apply, context and backward in
// Python cost 5-10x a small layer's kernels (benchmarks/NOTES.md v13).
//
// The three ops of an algorithm are closed under differentiation (DESIGN.md):
//
//     forward(X, W)              -> d/dX: backward_input(gY, W)     d/dW: backward_weight(gY, X)
//     backward_input(gY, W)      -> d/dgY: forward(G, W)            d/dW: backward_weight(gY, G)
//     backward_weight(gY, X)     -> d/dgY: forward(X, H)            d/dX: backward_input(gY, H)
//
// so a node's backward and an op's tangent are calls of the ops themselves, through the
// dispatcher: under create_graph they record again, which gives double backward, Hessian-vector
// products and higher orders. Every op is bilinear in its two tensor operands (the forward's bias
// enters linearly). The batching rules for vmap and the autocast kernel stay in Python
// (channelconv/_vmap.py, _ops.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "conv_params.h"

namespace channelconv {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using torch::jit::Stack;

enum Kind { kForward, kBackwardInput, kBackwardWeight };
constexpr std::array<const char*, 3> kKindNames = {"forward", "backward_input", "backward_weight"};

constexpr std::array<const char*, 3> kPrefixes = {"direct", "im2col", "conv1x1"};

// One algorithm's three ops, by kind. The handles are looked up on first use: the schemas are
// defined by another file's static registration (channelconv.cpp), which need not have run when
// this file's does.
struct AlgorithmOps {
  size_t algorithm;  // index into kPrefixes

  const c10::OperatorHandle& operator[](Kind kind) const {
    static const std::vector<c10::OperatorHandle> handles = [] {
      std::vector<c10::OperatorHandle> found;
      for (const char* prefix : kPrefixes) {
        for (const char* kind_name : kKindNames) {
          const std::string name = std::string("channelconv::") + prefix + "_" + kind_name;
          found.push_back(c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), ""));
        }
      }
      return found;
    }();
    return handles[algorithm * kKindNames.size() + kind];
  }
};

// The arguments after an op's two tensor operands and its third (bias or size): stride, padding,
// dilation, groups and, for the lowered algorithms, the workspace limit. Passed through unchanged.
using Rest = std::vector<c10::IValue>;

// A call of `op` through the whole dispatcher (autograd included): its third argument is the
// forward's bias or a backward's result size.
at::Tensor call(const c10::OperatorHandle& op, const at::Tensor& a, const at::Tensor& b, c10::IValue third,
                const Rest& rest) {
  Stack stack;
  stack.reserve(3 + rest.size());
  stack.emplace_back(a);
  stack.emplace_back(b);
  stack.push_back(std::move(third));
  stack.insert(stack.end(), rest.begin(), rest.end());
  op.callBoxed(stack);
  return stack.back().toTensor();
}

c10::IValue sizes_of(const at::Tensor& t) {
  return c10::IValue(t.sym_sizes());  // an int list when the sizes are concrete
}

// The bias gradient: a channel's sum over the batch and pixels. Each (image, channel) plane is
// summed in float32 or wider (ATen's pairwise sum: its error is relative to the plane's terms),
// the planes in float64, so that planes that nearly cancel across the batch keep their digits.
// (Summing every element in float64 was 50-80x slower, and cost more than the convolution's
// kernels on wide layers: benchmarks/NOTES.md v9.)
at::Tensor bias_grad(const at::Tensor& grad) {
  const auto plane_dtype = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return grad.sum({2, 3}, false, plane_dtype).sum(0, false, at::kDouble).to(grad.scalar_type());
}

// The derivative of op `kind` for its operands (a, b), given the gradient g of its result:
// the two operands' gradients, each only if asked for (a first layer needs no dX, a frozen one no dW).
std::array<at::Tensor, 2> operand_grads(const AlgorithmOps& ops, Kind kind, const at::Tensor& a,
                                        const at::Tensor& b, const at::Tensor& g, const Rest& rest,
                                        std::array<bool, 2> wanted) {
  std::array<at::Tensor, 2> grads;
  switch (kind) {
    case kForward:  // a = X, b = W
      if (wanted[0]) {  // laid out like the input, as F.conv2d's (the op itself never sees the input)
        grads[0] = call(ops[kBackwardInput], g, b, sizes_of(a), rest).contiguous(result_format(a, b));
      }
      if (wanted[1]) grads[1] = call(ops[kBackwardWeight], g, a, sizes_of(b), rest);
      break;
    case kBackwardInput:  // a = gY, b = W, g = G (the input's shape)
      if (wanted[0]) grads[0] = call(ops[kForward], g, b, c10::IValue(), rest);
      if (wanted[1]) grads[1] = call(ops[kBackwardWeight], a, g, sizes_of(b), rest);
      break;
    case kBackwardWeight:  // a = gY, b = X, g = H (the weight's shape)
      if (wanted[0]) grads[0] = call(ops[kForward], b, g, c10::IValue(), rest);
      if (wanted[1]) grads[1] = call(ops[kBackwardInput], a, g, sizes_of(b), rest);
      break;
  }
  return grads;
}

class ConvBackward : public Node {
 public:
  ConvBackward(const AlgorithmOps& ops, Kind kind, std::string name, const at::Tensor& a, const at::Tensor& b,
               bool has_bias, Rest rest)
      : ops_(ops), kind_(kind), name_(std::move(name)), a_(a, false), b_(b, false), has_bias_(has_bias),
        rest_(std::move(rest)) {}

  std::string name() const override { return name_; }

  variable_list apply(variable_list&& grads) override {
    variable_list result(num_outputs());
    const at::Tensor& g = grads[0];
    if (!g.defined()) return result;
    const at::Tensor a = a_.unpack(), b = b_.unpack();
    auto [grad_a, grad_b] = operand_grads(ops_, kind_, a, b, g, rest_,
                                          {task_should_compute_output(0), task_should_compute_output(1)});
    result[0] = std::move(grad_a);
    result[1] = std::move(grad_b);
    if (has_bias_ && task_should_compute_output(2)) result[2] = bias_grad(g);
    return result;
  }

  void release_variables() override {
    a_.reset_data();
    b_.reset_data();
  }

 private:
  const AlgorithmOps ops_;
  const Kind kind_;
  const std::string name_;
  SavedVariable a_, b_;
  const bool has_bias_;
  const Rest rest_;
};

// torch 2.13 hands graph nodes around as c10::intrusive_ptr, earlier releases as std::shared_ptr.
using NodePtr = decltype(torch::autograd::Edge::function);

template <class Ptr = NodePtr, class... Args>
Ptr make_node(Args&&... args) {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<Node>>) {
    return std::make_shared<ConvBackward>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<ConvBackward>(std::forward<Args>(args)...);
  }
}

// The Autograd kernel of one op (boxed: one body for the nine ops).
class AutogradKernel : public c10::OperatorKernel {
 public:
  AutogradKernel(AlgorithmOps ops, Kind kind, std::string node_name)
      : ops_(ops), kind_(kind), node_name_(std::move(node_name)) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, Stack* stack) {
    const size_t n_args = op.schema().arguments().size();
    auto args = torch::jit::last(*stack, n_args);
    const at::Tensor a = args[0].toTensor(), b = args[1].toTensor();
    const at::Tensor bias = kind_ == kForward && !args[2].isNone() ? args[2].toTensor() : at::Tensor();
    const bool records = torch::autograd::compute_requires_grad(a, b, bias);
    const bool has_tangent = torch::autograd::isFwGradDefined(a) || torch::autograd::isFwGradDefined(b) ||
                             torch::autograd::isFwGradDefined(bias);
    Rest rest;
    c10::IValue size;  // a backward op's result size (the tangent's terms take no bias)
    if (records || has_tangent) {
      rest.assign(args.begin() + 3, args.end());
      if (kind_ != kForward) size = args[2];
    }
    NodePtr node;
    if (records) {
      node = make_node(ops_, kind_, node_name_, a, b, bias.defined(), rest);
      node->set_next_edges(torch::autograd::collect_next_edges(a, b, bias));
    }
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
    }
    at::Tensor output = stack->back().toTensor();
    if (node) torch::autograd::set_history(output, node);
    if (has_tangent) set_tangent(output, a, b, bias, size, rest);
  }

 private:
  // Bilinear: the tangent is op(da, b) + op(a, db), plus the bias's tangent broadcast.
  void set_tangent(at::Tensor& output, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                   const c10::IValue& size, const Rest& rest) const {
    at::Tensor tangent;
    auto add = [&](at::Tensor term) { tangent = tangent.defined() ? tangent + term : std::move(term); };
    const at::Tensor da = a._fw_grad(0), db = b._fw_grad(0);
    if (da.defined()) add(call(ops_[kind_], da, b._fw_primal(0), size, rest));
    if (db.defined()) add(call(ops_[kind_], a._fw_primal(0), db, size, rest));
    if (bias.defined()) {
      const at::Tensor dbias = bias._fw_grad(0);
      if (dbias.defined()) add(dbias.reshape({1, -1, 1, 1}).expand(output.sizes()));
    }
    output._set_fw_grad(tangent, 0, /*is_inplace_op=*/false);
  }

  const AlgorithmOps ops_;
  const Kind kind_;
  const std::string node_name_;
};

void register_kernels(torch::Library& m) {
  for (size_t algorithm = 0; algorithm < kPrefixes.size(); ++algorithm) {
    for (Kind kind : {kForward, kBackwardInput, kBackwardWeight}) {
      const std::string name = std::string(kPrefixes[algorithm]) + "_" + kKindNames[kind];
      auto kernel = std::make_unique<AutogradKernel>(AlgorithmOps{algorithm}, kind, "channelconv_" + name + "Backward");
      m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunctor(std::move(kernel)));
    }
  }
}

}  // namespace
}  // namespace channelconv

TORCH_LIBRARY_IMPL(channelconv, Autograd, m) {
  channelconv::register_kernels(m);
}
