// Shared by the CUDA benchmarks: fail-fast status checks, the Llama-3.1-8B
// attention shape they time, and the counter hash their random fills use.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "cuda/cuda_check.h"

// A benchmark has nothing to recover: print what failed and exit non-zero.
#define BENCH_CHECK_OK(expr)                                                            \
  do {                                                                                  \
    const ::absl::Status bench_status_ = (expr);                                        \
    if (!bench_status_.ok()) {                                                          \
      std::fprintf(stderr, "%s failed: %s\n", #expr, bench_status_.ToString().c_str()); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)
#define BENCH_CHECK_CUDA(expr) BENCH_CHECK_OK(::tailorkv::cuda::CudaStatus((expr), #expr))

namespace tailorkv::bench {

// One Llama-3.1-8B attention layer.
constexpr int kHeads = 32;
constexpr int kKvHeads = 8;
constexpr int kHeadDim = 128;
constexpr double kHbmPeakBytesPerSec = 3.0e12;  // PERF.md, device-to-device copy
constexpr size_t kRotateBytes = 256u << 20;     // > 5x the 50 MB L2

// splitmix64 of (seed, i): nonzero, deterministic random data on the device.
__device__ __forceinline__ uint64_t Hash(uint64_t seed, uint64_t i) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (i + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace tailorkv::bench
