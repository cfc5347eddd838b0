#include "daemon/data_service.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/same_secret.h"
#include "common/status_macros.h"
#include "daemon/ids.h"
#include "store/remote_rows.h"
#include "store/rows_channel.h"
#include "spdlog/spdlog.h"

namespace tailorkv::kvhost {
namespace {

using common::ToGrpcStatus;

constexpr int kMaxSizes = 4096;
constexpr uint64_t kMaxChunkBytes = uint64_t{4} << 20;

grpc::Status Bad(const std::string& msg) { return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, msg); }

int64_t NowNs() { return absl::ToUnixNanos(absl::Now()); }

}  // namespace

absl::StatusOr<std::unique_ptr<KvHostDataService>> KvHostDataService::Create(KvHostDataOptions options) {
  if (options.token.empty()) return absl::InvalidArgumentError("token: required (the remote data plane carries user data)");
  if (options.budget_bytes == 0) return absl::InvalidArgumentError("budget_bytes: must be > 0");
  if (!options.take_budget || !options.return_budget || !options.free_bytes) {
    return absl::InvalidArgumentError("take_budget / return_budget / free_bytes: required");
  }
  if (options.arena_bytes == 0 || options.arena_bytes % PageSize() != 0) {
    return absl::InvalidArgumentError("arena_bytes: must be a positive multiple of the page size");
  }
  if (options.lease <= absl::ZeroDuration()) return absl::InvalidArgumentError("lease: must be > 0");
  std::unique_ptr<KvHostDataService> s(new KvHostDataService(std::move(options)));
  if (!s->options_.rows_listen.empty()) RETURN_IF_ERROR(s->StartRowsChannel());
  s->reaper_ = std::thread([p = s.get()] { p->ReapLoop(); });
  return s;
}

KvHostDataService::~KvHostDataService() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (reaper_.joinable()) reaper_.join();
  if (rows_listener_.valid()) ::shutdown(rows_listener_.get(), SHUT_RDWR);
  if (acceptor_.joinable()) acceptor_.join();
  std::map<int, std::thread> conns;
  std::vector<std::thread> finished;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [fd, t] : rows_conns_) ::shutdown(fd, SHUT_RDWR);  // their reads end
    conns.swap(rows_conns_);
    finished.swap(finished_conns_);
  }
  for (auto& [fd, t] : conns) t.join();
  for (auto& t : finished) t.join();
  absl::MutexLock lock(&mu_);
  workers_.clear();  // each store frees its arenas (and returns their budget)
}

absl::Status KvHostDataService::StartRowsChannel() {
  const std::string& listen = options_.rows_listen;
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) return absl::InvalidArgumentError(absl::StrCat("rows_listen: want host:port, got '", listen, "'"));
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE;
  addrinfo* res = nullptr;
  if (int e = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), listen.substr(colon + 1).c_str(), &hints, &res); e != 0) {
    return absl::InvalidArgumentError(absl::StrCat("rows_listen: '", listen, "': ", gai_strerror(e)));
  }
  ScopedFd fd(::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  const int one = 1;
  const bool ok = fd.valid() && ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0 &&
                  ::bind(fd.get(), res->ai_addr, res->ai_addrlen) == 0 && ::listen(fd.get(), 64) == 0;
  ::freeaddrinfo(res);
  if (!ok) return absl::UnavailableError(absl::StrCat("rows_listen ", listen, ": ", strerror(errno)));
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &len);
  rows_port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                                  : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  rows_listener_ = std::move(fd);
  acceptor_ = std::thread([this] { AcceptLoop(); });
  spdlog::info("kv-host data: rows channel on port {}", rows_port_);
  return absl::OkStatus();
}

void KvHostDataService::AcceptLoop() {
  while (true) {
    const int c = ::accept4(rows_listener_.get(), nullptr, nullptr, SOCK_CLOEXEC);
    absl::MutexLock lock(&mu_);
    if (stopping_) {
      if (c >= 0) ::close(c);
      return;
    }
    if (c < 0) {
      if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) continue;
      return;  // the listener was shut down
    }
    // Threads of connections that ended are joined here, not piled up.
    for (auto& t : finished_conns_) t.join();
    finished_conns_.clear();
    rows_conns_[c] = std::thread([this, c] { ServeRows(c); });
  }
}

