#include "client/placed_remote_rows.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace tailorkv::kvhost {

absl::StatusOr<std::unique_ptr<PlacedRemoteRows>> PlacedRemoteRows::Open(std::vector<RemoteRowsOptions> nodes) {
  if (nodes.empty() || nodes.size() > 255) {
    return absl::InvalidArgumentError(absl::StrCat("nodes: ", nodes.size(), " kv-host nodes, want 1 to 255"));
  }
  std::unique_ptr<PlacedRemoteRows> p(new PlacedRemoteRows());
  for (RemoteRowsOptions& o : nodes) {
    const std::string target = o.target;
    auto c = RemoteRowsClient::Open(std::move(o));
    if (!c.ok()) return absl::Status(c.status().code(), absl::StrCat("kv-host node ", target, ": ", c.status().message()));
    p->nodes_.push_back(std::move(*c));
  }
  return p;
}

absl::StatusOr<std::vector<uint64_t>> PlacedRemoteRows::Reserve(const std::string& session,
                                                                 absl::Span<const uint64_t> sizes) {
  {
    absl::MutexLock lock(&mu_);
    if (auto it = sessions_.find(session); it != sessions_.end()) {
      auto ids = nodes_[it->second]->Reserve(session, sizes);  // more slices for a session stay on its node
      if (!ids.ok()) return ids.status();
      for (uint64_t& id : *ids) id |= static_cast<uint64_t>(it->second) << kNodeShift;
      return ids;
    }
  }
  // Reachable nodes first, then the most free budget first.
  std::vector<int> order(nodes_.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [this](int a, int b) {
    if (nodes_[a]->healthy() != nodes_[b]->healthy()) return nodes_[a]->healthy();
    return nodes_[a]->free_bytes() > nodes_[b]->free_bytes();
  });
  absl::Status last;
  for (int n : order) {
    auto ids = nodes_[n]->Reserve(session, sizes);
    if (ids.ok()) {
      for (uint64_t& id : *ids) {
        if (id >> kNodeShift != 0) return absl::InternalError("kv-host node handed out a slice id past 2^56");
        id |= static_cast<uint64_t>(n) << kNodeShift;
      }
      absl::MutexLock lock(&mu_);
      sessions_[session] = n;
      return ids;
    }
    last = ids.status();
    if (!absl::IsResourceExhausted(last) && !absl::IsUnavailable(last) && !absl::IsDeadlineExceeded(last)) break;
  }
  return absl::Status(last.code(), absl::StrCat("every kv-host node (", nodes_.size(), ") refused: ", last.message()));
}

absl::Status PlacedRemoteRows::Write(uint64_t slice_id, uint64_t offset, absl::Span<const std::byte> data) {
  const uint64_t n = slice_id >> kNodeShift;
  if (n >= nodes_.size()) return absl::InvalidArgumentError(absl::StrCat("slice_id: no node ", n));
  return nodes_[n]->Write(slice_id & ((uint64_t{1} << kNodeShift) - 1), offset, data);
}

absl::Status PlacedRemoteRows::Gather(absl::Span<const RowRequest> requests, absl::Span<std::byte> out) {
  if (requests.empty()) return out.empty() ? absl::OkStatus() : absl::InvalidArgumentError("out: bytes for no rows");
  const uint64_t n = requests.front().slice_id >> kNodeShift;
  std::vector<RowRequest> local(requests.begin(), requests.end());
  for (RowRequest& r : local) {
    if ((r.slice_id >> kNodeShift) != n) {
      return absl::InvalidArgumentError("requests: slices of several nodes in one Gather (a session lives on one)");
    }
    r.slice_id &= (uint64_t{1} << kNodeShift) - 1;
  }
  if (n >= nodes_.size()) return absl::InvalidArgumentError(absl::StrCat("slice_id: no node ", n));
  return nodes_[n]->Gather(local, out);
}

absl::StatusOr<uint64_t> PlacedRemoteRows::CloseSession(const std::string& session) {
  int n = -1;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(session);
    if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("session_id: no session \"", session, "\""));
    n = it->second;
    sessions_.erase(it);
  }
  return nodes_[n]->CloseSession(session);
}

int PlacedRemoteRows::SessionNode(const std::string& session) const {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(session);
  return it == sessions_.end() ? -1 : it->second;
}

}  // namespace tailorkv::kvhost
