// Fills device memory with seeded pseudo-random values, on the GPU, so that
// benchmarks of 8B-shaped models need no host weights (and never time zeros).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace tailorkv::cuda {

// dst[i] = bf16(offset + scale * u_i), u_i uniform in [-1, 1) from a
// counter-based hash of (seed, i): deterministic for a given seed.
absl::Status LaunchFillRandomBf16(__nv_bfloat16* dst, int64_t n, uint64_t seed, float scale,
                                  float offset, cudaStream_t stream);
// The same in float32.
absl::Status LaunchFillRandomF32(float* dst, int64_t n, uint64_t seed, float scale, float offset,
                                 cudaStream_t stream);

}  // namespace tailorkv::cuda
