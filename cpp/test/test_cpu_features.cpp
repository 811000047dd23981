// patchify/cpu_features.h: each kernel set is reported exactly when the CPU has all of its features, the sets
// nest (F16C kernels also need AVX2 and FMA), and the cached answers do not change between calls.
#include "patchify/cpu_features.h"

#include <cstdio>

#include "check.h"

int main() {
  using namespace patchify;
#if PATCHIFY_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2"), fma = __builtin_cpu_supports("fma"),
             f16c = __builtin_cpu_supports("f16c");
  CHECK(has_avx2() == avx2);
  CHECK(has_avx2_fma() == (avx2 && fma));
  CHECK(has_avx2_fma_f16c() == (avx2 && fma && f16c));
  CHECK(has_avx512_vnni() == (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vnni")));
#else
  CHECK(!has_avx2() && !has_avx2_fma() && !has_avx2_fma_f16c() && !has_avx512_vnni());
#endif
  CHECK(!has_avx512_vnni() || has_avx2());
  CHECK(!has_avx2_fma() || has_avx2());
  CHECK(!has_avx2_fma_f16c() || has_avx2_fma());
  for (int i = 0; i < 3; ++i) CHECK(has_avx2() == has_avx2() && has_avx2_fma_f16c() == has_avx2_fma_f16c());
  std::printf("x86 dispatch %d: avx2 %d, avx2+fma %d, avx2+fma+f16c %d, avx512 bw+vnni %d\n", PATCHIFY_X86, has_avx2(),
              has_avx2_fma(), has_avx2_fma_f16c(), has_avx512_vnni());
  return TEST_MAIN_RESULT();
}
