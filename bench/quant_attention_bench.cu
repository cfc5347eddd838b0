// Decode attention per layer at the Llama-3.1-8B shape (32 query / 8 KV heads,
// head dim 128): the dense bf16 split-K kernel vs the fused quantized-KV
// kernel (quant_kernels.cuh) at 1, 2 and 4 bits (group 64, residual 128), at
// 32k and 128k tokens of context. Prints a table and writes JSON to --out.
//
// Method (design/PERF.md): random data (codes are random words, params random
// fp16 scales and mins, rings and q random bf16; never zeros), warm-up, CUDA
// events, median of many runs. Each configuration is timed as a CUDA graph of
// 32 launches (one per layer of the model) cycling over several layers'
// caches that together exceed L2 (50 MB) by 5x, as a decode step would run;
// the time per launch includes the split-combine kernel. Bytes per layer are
// those the kernel must read: all of K and V (dense), or codes + params + the
// bf16 rings (quant, QuantShape::Bytes(2)); GB/s and the fraction of the
// 3.0 TB/s HBM floor follow from them.
//
//   tkv_quant_attention_bench [--out FILE] [--reps N] [--contexts 32768,131072]
#include <cuda_bf16.h>
#include <cuda_fp16.h>
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
#include "cuda/quant_kernels.cuh"
#include "runtime/quant_kv.h"

namespace tailorkv::cuda {
namespace {

using bf16 = __nv_bfloat16;

using bench::Hash;
using bench::kHbmPeakBytesPerSec;
using bench::kHeadDim;
using bench::kHeads;
using bench::kKvHeads;
using bench::kRotateBytes;
constexpr int kLaunchesPerGraph = 32;        // one per layer of the model


__global__ void FillBf16Kernel(bf16* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    p[i] = __float2bfloat16(static_cast<float>(Hash(seed, i) >> 40) * (2.0f / 16777216.0f) - 1.0f);
  }
}

__global__ void FillWordsKernel(uint32_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    p[i] = static_cast<uint32_t>(Hash(seed, i));
  }
}

// {scale in [0.01, 0.26), min in [-1, 0)} as fp16 bits.
__global__ void FillParamsKernel(uint32_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = Hash(seed, i);
    const float s = 0.01f + 0.25f * static_cast<float>(h & 0xffffff) / 16777216.0f;
    const float z = -static_cast<float>((h >> 24) & 0xffffff) / 16777216.0f;
    p[i] = static_cast<uint32_t>(__half_as_ushort(__float2half(s))) |
           (static_cast<uint32_t>(__half_as_ushort(__float2half(z))) << 16);
  }
}

DeviceBuffer Allocate(size_t bytes) {
  absl::StatusOr<DeviceBuffer> buf = DeviceBuffer::Allocate(bytes);
  BENCH_CHECK_OK(buf.status());
  return std::move(*buf);
}

DeviceBuffer RandomBf16(size_t count, uint64_t seed) {
  DeviceBuffer buf = Allocate(count * sizeof(bf16));
  FillBf16Kernel<<<1024, 256>>>(buf.as<bf16>(), count, seed);
  BENCH_CHECK_CUDA(cudaGetLastError());
  return buf;
}

struct Stats {
  double median_us = 0, min_us = 0;
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

// Times `launch(layer)` captured kLaunchesPerGraph times in one graph.
template <typename Launch>
Stats TimeGraph(int n_layers, int reps, cudaStream_t stream, Launch launch) {
  launch(0);  // once outside capture, so errors surface with a clear message
  BENCH_CHECK_CUDA(cudaStreamSynchronize(stream));
  BENCH_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kLaunchesPerGraph; ++i) launch(i % n_layers);
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
    us.push_back(1e3 * ms / kLaunchesPerGraph);
  }
  return Summarize(us);
}

int LayersFor(size_t layer_bytes) {
  return static_cast<int>(
      std::clamp<size_t>((kRotateBytes + layer_bytes - 1) / layer_bytes, 1, kLaunchesPerGraph));
}

struct Row {
  std::string kernel;  // "dense" or "quant"
  int bits = 16;
  int context = 0;
  Stats stats;
  double bytes = 0;
};

