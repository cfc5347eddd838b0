#include "common/grpc_status.h"

#include <gtest/gtest.h>

namespace tailorkv::common {
namespace {

TEST(GrpcStatusTest, OkStaysOk) { EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok()); }

TEST(GrpcStatusTest, KeepsCodeAndMessage) {
  struct Case {
    absl::Status in;
    grpc::StatusCode code;
  };
  const Case cases[] = {
      {absl::InvalidArgumentError("sampling.top_p: must be in (0, 1]"),
       grpc::StatusCode::INVALID_ARGUMENT},
      {absl::ResourceExhaustedError("queue full"), grpc::StatusCode::RESOURCE_EXHAUSTED},
      {absl::UnavailableError("draining"), grpc::StatusCode::UNAVAILABLE},
      {absl::FailedPreconditionError("plan digest"), grpc::StatusCode::FAILED_PRECONDITION},
      {absl::CancelledError("c"), grpc::StatusCode::CANCELLED},
      {absl::DeadlineExceededError("d"), grpc::StatusCode::DEADLINE_EXCEEDED},
      {absl::NotFoundError("n"), grpc::StatusCode::NOT_FOUND},
      {absl::AlreadyExistsError("a"), grpc::StatusCode::ALREADY_EXISTS},
      {absl::InternalError("i"), grpc::StatusCode::INTERNAL},
      {absl::UnimplementedError("u"), grpc::StatusCode::UNIMPLEMENTED},
      {absl::UnauthenticatedError("auth"), grpc::StatusCode::UNAUTHENTICATED},
      {absl::PermissionDeniedError("p"), grpc::StatusCode::PERMISSION_DENIED},
  };
  for (const Case& c : cases) {
    const grpc::Status out = ToGrpcStatus(c.in);
    EXPECT_EQ(out.error_code(), c.code) << c.in;
    EXPECT_EQ(out.error_message(), c.in.message()) << c.in;
  }
}

TEST(GrpcStatusTest, UnknownAbslCodeBecomesUnknown) {
  const absl::Status odd(static_cast<absl::StatusCode>(42), "odd");
  const grpc::Status out = ToGrpcStatus(odd);
  EXPECT_EQ(out.error_code(), grpc::StatusCode::UNKNOWN);
  EXPECT_EQ(out.error_message(), "odd");
}

}  // namespace
}  // namespace tailorkv::common
