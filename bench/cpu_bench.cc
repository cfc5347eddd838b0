// tkv_cpu_bench: prefill and decode throughput of the CPU backend on a real
// GGUF model, batch 1.
//
//  - prefill: a fresh sequence per run, one Forward over N random token ids
//    (last-token logits only, as the engine does); median of --runs runs, one
//    run at sizes above --single-run-above;
//  - decode: a fresh sequence, an untimed prefill of C tokens, then
//    --decode-steps Forwards of one token each; reports tokens/s over all
//    steps and the median step.
//
// Token ids come from a fixed seed (values do not change the work, but they
// are never all equal). Prints a table and writes JSON to --out.
//
// Byte and FLOP counts (float32 weights, or the GGUF blocks with --weights quantized):
// decode reads every weight once per token plus the KV cache so far; prefill
// does 2 FLOPs per weight per token plus causal attention,
// 2 * n^2 * n_heads * head_dim per layer (QK^T and PV, half masked).
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "common/malloc_env.h"
#include "common/openmp_env.h"
#include "model/gguf_file.h"
#include "model/llama_weights.h"
#include "nlohmann/json.hpp"
#include "runtime/backend.h"
#include "runtime/cpu_backend.h"

namespace tailorkv::bench {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

struct BenchConfig {
  std::string model = std::string(TAILORKV_MODEL_DIR) + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  int threads = 0;  // 0 = all cores
  std::vector<int> prefill_sizes = {512, 2048, 8192};
  std::vector<int> decode_contexts = {512, 2048};
  int decode_steps = 128;
  int runs = 3;
  int single_run_above = 4096;
  uint64_t seed = 1234;
  std::string out = "results/cpu_bench.json";
  std::string weights = "float";  // or "quantized": kept in their GGUF blocks
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double MsSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

std::vector<int32_t> RandomTokens(std::mt19937_64& rng, int n, int vocab) {
  std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = dist(rng);
  return ids;
}

// Elements multiplied per token and the bytes read for them (float32, or
// the GGUF blocks of quantized tensors). Embedding rows are gathered, not
// multiplied: the head counts, the embedding does not (unless tied).
struct WeightSize {
  int64_t elems = 0;
  double bytes = 0;
};
WeightSize WeightsRead(const model::ModelWeights& w) {
  WeightSize s;
  auto add = [&](const model::Tensor& t) {
    const int64_t e = t.quantized() ? t.rows() * t.cols() : static_cast<int64_t>(t.data.size());
    s.elems += e;
    s.bytes += t.quantized() ? static_cast<double>(t.quant.size) : 4.0 * e;
  };
  add(w.head());
  add(w.output_norm);
  for (const model::LayerWeights& l : w.layers) {
    for (const model::Tensor* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_norm,
                                   &l.w_gate, &l.w_up, &l.w_down}) {
      add(*t);
    }
  }
  return s;
}

// The 1-minute load average: on a shared machine it says how much the
// figures were disturbed by other processes.
double LoadAverage() {
  std::ifstream in("/proc/loadavg");
  double one_minute = -1;
  in >> one_minute;
  return one_minute;
}

absl::Status Run(const BenchConfig& cfg) {
  auto gguf = model::GgufFile::Open(cfg.model);
  if (!gguf.ok()) return gguf.status();
  std::shared_ptr<const model::GgufFile> file(std::move(*gguf));
  auto weights = model::LoadWeightsFromGguf(file, {.keep_quantized = cfg.weights == "quantized"});
  if (!weights.ok()) return weights.status();
  const model::ModelConfig mc = weights->config;
  const WeightSize wsize = WeightsRead(*weights);
  const int64_t weight_elems = wsize.elems;
  std::printf("weights %s: %d tensors quantized, %.1f MB read per token\n", cfg.weights.c_str(),
              weights->QuantizedTensors(), wsize.bytes / 1e6);
  runtime::CpuBackendOptions options;
  options.threads = cfg.threads;
  auto backend_or = runtime::CreateCpuBackend(std::move(*weights), options);
  if (!backend_or.ok()) return backend_or.status();
  runtime::Backend& backend = **backend_or;
  const int threads = cfg.threads > 0 ? cfg.threads : static_cast<int>(std::thread::hardware_concurrency());

  std::printf("model %s: %d layers, hidden %d, heads %d/%d x %d, ffn %d, vocab %d\n",
              cfg.model.c_str(), mc.n_layers, mc.hidden, mc.n_heads, mc.n_kv_heads, mc.head_dim,
              mc.ffn, mc.vocab);
  const char* wait_policy = std::getenv("OMP_WAIT_POLICY");
  const char* spin_count = std::getenv("GOMP_SPINCOUNT");
  std::printf("threads %d (hardware %u), OMP_WAIT_POLICY=%s, GOMP_SPINCOUNT=%s, seed %llu, runs %d, decode steps %d\n",
              threads, std::thread::hardware_concurrency(), wait_policy ? wait_policy : "(unset)",
              spin_count ? spin_count : "(unset)",
              static_cast<unsigned long long>(cfg.seed), cfg.runs, cfg.decode_steps);

  std::mt19937_64 rng(cfg.seed);
  std::vector<float> logits;
  const double kv_bytes_per_token = 2.0 * mc.n_layers * mc.n_kv_heads * mc.head_dim * sizeof(float);
  const double attn_flops_per_pair = 2.0 * 2.0 * mc.n_layers * mc.n_heads * mc.head_dim;

  // Warm-up: thread pool, BLAS buffers, page faults on the weights.
  {
    auto seq = backend.NewSequence(64);
    if (!seq.ok()) return seq.status();
    const std::vector<int32_t> ids = RandomTokens(rng, 64, mc.vocab);
    if (absl::Status st = backend.Forward(**seq, ids, false, &logits); !st.ok()) return st;
  }

  json out;
  out["model"] = cfg.model;
  out["config"] = {{"n_layers", mc.n_layers}, {"hidden", mc.hidden}, {"n_heads", mc.n_heads},
                   {"n_kv_heads", mc.n_kv_heads}, {"head_dim", mc.head_dim}, {"ffn", mc.ffn},
                   {"vocab", mc.vocab}, {"weights", cfg.weights}, {"weight_bytes_read", wsize.bytes}};
  out["threads"] = threads;
  out["hardware_concurrency"] = std::thread::hardware_concurrency();
  out["seed"] = cfg.seed;
  out["load_average_start"] = LoadAverage();
  out["omp_wait_policy"] = wait_policy ? wait_policy : "";
  out["gomp_spincount"] = spin_count ? spin_count : "";

  std::printf("\n%-8s %8s %5s %12s %12s %10s\n", "phase", "tokens", "runs", "median ms",
              "tokens/s", "GFLOP/s");
  json prefill = json::array();
  for (const int n : cfg.prefill_sizes) {
    if (n > mc.max_context) {
      std::printf("prefill %d: skipped, above the model's context %d\n", n, mc.max_context);
      continue;
    }
    const int runs = n > cfg.single_run_above ? 1 : cfg.runs;
    std::vector<double> ms;
    for (int r = 0; r < runs; ++r) {
      const std::vector<int32_t> ids = RandomTokens(rng, n, mc.vocab);
      auto seq = backend.NewSequence(n);
      if (!seq.ok()) return seq.status();
      const auto t0 = Clock::now();
      if (absl::Status st = backend.Forward(**seq, ids, false, &logits); !st.ok()) return st;
      ms.push_back(MsSince(t0));
    }
    const double med = Median(ms);
    const double flops = 2.0 * weight_elems * n + attn_flops_per_pair * 0.5 * n * n;
    const double gflops = flops / (med * 1e-3) / 1e9;
    std::printf("%-8s %8d %5d %12.1f %12.1f %10.1f\n", "prefill", n, runs, med, n / (med * 1e-3),
                gflops);
    std::fflush(stdout);
    prefill.push_back({{"tokens", n}, {"runs", runs}, {"ms", ms}, {"median_ms", med},
                       {"tokens_per_s", n / (med * 1e-3)}, {"model_gflop", flops / 1e9},
                       {"gflop_per_s", gflops}});
  }
  out["prefill"] = prefill;

  std::printf("\n%-8s %8s %5s %12s %12s %10s\n", "phase", "context", "steps", "median ms",
              "tokens/s", "GB/s");
  json decode = json::array();
  for (const int ctx : cfg.decode_contexts) {
    if (ctx + cfg.decode_steps > mc.max_context) {
      std::printf("decode after %d: skipped, above the model's context %d\n", ctx, mc.max_context);
      continue;
    }
    auto seq = backend.NewSequence(ctx + cfg.decode_steps);
    if (!seq.ok()) return seq.status();
    const std::vector<int32_t> prompt = RandomTokens(rng, ctx, mc.vocab);
    if (absl::Status st = backend.Forward(**seq, prompt, false, &logits); !st.ok()) return st;
    const std::vector<int32_t> next = RandomTokens(rng, cfg.decode_steps, mc.vocab);
    std::vector<double> ms;
    const auto t_all = Clock::now();
    for (int s = 0; s < cfg.decode_steps; ++s) {
      const auto t0 = Clock::now();
      if (absl::Status st = backend.Forward(**seq, absl::MakeConstSpan(&next[s], 1), false, &logits);
          !st.ok()) {
        return st;
      }
      ms.push_back(MsSince(t0));
    }
    const double total_ms = MsSince(t_all);
    const double med = Median(ms);
    const double tps = cfg.decode_steps / (total_ms * 1e-3);
    // Bytes of one step at the mean context: every weight plus the cache.
    const double bytes = wsize.bytes + kv_bytes_per_token * (ctx + cfg.decode_steps / 2.0);
    const double gbps = bytes / (med * 1e-3) / 1e9;
    std::printf("%-8s %8d %5d %12.2f %12.1f %10.1f\n", "decode", ctx, cfg.decode_steps, med, tps, gbps);
    std::fflush(stdout);
    decode.push_back({{"context", ctx}, {"steps", cfg.decode_steps}, {"total_ms", total_ms},
                      {"median_step_ms", med}, {"tokens_per_s", tps},
                      {"bytes_per_step", bytes}, {"gb_per_s_at_median", gbps}});
  }
  out["decode"] = decode;
  out["load_average_end"] = LoadAverage();
  std::printf("\n1-minute load average: %.2f at start, %.2f at end (%u hardware threads)\n",
              out["load_average_start"].get<double>(), out["load_average_end"].get<double>(),
              std::thread::hardware_concurrency());

  const std::filesystem::path out_path(cfg.out);
  if (out_path.has_parent_path()) std::filesystem::create_directories(out_path.parent_path());
  std::ofstream f(out_path);
  f << out.dump(2) << "\n";
  if (!f) return absl::InternalError("cannot write " + cfg.out);
  std::printf("\nwrote %s\n", cfg.out.c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace tailorkv::bench

int main(int argc, char** argv) {
  // Passive OpenMP waiting unless the caller chose otherwise; see openmp_env.h.
  tailorkv::BoundOpenMpSpinning(argv);
  tailorkv::BoundMallocCaching();  // as the worker runs
  tailorkv::bench::BenchConfig cfg;
  CLI::App app{"CPU backend prefill/decode throughput (batch 1)"};
  app.add_option("--model", cfg.model, "GGUF model file")->check(CLI::ExistingFile);
  app.add_option("--threads", cfg.threads, "CPU threads (0 = all cores)")->check(CLI::NonNegativeNumber);
  app.add_option("--prefill", cfg.prefill_sizes, "prefill sizes in tokens")->delimiter(',');
  app.add_option("--decode-after", cfg.decode_contexts, "contexts to decode after")->delimiter(',');
  app.add_option("--decode-steps", cfg.decode_steps, "decode steps per context")->check(CLI::PositiveNumber);
  app.add_option("--runs", cfg.runs, "runs per prefill size (median)")->check(CLI::PositiveNumber);
  app.add_option("--single-run-above", cfg.single_run_above, "prefill sizes above this run once");
  app.add_option("--seed", cfg.seed, "seed of the random token ids");
  app.add_option("--out", cfg.out, "JSON output path");
  app.add_option("--weights", cfg.weights, "float (dequantized to float32 at load) or quantized (GGUF blocks)")
      ->check(CLI::IsMember({"float", "quantized"}));
  CLI11_PARSE(app, argc, argv);
  for (const int n : cfg.prefill_sizes) {
    if (n < 1) {
      std::fprintf(stderr, "--prefill: sizes must be >= 1, got %d\n", n);
      return 2;
    }
  }
  for (const int n : cfg.decode_contexts) {
    if (n < 1) {
      std::fprintf(stderr, "--decode-after: contexts must be >= 1, got %d\n", n);
      return 2;
    }
  }
  if (absl::Status st = tailorkv::bench::Run(cfg); !st.ok()) {
    std::fprintf(stderr, "tkv_cpu_bench: %s\n", st.ToString().c_str());
    return 1;
  }
  return 0;
}
