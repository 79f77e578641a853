// The Python module object of pyllm._C. The operators register themselves
// with the dispatcher when the library loads (static initialisers), so the
// module exposes only what the dispatcher can't: which CPU instruction set
// the kernels chose at run time, and the CPU output cache.

#include <Python.h>

#include <exception>

#include "cpu/isa.h"
#include "cpu/output.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(pyllm::cpu::isa_name(pyllm::cpu::active_isa()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyObject* cpu_isa_detected(PyObject*, PyObject*) {
  return PyUnicode_FromString(pyllm::cpu::isa_name(pyllm::cpu::detected_isa()));
}

PyObject* empty_cache(PyObject*, PyObject*) {
  return PyLong_FromSize_t(pyllm::cpu::empty_output_cache());
}

PyObject* cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(pyllm::cpu::output_cache_bytes());
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set the CPU kernels use (after PYLLM_CPU_ISA)."},
    {"cpu_isa_detected", cpu_isa_detected, METH_NOARGS,
     "The best instruction set this CPU and OS support."},
    {"empty_cache", empty_cache, METH_NOARGS,
     "Frees the CPU output cache; returns the bytes released."},
    {"cache_bytes", cache_bytes, METH_NOARGS, "Bytes held by the CPU output cache."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                      "pyllm C++ operators (CPU kernels and schemas).", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
