#include "eval/harness.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace tailorkv::eval {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int32_t Argmax(const std::vector<float>& logits, int n) {
  int32_t best = 0;
  for (int i = 1; i < n; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

// log softmax(logits)[id], in double.
double LogProb(const std::vector<float>& logits, int n, int32_t id) {
  double m = logits[0];
  for (int i = 1; i < n; ++i) m = std::max(m, static_cast<double>(logits[i]));
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i]) - m);
  return static_cast<double>(logits[id]) - m - std::log(sum);
}

// One prompt of a haystack task.
struct TaskPrompt {
  int length = 0;
  int depth_index = 0;
  int trial = 0;
  std::vector<int32_t> tokens;
  std::string answer;  // the digits to find
  std::string key;     // the city (needle) or "" (passkey)
  double actual_depth = 0;
};

struct TaskPrompts {
  std::string name;  // "passkey" or "needle"
  int max_new = 0;
  std::vector<int> lengths;          // lengths that fit the context
  std::vector<int> skipped_lengths;  // lengths that do not
  std::vector<TaskPrompt> prompts;   // length-major, then depth, then trial
  bool (*correct)(std::string_view completion, std::string_view answer) = nullptr;
};

class Runner {
 public:
  Runner(const HarnessModel& model, const HarnessOptions& options)
      : model_(model), opt_(options), config_(model.backend->config()), t0_(Clock::now()) {}

  absl::StatusOr<json> Run();

 private:
  void Progress(const std::string& line) const {
    if (opt_.progress) opt_.progress(absl::StrFormat("[%7.1fs] %s", SecondsSince(t0_), line));
  }
  absl::Status ValidateOptions() const;
  absl::StatusOr<std::vector<int32_t>> Tokenize(std::string_view text) const {
    return model_.tokenizer->Encode(text, /*add_bos=*/false, /*parse_special=*/false);
  }
  std::vector<int32_t> Bos() const {
    const auto& spec = model_.tokenizer->spec();
    if (spec.add_bos && spec.bos_id >= 0) return {spec.bos_id};
    return {};
  }
  absl::Status BuildHaystackTasks();
  absl::Status BuildAgreementText();
  absl::Status BuildPromptCases();

  absl::StatusOr<json> RunKvBytes(const runtime::KvPlan& plan, int capacity) const;
  absl::StatusOr<json> RunHaystack(const PlanToRun& plan, const TaskPrompts& task) const;
  absl::StatusOr<json> RunAgreement(const PlanToRun& plan, bool reference);
  absl::StatusOr<json> RunPrompts(const PlanToRun& plan, bool reference);
  // Runs every task of one plan into `entry`; a failure is returned.
  absl::Status RunPlan(const PlanToRun& plan, bool reference, json& entry);

  const HarnessModel& model_;
  const HarnessOptions& opt_;
  const model::ModelConfig& config_;
  const Clock::time_point t0_;
  int kv_capacity_ = 0;
  int64_t dense_kv_bytes_ = 0;

  std::vector<TaskPrompts> haystack_tasks_;
  std::vector<int32_t> agreement_tokens_;
  int agreement_prefix_ = 0;
  int agreement_steps_ = 0;
  std::vector<int32_t> dense_argmax_;
  double dense_ppl_ = 0;
  std::vector<std::vector<int32_t>> case_tokens_;
  std::vector<std::string> dense_case_text_;
};

