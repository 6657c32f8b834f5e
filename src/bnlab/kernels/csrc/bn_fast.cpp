// Python entry points for the eager CPU path of `bnlab.functional.batch_norm_with_flag`: the
// argument checks and the kernels' routing of the Python code, done in C++ for the common
// case, then one dispatcher call of `bnlab::bn_train_fwd_update` or `bnlab::bn_eval_fwd`.
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

// None, or a plain CPU tensor of shape (C,) (check_per_channel's conditions). `buffer`: also
// float32 and contiguous — the running statistics `bn_train_fwd_update` takes (the Python
// path's `_fast_buffers`; others go through the reference update).
bool per_channel(PyObject* o, int64_t C, bool buffer) {
  if (o == Py_None) return true;
  if (!plain(o)) return false;
  const Tensor& t = THPVariable_Unpack(o);
  if (t.dim() != 1 || t.size(0) != C || !t.device().is_cpu()) return false;
  return !buffer || (t.scalar_type() == at::kFloat && t.layout() == at::kStrided &&
                     t.is_contiguous());
}

OptT opt(PyObject* o) { return o == Py_None ? OptT() : OptT(THPVariable_Unpack(o)); }

// A finite float > 0 (check_eps), as a Python float.
bool eps_ok(PyObject* o, double& eps) {
  if (!PyFloat_CheckExact(o)) return false;
  eps = PyFloat_AS_DOUBLE(o);
  return eps > 0.0 && eps < INFINITY;
}

// A float in [0, 1] (check_momentum) or a plain tensor (the layers' 1/n, not checked there).
bool momentum_ok(PyObject* o, double& mom, OptT& mom_t) {
  if (PyFloat_CheckExact(o)) {
    mom = PyFloat_AS_DOUBLE(o);
    return mom >= 0.0 && mom <= 1.0;
  }
  if (!plain(o)) return false;
  mom_t = THPVariable_Unpack(o);
  return true;
}

// The input: what `bnlab.kernels.supports` and check_per_channel ask of it, and no torch.func
// transform, __torch_function__ mode or __torch_dispatch__ mode (FakeTensorMode, a
// FlopCounterMode) in force.
const Tensor* input(PyObject* o) {
  if (!plain(o) || at::impl::torch_function_mode_enabled() ||
      c10::impl::TorchDispatchModeTLS::any_modes_set() ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode))
    return nullptr;
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

// Training (Alg. 1 and the running update): (y, finite flag or None without buffers, finite
// as a bool), or None. `momentum`: a float in [0, 1] or a plain tensor (the layers' 1/n).
py::object train(py::handle x_, py::handle w, py::handle b, py::handle rm, py::handle rv,
                 py::handle momentum, py::handle eps_) {
  const Tensor* xp = input(x_.ptr());
  double eps = 0.0, mom = 0.0;
  OptT mom_t;
  if (xp == nullptr || !eps_ok(eps_.ptr(), eps)) return py::none();
  const Tensor& x = *xp;
  const int64_t C = x.size(1), n = x.numel();
  // n == 0: the empty-batch rule; n == C: one value per channel, an error. Both in Python.
  if (n == 0 || n == C) return py::none();
  if (!per_channel(w.ptr(), C, false) || !per_channel(b.ptr(), C, false) ||
      !per_channel(rm.ptr(), C, true) || !per_channel(rv.ptr(), C, true))
    return py::none();
  if (!momentum_ok(momentum.ptr(), mom, mom_t)) return py::none();
  if (rm.is_none() && rv.is_none()) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("bnlab::bn_train_fwd", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                             const Tensor&, const OptT&, const OptT&, double, const OptT&, bool,
                             bool)>();
    Tensor y;
    {
      py::gil_scoped_release no_gil;
      y = std::get<0>(op.call(x, opt(w.ptr()), opt(b.ptr()), eps, OptT(), false, false));
    }
    return py::make_tuple(wrap(std::move(y)), py::none(), true);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlab::bn_train_fwd_update", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const OptT&, const OptT&, double, const OptT&,
                           const OptT&, int64_t, double, const OptT&)>();
  Tensor y, finite;
  {
    py::gil_scoped_release no_gil;
    std::tie(y, std::ignore, std::ignore, finite) =
        op.call(x, opt(w.ptr()), opt(b.ptr()), eps, opt(rm.ptr()), opt(rv.ptr()), n / C, mom,
                mom_t);
  }
  // (No dispatch mode is set, so the flag is the kernel's own CPU bool scalar.)
  const bool ok = finite.const_data_ptr<bool>()[0];
  return py::make_tuple(wrap(std::move(y)), wrap(std::move(finite)), ok);
}

// Evaluation (Alg. 2's inference transform with the running statistics): y, or None.
// (`momentum` is only checked, as the Python path does.)
py::object eval(py::handle x_, py::handle rm, py::handle rv, py::handle w, py::handle b,
                py::handle momentum, py::handle eps_) {
  const Tensor* xp = input(x_.ptr());
  double eps = 0.0, mom = 0.0;
  OptT mom_t;
  if (xp == nullptr || !eps_ok(eps_.ptr(), eps) || !momentum_ok(momentum.ptr(), mom, mom_t) ||
      rm.is_none() || rv.is_none()) {
    return py::none();
  }
  const Tensor& x = *xp;
  const int64_t C = x.size(1);
  if (!per_channel(rm.ptr(), C, false) || !per_channel(rv.ptr(), C, false) ||
      !per_channel(w.ptr(), C, false) || !per_channel(b.ptr(), C, false))
    return py::none();
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlab::bn_eval_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                         const Tensor&, const OptT&, const OptT&,
                                                         double, const OptT&, bool, bool)>();
  Tensor y;
  {
    py::gil_scoped_release no_gil;
    y = std::get<0>(op.call(x, THPVariable_Unpack(rm.ptr()), THPVariable_Unpack(rv.ptr()),
                            opt(w.ptr()), opt(b.ptr()), eps, OptT(), false, false));
  }
  return wrap(std::move(y));
}

}  // namespace
}  // namespace bnk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bnlab's eager CPU entry points (see bnlab/kernels/csrc/bn_fast.cpp)";
  m.def("train", &bnk::train,
        "train(x, weight, bias, running_mean, running_var, momentum, eps) -> "
        "(y, finite, ok) or None");
  m.def("eval", &bnk::eval, "eval(x, running_mean, running_var, weight, bias, momentum, eps) -> y or None");
}
