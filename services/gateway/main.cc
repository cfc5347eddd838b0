// gateway: the OpenAI-compatible HTTP front door over one or more
// gpu-workers (HttpGateway, WorkerPool), with Prometheus metrics at
// /metrics; on --listen the workers' own gRPC API (GenerationProxy), with
// health and reflection. Until SIGTERM/SIGINT, then drains: new HTTP
// requests get 503 and new gRPC calls UNAVAILABLE, those in progress run on
// for up to --drain-grace-ms, the rest are cancelled, and it exits 0.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>

#include <CLI/CLI.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/service_main.h"
#include "gateway/generation_proxy.h"
#include "gateway/http_gateway.h"
#include "gateway/worker_pool.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
  namespace gw = tailorkv::gateway;
  std::string workers, pool_tls_ca;
  gw::HttpGatewayOptions http;
  int max_body_kib = 1024;
  int timeout_s = 600;
  int drain_grace_ms = 0;
  std::chrono::steady_clock::time_point drain_started;
  std::unique_ptr<gw::WorkerPool> pool;
  gw::GatewayMetrics metrics;
  std::unique_ptr<gw::HttpGateway> server;
  std::unique_ptr<gw::GenerationProxy> proxy;
  if (const char* key = std::getenv("TAILORKV_API_KEY"); key != nullptr) http.api_key = key;
  CLI::Option* api_key_flag = nullptr;
  return tailorkv::common::RunServiceMain(
      argc, argv,
      {.name = "gateway",
       .description = "tailorkv gateway: OpenAI-compatible HTTP over gpu-workers",
       .default_listen = "127.0.0.1:50090",
       .services = {},
       .add_flags =
           [&](CLI::App& app) {
             app.add_option("--workers", workers, "the gpu-workers' gRPC addresses, comma-separated")->required();
             app.add_option("--workers-tls-ca", pool_tls_ca,
                            "PEM root certificate(s): reach the workers over TLS, verified against these");
             app.add_option("--http-listen", http.listen,
                            "host:port of the HTTP API (loopback by default; 0.0.0.0:PORT to expose it, "
                            "with --api-key)")
                 ->capture_default_str();
             api_key_flag = app.add_option("--api-key", http.api_key,
                            "require 'Authorization: Bearer KEY' on /v1/* and on the gRPC calls (or env "
                            "TAILORKV_API_KEY)");
             app.add_option("--max-body-kib", max_body_kib, "largest request body")
                 ->check(CLI::Range(1, 1 << 20))
                 ->capture_default_str();
             app.add_option("--max-connections", http.max_connections, "connections served at once")
                 ->check(CLI::Range(1, 100000))
                 ->capture_default_str();
             app.add_option("--max-tokens-cap", http.limits.max_tokens_cap, "largest max_tokens a request may ask")
                 ->check(CLI::Range(1, 1 << 24))
                 ->capture_default_str();
             app.add_option("--default-max-tokens", http.limits.default_max_tokens,
                            "max_tokens when a request sets none")
                 ->check(CLI::Range(1, 1 << 24))
                 ->capture_default_str();
             app.add_option("--request-timeout-s", timeout_s, "deadline of a generation on the worker")
                 ->check(CLI::Range(1, 86400))
                 ->capture_default_str();
           },
       .init =
           [&](const tailorkv::common::ServerOptions& server_options,
               std::vector<tailorkv::common::ServiceEntry>& services) -> absl::Status {
             if (api_key_flag != nullptr && api_key_flag->count() > 0) {
               spdlog::warn("--api-key on the command line is readable by every local user (/proc/PID/cmdline); "
                            "set TAILORKV_API_KEY instead");
             }
             // --tls-cert / --tls-key (the common flags) secure the HTTP API too.
             drain_grace_ms = server_options.drain_grace_ms;
             http.tls_cert_file = server_options.tls_cert_file;
             http.tls_key_file = server_options.tls_key_file;
             if (http.limits.default_max_tokens > http.limits.max_tokens_cap) {
               return absl::InvalidArgumentError(absl::StrCat("default-max-tokens: ", http.limits.default_max_tokens,
                                                              " is above --max-tokens-cap ",
                                                              http.limits.max_tokens_cap));
             }
             http.max_body_bytes = static_cast<size_t>(max_body_kib) << 10;
             http.request_timeout = absl::Seconds(timeout_s);
             gw::WorkerPoolOptions po;
             po.workers = absl::StrSplit(workers, ',', absl::SkipWhitespace());
             po.tls_ca_file = pool_tls_ca;
             auto p = gw::WorkerPool::Create(po);
             if (!p.ok()) return p.status();
             pool = std::move(*p);
             auto s = gw::HttpGateway::Start(http, pool.get(), &metrics);
             if (!s.ok()) return s.status();
             server = std::move(*s);
             proxy = std::make_unique<gw::GenerationProxy>(pool.get(), &metrics, http.request_timeout, http.api_key);
             services.push_back({tailorkv::v1::Generation::service_full_name(), proxy.get()});
             spdlog::info("HTTP{} API on {} (port {}), {} worker(s), {} ready, api key {}",
                          http.tls_cert_file.empty() ? "" : "S", http.listen, server->port(), pool->size(),
                          pool->ready_count(), http.api_key.empty() ? "off" : "on");
             return absl::OkStatus();
           },
       // SIGTERM: the HTTP API refuses new requests (503) and lets those in
       // progress finish while the gRPC side drains, within one grace period.
       .before_drain =
           [&] {
             drain_started = std::chrono::steady_clock::now();
             if (server) server->BeginDrain();
           },
       .after_drain =
           [&] {
             if (server) {
               const auto used = std::chrono::steady_clock::now() - drain_started;
               server->Stop(std::max(absl::ZeroDuration(), absl::Milliseconds(drain_grace_ms) -
                                                               absl::FromChrono(used)));
             }
             server.reset();
             proxy.reset();
             pool.reset();
           }});
}
