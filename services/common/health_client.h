// Client side of grpc.health.v1: what `tailorkv-cli health` and the tests use
// (Debian has no grpc_health_probe).
#pragma once

#include <memory>
#include <string>

#include <grpcpp/channel.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpc/health/v1/health.pb.h"

namespace tailorkv::common {

using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

// One Check call. The RPC's failure (UNAVAILABLE when nothing listens,
// NOT_FOUND for an unknown service, DEADLINE_EXCEEDED) comes back as the
// matching absl status, with the server's message.
absl::StatusOr<ServingStatus> CheckHealth(const std::shared_ptr<grpc::Channel>& channel,
                                          const std::string& service, absl::Duration timeout);

// Checks until SERVING or until `wait` has passed (polling every 100 ms);
// returns the last status or error. wait = 0 means one check.
absl::StatusOr<ServingStatus> WaitForServing(const std::shared_ptr<grpc::Channel>& channel,
                                             const std::string& service, absl::Duration wait);

}  // namespace tailorkv::common
