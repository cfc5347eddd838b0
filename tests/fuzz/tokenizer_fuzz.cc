// Fuzz target: the tokenizer on client text (tokenizer/tokenizer.h), with
// SmolLM2's vocabulary and merges from the test model, under each
// pre-tokenizer family; the pre-tokenizers and UTF-8 helpers underneath
// (tokenizer/pre_tokenizer.h, tokenizer/utf8.h, common/utf8.h).
//
// Input: byte 0 = flags (bits 0-1 mode: encode / decode ids / pre-tokenize /
// UTF-8; bit 2 add_bos; bit 3 parse_special; bit 4 render_special; bits 5-6
// the pre-tokenizer family); the rest is text (or int32 ids).
// Invariants: invalid UTF-8 is refused with InvalidArgument and valid text
// is accepted; ids lie in the vocabulary; text made of bytes the vocabulary
// has decodes back to itself; the streaming detokenizer equals the
// sanitized one-shot decode; pre-token pieces cover the text; both UTF-8
// validators agree.
#include <array>
#include <bitset>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/utf8.h"
#include "fuzz_util.h"
#include "model/gguf_file.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"

namespace tok = tailorkv::tokenizer;
namespace internal = tailorkv::tokenizer::internal;

namespace {

constexpr const char* kPre[] = {"smollm", "llama-bpe", "qwen2", "gpt2"};
constexpr internal::PreTokenizer kKinds[] = {internal::PreTokenizer::kSmolLM,
                                             internal::PreTokenizer::kLlama3,
                                             internal::PreTokenizer::kQwen2,
                                             internal::PreTokenizer::kGpt2};
std::array<std::unique_ptr<tok::Tokenizer>, 4> g_tokenizers;
std::bitset<256> g_has_byte;  // bytes the vocabulary has a byte-level token for

void CheckStreaming(const tok::Tokenizer& t, const std::vector<int32_t>& ids) {
  tok::StreamingDetokenizer stream(t);
  std::string streamed;
  for (int32_t id : ids) streamed += stream.Push(id);
  streamed += stream.Flush();
  const std::string whole = internal::SanitizeUtf8(t.Decode(ids));
  FUZZ_CHECK(streamed == whole, "streamed %zu bytes, one-shot %zu", streamed.size(), whole.size());
}

void Encode(const tok::Tokenizer& t, const std::string& text, bool add_bos, bool parse_special,
            bool render_special) {
  auto ids = t.Encode(text, add_bos, parse_special);
  if (!internal::IsValidUtf8(text)) {
    FUZZ_CHECK(!ids.ok() && ids.status().code() == absl::StatusCode::kInvalidArgument,
               "invalid UTF-8 not refused: %s", ids.status().ToString().c_str());
    return;
  }
  if (add_bos && t.bos_id() < 0) {
    FUZZ_CHECK(ids.status().code() == absl::StatusCode::kFailedPrecondition, "bos without a bos");
    return;
  }
  FUZZ_CHECK(ids.ok(), "valid text refused: %s", ids.status().ToString().c_str());
  for (int32_t id : *ids) FUZZ_CHECK(id >= 0 && id < t.vocab_size(), "id %d", id);
  for (int32_t id : *ids) (void)t.IsEndOfGeneration(id);
  bool covered = true;
  for (unsigned char c : text) covered = covered && g_has_byte[c];
  if (covered) {
    std::vector<int32_t> body = *ids;
    if (add_bos) {
      FUZZ_CHECK(!body.empty() && body[0] == t.bos_id(), "no bos first");
      body.erase(body.begin());
    }
    const std::string back = t.Decode(body, /*render_special=*/true);
    FUZZ_CHECK(back == text, "round trip changed the text (%zu -> %zu bytes)", text.size(),
               back.size());
  }
  (void)t.Decode(*ids, render_special);
  CheckStreaming(t, *ids);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const std::string path = tailorkv::fuzz::ModelPathOrSkip();
  auto gguf = tailorkv::model::GgufFile::Open(path);
  FUZZ_CHECK(gguf.ok(), "%s", gguf.status().ToString().c_str());
  auto spec = tok::TokenizerSpecFromGguf(**gguf);
  FUZZ_CHECK(spec.ok(), "%s", spec.status().ToString().c_str());
  for (size_t i = 0; i < g_tokenizers.size(); ++i) {
    tok::TokenizerSpec s = *spec;
    s.pre = kPre[i];
    auto t = tok::Tokenizer::Create(std::move(s));
    FUZZ_CHECK(t.ok(), "%s", t.status().ToString().c_str());
    g_tokenizers[i] = *std::move(t);
  }
  for (int id = 0; id < g_tokenizers[0]->vocab_size(); ++id) {
    const std::string b = g_tokenizers[0]->TokenBytes(id);
    if (b.size() == 1) g_has_byte.set(static_cast<unsigned char>(b[0]));
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tailorkv::fuzz::Reader in(data, size);
  const uint8_t flags = in.Byte();
  const bool add_bos = (flags & 4) != 0, parse_special = (flags & 8) != 0,
             render_special = (flags & 16) != 0;
  const int family = (flags >> 5) & 3;
  const tok::Tokenizer& t = *g_tokenizers[family];
  switch (flags & 3) {
    case 0:
      Encode(t, in.Rest(), add_bos, parse_special, render_special);
      break;
    case 1: {  // arbitrary ids, in and out of the vocabulary
      std::vector<int32_t> ids;
      while (!in.empty()) {
        const int32_t v = in.Int<int32_t>();
        // Mostly ids near the vocabulary, some anywhere.
        ids.push_back((v & 0x40000000) != 0 ? v : v % (t.vocab_size() + 16));
      }
      (void)t.Decode(ids, render_special);
      CheckStreaming(t, ids);
      break;
    }
    case 2: {
      const std::string text = internal::SanitizeUtf8(in.Rest());
      const auto pieces = internal::SplitPreTokens(kKinds[family], text);
      std::string joined;
      for (std::string_view p : pieces) {
        FUZZ_CHECK(!p.empty(), "empty piece");
        joined.append(p);
      }
      FUZZ_CHECK(joined == text, "pieces do not cover the text");
      break;
    }
    case 3: {
      const std::string text = in.Rest();
      const bool valid = internal::IsValidUtf8(text);
      FUZZ_CHECK(valid == tailorkv::common::IsValidUtf8(text), "the two UTF-8 validators disagree");
      FUZZ_CHECK(tailorkv::common::ValidateUtf8(text, "text").ok() == valid, "ValidateUtf8");
      const std::string clean = internal::SanitizeUtf8(text);
      FUZZ_CHECK(internal::IsValidUtf8(clean), "SanitizeUtf8 output is not valid");
      if (valid) FUZZ_CHECK(clean == text, "SanitizeUtf8 changed valid text");
      std::string head;
      const size_t n = internal::AppendCompleteUtf8(text, head);
      FUZZ_CHECK(n <= text.size(), "AppendCompleteUtf8 past the end");
      FUZZ_CHECK(head + internal::SanitizeUtf8(std::string_view(text).substr(n)) == clean,
                 "holding back a tail changed the result");
      for (size_t pos = 0; pos < text.size();) {
        const internal::Utf8Char c = internal::DecodeUtf8Char(std::string_view(text).substr(pos));
        FUZZ_CHECK(c.length >= 1 && c.length <= 4 && pos + c.length <= text.size(), "length %d",
                   c.length);
        if (c.kind == internal::Utf8Char::kValid) {
          std::string enc;
          internal::AppendUtf8(c.cp, enc);
          FUZZ_CHECK(enc == text.substr(pos, c.length), "re-encoding U+%X", unsigned(c.cp));
        }
        pos += c.length;
      }
      break;
    }
  }
  return 0;
}
