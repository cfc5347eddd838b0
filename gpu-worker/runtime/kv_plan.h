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
//   sparse - TailorKV's sparsity-friendly layers: the prompt's K/V in a
//            host tier; on the device the sink + recent prompt rows, every
//            generated token and the per-channel max|K|; each decode step
//            attends over those plus the Top-K prompt tokens picked by a
//            few critical channels, by TailorKV's own index ("faithful")
//            or a GPU-resident one ("gpu"); runtime/cpu_backend.h has the
//            exact semantics, both backends run both.
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
//       "channels": 8, "index": "gpu", "host_bits": 16},
//      ...],
//    "profile": {...},                              (optional, the profiler's own record)
//    "checksum": "sha256:<64 hex>"}                 (optional)
// Omitted policy parameters take the defaults below. Each layer entry may
// also carry the profiler's measurements "dense_preference", "sparse_error"
// and "quant_error" (numbers >= 0); any other unknown key is an error (typos
// must not silently fall back to defaults).
// "model" may also carry "digest" ("sha256:<hex>" of the model file, see
// common/sha256.h): the plan is then for that model only (CheckPlanModel).
// "checksum" is the SHA-256 of the document without it, in nlohmann::json's
// canonical dump (keys sorted, no spaces), so it survives reformatting but
// not a changed value; when present it must match.
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

// Positions per quantization block of a 4-bit index (SparseParams).
inline constexpr int kIndexBlock = 64;

struct SparseParams {
  int sink = 8;        // >= 0
  int recent = 56;     // >= 1
  int top_k = 128;     // >= 1
  int channels = 8;    // critical channels d_s, 1 .. head_dim
  std::string index = "gpu";  // "gpu" (GPU-resident index) or "faithful" (TailorKV's)
  // Bits per value of the host tier: 16 (the backend's full precision) or 8
  // (FP8 E4M3, runtime/fp8_reference.h: half the host memory and PCIe bytes;
  // the CPU backend keeps the rounded values in fp32).
  int host_bits = 16;
  // Bits per entry of index "gpu": 16 (bf16); 8 (FP8 E4M3, half the index's
  // GPU memory and read time); or 4: KIVI's key quantization, per channel
  // over blocks of kIndexBlock positions (block b holds positions [64 b,
  // 64 b + 64) of the prompt): z = bf16(min), step = bf16((max - z) / 15),
  // entry = z + clamp(round_half_even((k - z) / step), 0, 15) * step (z when
  // step is 0); a quarter of bf16's bytes plus 4 bytes a channel and block.
  // The CPU backend keeps the rounded values. Index "faithful" has no index:
  // 16 only. The CUDA kernels for 4 (sparse_int4_index_kernels.cuh) take a
  // bf16 host tier only.
  int index_bits = 16;
  // The query that scores index "gpu" at a decode step:
  //   "previous"        TailorKV's speculation: the layer's Wq on the
  //                     previous layer's normalized input (the selection
  //                     overlaps the whole previous layer on the GPU);
  //   "after-attention" the layer's own RMSNorm and Wq on the residual stream
  //                     after the previous layer's attention (only that
  //                     layer's MLP is missing; the selection overlaps it);
  //   "real"            the real query (nothing overlaps the selection).
  // Layer 0, having no previous layer, speculates from its own input under
  // "previous" and "after-attention".
  // Index "faithful" always uses the real query: "previous" only.
  std::string query = "previous";
  // How index "gpu" scores a token for a KV head shared by G query heads:
  // "mean", the group-mean query's score (TailorKV's), or "max", the
  // largest of the G heads' own scores (a token one head needs is kept even
  // when the others ignore it). "max" runs on the CPU backend only so far.
  std::string group_score = "mean";
  // Query "after-attention" or "real" only: when > 0, the final Top-K is
  // taken among the Top-(refine x top_k) candidates of TailorKV's
  // speculative query (the previous layer's input), so the later query
  // scores only those. 0: among every candidate. The CUDA backend refuses
  // it with query "real" (the pool comes from the previous layer's input).
  int refine = 0;
  bool operator==(const SparseParams&) const = default;
};

struct LayerKvPolicy {
  KvPolicyKind kind = KvPolicyKind::kDense;
  QuantParams quant;    // used when kind == kQuant
  WindowParams window;  // used when kind == kWindow
  SparseParams sparse;  // used when kind == kSparse
  // The profiler's measurements when known, else < 0 (not part of the policy).
  double dense_preference = -1;
  double sparse_error = -1;
  double quant_error = -1;
  bool operator==(const LayerKvPolicy&) const = default;
};

struct KvPlan {
  static constexpr int kVersion = 1;
  std::string name;
  std::vector<LayerKvPolicy> layers;  // one per model layer, in order
  std::string model_digest;           // "sha256:<hex>" of the model it was made for; "" = any
  std::string profile_json;           // the "profile" block as compact JSON; "" = none
  bool operator==(const KvPlan&) const = default;

  static KvPlan Dense(int n_layers);
  static KvPlan Uniform(int n_layers, const LayerKvPolicy& policy, std::string name);

