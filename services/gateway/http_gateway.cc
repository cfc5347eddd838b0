#include "gateway/http_gateway.h"

#include <grpcpp/grpcpp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <functional>
#include <set>
#include <thread>

#include "common/same_secret.h"
#include "common/tcp_listen.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "spdlog/spdlog.h"

namespace tailorkv::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
namespace v1 = tailorkv::v1;
using Clock = std::chrono::steady_clock;

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

// One accepted connection: its socket (and its TLS session over it, with
// --tls-cert), and the worker call in progress (so that Stop can cancel it).
struct Connection {
  explicit Connection(tcp::socket s) : socket(std::move(s)) {}
  tcp::socket socket;
  std::unique_ptr<asio::ssl::stream<tcp::socket&>> tls;
  // Runs f on the stream the HTTP traffic uses.
  template <class F>
  auto With(F&& f) {
    return tls != nullptr ? f(*tls) : f(socket);
  }
  absl::Mutex mu;
  grpc::ClientContext* call = nullptr;
  bool closed = false;
  bool busy = false;  // a request was read and is being served
};

struct HttpGateway::Impl {
  HttpGatewayOptions options;
  WorkerPool* pool = nullptr;
  GatewayMetrics* metrics = nullptr;
  asio::io_context ioc;
  std::unique_ptr<asio::ssl::context> tls;  // with --tls-cert
  tcp::acceptor acceptor{ioc};
  tcp::endpoint bound;
  std::thread accept_thread;
  std::atomic<bool> stopping{false};
  std::atomic<bool> draining{false};
  absl::Mutex mu;
  std::set<Connection*> conns;
  int threads = 0;
  std::atomic<uint64_t> next_id{0};
  const int64_t started_unix = absl::ToUnixSeconds(absl::Now());

  void AcceptLoop();
  void Serve(Connection* c);
  // Writes a whole response; false when the client is gone.
  // 503 to a request that arrives while the gateway drains (SIGTERM).
  void ReplyDraining(Connection* c);
  bool Reply(Connection* c, http::status status, const std::string& content_type, const std::string& body,
             bool keep_alive);
  bool ReplyError(Connection* c, const absl::Status& s, bool keep_alive) {
    const int code = HttpStatusFor(s.code());
    metrics->Error(code);
    return Reply(c, static_cast<http::status>(code), "application/json", ErrorBody(s, code), keep_alive);
  }
  // Serves one request; false: close the connection.
  bool Handle(Connection* c, const http::request<http::string_body>& req);
  bool Generate(Connection* c, Endpoint endpoint, const http::request<http::string_body>& req, bool keep_alive);
  bool WriteRaw(Connection* c, std::string_view bytes) {
    beast::error_code ec;
    c->With([&](auto& s) { asio::write(s, asio::buffer(bytes.data(), bytes.size()), ec); });
    return !ec;
  }
  bool WriteChunk(Connection* c, std::string_view data) {
    std::string framed = absl::StrCat(absl::Hex(data.size()), "\r\n");
    framed.append(data.data(), data.size());
    framed += "\r\n";
    return WriteRaw(c, framed);
  }
};

