#include "eval/prompts.h"

#include <gtest/gtest.h>

#include <set>

namespace tailorkv::eval {
namespace {

// One token per byte: lengths and positions can be checked exactly.
absl::StatusOr<std::vector<int32_t>> ByteTokens(std::string_view text) {
  std::vector<int32_t> ids;
  for (unsigned char c : text) ids.push_back(c);
  return ids;
}

std::string Text(const std::vector<int32_t>& ids, size_t begin = 0, size_t end = std::string::npos) {
  std::string s;
  for (size_t i = begin; i < std::min(end, ids.size()); ++i) s.push_back(static_cast<char>(ids[i]));
  return s;
}

const TokenizeFn kBytes = ByteTokens;

TEST(SplitSentencesTest, SegmentsConcatenateBackAndStartWithTheirSpace) {
  const std::string text =
      "It rained. Then it stopped!  Did it? \"Yes.\" The value was 3.5 units.\n\nNew paragraph";
  const auto parts = SplitSentences(text);
  std::string joined;
  for (const auto& p : parts) joined += p;
  EXPECT_EQ(joined, text);
  ASSERT_EQ(parts.size(), 6u);
  EXPECT_EQ(parts[0], "It rained.");
  EXPECT_EQ(parts[1], " Then it stopped!");
  EXPECT_EQ(parts[2], "  Did it?");
  EXPECT_EQ(parts[3], " \"Yes.\"");
  EXPECT_EQ(parts[4], " The value was 3.5 units.");  // no split inside 3.5
  EXPECT_EQ(parts[5], "\n\nNew paragraph");
  EXPECT_TRUE(SplitSentences("").empty());
}

TEST(MakeFillerTest, RejectsTextWithoutTokens) {
  auto f = MakeFiller("", kBytes, "my-filler.txt");
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(f.status().message().find("my-filler.txt"), std::string::npos);
}

// Ten segments of 10, 13, 16, ... bytes, each distinguishable.
std::string VariedFillerText() {
  std::string text;
  for (int i = 0; i < 10; ++i) {
    text += " S" + std::to_string(i) + std::string(6 + 3 * i, static_cast<char>('a' + i)) + ".";
  }
  return text;
}

HaystackSpec Spec(int length, double depth, int start = 0) {
  HaystackSpec s;
  s.intro = *ByteTokens("INTRO\n");
  s.needle = *ByteTokens(" NEEDLE-42.");
  s.question = *ByteTokens("\nQ?");
  s.length = length;
  s.depth = depth;
  s.start_segment = start;
  return s;
}

TEST(BuildHaystackPromptTest, ExactLengthNeedleAtNearestBoundaryAtEveryDepth) {
  auto filler = MakeFiller(VariedFillerText(), kBytes, "varied");
  ASSERT_TRUE(filler.ok()) << filler.status();
  ASSERT_EQ(filler->segments.size(), 10u);
  int max_segment = 0;
  for (const auto& s : filler->segments) max_segment = std::max<int>(max_segment, s.size());
  for (int length : {20, 21, 77, 513, 1000, 2049}) {
    for (double depth : {0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0}) {
      for (int start : {0, 3, 17}) {
        SCOPED_TRACE(testing::Message() << "length " << length << " depth " << depth << " start "
                                        << start);
        const HaystackSpec spec = Spec(length, depth, start);
        auto p = BuildHaystackPrompt(spec, *filler);
        ASSERT_TRUE(p.ok()) << p.status();
        ASSERT_EQ(static_cast<int>(p->tokens.size()), length);
        const int h = length - static_cast<int>(spec.intro.size() + spec.needle.size() +
                                                spec.question.size());
        EXPECT_EQ(p->haystack_tokens, h);
        EXPECT_EQ(p->haystack_begin, static_cast<int>(spec.intro.size()));
        EXPECT_EQ(Text(p->tokens, 0, spec.intro.size()), "INTRO\n");
        EXPECT_EQ(Text(p->tokens, p->needle_begin, p->needle_begin + spec.needle.size()),
                  " NEEDLE-42.");
        EXPECT_EQ(Text(p->tokens, length - spec.question.size()), "\nQ?");
        const int offset = p->needle_begin - p->haystack_begin;  // filler tokens before the needle
        EXPECT_NEAR(offset, depth * h, max_segment / 2.0 + 0.5);
        EXPECT_DOUBLE_EQ(p->actual_depth, h > 0 ? static_cast<double>(offset) / h : 1.0);
        // The needle sits between segments: the filler token after it starts a segment
        // (" S<digit>") unless the needle is last, and the haystack ends a sentence.
        const size_t after = p->needle_begin + spec.needle.size();
        if (offset < h && offset > 0) {
          EXPECT_EQ(Text(p->tokens, after, after + 2), " S");
        }
        if (h > 0 && offset < h) {
          EXPECT_EQ(p->tokens[length - spec.question.size() - 1], '.');
        }
      }
    }
  }
}

TEST(BuildHaystackPromptTest, DepthsZeroAndOneAreTheEnds) {
  auto filler = MakeFiller(std::string(kPasskeyFiller), kBytes, "passkey");
  ASSERT_TRUE(filler.ok());
  const HaystackSpec s0 = Spec(301, 0.0);
  auto p0 = BuildHaystackPrompt(s0, *filler);
  ASSERT_TRUE(p0.ok());
  EXPECT_EQ(p0->needle_begin, p0->haystack_begin);
  const HaystackSpec s1 = Spec(301, 1.0);
  auto p1 = BuildHaystackPrompt(s1, *filler);
  ASSERT_TRUE(p1.ok());
  EXPECT_EQ(p1->needle_begin + s1.needle.size() + s1.question.size(), 301u);
  EXPECT_DOUBLE_EQ(p1->actual_depth, 1.0);
  // The haystack minus the needle is the same filler at every depth.
  const HaystackSpec sh = Spec(301, 0.5);
  auto ph = BuildHaystackPrompt(sh, *filler);
  ASSERT_TRUE(ph.ok());
  auto strip = [&](const HaystackPrompt& p) {
    std::vector<int32_t> t = p.tokens;
    t.erase(t.begin() + p.needle_begin, t.begin() + p.needle_begin + s0.needle.size());
    return t;
  };
  EXPECT_EQ(strip(*p0), strip(*p1));
  EXPECT_EQ(strip(*p0), strip(*ph));
  EXPECT_NE(p0->tokens, ph->tokens);
}

TEST(BuildHaystackPromptTest, NoFillerWhenTheFixedPartsFillTheLength) {
  auto filler = MakeFiller(std::string(kPasskeyFiller), kBytes, "passkey");
  ASSERT_TRUE(filler.ok());
  const HaystackSpec s = Spec(6 + 11 + 3, 0.5);
  auto p = BuildHaystackPrompt(s, *filler);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->haystack_tokens, 0);
  EXPECT_EQ(Text(p->tokens), "INTRO\n NEEDLE-42.\nQ?");
}

TEST(BuildHaystackPromptTest, RejectsTooShortLengthAndBadDepth) {
  auto filler = MakeFiller(std::string(kPasskeyFiller), kBytes, "passkey");
  ASSERT_TRUE(filler.ok());
  auto short_p = BuildHaystackPrompt(Spec(19, 0.5), *filler);
  ASSERT_FALSE(short_p.ok());
  EXPECT_EQ(short_p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(short_p.status().message().find("19"), std::string::npos) << short_p.status();
  EXPECT_NE(short_p.status().message().find("20"), std::string::npos) << short_p.status();
  for (double bad : {-0.01, 1.5, std::nan("")}) {
    auto p = BuildHaystackPrompt(Spec(100, bad), *filler);
    ASSERT_FALSE(p.ok());
    EXPECT_NE(p.status().message().find("depth"), std::string::npos);
  }
  auto empty = BuildHaystackPrompt(Spec(100, 0.5), Filler{});
  EXPECT_FALSE(empty.ok());
}

TEST(DrawHaystackCellTest, DeterministicPerCellAndIndependentOfOtherCells) {
  const HaystackDraw a = DrawHaystackCell(7, HaystackTask::kNeedle, 2048, 2, 3, 400);
  const HaystackDraw b = DrawHaystackCell(7, HaystackTask::kNeedle, 2048, 2, 3, 400);
  EXPECT_EQ(a.answer, b.answer);
  EXPECT_EQ(a.city, b.city);
  EXPECT_EQ(a.start_segment, b.start_segment);
  EXPECT_EQ(a.answer.size(), 7u);
  EXPECT_NE(a.city, "");
  EXPECT_GE(a.start_segment, 0);
  EXPECT_LT(a.start_segment, 400);
  // Different cells and seeds draw different values (checked over many cells).
  std::set<std::string> keys;
  for (int trial = 0; trial < 50; ++trial) {
    const HaystackDraw p = DrawHaystackCell(7, HaystackTask::kPasskey, 1024, 0, trial, 5);
    EXPECT_EQ(p.answer.size(), 5u);
    EXPECT_TRUE(p.city.empty());
    keys.insert(p.answer);
  }
  EXPECT_GT(keys.size(), 45u);
  EXPECT_NE(DrawHaystackCell(7, HaystackTask::kPasskey, 1024, 0, 0, 5).answer +
                DrawHaystackCell(7, HaystackTask::kPasskey, 1024, 0, 1, 5).answer,
            DrawHaystackCell(8, HaystackTask::kPasskey, 1024, 0, 0, 5).answer +
                DrawHaystackCell(8, HaystackTask::kPasskey, 1024, 0, 1, 5).answer);
}

TEST(BuildTaskPromptTest, PasskeyAndNeedlePromptsHoldTheirAnswer) {
  auto pass_filler = MakeFiller(std::string(kPasskeyFiller), kBytes, "passkey");
  auto prose = MakeFiller(VariedFillerText(), kBytes, "varied");
  ASSERT_TRUE(pass_filler.ok() && prose.ok());
  const HaystackDraw pd = DrawHaystackCell(1, HaystackTask::kPasskey, 900, 1, 0, 5);
  auto pp = BuildTaskPrompt(HaystackTask::kPasskey, pd, {1}, 900, 0.25, *pass_filler, kBytes);
  ASSERT_TRUE(pp.ok()) << pp.status();
  ASSERT_EQ(pp->tokens.size(), 900u);
  EXPECT_EQ(pp->tokens[0], 1);  // bos first
  const std::string ptext = Text(pp->tokens, 1);
  EXPECT_EQ(ptext.rfind(PasskeyIntro(), 0), 0u);
  EXPECT_NE(ptext.find(PasskeyNeedle(pd.answer)), std::string::npos);
  EXPECT_TRUE(ptext.ends_with("The pass key is"));

  const HaystackDraw nd = DrawHaystackCell(1, HaystackTask::kNeedle, 1500, 4, 2, 10);
  auto np = BuildTaskPrompt(HaystackTask::kNeedle, nd, {}, 1500, 1.0, *prose, kBytes);
  ASSERT_TRUE(np.ok()) << np.status();
  ASSERT_EQ(np->tokens.size(), 1500u);
  const std::string ntext = Text(np->tokens);
  EXPECT_NE(ntext.find(NeedleSentence(nd.city, nd.answer) + NeedleQuestion(nd.city)),
            std::string::npos);
  EXPECT_TRUE(ntext.ends_with("for " + nd.city + " is"));
}

TEST(NeedleCitiesTest, NoneOccursInTheShippedProse) {
  auto prose = ReadTextFile(std::string(TAILORKV_SOURCE_DIR) + "/eval/data/prose.txt");
  ASSERT_TRUE(prose.ok()) << prose.status();
  EXPECT_GT(prose->size(), 30000u);
  for (const std::string& city : NeedleCities()) {
    EXPECT_EQ(prose->find(city), std::string::npos) << city;
  }
  // The prose needs no digits of its own: a stray number could be mistaken for the answer.
  EXPECT_EQ(FirstNumber(*prose), "");
}

TEST(ScoringTest, PasskeyAcceptsTheKeyAnywhere) {
  EXPECT_TRUE(PasskeyCorrect(" 48213.", "48213"));
  EXPECT_TRUE(PasskeyCorrect("the key: 48213", "48213"));
  EXPECT_FALSE(PasskeyCorrect(" 4821.", "48213"));
  EXPECT_FALSE(PasskeyCorrect("", "48213"));
  EXPECT_FALSE(PasskeyCorrect("anything", ""));
}

TEST(ScoringTest, NeedleRequiresTheFirstNumberExactly) {
  EXPECT_TRUE(NeedleCorrect(" 4829173.", "4829173"));
  EXPECT_TRUE(NeedleCorrect(" is 4829173 and", "4829173"));
  EXPECT_FALSE(NeedleCorrect(" 48291730", "4829173"));
  EXPECT_FALSE(NeedleCorrect(" 482917", "4829173"));
  EXPECT_FALSE(NeedleCorrect(" 1234567 then 4829173", "4829173"));
  EXPECT_FALSE(NeedleCorrect(" none", "4829173"));
  EXPECT_EQ(FirstNumber("ab 12c34"), "12");
  EXPECT_EQ(FirstNumber("none"), "");
}

TEST(ScoringTest, CompleteNumberNeedsATerminator) {
  EXPECT_FALSE(HasCompleteNumber(" 48"));
  EXPECT_FALSE(HasCompleteNumber(" The"));
  EXPECT_FALSE(HasCompleteNumber(""));
  EXPECT_TRUE(HasCompleteNumber(" 4829173."));
  EXPECT_TRUE(HasCompleteNumber("7 "));
}

TEST(ScoringTest, ExpectationsAreCaseSensitiveSubstrings) {
  EXPECT_EQ(FoundExpectations("Paris is big", {"Paris", "paris", "big"}),
            (std::vector<bool>{true, false, true}));
}

TEST(ParsePromptCasesTest, ParsesCasesSkippingBlankAndCommentLines) {
  const std::string jsonl =
      "# capitals\n"
      "{\"name\": \"fr\", \"prompt\": \"The capital of France is\", \"expect\": [\"Paris\"]}\n"
      "\n"
      "  {\"name\": \"chat\", \"prompt\": \"Hi\", \"expect\": [\"a\", \"b\"], \"max_tokens\": 5, "
      "\"chat\": true}\n";
  auto cases = ParsePromptCases(jsonl, "caps.jsonl");
  ASSERT_TRUE(cases.ok()) << cases.status();
  ASSERT_EQ(cases->size(), 2u);
  EXPECT_EQ((*cases)[0].name, "fr");
  EXPECT_EQ((*cases)[0].max_tokens, 32);
  EXPECT_FALSE((*cases)[0].chat);
  EXPECT_EQ((*cases)[0].line, 2);
  EXPECT_EQ((*cases)[1].expect, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ((*cases)[1].max_tokens, 5);
  EXPECT_TRUE((*cases)[1].chat);
  EXPECT_EQ((*cases)[1].line, 4);
  EXPECT_EQ((*cases)[1].file, "caps.jsonl");
}

TEST(ParsePromptCasesTest, ErrorsNameTheFileLineAndField) {
  const std::string ok = "{\"name\": \"a\", \"prompt\": \"p\", \"expect\": [\"x\"]}\n";
  struct Bad {
    std::string line;
    std::string needle;
  };
  const std::vector<Bad> bad = {
      {"{\"name\": \"b\", \"prompt\": \"p\"", "not valid JSON"},
      {"[1, 2]", "object"},
      {"{\"prompt\": \"p\", \"expect\": [\"x\"]}", "\"name\""},
      {"{\"name\": \"b\", \"expect\": [\"x\"]}", "\"prompt\""},
      {"{\"name\": \"b\", \"prompt\": \"p\"}", "\"expect\""},
      {"{\"name\": \"b\", \"prompt\": \"p\", \"expect\": []}", "\"expect\""},
      {"{\"name\": \"b\", \"prompt\": \"p\", \"expect\": [\"\"]}", "\"expect\""},
      {"{\"name\": \"b\", \"prompt\": \"p\", \"expect\": \"x\"}", "\"expect\""},
      {"{\"name\": \"b\", \"prompt\": \"p\", \"expect\": [\"x\"], \"max_tokens\": 0}", "max_tokens"},
      {"{\"name\": \"b\", \"prompt\": \"p\", \"expect\": [\"x\"], \"max_tokens\": 2.5}", "max_tokens"},
      {"{\"name\": \"b\", \"prompt\": \"p\", \"expect\": [\"x\"], \"chat\": 1}", "\"chat\""},
      {"{\"name\": \"b\", \"prompt\": \"p\", \"expect\": [\"x\"], \"expected\": [\"y\"]}",
       "unknown key \"expected\""},
      {"{\"name\": \"a\", \"prompt\": \"p\", \"expect\": [\"x\"]}", "duplicate name \"a\""},
      {"{\"name\": 3, \"prompt\": \"p\", \"expect\": [\"x\"]}", "\"name\""},
  };
  for (const Bad& b : bad) {
    auto r = ParsePromptCases(ok + "\n" + b.line + "\n", "t.jsonl");
    ASSERT_FALSE(r.ok()) << b.line;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("t.jsonl:3: "), std::string::npos) << r.status();
    EXPECT_NE(r.status().message().find(b.needle), std::string::npos) << r.status();
  }
  auto empty = ParsePromptCases("# nothing\n\n", "e.jsonl");
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(empty.status().message().find("no prompt cases"), std::string::npos);
  auto missing = LoadPromptFile("/nonexistent/cases.jsonl");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("/nonexistent/cases.jsonl"), std::string::npos);
}

}  // namespace
}  // namespace tailorkv::eval
