// profiler: serves tailorkv.v1.Profiler (placeholder RPCs for now), health and
// reflection until SIGTERM/SIGINT, then drains.
#include <cstdio>

#include <CLI/CLI.hpp>

#include "common/grpc_server.h"
#include "common/logging.h"
#include "profiler_placeholder_service.h"

int main(int argc, char** argv) {
  tailorkv::common::ServerOptions server_options;
  server_options.listen_address = "127.0.0.1:50071";
  std::string log_level = "info";
  CLI::App app{"tailorkv profiler: per-layer KV plans"};
  app.add_option("--listen", server_options.listen_address, "host:port to serve on")
      ->capture_default_str();
  app.add_option("--drain-grace-ms", server_options.drain_grace_ms,
                 "how long in-flight calls may run after SIGTERM")
      ->capture_default_str();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  if (absl::Status s = tailorkv::common::ConfigureLogging(log_level); !s.ok()) {
    std::fprintf(stderr, "profiler: %s\n", s.ToString().c_str());
    return 2;
  }
  if (absl::Status s = server_options.Validate(); !s.ok()) {
    spdlog::error("invalid configuration: {}", s.ToString());
    return 2;
  }
  spdlog::info("profiler starting: {}", server_options.ToString());
  tailorkv::common::TerminationSignals signals;

  tailorkv::profiler::ProfilerPlaceholderService service;
  auto server = tailorkv::common::GrpcServer::Start(
      server_options, {{tailorkv::v1::Profiler::service_full_name(), &service}});
  if (!server.ok()) {
    spdlog::error("cannot start the server: {}", server.status().ToString());
    return 1;
  }
  spdlog::info("ready on {}", (*server)->address());
  const int signo = signals.Wait();
  spdlog::info("received signal {}, draining", signo);
  (*server)->Drain();
  spdlog::info("profiler stopped");
  spdlog::shutdown();
  return 0;
}
