#include "daemon/budget.h"

#include <unistd.h>

#include <cctype>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace tailorkv::kvhost {
namespace {

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream f(path);
  if (!f) return false;
  std::stringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  return true;
}

// A cgroup limit file's value; false for "max", unreadable or a value past
// 2^60 (v1 writes ~2^63 for "no limit").
bool ReadLimit(const std::string& path, uint64_t* out) {
  std::string text;
  if (!ReadFile(path, &text)) return false;
  const std::string v(absl::StripAsciiWhitespace(text));
  uint64_t x = 0;
  if (v == "max" || !absl::SimpleAtoi(v, &x) || x == 0 || x > (uint64_t{1} << 60)) return false;
  *out = x;
  return true;
}

std::string Join(const std::string& root, const std::string& path) {
  std::string r = root;
  while (!r.empty() && r.back() == '/') r.pop_back();
  return r + path;
}

}  // namespace

absl::StatusOr<MemoryLimit> DetectMemoryLimit(const std::string& root) {
  std::string cgroups;
  if (ReadFile(Join(root, "/proc/self/cgroup"), &cgroups)) {
    for (absl::string_view line : absl::StrSplit(cgroups, '\n', absl::SkipEmpty())) {
      // v2: "0::/path"; v1: "N:memory:/path" (or a list with memory in it).
      const std::vector<std::string> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
      if (parts.size() != 3) continue;
      std::string path = parts[2];
      if (path == "/") path.clear();
      uint64_t bytes = 0;
      if (parts[0] == "0" && parts[1].empty()) {
        const std::string file = Join(root, "/sys/fs/cgroup" + path + "/memory.max");
        if (ReadLimit(file, &bytes)) return MemoryLimit{bytes, "cgroup v2 " + file};
      }
      bool memory = false;
      for (absl::string_view c : absl::StrSplit(parts[1], ',')) memory |= c == "memory";
      if (memory) {
        for (const std::string& file : {Join(root, "/sys/fs/cgroup/memory" + path + "/memory.limit_in_bytes"),
                                        Join(root, "/sys/fs/cgroup/memory/memory.limit_in_bytes")}) {
          if (ReadLimit(file, &bytes)) return MemoryLimit{bytes, "cgroup v1 " + file};
        }
      }
    }
  }
  std::string meminfo;
  if (ReadFile(Join(root, "/proc/meminfo"), &meminfo)) {
    for (absl::string_view line : absl::StrSplit(meminfo, '\n')) {
      if (!absl::ConsumePrefix(&line, "MemTotal:")) continue;
      line = absl::StripAsciiWhitespace(line);
      uint64_t kb = 0;
      if (absl::ConsumeSuffix(&line, "kB") && absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &kb) && kb > 0) {
        return MemoryLimit{kb * 1024, "MemTotal"};
      }
    }
  }
  return absl::NotFoundError(absl::StrCat("no memory limit under ", root, " (cgroup or /proc/meminfo)"));
}

absl::StatusOr<uint64_t> ParseBudget(const std::string& spec, uint64_t limit_bytes) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("budget \"", spec, "\": ", why));
  };
  std::string s(absl::StripAsciiWhitespace(spec));
  if (s.empty()) return bad("empty");
  uint64_t bytes = 0;
  if (s.find('.') != std::string::npos) {
    double f = 0;
    if (!absl::SimpleAtod(s, &f) || !(f > 0.0) || f > 1.0) return bad("a fraction must lie in (0, 1]");
    bytes = static_cast<uint64_t>(std::floor(f * static_cast<double>(limit_bytes)));
  } else {
    uint64_t mult = 1;
    const char last = static_cast<char>(std::toupper(static_cast<unsigned char>(s.back())));
    const std::string suffixes = "KMGT";
    if (const size_t i = suffixes.find(last); i != std::string::npos) {
      mult = uint64_t{1} << (10 * (i + 1));
      s.pop_back();
    }
    uint64_t n = 0;
    if (!absl::SimpleAtoi(s, &n)) return bad("want a size (e.g. 48G) or a fraction of the memory limit (e.g. 0.6)");
    if (n > (uint64_t{1} << 62) / mult) return bad("too large");
    bytes = n * mult;
  }
  bytes = bytes / page * page;
  if (bytes == 0) return bad("less than one page");
  return bytes;
}

}  // namespace tailorkv::kvhost
