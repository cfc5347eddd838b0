#include "common/service_main.h"

#include "common/metrics_http.h"

#include <cstdio>

#include <CLI/CLI.hpp>

#include "common/logging.h"
#include "spdlog/spdlog.h"

namespace tailorkv::common {

int RunServiceMain(int argc, char** argv, const ServiceMainSpec& spec) {
  ServerOptions server_options;
  server_options.listen_address = spec.default_listen;
  std::string log_level = "info";
  CLI::App app{spec.description};
  app.add_option("--listen", server_options.listen_address, "host:port to serve on")
      ->capture_default_str();
  app.add_option("--drain-grace-ms", server_options.drain_grace_ms,
                 "how long in-flight calls may run after SIGTERM")
      ->capture_default_str();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->capture_default_str();
  app.add_option("--tls-cert", server_options.tls_cert_file,
                 "PEM certificate chain: the gRPC port (and the gateway's HTTP API) speak TLS only");
  app.add_option("--tls-key", server_options.tls_key_file, "PEM private key of --tls-cert");
  std::string metrics_listen;
  if (spec.metrics) {
    app.add_option("--metrics-listen", metrics_listen, "host:port of a Prometheus endpoint (GET /metrics; empty: none)");
  }
  if (spec.add_flags) spec.add_flags(app);
  CLI11_PARSE(app, argc, argv);

  if (absl::Status s = ConfigureLogging(log_level); !s.ok()) {
    std::fprintf(stderr, "%s: %s\n", spec.name.c_str(), s.ToString().c_str());
    return 2;
  }
  if (absl::Status s = server_options.Validate(); !s.ok()) {
    spdlog::error("invalid configuration: {}", s.ToString());
    return 2;
  }
  std::vector<ServiceEntry> services = spec.services;
  if (spec.init) {
    if (absl::Status s = spec.init(server_options, services); !s.ok()) {
      spdlog::error("invalid configuration: {}", s.ToString());
      return 2;
    }
  }
  spdlog::info("{} starting: {}", spec.name, server_options.ToString());
  TerminationSignals signals;
  auto server = GrpcServer::Start(server_options, services);
  if (!server.ok()) {
    spdlog::error("cannot start the server: {}", server.status().ToString());
    return 1;
  }
  std::unique_ptr<MetricsHttpServer> metrics;
  if (!metrics_listen.empty()) {
    auto m = MetricsHttpServer::Start(metrics_listen, spec.metrics);
    if (!m.ok()) {
      spdlog::error("cannot serve metrics: {}", m.status().ToString());
      return 1;
    }
    metrics = std::move(*m);
    spdlog::info("metrics on http://{}/metrics (port {})", metrics_listen, metrics->port());
  }
  spdlog::info("ready on {}", (*server)->address());
  const int signo = signals.Wait();
  spdlog::info("received signal {}, draining", signo);
  metrics.reset();
  if (spec.before_drain) spec.before_drain();
  (*server)->Drain();
  if (spec.after_drain) spec.after_drain();
  spdlog::info("{} stopped", spec.name);
  spdlog::shutdown();
  return 0;
}

}  // namespace tailorkv::common
