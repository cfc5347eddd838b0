#include "runtime/sparse_reference.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "model/ggml_types.h"

namespace tailorkv::runtime {

void MapThroughPool(const int32_t* idx, int k, const int32_t* pool, int n_pool, int rows, int32_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < k; ++i) {
      const int32_t j = idx[r * k + i];
      out[r * k + i] = (j >= 0 && j < n_pool) ? pool[r * n_pool + j] : -1;
    }
  }
}

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

absl::StatusOr<int> AssignSlots(int32_t* slot_tok, const int32_t* next, int count, int32_t* miss) {
  if (count < 0) return absl::InvalidArgumentError(absl::StrCat("AssignSlots: count = ", count, " < 0"));
  if (count == 0) return 0;
  for (const auto& [p, name] : {std::pair<const void*, const char*>{slot_tok, "slot_tok"},
                                {next, "next"}, {miss, "miss"}}) {
    if (p == nullptr) return absl::InvalidArgumentError(absl::StrCat("AssignSlots: ", name, " is null"));
  }
  // Linear searches: the reference, not the fast path.
  auto in = [](const int32_t* a, int n, int32_t v) { return std::find(a, a + n, v) != a + n; };
  std::vector<int> freed;
  int kept = 0;
  for (int s = 0; s < count; ++s) {
    miss[s] = -1;
    if (slot_tok[s] >= 0 && in(next, count, slot_tok[s])) {
      ++kept;
    } else {
      freed.push_back(s);
    }
  }
  std::vector<int32_t> fresh;
  for (int i = 0; i < count; ++i) {
    if (next[i] >= 0 && !in(slot_tok, count, next[i])) fresh.push_back(next[i]);
  }
  // Each kept slot holds one token of `next`, so the fresh ones fit.
  for (size_t r = 0; r < freed.size(); ++r) {
    const int s = freed[r];
    slot_tok[s] = r < fresh.size() ? fresh[r] : -1;
    miss[s] = r < fresh.size() ? fresh[r] : -1;
  }
  return kept;
}

}  // namespace tailorkv::runtime

namespace tailorkv::runtime {

absl::StatusOr<int> ChooseChannels(const float* q_mean, const float* max_abs_k, int head_dim, int d,
                                   int32_t* out) {
  if (head_dim < 1) return absl::InvalidArgumentError("head_dim must be >= 1");
  std::vector<float> score(head_dim);
  for (int c = 0; c < head_dim; ++c) score[c] = std::fabs(q_mean[c]) * max_abs_k[c];
  return TopKIndices(score.data(), head_dim, d, out);
}

void ScoreOnChannels(const float* q, int d, const float* rows, int n, float* out) {
  for (int i = 0; i < n; ++i) {
    const float* r = rows + static_cast<int64_t>(i) * d;
    float dot = 0.0f;
    for (int j = 0; j < d; ++j) dot += q[j] * r[j];
    out[i] = dot;
  }
}

namespace {

// Channel c (a chosen channel) of query head q of RoPE(Wq x) at `pos`: the
// two rows of the pair RoPE rotates together, each an fp32 dot product in
// input order, then ApplyRope's rotation.
float RotatedQueryChannel(const float* x, const float* wq, int hidden, int head_dim, int q, int c,
                          int pos, const float* inv_freq, bool adjacent_pairs) {
  const int half = head_dim / 2;
  auto dot_row = [&](int64_t row) {
    const float* w = wq + row * hidden;
    float s = 0.0f;
    for (int i = 0; i < hidden; ++i) s += w[i] * x[i];
    return s;
  };
  const int i = adjacent_pairs ? c / 2 : c % half;
  const int a = adjacent_pairs ? 2 * i : i;
  const int b = adjacent_pairs ? 2 * i + 1 : i + half;
  const float angle = static_cast<float>(pos) * inv_freq[i];
  const float cs = std::cos(angle), sn = std::sin(angle);
  const int64_t base = static_cast<int64_t>(q) * head_dim;
  const float x0 = dot_row(base + a), x1 = dot_row(base + b);
  return c == a ? x0 * cs - x1 * sn : x0 * sn + x1 * cs;
}

}  // namespace

void SpeculativeQueryMean(const float* x, const float* wq, int hidden, int n_heads, int n_kv_heads,
                          int head_dim, const int32_t* chans, int d, int pos, const float* inv_freq,
                          bool adjacent_pairs, float* out) {
  const int group = n_heads / n_kv_heads;
  for (int h = 0; h < n_kv_heads; ++h) {
    for (int j = 0; j < d; ++j) {
      float sum = 0.0f;
      for (int g = 0; g < group; ++g) {
        sum += RotatedQueryChannel(x, wq, hidden, head_dim, h * group + g, chans[h * d + j], pos,
                                   inv_freq, adjacent_pairs);
      }
      out[h * d + j] = sum / static_cast<float>(group);
    }
  }
}

void RoundIndexBlock4(float* v, int n, int64_t stride) {
  if (n <= 0) return;
  float lo = INFINITY, hi = -INFINITY;
  for (int i = 0; i < n; ++i) {
    const float x = v[i * stride];
    if (std::isnan(x)) continue;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  if (!(lo <= hi)) return;  // all NaN
  const float z = model::Bf16ToFloat(model::FloatToBf16(lo));
  const float step = model::Bf16ToFloat(model::FloatToBf16((hi - z) / 15.0f));
  const bool flat = !(step > 0.0f) || !std::isfinite(step);
  for (int i = 0; i < n; ++i) {
    float& x = v[i * stride];
    if (std::isnan(x)) continue;
    x = flat ? z : z + std::clamp(std::nearbyint((x - z) / step), 0.0f, 15.0f) * step;
  }
}

void SpeculativeQueryHeads(const float* x, const float* wq, int hidden, int n_heads, int n_kv_heads,
                           int head_dim, const int32_t* chans, int d, int pos, const float* inv_freq,
                           bool adjacent_pairs, float* out) {
  const int group = n_heads / n_kv_heads;
  for (int q = 0; q < n_heads; ++q) {
    for (int j = 0; j < d; ++j) {
      out[static_cast<int64_t>(q) * d + j] = RotatedQueryChannel(
          x, wq, hidden, head_dim, q, chans[(q / group) * d + j], pos, inv_freq, adjacent_pairs);
    }
  }
}

}  // namespace tailorkv::runtime
