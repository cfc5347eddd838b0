// The CUDA backends the profiler binaries hand to the runner (only where the
// binary is built with the CUDA backend; the profiler libraries never link CUDA).
#pragma once

#include "profiler/profile_runner.h"
#ifdef TAILORKV_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace tailorkv::profiler {

inline void AddCudaFactories(RunnerOptions& options) {
#ifdef TAILORKV_HAVE_CUDA
  options.cuda_factory = [](const model::ModelWeights& w) {
    return cuda::CreateCudaBackend(w, {});
  };
  options.random_factory = [](const model::ModelConfig& c, uint64_t seed) {
    return cuda::CreateCudaBackendWithRandomWeights(c, seed, {});
  };
#else
  (void)options;
#endif
}

}  // namespace tailorkv::profiler
