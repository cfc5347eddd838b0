// tkv-profile: the profiler from a command line.
//   tkv-profile run  --model PATH [--calibration FILE | --calibration-random N] [settings]
//                    [--out DIR] [--server HOST:PORT]
//       Profiles locally (the model file's directory is the model directory;
//       "synthetic:llama-3.1-8b" on a CUDA build) or, with --server, asks a
//       profiler service (then --model is a model name of that service).
//       Shows a progress bar, prints the per-layer table, writes
//       DIR/plan.json and DIR/plan.png (atomically).
//   tkv-profile get  --server HOST:PORT (--id ID | --digest sha256:...) [--out DIR]
//   tkv-profile list --server HOST:PORT [--digest sha256:...]
// Exit codes: 0 done, 1 the profile or a call failed, 2 bad command line.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <CLI/CLI.hpp>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include "absl/strings/str_cat.h"
#include "common/atomic_file.h"
#include "model/shapes.h"
#include "nlohmann/json.hpp"
#include "profiler/profile_runner.h"
#include "profiler/profiler_service.h"
#include "profiler/cuda_factories.h"
#include "tailorkv/v1/profiler.grpc.pb.h"

namespace tp = tailorkv::profiler;
namespace v1 = tailorkv::v1;

namespace {

using SteadyClock = std::chrono::steady_clock;

// One line on a terminal redrawn in place; elsewhere (logs, CI) a line per
// stage and per quarter of it.
class ProgressBar {
 public:
  ProgressBar() : tty_(::isatty(STDERR_FILENO) == 1), t0_(SteadyClock::now()) {}
  ~ProgressBar() { Finish(); }
  void Show(const std::string& stage, int64_t done, int64_t total) {
    const double s = std::chrono::duration<double>(SteadyClock::now() - t0_).count();
    const double frac = total > 0 ? static_cast<double>(done) / total : 0;
    if (tty_) {
      constexpr int kWidth = 30;
      const int fill = static_cast<int>(frac * kWidth);
      std::string bar = std::string(fill, '#') + std::string(kWidth - fill, '.');
      std::fprintf(stderr, "\r%-10s [%s] %s %6.1f s ", stage.c_str(), bar.c_str(),
                   Count(stage, done, total).c_str(), s);
      std::fflush(stderr);
      open_ = true;
      return;
    }
    const int quarter = static_cast<int>(frac * 4);
    if (stage == stage_ && quarter == quarter_) return;
    stage_ = stage;
    quarter_ = quarter;
    std::fprintf(stderr, "%-10s %s %6.1f s\n", stage.c_str(), Count(stage, done, total).c_str(), s);
  }
  void Finish() {
    if (open_) std::fprintf(stderr, "\n");
    open_ = false;
  }

