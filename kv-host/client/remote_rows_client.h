// RemoteRowsClient: a worker's side of kv-host's remote data plane
// (proto/tailorkv/v1/kv_host_data.proto; server: daemon/data_service.h).
//
// Open() authenticates with the node's token and gets a worker key and a
// lease; a background thread renews the lease (KeepAlive every lease / 3)
// and records the node's free budget for placement. Per sequence: Reserve
// slices (one call for all its layers), Write the rows into them, Gather the
// rows a decode step selected (one request per layer on one long-lived
// bidirectional stream: no connection set-up per step), CloseSession.
// Gather and Write take the node's rows channel (a plain TCP connection
// opened with a one-time ticket, store/rows_channel.h) when it offers one
// and TLS is off: 5-10x the gRPC stream's throughput here.
//
// Errors are the node's status as it sent it (UNAVAILABLE when the node is
// unreachable; DEADLINE_EXCEEDED after rpc_timeout; NOT_FOUND for slices of
// sessions the node freed when this worker's lease ran out). When the node
// forgot this worker, KeepAlive and Reserve open again (a new key): later
// sequences work, the lost ones fail.
// Thread-safety: all methods are thread-safe; Gather calls are serialized
// on the one stream.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "store/remote_rows.h"

namespace tailorkv::kvhost {

struct RemoteRowsOptions {
  std::string target;     // host:port of the node's --data-listen
  std::string token;      // the node's --data-token
  std::string worker_id;  // printable ASCII, for the node's logs
  std::string tls_ca_file;  // PEM roots: TLS to the node (empty: plaintext)
  // Every call, and every Gather on the stream, ends by this deadline (a
  // partitioned node: DEADLINE_EXCEEDED, never a hang).
  absl::Duration rpc_timeout = absl::Seconds(10);
  // CloseSession runs where a sequence ends (the engine's thread): short, as
  // the node frees an unreachable worker's sessions when its lease ends.
  absl::Duration close_timeout = absl::Seconds(1);
};

class RemoteRowsClient final : public RemoteRowStore {
 public:
  static absl::StatusOr<std::unique_ptr<RemoteRowsClient>> Open(RemoteRowsOptions options);
  // Stops the lease renewal and closes the stream (the node frees this
  // worker's memory when its lease runs out, or at CloseSession).
  ~RemoteRowsClient();

  absl::StatusOr<std::vector<uint64_t>> Reserve(const std::string& session,
                                                absl::Span<const uint64_t> sizes) override;
  // Writes `data` at `offset` of the slice (in chunks of at most 4 MiB).
  absl::Status Write(uint64_t slice_id, uint64_t offset, absl::Span<const std::byte> data) override;
  // The requests' rows concatenated in order into `out`, which must hold
  // exactly their bytes (InvalidArgument naming "out" otherwise).
  absl::Status Gather(absl::Span<const RowRequest> requests, absl::Span<std::byte> out) override;
  absl::StatusOr<uint64_t> CloseSession(const std::string& session) override;

  // The node's budget and its free bytes at the last Open / KeepAlive.
  uint64_t budget_bytes() const { return budget_bytes_; }
  uint64_t free_bytes() const { return free_bytes_.load(); }
  absl::Duration lease() const { return lease_; }
  // Whether the rows channel is connected (Gather and Write use it).
  bool rows_channel_in_use();
  // False from a failed KeepAlive (the node unreachable) until one succeeds:
  // placement skips the node meanwhile.
  bool healthy() const { return healthy_.load(); }
  const std::string& target() const { return options_.target; }

 private:
  struct Impl;
  explicit RemoteRowsClient(RemoteRowsOptions options);
  void KeepAliveLoop();
  // Cancels the Gather stream when a request outlives rpc_timeout.
  void WatchdogLoop();
  // The rows channel (store/rows_channel.h): a ticket, then the connection.
  // Callers hold gather_mu_.
  absl::Status ConnectRows();
  // Whether Gather / Write go over the rows channel (connecting it if need be).
  bool UseRows();
  // One request on it: a failure that leaves it out of step closes it.
  absl::Status RowsCall(uint32_t op, const std::string& payload, absl::Span<std::byte> out);

  const RemoteRowsOptions options_;
  std::unique_ptr<Impl> impl_;
  // The worker key (replaced when the node forgot this worker: a lease that
  // ran out during a partition, or a restarted node).
  std::string Key() const;
  // Open again after the node refused `stale_key`: a new key, the old one's
  // sessions gone. One at a time; a no-op when another caller already
  // replaced that key (two new identities would split a worker's sessions).
  absl::Status Reopen(const std::string& stale_key);
  absl::Mutex reopen_mu_;
  mutable absl::Mutex key_mu_;
  std::string key_ ABSL_GUARDED_BY(key_mu_);
  absl::Duration lease_;
  uint64_t budget_bytes_ = 0;
  std::atomic<uint64_t> free_bytes_{0};
  std::atomic<bool> healthy_{true};
  absl::Mutex gather_mu_;  // one Gather at a time on the stream
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // The Gather in flight: its deadline (InfiniteFuture when none) and
  // whether the watchdog cancelled it.
  absl::Time gather_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  bool gather_cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::thread keepalive_;
  std::thread watchdog_;
};

}  // namespace tailorkv::kvhost
