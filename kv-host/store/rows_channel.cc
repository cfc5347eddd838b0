#include "store/rows_channel.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"

namespace tailorkv::kvhost::rows {

absl::Status ReadFull(int fd, void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t got = ::recv(fd, p, n, 0);
    if (got > 0) {
      p += got;
      n -= static_cast<size_t>(got);
    } else if (got == 0) {
      return absl::UnavailableError("rows channel: the peer closed the connection");
    } else if (errno == EINTR) {
      continue;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return absl::DeadlineExceededError("rows channel: no data within the timeout");
    } else {
      return absl::UnavailableError(absl::StrCat("rows channel: recv: ", strerror(errno)));
    }
  }
  return absl::OkStatus();
}

absl::Status WriteFull(int fd, const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    const ssize_t put = ::send(fd, p, n, MSG_NOSIGNAL);
    if (put >= 0) {
      p += put;
      n -= static_cast<size_t>(put);
    } else if (errno == EINTR) {
      continue;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return absl::DeadlineExceededError("rows channel: the peer took nothing within the timeout");
    } else {
      return absl::UnavailableError(absl::StrCat("rows channel: send: ", strerror(errno)));
    }
  }
  return absl::OkStatus();
}

absl::Status SetSocketOptions(int fd, int64_t timeout_ms) {
  timeval tv{.tv_sec = static_cast<time_t>(timeout_ms / 1000),
             .tv_usec = static_cast<suseconds_t>((timeout_ms % 1000) * 1000)};
  const int one = 1;
  if (::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0 ||
      ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0 ||
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0) {
    return absl::InternalError(absl::StrCat("rows channel: setsockopt: ", strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace tailorkv::kvhost::rows