absl::Status Runner::ValidateOptions() const {
  if (model_.backend == nullptr || model_.tokenizer == nullptr) {
    return absl::InvalidArgumentError("model: backend and tokenizer are required");
  }
  if (opt_.plans.empty()) return absl::InvalidArgumentError("plans: none given");
  if (!opt_.plans.front().plan.all_dense()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "plans: the first plan must be dense (the reference), got '", opt_.plans.front().spec, "'"));
  }
  for (const PlanToRun& p : opt_.plans) {
    if (absl::Status s = p.plan.Validate(config_); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("plan '", p.spec, "': ", s.message()));
    }
  }
  if (opt_.run_passkey || opt_.run_needle) {
    if (opt_.lengths.empty()) return absl::InvalidArgumentError("lengths: none given");
    for (int l : opt_.lengths) {
      if (l < 1) return absl::InvalidArgumentError(absl::StrCat("lengths: must be >= 1, got ", l));
    }
    if (std::set<int>(opt_.lengths.begin(), opt_.lengths.end()).size() != opt_.lengths.size()) {
      return absl::InvalidArgumentError("lengths: a length is listed twice");
    }
    if (opt_.depths.empty()) return absl::InvalidArgumentError("depths: none given");
    if (std::set<double>(opt_.depths.begin(), opt_.depths.end()).size() != opt_.depths.size()) {
      return absl::InvalidArgumentError("depths: a depth is listed twice");
    }
    for (double d : opt_.depths) {
      if (!(d >= 0 && d <= 1)) {
        return absl::InvalidArgumentError(absl::StrFormat("depths: must be in [0, 1], got %g", d));
      }
    }
    if (opt_.trials < 1) {
      return absl::InvalidArgumentError(absl::StrCat("trials: must be >= 1, got ", opt_.trials));
    }
  }
  if (opt_.passkey_max_tokens < 1 || opt_.needle_max_tokens < 1) {
    return absl::InvalidArgumentError("passkey/needle max tokens: must be >= 1");
  }
  if (opt_.run_needle && opt_.needle_filler_text.empty()) {
    return absl::InvalidArgumentError("filler: the needle task needs a non-empty filler text");
  }
  if (opt_.run_agreement) {
    if (opt_.agreement_text.empty()) {
      return absl::InvalidArgumentError("text-file: the agreement task needs a non-empty text");
    }
    if (opt_.agreement_prefix < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("agreement-prefix: must be >= 1, got ", opt_.agreement_prefix));
    }
    if (opt_.agreement_tokens < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("agreement-tokens: must be >= 1, got ", opt_.agreement_tokens));
    }
  }
  if (opt_.kv_capacity < 0 || opt_.kv_capacity > config_.max_context) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "kv-capacity: must be in [0, %d] (0 = the trained context), got %d", config_.max_context,
        opt_.kv_capacity));
  }
  if (!opt_.prompt_cases.empty()) {
    for (const PromptCase& c : opt_.prompt_cases) {
      if (c.chat && model_.chat_template == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat(c.file, ":", c.line, ": \"chat\" needs the model's chat template"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Runner::BuildHaystackTasks() {
  const TokenizeFn tokenize = [this](std::string_view t) { return Tokenize(t); };
  const std::vector<int32_t> bos = Bos();
  for (const HaystackTask kind : {HaystackTask::kPasskey, HaystackTask::kNeedle}) {
    const bool passkey = kind == HaystackTask::kPasskey;
    if (passkey ? !opt_.run_passkey : !opt_.run_needle) continue;
    TaskPrompts task;
    task.name = passkey ? "passkey" : "needle";
    task.max_new = passkey ? opt_.passkey_max_tokens : opt_.needle_max_tokens;
    task.correct = passkey ? &PasskeyCorrect : &NeedleCorrect;
    ASSIGN_OR_RETURN(const Filler filler,
                     MakeFiller(passkey ? std::string_view(kPasskeyFiller)
                                        : std::string_view(opt_.needle_filler_text),
                                tokenize, passkey ? "passkey filler" : opt_.needle_filler_name));
    for (int length : opt_.lengths) {
      if (length + task.max_new > config_.max_context) {
        task.skipped_lengths.push_back(length);
        continue;
      }
      task.lengths.push_back(length);
      for (int di = 0; di < static_cast<int>(opt_.depths.size()); ++di) {
        for (int trial = 0; trial < opt_.trials; ++trial) {
          const HaystackDraw draw = DrawHaystackCell(opt_.seed, kind, length, di, trial,
                                                     static_cast<int>(filler.segments.size()));
          auto built =
              BuildTaskPrompt(kind, draw, bos, length, opt_.depths[di], filler, tokenize);
          if (!built.ok()) {
            return absl::InvalidArgumentError(
                absl::StrCat("lengths: ", task.name, " prompt: ", built.status().message()));
          }
          TaskPrompt p;
          p.length = length;
          p.depth_index = di;
          p.trial = trial;
          p.answer = draw.answer;
          p.key = draw.city;
          p.tokens = std::move(built->tokens);
          p.actual_depth = built->actual_depth;
          task.prompts.push_back(std::move(p));
        }
      }
    }
    if (!task.skipped_lengths.empty()) {
      Progress(absl::StrFormat("%s: skipping lengths %s (length + %d new tokens exceed the "
                               "model's context %d)",
                               task.name, absl::StrJoin(task.skipped_lengths, ","), task.max_new,
                               config_.max_context));
    }
    haystack_tasks_.push_back(std::move(task));
  }
  return absl::OkStatus();
}

absl::Status Runner::BuildAgreementText() {
  if (!opt_.run_agreement) return absl::OkStatus();
  ASSIGN_OR_RETURN(std::vector<int32_t> ids, Tokenize(opt_.agreement_text));
  const std::vector<int32_t> bos = Bos();
  ids.insert(ids.begin(), bos.begin(), bos.end());
  const int n = static_cast<int>(ids.size());
  agreement_steps_ = opt_.agreement_tokens;
  // The sequence holds P + T tokens; the text needs one more (the last target).
  const int max_prefix = std::min(n - agreement_steps_ - 1, config_.max_context - agreement_steps_);
  if (max_prefix < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "agreement-tokens: %d steps do not fit (text %s has %d tokens, context %d)",
        agreement_steps_, opt_.agreement_text_name, n, config_.max_context));
  }
  agreement_prefix_ = std::min(opt_.agreement_prefix, max_prefix);
  if (agreement_prefix_ < opt_.agreement_prefix) {
    Progress(absl::StrFormat(
        "agreement: prefix clipped from %d to %d tokens (text %s has %d tokens, context %d)",
        opt_.agreement_prefix, agreement_prefix_, opt_.agreement_text_name, n,
        config_.max_context));
  }
  ids.resize(agreement_prefix_ + agreement_steps_ + 1);
  agreement_tokens_ = std::move(ids);
  return absl::OkStatus();
}

absl::Status Runner::BuildPromptCases() {
  for (const PromptCase& c : opt_.prompt_cases) {
    std::vector<int32_t> ids;
    if (c.chat) {
      ASSIGN_OR_RETURN(tokenizer::RenderedChat chat,
                       model_.chat_template->Render({{"user", c.prompt}}, true));
      ASSIGN_OR_RETURN(ids, model_.tokenizer->Encode(chat.text, false, true, chat.content_ranges));
    } else {
      ASSIGN_OR_RETURN(ids, Tokenize(c.prompt));
      const std::vector<int32_t> bos = Bos();
      ids.insert(ids.begin(), bos.begin(), bos.end());
    }
    if (ids.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(c.file, ":", c.line, ": prompt has no tokens"));
    }
    if (static_cast<int>(ids.size()) + c.max_tokens > config_.max_context) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s:%d: prompt (%d tokens) + max_tokens (%d) exceed the model's context %d", c.file,
          c.line, ids.size(), c.max_tokens, config_.max_context));
    }
    case_tokens_.push_back(std::move(ids));
  }
  return absl::OkStatus();
}

