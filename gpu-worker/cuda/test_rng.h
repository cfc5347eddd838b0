// Seeded uniform floats for the CUDA kernel tests (splitmix64): fast,
// deterministic, the same sequence on every machine.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tailorkv::cuda::test_util {

// bf16 bits of a float, rounded to nearest even (finite inputs), and back.
inline uint16_t Bf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float Bf16Value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

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

// A refine pool for the score kernels' `pool` argument: per head of n_kv, n
// entries; ascending distinct positions in [0, limit) except the last entry
// of each head, which is `limit` (out of range: it must score -infinity).
// Needs 1 <= n <= limit + 1.
inline std::vector<int32_t> RandomPool(int n_kv, int n, int limit, Rng& rng) {
  std::vector<int32_t> pool;
  for (int h = 0; h < n_kv; ++h) {
    // Every position with probability ~(n - 1) / limit, trimmed or padded.
    std::vector<int32_t> rows;
    for (int p = 0; p < limit && static_cast<int>(rows.size()) < n - 1; ++p) {
      const int left = limit - p, need = n - 1 - static_cast<int>(rows.size());
      if (left <= need || rng.Uniform(0.0f, 1.0f) * left < need) rows.push_back(p);
    }
    rows.push_back(limit);
    pool.insert(pool.end(), rows.begin(), rows.end());
  }
  return pool;
}

}  // namespace tailorkv::cuda::test_util
