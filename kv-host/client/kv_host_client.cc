#include "client/kv_host_client.h"

#include "common/grpc_deadline.h"

#include <sys/socket.h>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"
#include "store/fd_channel.h"
#include "tailorkv/v1/kv_host.grpc.pb.h"

namespace tailorkv::kvhost {

struct KvHostClientStore::Impl {
  std::unique_ptr<v1::KvHost::Stub> stub;
  ScopedFd conn;  // the fd channel
  std::string key;
};

namespace {

absl::Status FromGrpc(const grpc::Status& s, std::string_view what) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat("kv-host ", absl::string_view(what.data(), what.size()), ": ", s.error_message()));
}

std::string Text(std::string_view s) { return std::string(s); }

}  // namespace

KvHostClientStore::KvHostClientStore(KvHostClientOptions options)
    : options_(std::move(options)), impl_(std::make_unique<Impl>()) {}

absl::StatusOr<std::unique_ptr<KvHostClientStore>> KvHostClientStore::Connect(KvHostClientOptions options) {
  if (static_cast<bool>(options.register_fn) != static_cast<bool>(options.unregister_fn)) {
    return absl::InvalidArgumentError("register_fn / unregister_fn: both or neither");
  }
  std::unique_ptr<KvHostClientStore> c(new KvHostClientStore(std::move(options)));
  // A local daemon: reconnect quickly once it is back (gRPC's default
  // backoff grows to minutes while it is away).
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
  c->impl_->stub = v1::KvHost::NewStub(
      grpc::CreateCustomChannel(c->options_.target, grpc::InsecureChannelCredentials(), args));
  if (absl::Status s = c->AttachOnce(/*adopt=*/false); !s.ok()) return s;
  c->reattacher_ = std::thread([p = c.get()] { p->ReattachLoop(); });
  return c;
}

absl::Status KvHostClientStore::AttachOnce(bool adopt) {
  Impl& impl = *impl_;
  grpc::ClientContext ctx;
  common::SetCallTimeout(ctx, options_.rpc_timeout);
  v1::AttachRequest req;
  req.set_worker_id(options_.worker_id);
  v1::AttachResponse resp;
  if (grpc::Status s = impl.stub->Attach(&ctx, req, &resp); !s.ok()) {
    return FromGrpc(s, absl::StrCat("at ", options_.target, ": Attach"));
  }
  auto conn = ConnectSeqpacket(resp.fd_socket_path());
  if (!conn.ok()) return conn.status();
  // FdHello, or with `adopt` FdAdopt and as many FdAdoptPart as the live
  // arenas and slices need (each datagram within the fd channel's limits).
  v1::FdAdopt hello;
  hello.set_attach_id(resp.attach_id());
  hello.set_nonce(resp.nonce());
  std::vector<v1::FdAdoptPart> parts;
  std::vector<std::vector<int>> part_fds(1);
  if (adopt) {
    constexpr int kSlicesPerPart = 1024;  // ~40 bytes each: well within 64 KiB
    absl::MutexLock lock(&mu_);
    auto current_arenas = [&]() { return parts.empty() ? hello.mutable_arenas() : parts.back().mutable_arenas(); };
    for (const auto& [id, a] : arenas_) {
      if (part_fds.back().size() == static_cast<size_t>(kFdMessageMaxFds)) {
        parts.emplace_back();
        part_fds.emplace_back();
      }
      v1::FdArena* fa = current_arenas()->Add();
      fa->set_arena_id(id);
      fa->set_bytes(a.mapping.size());
      part_fds.back().push_back(a.fd.get());
    }
    int in_part = kSlicesPerPart;  // slices start in a part of their own
    std::string owner;
    v1::SessionSlices* ss = nullptr;
    for (const auto& [at, l] : live_) {
      if (in_part == kSlicesPerPart) {
        parts.emplace_back();
        part_fds.emplace_back();
        in_part = 0;
        ss = nullptr;
      }
      if (ss == nullptr || l.owner != owner) {
        ss = parts.back().add_sessions();
        ss->set_session_id(l.owner);
        owner = l.owner;
      }
      v1::Slice* sl = ss->add_slices();
      sl->set_slice_id(l.slice_id);
      sl->set_arena_id(at.first);
      sl->set_offset(at.second);
      sl->set_length(l.length);
      ++in_part;
    }
    hello.set_more_parts(static_cast<uint32_t>(parts.size()));
  }
  if (absl::Status s = SendFdMessage(conn->get(), hello.SerializeAsString(), part_fds[0]); !s.ok()) return s;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (absl::Status s = SendFdMessage(conn->get(), parts[i].SerializeAsString(), part_fds[i + 1]); !s.ok()) return s;
  }
  auto welcome = ReceiveFdMessage(conn->get(), options_.rpc_timeout);
  if (!welcome.ok()) {
    return absl::Status(welcome.status().code(),
                        absl::StrCat("kv-host refused the fd channel (see its log): ", welcome.status().message()));
  }
  v1::FdWelcome w;
  if (w.ParseFromString(welcome->payload) && w.worker_key().empty() && !w.refused().empty()) {
    const auto code = static_cast<absl::StatusCode>(w.refused_code());
    return absl::Status(code == absl::StatusCode::kOk ? absl::StatusCode::kPermissionDenied : code,
                        absl::StrCat("kv-host refused the fd channel: ", w.refused()));
  }
  if (!w.ParseFromString(welcome->payload) || w.worker_key().empty()) {
    return absl::DataLossError("kv-host fd channel: not an FdWelcome");
  }
  {
    absl::MutexLock lock(&mu_);
    impl.key = w.worker_key();
    impl.conn = std::move(*conn);
    lost_ = absl::OkStatus();
    changed_.SignalAll();
  }
  receiver_ = std::thread([this] { ReceiveLoop(); });
  return absl::OkStatus();
}

