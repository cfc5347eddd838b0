#include "cuda/elementwise_kernels.cuh"
#include "runtime/backend.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "cuda/cuda_check.h"
#include "model/llama_weights.h"
#include "runtime/cpu_reference.h"
#include "runtime/sampler.h"

// Every GPU result is compared against the CPU reference on the same inputs:
// bit-exact for gathers, copies and conversions; for math whose result is
// stored as bf16, |got - ref| <= 8e-3 * |ref| + abs, where 8e-3 is one bf16
// ulp (2^-7) relative and `abs` covers float32 rounding near zero. Outputs are
// poisoned with 0xFF bytes (a NaN in bf16 and f32) before each launch, so an
// element the kernel forgets to write fails the comparison.

namespace tailorkv::cuda {
namespace {

#define TKV_TEST_CONCAT_INNER(a, b) a##b
#define TKV_TEST_CONCAT(a, b) TKV_TEST_CONCAT_INNER(a, b)
#define ASSERT_OK(expr)                                      \
  do {                                                       \
    const ::absl::Status tkv_status_ = (expr);               \
    ASSERT_TRUE(tkv_status_.ok()) << tkv_status_.ToString(); \
  } while (0)
#define ASSERT_OK_AND_ASSIGN_IMPL(tmp, lhs, expr)   \
  auto tmp = (expr);                                \
  ASSERT_TRUE(tmp.ok()) << tmp.status().ToString(); \
  lhs = std::move(*tmp)
#define ASSERT_OK_AND_ASSIGN(lhs, expr) \
  ASSERT_OK_AND_ASSIGN_IMPL(TKV_TEST_CONCAT(tkv_statusor_, __LINE__), lhs, expr)

constexpr uint16_t kPoisonBf16 = 0xFFFF;
constexpr float kBf16Rel = 8e-3f;

// Kernels that read bf16 (RoPE, SwiGLU) get random floats rounded to bf16 and
// the reference runs on those rounded values, so the tolerance above covers
// only the kernel's own arithmetic and final rounding.

// ---- Host bf16 arithmetic (round to nearest even, as __float2bfloat16_rn) ----

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float FloatFromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

uint16_t HostBf16Bits(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float Bf16ToFloat(uint16_t b) { return FloatFromBits(static_cast<uint32_t>(b) << 16); }

float RoundBf16(float f) { return Bf16ToFloat(HostBf16Bits(f)); }

std::vector<float> Bf16VectorToFloat(const std::vector<uint16_t>& b) {
  std::vector<float> f(b.size());
  for (size_t i = 0; i < b.size(); ++i) f[i] = Bf16ToFloat(b[i]);
  return f;
}

std::vector<uint16_t> FloatVectorToBf16(const std::vector<float>& f) {
  std::vector<uint16_t> b(f.size());
  for (size_t i = 0; i < f.size(); ++i) b[i] = HostBf16Bits(f[i]);
  return b;
}

std::vector<float> RandomFloats(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// ---- Comparisons that name the first differing index ----

::testing::AssertionResult AllNear(const std::vector<float>& got, const std::vector<float>& want,
                                   double rel, double abs) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  }
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = rel * std::fabs(static_cast<double>(want[i])) + abs;
    // Written so that a NaN (poison) fails.
    if (!(std::fabs(static_cast<double>(got[i]) - want[i]) <= tol)) {
      if (bad == 0) first = i;
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << got.size() << " elements differ; first at index " << first << ": got "
         << got[first] << ", want " << want[first] << " (tolerance "
         << rel * std::fabs(want[first]) + abs << ")";
}

template <typename T>
::testing::AssertionResult AllBitsEqual(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  }
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      if (bad == 0) first = i;
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  uint64_t g = 0, w = 0;
  std::memcpy(&g, &got[first], sizeof(T));
  std::memcpy(&w, &want[first], sizeof(T));
  return ::testing::AssertionFailure()
         << bad << " of " << got.size() << " elements differ; first at index " << first
         << ": got bits 0x" << std::hex << g << ", want bits 0x" << w;
}

// A reference whose values are mostly zero would let a kernel that writes
// zeros pass; every comparison first checks that this is not the case.
::testing::AssertionResult NonTrivial(const std::vector<float>& want) {
  size_t nonzero = 0;
  for (float v : want) nonzero += std::fabs(v) > 1e-6f;
  if (nonzero * 2 >= want.size() && !want.empty()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "reference is trivial: " << nonzero << " of " << want.size() << " elements nonzero";
}

// ---- Validation: runs without a device (launchers fail before any CUDA call) ----

TEST(ElementwiseKernelsValidation, RejectsBadSizesAndNullPointersBeforeLaunching) {
  // Dummy non-null pointers: never dereferenced, because validation fails first.
  alignas(16) static unsigned char scratch[64];
  auto* bf = reinterpret_cast<__nv_bfloat16*>(scratch);
  auto* f = reinterpret_cast<float*>(scratch);
  auto* i32 = reinterpret_cast<int32_t*>(scratch);

  EXPECT_TRUE(absl::IsInvalidArgument(LaunchEmbedding(bf, 0, i32, 1, 8, f, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchEmbedding(bf, 10, i32, 1, 0, f, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchEmbedding(bf, 10, i32, -1, 8, f, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchEmbedding(nullptr, 10, i32, 1, 8, f, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchEmbedding(bf, 10, nullptr, 1, 8, f, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchEmbedding(bf, 10, i32, 1, 8, nullptr, nullptr)));

  EXPECT_TRUE(absl::IsInvalidArgument(LaunchRmsNorm(f, f, 1, 0, 1e-5f, bf, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchRmsNorm(f, f, -1, 8, 1e-5f, bf, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchRmsNorm(f, f, 1, 8, -1.0f, bf, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRmsNorm(f, f, 1, 8, std::numeric_limits<float>::quiet_NaN(), bf, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchRmsNorm(nullptr, f, 1, 8, 1e-5f, bf, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchRmsNorm(f, nullptr, 1, 8, 1e-5f, bf, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchRmsNorm(f, f, 1, 8, 1e-5f, nullptr, nullptr)));

  // qkv, n, start_pos, n_heads, n_kv_heads, head_dim, inv_freq, adjacent, q, k, v, capacity
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, 1, i32, 9, 3, 96, f, false, bf, bf, bf, 16, nullptr)));  // head_dim
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, 1, i32, 9, 3, 0, f, false, bf, bf, bf, 16, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, 1, i32, 9, 2, 64, f, false, bf, bf, bf, 16, nullptr)));  // GQA ratio
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, 1, i32, 0, 3, 64, f, false, bf, bf, bf, 16, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, 1, i32, 9, 0, 64, f, false, bf, bf, bf, 16, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, 17, i32, 9, 3, 64, f, false, bf, bf, bf, 16, nullptr)));  // n > cap
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, 1, i32, 9, 3, 64, f, false, bf, bf, bf, 0, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, -1, i32, 9, 3, 64, f, false, bf, bf, bf, 16, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, 1, nullptr, 9, 3, 64, f, false, bf, bf, bf, 16, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, 1, i32, 9, 3, 64, nullptr, false, bf, bf, bf, 16, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(nullptr, 1, i32, 9, 3, 64, f, false, bf, bf, bf, 16, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, 1, i32, 9, 3, 64, f, false, nullptr, bf, bf, 16, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, 1, i32, 9, 3, 64, f, false, bf, nullptr, bf, 16, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      LaunchRopeAppendKv(bf, 1, i32, 9, 3, 64, f, false, bf, bf, nullptr, 16, nullptr)));

  EXPECT_TRUE(absl::IsInvalidArgument(LaunchSwiGlu(bf, 1, 0, bf, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchSwiGlu(bf, -1, 8, bf, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchSwiGlu(nullptr, 1, 8, bf, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchSwiGlu(bf, 1, 8, nullptr, nullptr)));

  EXPECT_TRUE(absl::IsInvalidArgument(LaunchArgmax(f, 0, i32, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchArgmax(f, -5, i32, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchArgmax(nullptr, 8, i32, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchArgmax(f, 8, nullptr, nullptr)));

  EXPECT_TRUE(absl::IsInvalidArgument(LaunchF32ToBf16(f, -1, bf, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchF32ToBf16(nullptr, 4, bf, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(LaunchF32ToBf16(f, 4, nullptr, nullptr)));

  EXPECT_TRUE(absl::IsInvalidArgument(LaunchAddScalar(nullptr, 1, nullptr)));
}

// n == 0 is an empty chunk, not an error: OK without launching, whatever the
// pointers (the other sizes must still be valid).
TEST(ElementwiseKernelsValidation, ZeroRowsIsANoOp) {
  EXPECT_TRUE(LaunchEmbedding(nullptr, 10, nullptr, 0, 8, nullptr, nullptr).ok());
  EXPECT_TRUE(LaunchRmsNorm(nullptr, nullptr, 0, 8, 1e-5f, nullptr, nullptr).ok());
  EXPECT_TRUE(LaunchRopeAppendKv(nullptr, 0, nullptr, 9, 3, 64, nullptr, true, nullptr, nullptr,
                                 nullptr, 16, nullptr)
                  .ok());
  EXPECT_TRUE(LaunchSwiGlu(nullptr, 0, 8, nullptr, nullptr).ok());
  EXPECT_TRUE(LaunchF32ToBf16(nullptr, 0, nullptr, nullptr).ok());
}

TEST(CudaCheck, StatusNamesTheCallAndTheError) {
  EXPECT_TRUE(CudaStatus(cudaSuccess, "cudaFree(p)").ok());
  const absl::Status oom = CudaStatus(cudaErrorMemoryAllocation, "cudaMalloc(64 bytes)");
  EXPECT_EQ(oom.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(oom.message().find("cudaMalloc(64 bytes)"), std::string::npos) << oom;
  EXPECT_NE(oom.message().find(cudaGetErrorString(cudaErrorMemoryAllocation)), std::string::npos)
      << oom;
  const absl::Status bad = CudaStatus(cudaErrorInvalidValue, "cudaMemcpy");
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);

  EXPECT_TRUE(CublasStatus(CUBLAS_STATUS_SUCCESS, "cublasGemmEx").ok());
  const absl::Status cb = CublasStatus(CUBLAS_STATUS_INVALID_VALUE, "cublasGemmEx");
  EXPECT_EQ(cb.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(cb.message().find("cublasGemmEx"), std::string::npos) << cb;
}

// The errors that leave the CUDA context unusable are marked as a lost
// device (the engine ends everything, the worker exits 3); the others not.
TEST(CudaCheck, StickyErrorsMarkTheDeviceLost) {
  for (cudaError_t sticky : {cudaErrorIllegalAddress, cudaErrorLaunchFailure, cudaErrorECCUncorrectable,
                             cudaErrorHardwareStackError, cudaErrorIllegalInstruction, cudaErrorMisalignedAddress,
                             cudaErrorInvalidAddressSpace, cudaErrorInvalidPc, cudaErrorLaunchTimeout,
                             cudaErrorAssert}) {
    const absl::Status s = CudaStatus(sticky, "cudaStreamSynchronize");
    EXPECT_TRUE(tailorkv::runtime::IsDeviceLost(s)) << s;
    EXPECT_NE(s.message().find(cudaGetErrorName(sticky)), std::string::npos) << s;
  }
  for (cudaError_t other : {cudaErrorMemoryAllocation, cudaErrorInvalidValue, cudaErrorNoDevice,
                            cudaErrorNotReady}) {
    EXPECT_FALSE(tailorkv::runtime::IsDeviceLost(CudaStatus(other, "cudaMalloc"))) << other;
  }
}

TEST(CudaCheck, LaunchingAnEmptyGraphIsFailedPrecondition) {
  CudaGraphExec none;
  EXPECT_FALSE(none.valid());
  EXPECT_EQ(none.Launch(nullptr).code(), absl::StatusCode::kFailedPrecondition);
}

// ---- GPU tests ----

class ElementwiseKernelsGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
    ASSERT_OK_AND_ASSIGN(stream_, CudaStream::Create());
  }

  cudaStream_t stream() const { return stream_.get(); }

  // All transfers go through the test's stream (a non-blocking stream does
  // not order against the legacy default stream's cudaMemcpy/cudaMemset).
  template <typename T>
  absl::StatusOr<DeviceBuffer> Upload(const std::vector<T>& host) {
    auto buf = DeviceBuffer::Allocate(host.size() * sizeof(T));
    if (!buf.ok()) return buf.status();
    if (!host.empty()) {
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(buf->get(), host.data(), host.size() * sizeof(T),
                                           cudaMemcpyHostToDevice, stream()));
    }
    return buf;
  }

  // `bytes` of 0xFF: NaN as bf16 or f32.
  absl::StatusOr<DeviceBuffer> Poisoned(size_t bytes) {
    auto buf = DeviceBuffer::Allocate(bytes);
    if (!buf.ok()) return buf.status();
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(buf->get(), 0xFF, bytes, stream()));
    return buf;
  }

  // Waits for the stream (surfacing kernel faults) and copies the whole buffer back.
  template <typename T>
  absl::Status Download(const DeviceBuffer& buf, std::vector<T>* host) {
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream()));
    host->assign(buf.size() / sizeof(T), T{});
    if (!host->empty()) {
      CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(host->data(), buf.get(), buf.size(), cudaMemcpyDeviceToHost, stream()));
    }
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream()));
    return absl::OkStatus();
  }

  CudaStream stream_;
};

// ---- Embedding ----

TEST_F(ElementwiseKernelsGpuTest, EmbeddingGathersRowsBitExactAndZeroesOutOfRangeIds) {
  // off = 1 shifts table and out by one element, forcing the scalar path.
  for (int hidden : {576, 97, 4096, 1}) {
    for (int n : {1, 7, 33}) {
      for (int off : {0, 1}) {
        SCOPED_TRACE(absl::StrCat("hidden ", hidden, " n ", n, " off ", off));
        const int vocab = hidden >= 4096 ? 300 : 1000;
        std::vector<uint16_t> table(off + static_cast<size_t>(vocab) * hidden);
        {
          const std::vector<float> r = RandomFloats(table.size(), -4.0f, 4.0f, 11 + hidden + n);
          for (size_t i = 0; i < table.size(); ++i) table[i] = HostBf16Bits(r[i]);
        }
        std::mt19937 rng(7 * n + hidden);
        std::vector<int32_t> ids(n);
        for (int32_t& id : ids) id = static_cast<int32_t>(rng() % vocab);
        ids[0] = vocab - 1;
        if (n >= 7) {
          ids[1] = -1;
          ids[3] = vocab;
          ids[5] = 0;
        }

        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_table, Upload(table));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_ids, Upload(ids));
        const size_t out_elems = off + static_cast<size_t>(n) * hidden + 8;  // 8 guard floats
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned(out_elems * sizeof(float)));
        ASSERT_OK(LaunchEmbedding(d_table.as<__nv_bfloat16>() + off, vocab, d_ids.as<int32_t>(), n,
                                  hidden, d_out.as<float>() + off, stream()));
        std::vector<uint32_t> got;
        ASSERT_OK(Download(d_out, &got));

        std::vector<uint32_t> want(out_elems, 0xFFFFFFFFu);
        std::vector<float> want_f;
        for (int i = 0; i < n; ++i) {
          for (int j = 0; j < hidden; ++j) {
            const bool valid = ids[i] >= 0 && ids[i] < vocab;
            const uint32_t bits =
                valid ? static_cast<uint32_t>(table[off + static_cast<size_t>(ids[i]) * hidden + j])
                            << 16
                      : 0u;
            want[off + static_cast<size_t>(i) * hidden + j] = bits;
            want_f.push_back(FloatFromBits(bits));
          }
        }
        ASSERT_TRUE(NonTrivial(want_f));
        EXPECT_TRUE(AllBitsEqual(got, want));
      }
    }
  }
}

// ---- RmsNorm ----

TEST_F(ElementwiseKernelsGpuTest, RmsNormMatchesReferenceWithinOneBf16Ulp) {
  const float eps = 1e-5f;
  for (int hidden : {576, 97, 4096, 1, 7}) {
    for (int n : {1, 7, 33}) {
      for (int off : {0, 1}) {
        SCOPED_TRACE(absl::StrCat("hidden ", hidden, " n ", n, " off ", off));
        std::vector<float> x =
            RandomFloats(off + static_cast<size_t>(n) * hidden, -3.0f, 3.0f, 100 + hidden + n);
        // Rows span five decades so that eps matters for the small ones.
        for (int r = 0; r < n; ++r) {
          const float scale = std::pow(10.0f, static_cast<float>(r % 5 - 3));
          for (int j = 0; j < hidden; ++j) x[off + static_cast<size_t>(r) * hidden + j] *= scale;
        }
        std::vector<float> w = RandomFloats(off + hidden, 0.5f, 1.5f, 200 + hidden);
        for (int j = 0; j < hidden; j += 3) w[off + j] = -w[off + j];

        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_w, Upload(w));
        const size_t out_elems = off + static_cast<size_t>(n) * hidden + 8;
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned(out_elems * sizeof(uint16_t)));
        ASSERT_OK(LaunchRmsNorm(d_x.as<float>() + off, d_w.as<float>() + off, n, hidden, eps,
                                d_out.as<__nv_bfloat16>() + off, stream()));
        std::vector<uint16_t> got_bits;
        ASSERT_OK(Download(d_out, &got_bits));

        std::vector<float> want(static_cast<size_t>(n) * hidden);
        for (int r = 0; r < n; ++r) {
          runtime::ref::RmsNorm(x.data() + off + static_cast<size_t>(r) * hidden, w.data() + off,
                                hidden, eps, want.data() + static_cast<size_t>(r) * hidden);
        }
        const std::vector<uint16_t> body(got_bits.begin() + off,
                                         got_bits.begin() + off + static_cast<size_t>(n) * hidden);
        ASSERT_TRUE(NonTrivial(want));
        EXPECT_TRUE(AllNear(Bf16VectorToFloat(body), want, kBf16Rel, 1e-6));
        // Untouched outside the rows.
        for (int i = 0; i < off; ++i) EXPECT_EQ(got_bits[i], kPoisonBf16);
        for (size_t i = off + body.size(); i < got_bits.size(); ++i) {
          EXPECT_EQ(got_bits[i], kPoisonBf16) << "guard element " << i;
        }
      }
    }
  }
}