 private:
  static std::string Count(const std::string& stage, int64_t done, int64_t total) {
    if (total <= 0) return "";
    if (stage == "digest") {
      return absl::StrCat(done >> 20, "/", total >> 20, " MiB");
    }
    return absl::StrCat(done, "/", total, stage == "prefill" ? " tokens" : stage == "layers" ? " layers" : "");
  }
  bool tty_;
  bool open_ = false;
  SteadyClock::time_point t0_;
  std::string stage_;
  int quarter_ = -1;
};

std::string ReadFile(const std::string& path, bool* ok) {
  std::ifstream in(path, std::ios::binary);
  *ok = static_cast<bool>(in);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int Fail(const std::string& what) {
  std::fprintf(stderr, "tkv-profile: %s\n", what.c_str());
  return 1;
}

void PrintLayers(const std::string& plan_json) {
  const auto doc = nlohmann::json::parse(plan_json);
  std::printf("%5s  %-7s %10s %10s %12s %12s\n", "layer", "policy", "width", "dense_pref",
              "sparse_err", "quant_err");
  for (const auto& l : doc["layers"]) {
    // Bits of a quantized layer, critical channels and Top-K of a sparse one.
    const std::string width =
        l.contains("bits")       ? absl::StrCat(l.value("bits", 0), "b")
        : l.contains("channels") ? absl::StrCat("d", l.value("channels", 0), " k", l.value("top_k", 0))
                                 : "";
    std::printf("%5d  %-7s %10s %10.4f %12.4g %12.4g\n", l.value("layer", 0),
                l.value("policy", "").c_str(), width.c_str(), l.value("dense_preference", -1.0),
                l.value("sparse_error", -1.0), l.value("quant_error", -1.0));
  }
}

int WriteOutputs(const std::string& out_dir, const std::string& plan_json,
                 const std::string& png) {
  if (out_dir.empty()) return 0;
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return Fail(absl::StrCat("--out ", out_dir, ": ", ec.message()));
  const std::string plan_path = (std::filesystem::path(out_dir) / "plan.json").string();
  if (auto st = tailorkv::common::WriteFileAtomically(plan_path, plan_json); !st.ok()) {
    return Fail(st.ToString());
  }
  std::printf("plan: %s\n", plan_path.c_str());
  if (!png.empty()) {
    const std::string png_path = (std::filesystem::path(out_dir) / "plan.png").string();
    if (auto st = tailorkv::common::WriteFileAtomically(png_path, png); !st.ok()) {
      return Fail(st.ToString());
    }
    std::printf("plot: %s\n", png_path.c_str());
  }
  return 0;
}

std::shared_ptr<grpc::Channel> Channel(const std::string& server) {
  return grpc::CreateChannel(server, grpc::InsecureChannelCredentials());
}

std::string CallError(const grpc::Status& s) {
  return absl::StrCat("rpc failed: ", s.error_code(), " ", s.error_message());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tkv-profile: measure a model and make its TailorKV layer plan"};
  app.require_subcommand(1);

  // run
  auto* run = app.add_subcommand("run", "profile a model (locally, or with --server remotely)");
  std::string model, calibration, out_dir, server, backend = "auto";
  int random_tokens = 0, threads = 0, max_tokens = 4096, timeout_s = 3600;
  uint64_t seed = 1;
  tp::PlanSettings s;
  bool max_quant_set = false;
  run->add_option("--model", model, "GGUF file (locally), model name (--server), or synthetic:llama-3.1-8b")
      ->required();
  run->add_option("--calibration", calibration, "calibration text file (UTF-8)");
  run->add_option("--calibration-random", random_tokens,
                  "instead: this many random token ids (synthetic models)");
  run->add_option("--seed", seed, "seed of --calibration-random")->capture_default_str();
  run->add_option("--max-tokens", max_tokens, "calibration tokens used (the first ones)")
      ->capture_default_str();
  run->add_option("--bits", s.quant_bits, "bits of quantized layers")->capture_default_str();
  run->add_option("--group", s.quant_group)->capture_default_str();
  run->add_option("--residual", s.quant_residual)->capture_default_str();
  run->add_option("--sink", s.sink)->capture_default_str();
  run->add_option("--recent", s.recent)->capture_default_str();
  run->add_option("--top-k", s.top_k)->capture_default_str();
  run->add_option("--channels", s.channels, "critical channels d_s")->capture_default_str();
  run->add_option("--index", s.index, "gpu or faithful")->capture_default_str();
  run->add_option("--index-bits", s.index_bits, "index gpu: 8 (FP8 entries) or 16 (bf16)")
      ->capture_default_str();
  run->add_option("--query", s.query,
                  "index gpu: the query that scores it: previous, after-attention or real")
      ->capture_default_str();
  run->add_option("--threshold", s.threshold, "dense preference above it: quantize")
      ->capture_default_str();
  run->add_option("--query-rows", s.query_rows)->capture_default_str();
  run->add_option("--max-quant-layers", s.max_quant_layers, "at most this many quantized layers")
      ->each([&](const std::string&) { max_quant_set = true; });
  run->add_option("--max-quant-error", s.max_quant_error,
                  "per layer: fewest bits (of bits, 2, 4) with at most this measured error");
  run->add_option("--min-index-recall", s.min_index_recall,
                  "per layer: fewest channels (of channels x 1, 2, 4, ...) with this recall");
  run->add_option("--max-channels", s.max_channels, "with --min-index-recall (0 = 4 x channels)");
  run->add_option("--max-sparse-error", s.max_sparse_error,
                  "per layer: fewest Top-K tokens (of top_k x 1/4 .. 4) with at most this "
                  "measured attention-output error");
  run->add_option("--max-top-k", s.max_top_k, "with --max-sparse-error (0 = 4 x top_k)");
  run->add_flag("--index-study", s.index_study,
                "local: also measure the index stored as bf16, FP8 and 4-bit codes (recorded "
                "in the profile; the plan does not change)");
  run->add_option("--out", out_dir, "write plan.json and plan.png here");
  run->add_option("--server", server, "a profiler service (host:port) to run it");
  run->add_option("--backend", backend, "local: auto, cpu or cuda")->capture_default_str();
  run->add_option("--threads", threads, "local: CPU threads (0 = all)")->capture_default_str();
  run->add_option("--timeout-s", timeout_s, "remote: the call's deadline")->capture_default_str();

  // get / list
  auto* get = app.add_subcommand("get", "fetch a stored plan from a profiler service");
  std::string id, digest;
  get->add_option("--server", server)->required();
  get->add_option("--id", id);
  get->add_option("--digest", digest, "the newest plan of this model");
  get->add_option("--out", out_dir, "write plan.json and plan.png here");
  auto* list = app.add_subcommand("list", "list the plans a profiler service keeps");
  list->add_option("--server", server)->required();
  list->add_option("--digest", digest, "only this model's");
  CLI11_PARSE(app, argc, argv);

  if (*get) {
    v1::GetPlanRequest req;
    req.set_plan_id(id);
    req.set_model_digest(digest);
    req.set_include_plot(true);
    v1::Plan plan;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    const auto st = v1::Profiler::NewStub(Channel(server))->GetPlan(&ctx, req, &plan);
    if (!st.ok()) return Fail(CallError(st));
    std::printf("plan %s for %s (%s), created %s\n%s\n", plan.plan_id().c_str(),
                plan.model().c_str(), plan.model_digest().c_str(), plan.created_at().c_str(),
                plan.summary().c_str());
    PrintLayers(plan.plan_json());
    return WriteOutputs(out_dir, plan.plan_json(), plan.plot_png());
  }
  if (*list) {
    auto stub = v1::Profiler::NewStub(Channel(server));
    std::string token;
    do {
      v1::ListPlansRequest req;
      req.set_model_digest(digest);
      req.set_page_token(token);
      v1::ListPlansResponse resp;
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
      const auto st = stub->ListPlans(&ctx, req, &resp);
      if (!st.ok()) return Fail(CallError(st));
      for (const auto& p : resp.plans()) {
        std::printf("%s  %s  %s  %s\n  %s\n", p.plan_id().c_str(), p.created_at().c_str(),
                    p.model().c_str(), p.model_digest().c_str(), p.summary().c_str());
      }
      token = resp.next_page_token();
    } while (!token.empty());
    return 0;
  }

  // run
  tp::ProfileSpec spec;
  spec.settings = s;
  if (!max_quant_set) spec.settings.max_quant_layers = -1;
  spec.max_calibration_tokens = max_tokens;
  if (!calibration.empty() && random_tokens > 0) {
    std::fprintf(stderr, "tkv-profile: give --calibration or --calibration-random, not both\n");
    return 2;
  }
  if (!calibration.empty()) {
    bool ok = false;
    spec.calibration_text = ReadFile(calibration, &ok);
    if (!ok) return Fail(absl::StrCat("--calibration ", calibration, ": cannot read"));
  } else if (random_tokens > 0) {
    const std::string shape = model.substr(model.find(':') + 1);
    auto config = tailorkv::model::NamedShape(shape);
    if (model.rfind("synthetic:", 0) != 0 || !config.ok()) {
      std::fprintf(stderr, "tkv-profile: --calibration-random needs a synthetic:<shape> model\n");
      return 2;
    }
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int32_t> dist(0, config->vocab - 1);
    for (int i = 0; i < random_tokens; ++i) spec.calibration_ids.push_back(dist(rng));
  }

  ProgressBar bar;
  std::string plan_json, png;
  if (!server.empty() && s.index_study) {
    std::fprintf(stderr, "tkv-profile: --index-study runs locally only (leave out --server)\n");
    return 2;
  }
  if (!server.empty()) {
    v1::ProfileRequest req;
    req.set_model(model);
    req.set_calibration_text(spec.calibration_text);
    for (int32_t t : spec.calibration_ids) req.add_calibration_token_ids(t);
    req.set_max_calibration_tokens(max_tokens);
    auto* rs = req.mutable_settings();
    rs->set_quant_bits(s.quant_bits);
    rs->set_quant_group(s.quant_group);
    rs->set_quant_residual(s.quant_residual);
    rs->set_sink(s.sink);
    rs->set_recent(s.recent);
    rs->set_top_k(s.top_k);
    rs->set_channels(s.channels);
    rs->set_index(s.index);
    rs->set_threshold(s.threshold);
    rs->set_query_rows(s.query_rows);
    if (max_quant_set) rs->set_max_quant_layers(s.max_quant_layers);
    if (s.max_quant_error >= 0) rs->set_max_quant_error(s.max_quant_error);
    if (s.min_index_recall >= 0) rs->set_min_index_recall(s.min_index_recall);
    if (s.max_channels > 0) rs->set_max_channels(s.max_channels);
    if (s.max_sparse_error >= 0) rs->set_max_sparse_error(s.max_sparse_error);
    if (s.max_top_k > 0) rs->set_max_top_k(s.max_top_k);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(timeout_s));
    auto reader = v1::Profiler::NewStub(Channel(server))->Profile(&ctx, req);
    v1::ProfileProgress msg;
    v1::Plan plan;
    while (reader->Read(&msg)) {
      bar.Show(msg.stage(), msg.done(), msg.total());
      if (msg.has_plan()) plan = msg.plan();
    }
    const auto st = reader->Finish();
    bar.Finish();
    if (!st.ok()) return Fail(CallError(st));
    std::printf("plan %s for %s (%s)\n%s\n", plan.plan_id().c_str(), plan.model().c_str(),
                plan.model_digest().c_str(), plan.summary().c_str());
    plan_json = plan.plan_json();
    png = plan.plot_png();
  } else {
    tp::RunnerOptions options;
    options.backend = backend;
    options.threads = threads;
    if (model.rfind("synthetic:", 0) != 0) {
      const std::filesystem::path p(model);
      options.models_dir = p.has_parent_path() ? p.parent_path().string() : ".";
      spec.model = p.filename().string();
    } else {
      spec.model = model;
    }
    tp::AddCudaFactories(options);
    auto out = tp::RunProfile(options, spec, [&](const tp::Progress& p) {
      bar.Show(p.stage, p.done, p.total);
      return absl::OkStatus();
    });
    bar.Finish();
    if (!out.ok()) return Fail(out.status().ToString());
    std::printf("profiled %s on %s in %.1f s (%d of %d calibration tokens)\nmodel %s\n%s\n",
                spec.model.c_str(), out->backend.c_str(), out->seconds, out->tokens_used,
                out->tokens_given, out->model_digest.c_str(), out->plan.Summary().c_str());
    plan_json = out->plan_json;
    png = out->plot_png;
  }
  PrintLayers(plan_json);
  return WriteOutputs(out_dir, plan_json, png);
}
