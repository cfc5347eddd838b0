// A long-running worker's resident memory should follow what it holds, not
// the peak of what it once held. glibc's defaults work against that in a
// serving process: every thread that contends gets its own arena (up to 8 per
// core; the gRPC, caller and reservation threads come and go), and freed
// chunks stay cached in the arena they came from; and the threshold above
// which a buffer gets its own mapping (returned at free) rises to 32 MiB after
// the first large free, so per-request buffers then come from the heap and
// their pages stay. Measured, soak_short (SmolLM2, 2 min of mixed load,
// 2-core machine; docs/reliability.md, "Soak"): peak worker RSS under load
// 620 MiB with the defaults, 545-555 MiB with either setting alone or both;
// idle after the load 454 MiB with the defaults, 375-430 MiB otherwise. The
// growth between the run's thirds (2.5-14.4% in five runs) follows the
// load's mix more than the allocator.
#pragma once

namespace tailorkv {

inline constexpr int kMallocArenaMax = 2;
inline constexpr int kMallocMmapThresholdBytes = 1 << 20;

// Call first thing in main() of a long-running service. Unless the user set
// glibc's malloc tuning themselves (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_ or
// GLIBC_TUNABLES), caps the arenas at kMallocArenaMax and fixes the mapping
// threshold at kMallocMmapThresholdBytes. A no-op where mallopt is missing.
void BoundMallocCaching();

}  // namespace tailorkv
