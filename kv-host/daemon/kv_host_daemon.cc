#include "daemon/kv_host_daemon.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"
#include "daemon/ids.h"
#include "spdlog/spdlog.h"

namespace tailorkv::kvhost {
namespace {

using common::ToGrpcStatus;

constexpr int kMaxSizes = 4096;
constexpr uint32_t kMaxAdoptParts = 4096;

grpc::Status Bad(const std::string& msg) { return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, msg); }

}  // namespace

absl::StatusOr<std::unique_ptr<KvHostDaemon>> KvHostDaemon::Start(KvHostDaemonOptions options) {
  if (options.budget_bytes == 0 || options.budget_bytes % PageSize() != 0) {
    return absl::InvalidArgumentError("budget_bytes: must be a positive multiple of the page size");
  }
  if (options.worker_quota_bytes == 0) options.worker_quota_bytes = options.budget_bytes;
  options.worker_quota_bytes = std::min(options.worker_quota_bytes, options.budget_bytes) / PageSize() * PageSize();
  if (options.worker_quota_bytes == 0) return absl::InvalidArgumentError("worker_quota_bytes: less than one page");
  if (options.arena_bytes == 0 || options.arena_bytes % PageSize() != 0) {
    return absl::InvalidArgumentError("arena_bytes: must be a positive multiple of the page size");
  }
  options.arena_bytes = std::min(options.arena_bytes, options.worker_quota_bytes);
  if (options.fd_socket_path.empty()) return absl::InvalidArgumentError("fd_socket_path: required");
  std::unique_ptr<KvHostDaemon> d(new KvHostDaemon(std::move(options)));
  auto listener = ListenSeqpacket(d->options_.fd_socket_path);
  if (!listener.ok()) return listener.status();
  d->listener_ = std::move(*listener);
  d->wake_.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!d->wake_.valid()) return absl::ErrnoToStatus(errno, "eventfd");
  d->fd_thread_ = std::thread([p = d.get()] { p->FdLoop(); });
  return d;
}

KvHostDaemon::~KvHostDaemon() {
  stopping_.store(true);
  const uint64_t one = 1;
  if (wake_.valid()) (void)!write(wake_.get(), &one, sizeof(one));
  if (fd_thread_.joinable()) fd_thread_.join();
  std::map<std::string, std::shared_ptr<Worker>> workers;
  {
    absl::MutexLock lock(&mu_);
    workers.swap(workers_);
  }
  for (auto& [key, w] : workers) Detach(w, "kv-host stopping");
  unlink(options_.fd_socket_path.c_str());
}

grpc::Status KvHostDaemon::Attach(grpc::ServerContext*, const v1::AttachRequest* req,
                                  v1::AttachResponse* resp) {
  if (!ValidId(req->worker_id())) return Bad("worker_id: must be 1 to 128 bytes of printable ASCII");
  if (draining_.load()) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "kv-host is draining: no new workers");
  absl::MutexLock lock(&mu_);
  const absl::Time now = absl::Now();
  for (auto it = pending_.begin(); it != pending_.end();) {
    it = it->second.expires < now ? pending_.erase(it) : std::next(it);
  }
  if (pending_.size() >= 1024) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "attach: 1024 attaches already pending");
  }
  const uint64_t id = next_attach_id_++;
  PendingAttach& p = pending_[id];
  p.worker_id = req->worker_id();
  p.nonce = RandomHex(16);
  p.expires = now + options_.nonce_ttl;
  resp->set_attach_id(id);
  resp->set_nonce(p.nonce);
  resp->set_fd_socket_path(options_.fd_socket_path);
  resp->set_budget_bytes(static_cast<int64_t>(options_.budget_bytes));
  resp->set_worker_quota_bytes(static_cast<int64_t>(options_.worker_quota_bytes));
  return grpc::Status::OK;
}

absl::StatusOr<std::shared_ptr<KvHostDaemon::Worker>> KvHostDaemon::Authenticate(ScopedFd conn) {
  auto w = AuthenticateHello(conn);
  if (!w.ok() && conn.valid()) {
    // The peer learns why (a wrong uid, a used nonce) instead of a bare EOF.
    v1::FdWelcome refusal;
    refusal.set_refused(std::string(w.status().message()));
    refusal.set_refused_code(static_cast<int32_t>(w.status().code()));
    (void)SendFdMessage(conn.get(), refusal.SerializeAsString(), {}, absl::Milliseconds(100));
  }
  return w;
}

