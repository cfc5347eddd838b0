// PlacedRemoteRows: one RemoteRowStore over several kv-host nodes (issue 17's
// placement). Each session (a sequence's sparse layers) goes whole to one
// node: the reachable node with the most free budget (as its last KeepAlive
// said), then the next on RESOURCE_EXHAUSTED or UNAVAILABLE; nodes that fail
// their KeepAlive leave the choice until one succeeds again. Slice ids carry
// their node in the top byte, so Write and Gather go where the slice lives.
// The worker lists the nodes (gpu-worker --kv-host-remote a:p,b:p); with a
// co-located kv-host too, the CPU backend asks that one first.
// Thread-safety: thread-safe.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "client/remote_rows_client.h"
#include "store/remote_rows.h"

namespace tailorkv::kvhost {

class PlacedRemoteRows final : public RemoteRowStore {
 public:
  // Opens every node (all must answer: a typo in the list should not pass
  // silently); at most 255 nodes.
  static absl::StatusOr<std::unique_ptr<PlacedRemoteRows>> Open(std::vector<RemoteRowsOptions> nodes);

  absl::StatusOr<std::vector<uint64_t>> Reserve(const std::string& session, absl::Span<const uint64_t> sizes) override;
  absl::Status Write(uint64_t slice_id, uint64_t offset, absl::Span<const std::byte> data) override;
  absl::Status Gather(absl::Span<const RowRequest> requests, absl::Span<std::byte> out) override;
  absl::StatusOr<uint64_t> CloseSession(const std::string& session) override;

  size_t nodes() const { return nodes_.size(); }
  RemoteRowsClient& node(size_t i) { return *nodes_[i]; }
  // The node a session lives on (for tests and logs), or -1.
  int SessionNode(const std::string& session) const;

 private:
  static constexpr int kNodeShift = 56;
  std::vector<std::unique_ptr<RemoteRowsClient>> nodes_;
  mutable absl::Mutex mu_;
  std::map<std::string, int> sessions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tailorkv::kvhost
