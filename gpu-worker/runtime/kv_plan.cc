#include "runtime/kv_plan.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/sha256.h"
#include "nlohmann/json.hpp"
#include "runtime/quant_kv.h"

namespace tailorkv::runtime {
namespace {

using json = nlohmann::json;

constexpr char kFormat[] = "tailorkv.kv_plan";
constexpr int kMaxResidual = 4096;

std::string LayerField(int layer, const std::string& field) {
  return absl::StrCat("layers[", layer, "].", field);
}

absl::Status FieldError(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

absl::Status ValidateLayer(int i, const LayerKvPolicy& l, const model::ModelConfig& c) {
  switch (l.kind) {
    case KvPolicyKind::kDense: return absl::OkStatus();
    case KvPolicyKind::kQuant: {
      const QuantParams& q = l.quant;
      if (q.bits != 1 && q.bits != 2 && q.bits != 4) {
        return FieldError(LayerField(i, "bits"), absl::StrCat("must be 1, 2 or 4, got ", q.bits));
      }
      if (q.group != 32 && q.group != 64 && q.group != 128) {
        return FieldError(LayerField(i, "group"),
                          absl::StrCat("must be 32, 64 or 128, got ", q.group));
      }
      if (c.head_dim % q.group != 0) {
        return FieldError(LayerField(i, "group"),
                          absl::StrCat("must divide head_dim ", c.head_dim, ", got ", q.group));
      }
      if (q.residual < q.group || q.residual % q.group != 0 || q.residual > kMaxResidual) {
        return FieldError(LayerField(i, "residual"),
                          absl::StrCat("must be a positive multiple of group (", q.group,
                                       ") and <= ", kMaxResidual, ", got ", q.residual));
      }
      return absl::OkStatus();
    }
    case KvPolicyKind::kWindow:
      if (l.window.sink < 0) {
        return FieldError(LayerField(i, "sink"), absl::StrCat("must be >= 0, got ", l.window.sink));
      }
      if (l.window.recent < 1) {
        return FieldError(LayerField(i, "recent"),
                          absl::StrCat("must be >= 1, got ", l.window.recent));
      }
      return absl::OkStatus();
    case KvPolicyKind::kSparse: {
      const SparseParams& s = l.sparse;
      if (s.sink < 0) {
        return FieldError(LayerField(i, "sink"), absl::StrCat("must be >= 0, got ", s.sink));
      }
      if (s.recent < 1) {
        return FieldError(LayerField(i, "recent"), absl::StrCat("must be >= 1, got ", s.recent));
      }
      if (s.top_k < 1) {
        return FieldError(LayerField(i, "top_k"), absl::StrCat("must be >= 1, got ", s.top_k));
      }
      if (s.channels < 1 || s.channels > c.head_dim) {
        return FieldError(
            LayerField(i, "channels"),
            absl::StrCat("must be in [1, head_dim ", c.head_dim, "], got ", s.channels));
      }
      if (s.index != "gpu" && s.index != "faithful") {
        return FieldError(LayerField(i, "index"),
                          absl::StrCat("must be \"gpu\" or \"faithful\", got \"", s.index, "\""));
      }
      if (s.host_bits != 16 && s.host_bits != 8) {
        return FieldError(LayerField(i, "host_bits"),
                          absl::StrCat("must be 16 or 8, got ", s.host_bits));
      }
      if (s.index_bits != 16 && s.index_bits != 8 && s.index_bits != 4) {
        return FieldError(LayerField(i, "index_bits"),
                          absl::StrCat("must be 16, 8 or 4, got ", s.index_bits));
      }
      if (s.query != "previous" && s.query != "after-attention" && s.query != "real") {
        return FieldError(LayerField(i, "query"),
                          absl::StrCat("must be \"previous\", \"after-attention\" or \"real\", got \"",
                                       s.query, "\""));
      }
      if (s.query != "previous" && s.index != "gpu") {
        return FieldError(LayerField(i, "query"),
                          absl::StrCat("\"", s.query, "\" needs index \"gpu\" (index \"", s.index,
                                       "\" scores with the real query)"));
      }
      if (s.refine < 0 || s.refine > 16) {
        return FieldError(LayerField(i, "refine"), absl::StrCat("must be in [0, 16], got ", s.refine));
      }
      if (s.refine > 0 && (s.index != "gpu" || s.query == "previous")) {
        return FieldError(LayerField(i, "refine"),
                          "needs index \"gpu\" with query \"after-attention\" or \"real\"");
      }
      if (s.group_score != "mean" && s.group_score != "max") {
        return FieldError(LayerField(i, "group_score"),
                          absl::StrCat("must be \"mean\" or \"max\", got \"", s.group_score, "\""));
      }
      if (s.group_score == "max" && s.index != "gpu") {
        return FieldError(LayerField(i, "group_score"),
                          absl::StrCat("\"max\" needs index \"gpu\", got \"", s.index, "\""));
      }
      if (s.index_bits != 16 && s.index != "gpu") {
        return FieldError(LayerField(i, "index_bits"),
                          absl::StrCat(s.index_bits, " needs index \"gpu\" (index \"", s.index,
                                       "\" keeps no index on the GPU)"));
      }
      return absl::OkStatus();
    }
  }
  return FieldError(LayerField(i, "policy"),
                    absl::StrCat("unknown policy kind ", static_cast<int>(l.kind)));
}

std::string Describe(const LayerKvPolicy& l) {
  switch (l.kind) {
    case KvPolicyKind::kDense: return "dense";
    case KvPolicyKind::kQuant:
      return absl::StrCat("quant(", l.quant.bits, "b g", l.quant.group, " r", l.quant.residual,
                          ")");
    case KvPolicyKind::kWindow:
      return absl::StrCat("window(", l.window.sink, "+", l.window.recent, ")");
    case KvPolicyKind::kSparse:
      return absl::StrCat("sparse(", l.sparse.sink, "+", l.sparse.recent, " k", l.sparse.top_k,
                          " d", l.sparse.channels, " ", l.sparse.index,
                          l.sparse.index_bits == 8   ? " i8"
                          : l.sparse.index_bits == 4 ? " i4"
                                                     : "",
                          l.sparse.query == "after-attention" ? " late"
                          : l.sparse.query == "real"          ? " real"
                                                              : "",
                          l.sparse.group_score == "max" ? " gmax" : "",
                          l.sparse.refine > 0 ? absl::StrCat(" refine", l.sparse.refine) : "",
                          l.sparse.host_bits == 8 ? " fp8" : "", ")");
  }
  return "unknown";
}

// ---- JSON reading ----

// "string \"3\"", "number 1.5": what a wrong value was, shortened.
std::string ShowValue(const json& v) {
  std::string text = v.dump();
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return absl::StrCat(v.type_name(), " ", text);
}

absl::StatusOr<int> ReadInt(const json& v, const std::string& field) {
  if (v.is_number_integer()) {  // signed or unsigned
    const bool fits =
        v.is_number_unsigned()
            ? v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int>::max())
            : v.get<int64_t>() >= std::numeric_limits<int>::min() &&
                  v.get<int64_t>() <= std::numeric_limits<int>::max();
    if (fits) return static_cast<int>(v.get<int64_t>());
    return FieldError(field, absl::StrCat("integer out of range, got ", v.dump()));
  }
  return FieldError(field, absl::StrCat("must be an integer, got ", ShowValue(v)));
}

absl::StatusOr<std::string> ReadString(const json& v, const std::string& field) {
  if (!v.is_string())
    return FieldError(field, absl::StrCat("must be a string, got ", ShowValue(v)));
  return v.get<std::string>();
}

// Rejects keys of `obj` outside `allowed`, naming the first one (in key order).
absl::Status CheckKeys(const json& obj, const std::string& prefix,
                       const std::vector<std::string>& allowed, const std::string& context) {
  for (const auto& [key, value] : obj.items()) {
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
      return FieldError(
          absl::StrCat(prefix, key),
          absl::StrCat("unknown key", context, " (allowed: ", absl::StrJoin(allowed, ", "), ")"));
    }
  }
  return absl::OkStatus();
}

// Sets *out from obj[key] when present.
absl::Status MaybeInt(const json& obj, const char* key, int layer, int* out) {
  auto it = obj.find(key);
  if (it == obj.end()) return absl::OkStatus();
  auto v = ReadInt(*it, LayerField(layer, key));
  if (!v.ok()) return v.status();
  *out = *v;
  return absl::OkStatus();
}

// Watches nlohmann::json's parse events for a key that appears twice in one
// object: the parser keeps the last value silently, so a plan holding
// {"bits": 4, ..., "bits": 1} would mean something other than what a reader
// of its first occurrence sees (and its checksum covers only the survivor).
// Records the first such key as a field path ("layers[3].bits").
class DuplicateKeyFinder {
 public:
  bool OnEvent(json::parse_event_t event, const json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        frames_.push_back(Frame{true});
        break;
      case json::parse_event_t::array_start:
        frames_.push_back(Frame{false});
        break;
      case json::parse_event_t::key: {
        if (frames_.empty() || !frames_.back().is_object) break;
        Frame& top = frames_.back();
        top.key = parsed.get<std::string>();
        if (!top.keys.insert(top.key).second && duplicate_.empty()) duplicate_ = Path();
        break;
      }
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!frames_.empty()) frames_.pop_back();
        ElementDone();
        break;
      case json::parse_event_t::value:
        ElementDone();
        break;
    }
    return true;  // keep everything: only the first duplicate is reported
  }
  // The path of the first duplicate key, "" when there was none.
  const std::string& duplicate() const { return duplicate_; }

 private:
  struct Frame {
    bool is_object = true;
    std::set<std::string> keys;  // objects: the keys seen so far
    std::string key;             // objects: the key whose value is being parsed
    size_t index = 0;            // arrays: the element being parsed
  };
  void ElementDone() {
    if (!frames_.empty() && !frames_.back().is_object) ++frames_.back().index;
  }
  std::string Path() const {
    std::string path;
    for (const Frame& f : frames_) {
      if (f.is_object) {
        absl::StrAppend(&path, path.empty() ? "" : ".", f.key);
      } else {
        absl::StrAppend(&path, "[", f.index, "]");
      }
    }
    return path;
  }
  std::vector<Frame> frames_;
  std::string duplicate_;
};

