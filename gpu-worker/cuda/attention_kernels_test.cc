// GPU attention kernels against runtime::ref::AttentionHead on the same
// (bf16-rounded) inputs.
//
// Tolerance: max |gpu - ref| <= 2e-2 * max |ref| and ||gpu - ref|| / ||ref||
// <= 1e-2. The kernels differ from the float reference only by rounding:
// the output is bf16 (relative error <= 2^-9 per element), the
// probabilities are rounded to bf16 before P*V (relative 2^-9 per weight,
// errors that average out over many keys), and exp2 is approximate (~2^-22).
// Together these stay well under 1e-2 of the largest output; an indexing
// error (a wrong row, head, key range or a dropped split) moves outputs by a
// sizeable fraction of their magnitude, which the relative L2 check catches
// even when the softmax averages over thousands of keys.
//
// Cache rows past the valid range are NaN, so a kernel that reads them
// (instead of zero-filling) fails; outputs are NaN-poisoned before each launch.
#include "cuda/attention_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/test_rng.h"
#include "runtime/cpu_reference.h"

namespace tailorkv::cuda {
namespace {

using bf16 = __nv_bfloat16;

class AttentionKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

using test_util::Rng;

bf16 NanBf16() {
  __nv_bfloat16_raw raw;
  raw.x = 0x7fc0;  // quiet NaN
  return bf16(raw);
}

std::vector<bf16> RandomBf16(size_t n, float lo, float hi, Rng& rng) {
  std::vector<bf16> out(n);
  for (auto& x : out) x = __float2bfloat16(rng.Uniform(lo, hi));
  return out;
}

std::vector<float> ToFloat(const bf16* p, size_t n) {
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = __bfloat162float(p[i]);
  return out;
}

// A KV cache [n_kv_heads][capacity][head_dim]: rows < valid random, rows >= valid NaN.
std::vector<bf16> MakeCache(int n_kv_heads, int capacity, int head_dim, int valid, Rng& rng) {
  std::vector<bf16> cache(static_cast<size_t>(n_kv_heads) * capacity * head_dim, NanBf16());
  for (int h = 0; h < n_kv_heads; ++h) {
    for (int r = 0; r < valid; ++r) {
      bf16* row = cache.data() + (static_cast<size_t>(h) * capacity + r) * head_dim;
      for (int d = 0; d < head_dim; ++d) row[d] = __float2bfloat16(rng.Uniform(-1.0f, 1.0f));
    }
  }
  return cache;
}

DeviceBuffer Upload(const void* data, size_t bytes) {
  absl::StatusOr<DeviceBuffer> buf = DeviceBuffer::Allocate(bytes);
  EXPECT_TRUE(buf.ok()) << buf.status();
  if (!buf.ok()) return DeviceBuffer();
  EXPECT_EQ(cudaMemcpy(buf->get(), data, bytes, cudaMemcpyHostToDevice), cudaSuccess);
  return std::move(*buf);
}
template <typename T>
DeviceBuffer Upload(const std::vector<T>& v) {
  return Upload(v.data(), v.size() * sizeof(T));
}

// A NaN-poisoned device buffer of `count` bf16.
DeviceBuffer PoisonedBf16(size_t count) {
  absl::StatusOr<DeviceBuffer> buf = DeviceBuffer::Allocate(count * sizeof(bf16));
  EXPECT_TRUE(buf.ok()) << buf.status();
  if (!buf.ok()) return DeviceBuffer();
  EXPECT_EQ(cudaMemset(buf->get(), 0xff, count * sizeof(bf16)), cudaSuccess);  // 0xffff: NaN
  return std::move(*buf);
}

std::vector<float> DownloadBf16(const DeviceBuffer& buf, size_t count) {
  std::vector<bf16> host(count);
  EXPECT_EQ(cudaMemcpy(host.data(), buf.get(), count * sizeof(bf16), cudaMemcpyDeviceToHost),
            cudaSuccess);
  return ToFloat(host.data(), count);
}

// Per query head h: rows of q [rows][n_heads][head_dim] -> [rows][head_dim].
std::vector<float> HeadRows(const std::vector<float>& q, int rows, int n_heads, int head_dim,
                            int h) {
  std::vector<float> out(static_cast<size_t>(rows) * head_dim);
  for (int i = 0; i < rows; ++i) {
    std::copy_n(q.begin() + (static_cast<size_t>(i) * n_heads + h) * head_dim, head_dim,
                out.begin() + static_cast<size_t>(i) * head_dim);
  }
  return out;
}

// Reference attention for all heads: out [rows][n_heads][head_dim].
std::vector<float> ReferenceAttention(const std::vector<float>& q, int rows, int start_pos,
                                      const std::vector<bf16>& k_cache,
                                      const std::vector<bf16>& v_cache, const AttentionShape& s) {
  const int group = s.n_heads / s.n_kv_heads;
  const int d = s.head_dim;
  const size_t kv_rows = static_cast<size_t>(start_pos) + rows;
  std::vector<float> out(static_cast<size_t>(rows) * s.n_heads * d);
  std::vector<float> head_out(static_cast<size_t>(rows) * d);
  for (int kvh = 0; kvh < s.n_kv_heads; ++kvh) {
    const size_t base = static_cast<size_t>(kvh) * s.capacity * d;
    const std::vector<float> k = ToFloat(k_cache.data() + base, kv_rows * d);
    const std::vector<float> v = ToFloat(v_cache.data() + base, kv_rows * d);
    for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
      const std::vector<float> qh = HeadRows(q, rows, s.n_heads, d, h);
      runtime::ref::AttentionHead(qh.data(), k.data(), v.data(), rows, start_pos, d,
                                  head_out.data());
      for (int i = 0; i < rows; ++i) {
        std::copy_n(head_out.begin() + static_cast<size_t>(i) * d, d,
                    out.begin() + (static_cast<size_t>(i) * s.n_heads + h) * d);
      }
    }
  }
  return out;
}

// The comparison described at the top of the file; `got` and `ref` are
// [rows][n_heads][head_dim].
void ExpectMatchesReference(const std::vector<float>& got, const std::vector<float>& ref,
                            int n_heads, int head_dim, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double max_ref = 0;
  double ref_sq = 0;
  for (float r : ref) {
    max_ref = std::max(max_ref, static_cast<double>(std::fabs(r)));
    ref_sq += static_cast<double>(r) * r;
  }
  ASSERT_GT(max_ref, 1e-3) << what << ": reference is trivially zero";
  const double tol = 2e-2 * max_ref;
  double max_diff = 0;
  double diff_sq = 0;
  size_t first_bad = got.size();
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - ref[i]);
    if (!(diff <= tol) && first_bad == got.size()) first_bad = i;  // NaN counts as bad
    if (std::isfinite(diff)) {
      max_diff = std::max(max_diff, diff);
      diff_sq += diff * diff;
    }
  }
  if (first_bad != got.size()) {
    const size_t row = first_bad / (static_cast<size_t>(n_heads) * head_dim);
    const size_t head = first_bad / head_dim % n_heads;
    const size_t dim = first_bad % head_dim;
    ADD_FAILURE() << what << ": first difference at index " << first_bad << " (row " << row
                  << ", head " << head << ", dim " << dim << "): got " << got[first_bad]
                  << ", want " << ref[first_bad] << " (tolerance " << tol
                  << "); max |diff| over finite " << max_diff;
    return;
  }
  EXPECT_LE(std::sqrt(diff_sq / ref_sq), 1e-2) << what << ": relative L2 error";
  // Non-trivial: outputs differ across heads and (where there are several) rows.
  double spread = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    spread = std::max(spread, std::fabs(static_cast<double>(got[i]) - got[i % head_dim]));
  }
  EXPECT_GT(spread, 0.1 * max_ref) << what << ": outputs do not vary across heads/rows";
}

