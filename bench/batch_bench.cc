// Decode throughput of the CUDA backend against batch size (continuous
// batching, issue 14): a Llama-3.1-8B-shaped model with random bf16 weights,
// for each context and KV plan, B sequences of `context` random K/V tokens
// stepped together through Backend::DecodeBatch. B grows through --batches
// until the next sequence cannot be made (the GPU memory left after the
// weights, or the host memory of the sparse layers' tier: the limit is
// reported), so every plan gets the same card and the same host memory.
// Per batch size: generated tokens/s, the step time (each sequence's
// inter-token latency) p50 / p99, and bytes held.
//
// --pick: what becomes of the logits (none / host greedy / device greedy).
// Decode tokens: --decode-tokens repeat (default, as tkv_llama_bench's
// figures) or random (see --help).
//
//   tkv_batch_bench --contexts 32768,131072 --batches 1,2,4,8,16 --out r.json
//       --plans dense,hybrid:2:896:64:64:32:gpu:late:i8
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "cuda/cuda_backend.h"
#include "model/shapes.h"
#include "runtime/kv_plan.h"
#include "runtime/sampler.h"

namespace {

using Clock = std::chrono::steady_clock;

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

size_t DeviceFreeBytes() {
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  return free_b;
}

int Fail(const absl::Status& s, const char* what) {
  std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
  return 1;
}

// Which resource refused a sequence, from the status the backend returned.
std::string Limit(const absl::Status& s) {
  const std::string m(s.message());
  if (m.find("host KV") != std::string::npos || m.find("host memory") != std::string::npos) {
    return "host memory";
  }
  if (m.find("out of memory") != std::string::npos || m.find("cudaMalloc") != std::string::npos ||
      s.code() == absl::StatusCode::kResourceExhausted) {
    return "GPU memory";
  }
  return "error: " + s.ToString();
}

}  // namespace

// Keeps the host picks from being optimized away.
volatile int64_t picked_sum = 0;

