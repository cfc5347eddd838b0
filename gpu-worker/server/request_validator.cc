#include "server/request_validator.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/utf8.h"

namespace tailorkv::worker {

namespace {

absl::Status Invalid(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// The float checks reject NaN by writing each range as a positive test.
absl::Status CheckFloat(const char* field, float v, float lo, bool lo_open, float hi) {
  const bool above_lo = lo_open ? v > lo : v >= lo;
  if (above_lo && v <= hi) return absl::OkStatus();
  return Invalid(field, absl::StrCat("must be in ", lo_open ? "(" : "[", lo, ", ", hi, "], got ",
                                     std::isnan(v) ? std::string("NaN") : absl::StrCat(v)));
}

const char* RoleName(v1::Role role) {
  switch (role) {
    case v1::ROLE_SYSTEM: return "system";
    case v1::ROLE_USER: return "user";
    case v1::ROLE_ASSISTANT: return "assistant";
    default: return nullptr;
  }
}

}  // namespace

absl::Status ValidateRequestId(const std::string& id, int max_bytes) {
  if (static_cast<int>(id.size()) > max_bytes) {
    return Invalid("request_id",
                   absl::StrCat(id.size(), " bytes, longer than the limit of ", max_bytes));
  }
  for (size_t i = 0; i < id.size(); ++i) {
    const unsigned char c = id[i];
    if (c < 0x21 || c > 0x7E) {
      return Invalid("request_id", absl::StrCat("byte ", i, " is not printable ASCII"));
    }
  }
  return absl::OkStatus();
}

RequestValidator::RequestValidator(const runtime::Engine& engine, const RequestLimits& limits)
    : engine_(engine), limits_(limits) {
  const tokenizer::Tokenizer& tok = engine.tokenizer();
  for (int id = 0; id < tok.vocab_size(); ++id) {
    max_token_bytes_ = std::max(max_token_bytes_, tok.TokenBytes(id).size());
  }
}

absl::StatusOr<std::vector<int32_t>> RequestValidator::Tokenize(
    const v1::GenerateRequest& request) const {
  const tokenizer::Tokenizer& tok = engine_.tokenizer();
  const int vocab = engine_.config().vocab;
  const size_t max_text_bytes = static_cast<size_t>(engine_.max_context()) * max_token_bytes_;
  auto check_text_size = [&](const std::string& field, size_t bytes) {
    if (bytes <= max_text_bytes) return absl::OkStatus();
    return Invalid(field, absl::StrCat(bytes, " bytes cannot fit the context of ",
                                       engine_.max_context(), " tokens"));
  };

  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText: {
      const std::string& text = request.text();
      if (text.empty()) return Invalid("text", "empty prompt");
      RETURN_IF_ERROR(common::ValidateUtf8(text, "text"));
      RETURN_IF_ERROR(check_text_size("text", text.size()));
      return tok.Encode(text, tok.spec().add_bos, /*parse_special=*/false);
    }
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = request.token_ids().ids();
      if (ids.empty()) return Invalid("token_ids.ids", "empty prompt");
      for (int i = 0; i < ids.size(); ++i) {
        if (ids[i] < 0 || ids[i] >= vocab) {
          return Invalid(absl::StrCat("token_ids.ids[", i, "]"),
                         absl::StrCat(ids[i], " is outside the vocabulary [0, ", vocab, ")"));
        }
      }
      return std::vector<int32_t>(ids.begin(), ids.end());
    }
    case v1::GenerateRequest::kChat: {
      const auto& messages = request.chat().messages();
      if (messages.empty()) return Invalid("chat.messages", "empty conversation");
      if (messages.size() > limits_.max_chat_messages) {
        return Invalid("chat.messages", absl::StrCat(messages.size(), " messages, more than the limit of ",
                                                     limits_.max_chat_messages));
      }
      std::vector<tokenizer::ChatMessage> chat;
      chat.reserve(messages.size());
      size_t total_bytes = 0;
      for (int i = 0; i < messages.size(); ++i) {
        const std::string field = absl::StrCat("chat.messages[", i, "]");
        const char* role = RoleName(messages[i].role());
        if (role == nullptr) {
          return Invalid(field + ".role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT");
        }
        RETURN_IF_ERROR(common::ValidateUtf8(messages[i].content(), field + ".content"));
        total_bytes += messages[i].content().size();
        chat.push_back({role, messages[i].content()});
      }
      RETURN_IF_ERROR(check_text_size("chat.messages", total_bytes));
      ASSIGN_OR_RETURN(tokenizer::RenderedChat rendered,
                       engine_.chat_template().Render(chat, /*add_generation_prompt=*/true));
      // Some templates write the BOS token themselves; never add a second.
      bool add_bos = tok.spec().add_bos;
      if (add_bos && tok.bos_id() >= 0) {
        const std::string bos = tok.TokenBytes(tok.bos_id(), /*render_special=*/true);
        if (!bos.empty() && rendered.text.starts_with(bos)) add_bos = false;
      }
      // The template's own markers (<|im_start|>...) become their ids; the
      // same text typed by the user stays literal text.
      return tok.Encode(rendered.text, add_bos, /*parse_special=*/true, rendered.content_ranges);
    }
    case v1::GenerateRequest::PROMPT_NOT_SET:
      break;
  }
  return Invalid("prompt", "required: set one of text, token_ids or chat");
}

