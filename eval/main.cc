// tkv_accuracy: accuracy of KV plans on one model (eval/README.md).
//
// Loads the model and tokenizer once, then runs eval/harness.h over the
// plans given with --plan ("dense" is always evaluated first, as the
// reference). Prints markdown tables on stdout, progress on stderr, and
// writes the full JSON report to --out.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/openmp_env.h"
#include "common/status_macros.h"
#include "eval/harness.h"
#include "eval/prompts.h"
#include "runtime/engine.h"
#include "runtime/kv_plan.h"
#ifdef TAILORKV_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace tailorkv::eval {
namespace {

struct CliConfig {
  std::string model = std::string(TAILORKV_MODEL_DIR) + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  std::string tokenizer_gguf;
  std::string backend = "auto";
  int threads = 0;
  std::vector<std::string> plans;
  std::vector<std::string> tasks = {"passkey", "needle", "agreement", "prompts"};
  std::string filler;  // default: DefaultFiller()
  std::string text_file;  // default: the filler file
  std::vector<std::string> prompt_files;
  std::string out = "results/accuracy.json";
  std::string log_level = "warn";
  // CUDA backend options (cuda_backend.h) the plans run under.
  bool cuda_row_reuse = true;  // CudaBackendOptions::sparse_row_reuse's default
  HarnessOptions harness;
};

// The shipped prose: in the source tree this binary was built from, else
// relative to the working directory (a bundle copied to another machine runs
// from the repository root there).
std::string DefaultFiller() {
  const std::string built = std::string(TAILORKV_EVAL_DATA_DIR) + "/prose.txt";
  std::error_code ec;
  if (std::filesystem::exists(built, ec)) return built;
  return "eval/data/prose.txt";
}

absl::Status ValidateTasks(const std::vector<std::string>& tasks, HarnessOptions& h) {
  h.run_passkey = h.run_needle = h.run_agreement = false;
  for (const std::string& t : tasks) {
    if (t == "passkey") {
      h.run_passkey = true;
    } else if (t == "needle") {
      h.run_needle = true;
    } else if (t == "agreement") {
      h.run_agreement = true;
    } else if (t != "prompts") {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tasks: unknown task '", t, "' (one of passkey, needle, agreement, prompts)"));
    }
  }
  return absl::OkStatus();
}

absl::Status Run(CliConfig& cfg) {
  HarnessOptions& h = cfg.harness;
  RETURN_IF_ERROR(ValidateTasks(cfg.tasks, h));
  const bool want_prompts =
      std::find(cfg.tasks.begin(), cfg.tasks.end(), "prompts") != cfg.tasks.end();
  if (!cfg.prompt_files.empty() && !want_prompts) {
    return absl::InvalidArgumentError("--prompt-file given but --tasks leaves out 'prompts'");
  }
  if (cfg.filler.empty()) cfg.filler = DefaultFiller();
  // Inputs are read before the model loads, so a typo fails in a second.
  if (h.run_needle || (h.run_agreement && cfg.text_file.empty())) {
    auto text = ReadTextFile(cfg.filler);
    if (!text.ok()) return absl::InvalidArgumentError(absl::StrCat("--filler: ", text.status().message()));
    h.needle_filler_text = *text;
    h.needle_filler_name = cfg.filler;
  }
  if (h.run_agreement) {
    if (cfg.text_file.empty()) {
      h.agreement_text = h.needle_filler_text;
      h.agreement_text_name = cfg.filler;
    } else {
      auto text = ReadTextFile(cfg.text_file);
      if (!text.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("--text-file: ", text.status().message()));
      }
      h.agreement_text = *text;
      h.agreement_text_name = cfg.text_file;
    }
  }
  for (const std::string& path : cfg.prompt_files) {
    auto cases = LoadPromptFile(path);
    if (!cases.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--prompt-file: ", cases.status().message()));
    }
    h.prompt_cases.insert(h.prompt_cases.end(), cases->begin(), cases->end());
  }

  runtime::EngineOptions eo;
  eo.model_path = cfg.model;
  eo.tokenizer_gguf = cfg.tokenizer_gguf;
  eo.backend = cfg.backend;
  eo.threads = cfg.threads;
#ifdef TAILORKV_HAVE_CUDA
  cuda::CudaBackendOptions cuda_options;
  cuda_options.sparse_row_reuse = cfg.cuda_row_reuse;
  eo.cuda_factory = [cuda_options](const model::ModelWeights& w) {
    return cuda::CreateCudaBackend(w, cuda_options);
  };
#endif
  std::fprintf(stderr, "loading %s (backend %s)\n", cfg.model.c_str(), cfg.backend.c_str());
  ASSIGN_OR_RETURN(auto engine, runtime::Engine::Create(eo));
  const model::ModelConfig& mc = engine->config();
  std::fprintf(stderr, "model %s: %d layers, %d heads (%d kv) x %d, context %d, backend %s\n",
               mc.name.c_str(), mc.n_layers, mc.n_heads, mc.n_kv_heads, mc.head_dim,
               mc.max_context, std::string(engine->backend_name()).c_str());