// ---- RoPE + KV append ----

struct RopeCase {
  int n_heads, n_kv_heads, head_dim;
  int n, start_pos, capacity;
  model::RopeStyle style;
  bool llama3_scaling;
};

std::string Describe(const RopeCase& c) {
  return absl::StrCat("heads ", c.n_heads, "/", c.n_kv_heads, " head_dim ", c.head_dim, " n ", c.n,
                      " start ", c.start_pos, " capacity ", c.capacity,
                      c.style == model::RopeStyle::kAdjacentPairs ? " adjacent" : " halves",
                      c.llama3_scaling ? " llama3" : "");
}

class RopeAppendKvTest : public ElementwiseKernelsGpuTest {
 protected:
  // Runs one case with qkv at a 16-byte aligned address (vector path) and one
  // element past it (scalar path).
  void RunCase(const RopeCase& c) {
    for (int off : {0, 1}) {
      RunCaseAt(c, off);
      if (HasFatalFailure()) return;
    }
  }

  // Runs one case with qkv `off` elements into its buffer and checks Q, the
  // written K/V rows, and that every other cache row still holds its poison.
  void RunCaseAt(const RopeCase& c, int off) {
    SCOPED_TRACE(absl::StrCat(Describe(c), " qkv offset ", off));
    model::ModelConfig config;
    config.head_dim = c.head_dim;
    config.rope_theta = c.llama3_scaling ? 500000.0f : 10000.0f;
    if (c.llama3_scaling) {
      config.rope_scaling.type = model::RopeScaling::Type::kLlama3;
      config.rope_scaling.factor = 8.0f;
      config.rope_scaling.low_freq_factor = 1.0f;
      config.rope_scaling.high_freq_factor = 4.0f;
      config.rope_scaling.original_max_position = 8192;
    }
    const std::vector<float> inv_freq = runtime::ref::RopeInvFreq(config);
    const int hd = c.head_dim;
    const int width = (c.n_heads + 2 * c.n_kv_heads) * hd;
    std::vector<float> qkv = RandomFloats(static_cast<size_t>(c.n) * width, -2.0f, 2.0f,
                                          1000 + c.n * 31 + c.start_pos + hd);
    for (float& x : qkv) x = RoundBf16(x);  // the kernel's input is bf16
    std::vector<uint16_t> qkv_bits(off, 0);
    const std::vector<uint16_t> body_bits = FloatVectorToBf16(qkv);
    qkv_bits.insert(qkv_bits.end(), body_bits.begin(), body_bits.end());
    const std::vector<int32_t> start = {c.start_pos};

    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_qkv, Upload(qkv_bits));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_start, Upload(start));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_inv, Upload(inv_freq));
    const size_t q_elems = static_cast<size_t>(c.n) * c.n_heads * hd;
    const size_t cache_elems = static_cast<size_t>(c.n_kv_heads) * c.capacity * hd;
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Poisoned(q_elems * 2));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k, Poisoned(cache_elems * 2));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v, Poisoned(cache_elems * 2));
    ASSERT_OK(LaunchRopeAppendKv(
        d_qkv.as<__nv_bfloat16>() + off, c.n, d_start.as<int32_t>(), c.n_heads, c.n_kv_heads, hd,
        d_inv.as<float>(), c.style == model::RopeStyle::kAdjacentPairs, d_q.as<__nv_bfloat16>(),
        d_k.as<__nv_bfloat16>(), d_v.as<__nv_bfloat16>(), c.capacity, stream()));
    std::vector<uint16_t> q, k, v;
    ASSERT_OK(Download(d_q, &q));
    ASSERT_OK(Download(d_k, &k));
    ASSERT_OK(Download(d_v, &v));

    // Q: every token and head, within bf16 rounding of the fp32 reference.
    std::vector<float> want_q(q_elems);
    std::vector<float> head(hd);
    for (int t = 0; t < c.n; ++t) {
      for (int h = 0; h < c.n_heads; ++h) {
        const float* src = qkv.data() + static_cast<size_t>(t) * width + h * hd;
        head.assign(src, src + hd);
        runtime::ref::ApplyRope(head.data(), hd, c.start_pos + t, inv_freq, c.style);
        std::copy(head.begin(), head.end(),
                  want_q.begin() + (static_cast<size_t>(t) * c.n_heads + h) * hd);
      }
    }
    ASSERT_TRUE(NonTrivial(want_q));
    EXPECT_TRUE(AllNear(Bf16VectorToFloat(q), want_q, kBf16Rel, 1e-5)) << "Q";

    // K and V: rows [start, start + n) rotated / copied; every other row untouched.
    std::vector<float> want_k_rows, got_k_rows;
    std::vector<uint16_t> want_v(cache_elems, kPoisonBf16), want_k_poison(cache_elems, kPoisonBf16);
    std::vector<uint16_t> got_k_outside = k;
    for (int kv = 0; kv < c.n_kv_heads; ++kv) {
      for (int t = 0; t < c.n; ++t) {
        const int pos = c.start_pos + t;
        if (pos >= c.capacity) continue;  // past the cache: not written
        const size_t row = (static_cast<size_t>(kv) * c.capacity + pos) * hd;
        const float* ksrc = qkv.data() + static_cast<size_t>(t) * width + (c.n_heads + kv) * hd;
        const float* vsrc = ksrc + static_cast<size_t>(c.n_kv_heads) * hd;
        head.assign(ksrc, ksrc + hd);
        runtime::ref::ApplyRope(head.data(), hd, pos, inv_freq, c.style);
        for (int d = 0; d < hd; ++d) {
          want_k_rows.push_back(head[d]);
          got_k_rows.push_back(Bf16ToFloat(k[row + d]));
          got_k_outside[row + d] = kPoisonBf16;
          want_v[row + d] = HostBf16Bits(vsrc[d]);
        }
      }
    }
    ASSERT_TRUE(NonTrivial(want_k_rows));
    EXPECT_TRUE(AllNear(got_k_rows, want_k_rows, kBf16Rel, 1e-5)) << "K rows";
    EXPECT_TRUE(AllBitsEqual(got_k_outside, want_k_poison)) << "K cache outside the written rows";
    EXPECT_TRUE(AllBitsEqual(v, want_v)) << "V cache (written rows and poison elsewhere)";
  }
};

