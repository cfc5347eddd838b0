#include "client/remote_rows_client.h"

#include <grpcpp/grpcpp.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "spdlog/spdlog.h"
#include "store/memfd_arena.h"
#include "store/rows_channel.h"
#include "tailorkv/v1/kv_host_data.grpc.pb.h"

namespace tailorkv::kvhost {
namespace {

constexpr uint64_t kChunkBytes = uint64_t{4} << 20;

absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat("kv-host data plane: ", what, ": ", s.error_message()));
}

}  // namespace

struct RemoteRowsClient::Impl {
  std::unique_ptr<v1::KvHostData::Stub> stub;
  // The Gather stream, opened on first use and again after an error.
  std::unique_ptr<grpc::ClientContext> gather_ctx;
  std::unique_ptr<grpc::ClientReaderWriter<v1::DataGatherRequest, v1::DataGatherResponse>> gather;
  uint64_t next_request = 1;
  std::string stream_key;  // the key the stream was opened with
  // The rows channel (store/rows_channel.h), when the node offers one and
  // TLS is off: Gather and Write go there. -1: not connected (yet).
  ScopedFd rows;
  std::string rows_key;      // the key its ticket was for (the node binds the connection to it)
  bool rows_offered = true;  // until a Ticket says rows_port 0
};

RemoteRowsClient::RemoteRowsClient(RemoteRowsOptions options)
    : options_(std::move(options)), impl_(std::make_unique<Impl>()) {}

absl::StatusOr<std::unique_ptr<RemoteRowsClient>> RemoteRowsClient::Open(RemoteRowsOptions options) {
  if (options.target.empty()) return absl::InvalidArgumentError("target: required (host:port of kv-host --data-listen)");
  if (options.token.empty()) return absl::InvalidArgumentError("token: required (kv-host's --data-token)");
  std::unique_ptr<RemoteRowsClient> c(new RemoteRowsClient(std::move(options)));
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (!c->options_.tls_ca_file.empty()) {
    std::ifstream in(c->options_.tls_ca_file);
    if (!in) return absl::InvalidArgumentError(absl::StrCat("tls_ca_file: cannot read ", c->options_.tls_ca_file));
    std::stringstream pem;
    pem << in.rdbuf();
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = pem.str();
    creds = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  // Find a node that came back quickly (gRPC's default backoff grows to 120 s).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetMaxReceiveMessageSize(72 << 20);  // a Gather answer holds up to 64 MiB of rows
  args.SetMaxSendMessageSize(8 << 20);
  c->impl_->stub = v1::KvHostData::NewStub(grpc::CreateCustomChannel(c->options_.target, creds, args));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(c->options_.rpc_timeout));
  ctx.AddMetadata("authorization", "Bearer " + c->options_.token);
  v1::DataOpenRequest req;
  req.set_worker_id(c->options_.worker_id);
  v1::DataOpenResponse resp;
  if (grpc::Status s = c->impl_->stub->Open(&ctx, req, &resp); !s.ok()) {
    return FromGrpc(s, absl::StrCat("Open on ", c->options_.target));
  }
  {
    absl::MutexLock k(&c->key_mu_);
    c->key_ = resp.worker_key();
  }
  c->lease_ = absl::Milliseconds(resp.lease_ms());
  c->budget_bytes_ = static_cast<uint64_t>(resp.budget_bytes());
  c->free_bytes_.store(static_cast<uint64_t>(resp.free_bytes()));
  c->keepalive_ = std::thread([p = c.get()] { p->KeepAliveLoop(); });
  c->watchdog_ = std::thread([p = c.get()] { p->WatchdogLoop(); });
  return c;
}

RemoteRowsClient::~RemoteRowsClient() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (keepalive_.joinable()) keepalive_.join();
  if (watchdog_.joinable()) watchdog_.join();
  absl::MutexLock g(&gather_mu_);
  if (impl_->gather != nullptr) {
    impl_->gather->WritesDone();
    (void)impl_->gather->Finish();
  }
}

std::string RemoteRowsClient::Key() const {
  absl::MutexLock k(&key_mu_);
  return key_;
}