int main(int argc, char** argv) {
  CLI::App app{"decode tokens/s against batch size, 8B shape (CUDA)"};
  std::vector<int> contexts = {32768, 131072};
  std::vector<int> batches = {1, 2, 4, 8, 16, 32};
  std::vector<std::string> plan_specs = {"dense", "hybrid:2:896:64:64:32:gpu:late:i8"};
  int steps = 16, layers = 32;
  uint64_t host_budget_gib = 0;
  std::string out_path, decode_tokens = "repeat", pick = "none";
  app.add_option("--contexts", contexts, "context lengths")->delimiter(',');
  app.add_option("--batches", batches, "batch sizes, ascending (stops at the first that does not fit)")
      ->delimiter(',');
  app.add_option("--plans", plan_specs, "KV plan specs (runtime/kv_plan.h)")->delimiter(',');
  app.add_option("--steps", steps, "timed steps per batch size")->check(CLI::Range(4, 10000));
  app.add_option("--layers", layers, "layers (32 for the real shape)")->check(CLI::Range(1, 32));
  app.add_option("--host-budget-gib", host_budget_gib,
                 "host memory for the sparse layers' tier (0: 80% of physical memory)");
  app.add_option("--decode-tokens", decode_tokens,
                 "repeat: each sequence feeds its own token every step (the sparse layers then reselect "
                 "~75% of their rows from one step to the next, near the 81% of real text on SmolLM2); "
                 "random: a new random token each step (few rows reselected: the PCIe worst case)")
      ->check(CLI::IsMember({"repeat", "random"}));
  app.add_option("--pick", pick,
                 "none: DecodeBatch, logits to the host (earlier figures); host: that plus the greedy "
                 "pick of every row on the host (the engine before DecodeBatchPick); device: "
                 "DecodeBatchPick, greedy tokens picked on the GPU, only ids cross")
      ->check(CLI::IsMember({"none", "host", "device"}));
  app.add_option("--out", out_path, "JSON results file");
  CLI11_PARSE(app, argc, argv);
  if (!std::is_sorted(batches.begin(), batches.end()) || batches.empty() || batches[0] < 1) {
    std::fprintf(stderr, "--batches: positive sizes in ascending order\n");
    return 2;
  }

  auto config = tailorkv::model::Llama31_8BShape();
  config.n_layers = layers;
  // Each sequence decodes through every batch size it is part of.
  constexpr int kWarmSteps = 3;  // eager, capture, first replay
  const int decoded = static_cast<int>(batches.size()) * (steps + kWarmSteps);
  for (int ctx : contexts) config.max_context = std::max(config.max_context, ctx + decoded + 8);
  std::vector<tailorkv::runtime::KvPlan> plans;
  for (const std::string& spec : plan_specs) {
    auto plan = tailorkv::runtime::ParseKvPlanSpec(spec, config);
    if (!plan.ok()) return Fail(plan.status(), "plan");
    plans.push_back(*plan);
  }
  tailorkv::cuda::CudaBackendOptions opts;
  opts.host_kv_budget_bytes = host_budget_gib << 30;
  opts.device_greedy_pick = pick == "device";
  auto backend = tailorkv::cuda::CreateCudaBackendWithRandomWeights(config, 1234, opts);
  if (!backend.ok()) return Fail(backend.status(), "backend");
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  const size_t free_after_weights = DeviceFreeBytes();
  nlohmann::json out = {{"model", config.name},
                        {"layers", layers},
                        {"device", prop.name},
                        {"steps", steps},
                        {"decode_tokens", decode_tokens},
                        {"backend_device_gb", tailorkv::cuda::BackendDeviceBytes(**backend) / 1e9},
                        {"gpu_free_after_weights_gb", free_after_weights / 1e9}};
  std::printf("device %s: %.2f GB free for KV after the weights and workspaces\n", prop.name,
              free_after_weights / 1e9);
  std::printf("%-8s %-36s %6s %11s %10s %10s %10s %10s\n", "context", "plan", "batch", "tokens/s",
              "step p50", "step p99", "GPU GB", "host GB");
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(0, config.vocab - 1);
  for (int ctx : contexts) {
    for (const auto& plan : plans) {
      std::vector<std::unique_ptr<tailorkv::runtime::SequenceState>> seqs;
      std::string limit;
      double base_tps = 0;
      int measured = 0;
      // Steps the first B sequences together; false on a decode error.
      auto measure = [&](int B) {
        std::vector<tailorkv::runtime::SequenceState*> batch;
        for (int b = 0; b < B; ++b) batch.push_back(seqs[b].get());
        std::vector<int32_t> tokens(B);
        for (auto& t : tokens) t = tok(rng);
        std::vector<float> logits;
        std::vector<int32_t> picked;
        std::vector<absl::Status> per_seq;
        std::vector<double> ms;
        for (int i = 0; i < steps + kWarmSteps; ++i) {
          if (decode_tokens == "random") {
            for (auto& t : tokens) t = tok(rng);
          }
          const auto t0 = Clock::now();
          absl::Status s;
          if (pick == "device") {
            std::vector<tailorkv::runtime::Backend::GreedyPickRequest> greedy(B, {true, 1.0f, {}});
            s = (*backend)->DecodeBatchPick(batch, tokens, greedy, &logits, &picked, &per_seq);
            for (size_t b = 0; s.ok() && b < per_seq.size(); ++b) s = per_seq[b];
          } else {
            s = (*backend)->DecodeBatch(batch, tokens, &logits);
            for (int b = 0; s.ok() && pick == "host" && b < B; ++b) {
              picked_sum = picked_sum + tailorkv::runtime::GreedyPick(
                  absl::MakeConstSpan(logits.data() + static_cast<size_t>(b) * config.vocab, config.vocab),
                  1.0f, {});
            }
          }
          if (!s.ok()) {
            Fail(s, "decode batch");
            return false;
          }
          const double dt = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
          if (i >= kWarmSteps) ms.push_back(dt);
        }
        const double p50 = Percentile(ms, 0.5), p99 = Percentile(ms, 0.99);
        const double tps = B * 1000.0 / p50;
        if (base_tps == 0) base_tps = tps;
        double host = 0;
        for (const auto& s : seqs) {
          for (const auto& b : s->kv_bytes()) host += static_cast<double>(b.host_bytes);
        }
        const double gpu = (free_after_weights - DeviceFreeBytes()) / 1e9;
        std::printf("%-8d %-36s %6d %11.1f %10.3f %10.3f %10.2f %10.2f\n", ctx, plan.name.c_str(), B,
                    tps, p50, p99, gpu, host / 1e9);
        out["runs"].push_back({{"context", ctx}, {"plan", plan.name}, {"plan_summary", plan.Summary()},
                               {"batch", B}, {"tokens_per_s", tps}, {"step_ms_p50", p50},
                               {"step_ms_p99", p99}, {"speedup_vs_first_batch", tps / base_tps},
                               {"kv_gpu_gb", gpu}, {"host_kv_gb", host / 1e9}, {"pick", pick}});
        measured = B;
        return true;
      };
      for (int B : batches) {
        while (static_cast<int>(seqs.size()) < B) {
          auto seq = (*backend)->NewSequence(ctx + decoded + 8, plan);
          absl::Status st = seq.status();
          if (st.ok()) st = tailorkv::cuda::FillSequenceWithRandomKv(**seq, ctx, 99 + seqs.size());
          if (!st.ok()) {
            limit = Limit(st);
            std::printf("%-8d %-36s %6zu   does not fit: %s (%s)\n", ctx, plan.name.c_str(),
                        seqs.size() + 1, limit.c_str(), std::string(st.message()).c_str());
            break;
          }
          seqs.push_back(std::move(*seq));
        }
        if (static_cast<int>(seqs.size()) < B) break;
        if (!measure(B)) return 1;
      }
      // The largest batch that fits, when it lies between two listed sizes.
      if (!limit.empty() && static_cast<int>(seqs.size()) > measured && !measure(static_cast<int>(seqs.size()))) {
        return 1;
      }
      out["limits"].push_back({{"context", ctx}, {"plan", plan.name},
                               {"max_batch", static_cast<int>(seqs.size())},
                               {"limit", limit.empty() ? "--batches" : limit}});
      seqs.clear();  // the next plan starts from the same free memory
    }
  }
  if (!out_path.empty()) std::ofstream(out_path) << out.dump(2) << "\n";
  return 0;
}
