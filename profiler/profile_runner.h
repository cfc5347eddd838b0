// ProfileRunner: one profile from model name to finished plan. Resolves the
// model among those the service may load, digests it, loads it on a
// backend, tokenizes the calibration text, prefills it with full attention
// in chunks, scores every layer from the last chunk's taps (identify.h),
// decides the plan and renders the plot. Stores nothing (the service and the
// CLI do).
//
// Models: a plain file name inside `models_dir` (a GGUF file; paths and
// names starting with '.' are refused so a remote caller cannot reach other
// files), or "synthetic:<shape>" (model/shapes.h; random weights on the GPU,
// needs `random_factory`, token ids as calibration).
//
// Progress goes to `progress` in stages: "digest" (bytes), "loading",
// "tokenizing", "prefill" (tokens), "layers" (layers), "plot", "done". A
// non-OK status from it stops the run between chunks or layers and is
// returned (how callers cancel and enforce deadlines).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "profiler/identify.h"
#include "runtime/backend.h"
#include "runtime/engine.h"
#include "runtime/kv_plan.h"

namespace tailorkv::profiler {

struct ProfileSpec {
  std::string model;
  std::string calibration_text;          // UTF-8; or:
  std::vector<int32_t> calibration_ids;  // token ids (exactly one of the two is non-empty)
  int max_calibration_tokens = 4096;     // the first this many tokens are used
  PlanSettings settings;
};

struct Progress {
  std::string stage;
  int64_t done = 0;
  int64_t total = 0;
};
using ProgressFn = std::function<absl::Status(const Progress&)>;

struct ProfileOutcome {
  runtime::KvPlan plan;  // with model_digest, scores and the profile block
  std::string plan_json;  // KvPlanToJson(plan): what is stored and served
  std::string model_digest;
  model::ModelConfig config;
  std::vector<LayerScores> scores;
  std::string plot_png;
  int tokens_given = 0;
  int tokens_used = 0;
  std::string backend;
  double seconds = 0;  // wall time of the whole run (not in the plan: it must be deterministic)
};

// Random-weight backends for synthetic models.
using RandomBackendFactory = std::function<absl::StatusOr<std::unique_ptr<runtime::Backend>>(
    const model::ModelConfig&, uint64_t seed)>;

struct RunnerOptions {
  std::string models_dir;
  std::string backend = "auto";  // "auto", "cpu" or "cuda"
  int threads = 0;               // CPU threads (backend and scoring); 0 = all cores
  runtime::BackendFactory cuda_factory;  // empty: no CUDA in this binary
  RandomBackendFactory random_factory;   // empty: no synthetic models
  uint64_t synthetic_seed = 1234;
};

// Checks of a spec that need no model: InvalidArgument naming the field
// (model, calibration_text, calibration_token_ids, max_calibration_tokens,
// settings.*) for an empty or malformed value.
absl::Status ValidateProfileSpec(const ProfileSpec& spec);

// Runs one profile. Errors: InvalidArgument (a field, named; too-short
// calibration; a budget not below it), NotFound (unknown model),
// FailedPrecondition (a synthetic model without a CUDA backend), and any
// status `progress` returned.
absl::StatusOr<ProfileOutcome> RunProfile(const RunnerOptions& options, const ProfileSpec& spec,
                                          const ProgressFn& progress);

}  // namespace tailorkv::profiler
