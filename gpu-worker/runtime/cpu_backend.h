// CpuBackend: the reference implementation of Backend, float32 weights,
// OpenBLAS GEMMs and OpenMP threads. It is the default where no GPU exists
// and the reference the CUDA backend is tested against.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "runtime/backend.h"

namespace tailorkv::runtime {

struct CpuBackendOptions {
  int threads = 0;  // 0 = all cores
};

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(model::ModelWeights weights,
                                                          const CpuBackendOptions& options);

}  // namespace tailorkv::runtime
