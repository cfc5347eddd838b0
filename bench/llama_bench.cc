// Decode and prefill speed of the CUDA backend on a Llama-3.1-8B-shaped model
// with random bf16 weights generated on the GPU (values do not change speed).
// Decode runs on a cache filled with random K/V (a 128k prefill per context
// would dominate the run); prefill is timed separately on real forward
// passes. Prints a table and writes JSON (--out).
//
//   tkv_llama_bench --contexts 4096,32768,131072 --prefill 4096,32768,131072 --out r.json
//   tkv_llama_bench --plans dense,hybrid:1:128:8:56:gpu --contexts 32768,131072 --prefill ""
//
// With --plans, every context decodes under each KV plan in turn (the same
// backend, so the figures sit side by side); sparse plans also report their
// host tier and the bytes that cross PCIe per token (computed from the
// shapes: the gathered rows, plus for index "faithful" the chosen channels
// of every candidate key). Prefill (time to the first token's logits of a
// real forward pass over random tokens, and the peak GPU memory while its
// sequence lives) runs under each plan too, dense first.
//
//   tkv_llama_bench --plans dense,hybrid:2:128:8:56:32:gpu --contexts "" --prefill 32768,131072
//
// With --trace-dir, each (context, plan) pair then decodes 3 more steps under
// a CUPTI tracer (kernel_trace.h): the concurrent timeline of both streams,
// written to DIR/trace_<context>_<plan>.json (scripts/trace_summary.py reads
// it) and summarized on stdout. The timed steps are not traced.
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "client/kv_host_client.h"
#include "cuda/cuda_backend.h"
#include "kernel_trace.h"
#include "model/llama_weights.h"
#include "model/shapes.h"
#include "runtime/kv_plan.h"

namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

size_t DeviceUsedBytes() {
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  return total_b - free_b;
}

int Fail(const absl::Status& s, const char* what) {
  std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
  return 1;
}

std::string FileSafe(std::string s) {
  for (char& ch : s) {
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '.' && ch != '-') ch = '_';
  }
  return s;
}