absl::StatusOr<LayerKvPolicy> ParseLayer(const json& entry, int i) {
  const std::string where = absl::StrCat("layers[", i, "]");
  if (!entry.is_object()) {
    return FieldError(where, absl::StrCat("must be an object, got ", ShowValue(entry)));
  }
  auto layer_it = entry.find("layer");
  if (layer_it == entry.end()) {
    return FieldError(LayerField(i, "layer"), "missing (every entry names its layer index)");
  }
  auto index = ReadInt(*layer_it, LayerField(i, "layer"));
  if (!index.ok()) return index.status();
  if (*index != i) {
    return FieldError(LayerField(i, "layer"),
                      absl::StrCat("expected ", i, ", got ", *index,
                                   " (every layer is listed exactly once, in order 0..n-1)"));
  }
  auto policy_it = entry.find("policy");
  if (policy_it == entry.end()) return FieldError(LayerField(i, "policy"), "missing");
  auto policy = ReadString(*policy_it, LayerField(i, "policy"));
  if (!policy.ok()) return policy.status();

  LayerKvPolicy l;
  std::vector<std::string> allowed = {"layer", "policy", "dense_preference", "sparse_error",
                                      "quant_error"};
  if (*policy == "dense") {
    l.kind = KvPolicyKind::kDense;
  } else if (*policy == "quant") {
    l.kind = KvPolicyKind::kQuant;
    allowed.insert(allowed.end(), {"bits", "group", "residual"});
  } else if (*policy == "window") {
    l.kind = KvPolicyKind::kWindow;
    allowed.insert(allowed.end(), {"sink", "recent"});
  } else if (*policy == "sparse") {
    l.kind = KvPolicyKind::kSparse;
    allowed.insert(allowed.end(),
                   {"sink", "recent", "top_k", "channels", "index", "host_bits", "index_bits", "query",
                    "group_score", "refine"});
  } else {
    return FieldError(
        LayerField(i, "policy"),
        absl::StrCat("must be dense, quant, window or sparse, got \"", *policy, "\""));
  }
  if (auto st =
          CheckKeys(entry, where + ".", allowed, absl::StrCat(" for policy \"", *policy, "\""));
      !st.ok()) {
    return st;
  }
  const std::pair<const char*, double*> measured[] = {{"dense_preference", &l.dense_preference},
                                                      {"sparse_error", &l.sparse_error},
                                                      {"quant_error", &l.quant_error}};
  for (const auto& [key, out] : measured) {
    auto it = entry.find(key);
    if (it == entry.end()) continue;
    if (!it->is_number() || it->get<double>() < 0) {
      return FieldError(LayerField(i, key),
                        absl::StrCat("must be a number >= 0, got ", ShowValue(*it)));
    }
    *out = it->get<double>();
  }
  absl::Status st;
  switch (l.kind) {
    case KvPolicyKind::kDense: break;
    case KvPolicyKind::kQuant:
      if (st = MaybeInt(entry, "bits", i, &l.quant.bits); !st.ok()) return st;
      if (st = MaybeInt(entry, "group", i, &l.quant.group); !st.ok()) return st;
      if (st = MaybeInt(entry, "residual", i, &l.quant.residual); !st.ok()) return st;
      break;
    case KvPolicyKind::kWindow:
      if (st = MaybeInt(entry, "sink", i, &l.window.sink); !st.ok()) return st;
      if (st = MaybeInt(entry, "recent", i, &l.window.recent); !st.ok()) return st;
      break;
    case KvPolicyKind::kSparse: {
      if (st = MaybeInt(entry, "sink", i, &l.sparse.sink); !st.ok()) return st;
      if (st = MaybeInt(entry, "recent", i, &l.sparse.recent); !st.ok()) return st;
      if (st = MaybeInt(entry, "top_k", i, &l.sparse.top_k); !st.ok()) return st;
      if (st = MaybeInt(entry, "channels", i, &l.sparse.channels); !st.ok()) return st;
      if (st = MaybeInt(entry, "host_bits", i, &l.sparse.host_bits); !st.ok()) return st;
      if (st = MaybeInt(entry, "index_bits", i, &l.sparse.index_bits); !st.ok()) return st;
      if (st = MaybeInt(entry, "refine", i, &l.sparse.refine); !st.ok()) return st;
      auto index_it = entry.find("index");
      if (index_it != entry.end()) {
        auto s = ReadString(*index_it, LayerField(i, "index"));
        if (!s.ok()) return s.status();
        l.sparse.index = *s;
      }
      auto group_it = entry.find("group_score");
      if (group_it != entry.end()) {
        auto s = ReadString(*group_it, LayerField(i, "group_score"));
        if (!s.ok()) return s.status();
        l.sparse.group_score = *s;
      }
      auto query_it = entry.find("query");
      if (query_it != entry.end()) {
        auto s = ReadString(*query_it, LayerField(i, "query"));
        if (!s.ok()) return s.status();
        l.sparse.query = *s;
      }
      break;
    }
  }
  return l;
}