absl::StatusOr<std::shared_ptr<KvHostDaemon::Worker>> KvHostDaemon::AuthenticateHello(ScopedFd& conn) {
  auto msg = ReceiveFdMessage(conn.get(), absl::ZeroDuration());
  if (!msg.ok()) return msg.status();
  // FdAdopt extends FdHello (same first fields): a plain hello has no arenas.
  v1::FdAdopt hello;
  if (!hello.ParseFromString(msg->payload)) return absl::InvalidArgumentError("hello: not an FdHello or FdAdopt");
  if (msg->fds.size() != static_cast<size_t>(hello.arenas_size())) {
    return absl::InvalidArgumentError(absl::StrCat("hello: ", msg->fds.size(), " descriptors for ",
                                                   hello.arenas_size(), " arenas"));
  }
  if (hello.more_parts() > kMaxAdoptParts) {
    return absl::InvalidArgumentError(absl::StrCat("hello: more_parts ", hello.more_parts(), " > ", kMaxAdoptParts));
  }
  // The rest of a large hand-over follows at once (its sender does not wait).
  for (uint32_t part = 1; part <= hello.more_parts(); ++part) {
    auto m = ReceiveFdMessage(conn.get(), options_.send_timeout);
    if (!m.ok()) return absl::Status(m.status().code(), absl::StrCat("adopt part ", part, ": ", m.status().message()));
    v1::FdAdoptPart p;
    if (!p.ParseFromString(m->payload) || m->fds.size() != static_cast<size_t>(p.arenas_size())) {
      return absl::InvalidArgumentError(absl::StrCat("adopt part ", part, ": not an FdAdoptPart with one descriptor per arena"));
    }
    hello.mutable_arenas()->MergeFrom(p.arenas());
    hello.mutable_sessions()->MergeFrom(p.sessions());
    for (ScopedFd& fd : m->fds) msg->fds.push_back(std::move(fd));
  }
  auto cred = PeerCredentialsOf(conn.get());
  if (!cred.ok()) return cred.status();
  const bool uid_ok = cred->uid == getuid() ||
                      std::find(options_.allowed_uids.begin(), options_.allowed_uids.end(), cred->uid) !=
                          options_.allowed_uids.end();
  auto w = std::make_shared<Worker>();
  {
    absl::MutexLock lock(&mu_);
    auto it = pending_.find(hello.attach_id());
    if (it == pending_.end() || it->second.nonce != hello.nonce() || it->second.expires < absl::Now()) {
      // One try per attach: a wrong nonce burns it.
      if (it != pending_.end()) pending_.erase(it);
      return absl::PermissionDeniedError(absl::StrCat("hello: attach ", hello.attach_id(),
                                                      ": unknown, expired or wrong nonce"));
    }
    const PendingAttach p = it->second;
    pending_.erase(it);
    if (!uid_ok) {
      return absl::PermissionDeniedError(absl::StrCat("hello: peer uid ", cred->uid, " is not kv-host's (",
                                                      getuid(), ") nor allowed (--allow-uid)"));
    }
    w->id = p.worker_id;
    w->key = RandomHex(16);
    w->cred = *cred;
    InProcessStoreOptions o;
    o.budget_bytes = options_.worker_quota_bytes;
    // Here only the largest slice: GrowLocked sizes arenas (options_.arena_bytes,
    // or the slice) and checks the shared budget.
    o.arena_bytes = options_.worker_quota_bytes;
    o.grow_on_demand = false;
    o.arena_name_prefix = "tkv-kvhost";
    o.arena = options_.arena;
    auto store = InProcessStore::Create(std::move(o));
    if (!store.ok()) return store.status();
    absl::MutexLock wl(&w->mu);
    w->store = std::move(*store);
    if (hello.arenas_size() > 0) {
      if (absl::Status s = AdoptLocked(*w, hello, msg->fds); !s.ok()) {
        // Nothing adopted: the budget back, the store (and its fds) dropped.
        used_bytes_.fetch_sub(w->store->Stats().reserved_bytes);
        return s;
      }
    }
    v1::FdWelcome welcome;
    welcome.set_worker_key(w->key);
    if (absl::Status s = SendFdMessage(conn.get(), welcome.SerializeAsString(), {}, options_.send_timeout); !s.ok()) {
      return s;
    }
    w->conn = std::move(conn);
    workers_[w->key] = w;
  }
  spdlog::info("kv-host: worker \"{}\" attached (pid {}, uid {})", w->id, w->cred.pid, w->cred.uid);
  return w;
}

