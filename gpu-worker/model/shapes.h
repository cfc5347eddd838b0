// Model shapes without weights: what benchmarks and the profiler's synthetic
// models (random weights generated on the GPU) are built on.
#pragma once

#include <string_view>

#include "absl/status/statusor.h"
#include "model/llama_weights.h"

namespace tailorkv::model {

// Llama-3.1-8B: 32 layers, hidden 4096, 32 query / 8 KV heads of 128,
// FFN 14336, vocab 128256, RoPE theta 500000 with llama3 scaling (factor 8);
// max_context 128k + 256.
ModelConfig Llama31_8BShape();

// The shape a synthetic model name stands for ("llama-3.1-8b"); NotFound
// listing the known names otherwise.
absl::StatusOr<ModelConfig> NamedShape(std::string_view name);

}  // namespace tailorkv::model