absl::Status CheckModelBlock(const json& root, const model::ModelConfig& c) {
  auto it = root.find("model");
  if (it == root.end()) {
    return FieldError("model", "missing (the plan must say which model shape it is for)");
  }
  const json& m = *it;
  if (!m.is_object())
    return FieldError("model", absl::StrCat("must be an object, got ", ShowValue(m)));
  if (auto st = CheckKeys(m, "model.", {"n_layers", "n_kv_heads", "head_dim", "digest"}, "");
      !st.ok()) {
    return st;
  }
  const std::pair<const char*, int> fields[] = {
      {"n_layers", c.n_layers}, {"n_kv_heads", c.n_kv_heads}, {"head_dim", c.head_dim}};
  for (const auto& [key, expected] : fields) {
    const std::string field = absl::StrCat("model.", key);
    auto f = m.find(key);
    if (f == m.end()) return FieldError(field, "missing");
    auto v = ReadInt(*f, field);
    if (!v.ok()) return v.status();
    if (*v != expected) {
      return FieldError(field, absl::StrCat("the plan is for ", key, " ", *v, ", the model (",
                                            c.name, ") has ", expected));
    }
  }
  return absl::OkStatus();
}

// ---- specs ----

// Strict decimal: digits only, no sign or spaces.
absl::StatusOr<int> SpecInt(const std::string& spec, const std::string& name,
                            const std::string& text) {
  const bool digits =
      !text.empty() && text.size() <= 9 &&
      std::all_of(text.begin(), text.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  if (!digits) {
    return absl::InvalidArgumentError(absl::StrCat("kv plan spec \"", spec, "\": ", name,
                                                   " must be a non-negative integer, got \"", text,
                                                   "\""));
  }
  int v = 0;
  for (char ch : text) v = v * 10 + (ch - '0');
  return v;
}

constexpr char kSpecGrammar[] =
    "dense, quant:BITS[:GROUP[:RESIDUAL]], window:SINK:RECENT, tailorkv:BITS[:LAYERS], "
    "sparse:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX][:FLAG...], "
    "hybrid:BITS:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX][:FLAG...] (INDEX gpu or faithful; FLAGs "
    "i8 or i4, late or real, gmax, refineN, fp8) or "
    "@plan.json";

absl::Status SpecError(const std::string& spec, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("kv plan spec \"", spec, "\": ", what));
}