absl::Status KvHostDaemon::AdoptLocked(Worker& w, const v1::FdAdopt& adopt, std::vector<ScopedFd>& fds) {
  uint64_t total = 0;
  for (int i = 0; i < adopt.arenas_size(); ++i) total += adopt.arenas(i).bytes();
  if (total > options_.worker_quota_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("adopt: ", total, " bytes of arenas exceed the worker quota ",
                                                     options_.worker_quota_bytes));
  }
  for (int i = 0; i < adopt.arenas_size(); ++i) {
    const v1::FdArena& a = adopt.arenas(i);
    auto memory = MemfdArena::Adopt(std::move(fds[i]), a.bytes());
    if (!memory.ok()) return absl::InvalidArgumentError(absl::StrCat("adopt: arena ", a.arena_id(), ": ", memory.status().message()));
    RETURN_IF_ERROR(TakeBudget(a.bytes(), absl::StrCat("adopting arena ", a.arena_id())));
    if (absl::Status s = w.store->AdoptArena(a.arena_id(), *std::move(memory), "tkv-kvhost-adopted"); !s.ok()) {
      used_bytes_.fetch_sub(a.bytes());
      return s;
    }
    w.arenas.insert(a.arena_id());
  }
  for (const v1::SessionSlices& ss : adopt.sessions()) {
    if (!ValidId(ss.session_id())) return absl::InvalidArgumentError("adopt: a session_id is not printable ASCII");
    std::set<uint64_t>& ids = w.sessions[ss.session_id()];
    for (const v1::Slice& sl : ss.slices()) {
      const HostSlice h{.arena = sl.arena_id(), .offset = sl.offset(), .length = sl.length()};
      if (sl.slice_id() == 0 || w.slices.count(sl.slice_id()) != 0) {
        return absl::InvalidArgumentError(absl::StrCat("adopt: slice_id ", sl.slice_id(), " repeated or 0"));
      }
      if (absl::Status s = w.store->Claim(h, ss.session_id()); !s.ok()) return s;
      w.slices[sl.slice_id()] = h;
      ids.insert(sl.slice_id());
      w.next_slice_id = std::max(w.next_slice_id, sl.slice_id() + 1);
    }
  }
  spdlog::info("kv-host: adopted {} arenas ({} bytes) and {} sessions from worker \"{}\"", adopt.arenas_size(), total,
               w.sessions.size(), w.id);
  return absl::OkStatus();
}

void KvHostDaemon::FdLoop() {
  std::vector<Hello> hellos;
  while (!stopping_.load()) {
    std::vector<pollfd> fds;
    fds.push_back({.fd = wake_.get(), .events = POLLIN, .revents = 0});
    fds.push_back({.fd = listener_.get(), .events = POLLIN, .revents = 0});
    for (const Hello& h : hellos) fds.push_back({.fd = h.conn.get(), .events = POLLIN, .revents = 0});
    const std::vector<std::shared_ptr<Worker>> watched = Workers();
    for (const auto& w : watched) {
      absl::MutexLock wl(&w->mu);
      // Only hang-ups matter on an attached connection (POLLIN: EOF or a
      // stray message, read below).
      fds.push_back({.fd = w->conn.get(), .events = POLLIN, .revents = 0});
    }
    // Wake at least every 100 ms: hello deadlines, and workers attached
    // meanwhile join the poll set.
    (void)poll(fds.data(), fds.size(), 100);
    if (stopping_.load()) break;
    const absl::Time now = absl::Now();
    std::vector<Hello> still;
    if (fds[1].revents & POLLIN) {
      while (true) {
        auto c = AcceptSeqpacket(listener_.get());
        if (!c.ok()) break;
        still.push_back({std::move(*c), now + options_.hello_timeout});  // polled from the next round
      }
    }
    for (size_t i = 0; i < hellos.size(); ++i) {
      const short ev = fds[2 + i].revents;
      if (ev != 0) {
        auto w = Authenticate(std::move(hellos[i].conn));
        if (!w.ok()) spdlog::warn("kv-host: fd channel refused: {}", w.status().ToString());
      } else if (hellos[i].deadline < now) {
        spdlog::warn("kv-host: fd channel closed: no hello within {}", absl::FormatDuration(options_.hello_timeout));
      } else {
        still.push_back(std::move(hellos[i]));
      }
    }
    hellos.swap(still);
    for (size_t i = 0; i < watched.size(); ++i) {
      const pollfd& p = fds[fds.size() - watched.size() + i];
      if (p.revents == 0) continue;
      // Anything from an attached worker: EOF means it is gone; a message
      // is not part of the protocol after the hello.
      int fd;
      {
        absl::MutexLock wl(&watched[i]->mu);
        fd = watched[i]->conn.get();
      }
      auto m = ReceiveFdMessage(fd, absl::ZeroDuration());
      if (m.ok()) {
        Detach(watched[i], "unexpected message after hello");
      } else if (m.status().code() != absl::StatusCode::kDeadlineExceeded) {
        Detach(watched[i], std::string(m.status().message()));
      }
    }
  }
}