TEST_F(RopeAppendKvTest, MatchesReferenceForBothStylesAndGqaShapes) {
  struct Shape {
    int n_heads, n_kv_heads, head_dim;
  };
  struct Tokens {
    int n, start_pos;
  };
  for (Shape s : {Shape{9, 3, 64}, Shape{32, 8, 128}}) {
    for (model::RopeStyle style : {model::RopeStyle::kHalves, model::RopeStyle::kAdjacentPairs}) {
      for (Tokens sp :
           {Tokens{1, 0}, Tokens{7, 5}, Tokens{33, 100}, Tokens{1, 8191}, Tokens{7, 8191}}) {
        RunCase({s.n_heads, s.n_kv_heads, s.head_dim, sp.n, sp.start_pos, sp.start_pos + sp.n + 3,
                 style, /*llama3_scaling=*/sp.start_pos == 8191});
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST_F(RopeAppendKvTest, LargePositionsUpTo131071) {
  // Angles up to 131071 rad exercise sincosf's slow argument reduction; the
  // last token lands in the cache's last row.
  for (model::RopeStyle style : {model::RopeStyle::kHalves, model::RopeStyle::kAdjacentPairs}) {
    for (bool llama3 : {false, true}) {
      RunCase({9, 3, 64, 7, 131072 - 7, 131072, style, llama3});
      if (HasFatalFailure()) return;
      RunCase({4, 1, 128, 33, 131072 - 33, 131072, style, llama3});
      if (HasFatalFailure()) return;
    }
  }
}

TEST_F(RopeAppendKvTest, PositionsPastCapacityWriteQButNotTheCache) {
  // Tokens 2..4 fall past the cache; their K/V must not land in the next
  // head's rows (the poison check sees that), Q is still written.
  RunCase({9, 3, 64, 5, 14, 16, model::RopeStyle::kHalves, false});
}

// ---- SwiGlu ----

TEST_F(ElementwiseKernelsGpuTest, SwiGluOnBf16InputsMatchesReferenceWithinOneBf16Ulp) {
  for (int ffn : {1536, 97, 7, 1}) {
    for (int n : {1, 7, 33}) {
      for (int off : {0, 1}) {
        SCOPED_TRACE(absl::StrCat("ffn ", ffn, " n ", n, " off ", off));
        std::vector<float> gate_up =
            RandomFloats(off + static_cast<size_t>(n) * 2 * ffn, -8.0f, 8.0f, 300 + ffn + n);
        // Saturated gates: exp(-g) overflows to inf or vanishes.
        gate_up[off] = -100.0f;
        if (ffn > 1) gate_up[off + 1] = 90.0f;
        for (float& x : gate_up) x = RoundBf16(x);  // the kernel's input is bf16
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_in, Upload(FloatVectorToBf16(gate_up)));
        const size_t out_elems = off + static_cast<size_t>(n) * ffn + 8;
        ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned(out_elems * sizeof(uint16_t)));
        ASSERT_OK(LaunchSwiGlu(d_in.as<__nv_bfloat16>() + off, n, ffn,
                               d_out.as<__nv_bfloat16>() + off, stream()));
        std::vector<uint16_t> got_bits;
        ASSERT_OK(Download(d_out, &got_bits));

        std::vector<float> want(static_cast<size_t>(n) * ffn);
        for (int r = 0; r < n; ++r) {
          const float* row = gate_up.data() + off + static_cast<size_t>(r) * 2 * ffn;
          float* dst = want.data() + static_cast<size_t>(r) * ffn;
          std::copy(row, row + ffn, dst);
          runtime::ref::SwiGlu(dst, row + ffn, ffn);
        }
        const std::vector<uint16_t> body(got_bits.begin() + off,
                                         got_bits.begin() + off + static_cast<size_t>(n) * ffn);
        if (ffn > 1) {
          ASSERT_TRUE(NonTrivial(want));
        }
        EXPECT_TRUE(AllNear(Bf16VectorToFloat(body), want, kBf16Rel, 1e-6));
        for (size_t i = off + body.size(); i < got_bits.size(); ++i) {
          EXPECT_EQ(got_bits[i], kPoisonBf16) << "guard element " << i;
        }
      }
    }
  }
}

// ---- Argmax ----

class ArgmaxTest : public ElementwiseKernelsGpuTest {
 protected:
  // Runs the kernel on logits placed `off` floats into the buffer.
  void Run(const std::vector<float>& logits, int off, int32_t* id) {
    std::vector<float> padded(off, 0.0f);
    padded.insert(padded.end(), logits.begin(), logits.end());
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_logits, Upload(padded));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_id, Poisoned(sizeof(int32_t)));
    ASSERT_OK(LaunchArgmax(d_logits.as<float>() + off, static_cast<int>(logits.size()),
                           d_id.as<int32_t>(), stream()));
    std::vector<int32_t> got;
    ASSERT_OK(Download(d_id, &got));
    *id = got[0];
  }

  static int32_t Greedy(std::vector<float> logits) {
    runtime::Sampler sampler({});
    return sampler.Sample(absl::MakeSpan(logits), {});
  }
};

