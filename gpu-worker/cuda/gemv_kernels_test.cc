// LaunchGemvBf16 against a double-precision CPU reference on the same bf16
// inputs:
// - odd and edge shapes (out 1, 7, 37, 1001; in 8, 24, 4096, 4136 — a chunk
//   count that leaves a remainder after the unrolled steps — and 14336);
// - every output mode: bf16, f32, f32 accumulated onto a known random y;
// - every GemvConfig the kernel supports (each template instantiation);
// - outputs poisoned with NaN bytes, and a poisoned guard past y[out - 1]
//   that must stay untouched;
// - determinism (two launches are bit-identical), graph capture and replay
//   (with x changed between replays, and accumulation across replays);
// - bad arguments name the field (no device needed).
//
// Tolerances. Products of two bf16 values are exact in float32 (8-bit
// significands), so the kernel's only errors are the float32 additions and,
// for bf16 outputs, the final rounding. Each lane adds at most in/32 = 448
// products in sequence before a 5-level shuffle tree: the rounding errors
// behave as a random walk of ~sqrt(448) * 2^-24 ~ 1.3e-6 of sum |w x|, so
//   f32:  |got - ref| <= 1e-5 * sum_k |w[k] x[k]|  (+ 2^-23 |ref| for the
//         final add onto y when accumulating)
// has ~8x margin, while a dropped or doubled 16-byte chunk moves y by ~8/in
// of sum |w x| (>= 5e-4 here), 50x the bound.
//   bf16: |got - ref| <= 2^-8 * |ref| (half an ulp: round to nearest) plus
//         the f32 bound (an f32 error can move the value across a rounding
//         boundary).
#include "cuda/gemv_kernels.cuh"

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

namespace tailorkv::cuda {
namespace {

using test_util::Bf16Bits;
using test_util::Bf16Value;
using test_util::Rng;

#define ASSERT_OK(expr)                                      \
  do {                                                       \
    const ::absl::Status tkv_status_ = (expr);               \
    ASSERT_TRUE(tkv_status_.ok()) << tkv_status_.ToString(); \
  } while (0)
#define ASSERT_CUDA(expr) ASSERT_OK(CudaStatus((expr), #expr))

constexpr int kGuard = 16;            // poisoned elements past y[out - 1]
constexpr uint8_t kPoisonByte = 0xFF;  // NaN in bf16 and f32
constexpr double kF32Rel = 1e-5;
constexpr double kBf16HalfUlp = 1.0 / 256;

enum class Mode { kBf16, kF32, kF32Accumulate };

const char* ModeName(Mode m) {
  return m == Mode::kBf16 ? "bf16" : (m == Mode::kF32 ? "f32" : "f32+=");
}

std::vector<uint16_t> RandomBf16(size_t n, Rng& rng) {
  std::vector<uint16_t> v(n);
  for (auto& b : v) b = Bf16Bits(rng.Uniform(-1.0f, 1.0f));
  return v;
}

// Host copies of one problem and its double-precision reference.
struct Problem {
  int out = 0, in = 0;
  std::vector<uint16_t> w, x;
  std::vector<float> y0;           // accumulate: the known starting y
  std::vector<double> ref, abs_sum;  // sum w x, sum |w x| per row

  Problem(int out_, int in_, uint64_t seed) : out(out_), in(in_) {
    Rng rng(seed);
    w = RandomBf16(static_cast<size_t>(out) * in, rng);
    x = RandomBf16(in, rng);
    y0.resize(out);
    for (auto& v : y0) v = rng.Uniform(-4.0f, 4.0f);
    Recompute();
  }
  void Recompute() {
    ref.assign(out, 0.0);
    abs_sum.assign(out, 0.0);
    for (int r = 0; r < out; ++r) {
      for (int k = 0; k < in; ++k) {
        const double p = static_cast<double>(Bf16Value(w[static_cast<size_t>(r) * in + k])) *
                         Bf16Value(x[k]);
        ref[r] += p;
        abs_sum[r] += std::fabs(p);
      }
    }
  }
};

// Device buffers for a Problem; y has kGuard poisoned elements past out.
struct DeviceProblem {
  DeviceBuffer w, x, y;
  const __nv_bfloat16* wp() const { return w.as<const __nv_bfloat16>(); }
  const __nv_bfloat16* xp() const { return x.as<const __nv_bfloat16>(); }
};

class GemvKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
    absl::StatusOr<CudaStream> s = CudaStream::Create();
    ASSERT_TRUE(s.ok()) << s.status();
    stream_ = std::move(*s);
  }
  cudaStream_t stream() const { return stream_.get(); }

