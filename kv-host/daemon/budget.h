// kv-host's byte budget: how much host memory the daemon may hold for KV
// arenas at once. From --budget, which is either a size ("48G", "512M",
// "1073741824") or a fraction of the memory limit ("0.6"); the limit is the
// container's (cgroup v2 memory.max, else cgroup v1 memory.limit_in_bytes)
// or, where there is none, the machine's (MemTotal).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace tailorkv::kvhost {

struct MemoryLimit {
  uint64_t bytes = 0;
  std::string source;  // e.g. "cgroup v2 /sys/fs/cgroup/x/memory.max", "MemTotal"
};

// The memory limit seen from `root` ("/" in production; tests pass a fake
// tree with proc/self/cgroup, sys/fs/cgroup/..., proc/meminfo).
// Unlimited cgroups ("max", or v1's huge sentinel) fall through to MemTotal.
// NotFound when nothing can be read.
absl::StatusOr<MemoryLimit> DetectMemoryLimit(const std::string& root = "/");

// The budget for `spec` against `limit`, rounded down to a page multiple.
// Sizes take an optional K/M/G/T suffix (powers of 1024); fractions lie in
// (0, 1]. InvalidArgument naming "budget" for anything else, zero included.
absl::StatusOr<uint64_t> ParseBudget(const std::string& spec, uint64_t limit_bytes);

}  // namespace tailorkv::kvhost