absl::Status KvHostClientStore::TryReattach() {
  absl::MutexLock once(&reattach_mu_);
  {
    absl::MutexLock lock(&mu_);
    if (lost_.ok()) return absl::OkStatus();
  }
  if (receiver_.joinable()) receiver_.join();  // it ended at the loss
  return AttachOnce(/*adopt=*/true);
}

void KvHostClientStore::ReattachLoop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      while (lost_.ok() && !stopping_) changed_.Wait(&mu_);
      if (stopping_) return;
    }
    const absl::Status s = TryReattach();
    if (s.ok()) {
      spdlog::info("kv-host client: attached again to {}; live arenas handed over", options_.target);
      if (options_.on_attach_change) options_.on_attach_change(true);
      continue;
    }
    absl::MutexLock lock(&mu_);
    last_attach_error_ = s;
    if (!stopping_) changed_.WaitWithTimeout(&mu_, options_.reattach_interval);
  }
}

absl::Status KvHostClientStore::Reattach() {
  const absl::Time deadline = absl::Now() + options_.reattach_timeout;
  absl::MutexLock lock(&mu_);
  const absl::Status why = lost_;
  while (!lost_.ok() && !stopping_) {
    if (changed_.WaitWithDeadline(&mu_, deadline)) break;  // timed out
  }
  if (lost_.ok()) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(why.message(), "; kv-host not back within ",
                                             absl::FormatDuration(options_.reattach_timeout),
                                             last_attach_error_.ok() ? "" : ": ", last_attach_error_.message()));
}

std::string KvHostClientStore::Key() const {
  absl::MutexLock lock(&mu_);
  return impl_->key;
}

KvHostClientStore::~KvHostClientStore() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    changed_.SignalAll();
  }
  if (reattacher_.joinable()) reattacher_.join();
  if (impl_->conn.valid()) shutdown(impl_->conn.get(), SHUT_RDWR);  // wakes the receiver
  if (receiver_.joinable()) receiver_.join();
  std::map<ArenaId, Arena> arenas;
  {
    absl::MutexLock lock(&mu_);
    arenas.swap(arenas_);
  }
  for (auto& [id, a] : arenas) DropArena(a);
}

void KvHostClientStore::DropArena(Arena& a) {
  if (a.registered && options_.unregister_fn) {
    if (absl::Status s = options_.unregister_fn(a.mapping.data(), a.mapping.size()); !s.ok()) {
      spdlog::warn("kv-host client: unregistering an arena: {}", s.ToString());
    }
  }
  a.mapping.reset();
  a.fd.reset();
}

void KvHostClientStore::ReceiveLoop() {
  while (true) {
    auto m = ReceiveFdMessage(impl_->conn.get(), absl::InfiniteDuration());
    absl::Status why;
    if (m.ok()) {
      v1::FdArena msg;
      if (!msg.ParseFromString(m->payload) || m->fds.size() != 1 || msg.bytes() == 0) {
        why = absl::DataLossError("kv-host sent a message that is not one arena");
      } else {
        Arena a;
        a.fd = std::move(m->fds[0]);
        auto map = SharedMapping::Map(a.fd.get(), msg.bytes(), /*writable=*/true, /*populate=*/false);
        if (map.ok()) {
          a.mapping = std::move(*map);
          if (options_.register_fn) {
            absl::Status r = options_.register_fn(a.mapping.data(), a.mapping.size());
            if (!r.ok()) why = absl::Status(r.code(), absl::StrCat("registering arena ", msg.arena_id(), ": ", r.message()));
            a.registered = r.ok();
          }
        } else {
          why = map.status();
        }
        if (why.ok()) {
          absl::MutexLock lock(&mu_);
          arenas_[msg.arena_id()] = std::move(a);
          arrived_.SignalAll();
          continue;
        }
        DropArena(a);
      }
    } else {
      why = m.status();
    }
    // The channel is gone (or spoke nonsense): no more arenas; what is mapped stays.
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;  // our own shutdown
      lost_ = absl::UnavailableError(absl::StrCat("kv-host fd channel closed: ", why.message()));
      last_attach_error_ = absl::OkStatus();
      arrived_.SignalAll();
      changed_.SignalAll();
      spdlog::warn("kv-host client: {}", std::string(lost_.message()));
    }
    if (options_.on_attach_change) options_.on_attach_change(false);
    return;
  }
}

