// CudaBackend: the Backend on an NVIDIA GPU. Weights are converted to bf16
// at load and live in device memory; GEMMs run through cuBLAS (bf16 inputs,
// fp32 accumulation); the residual stream stays fp32; the KV cache is bf16.
// Prefill uses the flash-attention kernel; each decode step is captured once
// per sequence capacity as a CUDA graph and replayed, reading its position
// from device memory. No allocation happens inside a step.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "runtime/backend.h"

namespace tailorkv::cuda {

struct CudaBackendOptions {
  int device = 0;
  bool use_graphs = true;  // capture decode steps as CUDA graphs
  int max_prefill_chunk = 8192;  // tokens per prefill pass (bounds activation memory)
};

// Unavailable when no CUDA device exists.
absl::StatusOr<std::unique_ptr<runtime::Backend>> CreateCudaBackend(
    const model::ModelWeights& weights, const CudaBackendOptions& options);

}  // namespace tailorkv::cuda
