#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <queue>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/gguf_file.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/utf8.h"

namespace tailorkv::tokenizer {
namespace {

using internal::DecodeUtf8Char;
using internal::PreTokenizer;
using internal::Utf8Char;

// GPT-2's byte-level alphabet: printable bytes stand for themselves, the
// other 68 bytes are moved to U+0100.. in byte order, so every token text is
// printable and free of spaces ("Ġ" is the space byte).
struct ByteAlphabet {
  std::array<char32_t, 256> byte_to_cp{};
  absl::flat_hash_map<char32_t, uint8_t> cp_to_byte;

  ByteAlphabet() {
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      byte_to_cp[b] = printable ? static_cast<char32_t>(b) : next++;
      cp_to_byte[byte_to_cp[b]] = static_cast<uint8_t>(b);
    }
  }
};

const ByteAlphabet& Alphabet() {
  static const ByteAlphabet* const kAlphabet = new ByteAlphabet();
  return *kAlphabet;
}

std::string ByteLevelEncode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char b : bytes) internal::AppendUtf8(Alphabet().byte_to_cp[static_cast<uint8_t>(b)], out);
  return out;
}

// Maps token text in the byte-level alphabet back to bytes. A code point
// outside the alphabet (not produced by byte-level training, but possible in
// hand-made vocabularies) is kept as its own UTF-8.
std::string ByteLevelDecode(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    const Utf8Char c = DecodeUtf8Char(text.substr(pos));
    if (c.kind == Utf8Char::kValid) {
      auto it = Alphabet().cp_to_byte.find(c.cp);
      if (it != Alphabet().cp_to_byte.end()) {
        out.push_back(static_cast<char>(it->second));
      } else {
        out.append(text.substr(pos, c.length));
      }
    } else {
      out.append(text.substr(pos, c.length));
    }
    pos += c.length;
  }
  return out;
}

// "<0xAB>" -> 0xAB, for byte tokens.
int ParseByteToken(std::string_view text) {
  if (text.size() != 6 || text.substr(0, 3) != "<0x" || text[5] != '>') return -1;
  int value = 0;
  for (char ch : text.substr(3, 2)) {
    int d = (ch >= '0' && ch <= '9') ? ch - '0'
            : (ch >= 'A' && ch <= 'F') ? ch - 'A' + 10
            : (ch >= 'a' && ch <= 'f') ? ch - 'a' + 10 : -1;
    if (d < 0) return -1;
    value = value * 16 + d;
  }
  return value;
}

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

struct Merge {
  int32_t rank;
  int32_t result;
};

// Control-token texts that close a turn in the chat formats we render.
constexpr std::string_view kEndOfTurnTexts[] = {
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
};

}  // namespace

struct Tokenizer::Impl {
  TokenizerSpec spec;
  PreTokenizer pre = PreTokenizer::kGpt2;
  // Llama 3's tokenizer.json sets ignore_merges: a piece that is itself a
  // token is emitted whole, even when the merges would split it.
  bool ignore_merges = false;
  std::vector<TokenType> types;
  std::vector<std::string> bytes;  // id -> decoded bytes (raw text for special tokens)
  absl::flat_hash_map<std::string, int32_t> token_to_id;
  std::array<int32_t, 256> byte_to_id{};
  absl::flat_hash_map<uint64_t, Merge> merges;
  // Tokens matched in the input text before pre-tokenization, indexed by
  // their first byte and sorted longest first (leftmost-longest matching, as
  // Hugging Face's added-token matcher does).
  std::array<std::vector<int32_t>, 256> specials_by_first_byte;
  absl::flat_hash_set<int32_t> end_of_generation;

