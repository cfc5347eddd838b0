#include "store/fd_channel.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "store/memfd_arena.h"

namespace tailorkv::kvhost {
namespace {

std::string TempSocket(const char* name) {
  return absl::StrCat(::testing::TempDir(), "/", name, "-", getpid(), ".sock");
}

struct Pair {
  ScopedFd listener, client, server;
};

Pair Connect(const std::string& path) {
  Pair p;
  auto l = ListenSeqpacket(path);
  EXPECT_TRUE(l.ok()) << l.status();
  p.listener = std::move(*l);
  auto c = ConnectSeqpacket(path);
  EXPECT_TRUE(c.ok()) << c.status();
  p.client = std::move(*c);
  auto s = AcceptSeqpacket(p.listener.get());
  EXPECT_TRUE(s.ok()) << s.status();
  p.server = std::move(*s);
  return p;
}

// A memfd arena's descriptor crosses the socket: the receiver maps the same
// bytes (what kv-host does for a worker), and the peer credentials are ours.
TEST(FdChannelTest, ArenaDescriptorArrivesAndMapsTheSameBytes) {
  const std::string path = TempSocket("fdch1");
  Pair p = Connect(path);
  auto arena = MemfdArena::Create("fdch-test", PageSize() * 3, {});
  ASSERT_TRUE(arena.ok()) << arena.status();
  std::memset(arena->data(), 0x5A, arena->size());
  arena->data()[PageSize() * 2 + 7] = std::byte{0x11};
  const int fds[] = {arena->fd()};
  ASSERT_TRUE(SendFdMessage(p.client.get(), "arena 7", fds).ok());
  auto got = ReceiveFdMessage(p.server.get(), absl::Seconds(5));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->payload, "arena 7");
  ASSERT_EQ(got->fds.size(), 1u);
  EXPECT_NE(got->fds[0].get(), arena->fd());
  EXPECT_EQ(fcntl(got->fds[0].get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
  auto map = SharedMapping::Map(got->fds[0].get(), arena->size(), /*writable=*/true, false);
  ASSERT_TRUE(map.ok()) << map.status();
  EXPECT_EQ(map->data()[PageSize() * 2 + 7], std::byte{0x11});
  EXPECT_EQ(map->data()[0], std::byte{0x5A});
  map->data()[5] = std::byte{0x22};  // shared both ways
  EXPECT_EQ(arena->data()[5], std::byte{0x22});
  auto cred = PeerCredentialsOf(p.server.get());
  ASSERT_TRUE(cred.ok());
  EXPECT_EQ(cred->uid, getuid());
  EXPECT_EQ(cred->pid, getpid());
  // Empty payloads and several messages keep their boundaries.
  ASSERT_TRUE(SendFdMessage(p.server.get(), "", {}).ok());
  ASSERT_TRUE(SendFdMessage(p.server.get(), std::string(kFdMessageMaxPayload, 'x'), {}).ok());
  auto e = ReceiveFdMessage(p.client.get(), absl::Seconds(5));
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->payload, "");
  auto big = ReceiveFdMessage(p.client.get(), absl::Seconds(5));
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(big->payload.size(), kFdMessageMaxPayload);
  std::filesystem::remove(path);
}

TEST(FdChannelTest, LimitsTimeoutsAndPeerExit) {
  const std::string path = TempSocket("fdch2");
  Pair p = Connect(path);
  // Past the limits: refused before anything is sent.
  EXPECT_EQ(SendFdMessage(p.client.get(), std::string(kFdMessageMaxPayload + 1, 'x'), {}).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<int> many(kFdMessageMaxFds + 1, 0);
  auto s = SendFdMessage(p.client.get(), "x", many);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("fds"), std::string::npos);
  // Nothing arrives: the deadline, not a hang.
  auto none = ReceiveFdMessage(p.server.get(), absl::Milliseconds(50));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kDeadlineExceeded);
  // A peer process that dies: EOF, and a send to it fails without SIGPIPE.
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    p.server.reset();
    auto c = ConnectSeqpacket(path);
    _exit(c.ok() ? 0 : 3);  // connect, then die
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  auto dead = AcceptSeqpacket(p.listener.get());
  ASSERT_TRUE(dead.ok()) << dead.status();
  auto eof = ReceiveFdMessage(dead->get(), absl::Seconds(5));
  EXPECT_EQ(eof.status().code(), absl::StatusCode::kUnavailable) << eof.status();
  EXPECT_EQ(SendFdMessage(dead->get(), "hello?", {}).code(), absl::StatusCode::kUnavailable);
  // Nothing pending now; nobody at a path that was never bound.
  EXPECT_EQ(AcceptSeqpacket(p.listener.get()).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(ConnectSeqpacket(path + ".none").status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(ListenSeqpacket(std::string(200, 'a')).status().code(), absl::StatusCode::kInvalidArgument);
  std::filesystem::remove(path);
}

// A stalled peer that never reads cannot block the sender past its timeout.
TEST(FdChannelTest, StalledReceiverTimesOutTheSender) {
  const std::string path = TempSocket("fdch3");
  Pair p = Connect(path);
  const std::string chunk(kFdMessageMaxPayload, 'y');
  absl::Status st;
  for (int i = 0; i < 100000 && st.ok(); ++i) st = SendFdMessage(p.client.get(), chunk, {}, absl::Milliseconds(100));
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace tailorkv::kvhost
