#include "runtime/sparse_reference.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace tailorkv::runtime {

absl::StatusOr<int> TopKIndices(const float* scores, int n, int k, int32_t* out) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("TopKIndices: n = ", n, " < 0"));
  if (k < 0) return absl::InvalidArgumentError(absl::StrCat("TopKIndices: k = ", k, " < 0"));
  const int m = std::min(k, n);
  if (m == 0) return 0;
  if (scores == nullptr) return absl::InvalidArgumentError("TopKIndices: scores is null");
  if (out == nullptr) return absl::InvalidArgumentError("TopKIndices: out is null");
  if (m == n) {  // everything is selected: no ranking needed
    for (int i = 0; i < n; ++i) out[i] = i;
    return n;
  }
  // (key, index) with the better element first: larger key, then smaller index.
  std::vector<std::pair<uint32_t, int32_t>> items(n);
  for (int i = 0; i < n; ++i) items[i] = {TopKKey(scores[i]), i};
  auto better = [](const std::pair<uint32_t, int32_t>& a, const std::pair<uint32_t, int32_t>& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  std::nth_element(items.begin(), items.begin() + (m - 1), items.end(), better);
  for (int i = 0; i < m; ++i) out[i] = items[i].second;
  std::sort(out, out + m);
  return m;
}

absl::Status GatherRows(const void* src, int64_t src_rows, int64_t row_bytes, const int32_t* idx,
                        int count, void* dst) {
  if (src_rows < 0) return absl::InvalidArgumentError(absl::StrCat("GatherRows: src_rows = ", src_rows, " < 0"));
  if (row_bytes < 0) return absl::InvalidArgumentError(absl::StrCat("GatherRows: row_bytes = ", row_bytes, " < 0"));
  if (count < 0) return absl::InvalidArgumentError(absl::StrCat("GatherRows: count = ", count, " < 0"));
  if (count == 0 || row_bytes == 0) return absl::OkStatus();
  if (idx == nullptr) return absl::InvalidArgumentError("GatherRows: idx is null");
  if (src == nullptr) return absl::InvalidArgumentError("GatherRows: src is null");
  if (dst == nullptr) return absl::InvalidArgumentError("GatherRows: dst is null");
  for (int i = 0; i < count; ++i) {
    if (idx[i] < 0 || idx[i] >= src_rows) {
      return absl::InvalidArgumentError(
          absl::StrCat("GatherRows: idx[", i, "] = ", idx[i], " outside [0, ", src_rows, ")"));
    }
  }
  const auto* s = static_cast<const unsigned char*>(src);
  auto* d = static_cast<unsigned char*>(dst);
  for (int i = 0; i < count; ++i) {
    std::memcpy(d + static_cast<int64_t>(i) * row_bytes, s + static_cast<int64_t>(idx[i]) * row_bytes,
                static_cast<size_t>(row_bytes));
  }
  return absl::OkStatus();
}

}  // namespace tailorkv::runtime
