// ProfilerService: tailorkv.v1.Profiler over a ProfileRunner and a PlanStore.
//
// Profile runs on the calling RPC's thread, one at a time (a second caller
// gets RESOURCE_EXHAUSTED: a profile holds a whole model and, with CUDA, the
// GPU). Progress messages are throttled to one per stage change or 200 ms.
// The call's cancellation and deadline are checked at every progress point
// (each prefill chunk and layer); on any error nothing is stored. A finished
// plan is stored (atomically, plan_store.h) before the last message, which
// carries it with its plot.
#pragma once

#include <atomic>
#include <string>

#include "profiler/plan_store.h"
#include "profiler/profile_runner.h"
#include "tailorkv/v1/profiler.grpc.pb.h"

namespace tailorkv::profiler {

class ProfilerService final : public v1::Profiler::Service {
 public:
  // `store` must outlive the service.
  ProfilerService(RunnerOptions options, PlanStore* store);

  grpc::Status Profile(grpc::ServerContext* context, const v1::ProfileRequest* request,
                       grpc::ServerWriter<v1::ProfileProgress>* writer) override;
  grpc::Status GetPlan(grpc::ServerContext* context, const v1::GetPlanRequest* request,
                       v1::Plan* response) override;
  grpc::Status ListPlans(grpc::ServerContext* context, const v1::ListPlansRequest* request,
                         v1::ListPlansResponse* response) override;

  // Prometheus text: profiles running (0/1), finished / failed counters,
  // the last profile's seconds, plans in the store. Thread-safe.
  std::string PrometheusText() const;

 private:
  RunnerOptions options_;
  PlanStore* store_;
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> profiles_done_{0}, profiles_failed_{0};
  std::atomic<double> last_profile_seconds_{0};
};

// The request as the runner takes it (unset settings take PlanSettings'
// defaults); InvalidArgument naming the field for negative values.
absl::StatusOr<ProfileSpec> SpecFromRequest(const v1::ProfileRequest& request);

// The plan id of a plan document: "p" and the first 20 hex digits of its
// checksum, so the same inputs give the same id.
std::string PlanIdFor(const std::string& checksum);

// A stored plan as the API shows it (scores read from its JSON).
absl::StatusOr<v1::Plan> PlanToProto(const StoredPlan& stored, bool with_plot);

}  // namespace tailorkv::profiler
