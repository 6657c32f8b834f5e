// Python entry points for the eager CPU path of `bnlab.functional.batch_norm_with_flag` and
// of the fused `bnlab.kernels.bn_relu` / `bn_add_relu`: the argument checks and the kernels'
// routing of the Python code, done in C++ for the common case, then the dispatcher calls of
// the ops that code would make (`bnlab::bn_train_fwd_update`, `bn_train_fwd`, `bn_eval_fwd`,
// `bn_update_running`).
//
// Why: on a small activation the Python around the op cost more than the op. For the paper's
// MLP layer (60, 100), forward + backward took 67 µs through the Python path against 54 µs for
// torch's BN; the checks, routing and the read of the finite flag were 12 µs of it, about twice
// what they cost in isolation (the interpreter runs cold between autograd's C++ calls).
//
// Each function returns None when anything is out of the ordinary — a tensor subclass or a
// __torch_function__ mode, another device, dtype or layout, a bad argument, a torch.func
// transform — and the caller then takes the Python path, which raises the errors with their
// messages and routes everything else. So this file only ever decides "the Python path would
// call exactly this op with exactly these arguments"; it never decides an error or a
// different result. (Python-only states — torch.compile tracing, BNLAB_FORCE_REFERENCE,
// forward-mode AD levels — are checked by the caller before it calls in.)
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

#include <cmath>

namespace bnk {
namespace {

namespace py = pybind11;
using at::Tensor;
using OptT = c10::optional<Tensor>;

// A torch.Tensor or nn.Parameter, not a subclass (which may override __torch_function__ or
// __torch_dispatch__, or be a FakeTensor).
bool plain(PyObject* o) { return THPVariable_CheckExact(o); }

// None, or a plain floating-point CPU tensor of shape (C,) (check_per_channel's conditions).
// `buffer`: also float32, contiguous and writable here (not an inference tensor outside
// inference mode) — the running statistics `bn_train_fwd_update` takes (the Python path's
// `_fast_buffers`; others go through the reference update).
bool per_channel(PyObject* o, int64_t C, bool buffer) {
  if (o == Py_None) return true;
  if (!plain(o)) return false;
  const Tensor& t = THPVariable_Unpack(o);
  if (t.dim() != 1 || t.size(0) != C || !t.device().is_cpu() || !t.is_floating_point())
    return false;
  return !buffer || (t.scalar_type() == at::kFloat && t.layout() == at::kStrided &&
                     t.is_contiguous() && !(t.is_inference() && !c10::InferenceMode::is_enabled()));
}

OptT opt(PyObject* o) { return o == Py_None ? OptT() : OptT(THPVariable_Unpack(o)); }

// A finite float > 0 (check_eps), as a Python float.
bool eps_ok(PyObject* o, double& eps) {
  if (!PyFloat_CheckExact(o)) return false;
  eps = PyFloat_AS_DOUBLE(o);
  return eps > 0.0 && eps < INFINITY;
}

// A float in [0, 1] (check_momentum) or a plain 0-d floating tensor (the layers' 1/n), in
// [0, 1] where its value is on the host; anything else takes the Python path, whose
// check_args names what is wrong.
bool momentum_ok(PyObject* o, double& mom, OptT& mom_t) {
  if (PyFloat_CheckExact(o)) {
    mom = PyFloat_AS_DOUBLE(o);
    return mom >= 0.0 && mom <= 1.0;
  }
  if (!plain(o)) return false;
  mom_t = THPVariable_Unpack(o);
  const at::Tensor& t = *mom_t;
  // (A momentum elsewhere than the CPU input's device, as a meta tensor whose value does not
  // exist, goes to Python, whose check names it.)
  if (t.dim() != 0 || !t.is_cpu()) return false;
  double v;  // read in place: an item() call is a dispatcher round trip per forward
  if (t.scalar_type() == at::kFloat) v = *t.const_data_ptr<float>();
  else if (t.scalar_type() == at::kDouble) v = *t.const_data_ptr<double>();
  else return false;
  return v >= 0.0 && v <= 1.0;
}

// Whether a torch.func transform, a __torch_function__ mode, a __torch_dispatch__ mode
// (FakeTensorMode, a FlopCounterMode) or torch.jit.trace is in force: each should see the
// Python path's calls.
bool python_modes() {
  return at::impl::torch_function_mode_enabled() || torch::jit::tracer::isTracing() ||
         c10::impl::TorchDispatchModeTLS::any_modes_set() ||
         c10::impl::tls_is_dispatch_key_included(
             c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// The input: what `bnlab.kernels.supports` and check_per_channel ask of it, and no
// `python_modes`.
const Tensor* input(PyObject* o) {
  if (!plain(o) || python_modes()) return nullptr;
  const Tensor& x = THPVariable_Unpack(o);
  const auto st = x.scalar_type();
  if (x.dim() < 2 || !x.device().is_cpu() || x.layout() != at::kStrided || x.is_quantized() ||
      x.is_nested() || (st != at::kFloat && st != at::kBFloat16))
    return nullptr;
  return &x;
}

py::object wrap(Tensor t) {
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t)));
}

// The ops, looked up once (schemas in bn_ops.cpp and bn_autograd.cpp).
const auto& train_fwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlab::bn_train_fwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const OptT&, const OptT&, double, const OptT&, bool,
                           bool)>();
  return op;
}

