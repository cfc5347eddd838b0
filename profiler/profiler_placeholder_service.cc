#include "profiler_placeholder_service.h"

#include <string>

namespace tailorkv::profiler {

namespace {
grpc::Status NotYet(const char* method) {
  return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                      std::string("tailorkv.v1.Profiler/") + method +
                          " is not implemented yet in this profiler build");
}
}  // namespace

grpc::Status ProfilerPlaceholderService::Profile(grpc::ServerContext*, const v1::ProfileRequest*,
                                                 grpc::ServerWriter<v1::ProfileProgress>*) {
  return NotYet("Profile");
}
grpc::Status ProfilerPlaceholderService::GetPlan(grpc::ServerContext*, const v1::GetPlanRequest*,
                                                 v1::Plan*) {
  return NotYet("GetPlan");
}
grpc::Status ProfilerPlaceholderService::ListPlans(grpc::ServerContext*,
                                                   const v1::ListPlansRequest*,
                                                   v1::ListPlansResponse*) {
  return NotYet("ListPlans");
}

}  // namespace tailorkv::profiler