void KvHostDataService::ServeRows(int fd) {
  using namespace rows;
  auto serve = [&]() -> absl::Status {
    RETURN_IF_ERROR(SetSocketOptions(fd, 5000));  // the hello must come soon
    char hello[8 + kTicketBytes];
    RETURN_IF_ERROR(ReadFull(fd, hello, sizeof(hello)));
    std::string reply;
    std::shared_ptr<Worker> w;
    if (Get32(hello) != kMagic || Get32(hello + 4) != kVersion) {
      return absl::InvalidArgumentError("rows channel: not a tailorkv rows client (magic/version)");
    }
    {
      absl::MutexLock lock(&mu_);
      auto it = tickets_.find(std::string(hello + 8, kTicketBytes));
      if (it != tickets_.end() && it->second.expires > absl::Now()) w = it->second.worker.lock();
      if (it != tickets_.end()) tickets_.erase(it);  // one use
    }
    const std::string msg = w == nullptr ? "ticket: unknown, used or expired (ask Ticket again)" : "";
    Put32(reply, static_cast<uint32_t>(w == nullptr ? absl::StatusCode::kUnauthenticated : absl::StatusCode::kOk));
    Put32(reply, static_cast<uint32_t>(msg.size()));
    reply += msg;
    RETURN_IF_ERROR(WriteFull(fd, reply.data(), reply.size()));
    if (w == nullptr) return absl::UnauthenticatedError(msg);
    RETURN_IF_ERROR(SetSocketOptions(fd, 0));  // an idle worker may say nothing for long
    std::string payload, data;
    while (true) {
      char head[20];
      RETURN_IF_ERROR(ReadFull(fd, head, sizeof(head)));
      const uint32_t op = Get32(head);
      const uint64_t id = Get64(head + 4), n = Get64(head + 12);
      if ((op != kOpGather && op != kOpWrite) || n > kMaxPayloadBytes) {
        return absl::InvalidArgumentError(absl::StrCat("rows channel: bad frame (op ", op, ", ", n, " bytes)"));
      }
      payload.resize(n);
      RETURN_IF_ERROR(ReadFull(fd, payload.data(), n));
      w->last_seen_ns.store(NowNs());
      absl::Status st;
      data.clear();
      const char* p = payload.data();
      const char* end = p + n;
      if (op == kOpWrite) {
        if (n < 16) return absl::InvalidArgumentError("rows channel: short write frame");
        const uint64_t slice = Get64(p), offset = Get64(p + 8);
        absl::MutexLock wl(&w->mu);
        auto dst = At(*w, slice, offset, n - 16);
        st = dst.status();
        if (st.ok()) std::memcpy(*dst, p + 16, n - 16);
      } else {
        if (n < 4) return absl::InvalidArgumentError("rows channel: short gather frame");
        const uint32_t count = Get32(p);
        p += 4;
        std::vector<Range> ranges;
        for (uint32_t i = 0; i < count; ++i) {
          if (end - p < 32) return absl::InvalidArgumentError("rows channel: truncated range");
          Range r{Get64(p), Get64(p + 8), Get64(p + 16), Get32(p + 24), nullptr, Get32(p + 28)};
          p += 32;
          if (static_cast<uint64_t>(end - p) < 4ull * r.n_rows) return absl::InvalidArgumentError("rows channel: truncated rows");
          r.rows = reinterpret_cast<const uint32_t*>(p);  // payload is std::string storage: aligned
          p += 4ull * r.n_rows;
          ranges.push_back(r);
        }
        auto total = RowBytes(ranges);
        st = total.status();
        if (st.ok()) {
          data.resize(*total);
          st = CopyRows(*w, ranges, data.data());
          if (!st.ok()) data.clear();
        }
      }
      const std::string m(st.message());
      std::string head_out;
      Put64(head_out, id);
      Put32(head_out, static_cast<uint32_t>(st.code()));
      Put32(head_out, static_cast<uint32_t>(m.size()));
      Put64(head_out, data.size());
      head_out += m;
      RETURN_IF_ERROR(WriteFull(fd, head_out.data(), head_out.size()));
      if (!data.empty()) RETURN_IF_ERROR(WriteFull(fd, data.data(), data.size()));
    }
  };
  const absl::Status st = serve();
  if (!absl::IsUnavailable(st)) spdlog::warn("kv-host data: rows connection closed: {}", st.ToString());
  absl::MutexLock lock(&mu_);
  ::close(fd);
  auto it = rows_conns_.find(fd);
  if (it != rows_conns_.end()) {  // not when the destructor took them
    finished_conns_.push_back(std::move(it->second));
    rows_conns_.erase(it);
  }
}

