// Run-time choice of instruction set for the hottest CPU loops.
//
// The extension is compiled for the baseline x86-64 ISA (SSE2), so that a build runs on any x86-64
// machine; loops compiled that way use 4-wide vectors and no FMA. A loop body written once as an
// always-inline template is instantiated again inside a function that carries a target attribute
// (AVX2 + FMA), where the compiler vectorises it for that ISA, and `cpu_isa()` says whether this CPU
// runs it, once per process. (AVX-512 clones measured no faster than AVX2 on the decode attention,
// and slower on the routing pair loops, so there are none.) Elsewhere everything is baseline.
#pragma once

#include <cstdlib>
#include <cstring>

namespace alphalora {

enum class CpuIsa { kBaseline, kAvx2 };

// AVX2 + FMA where this CPU has them, unless ALPHALORA_CPU_ISA=baseline (for comparing the two
// builds of a kernel), read once per process.
inline CpuIsa cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    const char* forced = std::getenv("ALPHALORA_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return CpuIsa::kBaseline;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? CpuIsa::kAvx2 : CpuIsa::kBaseline;
  }();
  return isa;
#else
  return CpuIsa::kBaseline;
#endif
}

}  // namespace alphalora

#if defined(__x86_64__) && defined(__GNUC__)
#define ALPHALORA_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define ALPHALORA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALPHALORA_TARGET_AVX2
#define ALPHALORA_ALWAYS_INLINE inline
#endif
