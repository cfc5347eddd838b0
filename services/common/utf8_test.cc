#include "common/utf8.h"

#include <string>

#include <gtest/gtest.h>

namespace tailorkv::common {
namespace {

constexpr size_t kValid = std::string_view::npos;

size_t Find(const std::string& s) { return FindInvalidUtf8(s); }

TEST(Utf8Test, AcceptsValidTextOfEveryLength) {
  EXPECT_EQ(Find(""), kValid);
  EXPECT_EQ(Find("plain ascii"), kValid);
  EXPECT_EQ(Find("caf\xC3\xA9"), kValid);                 // U+00E9, 2 bytes
  EXPECT_EQ(Find("\xE2\x82\xAC"), kValid);                // U+20AC, 3 bytes
  EXPECT_EQ(Find("\xF0\x9F\x98\x80"), kValid);            // U+1F600, 4 bytes
  EXPECT_EQ(Find("\xEF\xBF\xBF"), kValid);                // U+FFFF
  EXPECT_EQ(Find("\xED\x9F\xBF"), kValid);                // U+D7FF, just below surrogates
  EXPECT_EQ(Find("\xEE\x80\x80"), kValid);                // U+E000, just above surrogates
  EXPECT_EQ(Find("\xF4\x8F\xBF\xBF"), kValid);            // U+10FFFF, the last code point
  EXPECT_EQ(Find(std::string("nul\0inside", 10)), kValid);  // U+0000 is valid UTF-8
}

TEST(Utf8Test, RejectsOverlongEncodings) {
  EXPECT_EQ(Find("\xC0\x80"), 0u);              // NUL as 2 bytes
  EXPECT_EQ(Find("ab\xC1\xBF"), 2u);            // U+007F as 2 bytes
  EXPECT_EQ(Find("\xE0\x80\xAF"), 0u);          // '/' as 3 bytes
  EXPECT_EQ(Find("\xE0\x9F\xBF"), 0u);          // U+07FF as 3 bytes
  EXPECT_EQ(Find("\xF0\x8F\xBF\xBF"), 0u);      // U+FFFF as 4 bytes
}

TEST(Utf8Test, RejectsSurrogatesAndCodePointsAboveTheRange) {
  EXPECT_EQ(Find("\xED\xA0\x80"), 0u);          // U+D800
  EXPECT_EQ(Find("x\xED\xBF\xBF"), 1u);         // U+DFFF
  EXPECT_EQ(Find("\xED\xA0\xBD\xED\xB8\x80"), 0u);  // CESU-8 pair
  EXPECT_EQ(Find("\xF4\x90\x80\x80"), 0u);      // U+110000
  EXPECT_EQ(Find("\xF5\x80\x80\x80"), 0u);
  EXPECT_EQ(Find("\xFF"), 0u);
  EXPECT_EQ(Find("\xFE"), 0u);
}

TEST(Utf8Test, RejectsTruncatedSequencesAndStrayContinuations) {
  EXPECT_EQ(Find("abc\xC3"), 3u);               // cut after the lead byte
  EXPECT_EQ(Find("\xE2\x82"), 0u);              // 3-byte sequence cut short
  EXPECT_EQ(Find("ok\xF0\x9F\x98"), 2u);        // 4-byte sequence cut short
  EXPECT_EQ(Find("\xE2\x82x"), 0u);             // ASCII where a continuation belongs
  EXPECT_EQ(Find("\x80"), 0u);                  // lone continuation
  EXPECT_EQ(Find("\xC3\xA9\xA9"), 2u);          // one continuation too many
}

TEST(Utf8Test, ValidateNamesTheFieldAndOffset) {
  EXPECT_TRUE(ValidateUtf8("fine", "text").ok());
  absl::Status s = ValidateUtf8("ab\xFF", "chat.messages[1].content");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("chat.messages[1].content"), std::string_view::npos) << s;
  EXPECT_NE(s.message().find("byte 2"), std::string_view::npos) << s;
}

}  // namespace
}  // namespace tailorkv::common