// TOPK[:SINK:RECENT[:CHANNELS]] from parts[first..]: a faithful sparse layer.
absl::StatusOr<LayerKvPolicy> SpecSparse(const std::string& spec,
                                         const std::vector<std::string>& parts, size_t first) {
  LayerKvPolicy l;
  l.kind = KvPolicyKind::kSparse;
  const std::pair<const char*, int*> fields[] = {{"TOPK", &l.sparse.top_k},
                                                 {"SINK", &l.sparse.sink},
                                                 {"RECENT", &l.sparse.recent},
                                                 {"CHANNELS", &l.sparse.channels}};
  for (size_t i = first; i < parts.size(); ++i) {
    auto v = SpecInt(spec, fields[i - first].first, parts[i]);
    if (!v.ok()) return v.status();
    *fields[i - first].second = *v;
  }
  return l;
}

}  // namespace

std::string_view KvPolicyName(KvPolicyKind kind) {
  switch (kind) {
    case KvPolicyKind::kDense: return "dense";
    case KvPolicyKind::kQuant: return "quant";
    case KvPolicyKind::kWindow: return "window";
    case KvPolicyKind::kSparse: return "sparse";
  }
  return "unknown";
}

KvPlan KvPlan::Dense(int n_layers) {
  KvPlan plan;
  plan.name = "dense";
  plan.layers.assign(n_layers, LayerKvPolicy{});
  return plan;
}

KvPlan KvPlan::Uniform(int n_layers, const LayerKvPolicy& policy, std::string name) {
  KvPlan plan;
  plan.name = std::move(name);
  plan.layers.assign(n_layers, policy);
  return plan;
}

bool KvPlan::all_dense() const {
  for (const LayerKvPolicy& l : layers) {
    if (l.kind != KvPolicyKind::kDense) return false;
  }
  return true;
}

