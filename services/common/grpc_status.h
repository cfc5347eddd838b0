// The one place where absl::Status becomes grpc::Status (the RPC edge).
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace tailorkv::common {

// Same code (the two enums share their numbering), same message. Payloads
// are dropped: nothing in tailorkv attaches them.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace tailorkv::common
