#include "eval/prompts.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace tailorkv::eval {
namespace {

bool IsSpace(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsSentenceEnd(char c) { return c == '.' || c == '!' || c == '?'; }
bool IsCloser(char c) { return c == '"' || c == '\'' || c == ')' || c == ']'; }

}  // namespace

std::vector<std::string> SplitSentences(std::string_view text) {
  std::vector<std::string> out;
  size_t begin = 0;
  size_t i = 0;
  while (i < text.size()) {
    if (!IsSentenceEnd(text[i])) {
      ++i;
      continue;
    }
    size_t end = i + 1;
    while (end < text.size() && (IsSentenceEnd(text[end]) || IsCloser(text[end]))) ++end;
    if (end < text.size() && IsSpace(text[end])) {
      out.emplace_back(text.substr(begin, end - begin));
      begin = end;
    }
    i = end;
  }
  if (begin < text.size()) out.emplace_back(text.substr(begin));
  return out;
}

int64_t Filler::total_tokens() const {
  int64_t n = 0;
  for (const auto& s : segments) n += static_cast<int64_t>(s.size());
  return n;
}

absl::StatusOr<Filler> MakeFiller(std::string_view text, const TokenizeFn& tokenize,
                                  std::string_view what) {
  Filler filler;
  std::vector<std::string> sentences = SplitSentences(text);
  // The filler cycles, so its first segment follows its last one: it must
  // start with the whitespace that separates them.
  if (sentences.size() > 1 &&
      std::all_of(sentences.back().begin(), sentences.back().end(), IsSpace)) {
    sentences.front().insert(0, sentences.back());
    sentences.pop_back();
  } else if (!sentences.empty() && !IsSpace(sentences.front().front())) {
    sentences.front().insert(0, " ");
  }
  for (const std::string& sentence : sentences) {
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenize(sentence));
    if (!ids.empty()) filler.segments.push_back(std::move(ids));
  }
  if (filler.segments.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": the filler text has no tokens"));
  }
  return filler;
}

absl::StatusOr<HaystackPrompt> BuildHaystackPrompt(const HaystackSpec& spec, const Filler& filler) {
  if (!(spec.depth >= 0.0 && spec.depth <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrFormat("depth must be in [0, 1], got %g", spec.depth));
  }
  if (filler.segments.empty()) return absl::InvalidArgumentError("filler: no segments");
  const int fixed = static_cast<int>(spec.intro.size() + spec.needle.size() + spec.question.size());
  if (fixed > spec.length) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "length %d is too short: intro, needle and question alone take %d tokens", spec.length,
        fixed));
  }
  const int h = spec.length - fixed;

  // Whole segments, cycling from the start segment, until they hold >= h
  // tokens; `ends` are the stream offsets where segments end.
  std::vector<int32_t> stream;
  std::vector<int64_t> ends;
  const int n_seg = static_cast<int>(filler.segments.size());
  int seg = ((spec.start_segment % n_seg) + n_seg) % n_seg;
  while (static_cast<int>(stream.size()) < h) {
    const auto& s = filler.segments[seg];
    stream.insert(stream.end(), s.begin(), s.end());
    ends.push_back(static_cast<int64_t>(stream.size()));
    seg = (seg + 1) % n_seg;
  }
  // Cut the excess off the front, so the haystack never ends mid-sentence.
  const int64_t cut = static_cast<int64_t>(stream.size()) - h;
  std::vector<int64_t> boundaries = {0};
  for (int64_t e : ends) {
    if (e - cut > 0) boundaries.push_back(e - cut);  // the last one is h
  }
  if (h == 0) boundaries = {0};
  const double target = spec.depth * h;
  int64_t best = boundaries.front();
  for (int64_t b : boundaries) {
    if (std::abs(static_cast<double>(b) - target) < std::abs(static_cast<double>(best) - target)) {
      best = b;
    }
  }

  HaystackPrompt out;
  out.tokens.reserve(spec.length);
  out.tokens.insert(out.tokens.end(), spec.intro.begin(), spec.intro.end());
  out.haystack_begin = static_cast<int>(out.tokens.size());
  out.haystack_tokens = h;
  const auto hay = stream.begin() + cut;
  out.tokens.insert(out.tokens.end(), hay, hay + best);
  out.needle_begin = static_cast<int>(out.tokens.size());
  out.tokens.insert(out.tokens.end(), spec.needle.begin(), spec.needle.end());
  out.tokens.insert(out.tokens.end(), hay + best, stream.end());
  out.tokens.insert(out.tokens.end(), spec.question.begin(), spec.question.end());
  out.actual_depth = h > 0 ? static_cast<double>(best) / h : 1.0;
  return out;
}

