#include "store/memfd_arena.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace tailorkv::kvhost {
namespace {

int CountOpenFds() {
  int n = 0;
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  while (dirent* entry = readdir(dir)) {
    if (entry->d_name[0] != '.') ++n;
  }
  closedir(dir);
  return n;
}

std::string FdTarget(int fd) {
  char buf[256] = {};
  const std::string link = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = readlink(link.c_str(), buf, sizeof(buf) - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

// Byte i of pattern `seed`: never constant over a page, differs per seed.
std::byte PatternByte(size_t i, unsigned seed) {
  return static_cast<std::byte>((i * 131 + seed * 7 + (i >> 8)) & 0xff);
}

void Fill(std::byte* p, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; ++i) p[i] = PatternByte(i, seed);
}

// Index of the first byte that differs from the pattern, or -1.
long FirstMismatch(const std::byte* p, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != PatternByte(i, seed)) return static_cast<long>(i);
  }
  return -1;
}

struct RegisterLog {
  std::vector<std::pair<void*, size_t>> registered;
  std::vector<std::pair<void*, size_t>> unregistered;
  ArenaRegisterFn Register() {
    return [this](void* base, size_t bytes) {
      registered.emplace_back(base, bytes);
      return absl::OkStatus();
    };
  }
  ArenaUnregisterFn Unregister() {
    return [this](void* base, size_t bytes) {
      unregistered.emplace_back(base, bytes);
      return absl::OkStatus();
    };
  }
};

TEST(MemfdArenaTest, CreatesSealedCloexecMemfdOfRequestedSize) {
  const size_t bytes = 3 * PageSize();
  auto arena = MemfdArena::Create("tkv-test-arena", bytes, {});
  ASSERT_TRUE(arena.ok()) << arena.status();
  ASSERT_GE(arena->fd(), 0);
  ASSERT_NE(arena->data(), nullptr);
  EXPECT_EQ(arena->size(), bytes);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(arena->data()) % PageSize(), 0u);

  struct stat st {};
  ASSERT_EQ(fstat(arena->fd(), &st), 0);
  EXPECT_EQ(static_cast<size_t>(st.st_size), bytes);
  EXPECT_TRUE(fcntl(arena->fd(), F_GETFD) & FD_CLOEXEC);
  const int seals = fcntl(arena->fd(), F_GET_SEALS);
  EXPECT_EQ(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
            F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  EXPECT_EQ(seals & F_SEAL_WRITE, 0) << "a write seal would make the arena read-only";
  // Sealed: nobody holding the fd can shrink it under a mapping.
  EXPECT_NE(ftruncate(arena->fd(), static_cast<off_t>(PageSize())), 0);
  EXPECT_NE(FdTarget(arena->fd()).find("memfd:tkv-test-arena"), std::string::npos)
      << FdTarget(arena->fd());

  // Fresh memfd pages read as zero and are writable end to end.
  EXPECT_EQ(arena->data()[0], std::byte{0});
  EXPECT_EQ(arena->data()[bytes - 1], std::byte{0});
  Fill(arena->data(), bytes, 1);
  EXPECT_EQ(FirstMismatch(arena->data(), bytes, 1), -1);
}

TEST(MemfdArenaTest, PopulatedArenaWithoutHugePagesWorks) {
  MemfdArenaOptions options;
  options.populate = true;
  options.huge_pages = false;
  const size_t bytes = 5 * PageSize();
  auto arena = MemfdArena::Create("tkv-populated", bytes, options);
  ASSERT_TRUE(arena.ok()) << arena.status();
  Fill(arena->data(), bytes, 2);
  EXPECT_EQ(FirstMismatch(arena->data(), bytes, 2), -1);
}

