// kv-host: owns the host memory of the sparse layers' KV (memfd arenas) and
// hands it to co-located workers (tailorkv.v1.KvHost + the fd channel; see
// daemon/kv_host_daemon.h), with health and reflection, until SIGTERM/SIGINT.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/service_main.h"
#include "common/prometheus.h"
#include "daemon/budget.h"
#include "daemon/kv_host_daemon.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
  using namespace tailorkv::kvhost;
  std::string budget = "0.5", quota, arena = "256M", warm = "256M", fd_socket, listen;
  std::vector<int> allow_uids;
  bool huge_pages = true, populate = false;
  int drain_grace_ms = 0;
  std::unique_ptr<KvHostDaemon> daemon;
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
             auto d = KvHostDaemon::Start(std::move(o));
             if (!d.ok()) return d.status();
             daemon = std::move(*d);
             spdlog::info("kv-host: budget {} bytes ({}), fd channel at {}", daemon->Stats().budget_bytes(),
                          daemon->Stats().budget_source(), fd_socket);
             services.push_back({tailorkv::v1::KvHost::service_full_name(), daemon.get()});
             return absl::OkStatus();
           },
       // SIGTERM: no new workers or sessions; the open sessions get the drain
       // grace to close (their workers' requests finish) while RPCs are served.
       .before_drain =
           [&] {
             daemon->BeginDrain();
             const absl::Time until = absl::Now() + absl::Milliseconds(drain_grace_ms);
             int open = daemon->OpenSessions();
             while (open > 0 && absl::Now() < until) {
               absl::SleepFor(absl::Milliseconds(20));
               open = daemon->OpenSessions();
             }
             if (open > 0) spdlog::warn("kv-host: stopping with {} sessions still open", open);
           },
       .after_drain = [&] { daemon.reset(); },
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