HttpGateway::HttpGateway(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpGateway::~HttpGateway() { Stop(); }

void HttpGateway::BeginDrain() {
  Impl& m = *impl_;
  if (m.draining.exchange(true)) return;
  absl::MutexLock lock(&m.mu);
  spdlog::info("gateway: draining: new requests get 503, {} connections open", m.conns.size());
  for (Connection* c : m.conns) {
    absl::MutexLock cl(&c->mu);
    // An idle keep-alive connection's read ends now; a busy one finishes its request.
    if (!c->busy) ::shutdown(c->socket.native_handle(), SHUT_RD);
  }
}

int HttpGateway::port() const { return impl_->bound.port(); }

absl::StatusOr<std::unique_ptr<HttpGateway>> HttpGateway::Start(HttpGatewayOptions options, WorkerPool* pool,
                                                                GatewayMetrics* metrics) {
  beast::error_code ec;
  if (options.max_connections < 1) return absl::InvalidArgumentError("max-connections: must be >= 1");
  auto impl = std::make_unique<Impl>();
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return absl::InvalidArgumentError("tls-cert / tls-key: give both (or neither)");
  }
  if (!options.tls_cert_file.empty()) {
    impl->tls = std::make_unique<asio::ssl::context>(asio::ssl::context::tls_server);
    impl->tls->set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2 |
                           asio::ssl::context::no_sslv3 | asio::ssl::context::no_tlsv1 |
                           asio::ssl::context::no_tlsv1_1);
    impl->tls->use_certificate_chain_file(options.tls_cert_file, ec);
    if (ec) return absl::InvalidArgumentError(absl::StrCat("tls-cert ", options.tls_cert_file, ": ", ec.message()));
    impl->tls->use_private_key_file(options.tls_key_file, asio::ssl::context::pem, ec);
    if (ec) return absl::InvalidArgumentError(absl::StrCat("tls-key ", options.tls_key_file, ": ", ec.message()));
  }
  impl->options = std::move(options);
  impl->pool = pool;
  impl->metrics = metrics;
  if (absl::Status s = common::ListenTcp("http-listen", impl->options.listen, impl->acceptor,
                                         asio::socket_base::max_listen_connections);
      !s.ok()) {
    return s;
  }
  impl->bound = impl->acceptor.local_endpoint();
  Impl* raw = impl.get();
  impl->accept_thread = std::thread([raw] { raw->AcceptLoop(); });
  return std::unique_ptr<HttpGateway>(new HttpGateway(std::move(impl)));
}

void HttpGateway::Stop(absl::Duration grace) {
  Impl& m = *impl_;
  if (grace > absl::ZeroDuration() && !m.stopping.load()) {
    absl::MutexLock lock(&m.mu);
    if (!m.mu.AwaitWithTimeout(absl::Condition(+[](int* n) { return *n == 0; }, &m.threads), grace)) {
      spdlog::warn("gateway: {} connections still busy after the drain grace of {}: cancelling them", m.threads,
                   absl::FormatDuration(grace));
    }
  }
  if (m.stopping.exchange(true)) return;
  // Wake the blocking accept with a connection of our own.
  {
    beast::error_code ec;
    tcp::socket s(m.ioc);
    tcp::endpoint to = m.bound;
    if (to.address().is_unspecified()) {
      to.address(to.address().is_v6() ? asio::ip::address(asio::ip::address_v6::loopback())
                                       : asio::ip::address(asio::ip::address_v4::loopback()));
    }
    s.connect(to, ec);
  }
  if (m.accept_thread.joinable()) m.accept_thread.join();
  {
    absl::MutexLock lock(&m.mu);
    for (Connection* c : m.conns) {
      absl::MutexLock cl(&c->mu);
      if (c->call != nullptr) c->call->TryCancel();
      ::shutdown(c->socket.native_handle(), SHUT_RDWR);
    }
    m.mu.Await(absl::Condition(+[](int* n) { return *n == 0; }, &m.threads));
  }
  beast::error_code ec;
  m.acceptor.close(ec);
}

