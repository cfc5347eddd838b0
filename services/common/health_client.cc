#include "common/health_client.h"

#include "common/grpc_deadline.h"

#include <grpcpp/client_context.h>

#include "absl/time/clock.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace tailorkv::common {

absl::StatusOr<ServingStatus> CheckHealth(const std::shared_ptr<grpc::Channel>& channel,
                                          const std::string& service, absl::Duration timeout) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  common::SetCallTimeout(context, timeout);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                        status.error_message());
  }
  return response.status();
}

absl::StatusOr<ServingStatus> WaitForServing(const std::shared_ptr<grpc::Channel>& channel,
                                             const std::string& service, absl::Duration wait) {
  const absl::Time end = absl::Now() + wait;
  while (true) {
    const absl::Duration left = std::max(end - absl::Now(), absl::Milliseconds(500));
    absl::StatusOr<ServingStatus> status = CheckHealth(channel, service, std::min(left, absl::Seconds(5)));
    if ((status.ok() && *status == grpc::health::v1::HealthCheckResponse::SERVING) ||
        absl::Now() >= end) {
      return status;
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
}

}  // namespace tailorkv::common
