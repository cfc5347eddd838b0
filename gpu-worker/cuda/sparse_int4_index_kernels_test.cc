// The 4-bit index kernels against runtime/sparse_reference.h, bit-exactly:
// - build from mapped bf16 host rows: the decoded entries equal
//   RoundIndexBlock4 over each channel's blocks of 64 positions (a partial
//   last block, a channel with one repeated value, odd d, both head sizes);
//   positions past `rows` keep their poison;
// - scores over random codes and params equal ScoreOnChannels of the decoded
//   entries (blocks straddling score blocks, offsets, odd d);
// - bad arguments name the field (no device needed).
#include "cuda/sparse_int4_index_kernels.cuh"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/test_host_mapped.h"
#include "cuda/test_rng.h"
#include "model/ggml_types.h"
#include "runtime/kv_plan.h"
#include "runtime/sparse_reference.h"

namespace tailorkv::cuda {
namespace {

using test_util::HostMapped;
using test_util::RandomPool;
using test_util::Rng;
using bf16 = __nv_bfloat16;

constexpr int kBlock = runtime::kIndexBlock;

class SparseInt4IndexTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

template <typename T>
DeviceBuffer Upload(const std::vector<T>& h) {
  absl::StatusOr<DeviceBuffer> d = DeviceBuffer::Allocate(std::max<size_t>(h.size() * sizeof(T), 16));
  EXPECT_TRUE(d.ok()) << d.status();
  if (!d.ok()) return DeviceBuffer();
  EXPECT_EQ(cudaMemcpy(d->get(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return std::move(*d);
}

template <typename T>
std::vector<T> Download(const DeviceBuffer& d, size_t n) {
  std::vector<T> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), d.get(), n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// The entry the GPU layout holds for (head h, position p, channel j).
float Decode(const std::vector<uint8_t>& codes, const std::vector<uint16_t>& params, int64_t index_rows,
             int d, int h, int64_t p, int j) {
  const int cb = (d + 1) / 2;
  const int64_t n_blocks = (index_rows + kBlock - 1) / kBlock;
  const uint8_t byte = codes[(static_cast<size_t>(h) * index_rows + p) * cb + j / 2];
  const float code = static_cast<float>((byte >> (4 * (j % 2))) & 0xF);
  const size_t at = ((static_cast<size_t>(h) * n_blocks + p / kBlock) * d + j) * 2;
  const float z = model::Bf16ToFloat(params[at]), step = model::Bf16ToFloat(params[at + 1]);
  return z + code * step;
}

void CheckBuild(int n_kv, int head_dim, int d, int64_t host_rows, int rows, int64_t index_rows,
                uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << n_kv << " head_dim=" << head_dim << " d=" << d
                                  << " rows=" << rows);
  Rng rng(seed);
  const size_t host_elems = static_cast<size_t>(n_kv) * host_rows * 2 * head_dim;
  HostMapped host(host_elems * 2);
  ASSERT_NE(host.device(), nullptr);
  std::vector<uint16_t> bits(host_elems);
  for (auto& b : bits) b = model::FloatToBf16(rng.Uniform(-6.0f, 6.0f));
  // Channel 0 of head 0 constant over the first block: a flat block.
  for (int p = 0; p < std::min(rows, kBlock); ++p) bits[static_cast<size_t>(p) * 2 * head_dim] = model::FloatToBf16(1.25f);
  std::memcpy(host.bytes(), bits.data(), host_elems * 2);
  std::vector<int32_t> chans;
  for (int h = 0; h < n_kv; ++h) {
    std::vector<int32_t> all(head_dim);
    for (int c = 0; c < head_dim; ++c) all[c] = c;
    for (int c = head_dim - 1; c > 1; --c) {
      std::swap(all[c], all[1 + static_cast<int>(rng.Uniform(0.0f, static_cast<float>(c)))]);
    }
    std::sort(all.begin(), all.begin() + d);
    chans.insert(chans.end(), all.begin(), all.begin() + d);
  }
  const size_t code_bytes = Int4IndexCodeBytes(n_kv, index_rows, d);
  const size_t param_elems = Int4IndexParamBytes(n_kv, index_rows, d) / 2;
  DeviceBuffer d_chans = Upload(chans), d_codes = Upload(std::vector<uint8_t>(code_bytes, 0xA5)),
               d_params = Upload(std::vector<uint16_t>(param_elems, 0xDEAD));
  absl::Status st = LaunchBuildInt4ChannelIndex(host.device<bf16>(), host_rows, rows, d_chans.as<int32_t>(), d,
                                                n_kv, head_dim, d_codes.as<uint8_t>(), d_params.as<bf16>(),
                                                index_rows, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto codes = Download<uint8_t>(d_codes, code_bytes);
  const auto params = Download<uint16_t>(d_params, param_elems);
  int bad = 0;
  for (int h = 0; h < n_kv; ++h) {
    for (int j = 0; j < d; ++j) {
      const int c = chans[h * d + j];
      std::vector<float> col(rows);
      for (int p = 0; p < rows; ++p) {
        col[p] = model::Bf16ToFloat(bits[(static_cast<size_t>(h) * host_rows + p) * 2 * head_dim + c]);
      }
      for (int b = 0; b < rows; b += kBlock) runtime::RoundIndexBlock4(col.data() + b, std::min(kBlock, rows - b), 1);
      for (int p = 0; p < rows; ++p) {
        const float got = Decode(codes, params, index_rows, d, h, p, j);
        if (Bits(got) != Bits(col[p]) && bad++ < 5) {
          ADD_FAILURE() << "h " << h << " p " << p << " j " << j << ": " << got << " vs " << col[p];
        }
      }
    }
  }
  // Rows past `rows` untouched.
  const int cb = (d + 1) / 2;
  for (int h = 0; h < n_kv; ++h) {
    for (int64_t p = rows; p < index_rows; ++p) {
      for (int x = 0; x < cb; ++x) {
        if (codes[(static_cast<size_t>(h) * index_rows + p) * cb + x] != 0xA5 && bad++ < 5) {
          ADD_FAILURE() << "code of row " << p << " overwritten";
        }
      }
    }
  }
  // Channel 0 (always chosen: the shuffle keeps it first) of head 0 is flat
  // over the first block: every entry is its value.
  ASSERT_EQ(chans[0], 0);
  for (int p = 0; p < std::min(rows, kBlock); ++p) EXPECT_EQ(Decode(codes, params, index_rows, d, 0, p, 0), 1.25f);
}

TEST_F(SparseInt4IndexTest, BuildMatchesTheReferenceRounding) {
  uint64_t seed = 900;
  for (int head_dim : {64, 128}) {
    for (int d : {1, 7, 32, 64}) CheckBuild(3, head_dim, d, 203, 200, 210, ++seed);  // partial last block
  }
  CheckBuild(2, 128, 16, 128, 128, 128, ++seed);  // whole blocks
  CheckBuild(1, 64, 5, 10, 1, 3, ++seed);         // a single row
}

// pooled: the scores of a refine pool's positions (RandomPool) instead of
// [first, first + n).
void CheckScore(int n_kv, int d, int64_t index_rows, int first, int n, uint64_t seed, bool pooled = false) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << n_kv << " d=" << d << " first=" << first << " n=" << n
                                  << (pooled ? " pooled" : ""));
  Rng rng(seed);
  const size_t code_bytes = Int4IndexCodeBytes(n_kv, index_rows, d);
  const size_t param_elems = Int4IndexParamBytes(n_kv, index_rows, d) / 2;
  std::vector<uint8_t> codes(code_bytes);
  for (auto& c : codes) c = static_cast<uint8_t>(rng.Uniform(0.0f, 256.0f));
  std::vector<uint16_t> params(param_elems);
  for (size_t i = 0; i < param_elems; i += 2) {
    params[i] = model::FloatToBf16(rng.Uniform(-3.0f, 1.0f));
    params[i + 1] = model::FloatToBf16(rng.Uniform(0.0f, 0.4f));
  }
  std::vector<float> q(static_cast<size_t>(n_kv) * d);
  for (float& x : q) x = rng.Uniform(-2.0f, 2.0f);
  const int64_t stride = n + 3;
  const std::vector<int32_t> pool =
      pooled ? RandomPool(n_kv, n, static_cast<int>(index_rows - first), rng) : std::vector<int32_t>();
  DeviceBuffer d_codes = Upload(codes), d_params = Upload(params), d_q = Upload(q),
               d_scores = Upload(std::vector<float>(n_kv * stride, std::nanf(""))),
               d_pool = Upload(pooled ? pool : std::vector<int32_t>(1));
  absl::Status st = LaunchScoreInt4ChannelIndex(d_q.as<float>(), d_codes.as<uint8_t>(), d_params.as<bf16>(),
                                                index_rows, d, n_kv, first, n, d_scores.as<float>(), stride,
                                                nullptr, pooled ? d_pool.as<int32_t>() : nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = Download<float>(d_scores, n_kv * stride);
  std::vector<float> rows(static_cast<size_t>(n) * d), want(n);
  int bad = 0;
  for (int h = 0; h < n_kv; ++h) {
    for (int i = 0; i < n; ++i) {
      const int64_t p = first + (pooled ? pool[static_cast<size_t>(h) * n + i] : i);
      for (int j = 0; j < d; ++j) {
        rows[static_cast<size_t>(i) * d + j] = p < index_rows ? Decode(codes, params, index_rows, d, h, p, j) : 0.0f;
      }
    }
    runtime::ScoreOnChannels(q.data() + h * d, d, rows.data(), n, want.data());
    if (pooled) want[n - 1] = -INFINITY;  // RandomPool's out-of-range entry
    for (int64_t i = 0; i < stride; ++i) {
      const float g = got[h * stride + i];
      if (i < n) {
        if (Bits(g) != Bits(want[i]) && bad++ < 5) ADD_FAILURE() << "head " << h << " i " << i << ": " << g << " vs " << want[i];
      } else if (!std::isnan(g) && bad++ < 5) {
        ADD_FAILURE() << "head " << h << " sentinel " << i << " overwritten";
      }
    }
  }
}

TEST_F(SparseInt4IndexTest, ScoresMatchScoreOnChannelsOfTheDecodedEntries) {
  uint64_t seed = 950;
  for (int d : {1, 7, 16, 32, 33, 64}) CheckScore(3, d, 1000, 37, 901, ++seed);
  CheckScore(8, 32, 70001, 3, 69997, ++seed);  // many blocks
  CheckScore(1, 7, 5, 4, 1, ++seed);           // one position, the last row
  // Refine pools: scattered positions over many index blocks.
  for (int d : {7, 32, 64}) CheckScore(3, d, 5000, 37, 300, ++seed, /*pooled=*/true);
  CheckScore(8, 64, 70001, 3, 3584, ++seed, /*pooled=*/true);
  CheckScore(2, 16, 40, 3, 38, ++seed, /*pooled=*/true);  // every position, then the bad entry
}

void ExpectBad(const absl::Status& s, const std::string& want) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s << " (want '" << want << "')";
  EXPECT_NE(s.message().find(want), std::string::npos) << "message '" << s.message() << "'";
}

// Every check runs before any CUDA call; the pointers are never dereferenced.
TEST(SparseInt4IndexArgs, BadArgumentsNameTheField) {
  alignas(16) static uint8_t buf[64];
  const auto* h = reinterpret_cast<const bf16*>(buf);
  auto* codes = buf;
  auto* params = reinterpret_cast<bf16*>(buf);
  const auto* idx = reinterpret_cast<const int32_t*>(buf);
  constexpr const char* B = "LaunchBuildInt4ChannelIndex: ";
  ExpectBad(LaunchBuildInt4ChannelIndex(h, 64, 8, idx, 4, 0, 128, codes, params, 64, nullptr), std::string(B) + "n_kv");
  ExpectBad(LaunchBuildInt4ChannelIndex(h, 64, 8, idx, 4, 2, 96, codes, params, 64, nullptr), std::string(B) + "head_dim");
  ExpectBad(LaunchBuildInt4ChannelIndex(h, 64, 8, idx, 65, 2, 128, codes, params, 64, nullptr), std::string(B) + "d = 65");
  ExpectBad(LaunchBuildInt4ChannelIndex(h, 64, 65, idx, 4, 2, 128, codes, params, 100, nullptr), "rows = 65 > host_rows");
  ExpectBad(LaunchBuildInt4ChannelIndex(h, 100, 65, idx, 4, 2, 128, codes, params, 64, nullptr), "rows = 65 > index_rows");
  ExpectBad(LaunchBuildInt4ChannelIndex(nullptr, 64, 8, idx, 4, 2, 128, codes, params, 64, nullptr), "host is null");
  ExpectBad(LaunchBuildInt4ChannelIndex(h + 1, 64, 8, idx, 4, 2, 128, codes, params, 64, nullptr), "host is not 16-byte");
  ExpectBad(LaunchBuildInt4ChannelIndex(h, 64, 8, idx, 4, 2, 128, nullptr, params, 64, nullptr), "codes is null");
  ExpectBad(LaunchBuildInt4ChannelIndex(h, 64, 8, idx, 4, 2, 128, codes, nullptr, 64, nullptr), "params is null");
  EXPECT_TRUE(LaunchBuildInt4ChannelIndex(nullptr, 64, 0, nullptr, 4, 2, 128, nullptr, nullptr, 64, nullptr).ok());
  const auto* qf = reinterpret_cast<const float*>(buf);
  auto* sf = reinterpret_cast<float*>(buf);
  constexpr const char* S = "LaunchScoreInt4ChannelIndex: ";
  ExpectBad(LaunchScoreInt4ChannelIndex(qf, codes, params, 100, 65, 2, 0, 10, sf, 10, nullptr), std::string(S) + "d = 65");
  ExpectBad(LaunchScoreInt4ChannelIndex(qf, codes, params, 100, 8, 0, 0, 10, sf, 10, nullptr), std::string(S) + "n_kv");
  ExpectBad(LaunchScoreInt4ChannelIndex(qf, codes, params, 100, 8, 2, 95, 10, sf, 10, nullptr), "first + n = 105 > index_rows = 100");
  ExpectBad(LaunchScoreInt4ChannelIndex(qf, codes, params, 100, 8, 2, 0, 11, sf, 10, nullptr), "n = 11 > score_stride");
  // A pool may name positions past the end (they score -inf), but not start there.
  const auto* pool = reinterpret_cast<const int32_t*>(buf);
  ExpectBad(LaunchScoreInt4ChannelIndex(qf, codes, params, 100, 8, 2, 101, 4, sf, 10, nullptr, pool),
            "first = 101 > index_rows = 100");
  ExpectBad(LaunchScoreInt4ChannelIndex(nullptr, codes, params, 100, 8, 2, 0, 10, sf, 10, nullptr), "q_chan is null");
  ExpectBad(LaunchScoreInt4ChannelIndex(qf, codes, nullptr, 100, 8, 2, 0, 10, sf, 10, nullptr), "params is null");
  EXPECT_TRUE(LaunchScoreInt4ChannelIndex(nullptr, nullptr, nullptr, 100, 8, 2, 0, 0, nullptr, 10, nullptr).ok());
}

}  // namespace
}  // namespace tailorkv::cuda