absl::StatusOr<json> Runner::RunKvBytes(const runtime::KvPlan& plan, int capacity) const {
  ASSIGN_OR_RETURN(auto seq, model_.backend->NewSequence(capacity, plan));
  int64_t device = 0, host = 0;
  json per_layer = json::array();
  for (const runtime::LayerKvBytes& l : seq->kv_bytes()) {
    device += l.device_bytes;
    host += l.host_bytes;
    per_layer.push_back({{"policy", runtime::KvPolicyName(l.kind)},
                         {"device", l.device_bytes},
                         {"host", l.host_bytes}});
  }
  return json{{"capacity", capacity}, {"device", device},    {"host", host},
              {"total", device + host}, {"per_layer", per_layer}};
}

absl::StatusOr<json> Runner::RunHaystack(const PlanToRun& plan, const TaskPrompts& task) const {
  const auto t_task = Clock::now();
  const int n_depths = static_cast<int>(opt_.depths.size());
  std::map<std::pair<int, int>, json> cells;  // (length, depth index) -> cell
  std::map<int, std::pair<int, int>> by_length;
  std::map<int, std::pair<int, int>> by_depth;
  int correct = 0;
  int exact_correct = 0;
  int done = 0;
  const int total = static_cast<int>(task.prompts.size());
  const auto stop = [](const std::string& text) { return HasCompleteNumber(text); };
  for (const TaskPrompt& p : task.prompts) {
    ASSIGN_OR_RETURN(Completion c, GreedyComplete(*model_.backend, *model_.tokenizer, plan.plan,
                                                  p.tokens, task.max_new, stop));
    const bool ok = task.correct(c.text, p.answer);
    // The first number of the completion is exactly the answer (the needle's
    // criterion; stricter than the passkey's "digits appear").
    const bool exact = NeedleCorrect(c.text, p.answer);
    correct += ok;
    exact_correct += exact;
    ++done;
    json& cell = cells[{p.length, p.depth_index}];
    if (cell.is_null()) {
      cell = {{"length", p.length}, {"depth", opt_.depths[p.depth_index]}, {"correct", 0},
              {"trials", 0}, {"answers", json::array()}};
    }
    cell["correct"] = cell["correct"].get<int>() + ok;
    cell["trials"] = cell["trials"].get<int>() + 1;
    json answer = {{"expected", p.answer}, {"completion", c.text}, {"correct", ok},
                   {"exact", exact}, {"needle_depth", p.actual_depth}};
    if (!p.key.empty()) answer["city"] = p.key;
    cell["answers"].push_back(std::move(answer));
    by_length[p.length].first += ok;
    by_length[p.length].second += 1;
    by_depth[p.depth_index].first += ok;
    by_depth[p.depth_index].second += 1;
    if (p.trial + 1 == opt_.trials) {
      Progress(absl::StrFormat("%s %s: %d/%d prompts (length %d, depth %g: %d/%d correct)",
                               plan.spec, task.name, done, total, p.length,
                               opt_.depths[p.depth_index], cell["correct"].get<int>(),
                               cell["trials"].get<int>()));
    }
  }
  json cell_list = json::array();
  for (auto& [key, cell] : cells) {
    cell["accuracy"] = cell["correct"].get<double>() / cell["trials"].get<int>();
    cell_list.push_back(std::move(cell));
  }
  json lengths = json::array();
  for (const auto& [l, ct] : by_length) {
    lengths.push_back({{"length", l}, {"correct", ct.first}, {"trials", ct.second},
                       {"accuracy", static_cast<double>(ct.first) / ct.second}});
  }
  json depths = json::array();
  for (int di = 0; di < n_depths; ++di) {
    const auto it = by_depth.find(di);
    if (it == by_depth.end()) continue;
    depths.push_back({{"depth", opt_.depths[di]}, {"correct", it->second.first},
                      {"trials", it->second.second},
                      {"accuracy", static_cast<double>(it->second.first) / it->second.second}});
  }
  return json{{"correct", correct},
              {"total", total},
              {"accuracy", total > 0 ? static_cast<double>(correct) / total : 0.0},
              {"exact_correct", exact_correct},
              {"lengths", task.lengths},
              {"skipped_lengths", task.skipped_lengths},
              {"max_new_tokens", task.max_new},
              {"by_length", lengths},
              {"by_depth", depths},
              {"cells", cell_list},
              {"elapsed_s", SecondsSince(t_task)}};
}

