// The few libtorch settings that tch does not reach: autocast for a given device and dtype (tch
// only toggles CUDA autocast, in float16), TF32 on CUDA, a variable's `.grad` tensor and a hook
// that runs once backward has accumulated a variable's gradient. Every entry point catches C++
// exceptions and returns them as text, so none unwinds into Rust.

#include <ATen/Context.h>
#include <ATen/Tensor.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstring>
#include <exception>
#include <unordered_set>
#include <vector>

namespace {

c10::DeviceType device_type(int cuda) { return cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU; }

// Copies the message of the exception in flight into `err` (NUL-terminated, truncated to `len`).
int fail(char* err, size_t len) {
  const char* what = "unknown C++ exception";
  try {
    throw;
  } catch (const std::exception& e) {
    what = e.what();
  } catch (...) {
  }
  if (len > 0) {
    std::strncpy(err, what, len - 1);
    err[len - 1] = '\0';
  }
  return -1;
}

// Called by backward right after it has added a gradient into the variable's `.grad`.
using ReadyFn = void (*)(const void* context, int64_t index);

struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  ReadyHook(ReadyFn fn, const void* context, int64_t index) : fn(fn), context(context), index(index) {}
  void operator()(const torch::autograd::Variable& /*unused*/) override { fn(context, index); }

  ReadyFn fn;
  const void* context;
  int64_t index;
};

}  // namespace

extern "C" {

// Enters an autocast region on `cuda` (else CPU) computing in bfloat16. The previous state goes to
// `prev_enabled` and `prev_dtype`, for rtrain_autocast_exit.
int rtrain_autocast_enter(int cuda, int* prev_enabled, int* prev_dtype, char* err, size_t len) {
  try {
    auto device = device_type(cuda);
    *prev_enabled = at::autocast::is_autocast_enabled(device) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(device));
    at::autocast::set_autocast_dtype(device, at::kBFloat16);
    at::autocast::set_autocast_enabled(device, true);
    at::autocast::increment_nesting();
    return 0;
  } catch (...) {
    return fail(err, len);
  }
}

// Leaves the region rtrain_autocast_enter opened, restoring the state it saved. The outermost
// region drops the cast copies of the weights, which the next optimizer step makes stale.
int rtrain_autocast_exit(int cuda, int prev_enabled, int prev_dtype, char* err, size_t len) {
  try {
    auto device = device_type(cuda);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(device, prev_enabled != 0);
    at::autocast::set_autocast_dtype(device, static_cast<c10::ScalarType>(prev_dtype));
    return 0;
  } catch (...) {
    return fail(err, len);
  }
}

// Lets float32 matmuls and convolutions on CUDA use TF32 tensor cores (`allow`), or keeps them in
// full float32.
int rtrain_set_tf32(int allow, char* err, size_t len) {
  try {
    at::globalContext().setAllowTF32CuBLAS(allow != 0);
    at::globalContext().setAllowTF32CuDNN(allow != 0);
    return 0;
  } catch (...) {
    return fail(err, len);
  }
}

// Makes `grad` the `.grad` of `var`. Backward then accumulates into it in place (libtorch adds to a
// defined `.grad` when it builds no graph of the gradient), so `grad` may be a view of a larger
// buffer. Shapes, dtypes and devices must match; they are checked here.
int rtrain_set_grad(at::Tensor* var, const at::Tensor* grad, char* err, size_t len) {
  try {
    TORCH_CHECK(var->sizes() == grad->sizes() && var->dtype() == grad->dtype() && var->device() == grad->device(),
                "a .grad must match its variable's shape, dtype and device");
    var->mutable_grad() = *grad;
    return 0;
  } catch (...) {
    return fail(err, len);
  }
}

// Has backward call `fn(context, index)` each time it has accumulated a gradient into `var`'s
// `.grad` (on whichever thread runs backward), replacing any such hook `var` had. A null `fn`
// removes the hook if it is the one set with `context` (a newer owner's stays).
int rtrain_set_ready_hook(at::Tensor* var, ReadyFn fn, const void* context, int64_t index, char* err, size_t len) {
  try {
    if (fn == nullptr) {
      if (torch::autograd::impl::get_autograd_meta(*var) == nullptr) {
        return 0;  // never hooked
      }
      auto& current = torch::autograd::impl::post_acc_grad_hooks(*var);
      auto* ours = dynamic_cast<ReadyHook*>(current.get());
      if (ours != nullptr && ours->context == context) {
        current.reset();
      }
      return 0;
    }
    TORCH_CHECK(var->is_leaf() && var->requires_grad(), "only a leaf variable that requires grad accumulates one");
    torch::autograd::impl::set_post_acc_grad_hooks(*var, std::make_unique<ReadyHook>(fn, context, index));
    return 0;
  } catch (...) {
    return fail(err, len);
  }
}

// Sets `reached[i]` to whether backward from `root` would accumulate a gradient into `vars[i]`:
// whether the graph below `root` holds the variable's gradient accumulator.
int rtrain_reached_by_backward(const at::Tensor* root, const at::Tensor* const* vars, size_t n, uint8_t* reached,
                               char* err, size_t len) {
  try {
    std::unordered_set<const torch::autograd::Node*> seen;
    std::vector<torch::autograd::Node*> todo;
    auto visit = [&](const std::shared_ptr<torch::autograd::Node>& node) {
      if (node && seen.insert(node.get()).second) {
        todo.push_back(node.get());
      }
    };
    // A root without a graph is at most a variable itself, which backward accumulates into.
    visit(root->grad_fn() ? root->grad_fn() : torch::autograd::impl::try_get_grad_accumulator(*root));
    while (!todo.empty()) {
      auto* node = todo.back();
      todo.pop_back();
      for (const auto& edge : node->next_edges()) {
        visit(edge.function);
      }
    }
    for (size_t i = 0; i < n; i++) {
      auto accumulator = torch::autograd::impl::try_get_grad_accumulator(*vars[i]);
      reached[i] = accumulator && seen.count(accumulator.get()) ? 1 : 0;
    }
    return 0;
  } catch (...) {
    return fail(err, len);
  }
}

// Whether float32 matmuls on CUDA may use TF32, as libtorch reports it, into `allowed`.
int rtrain_tf32_allowed(int* allowed, char* err, size_t len) {
  try {
    *allowed = at::globalContext().allowTF32CuBLAS() ? 1 : 0;
    return 0;
  } catch (...) {
    return fail(err, len);
  }
}

}  // extern "C"
