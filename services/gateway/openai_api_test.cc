// The OpenAI wire format: requests parsed into GenerateRequest with
// OpenAI's defaults, every bad field refused naming it (400 + `param`),
// responses and stream events in the shapes OpenAI's clients parse.
#include "gateway/openai_api.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

namespace tailorkv::gateway {
namespace {

using nlohmann::json;
namespace v1 = tailorkv::v1;

TEST(OpenAiApi, ChatRequestWithOpenAiDefaults) {
  const ApiLimits limits{.default_max_tokens = 77, .max_tokens_cap = 1000};
  auto p = ParseRequest(Endpoint::kChat, R"({"model": "m", "messages": [
      {"role": "system", "content": "be brief"},
      {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
      {"role": "assistant", "content": null}, {"role": "developer", "content": "x"}],
      "user": "ignored", "unknown_field": 3})",
                        limits);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->model, "m");
  EXPECT_FALSE(p->stream);
  ASSERT_EQ(p->request.chat().messages_size(), 4);
  EXPECT_EQ(p->request.chat().messages(0).role(), v1::ROLE_SYSTEM);
  EXPECT_EQ(p->request.chat().messages(1).content(), "hi there");
  EXPECT_EQ(p->request.chat().messages(2).role(), v1::ROLE_ASSISTANT);
  EXPECT_EQ(p->request.chat().messages(3).role(), v1::ROLE_SYSTEM);
  EXPECT_EQ(p->request.sampling().max_tokens(), 77);
  EXPECT_FLOAT_EQ(p->request.sampling().temperature(), 1.0f);  // OpenAI's default: sampling
  EXPECT_FALSE(p->request.sampling().has_top_p());
}

TEST(OpenAiApi, SamplingFieldsAndCompletionPrompts) {
  const ApiLimits limits;
  auto p = ParseRequest(Endpoint::kCompletions, R"({"model": "m", "prompt": ["Once"], "max_tokens": 9,
      "temperature": 0, "top_p": 0.5, "seed": 42, "stop": ["\n", "."], "n": 1, "stream": true,
      "stream_options": {"include_usage": true}, "presence_penalty": 0, "logprobs": null})",
                        limits);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->request.text(), "Once");
  EXPECT_EQ(p->request.sampling().max_tokens(), 9);
  EXPECT_FLOAT_EQ(p->request.sampling().temperature(), 0.0f);
  EXPECT_FLOAT_EQ(p->request.sampling().top_p(), 0.5f);
  EXPECT_EQ(p->request.sampling().seed(), 42u);
  ASSERT_EQ(p->request.sampling().stop_size(), 2);
  EXPECT_EQ(p->request.sampling().stop(1), ".");
  EXPECT_TRUE(p->stream);
  EXPECT_TRUE(p->include_usage);
  auto ids = ParseRequest(Endpoint::kCompletions, R"({"model": "m", "prompt": [1, 2, 3],
      "max_completion_tokens": 4, "stop": "END"})", limits);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(ids->request.token_ids().ids_size(), 3);
  EXPECT_EQ(ids->request.sampling().max_tokens(), 4);
  EXPECT_EQ(ids->request.sampling().stop(0), "END");
}

TEST(OpenAiApi, BadFieldsAreRefusedNamingThem) {
  const ApiLimits limits{.default_max_tokens = 16, .max_tokens_cap = 100};
  const struct {
    Endpoint endpoint;
    const char* body;
    const char* param;
  } cases[] = {
      {Endpoint::kChat, "not json", "body"},
      {Endpoint::kChat, "[1]", "body"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}]})", "model"},
      {Endpoint::kChat, R"({"model": "m"})", "messages"},
      {Endpoint::kChat, R"({"model": "m", "messages": []})", "messages"},
      {Endpoint::kChat, R"({"model": "m", "messages": [{"content": "x"}]})", "messages[0].role"},
      {Endpoint::kChat, R"({"model": "m", "messages": [{"role": "tool", "content": "x"}]})", "messages[0].role"},
      {Endpoint::kChat, R"({"model": "m", "messages": [{"role": "user", "content": 5}]})", "messages[0].content"},
      {Endpoint::kChat, R"({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       "messages[0].content[0]"},
      {Endpoint::kCompletions, R"({"model": "m"})", "prompt"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": ["a", "b"]})", "prompt"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": ""})", "prompt"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "max_tokens": 101})", "max_tokens"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "max_tokens": 0})", "max_tokens"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "max_tokens": 1.5})", "max_tokens"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "temperature": 2.5})", "temperature"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "temperature": "hot"})", "temperature"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "top_p": 0})", "top_p"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "n": 2})", "n"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "stop": ["a","b","c","d","e"]})", "stop"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "stop": [""]})", "stop"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "stop": 3})", "stop"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "frequency_penalty": 0.5})", "frequency_penalty"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "logprobs": 2})", "logprobs"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "stream": "yes"})", "stream"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "stream_options": {}})", "stream_options"},
      {Endpoint::kChat, R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]})",
       "tools"},
      {Endpoint::kChat,
       R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})",
       "response_format"},
  };
  for (const auto& c : cases) {
    auto p = ParseRequest(c.endpoint, c.body, limits);
    ASSERT_FALSE(p.ok()) << c.body;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << c.body;
    EXPECT_EQ(ErrorParam(p.status()), c.param) << c.body << " -> " << p.status();
    const json err = json::parse(ErrorBody(p.status(), HttpStatusFor(p.status().code())));
    EXPECT_EQ(err["error"]["type"], "invalid_request_error");
    EXPECT_EQ(err["error"]["param"], c.param);
    EXPECT_FALSE(err["error"]["message"].get<std::string>().empty());
  }
}

