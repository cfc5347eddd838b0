// The quantized GEMV (issue 19) against CPU references built on GGUF's own
// dequantization (model::Dequantize, itself tested bit-exact against the
// gguf Python package):
// - RepackForGemv: the planes hold exactly the GGUF blocks' values (no
//   device needed: runs in CI);
// - LaunchDequantizeRows: bit-exact bf16_rn of the dequantized floats;
// - LaunchGemvQuant: within a float32 summation bound of a double-precision
//   product of the dequantized weights and the bf16 activations, on odd
//   shapes, every output mode, outputs poisoned and a guard past the end
//   that must stay untouched; deterministic; replayed from a CUDA graph;
// - bad arguments name the field (no device needed).
//
// Tolerance: every product q * x of a block is exact in float32 (a 4- or
// 8-bit integer times a bf16), so the errors are float32 additions (32 a
// block, ~cols / 1024 blocks a lane, a 5-level shuffle tree) and the scale
// multiply: 1e-5 of sum |value * x| has a wide margin, while a block dropped
// or read twice moves a row by ~32 / cols of that sum (>= 2e-3 here).
#include "cuda/gemv_quant_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/test_rng.h"
#include "model/ggml_types.h"

namespace tailorkv::cuda {
namespace {

using model::GgmlType;
using test_util::Bf16Bits;
using test_util::Bf16Value;
using test_util::Rng;

#define ASSERT_OK(expr)                                      \
  do {                                                       \
    const ::absl::Status tkv_status_ = (expr);               \
    ASSERT_TRUE(tkv_status_.ok()) << tkv_status_.ToString(); \
  } while (0)
#define ASSERT_CUDA(expr) ASSERT_OK(CudaStatus((expr), #expr))

constexpr GgmlType kTypes[] = {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0};
constexpr int kGuard = 16;
constexpr uint8_t kPoison = 0xFF;  // NaN in bf16 and f32

int BlockBytes(GgmlType t) { return t == GgmlType::kQ4_0 ? 18 : t == GgmlType::kQ4_1 ? 20 : 34; }
const char* Name(GgmlType t) { return t == GgmlType::kQ4_0 ? "Q4_0" : t == GgmlType::kQ4_1 ? "Q4_1" : "Q8_0"; }

uint32_t Bits(Rng& rng, uint32_t n) { return static_cast<uint32_t>(rng.Uniform(0.0f, 1.0f) * n) % n; }

// An fp16 of magnitude ~2^-10 .. 2^-4 (LLM-like scales), random sign.
uint16_t RandomScale(Rng& rng) {
  const uint16_t exp = static_cast<uint16_t>(5 + Bits(rng, 7));  // biased exponent: 2^(e - 15)
  return static_cast<uint16_t>((Bits(rng, 2) << 15) | (exp << 10) | Bits(rng, 1024));
}

// GGUF bytes of rows x cols random values of `t`.
std::vector<uint8_t> RandomGguf(GgmlType t, int64_t rows, int64_t cols, Rng& rng) {
  const int64_t blocks = rows * cols / 32;
  std::vector<uint8_t> b(static_cast<size_t>(blocks * BlockBytes(t)));
  for (int64_t i = 0; i < blocks; ++i) {
    uint8_t* p = b.data() + i * BlockBytes(t);
    const uint16_t d = RandomScale(rng);
    std::memcpy(p, &d, 2);
    int q0 = 2;
    if (t == GgmlType::kQ4_1) {
      const uint16_t m = RandomScale(rng);
      std::memcpy(p + 2, &m, 2);
      q0 = 4;
    }
    for (int j = q0; j < BlockBytes(t); ++j) p[j] = static_cast<uint8_t>(Bits(rng, 256));
  }
  return b;
}

std::vector<float> DequantizeAll(GgmlType t, const std::vector<uint8_t>& b, int64_t n) {
  std::vector<float> f(static_cast<size_t>(n));
  EXPECT_TRUE(model::Dequantize(t, b.data(), b.size(), f.data(), n).ok());
  return f;
}

// Value k of row r from the planes, by the header's formula.
float PlaneValue(const QuantPlanes& p, int64_t r, int64_t k) {
  const int64_t nb = p.cols / 32, blk = r * nb + k / 32;
  const int j = static_cast<int>(k % 32);
  const float d = model::HalfToFloat(p.d[static_cast<size_t>(blk)]);
  if (p.type == GgmlType::kQ8_0) return d * static_cast<float>(static_cast<int8_t>(p.qs[blk * 32 + j]));
  const uint8_t byte = p.qs[blk * 16 + j % 16];
  const int q = j < 16 ? (byte & 0xF) : (byte >> 4);
  if (p.type == GgmlType::kQ4_0) return d * static_cast<float>(q - 8);
  const float dq = d * static_cast<float>(q);  // two roundings, as GGUF's (unfused)
  return dq + model::HalfToFloat(p.m[static_cast<size_t>(blk)]);
}

TEST(RepackForGemvTest, PlanesHoldExactlyTheGgufValues) {
  Rng rng(31);
  for (GgmlType t : kTypes) {
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 32}, {3, 96}, {17, 544}}) {
      SCOPED_TRACE(testing::Message() << Name(t) << " " << rows << "x" << cols);
      const auto g = RandomGguf(t, rows, cols, rng);
      const auto ref = DequantizeAll(t, g, rows * cols);
      auto p = RepackForGemv(t, g.data(), static_cast<int64_t>(g.size()), rows, cols);
      ASSERT_TRUE(p.ok()) << p.status();
      ASSERT_EQ(p->qs.size(), static_cast<size_t>(rows * cols / (t == GgmlType::kQ8_0 ? 1 : 2)));
      ASSERT_EQ(p->d.size(), static_cast<size_t>(rows * cols / 32));
      ASSERT_EQ(p->m.size(), t == GgmlType::kQ4_1 ? static_cast<size_t>(rows * cols / 32) : 0u);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k = 0; k < cols; ++k) {
          const float got = PlaneValue(*p, r, k), want = ref[static_cast<size_t>(r * cols + k)];
          ASSERT_EQ(std::memcmp(&got, &want, 4), 0) << "row " << r << " value " << k << ": " << got << " vs " << want;
        }
      }
    }
  }
}