absl::Status KvHostClientStore::Health() const {
  absl::MutexLock lock(&mu_);
  return lost_;
}

absl::StatusOr<ArenaId> KvHostClientStore::CreateArena(uint64_t, std::string_view) {
  return absl::UnimplementedError("kv-host client: arenas are made by kv-host (Allocate asks for slices)");
}

absl::StatusOr<HostSlice> KvHostClientStore::Allocate(uint64_t bytes, uint64_t alignment, std::string_view owner) {
  const uint64_t sizes[] = {bytes};
  auto many = AllocateMany(sizes, alignment, owner);
  if (!many.ok()) return many.status();
  return (*many)[0];
}

absl::StatusOr<std::vector<HostSlice>> KvHostClientStore::AllocateMany(absl::Span<const uint64_t> sizes,
                                                                       uint64_t alignment, std::string_view owner) {
  if (sizes.empty()) return std::vector<HostSlice>();
  if (absl::Status h = Health(); !h.ok()) {
    if (absl::Status r = Reattach(); !r.ok()) return r;
  }
  CloseUnclosed();
  v1::ReserveRequest req;
  req.set_worker_key(Key());
  req.set_session_id(Text(owner));
  for (uint64_t b : sizes) req.add_sizes(b);
  req.set_alignment(alignment);
  v1::ReserveResponse resp;
  grpc::ClientContext ctx;
  common::SetCallTimeout(ctx, options_.rpc_timeout);
  if (grpc::Status s = impl_->stub->Reserve(&ctx, req, &resp); !s.ok()) {
    if (s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED || s.error_code() == grpc::StatusCode::UNAVAILABLE ||
        s.error_code() == grpc::StatusCode::CANCELLED) {
      // The daemon may have reserved (or still reserve) it: close it later.
      absl::MutexLock lock(&mu_);
      unclosed_.insert(Text(owner));
    }
    return FromGrpc(s, "Reserve");
  }
  if (resp.slices_size() != static_cast<int>(sizes.size())) {
    return absl::DataLossError(absl::StrCat("kv-host Reserve: ", resp.slices_size(), " slices for ", sizes.size(), " sizes"));
  }
  absl::MutexLock lock(&mu_);
  // The daemon sent new arenas before replying; the receiver may still be mapping them.
  const absl::Time deadline = absl::Now() + options_.arena_timeout;
  auto mapped = [&] {
    for (uint32_t id : resp.new_arena_ids()) {
      if (arenas_.count(id) == 0) return false;
    }
    return true;
  };
  while (!mapped() && lost_.ok()) {
    if (arrived_.WaitWithDeadline(&mu_, deadline)) break;
  }
  std::vector<HostSlice> out;
  for (const v1::Slice& s : resp.slices()) {
    auto a = arenas_.find(s.arena_id());
    if (a == arenas_.end() || s.offset() + s.length() > a->second.mapping.size() || s.length() != sizes[out.size()]) {
      return absl::DataLossError(absl::StrCat("kv-host Reserve: slice in arena ", s.arena_id(),
                                              " is not inside an arena mapped here",
                                              lost_.ok() ? "" : absl::StrCat(" (", lost_.message(), ")")));
    }
    HostSlice h{.arena = s.arena_id(), .offset = s.offset(), .length = s.length()};
    live_[{h.arena, h.offset}] = Live{.slice_id = s.slice_id(), .length = h.length, .owner = Text(owner)};
    out.push_back(h);
  }
  return out;
}

absl::Status KvHostClientStore::Free(const HostSlice& slice) {
  uint64_t id;
  {
    absl::MutexLock lock(&mu_);
    auto it = live_.find({slice.arena, slice.offset});
    if (it == live_.end()) return absl::InvalidArgumentError("slice: not live");
    id = it->second.slice_id;
    live_.erase(it);
    if (!lost_.ok()) return absl::OkStatus();  // nobody to tell
  }
  v1::ReleaseRequest req;
  req.set_worker_key(Key());
  req.set_slice_id(id);
  v1::ReleaseResponse resp;
  grpc::ClientContext ctx;
  common::SetCallTimeout(ctx, options_.rpc_timeout);
  if (grpc::Status s = impl_->stub->Release(&ctx, req, &resp); !s.ok()) return FromGrpc(s, "Release");
  return absl::OkStatus();
}

