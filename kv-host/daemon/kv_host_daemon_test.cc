// kv-host's daemon and the worker's client store over real sockets: the
// control plane on a UNIX-socket gRPC server, arenas crossing the fd channel,
// accounting, bad input, and peers that stall, lie or die.
#include "daemon/kv_host_daemon.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "client/kv_host_client.h"
#include "common/grpc_server.h"
#include "gtest/gtest.h"
#include "store/fd_channel.h"

namespace tailorkv::kvhost {
namespace {

const uint64_t kPage = PageSize();

class KvHostDaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) / absl::StrCat("kvh-", getpid(), "-", counter_++);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    server_.reset();
    daemon_.reset();
    std::filesystem::remove_all(dir_);
  }
  void Start(KvHostDaemonOptions o) {
    if (o.budget_bytes == 0) o.budget_bytes = 64 * kPage;
    o.fd_socket_path = (dir_ / "kv.fd").string();
    o.hello_timeout = absl::Milliseconds(300);
    auto d = KvHostDaemon::Start(std::move(o));
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = std::move(*d);
    common::ServerOptions so;
    so.listen_address = "unix:" + (dir_ / "kv.sock").string();
    so.drain_grace_ms = 100;
    auto s = common::GrpcServer::Start(so, {{"tailorkv.v1.KvHost", daemon_.get()}});
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
  }
  std::string Target() const { return "unix:" + (dir_ / "kv.sock").string(); }
  std::unique_ptr<KvHostClientStore> Client(const std::string& id = "w1") {
    auto c = KvHostClientStore::Connect({.target = Target(), .worker_id = id});
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }
  std::unique_ptr<v1::KvHost::Stub> Stub() {
    return v1::KvHost::NewStub(grpc::CreateChannel(Target(), grpc::InsecureChannelCredentials()));
  }
  // Waits up to `limit` for `pred` on the daemon's stats.
  template <typename Pred>
  bool WaitStats(Pred pred, absl::Duration limit = absl::Seconds(1)) {
    const absl::Time until = absl::Now() + limit;
    while (!pred(daemon_->Stats())) {
      if (absl::Now() > until) return false;
      absl::SleepFor(absl::Milliseconds(5));
    }
    return true;
  }

  static inline int counter_ = 0;
  std::filesystem::path dir_;
  std::unique_ptr<KvHostDaemon> daemon_;
  std::unique_ptr<common::GrpcServer> server_;
};

// One Reserve for a whole session; the worker writes through its mapping;
// closing the session frees it and retires the arenas beyond the warm ones.
TEST_F(KvHostDaemonTest, SessionSlicesAreMappedAccountedAndRetired) {
  Start({.arena_bytes = 8 * kPage, .warm_bytes = 8 * kPage});
  auto c = Client();
  ASSERT_NE(c, nullptr);
  const uint64_t sizes[] = {3 * kPage + 5, 100, 12 * kPage};  // the last needs its own arena
  auto slices = c->AllocateMany(sizes, 64, "seq-1");
  ASSERT_TRUE(slices.ok()) << slices.status();
  ASSERT_EQ(slices->size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ((*slices)[i].length, sizes[i]);
    EXPECT_EQ((*slices)[i].offset % 64, 0u);
    auto data = c->Data((*slices)[i]);
    ASSERT_TRUE(data.ok()) << data.status();
    std::memset(data->data(), static_cast<int>(i + 1), data->size());
  }
  // Each slice keeps its own bytes (no overlap).
  for (size_t i = 0; i < 3; ++i) {
    auto data = c->Data((*slices)[i]);
    for (std::byte b : *data) ASSERT_EQ(b, std::byte(i + 1));
  }
  v1::KvHostStats st = daemon_->Stats();
  ASSERT_EQ(st.workers_size(), 1);
  EXPECT_EQ(st.workers(0).worker_id(), "w1");
  EXPECT_EQ(st.workers(0).pid(), static_cast<uint32_t>(getpid()));
  ASSERT_EQ(st.workers(0).sessions_size(), 1);
  EXPECT_EQ(st.workers(0).sessions(0).session_id(), "seq-1");
  EXPECT_EQ(st.workers(0).sessions(0).slices(), 3);
  EXPECT_EQ(st.used_bytes(), static_cast<int64_t>(8 * kPage + 12 * kPage));
  EXPECT_EQ(c->Stats().reserved_bytes, 20 * kPage);
  // A second session; then the first closes.
  ASSERT_TRUE(c->Allocate(kPage, 4096, "seq-2").ok());
  EXPECT_EQ(c->FreeOwner("seq-1"), sizes[0] + sizes[1] + sizes[2]);
  st = daemon_->Stats();
  ASSERT_EQ(st.workers(0).sessions_size(), 1);
  EXPECT_EQ(st.workers(0).sessions(0).session_id(), "seq-2");
  EXPECT_EQ(st.used_bytes(), static_cast<int64_t>(8 * kPage));  // the 12-page arena went back
  EXPECT_EQ(c->Stats().reserved_bytes, 8 * kPage);               // and was unmapped here
  EXPECT_EQ(c->Data((*slices)[0]).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->FreeOwner("seq-2"), kPage);
  EXPECT_EQ(c->FreeOwner("seq-2"), 0u);
  EXPECT_EQ(daemon_->Stats().used_bytes(), static_cast<int64_t>(8 * kPage));  // the warm arena stays
  EXPECT_EQ(daemon_->OpenSessions(), 0);
}

