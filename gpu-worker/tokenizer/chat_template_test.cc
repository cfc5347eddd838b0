#include "tokenizer/chat_template.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenizer/test_support.h"

namespace tailorkv::tokenizer {
namespace {

using ::testing::HasSubstr;
using testing::Golden;

std::vector<ChatMessage> Messages(const nlohmann::json& j) {
  std::vector<ChatMessage> out;
  for (const auto& m : j) out.push_back({m["role"], m["content"]});
  return out;
}

void ExpectRenderingsMatch(const ChatTemplate& t, const nlohmann::json& cases) {
  ASSERT_GE(cases.size(), 8u);
  for (const auto& c : cases) {
    auto got = t.Apply(Messages(c["messages"]), c["add_generation_prompt"].get<bool>());
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, c["rendered"].get<std::string>()) << c["messages"].dump();
  }
}

TEST(ChatTemplateTest, SmolLM2TemplateFromGgufMatchesReferenceRenderings) {
  const TokenizerSpec* spec = testing::SmolLM2Spec();
  ASSERT_NE(spec, nullptr);
  auto t = ChatTemplate::FromSource(spec->chat_template);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->family(), ChatTemplate::Family::kChatML);
  EXPECT_EQ(t->default_system(),
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  ExpectRenderingsMatch(*t, Golden()["chat"]);
}

TEST(ChatTemplateTest, RenderedSmolLM2PromptsEncodeToReferenceIds) {
  const Tokenizer* tok = testing::SmolLM2();
  ASSERT_NE(tok, nullptr);
  for (const auto& c : Golden()["chat"]) {
    auto ids = tok->Encode(c["rendered"].get<std::string>(), /*add_bos=*/false,
                           /*parse_special=*/true);
    ASSERT_TRUE(ids.ok());
    EXPECT_EQ(*ids, c["rendered_ids"].get<std::vector<int32_t>>());
  }
}

TEST(ChatTemplateTest, Llama3TemplateMatchesReferenceRenderings) {
  auto t = ChatTemplate::FromSource(Golden()["llama3_chat_template"].get<std::string>());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->family(), ChatTemplate::Family::kLlama3);
  ExpectRenderingsMatch(*t, Golden()["llama3_chat"]);
}

TEST(ChatTemplateTest, ChatMLWithoutDefaultSystemInsertsNone) {
  auto t = ChatTemplate::FromSource(
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->default_system(), "");
  EXPECT_EQ(*t->Apply({{"user", "hi"}}, true), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplateTest, EscapedNewlineDefaultSystemIsExtracted) {
  // Qwen2's form: the default sits in an else-branch, after a non-literal one.
  auto t = ChatTemplate::FromSource(
      "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] "
      "+ '<|im_end|>\\n' }}{% else %}{{ '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{% endif %}");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->default_system(), "You are Qwen.");
}

TEST(ChatTemplateTest, EmptySourceIsPlain) {
  auto t = ChatTemplate::FromSource("");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->family(), ChatTemplate::Family::kPlain);
  EXPECT_EQ(*t->Apply({{"user", "hi"}}, true), "user: hi\nassistant:");
}

TEST(ChatTemplateTest, UnrecognisedTemplatesAreUnimplemented) {
  EXPECT_EQ(ChatTemplate::FromSource("{{ messages }}").status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(ChatTemplate::FromSource("<|start_header_id|><|end_header_id|><|eot_id|>"
                                     "Cutting Knowledge Date: December 2023")
                .status()
                .code(),
            absl::StatusCode::kUnimplemented);
}

TEST(ChatTemplateTest, UnknownRoleNamesTheMessage) {
  auto t = ChatTemplate::FromSource("<|im_start|><|im_end|>");
  ASSERT_TRUE(t.ok());
  auto r = t->Apply({{"user", "a"}, {"wizard", "b"}}, false);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("message 1"));
}

}  // namespace
}  // namespace tailorkv::tokenizer
