// Sparse-layer kernels against runtime/sparse_reference.h, exactly:
// - Top-K: every row's output equals TopKIndices' (same set, ascending), the
//   tail past min(k, n) is -1, on odd n and k, 1, 8 and 13 rows, continuous
//   scores, heavy ties (a few distinct values, all equal), NaNs, +-0, +-inf
//   and denormals, with the length read from the device (also below n_max,
//   the scores past it poisoned with large values) and the launch replayed
//   from a CUDA graph at several lengths; both paths (chunked, k <= 1024,
//   and radix). Outputs and workspace are poisoned before each launch.
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
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_check.h"
#include "cuda/test_host_mapped.h"
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

using test_util::HostMapped;

enum class Dist { kNormal, kFewValues, kWithNaN, kSpecial, kAllEqual };

const char* DistName(Dist d) {
  switch (d) {
    case Dist::kNormal: return "normal";
    case Dist::kFewValues: return "ties";
    case Dist::kWithNaN: return "nan";
    case Dist::kSpecial: return "special";
    case Dist::kAllEqual: return "all-equal";
  }
  return "?";
}

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Values whose keys sit at the edges: signed zeros, infinities, NaNs of
// both signs and other payloads, denormals, the largest finite values.
const float kSpecials[] = {0.0f, -0.0f, std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(), FromBits(0x7FC00000u),
                           FromBits(0xFFC00000u), FromBits(0x7F800001u), FromBits(0x00000001u),
                           FromBits(0x80000001u), std::numeric_limits<float>::max(),
                           -std::numeric_limits<float>::max(), 1.0f, -1.0f};