absl::Status RemoteRowsClient::Reopen(const std::string& stale_key) {
  absl::MutexLock once(&reopen_mu_);
  if (Key() != stale_key) return absl::OkStatus();  // done by another caller meanwhile
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(options_.rpc_timeout));
  ctx.AddMetadata("authorization", "Bearer " + options_.token);
  v1::DataOpenRequest req;
  req.set_worker_id(options_.worker_id);
  v1::DataOpenResponse resp;
  if (grpc::Status s = impl_->stub->Open(&ctx, req, &resp); !s.ok()) {
    return FromGrpc(s, absl::StrCat("Open on ", options_.target));
  }
  free_bytes_.store(static_cast<uint64_t>(resp.free_bytes()));
  absl::MutexLock k(&key_mu_);
  key_ = resp.worker_key();
  spdlog::warn("kv-host data plane {}: the node had forgotten this worker (lease over): opened again", options_.target);
  return absl::OkStatus();
}

void RemoteRowsClient::KeepAliveLoop() {
  const absl::Duration every = std::max(lease_ / 3, absl::Milliseconds(10));
  absl::MutexLock lock(&mu_);
  while (!stopping_) {
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), every);
    if (stopping_) break;
    mu_.Unlock();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(options_.rpc_timeout));
    ctx.AddMetadata("authorization", "Bearer " + options_.token);
    v1::DataKeepAliveRequest req;
    const std::string key = Key();
    req.set_worker_key(key);
    v1::DataKeepAliveResponse resp;
    const grpc::Status s = impl_->stub->KeepAlive(&ctx, req, &resp);
    if (s.ok()) {
      free_bytes_.store(static_cast<uint64_t>(resp.free_bytes()));
      if (!healthy_.exchange(true)) spdlog::info("kv-host data plane {}: reachable again", options_.target);
    } else if (s.error_code() == grpc::StatusCode::UNAUTHENTICATED && s.error_message().find("worker_key") != std::string::npos) {
      absl::Status r = Reopen(key);
      healthy_.store(r.ok());
      if (!r.ok()) spdlog::warn("{}", r.ToString());
    } else {
      healthy_.store(false);
      spdlog::warn("kv-host data plane {}: KeepAlive: {}", options_.target, s.error_message());
    }
    mu_.Lock();
  }
}

void RemoteRowsClient::WatchdogLoop() {
  absl::MutexLock lock(&mu_);
  while (!stopping_) {
    const absl::Time deadline = gather_deadline_;
    auto wake = [this, deadline]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return stopping_ || gather_deadline_ != deadline;
    };
    if (deadline == absl::InfiniteFuture()) {
      mu_.Await(absl::Condition(&wake));
      continue;
    }
    if (mu_.AwaitWithDeadline(absl::Condition(&wake), deadline)) continue;
    // The request in flight is late: cancel the stream (Read then fails).
    gather_cancelled_ = true;
    gather_deadline_ = absl::InfiniteFuture();
    if (impl_->gather_ctx != nullptr) impl_->gather_ctx->TryCancel();
  }
}

