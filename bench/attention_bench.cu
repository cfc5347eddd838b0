// Attention kernels at the Llama-3.1-8B shape (32 query / 8 KV heads, head
// dim 128, bf16): decode attention per layer at 4k/32k/128k tokens of context
// (HBM-bound: reports GB/s of K+V read), and causal prefill attention at
// 4k/32k/128k (tensor-core bound: reports TFLOP/s) with each prefill kernel
// the device runs (mma.sync, wgmma with 3 and 2 K/V stages), interleaved per
// size so that they see the same clocks. Prints a table and writes JSON to --out.
//
// Method (see design/PERF.md): random bf16 data (never zeros), warm-up, CUDA
// events, median of many runs. Decode is timed as a CUDA graph of
// kDecodeLaunchesPerGraph launches cycling over several layers' caches
// totalling more than L2 (50 MB), as a decode step would run; the time per
// launch includes the split-combine kernel. Prefill is compute-bound and its
// K/V working set per head is meant to live in L2, so it reuses one buffer.
//
//   tkv_attention_bench [--out FILE] [--no-prefill-128k] [--reps N]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "bench_common.cuh"
#include "cuda/attention_kernels.cuh"
#include "cuda/cuda_check.h"

namespace tailorkv::cuda {
namespace {

using bf16 = __nv_bfloat16;

using bench::kHbmPeakBytesPerSec;
using bench::kHeadDim;
using bench::kHeads;
using bench::kKvHeads;
using bench::kRotateBytes;
constexpr int kDecodeLaunchesPerGraph = 32;  // one per layer of the model


// p[i] = uniform in [-1, 1), a hash of (seed, i): nonzero random data.
__global__ void FillRandomBf16Kernel(bf16* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    p[i] = __float2bfloat16(static_cast<float>(bench::Hash(seed, i) >> 40) * (2.0f / 16777216.0f) -
                            1.0f);
  }
}

DeviceBuffer RandomBf16(size_t count, uint64_t seed) {
  absl::StatusOr<DeviceBuffer> buf = DeviceBuffer::Allocate(count * sizeof(bf16));
  BENCH_CHECK_OK(buf.status());
  FillRandomBf16Kernel<<<1024, 256>>>(buf->as<bf16>(), count, seed);
  BENCH_CHECK_CUDA(cudaGetLastError());
  return std::move(*buf);
}

DeviceBuffer Allocate(size_t bytes) {
  absl::StatusOr<DeviceBuffer> buf = DeviceBuffer::Allocate(bytes);
  BENCH_CHECK_OK(buf.status());
  return std::move(*buf);
}

struct Stats {
  double median_us = 0;
  double min_us = 0;
  int runs = 0;
};

Stats Summarize(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  Stats s;
  s.runs = static_cast<int>(us.size());
  s.min_us = us.front();
  s.median_us = us.size() % 2 ? us[us.size() / 2] : 0.5 * (us[us.size() / 2 - 1] + us[us.size() / 2]);
  return s;
}

struct Row {
  std::string kind;  // "decode" or "prefill"
  std::string kernel;  // prefill: which kernel
  int context = 0;
  Stats stats;
  double bytes = 0;  // decode: K+V bytes read per launch
  double flops = 0;  // prefill: causal attention flops
};

Row BenchDecode(int context, int reps, cudaStream_t stream) {
  const AttentionShape shape{kHeads, kKvHeads, kHeadDim, context};
  const size_t cache_count = static_cast<size_t>(kKvHeads) * context * kHeadDim;
  const size_t layer_bytes = 2 * cache_count * sizeof(bf16);
  const int n_layers = static_cast<int>(
      std::clamp<size_t>((kRotateBytes + layer_bytes - 1) / layer_bytes, 1, kDecodeLaunchesPerGraph));

  std::vector<DeviceBuffer> k, v, q;
  for (int i = 0; i < n_layers; ++i) {
    k.push_back(RandomBf16(cache_count, 3 * i + 1));
    v.push_back(RandomBf16(cache_count, 3 * i + 2));
    q.push_back(RandomBf16(static_cast<size_t>(kHeads) * kHeadDim, 3 * i + 3));
  }
  DeviceBuffer out = Allocate(static_cast<size_t>(kHeads) * kHeadDim * sizeof(bf16));
  DeviceBuffer workspace = Allocate(std::max<size_t>(DecodeAttentionWorkspaceBytes(shape), 16));
  DeviceBuffer length = Allocate(sizeof(int32_t));
  const int32_t len = context;
  BENCH_CHECK_CUDA(cudaMemcpy(length.get(), &len, sizeof(len), cudaMemcpyHostToDevice));
  BENCH_CHECK_CUDA(cudaDeviceSynchronize());

  // Launch once outside capture so that errors surface with a clear message.
  BENCH_CHECK_OK(LaunchDecodeAttention(q[0].as<bf16>(), k[0].as<bf16>(), v[0].as<bf16>(),
                                       length.as<int32_t>(), shape, workspace.get(),
                                       out.as<bf16>(), stream));
  BENCH_CHECK_CUDA(cudaStreamSynchronize(stream));

  BENCH_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kDecodeLaunchesPerGraph; ++i) {
    const int l = i % n_layers;
    BENCH_CHECK_OK(LaunchDecodeAttention(q[l].as<bf16>(), k[l].as<bf16>(), v[l].as<bf16>(),
                                         length.as<int32_t>(), shape, workspace.get(),
                                         out.as<bf16>(), stream));
  }
  absl::StatusOr<CudaGraphExec> graph = CudaGraphExec::EndCapture(stream);
  BENCH_CHECK_OK(graph.status());

