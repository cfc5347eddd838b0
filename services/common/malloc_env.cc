#include "common/malloc_env.h"

#include <cstdlib>
#include <initializer_list>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace tailorkv {

void BoundMallocCaching() {
#if defined(__GLIBC__)
  for (const char* name : {"MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"}) {
    if (std::getenv(name) != nullptr) return;  // the user's tuning is kept
  }
  mallopt(M_ARENA_MAX, kMallocArenaMax);
  mallopt(M_MMAP_THRESHOLD, kMallocMmapThresholdBytes);
#endif
}

}  // namespace tailorkv