absl::Status RemoteRowsClient::ConnectRows() {
  Impl& impl = *impl_;
  impl.rows.reset();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(options_.rpc_timeout));
  ctx.AddMetadata("authorization", "Bearer " + options_.token);
  v1::DataTicketRequest req;
  const std::string key = Key();
  req.set_worker_key(key);
  v1::DataTicketResponse resp;
  if (grpc::Status s = impl.stub->Ticket(&ctx, req, &resp); !s.ok()) return FromGrpc(s, "Ticket");
  if (resp.rows_port() == 0) {
    impl.rows_offered = false;
    return absl::OkStatus();
  }
  // The node's host from the target (host:port, IPv6 in brackets).
  std::string host = options_.target.substr(0, options_.target.rfind(':'));
  if (host.size() >= 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(resp.rows_port());
  if (int e = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res); e != 0) {
    return absl::UnavailableError(absl::StrCat("rows channel: ", host, ": ", gai_strerror(e)));
  }
  ScopedFd fd(::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  absl::Status st = fd.valid() ? rows::SetSocketOptions(fd.get(), absl::ToInt64Milliseconds(options_.rpc_timeout))
                               : absl::UnavailableError(absl::StrCat("rows channel: socket: ", strerror(errno)));
  if (st.ok() && ::connect(fd.get(), res->ai_addr, res->ai_addrlen) != 0) {
    st = absl::UnavailableError(absl::StrCat("rows channel: connect ", host, ":", port, ": ", strerror(errno)));
  }
  ::freeaddrinfo(res);
  RETURN_IF_ERROR(st);
  std::string hello;
  rows::Put32(hello, rows::kMagic);
  rows::Put32(hello, rows::kVersion);
  hello += resp.ticket();
  RETURN_IF_ERROR(rows::WriteFull(fd.get(), hello.data(), hello.size()));
  char welcome[8];
  RETURN_IF_ERROR(rows::ReadFull(fd.get(), welcome, sizeof(welcome)));
  std::string msg(rows::Get32(welcome + 4), '\0');
  if (msg.size() > 4096) return absl::InternalError("rows channel: a welcome message past 4 KiB");
  RETURN_IF_ERROR(rows::ReadFull(fd.get(), msg.data(), msg.size()));
  if (rows::Get32(welcome) != 0) {
    return absl::Status(static_cast<absl::StatusCode>(rows::Get32(welcome)), absl::StrCat("rows channel: ", msg));
  }
  impl.rows = std::move(fd);
  impl.rows_key = key;
  return absl::OkStatus();
}

absl::Status RemoteRowsClient::RowsCall(uint32_t op, const std::string& payload, absl::Span<std::byte> out) {
  Impl& impl = *impl_;
  auto fail = [&](absl::Status st) {
    impl.rows.reset();  // out of step: the next call connects again
    return absl::Status(st.code(), absl::StrCat("kv-host data plane ", options_.target, ": ", st.message()));
  };
  std::string head;
  const uint64_t id = impl.next_request++;
  rows::Put32(head, op);
  rows::Put64(head, id);
  rows::Put64(head, payload.size());
  if (absl::Status st = rows::WriteFull(impl.rows.get(), head.data(), head.size()); !st.ok()) return fail(st);
  if (absl::Status st = rows::WriteFull(impl.rows.get(), payload.data(), payload.size()); !st.ok()) return fail(st);
  char resp[24];
  if (absl::Status st = rows::ReadFull(impl.rows.get(), resp, sizeof(resp)); !st.ok()) return fail(st);
  const uint32_t code = rows::Get32(resp + 8), msg_len = rows::Get32(resp + 12);
  const uint64_t data_len = rows::Get64(resp + 16);
  if (rows::Get64(resp) != id || msg_len > 4096 || (code == 0 && data_len != out.size()) || (code != 0 && data_len != 0)) {
    return fail(absl::InternalError(absl::StrCat("rows channel: answer to request ", rows::Get64(resp), " of ",
                                                 data_len, " bytes for request ", id, " of ", out.size())));
  }
  std::string msg(msg_len, '\0');
  if (absl::Status st = rows::ReadFull(impl.rows.get(), msg.data(), msg_len); !st.ok()) return fail(st);
  if (code != 0) {
    return absl::Status(static_cast<absl::StatusCode>(code), absl::StrCat("kv-host data plane: ", msg));
  }
  if (absl::Status st = rows::ReadFull(impl.rows.get(), out.data(), out.size()); !st.ok()) return fail(st);
  return absl::OkStatus();
}

bool RemoteRowsClient::rows_channel_in_use() {
  absl::MutexLock g(&gather_mu_);
  return impl_->rows.valid();
}

bool RemoteRowsClient::UseRows() {
  Impl& impl = *impl_;
  if (!options_.tls_ca_file.empty() || !impl.rows_offered) return false;
  if (impl.rows.valid() && impl.rows_key == Key()) return true;
  if (absl::Status st = ConnectRows(); !st.ok()) {
    spdlog::warn("kv-host data plane {}: {}; rows go over gRPC for this call", options_.target, st.ToString());
    return false;
  }
  return impl.rows.valid();
}