TEST_F(ArgmaxTest, MatchesGreedySamplerOnRandomLogits) {
  for (int vocab : {1, 7, 33, 1000, 49152, 128256, 128257}) {
    for (int off : {0, 1}) {
      SCOPED_TRACE(absl::StrCat("vocab ", vocab, " off ", off));
      std::vector<float> logits = RandomFloats(vocab, -10.0f, 10.0f, 400 + vocab);
      std::mt19937 rng(vocab);
      // A planted maximum, and in larger vocabularies a tie with a later id.
      const int p = static_cast<int>(rng() % vocab);
      logits[p] = 25.0f;
      if (vocab > 2 * 1024) logits[vocab - 1] = 25.0f;
      int32_t id = -1;
      ASSERT_NO_FATAL_FAILURE(Run(logits, off, &id));
      EXPECT_EQ(id, p);
      EXPECT_EQ(id, Greedy(logits));
    }
  }
}

TEST_F(ArgmaxTest, TiesPickTheLowestId) {
  const int vocab = 128256;
  int32_t id = -1;
  ASSERT_NO_FATAL_FAILURE(Run(std::vector<float>(vocab, 1.5f), 0, &id));
  EXPECT_EQ(id, 0);

  std::vector<float> logits = RandomFloats(vocab, -1.0f, 1.0f, 7);
  // Ties in different threads and within one thread's 4-wide vector; off = 1
  // repeats it on the scalar path.
  for (int i : {128255, 100000, 4099, 4097, 4098}) logits[i] = 3.0f;
  ASSERT_NO_FATAL_FAILURE(Run(logits, 0, &id));
  EXPECT_EQ(id, 4097);
  ASSERT_NO_FATAL_FAILURE(Run(logits, 1, &id));
  EXPECT_EQ(id, 4097);

  // -0 and +0 compare equal, so they tie.
  ASSERT_NO_FATAL_FAILURE(Run({-1.0f, -0.0f, 0.0f}, 0, &id));
  EXPECT_EQ(id, 1);
  ASSERT_NO_FATAL_FAILURE(Run({-1.0f, 0.0f, -0.0f}, 0, &id));
  EXPECT_EQ(id, 1);
}

