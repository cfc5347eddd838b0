// The rows channel of kv-host's remote data plane: a plain TCP connection
// that carries Gather and Write as fixed-width little-endian frames, beside
// the gRPC control plane (proto/tailorkv/v1/kv_host_data.proto, Ticket).
// Measured on this project's build machine, gRPC streams move rows at
// ~0.5 GB/s and this channel at 2.5-10 GB/s (docs/results.md).
//
//   hello    (client) magic "TKVR" u32, version u32, ticket[32]
//   welcome  (server) code u32 (absl::StatusCode), msg_len u32, msg
//   request  (client) op u32 (1 gather, 2 write), request_id u64, payload_len u64, payload
//     gather payload: n_ranges u32, per range: slice u64, offset u64, stride u64,
//                     row_bytes u32, n_rows u32, rows u32[n_rows]
//     write payload:  slice u64, offset u64, data
//   response (server) request_id u64, code u32, msg_len u32, data_len u64, msg, data
//
// Every request gets one response, in order; a response with code != 0
// carries no data and the connection stays usable. A frame that breaks
// these rules (bad magic, sizes past the limits) closes the connection.
// Everything the peer sends is checked against what the node handed out.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "absl/status/status.h"

namespace tailorkv::kvhost::rows {

inline constexpr uint32_t kMagic = 0x52564B54;  // "TKVR"
inline constexpr uint32_t kVersion = 1;
inline constexpr size_t kTicketBytes = 32;
inline constexpr uint32_t kOpGather = 1;
inline constexpr uint32_t kOpWrite = 2;
// Payload and response data limits: a gather's rows (kMaxGatherBytes) and
// its row lists; a write's data.
inline constexpr uint64_t kMaxPayloadBytes = uint64_t{80} << 20;
inline constexpr uint64_t kMaxWriteBytes = uint64_t{64} << 20;

inline void Put32(std::string& out, uint32_t v) { out.append(reinterpret_cast<const char*>(&v), 4); }
inline void Put64(std::string& out, uint64_t v) { out.append(reinterpret_cast<const char*>(&v), 8); }
inline uint32_t Get32(const char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t Get64(const char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Blocking I/O of exactly n bytes on a socket with SO_RCVTIMEO/SO_SNDTIMEO:
// DeadlineExceeded on a timeout, Unavailable when the peer closed or the
// connection broke (the message says which).
absl::Status ReadFull(int fd, void* buf, size_t n);
absl::Status WriteFull(int fd, const void* buf, size_t n);
// Sets both socket timeouts (0: none) and TCP_NODELAY.
absl::Status SetSocketOptions(int fd, int64_t timeout_ms);

}  // namespace tailorkv::kvhost::rows
