// Run-time choice of the CPU instruction set.
//
// Kernels with ISA-specific code are written once as a header
// csrc/cpu/kernels/<name>_kernel.h over the SIMD layer (simd.h); setup.py
// compiles it once per instruction set, in the namespace PYLLM_ISA names
// (generic, avx2, avx512, avx512_bf16), each with that set's flags, and the
// dispatching code picks one with active_isa(). generic runs everywhere.
#pragma once

namespace pyllm::cpu {

enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

// The best set this CPU and its OS support (CPUID and XCR0).
Isa detected_isa();

// detected_isa(), lowered by the environment variable PYLLM_CPU_ISA
// (generic | avx2 | avx512 | avx512_bf16) when it names a lower set. A set
// above what the CPU supports is never chosen. Read once.
Isa active_isa();

const char* isa_name(Isa isa);

// Whether the bf16 GEMM may use AMX tiles (Intel Advanced Matrix
// Extensions: AMX-TILE and AMX-BF16): the CPU has them, the OS granted this
// process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once here),
// the active ISA is avx512_bf16, and PYLLM_CPU_AMX is not "0". Read once.
bool amx_usable();

// Declares a kernel's four ISA variants (one per namespace), e.g.
//   PYLLM_DECLARE_ISA_VARIANTS(void rotary(const Rotary&, int64_t, int64_t));
#define PYLLM_DECLARE_ISA_VARIANTS(...)        \
  namespace generic { __VA_ARGS__; }           \
  namespace avx2 { __VA_ARGS__; }              \
  namespace avx512 { __VA_ARGS__; }            \
  namespace avx512_bf16 { __VA_ARGS__; }

// Picks the variant for the active ISA; a variant may be null when no code of
// that ISA exists for a kernel, and then the next lower one runs.
template <typename Fn>
Fn pick_isa(Fn generic, Fn avx2, Fn avx512, Fn avx512_bf16 = nullptr) {
  Fn table[] = {generic, avx2, avx512, avx512_bf16};
  for (int i = static_cast<int>(active_isa()); i > 0; --i) {
    if (table[i] != nullptr) return table[i];
  }
  return generic;
}

}  // namespace pyllm::cpu