Row BenchDense(int context, int reps, cudaStream_t stream) {
  const AttentionShape shape{kHeads, kKvHeads, kHeadDim, context};
  const size_t cache_count = static_cast<size_t>(kKvHeads) * context * kHeadDim;
  const size_t layer_bytes = 2 * cache_count * sizeof(bf16);
  const int n_layers = LayersFor(layer_bytes);
  std::vector<DeviceBuffer> k, v, q;
  for (int i = 0; i < n_layers; ++i) {
    k.push_back(RandomBf16(cache_count, 3 * i + 1));
    v.push_back(RandomBf16(cache_count, 3 * i + 2));
    q.push_back(RandomBf16(static_cast<size_t>(kHeads) * kHeadDim, 3 * i + 3));
  }
  DeviceBuffer out = Allocate(static_cast<size_t>(kHeads) * kHeadDim * sizeof(bf16));
  DeviceBuffer ws = Allocate(std::max<size_t>(DecodeAttentionWorkspaceBytes(shape), 16));
  DeviceBuffer length = Allocate(sizeof(int32_t));
  BENCH_CHECK_CUDA(cudaMemcpy(length.get(), &context, sizeof(int32_t), cudaMemcpyHostToDevice));
  BENCH_CHECK_CUDA(cudaDeviceSynchronize());
  Row row;
  row.kernel = "dense";
  row.context = context;
  row.bytes = static_cast<double>(layer_bytes);
  row.stats = TimeGraph(n_layers, reps, stream, [&](int l) {
    BENCH_CHECK_OK(LaunchDecodeAttention(q[l].as<bf16>(), k[l].as<bf16>(), v[l].as<bf16>(),
                                         length.as<int32_t>(), shape, ws.get(), out.as<bf16>(),
                                         stream));
  });
  return row;
}

Row BenchQuant(int context, int bits, int reps, cudaStream_t stream) {
  runtime::QuantShape shape;
  shape.n_kv_heads = kKvHeads;
  shape.head_dim = kHeadDim;
  shape.capacity = context;
  shape.params.bits = bits;
  shape.params.group = 64;
  shape.params.residual = 128;
  BENCH_CHECK_OK(ValidateQuantShape(shape));
  const QuantDeviceLayout layout = QuantLayout(shape);
  const size_t layer_bytes = static_cast<size_t>(shape.Bytes(2));
  const int n_layers = LayersFor(layer_bytes);
  std::vector<DeviceBuffer> mem, q;
  std::vector<QuantDeviceCache> caches;
  const int64_t h = kKvHeads;
  for (int i = 0; i < n_layers; ++i) {
    mem.push_back(Allocate(layout.bytes));
    BENCH_CHECK_CUDA(cudaMemset(mem.back().get(), 0, layout.bytes));
    const QuantDeviceCache c = QuantCacheAt(mem.back().get(), shape);
    FillWordsKernel<<<1024, 256>>>(c.k_codes, h * shape.k_code_words_per_head(), 7 * i + 1);
    FillWordsKernel<<<1024, 256>>>(c.v_codes, h * shape.v_code_words_per_head(), 7 * i + 2);
    FillParamsKernel<<<1024, 256>>>(c.k_params, h * shape.k_params_per_head(), 7 * i + 3);
    FillParamsKernel<<<1024, 256>>>(c.v_params, h * shape.v_params_per_head(), 7 * i + 4);
    FillBf16Kernel<<<256, 256>>>(c.k_res, h * shape.residual_elems_per_head(), 7 * i + 5);
    FillBf16Kernel<<<256, 256>>>(c.v_res, h * shape.residual_elems_per_head(), 7 * i + 6);
    BENCH_CHECK_CUDA(cudaGetLastError());
    caches.push_back(c);
    q.push_back(RandomBf16(static_cast<size_t>(kHeads) * kHeadDim, 7 * i + 7));
  }
  DeviceBuffer out = Allocate(static_cast<size_t>(kHeads) * kHeadDim * sizeof(bf16));
  DeviceBuffer ws = Allocate(std::max<size_t>(QuantDecodeWorkspaceBytes(shape, kHeads), 16));
  DeviceBuffer length = Allocate(sizeof(int32_t));
  BENCH_CHECK_CUDA(cudaMemcpy(length.get(), &context, sizeof(int32_t), cudaMemcpyHostToDevice));
  BENCH_CHECK_CUDA(cudaDeviceSynchronize());
  Row row;
  row.kernel = "quant";
  row.bits = bits;
  row.context = context;
  row.bytes = static_cast<double>(layer_bytes);
  row.stats = TimeGraph(n_layers, reps, stream, [&](int l) {
    BENCH_CHECK_OK(LaunchQuantDecodeAttention(q[l].as<bf16>(), kHeads, shape, caches[l],
                                              length.as<int32_t>(), ws.get(), out.as<bf16>(),
                                              stream));
  });
  return row;
}

