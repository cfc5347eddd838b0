#include "client/remote_rows_client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"
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
  c->key_ = resp.worker_key();
  c->lease_ = absl::Milliseconds(resp.lease_ms());
  c->budget_bytes_ = static_cast<uint64_t>(resp.budget_bytes());
  c->free_bytes_.store(static_cast<uint64_t>(resp.free_bytes()));
  c->keepalive_ = std::thread([p = c.get()] { p->KeepAliveLoop(); });
  return c;
}

RemoteRowsClient::~RemoteRowsClient() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (keepalive_.joinable()) keepalive_.join();
  absl::MutexLock g(&gather_mu_);
  if (impl_->gather != nullptr) {
    impl_->gather->WritesDone();
    (void)impl_->gather->Finish();
  }
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
    req.set_worker_key(key_);
    v1::DataKeepAliveResponse resp;
    const grpc::Status s = impl_->stub->KeepAlive(&ctx, req, &resp);
    if (s.ok()) {
      free_bytes_.store(static_cast<uint64_t>(resp.free_bytes()));
    } else {
      spdlog::warn("kv-host data plane {}: KeepAlive: {}", options_.target, s.error_message());
    }
    mu_.Lock();
  }
}

absl::StatusOr<std::vector<uint64_t>> RemoteRowsClient::Reserve(const std::string& session,
                                                                 absl::Span<const uint64_t> sizes) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(options_.rpc_timeout));
  ctx.AddMetadata("authorization", "Bearer " + options_.token);
  v1::DataReserveRequest req;
  req.set_worker_key(key_);
  req.set_session_id(session);
  for (uint64_t s : sizes) req.add_sizes(s);
  v1::DataReserveResponse resp;
  if (grpc::Status s = impl_->stub->Reserve(&ctx, req, &resp); !s.ok()) return FromGrpc(s, "Reserve");
  return std::vector<uint64_t>(resp.slice_ids().begin(), resp.slice_ids().end());
}

absl::Status RemoteRowsClient::Write(uint64_t slice_id, uint64_t offset, absl::Span<const std::byte> data) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(options_.rpc_timeout));
  ctx.AddMetadata("authorization", "Bearer " + options_.token);
  v1::DataWriteResponse resp;
  std::unique_ptr<grpc::ClientWriter<v1::DataWriteChunk>> w = impl_->stub->Write(&ctx, &resp);
  v1::DataWriteChunk chunk;
  chunk.set_worker_key(key_);
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
  if (impl.gather == nullptr) {
    impl.gather_ctx = std::make_unique<grpc::ClientContext>();
    impl.gather_ctx->AddMetadata("authorization", "Bearer " + options_.token);
    impl.gather = impl.stub->Gather(impl.gather_ctx.get());
    req.set_worker_key(key_);
  }
  req.set_request_id(impl.next_request++);
  v1::DataGatherResponse resp;
  if (!impl.gather->Write(req) || !impl.gather->Read(&resp)) {
    // The stream broke: its status says why; the next call opens another.
    impl.gather->WritesDone();
    const grpc::Status s = impl.gather->Finish();
    impl.gather.reset();
    impl.gather_ctx.reset();
    return s.ok() ? absl::UnavailableError("kv-host data plane: Gather: the stream ended") : FromGrpc(s, "Gather");
  }
  if (resp.request_id() != req.request_id() || resp.rows().size() != want) {
    // Out of step with the node: this stream is no longer to be trusted.
    impl.gather_ctx->TryCancel();
    (void)impl.gather->Finish();
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
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(options_.rpc_timeout));
  ctx.AddMetadata("authorization", "Bearer " + options_.token);
  v1::DataCloseSessionRequest req;
  req.set_worker_key(key_);
  req.set_session_id(session);
  v1::DataCloseSessionResponse resp;
  if (grpc::Status s = impl_->stub->CloseSession(&ctx, req, &resp); !s.ok()) return FromGrpc(s, "CloseSession");
  return static_cast<uint64_t>(resp.freed_bytes());
}

}  // namespace tailorkv::kvhost