struct Config {
  const char* name;
  int n_heads;
  int n_kv_heads;
  int head_dim;
};
constexpr Config kSmolLm2{"smollm2", 9, 3, 64};
constexpr Config kLlama{"llama8b", 32, 8, 128};

// ---------------------------------------------------------------------------
// Prefill.

struct PrefillCase {
  Config config;
  int n;
  int start_pos;
  PrefillKernel kernel = PrefillKernel::kAuto;
};

const char* KernelName(PrefillKernel kernel) {
  switch (kernel) {
    case PrefillKernel::kAuto:
      return "auto";
    case PrefillKernel::kMmaSync:
      return "mma";
    case PrefillKernel::kWgmma:
      return "wgmma";
    case PrefillKernel::kWgmmaTwoStage:
      return "wgmma2";
  }
  return "?";
}

class PrefillAttentionTest : public AttentionKernelsTest,
                             public ::testing::WithParamInterface<PrefillCase> {};

TEST_P(PrefillAttentionTest, MatchesCpuReference) {
  const PrefillCase& c = GetParam();
  const int capacity = c.n + c.start_pos + 13;
  const AttentionShape shape{c.config.n_heads, c.config.n_kv_heads, c.config.head_dim, capacity};
  if (!PrefillKernelSupported(c.kernel, shape)) {
    GTEST_SKIP() << KernelName(c.kernel) << " does not run this shape on this device";
  }
  Rng rng(1234 + c.n * 7 + c.start_pos);
  const size_t q_count = static_cast<size_t>(c.n) * shape.n_heads * shape.head_dim;
  const std::vector<bf16> q = RandomBf16(q_count, -3.0f, 3.0f, rng);
  const std::vector<bf16> k = MakeCache(shape.n_kv_heads, capacity, shape.head_dim,
                                        c.start_pos + c.n, rng);
  const std::vector<bf16> v = MakeCache(shape.n_kv_heads, capacity, shape.head_dim,
                                        c.start_pos + c.n, rng);
  DeviceBuffer d_q = Upload(q);
  DeviceBuffer d_k = Upload(k);
  DeviceBuffer d_v = Upload(v);
  DeviceBuffer d_out = PoisonedBf16(q_count);
  ASSERT_FALSE(HasFailure());

  ASSERT_TRUE(LaunchPrefillAttentionWith(c.kernel, d_q.as<bf16>(), d_k.as<bf16>(),
                                         d_v.as<bf16>(), c.n, c.start_pos, shape,
                                         d_out.as<bf16>(), nullptr)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = DownloadBf16(d_out, q_count);
  const std::vector<float> ref =
      ReferenceAttention(ToFloat(q.data(), q.size()), c.n, c.start_pos, k, v, shape);
  ExpectMatchesReference(got, ref, shape.n_heads, shape.head_dim,
                         std::string("prefill ") + c.config.name + " " + KernelName(c.kernel) +
                             " n=" + std::to_string(c.n) + " start=" + std::to_string(c.start_pos));
}

std::vector<PrefillCase> PrefillCases() {
  std::vector<PrefillCase> cases;
  for (const Config& config : {kSmolLm2, kLlama}) {
    for (int n : {1, 7, 65, 300}) {
      for (int start : {0, 37}) cases.push_back({config, n, start});
    }
  }
  // Several query blocks, more K/V tiles than pipeline stages, a long cached prefix.
  cases.push_back({kLlama, 700, 0});
  cases.push_back({kSmolLm2, 200, 1000});
  // Head dim 128 behind a long prefix (every warp's diagonal falls mid-tile),
  // one row past a block, and several blocks at head dim 64.
  cases.push_back({kLlama, 300, 1000});
  cases.push_back({kLlama, 129, 5});
  cases.push_back({kSmolLm2, 700, 0});
  // More K/V tiles than the wgmma kernel's stages behind a prefix that is not
  // a multiple of its 128-key tile, and a last block of one row.
  cases.push_back({kLlama, 1000, 300});
  cases.push_back({kLlama, 257, 0});
  // Every case on each kernel explicitly. The wgmma kernels handle head_dim
  // 128 only (WgmmaPrefillRejectsHeadDim64 checks the refusal), so head_dim 64
  // cases are not instantiated for them; a device without sm_90 still skips.
  const size_t n_auto = cases.size();
  for (PrefillKernel kernel :
       {PrefillKernel::kMmaSync, PrefillKernel::kWgmma, PrefillKernel::kWgmmaTwoStage}) {
    for (size_t i = 0; i < n_auto; ++i) {
      PrefillCase c = cases[i];
      if (kernel != PrefillKernel::kMmaSync && c.config.head_dim != 128) continue;
      c.kernel = kernel;
      cases.push_back(c);
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, PrefillAttentionTest, ::testing::ValuesIn(PrefillCases()),
                         [](const ::testing::TestParamInfo<PrefillCase>& info) {
                           return std::string(info.param.config.name) + "_" +
                                  KernelName(info.param.kernel) + "_n" +
                                  std::to_string(info.param.n) + "_start" +
                                  std::to_string(info.param.start_pos);
                         });

// ---------------------------------------------------------------------------
// Decode.

// Reference for one query token at position len - 1: out [n_heads][head_dim].
std::vector<float> DecodeReference(const std::vector<bf16>& q, int len,
                                   const std::vector<bf16>& k, const std::vector<bf16>& v,
                                   const AttentionShape& shape) {
  return ReferenceAttention(ToFloat(q.data(), q.size()), 1, len - 1, k, v, shape);
}

// Device-side inputs of one decode problem.
struct DecodeBuffers {
  DeviceBuffer q, k, v, length, workspace, out;
};

DecodeBuffers UploadDecode(const std::vector<bf16>& q, const std::vector<bf16>& k,
                           const std::vector<bf16>& v, int32_t len, const AttentionShape& shape) {
  DecodeBuffers b;
  b.q = Upload(q);
  b.k = Upload(k);
  b.v = Upload(v);
  b.length = Upload(&len, sizeof(len));
  const size_t ws = DecodeAttentionWorkspaceBytes(shape);
  EXPECT_GT(ws, 0u);
  absl::StatusOr<DeviceBuffer> w = DeviceBuffer::Allocate(ws);
  EXPECT_TRUE(w.ok()) << w.status();
  if (w.ok()) {
    // Stale partials must never leak into a result: start from NaN.
    EXPECT_EQ(cudaMemset(w->get(), 0xff, ws), cudaSuccess);
    b.workspace = std::move(*w);
  }
  b.out = PoisonedBf16(q.size());
  return b;
}

absl::Status LaunchDecode(const DecodeBuffers& b, const AttentionShape& shape,
                          cudaStream_t stream) {
  return LaunchDecodeAttention(b.q.as<bf16>(), b.k.as<bf16>(), b.v.as<bf16>(),
                               b.length.as<int32_t>(), shape, b.workspace.get(), b.out.as<bf16>(),
                               stream);
}

struct DecodeCase {
  Config config;
  int length;
};

class DecodeAttentionTest : public AttentionKernelsTest,
                            public ::testing::WithParamInterface<DecodeCase> {};

TEST_P(DecodeAttentionTest, MatchesCpuReference) {
  const DecodeCase& c = GetParam();
  const int capacity = c.length + 13;
  const AttentionShape shape{c.config.n_heads, c.config.n_kv_heads, c.config.head_dim, capacity};
  Rng rng(99 + c.length);
  const std::vector<bf16> q =
      RandomBf16(static_cast<size_t>(shape.n_heads) * shape.head_dim, -3.0f, 3.0f, rng);
  const std::vector<bf16> k = MakeCache(shape.n_kv_heads, capacity, shape.head_dim, c.length, rng);
  const std::vector<bf16> v = MakeCache(shape.n_kv_heads, capacity, shape.head_dim, c.length, rng);
  DecodeBuffers b = UploadDecode(q, k, v, c.length, shape);
  ASSERT_FALSE(HasFailure());

  ASSERT_TRUE(LaunchDecode(b, shape, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ExpectMatchesReference(DownloadBf16(b.out, q.size()), DecodeReference(q, c.length, k, v, shape),
                         shape.n_heads, shape.head_dim,
                         std::string("decode ") + c.config.name + " len=" +
                             std::to_string(c.length));
}

std::vector<DecodeCase> DecodeCases() {
  std::vector<DecodeCase> cases;
  for (const Config& config : {kSmolLm2, kLlama}) {
    // 39990: several tiles per split (more than the pipeline depth for llama8b)
    // and a partial last tile.
    for (int len : {1, 2, 63, 64, 65, 1000, 4097, 39990}) cases.push_back({config, len});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Lengths, DecodeAttentionTest, ::testing::ValuesIn(DecodeCases()),
                         [](const ::testing::TestParamInfo<DecodeCase>& info) {
                           return std::string(info.param.config.name) + "_len" +
                                  std::to_string(info.param.length);
                         });

// The same buffers (as a captured graph would hold them) with *length
// rewritten between launches: each launch must use the current length.
TEST_F(AttentionKernelsTest, DecodeFollowsLengthChangedBetweenLaunches) {
  const AttentionShape shape{kLlama.n_heads, kLlama.n_kv_heads, kLlama.head_dim, 8191};
  const int max_len = 5000;
  Rng rng(7);
  const std::vector<bf16> q =
      RandomBf16(static_cast<size_t>(shape.n_heads) * shape.head_dim, -3.0f, 3.0f, rng);
  const std::vector<bf16> k = MakeCache(shape.n_kv_heads, shape.capacity, shape.head_dim,
                                        max_len, rng);
  const std::vector<bf16> v = MakeCache(shape.n_kv_heads, shape.capacity, shape.head_dim,
                                        max_len, rng);
  DecodeBuffers b = UploadDecode(q, k, v, max_len, shape);
  ASSERT_FALSE(HasFailure());
  for (int32_t len : {max_len, 65, 1, 4097}) {
    ASSERT_EQ(cudaMemcpy(b.length.get(), &len, sizeof(len), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemset(b.out.get(), 0xff, q.size() * sizeof(bf16)), cudaSuccess);
    ASSERT_TRUE(LaunchDecode(b, shape, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ExpectMatchesReference(DownloadBf16(b.out, q.size()), DecodeReference(q, len, k, v, shape),
                           shape.n_heads, shape.head_dim,
                           "decode relaunch len=" + std::to_string(len));
  }
}

// Captured once, replayed at several lengths.
TEST_F(AttentionKernelsTest, DecodeReplaysInCudaGraphAtAnyLength) {
  const AttentionShape shape{kSmolLm2.n_heads, kSmolLm2.n_kv_heads, kSmolLm2.head_dim, 3001};
  const int max_len = 3001;
  Rng rng(8);
  const std::vector<bf16> q =
      RandomBf16(static_cast<size_t>(shape.n_heads) * shape.head_dim, -3.0f, 3.0f, rng);
  const std::vector<bf16> k = MakeCache(shape.n_kv_heads, shape.capacity, shape.head_dim,
                                        max_len, rng);
  const std::vector<bf16> v = MakeCache(shape.n_kv_heads, shape.capacity, shape.head_dim,
                                        max_len, rng);
  DecodeBuffers b = UploadDecode(q, k, v, 1, shape);
  ASSERT_FALSE(HasFailure());
  absl::StatusOr<CudaStream> stream = CudaStream::Create();
  ASSERT_TRUE(stream.ok()) << stream.status();

  ASSERT_EQ(cudaStreamBeginCapture(stream->get(), cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const absl::Status launched = LaunchDecode(b, shape, stream->get());
  absl::StatusOr<CudaGraphExec> graph = CudaGraphExec::EndCapture(stream->get());
  ASSERT_TRUE(launched.ok()) << launched;
  ASSERT_TRUE(graph.ok()) << graph.status();

  for (int32_t len : {max_len, 2, 1000, 64}) {
    ASSERT_EQ(cudaMemcpy(b.length.get(), &len, sizeof(len), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemset(b.out.get(), 0xff, q.size() * sizeof(bf16)), cudaSuccess);
    ASSERT_TRUE(graph->Launch(stream->get()).ok());
    ASSERT_EQ(cudaStreamSynchronize(stream->get()), cudaSuccess);
    ExpectMatchesReference(DownloadBf16(b.out, q.size()), DecodeReference(q, len, k, v, shape),
                           shape.n_heads, shape.head_dim,
                           "decode graph replay len=" + std::to_string(len));
  }
}

// ---------------------------------------------------------------------------
// Argument checks: they fail before any CUDA call, so they run without a GPU.
// The pointers are host addresses that are never dereferenced.

struct FakeBuffers {
  alignas(16) bf16 data[64] = {};
  alignas(16) int32_t length[4] = {1, 1, 1, 1};
  const bf16* in() const { return data; }
  bf16* out() { return data; }
};

TEST(AttentionArgumentsTest, RejectsUnsupportedHeadDim) {
  FakeBuffers f;
  for (int head_dim : {0, 32, 96, 256}) {
    const AttentionShape shape{8, 2, head_dim, 100};
    EXPECT_TRUE(absl::IsInvalidArgument(
        LaunchPrefillAttention(f.in(), f.in(), f.in(), 4, 0, shape, f.out(), nullptr)))
        << head_dim;
    EXPECT_TRUE(absl::IsInvalidArgument(
        LaunchDecodeAttention(f.in(), f.in(), f.in(), f.length, shape, f.data, f.out(), nullptr)))
        << head_dim;
    EXPECT_EQ(DecodeAttentionWorkspaceBytes(shape), 0u) << head_dim;
  }
}

// The wgmma prefill kernel covers head_dim 128 only; asked for explicitly at
// 64 it refuses (kAuto falls back to mma.sync instead).
TEST(AttentionArgumentsTest, WgmmaPrefillRejectsHeadDim64) {
  FakeBuffers f;
  const AttentionShape shape{8, 2, 64, 100};
  EXPECT_FALSE(PrefillKernelSupported(PrefillKernel::kWgmma, shape));
  EXPECT_TRUE(absl::IsFailedPrecondition(LaunchPrefillAttentionWith(
      PrefillKernel::kWgmma, f.in(), f.in(), f.in(), 4, 0, shape, f.out(), nullptr)));
}

TEST(AttentionArgumentsTest, RejectsBadHeadCounts) {
  FakeBuffers f;
  for (const AttentionShape& shape : {AttentionShape{10, 3, 64, 100}, AttentionShape{0, 1, 64, 100},
                                      AttentionShape{8, 0, 64, 100}, AttentionShape{8, 2, 64, 0}}) {
    EXPECT_TRUE(absl::IsInvalidArgument(
        LaunchPrefillAttention(f.in(), f.in(), f.in(), 4, 0, shape, f.out(), nullptr)));
    EXPECT_TRUE(absl::IsInvalidArgument(
        LaunchDecodeAttention(f.in(), f.in(), f.in(), f.length, shape, f.data, f.out(), nullptr)));
  }
  // Decode puts a GQA group in one 16-row mma tile.
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchDecodeAttention(
      f.in(), f.in(), f.in(), f.length, AttentionShape{32, 1, 128, 100}, f.data, f.out(), nullptr)));
}

TEST(AttentionArgumentsTest, RejectsRowsOutsideCapacity) {
  FakeBuffers f;
  const AttentionShape shape{8, 2, 64, 100};
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchPrefillAttention(f.in(), f.in(), f.in(), 64, 37, shape, f.out(), nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchPrefillAttention(f.in(), f.in(), f.in(), -1, 0, shape, f.out(), nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchPrefillAttention(f.in(), f.in(), f.in(), 4, -1, shape, f.out(), nullptr)));
}

TEST(AttentionArgumentsTest, RejectsNullOrMisalignedPointers) {
  FakeBuffers f;
  const AttentionShape shape{8, 2, 64, 100};
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchPrefillAttention(nullptr, f.in(), f.in(), 4, 0, shape, f.out(), nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchPrefillAttention(f.in() + 1, f.in(), f.in(), 4, 0, shape, f.out(), nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchDecodeAttention(f.in(), f.in(), f.in(), nullptr, shape, f.data, f.out(), nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchDecodeAttention(f.in(), f.in(), f.in(), f.length, shape, nullptr, f.out(), nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchDecodeAttention(f.in(), f.in() + 4, f.in(), f.length, shape, f.data, f.out(), nullptr)));
}

TEST(AttentionArgumentsTest, WorkspaceCoversSplitsOfValidShapes) {
  // At least one split of (head_dim + 2) floats per query head.
  for (const AttentionShape& shape :
       {AttentionShape{9, 3, 64, 1}, AttentionShape{32, 8, 128, 131072}}) {
    EXPECT_GE(DecodeAttentionWorkspaceBytes(shape),
              static_cast<size_t>(shape.n_heads) * (shape.head_dim + 2) * sizeof(float));
  }
}

}  // namespace
}  // namespace tailorkv::cuda
