#include "common/grpc_server.h"

#include <fstream>
#include <iterator>

#include <chrono>
#include <csignal>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/server_builder.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"

namespace tailorkv::common {

absl::Status ServerOptions::Validate() const {
  if (listen_address.empty() || listen_address.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen: expected host:port, got '", listen_address, "'"));
  }
  auto positive = [](const char* field, int v) {
    return v > 0 ? absl::OkStatus()
                 : absl::InvalidArgumentError(absl::StrCat(field, ": must be > 0, got ", v));
  };
  for (auto s : {positive("max_receive_message_bytes", max_receive_message_bytes),
                 positive("max_send_message_bytes", max_send_message_bytes),
                 positive("max_concurrent_streams", max_concurrent_streams),
                 positive("keepalive_time_ms", keepalive_time_ms),
                 positive("keepalive_timeout_ms", keepalive_timeout_ms),
                 positive("min_client_ping_interval_ms", min_client_ping_interval_ms)}) {
    if (!s.ok()) return s;
  }
  if (drain_grace_ms < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("drain_grace_ms: must be >= 0, got ", drain_grace_ms));
  }
  if (tls_cert_file.empty() != tls_key_file.empty()) {
    return absl::InvalidArgumentError("tls-cert / tls-key: give both (or neither)");
  }
  for (const auto& [field, path] : {std::pair{"tls-cert", &tls_cert_file}, std::pair{"tls-key", &tls_key_file}}) {
    if (!path->empty() && !std::ifstream(*path).good()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": cannot read '", *path, "'"));
    }
  }
  return absl::OkStatus();
}

// The file's bytes ("" when unreadable; Validate checked).
static std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string ServerOptions::ToString() const {
  return absl::StrFormat(
      "listen=%s max_message_bytes=%d/%d max_concurrent_streams=%d keepalive=%dms/%dms "
      "min_client_ping=%dms drain_grace=%dms tls=%s",
      listen_address, max_receive_message_bytes, max_send_message_bytes, max_concurrent_streams,
      keepalive_time_ms, keepalive_timeout_ms, min_client_ping_interval_ms, drain_grace_ms,
      tls_cert_file.empty() ? "off" : tls_cert_file);
}

absl::StatusOr<std::unique_ptr<GrpcServer>> GrpcServer::Start(const ServerOptions& options,
                                                             std::vector<ServiceEntry> services) {
  if (absl::Status s = options.Validate(); !s.ok()) return s;
  // Both are process-wide switches read when the builder builds.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  std::unique_ptr<GrpcServer> self(new GrpcServer());
  self->options_ = options;

  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (!options.tls_cert_file.empty()) {
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({ReadAll(options.tls_key_file), ReadAll(options.tls_cert_file)});
    creds = grpc::SslServerCredentials(ssl);
  }
  builder.AddListeningPort(options.listen_address, creds, &self->port_);
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  builder.SetMaxSendMessageSize(options.max_send_message_bytes);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, options.max_concurrent_streams);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, options.keepalive_time_ms);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, options.keepalive_timeout_ms);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             options.min_client_ping_interval_ms);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 2);
  // gRPC sets SO_REUSEPORT by default: a second process on the same port
  // would silently share the traffic instead of failing to start.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  for (const ServiceEntry& entry : services) builder.RegisterService(entry.service);

  self->server_ = builder.BuildAndStart();
  if (self->server_ == nullptr || self->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen_address,
                     " (address in use, or not a local address?)"));
  }
  if (options.listen_address.rfind("unix:", 0) == 0) {
    self->address_ = options.listen_address;  // no port to report
  } else {
    const size_t colon = options.listen_address.rfind(':');
    self->address_ = absl::StrCat(options.listen_address.substr(0, colon), ":", self->port_);
  }

  grpc::HealthCheckServiceInterface* health = self->server_->GetHealthCheckService();
  health->SetServingStatus("", true);
  for (const ServiceEntry& entry : services) health->SetServingStatus(entry.name, true);
  NamedLogger("server")->info("serving on {} ({} services, health and reflection on)",
                              self->address_, services.size());
  return self;
}

GrpcServer::~GrpcServer() { Drain(); }

void GrpcServer::AddDrainHook(std::function<void()> hook) {
  drain_hooks_.push_back(std::move(hook));
}

void GrpcServer::SetServing(const std::string& service, bool serving) {
  absl::MutexLock lock(&health_mu_);
  if (draining_ || server_ == nullptr) return;
  server_->GetHealthCheckService()->SetServingStatus(service, serving);
}

void GrpcServer::Drain() {
  absl::MutexLock lock(&drain_mu_);
  if (drained_ || server_ == nullptr) return;
  drained_ = true;
  auto log = NamedLogger("server");
  log->info("draining: health NOT_SERVING, {} ms for in-flight calls", options_.drain_grace_ms);
  for (auto& hook : drain_hooks_) hook();
  {
    absl::MutexLock health(&health_mu_);
    draining_ = true;
    server_->GetHealthCheckService()->SetServingStatus(false);
  }
  const auto deadline =
      std::chrono::system_clock::now() + std::chrono::milliseconds(options_.drain_grace_ms);
  server_->Shutdown(deadline);
  server_->Wait();
  log->info("drained");
}

struct TerminationSignals::Impl {
  boost::asio::io_context io;
  boost::asio::signal_set signals{io, SIGINT, SIGTERM};
  int received = 0;
};

TerminationSignals::TerminationSignals() : impl_(std::make_unique<Impl>()) {
  // asio's own signal handler only queues the completion; this completion
  // runs inside io.run() on the waiting thread and only posts the stop.
  impl_->signals.async_wait([impl = impl_.get()](const boost::system::error_code& ec, int signo) {
    if (ec) return;
    impl->received = signo;
    boost::asio::post(impl->io, [impl] { impl->io.stop(); });
  });
}

TerminationSignals::~TerminationSignals() = default;

void TerminationSignals::Interrupt() {
  boost::asio::post(impl_->io, [impl = impl_.get()] { impl->io.stop(); });
}

int TerminationSignals::Wait() {
  impl_->io.run();
  return impl_->received;
}

}  // namespace tailorkv::common