void KvHostDaemon::Detach(const std::shared_ptr<Worker>& w, const std::string& why) {
  {
    absl::MutexLock lock(&mu_);
    workers_.erase(w->key);
  }
  std::unique_ptr<InProcessStore> store;
  uint64_t bytes = 0;
  size_t sessions = 0;
  {
    absl::MutexLock wl(&w->mu);
    if (w->detached) return;
    w->detached = true;
    bytes = w->store != nullptr ? w->store->Stats().reserved_bytes : 0;
    sessions = w->sessions.size();
    store = std::move(w->store);
    w->slices.clear();
    w->sessions.clear();
    w->arenas.clear();
    w->conn.reset();
  }
  store.reset();  // closes the memfds: the memory goes once the worker's mappings are gone too
  used_bytes_.fetch_sub(bytes);
  spdlog::info("kv-host: worker \"{}\" (pid {}) detached ({}): freed {} bytes, {} sessions", w->id,
                     w->cred.pid, why, bytes, sessions);
}

std::vector<std::shared_ptr<KvHostDaemon::Worker>> KvHostDaemon::Workers() const {
  std::vector<std::shared_ptr<Worker>> out;
  absl::MutexLock lock(&mu_);
  for (const auto& [key, w] : workers_) out.push_back(w);
  return out;
}

absl::Status KvHostDaemon::TakeBudget(uint64_t bytes, const std::string& what) {
  uint64_t used = used_bytes_.load();
  do {
    if (used + bytes > options_.budget_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat("budget: ", what, " needs ", bytes, " bytes; kv-host holds ",
                                                       used, " of its ", options_.budget_bytes, " bytes (--budget)"));
    }
  } while (!used_bytes_.compare_exchange_weak(used, used + bytes));
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<KvHostDaemon::Worker>> KvHostDaemon::FindWorker(const std::string& key) const {
  absl::MutexLock lock(&mu_);
  auto it = workers_.find(key);
  if (it == workers_.end()) return absl::UnauthenticatedError("worker_key: unknown (attach first; a detached worker must attach again)");
  return it->second;
}

absl::Status KvHostDaemon::GrowLocked(Worker& w, uint64_t size) {
  // A whole number of slices of this size (at least one): an arena of
  // --arena-mib that is not a multiple leaves a tail no such slice fits in
  // (1 GiB arenas of 268.6 MB slices wasted a quarter of the budget).
  const uint64_t need = PageUp(size);
  const uint64_t bytes = need * std::max<uint64_t>(1, options_.arena_bytes / need);
  const HostKvStoreStats st = w.store->Stats();
  if (st.reserved_bytes + bytes > options_.worker_quota_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "worker quota: ", size, " bytes need a new arena of ", bytes, " bytes; worker \"", w.id, "\" holds ",
        st.reserved_bytes, " of its ", options_.worker_quota_bytes, " bytes (--worker-quota; default: the whole --budget)"));
  }
  RETURN_IF_ERROR(TakeBudget(bytes, absl::StrCat("a slice of ", size, " bytes (a new arena)")));
  auto id = w.store->CreateArena(bytes, "tkv-kvhost");
  if (!id.ok()) {
    used_bytes_.fetch_sub(bytes);
    return id.status();
  }
  auto fd = w.store->ArenaFd(*id);
  v1::FdArena msg;
  msg.set_arena_id(*id);
  msg.set_bytes(bytes);
  const int fds[] = {*fd};
  absl::Status sent = SendFdMessage(w.conn.get(), msg.SerializeAsString(), fds, options_.send_timeout);
  if (!sent.ok()) {
    const uint64_t before = w.store->Stats().reserved_bytes;
    (void)w.store->RetireEmptyArenas(before - bytes);  // the new one is the only empty one it may drop
    used_bytes_.fetch_sub(before - w.store->Stats().reserved_bytes);
    return absl::UnavailableError(absl::StrCat("fd channel: arena not delivered: ", sent.message()));
  }
  w.arenas.insert(*id);
  return absl::OkStatus();
}