TEST(RepackForGemvTest, RefusesWhatDoesNotFit) {
  Rng rng(32);
  const auto g = RandomGguf(GgmlType::kQ4_1, 2, 64, rng);
  const int64_t n = static_cast<int64_t>(g.size());
  auto msg = [](const absl::StatusOr<QuantPlanes>& s) { return std::string(s.status().message()); };
  EXPECT_NE(msg(RepackForGemv(GgmlType::kQ4_1, g.data(), n - 1, 2, 64)).find("n_bytes"), std::string::npos);
  EXPECT_NE(msg(RepackForGemv(GgmlType::kQ4_1, g.data(), n, 2, 48)).find("cols"), std::string::npos);
  EXPECT_NE(msg(RepackForGemv(GgmlType::kQ4_1, g.data(), n, 0, 64)).find("rows"), std::string::npos);
  EXPECT_NE(msg(RepackForGemv(GgmlType::kQ4_K, g.data(), n, 2, 64)).find("type"), std::string::npos);
  EXPECT_NE(msg(RepackForGemv(GgmlType::kQ4_1, nullptr, n, 2, 64)).find("n_bytes"), std::string::npos);
}

TEST(GemvQuantValidationTest, BadArgumentsNameTheField) {
  alignas(16) static uint8_t buf[4096];
  QuantMatrixView w{GgmlType::kQ4_1, 4, 64, buf, reinterpret_cast<const __half*>(buf + 1024),
                    reinterpret_cast<const __half*>(buf + 2048)};
  const auto* x = reinterpret_cast<const __nv_bfloat16*>(buf + 3072);
  void* y = buf + 3584;
  auto msg = [&](QuantMatrixView v, const void* xx, void* yy, bool bf16, bool acc) {
    return std::string(
        LaunchGemvQuant(v, static_cast<const __nv_bfloat16*>(xx), yy, bf16, acc, nullptr).message());
  };
  QuantMatrixView v = w;
  v.type = GgmlType::kQ6_K;
  EXPECT_NE(msg(v, x, y, false, false).find("w.type"), std::string::npos);
  v = w;
  v.rows = 0;
  EXPECT_NE(msg(v, x, y, false, false).find("w.rows"), std::string::npos);
  v = w;
  v.cols = 40;
  EXPECT_NE(msg(v, x, y, false, false).find("w.cols"), std::string::npos);
  v = w;
  v.m = nullptr;
  EXPECT_NE(msg(v, x, y, false, false).find("w.m"), std::string::npos);
  v = w;
  v.qs = buf + 1;
  EXPECT_NE(msg(v, x, y, false, false).find("aligned"), std::string::npos);
  EXPECT_NE(msg(w, buf + 3073, y, false, false).find("x must"), std::string::npos);
  EXPECT_NE(msg(w, x, buf + 3585, false, false).find("y is misaligned"), std::string::npos);
  EXPECT_NE(msg(w, x, y, true, true).find("accumulate"), std::string::npos);
  EXPECT_NE(msg(w, nullptr, y, false, false).find("null"), std::string::npos);
  EXPECT_NE(std::string(LaunchGemvQuantBatch(w, x, 0, y, false, false, nullptr).message()).find("batch"),
            std::string::npos);
  auto deq = [&](int first, int count) {
    return std::string(LaunchDequantizeRows(w, first, count, reinterpret_cast<__nv_bfloat16*>(y), nullptr).message());
  };
  EXPECT_NE(deq(-1, 2).find("first"), std::string::npos);
  EXPECT_NE(deq(3, 2).find("first"), std::string::npos);
  EXPECT_NE(deq(0, 0).find("count"), std::string::npos);
}

