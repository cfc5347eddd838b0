// Placeholder for tailorkv.v1.Profiler until the profiler server lands:
// every RPC answers UNIMPLEMENTED with a message naming it. Stateless;
// thread-safe.
#pragma once

#include "tailorkv/v1/profiler.grpc.pb.h"

namespace tailorkv::profiler {

class ProfilerPlaceholderService final : public v1::Profiler::Service {
 public:
  grpc::Status Profile(grpc::ServerContext*, const v1::ProfileRequest*,
                       grpc::ServerWriter<v1::ProfileProgress>*) override;
  grpc::Status GetPlan(grpc::ServerContext*, const v1::GetPlanRequest*, v1::Plan*) override;
  grpc::Status ListPlans(grpc::ServerContext*, const v1::ListPlansRequest*,
                         v1::ListPlansResponse*) override;
};

}  // namespace tailorkv::profiler
