// kv-host: owns the host memory of the sparse layers' KV (memfd arenas) and
// hands it to co-located workers (tailorkv.v1.KvHost + the fd channel; see
// daemon/kv_host_daemon.h), with health and reflection, until SIGTERM/SIGINT.
// With --data-listen it also serves workers on other hosts over TCP
// (tailorkv.v1.KvHostData, daemon/data_service.h), from the same budget.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/service_main.h"
#include "common/prometheus.h"
#include "common/grpc_server.h"
#include "daemon/budget.h"
#include "daemon/data_service.h"
#include "daemon/kv_host_daemon.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
  using namespace tailorkv::kvhost;
  std::string budget = "0.5", quota, arena = "256M", warm = "256M", fd_socket, listen;
  std::vector<int> allow_uids;
  bool huge_pages = true, populate = false;
  int drain_grace_ms = 0;
  std::string data_listen, data_token, rows_listen;
  int data_lease_ms = 30'000;
  std::unique_ptr<KvHostDaemon> daemon;
  std::unique_ptr<KvHostDataService> data;
  std::unique_ptr<tailorkv::common::GrpcServer> data_server;
  return tailorkv::common::RunServiceMain(
      argc, argv,
      {.name = "kv-host",
       .description = "tailorkv kv-host: host memory for the sparse layers' KV, shared with co-located workers",
       .default_listen = "127.0.0.1:50061",
       .services = {},
       .add_flags =
           [&](CLI::App& app) {
             app.add_option("--budget", budget,
                            "host bytes for KV arenas: a size (48G) or a fraction of the memory limit "
                            "(cgroup memory.max, else RAM)")
                 ->capture_default_str();
             app.add_option("--worker-quota", quota, "the most one worker may hold (size or fraction of the budget; default: the budget)");
             app.add_option("--arena-bytes", arena, "arena size (larger slices get their own arena)")->capture_default_str();
             app.add_option("--warm-bytes", warm, "empty arena bytes each worker keeps when its sessions close (0: none)")
                 ->capture_default_str();
             app.add_option("--fd-socket", fd_socket,
                            "UNIX socket for the fd channel (default: the --listen unix path + \".fd\", or "
                            "/tmp/tailorkv-kv-host-<uid>.fd)");
             app.add_option("--allow-uid", allow_uids, "uids besides kv-host's own that may attach");
             app.add_flag("--huge-pages,!--no-huge-pages", huge_pages, "transparent huge pages for arenas")
                 ->capture_default_str();
             app.add_flag("--populate", populate, "pre-fault arena pages at creation");
             app.add_option("--data-listen", data_listen,
                            "host:port of the remote data plane for workers on other hosts (tailorkv.v1.KvHostData; "
                            "TLS with --tls-cert/--tls-key; default: off)");
             app.add_option("--data-token", data_token,
                            "the secret remote workers present (or env TAILORKV_KV_HOST_TOKEN); required with --data-listen");
             app.add_option("--rows-listen", rows_listen,
                            "host:port of the rows channel (Gather and Write as binary frames over plain TCP, "
                            "5-10x gRPC's throughput; default: --data-listen's host, its port + 1; off: none; "
                            "always off with TLS, when the rows go in the encrypted gRPC calls)");
             app.add_option("--data-lease-ms", data_lease_ms,
                            "a remote worker silent this long is presumed dead and its memory freed")
                 ->check(CLI::Range(100, 3'600'000))
                 ->capture_default_str();
           },
       .init =
           [&](const tailorkv::common::ServerOptions& server,
               std::vector<tailorkv::common::ServiceEntry>& services) -> absl::Status {
             listen = server.listen_address;
             drain_grace_ms = server.drain_grace_ms;
             auto limit = DetectMemoryLimit();
             if (!limit.ok()) return limit.status();
             KvHostDaemonOptions o;
             auto b = ParseBudget(budget, limit->bytes);
             if (!b.ok()) return b.status();
             o.budget_bytes = *b;
             o.budget_source = absl::StrContains(budget, ".")
                                   ? absl::StrCat(budget, " of ", limit->bytes, " bytes (", limit->source, ")")
                                   : absl::StrCat("--budget ", budget);
             if (!quota.empty()) {
               auto q = ParseBudget(quota, o.budget_bytes);
               if (!q.ok()) return absl::InvalidArgumentError(absl::StrCat("--worker-quota: ", q.status().message()));
               o.worker_quota_bytes = *q;
             }
             auto a = ParseBudget(arena, o.budget_bytes);
             if (!a.ok()) return absl::InvalidArgumentError(absl::StrCat("--arena-bytes: ", a.status().message()));
             o.arena_bytes = *a;
             // 0: retire every empty arena at once.
             auto w = warm == "0" ? absl::StatusOr<uint64_t>(0) : ParseBudget(warm, o.budget_bytes);
             if (!w.ok()) return absl::InvalidArgumentError(absl::StrCat("--warm-bytes: ", w.status().message()));
             o.warm_bytes = *w;
             if (fd_socket.empty()) {
               fd_socket = absl::StartsWith(listen, "unix:")
                               ? absl::StrCat(listen.substr(listen.rfind(':') + 1), ".fd")
                               : absl::StrCat("/tmp/tailorkv-kv-host-", getuid(), ".fd");
               while (absl::StartsWith(fd_socket, "//")) fd_socket.erase(0, 1);
             }
             o.fd_socket_path = fd_socket;
             for (int u : allow_uids) o.allowed_uids.push_back(static_cast<uid_t>(u));
             o.arena.huge_pages = huge_pages;
             o.arena.populate = populate;
             const uint64_t arena_bytes = o.arena_bytes;
             auto d = KvHostDaemon::Start(std::move(o));
             if (!d.ok()) return d.status();
             daemon = std::move(*d);
             spdlog::info("kv-host: budget {} bytes ({}), fd channel at {}", daemon->Stats().budget_bytes(),
                          daemon->Stats().budget_source(), fd_socket);
             services.push_back({tailorkv::v1::KvHost::service_full_name(), daemon.get()});
             if (data_listen.empty()) return absl::OkStatus();
             if (data_token.empty()) {
               if (const char* t = std::getenv("TAILORKV_KV_HOST_TOKEN")) data_token = t;
             } else {
               spdlog::warn("--data-token on the command line is readable by every local user (/proc/PID/cmdline); "
                            "set TAILORKV_KV_HOST_TOKEN instead");
             }
             if (data_token.empty()) {
               return absl::InvalidArgumentError(
                   "--data-token: required with --data-listen (or TAILORKV_KV_HOST_TOKEN): the remote data plane carries user data");
             }
             KvHostDataOptions dopt;
             dopt.token = data_token;
             dopt.budget_bytes = daemon->Stats().budget_bytes();
             dopt.take_budget = [&](uint64_t bytes, const std::string& what) { return daemon->TakeBudget(bytes, what); };
             dopt.return_budget = [&](uint64_t bytes) { daemon->ReturnBudget(bytes); };
             dopt.free_bytes = [&] { return daemon->FreeBudget(); };
             dopt.arena_bytes = arena_bytes;
             dopt.lease = absl::Milliseconds(data_lease_ms);
             dopt.arena.huge_pages = huge_pages;
             dopt.arena.populate = populate;
             if (server.tls_cert_file.empty() && rows_listen != "off") {
               if (rows_listen.empty()) {
                 const size_t colon = data_listen.rfind(':');
                 int port = 0;
                 if (colon == std::string::npos || !absl::SimpleAtoi(data_listen.substr(colon + 1), &port)) {
                   return absl::InvalidArgumentError(absl::StrCat("--data-listen: want host:port, got '", data_listen, "'"));
                 }
                 rows_listen = absl::StrCat(data_listen.substr(0, colon), ":", port == 0 ? 0 : port + 1);
               }
               dopt.rows_listen = rows_listen;
             }
             auto ds = KvHostDataService::Create(std::move(dopt));
             if (!ds.ok()) return ds.status();
             data = std::move(*ds);
             tailorkv::common::ServerOptions so = server;
             so.listen_address = data_listen;
             so.max_receive_message_bytes = 8 << 20;   // Write chunks of 4 MiB
             so.max_send_message_bytes = 72 << 20;     // Gather answers of up to 64 MiB
             auto srv = tailorkv::common::GrpcServer::Start(so, {{tailorkv::v1::KvHostData::service_full_name(), data.get()}});
             if (!srv.ok()) return srv.status();
             data_server = std::move(*srv);
             spdlog::info("kv-host: remote data plane on {} (lease {} ms, tls {}, rows channel {})", data_server->address(),
                          data_lease_ms, server.tls_cert_file.empty() ? "off" : "on",
                          data->rows_port() > 0 ? absl::StrCat("port ", data->rows_port()) : std::string("off"));
             return absl::OkStatus();
           },
       // SIGTERM: no new workers or sessions; the open sessions get the drain
       // grace to close (their workers' requests finish) while RPCs are served.
       .before_drain =
           [&] {
             daemon->BeginDrain();
             if (data != nullptr) data->BeginDrain();
             const absl::Time until = absl::Now() + absl::Milliseconds(drain_grace_ms);
             int open = daemon->OpenSessions();
             while (open > 0 && absl::Now() < until) {
               absl::SleepFor(absl::Milliseconds(20));
               open = daemon->OpenSessions();
             }
             if (open > 0) spdlog::warn("kv-host: stopping with {} sessions still open", open);
           },
       .after_drain =
           [&] {
             // Remote workers' calls end first (their memory is the daemon's budget).
             data_server.reset();
             data.reset();
             daemon.reset();
           },
       // The host tier's memory (vLLM has no such series; names follow ours).
       .metrics =
           [&]() -> std::string {
             using tailorkv::common::AppendHeader;
             using tailorkv::common::AppendSample;
             std::string out;
             if (daemon == nullptr) return out;
             const tailorkv::v1::KvHostStats st = daemon->Stats();
             AppendHeader(&out, "tailorkv:kvhost_budget_bytes", "gauge", "Host memory kv-host may hand out.");
             AppendSample(&out, "tailorkv:kvhost_budget_bytes", "", static_cast<double>(st.budget_bytes()));
             AppendHeader(&out, "tailorkv:kvhost_used_bytes", "gauge", "Arena bytes held by workers.");
             AppendSample(&out, "tailorkv:kvhost_used_bytes", "", static_cast<double>(st.used_bytes()));
             AppendHeader(&out, "tailorkv:kvhost_arenas", "gauge", "Arenas.");
             AppendSample(&out, "tailorkv:kvhost_arenas", "", st.arenas());
             AppendHeader(&out, "tailorkv:kvhost_attached_workers", "gauge", "Workers attached.");
             AppendSample(&out, "tailorkv:kvhost_attached_workers", "", st.attached_workers());
             int sessions = 0;
             int64_t reserved = 0;
             for (const auto& w : st.workers()) {
               sessions += w.sessions_size();
               reserved += w.reserved_bytes();
             }
             AppendHeader(&out, "tailorkv:kvhost_sessions", "gauge", "Open sessions (one per sequence with a host tier).");
             AppendSample(&out, "tailorkv:kvhost_sessions", "", sessions);
             AppendHeader(&out, "tailorkv:kvhost_reserved_bytes", "gauge", "Bytes handed out as slices.");
             AppendSample(&out, "tailorkv:kvhost_reserved_bytes", "", static_cast<double>(reserved));
             AppendHeader(&out, "tailorkv:kvhost_draining", "gauge", "1 while draining.");
             AppendSample(&out, "tailorkv:kvhost_draining", "", st.draining() ? 1 : 0);
             return out;
           }});
}