absl::StatusOr<json> Runner::RunAgreement(const PlanToRun& plan, bool reference) {
  const auto t_task = Clock::now();
  const int P = agreement_prefix_;
  const int T = agreement_steps_;
  const int vocab = config_.vocab;
  ASSIGN_OR_RETURN(auto seq, model_.backend->NewSequence(P + T, plan.plan));
  std::vector<float> logits;
  RETURN_IF_ERROR(model_.backend->Forward(*seq, absl::MakeConstSpan(agreement_tokens_.data(), P),
                                          false, &logits, runtime::Backend::Mode::kPrefill));
  std::vector<int32_t> argmax(T);
  double nll = 0;
  int top1_true = 0;
  int agree = 0;
  int nonfinite = 0;
  const int report_every = std::max(1, T / 4);
  for (int i = 0; i < T; ++i) {
    RETURN_IF_ERROR(model_.backend->Forward(*seq, absl::MakeConstSpan(&agreement_tokens_[P + i], 1),
                                            false, &logits, runtime::Backend::Mode::kDecode));
    if (static_cast<int>(logits.size()) < vocab) {
      return absl::InternalError("backend returned fewer logits than the vocabulary");
    }
    const int32_t target = agreement_tokens_[P + i + 1];
    argmax[i] = Argmax(logits, vocab);
    const double lp = LogProb(logits, vocab, target);
    if (!std::isfinite(lp)) ++nonfinite;
    nll -= lp;
    top1_true += argmax[i] == target;
    if (!reference) agree += argmax[i] == dense_argmax_[i];
    if ((i + 1) % report_every == 0 || i + 1 == T) {
      Progress(absl::StrFormat("%s agreement: %d/%d steps", plan.spec, i + 1, T));
    }
  }
  const double ppl = std::exp(nll / T);
  if (reference) {
    dense_argmax_ = argmax;
    dense_ppl_ = ppl;
    agree = T;
  }
  return json{{"prefix_tokens", P},
              {"steps", T},
              {"agreement", static_cast<double>(agree) / T},
              {"top1_accuracy", static_cast<double>(top1_true) / T},
              {"ppl", ppl},
              {"ppl_dense", dense_ppl_},
              {"ppl_diff", ppl - dense_ppl_},
              {"nonfinite_steps", nonfinite},
              {"elapsed_s", SecondsSince(t_task)}};
}

