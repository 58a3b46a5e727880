// dtfast._C: registers the dtfast::* operators (TORCH_LIBRARY) when the module is imported.
//   import dtfast._C  (or torch.ops.load_library(path))  ->  torch.ops.dtfast.dreamteacher_loss_fwd / _bwd
// Kernels: CPU (dreamteacher_loss/cpu), CUDA (dreamteacher_loss/cuda, when built with WITH_CUDA), Meta
// (dreamteacher_loss/meta.cpp, for fake tensors / torch.compile). Python must not register other fakes for
// these two ops. The module also reports which CPU instruction sets the kernels were built for.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace dtfast {
namespace dreamteacher {
std::vector<std::string> available_cpu_isas();
std::string selected_cpu_isa();
void release_cached_grad_buffers();
}  // namespace dreamteacher
}  // namespace dtfast

TORCH_LIBRARY(dtfast, m) {
  m.def(
      "dreamteacher_loss_fwd(Tensor[] student, Tensor[] teacher, int whiten, int at_mode) "
      "-> (Tensor, Tensor, Tensor[])");
  m.def(
      "dreamteacher_loss_bwd(Tensor grad_mse, Tensor grad_at, Tensor[] student, Tensor[] teacher, "
      "Tensor[] saved, int whiten, int at_mode) -> Tensor[]");
}

namespace {

PyObject* cpu_isas(PyObject*, PyObject*) {
  const std::vector<std::string> names = dtfast::dreamteacher::available_cpu_isas();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* item = PyUnicode_FromString(names[i].c_str());
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(dtfast::dreamteacher::selected_cpu_isa().c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* release_cpu_grad_buffers(PyObject*, PyObject*) {
  dtfast::dreamteacher::release_cached_grad_buffers();
  Py_RETURN_NONE;
}

PyObject* with_cuda(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef kMethods[] = {
    {"cpu_isas", cpu_isas, METH_NOARGS, "CPU instruction sets of the kernels that this CPU can run, widest first."},
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The CPU instruction set the ops use now (capped at ATEN_CPU_CAPABILITY; DTFAST_CPU_ISA overrides)."},
    {"release_cpu_grad_buffers", release_cpu_grad_buffers, METH_NOARGS,
     "Free the CPU gradient buffers kept for reuse by dreamteacher_loss_bwd (those not in use)."},
    {"with_cuda", with_cuda, METH_NOARGS, "Whether the extension was built with its CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "dtfast native ops (registers torch.ops.dtfast.*)", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
