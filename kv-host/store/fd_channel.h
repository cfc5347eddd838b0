// The fd channel between kv-host and a co-located worker: a UNIX
// SOCK_SEQPACKET connection (message boundaries kept, in order, reliable)
// whose messages carry a small payload and, with SCM_RIGHTS, file
// descriptors (the memfd arenas). The connection also tells each side that
// the other is alive: a peer that dies closes it (EOF within the kernel's
// cleanup of the dead process, no timeout needed).
//
// Every received descriptor is owned (ScopedFd) and CLOEXEC from the moment
// it arrives (MSG_CMSG_CLOEXEC). Nothing here is thread-safe per socket: one
// sender and one receiver at a time.
#pragma once

#include <sys/types.h>

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "store/memfd_arena.h"

namespace tailorkv::kvhost {

// Largest payload and descriptor count of one message.
inline constexpr size_t kFdMessageMaxPayload = 64 * 1024;
inline constexpr int kFdMessageMaxFds = 64;

struct FdMessage {
  std::string payload;
  std::vector<ScopedFd> fds;
};

// The credentials the kernel recorded for the peer when it connected.
struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

// A listening SOCK_SEQPACKET socket at `path` (a stale socket file there is
// replaced; the parent directory must exist), CLOEXEC and non-blocking.
// InvalidArgument naming "path" when it does not fit sockaddr_un; errno
// otherwise.
absl::StatusOr<ScopedFd> ListenSeqpacket(const std::string& path, int backlog = 64);

// Accepts one pending connection (CLOEXEC, blocking I/O); Unavailable when
// none is pending (the listener is non-blocking).
absl::StatusOr<ScopedFd> AcceptSeqpacket(int listener);

// Connects to `path` (CLOEXEC, blocking I/O). Unavailable when nobody
// listens there (ENOENT, ECONNREFUSED), with the path in the message.
absl::StatusOr<ScopedFd> ConnectSeqpacket(const std::string& path);

// The peer's pid / uid / gid (SO_PEERCRED).
absl::StatusOr<PeerCredentials> PeerCredentialsOf(int sock);

// Sends one message: InvalidArgument naming "payload" / "fds" past the
// limits above; Unavailable when the peer is gone (EPIPE, ECONNRESET; never
// SIGPIPE); DeadlineExceeded when the peer does not take it within
// `timeout` (a stalled peer cannot block the sender forever).
absl::Status SendFdMessage(int sock, std::string_view payload, absl::Span<const int> fds,
                           absl::Duration timeout = absl::Seconds(5));

// Receives one message, waiting up to `timeout` (InfiniteDuration: no
// limit). Unavailable "peer closed" at EOF; DeadlineExceeded after the
// timeout; DataLoss when the payload or the descriptors were truncated (the
// descriptors that did arrive are closed).
absl::StatusOr<FdMessage> ReceiveFdMessage(int sock, absl::Duration timeout);

}  // namespace tailorkv::kvhost