absl::StatusOr<json> Runner::RunPrompts(const PlanToRun& plan, bool reference) {
  const auto t_task = Clock::now();
  json cases = json::array();
  int passed = 0;
  for (size_t i = 0; i < opt_.prompt_cases.size(); ++i) {
    const PromptCase& c = opt_.prompt_cases[i];
    ASSIGN_OR_RETURN(Completion out, GreedyComplete(*model_.backend, *model_.tokenizer, plan.plan,
                                                    case_tokens_[i], c.max_tokens, nullptr));
    const std::vector<bool> found = FoundExpectations(out.text, c.expect);
    const bool pass = std::all_of(found.begin(), found.end(), [](bool b) { return b; });
    passed += pass;
    if (reference) dense_case_text_.push_back(out.text);
    cases.push_back({{"name", c.name},
                     {"file", c.file},
                     {"line", c.line},
                     {"prompt_tokens", case_tokens_[i].size()},
                     {"completion", out.text},
                     {"expect", c.expect},
                     {"found", found},
                     {"passed", pass},
                     {"same_as_dense", out.text == dense_case_text_[i]}});
    Progress(absl::StrFormat("%s prompts: %d/%d (%s: %s)", plan.spec, i + 1,
                             opt_.prompt_cases.size(), c.name, pass ? "pass" : "fail"));
  }
  const int total = static_cast<int>(opt_.prompt_cases.size());
  return json{{"passed", passed},
              {"total", total},
              {"pass_rate", total > 0 ? static_cast<double>(passed) / total : 0.0},
              {"cases", cases},
              {"elapsed_s", SecondsSince(t_task)}};
}

