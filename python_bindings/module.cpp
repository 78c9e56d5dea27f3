// The extension module dpm_ops._C and the `dpm_ops` op namespace. The schemas of the ops are
// defined in Python, each op once with its fake and autograd registrations (dpm_ops/ops/<op>.py, through
// dpm_ops/ops/_declare.py); the kernels register themselves per device next to their code
// (csrc/<op>/<op>_{cpu,cuda}.cpp, DPM_OPS_KERNELS of csrc/common/register_kernels.h), before those
// definitions run: the dispatcher keeps a kernel registered ahead of its schema.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include "../csrc/knn/knn_int8_gemm_amx.h"

TORCH_LIBRARY(dpm_ops, m) {}

// The engine the certified search's int8 GEMM runs on now, "amx" or "onednn" (torch's), None where torch's
// is not exact in this process (csrc/knn/knn_int8_gemm_amx.h: stage 1 does not run).
static PyObject* int8_gemm(PyObject*, PyObject*) {
  if (dpm_ops::knn::amx_int8_usable()) return PyUnicode_FromString("amx");
  if (dpm_ops::knn::int_mm_exact()) return PyUnicode_FromString("onednn");
  Py_RETURN_NONE;
}
static PyMethodDef module_methods[] = {{"int8_gemm", int8_gemm, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};

// A plain Python module, so `import dpm_ops._C` loads the library and its registrations.
// It also says how it was built, for dpm_ops.backends().
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef DPM_OPS_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
#ifdef _OPENMP
  PyModule_AddIntConstant(module, "with_openmp", 1);
#else
  PyModule_AddIntConstant(module, "with_openmp", 0);
#endif
  PyModule_AddObject(module, "torch_version",
                     Py_BuildValue("(iii)", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH));
  return module;
}
