// Per-sequence host-tier set-up through kv-host (a daemon on a UNIX-socket
// gRPC server and its fd channel, in this process) against the in-process
// store: the time to get every sparse layer's host tier of one sequence
// (one AllocateMany) and to give it back (FreeOwner), on a cold store
// (arenas made, sent and mapped) and a warm one (arenas kept: --warm-bytes).
// Pages are not touched, so the 8B shape at 128k (31 layers x 512 MiB)
// needs no RAM. No GPU: registration with CUDA is not part of this figure.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/kv_host_client.h"
#include "common/grpc_server.h"
#include "daemon/kv_host_daemon.h"
#include "nlohmann/json.hpp"
#include "store/in_process_store.h"

namespace {

using namespace tailorkv::kvhost;
using Clock = std::chrono::steady_clock;

double Ms(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct Timing {
  double first_ms = 0, warm_ms = 0, free_ms = 0;
};

Timing Measure(HostKvStore& store, const std::vector<uint64_t>& sizes, int rounds) {
  Timing t;
  std::vector<double> warm, freed;
  for (int r = 0; r < rounds; ++r) {
    const std::string owner = absl::StrCat("seq-", r);
    const auto a = Clock::now();
    auto s = store.AllocateMany(sizes, 4096, owner);
    const auto b = Clock::now();
    if (!s.ok()) {
      std::fprintf(stderr, "AllocateMany: %s\n", s.status().ToString().c_str());
      std::exit(1);
    }
    store.FreeOwner(owner);
    const auto c = Clock::now();
    if (r == 0) {
      t.first_ms = Ms(a, b);
    } else {
      warm.push_back(Ms(a, b));
    }
    freed.push_back(Ms(b, c));
  }
  t.warm_ms = Median(warm);
  t.free_ms = Median(freed);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  int layers = 31, tokens = 131072, kv_heads = 8, head_dim = 128, rounds = 50;
  std::string out_path;
  CLI::App app{"kv-host: per-sequence host-tier set-up time, daemon vs in-process"};
  app.add_option("--layers", layers, "sparse layers")->capture_default_str();
  app.add_option("--tokens", tokens, "sequence capacity")->capture_default_str();
  app.add_option("--kv-heads", kv_heads)->capture_default_str();
  app.add_option("--head-dim", head_dim)->capture_default_str();
  app.add_option("--rounds", rounds, "sequences (the first is cold)")->check(CLI::Range(2, 100000))->capture_default_str();
  app.add_option("--out", out_path, "JSON results");
  CLI11_PARSE(app, argc, argv);

  const uint64_t bytes = 2ull * kv_heads * tokens * head_dim * 2;  // K | V, bf16
  const std::vector<uint64_t> sizes(layers, bytes);
  const uint64_t total = bytes * layers;
  const uint64_t page = PageSize();
  const uint64_t budget = (total + (uint64_t{1} << 30)) / page * page;

  const std::filesystem::path dir = std::filesystem::temp_directory_path() / absl::StrCat("kvh-bench-", getpid());
  std::filesystem::create_directories(dir);
  KvHostDaemonOptions o;
  o.budget_bytes = budget;
  o.arena_bytes = std::max<uint64_t>(uint64_t{256} << 20, (bytes + page - 1) / page * page);
  o.warm_bytes = budget;  // keep every arena: the warm figure
  o.fd_socket_path = (dir / "kv.fd").string();
  auto daemon = KvHostDaemon::Start(o);
  if (!daemon.ok()) return std::fprintf(stderr, "%s\n", daemon.status().ToString().c_str()), 1;
  tailorkv::common::ServerOptions so;
  so.listen_address = "unix:" + (dir / "kv.sock").string();
  auto server = tailorkv::common::GrpcServer::Start(so, {{"tailorkv.v1.KvHost", daemon->get()}});
  if (!server.ok()) return std::fprintf(stderr, "%s\n", server.status().ToString().c_str()), 1;
  auto client = KvHostClientStore::Connect({.target = so.listen_address, .worker_id = "bench"});
  if (!client.ok()) return std::fprintf(stderr, "%s\n", client.status().ToString().c_str()), 1;
  const Timing remote = Measure(**client, sizes, rounds);

  InProcessStoreOptions io;
  io.budget_bytes = budget;
  io.arena_bytes = o.arena_bytes;
  auto local = InProcessStore::Create(io);
  if (!local.ok()) return std::fprintf(stderr, "%s\n", local.status().ToString().c_str()), 1;
  const Timing in_process = Measure(**local, sizes, rounds);

  std::printf("%d sparse layers x %.0f MiB (%d tokens, %d KV heads, head_dim %d): %.2f GiB a sequence\n", layers,
              bytes / 1048576.0, tokens, kv_heads, head_dim, total / 1073741824.0);
  std::printf("%-12s %14s %14s %14s\n", "store", "cold ms", "warm ms", "free ms");
  std::printf("%-12s %14.3f %14.3f %14.3f\n", "kv-host", remote.first_ms, remote.warm_ms, remote.free_ms);
  std::printf("%-12s %14.3f %14.3f %14.3f\n", "in-process", in_process.first_ms, in_process.warm_ms,
              in_process.free_ms);
  if (!out_path.empty()) {
    nlohmann::json j = {{"layers", layers},
                        {"tokens", tokens},
                        {"bytes_per_layer", bytes},
                        {"rounds", rounds},
                        {"kv_host", {{"cold_ms", remote.first_ms}, {"warm_ms", remote.warm_ms}, {"free_ms", remote.free_ms}}},
                        {"in_process",
                         {{"cold_ms", in_process.first_ms}, {"warm_ms", in_process.warm_ms}, {"free_ms", in_process.free_ms}}}};
    std::ofstream(out_path) << j.dump(2) << "\n";
  }
  client->reset();
  server->reset();
  daemon->reset();
  std::filesystem::remove_all(dir);
  return 0;
}