grpc::Status KvHostDataService::Ticket(grpc::ServerContext* ctx, const v1::DataTicketRequest* req,
                                       v1::DataTicketResponse* resp) {
  if (grpc::Status t = CheckToken(ctx); !t.ok()) return t;
  auto w = Find(req->worker_key());
  if (!w.ok()) return ToGrpcStatus(w.status());
  resp->set_rows_port(rows_port_);
  if (rows_port_ == 0) return grpc::Status::OK;
  const std::string ticket = RandomHex(rows::kTicketBytes / 2);
  absl::MutexLock lock(&mu_);
  const absl::Time now = absl::Now();
  for (auto it = tickets_.begin(); it != tickets_.end();) it = it->second.expires < now ? tickets_.erase(it) : std::next(it);
  tickets_[ticket] = {*w, now + absl::Seconds(10)};
  resp->set_ticket(ticket);
  return grpc::Status::OK;
}

void KvHostDataService::ReapLoop() {
  const absl::Duration tick = std::min(options_.lease / 4, absl::Seconds(1));
  absl::MutexLock lock(&mu_);
  while (!stopping_) {
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), tick);
    if (stopping_) break;
    const int64_t cutoff = NowNs() - absl::ToInt64Nanoseconds(options_.lease);
    for (auto it = workers_.begin(); it != workers_.end();) {
      if (it->second->last_seen_ns.load() < cutoff) {
        spdlog::warn("kv-host data: worker \"{}\" silent for over {}: freeing what it held", it->second->id,
                     absl::FormatDuration(options_.lease));
        it = workers_.erase(it);  // its store goes when the last call using it ends
      } else {
        ++it;
      }
    }
  }
}

grpc::Status KvHostDataService::CheckToken(const grpc::ServerContext* ctx) const {
  const auto& md = ctx->client_metadata();
  const auto it = md.find("authorization");
  if (it != md.end() && common::SameSecret(std::string_view(it->second.data(), it->second.size()), "Bearer " + options_.token)) {
    return grpc::Status::OK;
  }
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                      "authorization: 'Bearer <token>' metadata with kv-host's --data-token is required");
}

absl::StatusOr<std::shared_ptr<KvHostDataService::Worker>> KvHostDataService::Find(const std::string& key) {
  absl::MutexLock lock(&mu_);
  auto it = workers_.find(key);
  if (it == workers_.end()) {
    return absl::UnauthenticatedError("worker_key: unknown (Open first; a worker silent past its lease must open again)");
  }
  it->second->last_seen_ns.store(NowNs());
  return it->second;
}

absl::StatusOr<std::byte*> KvHostDataService::At(Worker& w, uint64_t slice_id, uint64_t offset, uint64_t length) {
  auto it = w.slices.find(slice_id);
  if (it == w.slices.end()) return absl::NotFoundError(absl::StrCat("slice_id: ", slice_id, " is not a live slice"));
  const HostSlice& s = it->second;
  if (offset > s.length || length > s.length - offset) {
    return absl::OutOfRangeError(absl::StrCat("offset: ", offset, " + ", length, " bytes past slice ", slice_id,
                                              " of ", s.length, " bytes"));
  }
  ASSIGN_OR_RETURN(absl::Span<std::byte> data, w.store->Data(s));
  return data.data() + offset;
}