TEST_F(ArgmaxTest, NanRanksBelowEveryNumber) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  int32_t id = -1;
  std::vector<float> logits = RandomFloats(49152, -5.0f, 5.0f, 9);
  logits[0] = nan;
  logits[17] = nan;
  logits[30000] = 6.0f;
  ASSERT_NO_FATAL_FAILURE(Run(logits, 0, &id));
  EXPECT_EQ(id, 30000);
  ASSERT_NO_FATAL_FAILURE(Run({nan, -inf, nan}, 0, &id));
  EXPECT_EQ(id, 1);
  ASSERT_NO_FATAL_FAILURE(Run({nan, nan, nan}, 0, &id));
  EXPECT_EQ(id, 0);
  ASSERT_NO_FATAL_FAILURE(Run({-inf, -inf}, 0, &id));
  EXPECT_EQ(id, 0);
}

// ---- F32ToBf16 ----

TEST_F(ElementwiseKernelsGpuTest, F32ToBf16RoundsToNearestEvenBitExact) {
  struct Offsets {
    int src, dst;
  };
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{33}, int64_t{2049}, int64_t{(1 << 20) + 3}}) {
    for (Offsets o : {Offsets{0, 0}, Offsets{1, 0}, Offsets{0, 1}}) {
      SCOPED_TRACE(absl::StrCat("n ", n, " src off ", o.src, " dst off ", o.dst));
      std::vector<float> src = RandomFloats(o.src + n, -1000.0f, 1000.0f, 500 + n);
      const std::vector<float> specials = {
          0.0f,
          -0.0f,
          std::numeric_limits<float>::infinity(),
          -std::numeric_limits<float>::infinity(),
          std::numeric_limits<float>::max(),  // rounds up to inf
          std::numeric_limits<float>::min(),
          1e-40f,                      // subnormal
          -3e-39f,                     // subnormal
          FloatFromBits(0x3F808000u),  // tie: rounds down to even 0x3F80
          FloatFromBits(0x3F818000u),  // tie: rounds up to even 0x3F82
          FloatFromBits(0x3F808001u),  // just above the tie: 0x3F81
          FloatFromBits(0x3FFFFFFFu),  // rounds up across the exponent: 2.0
          1.0f,
          -2.5f,
          65504.0f,
          3.14159265f,
      };
      // Only where they stay a minority, so the non-triviality check holds.
      if (static_cast<size_t>(n) >= 2 * specials.size()) {
        for (size_t i = 0; i < specials.size(); ++i) src[o.src + i] = specials[i];
      }
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_src, Upload(src));
      const size_t dst_elems = o.dst + n + 16;
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_dst, Poisoned(dst_elems * sizeof(uint16_t)));
      ASSERT_OK(LaunchF32ToBf16(d_src.as<float>() + o.src, n, d_dst.as<__nv_bfloat16>() + o.dst,
                                stream()));
      std::vector<uint16_t> got;
      ASSERT_OK(Download(d_dst, &got));
      std::vector<uint16_t> want(dst_elems, kPoisonBf16);
      std::vector<float> want_f(n);
      for (int64_t i = 0; i < n; ++i) {
        want[o.dst + i] = HostBf16Bits(src[o.src + i]);
        want_f[i] = Bf16ToFloat(want[o.dst + i]);
      }
      if (n > 1) {
        ASSERT_TRUE(NonTrivial(want_f));
      }
      EXPECT_TRUE(AllBitsEqual(got, want));
    }
  }
}

