#include "isa.h"

#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <stdexcept>
#include <string>

namespace pyllm::cpu {

Isa detected_isa() {
#if defined(__x86_64__) || defined(__i386__)
  // libgcc's __builtin_cpu_supports checks CPUID and that the OS saves the
  // wider register state (XCR0), so a "yes" is safe to act on.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  const bool avx512_bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  if (avx512_bf16) return Isa::avx512_bf16;
  if (avx512) return Isa::avx512;
  if (avx2) return Isa::avx2;
#endif
  return Isa::generic;
}

namespace {

Isa parse_isa(const char* name) {
  for (Isa isa : {Isa::generic, Isa::avx2, Isa::avx512, Isa::avx512_bf16}) {
    if (std::strcmp(name, isa_name(isa)) == 0) return isa;
  }
  throw std::invalid_argument(std::string("PYLLM_CPU_ISA='") + name +
                              "' is not one of generic, avx2, avx512, avx512_bf16");
}

Isa choose_isa() {
  Isa isa = detected_isa();
  const char* requested = std::getenv("PYLLM_CPU_ISA");
  if (requested != nullptr && requested[0] != '\0') {
    Isa wanted = parse_isa(requested);
    if (static_cast<int>(wanted) < static_cast<int>(isa)) isa = wanted;
  }
  return isa;
}

}  // namespace

Isa active_isa() {
  static const Isa isa = choose_isa();
  return isa;
}

namespace {

bool amx_granted() {
#if defined(__x86_64__) && defined(__linux__)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
  if (!tile || !bf16) return false;
  // Linux hands out the 8 KiB tile state on request only (kernel 5.16+);
  // without it the first tile instruction faults.
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

bool choose_amx() {
  const char* env = std::getenv("PYLLM_CPU_AMX");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return active_isa() == Isa::avx512_bf16 && amx_granted();
}

}  // namespace

bool amx_usable() {
  static const bool usable = choose_amx();
  return usable;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::generic: return "generic";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::avx512_bf16: return "avx512_bf16";
  }
  return "unknown";
}

}  // namespace pyllm::cpu
