// Call deadlines on the monotonic clock. A deadline computed as "wall clock
// now + timeout" (absl::Now(), std::chrono::system_clock) goes wrong when the
// wall clock steps (NTP, a resumed VM) between that reading and gRPC's own:
// the call may fail at once with DEADLINE_EXCEEDED or wait far too long.
// absl::Now() makes this likelier: it interpolates between kernel readings,
// so just after a step it can disagree with gRPC's reading by the whole
// step (seen: kv-host's CloseSession failed at once after a one-hour step,
// leaving the session held until the worker detached).
#pragma once

#include <grpc/support/time.h>
#include <grpcpp/client_context.h>
#include <grpcpp/support/time.h>

#include "absl/time/time.h"

namespace tailorkv::common {

// `context`'s deadline: `timeout` from now on CLOCK_MONOTONIC.
inline void SetCallTimeout(grpc::ClientContext& context, absl::Duration timeout) {
  context.set_deadline(gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                    gpr_time_from_nanos(absl::ToInt64Nanoseconds(timeout), GPR_TIMESPAN)));
}

}  // namespace tailorkv::common
