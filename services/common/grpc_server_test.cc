#include "common/grpc_server.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include "common/health_client.h"
#include "grpc/health/v1/health.pb.h"
#include "tailorkv/v1/kv_host.grpc.pb.h"

namespace tailorkv::common {
namespace {

using grpc::health::v1::HealthCheckResponse;

TEST(ServerOptionsTest, RejectsBadValuesNamingTheField) {
  ServerOptions o;
  EXPECT_TRUE(o.Validate().ok());
  o.listen_address = "nohostport";
  EXPECT_NE(o.Validate().message().find("listen"), std::string_view::npos);
  o = ServerOptions{};
  o.max_concurrent_streams = 0;
  EXPECT_NE(o.Validate().message().find("max_concurrent_streams"), std::string_view::npos);
}

TEST(GrpcServerTest, ServesHealthThenDrainsToNotServing) {
  tailorkv::v1::KvHost::Service service;  // generated base: every RPC UNIMPLEMENTED
  ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.drain_grace_ms = 100;
  auto server = GrpcServer::Start(options, {{"tailorkv.v1.KvHost", &service}});
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->port(), 0);

  auto channel = grpc::CreateChannel((*server)->address(), grpc::InsecureChannelCredentials());
  auto overall = CheckHealth(channel, "", absl::Seconds(5));
  ASSERT_TRUE(overall.ok()) << overall.status();
  EXPECT_EQ(*overall, HealthCheckResponse::SERVING);
  auto named = CheckHealth(channel, "tailorkv.v1.KvHost", absl::Seconds(5));
  ASSERT_TRUE(named.ok()) << named.status();
  EXPECT_EQ(*named, HealthCheckResponse::SERVING);
  auto unknown = CheckHealth(channel, "no.such.Service", absl::Seconds(5));
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);

  bool hook_ran = false;
  (*server)->AddDrainHook([&] { hook_ran = true; });
  (*server)->Drain();
  EXPECT_TRUE(hook_ran);
  (*server)->Drain();  // idempotent
  // After Shutdown nothing answers: the listener is closed.
  auto after = CheckHealth(channel, "", absl::Milliseconds(500));
  EXPECT_FALSE(after.ok());
}

TEST(GrpcServerTest, SecondServerOnTheSamePortFailsWithUnavailable) {
  tailorkv::v1::KvHost::Service a, b;
  ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  auto first = GrpcServer::Start(options, {{"tailorkv.v1.KvHost", &a}});
  ASSERT_TRUE(first.ok()) << first.status();
  options.listen_address = (*first)->address();
  auto second = GrpcServer::Start(options, {{"tailorkv.v1.KvHost", &b}});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable) << second.status();
}

}  // namespace
}  // namespace tailorkv::common
