#include "profiler/profile_runner.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/sha256.h"
#include "common/status_macros.h"
#include "common/utf8.h"
#include "model/gguf_file.h"
#include "model/shapes.h"
#include "nlohmann/json.hpp"
#include "profiler/plot.h"
#include "spdlog/spdlog.h"
#include "tokenizer/tokenizer.h"

namespace tailorkv::profiler {
namespace {

namespace fs = std::filesystem;
constexpr char kSynthetic[] = "synthetic:";
constexpr int kMaxCalibrationTokens = 131072;

struct Loaded {
  model::ModelConfig config;
  std::unique_ptr<runtime::Backend> backend;
  std::unique_ptr<tokenizer::Tokenizer> tokenizer;  // null for synthetic models
  std::string digest;
};

std::string ModelsList(const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (e.is_regular_file(ec) && absl::EndsWith(name, ".gguf")) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names.empty() ? "none" : absl::StrJoin(names, ", ");
}

absl::StatusOr<Loaded> LoadModel(const RunnerOptions& o, const ProfileSpec& spec,
                                 const ProgressFn& progress) {
  Loaded out;
  if (absl::StartsWith(spec.model, kSynthetic)) {
    const std::string shape = spec.model.substr(sizeof(kSynthetic) - 1);
    auto config = model::NamedShape(shape);
    if (!config.ok()) {
      return absl::NotFoundError(absl::StrCat("model: \"", spec.model, "\": ",
                                              config.status().message()));
    }
    if (!o.random_factory || o.backend == "cpu") {
      return absl::FailedPreconditionError(absl::StrCat(
          "model: \"", spec.model, "\" has random weights generated on the GPU; this profiler ",
          o.random_factory ? "runs on the CPU backend" : "has no CUDA backend"));
    }
    if (spec.calibration_ids.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "calibration_token_ids: a synthetic model has no tokenizer; give token ids"));
    }
    out.config = *config;
    // Same shape and seed, same weights: the digest names exactly that.
    out.digest = common::Sha256Tag(absl::StrCat("tailorkv synthetic model ", shape, " seed ",
                                                o.synthetic_seed));
    RETURN_IF_ERROR(progress({.stage = "loading"}));
    ASSIGN_OR_RETURN(out.backend, o.random_factory(out.config, o.synthetic_seed));
    return out;
  }
  const fs::path path = fs::path(o.models_dir) / spec.model;
  std::error_code ec;
  if (o.models_dir.empty() || !fs::is_regular_file(path, ec)) {
    return absl::NotFoundError(absl::StrCat("model: \"", spec.model,
                                            "\" is not a model of this profiler (models: ",
                                            o.models_dir.empty() ? "none" : ModelsList(o.models_dir),
                                            "; or synthetic:llama-3.1-8b)"));
  }
  ASSIGN_OR_RETURN(out.digest, common::Sha256File(path.string(), [&](int64_t done, int64_t total) {
                     return progress({.stage = "digest", .done = done, .total = total});
                   }));
  RETURN_IF_ERROR(progress({.stage = "loading"}));
  ASSIGN_OR_RETURN(auto file, model::GgufFile::Open(path.string()));
  ASSIGN_OR_RETURN(model::ModelWeights weights, model::LoadWeightsFromGguf(*file));
  ASSIGN_OR_RETURN(auto tok_spec, tokenizer::TokenizerSpecFromGguf(*file));
  ASSIGN_OR_RETURN(out.tokenizer, tokenizer::Tokenizer::Create(std::move(tok_spec)));
  out.config = weights.config;
  ASSIGN_OR_RETURN(out.backend, runtime::CreateBackend(std::move(weights), o.backend,
                                                       o.cuda_factory, o.threads));
  return out;
}

nlohmann::ordered_json SettingsJson(const PlanSettings& s) {
  return {{"quant_bits", s.quant_bits}, {"quant_group", s.quant_group},
          {"quant_residual", s.quant_residual}, {"sink", s.sink},
          {"recent", s.recent}, {"top_k", s.top_k},
          {"channels", s.channels}, {"index", s.index},
          {"index_bits", s.index_bits}, {"query", s.query},
          {"threshold", s.threshold}, {"query_rows", s.query_rows},
          {"max_quant_layers", s.max_quant_layers}, {"max_quant_error", s.max_quant_error},
          {"min_index_recall", s.min_index_recall}, {"max_channels", s.max_channels},
          {"max_sparse_error", s.max_sparse_error}, {"max_top_k", s.max_top_k},
          {"index_study", s.index_study}};
}

}  // namespace

