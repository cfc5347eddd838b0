// Server bootstrap shared by gpu-worker, kv-host and profiler: one gRPC
// server with health checking (grpc.health.v1), reflection, keepalive and
// message/stream limits, and a graceful drain.
//
// Lifecycle: GrpcServer::Start() binds and serves; Drain() (idempotent,
// thread-safe) runs the drain hooks (services start refusing new work with
// UNAVAILABLE), flips health to NOT_SERVING, then Shutdown(deadline): no new
// calls, in-flight calls run until the grace period ends, then are
// cancelled. The destructor drains if nobody did. Services passed to Start()
// must outlive the GrpcServer.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/server.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tailorkv::common {

struct ServerOptions {
  // host:port; port 0 picks a free port (see GrpcServer::port()).
  std::string listen_address = "127.0.0.1:50051";
  // Requests above this get RESOURCE_EXHAUSTED from gRPC before our code runs.
  int max_receive_message_bytes = 4 << 20;
  int max_send_message_bytes = 4 << 20;
  // Per HTTP/2 connection; our own bound, since Debian's gRPC 1.51 has no
  // fixes for later HTTP/2 denial-of-service bugs.
  int max_concurrent_streams = 64;
  // Server-initiated pings find dead peers behind NATs and proxies.
  int keepalive_time_ms = 30'000;
  int keepalive_timeout_ms = 10'000;
  // Clients may ping this often (and while idle) without being sent GOAWAY.
  int min_client_ping_interval_ms = 10'000;
  // How long in-flight calls get to finish once a drain starts.
  int drain_grace_ms = 10'000;
  // PEM files; with both, the port speaks TLS only (server authentication).
  std::string tls_cert_file, tls_key_file;

  // InvalidArgument naming the field.
  absl::Status Validate() const;
  std::string ToString() const;
};

struct ServiceEntry {
  std::string name;  // full name for health, e.g. "tailorkv.v1.Generation"
  grpc::Service* service;
};

class GrpcServer {
 public:
  // Builds and starts the server; health reports SERVING for "" and each
  // entry's name. Unavailable when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<GrpcServer>> Start(const ServerOptions& options,
                                                           std::vector<ServiceEntry> services);
  ~GrpcServer();
  GrpcServer(const GrpcServer&) = delete;
  GrpcServer& operator=(const GrpcServer&) = delete;

  int port() const { return port_; }
  // "host:port" with the bound port.
  std::string address() const { return address_; }

  // Called first by Drain(), in order. Not thread-safe against Drain().
  void AddDrainHook(std::function<void()> hook);

  // Health of one service (e.g. NOT_SERVING while a dependency is away).
  // Ignored once a drain has begun: everything is NOT_SERVING from then on.
  // Thread-safe.
  void SetServing(const std::string& service, bool serving);

  // See the class comment. Returns once every call has ended.
  void Drain();

 private:
  GrpcServer() = default;

  ServerOptions options_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string address_;
  std::vector<std::function<void()>> drain_hooks_;
  absl::Mutex drain_mu_;
  bool drained_ ABSL_GUARDED_BY(drain_mu_) = false;
  absl::Mutex health_mu_;  // not held while draining waits for calls
  bool draining_ ABSL_GUARDED_BY(health_mu_) = false;
};

// Catches SIGTERM and SIGINT from construction on (construct it early in
// main(), before loading anything slow, so a stop during startup is not
// lost). The signal handler of boost::asio only records the signal and
// stops the wait; the caller then drains. Not thread-safe; one per process.
class TerminationSignals {
 public:
  TerminationSignals();
  ~TerminationSignals();
  // Blocks until SIGTERM or SIGINT arrives (or has arrived) and returns it,
  // or until Interrupt() and returns 0.
  int Wait();
  // Ends Wait() without a signal (e.g. the process cannot go on serving).
  // Thread-safe; only posts the stop, like the signal handler.
  void Interrupt();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tailorkv::common
