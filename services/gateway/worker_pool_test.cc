// WorkerPool against in-process fake workers (real gRPC servers on loopback):
// the least loaded ready worker is chosen, requests in flight spread a burst
// before the next poll, a draining or stopped worker leaves the rotation and
// comes back when it answers again, exclusion and MarkFailed work, and the
// model's name comes from the worker's file name.
#include "gateway/worker_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <memory>

#include "absl/synchronization/mutex.h"
#include "common/grpc_server.h"

namespace tailorkv::gateway {
namespace {

namespace v1 = tailorkv::v1;

class FakeWorker final : public v1::Generation::Service {
 public:
  grpc::Status GetLoad(grpc::ServerContext*, const v1::GetLoadRequest*, v1::Load* out) override {
    absl::MutexLock lock(&mu_);
    out->set_active_requests(active_);
    out->set_draining(draining_);
    return grpc::Status::OK;
  }
  grpc::Status GetModelInfo(grpc::ServerContext*, const v1::GetModelInfoRequest*, v1::ModelInfo* out) override {
    out->set_model_path("/models/Fake-1B.Q4_1.gguf");
    out->set_name("Fake One B");
    return grpc::Status::OK;
  }
  void Set(int active, bool draining) {
    absl::MutexLock lock(&mu_);
    active_ = active;
    draining_ = draining;
  }

 private:
  absl::Mutex mu_;
  int active_ = 0;
  bool draining_ = false;
};

struct Fake {
  FakeWorker service;
  std::unique_ptr<common::GrpcServer> server;
  std::string address;
};

std::unique_ptr<Fake> StartFake() {
  auto f = std::make_unique<Fake>();
  common::ServerOptions o;
  o.listen_address = "127.0.0.1:0";
  auto s = common::GrpcServer::Start(o, {{v1::Generation::service_full_name(), &f->service}});
  EXPECT_TRUE(s.ok()) << s.status();
  if (!s.ok()) return nullptr;
  f->server = std::move(*s);
  f->address = "127.0.0.1:" + std::to_string(f->server->port());
  return f;
}

WorkerPoolOptions Fast(std::vector<std::string> workers) {
  WorkerPoolOptions o;
  o.workers = std::move(workers);
  o.poll_interval = absl::Milliseconds(50);
  o.probe_timeout = absl::Milliseconds(300);
  return o;
}

bool WaitFor(const std::function<bool()>& cond) {
  for (int i = 0; i < 200; ++i) {
    if (cond()) return true;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return false;
}

TEST(WorkerPool, ChoosesTheLeastLoadedAndSpreadsABurst) {
  auto a = StartFake();
  auto b = StartFake();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  a->service.Set(3, false);
  b->service.Set(0, false);
  auto pool = WorkerPool::Create(Fast({a->address, b->address}));
  ASSERT_TRUE(pool.ok()) << pool.status();
  ASSERT_TRUE(WaitFor([&] { return (*pool)->ready_count() == 2; }));
  EXPECT_EQ((*pool)->model_name(), "Fake-1B.Q4_1");
  // b has 0 running, a 3: b first; each pick counts in flight, so a burst
  // of 6 reaches a too (a: 3 running, b: 3 picked) before any poll.
  auto first = (*pool)->Choose();
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->address, b->address);
  int to_a = 0;
  std::vector<int> picked = {first->index};
  for (int i = 0; i < 5; ++i) {
    auto c = (*pool)->Choose();
    ASSERT_TRUE(c.ok());
    to_a += c->address == a->address;
    picked.push_back(c->index);
  }
  EXPECT_GE(to_a, 1);
  for (int i : picked) (*pool)->Done(i);
  // Excluding the only ready choice leaves none.
  auto none = (*pool)->Choose({0, 1});
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(std::string(none.status().message()).find("excluded"), std::string::npos) << none.status();
}

TEST(WorkerPool, DrainingOrDeadWorkersLeaveTheRotationAndComeBack) {
  auto a = StartFake();
  auto b = StartFake();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  auto pool = WorkerPool::Create(Fast({a->address, b->address}));
  ASSERT_TRUE(pool.ok()) << pool.status();
  ASSERT_TRUE(WaitFor([&] { return (*pool)->ready_count() == 2; }));
  a->service.Set(0, /*draining=*/true);
  ASSERT_TRUE(WaitFor([&] { return (*pool)->ready_count() == 1; }));
  for (int i = 0; i < 4; ++i) {
    auto c = (*pool)->Choose();
    ASSERT_TRUE(c.ok());
    EXPECT_EQ(c->address, b->address);
    (*pool)->Done(c->index);
  }
  a->service.Set(0, false);
  ASSERT_TRUE(WaitFor([&] { return (*pool)->ready_count() == 2; }));
  // MarkFailed takes a worker out until its next answered poll.
  (*pool)->MarkFailed(1);
  EXPECT_EQ((*pool)->ready_count(), 1);
  ASSERT_TRUE(WaitFor([&] { return (*pool)->ready_count() == 2; }));
  // A stopped worker leaves the rotation.
  b->server.reset();
  ASSERT_TRUE(WaitFor([&] { return (*pool)->ready_count() == 1; }));
  const auto states = (*pool)->states();
  EXPECT_FALSE(states[1].ready);
  EXPECT_FALSE(states[1].last_error.empty());
  a->server.reset();
  ASSERT_TRUE(WaitFor([&] { return (*pool)->ready_count() == 0; }));
  EXPECT_EQ((*pool)->Choose().status().code(), absl::StatusCode::kUnavailable);
}

TEST(WorkerPool, RefusesBadWorkerLists) {
  EXPECT_EQ(WorkerPool::Create(Fast({})).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WorkerPool::Create(Fast({"127.0.0.1:1", "127.0.0.1:1"})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WorkerPool::Create(Fast({""})).status().code(), absl::StatusCode::kInvalidArgument);
  WorkerPoolOptions bad = Fast({"127.0.0.1:1"});
  bad.tls_ca_file = "/nonexistent/ca.pem";
  EXPECT_EQ(WorkerPool::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tailorkv::gateway
