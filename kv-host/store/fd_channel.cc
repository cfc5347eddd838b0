#include "store/fd_channel.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace tailorkv::kvhost {
namespace {

constexpr char kMarker = 'K';

absl::Status Errno(absl::string_view what, int err) {
  return absl::ErrnoToStatus(err, what);
}

absl::StatusOr<sockaddr_un> Address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("path \"", path, "\": must be 1 to ",
                                                   sizeof(addr.sun_path) - 1, " bytes"));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// Waits until `sock` is ready for `events` or the timeout passes (a zero
// timeout still looks once).
absl::Status WaitFor(int sock, short events, absl::Duration timeout, absl::string_view what) {
  const bool forever = timeout == absl::InfiniteDuration();
  const absl::Time deadline = forever ? absl::InfiniteFuture() : absl::Now() + timeout;
  while (true) {
    int ms = -1;
    if (!forever) {
      ms = static_cast<int>(std::clamp<int64_t>(absl::ToInt64Milliseconds(deadline - absl::Now()) + 1, 0, 1 << 30));
      if (timeout == absl::ZeroDuration()) ms = 0;
    }
    pollfd p{.fd = sock, .events = events, .revents = 0};
    const int r = poll(&p, 1, ms);
    if (r > 0) return absl::OkStatus();  // ready, or an error/hang-up the call itself reports
    if (r < 0 && errno != EINTR) return Errno(absl::StrCat(what, ": poll"), errno);
    if (r == 0 && !forever && absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(what, ": no progress within ", absl::FormatDuration(timeout)));
    }
  }
}

}  // namespace

absl::StatusOr<ScopedFd> ListenSeqpacket(const std::string& path, int backlog) {
  auto addr = Address(path);
  if (!addr.ok()) return addr.status();
  ScopedFd fd(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return Errno("socket", errno);
  if (unlink(path.c_str()) != 0 && errno != ENOENT) return Errno(absl::StrCat("unlink ", path), errno);
  if (bind(fd.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(*addr)) != 0) {
    return Errno(absl::StrCat("bind ", path), errno);
  }
  if (listen(fd.get(), backlog) != 0) return Errno(absl::StrCat("listen ", path), errno);
  return fd;
}

absl::StatusOr<ScopedFd> AcceptSeqpacket(int listener) {
  while (true) {
    ScopedFd fd(accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
    if (fd.valid()) return fd;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return absl::UnavailableError("accept: no pending connection");
    return Errno("accept", errno);
  }
}

absl::StatusOr<ScopedFd> ConnectSeqpacket(const std::string& path) {
  auto addr = Address(path);
  if (!addr.ok()) return addr.status();
  ScopedFd fd(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Errno("socket", errno);
  while (connect(fd.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(*addr)) != 0) {
    if (errno == EINTR) continue;
    if (errno == ENOENT || errno == ECONNREFUSED) {
      return absl::UnavailableError(absl::StrCat("connect ", path, ": nobody listens there (", std::strerror(errno), ")"));
    }
    return Errno(absl::StrCat("connect ", path), errno);
  }
  return fd;
}

absl::StatusOr<PeerCredentials> PeerCredentialsOf(int sock) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return Errno("SO_PEERCRED", errno);
  return PeerCredentials{.pid = cred.pid, .uid = cred.uid, .gid = cred.gid};
}

absl::Status SendFdMessage(int sock, std::string_view payload, absl::Span<const int> fds,
                           absl::Duration timeout) {
  if (payload.size() > kFdMessageMaxPayload) {
    return absl::InvalidArgumentError(absl::StrCat("payload: ", payload.size(), " bytes, at most ", kFdMessageMaxPayload));
  }
  if (fds.size() > static_cast<size_t>(kFdMessageMaxFds)) {
    return absl::InvalidArgumentError(absl::StrCat("fds: ", fds.size(), ", at most ", kFdMessageMaxFds));
  }
  // A marker byte first: an empty datagram would read as EOF on the other
  // side, and a stray sender's bytes are recognized.
  char marker = kMarker;
  iovec iov[2] = {{.iov_base = &marker, .iov_len = 1},
                  {.iov_base = const_cast<char*>(payload.data()), .iov_len = payload.size()}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = payload.empty() ? 1 : 2;
  std::vector<char> control;
  if (!fds.empty()) {
    control.assign(CMSG_SPACE(sizeof(int) * fds.size()), 0);
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  while (true) {
    if (absl::Status s = WaitFor(sock, POLLOUT, timeout, "send"); !s.ok()) return s;
    const ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) return absl::OkStatus();
    if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
    if (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN) {
      return absl::UnavailableError(absl::StrCat("send: peer closed (", std::strerror(errno), ")"));
    }
    return Errno("sendmsg", errno);
  }
}

absl::StatusOr<FdMessage> ReceiveFdMessage(int sock, absl::Duration timeout) {
  std::string buf(kFdMessageMaxPayload + 2, '\0');
  std::vector<char> control(CMSG_SPACE(sizeof(int) * kFdMessageMaxFds), 0);
  while (true) {
    if (absl::Status s = WaitFor(sock, POLLIN, timeout, "receive"); !s.ok()) return s;
    iovec iov{.iov_base = buf.data(), .iov_len = buf.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    const ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      if (errno == ECONNRESET) return absl::UnavailableError("receive: peer closed (connection reset)");
      return Errno("recvmsg", errno);
    }
    FdMessage out;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        out.fds.emplace_back(fd);
      }
    }
    if (n == 0) return absl::UnavailableError("receive: peer closed");
    if ((msg.msg_flags & MSG_CTRUNC) != 0) {
      return absl::DataLossError(absl::StrCat("receive: more than ", kFdMessageMaxFds, " descriptors (dropped)"));
    }
    if ((msg.msg_flags & MSG_TRUNC) != 0 || static_cast<size_t>(n) > kFdMessageMaxPayload + 1) {
      return absl::DataLossError(absl::StrCat("receive: payload over ", kFdMessageMaxPayload, " bytes"));
    }
    if (buf[0] != kMarker) return absl::DataLossError("receive: not an fd-channel message");
    out.payload.assign(buf.data() + 1, static_cast<size_t>(n) - 1);
    return out;
  }
}

}  // namespace tailorkv::kvhost