TEST(OpenAiApi, StatusCodesMapAsOpenAiUsesThem) {
  EXPECT_EQ(HttpStatusFor(absl::StatusCode::kInvalidArgument), 400);
  EXPECT_EQ(HttpStatusFor(absl::StatusCode::kUnauthenticated), 401);
  EXPECT_EQ(HttpStatusFor(absl::StatusCode::kNotFound), 404);
  EXPECT_EQ(HttpStatusFor(absl::StatusCode::kResourceExhausted), 429);
  EXPECT_EQ(HttpStatusFor(absl::StatusCode::kUnavailable), 503);
  EXPECT_EQ(HttpStatusFor(absl::StatusCode::kInternal), 500);
  const json e = json::parse(ErrorBody(absl::UnavailableError("no worker is ready"), 503));
  EXPECT_EQ(e["error"]["type"], "server_error");
  EXPECT_TRUE(e["error"]["param"].is_null());
  EXPECT_EQ(json::parse(ErrorBody(absl::UnauthenticatedError("key"), 401))["error"]["type"], "authentication_error");
}

TEST(OpenAiApi, ResponsesAndStreamEventsHaveOpenAisShapes) {
  ParsedRequest chat;
  chat.endpoint = Endpoint::kChat;
  ParsedRequest comp;
  comp.endpoint = Endpoint::kCompletions;
  const ResponseIds ids{"chatcmpl-1", "smollm2", 1700000000};
  v1::Usage usage;
  usage.set_prompt_tokens(5);
  usage.set_completion_tokens(3);
  const json whole = json::parse(CompletionBody(chat, ids, "Hello", v1::FINISH_REASON_LENGTH, usage));
  EXPECT_EQ(whole["object"], "chat.completion");
  EXPECT_EQ(whole["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(whole["choices"][0]["message"]["content"], "Hello");
  EXPECT_EQ(whole["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(whole["usage"]["total_tokens"], 8);
  const json text = json::parse(CompletionBody(comp, ids, "abc", v1::FINISH_REASON_STOP, usage));
  EXPECT_EQ(text["object"], "text_completion");
  EXPECT_EQ(text["choices"][0]["text"], "abc");
  EXPECT_EQ(text["choices"][0]["finish_reason"], "stop");

  auto payload = [](const std::string& event) {
    EXPECT_EQ(event.rfind("data: ", 0), 0u) << event;
    EXPECT_EQ(event.substr(event.size() - 2), "\n\n");
    return json::parse(event.substr(6, event.size() - 8));
  };
  const json first = payload(StreamChunkEvent(chat, ids, "He", true));
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(first["choices"][0]["delta"]["content"], "He");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  EXPECT_FALSE(payload(StreamChunkEvent(chat, ids, "llo", false))["choices"][0]["delta"].contains("role"));
  const json fin = payload(StreamFinishEvent(chat, ids, v1::FINISH_REASON_STOP));
  EXPECT_EQ(fin["choices"][0]["finish_reason"], "stop");
  EXPECT_TRUE(fin["choices"][0]["delta"].empty());
  const json use = payload(StreamUsageEvent(chat, ids, usage));
  EXPECT_TRUE(use["choices"].empty());
  EXPECT_EQ(use["usage"]["completion_tokens"], 3);
  EXPECT_EQ(payload(StreamChunkEvent(comp, ids, "x", true))["choices"][0]["text"], "x");
  EXPECT_EQ(payload(StreamErrorEvent(absl::UnavailableError("worker gone")))["error"]["message"], "worker gone");
  const json models = json::parse(ModelsBody("smollm2", 1));
  EXPECT_EQ(models["data"][0]["id"], "smollm2");
  EXPECT_EQ(models["object"], "list");
}

}  // namespace
}  // namespace tailorkv::gateway