absl::StatusOr<uint64_t> KvHostDataService::RowBytes(absl::Span<const Range> ranges) {
  uint64_t total = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const Range& r = ranges[i];
    if (r.row_bytes == 0 || r.stride < r.row_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("ranges[", i, "]: row_bytes ", r.row_bytes, " must be > 0 and <= stride ", r.stride));
    }
    total += static_cast<uint64_t>(r.row_bytes) * r.n_rows;
    if (total > kMaxGatherBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("ranges: over ", kMaxGatherBytes, " bytes of rows in one request"));
    }
  }
  return total;
}

absl::Status KvHostDataService::CopyRows(Worker& w, absl::Span<const Range> ranges, char* dst) {
  absl::MutexLock wl(&w.mu);
  for (size_t i = 0; i < ranges.size(); ++i) {
    const Range& r = ranges[i];
    // The slice once per range (a lookup per row cost more than the copy),
    // then every row checked against its length.
    auto base = At(w, r.slice, 0, 0);
    if (!base.ok()) return absl::Status(base.status().code(), absl::StrCat("ranges[", i, "]: ", base.status().message()));
    const uint64_t length = w.slices.at(r.slice).length;
    const char* src = reinterpret_cast<const char*>(*base);
    for (uint32_t j = 0; j < r.n_rows; ++j) {
      const uint32_t row = r.rows[j];
      const uint64_t at = r.offset + static_cast<uint64_t>(row) * r.stride;
      if (r.offset > length || static_cast<uint64_t>(row) > (length - r.offset) / r.stride ||
          at + r.row_bytes > length) {
        return absl::OutOfRangeError(absl::StrCat("ranges[", i, "] row ", row, ": offset ", at, " + ", r.row_bytes,
                                                  " bytes past slice ", r.slice, " of ", length, " bytes"));
      }
      if (j + 4 < r.n_rows) {  // rows are scattered: fetch ahead
        __builtin_prefetch(src + r.offset + static_cast<uint64_t>(r.rows[j + 4]) * r.stride);
        __builtin_prefetch(src + r.offset + static_cast<uint64_t>(r.rows[j + 4]) * r.stride + 128);
      }
      std::memcpy(dst, src + at, r.row_bytes);
      dst += r.row_bytes;
    }
  }
  return absl::OkStatus();
}

grpc::Status KvHostDataService::Open(grpc::ServerContext* ctx, const v1::DataOpenRequest* req,
                                     v1::DataOpenResponse* resp) {
  if (grpc::Status t = CheckToken(ctx); !t.ok()) return t;
  if (!ValidId(req->worker_id())) return Bad("worker_id: must be 1 to 128 bytes of printable ASCII");
  if (draining_.load()) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "kv-host is draining: no new workers");
  auto w = std::make_shared<Worker>();
  w->id = req->worker_id();
  w->last_seen_ns.store(NowNs());
  InProcessStoreOptions o;
  // The store's own limit is the node's; the node's counter decides, arena
  // by arena, through the registration hooks.
  o.budget_bytes = options_.budget_bytes / PageSize() * PageSize();
  // Here only the largest slice: Reserve sizes arenas (whole numbers of
  // the slice it needs room for), as the co-located daemon does.
  o.arena_bytes = o.budget_bytes;
  o.grow_on_demand = false;
  o.arena_name_prefix = "tkv-remote";
  o.arena = options_.arena;
  o.register_fn = [this](void*, size_t bytes) {
    return options_.take_budget(bytes, "a remote worker's new arena");
  };
  o.unregister_fn = [this](void*, size_t bytes) {
    options_.return_budget(bytes);
    return absl::OkStatus();
  };
  auto store = InProcessStore::Create(std::move(o));
  if (!store.ok()) return ToGrpcStatus(store.status());
  {
    absl::MutexLock wl(&w->mu);
    w->store = std::move(*store);
  }
  const std::string key = RandomHex(16);
  {
    absl::MutexLock lock(&mu_);
    workers_[key] = w;
  }
  spdlog::info("kv-host data: worker \"{}\" opened from {}", w->id, ctx->peer());
  resp->set_worker_key(key);
  resp->set_lease_ms(absl::ToInt64Milliseconds(options_.lease));
  resp->set_budget_bytes(static_cast<int64_t>(options_.budget_bytes));
  resp->set_free_bytes(static_cast<int64_t>(options_.free_bytes()));
  return grpc::Status::OK;
}

