// The extension module dpm_ops._C: declares every op schema of the `dpm_ops` namespace once.
// Kernels register themselves per device next to their code (csrc/<op>/<op>_{cpu,cuda}.cpp);
// fake (meta) and autograd registrations live in Python (dpm_ops/ops/).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

TORCH_LIBRARY(dpm_ops, m) {
  m.def("masked_cosine(Tensor x, Tensor mask, Tensor protos, float eps=1e-12) -> Tensor");
  m.def(
      "masked_cosine_backward(Tensor grad, Tensor x, Tensor mask, Tensor protos, Tensor out, float eps)"
      " -> (Tensor, Tensor, Tensor)");
}

// A plain Python module, so `import dpm_ops._C` loads the library and its registrations.
// It also says how it was built, for dpm_ops.backends().
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

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