int Main(int argc, char** argv) {
  std::string out_path = "quant_attention_bench.json";
  int reps = 100;
  std::vector<int> contexts = {32768, 131072};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--out" && i + 1 < argc) {
      out_path = argv[++i];
    } else if (arg == "--reps" && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--contexts" && i + 1 < argc) {
      contexts.clear();
      std::string list = argv[++i];
      for (size_t at = 0; at < list.size();) {
        const size_t comma = list.find(',', at);
        contexts.push_back(std::atoi(list.substr(at, comma - at).c_str()));
        at = comma == std::string::npos ? list.size() : comma + 1;
      }
    } else {
      std::fprintf(stderr, "usage: %s [--out FILE] [--reps N] [--contexts A,B,...]\n", argv[0]);
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
  for (int context : contexts) {
    rows.push_back(BenchDense(context, reps, stream->get()));
    for (int bits : {1, 2, 4}) rows.push_back(BenchQuant(context, bits, reps, stream->get()));
  }

  std::printf("device: %s\n", prop.name);
  std::printf("%-6s %5s %8s %10s %10s %10s %8s %8s %9s\n", "kernel", "bits", "context", "median_us",
              "min_us", "MB/layer", "GB/s", "floor%", "vs_dense");
  FILE* f = std::fopen(out_path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "cannot write %s\n", out_path.c_str());
    return 1;
  }
  std::fprintf(f, "{\"bench\": \"quant_attention\", \"device\": \"%s\", \"shape\": {\"heads\": %d, "
               "\"kv_heads\": %d, \"head_dim\": %d, \"group\": 64, \"residual\": 128}, "
               "\"hbm_floor_bytes_per_s\": %.3e, \"rows\": [",
               prop.name, kHeads, kKvHeads, kHeadDim, kHbmPeakBytesPerSec);
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    double dense_us = 0;
    for (const Row& d : rows) {
      if (d.kernel == "dense" && d.context == r.context) dense_us = d.stats.median_us;
    }
    const double gbps = r.bytes / (r.stats.median_us * 1e-6) / 1e9;
    const double floor_frac = r.bytes / kHbmPeakBytesPerSec / (r.stats.median_us * 1e-6);
    const double ratio = dense_us > 0 ? r.stats.median_us / dense_us : 0;
    std::printf("%-6s %5d %8d %10.2f %10.2f %10.1f %8.0f %7.1f%% %9.3f\n", r.kernel.c_str(), r.bits,
                r.context, r.stats.median_us, r.stats.min_us, r.bytes / 1e6, gbps, 100 * floor_frac,
                ratio);
    std::fprintf(f,
                 "%s{\"kernel\": \"%s\", \"bits\": %d, \"context\": %d, \"median_us\": %.3f, "
                 "\"min_us\": %.3f, \"runs\": %d, \"bytes_per_layer\": %.0f, \"gb_per_s\": %.1f, "
                 "\"fraction_of_hbm_floor\": %.4f, \"time_vs_dense\": %.4f}",
                 i ? ", " : "", r.kernel.c_str(), r.bits, r.context, r.stats.median_us,
                 r.stats.min_us, r.stats.runs, r.bytes, gbps, floor_frac, ratio);
  }
  std::fprintf(f, "]}\n");
  std::fclose(f);
  return 0;
}

}  // namespace
}  // namespace tailorkv::cuda

int main(int argc, char** argv) { return tailorkv::cuda::Main(argc, argv); }