std::vector<ArenaId> KvHostDaemon::RetireLocked(Worker& w) {
  const uint64_t before = w.store->Stats().reserved_bytes;
  std::vector<ArenaId> ids = w.store->RetireEmptyArenas(options_.warm_bytes);
  used_bytes_.fetch_sub(before - w.store->Stats().reserved_bytes);
  for (ArenaId id : ids) w.arenas.erase(id);
  return ids;
}

grpc::Status KvHostDaemon::Reserve(grpc::ServerContext* ctx, const v1::ReserveRequest* req,
                                   v1::ReserveResponse* resp) {
  // A call whose caller gave up (e.g. it waited while this daemon was
  // stopped) reserves nothing: nobody would close the session.
  if (ctx != nullptr && ctx->IsCancelled()) {
    return grpc::Status(grpc::StatusCode::CANCELLED, "Reserve: the caller gave up before it ran");
  }
  if (!ValidId(req->session_id())) return Bad("session_id: must be 1 to 128 bytes of printable ASCII");
  if (req->sizes_size() < 1 || req->sizes_size() > kMaxSizes) {
    return Bad(absl::StrCat("sizes: ", req->sizes_size(), " sizes, want 1 to ", kMaxSizes));
  }
  for (int i = 0; i < req->sizes_size(); ++i) {
    if (req->sizes(i) == 0 || req->sizes(i) > options_.worker_quota_bytes) {
      return Bad(absl::StrCat("sizes[", i, "]: ", req->sizes(i), " bytes, want 1 to the worker quota ",
                              options_.worker_quota_bytes));
    }
  }
  const uint64_t align = req->alignment() == 0 ? 64 : req->alignment();
  if ((align & (align - 1)) != 0 || align > PageSize()) {
    return Bad(absl::StrCat("alignment: ", req->alignment(), " is not a power of two up to ", PageSize()));
  }
  auto w = FindWorker(req->worker_key());
  if (!w.ok()) return ToGrpcStatus(w.status());
  absl::MutexLock wl(&(*w)->mu);
  Worker& wk = **w;
  if (wk.detached) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "worker detached: its fd channel closed");
  const bool new_session = wk.sessions.find(req->session_id()) == wk.sessions.end();
  if (new_session && draining_.load()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "kv-host is draining: no new sessions");
  }
  const std::set<ArenaId> arenas_before = wk.arenas;
  std::vector<HostSlice> got;
  absl::Status st;
  for (int i = 0; i < req->sizes_size() && st.ok(); ++i) {
    auto s = wk.store->Allocate(req->sizes(i), align, req->session_id());
    if (!s.ok()) {
      st = GrowLocked(wk, req->sizes(i));
      if (st.ok()) s = wk.store->Allocate(req->sizes(i), align, req->session_id());
      if (st.ok() && !s.ok()) st = s.status();
    }
    if (st.ok()) got.push_back(*s);
  }
  if (!st.ok()) {
    // Nothing is held on error: this call's slices back, its new arenas too.
    for (const HostSlice& s : got) (void)wk.store->Free(s);
    RetireLocked(wk);
    return ToGrpcStatus(st);
  }
  std::set<uint64_t>& ids = wk.sessions[req->session_id()];
  for (const HostSlice& s : got) {
    const uint64_t id = wk.next_slice_id++;
    wk.slices[id] = s;
    ids.insert(id);
    v1::Slice* out = resp->add_slices();
    out->set_slice_id(id);
    out->set_arena_id(s.arena);
    out->set_offset(s.offset);
    out->set_length(s.length);
  }
  for (ArenaId a : wk.arenas) {
    if (arenas_before.count(a) == 0) resp->add_new_arena_ids(a);
  }
  return grpc::Status::OK;
}

