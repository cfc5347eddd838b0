#include "common/openmp_env.h"

#include <unistd.h>

#include <cstdlib>

namespace tailorkv {

void EnsurePassiveOpenMpWait(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  setenv("OMP_WAIT_POLICY", "passive", 1);
  execv("/proc/self/exe", argv);
  // execv returned: keep running with the policy libgomp already read.
}

}  // namespace tailorkv