std::string PasskeyIntro() {
  return "There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n";
}
std::string PasskeyNeedle(std::string_view key) {
  return absl::StrCat(" The pass key is ", std::string(key), ". Remember it. ", std::string(key),
                      " is the pass key.");
}
std::string PasskeyQuestion() { return "\nWhat is the pass key? The pass key is"; }

std::string NeedleIntro() {
  return "Below is a long document. Hidden somewhere in it is a special magic number for a "
         "city. Read the document carefully and answer the question at the end.\n\n";
}
std::string NeedleSentence(std::string_view city, std::string_view number) {
  return absl::StrCat(" The special magic number for ", std::string(city), " is ",
                      std::string(number), ".");
}
std::string NeedleQuestion(std::string_view city) {
  return absl::StrCat("\n\nQuestion: What is the special magic number for ", std::string(city),
                      " mentioned in the document above?\nAnswer: The special magic number for ",
                      std::string(city), " is");
}

const std::vector<std::string>& NeedleCities() {
  static const auto* cities = new std::vector<std::string>{
      "Lisbon",   "Nairobi",   "Montreal", "Osaka",     "Valparaiso", "Krakow",   "Tbilisi",
      "Cusco",    "Marrakesh", "Helsinki", "Hanoi",     "Adelaide",   "Bergen",   "Cordoba",
      "Dakar",    "Edinburgh", "Fukuoka",  "Glasgow",   "Havana",     "Izmir",    "Jaipur",
      "Kampala",  "Leipzig",   "Manila",   "Nagoya",    "Oaxaca",     "Porto",    "Quito",
      "Riga",     "Seville",   "Tallinn",  "Ulaanbaatar"};
  return *cities;
}

HaystackDraw DrawHaystackCell(uint64_t seed, HaystackTask task, int length, int depth_index,
                              int trial, int filler_segments) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(task), static_cast<uint32_t>(length),
                    static_cast<uint32_t>(depth_index), static_cast<uint32_t>(trial)};
  std::mt19937_64 rng(seq);
  HaystackDraw d;
  if (task == HaystackTask::kPasskey) {
    d.answer = std::to_string(std::uniform_int_distribution<int>(10000, 99999)(rng));
  } else {
    const auto& cities = NeedleCities();
    d.city = cities[std::uniform_int_distribution<size_t>(0, cities.size() - 1)(rng)];
    d.answer = std::to_string(std::uniform_int_distribution<int>(1000000, 9999999)(rng));
    d.start_segment =
        std::uniform_int_distribution<int>(0, std::max(1, filler_segments) - 1)(rng);
  }
  return d;
}

absl::StatusOr<HaystackPrompt> BuildTaskPrompt(HaystackTask task, const HaystackDraw& draw,
                                               const std::vector<int32_t>& bos, int length,
                                               double depth, const Filler& filler,
                                               const TokenizeFn& tokenize) {
  const bool passkey = task == HaystackTask::kPasskey;
  HaystackSpec spec;
  spec.intro = bos;
  ASSIGN_OR_RETURN(std::vector<int32_t> intro, tokenize(passkey ? PasskeyIntro() : NeedleIntro()));
  spec.intro.insert(spec.intro.end(), intro.begin(), intro.end());
  ASSIGN_OR_RETURN(spec.needle, tokenize(passkey ? PasskeyNeedle(draw.answer)
                                                 : NeedleSentence(draw.city, draw.answer)));
  ASSIGN_OR_RETURN(spec.question, tokenize(passkey ? PasskeyQuestion() : NeedleQuestion(draw.city)));
  spec.length = length;
  spec.depth = depth;
  spec.start_segment = draw.start_segment;
  return BuildHaystackPrompt(spec, filler);
}