void HttpGateway::Impl::AcceptLoop() {
  while (!stopping) {
    beast::error_code ec;
    tcp::socket socket(ioc);
    acceptor.accept(socket, ec);
    if (stopping) break;
    if (ec) {
      spdlog::warn("gateway: accept: {}", ec.message());
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    auto conn = std::make_unique<Connection>(std::move(socket));
    Connection* c = conn.release();
    // While draining, a new connection is still served as any other: Serve
    // reads its request, then answers 503 draining. Answering before the
    // request is read closed the socket with the request unread, which
    // resets the connection: a client still sending its body got a broken
    // pipe instead of the 503 (fault_gateway_drain, 2 of 5 runs).
    bool over = false;
    {
      absl::MutexLock lock(&mu);
      over = threads >= options.max_connections;
      if (!over) {
        ++threads;
        conns.insert(c);
      }
    }
    if (over) {
      // Answered in line (small), then closed.
      metrics->Error(503);
      Reply(c, http::status::service_unavailable, "application/json",
            ErrorBody(absl::UnavailableError(absl::StrCat("too many connections (--max-connections ",
                                                          options.max_connections, ")")),
                      503),
            false);
      delete c;
      continue;
    }
    std::thread([this, c] {
      if (tls != nullptr) {
        c->tls = std::make_unique<asio::ssl::stream<tcp::socket&>>(c->socket, *tls);
        beast::error_code hec;
        c->tls->handshake(asio::ssl::stream_base::server, hec);
        if (hec) {
          spdlog::debug("gateway: TLS handshake: {}", hec.message());
        } else {
          Serve(c);
        }
      } else {
        Serve(c);
      }
      beast::error_code ignored;
      c->socket.shutdown(tcp::socket::shutdown_both, ignored);
      c->socket.close(ignored);
      absl::MutexLock lock(&mu);
      conns.erase(c);
      delete c;
      --threads;
    }).detach();
  }
}

void HttpGateway::Impl::Serve(Connection* c) {
  beast::flat_buffer buffer;
  while (!stopping) {
    http::request_parser<http::string_body> parser;
    parser.body_limit(options.max_body_bytes);
    parser.header_limit(64 * 1024);
    beast::error_code ec;
    c->With([&](auto& s) { http::read(s, buffer, parser, ec); });
    if (ec == http::error::body_limit) {
      metrics->Error(413);
      Reply(c, http::status::payload_too_large, "application/json",
            ErrorBody(absl::InvalidArgumentError(absl::StrCat("body: larger than ", options.max_body_bytes,
                                                              " bytes (--max-body-kib)")),
                      413),
            false);
      return;
    }
    if (ec) {
      if (ec != http::error::end_of_stream && ec != asio::error::eof && ec != asio::error::connection_reset &&
          !stopping) {
        // A malformed request: 400, then close (the stream's framing is lost).
        if (ec.category() == beast::error_code(http::error::bad_method).category()) {
          metrics->Error(400);
          Reply(c, http::status::bad_request, "application/json",
                ErrorBody(absl::InvalidArgumentError(absl::StrCat("request: ", ec.message())), 400), false);
        }
      }
      return;
    }
    const http::request<http::string_body>& req = parser.get();
    {
      absl::MutexLock lock(&c->mu);
      c->busy = true;
    }
    if (draining) {
      // Read just as the drain began: refused clearly, not dropped.
      ReplyDraining(c);
      return;
    }
    const bool keep_alive = req.keep_alive();
    const bool go_on = Handle(c, req) && keep_alive;
    {
      absl::MutexLock lock(&c->mu);
      c->busy = false;
    }
    if (!go_on || draining) return;
  }
}

void HttpGateway::Impl::ReplyDraining(Connection* c) {
  metrics->Error(503);
  Reply(c, http::status::service_unavailable, "application/json",
        ErrorBody(absl::UnavailableError("the gateway is draining (shutting down); retry on another gateway"), 503),
        false);
}

bool HttpGateway::Impl::Reply(Connection* c, http::status status, const std::string& content_type,
                              const std::string& body, bool keep_alive) {
  http::response<http::string_body> res{status, 11};
  res.set(http::field::server, "tailorkv-gateway");
  res.set(http::field::content_type, content_type);
  res.keep_alive(keep_alive);
  res.body() = body;
  res.prepare_payload();
  beast::error_code ec;
  c->With([&](auto& s) { http::write(s, res, ec); });
  return !ec;
}

bool HttpGateway::Impl::Handle(Connection* c, const http::request<http::string_body>& req) {
  const std::string target(req.target());
  const std::string path = target.substr(0, target.find('?'));
  const bool keep = req.keep_alive();
  if (path == "/health") {
    const int ready = pool->ready_count();
    if (req.method() != http::verb::get && req.method() != http::verb::head) {
      return ReplyError(c, absl::InvalidArgumentError("method: /health takes GET"), keep);
    }
    return Reply(c, ready > 0 ? http::status::ok : http::status::service_unavailable, "application/json",
                 absl::StrFormat("{\"status\":\"%s\",\"workers_ready\":%d,\"workers\":%d}",
                                 ready > 0 ? "ok" : "no worker ready", ready, pool->size()),
                 keep);
  }
  if (path == "/metrics") {
    return Reply(c, http::status::ok, "text/plain; version=0.0.4; charset=utf-8",
                 metrics->Render(pool->states()), keep);
  }
  if (!options.api_key.empty()) {
    const auto it = req.find(http::field::authorization);
    if (it == req.end() ||
        !common::SameSecret(std::string_view(it->value().data(), it->value().size()),
                            absl::StrCat("Bearer ", options.api_key))) {
      return ReplyError(c, absl::UnauthenticatedError("Authorization: a valid 'Bearer <api key>' is required"),
                        keep);
    }
  }
  if (path == "/v1/models") {
    if (req.method() != http::verb::get) return ReplyError(c, absl::InvalidArgumentError("method: GET"), keep);
    const std::string name = pool->model_name();
    return Reply(c, http::status::ok, "application/json", ModelsBody(name.empty() ? "tailorkv" : name, started_unix),
                 keep);
  }
  const bool chat = path == "/v1/chat/completions";
  if (chat || path == "/v1/completions") {
    if (req.method() != http::verb::post) {
      return ReplyError(c, absl::InvalidArgumentError(absl::StrCat("method: ", path, " takes POST")), keep);
    }
    return Generate(c, chat ? Endpoint::kChat : Endpoint::kCompletions, req, keep);
  }
  return ReplyError(c, absl::NotFoundError(absl::StrCat("path: no route for ", path)), keep);
}

bool HttpGateway::Impl::Generate(Connection* c, Endpoint endpoint, const http::request<http::string_body>& req,
                                 bool keep_alive) {
  const auto t0 = Clock::now();
  absl::StatusOr<ParsedRequest> parsed = ParseRequest(endpoint, req.body(), options.limits);
  if (!parsed.ok()) return ReplyError(c, parsed.status(), keep_alive);
  ParsedRequest& p = *parsed;
  const std::string rid = absl::StrCat("gw-", getpid(), "-", next_id.fetch_add(1));
  p.request.set_request_id(rid);
  ResponseIds ids;
  ids.id = absl::StrCat(endpoint == Endpoint::kChat ? "chatcmpl-" : "cmpl-", rid);
  ids.created = absl::ToUnixSeconds(absl::Now());
  const std::string name = pool->model_name();
  ids.model = name.empty() ? p.model : name;
  metrics->running.fetch_add(1);
  struct RunningGuard {
    GatewayMetrics* m;
    ~RunningGuard() { m->running.fetch_sub(1); }
  } guard{metrics};

  bool headers_sent = false, client_gone = false, first = true;
  std::string text;
  v1::GenerateFinal final;
  bool have_final = false;
  absl::Status status;
  Clock::time_point last_token;
  std::vector<int> tried;
  while (true) {
    absl::StatusOr<WorkerPool::Choice> choice = pool->Choose(tried);
    if (!choice.ok()) {
      status = choice.status();
      break;
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(absl::ToInt64Milliseconds(options.request_timeout)));
    {
      absl::MutexLock lock(&c->mu);
      c->call = &ctx;
    }
    bool got_any = false;
    auto reader = choice->stub->Generate(&ctx, p.request);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
      got_any = true;
      if (resp.has_final()) {
        final = resp.final();
        have_final = true;
        continue;
      }
      if (!resp.has_chunk()) continue;
      const auto now = Clock::now();
      const int n = resp.chunk().token_ids_size();
      if (first) {
        metrics->ttft.Observe(Seconds(now - t0));
      } else if (n > 0) {
        metrics->tpot.Observe(Seconds(now - last_token) / n);
      }
      last_token = now;
      if (!p.stream) {
        text += resp.chunk().text();
        first = false;
        continue;
      }
      if (resp.chunk().text().empty()) continue;  // a token inside a character
      if (!headers_sent) {
        headers_sent = WriteRaw(c, absl::StrCat("HTTP/1.1 200 OK\r\nServer: tailorkv-gateway\r\n"
                                                "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                                                "Transfer-Encoding: chunked\r\n",
                                                keep_alive ? "" : "Connection: close\r\n", "\r\n"));
        client_gone = !headers_sent;
      }
      if (!client_gone && !WriteChunk(c, StreamChunkEvent(p, ids, resp.chunk().text(), first))) client_gone = true;
      first = false;
      if (client_gone) {
        // The client left: cancelling the call aborts the generation on the worker.
        ctx.TryCancel();
        break;
      }
    }
    const grpc::Status st = reader->Finish();
    {
      absl::MutexLock lock(&c->mu);
      c->call = nullptr;
    }
    pool->Done(choice->index);
    if (!st.ok() && !got_any && st.error_code() == grpc::StatusCode::UNAVAILABLE && !client_gone && !stopping) {
      // Nothing reached the client: another worker may serve it.
      spdlog::warn("gateway: {} on {} failed before its first token ({}); trying another worker", rid,
                   choice->address, st.error_message());
      pool->MarkFailed(choice->index);
      tried.push_back(choice->index);
      metrics->retries.fetch_add(1);
      continue;
    }
    if (!st.ok()) {
      status = FromGrpc(st);
      if (got_any) {
        status = absl::Status(status.code(), absl::StrCat("the worker serving this request (", choice->address,
                                                          ") failed after it had started: ", status.message()));
      }
    }
    break;
  }
  if (client_gone) {
    metrics->client_disconnects.fetch_add(1);
    metrics->finished_abort.fetch_add(1);
    spdlog::info("gateway: {}: the client went away mid-stream; generation aborted", rid);
    return false;
  }
  metrics->e2e.Observe(Seconds(Clock::now() - t0));
  if (!status.ok() || !have_final) {
    if (status.ok()) status = absl::InternalError("the worker ended the stream without a final message");
    metrics->Error(HttpStatusFor(status.code()));
    if (!headers_sent) return ReplyError(c, status, keep_alive);
    // Tokens were sent: the stream ends with an error event.
    WriteChunk(c, StreamErrorEvent(status));
    WriteChunk(c, kStreamDone);
    WriteRaw(c, "0\r\n\r\n");
    return false;
  }
  metrics->prompt_tokens.fetch_add(final.usage().prompt_tokens());
  metrics->generation_tokens.fetch_add(final.usage().completion_tokens());
  (final.finish_reason() == v1::FINISH_REASON_LENGTH ? metrics->finished_length : metrics->finished_stop)
      .fetch_add(1);
  if (!p.stream) {
    return Reply(c, http::status::ok, "application/json",
                 CompletionBody(p, ids, text, final.finish_reason(), final.usage()), keep_alive);
  }
  if (!headers_sent) {
    // No text at all (e.g. max_tokens reached inside a character).
    if (!WriteRaw(c, absl::StrCat("HTTP/1.1 200 OK\r\nServer: tailorkv-gateway\r\n"
                                  "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                                  "Transfer-Encoding: chunked\r\n",
                                  keep_alive ? "" : "Connection: close\r\n", "\r\n"))) {
      return false;
    }
  }
  bool ok = WriteChunk(c, StreamFinishEvent(p, ids, final.finish_reason()));
  if (ok && p.include_usage) ok = WriteChunk(c, StreamUsageEvent(p, ids, final.usage()));
  ok = ok && WriteChunk(c, kStreamDone) && WriteRaw(c, "0\r\n\r\n");
  return ok;
}

}  // namespace tailorkv::gateway