absl::StatusOr<std::vector<uint64_t>> RemoteRowsClient::Reserve(const std::string& session,
                                                                 absl::Span<const uint64_t> sizes) {
  grpc::Status s;
  v1::DataReserveResponse resp;
  // A new session may wait for the node to be reachable (up to rpc_timeout),
  // survive a connection that broke (UNAVAILABLE, up to 3 times) and open
  // again once if the node forgot this worker (then it is always retried).
  bool reopened = false;
  int unavailable = 0;
  while (true) {
    grpc::ClientContext ctx;
    ctx.set_wait_for_ready(true);
    ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(options_.rpc_timeout));
    ctx.AddMetadata("authorization", "Bearer " + options_.token);
    v1::DataReserveRequest req;
    const std::string key = Key();
    req.set_worker_key(key);
    req.set_session_id(session);
    for (uint64_t n : sizes) req.add_sizes(n);
    s = impl_->stub->Reserve(&ctx, req, &resp);
    if (s.ok()) return std::vector<uint64_t>(resp.slice_ids().begin(), resp.slice_ids().end());
    if (!reopened && s.error_code() == grpc::StatusCode::UNAUTHENTICATED &&
        s.error_message().find("worker_key") != std::string::npos) {
      if (absl::Status r = Reopen(key); !r.ok()) return r;
      reopened = true;
      continue;
    }
    if (s.error_code() == grpc::StatusCode::UNAVAILABLE && ++unavailable < 3) continue;
    break;
  }
  return FromGrpc(s, "Reserve");
}

absl::Status RemoteRowsClient::Write(uint64_t slice_id, uint64_t offset, absl::Span<const std::byte> data) {
  {
    absl::MutexLock g(&gather_mu_);
    if (UseRows()) {
      for (uint64_t at = 0; at < data.size(); at += rows::kMaxWriteBytes) {
        const uint64_t n = std::min<uint64_t>(rows::kMaxWriteBytes, data.size() - at);
        std::string payload;
        payload.reserve(16 + n);
        rows::Put64(payload, slice_id);
        rows::Put64(payload, offset + at);
        payload.append(reinterpret_cast<const char*>(data.data()) + at, n);
        RETURN_IF_ERROR(RowsCall(rows::kOpWrite, payload, {}));
      }
      return absl::OkStatus();
    }
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(options_.rpc_timeout));
  ctx.AddMetadata("authorization", "Bearer " + options_.token);
  v1::DataWriteResponse resp;
  std::unique_ptr<grpc::ClientWriter<v1::DataWriteChunk>> w = impl_->stub->Write(&ctx, &resp);
  v1::DataWriteChunk chunk;
  chunk.set_worker_key(Key());
  chunk.set_slice_id(slice_id);
  for (uint64_t at = 0; at < data.size() || (at == 0 && data.empty()); at += kChunkBytes) {
    const uint64_t n = std::min<uint64_t>(kChunkBytes, data.size() - at);
    chunk.set_offset(offset + at);
    chunk.set_data(reinterpret_cast<const char*>(data.data()) + at, n);
    if (!w->Write(chunk)) break;  // Finish says why
    chunk.clear_worker_key();
    if (data.empty()) break;
  }
  w->WritesDone();
  if (grpc::Status s = w->Finish(); !s.ok()) return FromGrpc(s, "Write");
  return absl::OkStatus();
}