absl::Status RequestValidator::FillSampling(const v1::SamplingParams& s, int prompt_tokens,
                                            runtime::GenerationRequest& out) const {
  const int vocab = engine_.config().vocab;
  const int context = engine_.max_context();
  runtime::SamplingParams& p = out.sampling;

  if (s.has_temperature()) {
    RETURN_IF_ERROR(CheckFloat("sampling.temperature", s.temperature(), 0.0f, false, 100.0f));
    p.temperature = s.temperature();
  }
  if (s.has_top_p()) {
    RETURN_IF_ERROR(CheckFloat("sampling.top_p", s.top_p(), 0.0f, true, 1.0f));
    p.top_p = s.top_p();
  }
  if (s.has_top_k()) {
    if (s.top_k() < 0 || s.top_k() > vocab) {
      return Invalid("sampling.top_k",
                     absl::StrCat("must be 0 (off) or in [1, ", vocab, "] (the vocabulary), got ",
                                  s.top_k()));
    }
    p.top_k = s.top_k();
  }
  if (s.has_repetition_penalty()) {
    RETURN_IF_ERROR(
        CheckFloat("sampling.repetition_penalty", s.repetition_penalty(), 0.0f, true, 10.0f));
    p.repetition_penalty = s.repetition_penalty();
  }
  p.seed = s.has_seed() ? s.seed() : (static_cast<uint64_t>(std::random_device{}()) << 32 |
                                      std::random_device{}());

  const int room = context - prompt_tokens;
  if (s.has_max_tokens()) {
    if (s.max_tokens() < 1) {
      return Invalid("sampling.max_tokens", absl::StrCat("must be >= 1, got ", s.max_tokens()));
    }
    if (s.max_tokens() > room) {
      return Invalid("sampling.max_tokens",
                     absl::StrCat("prompt (", prompt_tokens, " tokens) + max_tokens (",
                                  s.max_tokens(), ") exceeds the context of ", context,
                                  " tokens; at most ", room, " allowed"));
    }
    out.max_tokens = s.max_tokens();
  } else {
    out.max_tokens = std::min(limits_.default_max_tokens, room);
  }

  if (s.stop_size() > limits_.max_stop_strings) {
    return Invalid("sampling.stop", absl::StrCat(s.stop_size(), " stop strings, more than the limit of ",
                                                 limits_.max_stop_strings));
  }
  out.stop.clear();
  for (int i = 0; i < s.stop_size(); ++i) {
    const std::string field = absl::StrCat("sampling.stop[", i, "]");
    const std::string& stop = s.stop(i);
    if (stop.empty()) return Invalid(field, "empty stop string");
    if (static_cast<int>(stop.size()) > limits_.max_stop_bytes) {
      return Invalid(field, absl::StrCat(stop.size(), " bytes, longer than the limit of ",
                                         limits_.max_stop_bytes));
    }
    RETURN_IF_ERROR(common::ValidateUtf8(stop, field));
    out.stop.push_back(stop);
  }
  return absl::OkStatus();
}

absl::StatusOr<PreparedRequest> RequestValidator::Prepare(
    const v1::GenerateRequest& request) const {
  PreparedRequest prepared;
  RETURN_IF_ERROR(ValidateRequestId(request.request_id(), limits_.max_request_id_bytes));
  prepared.request_id = request.request_id();

  ASSIGN_OR_RETURN(std::vector<int32_t> tokens, Tokenize(request));
  if (tokens.empty()) return Invalid("prompt", "tokenizes to no tokens");
  const int context = engine_.max_context();
  if (static_cast<int64_t>(tokens.size()) >= context) {
    return Invalid("prompt", absl::StrCat(tokens.size(), " tokens do not fit the context of ",
                                          context, " tokens with room to generate (at most ",
                                          context - 1, ")"));
  }
  const int prompt_tokens = static_cast<int>(tokens.size());
  prepared.engine_request.prompt_tokens = std::move(tokens);
  RETURN_IF_ERROR(FillSampling(request.sampling(), prompt_tokens, prepared.engine_request));
  return prepared;
}

}  // namespace tailorkv::worker
