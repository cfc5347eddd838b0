// Small helpers both kv-host services use on what peers send: ids, keys,
// page rounding.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>

#include "store/memfd_arena.h"

namespace tailorkv::kvhost {

inline constexpr size_t kMaxIdBytes = 128;

// Printable ASCII, 1 to kMaxIdBytes bytes (worker and session ids).
inline bool ValidId(const std::string& s) {
  if (s.empty() || s.size() > kMaxIdBytes) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= 0x20 && c < 0x7F; });
}

// `bytes` random bytes as hex, from the kernel's CSPRNG (keys, nonces).
inline std::string RandomHex(size_t bytes) {
  std::random_device rd;
  static const char* kHex = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < bytes; ++i) {
    const unsigned v = rd() & 0xFF;
    out.push_back(kHex[v >> 4]);
    out.push_back(kHex[v & 15]);
  }
  return out;
}

inline uint64_t PageUp(uint64_t v) { return (v + PageSize() - 1) / PageSize() * PageSize(); }

}  // namespace tailorkv::kvhost