absl::Status Runner::RunPlan(const PlanToRun& plan, bool reference, json& entry) {
  Progress(absl::StrFormat("plan %s (%s): KV bytes at capacity %d", plan.spec, plan.plan.Summary(),
                           kv_capacity_));
  ASSIGN_OR_RETURN(json kv, RunKvBytes(plan.plan, kv_capacity_));
  if (reference) dense_kv_bytes_ = kv["total"].get<int64_t>();
  kv["dense_total"] = dense_kv_bytes_;
  kv["compression_vs_dense"] =
      kv["total"].get<int64_t>() > 0
          ? static_cast<double>(dense_kv_bytes_) / kv["total"].get<int64_t>()
          : 0.0;
  entry["kv_bytes"] = std::move(kv);
  for (const TaskPrompts& task : haystack_tasks_) {
    Progress(absl::StrFormat("plan %s: %s, %d prompts", plan.spec, task.name, task.prompts.size()));
    ASSIGN_OR_RETURN(entry[task.name], RunHaystack(plan, task));
  }
  if (opt_.run_agreement) {
    Progress(absl::StrFormat("plan %s: agreement, prefix %d + %d steps", plan.spec,
                             agreement_prefix_, agreement_steps_));
    ASSIGN_OR_RETURN(entry["agreement"], RunAgreement(plan, reference));
  }
  if (!opt_.prompt_cases.empty()) {
    Progress(absl::StrFormat("plan %s: %d prompt cases", plan.spec, opt_.prompt_cases.size()));
    ASSIGN_OR_RETURN(entry["prompts"], RunPrompts(plan, reference));
  }
  return absl::OkStatus();
}

absl::StatusOr<json> Runner::Run() {
  RETURN_IF_ERROR(ValidateOptions());
  kv_capacity_ = opt_.kv_capacity > 0 ? opt_.kv_capacity : config_.max_context;
  Progress("building prompts");
  RETURN_IF_ERROR(BuildHaystackTasks());
  RETURN_IF_ERROR(BuildAgreementText());
  RETURN_IF_ERROR(BuildPromptCases());

  json report;
  report["tool"] = "tkv_accuracy";
  report["model"] = {{"description", model_.description},
                     {"name", config_.name},
                     {"n_layers", config_.n_layers},
                     {"n_heads", config_.n_heads},
                     {"n_kv_heads", config_.n_kv_heads},
                     {"head_dim", config_.head_dim},
                     {"vocab", config_.vocab},
                     {"max_context", config_.max_context}};
  report["backend"] = std::string(model_.backend->name());
  std::vector<std::string> tasks;
  for (const TaskPrompts& t : haystack_tasks_) tasks.push_back(t.name);
  if (opt_.run_agreement) tasks.push_back("agreement");
  if (!opt_.prompt_cases.empty()) tasks.push_back("prompts");
  json prompt_files = json::array();
  for (const PromptCase& c : opt_.prompt_cases) {
    if (prompt_files.empty() || prompt_files.back() != c.file) prompt_files.push_back(c.file);
  }
  report["settings"] = {{"tasks", tasks},
                        {"lengths", opt_.lengths},
                        {"depths", opt_.depths},
                        {"trials", opt_.trials},
                        {"seed", opt_.seed},
                        {"passkey_max_tokens", opt_.passkey_max_tokens},
                        {"needle_max_tokens", opt_.needle_max_tokens},
                        {"needle_filler", opt_.needle_filler_name},
                        {"agreement_text", opt_.agreement_text_name},
                        {"agreement_prefix_requested", opt_.agreement_prefix},
                        {"agreement_prefix", agreement_prefix_},
                        {"agreement_tokens", agreement_steps_},
                        {"kv_capacity", kv_capacity_},
                        {"prompt_files", prompt_files}};
  report["plans"] = json::array();
  for (size_t i = 0; i < opt_.plans.size(); ++i) {
    const PlanToRun& plan = opt_.plans[i];
    const bool reference = i == 0;
    const auto t_plan = Clock::now();
    json entry = {{"spec", plan.spec}, {"name", plan.plan.name}, {"summary", plan.plan.Summary()}};
    absl::Status st = RunPlan(plan, reference, entry);
    entry["elapsed_s"] = SecondsSince(t_plan);
    if (!st.ok()) {
      if (reference) {
        return absl::Status(st.code(),
                            absl::StrCat("dense reference plan failed: ", st.message()));
      }
      entry["status"] = "error";
      entry["error"] = st.ToString();
      Progress(absl::StrFormat("plan %s: ERROR %s", plan.spec, st.ToString()));
    } else {
      entry["status"] = "ok";
      Progress(absl::StrFormat("plan %s: done in %.1f s", plan.spec, SecondsSince(t_plan)));
    }
    report["plans"].push_back(std::move(entry));
    if (opt_.on_plan_done) {
      report["complete"] = false;
      report["elapsed_s"] = SecondsSince(t0_);
      opt_.on_plan_done(report);
    }
  }
  report["complete"] = true;
  report["elapsed_s"] = SecondsSince(t0_);
  return report;
}

