// CpuBackend: the reference implementation of Backend, float32 weights,
// OpenBLAS GEMMs and OpenMP threads. It is the default where no GPU exists
// and the reference the CUDA backend is tested against.
//
// KV policies (semantics in backend.h): dense layers keep fp32 K/V of every
// position; quant layers a QuantKvCpu (fused decode attention over codes +
// fp32 residual); window layers the sink rows and a ring of the most recent
// tokens. A non-dense layer's prefill chunk attends over a full-precision
// scratch [history as stored | chunk] that is not KV memory (kv_bytes()
// leaves it out). Sparse layers: Unimplemented.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "runtime/backend.h"
#include "runtime/quant_kv.h"

namespace tailorkv::runtime {

struct CpuBackendOptions {
  int threads = 0;  // 0 = all cores
};

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(model::ModelWeights weights,
                                                          const CpuBackendOptions& options);

// The quantized store of `layer` of a sequence made by the CPU backend, for
// tests and inspection; nullptr when `seq` is not a CPU sequence or the
// layer is not quant. Valid while `seq` lives.
const QuantKvCpu* CpuQuantStore(const SequenceState& seq, int layer);

}  // namespace tailorkv::runtime
