// Sparse-layer kernels (cuda/sparse_kernels.cuh) on the GPU:
// - Top-K: 8 rows (one per KV head of Llama-3.1-8B) of n fp32 scores, n =
//   32k / 128k / 1M, k = 128 / 1024 / 4096. Each configuration is captured
//   as a CUDA graph (the length read from the device, as in decode) and
//   timed over batches of replays cycling over 4 score sets (together > L2
//   at 1M); median of the batches, per launch. Three columns from the same
//   run: LaunchTopK as callers get it (the chunked path where it applies,
//   k <= 1024: 2 launches, the second a programmatic dependent launch, one
//   read of the scores), the chunked path without the programmatic launch,
//   and the radix path (6 launches, the scores read 5 times, mostly from
//   L2). GB/s counts one read of the scores.
// - Gather: 65,536 random rows (duplicates allowed) of 256 B / 512 B / 2 KiB
//   from >= 4 GiB of cudaHostRegister'd host memory (4 KiB pages, then
//   transparent huge pages by madvise), zero-copy into device memory, 8
//   index sets rotated; plus decode-sized gathers (8 heads x 128 /
//   896 rows). GB/s = rows x row_bytes / time. design/PERF.md measured 15.5 /
//   25 / 49-51 GB/s for the first three on this H100.
// Random data everywhere (never zeros); CUDA events after warm-up.
//
//   tkv_sparse_bench [--out FILE] [--reps N] [--host-gib G] [--topk-only]
#include <cuda_runtime.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "bench_common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/sparse_kernels.cuh"

namespace tailorkv::cuda {
namespace {


using bench::Hash;

// Scores like q.k logits: roughly uniform in [-8, 8) at full fp32 precision.
__global__ void FillScores(float* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = (static_cast<float>(Hash(seed, i) >> 40) * (1.0f / 16777216.0f) - 0.5f) * 16.0f;
  }
}

__global__ void FillWords(uint64_t* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = Hash(seed, i);
  }
}

__global__ void FillIndices(int32_t* p, int64_t n, int64_t range, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = static_cast<int32_t>(Hash(seed, i) % static_cast<uint64_t>(range));
  }
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct TopKResult {
  int n, k;
  bool chunked;      // LaunchTopK took the chunked path
  double us, plain_us, radix_us;  // defaults, no programmatic launch, radix path
};
struct GatherResult {
  int64_t row_bytes;
  int heads, rows;
  double us, gbps;
  bool huge_pages;
};

