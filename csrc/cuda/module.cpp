// The Python module object of pyllm._C_cuda. Importing it loads the CUDA
// kernels, which register themselves for the CUDA dispatch key.

#include <Python.h>
#include <cuda_runtime_api.h>

namespace {

PyObject* cuda_runtime_version(PyObject*, PyObject*) {
  return PyLong_FromLong(CUDART_VERSION);  // the toolkit this was built with
}

PyMethodDef methods[] = {{"cuda_runtime_version", cuda_runtime_version, METH_NOARGS,
                          "CUDART_VERSION of the toolkit pyllm._C_cuda was built with."},
                         {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "pyllm CUDA C++ kernels.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&module); }
