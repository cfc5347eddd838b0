// Prometheus text exposition (format 0.0.4): a thread-safe histogram and
// helpers that append HELP/TYPE headers and samples. Metric names use the
// `tailorkv:` prefix with vLLM's meanings, so dashboards built for vLLM need
// only the prefix changed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"

namespace tailorkv::common {

// `# HELP name text` and `# TYPE name type`.
inline void AppendHeader(std::string* out, const std::string& name, const char* type, const char* help) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}
// `name{labels} value` (labels: `k="v",...` or empty).
inline void AppendSample(std::string* out, const std::string& name, const std::string& labels, double value) {
  absl::StrAppend(out, name, labels.empty() ? "" : absl::StrCat("{", labels, "}"), " ",
                  absl::StrFormat("%.17g", value), "\n");
}
// A label value escaped as the format wants (backslash, quote, newline).
inline std::string LabelValue(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1) {}
  void Observe(double v) {
    absl::MutexLock lock(&mu_);
    size_t i = 0;
    while (i < bounds_.size() && v > bounds_[i]) ++i;
    ++counts_[i];
    sum_ += v;
    ++count_;
  }
  // The `_bucket` (cumulative), `_sum` and `_count` samples.
  std::string Render(const std::string& name, const std::string& labels = "") const {
    absl::MutexLock lock(&mu_);
    std::string out;
    const std::string sep = labels.empty() ? "" : ",";
    uint64_t cum = 0;
    for (size_t i = 0; i < bounds_.size(); ++i) {
      cum += counts_[i];
      absl::StrAppend(&out, name, "_bucket{", labels, sep, "le=\"", absl::StrFormat("%g", bounds_[i]), "\"} ",
                      cum, "\n");
    }
    cum += counts_.back();
    absl::StrAppend(&out, name, "_bucket{", labels, sep, "le=\"+Inf\"} ", cum, "\n");
    const std::string braces = labels.empty() ? "" : absl::StrCat("{", labels, "}");
    absl::StrAppend(&out, name, "_sum", braces, " ", absl::StrFormat("%.6f", sum_), "\n");
    absl::StrAppend(&out, name, "_count", braces, " ", count_, "\n");
    return out;
  }

 private:
  const std::vector<double> bounds_;
  mutable absl::Mutex mu_;
  std::vector<uint64_t> counts_;
  double sum_ = 0;
  uint64_t count_ = 0;
};

// vLLM's bucket bounds for its three latency histograms (seconds).
inline std::vector<double> TtftBuckets() {
  return {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
          20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
}
inline std::vector<double> TpotBuckets() {
  return {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0};
}
inline std::vector<double> E2eBuckets() {
  return {0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
          960.0, 1920.0, 7680.0};
}

}  // namespace tailorkv::common