int Main(int argc, char** argv) {
  std::string out_path;
  int reps = 30;
  double host_gib = 4.25;
  bool topk_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--out" && i + 1 < argc) {
      out_path = argv[++i];
    } else if (arg == "--reps" && i + 1 < argc) {
      reps = std::max(3, std::atoi(argv[++i]));
    } else if (arg == "--host-gib" && i + 1 < argc) {
      host_gib = std::atof(argv[++i]);
    } else if (arg == "--topk-only") {
      topk_only = true;
    } else {
      std::fprintf(stderr, "usage: %s [--out FILE] [--reps N] [--host-gib G] [--topk-only]\n", argv[0]);
      return 2;
    }
  }
  if (DeviceCount() == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop;
  BENCH_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  absl::StatusOr<CudaStream> stream = CudaStream::Create();
  absl::StatusOr<CudaEvent> ev0 = CudaEvent::Create(true), ev1 = CudaEvent::Create(true);
  BENCH_CHECK_OK(stream.status());
  BENCH_CHECK_OK(ev0.status());
  BENCH_CHECK_OK(ev1.status());
  cudaStream_t s = stream->get();

  // ---- Top-K ----
  constexpr int kRows = 8, kSets = 4, kBatch = 20;
  const int ns[] = {32768, 131072, 1 << 20};
  const int ks[] = {128, 1024, 4096};
  std::vector<TopKResult> topk;
  for (int n : ns) {
    std::vector<DeviceBuffer> sets;
    for (int j = 0; j < kSets; ++j) {
      absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(static_cast<size_t>(kRows) * n * 4);
      BENCH_CHECK_OK(b.status());
      FillScores<<<1024, 256, 0, s>>>(b->as<float>(), static_cast<int64_t>(kRows) * n, 1000 + j);
      sets.push_back(std::move(*b));
    }
    absl::StatusOr<DeviceBuffer> d_n = DeviceBuffer::Allocate(4);
    BENCH_CHECK_OK(d_n.status());
    BENCH_CHECK_CUDA(cudaMemcpy(d_n->get(), &n, 4, cudaMemcpyHostToDevice));
    const size_t ws_bytes = TopKWorkspaceBytes(kRows, n);
    absl::StatusOr<DeviceBuffer> ws = DeviceBuffer::Allocate(ws_bytes);
    BENCH_CHECK_OK(ws.status());
    for (int k : ks) {
      absl::StatusOr<DeviceBuffer> out = DeviceBuffer::Allocate(static_cast<size_t>(kRows) * k * 4);
      BENCH_CHECK_OK(out.status());
      auto time_path = [&](const TopKOptions& options) {
        std::vector<CudaGraphExec> graphs;
        for (int j = 0; j < kSets; ++j) {
          BENCH_CHECK_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
          BENCH_CHECK_OK(LaunchTopK(sets[j].as<float>(), n, kRows, n, d_n->as<int32_t>(), k,
                                    out->as<int32_t>(), ws->get(), ws_bytes, s, options));
          absl::StatusOr<CudaGraphExec> g = CudaGraphExec::EndCapture(s);
          BENCH_CHECK_OK(g.status());
          graphs.push_back(std::move(*g));
        }
        for (int w = 0; w < 10; ++w) BENCH_CHECK_OK(graphs[w % kSets].Launch(s));
        std::vector<double> per;
        for (int r = 0; r < reps; ++r) {
          BENCH_CHECK_CUDA(cudaEventRecord(ev0->get(), s));
          for (int b = 0; b < kBatch; ++b) BENCH_CHECK_OK(graphs[b % kSets].Launch(s));
          BENCH_CHECK_CUDA(cudaEventRecord(ev1->get(), s));
          BENCH_CHECK_CUDA(cudaEventSynchronize(ev1->get()));
          float ms = 0;
          BENCH_CHECK_CUDA(cudaEventElapsedTime(&ms, ev0->get(), ev1->get()));
          per.push_back(ms * 1000.0 / kBatch);
        }
        return Median(per);
      };
      TopKOptions plain, radix;
      plain.programmatic_launch = false;
      radix.radix_only = true;
      const double us = time_path(TopKOptions{}), plain_us = time_path(plain), radix_us = time_path(radix);
      topk.push_back({n, k, TopKUsesChunkedPath(n, k), us, plain_us, radix_us});
      std::fprintf(stderr, "topk n=%d k=%d: %.1f us (%s), no PDL %.1f us, radix %.1f us\n", n, k, us,
                   topk.back().chunked ? "chunked" : "radix", plain_us, radix_us);
    }
  }

  // ---- Top-K chunk sweep: the chunked path at each stage-1 block size ----
  struct SweepResult {
    int n, k, threads;
    double us;
  };
  std::vector<SweepResult> sweep;
  for (int n : {32768, 131072}) {
    absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(static_cast<size_t>(kRows) * n * 4);
    absl::StatusOr<DeviceBuffer> d_n = DeviceBuffer::Allocate(4);
    const size_t ws_bytes = TopKWorkspaceBytes(kRows, n);
    absl::StatusOr<DeviceBuffer> ws = DeviceBuffer::Allocate(ws_bytes);
    absl::StatusOr<DeviceBuffer> out = DeviceBuffer::Allocate(static_cast<size_t>(kRows) * 1024 * 4);
    BENCH_CHECK_OK(b.status());
    BENCH_CHECK_OK(d_n.status());
    BENCH_CHECK_OK(ws.status());
    BENCH_CHECK_OK(out.status());
    FillScores<<<1024, 256, 0, s>>>(b->as<float>(), static_cast<int64_t>(kRows) * n, 2000);
    BENCH_CHECK_CUDA(cudaMemcpy(d_n->get(), &n, 4, cudaMemcpyHostToDevice));
    for (int k : {128, 1024}) {
      for (int t : {256, 512, 1024}) {
        TopKOptions o;
        o.chunk_threads = t;
        BENCH_CHECK_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        BENCH_CHECK_OK(LaunchTopK(b->as<float>(), n, kRows, n, d_n->as<int32_t>(), k, out->as<int32_t>(),
                                  ws->get(), ws_bytes, s, o));
        absl::StatusOr<CudaGraphExec> g = CudaGraphExec::EndCapture(s);
        BENCH_CHECK_OK(g.status());
        for (int w = 0; w < 10; ++w) BENCH_CHECK_OK(g->Launch(s));
        std::vector<double> per;
        for (int r = 0; r < reps; ++r) {
          BENCH_CHECK_CUDA(cudaEventRecord(ev0->get(), s));
          for (int i = 0; i < kBatch; ++i) BENCH_CHECK_OK(g->Launch(s));
          BENCH_CHECK_CUDA(cudaEventRecord(ev1->get(), s));
          BENCH_CHECK_CUDA(cudaEventSynchronize(ev1->get()));
          float ms = 0;
          BENCH_CHECK_CUDA(cudaEventElapsedTime(&ms, ev0->get(), ev1->get()));
          per.push_back(ms * 1000.0 / kBatch);
        }
        sweep.push_back({n, k, t, Median(per)});
      }
    }
  }

  // ---- Gather from registered host memory: 4 KiB pages, then THP ----
  const size_t host_bytes = static_cast<size_t>(host_gib * (1ull << 30)) / (2u << 20) * (2u << 20);
  struct Config {
    int64_t row_bytes;
    int heads, rows;
  };
  const Config configs[] = {{256, 1, 65536}, {512, 1, 65536}, {2048, 1, 65536},
                            {256, 8, 128},   {512, 8, 128},   {256, 8, 896}, {512, 8, 896}};
  constexpr int kIdxSets = 8;
  std::vector<GatherResult> gather;
  for (const bool huge : {false, true}) {
    if (topk_only) break;
    void* host = mmap(nullptr, host_bytes + (2u << 20), PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (host == MAP_FAILED) {
      std::fprintf(stderr, "mmap of %zu bytes failed\n", host_bytes);
      return 1;
    }
    void* base = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(host) + (2u << 20) - 1) &
                                         ~static_cast<uintptr_t>((2u << 20) - 1));
    madvise(base, host_bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    BENCH_CHECK_CUDA(cudaHostRegister(base, host_bytes, cudaHostRegisterMapped));
    void* host_dev = nullptr;
    BENCH_CHECK_CUDA(cudaHostGetDevicePointer(&host_dev, base, 0));
    FillWords<<<4096, 256, 0, s>>>(static_cast<uint64_t*>(host_dev), host_bytes / 8, 77);
    BENCH_CHECK_CUDA(cudaStreamSynchronize(s));
    long anon_huge_kb = -1;
    if (FILE* m = std::fopen("/proc/meminfo", "r")) {
      char line[256];
      while (std::fgets(line, sizeof(line), m)) std::sscanf(line, "AnonHugePages: %ld kB", &anon_huge_kb);
      std::fclose(m);
    }
    std::fprintf(stderr, "host memory %s: AnonHugePages %ld kB\n", huge ? "THP" : "4K", anon_huge_kb);
    for (const Config& c : configs) {
      const int64_t head_stride = (static_cast<int64_t>(host_bytes) / c.heads) / 16 * 16;
      const int64_t src_rows = head_stride / c.row_bytes;
      const int64_t per_set = static_cast<int64_t>(c.heads) * c.rows;
      absl::StatusOr<DeviceBuffer> idx = DeviceBuffer::Allocate(per_set * kIdxSets * 4);
      absl::StatusOr<DeviceBuffer> dst = DeviceBuffer::Allocate(per_set * c.row_bytes);
      BENCH_CHECK_OK(idx.status());
      BENCH_CHECK_OK(dst.status());
      FillIndices<<<256, 256, 0, s>>>(idx->as<int32_t>(), per_set * kIdxSets, src_rows, 5 + c.row_bytes);
      auto launch = [&](int j) {
        BENCH_CHECK_OK(LaunchGatherRows(host_dev, head_stride, src_rows, c.row_bytes,
                                        idx->as<int32_t>() + j * per_set, c.rows, c.heads, dst->get(), s));
      };
      for (int w = 0; w < 3; ++w) launch(w % kIdxSets);
      std::vector<double> per;
      for (int r = 0; r < reps; ++r) {
        BENCH_CHECK_CUDA(cudaEventRecord(ev0->get(), s));
        launch(r % kIdxSets);
        BENCH_CHECK_CUDA(cudaEventRecord(ev1->get(), s));
        BENCH_CHECK_CUDA(cudaEventSynchronize(ev1->get()));
        float ms = 0;
        BENCH_CHECK_CUDA(cudaEventElapsedTime(&ms, ev0->get(), ev1->get()));
        per.push_back(ms * 1000.0);
      }
      const double us = Median(per);
      gather.push_back({c.row_bytes, c.heads, c.rows, us, per_set * c.row_bytes / (us * 1e3), huge});
      std::fprintf(stderr, "gather %s %lld B x %d x %d: %.1f us\n", huge ? "THP" : "4K",
                   static_cast<long long>(c.row_bytes), c.heads, c.rows, us);
    }
    BENCH_CHECK_CUDA(cudaHostUnregister(base));
    munmap(host, host_bytes + (2u << 20));
  }

  std::printf("\nTop-K, %d rows, fp32 scores, CUDA graph per launch (%s)\n", kRows, prop.name);
  std::printf("%10s %6s %8s %10s %14s %12s %10s\n", "n", "k", "path", "us", "GB/s (1 read)", "no-PDL us",
              "radix us");
  for (const TopKResult& t : topk) {
    std::printf("%10d %6d %8s %10.1f %14.1f %12.1f %10.1f\n", t.n, t.k, t.chunked ? "chunked" : "radix",
                t.us, kRows * 4.0 * t.n / (t.us * 1e3), t.plain_us, t.radix_us);
  }
  std::printf("\nTop-K chunked path by stage-1 block (chunk = 16 x threads), one score set\n");
  std::printf("%10s %6s %8s %10s\n", "n", "k", "threads", "us");
  for (const SweepResult& r : sweep) std::printf("%10d %6d %8d %10.1f\n", r.n, r.k, r.threads, r.us);
  std::printf("\nZero-copy gather from %.2f GiB of registered host memory (%s)\n",
              host_bytes / double(1ull << 30), prop.name);
  std::printf("%6s %10s %6s %8s %10s %8s\n", "pages", "row_bytes", "heads", "rows", "us", "GB/s");
  for (const GatherResult& g : gather) {
    std::printf("%6s %10lld %6d %8d %10.1f %8.1f\n", g.huge_pages ? "THP" : "4K",
                static_cast<long long>(g.row_bytes), g.heads, g.rows, g.us, g.gbps);
  }
  if (!out_path.empty()) {
    FILE* f = std::fopen(out_path.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", out_path.c_str());
      return 1;
    }
    std::fprintf(f, "{\n  \"device\": \"%s\",\n  \"reps\": %d,\n  \"host_bytes\": %zu,\n  \"topk\": [\n",
                 prop.name, reps, host_bytes);
    for (size_t i = 0; i < topk.size(); ++i) {
      std::fprintf(f, "    {\"rows\": %d, \"n\": %d, \"k\": %d, \"path\": \"%s\", \"us\": %.2f, \"no_pdl_us\": %.2f, \"radix_us\": %.2f}%s\n",
                   kRows, topk[i].n, topk[i].k, topk[i].chunked ? "chunked" : "radix", topk[i].us,
                   topk[i].plain_us, topk[i].radix_us, i + 1 < topk.size() ? "," : "");
    }
    std::fprintf(f, "  ],\n  \"topk_chunk_sweep\": [\n");
    for (size_t i = 0; i < sweep.size(); ++i) {
      std::fprintf(f, "    {\"rows\": %d, \"n\": %d, \"k\": %d, \"threads\": %d, \"us\": %.2f}%s\n", kRows,
                   sweep[i].n, sweep[i].k, sweep[i].threads, sweep[i].us, i + 1 < sweep.size() ? "," : "");
    }
    std::fprintf(f, "  ],\n  \"gather\": [\n");
    for (size_t i = 0; i < gather.size(); ++i) {
      const GatherResult& g = gather[i];
      std::fprintf(f, "    {\"pages\": \"%s\", \"row_bytes\": %lld, \"heads\": %d, \"rows\": %d, \"us\": %.2f, \"gbps\": %.2f}%s\n",
                   g.huge_pages ? "THP" : "4K", static_cast<long long>(g.row_bytes), g.heads, g.rows, g.us, g.gbps,
                   i + 1 < gather.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
  }
  return 0;
}

}  // namespace
}  // namespace tailorkv::cuda

int main(int argc, char** argv) { return tailorkv::cuda::Main(argc, argv); }