TEST(MemfdArenaTest, RejectsBadInputNamingTheField) {
  auto zero = MemfdArena::Create("x", 0, {});
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(zero.status().message().find("bytes"), std::string::npos) << zero.status();

  auto odd = MemfdArena::Create("x", PageSize() + 1, {});
  EXPECT_EQ(odd.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(odd.status().message().find("bytes"), std::string::npos) << odd.status();

  auto unnamed = MemfdArena::Create("", PageSize(), {});
  EXPECT_EQ(unnamed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unnamed.status().message().find("name"), std::string::npos) << unnamed.status();

  auto long_name = MemfdArena::Create(std::string(300, 'n'), PageSize(), {});
  EXPECT_EQ(long_name.status().code(), absl::StatusCode::kInvalidArgument);

  auto map_zero = SharedMapping::Map(0, 0, false, false);
  EXPECT_EQ(map_zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(map_zero.status().message().find("bytes"), std::string::npos);

  auto bad_fd = SharedMapping::Map(-1, PageSize(), false, false);
  EXPECT_FALSE(bad_fd.ok());
}

TEST(MemfdArenaTest, SecondMappingOfTheFdSeesTheSameBytes) {
  const size_t bytes = 4 * PageSize();
  auto arena = MemfdArena::Create("tkv-remap", bytes, {});
  ASSERT_TRUE(arena.ok()) << arena.status();
  Fill(arena->data(), bytes, 3);

  auto second = SharedMapping::Map(arena->fd(), bytes, /*writable=*/true, /*populate=*/false);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_NE(second->data(), arena->data()) << "must be a distinct mapping";
  EXPECT_EQ(FirstMismatch(second->data(), bytes, 3), -1);
  // Writes travel the other way too: one shared page cache, two mappings.
  Fill(second->data(), bytes, 4);
  EXPECT_EQ(FirstMismatch(arena->data(), bytes, 4), -1);
}

TEST(MemfdArenaTest, MapRejectsAFileShorterThanAsked) {
  const size_t bytes = 2 * PageSize();
  auto arena = MemfdArena::Create("tkv-short", bytes, {});
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto mapping = SharedMapping::Map(arena->fd(), bytes + PageSize(), false, false);
  EXPECT_EQ(mapping.status().code(), absl::StatusCode::kInvalidArgument) << mapping.status();
  EXPECT_NE(mapping.status().message().find("file size"), std::string::npos);
}

// The path kv-host will use: the fd crosses a UNIX socket (SCM_RIGHTS) into
// a process that did not inherit the mapping, which maps it, checks the
// bytes and writes its own, which this process then sees.
TEST(MemfdArenaTest, ChildProcessReceivesFdOverSocketAndSharesBytes) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  ScopedFd parent_end(sv[0]), child_end(sv[1]);
  const size_t bytes = 3 * PageSize();
  const size_t probe = bytes - 100;  // bytes the child checks: an odd count, not the whole arena

  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Child: only async-signal-safe calls and _exit from here on.
    char dummy;
    iovec iov{&dummy, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    if (recvmsg(child_end.get(), &msg, 0) != 1) _exit(10);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    if (cmsg == nullptr || cmsg->cmsg_type != SCM_RIGHTS) _exit(11);
    int fd;
    std::memcpy(&fd, CMSG_DATA(cmsg), sizeof(int));
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) _exit(12);
    auto* p = static_cast<std::byte*>(base);
    if (FirstMismatch(p, probe, 5) != -1) _exit(13);
    Fill(p, probe, 6);
    // Sealed in the child too: it cannot shrink the parent's arena.
    if (ftruncate(fd, 0) == 0) _exit(14);
    _exit(0);
  }
  child_end.reset();
  // The arena is created after fork, so the child can only get it by fd.
  auto arena = MemfdArena::Create("tkv-cross", bytes, {});
  ASSERT_TRUE(arena.ok()) << arena.status();
  Fill(arena->data(), probe, 5);

  char dummy = 'f';
  iovec iov{&dummy, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int));
  const int fd = arena->fd();
  std::memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
  ASSERT_EQ(sendmsg(parent_end.get(), &msg, 0), 1);

  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFEXITED(wstatus));
  ASSERT_EQ(WEXITSTATUS(wstatus), 0) << "child failed at step " << WEXITSTATUS(wstatus);
  EXPECT_EQ(FirstMismatch(arena->data(), probe, 6), -1) << "child's writes not visible";
  // Bytes past the probe were never written by anyone.
  EXPECT_EQ(arena->data()[probe], std::byte{0});
}