absl::Status ValidateProfileSpec(const ProfileSpec& spec) {
  if (spec.model.empty()) return absl::InvalidArgumentError("model: must not be empty");
  if (!absl::StartsWith(spec.model, kSynthetic) &&
      (spec.model.find('/') != std::string::npos || spec.model.front() == '.' ||
       spec.model.find('\0') != std::string::npos)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model: must be a model name of this profiler (a file name in its model directory, no "
        "path), got \"", spec.model, "\""));
  }
  if (spec.calibration_text.empty() && spec.calibration_ids.empty()) {
    return absl::InvalidArgumentError(
        "calibration_text: empty (give calibration text, or calibration_token_ids)");
  }
  if (!spec.calibration_text.empty() && !spec.calibration_ids.empty()) {
    return absl::InvalidArgumentError(
        "calibration_token_ids: give either calibration_text or token ids, not both");
  }
  if (!spec.calibration_text.empty() && !common::IsValidUtf8(spec.calibration_text)) {
    return absl::InvalidArgumentError("calibration_text: not valid UTF-8");
  }
  if (spec.max_calibration_tokens < 1 || spec.max_calibration_tokens > kMaxCalibrationTokens) {
    return absl::InvalidArgumentError(absl::StrCat("max_calibration_tokens: must be in [1, ",
                                                   kMaxCalibrationTokens, "], got ",
                                                   spec.max_calibration_tokens));
  }
  return absl::OkStatus();
}

