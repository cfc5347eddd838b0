// Fuzz target: the worker's request validation (server/request_validator.h)
// on GenerateRequest messages as they arrive off the wire, against the test
// model's engine (CPU backend; only its tokenizer, template and limits are
// used: nothing is generated).
//
// Input: a serialized tailorkv.v1.GenerateRequest (ParseFromArray; inputs
// that do not parse are what gRPC would refuse before the handler).
// Invariants: errors are InvalidArgument with a valid UTF-8 message (the
// gateway puts it into JSON); an accepted request has a non-empty prompt of
// in-vocabulary ids that leaves room in the context for max_tokens >= 1,
// sampling values the sampler accepts, and stop strings within the limits.
#include <cstdint>
#include <memory>
#include <string>

#include "common/utf8.h"
#include "fuzz_util.h"
#include "runtime/engine.h"
#include "server/request_validator.h"
#include "tailorkv/v1/generation.pb.h"

namespace {

std::unique_ptr<tailorkv::runtime::Engine> g_engine;
std::unique_ptr<tailorkv::worker::RequestValidator> g_validator;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tailorkv::runtime::EngineOptions o;
  o.model_path = tailorkv::fuzz::ModelPathOrSkip();
  o.backend = "cpu";
  o.threads = 1;
  auto engine = tailorkv::runtime::Engine::Create(o);
  FUZZ_CHECK(engine.ok(), "%s", engine.status().ToString().c_str());
  g_engine = *std::move(engine);
  g_validator = std::make_unique<tailorkv::worker::RequestValidator>(*g_engine,
                                                                     tailorkv::worker::RequestLimits{});
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tailorkv::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto prepared = g_validator->Prepare(request);
  if (!prepared.ok()) {
    FUZZ_CHECK(prepared.status().code() == absl::StatusCode::kInvalidArgument, "%s",
               prepared.status().ToString().c_str());
    FUZZ_CHECK(tailorkv::common::IsValidUtf8(std::string(prepared.status().message())),
               "error message is not UTF-8: %s", prepared.status().ToString().c_str());
    return 0;
  }
  const auto& limits = g_validator->limits();
  const auto& r = prepared->engine_request;
  const int context = g_engine->max_context(), vocab = g_engine->config().vocab;
  FUZZ_CHECK(prepared->request_id == request.request_id(), "request_id changed");
  FUZZ_CHECK(!r.prompt_tokens.empty(), "empty prompt accepted");
  for (int32_t id : r.prompt_tokens) FUZZ_CHECK(id >= 0 && id < vocab, "prompt id %d", id);
  FUZZ_CHECK(r.max_tokens >= 1, "max_tokens %d", r.max_tokens);
  FUZZ_CHECK(static_cast<int64_t>(r.prompt_tokens.size()) + r.max_tokens <= context,
             "%zu prompt + %d max_tokens > context %d", r.prompt_tokens.size(), r.max_tokens,
             context);
  FUZZ_CHECK(r.sampling.Validate(vocab).ok(), "the sampler refuses what validation accepted: %s",
             r.sampling.Validate(vocab).ToString().c_str());
  FUZZ_CHECK(static_cast<int>(r.stop.size()) <= limits.max_stop_strings, "%zu stops",
             r.stop.size());
  for (const std::string& s : r.stop) {
    FUZZ_CHECK(!s.empty() && static_cast<int>(s.size()) <= limits.max_stop_bytes &&
                   tailorkv::common::IsValidUtf8(s),
               "bad stop string accepted");
  }
  return 0;
}
