#include "cuda/random_fill.cuh"

#include "absl/strings/str_format.h"
#include "cuda/cuda_check.h"

namespace tailorkv::cuda {
namespace {

// splitmix64: a good-enough counter-based generator for benchmark data.
__device__ __forceinline__ float UniformPm1(uint64_t seed, int64_t i) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(i + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

template <typename T>
__global__ void FillRandomKernel(T* dst, int64_t n, uint64_t seed, float scale, float offset) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = offset + scale * UniformPm1(seed, i);
    if constexpr (std::is_same_v<T, float>) {
      dst[i] = v;
    } else {
      dst[i] = __float2bfloat16_rn(v);
    }
  }
}

template <typename T>
absl::Status Fill(T* dst, int64_t n, uint64_t seed, float scale, float offset, cudaStream_t s) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrFormat("n must be >= 0, got %d", n));
  if (n == 0) return absl::OkStatus();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65536);
  FillRandomKernel<T><<<static_cast<int>(blocks), threads, 0, s>>>(dst, n, seed, scale, offset);
  CUDA_RETURN_IF_LAUNCH_FAILED("FillRandomKernel");
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchFillRandomBf16(__nv_bfloat16* dst, int64_t n, uint64_t seed, float scale,
                                  float offset, cudaStream_t stream) {
  return Fill(dst, n, seed, scale, offset, stream);
}

absl::Status LaunchFillRandomF32(float* dst, int64_t n, uint64_t seed, float scale, float offset,
                                 cudaStream_t stream) {
  return Fill(dst, n, seed, scale, offset, stream);
}

}  // namespace tailorkv::cuda