  bool all_dense() const;
  // Layers per distinct policy (with its parameters), in order of first
  // appearance, e.g. "quant(1b g64 r128) x1, dense x29",
  // "window(4+1020) x30", "sparse(8+56 k128 d8 gpu) x2, dense x28".
  std::string Summary() const;

  // OK when the plan has exactly config.n_layers layers and every parameter
  // is in range for this model (group divides head_dim, ...).
  // InvalidArgument naming the layer and field otherwise.
  absl::Status Validate(const model::ModelConfig& config) const;
};

// Parses and validates a version-1 plan (see above). The "model" block must
// match `config`; "format", "version", "model" and "layers" are required;
// each layer entry needs "layer" (== its index) and "policy", and may carry
// only that policy's parameters and "dense_preference". Every error is
// InvalidArgument naming the field ("layers[3].bits: ...", "model.head_dim:
// ..."); text that is not JSON gives the parser's line and column.
absl::StatusOr<KvPlan> ParseKvPlanJson(std::string_view json, const model::ModelConfig& config);
// The same for a file; every error message starts with the path (NotFound
// when it cannot be opened).
absl::StatusOr<KvPlan> LoadKvPlanFile(const std::string& path, const model::ModelConfig& config);
// The JSON form, parseable by ParseKvPlanJson for the same model into an
// equal plan (every parameter is written, defaults included), with its
// checksum. The same plan always gives the same bytes.
std::string KvPlanToJson(const KvPlan& plan, const model::ModelConfig& config);

// OK when `plan` was made for the model with digest `model_digest` or names
// no model; FailedPrecondition naming both digests otherwise.
absl::Status CheckPlanModel(const KvPlan& plan, std::string_view model_digest);

// Short specs for command lines and the accuracy harness:
//   "dense"
//   "quant:BITS[:GROUP[:RESIDUAL]]"          every layer quantized (KIVI-style)
//   "window:SINK:RECENT"                     every layer windowed (StreamingLLM-style)
//   "tailorkv:BITS[:LAYERS]"                 layers 0..LAYERS-1 (default 1) quantized, others dense
//   "sparse:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX][:FLAG...]"
//                                            every layer sparse; INDEX "gpu" or "faithful"
//                                            (the default); FLAGs, each at most once, in
//                                            any order: i8 / i4 (index "gpu" entries
//                                            in FP8 / 4-bit KIVI codes),
//                                            late / real (query "after-attention" /
//                                            "real"), gmax (group_score "max"), refineN
//                                            (refine N), fp8 (host tier in FP8)
//   "hybrid:BITS:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX][:FLAG...]"
//                                            TailorKV's plan: layer 0 quant BITS (group 64,
//                                            residual 128), every other layer sparse as above
//   "@path/to/plan.json"                     a plan file
// Numbers are plain decimals; omitted ones take the defaults above. The plan's
// name is the spec itself ("dense" for dense; a file's own "name"). The plan
// is validated against `config`; errors are InvalidArgument quoting the spec
// (a file's errors are LoadKvPlanFile's).
absl::StatusOr<KvPlan> ParseKvPlanSpec(std::string_view spec, const model::ModelConfig& config);

// KV memory one layer of a sequence holds, by where it lives.
struct LayerKvBytes {
  KvPolicyKind kind = KvPolicyKind::kDense;
  int64_t device_bytes = 0;  // GPU memory (on the CPU backend: the cache's own memory)
  int64_t host_bytes = 0;    // host memory outside the device tier (sparse layers' store)
  int64_t total() const { return device_bytes + host_bytes; }
};

// The KV memory per layer that one sequence of `capacity` tokens made with
// `plan` holds, computed without allocating anything; `elem_bytes` is the
// backend's full-precision element (4 on the CPU, 2 on the GPU). Matches
// SequenceState::kv_bytes() of the backends:
//   dense  2 * n_kv_heads * capacity * head_dim * elem
//   quant  QuantShape::Bytes(elem) (codes, params and both residual rings)
//   window 2 * n_kv_heads * min(capacity, sink + recent) * head_dim * elem
//   sparse host: 2 * n_kv_heads * capacity * head_dim * host elem (elem, or 1
//          byte for host_bits 8) (the prompt's
//          K/V, reserved for a prompt as long as the capacity); device:
//          2 * n_kv_heads * min(capacity, sink + recent) * head_dim * elem
//          + n_kv_heads * head_dim * elem (max|K|), plus for index "gpu"
//          a `channels`-wide key index of every token,
//          n_kv_heads * channels * capacity * elem. This is what a sequence
//          holds when made; when its prompt (P tokens) ends, the device tier
//          also reserves its generated rows, 2 * n_kv_heads * (capacity - P)
//          * head_dim * elem, which no estimate without P can include.
std::vector<LayerKvBytes> EstimateKvBytes(const KvPlan& plan, const model::ModelConfig& config,
                                          int capacity, int elem_bytes);

// KV memory of all layers of one policy kind.
struct PolicyKvBytes {
  KvPolicyKind kind = KvPolicyKind::kDense;
  int layers = 0;
  int64_t device_bytes = 0;
  int64_t host_bytes = 0;
};
// Sums per policy kind, in order of first appearance.
std::vector<PolicyKvBytes> SumKvBytesByPolicy(const std::vector<LayerKvBytes>& layers);

}  // namespace tailorkv::runtime