std::string FirstNumber(std::string_view text) {
  size_t i = 0;
  while (i < text.size() && !IsDigit(text[i])) ++i;
  size_t j = i;
  while (j < text.size() && IsDigit(text[j])) ++j;
  return std::string(text.substr(i, j - i));
}

bool HasCompleteNumber(std::string_view text) {
  size_t i = 0;
  while (i < text.size() && !IsDigit(text[i])) ++i;
  while (i < text.size() && IsDigit(text[i])) ++i;
  return i > 0 && i < text.size() && IsDigit(text[i - 1]);
}

bool PasskeyCorrect(std::string_view completion, std::string_view key) {
  return !key.empty() && completion.find(key) != std::string_view::npos;
}

bool NeedleCorrect(std::string_view completion, std::string_view number) {
  return !number.empty() && FirstNumber(completion) == number;
}

absl::StatusOr<std::vector<PromptCase>> ParsePromptCases(std::string_view jsonl,
                                                         std::string_view file_name) {
  using json = nlohmann::json;
  std::vector<PromptCase> cases;
  std::set<std::string> names;
  int line_no = 0;
  size_t pos = 0;
  while (pos < jsonl.size()) {
    size_t nl = jsonl.find('\n', pos);
    if (nl == std::string_view::npos) nl = jsonl.size();
    std::string_view line = jsonl.substr(pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    const auto err = [&](std::string_view msg) {
      return absl::InvalidArgumentError(absl::StrCat(std::string(file_name), ":", line_no, ": ", std::string(msg)));
    };
    size_t first = 0;
    while (first < line.size() && IsSpace(line[first])) ++first;
    if (first == line.size() || line[first] == '#') continue;
    json j = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return err("not valid JSON");
    if (!j.is_object()) return err("expected a JSON object");
    PromptCase c;
    c.file = std::string(file_name);
    c.line = line_no;
    for (const auto& [key, value] : j.items()) {
      if (key == "name") {
        if (!value.is_string() || value.get<std::string>().empty()) {
          return err("\"name\" must be a non-empty string");
        }
        c.name = value.get<std::string>();
      } else if (key == "prompt") {
        if (!value.is_string() || value.get<std::string>().empty()) {
          return err("\"prompt\" must be a non-empty string");
        }
        c.prompt = value.get<std::string>();
      } else if (key == "expect") {
        if (!value.is_array() || value.empty()) {
          return err("\"expect\" must be a non-empty array of strings");
        }
        for (const auto& e : value) {
          if (!e.is_string() || e.get<std::string>().empty()) {
            return err("\"expect\" entries must be non-empty strings");
          }
          c.expect.push_back(e.get<std::string>());
        }
      } else if (key == "max_tokens") {
        if (!value.is_number_integer() || value.get<int64_t>() < 1 || value.get<int64_t>() > 4096) {
          return err("\"max_tokens\" must be an integer in [1, 4096]");
        }
        c.max_tokens = value.get<int>();
      } else if (key == "chat") {
        if (!value.is_boolean()) return err("\"chat\" must be true or false");
        c.chat = value.get<bool>();
      } else {
        return err(absl::StrCat("unknown key \"", key,
                                "\" (allowed: name, prompt, expect, max_tokens, chat)"));
      }
    }
    if (c.name.empty()) return err("missing \"name\"");
    if (c.prompt.empty()) return err("missing \"prompt\"");
    if (c.expect.empty()) return err("missing \"expect\"");
    if (!names.insert(c.name).second) return err(absl::StrCat("duplicate name \"", c.name, "\""));
    cases.push_back(std::move(c));
  }
  if (cases.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(file_name), ": no prompt cases"));
  }
  return cases;
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::InternalError(absl::StrCat("error reading ", path));
  return ss.str();
}

absl::StatusOr<std::vector<PromptCase>> LoadPromptFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadTextFile(path));
  return ParsePromptCases(text, path);
}

std::vector<bool> FoundExpectations(std::string_view completion,
                                    const std::vector<std::string>& expect) {
  std::vector<bool> found;
  found.reserve(expect.size());
  for (const std::string& e : expect) found.push_back(completion.find(e) != std::string_view::npos);
  return found;
}

}  // namespace tailorkv::eval