std::string KvPlan::Summary() const {
  if (layers.empty()) return "no layers";
  // Counts per distinct description, in order of first appearance.
  std::vector<std::pair<std::string, int>> counts;
  for (const LayerKvPolicy& l : layers) {
    const std::string d = Describe(l);
    auto it =
        std::find_if(counts.begin(), counts.end(), [&](const auto& p) { return p.first == d; });
    if (it == counts.end()) {
      counts.emplace_back(d, 1);
    } else {
      ++it->second;
    }
  }
  return absl::StrJoin(counts, ", ", [](std::string* out, const auto& p) {
    absl::StrAppend(out, p.first, " x", p.second);
  });
}

absl::Status KvPlan::Validate(const model::ModelConfig& config) const {
  if (static_cast<int>(layers.size()) != config.n_layers) {
    return FieldError("layers", absl::StrCat("the plan has ", layers.size(),
                                             " layers, the model has ", config.n_layers));
  }
  for (int i = 0; i < static_cast<int>(layers.size()); ++i) {
    if (auto st = ValidateLayer(i, layers[i], config); !st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::StatusOr<KvPlan> ParseKvPlanJson(std::string_view text, const model::ModelConfig& config) {
  json root;
  DuplicateKeyFinder duplicates;
  try {
    // The exception carries the line and column, which the no-throw parse drops.
    root = json::parse(text, [&duplicates](int, json::parse_event_t event, json& parsed) {
      return duplicates.OnEvent(event, parsed);
    });
  } catch (const json::exception& e) {
    // parse_error, and out_of_range for a number beyond double ("1e999"),
    // which is not a parse_error and used to escape as an uncaught exception.
    return absl::InvalidArgumentError(absl::StrCat("kv plan is not valid JSON: ", e.what()));
  }
  if (!duplicates.duplicate().empty()) {
    return FieldError(duplicates.duplicate(),
                      "duplicate key (each key may appear once in an object)");
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv plan must be a JSON object, got ", ShowValue(root)));
  }
  if (auto st =
          CheckKeys(root, "", {"format", "version", "name", "model", "layers", "profile",
                               "checksum"}, "");
      !st.ok()) {
    return st;
  }
  auto format_it = root.find("format");
  if (format_it == root.end())
    return FieldError("format", absl::StrCat("missing (must be \"", kFormat, "\")"));
  auto format = ReadString(*format_it, "format");
  if (!format.ok()) return format.status();
  if (*format != kFormat) {
    return FieldError("format", absl::StrCat("must be \"", kFormat, "\", got \"", *format, "\""));
  }
  auto version_it = root.find("version");
  if (version_it == root.end()) return FieldError("version", "missing");
  auto version = ReadInt(*version_it, "version");
  if (!version.ok()) return version.status();
  if (*version != KvPlan::kVersion) {
    return FieldError(
        "version", absl::StrCat("this build reads version ", KvPlan::kVersion, ", got ", *version));
  }
  KvPlan plan;
  if (auto name_it = root.find("name"); name_it != root.end()) {
    auto name = ReadString(*name_it, "name");
    if (!name.ok()) return name.status();
    plan.name = *name;
  }
  if (auto st = CheckModelBlock(root, config); !st.ok()) return st;
  if (auto it = root.find("checksum"); it != root.end()) {
    auto sum = ReadString(*it, "checksum");
    if (!sum.ok()) return sum.status();
    json rest = root;
    rest.erase("checksum");
    const std::string computed = common::Sha256Tag(rest.dump());
    if (*sum != computed) {
      return FieldError("checksum", absl::StrCat("\"", *sum, "\" does not match the content (",
                                                 computed, "): the plan was changed or damaged"));
    }
  }
  if (auto it = root["model"].find("digest"); it != root["model"].end()) {
    auto digest = ReadString(*it, "model.digest");
    if (!digest.ok()) return digest.status();
    if (!common::IsSha256Tag(*digest)) {
      return FieldError("model.digest",
                        absl::StrCat("must be \"sha256:\" and 64 lowercase hex digits, got \"",
                                     *digest, "\""));
    }
    plan.model_digest = *digest;
  }
  if (auto it = root.find("profile"); it != root.end()) {
    if (!it->is_object()) {
      return FieldError("profile", absl::StrCat("must be an object, got ", ShowValue(*it)));
    }
    plan.profile_json = it->dump();
  }
  auto layers_it = root.find("layers");
  if (layers_it == root.end()) return FieldError("layers", "missing");
  if (!layers_it->is_array()) {
    return FieldError("layers", absl::StrCat("must be an array, got ", ShowValue(*layers_it)));
  }
  const int n = static_cast<int>(layers_it->size());
  for (int i = 0; i < n; ++i) {
    auto layer = ParseLayer((*layers_it)[i], i);
    if (!layer.ok()) return layer.status();
    plan.layers.push_back(*std::move(layer));
  }
  if (n != config.n_layers) {
    return FieldError(
        "layers", absl::StrCat("has ", n, " entries, the model has ", config.n_layers, " layers"));
  }
  if (auto st = plan.Validate(config); !st.ok()) return st;
  return plan;
}

absl::StatusOr<KvPlan> LoadKvPlanFile(const std::string& path, const model::ModelConfig& config) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("kv plan file ", path, ": cannot open"));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("kv plan file ", path, ": read error"));
  auto plan = ParseKvPlanJson(ss.str(), config);
  if (!plan.ok()) {
    return absl::Status(plan.status().code(),
                        absl::StrCat("kv plan file ", path, ": ", plan.status().message()));
  }
  return plan;
}

