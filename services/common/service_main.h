// The main() of a process whose whole job is to serve gRPC services until
// SIGTERM/SIGINT: flags --listen, --drain-grace-ms and --log-level, logging
// set up once, the configuration validated and printed, then serve, wait for
// a signal, drain. Used by kv-host and profiler; the gpu-worker has more
// configuration and its own main().
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/grpc_server.h"

namespace CLI {
class App;
}

namespace tailorkv::common {

struct ServiceMainSpec {
  std::string name;            // process name used in logs and errors
  std::string description;     // --help headline
  std::string default_listen;  // host:port
  std::vector<ServiceEntry> services;  // must outlive the call
  // Optional: the process's own flags, parsed with the common ones.
  std::function<void(CLI::App&)> add_flags;
  // Optional: runs after parsing and logging set-up, before serving (builds
  // what the flags configure, may add services that outlive the call; sees
  // the server's options, e.g. the --listen address); a non-OK status is
  // logged and exits 2.
  std::function<absl::Status(const ServerOptions&, std::vector<ServiceEntry>&)> init;
  // Optional: after the stop signal, while the server still serves (e.g.
  // refuse new work, wait for what runs to finish).
  std::function<void()> before_drain;
  // Optional: after the server drained, before logging shuts down (e.g.
  // destroy what init built, which may still log).
  std::function<void()> after_drain;
  // Optional: the process's Prometheus text; adds --metrics-listen
  // (host:port of GET /metrics; empty: none), served from after init until
  // the drain.
  std::function<std::string()> metrics;
};

// Returns the process exit code: 0 after a clean drain, 1 when the server
// cannot start, 2 for a bad command line or configuration.
int RunServiceMain(int argc, char** argv, const ServiceMainSpec& spec);

}  // namespace tailorkv::common