grpc::Status KvHostDataService::Reserve(grpc::ServerContext* ctx, const v1::DataReserveRequest* req,
                                        v1::DataReserveResponse* resp) {
  if (grpc::Status t = CheckToken(ctx); !t.ok()) return t;
  if (!ValidId(req->session_id())) return Bad("session_id: must be 1 to 128 bytes of printable ASCII");
  if (req->sizes_size() < 1 || req->sizes_size() > kMaxSizes) {
    return Bad(absl::StrCat("sizes: ", req->sizes_size(), " sizes, want 1 to ", kMaxSizes));
  }
  for (int i = 0; i < req->sizes_size(); ++i) {
    if (req->sizes(i) == 0 || req->sizes(i) > options_.budget_bytes) {
      return Bad(absl::StrCat("sizes[", i, "]: ", req->sizes(i), " bytes, want 1 to the budget ", options_.budget_bytes));
    }
  }
  auto w = Find(req->worker_key());
  if (!w.ok()) return ToGrpcStatus(w.status());
  Worker& wk = **w;
  absl::MutexLock wl(&wk.mu);
  if (wk.sessions.find(req->session_id()) == wk.sessions.end() && draining_.load()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "kv-host is draining: no new sessions");
  }
  std::vector<HostSlice> got;
  absl::Status st;
  for (int i = 0; i < req->sizes_size() && st.ok(); ++i) {
    const uint64_t size = req->sizes(i);
    auto s = wk.store->Allocate(size, 64, req->session_id());
    if (!s.ok()) {
      // A whole number of such slices per arena (as the co-located daemon).
      const uint64_t need = PageUp(size);
      auto id = wk.store->CreateArena(need * std::max<uint64_t>(1, options_.arena_bytes / need), "tkv-remote");
      st = id.status();
      if (st.ok()) s = wk.store->Allocate(size, 64, req->session_id());
      if (st.ok() && !s.ok()) st = s.status();
    }
    if (st.ok()) got.push_back(*s);
  }
  if (!st.ok()) {
    for (const HostSlice& s : got) (void)wk.store->Free(s);
    (void)wk.store->RetireEmptyArenas(0);
    return ToGrpcStatus(st);
  }
  std::set<uint64_t>& ids = wk.sessions[req->session_id()];
  for (const HostSlice& s : got) {
    const uint64_t id = wk.next_slice_id++;
    wk.slices[id] = s;
    ids.insert(id);
    resp->add_slice_ids(id);
  }
  return grpc::Status::OK;
}

grpc::Status KvHostDataService::Write(grpc::ServerContext* ctx, grpc::ServerReader<v1::DataWriteChunk>* reader,
                                      v1::DataWriteResponse* resp) {
  if (grpc::Status t = CheckToken(ctx); !t.ok()) return t;
  std::shared_ptr<Worker> w;
  int64_t written = 0;
  v1::DataWriteChunk chunk;
  while (reader->Read(&chunk)) {
    if (w == nullptr || !chunk.worker_key().empty()) {
      auto f = Find(chunk.worker_key());
      if (!f.ok()) return ToGrpcStatus(f.status());
      w = *f;
    } else {
      w->last_seen_ns.store(NowNs());
    }
    if (chunk.data().size() > kMaxChunkBytes) {
      return Bad(absl::StrCat("data: ", chunk.data().size(), " bytes in one chunk, want at most ", kMaxChunkBytes));
    }
    absl::MutexLock wl(&w->mu);
    auto dst = At(*w, chunk.slice_id(), chunk.offset(), chunk.data().size());
    if (!dst.ok()) return ToGrpcStatus(dst.status());
    std::memcpy(*dst, chunk.data().data(), chunk.data().size());
    written += static_cast<int64_t>(chunk.data().size());
  }
  resp->set_bytes_written(written);
  return grpc::Status::OK;
}

