// Placement over remote kv-host nodes (issue 17): real KvHostDataService
// nodes on loopback TCP, the worker's PlacedRemoteRows over them, the CPU
// backend admitting long sequences until no node has room. Capacity grows
// with the nodes; a node that stops answering leaves the choice and comes
// back when it answers again.
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/placed_remote_rows.h"
#include "common/grpc_server.h"
#include "daemon/data_service.h"
#include "runtime/cpu_backend.h"
#include "runtime/kv_plan.h"
#include "runtime/test_model.h"

namespace tailorkv {
namespace {

using kvhost::KvHostDataOptions;
using kvhost::KvHostDataService;

// One node: its budget counter, service and server on 127.0.0.1:0.
struct Node {
  std::atomic<uint64_t> used{0};
  uint64_t budget = 0;
  std::unique_ptr<KvHostDataService> service;
  std::unique_ptr<common::GrpcServer> server;

  void Start(uint64_t bytes, int port = 0) {
    budget = bytes;
    KvHostDataOptions o;
    o.token = "tok";
    o.budget_bytes = bytes;
    o.take_budget = [this](uint64_t b, const std::string& what) -> absl::Status {
      uint64_t u = used.load();
      do {
        if (u + b > budget) return absl::ResourceExhaustedError(absl::StrCat("budget: ", what));
      } while (!used.compare_exchange_weak(u, u + b));
      return absl::OkStatus();
    };
    o.return_budget = [this](uint64_t b) { used -= b; };
    o.free_bytes = [this] { return budget - used.load(); };
    o.arena_bytes = 1 << 20;
    o.lease = absl::Milliseconds(900);  // KeepAlive every 300 ms
    o.rows_listen = "127.0.0.1:0";
    service = *KvHostDataService::Create(std::move(o));
    common::ServerOptions so;
    so.listen_address = absl::StrCat("127.0.0.1:", port);
    so.drain_grace_ms = 50;
    server = *common::GrpcServer::Start(so, {{"tailorkv.v1.KvHostData", service.get()}});
  }
  void Stop() {
    server.reset();
    service.reset();
    used = 0;
  }
  std::string Target() const { return absl::StrCat("127.0.0.1:", server->port()); }
};

runtime::KvPlan SparsePlan() {
  runtime::LayerKvPolicy l;
  l.kind = runtime::KvPolicyKind::kSparse;
  l.sparse = {2, 5, 9, 12, "gpu"};
  return runtime::KvPlan::Uniform(3, l, "g");
}

model::ModelWeights Model() {
  return runtime::testing::TinyModel(81, model::RopeStyle::kHalves, false,
                                     {.n_layers = 3, .head_dim = 32, .hidden = 64, .ffn = 96});
}

// Sequences of `capacity` tokens admitted (held at once) before every node is full.
int Admitted(kvhost::PlacedRemoteRows& placed, int capacity,
             std::vector<std::unique_ptr<runtime::SequenceState>>* held) {
  auto backend = *runtime::CreateCpuBackend(Model(), {.threads = 1, .remote_rows = &placed});
  int n = 0;
  while (true) {
    auto seq = backend->NewSequence(capacity, SparsePlan());
    if (!seq.ok()) {
      EXPECT_EQ(seq.status().code(), absl::StatusCode::kResourceExhausted) << seq.status();
      EXPECT_NE(seq.status().message().find("every kv-host node"), std::string::npos) << seq.status();
      return n;
    }
    held->push_back(std::move(*seq));
    ++n;
  }
}

TEST(RemotePlacement, AdmittedSequencesGrowWithTheNodes) {
  // 3 layers x 2 KV heads x (K, V) x 600 rows x 32 floats: 0.92 MB a
  // sequence (the model's whole context).
  const int capacity = 600;
  const uint64_t budget = 8 << 20;
  std::vector<int> admitted;
  for (int nodes = 1; nodes <= 3; ++nodes) {
    std::vector<std::unique_ptr<Node>> ns;
    std::vector<kvhost::RemoteRowsOptions> opts;
    for (int i = 0; i < nodes; ++i) {
      ns.push_back(std::make_unique<Node>());
      ns.back()->Start(budget);
      opts.push_back({.target = ns.back()->Target(), .token = "tok", .worker_id = "w", .tls_ca_file = ""});
    }
    auto placed = kvhost::PlacedRemoteRows::Open(std::move(opts));
    ASSERT_TRUE(placed.ok()) << placed.status();
    std::vector<std::unique_ptr<runtime::SequenceState>> held;
    admitted.push_back(Admitted(**placed, capacity, &held));
    for (const auto& n : ns) EXPECT_LE(n->used.load(), budget) << "no node past its budget";
    std::printf("%d node(s) of %llu MB: %d sequences of %d tokens admitted\n", nodes,
                static_cast<unsigned long long>(budget >> 20), admitted.back(), capacity);
    held.clear();  // sessions close; then the nodes stop
  }
  ASSERT_GT(admitted[0], 0);
  EXPECT_EQ(admitted[1], 2 * admitted[0]);
  EXPECT_EQ(admitted[2], 3 * admitted[0]);
}

TEST(RemotePlacement, ASilentNodeLeavesTheChoiceAndComesBack) {
  Node a, b;
  a.Start(64 << 20);
  b.Start(256 << 20);  // the most free: chosen first while it answers
  const int b_port = b.server->port();
  auto placed = *kvhost::PlacedRemoteRows::Open(
      {{.target = a.Target(), .token = "tok", .worker_id = "w", .tls_ca_file = ""},
       {.target = b.Target(), .token = "tok", .worker_id = "w", .tls_ca_file = ""}});
  auto backend = *runtime::CreateCpuBackend(Model(), {.threads = 1, .remote_rows = placed.get()});
  auto s1 = backend->NewSequence(500, SparsePlan());
  ASSERT_TRUE(s1.ok()) << s1.status();
  EXPECT_GT(b.used.load(), 0u) << "the node with more free budget took it";
  const uint64_t a_before = a.used.load();
  b.Stop();
  for (int i = 0; i < 100 && placed->node(1).healthy(); ++i) absl::SleepFor(absl::Milliseconds(20));
  ASSERT_FALSE(placed->node(1).healthy()) << "a KeepAlive failed";
  auto s2 = backend->NewSequence(500, SparsePlan());
  ASSERT_TRUE(s2.ok()) << s2.status();
  EXPECT_GT(a.used.load(), a_before) << "the silent node was skipped";
  // Back on its address (a fresh node: what it held is gone); the worker
  // opens again and the node rejoins the choice.
  b.Start(256 << 20, b_port);
  for (int i = 0; i < 150 && !placed->node(1).healthy(); ++i) absl::SleepFor(absl::Milliseconds(20));
  ASSERT_TRUE(placed->node(1).healthy()) << "the node answers KeepAlive again";
  auto s3 = backend->NewSequence(500, SparsePlan());
  ASSERT_TRUE(s3.ok()) << s3.status();
  EXPECT_GT(b.used.load(), 0u) << "the node is chosen again";
  s1->reset();  // its node forgot it: closing fails quietly (logged)
}

}  // namespace
}  // namespace tailorkv
