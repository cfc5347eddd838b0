// Selection locality of sparse layers on a real model (CPU backend): per
// decode step and sparse layer, the fraction of the Top-K prompt positions
// (per KV head) that the previous step also selected. A row selected again
// is already in the device tier, so this fraction bounds how much of each
// step's host-to-GPU gather a row cache could skip.
//
//   tkv_selection_locality --plans hybrid:2:896:64:64:32:gpu,hybrid:2:128:8:56:32:gpu
//       --prompt-file eval/data/retrieval_facts.jsonl --cases 6 --steps 24 --out r.json
//
// Prompts are the prompt file's cases (the first --cases whose prompt is at
// least --min-tokens long); decoding is greedy. Prints a table per plan and
// writes JSON (per plan: mean reuse per layer and overall, steps counted).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/gguf_file.h"
#include "model/llama_weights.h"
#include "runtime/cpu_backend.h"
#include "runtime/kv_plan.h"
#include "tokenizer/tokenizer.h"

namespace {

int Fail(const std::string& what, const absl::Status& s) {
  std::fprintf(stderr, "tkv_selection_locality: %s: %s\n", what.c_str(), s.ToString().c_str());
  return 1;
}

// |a ∩ b| for two ascending lists.
int Common(const std::vector<int>& a, const std::vector<int>& b) {
  int n = 0;
  for (size_t i = 0, j = 0; i < a.size() && j < b.size();) {
    if (a[i] == b[j]) ++n, ++i, ++j;
    else if (a[i] < b[j]) ++i;
    else ++j;
  }
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace tailorkv;
  std::string model_path = std::string(TAILORKV_MODEL_DIR) + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  std::string prompt_file = "eval/data/retrieval_facts.jsonl";
  std::string out_path;
  std::vector<std::string> specs = {"hybrid:2:896:64:64:32:gpu"};
  int cases = 6, steps = 24, min_tokens = 2000, threads = 0;
  CLI::App app{"Selection locality of sparse layers (CPU backend, real model)"};
  app.add_option("--model", model_path, "GGUF model")->capture_default_str();
  app.add_option("--prompt-file", prompt_file, "JSONL prompt cases (eval/README.md)")
      ->capture_default_str();
  app.add_option("--plans", specs, "KV plan specs")->delimiter(',');
  app.add_option("--cases", cases, "prompts used")->check(CLI::Range(1, 1000));
  app.add_option("--steps", steps, "decode steps per prompt")->check(CLI::Range(2, 4096));
  app.add_option("--min-tokens", min_tokens, "shortest prompt used")->check(CLI::Range(1, 1 << 20));
  app.add_option("--threads", threads, "CPU threads (0 = all)");
  app.add_option("--out", out_path, "JSON results file");
  CLI11_PARSE(app, argc, argv);

  auto gguf = model::GgufFile::Open(model_path);
  if (!gguf.ok()) return Fail("--model " + model_path, gguf.status());
  auto weights = model::LoadWeightsFromGguf(**gguf);
  if (!weights.ok()) return Fail("weights", weights.status());
  auto tspec = tokenizer::TokenizerSpecFromGguf(**gguf);
  if (!tspec.ok()) return Fail("tokenizer", tspec.status());
  auto tok = tokenizer::Tokenizer::Create(*std::move(tspec));
  if (!tok.ok()) return Fail("tokenizer", tok.status());
  const model::ModelConfig config = weights->config;
  auto backend = runtime::CreateCpuBackend(*std::move(weights), {.threads = threads});
  if (!backend.ok()) return Fail("backend", backend.status());

  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> names;
  std::ifstream in(prompt_file);
  if (!in) return Fail("--prompt-file " + prompt_file, absl::NotFoundError("cannot open"));
  for (std::string line; std::getline(in, line) && static_cast<int>(prompts.size()) < cases;) {
    if (line.empty() || line[0] == '#') continue;
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("prompt")) {
      return Fail("--prompt-file " + prompt_file, absl::InvalidArgumentError("a line is not a case"));
    }
    auto ids = (*tok)->Encode(j["prompt"].get<std::string>(), /*add_bos=*/false,
                                /*parse_special=*/false);
    if (!ids.ok()) return Fail("encode", ids.status());
    if (static_cast<int>(ids->size()) < min_tokens ||
        static_cast<int>(ids->size()) + steps > config.max_context) {
      continue;
    }
    prompts.push_back(*std::move(ids));
    names.push_back(j.value("name", ""));
  }
  if (prompts.empty()) {
    return Fail("--prompt-file", absl::InvalidArgumentError("no case is long enough"));
  }

  nlohmann::json out = {{"tool", "tkv_selection_locality"}, {"model", config.name},
                        {"prompts", names}, {"steps", steps}};
  std::printf("%-32s %8s %10s %10s %10s\n", "plan", "prompts", "reuse", "min layer", "max layer");
  for (const std::string& spec : specs) {
    auto plan = runtime::ParseKvPlanSpec(spec, config);
    if (!plan.ok()) return Fail("--plans", plan.status());
    std::vector<double> common(config.n_layers, 0), total(config.n_layers, 0);
    for (const auto& prompt : prompts) {
      auto seq = (*backend)->NewSequence(static_cast<int>(prompt.size()) + steps, *plan);
      if (!seq.ok()) return Fail("sequence", seq.status());
      std::vector<float> logits;
      if (auto s = (*backend)->Forward(**seq, prompt, false, &logits,
                                       runtime::Backend::Mode::kPrefill);
          !s.ok()) {
        return Fail("prefill", s);
      }
      std::vector<std::vector<std::vector<int>>> prev(config.n_layers);
      for (int step = 0; step < steps; ++step) {
        const int32_t next = static_cast<int32_t>(
            std::max_element(logits.begin(), logits.begin() + config.vocab) - logits.begin());
        if (auto s = (*backend)->Forward(**seq, {&next, 1}, false, &logits,
                                         runtime::Backend::Mode::kDecode);
            !s.ok()) {
          return Fail("decode", s);
        }
        for (int l = 0; l < config.n_layers; ++l) {
          auto sel = runtime::CpuSparseLastSelection(**seq, l);
          if (sel.empty()) continue;
          if (step > 0) {
            for (size_t h = 0; h < sel.size(); ++h) {
              common[l] += Common(sel[h], prev[l][h]);
              total[l] += static_cast<double>(sel[h].size());
            }
          }
          prev[l] = std::move(sel);
        }
      }
    }
    double c = 0, t = 0, lo = 1, hi = 0;
    nlohmann::json layers = nlohmann::json::array();
    for (int l = 0; l < config.n_layers; ++l) {
      if (total[l] == 0) continue;
      const double r = common[l] / total[l];
      lo = std::min(lo, r);
      hi = std::max(hi, r);
      c += common[l];
      t += total[l];
      layers.push_back({{"layer", l}, {"reuse", r}});
    }
    const double reuse = t > 0 ? c / t : 0;
    std::printf("%-32s %8zu %9.1f%% %9.1f%% %9.1f%%\n", spec.c_str(), prompts.size(), 100 * reuse,
                100 * lo, 100 * hi);
    out["plans"].push_back({{"spec", spec}, {"summary", plan->Summary()}, {"reuse", reuse},
                            {"layers", layers}});
  }
  if (!out_path.empty()) std::ofstream(out_path) << out.dump(2) << "\n";
  return 0;
}
