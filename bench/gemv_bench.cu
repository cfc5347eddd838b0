// Batch-1 GEMV (the decode step's projections) at the Llama-3.1-8B shapes:
// LaunchGemvBf16 against cublasGemmEx(n = 1) as cuda_backend.cc calls it, in
// the same run, interleaved rep by rep so that both see the same clocks.
// Reports GB/s of weight bytes and the fraction of 3.0 TB/s (the H100's
// device-to-device copy). Prints a table and writes JSON to --out.
//
// Method (design/PERF.md): random bf16 data (never zeros), warm-up, CUDA
// events, median of many runs. Each timing is a CUDA graph of kLaunches
// launches, as a decode step runs them, cycling over several weight copies
// totalling more than 256 MB so that no copy is still in the 50 MB L2 when
// it is read again; the time per launch is the graph's time / kLaunches.
// After timing, one launch of each on the same inputs is compared (max
// difference relative to the largest |y|) as a sanity check.
//
// --sweep also times every GemvConfig on every shape (fewer reps) and lists
// the fastest, to choose DefaultGemvConfig.
//
//   tkv_gemv_bench [--out FILE] [--reps N] [--sweep]
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "bench_common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/gemv_kernels.cuh"
#include "cuda/gemv_quant_kernels.cuh"

namespace tailorkv::cuda {
namespace {

using bf16 = __nv_bfloat16;
using bench::kHbmPeakBytesPerSec;
using bench::kRotateBytes;

constexpr int kLaunches = 32;     // per graph: one per layer of the model
constexpr int kSweepLaunches = 16;
constexpr int kSweepReps = 5;
constexpr int kMaxCopies = 16;
constexpr size_t kCublasWorkspaceBytes = 32u << 20;  // as cuda_backend.cc

struct Shape {
  const char* name;
  int out;
  int in;
  bool y_bf16;
  bool accumulate;
};

// Llama-3.1-8B: hidden 4096, 32 + 2 * 8 heads of 128, ffn 14336, vocab 128256.
constexpr Shape kShapes[] = {
    {"qkv", 6144, 4096, true, false},         {"o", 4096, 4096, false, true},
    {"gate_up", 28672, 4096, true, false},    {"down", 4096, 14336, false, true},
    {"head", 128256, 4096, false, false},
};

// p[i] = scale * uniform in [-1, 1), a hash of (seed, i).
__global__ void FillRandomBf16Kernel(bf16* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    p[i] = __float2bfloat16(
        scale * (static_cast<float>(bench::Hash(seed, i) >> 40) * (2.0f / 16777216.0f) - 1.0f));
  }
}

DeviceBuffer Allocate(size_t bytes) {
  absl::StatusOr<DeviceBuffer> buf = DeviceBuffer::Allocate(bytes);
  BENCH_CHECK_OK(buf.status());
  return std::move(*buf);
}

DeviceBuffer RandomBf16(size_t count, uint64_t seed, float scale) {
  DeviceBuffer buf = Allocate(count * sizeof(bf16));
  FillRandomBf16Kernel<<<1024, 256>>>(buf.as<bf16>(), count, seed, scale);
  BENCH_CHECK_CUDA(cudaGetLastError());
  return buf;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// The weights, inputs and output of one shape, with `copies` W/x pairs.
struct Operands {
  Shape shape;
  std::vector<DeviceBuffer> w, x;
  DeviceBuffer y;
  size_t w_bytes = 0;

  explicit Operands(const Shape& s) : shape(s) {
    w_bytes = static_cast<size_t>(s.out) * s.in * sizeof(bf16);
    const int copies =
        static_cast<int>(std::clamp<size_t>((kRotateBytes + w_bytes - 1) / w_bytes, 2, kMaxCopies));
    // Weights ~ 1/sqrt(in) as in a trained model, so y stays O(1).
    const float w_scale = 1.0f / std::sqrt(static_cast<float>(s.in));
    for (int i = 0; i < copies; ++i) {
      w.push_back(RandomBf16(static_cast<size_t>(s.out) * s.in, 2 * i + 1, w_scale));
      x.push_back(RandomBf16(s.in, 2 * i + 2, 1.0f));
    }
    y = Allocate(static_cast<size_t>(s.out) * (s.y_bf16 ? sizeof(bf16) : sizeof(float)));
    BENCH_CHECK_CUDA(cudaMemset(y.get(), 0, y.size()));
    BENCH_CHECK_CUDA(cudaDeviceSynchronize());
  }
  int copies() const { return static_cast<int>(w.size()); }
};

// One GEMV on the stream (cuBLAS: the handle's stream, set once).
using LaunchFn =
    std::function<absl::Status(const bf16* w, const bf16* x, void* y, cudaStream_t stream)>;

// config null: LaunchGemvBf16 with its own choice.
LaunchFn Ours(const Shape& s, const GemvConfig* config) {
  return [s, config](const bf16* w, const bf16* x, void* y, cudaStream_t stream) {
    return config ? LaunchGemvBf16With(*config, w, x, s.out, s.in, y, s.y_bf16, s.accumulate,
                                       stream)
                  : LaunchGemvBf16(w, x, s.out, s.in, y, s.y_bf16, s.accumulate, stream);
  };
}

LaunchFn Cublas(const Shape& s, cublasHandle_t handle) {
  return [s, handle](const bf16* w, const bf16* x, void* y, cudaStream_t) {
    // As CudaBackend::GemmEx: column-major y (out x 1) = W^T (in x out, OP_T) * x (in x 1).
    const float alpha = 1.0f;
    const float beta = s.accumulate ? 1.0f : 0.0f;
    CUBLAS_RETURN_IF_ERROR(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, s.out, 1, s.in, &alpha,
                                        w, CUDA_R_16BF, s.in, x, CUDA_R_16BF, s.in, &beta, y,
                                        s.y_bf16 ? CUDA_R_16BF : CUDA_R_32F, s.out,
                                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return absl::OkStatus();
  };
}

// A graph of `launches` launches cycling over the copies.
CudaGraphExec Capture(const Operands& op, const LaunchFn& fn, int launches, cudaStream_t stream) {
  // Once outside capture, so that errors surface with a clear message.
  BENCH_CHECK_OK(fn(op.w[0].as<bf16>(), op.x[0].as<bf16>(), op.y.get(), stream));
  BENCH_CHECK_CUDA(cudaStreamSynchronize(stream));
  BENCH_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < launches; ++i) {
    const int c = i % op.copies();
    BENCH_CHECK_OK(fn(op.w[c].as<bf16>(), op.x[c].as<bf16>(), op.y.get(), stream));
  }
  absl::StatusOr<CudaGraphExec> graph = CudaGraphExec::EndCapture(stream);
  BENCH_CHECK_OK(graph.status());
  return std::move(*graph);
}

struct Timer {
  CudaEvent start, stop;
  Timer() {
    absl::StatusOr<CudaEvent> a = CudaEvent::Create(true), b = CudaEvent::Create(true);
    BENCH_CHECK_OK(a.status());
    BENCH_CHECK_OK(b.status());
    start = std::move(*a);
    stop = std::move(*b);
  }
  // Microseconds per launch of one replay of `graph`.
  double Time(const CudaGraphExec& graph, int launches, cudaStream_t stream) {
    BENCH_CHECK_CUDA(cudaEventRecord(start.get(), stream));
    BENCH_CHECK_OK(graph.Launch(stream));
    BENCH_CHECK_CUDA(cudaEventRecord(stop.get(), stream));
    BENCH_CHECK_CUDA(cudaEventSynchronize(stop.get()));
    float ms = 0;
    BENCH_CHECK_CUDA(cudaEventElapsedTime(&ms, start.get(), stop.get()));
    return 1e3 * ms / launches;
  }
};

// y as float from a fresh launch on copy 0 (accumulate: onto y = 0).
std::vector<float> Result(const Operands& op, const LaunchFn& fn, cudaStream_t stream) {
  BENCH_CHECK_CUDA(cudaMemsetAsync(op.y.get(), 0, op.y.size(), stream));
  BENCH_CHECK_OK(fn(op.w[0].as<bf16>(), op.x[0].as<bf16>(), op.y.get(), stream));
  std::vector<float> y(op.shape.out);
  if (op.shape.y_bf16) {
    std::vector<bf16> b(op.shape.out);
    BENCH_CHECK_CUDA(cudaMemcpyAsync(b.data(), op.y.get(), op.y.size(), cudaMemcpyDeviceToHost,
                                     stream));
    BENCH_CHECK_CUDA(cudaStreamSynchronize(stream));
    for (int i = 0; i < op.shape.out; ++i) y[i] = __bfloat162float(b[i]);
  } else {
    BENCH_CHECK_CUDA(cudaMemcpyAsync(y.data(), op.y.get(), op.y.size(), cudaMemcpyDeviceToHost,
                                     stream));
    BENCH_CHECK_CUDA(cudaStreamSynchronize(stream));
  }
  return y;
}

struct Row {
  Shape shape;
  size_t w_bytes = 0;
  int copies = 0;
  double ours_us = 0, cublas_us = 0;
  double max_rel_diff = 0;
  GemvConfig config;
};

struct SweepRow {
  std::string shape;
  GemvConfig config;
  double us = 0;
  size_t w_bytes = 0;
};

std::string ConfigName(const GemvConfig& c) {
  return "R" + std::to_string(c.rows_per_group) + "G" + std::to_string(c.warps_per_row) + "B" +
         std::to_string(c.groups_per_block) + "U" + std::to_string(c.unroll) +
         (c.evict_first ? "E" : "");
}

std::vector<GemvConfig> AllConfigs() {
  std::vector<GemvConfig> all;
  for (int r : {1, 2, 4}) {
    for (int g : {1, 2, 4}) {
      for (int b : {1, 2, 4, 8, 16}) {
        if (b * g > 16 || b * g < 2) continue;
        for (int u : {2, 4, 8}) {
          if (r * u > 8) continue;
          for (bool e : {false, true}) all.push_back(GemvConfig{r, g, b, u, e});
        }
      }
    }
  }
  return all;
}

double GBps(size_t bytes, double us) { return bytes / (us * 1e-6) / 1e9; }

// The weight-only quantized GEMV (issue 19) on the same shapes: LaunchGemvQuant
// over Q4_0 / Q8_0 planes (random, LaunchFillRandomQuantPlanes), timed as
// above (graphs of kLaunches launches over copies totalling > 256 MB). Its
// bytes are the planes' (quants + fp16 scales): the floor it is held to.
struct QuantRow {
  std::string shape, type, kernel;
  size_t bytes = 0;
  double us = 0, bf16_us = 0;
};

QuantRow TimeQuant(const Shape& s, model::GgmlType type, GemvQuantKernelKind kind, double bf16_us, int reps,
                   Timer& timer, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(s.out) * (s.in / 32);
  const size_t qs_bytes = blocks * (type == model::GgmlType::kQ8_0 ? 32 : 16), d_bytes = blocks * 2;
  const size_t bytes = qs_bytes + d_bytes;
  const int copies = static_cast<int>(std::clamp<size_t>((kRotateBytes + bytes - 1) / bytes, 2, kMaxCopies));
  std::vector<DeviceBuffer> qs, d, x;
  for (int i = 0; i < copies; ++i) {
    qs.push_back(Allocate(qs_bytes));
    d.push_back(Allocate(d_bytes));
    BENCH_CHECK_OK(LaunchFillRandomQuantPlanes(type, qs.back().as<uint8_t>(), d.back().as<__half>(), nullptr, s.out,
                                               s.in, 100 + i, 0.01f, stream));
    x.push_back(RandomBf16(s.in, 200 + i, 1.0f));
  }
  DeviceBuffer y = Allocate(static_cast<size_t>(s.out) * sizeof(float));
  BENCH_CHECK_CUDA(cudaMemsetAsync(y.get(), 0, y.size(), stream));
  auto launch = [&](int c) {
    const QuantMatrixView v{type, s.out, s.in, qs[c].as<const uint8_t>(), d[c].as<const __half>(), nullptr};
    return LaunchGemvQuant(v, x[c].as<bf16>(), y.get(), s.y_bf16, s.accumulate, stream, kind);
  };
  BENCH_CHECK_OK(launch(0));
  BENCH_CHECK_CUDA(cudaStreamSynchronize(stream));
  BENCH_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kLaunches; ++i) BENCH_CHECK_OK(launch(i % copies));
  absl::StatusOr<CudaGraphExec> graph = CudaGraphExec::EndCapture(stream);
  BENCH_CHECK_OK(graph.status());
  for (int i = 0; i < 2; ++i) timer.Time(*graph, kLaunches, stream);
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) t.push_back(timer.Time(*graph, kLaunches, stream));
  return QuantRow{s.name, type == model::GgmlType::kQ8_0 ? "q8_0" : "q4_0",
                  kind == GemvQuantKernelKind::kPipelined ? "pipelined" : "simple", bytes, Median(t), bf16_us};
}