// rows x stride, the first n of each row drawn from dist; the rest are
// large values (selected if anything read past n).
std::vector<float> MakeScores(int rows, int64_t stride, int n, Dist dist, std::mt19937& rng) {
  std::vector<float> s(static_cast<size_t>(rows) * stride, 1e30f);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < n; ++i) {
      float v = normal(rng);
      if (dist == Dist::kFewValues) v = static_cast<float>(static_cast<int>(rng() % 5)) - 2.0f;
      if (dist == Dist::kWithNaN && rng() % 7 == 0) v = std::numeric_limits<float>::quiet_NaN();
      if (dist == Dist::kWithNaN && rng() % 97 == 0) v = -std::numeric_limits<float>::infinity();
      if (dist == Dist::kSpecial && rng() % 3 != 0) v = kSpecials[rng() % std::size(kSpecials)];
      if (dist == Dist::kAllEqual) v = 1.5f;
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

// kAuto: LaunchTopK's defaults; kRadix: the radix path forced; kPlain: no
// programmatic dependent launch.
enum class Path { kAuto, kRadix, kPlain };

// Runs LaunchTopK once on `path`, sized for n_max (n when negative) with n
// read from the device, and compares.
void CheckTopK(int rows, int n, int k, Dist dist, uint32_t seed, Path path = Path::kAuto,
               int n_max = -1, int chunk_threads = 0) {
  if (n_max < 0) n_max = n;
  std::mt19937 rng(seed);
  const int64_t stride = n_max + 3;  // odd stride: rows start unaligned
  const std::vector<float> s = MakeScores(rows, stride, n, dist, rng);
  absl::StatusOr<DeviceBuffer> d_scores = DeviceBuffer::Allocate(s.size() * sizeof(float));
  absl::StatusOr<DeviceBuffer> d_out = DeviceBuffer::Allocate(static_cast<size_t>(rows) * k * 4);
  absl::StatusOr<DeviceBuffer> d_n = DeviceBuffer::Allocate(4);
  const size_t ws_bytes = TopKWorkspaceBytes(rows, n_max);
  absl::StatusOr<DeviceBuffer> d_ws = DeviceBuffer::Allocate(ws_bytes);
  ASSERT_TRUE(d_scores.ok() && d_out.ok() && d_n.ok() && d_ws.ok());
  ASSERT_EQ(cudaMemcpy(d_scores->get(), s.data(), s.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_n->get(), &n, 4, cudaMemcpyHostToDevice), cudaSuccess);
  std::vector<int32_t> got(static_cast<size_t>(rows) * k, kPoison);
  ASSERT_EQ(cudaMemcpy(d_out->get(), got.data(), got.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(d_ws->get(), 0xCD, ws_bytes), cudaSuccess);  // the launch must clear it
  TopKOptions options;
  options.radix_only = path == Path::kRadix;
  options.programmatic_launch = path != Path::kPlain;
  options.chunk_threads = chunk_threads;
  absl::Status st = LaunchTopK(d_scores->as<float>(), stride, rows, n_max, d_n->as<int32_t>(), k,
                               d_out->as<int32_t>(), d_ws->get(), ws_bytes, nullptr, options);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(got.data(), d_out->get(), got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  const char* path_name = path == Path::kRadix ? " radix" : path == Path::kPlain ? " plain" : " auto";
  const std::string what = absl::StrCat(DistName(dist), path_name, " rows=", rows, " n_max=", n_max,
                                        " chunk_threads=", chunk_threads);
  ExpectMatchesReference(s, stride, rows, n, k, got, what.c_str());
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

// The chunked path (k <= 1024) at chunk edges (4096 / 8192 / 16384 scores
// per block) and around k, against the reference.
TEST_F(SparseKernelsTest, TopKChunkedMatchesReferenceOddSizes) {
  uint32_t seed = 200;
  const int rows_cycle[] = {1, 8, 13};
  int r = 0;
  for (int n : {1, 7, 127, 128, 129, 1000, 1024, 1025, 4095, 4096, 4097, 8193, 16385, 40001, 131071}) {
    for (int k : {1, 7, 128, 1000, 1024, 1025}) {
      CheckTopK(rows_cycle[r % 3], n, k, Dist::kNormal, seed++, r % 4 == 3 ? Path::kPlain : Path::kAuto);
      ++r;
    }
  }
}

TEST_F(SparseKernelsTest, TopKChunkedHeavyTiesAndSpecialValues) {
  uint32_t seed = 300;
  for (int n : {129, 4097, 65537}) {
    for (int k : {1, 7, 128, 1000, 1024}) {
      for (Dist d : {Dist::kFewValues, Dist::kWithNaN, Dist::kSpecial, Dist::kAllEqual}) {
        CheckTopK(n == 4097 ? 13 : 8, n, k, d, seed++);
      }
    }
  }
  CheckTopK(1, 5000, 1000, Dist::kWithNaN, 8);  // many NaN ties at the threshold
}

// Each stage-1 block size (chunks of 4096, 8192, 16384 scores) forced.
TEST_F(SparseKernelsTest, TopKChunkedEveryBlockSize) {
  uint32_t seed = 600;
  for (int t : {256, 512, 1024}) {
    for (int n : {4097, 16384, 50001}) {
      for (int k : {7, 1000}) {
        for (Dist d : {Dist::kSpecial, Dist::kFewValues, Dist::kNormal}) {
          CheckTopK(8, n, k, d, seed++, Path::kAuto, n + 2 * t, t);
        }
      }
    }
  }
}

// n from the device below n_max: the grid is sized for n_max, the scores
// past n are large and must not be read.
TEST_F(SparseKernelsTest, TopKDeviceLengthBelowNMax) {
  uint32_t seed = 400;
  const int n_max = 131077;
  for (int n : {0, 1, 100, 1024, 4096, 4097, 70001}) {
    for (int k : {7, 128, 1024}) {
      ASSERT_TRUE(TopKUsesChunkedPath(n_max, k));
      CheckTopK(8, n, k, Dist::kNormal, seed++, Path::kAuto, n_max);
    }
    CheckTopK(8, n, 128, Dist::kFewValues, seed++, Path::kRadix, n_max);
  }
}

// The radix path, which LaunchTopK takes at k <= 1024 only past 32768
// candidates per row.
TEST_F(SparseKernelsTest, TopKRadixPathMatchesReference) {
  uint32_t seed = 500;
  for (int n : {7, 4097, 131071}) {
    for (int k : {1, 128, 1000}) {
      CheckTopK(8, n, k, Dist::kNormal, seed++, Path::kRadix);
      CheckTopK(13, n, k, Dist::kSpecial, seed++, Path::kRadix);
    }
  }
}

TEST_F(SparseKernelsTest, TopKChunkedOneMillion) {
  const int n = 1 << 20;
  ASSERT_TRUE(TopKUsesChunkedPath(n, 128));
  CheckTopK(8, n, 128, Dist::kNormal, 41);
  CheckTopK(8, n, 1000, Dist::kNormal, 42);  // too many candidates: the radix path
  CheckTopK(13, n, 7, Dist::kSpecial, 43);
}

// One graph per k captured at n_max = 300007 with n from the device,
// replayed at changing (not only growing) n; 13 rows.
TEST_F(SparseKernelsTest, TopKChunkedGraphReplaysAtChangingLength) {
  const int rows = 13, n_max = 300007;
  std::mt19937 rng(51);
  const std::vector<float> s = MakeScores(rows, n_max, n_max, Dist::kSpecial, rng);
  absl::StatusOr<DeviceBuffer> d_scores = DeviceBuffer::Allocate(s.size() * 4);
  absl::StatusOr<DeviceBuffer> d_n = DeviceBuffer::Allocate(4);
  const size_t ws_bytes = TopKWorkspaceBytes(rows, n_max);
  absl::StatusOr<DeviceBuffer> d_ws = DeviceBuffer::Allocate(ws_bytes);
  absl::StatusOr<CudaStream> stream = CudaStream::Create();
  ASSERT_TRUE(d_scores.ok() && d_n.ok() && d_ws.ok() && stream.ok());
  ASSERT_EQ(cudaMemcpy(d_scores->get(), s.data(), s.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(d_ws->get(), 0xCD, ws_bytes), cudaSuccess);
  for (int k : {128, 1024}) {
    ASSERT_TRUE(TopKUsesChunkedPath(n_max, k));
    absl::StatusOr<DeviceBuffer> d_out = DeviceBuffer::Allocate(static_cast<size_t>(rows) * k * 4);
    ASSERT_TRUE(d_out.ok());
    ASSERT_EQ(cudaStreamBeginCapture(stream->get(), cudaStreamCaptureModeThreadLocal), cudaSuccess);
    absl::Status st = LaunchTopK(d_scores->as<float>(), n_max, rows, n_max, d_n->as<int32_t>(), k,
                                 d_out->as<int32_t>(), d_ws->get(), ws_bytes, stream->get());
    absl::StatusOr<CudaGraphExec> graph = CudaGraphExec::EndCapture(stream->get());
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_TRUE(graph.ok()) << graph.status();
    for (int n : {70001, 5, 0, 1024, 1025, 16384, 16385, n_max, 4097}) {
      std::vector<int32_t> got(static_cast<size_t>(rows) * k, kPoison);
      ASSERT_EQ(cudaMemcpy(d_out->get(), got.data(), got.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(d_n->get(), &n, 4, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_TRUE(graph->Launch(stream->get()).ok());
      ASSERT_EQ(cudaStreamSynchronize(stream->get()), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(got.data(), d_out->get(), got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      ExpectMatchesReference(s, n_max, rows, n, k, got, "chunked graph");
    }
  }
}

TEST_F(SparseKernelsTest, TopKPathChoice) {
  EXPECT_TRUE(TopKUsesChunkedPath(131072, 128));
  EXPECT_TRUE(TopKUsesChunkedPath(131072, 1024));
  EXPECT_TRUE(TopKUsesChunkedPath(1, 1));
  EXPECT_FALSE(TopKUsesChunkedPath(131072, 1025));
  EXPECT_FALSE(TopKUsesChunkedPath(0, 128));
  EXPECT_FALSE(TopKUsesChunkedPath(1 << 20, 1024));
  // The workspace covers both paths and grows with n_max.
  EXPECT_GE(TopKWorkspaceBytes(8, 1 << 20), TopKWorkspaceBytes(8, 131072));
  EXPECT_GE(TopKWorkspaceBytes(8, 131072), size_t{8} * 32768 * 8);
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

// Refine's map back through the pool equals the reference, with TopK's -1
// tail and out-of-range picks; nothing past rows x k is written.
TEST_F(SparseKernelsTest, MapThroughPoolMatchesReference) {
  std::mt19937 rng(77);
  const int rows = 8, k = 897, n_pool = 3589;
  std::vector<int32_t> pool(static_cast<size_t>(rows) * n_pool), idx(static_cast<size_t>(rows) * k);
  for (auto& p : pool) p = static_cast<int32_t>(rng() % 131072);
  for (auto& i : idx) i = static_cast<int32_t>(rng() % (n_pool + 2)) - 1;  // -1 .. n_pool
  std::vector<int32_t> want(idx.size());
  runtime::MapThroughPool(idx.data(), k, pool.data(), n_pool, rows, want.data());
  absl::StatusOr<DeviceBuffer> d_pool = DeviceBuffer::Allocate(pool.size() * 4),
                               d_idx = DeviceBuffer::Allocate(idx.size() * 4),
                               d_out = DeviceBuffer::Allocate((idx.size() + 7) * 4);
  ASSERT_TRUE(d_pool.ok() && d_idx.ok() && d_out.ok());
  ASSERT_EQ(cudaMemcpy(d_pool->get(), pool.data(), pool.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_idx->get(), idx.data(), idx.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  std::vector<int32_t> got(idx.size() + 7, kPoison);
  ASSERT_EQ(cudaMemcpy(d_out->get(), got.data(), got.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  absl::Status st = LaunchMapThroughPool(d_idx->as<int32_t>(), k, d_pool->as<int32_t>(), n_pool, rows,
                                         d_out->as<int32_t>(), nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(got.data(), d_out->get(), got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_TRUE(std::equal(want.begin(), want.end(), got.begin()));
  for (size_t i = idx.size(); i < got.size(); ++i) EXPECT_EQ(got[i], kPoison) << "past the end, " << i;
  EXPECT_GT(std::count(want.begin(), want.end(), -1), 0);  // the -1 paths ran
}

// Runs without a GPU: every check comes before a launch.
TEST(SparseKernelsArgs, MapThroughPoolBadInputNamesTheField) {
  int32_t buf[4] = {};
  auto bad = [](const absl::Status& s, const std::string& want) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(want), std::string::npos) << s;
  };
  bad(LaunchMapThroughPool(buf, 2, buf, 2, 0, buf, nullptr), "LaunchMapThroughPool: rows = 0");
  bad(LaunchMapThroughPool(buf, -1, buf, 2, 1, buf, nullptr), "k = -1");
  bad(LaunchMapThroughPool(buf, 2, buf, -2, 1, buf, nullptr), "n_pool = -2");
  bad(LaunchMapThroughPool(nullptr, 2, buf, 2, 1, buf, nullptr), "idx is null");
  bad(LaunchMapThroughPool(buf, 2, nullptr, 2, 1, buf, nullptr), "pool is null");
  bad(LaunchMapThroughPool(buf, 2, buf, 2, 1, nullptr, nullptr), "out is null");
  EXPECT_TRUE(LaunchMapThroughPool(nullptr, 0, nullptr, 0, 1, nullptr, nullptr).ok());
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
