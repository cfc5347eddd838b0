#include "tokenizer/utf8.h"

#include <string>

#include "gtest/gtest.h"

namespace tailorkv::tokenizer::internal {
namespace {

constexpr char kFffd[] = "\xEF\xBF\xBD";

TEST(Utf8Test, DecodesEveryLengthAndRejectsIllFormed) {
  EXPECT_EQ(DecodeUtf8Char("A").cp, U'A');
  EXPECT_EQ(DecodeUtf8Char("é").cp, U'é');
  EXPECT_EQ(DecodeUtf8Char("€").cp, U'€');
  const Utf8Char robot = DecodeUtf8Char("🤖");
  EXPECT_EQ(robot.kind, Utf8Char::kValid);
  EXPECT_EQ(robot.length, 4);
  EXPECT_EQ(robot.cp, U'🤖');
  EXPECT_EQ(DecodeUtf8Char("\xF0\x9F").kind, Utf8Char::kIncomplete);
  EXPECT_EQ(DecodeUtf8Char("\xC0\xAF").kind, Utf8Char::kInvalid);      // overlong
  EXPECT_EQ(DecodeUtf8Char("\xED\xA0\x80").kind, Utf8Char::kInvalid);  // surrogate
  EXPECT_EQ(DecodeUtf8Char("\xF4\x90\x80\x80").kind, Utf8Char::kInvalid);  // > U+10FFFF
  EXPECT_EQ(DecodeUtf8Char("\x80").kind, Utf8Char::kInvalid);
}

TEST(Utf8Test, SanitizeReplacesEachMaximalSubpart) {
  // Examples from Unicode 15 §3.9 (Table 3-8 style).
  EXPECT_EQ(SanitizeUtf8("a\xF1\x80\x80" "b"), std::string("a") + kFffd + "b");
  EXPECT_EQ(SanitizeUtf8("\xC0\xAF"), std::string(kFffd) + kFffd);
  EXPECT_EQ(SanitizeUtf8("\xE1\x80\xE2\xF0\x91\x92\xF1\xBF\x41"),
            std::string(kFffd) + kFffd + kFffd + kFffd + "A");
  EXPECT_EQ(SanitizeUtf8("ok\xE2\x82"), std::string("ok") + kFffd);
  EXPECT_EQ(SanitizeUtf8("plain ☃"), "plain ☃");
}

TEST(Utf8Test, CompletePrefixStopsBeforeIncompleteTail) {
  std::string out;
  EXPECT_EQ(AppendCompleteUtf8("ab\xE2\x82", out), 2u);
  EXPECT_EQ(out, "ab");
  out.clear();
  // An ill-formed byte is not held back: it can never become valid.
  EXPECT_EQ(AppendCompleteUtf8("a\xFF", out), 2u);
  EXPECT_EQ(out, std::string("a") + kFffd);
}

}  // namespace
}  // namespace tailorkv::tokenizer::internal
