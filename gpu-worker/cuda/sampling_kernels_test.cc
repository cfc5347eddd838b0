// The GPU greedy pick against runtime::GreedyPick, bit for bit: rows with
// ties at the maximum, NaN logits (at id 0 and elsewhere), -inf rows,
// repetition penalties over histories with repeats and out-of-range ids,
// odd vocabularies, a full batch of rows, poisoned outputs.
#include "cuda/sampling_kernels.cuh"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/test_rng.h"
#include "runtime/sampler.h"

namespace tailorkv::cuda {
namespace {

using test_util::Rng;

class SamplingKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

template <typename T>
absl::StatusOr<DeviceBuffer> Upload(const std::vector<T>& h) {
  absl::StatusOr<DeviceBuffer> d = DeviceBuffer::Allocate(std::max<size_t>(h.size() * sizeof(T), 16));
  if (!d.ok()) return d.status();
  CUDA_RETURN_IF_ERROR(cudaMemcpy(d->get(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
std::vector<T> Download(const DeviceBuffer& d, size_t n) {
  std::vector<T> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), d.get(), n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

void CheckRows(int n_rows, int vocab, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "rows " << n_rows << " vocab " << vocab);
  Rng rng(static_cast<uint32_t>(seed));
  const int64_t stride = vocab + 3;
  std::vector<float> logits(static_cast<size_t>(n_rows) * stride, std::nanf(""));
  std::vector<std::vector<int32_t>> history(n_rows);
  std::vector<float> penalty(n_rows);
  for (int b = 0; b < n_rows; ++b) {
    float* row = &logits[b * stride];
    // Coarse values, so that maxima tie often.
    for (int i = 0; i < vocab; ++i) row[i] = std::round(rng.Uniform(-8.0f, 8.0f) * 2.0f) / 2.0f;
    switch (b % 6) {
      case 1: row[0] = std::nanf(""); break;                         // NaN at id 0 wins
      case 2: row[vocab / 2] = std::nanf(""); row[1] = 100.0f; break;  // NaN elsewhere never
      case 3: for (int i = 0; i < vocab; ++i) row[i] = -INFINITY; break;
      case 4: row[vocab - 1] = 50.0f; row[vocab / 3] = 50.0f; break;  // a tie at the top
      default: break;
    }
    penalty[b] = (b % 3 == 0) ? 1.0f : (b % 3 == 1 ? 1.3f : 0.7f);
    // History: the current best tokens (so the penalty matters), repeats,
    // ids outside the vocabulary.
    for (int i = 0; i < 40; ++i) history[b].push_back(static_cast<int32_t>(rng.Uniform(0.0f, 1.0f) * vocab) % vocab);
    int32_t top = 0;
    for (int i = 1; i < vocab; ++i) if (row[i] > row[top]) top = i;
    history[b].push_back(top);
    history[b].push_back(top);
    history[b].push_back(-3);
    history[b].push_back(vocab + 7);
  }
  const int words = (vocab + 31) / 32;
  absl::StatusOr<DeviceBuffer> d_logits = Upload(logits),
                               d_seen = Upload(std::vector<uint32_t>(static_cast<size_t>(n_rows) * words, 0)),
                               d_out = Upload(std::vector<int32_t>(n_rows, -77));
  ASSERT_TRUE(d_logits.ok() && d_seen.ok() && d_out.ok());
  GreedyPickRows rows;
  std::vector<DeviceBuffer> d_hist;
  for (int b = 0; b < n_rows; ++b) {
    auto h = Upload(history[b]);
    ASSERT_TRUE(h.ok());
    uint32_t* seen = d_seen->as<uint32_t>() + static_cast<size_t>(b) * words;
    // Marked in two calls, as the backend marks a prompt and then each step.
    const int half = static_cast<int>(history[b].size()) / 2;
    ASSERT_TRUE(LaunchMarkSeen(h->as<int32_t>(), half, vocab, seen, nullptr).ok());
    ASSERT_TRUE(LaunchMarkSeen(h->as<int32_t>() + half, static_cast<int>(history[b].size()) - half, vocab, seen,
                               nullptr).ok());
    rows.seen[b] = seen;
    rows.penalty[b] = penalty[b];
    d_hist.push_back(std::move(*h));
  }
  absl::Status st = LaunchGreedyPick(d_logits->as<float>(), stride, n_rows, vocab, rows, d_out->as<int32_t>(), nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<int32_t> got = Download<int32_t>(*d_out, n_rows);
  int penalized_changes = 0;
  for (int b = 0; b < n_rows; ++b) {
    const absl::Span<const float> row(&logits[b * stride], vocab);
    const int32_t want = runtime::GreedyPick(row, penalty[b], history[b]);
    EXPECT_EQ(got[b], want) << "row " << b;
    if (want != runtime::GreedyPick(row, 1.0f, {})) ++penalized_changes;
  }
  if (n_rows >= 6) EXPECT_GT(penalized_changes, 0) << "the penalty must change some pick";
  // The bitmap holds exactly the history's in-range tokens.
  const std::vector<uint32_t> seen = Download<uint32_t>(*d_seen, static_cast<size_t>(n_rows) * words);
  for (int b = 0; b < n_rows; ++b) {
    std::vector<uint32_t> want(words, 0);
    for (int32_t t : history[b]) if (t >= 0 && t < vocab) want[t >> 5] |= 1u << (t & 31);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), seen.begin() + static_cast<size_t>(b) * words)) << "row " << b;
  }
}

TEST_F(SamplingKernelsTest, GreedyPickMatchesReference) {
  CheckRows(1, 49152, 1);               // SmolLM2's vocabulary
  CheckRows(12, 1001, 2);               // odd, every case twice
  CheckRows(kMaxPickRows, 128256, 3);   // Llama-3's vocabulary, a full batch
  CheckRows(7, 33, 4);                  // fewer ids than threads
}

void ExpectBad(const absl::Status& s, const std::string& want) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(want), std::string::npos) << s.message() << " lacks " << want;
}

// Checked before any CUDA call: no device needed, pointers never read.
TEST(SamplingKernelsArgs, BadArgumentsNameTheField) {
  auto* f = reinterpret_cast<const float*>(uintptr_t{0x1000});
  auto* o = reinterpret_cast<int32_t*>(uintptr_t{0x2000});
  GreedyPickRows rows;
  ExpectBad(LaunchGreedyPick(f, 10, 0, 10, rows, o, nullptr), "LaunchGreedyPick: n_rows = 0");
  ExpectBad(LaunchGreedyPick(f, 10, kMaxPickRows + 1, 10, rows, o, nullptr), "n_rows");
  ExpectBad(LaunchGreedyPick(f, 10, 1, 0, rows, o, nullptr), "vocab = 0");
  ExpectBad(LaunchGreedyPick(f, 9, 1, 10, rows, o, nullptr), "row_stride = 9 < vocab = 10");
  ExpectBad(LaunchGreedyPick(nullptr, 10, 1, 10, rows, o, nullptr), "logits is null");
  ExpectBad(LaunchGreedyPick(f, 10, 1, 10, rows, nullptr, nullptr), "out is null");
  ExpectBad(LaunchMarkSeen(o, -1, 10, nullptr, nullptr), "LaunchMarkSeen: n = -1");
  ExpectBad(LaunchMarkSeen(o, 3, 0, reinterpret_cast<uint32_t*>(o), nullptr), "vocab = 0");
  ExpectBad(LaunchMarkSeen(nullptr, 3, 10, reinterpret_cast<uint32_t*>(o), nullptr), "tokens is null");
  ExpectBad(LaunchMarkSeen(o, 3, 10, nullptr, nullptr), "seen is null");
  EXPECT_TRUE(LaunchMarkSeen(nullptr, 0, 10, nullptr, nullptr).ok());
}

}  // namespace
}  // namespace tailorkv::cuda
