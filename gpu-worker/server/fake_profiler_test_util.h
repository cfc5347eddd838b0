// Test helper: an in-process tailorkv.v1.Profiler whose GetPlan returns a
// canned Plan (or a canned error, or answers late), behind a real gRPC
// server on an ephemeral loopback port.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/grpc_server.h"
#include "runtime/kv_plan.h"
#include "tailorkv/v1/profiler.grpc.pb.h"

namespace tailorkv::worker::testing {

class FakeProfiler final : public v1::Profiler::Service {
 public:
  void SetPlan(v1::Plan plan) {
    absl::MutexLock lock(&mu_);
    plan_ = std::move(plan);
    error_ = grpc::Status::OK;
  }
  void SetError(grpc::Status error) {
    absl::MutexLock lock(&mu_);
    error_ = std::move(error);
  }
  void SetDelay(absl::Duration delay) {
    absl::MutexLock lock(&mu_);
    delay_ = delay;
  }
  int calls() const {
    absl::MutexLock lock(&mu_);
    return calls_;
  }
  std::string last_digest() const {
    absl::MutexLock lock(&mu_);
    return last_digest_;
  }

  grpc::Status GetPlan(grpc::ServerContext* context, const v1::GetPlanRequest* request,
                       v1::Plan* response) override {
    absl::Duration delay;
    {
      absl::MutexLock lock(&mu_);
      ++calls_;
      last_digest_ = request->model_digest();
      delay = delay_;
    }
    // Answers late, but stops waiting once the caller gave up (so a drain does not wait).
    for (const absl::Time until = absl::Now() + delay;
         absl::Now() < until && !context->IsCancelled();) {
      absl::SleepFor(absl::Milliseconds(5));
    }
    absl::MutexLock lock(&mu_);
    if (!error_.ok()) return error_;
    *response = plan_;
    return grpc::Status::OK;
  }

 private:
  mutable absl::Mutex mu_;
  v1::Plan plan_;
  grpc::Status error_ = grpc::Status(grpc::StatusCode::NOT_FOUND, "no plan yet");
  absl::Duration delay_;
  int calls_ = 0;
  std::string last_digest_;
};

// The fake behind a real server; drains on destruction.
struct FakeProfilerServer {
  FakeProfiler service;
  std::unique_ptr<common::GrpcServer> server;

  void Start() {
    common::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.drain_grace_ms = 2000;
    auto started =
        common::GrpcServer::Start(options, {{v1::Profiler::service_full_name(), &service}});
    ASSERT_TRUE(started.ok()) << started.status();
    server = std::move(*started);
  }
  std::string address() const { return server->address(); }
  ~FakeProfilerServer() {
    if (server) server->Drain();
  }
};

// A Plan message as the profiler sends it: `plan_json` is KvPlanToJson of
// `plan` (checksummed), model_digest the plan's.
inline v1::Plan MakePlanMessage(const runtime::KvPlan& plan, const model::ModelConfig& config,
                                const std::string& plan_id = "plan-1") {
  v1::Plan out;
  out.set_plan_id(plan_id);
  out.set_model_digest(plan.model_digest);
  out.set_n_layers(config.n_layers);
  out.set_summary(plan.Summary());
  out.set_plan_json(runtime::KvPlanToJson(plan, config));
  return out;
}

// A loopback port nothing listens on (bound, then closed: connections to it
// are refused).
inline int UnusedLoopbackPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = 1;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

}  // namespace tailorkv::worker::testing
