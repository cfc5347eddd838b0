// RemoteRowStore: the sparse layers' host KV kept on another node and moved
// by rows (kv-host's remote data plane, proto/tailorkv/v1/kv_host_data.proto).
// Backends use only this interface (no gRPC in the runtime);
// client/remote_rows_client.h implements it over gRPC, tests with fakes.
//
// A session's slices are reserved in one call, written (a prompt's rows when
// it ends, later rows as they come) and gathered by rows: one Gather per
// layer and decode step carries every KV head's selected rows.
// Thread-safety: implementations are thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tailorkv::kvhost {

// Rows of one slice: row r at offset + rows[r] * stride, row_bytes each.
struct RowRequest {
  uint64_t slice_id = 0;
  uint64_t offset = 0;
  uint64_t stride = 0;
  uint32_t row_bytes = 0;
  std::vector<uint32_t> rows;
};

// The most row bytes one Gather may ask for (the node refuses more).
inline constexpr uint64_t kMaxGatherBytes = uint64_t{64} << 20;

class RemoteRowStore {
 public:
  virtual ~RemoteRowStore() = default;
  // One slice per size for `session` (opened if new), all or nothing.
  virtual absl::StatusOr<std::vector<uint64_t>> Reserve(const std::string& session,
                                                        absl::Span<const uint64_t> sizes) = 0;
  // `data` at `offset` of a reserved slice.
  virtual absl::Status Write(uint64_t slice_id, uint64_t offset, absl::Span<const std::byte> data) = 0;
  // The requests' rows, concatenated in order, into `out` (exactly their bytes).
  virtual absl::Status Gather(absl::Span<const RowRequest> requests, absl::Span<std::byte> out) = 0;
  // Frees the session's slices; returns the bytes freed.
  virtual absl::StatusOr<uint64_t> CloseSession(const std::string& session) = 0;
};

}  // namespace tailorkv::kvhost