// One problem's host data, reference and device copies.
struct Problem {
  GgmlType type;
  int rows, cols;
  QuantPlanes planes;
  std::vector<float> value;  // dequantized weights
  std::vector<uint16_t> x;   // bf16
  std::vector<float> y0;
  std::vector<double> ref, abs_sum;
  DeviceBuffer qs, d, m, xd, y;

  QuantMatrixView View() const {
    return {type, rows, cols, qs.as<const uint8_t>(), d.as<const __half>(),
            type == GgmlType::kQ4_1 ? m.as<const __half>() : nullptr};
  }
};

class GemvQuantTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
    auto s = CudaStream::Create();
    ASSERT_TRUE(s.ok()) << s.status();
    stream_ = std::move(*s);
  }

  static void Upload(const void* src, size_t bytes, DeviceBuffer* dst) {
    auto b = DeviceBuffer::Allocate(std::max<size_t>(bytes, 16));
    ASSERT_TRUE(b.ok()) << b.status();
    *dst = std::move(*b);
    ASSERT_CUDA(cudaMemcpy(dst->get(), src, bytes, cudaMemcpyHostToDevice));
  }

  void Make(GgmlType t, int rows, int cols, uint64_t seed, Problem* p) {
    Rng rng(seed);
    p->type = t;
    p->rows = rows;
    p->cols = cols;
    const auto g = RandomGguf(t, rows, cols, rng);
    p->value = DequantizeAll(t, g, static_cast<int64_t>(rows) * cols);
    auto planes = RepackForGemv(t, g.data(), static_cast<int64_t>(g.size()), rows, cols);
    ASSERT_TRUE(planes.ok()) << planes.status();
    p->planes = std::move(*planes);
    p->x.resize(cols);
    for (auto& v : p->x) v = Bf16Bits(rng.Uniform(-1.0f, 1.0f));
    p->y0.resize(rows);
    for (auto& v : p->y0) v = rng.Uniform(-4.0f, 4.0f);
    p->ref.assign(rows, 0.0);
    p->abs_sum.assign(rows, 0.0);
    for (int r = 0; r < rows; ++r) {
      for (int k = 0; k < cols; ++k) {
        const double prod = static_cast<double>(p->value[static_cast<size_t>(r) * cols + k]) * Bf16Value(p->x[k]);
        p->ref[r] += prod;
        p->abs_sum[r] += std::fabs(prod);
      }
    }
    Upload(p->planes.qs.data(), p->planes.qs.size(), &p->qs);
    Upload(p->planes.d.data(), p->planes.d.size() * 2, &p->d);
    if (t == GgmlType::kQ4_1) Upload(p->planes.m.data(), p->planes.m.size() * 2, &p->m);
    Upload(p->x.data(), p->x.size() * 2, &p->xd);
    auto y = DeviceBuffer::Allocate((rows + kGuard) * sizeof(float));
    ASSERT_TRUE(y.ok());
    p->y = std::move(*y);
  }

  // y poisoned (y0 first when accumulating).
  void ResetY(const Problem& p, bool accumulate) {
    std::vector<uint8_t> bytes((p.rows + kGuard) * sizeof(float), kPoison);
    if (accumulate) std::memcpy(bytes.data(), p.y0.data(), p.rows * sizeof(float));
    ASSERT_CUDA(cudaMemcpy(p.y.get(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
  }

  std::vector<uint8_t> DownloadY(const Problem& p) {
    std::vector<uint8_t> bytes((p.rows + kGuard) * sizeof(float));
    EXPECT_EQ(cudaStreamSynchronize(stream_.get()), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(bytes.data(), p.y.get(), bytes.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    return bytes;
  }

  // y against the reference (repeats times onto y0 when accumulating); the
  // guard past the last row keeps its poison.
  static void Check(const Problem& p, bool bf16, bool accumulate, const std::vector<uint8_t>& bytes,
                    int repeats = 1) {
    const size_t elem = bf16 ? 2 : 4;
    int bad = 0;
    for (int r = 0; r < p.rows && bad < 5; ++r) {
      double got;
      if (bf16) {
        uint16_t b;
        std::memcpy(&b, bytes.data() + r * elem, 2);
        got = Bf16Value(b);
      } else {
        float f;
        std::memcpy(&f, bytes.data() + r * elem, 4);
        got = f;
      }
      const double want = (accumulate ? p.y0[r] : 0.0) + repeats * p.ref[r];
      double tol = 1e-5 * repeats * p.abs_sum[r] + (accumulate ? repeats * 2.4e-7 * std::fabs(want) : 0.0);
      if (bf16) tol += std::fabs(want) / 256;
      if (!(std::fabs(got - want) <= tol)) {
        ++bad;
        ADD_FAILURE() << "row " << r << ": got " << got << ", want " << want << " (tolerance " << tol << ")";
      }
    }
    for (size_t i = p.rows * elem; i < bytes.size(); ++i) {
      ASSERT_EQ(bytes[i], kPoison) << "byte " << i << " past the last row was written";
    }
  }

  CudaStream stream_;
};

TEST_F(GemvQuantTest, MatchesTheDequantizedProductInEveryMode) {
  uint64_t seed = 100;
  for (GgmlType t : kTypes) {
    for (auto [rows, cols] : {std::pair<int, int>{1, 32}, {7, 96}, {37, 4096}, {1001, 1056}, {3, 14336}}) {
      Problem p;
      Make(t, rows, cols, ++seed, &p);
      if (HasFatalFailure()) return;
      for (int mode = 0; mode < 3; ++mode) {
        const bool bf16 = mode == 0, acc = mode == 2;
        SCOPED_TRACE(testing::Message() << Name(t) << " " << rows << "x" << cols << " mode " << mode);
        ResetY(p, acc);
        ASSERT_OK(LaunchGemvQuant(p.View(), p.xd.as<const __nv_bfloat16>(), p.y.get(), bf16, acc, stream_.get()));
        const auto first = DownloadY(p);
        Check(p, bf16, acc, first);
        // Deterministic: a second launch gives the same bytes.
        ResetY(p, acc);
        ASSERT_OK(LaunchGemvQuant(p.View(), p.xd.as<const __nv_bfloat16>(), p.y.get(), bf16, acc, stream_.get()));
        EXPECT_EQ(DownloadY(p), first);
      }
    }
  }
}

TEST_F(GemvQuantTest, ReplaysFromAGraphAndAccumulatesAcrossReplays) {
  Problem p;
  Make(GgmlType::kQ4_0, 300, 2048, 7, &p);
  if (HasFatalFailure()) return;
  ResetY(p, true);
  ASSERT_CUDA(cudaStreamBeginCapture(stream_.get(), cudaStreamCaptureModeThreadLocal));
  const absl::Status launched =
      LaunchGemvQuant(p.View(), p.xd.as<const __nv_bfloat16>(), p.y.get(), false, true, stream_.get());
  auto graph = CudaGraphExec::EndCapture(stream_.get());
  ASSERT_OK(launched);
  ASSERT_TRUE(graph.ok()) << graph.status();
  for (int i = 0; i < 3; ++i) ASSERT_OK(graph->Launch(stream_.get()));
  Check(p, false, true, DownloadY(p), 3);
}

// A batch (1..11 rows: passes of 8, padding to 2/4/8) against each row
// alone: bit-identical, in every output mode; outputs past the batch's last
// row untouched.
TEST_F(GemvQuantTest, ABatchsRowsAreBitIdenticalToEachAlone) {
  uint64_t seed = 300;
  for (GgmlType t : kTypes) {
    Problem p;
    Make(t, 75, 544, ++seed, &p);
    if (HasFatalFailure()) return;
    Rng rng(seed);
    for (int batch : {1, 2, 3, 5, 8, 11}) {
      std::vector<uint16_t> xs(static_cast<size_t>(batch) * p.cols);
      for (auto& v : xs) v = Bf16Bits(rng.Uniform(-1.0f, 1.0f));
      DeviceBuffer xd, yb, y1;
      Upload(xs.data(), xs.size() * 2, &xd);
      const size_t y_bytes = (static_cast<size_t>(batch) * p.rows + kGuard) * sizeof(float);
      auto a = DeviceBuffer::Allocate(y_bytes), b = DeviceBuffer::Allocate(p.rows * sizeof(float));
      ASSERT_TRUE(a.ok() && b.ok());
      yb = std::move(*a);
      y1 = std::move(*b);
      for (int mode = 0; mode < 3; ++mode) {
        const bool bf16 = mode == 0, acc = mode == 2;
        SCOPED_TRACE(testing::Message() << Name(t) << " batch " << batch << " mode " << mode);
        const size_t elem = bf16 ? 2 : 4;
        std::vector<uint8_t> init(y_bytes, kPoison);
        if (acc) {
          for (size_t i = 0; i < static_cast<size_t>(batch) * p.rows; ++i) {
            const float v = 0.25f * static_cast<float>(i % 7);
            std::memcpy(init.data() + i * 4, &v, 4);
          }
        }
        ASSERT_CUDA(cudaMemcpy(yb.get(), init.data(), y_bytes, cudaMemcpyHostToDevice));
        ASSERT_OK(LaunchGemvQuantBatch(p.View(), xd.as<const __nv_bfloat16>(), batch, yb.get(), bf16, acc,
                                       stream_.get()));
        std::vector<uint8_t> got(y_bytes);
        ASSERT_CUDA(cudaStreamSynchronize(stream_.get()));
        ASSERT_CUDA(cudaMemcpy(got.data(), yb.get(), y_bytes, cudaMemcpyDeviceToHost));
        for (int r = 0; r < batch; ++r) {
          ASSERT_CUDA(cudaMemcpy(y1.get(), init.data() + static_cast<size_t>(r) * p.rows * elem, p.rows * elem,
                                 cudaMemcpyHostToDevice));
          ASSERT_OK(LaunchGemvQuant(p.View(), xd.as<const __nv_bfloat16>() + static_cast<int64_t>(r) * p.cols,
                                    y1.get(), bf16, acc, stream_.get()));
          std::vector<uint8_t> alone(p.rows * elem);
          ASSERT_CUDA(cudaStreamSynchronize(stream_.get()));
          ASSERT_CUDA(cudaMemcpy(alone.data(), y1.get(), alone.size(), cudaMemcpyDeviceToHost));
          ASSERT_EQ(std::memcmp(alone.data(), got.data() + static_cast<size_t>(r) * p.rows * elem, alone.size()), 0)
              << "row " << r << " of the batch differs from it alone";
        }
        for (size_t i = static_cast<size_t>(batch) * p.rows * elem; i < y_bytes; ++i) {
          ASSERT_EQ(got[i], init[i]) << "byte " << i << " past the batch was written";
        }
      }
    }
  }
}

// kPipelined runs the same operations in the same order as kSimple, so its
// outputs are the same bits: blocks a row of 17 (the tail loop only), 128
// (exactly one pipelined step a lane), 130 (one step, then a tail for two
// lanes) and 448 (three steps and a tail), odd row counts, batches of 1, 3
// and 8 (11: two passes), every output mode; bytes past the outputs keep
// their poison.
TEST_F(GemvQuantTest, PipelinedKernelIsBitIdenticalToSimple) {
  uint64_t seed = 500;
  for (GgmlType t : kTypes) {
    for (auto [rows, cols] : {std::pair<int, int>{75, 544}, {37, 4096}, {9, 4160}, {5, 14336}}) {
      Problem p;
      Make(t, rows, cols, ++seed, &p);
      if (HasFatalFailure()) return;
      Rng rng(seed);
      for (int batch : {1, 3, 8, 11}) {
        std::vector<uint16_t> xs(static_cast<size_t>(batch) * p.cols);
        for (auto& v : xs) v = Bf16Bits(rng.Uniform(-1.0f, 1.0f));
        DeviceBuffer xd;
        Upload(xs.data(), xs.size() * 2, &xd);
        const size_t y_bytes = (static_cast<size_t>(batch) * p.rows + kGuard) * sizeof(float);
        for (int mode = 0; mode < 3; ++mode) {
          const bool bf16 = mode == 0, acc = mode == 2;
          SCOPED_TRACE(testing::Message() << Name(t) << " " << rows << " x " << cols << " batch " << batch
                                          << " mode " << mode);
          std::vector<uint8_t> init(y_bytes, kPoison);
          if (acc) {
            for (size_t i = 0; i < static_cast<size_t>(batch) * p.rows; ++i) {
              const float v = 0.5f * static_cast<float>(i % 5) - 1.0f;
              std::memcpy(init.data() + i * 4, &v, 4);
            }
          }
          std::vector<uint8_t> out[2];
          for (int k = 0; k < 2; ++k) {
            auto y = DeviceBuffer::Allocate(y_bytes);
            ASSERT_TRUE(y.ok());
            ASSERT_CUDA(cudaMemcpy(y->get(), init.data(), y_bytes, cudaMemcpyHostToDevice));
            ASSERT_OK(LaunchGemvQuantBatch(p.View(), xd.as<const __nv_bfloat16>(), batch, y->get(), bf16, acc,
                                           stream_.get(),
                                           k == 0 ? GemvQuantKernelKind::kSimple : GemvQuantKernelKind::kPipelined));
            out[k].resize(y_bytes);
            ASSERT_CUDA(cudaStreamSynchronize(stream_.get()));
            ASSERT_CUDA(cudaMemcpy(out[k].data(), y->get(), y_bytes, cudaMemcpyDeviceToHost));
          }
          const size_t used = static_cast<size_t>(batch) * p.rows * (bf16 ? 2 : 4);
          ASSERT_EQ(std::memcmp(out[0].data(), out[1].data(), used), 0);
          for (size_t i = used; i < y_bytes; ++i) ASSERT_EQ(out[1][i], init[i]) << "byte " << i;
        }
      }
    }
  }
}

TEST_F(GemvQuantTest, DequantizedRowsAreTheBf16OfGgufsValues) {
  uint64_t seed = 200;
  for (GgmlType t : kTypes) {
    Problem p;
    Make(t, 45, 544, ++seed, &p);
    if (HasFatalFailure()) return;
    const int first = 7, count = 33;
    const size_t n = static_cast<size_t>(count) * p.cols;
    auto out = DeviceBuffer::Allocate((n + kGuard) * 2);
    ASSERT_TRUE(out.ok());
    ASSERT_CUDA(cudaMemset(out->get(), kPoison, (n + kGuard) * 2));
    ASSERT_OK(LaunchDequantizeRows(p.View(), first, count, out->as<__nv_bfloat16>(), stream_.get()));
    ASSERT_CUDA(cudaStreamSynchronize(stream_.get()));
    std::vector<uint16_t> got(n + kGuard);
    ASSERT_CUDA(cudaMemcpy(got.data(), out->get(), got.size() * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) {
      const uint16_t want = Bf16Bits(p.value[static_cast<size_t>(first) * p.cols + i]);
      ASSERT_EQ(got[i], want) << Name(t) << " value " << i;
    }
    for (size_t i = n; i < got.size(); ++i) ASSERT_EQ(got[i], 0xFFFF) << "guard " << i - n;
  }
}

}  // namespace
}  // namespace tailorkv::cuda