TEST(MemfdArenaTest, RegisterOnceAndUnregisterOnDestruction) {
  RegisterLog log;
  const size_t bytes = 2 * PageSize();
  void* base = nullptr;
  {
    auto arena = MemfdArena::Create("tkv-reg", bytes, {});
    ASSERT_TRUE(arena.ok()) << arena.status();
    base = arena->data();
    EXPECT_FALSE(arena->registered());
    ASSERT_TRUE(arena->Register(log.Register(), log.Unregister()).ok());
    EXPECT_TRUE(arena->registered());
    const absl::Status again = arena->Register(log.Register(), log.Unregister());
    EXPECT_EQ(again.code(), absl::StatusCode::kFailedPrecondition) << again;
    ASSERT_EQ(log.registered.size(), 1u);
    EXPECT_EQ(log.registered[0], std::make_pair(base, bytes));
    EXPECT_TRUE(log.unregistered.empty());
  }
  ASSERT_EQ(log.unregistered.size(), 1u);
  EXPECT_EQ(log.unregistered[0], std::make_pair(base, bytes));
}

TEST(MemfdArenaTest, FailedRegistrationIsNeverUnregistered) {
  int unregister_calls = 0;
  {
    auto arena = MemfdArena::Create("tkv-regfail", PageSize(), {});
    ASSERT_TRUE(arena.ok()) << arena.status();
    const absl::Status status = arena->Register(
        [](void*, size_t) { return absl::InternalError("fake: cudaHostRegister failed"); },
        [&](void*, size_t) {
          ++unregister_calls;
          return absl::OkStatus();
        });
    EXPECT_EQ(status.code(), absl::StatusCode::kInternal);
    EXPECT_FALSE(arena->registered());
  }
  EXPECT_EQ(unregister_calls, 0);
}

TEST(MemfdArenaTest, MoveTransfersOwnershipAndUnregistersBeforeReplacing) {
  RegisterLog log;
  const int fds_before = CountOpenFds();
  {
    auto a = MemfdArena::Create("tkv-move-a", PageSize(), {});
    auto b = MemfdArena::Create("tkv-move-b", 2 * PageSize(), {});
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_TRUE(a->Register(log.Register(), log.Unregister()).ok());
    ASSERT_TRUE(b->Register(log.Register(), log.Unregister()).ok());
    void* a_base = a->data();
    void* b_base = b->data();

    MemfdArena moved(std::move(*a));
    EXPECT_EQ(a->fd(), -1);
    EXPECT_EQ(a->data(), nullptr);
    EXPECT_FALSE(a->registered());
    EXPECT_TRUE(moved.registered());
    EXPECT_EQ(moved.data(), a_base);
    EXPECT_TRUE(log.unregistered.empty());

    moved = std::move(*b);  // the old arena (a's) is unregistered first
    ASSERT_EQ(log.unregistered.size(), 1u);
    EXPECT_EQ(log.unregistered[0], std::make_pair(a_base, PageSize()));
    EXPECT_EQ(moved.data(), b_base);
    EXPECT_EQ(moved.size(), 2 * PageSize());
  }
  ASSERT_EQ(log.unregistered.size(), 2u);
  EXPECT_EQ(log.unregistered[1].second, 2 * PageSize());
  EXPECT_EQ(CountOpenFds(), fds_before);
}

TEST(MemfdArenaTest, NoFdLeakAcrossCreateFailAndDestroy) {
  const int before = CountOpenFds();
  ASSERT_GT(before, 0);
  {
    std::vector<MemfdArena> arenas;
    for (int i = 0; i < 10; ++i) {
      auto arena = MemfdArena::Create("tkv-leak", PageSize() * (i + 1), {});
      ASSERT_TRUE(arena.ok()) << arena.status();
      arenas.push_back(*std::move(arena));
    }
    EXPECT_EQ(CountOpenFds(), before + 10);
    for (int i = 0; i < 5; ++i) {
      auto mapping = SharedMapping::Map(arenas[i].fd(), PageSize(), false, true);
      ASSERT_TRUE(mapping.ok());
      auto too_long = SharedMapping::Map(arenas[i].fd(), 100 * PageSize(), false, false);
      EXPECT_FALSE(too_long.ok());
    }
    EXPECT_FALSE(MemfdArena::Create("tkv-leak", 7, {}).ok());
  }
  EXPECT_EQ(CountOpenFds(), before);
}

}  // namespace
}  // namespace tailorkv::kvhost