TEST_F(KvHostDaemonTest, BudgetAndQuotaAreResourceExhaustedAndHoldNothing) {
  Start({.budget_bytes = 32 * kPage, .worker_quota_bytes = 24 * kPage, .arena_bytes = 8 * kPage, .warm_bytes = 0});
  auto a = Client("a");
  auto b = Client("b");
  ASSERT_TRUE(a && b);
  const uint64_t big[] = {8 * kPage, 8 * kPage, 8 * kPage, 1};
  auto over = a->AllocateMany(big, 64, "s");
  ASSERT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
  EXPECT_NE(over.status().message().find("worker quota"), std::string::npos) << over.status();
  EXPECT_EQ(daemon_->Stats().used_bytes(), 0);  // all or nothing
  EXPECT_EQ(daemon_->OpenSessions(), 0);
  const uint64_t three[] = {8 * kPage, 8 * kPage, 8 * kPage};
  ASSERT_TRUE(a->AllocateMany(three, 64, "s").ok());
  auto rest = b->Allocate(9 * kPage, 64, "t");
  ASSERT_EQ(rest.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(rest.status().message().find("budget"), std::string::npos) << rest.status();
  EXPECT_TRUE(b->Allocate(8 * kPage, 64, "t").ok());  // what fits still does
  EXPECT_EQ(daemon_->Stats().used_bytes(), static_cast<int64_t>(32 * kPage));
  a.reset();  // detaching frees a's 24 pages at once
  EXPECT_TRUE(WaitStats([](const v1::KvHostStats& s) { return s.used_bytes() == static_cast<int64_t>(8 * kPage); }));
  EXPECT_TRUE(b->Allocate(16 * kPage, 64, "u").ok());
}

TEST_F(KvHostDaemonTest, BadRequestsNameTheField) {
  Start({});
  auto c = Client();
  ASSERT_NE(c, nullptr);
  auto stub = Stub();
  auto call = [&](v1::ReserveRequest r) {
    grpc::ClientContext ctx;
    v1::ReserveResponse resp;
    return stub->Reserve(&ctx, r, &resp);
  };
  // The client's key is private; a stranger's request is UNAUTHENTICATED.
  v1::ReserveRequest r;
  r.set_worker_key("not-a-key");
  r.set_session_id("s");
  r.add_sizes(10);
  grpc::Status s = call(r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  struct Case {
    std::function<void(v1::ReserveRequest&)> edit;
    const char* field;
  };
  const Case cases[] = {
      {[](v1::ReserveRequest& q) { q.set_session_id(""); }, "session_id"},
      {[](v1::ReserveRequest& q) { q.set_session_id(std::string(129, 'x')); }, "session_id"},
      {[](v1::ReserveRequest& q) { q.set_session_id("a\nb"); }, "session_id"},
      {[](v1::ReserveRequest& q) { q.clear_sizes(); }, "sizes"},
      {[](v1::ReserveRequest& q) { q.set_sizes(0, 0); }, "sizes[0]"},
      {[](v1::ReserveRequest& q) { q.set_sizes(0, uint64_t{1} << 60); }, "sizes[0]"},
      {[](v1::ReserveRequest& q) { q.set_alignment(3); }, "alignment"},
      {[](v1::ReserveRequest& q) { q.set_alignment(1 << 20); }, "alignment"},
  };
  for (const Case& k : cases) {
    v1::ReserveRequest q = r;
    k.edit(q);
    grpc::Status got = call(q);
    EXPECT_EQ(got.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << k.field << ": " << got.error_message();
    EXPECT_NE(got.error_message().find(k.field), std::string::npos) << got.error_message();
  }
  grpc::ClientContext ctx;
  v1::AttachRequest ar;
  ar.set_worker_id(std::string(200, 'w'));
  v1::AttachResponse aresp;
  s = stub->Attach(&ctx, ar, &aresp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("worker_id"), std::string::npos);
  // Unknown slice and session.
  EXPECT_EQ(c->Free(HostSlice{.arena = 9, .offset = 0, .length = 1}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->FreeOwner("never-opened"), 0u);
  // The daemon still serves.
  EXPECT_TRUE(c->Allocate(100, 64, "fine").ok());
}

// A wrong nonce, a reused nonce, a connection that never says hello and a
// stray message: each is refused or closed, and other workers carry on.
TEST_F(KvHostDaemonTest, FdChannelRefusesWrongNoncesAndStalledPeers) {
  Start({});
  auto good = Client("good");
  ASSERT_NE(good, nullptr);
  auto stub = Stub();
  auto attach = [&] {
    grpc::ClientContext ctx;
    v1::AttachRequest ar;
    ar.set_worker_id("x");
    v1::AttachResponse resp;
    EXPECT_TRUE(stub->Attach(&ctx, ar, &resp).ok());
    return resp;
  };
  auto hello = [&](const v1::AttachResponse& a, const std::string& nonce) {
    auto conn = ConnectSeqpacket(a.fd_socket_path());
    EXPECT_TRUE(conn.ok()) << conn.status();
    v1::FdHello h;
    h.set_attach_id(a.attach_id());
    h.set_nonce(nonce);
    EXPECT_TRUE(SendFdMessage(conn->get(), h.SerializeAsString(), {}).ok());
    return std::move(*conn);
  };
  // A refusal says why (FdWelcome.refused, no key), then the connection closes.
  auto refused = [](int fd) {
    auto m = ReceiveFdMessage(fd, absl::Seconds(2));
    EXPECT_TRUE(m.ok()) << m.status();
    v1::FdWelcome w;
    if (m.ok()) {
      EXPECT_TRUE(w.ParseFromString(m->payload));
      EXPECT_TRUE(w.worker_key().empty());
      EXPECT_EQ(w.refused_code(), static_cast<int>(absl::StatusCode::kPermissionDenied));
    }
    EXPECT_EQ(ReceiveFdMessage(fd, absl::Seconds(2)).status().code(), absl::StatusCode::kUnavailable);
    return w.refused();
  };
  const v1::AttachResponse a = attach();
  ScopedFd wrong = hello(a, "0123456789abcdef0123456789abcdef");
  EXPECT_NE(refused(wrong.get()).find("wrong nonce"), std::string::npos);
  ScopedFd burnt = hello(a, a.nonce());  // the wrong try used it up
  EXPECT_NE(refused(burnt.get()).find("wrong nonce"), std::string::npos);
  const v1::AttachResponse b = attach();
  ScopedFd ok = hello(b, b.nonce());
  auto welcome = ReceiveFdMessage(ok.get(), absl::Seconds(2));
  ASSERT_TRUE(welcome.ok()) << welcome.status();
  ScopedFd again = hello(b, b.nonce());  // one use only
  EXPECT_NE(refused(again.get()).find("wrong nonce"), std::string::npos);
  // Connects and stalls: closed after the hello timeout (300 ms here).
  auto stall = ConnectSeqpacket(a.fd_socket_path());
  ASSERT_TRUE(stall.ok());
  const absl::Time t0 = absl::Now();
  EXPECT_EQ(ReceiveFdMessage(stall->get(), absl::Seconds(3)).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_LT(absl::Now() - t0, absl::Seconds(2));
  // An attached worker that sends a stray message is detached.
  EXPECT_TRUE(WaitStats([](const v1::KvHostStats& s) { return s.attached_workers() == 2; }));
  ASSERT_TRUE(SendFdMessage(ok.get(), "stray", {}).ok());
  EXPECT_TRUE(WaitStats([](const v1::KvHostStats& s) { return s.attached_workers() == 1; }));
  EXPECT_TRUE(good->Allocate(kPage, 64, "s").ok());
  EXPECT_TRUE(good->Health().ok());
}

// A worker process killed with SIGKILL: kv-host sees its fd channel close
// and frees everything it held within a second.
TEST_F(KvHostDaemonTest, KilledWorkerIsFreedWithinASecond) {
  Start({.arena_bytes = 8 * kPage, .warm_bytes = 8 * kPage});
  auto stub = Stub();
  grpc::ClientContext ctx;
  v1::AttachRequest ar;
  ar.set_worker_id("doomed");
  v1::AttachResponse a;
  ASSERT_TRUE(stub->Attach(&ctx, ar, &a).ok());
  int key_pipe[2];
  ASSERT_EQ(pipe(key_pipe), 0);
  // The child is this test binary again (exec: no fork-only child in a
  // threaded process), running WorkerChild.HoldsArenasUntilKilled, which
  // speaks the fd channel with plain syscalls and hands its key back.
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(key_pipe[0]);
    setenv("KVH_CHILD_FD_SOCKET", a.fd_socket_path().c_str(), 1);
    setenv("KVH_CHILD_ATTACH", std::to_string(a.attach_id()).c_str(), 1);
    setenv("KVH_CHILD_NONCE", a.nonce().c_str(), 1);
    setenv("KVH_CHILD_KEY_FD", std::to_string(key_pipe[1]).c_str(), 1);
    execl("/proc/self/exe", "kvh-child", "--gtest_filter=WorkerChild.HoldsArenasUntilKilled", nullptr);
    _exit(127);
  }
  close(key_pipe[1]);
  struct Reaper {  // nothing outlives a failed test
    pid_t pid;
    ~Reaper() {
      if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, nullptr, 0);
      }
    }
  } reaper{child};
  char key[64] = {};
  const ssize_t n = read(key_pipe[0], key, sizeof(key));
  close(key_pipe[0]);
  ASSERT_GT(n, 0);
  grpc::ClientContext rc;
  v1::ReserveRequest r;
  r.set_worker_key(std::string(key, static_cast<size_t>(n)));
  r.set_session_id("s");
  r.add_sizes(20 * kPage);
  r.add_sizes(kPage);
  v1::ReserveResponse rr;
  grpc::Status s = stub->Reserve(&rc, r, &rr);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(rr.new_arena_ids_size(), 2);
  EXPECT_EQ(daemon_->Stats().used_bytes(), static_cast<int64_t>(28 * kPage));
  kill(child, SIGKILL);
  const absl::Time t0 = absl::Now();
  EXPECT_TRUE(WaitStats([](const v1::KvHostStats& st) { return st.attached_workers() == 0 && st.used_bytes() == 0; }));
  EXPECT_LT(absl::Now() - t0, absl::Seconds(1));
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  reaper.pid = 0;
  EXPECT_TRUE(WIFSIGNALED(status));
  // Its key is dead with it.
  grpc::ClientContext rc2;
  EXPECT_EQ(stub->Reserve(&rc2, r, &rr).error_code(), grpc::StatusCode::UNAUTHENTICATED);
}

// The child of KilledWorkerIsFreedWithinASecond (skipped when run directly).
TEST(WorkerChild, HoldsArenasUntilKilled) {
  const char* path = getenv("KVH_CHILD_FD_SOCKET");
  if (path == nullptr) GTEST_SKIP() << "only runs as KilledWorkerIsFreedWithinASecond's child";
  auto conn = ConnectSeqpacket(path);
  if (!conn.ok()) _exit(3);
  v1::FdHello h;
  h.set_attach_id(std::stoull(getenv("KVH_CHILD_ATTACH")));
  h.set_nonce(getenv("KVH_CHILD_NONCE"));
  if (!SendFdMessage(conn->get(), h.SerializeAsString(), {}).ok()) _exit(4);
  auto w = ReceiveFdMessage(conn->get(), absl::Seconds(5));
  v1::FdWelcome welcome;
  if (!w.ok() || !welcome.ParseFromString(w->payload)) _exit(5);
  const std::string& key = welcome.worker_key();
  const int fd = std::atoi(getenv("KVH_CHILD_KEY_FD"));
  if (write(fd, key.data(), key.size()) != static_cast<ssize_t>(key.size())) _exit(6);
  close(fd);
  while (true) pause();
}

// kv-host goes away: what the worker mapped stays readable and writable;
// the worker learns within a second; new allocations fail, saying why.
TEST_F(KvHostDaemonTest, DaemonLossKeepsMappingsAndFailsNewAllocations) {
  Start({});
  auto connected = KvHostClientStore::Connect(
      {.target = Target(), .worker_id = "w1", .reattach_timeout = absl::Milliseconds(300)});
  ASSERT_TRUE(connected.ok()) << connected.status();
  auto c = std::move(*connected);
  auto s = c->Allocate(5 * kPage, 64, "live");
  ASSERT_TRUE(s.ok()) << s.status();
  std::memset(c->Data(*s)->data(), 0x3C, s->length);
  server_.reset();
  daemon_.reset();
  const absl::Time t0 = absl::Now();
  while (c->Health().ok() && absl::Now() - t0 < absl::Seconds(2)) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_LT(absl::Now() - t0, absl::Seconds(1));
  EXPECT_EQ(c->Health().code(), absl::StatusCode::kUnavailable);
  auto data = c->Data(*s);
  ASSERT_TRUE(data.ok());
  for (std::byte b : *data) ASSERT_EQ(b, std::byte{0x3C});
  std::memset(data->data(), 0x7E, data->size());
  const absl::Time t1 = absl::Now();
  auto more = c->Allocate(kPage, 64, "new");
  EXPECT_EQ(more.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(more.status().message().find("kv-host not back within"), std::string::npos) << more.status();
  EXPECT_LT(absl::Now() - t1, absl::Seconds(2));  // the re-attach deadline, not a hang
  EXPECT_EQ(c->FreeOwner("live"), 0u);  // nobody to tell; no hang
}

}  // namespace
}  // namespace tailorkv::kvhost

namespace tailorkv::kvhost {
namespace {

// kv-host restarts: the worker's next allocation attaches again and hands
// over its live arenas and slices; the new daemon accounts them as before,
// the bytes are untouched, and closing the adopted session frees them.
TEST_F(KvHostDaemonTest, RestartedDaemonAdoptsLiveArenasAndSessions) {
  Start({.arena_bytes = 8 * kPage, .warm_bytes = 0});
  auto c = Client();
  ASSERT_NE(c, nullptr);
  const uint64_t sizes[] = {3 * kPage, 100, 12 * kPage};
  auto live = c->AllocateMany(sizes, 64, "live");
  ASSERT_TRUE(live.ok()) << live.status();
  for (size_t i = 0; i < 3; ++i) std::memset(c->Data((*live)[i])->data(), 0x40 + static_cast<int>(i), sizes[i]);
  ASSERT_TRUE(c->Allocate(kPage, 64, "gone-before-restart").ok());
  server_.reset();
  daemon_.reset();
  const absl::Time t0 = absl::Now();
  while (c->Health().ok() && absl::Now() - t0 < absl::Seconds(2)) absl::SleepFor(absl::Milliseconds(5));
  ASSERT_FALSE(c->Health().ok());
  EXPECT_EQ(c->FreeOwner("gone-before-restart"), 0u);  // while down: dropped here only
  Start({.arena_bytes = 8 * kPage, .warm_bytes = 0});  // the supervisor's restart
  auto fresh = c->Allocate(2 * kPage, 64, "after");
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_TRUE(c->Health().ok());
  const v1::KvHostStats st = daemon_->Stats();
  ASSERT_EQ(st.workers_size(), 1);
  ASSERT_EQ(st.workers(0).sessions_size(), 2) << st.DebugString();
  EXPECT_EQ(st.workers(0).reserved_bytes(), static_cast<int64_t>(3 * kPage + 100 + 12 * kPage + 2 * kPage));
  // "after" fits in the adopted arena of the 3-page slice (6 pages: a whole
  // number of 3-page slices within --arena-mib's 8; the slice freed while
  // down was not handed over), the 12-page slice has its own.
  EXPECT_EQ(st.used_bytes(), static_cast<int64_t>(6 * kPage + 12 * kPage)) << st.DebugString();
  for (size_t i = 0; i < 3; ++i) {
    auto data = c->Data((*live)[i]);
    ASSERT_TRUE(data.ok());
    for (std::byte b : *data) ASSERT_EQ(b, std::byte(0x40 + i));
  }
  EXPECT_EQ(c->FreeOwner("live"), sizes[0] + sizes[1] + sizes[2]);
  EXPECT_EQ(c->FreeOwner("after"), 2 * kPage);
  EXPECT_EQ(daemon_->Stats().used_bytes(), 0);  // warm 0: every arena back
  EXPECT_EQ(c->Stats().reserved_bytes, 0u);
}

// A hand-over larger than one fd-channel datagram (64 descriptors, 64 KiB):
// 150 arenas and 2,100 slices go over in several parts and are adopted
// whole, bytes and accounting intact.
TEST_F(KvHostDaemonTest, LargeHandOverIsAdoptedInParts) {
  Start({.budget_bytes = 512 * kPage, .arena_bytes = kPage, .warm_bytes = 0});
  auto c = Client();
  ASSERT_NE(c, nullptr);
  const std::vector<uint64_t> big(150, kPage), small(2100, 64);
  auto b = c->AllocateMany(big, 64, "big");
  ASSERT_TRUE(b.ok()) << b.status();
  auto m = c->AllocateMany(small, 64, "small");
  ASSERT_TRUE(m.ok()) << m.status();
  for (size_t i = 0; i < b->size(); ++i) std::memset(c->Data((*b)[i])->data(), static_cast<int>(i % 251), kPage);
  for (size_t i = 0; i < m->size(); ++i) std::memset(c->Data((*m)[i])->data(), static_cast<int>(i % 253), 64);
  const v1::KvHostStats before = daemon_->Stats();
  ASSERT_GT(before.workers(0).arenas(), 150);
  server_.reset();
  daemon_.reset();
  const absl::Time t0 = absl::Now();
  while (c->Health().ok() && absl::Now() - t0 < absl::Seconds(2)) absl::SleepFor(absl::Milliseconds(5));
  ASSERT_FALSE(c->Health().ok());
  Start({.budget_bytes = 512 * kPage, .arena_bytes = kPage, .warm_bytes = 0});
  auto fresh = c->Allocate(kPage, 64, "after");
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  const v1::KvHostStats st = daemon_->Stats();
  ASSERT_EQ(st.workers_size(), 1);
  EXPECT_EQ(st.workers(0).sessions_size(), 3) << st.workers(0).DebugString().substr(0, 2000);
  EXPECT_EQ(st.workers(0).arenas(), before.workers(0).arenas() + 1);
  EXPECT_EQ(st.workers(0).reserved_bytes(), before.workers(0).reserved_bytes() + static_cast<int64_t>(kPage));
  for (size_t i = 0; i < b->size(); ++i) {
    auto d = c->Data((*b)[i]);
    ASSERT_TRUE(d.ok());
    ASSERT_EQ((*d)[kPage - 1], std::byte(i % 251));
  }
  for (size_t i = 0; i < m->size(); ++i) ASSERT_EQ((*c->Data((*m)[i]))[63], std::byte(i % 253));
  EXPECT_EQ(c->FreeOwner("big"), 150 * kPage);
  EXPECT_EQ(c->FreeOwner("small"), 2100u * 64);
  EXPECT_EQ(c->FreeOwner("after"), kPage);
  EXPECT_EQ(daemon_->Stats().used_bytes(), 0);
}

}  // namespace
}  // namespace tailorkv::kvhost