const auto& train_fwd_update_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlab::bn_train_fwd_update", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const OptT&, const OptT&, double, const OptT&,
                           const OptT&, int64_t, double, const OptT&)>();
  return op;
}

const auto& update_running_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlab::bn_update_running", "")
                       .typed<Tensor(const OptT&, const OptT&, const Tensor&, const Tensor&,
                                     int64_t, double, const OptT&)>();
  return op;
}

const auto& eval_fwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlab::bn_eval_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                         const Tensor&, const OptT&, const OptT&,
                                                         double, const OptT&, bool, bool)>();
  return op;
}

// (y, finite flag, finite as a bool). No dispatch mode is set (see `input`), so the flag is
// the kernel's own CPU bool scalar.
py::object with_flag(Tensor y, Tensor finite) {
  const bool ok = finite.const_data_ptr<bool>()[0];
  return py::make_tuple(wrap(std::move(y)), wrap(std::move(finite)), ok);
}

// What every entry point checks: the input, eps, momentum, and weight and bias.
struct Common {
  const Tensor* x = nullptr;  // null: hand the call back to Python
  double eps = 0.0, mom = 0.0;
  OptT mom_t;
  int64_t C = 0;
};

Common common(py::handle x_, py::handle w, py::handle b, py::handle momentum, py::handle eps_) {
  Common a;
  const Tensor* xp = input(x_.ptr());
  if (xp == nullptr || !eps_ok(eps_.ptr(), a.eps) || !momentum_ok(momentum.ptr(), a.mom, a.mom_t))
    return a;
  a.C = xp->size(1);
  if (per_channel(w.ptr(), a.C, false) && per_channel(b.ptr(), a.C, false)) a.x = xp;
  return a;
}

// The training-mode conditions on the batch and the running statistics. n == 0 is the
// empty-batch rule and n == C (one value per channel) an error, both in Python.
bool train_ok(const Tensor& x, int64_t C, py::handle rm, py::handle rv) {
  const int64_t n = x.numel();
  return n != 0 && n != C && per_channel(rm.ptr(), C, true) && per_channel(rv.ptr(), C, true);
}

// The evaluation-mode condition: both running statistics, of shape (C,), and no gradient
// wanted through them (`functional.buffers_need_grad`: the reference path differentiates).
bool eval_ok(int64_t C, py::handle rm, py::handle rv) {
  if (rm.is_none() || rv.is_none() || !per_channel(rm.ptr(), C, false) ||
      !per_channel(rv.ptr(), C, false))
    return false;
  return !(at::GradMode::is_enabled() && (THPVariable_Unpack(rm.ptr()).requires_grad() ||
                                          THPVariable_Unpack(rv.ptr()).requires_grad()));
}

// Training (Alg. 1 and the running update): (y, finite flag or None without buffers, finite
// as a bool), or None. `momentum`: a float in [0, 1] or a plain tensor (the layers' 1/n).
py::object train(py::handle x_, py::handle w, py::handle b, py::handle rm, py::handle rv,
                 py::handle momentum, py::handle eps_) {
  const Common a = common(x_, w, b, momentum, eps_);
  if (a.x == nullptr || !train_ok(*a.x, a.C, rm, rv)) return py::none();
  const Tensor& x = *a.x;
  Tensor y, finite;
  if (rm.is_none() && rv.is_none()) {
    {
      py::gil_scoped_release no_gil;
      y = std::get<0>(train_fwd_op().call(x, opt(w.ptr()), opt(b.ptr()), a.eps, OptT(), false,
                                          false));
    }
    return py::make_tuple(wrap(std::move(y)), py::none(), true);
  }
  {
    py::gil_scoped_release no_gil;
    std::tie(y, std::ignore, std::ignore, finite) =
        train_fwd_update_op().call(x, opt(w.ptr()), opt(b.ptr()), a.eps, opt(rm.ptr()),
                                   opt(rv.ptr()), x.numel() / a.C, a.mom, a.mom_t);
  }
  return with_flag(std::move(y), std::move(finite));
}

// Evaluation (Alg. 2's inference transform with the running statistics): y, or None.
// (`momentum` is only checked, as the Python path does.)
py::object eval(py::handle x_, py::handle rm, py::handle rv, py::handle w, py::handle b,
                py::handle momentum, py::handle eps_) {
  const Common a = common(x_, w, b, momentum, eps_);
  if (a.x == nullptr || !eval_ok(a.C, rm, rv)) return py::none();
  Tensor y;
  {
    py::gil_scoped_release no_gil;
    y = std::get<0>(eval_fwd_op().call(*a.x, THPVariable_Unpack(rm.ptr()),
                                       THPVariable_Unpack(rv.ptr()), opt(w.ptr()), opt(b.ptr()),
                                       a.eps, OptT(), false, false));
  }
  return wrap(std::move(y));
}