grpc::Status KvHostDataService::Gather(
    grpc::ServerContext* ctx, grpc::ServerReaderWriter<v1::DataGatherResponse, v1::DataGatherRequest>* stream) {
  if (grpc::Status t = CheckToken(ctx); !t.ok()) return t;
  std::shared_ptr<Worker> w;
  v1::DataGatherRequest req;
  v1::DataGatherResponse resp;
  while (stream->Read(&req)) {
    if (w == nullptr || !req.worker_key().empty()) {
      auto f = Find(req.worker_key());
      if (!f.ok()) return ToGrpcStatus(f.status());
      w = *f;
    } else {
      w->last_seen_ns.store(NowNs());
    }
    std::vector<Range> ranges;
    for (const v1::RowRange& r : req.ranges()) {
      ranges.push_back({r.slice_id(), r.offset(), r.stride(), r.row_bytes(), r.rows().data(),
                        static_cast<uint32_t>(r.rows_size())});
    }
    auto total = RowBytes(ranges);
    if (!total.ok()) return ToGrpcStatus(total.status());
    resp.Clear();
    resp.set_request_id(req.request_id());
    std::string* out = resp.mutable_rows();
    out->resize(*total);
    if (absl::Status st = CopyRows(*w, ranges, out->data()); !st.ok()) return ToGrpcStatus(st);
    if (!stream->Write(resp)) break;  // the worker went away
  }
  return grpc::Status::OK;
}

grpc::Status KvHostDataService::CloseSession(grpc::ServerContext* ctx, const v1::DataCloseSessionRequest* req,
                                             v1::DataCloseSessionResponse* resp) {
  if (grpc::Status t = CheckToken(ctx); !t.ok()) return t;
  auto w = Find(req->worker_key());
  if (!w.ok()) return ToGrpcStatus(w.status());
  absl::MutexLock wl(&(*w)->mu);
  Worker& wk = **w;
  auto it = wk.sessions.find(req->session_id());
  if (it == wk.sessions.end()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("session_id: no open session \"",
                                                                  req->session_id().substr(0, 128), "\""));
  }
  for (uint64_t id : it->second) wk.slices.erase(id);
  wk.sessions.erase(it);
  resp->set_freed_bytes(static_cast<int64_t>(wk.store->FreeOwner(req->session_id())));
  (void)wk.store->RetireEmptyArenas(0);  // back to the node's budget at once
  return grpc::Status::OK;
}

grpc::Status KvHostDataService::KeepAlive(grpc::ServerContext* ctx, const v1::DataKeepAliveRequest* req,
                                          v1::DataKeepAliveResponse* resp) {
  if (grpc::Status t = CheckToken(ctx); !t.ok()) return t;
  auto w = Find(req->worker_key());
  if (!w.ok()) return ToGrpcStatus(w.status());
  resp->set_free_bytes(static_cast<int64_t>(options_.free_bytes()));
  return grpc::Status::OK;
}

int KvHostDataService::Workers() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(workers_.size());
}

int KvHostDataService::OpenSessions() const {
  absl::MutexLock lock(&mu_);
  int n = 0;
  for (const auto& [key, w] : workers_) {
    absl::MutexLock wl(&w->mu);
    n += static_cast<int>(w->sessions.size());
  }
  return n;
}

uint64_t KvHostDataService::HeldBytes() const {
  absl::MutexLock lock(&mu_);
  uint64_t n = 0;
  for (const auto& [key, w] : workers_) {
    absl::MutexLock wl(&w->mu);
    n += w->store->Stats().reserved_bytes;
  }
  return n;
}

}  // namespace tailorkv::kvhost