  void AppendBpe(std::string_view piece, std::vector<int32_t>& out) const;
  void AppendText(std::string_view text, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::AppendBpe(std::string_view piece, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    auto it = token_to_id.find(ByteLevelEncode(piece));
    if (it != token_to_id.end()) {
      out.push_back(it->second);
      return;
    }
  }
  // Symbols form a doubly linked list over the piece's bytes; a min-heap of
  // candidate pairs ordered by (rank, position) applies the best merge first
  // and, among equal ranks, the leftmost, as the reference BPE does. Stale
  // heap entries are recognised by their ids no longer matching.
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // -1 at the ends
  };
  struct Candidate {
    int32_t rank, left, right, left_id, right_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  // Bytes without a token are left out before merging, so merges may join
  // their neighbours (Hugging Face's behaviour).
  std::vector<Symbol> symbols;
  symbols.reserve(piece.size());
  for (char b : piece) {
    const int32_t id = byte_to_id[static_cast<uint8_t>(b)];
    if (id >= 0) symbols.push_back({id, static_cast<int32_t>(symbols.size()) - 1, -1});
  }
  const int n = static_cast<int>(symbols.size());
  if (n == 0) return;
  for (int i = 0; i + 1 < n; ++i) symbols[i].next = i + 1;
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto push = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    auto it = merges.find(PairKey(symbols[left].id, symbols[right].id));
    if (it == merges.end()) return;
    heap.push({it->second.rank, left, right, symbols[left].id, symbols[right].id});
  };
  for (int i = 0; i + 1 < n; ++i) push(i, i + 1);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& l = symbols[c.left];
    if (l.id != c.left_id || l.next != c.right || symbols[c.right].id != c.right_id) continue;
    Symbol& r = symbols[c.right];
    l.id = merges.find(PairKey(c.left_id, c.right_id))->second.result;
    l.next = r.next;
    if (r.next >= 0) symbols[r.next].prev = c.left;
    r.id = -1;  // dead: no candidate can match it again
    push(l.prev, c.left);
    push(c.left, l.next);
  }
  for (int i = 0; i >= 0; i = symbols[i].next) out.push_back(symbols[i].id);
}