// relu(BN(x) [+ residual]) (`bnlab.kernels.fused`): in training (y, finite flag or None, ok),
// in evaluation (y, None, True); or None. The ReLU mask is saved when autograd will want it.
py::object fused(py::handle x_, py::handle z_, py::handle rm, py::handle rv, py::handle w,
                 py::handle b, py::handle training_, py::handle momentum, py::handle eps_) {
  const Common a = common(x_, w, b, momentum, eps_);
  if (a.x == nullptr || (training_.ptr() != Py_True && training_.ptr() != Py_False))
    return py::none();
  const Tensor& x = *a.x;
  const bool training = training_.ptr() == Py_True;
  if (training ? !train_ok(x, a.C, rm, rv) : !eval_ok(a.C, rm, rv)) return py::none();
  OptT z;
  if (!z_.is_none()) {  // a residual of x's shape, dtype and device (else: Python decides)
    if (!plain(z_.ptr())) return py::none();
    z = THPVariable_Unpack(z_.ptr());
    if (z->sizes() != x.sizes() || z->scalar_type() != x.scalar_type() || !z->device().is_cpu())
      return py::none();
  }
  // `fused._needs_grad`: the backward reads the mask.
  const auto wants = [](const OptT& t) { return t.has_value() && t->requires_grad(); };
  const bool save = at::GradMode::is_enabled() &&
                    (x.requires_grad() || wants(z) || wants(opt(w.ptr())) || wants(opt(b.ptr())));
  Tensor y, mean, var, finite;
  {
    py::gil_scoped_release no_gil;
    if (!training) {
      y = std::get<0>(eval_fwd_op().call(x, THPVariable_Unpack(rm.ptr()),
                                         THPVariable_Unpack(rv.ptr()), opt(w.ptr()),
                                         opt(b.ptr()), a.eps, z, true, save));
    } else {
      std::tie(y, mean, var, std::ignore) =
          train_fwd_op().call(x, opt(w.ptr()), opt(b.ptr()), a.eps, z, true, save);
      if (!rm.is_none() || !rv.is_none())
        finite = update_running_op().call(opt(rm.ptr()), opt(rv.ptr()), mean, var,
                                          x.numel() / a.C, a.mom, a.mom_t);
    }
  }
  if (!finite.defined()) return py::make_tuple(wrap(std::move(y)), py::none(), true);
  return with_flag(std::move(y), std::move(finite));
}

// The layers' counters after a training step: num_batches_tracked += finite,
// num_nonfinite_batches += !finite, on 0-d int64 CPU buffers, without an ATen op. (An in-place
// add on a 0-d tensor costs 1.5 µs timed alone but about 10 µs between a BN layer's forward and
// autograd's backward: TensorIterator's long path runs with cold caches.) True when done; False
// (nothing changed) for anything else, e.g. a mode or transform that should see the add.
bool count(py::handle tracked, py::handle nonfinite, py::handle finite_) {
  if (python_modes()) return false;
  const auto scalar = [](py::handle o, at::ScalarType st) {
    if (!plain(o.ptr())) return false;
    const Tensor& t = THPVariable_Unpack(o.ptr());
    return t.scalar_type() == st && t.numel() == 1 && t.device().is_cpu() &&
           t.layout() == at::kStrided && !t.is_inference();
  };
  if (!scalar(tracked, at::kLong) || !scalar(nonfinite, at::kLong) ||
      !scalar(finite_, at::kBool))
    return false;
  const Tensor &n = THPVariable_Unpack(tracked.ptr()), &bad = THPVariable_Unpack(nonfinite.ptr());
  const bool ok = THPVariable_Unpack(finite_.ptr()).const_data_ptr<bool>()[0];
  // As the adds did, including their version bumps (a graph that saved a counter refuses it).
  n.mutable_data_ptr<int64_t>()[0] += ok;
  torch::autograd::impl::bump_version(n);
  if (!ok) {
    ++bad.mutable_data_ptr<int64_t>()[0];
    torch::autograd::impl::bump_version(bad);
  }
  return true;
}

}  // namespace
}  // namespace bnk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bnlab's eager CPU entry points (see bnlab/kernels/csrc/bn_fast.cpp)";
  m.def("train", &bnk::train,
        "train(x, weight, bias, running_mean, running_var, momentum, eps) -> "
        "(y, finite, ok) or None");
  m.def("eval", &bnk::eval,
        "eval(x, running_mean, running_var, weight, bias, momentum, eps) -> y or None");
  m.def("fused", &bnk::fused,
        "fused(x, residual, running_mean, running_var, weight, bias, training, momentum, eps) "
        "-> (y, finite, ok) or None");
  m.def("count", &bnk::count,
        "count(num_batches_tracked, num_nonfinite_batches, finite) -> done (bool)");
}