  static size_t YBytes(const Problem& p, Mode m) {
    return (p.out + kGuard) * (m == Mode::kBf16 ? sizeof(uint16_t) : sizeof(float));
  }

  void Upload(const Problem& p, DeviceProblem& d) {
    absl::StatusOr<DeviceBuffer> w = DeviceBuffer::Allocate(p.w.size() * 2);
    absl::StatusOr<DeviceBuffer> x = DeviceBuffer::Allocate(p.x.size() * 2);
    absl::StatusOr<DeviceBuffer> y =
        DeviceBuffer::Allocate((p.out + kGuard) * sizeof(float));  // fits either type
    ASSERT_TRUE(w.ok() && x.ok() && y.ok());
    d.w = std::move(*w);
    d.x = std::move(*x);
    d.y = std::move(*y);
    ASSERT_CUDA(cudaMemcpy(d.w.get(), p.w.data(), p.w.size() * 2, cudaMemcpyHostToDevice));
    ASSERT_CUDA(cudaMemcpy(d.x.get(), p.x.data(), p.x.size() * 2, cudaMemcpyHostToDevice));
  }

  // y = poison (plus y0 in [0, out) when accumulating).
  void ResetY(const Problem& p, Mode m, DeviceProblem& d) {
    std::vector<uint8_t> bytes(YBytes(p, m), kPoisonByte);
    if (m == Mode::kF32Accumulate) std::memcpy(bytes.data(), p.y0.data(), p.out * sizeof(float));
    ASSERT_CUDA(cudaMemcpy(d.y.get(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
  }

  std::vector<uint8_t> DownloadY(const Problem& p, Mode m, const DeviceProblem& d) {
    std::vector<uint8_t> bytes(YBytes(p, m));
    EXPECT_EQ(cudaStreamSynchronize(stream()), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(bytes.data(), d.y.get(), bytes.size(), cudaMemcpyDeviceToHost),
              cudaSuccess);
    return bytes;
  }

  // Checks y against ref (+ repeats * ref onto y0 when accumulating) and the
  // guard against the poison; `what` names the case in failures.
  void Check(const Problem& p, Mode m, const std::vector<uint8_t>& bytes, const std::string& what,
             int repeats = 1) {
    const size_t elem = m == Mode::kBf16 ? 2 : 4;
    double sum_abs_got = 0;
    int bad = 0;
    for (int r = 0; r < p.out && bad < 5; ++r) {
      double got;
      if (m == Mode::kBf16) {
        uint16_t b;
        std::memcpy(&b, bytes.data() + r * elem, 2);
        got = Bf16Value(b);
      } else {
        float f;
        std::memcpy(&f, bytes.data() + r * elem, 4);
        got = f;
      }
      double want = repeats * p.ref[r];
      double tol = kF32Rel * repeats * p.abs_sum[r];
      if (m == Mode::kF32Accumulate) {
        want += p.y0[r];
        tol += repeats * std::ldexp(std::fabs(want) + std::fabs(p.y0[r]), -23);
      }
      if (m == Mode::kBf16) tol += kBf16HalfUlp * (std::fabs(want) + tol);
      sum_abs_got += std::fabs(got);
      if (!(std::fabs(got - want) <= tol)) {  // also catches NaN (poison left)
        ADD_FAILURE() << what << " " << ModeName(m) << ": y[" << r << "] = " << got << ", want "
                      << want << " +- " << tol;
        ++bad;
      }
    }
    EXPECT_GT(sum_abs_got, 0.0) << what << ": all zeros";
    for (size_t i = p.out * elem; i < bytes.size(); ++i) {
      if (bytes[i] != kPoisonByte) {
        ADD_FAILURE() << what << " " << ModeName(m) << ": wrote past y[out - 1] (byte "
                      << i - p.out * elem << " of the guard)";
        break;
      }
    }
  }

  absl::Status Launch(const Problem& p, Mode m, const DeviceProblem& d,
                      const GemvConfig* config = nullptr) {
    const bool bf16 = m == Mode::kBf16, acc = m == Mode::kF32Accumulate;
    return config ? LaunchGemvBf16With(*config, d.wp(), d.xp(), p.out, p.in, d.y.get(), bf16, acc,
                                       stream())
                  : LaunchGemvBf16(d.wp(), d.xp(), p.out, p.in, d.y.get(), bf16, acc, stream());
  }

  CudaStream stream_;
};

TEST_F(GemvKernelsTest, MatchesReferenceOnOddAndModelShapes) {
  const int shapes[][2] = {{1, 8},    {7, 8},      {7, 24},    {37, 4136}, {1001, 4096},
                           {7, 14336}, {130, 14336}, {300, 4104}};
  uint64_t seed = 1;
  for (const auto& s : shapes) {
    const Problem p(s[0], s[1], seed++);
    DeviceProblem d;
    Upload(p, d);
    for (Mode m : {Mode::kBf16, Mode::kF32, Mode::kF32Accumulate}) {
      ResetY(p, m, d);
      ASSERT_OK(Launch(p, m, d));
      Check(p, m, DownloadY(p, m, d),
            "out " + std::to_string(p.out) + " in " + std::to_string(p.in));
    }
  }
}

TEST_F(GemvKernelsTest, EveryConfigMatchesReference) {
  // 37 rows: partial groups and blocks for every rows/groups combination;
  // 4136 = 8 * 517 chunks: remainders after the unrolled steps for every
  // (warps per row, unroll).
  const Problem p(37, 4136, 99);
  DeviceProblem d;
  Upload(p, d);
  int configs = 0;
  for (int r : {1, 2, 4}) {
    for (int g : {1, 2, 4}) {
      for (int b : {1, 2, 4, 8, 16}) {
        if (b * g > 16) continue;
        for (int u : {2, 4, 8}) {
          if (r * u > 8) continue;
          for (bool e : {false, true}) {
            const GemvConfig c{r, g, b, u, e};
            for (Mode m : {Mode::kBf16, Mode::kF32, Mode::kF32Accumulate}) {
              ResetY(p, m, d);
              ASSERT_OK(Launch(p, m, d, &c));
              Check(p, m, DownloadY(p, m, d),
                    "config R" + std::to_string(r) + " G" + std::to_string(g) + " B" +
                        std::to_string(b) + " U" + std::to_string(u) + (e ? " E" : ""));
            }
            ++configs;
          }
        }
      }
    }
  }
  EXPECT_EQ(configs, 144);
}

TEST_F(GemvKernelsTest, RepeatedLaunchesAreBitIdentical) {
  const Problem p(513, 14336, 7);
  DeviceProblem d;
  Upload(p, d);
  for (Mode m : {Mode::kBf16, Mode::kF32}) {
    ResetY(p, m, d);
    ASSERT_OK(Launch(p, m, d));
    const std::vector<uint8_t> first = DownloadY(p, m, d);
    ResetY(p, m, d);
    ASSERT_OK(Launch(p, m, d));
    EXPECT_EQ(first, DownloadY(p, m, d)) << ModeName(m);
  }
}

TEST_F(GemvKernelsTest, GraphReplaysReadCurrentInputsAndAccumulate) {
  Problem p(1001, 4096, 11);
  DeviceProblem d;
  Upload(p, d);

  // y = W x captured once; x is rewritten between replays.
  ResetY(p, Mode::kF32, d);
  ASSERT_CUDA(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
  ASSERT_OK(Launch(p, Mode::kF32, d));
  absl::StatusOr<CudaGraphExec> graph = CudaGraphExec::EndCapture(stream());
  ASSERT_TRUE(graph.ok()) << graph.status();
  ASSERT_OK(graph->Launch(stream()));
  Check(p, Mode::kF32, DownloadY(p, Mode::kF32, d), "graph replay 1");
  Rng rng(12);
  p.x = RandomBf16(p.in, rng);
  p.Recompute();
  ASSERT_CUDA(cudaMemcpy(d.x.get(), p.x.data(), p.x.size() * 2, cudaMemcpyHostToDevice));
  ASSERT_OK(graph->Launch(stream()));
  Check(p, Mode::kF32, DownloadY(p, Mode::kF32, d), "graph replay with new x");

  // y += W x captured once, replayed 3 times: y0 + 3 W x.
  ResetY(p, Mode::kF32Accumulate, d);
  ASSERT_CUDA(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
  ASSERT_OK(Launch(p, Mode::kF32Accumulate, d));
  absl::StatusOr<CudaGraphExec> acc = CudaGraphExec::EndCapture(stream());
  ASSERT_TRUE(acc.ok()) << acc.status();
  for (int i = 0; i < 3; ++i) ASSERT_OK(acc->Launch(stream()));
  Check(p, Mode::kF32Accumulate, DownloadY(p, Mode::kF32Accumulate, d), "3 accumulating replays",
        3);
}

// LaunchGemvBatchBf16: each x row against the double reference (the same
// tolerances: its lanes add in/64 products in sequence), outputs and a
// guard past the last row poisoned, batches of 1..11 (11 = a pass of 8 and
// one of 3), and batch invariance: row b's output bits are the same whatever
// the batch it is in (alone, or at another position among other rows).
TEST_F(GemvKernelsTest, BatchedMatchesReferenceAndIsBatchInvariant) {
  const int shapes[][2] = {{1, 8}, {37, 4136}, {130, 14336}, {577, 576}};
  constexpr int kBatch = 11;
  uint64_t seed = 300;
  for (const auto& sh : shapes) {
    const int out = sh[0], in = sh[1];
    // Problem b: W shared, x row b; ref per row from Problem's reference.
    std::vector<Problem> rows;
    for (int b = 0; b < kBatch; ++b) {
      Problem p(out, in, seed);
      if (b > 0) {
        Rng rng(seed * 31 + b);
        p.x = RandomBf16(in, rng);
        p.w = rows[0].w;
        p.y0 = rows[0].y0;
        p.Recompute();
      }
      rows.push_back(std::move(p));
    }
    ++seed;
    std::vector<uint16_t> xs;
    for (const Problem& p : rows) xs.insert(xs.end(), p.x.begin(), p.x.end());
    absl::StatusOr<DeviceBuffer> w = DeviceBuffer::Allocate(rows[0].w.size() * 2);
    absl::StatusOr<DeviceBuffer> x = DeviceBuffer::Allocate(xs.size() * 2);
    const size_t y_elems = static_cast<size_t>(kBatch) * out + kGuard;
    absl::StatusOr<DeviceBuffer> y = DeviceBuffer::Allocate(y_elems * sizeof(float));
    ASSERT_TRUE(w.ok() && x.ok() && y.ok());
    ASSERT_CUDA(cudaMemcpy(w->get(), rows[0].w.data(), rows[0].w.size() * 2, cudaMemcpyHostToDevice));
    ASSERT_CUDA(cudaMemcpy(x->get(), xs.data(), xs.size() * 2, cudaMemcpyHostToDevice));
    const auto* wp = w->as<const __nv_bfloat16>();
    const auto* xp = x->as<const __nv_bfloat16>();
    for (Mode m : {Mode::kBf16, Mode::kF32, Mode::kF32Accumulate}) {
      const size_t elem = m == Mode::kBf16 ? 2 : 4;
      const bool bf16 = m == Mode::kBf16, acc = m == Mode::kF32Accumulate;
      // Runs rows [first, first + n) as one batch; returns each row's bytes.
      auto run = [&](int first, int n) {
        std::vector<uint8_t> bytes(y_elems * elem, kPoisonByte);
        for (int b = 0; b < n && acc; ++b) {
          std::memcpy(bytes.data() + static_cast<size_t>(b) * out * elem, rows[first + b].y0.data(),
                      out * elem);
        }
        EXPECT_EQ(cudaMemcpy(y->get(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice), cudaSuccess);
        EXPECT_TRUE(LaunchGemvBatchBf16(wp, xp + static_cast<size_t>(first) * in, n, out, in,
                                        y->get(), bf16, acc, stream()).ok());
        EXPECT_EQ(cudaStreamSynchronize(stream()), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(bytes.data(), y->get(), bytes.size(), cudaMemcpyDeviceToHost), cudaSuccess);
        for (size_t i = static_cast<size_t>(n) * out * elem; i < bytes.size(); ++i) {
          if (bytes[i] != kPoisonByte) {
            ADD_FAILURE() << "batch " << n << " " << ModeName(m) << ": wrote past its last row";
            break;
          }
        }
        std::vector<std::vector<uint8_t>> per_row;
        for (int b = 0; b < n; ++b) {
          const auto* at = bytes.data() + static_cast<size_t>(b) * out * elem;
          per_row.emplace_back(at, at + out * elem);
        }
        return per_row;
      };
      const std::vector<std::vector<uint8_t>> all = run(0, kBatch);
      const std::string what = "batched out " + std::to_string(out) + " in " + std::to_string(in);
      for (int b = 0; b < kBatch; ++b) {
        std::vector<uint8_t> padded = all[b];
        padded.resize(padded.size() + kGuard * elem, kPoisonByte);
        Check(rows[b], m, padded, what + " row " + std::to_string(b));
      }
      for (int b = 0; b < kBatch; ++b) {
        EXPECT_EQ(run(b, 1)[0], all[b]) << what << " " << ModeName(m) << ": row " << b
                                        << " alone differs from the batch of " << kBatch;
      }
      const std::vector<std::vector<uint8_t>> mid = run(3, 5);  // rows 3..7 as a batch of 5
      for (int b = 0; b < 5; ++b) {
        EXPECT_EQ(mid[b], all[3 + b]) << what << " " << ModeName(m) << ": row " << 3 + b
                                      << " in a batch of 5 differs";
      }
    }
  }
}

// Validation runs before any CUDA call: no device needed. The pointers are
// never dereferenced.
TEST(GemvKernelsArgs, BadArgumentsNameTheField) {
  alignas(16) static uint8_t storage[64];
  const auto* w = reinterpret_cast<const __nv_bfloat16*>(storage);
  const auto* x = reinterpret_cast<const __nv_bfloat16*>(storage + 16);
  void* y = storage + 32;
  auto expect = [](const absl::Status& s, const std::string& field) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field << ": " << s;
    EXPECT_NE(std::string(s.message()).find(field), std::string::npos) << s;
  };
  expect(LaunchGemvBf16(nullptr, x, 4, 8, y, false, false, nullptr), "w");
  expect(LaunchGemvBf16(w, nullptr, 4, 8, y, false, false, nullptr), "x");
  expect(LaunchGemvBf16(w, x, 4, 8, nullptr, false, false, nullptr), "y");
  expect(LaunchGemvBf16(w, x, 0, 8, y, false, false, nullptr), "out");
  expect(LaunchGemvBf16(w, x, -3, 8, y, false, false, nullptr), "out");
  expect(LaunchGemvBf16(w, x, 4, 0, y, false, false, nullptr), "in");
  expect(LaunchGemvBf16(w, x, 4, 12, y, false, false, nullptr), "in");
  expect(LaunchGemvBf16(w, x, 4, -8, y, false, false, nullptr), "in");
  expect(LaunchGemvBf16(w + 1, x, 4, 8, y, false, false, nullptr), "w");
  expect(LaunchGemvBf16(w, x + 4, 4, 8, y, false, false, nullptr), "x");
  expect(LaunchGemvBf16(w, x, 4, 8, storage + 34, false, false, nullptr), "y");  // f32 at +2
  expect(LaunchGemvBf16(w, x, 4, 8, storage + 33, true, false, nullptr), "y");   // bf16 at +1
  expect(LaunchGemvBf16(w, x, 4, 8, y, true, true, nullptr), "accumulate");

  auto with = [&](GemvConfig c) {
    return LaunchGemvBf16With(c, w, x, 4, 8, y, false, false, nullptr);
  };
  expect(with(GemvConfig{3, 1, 4, 4, false}), "rows_per_group");
  expect(with(GemvConfig{1, 3, 4, 4, false}), "warps_per_row");
  expect(with(GemvConfig{1, 1, 4, 16, false}), "unroll");
  expect(with(GemvConfig{4, 1, 4, 4, false}), "unroll");  // 4 rows x 4 would spill
  expect(with(GemvConfig{1, 1, 0, 4, false}), "groups_per_block");
  expect(with(GemvConfig{1, 4, 8, 4, false}), "groups_per_block");  // 32 warps

  expect(LaunchGemvBatchBf16(w, x, 0, 4, 8, y, false, false, nullptr), "batch");
  expect(LaunchGemvBatchBf16(w, x, 2, 4, 12, y, false, false, nullptr), "in");
  expect(LaunchGemvBatchBf16(w, nullptr, 2, 4, 8, y, false, false, nullptr), "x");
  expect(LaunchGemvBatchBf16(w, x, 2, 4, 8, y, true, true, nullptr), "accumulate");
}

}  // namespace
}  // namespace tailorkv::cuda