std::string Pct(double x) { return absl::StrFormat("%.1f%%", 100.0 * x); }

std::string Bytes(int64_t b) {
  return absl::StrFormat("%.2f MiB", static_cast<double>(b) / (1024.0 * 1024.0));
}

}  // namespace

absl::StatusOr<Completion> GreedyComplete(runtime::Backend& backend,
                                          const tokenizer::Tokenizer& tokenizer,
                                          const runtime::KvPlan& plan,
                                          const std::vector<int32_t>& prompt, int max_new,
                                          const std::function<bool(const std::string&)>& stop) {
  if (prompt.empty()) return absl::InvalidArgumentError("prompt: empty");
  if (max_new < 1) return absl::InvalidArgumentError("max_new: must be >= 1");
  const int vocab = backend.config().vocab;
  ASSIGN_OR_RETURN(auto seq,
                   backend.NewSequence(static_cast<int>(prompt.size()) + max_new, plan));
  std::vector<float> logits;
  RETURN_IF_ERROR(backend.Forward(*seq, prompt, false, &logits, runtime::Backend::Mode::kPrefill));
  Completion out;
  while (true) {
    if (static_cast<int>(logits.size()) < vocab) {
      return absl::InternalError("backend returned fewer logits than the vocabulary");
    }
    const int32_t next = Argmax(logits, vocab);
    if (tokenizer.IsEndOfGeneration(next)) break;
    out.tokens.push_back(next);
    out.text = tokenizer.Decode(out.tokens);
    if (static_cast<int>(out.tokens.size()) >= max_new || (stop && stop(out.text))) break;
    RETURN_IF_ERROR(backend.Forward(*seq, absl::MakeConstSpan(&out.tokens.back(), 1), false,
                                    &logits, runtime::Backend::Mode::kDecode));
  }
  return out;
}

absl::StatusOr<json> RunHarness(const HarnessModel& model, const HarnessOptions& options) {
  Runner runner(model, options);
  return runner.Run();
}

std::string DumpReport(const json& report) {
  return report.dump(2, ' ', /*ensure_ascii=*/false, json::error_handler_t::replace);
}