int Main(int argc, char** argv) {
  std::string out_path = "gemv_bench.json";
  int reps = 30;
  bool sweep = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--out" && i + 1 < argc) {
      out_path = argv[++i];
    } else if (arg == "--reps" && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--sweep") {
      sweep = true;
    } else {
      std::fprintf(stderr, "usage: %s [--out FILE] [--reps N] [--sweep]\n", argv[0]);
      return 2;
    }
  }
  if (DeviceCount() == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  BENCH_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  absl::StatusOr<CudaStream> stream_or = CudaStream::Create();
  BENCH_CHECK_OK(stream_or.status());
  const cudaStream_t stream = stream_or->get();
  absl::StatusOr<CublasHandle> handle = CublasHandle::Create();
  BENCH_CHECK_OK(handle.status());
  DeviceBuffer workspace = Allocate(kCublasWorkspaceBytes);
  BENCH_CHECK_OK(CublasStatus(cublasSetStream(handle->get(), stream), "cublasSetStream"));
  BENCH_CHECK_OK(
      CublasStatus(cublasSetWorkspace(handle->get(), workspace.get(), kCublasWorkspaceBytes),
                   "cublasSetWorkspace"));
  Timer timer;

  std::vector<Row> rows;
  std::vector<SweepRow> sweep_rows;
  for (const Shape& s : kShapes) {
    Operands op(s);
    Row row;
    row.shape = s;
    row.w_bytes = op.w_bytes;
    row.copies = op.copies();
    row.config = DefaultGemvConfig(s.out, s.in);
    const LaunchFn ours = Ours(s, nullptr);
    const LaunchFn cublas = Cublas(s, handle->get());
    {
      const CudaGraphExec g_ours = Capture(op, ours, kLaunches, stream);
      const CudaGraphExec g_cublas = Capture(op, cublas, kLaunches, stream);
      for (int i = 0; i < 2; ++i) {  // warm-up
        timer.Time(g_ours, kLaunches, stream);
        timer.Time(g_cublas, kLaunches, stream);
      }
      std::vector<double> t_ours, t_cublas;
      for (int r = 0; r < reps; ++r) {
        // Alternate the order so neither always runs right after the other.
        if (r % 2 == 0) {
          t_ours.push_back(timer.Time(g_ours, kLaunches, stream));
          t_cublas.push_back(timer.Time(g_cublas, kLaunches, stream));
        } else {
          t_cublas.push_back(timer.Time(g_cublas, kLaunches, stream));
          t_ours.push_back(timer.Time(g_ours, kLaunches, stream));
        }
      }
      row.ours_us = Median(t_ours);
      row.cublas_us = Median(t_cublas);
    }
    const std::vector<float> a = Result(op, ours, stream);
    const std::vector<float> b = Result(op, cublas, stream);
    double max_diff = 0, max_ref = 0;
    for (int i = 0; i < s.out; ++i) {
      max_diff = std::max(max_diff, static_cast<double>(std::fabs(a[i] - b[i])));
      max_ref = std::max(max_ref, static_cast<double>(std::fabs(b[i])));
    }
    row.max_rel_diff = max_ref > 0 ? max_diff / max_ref : max_diff;
    std::printf("%-8s ours %8.2f us %7.1f GB/s | cublas %8.2f us %7.1f GB/s | diff %.2e\n", s.name,
                row.ours_us, GBps(row.w_bytes, row.ours_us), row.cublas_us,
                GBps(row.w_bytes, row.cublas_us), row.max_rel_diff);
    std::fflush(stdout);
    rows.push_back(row);

    if (sweep) {
      std::vector<SweepRow> mine;
      for (const GemvConfig& c : AllConfigs()) {
        const LaunchFn fn = Ours(s, &c);
        const CudaGraphExec g = Capture(op, fn, kSweepLaunches, stream);
        timer.Time(g, kSweepLaunches, stream);
        std::vector<double> t;
        for (int r = 0; r < kSweepReps; ++r) t.push_back(timer.Time(g, kSweepLaunches, stream));
        mine.push_back(SweepRow{s.name, c, Median(t), op.w_bytes});
      }
      std::sort(mine.begin(), mine.end(),
                [](const SweepRow& p, const SweepRow& q) { return p.us < q.us; });
      std::printf("  sweep %s best:", s.name);
      for (size_t i = 0; i < std::min<size_t>(6, mine.size()); ++i) {
        std::printf(" %s %.0f", ConfigName(mine[i].config).c_str(),
                    GBps(mine[i].w_bytes, mine[i].us));
      }
      std::printf(" | worst %s %.0f GB/s\n", ConfigName(mine.back().config).c_str(),
                  GBps(mine.back().w_bytes, mine.back().us));
      std::fflush(stdout);
      sweep_rows.insert(sweep_rows.end(), mine.begin(), mine.end());
    }
  }

  std::vector<QuantRow> quant_rows;
  for (const Row& r : rows) {
    for (model::GgmlType t : {model::GgmlType::kQ4_0, model::GgmlType::kQ8_0}) {
      for (GemvQuantKernelKind kind : {GemvQuantKernelKind::kSimple, GemvQuantKernelKind::kPipelined}) {
        quant_rows.push_back(TimeQuant(r.shape, t, kind, r.ours_us, reps, timer, stream));
        const QuantRow& q = quant_rows.back();
        std::printf("%-8s %s %-9s %8.2f us %7.1f GB/s (%.1f%% of 3 TB/s) | bf16 %8.2f us: %.2fx\n",
                    q.shape.c_str(), q.type.c_str(), q.kernel.c_str(), q.us, GBps(q.bytes, q.us),
                    100 * GBps(q.bytes, q.us) * 1e9 / kHbmPeakBytesPerSec, q.bf16_us, q.bf16_us / q.us);
        std::fflush(stdout);
      }
    }
  }

  std::printf("\ndevice: %s (%d SMs); %d launches per graph, median of %d\n", prop.name,
              prop.multiProcessorCount, kLaunches, reps);
  std::printf("%-8s %13s %8s %10s %9s %7s %10s %9s %7s %8s %10s\n", "shape", "out x in", "MB",
              "config", "ours_us", "GB/s", "of_3TB/s", "cublas_us", "GB/s", "of_3TB/s", "speedup");
  for (const Row& r : rows) {
    const double go = GBps(r.w_bytes, r.ours_us), gc = GBps(r.w_bytes, r.cublas_us);
    std::printf("%-8s %6d x %5d %8.1f %10s %9.2f %7.1f %9.1f%% %9.2f %7.1f %7.1f%% %9.2fx\n",
                r.shape.name, r.shape.out, r.shape.in, r.w_bytes / 1e6,
                ConfigName(r.config).c_str(), r.ours_us, go, 100 * go * 1e9 / kHbmPeakBytesPerSec,
                r.cublas_us, gc, 100 * gc * 1e9 / kHbmPeakBytesPerSec, r.cublas_us / r.ours_us);
  }

  FILE* f = std::fopen(out_path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "cannot write %s\n", out_path.c_str());
    return 1;
  }
  std::fprintf(f, "{\n  \"benchmark\": \"gemv\",\n  \"device\": \"%s\",\n  \"sms\": %d,\n",
               prop.name, prop.multiProcessorCount);
  std::fprintf(f,
               "  \"launches_per_graph\": %d,\n  \"reps\": %d,\n"
               "  \"hbm_reference_bytes_per_sec\": %.6g,\n  \"results\": [\n",
               kLaunches, reps, kHbmPeakBytesPerSec);
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    const double go = GBps(r.w_bytes, r.ours_us), gc = GBps(r.w_bytes, r.cublas_us);
    std::fprintf(f,
                 "    {\"shape\": \"%s\", \"out\": %d, \"in\": %d, \"y\": \"%s\", "
                 "\"weight_bytes\": %zu, \"copies\": %d, \"config\": \"%s\", "
                 "\"ours_us\": %.4f, \"ours_gb_per_s\": %.2f, \"ours_fraction\": %.4f, "
                 "\"cublas_us\": %.4f, \"cublas_gb_per_s\": %.2f, \"cublas_fraction\": %.4f, "
                 "\"max_rel_diff\": %.3g}%s\n",
                 r.shape.name, r.shape.out, r.shape.in,
                 r.shape.y_bf16 ? "bf16" : (r.shape.accumulate ? "f32+=" : "f32"), r.w_bytes,
                 r.copies, ConfigName(r.config).c_str(), r.ours_us, go,
                 go * 1e9 / kHbmPeakBytesPerSec, r.cublas_us, gc, gc * 1e9 / kHbmPeakBytesPerSec,
                 r.max_rel_diff, i + 1 < rows.size() ? "," : "");
  }
  std::fprintf(f, "  ],\n  \"quantized\": [\n");
  for (size_t i = 0; i < quant_rows.size(); ++i) {
    const QuantRow& q = quant_rows[i];
    std::fprintf(f,
                 "    {\"shape\": \"%s\", \"type\": \"%s\", \"kernel\": \"%s\", \"bytes\": %zu, \"us\": %.4f, "
                 "\"gb_per_s\": %.2f, \"fraction\": %.4f, \"bf16_ours_us\": %.4f, \"speedup_vs_bf16\": %.4f}%s\n",
                 q.shape.c_str(), q.type.c_str(), q.kernel.c_str(), q.bytes, q.us, GBps(q.bytes, q.us),
                 GBps(q.bytes, q.us) * 1e9 / kHbmPeakBytesPerSec, q.bf16_us, q.bf16_us / q.us,
                 i + 1 < quant_rows.size() ? "," : "");
  }
  std::fprintf(f, "  ],\n  \"sweep\": [\n");
  for (size_t i = 0; i < sweep_rows.size(); ++i) {
    const SweepRow& r = sweep_rows[i];
    std::fprintf(f,
                 "    {\"shape\": \"%s\", \"config\": \"%s\", \"us\": %.4f, "
                 "\"gb_per_s\": %.2f}%s\n",
                 r.shape.c_str(), ConfigName(r.config).c_str(), r.us, GBps(r.w_bytes, r.us),
                 i + 1 < sweep_rows.size() ? "," : "");
  }
  std::fprintf(f, "  ]\n}\n");
  std::fclose(f);
  std::printf("wrote %s\n", out_path.c_str());
  return 0;
}

}  // namespace
}  // namespace tailorkv::cuda

int main(int argc, char** argv) { return tailorkv::cuda::Main(argc, argv); }
