// The fuzz targets' driver in the normal (g++, no libFuzzer) build: ctest's
// fuzz_replay_<target>. Runs LLVMFuzzerInitialize, the empty input, every
// file of the corpus directories given, then a fixed number of
// pseudo-random mutations of them (fixed seed: the same inputs every run).
// A crash, an abort (FUZZ_CHECK, an uncaught exception) or an input that
// runs past --timeout kills the process, so the test fails; the input is
// saved first as fuzz-replay-<target>-crash.bin in the working directory.
//
// Usage: fuzz_replay_<target> [--mutations=N] [--seed=S] [--max-len=BYTES]
//                             [--timeout=SECONDS] DIR_OR_FILE...
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
extern "C" __attribute__((weak)) int LLVMFuzzerInitialize(int* argc, char*** argv);

namespace {

using Bytes = std::vector<uint8_t>;

// What runs now, for the signal handler (which may only use what it finds here).
const uint8_t* g_data = nullptr;
size_t g_size = 0;
char g_crash_path[512] = "fuzz-replay-crash.bin";
char g_label[256] = "";

void WriteAll(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd, c, n);
    if (w <= 0) return;
    c += w;
    n -= static_cast<size_t>(w);
  }
}

void OnFatalSignal(int sig) {
  const int fd = ::open(g_crash_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    WriteAll(fd, g_data, g_size);
    ::close(fd);
  }
  const char* what = sig == SIGALRM ? "timeout" : "crash";
  WriteAll(2, "\nfuzz replay: ", 14);
  WriteAll(2, what, std::strlen(what));
  WriteAll(2, " on ", 4);
  WriteAll(2, g_label, std::strlen(g_label));
  WriteAll(2, "; input saved to ", 17);
  WriteAll(2, g_crash_path, std::strlen(g_crash_path));
  WriteAll(2, "\n", 1);
  if (sig == SIGALRM) _exit(124);
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

// libFuzzer-style mutations, enough to leave the seeds' well-trodden paths:
// bit and byte changes, boundary integers, inserted / erased / copied
// ranges, splices with another seed, and edits of decimal numbers (the
// JSON targets' integers and floats).
class Mutator {
 public:
  Mutator(uint64_t seed, size_t max_len) : rng_(seed), max_len_(max_len) {}

  Bytes Mutate(const Bytes& in, const std::vector<Bytes>& corpus) {
    Bytes b = in;
    const int ops = 1 + static_cast<int>(Below(4));
    for (int i = 0; i < ops; ++i) Once(b, corpus);
    if (b.size() > max_len_) b.resize(max_len_);
    return b;
  }

 private:
  uint64_t Below(uint64_t n) { return n == 0 ? 0 : rng_() % n; }
  size_t Pos(const Bytes& b) { return static_cast<size_t>(Below(b.size() + 1)); }

  void Once(Bytes& b, const std::vector<Bytes>& corpus) {
    static const uint8_t kBytes[] = {0, 1, 0x7f, 0x80, 0xff, '0', '9', '-', '.', 'e', '"', '\\',
                                     '{', '}', '[', ']', ',', ':', ' ', '\n', 0xc3, 0xe2, 0xf0};
    static const uint64_t kInts[] = {0, 1, 2, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 0x7fffffff,
                                     0x80000000, 0xffffffff, 0x100000000ull,
                                     0x7fffffffffffffffull, 0xffffffffffffffffull};
    static const char* const kNumbers[] = {"0", "-1", "-0", "1e999", "-1e999", "2147483648",
                                           "-2147483649", "9223372036854775808",
                                           "18446744073709551616", "0.5", "1e-400", "4096"};
    switch (Below(b.empty() ? 3 : 10)) {
      case 0: {  // insert random bytes
        const size_t at = Pos(b), n = 1 + Below(8);
        for (size_t i = 0; i < n; ++i) b.insert(b.begin() + at, static_cast<uint8_t>(rng_()));
        break;
      }
      case 1: {  // insert a boundary integer (little-endian, 4 or 8 bytes)
        const uint64_t v = kInts[Below(std::size(kInts))];
        const size_t at = Pos(b), n = Below(2) ? 4 : 8;
        for (size_t i = 0; i < n; ++i) b.insert(b.begin() + at + i, static_cast<uint8_t>(v >> (8 * i)));
        break;
      }
      case 2: {  // splice: this one's head, another's tail
        const Bytes& o = corpus[Below(corpus.size())];
        const size_t keep = Pos(b), from = static_cast<size_t>(Below(o.size() + 1));
        b.resize(keep);
        b.insert(b.end(), o.begin() + from, o.end());
        break;
      }
      case 3: b[Below(b.size())] ^= static_cast<uint8_t>(1u << Below(8)); break;
      case 4: b[Below(b.size())] = static_cast<uint8_t>(rng_()); break;
      case 5: b[Below(b.size())] = kBytes[Below(std::size(kBytes))]; break;
      case 6: {  // erase a range
        const size_t at = Below(b.size()), n = 1 + Below(16);
        b.erase(b.begin() + at, b.begin() + std::min(b.size(), at + n));
        break;
      }
      case 7: {  // copy a range elsewhere
        const size_t from = Below(b.size()), n = 1 + Below(std::min<size_t>(64, b.size() - from));
        const Bytes chunk(b.begin() + from, b.begin() + from + n);
        b.insert(b.begin() + Pos(b), chunk.begin(), chunk.end());
        break;
      }
      case 8: {  // overwrite with a boundary integer
        const uint64_t v = kInts[Below(std::size(kInts))];
        const size_t at = Below(b.size());
        for (size_t i = 0; i < 8 && at + i < b.size(); ++i) b[at + i] = static_cast<uint8_t>(v >> (8 * i));
        break;
      }
      case 9: {  // replace a decimal number by a boundary one
        size_t at = Below(b.size());
        while (at < b.size() && !(b[at] >= '0' && b[at] <= '9')) ++at;
        if (at == b.size()) break;
        size_t end = at;
        while (end < b.size() && ((b[end] >= '0' && b[end] <= '9') || b[end] == '.')) ++end;
        const std::string n = kNumbers[Below(std::size(kNumbers))];
        b.erase(b.begin() + at, b.begin() + end);
        b.insert(b.begin() + at, n.begin(), n.end());
        break;
      }
    }
  }

  std::mt19937_64 rng_;
  size_t max_len_;
};

bool ReadFile(const std::filesystem::path& p, Bytes& out) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return false;
  out.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

void RunOne(const Bytes& input, const std::string& label, unsigned timeout_s) {
  g_data = input.data();
  g_size = input.size();
  std::snprintf(g_label, sizeof(g_label), "%s", label.c_str());
  ::alarm(timeout_s);
  LLVMFuzzerTestOneInput(input.data(), input.size());
  ::alarm(0);
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t mutations = 1000, seed = 1;
  size_t max_len = 64 << 10;
  unsigned timeout_s = 20;
  std::vector<std::string> paths;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* flag) -> const char* {
      const size_t n = std::strlen(flag);
      return a.compare(0, n, flag) == 0 ? a.c_str() + n : nullptr;
    };
    if (const char* v = value("--mutations=")) {
      mutations = std::strtoull(v, nullptr, 10);
    } else if (const char* v = value("--seed=")) {
      seed = std::strtoull(v, nullptr, 10);
    } else if (const char* v = value("--max-len=")) {
      max_len = std::strtoull(v, nullptr, 10);
    } else if (const char* v = value("--timeout=")) {
      timeout_s = static_cast<unsigned>(std::strtoul(v, nullptr, 10));
    } else if (a.rfind("--", 0) == 0) {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    } else {
      paths.push_back(a);
    }
  }
  const std::string name = std::filesystem::path(argv[0]).filename().string();
  std::snprintf(g_crash_path, sizeof(g_crash_path), "%s-crash.bin", name.c_str());
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGALRM}) ::signal(sig, OnFatalSignal);

  if (LLVMFuzzerInitialize != nullptr) LLVMFuzzerInitialize(&argc, &argv);

  std::vector<std::filesystem::path> files;
  for (const std::string& p : paths) {
    if (std::filesystem::is_directory(p)) {
      for (const auto& e : std::filesystem::directory_iterator(p)) {
        if (e.is_regular_file()) files.push_back(e.path());
      }
    } else {
      files.push_back(p);
    }
  }
  std::sort(files.begin(), files.end());  // the same order everywhere
  if (files.empty()) {
    std::fprintf(stderr, "fuzz replay: no corpus files in the paths given\n");
    return 2;
  }
  const auto start = std::chrono::steady_clock::now();
  std::vector<Bytes> corpus;
  RunOne({}, "the empty input", timeout_s);
  for (const auto& f : files) {
    Bytes b;
    if (!ReadFile(f, b)) {
      std::fprintf(stderr, "fuzz replay: cannot read %s\n", f.c_str());
      return 2;
    }
    RunOne(b, f.string(), timeout_s);
    max_len = std::max(max_len, b.size());
    corpus.push_back(std::move(b));
  }
  Mutator m(seed, max_len);
  for (uint64_t i = 0; i < mutations; ++i) {
    const size_t pick = i % corpus.size();
    const Bytes input = m.Mutate(corpus[pick], corpus);
    RunOne(input, "mutation " + std::to_string(i) + " of " + files[pick].filename().string(),
           timeout_s);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("fuzz replay %s: %zu corpus files + %llu mutations (seed %llu) in %.2f s, no crash\n",
              name.c_str(), corpus.size(), static_cast<unsigned long long>(mutations),
              static_cast<unsigned long long>(seed), s);
  return 0;
}