absl::Status RemoteRowsClient::Gather(absl::Span<const RowRequest> requests, absl::Span<std::byte> out) {
  uint64_t want = 0;
  v1::DataGatherRequest req;
  for (const RowRequest& r : requests) {
    want += static_cast<uint64_t>(r.row_bytes) * r.rows.size();
    v1::RowRange* range = req.add_ranges();
    range->set_slice_id(r.slice_id);
    range->set_offset(r.offset);
    range->set_stride(r.stride);
    range->set_row_bytes(r.row_bytes);
    range->mutable_rows()->Add(r.rows.begin(), r.rows.end());
  }
  if (out.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("out: ", out.size(), " bytes for ", want, " bytes of rows"));
  }
  absl::MutexLock g(&gather_mu_);
  Impl& impl = *impl_;
  if (UseRows()) {
    std::string payload;
    rows::Put32(payload, static_cast<uint32_t>(requests.size()));
    for (const RowRequest& r : requests) {
      rows::Put64(payload, r.slice_id);
      rows::Put64(payload, r.offset);
      rows::Put64(payload, r.stride);
      rows::Put32(payload, r.row_bytes);
      rows::Put32(payload, static_cast<uint32_t>(r.rows.size()));
      payload.append(reinterpret_cast<const char*>(r.rows.data()), 4 * r.rows.size());
    }
    return RowsCall(rows::kOpGather, payload, out);
  }
  const std::string key = Key();
  if (impl.gather != nullptr && impl.stream_key != key) {
    // Opened again since: the node binds a stream to the key it started with.
    impl.gather->WritesDone();
    impl.gather_ctx->TryCancel();
    (void)impl.gather->Finish();
    absl::MutexLock lock(&mu_);
    impl.gather.reset();
    impl.gather_ctx.reset();
  }
  if (impl.gather == nullptr) {
    impl.stream_key = key;
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->AddMetadata("authorization", "Bearer " + options_.token);
    auto stream = impl.stub->Gather(ctx.get());
    absl::MutexLock lock(&mu_);  // the watchdog reads gather_ctx under mu_
    impl.gather_ctx = std::move(ctx);
    impl.gather = std::move(stream);
    req.set_worker_key(key);
  }
  req.set_request_id(impl.next_request++);
  v1::DataGatherResponse resp;
  {
    absl::MutexLock lock(&mu_);
    gather_cancelled_ = false;
    gather_deadline_ = absl::Now() + options_.rpc_timeout;
  }
  const bool answered = impl.gather->Write(req) && impl.gather->Read(&resp);
  bool late = false;
  {
    absl::MutexLock lock(&mu_);
    gather_deadline_ = absl::InfiniteFuture();
    late = gather_cancelled_;
  }
  if (!answered) {
    // The stream broke: its status says why; the next call opens another.
    impl.gather->WritesDone();
    const grpc::Status s = impl.gather->Finish();
    {
      absl::MutexLock lock(&mu_);  // the watchdog reads gather_ctx under mu_
      impl.gather.reset();
      impl.gather_ctx.reset();
    }
    if (late) {
      return absl::DeadlineExceededError(absl::StrCat("kv-host data plane: Gather: no answer from ", options_.target,
                                                      " within ", absl::FormatDuration(options_.rpc_timeout)));
    }
    return s.ok() ? absl::UnavailableError("kv-host data plane: Gather: the stream ended") : FromGrpc(s, "Gather");
  }
  if (resp.request_id() != req.request_id() || resp.rows().size() != want) {
    // Out of step with the node: this stream is no longer to be trusted.
    impl.gather_ctx->TryCancel();
    (void)impl.gather->Finish();
    absl::MutexLock lock(&mu_);
    impl.gather.reset();
    impl.gather_ctx.reset();
    return absl::InternalError(absl::StrCat("kv-host data plane: Gather: answer ", resp.request_id(), " of ",
                                            resp.rows().size(), " bytes for request ", req.request_id(), " of ",
                                            want));
  }
  std::memcpy(out.data(), resp.rows().data(), want);
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> RemoteRowsClient::CloseSession(const std::string& session) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(options_.close_timeout));
  ctx.AddMetadata("authorization", "Bearer " + options_.token);
  v1::DataCloseSessionRequest req;
  req.set_worker_key(Key());
  req.set_session_id(session);
  v1::DataCloseSessionResponse resp;
  if (grpc::Status s = impl_->stub->CloseSession(&ctx, req, &resp); !s.ok()) return FromGrpc(s, "CloseSession");
  return static_cast<uint64_t>(resp.freed_bytes());
}

}  // namespace tailorkv::kvhost