// Decodes `tokens` (one step each) under `tracer`, writes the records to
// `path` (with `meta`) and prints their summary. Any failure is printed, not
// returned: tracing never stops the benchmark.
void TraceDecodeSteps(tailorkv::bench::KernelTrace& tracer, tailorkv::runtime::Backend& backend,
                      tailorkv::runtime::SequenceState& seq, const std::vector<int32_t>& tokens,
                      const std::string& path, nlohmann::json meta) {
  std::vector<float> logits;
  absl::Status st = tracer.Start();
  for (size_t i = 0; st.ok() && i < tokens.size(); ++i) {
    st = backend.Forward(seq, {&tokens[i], 1}, false, &logits);
  }
  auto records = tracer.Stop();  // also after a failed step: it disables CUPTI
  if (st.ok()) st = records.status();
  if (!st.ok()) {
    std::printf("  trace failed: %s\n", st.ToString().c_str());
    return;
  }
  meta["steps"] = tokens.size();
  meta["dropped_records"] = tracer.dropped_records();
  std::ofstream f(path);
  f << tailorkv::bench::TraceToJson(*records, std::move(meta)).dump() << "\n";
  f.close();
  std::printf("  trace -> %s%s\n", path.c_str(), f ? "" : " (write failed)");
  std::fputs(tailorkv::bench::SummarizeDecodeTrace(*records).c_str(), stdout);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> contexts = {4096, 32768, 131072};
  std::vector<int> prefills = {4096, 32768, 131072};
  int steps = 64;
  int layers = 32;
  bool graphs = true;
  int prefill_chunk = tailorkv::cuda::CudaBackendOptions{}.max_prefill_chunk;
  std::string out_path;
  std::vector<std::string> plan_specs = {"dense"};
  bool sparse_overlap = true, sparse_priority = true, custom_gemv = true, prefill_prefetch = true;
  bool row_reuse = tailorkv::cuda::CudaBackendOptions{}.sparse_row_reuse;
  bool fused_topk = tailorkv::cuda::CudaBackendOptions{}.sparse_fused_topk;
  int fused_chunk_threads = 0;
  std::string decode_tokens = "random";
  bool host_embeddings = tailorkv::cuda::CudaBackendOptions{}.host_embeddings;
  bool late_prefetch = tailorkv::cuda::CudaBackendOptions{}.sparse_late_prefetch;
  std::string layer_weights = "bf16";
  std::string gemv_quant_kernel = "simple";
  std::string kv_host = "in-process";
  std::string trace_dir;
  CLI::App app{"Llama-3.1-8B-shaped decode/prefill benchmark of the CUDA backend"};
  app.add_option("--contexts", contexts, "decode context lengths")->delimiter(',');
  app.add_option("--prefill", prefills, "prefill lengths (empty: none)")->delimiter(',');
  app.add_option("--steps", steps, "timed decode steps per context")->check(CLI::Range(4, 100000));
  app.add_option("--layers", layers, "layers (32 for the real shape)")->check(CLI::Range(1, 32));
  app.add_option("--graphs", graphs, "capture decode steps as CUDA graphs");
  app.add_option("--prefill-chunk", prefill_chunk, "tokens per prefill pass")
      ->check(CLI::Range(1, 131072));
  app.add_option("--out", out_path, "JSON results file");
  app.add_option("--plans", plan_specs, "KV plan specs to decode under (runtime/kv_plan.h)")
      ->delimiter(',');
  app.add_option("--sparse-overlap", sparse_overlap,
                 "index gpu: select on a side stream overlapping the previous layer");
  app.add_option("--sparse-priority", sparse_priority, "that side stream at the most urgent priority");
  app.add_option("--custom-gemv", custom_gemv, "decode products through our GEMV (false: cuBLAS)");
  app.add_option("--prefill-prefetch", prefill_prefetch,
                 "sparse prefill: load each layer's history by DMA while earlier layers compute");
  app.add_option("--row-reuse", row_reuse,
                 "sparse decode: rows selected again stay in their slots instead of being fetched again");
  app.add_option("--fused-topk", fused_topk,
                 "FP8 index: score inside the Top-K's first stage (false: separate launches)");
  app.add_option("--fused-chunk-threads", fused_chunk_threads,
                 "that first stage's block: 0 (by size), 256, 512 or 1024")
      ->check(CLI::IsMember({0, 256, 512, 1024}));
  app.add_option("--decode-tokens", decode_tokens,
                 "decode inputs: random (a new random token each step: random weights then "
                 "reselect few rows) or repeat (one token: consecutive queries stay close)")
      ->check(CLI::IsMember({"random", "repeat"}));
  app.add_option("--late-prefetch", late_prefetch,
                 "query after-attention: a first selection from the previous layer's input "
                 "gathers rows ahead");
  app.add_option("--host-embeddings", host_embeddings,
                 "input embedding table in pinned host memory (false: on the GPU)");
  app.add_option("--kv-host", kv_host,
                 "the sparse layers' host tier: in-process, or a running kv-host daemon "
                 "(unix:///path/kv-host.sock): its arenas, registered with the GPU")
      ->capture_default_str();
  app.add_option("--layer-weights", layer_weights,
                 "the layers' weight matrices: bf16, or quantized planes read by the W4A16/W8A16 GEMV "
                 "(q4_0, q4_1, q8_0; embeddings and head stay bf16)")
      ->check(CLI::IsMember({"bf16", "q4_0", "q4_1", "q8_0"}))
      ->capture_default_str();
  app.add_option("--gemv-quant-kernel", gemv_quant_kernel,
                 "the quantized GEMV's kernel (simple or pipelined; bit-identical results)")
      ->check(CLI::IsMember({"simple", "pipelined"}))
      ->capture_default_str();
  app.add_option("--trace-dir", trace_dir,
                 "after each context and plan's timed steps, trace 3 more with CUPTI and write "
                 "DIR/trace_<context>_<plan>.json (empty: off)");
  CLI11_PARSE(app, argc, argv);
  // --prefill "" / --contexts "" (none) parse as one 0.
  prefills.erase(std::remove(prefills.begin(), prefills.end(), 0), prefills.end());
  contexts.erase(std::remove(contexts.begin(), contexts.end(), 0), contexts.end());

  auto config = tailorkv::model::Llama31_8BShape();
  config.n_layers = layers;
  for (int ctx : contexts) config.max_context = std::max(config.max_context, ctx + steps + 64);
  for (int n : prefills) config.max_context = std::max(config.max_context, n + 64);
  std::vector<tailorkv::runtime::KvPlan> plans;
  for (const std::string& spec : plan_specs) {
    auto plan = tailorkv::runtime::ParseKvPlanSpec(spec, config);
    if (!plan.ok()) return Fail(plan.status(), "plan");
    plans.push_back(*plan);
  }
  // Before the backend: CUPTI attaches before any graph is captured
  // (kernel_trace.h). It enables nothing until a trace starts.
  std::unique_ptr<tailorkv::bench::KernelTrace> tracer;
  if (!trace_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(trace_dir, ec);
    auto t = tailorkv::bench::KernelTrace::Create();
    if (ec) {
      std::printf("trace dir %s: %s; not tracing\n", trace_dir.c_str(), ec.message().c_str());
    } else if (!t.ok()) {
      std::printf("CUPTI: %s; not tracing\n", t.status().ToString().c_str());
    } else {
      tracer = std::move(*t);
    }
  }
  const size_t base_used = DeviceUsedBytes();
  tailorkv::cuda::CudaBackendOptions opts;
  opts.use_graphs = graphs;
  opts.max_prefill_chunk = prefill_chunk;
  opts.sparse_overlap = sparse_overlap;
  opts.sparse_side_priority = sparse_priority;
  opts.custom_gemv = custom_gemv;
  opts.prefill_prefetch = prefill_prefetch;
  opts.sparse_row_reuse = row_reuse;
  opts.sparse_fused_topk = fused_topk;
  opts.sparse_fused_chunk_threads = fused_chunk_threads;
  opts.host_embeddings = host_embeddings;
  opts.sparse_late_prefetch = late_prefetch;
  opts.gemv_quant_pipelined = gemv_quant_kernel == "pipelined";
  opts.layer_weights = layer_weights == "q4_0"   ? tailorkv::model::GgmlType::kQ4_0
                       : layer_weights == "q4_1" ? tailorkv::model::GgmlType::kQ4_1
                       : layer_weights == "q8_0" ? tailorkv::model::GgmlType::kQ8_0
                                                 : tailorkv::model::GgmlType::kF32;
  std::unique_ptr<tailorkv::kvhost::KvHostClientStore> kv_host_store;
  if (kv_host != "in-process") {
    tailorkv::kvhost::KvHostClientOptions ko;
    ko.target = kv_host;
    ko.worker_id = "tkv_llama_bench";
    ko.register_fn = [&opts](void* base, size_t bytes) {
      return tailorkv::cuda::RegisterHostMemory(base, bytes, opts.device);
    };
    ko.unregister_fn = [](void* base, size_t) { return tailorkv::cuda::UnregisterHostMemory(base); };
    auto c = tailorkv::kvhost::KvHostClientStore::Connect(ko);
    if (!c.ok()) return Fail(c.status(), "kv-host");
    kv_host_store = std::move(*c);
    opts.host_store = kv_host_store.get();
  }
  auto backend = tailorkv::cuda::CreateCudaBackendWithRandomWeights(config, 1234, opts);
  if (!backend.ok()) return Fail(backend.status(), "backend");
  const size_t weights_used = DeviceUsedBytes();
  nlohmann::json out = {{"model", config.name}, {"layers", layers}, {"graphs", graphs},
                        {"prefill_chunk", prefill_chunk}, {"sparse_overlap", sparse_overlap},
                        {"sparse_priority", sparse_priority}, {"custom_gemv", custom_gemv},
                        {"prefill_prefetch", prefill_prefetch}, {"row_reuse", row_reuse},
                        {"fused_topk", fused_topk}, {"fused_chunk_threads", fused_chunk_threads},
                        {"kv_host", kv_host},
                        {"decode_tokens", decode_tokens}, {"host_embeddings", host_embeddings},
                        {"late_prefetch", late_prefetch}, {"layer_weights", layer_weights},
                        {"gemv_quant_kernel", gemv_quant_kernel},
                        {"backend_device_bytes", tailorkv::cuda::BackendDeviceBytes(**backend)}};
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  out["device"] = prop.name;
  std::printf("device %s, backend holds %.2f GB\n", prop.name,
              tailorkv::cuda::BackendDeviceBytes(**backend) / 1e9);
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(0, config.vocab - 1);
  std::vector<float> logits;

  std::printf("%-10s %-28s %10s %10s %12s %10s %12s\n", "context", "plan", "decode ms", "tokens/s",
              "peak GPU GB", "host GB", "PCIe MB/tok");
  for (int ctx : contexts) for (const auto& plan : plans) {
    auto seq = (*backend)->NewSequence(ctx + steps + 8, plan);
    if (!seq.ok()) return Fail(seq.status(), "sequence");
    if (auto s = tailorkv::cuda::FillSequenceWithRandomKv(**seq, ctx, 99); !s.ok()) {
      return Fail(s, "fill");
    }
    std::vector<double> ms;
    // Inputs seeded by the context alone: a plan decodes the same tokens
    // whichever plans run before it, so runs with other plan lists compare.
    std::mt19937 step_rng(static_cast<uint32_t>(ctx));
    const int32_t repeated = tok(step_rng);
    for (int i = 0; i < steps + 4; ++i) {
      const int32_t t = decode_tokens == "repeat" ? repeated : tok(step_rng);
      const auto t0 = Clock::now();
      if (auto s = (*backend)->Forward(**seq, {&t, 1}, false, &logits); !s.ok()) {
        return Fail(s, "decode");
      }
      const double dt = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      if (i >= 4) ms.push_back(dt);  // the first steps run eagerly and capture the graph
    }
    const double med = Median(ms);
    const double peak = (DeviceUsedBytes() - base_used) / 1e9;
    // PCIe bytes of a step: the selected rows (before row reuse) and, for
    // index "faithful", the chosen channels of every candidate key.
    double host_bytes = 0, pcie_bytes = 0, gather_bytes = 0;
    for (const auto& b : (*seq)->kv_bytes()) host_bytes += static_cast<double>(b.host_bytes);
    for (const auto& l : plan.layers) {
      if (l.kind != tailorkv::runtime::KvPolicyKind::kSparse) continue;
      const int cand = std::max(ctx - l.sparse.sink - l.sparse.recent, 0);
      const double sel = std::min(l.sparse.top_k, cand);
      const double rows = config.n_kv_heads * sel * 2.0 * config.head_dim * (l.sparse.host_bits / 8.0);
      gather_bytes += rows;
      pcie_bytes += rows;
      if (l.sparse.index == "faithful") {
        pcie_bytes += static_cast<double>(config.n_kv_heads) * l.sparse.channels * cand * 2.0;
      }
    }
    // HBM floor: every weight but the embedding table (one row) and the
    // whole K/V of the context read once, at the 3.0 TB/s measured for a
    // device-to-device copy (../shared/design/PERF.md).
    const double layer_matrix_elems = static_cast<double>(config.hidden) *
        ((config.n_heads + 2 * config.n_kv_heads) * config.head_dim +
         config.n_heads * config.head_dim + 3.0 * config.ffn);
    // KV read per step: dense layers all of it; others (approximately) what
    // they keep on the GPU (the sequence's device KV bytes).
    double kv_read = 0;
    for (size_t l = 0; l < plan.layers.size(); ++l) {
      const auto b = (*seq)->kv_bytes()[l];
      kv_read += plan.layers[l].kind == tailorkv::runtime::KvPolicyKind::kDense
                     ? 2.0 * 2.0 * ctx * config.n_kv_heads * config.head_dim
                     : static_cast<double>(b.device_bytes);
    }
    // Layer matrices at their stored size (bf16, or a GGUF block type's
    // bytes per weight); the head stays bf16.
    const double weight_bytes = layer_weights == "q4_0"   ? 18.0 / 32
                                : layer_weights == "q4_1" ? 20.0 / 32
                                : layer_weights == "q8_0" ? 34.0 / 32
                                                          : 2.0;
    const double bytes = weight_bytes * layers * layer_matrix_elems +
                         2.0 * static_cast<double>(config.vocab) * config.hidden + kv_read;
    const double floor_ms = std::max(bytes / 3.0e12, pcie_bytes / 50e9) * 1e3;
    const auto reuse = tailorkv::cuda::SequenceSparseReuse(**seq);
    const double reused = reuse.selected_rows > 0
                              ? static_cast<double>(reuse.reused_rows) / reuse.selected_rows
                              : 0.0;
    const double pcie_fetched = pcie_bytes - reused * gather_bytes;
    std::printf("%-10d %-28s %10.3f %10.1f %12.2f %10.2f %12.2f   floor %.2f ms (%.0f%% of floor)"
                ", rows reused %.1f%%\n",
                ctx, plan.name.c_str(), med, 1000.0 / med, peak, host_bytes / 1e9, pcie_bytes / 1e6,
                floor_ms, 100.0 * floor_ms / med, 100.0 * reused);
    out["decode"].push_back({{"context", ctx}, {"plan", plan.name}, {"plan_summary", plan.Summary()},
                             {"host_kv_gb", host_bytes / 1e9}, {"pcie_bytes_per_token", pcie_bytes},
                             {"pcie_bytes_fetched_per_token", pcie_fetched},
                             {"ms_per_token_median", med},
                             {"ms_min", *std::min_element(ms.begin(), ms.end())},
                             {"steps", ms.size()}, {"peak_gpu_gb", peak},
                             {"hbm_bytes_per_token", bytes}, {"hbm_floor_ms", floor_ms},
                             {"kv_cache_gb", tailorkv::cuda::SequenceDeviceBytes(**seq) / 1e9},
                             {"rows_reused", reused}});
    // The sequence has room for these (capacity: steps + 8 past the context).
    if (tracer != nullptr) {
      // Own random tokens, so the untraced steps' inputs do not depend on tracing.
      std::mt19937 trace_rng(11);
      std::vector<int32_t> traced(3);
      for (auto& t : traced) t = decode_tokens == "repeat" ? repeated : tok(trace_rng);
      TraceDecodeSteps(*tracer, **backend, **seq, traced,
                       trace_dir + "/trace_" + std::to_string(ctx) + "_" + FileSafe(plan.name) + ".json",
                       {{"context", ctx}, {"plan", plan.name}, {"plan_summary", plan.Summary()},
                        {"device", prop.name}, {"decode_tokens", decode_tokens},
                        {"ms_per_token_median", med}, {"hbm_floor_ms", floor_ms}});
    }
  }
  std::printf("%-10s %-28s %12s %14s %14s %10s\n", "prefill", "plan", "seconds", "tokens/s",
              "peak GPU GB", "vs dense");
  for (int n : prefills) {
    std::vector<int32_t> ids(n);
    for (auto& t : ids) t = tok(rng);
    double dense_sec = 0;
    for (const auto& plan : plans) {
      // A short warm-up pass loads the prefill kernels; long runs repeat less.
      const int reps = n <= 32768 ? 3 : 1;
      std::vector<double> secs;
      double peak = 0;  // while the sequence (its KV cache) is alive
      for (int r = -1; r < reps; ++r) {
        const int len = r < 0 ? std::min(n, 512) : n;
        // Room for one decode step, as a real request has.
        auto seq = (*backend)->NewSequence(len + 1, plan);
        if (!seq.ok()) return Fail(seq.status(), "sequence");
        const auto t0 = Clock::now();
        if (auto s = (*backend)->Forward(**seq, absl::MakeConstSpan(ids).subspan(0, len), false,
                                         &logits, tailorkv::runtime::Backend::Mode::kPrefill);
            !s.ok()) {
          return Fail(s, "prefill");
        }
        if (r >= 0) secs.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        peak = std::max(peak, (DeviceUsedBytes() - base_used) / 1e9);
      }
      const double sec = Median(secs);
      if (plan.all_dense() && dense_sec == 0) dense_sec = sec;
      const double ratio = dense_sec > 0 ? sec / dense_sec : 0;
      std::printf("%-10d %-28s %12.3f %14.0f %14.2f %9.3fx\n", n, plan.name.c_str(), sec, n / sec,
                  peak, ratio);
      out["prefill"].push_back({{"tokens", n}, {"plan", plan.name}, {"plan_summary", plan.Summary()},
                                {"seconds", sec}, {"runs", secs.size()}, {"peak_gpu_gb", peak},
                                {"vs_dense", ratio}});
    }
  }
  out["weights_gpu_gb"] = (weights_used - base_used) / 1e9;
  if (!out_path.empty()) std::ofstream(out_path) << out.dump(2) << "\n";
  return 0;
}