  absl::StatusOr<CudaEvent> start = CudaEvent::Create(true);
  absl::StatusOr<CudaEvent> stop = CudaEvent::Create(true);
  BENCH_CHECK_OK(start.status());
  BENCH_CHECK_OK(stop.status());
  for (int i = 0; i < 3; ++i) BENCH_CHECK_OK(graph->Launch(stream));
  std::vector<double> us;
  for (int r = 0; r < reps; ++r) {
    BENCH_CHECK_CUDA(cudaEventRecord(start->get(), stream));
    BENCH_CHECK_OK(graph->Launch(stream));
    BENCH_CHECK_CUDA(cudaEventRecord(stop->get(), stream));
    BENCH_CHECK_CUDA(cudaEventSynchronize(stop->get()));
    float ms = 0;
    BENCH_CHECK_CUDA(cudaEventElapsedTime(&ms, start->get(), stop->get()));
    us.push_back(1e3 * ms / kDecodeLaunchesPerGraph);
  }
  Row row;
  row.kind = "decode";
  row.context = context;
  row.stats = Summarize(us);
  row.bytes = static_cast<double>(layer_bytes);
  return row;
}

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

Row BenchPrefill(PrefillKernel kernel, int n, int reps, cudaStream_t stream) {
  const AttentionShape shape{kHeads, kKvHeads, kHeadDim, n};
  const size_t q_count = static_cast<size_t>(n) * kHeads * kHeadDim;
  const size_t cache_count = static_cast<size_t>(kKvHeads) * n * kHeadDim;
  DeviceBuffer q = RandomBf16(q_count, 11);
  DeviceBuffer k = RandomBf16(cache_count, 12);
  DeviceBuffer v = RandomBf16(cache_count, 13);
  DeviceBuffer out = Allocate(q_count * sizeof(bf16));
  BENCH_CHECK_CUDA(cudaDeviceSynchronize());

  absl::StatusOr<CudaEvent> start = CudaEvent::Create(true);
  absl::StatusOr<CudaEvent> stop = CudaEvent::Create(true);
  BENCH_CHECK_OK(start.status());
  BENCH_CHECK_OK(stop.status());
  auto launch = [&] {
    BENCH_CHECK_OK(LaunchPrefillAttentionWith(kernel, q.as<bf16>(), k.as<bf16>(), v.as<bf16>(), n,
                                              0, shape, out.as<bf16>(), stream));
  };
  for (int i = 0; i < 2; ++i) launch();
  BENCH_CHECK_CUDA(cudaStreamSynchronize(stream));
  std::vector<double> us;
  for (int r = 0; r < reps; ++r) {
    BENCH_CHECK_CUDA(cudaEventRecord(start->get(), stream));
    launch();
    BENCH_CHECK_CUDA(cudaEventRecord(stop->get(), stream));
    BENCH_CHECK_CUDA(cudaEventSynchronize(stop->get()));
    float ms = 0;
    BENCH_CHECK_CUDA(cudaEventElapsedTime(&ms, start->get(), stop->get()));
    us.push_back(1e3 * ms);
  }
  Row row;
  row.kind = "prefill";
  row.kernel = KernelName(kernel);
  row.context = n;
  row.stats = Summarize(us);
  // Causal: half of the n x n score matrix, QK^T and PV, 2 flops per MAC.
  row.flops = 2.0 * 2.0 * static_cast<double>(n) * n / 2.0 * kHeads * kHeadDim;
  return row;
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out;
}

