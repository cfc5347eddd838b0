// Fuzz target: chat templates (tokenizer/chat_template.h) on arbitrary
// conversations, and the rendered prompt through SmolLM2's tokenizer with
// the message contents as literal ranges (what the worker does with a chat
// request).
//
// Input: byte 0 picks the template (SmolLM2's from the test model, Llama 3's
// from the tokenizer golden file, none, or a source taken from the input up
// to "\x1f"); byte 1 bit 0 = add_generation_prompt; then messages separated
// by "\x1e", each a role byte (system, user, assistant, two invalid ones)
// and the content.
// Invariants: unknown roles are InvalidArgument; one content range per
// message, sorted, disjoint, inside the text, holding that message's
// (trimmed) content; Apply == Render's text; a valid-UTF-8 rendering
// encodes, and user content never adds or removes a control token (the
// prompt has as many as the same conversation with empty contents).
#include <cstdint>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "model/gguf_file.h"
#include "nlohmann/json.hpp"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"

namespace tok = tailorkv::tokenizer;

namespace {

std::unique_ptr<tok::Tokenizer> g_tokenizer;
std::string g_smollm2_source, g_llama3_source;

int ControlTokens(const std::vector<int32_t>& ids) {
  const auto& types = g_tokenizer->spec().token_types;
  int n = 0;
  for (int32_t id : ids) {
    if (static_cast<size_t>(id) < types.size() &&
        types[id] == static_cast<int32_t>(tok::TokenType::kControl)) {
      ++n;
    }
  }
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  auto gguf = tailorkv::model::GgufFile::Open(tailorkv::fuzz::ModelPathOrSkip());
  FUZZ_CHECK(gguf.ok(), "%s", gguf.status().ToString().c_str());
  auto spec = tok::TokenizerSpecFromGguf(**gguf);
  FUZZ_CHECK(spec.ok(), "%s", spec.status().ToString().c_str());
  g_smollm2_source = spec->chat_template;
  auto t = tok::Tokenizer::Create(*std::move(spec));
  FUZZ_CHECK(t.ok(), "%s", t.status().ToString().c_str());
  g_tokenizer = *std::move(t);
  const std::string golden =
      TAILORKV_SOURCE_DIR "/gpu-worker/tokenizer/testdata/smollm2_tokenizer_golden.json";
  std::ifstream f(golden);
  FUZZ_CHECK(f.good(), "cannot read %s", golden.c_str());
  std::stringstream ss;
  ss << f.rdbuf();
  g_llama3_source = nlohmann::json::parse(ss.str())["llama3_chat_template"].get<std::string>();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tailorkv::fuzz::Reader in(data, size);
  const uint8_t which = in.Byte() & 3;
  const bool add_generation_prompt = in.Bool();
  std::string source;
  if (which == 0) source = g_smollm2_source;
  if (which == 1) source = g_llama3_source;
  if (which == 3) source = in.Until("\x1f");
  auto tmpl = tok::ChatTemplate::FromSource(source);
  if (!tmpl.ok()) {
    FUZZ_CHECK(tmpl.status().code() == absl::StatusCode::kUnimplemented, "%s",
               tmpl.status().ToString().c_str());
    return 0;
  }

  static const char* const kRoles[] = {"system", "user", "assistant", "tool", ""};
  std::vector<tok::ChatMessage> messages;
  bool roles_ok = true, utf8_ok = true;
  while (!in.empty() && messages.size() < 64) {
    const uint8_t r = in.Byte() % 5;
    messages.push_back({kRoles[r], in.Until("\x1e")});
    roles_ok = roles_ok && r < 3;
    utf8_ok = utf8_ok && tok::internal::IsValidUtf8(messages.back().content);
  }
  auto rendered = tmpl->Render(messages, add_generation_prompt);
  if (!roles_ok) {
    FUZZ_CHECK(rendered.status().code() == absl::StatusCode::kInvalidArgument, "%s",
               rendered.status().ToString().c_str());
    return 0;
  }
  FUZZ_CHECK(rendered.ok(), "%s", rendered.status().ToString().c_str());
  const std::string& text = rendered->text;
  const auto& ranges = rendered->content_ranges;
  FUZZ_CHECK(ranges.size() == messages.size(), "%zu ranges for %zu messages", ranges.size(),
             messages.size());
  size_t prev_end = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const auto [b, e] = ranges[i];
    FUZZ_CHECK(prev_end <= b && b <= e && e <= text.size(), "range %zu [%zu, %zu)", i, b, e);
    prev_end = e;
    const std::string_view got = std::string_view(text).substr(b, e - b);
    FUZZ_CHECK(messages[i].content.find(got) != std::string::npos,
               "range %zu does not hold message %zu's content", i, i);
    if (tmpl->family() != tok::ChatTemplate::Family::kLlama3) {
      FUZZ_CHECK(got == messages[i].content, "range %zu is not the content", i);
    }
  }
  auto applied = tmpl->Apply(messages, add_generation_prompt);
  FUZZ_CHECK(applied.ok() && *applied == text, "Apply differs from Render");

  if (!utf8_ok || !tok::internal::IsValidUtf8(text)) return 0;
  auto ids = g_tokenizer->Encode(text, /*add_bos=*/false, /*parse_special=*/true, ranges);
  FUZZ_CHECK(ids.ok(), "rendered chat does not encode: %s", ids.status().ToString().c_str());
  std::vector<tok::ChatMessage> skeleton = messages;
  for (tok::ChatMessage& m : skeleton) m.content.clear();
  auto bare = tmpl->Render(skeleton, add_generation_prompt);
  FUZZ_CHECK(bare.ok(), "%s", bare.status().ToString().c_str());
  auto bare_ids = g_tokenizer->Encode(bare->text, false, true, bare->content_ranges);
  FUZZ_CHECK(bare_ids.ok(), "%s", bare_ids.status().ToString().c_str());
  FUZZ_CHECK(ControlTokens(*ids) == ControlTokens(*bare_ids),
             "message contents changed the control tokens: %d vs %d without content",
             ControlTokens(*ids), ControlTokens(*bare_ids));
  return 0;
}
