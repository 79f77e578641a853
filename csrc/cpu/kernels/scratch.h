// A per-thread scratch buffer for the ISA kernels (compiled per ISA; the
// including file defines PYLLM_ISA). Plain malloc, no std containers: their
// inline functions, compiled with an ISA's flags, could be picked by the
// linker for code that must run on any CPU.
#pragma once

#include <cstdint>
#include <cstdlib>

#ifndef PYLLM_ISA
#error "define PYLLM_ISA before including scratch.h"
#endif

namespace pyllm::cpu::PYLLM_ISA {
namespace {

struct Scratch {
  float* data = nullptr;
  int64_t size = 0;

  // At least n floats, 64-byte aligned, never null (n = 0 included: memset
  // and memcpy must not get a null pointer even for 0 bytes); the contents
  // are not kept.
  float* get(int64_t n) {
    if (n > size || data == nullptr) {
      std::free(data);
      const int64_t bytes = ((n > 0 ? n : 1) * 4 + 63) / 64 * 64;
      data = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(bytes)));
      size = n;
    }
    return data;
  }

  ~Scratch() { std::free(data); }
};

}  // namespace
}  // namespace pyllm::cpu::PYLLM_ISA