int Main(int argc, char** argv) {
  std::string out_path = "attention_bench.json";
  bool prefill_128k = true;
  int reps = 0;  // 0: per-size defaults
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--out" && i + 1 < argc) {
      out_path = argv[++i];
    } else if (arg == "--no-prefill-128k") {
      prefill_128k = false;
    } else if (arg == "--reps" && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--out FILE] [--no-prefill-128k] [--reps N]\n", argv[0]);
      return 2;
    }
  }
  if (DeviceCount() == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  BENCH_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  absl::StatusOr<CudaStream> stream = CudaStream::Create();
  BENCH_CHECK_OK(stream.status());

  std::vector<Row> rows;
  for (int context : {4096, 32768, 131072}) {
    rows.push_back(BenchDecode(context, reps > 0 ? reps : 50, stream->get()));
  }
  std::vector<int> prefill_sizes = {4096, 32768};
  if (prefill_128k) prefill_sizes.push_back(131072);
  for (int n : prefill_sizes) {
    const int default_reps = n <= 4096 ? 30 : (n <= 32768 ? 10 : 3);
    for (PrefillKernel kernel :
         {PrefillKernel::kMmaSync, PrefillKernel::kWgmma, PrefillKernel::kWgmmaTwoStage}) {
      if (!PrefillKernelSupported(kernel, AttentionShape{kHeads, kKvHeads, kHeadDim, n})) continue;
      rows.push_back(BenchPrefill(kernel, n, reps > 0 ? reps : default_reps, stream->get()));
    }
  }

  std::printf("device: %s (%d SMs)\n", prop.name, prop.multiProcessorCount);
  std::printf("shape: %d query heads, %d KV heads, head_dim %d, bf16\n", kHeads, kKvHeads,
              kHeadDim);
  std::printf("%-8s %-7s %8s %12s %12s %6s %12s %10s\n", "kind", "kernel", "context",
              "median_us", "min_us", "runs", "GB/s|TFLOPs", "of_peak");
  for (const Row& r : rows) {
    if (r.kind == "decode") {
      const double bps = r.bytes / (r.stats.median_us * 1e-6);
      std::printf("%-8s %-7s %8d %12.2f %12.2f %6d %12.1f %9.1f%%\n", r.kind.c_str(), "-",
                  r.context,
                  r.stats.median_us, r.stats.min_us, r.stats.runs, bps / 1e9,
                  100.0 * bps / kHbmPeakBytesPerSec);
    } else {
      const double fps = r.flops / (r.stats.median_us * 1e-6);
      std::printf("%-8s %-7s %8d %12.2f %12.2f %6d %12.1f %10s\n", r.kind.c_str(),
                  r.kernel.c_str(), r.context,
                  r.stats.median_us, r.stats.min_us, r.stats.runs, fps / 1e12, "-");
    }
  }
  std::printf("decode GB/s counts K+V bytes per layer (8 KV heads x 128 x 2 x 2 B per token);"
              " of_peak is against %.1f TB/s.\n",
              kHbmPeakBytesPerSec / 1e12);

  FILE* f = std::fopen(out_path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "cannot write %s\n", out_path.c_str());
    return 1;
  }
  std::fprintf(f, "{\n  \"benchmark\": \"attention\",\n  \"device\": \"%s\",\n  \"sms\": %d,\n",
               JsonEscape(prop.name).c_str(), prop.multiProcessorCount);
  std::fprintf(f,
               "  \"shape\": {\"n_heads\": %d, \"n_kv_heads\": %d, \"head_dim\": %d, "
               "\"dtype\": \"bf16\"},\n",
               kHeads, kKvHeads, kHeadDim);
  std::fprintf(f, "  \"hbm_reference_bytes_per_sec\": %.6g,\n  \"results\": [\n",
               kHbmPeakBytesPerSec);
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    std::fprintf(f,
                 "    {\"kind\": \"%s\", \"context\": %d, \"median_us\": %.4f, \"min_us\": %.4f, "
                 "\"runs\": %d",
                 r.kind.c_str(), r.context, r.stats.median_us, r.stats.min_us, r.stats.runs);
    if (r.kind == "decode") {
      const double bps = r.bytes / (r.stats.median_us * 1e-6);
      std::fprintf(f,
                   ", \"kv_bytes\": %.0f, \"gb_per_s\": %.2f, \"fraction_of_peak\": %.4f, "
                   "\"launches_per_graph\": %d",
                   r.bytes, bps / 1e9, bps / kHbmPeakBytesPerSec, kDecodeLaunchesPerGraph);
    } else {
      std::fprintf(f, ", \"kernel\": \"%s\", \"flops\": %.6g, \"tflops\": %.2f", r.kernel.c_str(),
                   r.flops,
                   r.flops / (r.stats.median_us * 1e-6) / 1e12);
    }
    std::fprintf(f, "}%s\n", i + 1 < rows.size() ? "," : "");
  }
  std::fprintf(f, "  ]\n}\n");
  std::fclose(f);
  std::printf("wrote %s\n", out_path.c_str());
  return 0;
}

}  // namespace
}  // namespace tailorkv::cuda

int main(int argc, char** argv) { return tailorkv::cuda::Main(argc, argv); }