std::string KvPlanToJson(const KvPlan& plan, const model::ModelConfig& config) {
  using ojson = nlohmann::ordered_json;
  // One layer per line: plans are read and diffed by people too.
  std::string out =
      absl::StrCat("{\n  \"format\": \"", kFormat, "\",\n  \"version\": ", KvPlan::kVersion, ",\n");
  if (!plan.name.empty()) absl::StrAppend(&out, "  \"name\": ", ojson(plan.name).dump(), ",\n");
  ojson model = {{"n_layers", config.n_layers},
                 {"n_kv_heads", config.n_kv_heads},
                 {"head_dim", config.head_dim}};
  if (!plan.model_digest.empty()) model["digest"] = plan.model_digest;
  absl::StrAppend(&out, "  \"model\": ", model.dump(), ",\n  \"layers\": [");
  for (size_t i = 0; i < plan.layers.size(); ++i) {
    const LayerKvPolicy& l = plan.layers[i];
    ojson e;
    e["layer"] = i;
    e["policy"] = std::string(KvPolicyName(l.kind));
    // Every parameter is written, so the file means the same under other defaults.
    switch (l.kind) {
      case KvPolicyKind::kDense: break;
      case KvPolicyKind::kQuant:
        e["bits"] = l.quant.bits;
        e["group"] = l.quant.group;
        e["residual"] = l.quant.residual;
        break;
      case KvPolicyKind::kWindow:
        e["sink"] = l.window.sink;
        e["recent"] = l.window.recent;
        break;
      case KvPolicyKind::kSparse:
        e["sink"] = l.sparse.sink;
        e["recent"] = l.sparse.recent;
        e["top_k"] = l.sparse.top_k;
        e["channels"] = l.sparse.channels;
        e["index"] = l.sparse.index;
        e["host_bits"] = l.sparse.host_bits;
        e["index_bits"] = l.sparse.index_bits;
        e["query"] = l.sparse.query;
        e["group_score"] = l.sparse.group_score;
        e["refine"] = l.sparse.refine;
        break;
    }
    if (l.dense_preference >= 0) e["dense_preference"] = l.dense_preference;
    if (l.sparse_error >= 0) e["sparse_error"] = l.sparse_error;
    if (l.quant_error >= 0) e["quant_error"] = l.quant_error;
    absl::StrAppend(&out, i == 0 ? "\n    " : ",\n    ", e.dump());
  }
  absl::StrAppend(&out, plan.layers.empty() ? "]" : "\n  ]");
  if (!plan.profile_json.empty()) {
    // Canonical (sorted keys): the block is the profiler's record, not read by people line by line.
    absl::StrAppend(&out, ",\n  \"profile\": ", json::parse(plan.profile_json).dump());
  }
  // The checksum covers the canonical form of everything above.
  const std::string sum = common::Sha256Tag(json::parse(out + "}").dump());
  absl::StrAppend(&out, ",\n  \"checksum\": \"", sum, "\"\n}\n");
  return out;
}

absl::Status CheckPlanModel(const KvPlan& plan, std::string_view model_digest) {
  if (plan.model_digest.empty() || plan.model_digest == model_digest) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "kv plan", plan.name.empty() ? "" : absl::StrCat(" \"", plan.name, "\""),
      " was made for model ", plan.model_digest, ", this model is ",
      model_digest.empty() ? std::string("of unknown digest") : std::string(model_digest)));
}

