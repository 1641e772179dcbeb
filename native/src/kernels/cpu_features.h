// Run-time CPU feature detection (cpuid + xgetbv on x86, HWCAP / sysctl on aarch64).
#pragma once

namespace edgemm {

struct CpuFeatures {
  // x86
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512vbmi = false, avxvnni = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;  // cpuid + XCR0 tile state (the OS grant is checked apart)
  bool avx512bf16 = false;
  // aarch64
  bool neon = false, dotprod = false;
};
const CpuFeatures& cpu_features();

}  // namespace edgemm
