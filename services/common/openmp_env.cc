#include "common/openmp_env.h"

#include <unistd.h>

#include <cstdlib>

namespace tailorkv {

void BoundOpenMpSpinning(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr || std::getenv("GOMP_SPINCOUNT") != nullptr) return;
  setenv("GOMP_SPINCOUNT", kOpenMpSpinCount, 1);
  execv("/proc/self/exe", argv);
  // execv returned: keep running with the spinning libgomp already read.
}

}  // namespace tailorkv
