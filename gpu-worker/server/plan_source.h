// Where the gpu-worker's layer plan comes from, and how it is checked before
// use (gpu-worker --kv-plan, --profiler, --plan-cache).
//
// Sources:
//   a spec or "@plan.json"  (runtime/kv_plan.h): parsed for the model; a plan
//       that names another model's digest is refused (FailedPrecondition),
//       one that names none (hand-written) is accepted.
//   "profiler"  the newest plan for this model's digest from the profiler's
//       GetPlan (tailorkv.v1.Profiler), with a deadline. Accepted only when
//       the response names our digest and its plan_json parses for this
//       model (checksum included) and names our digest too. Once the engine
//       has taken it (its backend can run it), the plan's JSON is written to
//       the plan cache byte for byte (CommitToCache). When the
//       profiler is unreachable, has no plan (NOT_FOUND) or sends one that is
//       refused, the cached plan is used if it parses and names this model
//       (the last good plan); else the error says what the profiler answered
//       and why the cache was not used.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "runtime/engine.h"
#include "runtime/kv_plan.h"
#include "tailorkv/v1/profiler.grpc.pb.h"

namespace tailorkv::worker {

inline constexpr char kProfilerPlanSource[] = "profiler";

struct PlanSourceOptions {
  std::string kv_plan = "dense";   // a ParseKvPlanSpec spec, "@plan.json", or "profiler"
  std::string profiler_address;    // host:port; required with "profiler", unused otherwise
  int profiler_timeout_ms = 10000; // GetPlan's deadline
  std::string plan_cache;          // file; "" = none; used with "profiler" only

  bool from_profiler() const { return kv_plan == kProfilerPlanSource; }
  // InvalidArgument naming the flag (kv-plan, profiler, profiler-timeout-ms,
  // plan-cache) when they do not fit together.
  absl::Status Validate() const;
};

// Thread-safe (Resolve may run from the reload thread while another call is
// in flight; they are serialized).
class PlanSource {
 public:
  explicit PlanSource(PlanSourceOptions options);

  // The plan for the model with `config` and `model_digest` (see the file
  // comment). `use_cache` false: a profiler failure is returned as is (a
  // reload keeps the current plan rather than going back to the cache).
  // Errors: the spec parser's (InvalidArgument, NotFound), FailedPrecondition
  // for another model's plan; from the profiler, its status code with
  // "profiler HOST:PORT: ..." and, when the cache was tried, "; plan cache
  // PATH: ..." appended.
  absl::StatusOr<runtime::KvPlan> Resolve(const model::ModelConfig& config,
                                          const std::string& model_digest, bool use_cache = true);

  // For EngineOptions::kv_plan_source. Keeps the first error it returned in
  // last_error() (main maps it to the exit code).
  runtime::KvPlanSource AsEngineSource();
  absl::Status last_error() const;

  // Writes the JSON of the plan the last Resolve took from the profiler to
  // the plan cache (common::WriteFileAtomically), once; call it when the engine has
  // taken that plan. OK doing nothing when there is no such plan or no cache.
  absl::Status CommitToCache();

  // Resolves again (use_cache false) and gives the plan to the engine
  // (SetKvPlan); on any error the engine keeps its plan and the error is
  // returned. Then CommitToCache (a failure there is logged: the plan is in
  // use already). For SIGHUP.
  absl::Status Reload(runtime::Engine& engine);

  const PlanSourceOptions& options() const { return options_; }

 private:
  absl::StatusOr<runtime::KvPlan> FromProfiler(const model::ModelConfig& config,
                                               const std::string& model_digest, bool use_cache)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const PlanSourceOptions options_;
  mutable absl::Mutex mu_;
  std::unique_ptr<v1::Profiler::Stub> stub_ ABSL_GUARDED_BY(mu_);  // made on first use
  absl::Status last_error_ ABSL_GUARDED_BY(mu_);
  std::string uncommitted_json_ ABSL_GUARDED_BY(mu_);  // accepted from the profiler, not yet cached
};

// Asks the profiler at `address` for the newest plan of `model_digest` and
// returns its plan_json once the response names that digest. Errors keep the
// RPC's code; messages start with "profiler ADDRESS: ".
absl::StatusOr<std::string> FetchProfilerPlanJson(v1::Profiler::Stub& stub,
                                                  const std::string& address,
                                                  const std::string& model_digest,
                                                  absl::Duration timeout);

// Parses `json` for `config` and accepts it only when it names `model_digest`
// (a plan from the profiler or the cache must name its model).
// InvalidArgument from the parser, FailedPrecondition for another model's
// plan or one that names none.
absl::StatusOr<runtime::KvPlan> ParsePlanForModel(std::string_view json,
                                                  const model::ModelConfig& config,
                                                  const std::string& model_digest);

}  // namespace tailorkv::worker