uint64_t KvHostClientStore::FreeOwner(std::string_view owner) {
  uint64_t local = 0;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = live_.begin(); it != live_.end();) {
      if (it->second.owner != owner) {
        ++it;
        continue;
      }
      it = live_.erase(it);
      ++local;
    }
    if (local == 0 || !lost_.ok()) return 0;
  }
  absl::StatusOr<uint64_t> freed = CloseSessionRpc(Text(owner));
  if (!freed.ok()) {
    spdlog::warn("kv-host client: {} (closed again before the next reservation)", freed.status().ToString());
    return 0;
  }
  return *freed;
}

size_t KvHostClientStore::unclosed_sessions() const {
  absl::MutexLock lock(&mu_);
  return unclosed_.size();
}

void KvHostClientStore::CloseUnclosed() {
  std::set<std::string> owed;
  {
    absl::MutexLock lock(&mu_);
    if (unclosed_.empty() || !lost_.ok()) return;
    owed = unclosed_;
  }
  for (const std::string& owner : owed) {
    absl::StatusOr<uint64_t> freed = CloseSessionRpc(owner);
    if (freed.ok()) spdlog::info("kv-host client: session {} closed late ({} bytes)", owner, *freed);
  }
}

absl::StatusOr<uint64_t> KvHostClientStore::CloseSessionRpc(const std::string& owner) {
  v1::CloseSessionRequest req;
  req.set_worker_key(Key());
  req.set_session_id(owner);
  v1::CloseSessionResponse resp;
  grpc::ClientContext ctx;
  common::SetCallTimeout(ctx, options_.rpc_timeout);
  const grpc::Status s = impl_->stub->CloseSession(&ctx, req, &resp);
  {
    absl::MutexLock lock(&mu_);
    if (s.ok() || s.error_code() == grpc::StatusCode::NOT_FOUND) {
      unclosed_.erase(owner);
    } else {
      unclosed_.insert(owner);
    }
  }
  if (s.error_code() == grpc::StatusCode::NOT_FOUND) return 0;  // never opened, or already closed
  if (!s.ok()) return FromGrpc(s, "CloseSession");
  std::vector<Arena> gone;
  {
    absl::MutexLock lock(&mu_);
    for (uint32_t id : resp.retired_arena_ids()) {
      auto it = arenas_.find(id);
      if (it == arenas_.end()) continue;
      gone.push_back(std::move(it->second));
      arenas_.erase(it);
    }
  }
  for (Arena& a : gone) DropArena(a);
  return static_cast<uint64_t>(resp.freed_bytes());
}

absl::StatusOr<absl::Span<std::byte>> KvHostClientStore::Data(const HostSlice& slice) {
  absl::MutexLock lock(&mu_);
  if (live_.count({slice.arena, slice.offset}) == 0) return absl::InvalidArgumentError("slice: not live");
  auto a = arenas_.find(slice.arena);
  if (a == arenas_.end() || slice.offset + slice.length > a->second.mapping.size()) {
    return absl::InvalidArgumentError("slice: not inside a mapped arena");
  }
  return absl::Span<std::byte>(a->second.mapping.data() + slice.offset, slice.length);
}

absl::StatusOr<int> KvHostClientStore::ArenaFd(ArenaId arena) const {
  absl::MutexLock lock(&mu_);
  auto a = arenas_.find(arena);
  if (a == arenas_.end()) return absl::NotFoundError(absl::StrCat("arena: ", arena, " is not mapped here"));
  return a->second.fd.get();
}

absl::StatusOr<uint64_t> KvHostClientStore::ArenaBytes(ArenaId arena) const {
  absl::MutexLock lock(&mu_);
  auto a = arenas_.find(arena);
  if (a == arenas_.end()) return absl::NotFoundError(absl::StrCat("arena: ", arena, " is not mapped here"));
  return a->second.mapping.size();
}

HostKvStoreStats KvHostClientStore::Stats() const {
  absl::MutexLock lock(&mu_);
  HostKvStoreStats st;
  for (const auto& [id, a] : arenas_) st.reserved_bytes += a.mapping.size();
  st.arena_count = arenas_.size();
  st.slice_count = live_.size();
  for (const auto& [at, l] : live_) {
    st.allocated_bytes += l.length;
    st.owner_bytes[l.owner] += l.length;
  }
  st.free_bytes = st.reserved_bytes - st.allocated_bytes;
  return st;
}

}  // namespace tailorkv::kvhost
