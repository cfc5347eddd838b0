// Seeded uniform floats for the CUDA kernel tests (splitmix64): fast,
// deterministic, the same sequence on every machine.
#pragma once

#include <cstdint>

namespace tailorkv::cuda::test_util {

class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  // Uniform in [lo, hi).
  float Uniform(float lo, float hi) {
    state_ += 0x9e3779b97f4a7c15ull;
    uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return lo + (hi - lo) * static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
  }

 private:
  uint64_t state_;
};

}  // namespace tailorkv::cuda::test_util
