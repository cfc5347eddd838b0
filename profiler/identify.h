// Layer identification: what the profiler measures on one layer of a model
// from a full-attention prefill of calibration text (a Backend::LayerTap),
// and the plan it decides from those measurements.
//
// Per layer, with n keys and the last Q = query_rows queries (post-RoPE):
//   dense preference  TailorKV's score, as its reference computes it: per
//       query head and row, fp32 softmax of q.k / sqrt(head_dim) over all n
//       keys (no causal mask), the mass outside the row's top floor(0.05 n)
//       probabilities; the mean over rows, then over heads. > threshold
//       (0.2) means quantization-friendly.
//   measured errors   the runtime's own policies replayed on this layer: the
//       first P = n - Q tokens are the prompt, the last Q are decode steps
//       (generated tokens, each attending over the prompt and the generated
//       tokens before it and itself). Per step and query head, the relative
//       L2 error ||o - o_full|| / ||o_full|| of the attention output against
//       full-precision causal attention, averaged over steps and heads:
//         quant_error   QuantKvCpu (runtime/quant_kv.h) packed with the
//                       prompt, each step appended, its fused decode attention;
//         sparse_error  sink + recent prompt rows + the Top-K prompt rows the
//                       plan's index picks + the generated rows (as the CPU
//                       backend's sparse layer): "faithful" picks channels per
//                       step from the real query; "gpu" fixes them from the
//                       first step's query (the runtime fixes them from the
//                       last prompt token's, which the tap does not hold) and,
//                       unlike the runtime, scores with the real query, not the
//                       speculative one;
//         sparse_oracle_error  the same with the exact Top-K (full q.k of the
//                       group-mean query), so budget and index are told apart;
//         index_recall  |index's Top-K ∩ exact Top-K| / K, averaged.
// Everything is computed on the CPU in a fixed order (parallel only across
// independent heads), so the same tap gives the same numbers.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/llama_weights.h"
#include "runtime/backend.h"
#include "runtime/kv_plan.h"

namespace tailorkv::profiler {

// What the profiler plans with (proto ProfileSettings). Defaults are
// TailorKV's long-context budget (its RULER / InfiniteBench setting: 64 sink
// + 64 recent + Top-896) with 2-bit quantized layers and 32 critical
// channels. Measured on SmolLM2 (docs/results.md, "Retrieval and speed per
// plan"): TailorKV-1's LongBench plan (1 bit, 192 tokens, 8 channels)
// forgets 27 of 48 facts that dense keeps, 192 tokens at 32 channels 3 of
// 48, this budget none.
struct PlanSettings {
  int quant_bits = 2;
  int quant_group = 64;
  int quant_residual = 128;
  int sink = 64;
  int recent = 64;
  int top_k = 896;
  int channels = 32;
  std::string index = "gpu";
  // Index "gpu" only: bits per index entry (8: FP8, half the GPU memory of
  // 16) and the query that scores it (runtime/kv_plan.h SparseParams).
  int index_bits = 8;
  std::string query = "after-attention";
  double threshold = 0.2;
  int query_rows = 32;
  int max_quant_layers = -1;  // < 0: no limit
  // Per-layer choices (both off when < 0): a quantized layer gets the fewest
  // bits of {quant_bits, 2, 4} (>= quant_bits) whose measured error is at
  // most max_quant_error; a sparse layer the fewest channels of {channels,
  // 2x, 4x, ... <= max_channels (0 = 4 x channels)} whose index recall is at
  // least min_index_recall. The last candidate when none qualifies.
  double max_quant_error = -1;
  double min_index_recall = -1;
  int max_channels = 0;
  // Per-layer budgets (off when < 0): a sparse layer gets the fewest Top-K
  // tokens of {top_k / 4, top_k / 2, top_k, 2 top_k, 4 top_k, ... <=
  // max_top_k (0 = 4 x top_k)} whose measured attention-output error (at
  // `channels`, the first channel candidate) is at most max_sparse_error;
  // the largest candidate when none qualifies. Candidates the calibration
  // cannot measure (budget + query_rows >= its tokens) are left out.
  double max_sparse_error = -1;
  int max_top_k = 0;
  // A measurement only (the plan does not change): the index at `channels`
  // and top_k with its entries stored as bf16 (the runtime's), FP8 E4M3, or
  // 4-bit codes with one scale per token and head (symmetric, max |x| / 7),
  // and 4-bit codes of every channel; recorded as by_index_format.
  bool index_study = false;
};

// The candidate widths a profile measures under these settings.
std::vector<int> ChannelCandidates(const PlanSettings& s, int head_dim);
std::vector<int> BitCandidates(const PlanSettings& s);
// Ascending; {top_k} when per-layer budgets are off.
std::vector<int> TopKCandidates(const PlanSettings& s, int calibration_tokens);

// InvalidArgument naming the field ("settings.top_k: ...") when a setting is
// out of range for this model, or when `calibration_tokens` cannot measure
// it: the calibration must exceed query_rows plus the sparse layers' budget
// (sink + recent + top_k), or Top-K would select everything and measure
// nothing.
absl::Status ValidatePlanSettings(const PlanSettings& s, const model::ModelConfig& config,
                                  int calibration_tokens);

struct LayerScores {
  int layer = 0;
  double dense_preference = 0;
  std::vector<double> head_preference;  // per query head
  double sparse_error = 0;
  double sparse_oracle_error = 0;
  double quant_error = 0;   // at settings.quant_bits
  double index_recall = 0;  // at settings.channels
  struct ByChannels {
    int channels = 0;
    double sparse_error = 0;
    double recall = 0;
  };
  struct ByBits {
    int bits = 0;
    double quant_error = 0;
  };
  struct ByTopK {
    int top_k = 0;
    double sparse_error = 0;  // the index at settings.channels
    double oracle_error = 0;  // the exact Top-K
  };
  std::vector<ByChannels> by_channels;  // ChannelCandidates order
  std::vector<ByBits> by_bits;          // BitCandidates order
  std::vector<ByTopK> by_top_k;         // TopKCandidates order
  struct ByIndexFormat {
    std::string format;   // "bf16", "fp8", "int4", "int4-all"
    int channels = 0;
    double bytes_per_token = 0;  // per KV head, scales included
    double recall = 0;
    double sparse_error = 0;
  };
  std::vector<ByIndexFormat> by_index_format;  // with PlanSettings::index_study
};

// Measures one layer (see above). The tap must hold the last
// settings.query_rows queries of a full-attention prefill (first_query +
// n_queries == n_keys); settings must be valid for this calibration.
absl::StatusOr<LayerScores> ScoreLayer(const runtime::Backend::LayerTap& tap,
                                       const model::ModelConfig& config,
                                       const PlanSettings& settings, int threads);

// The plan TailorKV's rule gives: a layer whose dense preference exceeds the
// threshold is quantized (settings' bits, group, residual), every other one
// sparse (sink, recent, top_k, channels, index); with max_quant_layers >= 0
// only that many of the highest scores are quantized (ties: lower layer).
// Bits, channels and Top-K per layer as PlanSettings says
// (max_quant_error, min_index_recall, max_sparse_error); the errors recorded
// are those at the chosen widths (a chosen budget's error is at
// settings.channels).
// Each layer carries its scores (rounded to 6 significant digits, so a plan
// does not change with the last bits of a float sum).
runtime::KvPlan DecidePlan(const std::vector<LayerScores>& scores, const PlanSettings& settings);

// Rounds to 6 significant digits (what plans record).
double RoundScore(double x);

}  // namespace tailorkv::profiler
