// Sparse-layer kernels against runtime/sparse_reference.h, exactly:
// - Top-K: every row's output equals TopKIndices' (same set, ascending), the
//   tail past min(k, n) is -1, on odd n and k, 1 and 8 rows, continuous
//   scores, heavy ties (a few distinct values) and NaNs, with the length
//   read from the device and the launch replayed from a CUDA graph at
//   several lengths. Outputs are poisoned before each launch.
// - Gather: bit-exact against GatherRows from mapped host memory
//   (cudaHostAlloc) with random indices including duplicates, into a
//   poisoned destination; out-of-range indices leave their rows untouched.
#include "cuda/sparse_kernels.cuh"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cuda/cuda_check.h"
#include "runtime/sparse_reference.h"

namespace tailorkv::cuda {
namespace {

constexpr int32_t kPoison = 0x7BADBEEF;

class SparseKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

// Host-mapped (zero-copy) memory owner for the tests.
struct HostMapped {
  void* host = nullptr;
  explicit HostMapped(size_t bytes) {
    if (cudaHostAlloc(&host, bytes, cudaHostAllocMapped) != cudaSuccess) host = nullptr;
  }
  ~HostMapped() {
    if (host) cudaFreeHost(host);
  }
  void* device() const {
    void* d = nullptr;
    return cudaHostGetDevicePointer(&d, host, 0) == cudaSuccess ? d : nullptr;
  }
};

enum class Dist { kNormal, kFewValues, kWithNaN };

std::vector<float> MakeScores(int rows, int64_t stride, int n, Dist dist, std::mt19937& rng) {
  std::vector<float> s(static_cast<size_t>(rows) * stride, std::numeric_limits<float>::quiet_NaN());
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < n; ++i) {
      float v = normal(rng);
      if (dist == Dist::kFewValues) v = static_cast<float>(static_cast<int>(rng() % 5)) - 2.0f;
      if (dist == Dist::kWithNaN && rng() % 7 == 0) v = std::numeric_limits<float>::quiet_NaN();
      if (dist == Dist::kWithNaN && rng() % 97 == 0) v = -std::numeric_limits<float>::infinity();
      s[static_cast<size_t>(r) * stride + i] = v;
    }
  }
  return s;
}

// Checks rows x k output against the CPU reference on the first n of each row.
void ExpectMatchesReference(const std::vector<float>& s, int64_t stride, int rows, int n, int k,
                            const std::vector<int32_t>& got, const char* what) {
  const int m = std::min(k, n);
  std::vector<int32_t> want(std::max(m, 1));
  for (int r = 0; r < rows; ++r) {
    absl::StatusOr<int> cnt = runtime::TopKIndices(s.data() + r * stride, n, k, want.data());
    ASSERT_TRUE(cnt.ok()) << cnt.status();
    ASSERT_EQ(*cnt, m);
    const int32_t* g = got.data() + static_cast<size_t>(r) * k;
    int mismatches = 0;
    for (int i = 0; i < m && mismatches < 5; ++i) {
      if (g[i] != want[i]) {
        ADD_FAILURE() << what << " n=" << n << " k=" << k << " row " << r << " slot " << i
                      << ": got " << g[i] << " want " << want[i];
        ++mismatches;
      }
    }
    for (int i = m; i < k && mismatches < 5; ++i) {
      if (g[i] != -1) {
        ADD_FAILURE() << what << " n=" << n << " k=" << k << " row " << r << " tail slot " << i
                      << " = " << g[i] << ", want -1";
        ++mismatches;
      }
    }
    if (mismatches) return;
  }
}