// ---- AddScalar and graph replay (cuda_check's CudaGraphExec) ----

TEST_F(ElementwiseKernelsGpuTest, CapturedAddScalarAdvancesTheCounterAtEachReplay) {
  ASSERT_OK_AND_ASSIGN(DeviceBuffer counter, Upload(std::vector<int32_t>{5}));
  ASSERT_OK(CudaStatus(cudaStreamSynchronize(stream()), "cudaStreamSynchronize"));
  ASSERT_OK(CudaStatus(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal),
                       "cudaStreamBeginCapture"));
  const absl::Status launched = LaunchAddScalar(counter.as<int32_t>(), 3, stream());
  auto graph = CudaGraphExec::EndCapture(stream());
  ASSERT_OK(launched);
  ASSERT_TRUE(graph.ok()) << graph.status();
  ASSERT_TRUE(graph->valid());

  // Capturing does not execute.
  std::vector<int32_t> value;
  ASSERT_OK(Download(counter, &value));
  EXPECT_EQ(value[0], 5);

  for (int i = 0; i < 4; ++i) ASSERT_OK(graph->Launch(stream()));
  ASSERT_OK(Download(counter, &value));
  EXPECT_EQ(value[0], 5 + 4 * 3);

  ASSERT_OK(LaunchAddScalar(counter.as<int32_t>(), -20, stream()));
  ASSERT_OK(Download(counter, &value));
  EXPECT_EQ(value[0], -3);
}

