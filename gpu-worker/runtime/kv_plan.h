// KvPlan: how each layer of a model keeps its KV cache (the "layer plan").
//
// A plan lists every layer once with a policy and that policy's parameters:
//   dense  - bf16 (GPU) / fp32 (CPU) K and V of every token.
//   quant  - KIVI-style asymmetric b-bit codes (K per channel, groups along
//            tokens; V per token, groups along channels) plus a
//            full-precision residual of the most recent tokens
//            (runtime/quant_kv.h has the exact format).
//   window - StreamingLLM-style: the first `sink` tokens and the most recent
//            `recent` tokens; every other token is dropped.
//   sparse - TailorKV's sparsity-friendly layers (host-resident KV, Top-K
//            gathers). Parsed and validated here; backends answer
//            Unimplemented until that policy exists.
// The profiler service produces plans in the JSON form below; the worker and
// the accuracy harness load them. A plan that is wrong anywhere is rejected
// whole, and the error names the layer and the field.
//
// JSON (version 1):
//   {"format": "tailorkv.kv_plan", "version": 1,
//    "name": "tailorkv-1bit",                       (optional, free text)
//    "model": {"n_layers": 30, "n_kv_heads": 3, "head_dim": 64},
//    "layers": [
//      {"layer": 0, "policy": "quant", "bits": 1, "group": 64, "residual": 128},
//      {"layer": 1, "policy": "dense"},
//      {"layer": 2, "policy": "window", "sink": 4, "recent": 1020},
//      {"layer": 3, "policy": "sparse", "sink": 8, "recent": 56, "top_k": 128,
//       "channels": 8, "index": "gpu"},
//      ...],
//    "profile": {...}}                              (optional, the profiler's own record)
// Omitted policy parameters take the defaults below. Each layer entry may
// also carry "dense_preference" (a number, the profiler's score); any other
// unknown key is an error (typos must not silently fall back to defaults).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "model/llama_weights.h"

namespace tailorkv::runtime {

enum class KvPolicyKind { kDense, kQuant, kWindow, kSparse };

std::string_view KvPolicyName(KvPolicyKind kind);  // "dense", "quant", "window", "sparse"

struct QuantParams {
  int bits = 1;        // 1, 2 or 4
  int group = 64;      // 32, 64 or 128 (tokens per K group, channels per V group); divides head_dim
  int residual = 128;  // multiple of group, <= 4096
  bool operator==(const QuantParams&) const = default;
};

struct WindowParams {
  int sink = 4;       // >= 0
  int recent = 1020;  // >= 1
  bool operator==(const WindowParams&) const = default;
};

struct SparseParams {
  int sink = 8;        // >= 0
  int recent = 56;     // >= 1
  int top_k = 128;     // >= 1
  int channels = 8;    // critical channels d_s, 1 .. head_dim
  std::string index = "gpu";  // "gpu" (GPU-resident index) or "faithful" (TailorKV's)
  bool operator==(const SparseParams&) const = default;
};

struct LayerKvPolicy {
  KvPolicyKind kind = KvPolicyKind::kDense;
  QuantParams quant;    // used when kind == kQuant
  WindowParams window;  // used when kind == kWindow
  SparseParams sparse;  // used when kind == kSparse
  double dense_preference = -1;  // the profiler's score when known, else < 0
  bool operator==(const LayerKvPolicy&) const = default;
};

struct KvPlan {
  static constexpr int kVersion = 1;
  std::string name;
  std::vector<LayerKvPolicy> layers;  // one per model layer, in order

  static KvPlan Dense(int n_layers);
  static KvPlan Uniform(int n_layers, const LayerKvPolicy& policy, std::string name);

  bool all_dense() const;
  // Layers per policy kind, e.g. "quant(1b) x1, dense x29".
  std::string Summary() const;

  // OK when the plan has exactly config.n_layers layers and every parameter
  // is in range for this model (group divides head_dim, ...).
  // InvalidArgument naming the layer and field otherwise.
  absl::Status Validate(const model::ModelConfig& config) const;
};

// Parses and validates a version-1 plan (see above). The "model" block must
// match `config`.
absl::StatusOr<KvPlan> ParseKvPlanJson(std::string_view json, const model::ModelConfig& config);
absl::StatusOr<KvPlan> LoadKvPlanFile(const std::string& path, const model::ModelConfig& config);
// The JSON form, parseable by ParseKvPlanJson for the same model.
std::string KvPlanToJson(const KvPlan& plan, const model::ModelConfig& config);

// Short specs for command lines and the accuracy harness:
//   "dense"
//   "quant:BITS[:GROUP[:RESIDUAL]]"          every layer quantized (KIVI-style)
//   "window:SINK:RECENT"                     every layer windowed (StreamingLLM-style)
//   "tailorkv:BITS[:LAYERS]"                 layers 0..LAYERS-1 (default 1) quantized, others dense
//   "@path/to/plan.json"                     a plan file
absl::StatusOr<KvPlan> ParseKvPlanSpec(std::string_view spec, const model::ModelConfig& config);

// KV memory one layer of a sequence holds, by where it lives.
struct LayerKvBytes {
  KvPolicyKind kind = KvPolicyKind::kDense;
  int64_t device_bytes = 0;  // GPU memory (on the CPU backend: the cache's own memory)
  int64_t host_bytes = 0;    // host memory outside the device tier (sparse layers' store)
};

}  // namespace tailorkv::runtime