grpc::Status KvHostDaemon::Release(grpc::ServerContext*, const v1::ReleaseRequest* req, v1::ReleaseResponse*) {
  auto w = FindWorker(req->worker_key());
  if (!w.ok()) return ToGrpcStatus(w.status());
  absl::MutexLock wl(&(*w)->mu);
  Worker& wk = **w;
  auto it = wk.slices.find(req->slice_id());
  if (it == wk.slices.end()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("slice_id: ", req->slice_id(), " is not live"));
  }
  (void)wk.store->Free(it->second);
  for (auto& [name, ids] : wk.sessions) ids.erase(req->slice_id());
  wk.slices.erase(it);
  return grpc::Status::OK;
}

grpc::Status KvHostDaemon::CloseSession(grpc::ServerContext*, const v1::CloseSessionRequest* req,
                                        v1::CloseSessionResponse* resp) {
  auto w = FindWorker(req->worker_key());
  if (!w.ok()) return ToGrpcStatus(w.status());
  absl::MutexLock wl(&(*w)->mu);
  Worker& wk = **w;
  auto it = wk.sessions.find(req->session_id());
  if (it == wk.sessions.end()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("session_id: \"", req->session_id(), "\" is not open"));
  }
  for (uint64_t id : it->second) wk.slices.erase(id);
  wk.sessions.erase(it);
  resp->set_freed_bytes(static_cast<int64_t>(wk.store->FreeOwner(req->session_id())));
  for (ArenaId a : RetireLocked(wk)) resp->add_retired_arena_ids(a);
  return grpc::Status::OK;
}

v1::KvHostStats KvHostDaemon::Stats() const {
  v1::KvHostStats out;
  out.set_budget_bytes(static_cast<int64_t>(options_.budget_bytes));
  out.set_budget_source(options_.budget_source);
  out.set_draining(draining_.load());
  const std::vector<std::shared_ptr<Worker>> workers = Workers();
  int arenas = 0;
  for (const auto& w : workers) {
    absl::MutexLock wl(&w->mu);
    if (w->store == nullptr) continue;
    const HostKvStoreStats st = w->store->Stats();
    v1::WorkerStats* ws = out.add_workers();
    ws->set_worker_id(w->id);
    ws->set_pid(static_cast<uint32_t>(w->cred.pid));
    ws->set_arena_bytes(static_cast<int64_t>(st.reserved_bytes));
    ws->set_reserved_bytes(static_cast<int64_t>(st.allocated_bytes));
    ws->set_arenas(static_cast<int32_t>(st.arena_count));
    arenas += static_cast<int>(st.arena_count);
    for (const auto& [name, ids] : w->sessions) {
      v1::SessionStats* ss = ws->add_sessions();
      ss->set_session_id(name);
      auto b = st.owner_bytes.find(name);
      ss->set_reserved_bytes(b == st.owner_bytes.end() ? 0 : static_cast<int64_t>(b->second));
      ss->set_slices(static_cast<int32_t>(ids.size()));
    }
  }
  out.set_used_bytes(static_cast<int64_t>(used_bytes_.load()));
  out.set_arenas(arenas);
  out.set_attached_workers(static_cast<int32_t>(workers.size()));
  return out;
}

grpc::Status KvHostDaemon::GetStats(grpc::ServerContext*, const v1::GetStatsRequest*, v1::KvHostStats* resp) {
  *resp = Stats();
  return grpc::Status::OK;
}

int KvHostDaemon::OpenSessions() const {
  const std::vector<std::shared_ptr<Worker>> workers = Workers();
  int n = 0;
  for (const auto& w : workers) {
    absl::MutexLock wl(&w->mu);
    n += static_cast<int>(w->sessions.size());
  }
  return n;
}

grpc::Status KvHostDaemon::Drain(grpc::ServerContext* ctx, const v1::DrainRequest*, v1::DrainResponse* resp) {
  BeginDrain();
  const absl::Time deadline = std::min(absl::FromChrono(ctx->deadline()), absl::Now() + absl::Minutes(10));
  int open = OpenSessions();
  while (open > 0 && absl::Now() < deadline && !ctx->IsCancelled()) {
    absl::SleepFor(absl::Milliseconds(20));
    open = OpenSessions();
  }
  resp->set_sessions_open(open);
  if (open > 0) {
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, absl::StrCat(open, " sessions still open"));
  }
  return grpc::Status::OK;
}

}  // namespace tailorkv::kvhost