absl::StatusOr<ProfileOutcome> RunProfile(const RunnerOptions& o, const ProfileSpec& spec,
                                          const ProgressFn& progress_in) {
  const auto t0 = std::chrono::steady_clock::now();
  const ProgressFn progress = progress_in ? progress_in : [](const Progress&) {
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(ValidateProfileSpec(spec));
  ASSIGN_OR_RETURN(Loaded m, LoadModel(o, spec, progress));
  const model::ModelConfig& c = m.config;

  std::vector<int32_t> tokens = spec.calibration_ids;
  if (!spec.calibration_text.empty()) {
    if (m.tokenizer == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "calibration_text: model \"", spec.model, "\" has no tokenizer; give token ids"));
    }
    RETURN_IF_ERROR(progress({.stage = "tokenizing"}));
    ASSIGN_OR_RETURN(tokens, m.tokenizer->Encode(spec.calibration_text,
                                                 m.tokenizer->spec().add_bos, false));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocab) {
      return absl::InvalidArgumentError(absl::StrCat("calibration_token_ids[", i, "]: ",
                                                     tokens[i], " is outside the vocabulary [0, ",
                                                     c.vocab, ")"));
    }
  }
  ProfileOutcome out;
  out.tokens_given = static_cast<int>(tokens.size());
  const int limit = std::min(spec.max_calibration_tokens, c.max_context);
  if (static_cast<int>(tokens.size()) > limit) tokens.resize(limit);
  const int n = static_cast<int>(tokens.size());
  out.tokens_used = n;
  // A budget the profiler could never measure names the budget; one that
  // only this calibration is too short for names the calibration.
  const PlanSettings& ps = spec.settings;
  const int64_t needed = static_cast<int64_t>(ps.sink) + ps.recent + ps.top_k + ps.query_rows;
  if (needed >= limit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "settings.top_k: the sparse budget sink + recent + top_k = ", needed - ps.query_rows,
        " plus query_rows ", ps.query_rows, " is not below the longest context the profiler ",
        "measures (", limit, " tokens: max_calibration_tokens and the model's context)"));
  }
  if (n <= needed) {
    return absl::InvalidArgumentError(absl::StrCat(
        spec.calibration_ids.empty() ? "calibration_text" : "calibration_token_ids", ": ", n,
        " tokens is too short; these settings (budget ", needed - ps.query_rows,
        " + query_rows ", ps.query_rows, ") need more than ", needed));
  }
  RETURN_IF_ERROR(ValidatePlanSettings(spec.settings, c, n));

  // Chunks from the end: the last (observed) one is a whole chunk, so it
  // holds the query rows whatever n is.
  const int chunk = std::max(m.backend->preferred_prefill_chunk(), spec.settings.query_rows);
  ASSIGN_OR_RETURN(auto seq, m.backend->NewSequence(n));
  const int head = n - std::min(n, chunk);
  std::vector<float> logits;
  for (int at = 0; at < head;) {
    const int len = (head - at) % chunk == 0 ? chunk : (head - at) % chunk;
    RETURN_IF_ERROR(progress({.stage = "prefill", .done = at, .total = n}));
    RETURN_IF_ERROR(m.backend->Forward(*seq, absl::MakeConstSpan(tokens).subspan(at, len), false,
                                       &logits, runtime::Backend::Mode::kPrefill));
    at += len;
  }
  RETURN_IF_ERROR(progress({.stage = "prefill", .done = head, .total = n}));
  out.scores.resize(c.n_layers);
  const int threads = o.threads > 0 ? o.threads : omp_get_max_threads();
  RETURN_IF_ERROR(m.backend->ForwardObserved(
      *seq, absl::MakeConstSpan(tokens).subspan(head), spec.settings.query_rows,
      [&](const runtime::Backend::LayerTap& tap) -> absl::Status {
        ASSIGN_OR_RETURN(out.scores[tap.layer], ScoreLayer(tap, c, spec.settings, threads));
        return progress({.stage = "layers", .done = tap.layer + 1, .total = c.n_layers});
      }));
  seq.reset();

  out.plan = DecidePlan(out.scores, spec.settings);
  out.plan.name = absl::StrCat("profile of ", spec.model);
  out.plan.model_digest = m.digest;
  nlohmann::ordered_json layers = nlohmann::ordered_json::array();
  for (const LayerScores& s : out.scores) {
    nlohmann::ordered_json heads = nlohmann::ordered_json::array();
    for (double h : s.head_preference) heads.push_back(RoundScore(h));
    const runtime::LayerKvPolicy& chosen = out.plan.layers[s.layer];
    const bool quant = chosen.kind == runtime::KvPolicyKind::kQuant;
    nlohmann::ordered_json by_channels = nlohmann::ordered_json::array(),
                           by_bits = nlohmann::ordered_json::array();
    for (const auto& c : s.by_channels) {
      by_channels.push_back({{"channels", c.channels},
                             {"sparse_error", RoundScore(c.sparse_error)},
                             {"index_recall", RoundScore(c.recall)}});
    }
    for (const auto& b : s.by_bits) {
      by_bits.push_back({{"bits", b.bits}, {"quant_error", RoundScore(b.quant_error)}});
    }
    nlohmann::ordered_json by_index_format = nlohmann::ordered_json::array();
    for (const auto& f : s.by_index_format) {
      by_index_format.push_back({{"format", f.format},
                                 {"channels", f.channels},
                                 {"bytes_per_token", f.bytes_per_token},
                                 {"index_recall", RoundScore(f.recall)},
                                 {"sparse_error", RoundScore(f.sparse_error)}});
    }
    nlohmann::ordered_json by_top_k = nlohmann::ordered_json::array();
    for (const auto& k : s.by_top_k) {
      by_top_k.push_back({{"top_k", k.top_k},
                          {"sparse_error", RoundScore(k.sparse_error)},
                          {"oracle_error", RoundScore(k.oracle_error)}});
    }
    layers.push_back({{"layer", s.layer},
                      {"head_preference", heads},
                      {"sparse_oracle_error", RoundScore(s.sparse_oracle_error)},
                      {"by_channels", by_channels},
                      {"by_bits", by_bits},
                      {"by_top_k", by_top_k},
                      {"by_index_format", by_index_format},
                      // Does the measured error agree with the score's choice?
                      {"errors_agree", quant == (chosen.quant_error < chosen.sparse_error)}});
  }
  nlohmann::ordered_json calibration = {
      {"tokens_given", out.tokens_given},
      {"tokens_used", n},
      {"token_ids_sha256",
       common::Sha256Tag(std::string_view(reinterpret_cast<const char*>(tokens.data()),
                                          tokens.size() * sizeof(int32_t)))}};
  nlohmann::ordered_json profile = {
      {"tool", "tailorkv profiler"},
      {"model", spec.model},
      {"backend", std::string(m.backend->name())},
      {"rule", "quantize where dense_preference > threshold (TailorKV)"},
      {"settings", SettingsJson(spec.settings)},
      {"calibration", calibration},
      {"layers", layers}};
  out.plan.profile_json = nlohmann::json::parse(profile.dump()).dump();  // canonical, as parsed
  out.plan_json = runtime::KvPlanToJson(out.plan, c);
  out.model_digest = m.digest;
  out.config = c;
  out.backend = std::string(m.backend->name());

  RETURN_IF_ERROR(progress({.stage = "plot"}));
  std::vector<LayerErrorPoint> points;
  for (int l = 0; l < c.n_layers; ++l) {
    const runtime::LayerKvPolicy& p = out.plan.layers[l];
    points.push_back({.layer = l,
                      .policy = p.kind == runtime::KvPolicyKind::kQuant ? 'q' : 's',
                      .dense_preference = std::clamp(p.dense_preference, 0.0, 1.0),
                      .sparse_error = p.sparse_error,
                      .quant_error = p.quant_error});
  }
  ASSIGN_OR_RETURN(
      out.plot_png,
      RenderLayerErrorPlot(
          points, {.title = absl::StrCat(fs::path(spec.model).stem().string(), ": ",
                                         spec.settings.quant_bits, "-bit vs top-",
                                         spec.settings.top_k, ", ", n, " tok"),
                   .threshold = spec.settings.threshold}));
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  RETURN_IF_ERROR(progress({.stage = "done", .done = 1, .total = 1}));
  spdlog::info("profiled {} ({} tokens, backend {}) in {:.1f} s: {}", spec.model, n, out.backend,
               out.seconds, out.plan.Summary());
  return out;
}

}  // namespace tailorkv::profiler
