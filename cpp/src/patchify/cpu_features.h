// Run-time CPU-feature dispatch, one place for the whole core.
//
// The extension is compiled for baseline x86-64 (any wheel must run on any x86-64 CPU). The hot kernels have a
// second version compiled with __attribute__((target("avx2,..."))) beside the portable one, and the caller picks
// one at run time with the functions below. target_clones cannot be used instead: its default clone would have to
// compile the AVX2 intrinsics too, and GCC's "arch=haswell" clone dispatches on the CPU *model* (it ran the
// baseline clone on AMD Zen 3).
//
// PATCHIFY_X86 is 1 where such kernels can be compiled (x86 with GCC or Clang, which provide target attributes,
// <immintrin.h> for every target and __builtin_cpu_supports); elsewhere only the portable kernels exist and every
// has_*() is false.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define PATCHIFY_X86 1
#include <immintrin.h>
#else
#define PATCHIFY_X86 0
#endif

namespace patchify {

namespace cpu_detail {
#if PATCHIFY_X86
inline bool supports_avx2() {
  __builtin_cpu_init();  // harmless if already done; needed when called before the runtime's own init
  return __builtin_cpu_supports("avx2");
}
inline bool supports_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("fma");
}
inline bool supports_f16c() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c");
}
// libgcc/compiler-rt report the AVX-512 features only where the OS saves the ZMM state (XCR0), like AVX for YMM.
inline bool supports_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}
#else
inline bool supports_avx2() { return false; }
inline bool supports_fma() { return false; }
inline bool supports_f16c() { return false; }
inline bool supports_avx512_vnni() { return false; }
#endif
}  // namespace cpu_detail

// Each answer is computed once (thread-safe static initialisation) and then costs one load: the kernels ask on
// every call. Kernel sets: the tiler's resize needs AVX2 only, the IVFPQ scanner's dot products AVX2+FMA, the flat
// index's float16 rows AVX2+FMA+F16C, the coarse search's int8 prefilter AVX2 or, faster, AVX-512 BW+VNNI
// (vpdpwssd: 32 int16 products summed into int32 by one instruction).
inline bool has_avx2() {
  static const bool yes = cpu_detail::supports_avx2();
  return yes;
}
inline bool has_avx2_fma() {
  static const bool yes = has_avx2() && cpu_detail::supports_fma();
  return yes;
}
inline bool has_avx2_fma_f16c() {
  static const bool yes = has_avx2_fma() && cpu_detail::supports_f16c();
  return yes;
}
inline bool has_avx512_vnni() {
  static const bool yes = has_avx2() && cpu_detail::supports_avx512_vnni();
  return yes;
}

}  // namespace patchify
