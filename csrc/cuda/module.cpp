// The Python module object of pyllm._C_cuda. Importing it loads the CUDA
// kernels, which register themselves for the CUDA dispatch key; it also holds
// their batch-invariant flag.

#include <Python.h>
#include <cuda_runtime_api.h>

#include "../common/batch_invariant.h"

namespace {

PyObject* cuda_runtime_version(PyObject*, PyObject*) {
  return PyLong_FromLong(CUDART_VERSION);  // the toolkit this was built with
}

PyObject* set_batch_invariant(PyObject*, PyObject* on) {
  const int truth = PyObject_IsTrue(on);
  if (truth < 0) return nullptr;
  pyllm::set_batch_invariant(truth != 0);
  Py_RETURN_NONE;
}

PyObject* batch_invariant(PyObject*, PyObject*) { return PyBool_FromLong(pyllm::batch_invariant()); }

PyMethodDef methods[] = {{"cuda_runtime_version", cuda_runtime_version, METH_NOARGS,
                          "CUDART_VERSION of the toolkit pyllm._C_cuda was built with."},
                         {"set_batch_invariant", set_batch_invariant, METH_O,
                          "Turns batch-invariant mode on or off for the CUDA kernels."},
                         {"batch_invariant", batch_invariant, METH_NOARGS,
                          "Whether batch-invariant mode is on for the CUDA kernels."},
                         {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "pyllm CUDA C++ kernels.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&module); }
