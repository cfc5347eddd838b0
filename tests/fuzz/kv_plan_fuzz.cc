// Fuzz target: KV plans (runtime/kv_plan.h), the JSON a profiler or a file
// hands the worker and the short specs of command lines.
//
// Input: byte 0 picks the parser (bit 0: JSON or spec) and the model shape
// (bit 1: SmolLM2's 30 layers or a 2-layer one); byte 1 is a capacity for
// the memory estimate; the rest is the text.
// Invariants: errors are InvalidArgument; an accepted plan validates for
// the model, survives KvPlanToJson -> ParseKvPlanJson unchanged, and its
// memory estimate is never negative.
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "runtime/kv_plan.h"

namespace {

using tailorkv::model::ModelConfig;
namespace rt = tailorkv::runtime;

ModelConfig Shape(bool small) {
  ModelConfig c;
  c.arch = "llama";
  c.name = small ? "tiny" : "SmolLM2-135M";
  c.n_layers = small ? 2 : 30;
  c.n_heads = small ? 4 : 9;
  c.n_kv_heads = small ? 2 : 3;
  c.head_dim = small ? 32 : 64;
  c.hidden = small ? 128 : 576;
  c.ffn = small ? 256 : 1536;
  c.vocab = small ? 100 : 49152;
  c.max_context = small ? 512 : 8192;
  return c;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tailorkv::fuzz::Reader in(data, size);
  const uint8_t mode = in.Byte();
  const int capacity = in.Byte() * 37;
  const std::string text = in.Rest();
  const ModelConfig config = Shape((mode & 2) != 0);
  const bool json = (mode & 1) == 0;
  // "@path" reads a file: a fuzzer could name /dev/zero. Files are LoadKvPlanFile
  // over the same ParseKvPlanJson.
  if (!json && !text.empty() && text[0] == '@') return 0;

  auto plan = json ? rt::ParseKvPlanJson(text, config) : rt::ParseKvPlanSpec(text, config);
  if (!plan.ok()) {
    FUZZ_CHECK(plan.status().code() == absl::StatusCode::kInvalidArgument, "%s",
               plan.status().ToString().c_str());
    return 0;
  }
  FUZZ_CHECK(plan->Validate(config).ok(), "accepted plan fails Validate: %s",
             plan->Validate(config).ToString().c_str());
  FUZZ_CHECK(static_cast<int>(plan->layers.size()) == config.n_layers, "%zu layers",
             plan->layers.size());
  FUZZ_CHECK(!plan->Summary().empty(), "empty summary");

  const std::string again = rt::KvPlanToJson(*plan, config);
  auto reparsed = rt::ParseKvPlanJson(again, config);
  FUZZ_CHECK(reparsed.ok(), "KvPlanToJson output does not parse: %s\n%s",
             reparsed.status().ToString().c_str(), again.c_str());
  FUZZ_CHECK(*reparsed == *plan, "plan changed through KvPlanToJson:\n%s", again.c_str());
  FUZZ_CHECK(rt::KvPlanToJson(*reparsed, config) == again, "KvPlanToJson is not deterministic");
  FUZZ_CHECK(rt::CheckPlanModel(*plan, plan->model_digest).ok(), "own digest refused");

  for (int elem : {2, 4}) {
    const auto bytes = rt::EstimateKvBytes(*plan, config, capacity, elem);
    FUZZ_CHECK(bytes.size() == plan->layers.size(), "estimate per layer");
    for (const auto& b : bytes) {
      FUZZ_CHECK(b.device_bytes >= 0 && b.host_bytes >= 0, "negative estimate");
    }
    int layers = 0;
    for (const auto& p : rt::SumKvBytesByPolicy(bytes)) layers += p.layers;
    FUZZ_CHECK(layers == config.n_layers, "policy sums cover %d layers", layers);
  }
  return 0;
}