  // Plans: parsed against the model; dense first.
  std::vector<std::string> specs = {"dense"};
  for (const std::string& s : cfg.plans) {
    if (s != "dense") specs.push_back(s);
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (specs[i] == specs[j]) {
        return absl::InvalidArgumentError(absl::StrCat("--plan: '", specs[i], "' given twice"));
      }
    }
    auto plan = runtime::ParseKvPlanSpec(specs[i], mc);
    if (!plan.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--plan '", specs[i], "': ", plan.status().message()));
    }
    h.plans.push_back({specs[i], *std::move(plan)});
  }
  if (!h.plans.front().plan.all_dense()) {
    return absl::InternalError("the 'dense' spec did not give an all-dense plan");
  }

  h.progress = [](const std::string& line) {
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
  };
  HarnessModel model;
  model.backend = &engine->backend();
  model.tokenizer = &engine->tokenizer();
  model.chat_template = &engine->chat_template();
  model.description = cfg.model;
  const std::filesystem::path out_path(cfg.out);
  if (out_path.has_parent_path()) std::filesystem::create_directories(out_path.parent_path());
  // Written through a temporary file and a rename, so a reader (or a run
  // killed mid-write) never sees half a report.
  auto write_report = [&](const nlohmann::json& report) -> absl::Status {
    const std::string tmp = cfg.out + ".tmp";
    std::ofstream f(tmp);
    f << DumpReport(report) << "\n";
    f.close();
    std::error_code ec;
    if (f) std::filesystem::rename(tmp, out_path, ec);
    if (!f || ec) return absl::InternalError(absl::StrCat("--out: cannot write ", cfg.out));
    return absl::OkStatus();
  };
  absl::Status partial_write;
  h.on_plan_done = [&](const nlohmann::json& partial) {
    if (partial_write.ok()) partial_write = write_report(partial);
  };
  ASSIGN_OR_RETURN(nlohmann::json report, RunHarness(model, h));
  RETURN_IF_ERROR(partial_write);
  if (engine->backend_name() == "cuda") {
    report["settings"]["cuda_row_reuse"] = cfg.cuda_row_reuse;
  }

  std::fputs(RenderMarkdown(report).c_str(), stdout);
  std::fflush(stdout);
  RETURN_IF_ERROR(write_report(report));
  std::fprintf(stderr, "wrote %s\n", cfg.out.c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace tailorkv::eval

int main(int argc, char** argv) {
  // Passive OpenMP waiting unless the caller chose otherwise; see openmp_env.h.
  tailorkv::BoundOpenMpSpinning(argv);
  tailorkv::eval::CliConfig cfg;
  tailorkv::eval::HarnessOptions& h = cfg.harness;
  CLI::App app{"Accuracy of KV plans: passkey, needle in a haystack, teacher-forced agreement, "
               "prompt files, KV bytes"};
  app.add_option("--model", cfg.model, "GGUF file or safetensors directory")->capture_default_str();
  app.add_option("--tokenizer-gguf", cfg.tokenizer_gguf,
                 "GGUF file to take the tokenizer from (safetensors models)");
  app.add_option("--backend", cfg.backend, "auto, cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--threads", cfg.threads, "CPU threads (0 = all cores)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--plan", cfg.plans,
                 "KV plan specs, repeatable or comma-separated: dense, quant:BITS[:GROUP[:RESIDUAL]], "
                 "window:SINK:RECENT, tailorkv:BITS[:LAYERS], sparse:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX][:fp8], "
                 "hybrid:BITS:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX][:fp8], @plan.json (dense always runs "
                 "first)")
      ->delimiter(',');
  app.add_option("--tasks", cfg.tasks, "passkey, needle, agreement, prompts")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--lengths", h.lengths, "prompt lengths in tokens (passkey, needle)")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--depths", h.depths, "needle depths in [0, 1]")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--trials", h.trials, "prompts per (length, depth) cell")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--seed", h.seed, "seed of keys, cities, numbers and filler offsets")
      ->capture_default_str();
  app.add_option("--passkey-tokens", h.passkey_max_tokens, "greedy tokens decoded per passkey prompt")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--needle-tokens", h.needle_max_tokens, "greedy tokens decoded per needle prompt")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--filler", cfg.filler,
                 "natural prose for the needle task (default: eval/data/prose.txt)");
  app.add_option("--text-file", cfg.text_file,
                 "natural text for the agreement task (default: the --filler file)");
  app.add_option("--agreement-prefix", h.agreement_prefix,
                 "tokens prefilled before teacher forcing (clipped to the text and context)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--agreement-tokens", h.agreement_tokens, "teacher-forced decode steps")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--prompt-file", cfg.prompt_files, "JSONL prompt cases (repeatable)");
  app.add_option("--kv-capacity", h.kv_capacity,
                 "capacity for the KV-bytes figures (0 = the model's trained context)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--out", cfg.out, "JSON report path")->capture_default_str();
  app.add_option("--log-level", cfg.log_level, "library log level (stderr)")->capture_default_str();
  app.add_option("--cuda-row-reuse", cfg.cuda_row_reuse,
                 "CUDA backend: sparse rows selected again are copied on the device")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  if (absl::Status st = tailorkv::common::ConfigureLogging(cfg.log_level); !st.ok()) {
    std::fprintf(stderr, "tkv_accuracy: --%s\n", std::string(st.message()).c_str());
    return 2;
  }
  if (absl::Status st = tailorkv::eval::Run(cfg); !st.ok()) {
    std::fprintf(stderr, "tkv_accuracy: %s\n", st.ToString().c_str());
    return absl::IsInvalidArgument(st) ? 2 : 1;
  }
  return 0;
}