void Tokenizer::Impl::AppendText(std::string_view text, std::vector<int32_t>& out) const {
  for (std::string_view piece : internal::SplitPreTokens(pre, text)) AppendBpe(piece, out);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Create(TokenizerSpec spec) {
  auto impl = std::make_unique<Impl>();
  if (spec.model != "gpt2") {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokenizer.ggml.model \"", spec.model, "\" is not supported (only \"gpt2\" byte-level BPE)"));
  }
  ASSIGN_OR_RETURN(impl->pre, internal::PreTokenizerFromName(spec.pre));
  impl->ignore_merges = impl->pre == PreTokenizer::kLlama3;

  const size_t n = spec.tokens.size();
  if (n == 0) return absl::InvalidArgumentError("tokenizer.ggml.tokens is empty");
  if (n > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError("tokenizer.ggml.tokens has more than 2^31-1 entries");
  }
  if (!spec.token_types.empty() && spec.token_types.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokenizer.ggml.token_type has ", spec.token_types.size(), " entries for ", n, " tokens"));
  }
  const std::pair<const char*, int32_t> ids[] = {
      {"tokenizer.ggml.bos_token_id", spec.bos_id},
      {"tokenizer.ggml.eos_token_id", spec.eos_id},
      {"tokenizer.ggml.eot_token_id", spec.eot_id},
      {"tokenizer.ggml.padding_token_id", spec.pad_id},
  };
  for (const auto& [name, id] : ids) {
    if (id < -1 || id >= static_cast<int64_t>(n)) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " ", id, " is out of range for ", n, " tokens"));
    }
  }
  if (spec.add_bos && spec.bos_id < 0) {
    return absl::InvalidArgumentError(
        "tokenizer.ggml.add_bos_token is set but there is no tokenizer.ggml.bos_token_id");
  }

  impl->types.resize(n, TokenType::kNormal);
  impl->bytes.resize(n);
  impl->token_to_id.reserve(n);
  for (size_t id = 0; id < n; ++id) {
    const std::string& text = spec.tokens[id];
    if (!spec.token_types.empty()) {
      const int32_t t = spec.token_types[id];
      if (t < 0 || t > static_cast<int32_t>(TokenType::kByte)) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer.ggml.token_type[", id, "] = ", t, " is not a token type"));
      }
      impl->types[id] = static_cast<TokenType>(t);
    }
    if (!internal::IsValidUtf8(text)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.ggml.tokens[", id, "] is not valid UTF-8"));
    }
    // The first of duplicate texts wins, as in Hugging Face's vocab import.
    impl->token_to_id.try_emplace(text, static_cast<int32_t>(id));
    switch (impl->types[id]) {
      case TokenType::kControl:
      case TokenType::kUserDefined:
      case TokenType::kUnknown:
        impl->bytes[id] = text;
        break;
      case TokenType::kUnused:
        break;
      case TokenType::kByte: {
        const int b = ParseByteToken(text);
        if (b >= 0) impl->bytes[id] = std::string(1, static_cast<char>(b));
        break;
      }
      case TokenType::kNormal:
      case TokenType::kUndefined:
        impl->bytes[id] = ByteLevelDecode(text);
        break;
    }
    const bool special =
        impl->types[id] == TokenType::kControl || impl->types[id] == TokenType::kUserDefined;
    if (special && !text.empty()) {
      impl->specials_by_first_byte[static_cast<uint8_t>(text[0])].push_back(
          static_cast<int32_t>(id));
    }
    if (impl->types[id] == TokenType::kControl &&
        std::find(std::begin(kEndOfTurnTexts), std::end(kEndOfTurnTexts), text) !=
            std::end(kEndOfTurnTexts)) {
      impl->end_of_generation.insert(static_cast<int32_t>(id));
    }
  }
  for (auto& list : impl->specials_by_first_byte) {
    std::stable_sort(list.begin(), list.end(), [&](int32_t a, int32_t b) {
      return spec.tokens[a].size() > spec.tokens[b].size();
    });
  }
  if (spec.eos_id >= 0) impl->end_of_generation.insert(spec.eos_id);
  if (spec.eot_id >= 0) impl->end_of_generation.insert(spec.eot_id);

  // Vocabularies may lack some bytes: SmolLM2 has no token for 21 of them
  // (six C0 controls, the lead bytes of the unassigned planes 4-11, and bytes
  // that never occur in UTF-8). Such bytes are dropped when encoding, as
  // Hugging Face's BPE does when there is no unk token.
  for (int b = 0; b < 256; ++b) {
    std::string symbol;
    internal::AppendUtf8(Alphabet().byte_to_cp[b], symbol);
    auto it = impl->token_to_id.find(symbol);
    impl->byte_to_id[b] = it == impl->token_to_id.end() ? -1 : it->second;
  }

  impl->merges.reserve(spec.merges.size());
  for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
    const std::string& merge = spec.merges[rank];
    // Byte-level token texts never contain ' ' (it is encoded as "Ġ"); the
    // search starts at 1 so that a malformed leading space is caught below.
    const size_t space = merge.find(' ', 1);
    if (space == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.ggml.merges[", rank, "] \"", merge, "\" is not \"left right\""));
    }
    const std::string left = merge.substr(0, space);
    const std::string right = merge.substr(space + 1);
    auto find = [&](const std::string& text) -> absl::StatusOr<int32_t> {
      auto it = impl->token_to_id.find(text);
      if (it == impl->token_to_id.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tokenizer.ggml.merges[", rank, "] \"", merge, "\" names unknown token \"", text, "\""));
      }
      return it->second;
    };
    ASSIGN_OR_RETURN(int32_t left_id, find(left));
    ASSIGN_OR_RETURN(int32_t right_id, find(right));
    ASSIGN_OR_RETURN(int32_t result_id, find(left + right));
    // A repeated pair keeps its first (best) rank.
    impl->merges.try_emplace(PairKey(left_id, right_id),
                             Merge{static_cast<int32_t>(rank), result_id});
  }

  impl->spec = std::move(spec);
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(
    std::string_view text, bool add_bos, bool parse_special,
    absl::Span<const std::pair<size_t, size_t>> literal_ranges) const {
  for (size_t pos = 0; pos < text.size();) {
    const Utf8Char c = DecodeUtf8Char(text.substr(pos));
    if (c.kind != Utf8Char::kValid) {
      return absl::InvalidArgumentError(
          absl::StrCat("text to encode is not valid UTF-8 at byte ", pos));
    }
    pos += c.length;
  }
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos) {
    if (impl_->spec.bos_id < 0) {
      return absl::FailedPreconditionError("add_bos requested but the model has no bos token");
    }
    out.push_back(impl_->spec.bos_id);
  }
  size_t plain_start = 0;
  size_t next_literal = 0;  // first literal range not entirely before `pos`
  for (size_t pos = 0; pos < text.size();) {
    while (next_literal < literal_ranges.size() && literal_ranges[next_literal].second <= pos) {
      ++next_literal;
    }
    // Bytes from `pos` on that a control token may cover.
    size_t control_room = text.size() - pos;
    if (next_literal < literal_ranges.size()) {
      control_room = literal_ranges[next_literal].first <= pos
                         ? 0
                         : literal_ranges[next_literal].first - pos;
    }
    int32_t match = -1;
    for (int32_t id : impl_->specials_by_first_byte[static_cast<uint8_t>(text[pos])]) {
      // User-defined tokens are always matched; control tokens only when
      // asked (llama.cpp's rule; Hugging Face's added tokens behave alike)
      // and never over user-supplied text.
      if (impl_->types[id] == TokenType::kControl &&
          (!parse_special || impl_->spec.tokens[id].size() > control_room)) {
        continue;
      }
      if (text.substr(pos).starts_with(impl_->spec.tokens[id])) {
        match = id;
        break;
      }
    }
    if (match < 0) {
      ++pos;
      continue;
    }
    impl_->AppendText(text.substr(plain_start, pos - plain_start), out);
    out.push_back(match);
    pos += impl_->spec.tokens[match].size();
    plain_start = pos;
  }
  impl_->AppendText(text.substr(plain_start), out);
  return out;
}