// Runs LaunchTopK once (n from the device) and compares.
void CheckTopK(int rows, int n, int k, Dist dist, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t stride = n + 3;  // odd stride: rows start unaligned
  const std::vector<float> s = MakeScores(rows, stride, n, dist, rng);
  absl::StatusOr<DeviceBuffer> d_scores = DeviceBuffer::Allocate(s.size() * sizeof(float));
  absl::StatusOr<DeviceBuffer> d_out = DeviceBuffer::Allocate(static_cast<size_t>(rows) * k * 4);
  absl::StatusOr<DeviceBuffer> d_n = DeviceBuffer::Allocate(4);
  const size_t ws_bytes = TopKWorkspaceBytes(rows, n);
  absl::StatusOr<DeviceBuffer> d_ws = DeviceBuffer::Allocate(ws_bytes);
  ASSERT_TRUE(d_scores.ok() && d_out.ok() && d_n.ok() && d_ws.ok());
  ASSERT_EQ(cudaMemcpy(d_scores->get(), s.data(), s.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_n->get(), &n, 4, cudaMemcpyHostToDevice), cudaSuccess);
  std::vector<int32_t> got(static_cast<size_t>(rows) * k, kPoison);
  ASSERT_EQ(cudaMemcpy(d_out->get(), got.data(), got.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(d_ws->get(), 0xCD, ws_bytes), cudaSuccess);  // the launch must clear it
  absl::Status st = LaunchTopK(d_scores->as<float>(), stride, rows, n, d_n->as<int32_t>(), k,
                               d_out->as<int32_t>(), d_ws->get(), ws_bytes, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(got.data(), d_out->get(), got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  ExpectMatchesReference(s, stride, rows, n, k, got,
                         dist == Dist::kNormal ? "normal" : dist == Dist::kFewValues ? "ties" : "nan");
}

TEST_F(SparseKernelsTest, TopKMatchesReferenceOddSizes) {
  uint32_t seed = 1;
  for (int n : {1, 7, 4097, 131071}) {
    for (int k : {1, 128, 896, 4096}) {
      for (int rows : {1, 8}) {
        CheckTopK(rows, n, k, Dist::kNormal, seed++);
      }
    }
  }
}

TEST_F(SparseKernelsTest, TopKHeavyTiesAndNaN) {
  uint32_t seed = 100;
  for (int n : {7, 4097, 131071}) {
    for (int k : {1, 896, 4096}) {
      CheckTopK(8, n, k, Dist::kFewValues, seed++);
      CheckTopK(8, n, k, Dist::kWithNaN, seed++);
    }
  }
  // All NaN: the smallest indices.
  CheckTopK(1, 5000, 128, Dist::kWithNaN, 7);
}

TEST_F(SparseKernelsTest, TopKOneMillion) {
  const int n = 1 << 20;
  CheckTopK(8, n, 4096, Dist::kNormal, 11);
  CheckTopK(8, n, 128, Dist::kFewValues, 12);
  CheckTopK(1, n, 896, Dist::kWithNaN, 13);
  CheckTopK(1, n, 1, Dist::kNormal, 14);
}

TEST_F(SparseKernelsTest, TopKAllSelectedWhenKAtLeastN) {
  CheckTopK(8, 7, 7, Dist::kNormal, 21);
  CheckTopK(8, 7, 128, Dist::kWithNaN, 22);
  CheckTopK(1, 4097, 4097, Dist::kFewValues, 23);
  CheckTopK(8, 1, 4096, Dist::kNormal, 24);
}

// One graph captured with n read from the device, replayed at growing n.
TEST_F(SparseKernelsTest, TopKGraphReplaysAtDeviceLength) {
  const int rows = 8, n_max = 200003, k = 896;
  std::mt19937 rng(31);
  const std::vector<float> s = MakeScores(rows, n_max, n_max, Dist::kFewValues, rng);
  absl::StatusOr<DeviceBuffer> d_scores = DeviceBuffer::Allocate(s.size() * 4);
  absl::StatusOr<DeviceBuffer> d_out = DeviceBuffer::Allocate(static_cast<size_t>(rows) * k * 4);
  absl::StatusOr<DeviceBuffer> d_n = DeviceBuffer::Allocate(4);
  const size_t ws_bytes = TopKWorkspaceBytes(rows, n_max);
  absl::StatusOr<DeviceBuffer> d_ws = DeviceBuffer::Allocate(ws_bytes);
  absl::StatusOr<CudaStream> stream = CudaStream::Create();
  ASSERT_TRUE(d_scores.ok() && d_out.ok() && d_n.ok() && d_ws.ok() && stream.ok());
  ASSERT_EQ(cudaMemcpy(d_scores->get(), s.data(), s.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaStreamBeginCapture(stream->get(), cudaStreamCaptureModeThreadLocal), cudaSuccess);
  absl::Status st = LaunchTopK(d_scores->as<float>(), n_max, rows, n_max, d_n->as<int32_t>(), k,
                               d_out->as<int32_t>(), d_ws->get(), ws_bytes, stream->get());
  absl::StatusOr<CudaGraphExec> graph = CudaGraphExec::EndCapture(stream->get());
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_TRUE(graph.ok()) << graph.status();
  for (int n : {0, 1, 500, 896, 897, 65537, n_max}) {
    std::vector<int32_t> got(static_cast<size_t>(rows) * k, kPoison);
    ASSERT_EQ(cudaMemcpy(d_out->get(), got.data(), got.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d_n->get(), &n, 4, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_TRUE(graph->Launch(stream->get()).ok());
    ASSERT_EQ(cudaStreamSynchronize(stream->get()), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(got.data(), d_out->get(), got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    ExpectMatchesReference(s, n_max, rows, n, k, got, "graph");
  }
}

TEST_F(SparseKernelsTest, TopKBadInputNamesTheField) {
  int32_t dummy_ws[64] = {};
  float* p = reinterpret_cast<float*>(dummy_ws);
  EXPECT_NE(LaunchTopK(p, 8, 0, 8, nullptr, 1, dummy_ws, dummy_ws, 1 << 20, nullptr).message().find("rows"), std::string::npos);
  EXPECT_NE(LaunchTopK(p, 4, 1, 8, nullptr, 1, dummy_ws, dummy_ws, 1 << 20, nullptr).message().find("row_stride"), std::string::npos);
  EXPECT_NE(LaunchTopK(p, 8, 1, -1, nullptr, 1, dummy_ws, dummy_ws, 1 << 20, nullptr).message().find("n_max"), std::string::npos);
  EXPECT_NE(LaunchTopK(p, 8, 1, 8, nullptr, -1, dummy_ws, dummy_ws, 1 << 20, nullptr).message().find("k ="), std::string::npos);
  EXPECT_NE(LaunchTopK(p, 8, 1, 8, nullptr, 1, dummy_ws, dummy_ws, 16, nullptr).message().find("workspace_bytes"), std::string::npos);
  EXPECT_NE(LaunchGatherRows(p, 0, 4, 24, dummy_ws, 1, 1, p, nullptr).message().find("row_bytes"), std::string::npos);
  EXPECT_NE(LaunchGatherRows(p, 0, 4, 16, dummy_ws, 1, 0, p, nullptr).message().find("heads"), std::string::npos);
}

void CheckGather(int64_t row_bytes, int heads, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t src_rows = 3001;
  const int64_t head_stride = src_rows * row_bytes + 16 * 5;  // heads not back to back
  const int count = 1537;
  HostMapped host(static_cast<size_t>(head_stride) * heads);
  ASSERT_NE(host.host, nullptr);
  void* src_dev = host.device();
  ASSERT_NE(src_dev, nullptr);
  auto* bytes = static_cast<unsigned char*>(host.host);
  for (int64_t i = 0; i < head_stride * heads; ++i) bytes[i] = static_cast<unsigned char>(rng());
  std::vector<int32_t> idx(static_cast<size_t>(heads) * count);
  for (auto& i : idx) i = static_cast<int32_t>(rng() % src_rows);
  for (int h = 0; h < heads; ++h) {  // duplicates, the ends, and out-of-range (skipped) entries
    int32_t* ih = idx.data() + h * count;
    ih[1] = ih[2] = ih[3] = ih[900];
    ih[4] = 0;
    ih[5] = static_cast<int32_t>(src_rows - 1);
    ih[count - 1] = -1;
    ih[count - 2] = static_cast<int32_t>(src_rows);
  }
  absl::StatusOr<DeviceBuffer> d_idx = DeviceBuffer::Allocate(idx.size() * 4);
  const size_t dst_bytes = static_cast<size_t>(heads) * count * row_bytes;
  absl::StatusOr<DeviceBuffer> d_dst = DeviceBuffer::Allocate(dst_bytes + 64);
  ASSERT_TRUE(d_idx.ok() && d_dst.ok());
  ASSERT_EQ(cudaMemcpy(d_idx->get(), idx.data(), idx.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(d_dst->get(), 0xA5, dst_bytes + 64), cudaSuccess);
  absl::Status st = LaunchGatherRows(src_dev, head_stride, src_rows, row_bytes, d_idx->as<int32_t>(),
                                     count, heads, d_dst->get(), nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<unsigned char> got(dst_bytes + 64);
  ASSERT_EQ(cudaMemcpy(got.data(), d_dst->get(), got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  std::vector<unsigned char> want(dst_bytes, 0xA5);
  for (int h = 0; h < heads; ++h) {
    // The reference gathers the in-range rows; out-of-range rows stay poisoned.
    std::vector<int32_t> ih(idx.begin() + h * count, idx.begin() + (h + 1) * count);
    std::vector<int32_t> valid_pos, valid_idx;
    for (int i = 0; i < count; ++i) {
      if (ih[i] >= 0 && ih[i] < src_rows) {
        valid_pos.push_back(i);
        valid_idx.push_back(ih[i]);
      }
    }
    std::vector<unsigned char> packed(valid_idx.size() * row_bytes);
    ASSERT_TRUE(runtime::GatherRows(bytes + h * head_stride, src_rows, row_bytes, valid_idx.data(),
                                    static_cast<int>(valid_idx.size()), packed.data())
                    .ok());
    for (size_t v = 0; v < valid_pos.size(); ++v) {
      std::memcpy(want.data() + (static_cast<size_t>(h) * count + valid_pos[v]) * row_bytes,
                  packed.data() + v * row_bytes, row_bytes);
    }
  }
  for (size_t b = 0; b < dst_bytes; ++b) {
    ASSERT_EQ(got[b], want[b]) << "row_bytes=" << row_bytes << " heads=" << heads << " byte " << b
                               << " (dst row " << b / row_bytes << ")";
  }
  for (int b = 0; b < 64; ++b) ASSERT_EQ(got[dst_bytes + b], 0xA5) << "wrote past the end";
}

TEST_F(SparseKernelsTest, GatherBitExactFromMappedHostMemory) {
  CheckGather(256, 1, 1);
  CheckGather(2048, 1, 2);
  CheckGather(256, 8, 3);
  CheckGather(2048, 8, 4);
  CheckGather(16, 3, 5);
  CheckGather(528, 2, 6);
}

}  // namespace
}  // namespace tailorkv::cuda
