// HttpGateway: the OpenAI-compatible HTTP front door (Boost.Beast), one
// thread per connection (HTTP/1.1 keep-alive), each request served by the
// least loaded ready worker (WorkerPool) over the worker's gRPC API.
//
// Routes: POST /v1/chat/completions, POST /v1/completions (stream false: one
// JSON object; true: server-sent events in a chunked response, a last usage
// event with stream_options.include_usage, then "data: [DONE]"),
// GET /v1/models, GET /health (200 when a worker is ready, else 503),
// GET /metrics (Prometheus text). Errors are OpenAI error objects with the
// HTTP status their cause maps to (openai_api.h).
//
// Faults: a request that fails with UNAVAILABLE before its first token is
// retried on another ready worker (each worker once); once tokens have been
// sent, a worker's failure ends the stream with an error event. A client that
// goes away mid-stream (a write fails) cancels the worker's call, which
// aborts the generation there. Not bounded yet: a client that stops reading
// (or sends nothing) holds its connection thread until it goes away — asio's
// synchronous calls retry past socket timeouts, so bounding them needs the
// async API; --max-connections bounds how many such clients there can be.
// Limits: body size (413), concurrent
// connections (503 beyond), max_tokens (400 beyond the cap); an optional API
// key (Authorization: Bearer ..., 401 otherwise; /health and /metrics stay
// open).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "gateway/metrics.h"
#include "gateway/openai_api.h"
#include "gateway/worker_pool.h"

namespace tailorkv::gateway {

struct HttpGatewayOptions {
  std::string listen = "127.0.0.1:8080";  // host:port; port 0 picks one
  std::string api_key;                    // empty: no authentication
  // PEM files: with both, the API is HTTPS (TLS 1.2+) only.
  std::string tls_cert_file, tls_key_file;
  size_t max_body_bytes = 1 << 20;
  int max_connections = 256;
  ApiLimits limits;
  absl::Duration request_timeout = absl::Minutes(10);  // a generation's deadline on the worker
};

class HttpGateway {
 public:
  // Binds and starts accepting. InvalidArgument for a bad address,
  // Unavailable when it cannot bind. `pool` and `metrics` must outlive it.
  static absl::StatusOr<std::unique_ptr<HttpGateway>> Start(HttpGatewayOptions options, WorkerPool* pool,
                                                            GatewayMetrics* metrics);
  // Stop(), then waits for every connection thread.
  ~HttpGateway();
  int port() const;
  // The start of a graceful stop (SIGTERM): from now on every new request,
  // /health included, gets 503 "draining" and its connection is closed;
  // idle keep-alive connections are closed; requests in progress run on.
  // Idempotent; thread-safe.
  void BeginDrain();
  // Waits up to `grace` for the requests in progress (BeginDrain first, or
  // new ones keep coming), then stops accepting, cancels the generations
  // still running, closes every connection and waits for their threads.
  // Idempotent.
  void Stop(absl::Duration grace = absl::ZeroDuration());

 private:
  struct Impl;
  explicit HttpGateway(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tailorkv::gateway