std::string Tokenizer::TokenBytes(int32_t id, bool render_special) const {
  if (id < 0 || id >= vocab_size()) return {};
  if (impl_->types[id] == TokenType::kControl && !render_special) return {};
  return impl_->bytes[id];
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids, bool render_special) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) continue;
    if (impl_->types[id] == TokenType::kControl && !render_special) continue;
    out.append(impl_->bytes[id]);
  }
  return out;
}

int Tokenizer::vocab_size() const { return static_cast<int>(impl_->spec.tokens.size()); }
int32_t Tokenizer::bos_id() const { return impl_->spec.bos_id; }
int32_t Tokenizer::eos_id() const { return impl_->spec.eos_id; }
bool Tokenizer::IsEndOfGeneration(int32_t id) const {
  return impl_->end_of_generation.contains(id);
}
const TokenizerSpec& Tokenizer::spec() const { return impl_->spec; }

absl::StatusOr<TokenizerSpec> TokenizerSpecFromGguf(const model::GgufFile& gguf) {
  TokenizerSpec spec;
  ASSIGN_OR_RETURN(spec.model, gguf.GetString("tokenizer.ggml.model"));
  // llama.cpp treats a missing pre-tokenizer as "default" (GPT-2's regex).
  if (gguf.Find("tokenizer.ggml.pre") != nullptr) {
    ASSIGN_OR_RETURN(spec.pre, gguf.GetString("tokenizer.ggml.pre"));
  } else {
    spec.pre = "default";
  }
  ASSIGN_OR_RETURN(spec.tokens, gguf.GetStringArray("tokenizer.ggml.tokens"));
  ASSIGN_OR_RETURN(spec.merges, gguf.GetStringArray("tokenizer.ggml.merges"));
  if (gguf.Find("tokenizer.ggml.token_type") != nullptr) {
    ASSIGN_OR_RETURN(std::vector<int64_t> types, gguf.GetIntArray("tokenizer.ggml.token_type"));
    spec.token_types.reserve(types.size());
    for (size_t i = 0; i < types.size(); ++i) {
      if (types[i] < INT32_MIN || types[i] > INT32_MAX) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer.ggml.token_type[", i, "] = ", types[i], " is out of range"));
      }
      spec.token_types.push_back(static_cast<int32_t>(types[i]));
    }
  }
  const std::pair<const char*, int32_t*> ids[] = {
      {"tokenizer.ggml.bos_token_id", &spec.bos_id},
      {"tokenizer.ggml.eos_token_id", &spec.eos_id},
      {"tokenizer.ggml.eot_token_id", &spec.eot_id},
      {"tokenizer.ggml.padding_token_id", &spec.pad_id},
  };
  for (const auto& [key, field] : ids) {
    if (gguf.Find(key) == nullptr) continue;
    ASSIGN_OR_RETURN(int64_t v, gguf.GetInt(key));
    if (v < -1 || v > INT32_MAX) {
      return absl::InvalidArgumentError(absl::StrCat(key, " = ", v, " is out of range"));
    }
    *field = static_cast<int32_t>(v);
  }
  // Llama 3 adds bos unless the file says otherwise (llama.cpp's default).
  spec.add_bos = spec.pre == "llama-bpe" || spec.pre == "llama3" || spec.pre == "llama-v3";
  if (gguf.Find("tokenizer.ggml.add_bos_token") != nullptr) {
    ASSIGN_OR_RETURN(int64_t v, gguf.GetInt("tokenizer.ggml.add_bos_token"));
    spec.add_bos = v != 0;
  }
  if (gguf.Find("tokenizer.chat_template") != nullptr) {
    ASSIGN_OR_RETURN(spec.chat_template, gguf.GetString("tokenizer.chat_template"));
  }
  return spec;
}

StreamingDetokenizer::StreamingDetokenizer(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {}

std::string StreamingDetokenizer::Push(int32_t id) {
  pending_.append(tokenizer_.TokenBytes(id));
  std::string out;
  const size_t done = internal::AppendCompleteUtf8(pending_, out);
  pending_.erase(0, done);
  return out;
}

std::string StreamingDetokenizer::Flush() {
  std::string out = internal::SanitizeUtf8(pending_);
  pending_.clear();
  return out;
}

}  // namespace tailorkv::tokenizer