std::string RenderMarkdown(const json& report) {
  std::string md;
  const auto& plans = report.at("plans");
  absl::StrAppend(&md, "| plan | task | score | detail |\n|---|---|---|---|\n");
  for (const json& p : plans) {
    const std::string spec = p.at("spec").get<std::string>();
    if (p.at("status") != "ok") {
      absl::StrAppend(&md, "| ", spec, " | error | - | ", p.value("error", std::string()), " |\n");
      continue;
    }
    if (p.contains("passkey") || p.contains("needle")) {
      for (const char* task : {"passkey", "needle"}) {
        if (!p.contains(task)) continue;
        const json& t = p[task];
        absl::StrAppend(&md, "| ", spec, " | ", task, " | ", Pct(t["accuracy"].get<double>()),
                        " | ", t["correct"].get<int>(), "/", t["total"].get<int>(), " correct (",
                        t["exact_correct"].get<int>(), " with the exact number first) |\n");
      }
    }
    if (p.contains("agreement")) {
      const json& a = p["agreement"];
      absl::StrAppend(
          &md, "| ", spec, " | agreement | ", Pct(a["agreement"].get<double>()), " | ",
          absl::StrFormat("ppl %.3f vs dense %.3f (%+.3f); %d steps after %d tokens",
                          a["ppl"].get<double>(), a["ppl_dense"].get<double>(),
                          a["ppl_diff"].get<double>(), a["steps"].get<int>(),
                          a["prefix_tokens"].get<int>()),
          " |\n");
    }
    if (p.contains("prompts")) {
      const json& pr = p["prompts"];
      absl::StrAppend(&md, "| ", spec, " | prompts | ", Pct(pr["pass_rate"].get<double>()), " | ",
                      pr["passed"].get<int>(), "/", pr["total"].get<int>(), " passed |\n");
    }
    const json& kv = p["kv_bytes"];
    absl::StrAppend(
        &md, "| ", spec, " | KV bytes | ",
        absl::StrFormat("%.2fx", kv["compression_vs_dense"].get<double>()), " | ",
        absl::StrFormat("%s device + %s host at capacity %d (dense %s)",
                        Bytes(kv["device"].get<int64_t>()), Bytes(kv["host"].get<int64_t>()),
                        kv["capacity"].get<int>(), Bytes(kv["dense_total"].get<int64_t>())),
        " |\n");
  }
  // Grids: rows plan x length, columns depths.
  for (const char* task : {"passkey", "needle"}) {
    const json* first = nullptr;
    for (const json& p : plans) {
      if (p.at("status") == "ok" && p.contains(task)) {
        first = &p;
        break;
      }
    }
    if (first == nullptr) continue;
    const auto depths = report["settings"]["depths"].get<std::vector<double>>();
    absl::StrAppend(&md, "\n", task, " accuracy by length (rows) and depth (columns)\n\n| plan | length |");
    for (double d : depths) absl::StrAppend(&md, absl::StrFormat(" %g |", d));
    absl::StrAppend(&md, " all |\n|---|---|");
    for (size_t i = 0; i < depths.size(); ++i) absl::StrAppend(&md, "---|");
    absl::StrAppend(&md, "---|\n");
    for (const json& p : plans) {
      if (p.at("status") != "ok" || !p.contains(task)) continue;
      const json& t = p[task];
      for (const json& bl : t["by_length"]) {
        const int length = bl["length"].get<int>();
        absl::StrAppend(&md, "| ", p["spec"].get<std::string>(), " | ", length, " |");
        for (double d : depths) {
          std::string cell = " - |";
          for (const json& c : t["cells"]) {
            if (c["length"].get<int>() == length && c["depth"].get<double>() == d) {
              cell = absl::StrFormat(" %d/%d |", c["correct"].get<int>(), c["trials"].get<int>());
            }
          }
          absl::StrAppend(&md, cell);
        }
        absl::StrAppend(&md, " ", Pct(bl["accuracy"].get<double>()), " |\n");
      }
    }
  }
  return md;
}

}  // namespace tailorkv::eval
