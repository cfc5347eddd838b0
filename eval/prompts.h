// Prompt construction and scoring for the accuracy harness (tkv_accuracy).
//
// Everything here is deterministic and independent of any model: text is
// turned into tokens through a caller-supplied TokenizeFn, so tests can use a
// byte-per-token fake and the harness the model's tokenizer.
//
// Haystack prompts (passkey and needle-in-a-haystack) are assembled from
// separately tokenized pieces: intro | filler tokens with the needle inserted
// at a segment (sentence) boundary | question. Pieces are split where a
// byte-level BPE pre-tokenizer splits anyway (before the space that starts a
// word), so the tokens are those of the joined text up to rare merges across
// the seams. The prompt has exactly the requested number of tokens: the
// filler is taken segment by segment (cycling through the text from a chosen
// start segment) and its first tokens are cut off so that it fits exactly
// (the haystack may therefore begin inside a sentence, never end inside one).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace tailorkv::eval {

// Text -> token ids, without bos.
using TokenizeFn = std::function<absl::StatusOr<std::vector<int32_t>>(std::string_view)>;

// Splits prose into segments that concatenate back to `text` exactly. A
// segment ends after a sentence end ('.', '!' or '?', optionally followed by
// closing quotes or brackets) that is followed by whitespace; the whitespace
// belongs to the next segment, so every segment after the first starts with
// it. Empty input gives no segments.
std::vector<std::string> SplitSentences(std::string_view text);

// A filler text, tokenized once per segment (SplitSentences). The filler is
// used cyclically, so its first segment is made to start with whitespace: a
// whitespace-only last segment moves to its front, otherwise a space does.
struct Filler {
  std::vector<std::vector<int32_t>> segments;  // no empty segment
  int64_t total_tokens() const;
};
// InvalidArgument naming `what` when the text yields no tokens.
absl::StatusOr<Filler> MakeFiller(std::string_view text, const TokenizeFn& tokenize,
                                  std::string_view what);

struct HaystackSpec {
  std::vector<int32_t> intro;     // first tokens (bos included by the caller when wanted)
  std::vector<int32_t> needle;    // inserted at the depth, between two filler segments
  std::vector<int32_t> question;  // last tokens
  int length = 0;                 // total tokens of the prompt
  double depth = 0;               // 0 = needle right after the intro, 1 = right before the question
  int start_segment = 0;          // first filler segment (taken modulo the segment count)
};

struct HaystackPrompt {
  std::vector<int32_t> tokens;  // exactly spec.length
  int haystack_begin = 0;       // index of the first filler token
  int haystack_tokens = 0;      // filler tokens (needle excluded)
  int needle_begin = 0;         // index of the needle's first token in `tokens`
  // Filler tokens before the needle / haystack_tokens (1 when there is no filler).
  double actual_depth = 0;
};

// Builds the prompt: the needle goes to the segment boundary nearest to
// depth * haystack_tokens (ties to the earlier one). InvalidArgument when
// depth is outside [0, 1], the filler is empty, or intro + needle + question
// already exceed `length` (the message gives both numbers).
absl::StatusOr<HaystackPrompt> BuildHaystackPrompt(const HaystackSpec& spec, const Filler& filler);

// The passkey task's texts (the classic prompt of Mohtashami & Jaggi 2023).
inline constexpr std::string_view kPasskeyFiller =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
std::string PasskeyIntro();
std::string PasskeyNeedle(std::string_view key);  // starts with a space
std::string PasskeyQuestion();                    // ends with "The pass key is"

// The natural-filler needle task's texts.
std::string NeedleIntro();
std::string NeedleSentence(std::string_view city, std::string_view number);  // starts with a space
std::string NeedleQuestion(std::string_view city);  // ends with "...for CITY is"
// Cities used as needle keys; none of them occurs in eval/data/prose.txt.
const std::vector<std::string>& NeedleCities();

// The two haystack tasks and what is drawn at random for one prompt.
enum class HaystackTask { kPasskey, kNeedle };
struct HaystackDraw {
  std::string answer;     // passkey: 5 digits; needle: 7 digits (no leading zero)
  std::string city;       // needle only
  int start_segment = 0;  // needle only: where in the prose the haystack starts
};
// Seeded per cell: the same (seed, task, length, depth_index, trial) always
// gives the same draw, whatever other cells are evaluated.
HaystackDraw DrawHaystackCell(uint64_t seed, HaystackTask task, int length, int depth_index,
                              int trial, int filler_segments);
// The task's prompt for a draw: `bos` (possibly empty) + intro, filler with
// the needle at `depth`, question; exactly `length` tokens.
absl::StatusOr<HaystackPrompt> BuildTaskPrompt(HaystackTask task, const HaystackDraw& draw,
                                               const std::vector<int32_t>& bos, int length,
                                               double depth, const Filler& filler,
                                               const TokenizeFn& tokenize);

// Scoring.
// Passkey: the key's digits appear anywhere in the completion.
bool PasskeyCorrect(std::string_view completion, std::string_view key);
// Needle: the first maximal run of ASCII digits in the completion equals
// `number` exactly ("4829173" in " 4829173." is correct; "48291730" is not).
bool NeedleCorrect(std::string_view completion, std::string_view number);
// The first maximal run of digits ("" when none).
std::string FirstNumber(std::string_view text);
// True once `text` holds a digit run followed by a non-digit: a number answer
// is complete and decoding can stop.
bool HasCompleteNumber(std::string_view text);

// One case of a prompt file (JSONL, one object per line; blank lines and
// lines starting with '#' are skipped):
//   {"name": "capital", "prompt": "The capital of France is", "expect": ["Paris"],
//    "max_tokens": 8, "chat": false}
// name (string, non-empty, unique in the file), prompt (string, non-empty)
// and expect (non-empty array of non-empty strings) are required;
// max_tokens (1..4096) defaults to 32; chat (bool, default false) wraps the
// prompt as one user message in the model's chat template. Other keys are
// errors.
struct PromptCase {
  std::string file;  // where it came from (for reports)
  int line = 0;
  std::string name;
  std::string prompt;
  std::vector<std::string> expect;
  int max_tokens = 32;
  bool chat = false;
};

// InvalidArgument "FILE:LINE: ..." naming the field for any malformed line.
absl::StatusOr<std::vector<PromptCase>> ParsePromptCases(std::string_view jsonl,
                                                         std::string_view file_name);
absl::StatusOr<std::vector<PromptCase>> LoadPromptFile(const std::string& path);

// Which expected substrings the completion contains (one flag per expect).
std::vector<bool> FoundExpectations(std::string_view completion,
                                    const std::vector<std::string>& expect);

// Reads a whole file; NotFound / Internal naming the path.
absl::StatusOr<std::string> ReadTextFile(const std::string& path);

}  // namespace tailorkv::eval