TEST_F(ElementwiseKernelsGpuTest, DeviceBufferMovesOwnership) {
  ASSERT_OK_AND_ASSIGN(DeviceBuffer a, DeviceBuffer::Allocate(256));
  void* p = a.get();
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(a.size(), 256u);
  DeviceBuffer b(std::move(a));
  EXPECT_EQ(b.get(), p);
  EXPECT_EQ(b.size(), 256u);
  EXPECT_EQ(a.get(), nullptr);  // NOLINT(bugprone-use-after-move): checking the moved-from state
  EXPECT_EQ(a.size(), 0u);
  ASSERT_OK_AND_ASSIGN(DeviceBuffer c, DeviceBuffer::Allocate(64));
  c = std::move(b);  // frees c's old allocation
  EXPECT_EQ(c.get(), p);
}

// A memory pool takes its bytes from the device at creation; buffers carved
// from it leave the device's free memory unchanged, hold what is written to
// them, fail with ResourceExhausted past the pool's size (never growing it),
// and give their bytes back to the pool when released.
TEST_F(ElementwiseKernelsGpuTest, MemoryPoolIsTakenOnceAndNeverGrows) {
  constexpr size_t kMiB = size_t{1} << 20;
  size_t free0 = 0, free1 = 0, free2 = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&free0, &total), cudaSuccess);
  ASSERT_OK_AND_ASSIGN(DeviceMemoryPool pool, DeviceMemoryPool::Create(0, 64 * kMiB));
  ASSERT_EQ(cudaMemGetInfo(&free1, &total), cudaSuccess);
  EXPECT_GE(free0 - free1, 64 * kMiB);
  EXPECT_LE(free0 - free1, 80 * kMiB);
  std::vector<DeviceBuffer> held;
  for (int i = 0; i < 3; ++i) {
    ASSERT_OK_AND_ASSIGN(DeviceBuffer b, DeviceBuffer::Allocate(20 * kMiB, &pool));
    ASSERT_EQ(cudaMemset(b.get(), 0x11 * (i + 1), b.size()), cudaSuccess);
    held.push_back(std::move(b));
  }
  ASSERT_EQ(cudaMemGetInfo(&free2, &total), cudaSuccess);
  EXPECT_EQ(free2, free1);  // carved from the pool, not from the device
  for (int i = 0; i < 3; ++i) {
    std::vector<uint8_t> back(4096);
    ASSERT_EQ(cudaMemcpy(back.data(), held[i].as<uint8_t>() + 20 * kMiB - 4096, back.size(),
                         cudaMemcpyDeviceToHost), cudaSuccess);
    for (uint8_t v : back) ASSERT_EQ(v, 0x11 * (i + 1));
  }
  absl::StatusOr<DeviceBuffer> over = DeviceBuffer::Allocate(20 * kMiB, &pool);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);  // the failure left no sticky error
  held.pop_back();
  ASSERT_OK_AND_ASSIGN(DeviceBuffer again, DeviceBuffer::Allocate(20 * kMiB, &pool));
  EXPECT_NE(again.get(), nullptr);
  EXPECT_EQ(DeviceBuffer::Allocate(16, nullptr).ok(), true);  // no pool: cudaMalloc
  EXPECT_EQ(DeviceMemoryPool::Create(0, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tailorkv::cuda