absl::StatusOr<KvPlan> ParseKvPlanSpec(std::string_view spec_view,
                                       const model::ModelConfig& config) {
  const std::string spec(spec_view);
  if (spec.empty()) return SpecError(spec, absl::StrCat("empty; expected ", kSpecGrammar));
  if (spec.front() == '@') {
    const std::string path(spec.substr(1));
    if (path.empty()) return SpecError(spec, "a plan file path must follow '@'");
    return LoadKvPlanFile(path, config);
  }
  std::vector<std::string> parts = absl::StrSplit(spec, ':');
  const std::string kind = parts[0];
  // Sparse and hybrid specs may end in the selection index's name and
  // "fp8" (the host tier's format), in that order.
  std::string index = "faithful", query = "previous", group_score = "mean";
  int refine = 0;
  int host_bits = 16, index_bits = 16;
  if (kind == "sparse" || kind == "hybrid") {
    // Trailing flags, each at most once, then the index's name.
    std::vector<std::string> seen;
    while (parts.size() > 1) {
      const std::string& f = parts.back();
      const bool is_refine = f.size() > 6 && f.compare(0, 6, "refine") == 0 &&
                             std::all_of(f.begin() + 6, f.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
      if (f != "fp8" && f != "i8" && f != "i4" && f != "late" && f != "real" && f != "gmax" && !is_refine) break;
      if (is_refine) {
        if (refine > 0) return SpecError(spec, "flag \"refine\" given twice");
        refine = f.size() > 8 ? 99 : std::stoi(f.substr(6));  // Validate bounds it
        if (refine == 0) return SpecError(spec, "flag \"refine0\": leave it out instead");
        parts.pop_back();
        continue;
      }
      if (std::find(seen.begin(), seen.end(), f) != seen.end()) {
        return SpecError(spec, absl::StrCat("flag \"", f, "\" given twice"));
      }
      auto has = [&](const char* g) { return std::find(seen.begin(), seen.end(), g) != seen.end(); };
      if ((f == "late" && has("real")) || (f == "real" && has("late"))) {
        return SpecError(spec, "flags \"late\" and \"real\" exclude each other");
      }
      if ((f == "i8" && has("i4")) || (f == "i4" && has("i8"))) {
        return SpecError(spec, "flags \"i8\" and \"i4\" exclude each other");
      }
      if (f == "fp8") host_bits = 8;
      if (f == "i8") index_bits = 8;
      if (f == "i4") index_bits = 4;
      if (f == "late") query = "after-attention";
      if (f == "real") query = "real";
      if (f == "gmax") group_score = "max";
      seen.push_back(f);
      parts.pop_back();
    }
    if (parts.size() > 1 && (parts.back() == "gpu" || parts.back() == "faithful")) {
      index = parts.back();
      parts.pop_back();
    }
  }
  const int n_args = static_cast<int>(parts.size()) - 1;
  KvPlan plan;
  if (kind == "dense") {
    if (n_args != 0) return SpecError(spec, "dense takes no parameters");
    plan = KvPlan::Dense(config.n_layers);
  } else if (kind == "quant") {
    if (n_args < 1 || n_args > 3) return SpecError(spec, "expected quant:BITS[:GROUP[:RESIDUAL]]");
    LayerKvPolicy l;
    l.kind = KvPolicyKind::kQuant;
    auto bits = SpecInt(spec, "BITS", parts[1]);
    if (!bits.ok()) return bits.status();
    l.quant.bits = *bits;
    if (n_args >= 2) {
      auto group = SpecInt(spec, "GROUP", parts[2]);
      if (!group.ok()) return group.status();
      l.quant.group = *group;
    }
    if (n_args >= 3) {
      auto residual = SpecInt(spec, "RESIDUAL", parts[3]);
      if (!residual.ok()) return residual.status();
      l.quant.residual = *residual;
    }
    plan = KvPlan::Uniform(config.n_layers, l, spec);
  } else if (kind == "window") {
    if (n_args != 2) return SpecError(spec, "expected window:SINK:RECENT");
    LayerKvPolicy l;
    l.kind = KvPolicyKind::kWindow;
    auto sink = SpecInt(spec, "SINK", parts[1]);
    if (!sink.ok()) return sink.status();
    auto recent = SpecInt(spec, "RECENT", parts[2]);
    if (!recent.ok()) return recent.status();
    l.window.sink = *sink;
    l.window.recent = *recent;
    plan = KvPlan::Uniform(config.n_layers, l, spec);
  } else if (kind == "tailorkv") {
    if (n_args < 1 || n_args > 2) return SpecError(spec, "expected tailorkv:BITS[:LAYERS]");
    auto bits = SpecInt(spec, "BITS", parts[1]);
    if (!bits.ok()) return bits.status();
    int n_quant = 1;
    if (n_args == 2) {
      auto n = SpecInt(spec, "LAYERS", parts[2]);
      if (!n.ok()) return n.status();
      n_quant = *n;
    }
    if (n_quant > config.n_layers) {
      return SpecError(spec, absl::StrCat("LAYERS must be in [0, ", config.n_layers,
                                          "] (the model's layers), got ", n_quant));
    }
    plan = KvPlan::Dense(config.n_layers);
    plan.name = spec;
    for (int i = 0; i < n_quant; ++i) {
      plan.layers[i].kind = KvPolicyKind::kQuant;
      plan.layers[i].quant.bits = *bits;
    }
  } else if (kind == "sparse") {
    if (n_args != 1 && n_args != 3 && n_args != 4) {
      return SpecError(spec, "expected sparse:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX]");
    }
    auto l = SpecSparse(spec, parts, 1);
    if (!l.ok()) return l.status();
    l->sparse.index = index;
    l->sparse.host_bits = host_bits;
    l->sparse.index_bits = index_bits;
    l->sparse.query = query;
    l->sparse.group_score = group_score;
    l->sparse.refine = refine;
    plan = KvPlan::Uniform(config.n_layers, *l, spec);
  } else if (kind == "hybrid") {
    if (n_args != 2 && n_args != 4 && n_args != 5) {
      return SpecError(spec, "expected hybrid:BITS:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX]");
    }
    auto bits = SpecInt(spec, "BITS", parts[1]);
    if (!bits.ok()) return bits.status();
    auto l = SpecSparse(spec, parts, 2);
    if (!l.ok()) return l.status();
    l->sparse.index = index;
    l->sparse.host_bits = host_bits;
    l->sparse.index_bits = index_bits;
    l->sparse.query = query;
    l->sparse.group_score = group_score;
    l->sparse.refine = refine;
    plan = KvPlan::Uniform(config.n_layers, *l, spec);
    // TailorKV's plan: layer 0 quantization-friendly, the rest sparse.
    if (!plan.layers.empty()) {
      plan.layers[0] = LayerKvPolicy{};
      plan.layers[0].kind = KvPolicyKind::kQuant;
      plan.layers[0].quant.bits = *bits;
    }
  } else {
    return SpecError(spec, absl::StrCat("unknown kind \"", kind, "\"; expected ", kSpecGrammar));
  }
  if (auto st = plan.Validate(config); !st.ok()) return SpecError(spec, std::string(st.message()));
  return plan;
}

std::vector<LayerKvBytes> EstimateKvBytes(const KvPlan& plan, const model::ModelConfig& config,
                                          int capacity, int elem_bytes) {
  std::vector<LayerKvBytes> out;
  out.reserve(plan.layers.size());
  const int64_t row = static_cast<int64_t>(config.n_kv_heads) * config.head_dim * elem_bytes;
  const int64_t cap = std::max(capacity, 0);
  for (const LayerKvPolicy& l : plan.layers) {
    LayerKvBytes b;
    b.kind = l.kind;
    switch (l.kind) {
      case KvPolicyKind::kDense: b.device_bytes = 2 * row * cap; break;
      case KvPolicyKind::kQuant: {
        QuantShape shape;
        shape.n_kv_heads = config.n_kv_heads;
        shape.head_dim = config.head_dim;
        shape.capacity = static_cast<int>(cap);
        shape.params = l.quant;
        b.device_bytes = shape.Bytes(elem_bytes);
        break;
      }
      case KvPolicyKind::kWindow:
        b.device_bytes =
            2 * row * std::min<int64_t>(cap, static_cast<int64_t>(l.window.sink) + l.window.recent);
        break;
      case KvPolicyKind::kSparse: {
        // At creation (see the header): the host tier reserves every token
        // of the capacity; the device tier the sink + recent rows and the
        // per-channel max|K|; index "gpu" adds a
        // `channels`-wide key index of every token. Generated rows are
        // reserved when the prompt ends, so they are not in this figure.
        const SparseParams& s = l.sparse;
        b.host_bytes = 2 * (s.host_bits == 8 ? row / elem_bytes : row) * cap;
        const int64_t kept = std::min<int64_t>(cap, static_cast<int64_t>(s.sink) + s.recent);
        b.device_bytes = 2 * row * kept + static_cast<int64_t>(config.n_kv_heads) *
                                              config.head_dim * elem_bytes;
        if (s.index == "gpu") {
          const int64_t entries = static_cast<int64_t>(config.n_kv_heads) * s.channels * cap;
          if (s.index_bits == 4) {
            // Two codes a byte, plus a bf16 zero and step per channel and block.
            const int64_t blocks = (cap + kIndexBlock - 1) / kIndexBlock;
            b.device_bytes += static_cast<int64_t>(config.n_kv_heads) * cap * ((s.channels + 1) / 2) +
                              static_cast<int64_t>(config.n_kv_heads) * s.channels * blocks * 4;
          } else {
            b.device_bytes += entries * (s.index_bits == 8 ? 1 : elem_bytes);
          }
        }
        break;
      }
    }
    out.push_back(b);
  }
  return out;
}

std::vector<PolicyKvBytes> SumKvBytesByPolicy(const std::vector<LayerKvBytes>& layers) {
  std::vector<PolicyKvBytes> out;
  for (const LayerKvBytes& b : layers) {
    auto it = std::find_if(out.begin(), out.end(),
                           [&](const PolicyKvBytes& p) { return p.kind == b.kind; });
    if (it == out.end()) {
      out.push_back(PolicyKvBytes{b.kind});
      it = out.end() - 1;
    }
    ++it->layers;
    it->device_bytes += b.device_bytes;
    it->host_bytes += b.host_bytes;
  }
  return out;
}

}  // namespace tailorkv::runtime
