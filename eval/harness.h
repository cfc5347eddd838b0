// The accuracy harness behind tkv_accuracy: evaluates KV plans on one loaded
// model with the same prompts, the dense plan first as the reference.
//
// Tasks (each optional):
//  passkey    - the classic synthetic filler, a 5-digit key at a depth, greedy
//               completion of "The pass key is"; correct when the key appears.
//  needle     - natural prose filler with "The special magic number for CITY
//               is NNNNNNN." at a depth; correct when the first number of the
//               completion is exactly the 7 digits.
//  agreement  - teacher forcing on natural text: one Forward over the first P
//               tokens, then T decode steps of one true token each (so the
//               plan's compressed cache is what attention reads); top-1
//               agreement with the dense run and perplexity of both.
//  prompts    - cases from JSONL prompt files, scored by expected substrings.
//  KV bytes   - sum over layers of SequenceState::kv_bytes() at a capacity,
//               and the ratio to dense at the same capacity (always).
// Every prompt is prefilled in ONE Forward call (the backend may chunk it
// internally) and decoded greedily (argmax, ties to the lowest id).
//
// A plan that the backend rejects (NewSequence or Forward fails, e.g.
// Unimplemented) becomes an error entry; the other plans still run. Prompts
// are built once, before any plan runs, and shared by all plans.
//
// Not thread-safe; drives the backend from the calling thread.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "eval/prompts.h"
#include "nlohmann/json.hpp"
#include "runtime/backend.h"
#include "runtime/kv_plan.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace tailorkv::eval {

// The model the harness runs on; everything must outlive the Harness call.
struct HarnessModel {
  runtime::Backend* backend = nullptr;
  const tokenizer::Tokenizer* tokenizer = nullptr;
  const tokenizer::ChatTemplate* chat_template = nullptr;  // needed only for "chat" prompt cases
  std::string description;                                 // e.g. the model path (reported)
};

struct PlanToRun {
  std::string spec;    // as given ("dense", "quant:2", "@plan.json", ...)
  runtime::KvPlan plan;
};

struct HarnessOptions {
  // Plans in order; plans[0] must be all-dense (the reference).
  std::vector<PlanToRun> plans;

  bool run_passkey = true;
  bool run_needle = true;
  bool run_agreement = true;
  std::vector<int> lengths = {1024, 2048, 4096, 8000};  // prompt tokens
  std::vector<double> depths = {0, 0.25, 0.5, 0.75, 1};
  int trials = 5;          // per (length, depth) cell
  uint64_t seed = 20251122;
  int passkey_max_tokens = 8;
  int needle_max_tokens = 12;

  std::string needle_filler_text;  // natural prose for the needle task
  std::string needle_filler_name;  // where it came from (reported)
  std::string agreement_text;      // natural text for teacher forcing
  std::string agreement_text_name;
  int agreement_prefix = 7168;     // P; clipped to what the text and context allow
  int agreement_tokens = 512;      // T decode steps

  std::vector<PromptCase> prompt_cases;

  int kv_capacity = 0;  // capacity for the KV-bytes figures; 0 = the model's trained context

  // Progress lines (what runs, cells done, elapsed); may be empty.
  std::function<void(const std::string&)> progress;
  // Called after each plan with the report so far ("complete": false), so a
  // run cut short by a time limit still leaves its finished plans; may be empty.
  std::function<void(const nlohmann::json&)> on_plan_done;
};

// Validates options against the model (InvalidArgument naming the option),
// builds every prompt, runs every plan. The result is the JSON report
// (format in eval/README.md); a plan failure is recorded in it, not returned.
// Errors returned: bad options, tokenizer failures, or a failure of the dense
// reference plan (nothing can be compared without it).
absl::StatusOr<nlohmann::json> RunHarness(const HarnessModel& model, const HarnessOptions& options);

// Markdown tables of a report: the summary (one row per plan x task) and
// per-length x depth accuracy grids for passkey and needle.
std::string RenderMarkdown(const nlohmann::json& report);

// The report as indented JSON. Completions of a broken plan can hold invalid
// UTF-8 (a token cut inside a character); those bytes become U+FFFD rather
// than aborting the write.
std::string DumpReport(const nlohmann::json& report);

// Greedy decoding helper (exposed for tests): one Forward over `prompt` on a
// new sequence of `capacity` tokens made with `plan`, then up to `max_new`
// single-token steps; stops early at an end-of-generation token or when
// `stop(text_so_far)` returns true.
struct Completion {
  std::vector<int32_t> tokens;
  std::string text;
};
absl::StatusOr<Completion> GreedyComplete(runtime::Backend& backend,
                                          const tokenizer::Tokenizer& tokenizer,
                                          const runtime::KvPlan& plan,
                                          const std::vector<int32_t>& prompt, int max_new,
                                          const std::function<bool(const std::string&)>& stop);

}  // namespace tailorkv::eval
