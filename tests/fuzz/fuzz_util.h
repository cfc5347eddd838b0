// Shared by the fuzz targets (tests/fuzz/*_fuzz.cc): a reader that splits
// the fuzz bytes into typed values, a CHECK that stops the run on a broken
// invariant, and where the test model lives.
//
// Each target defines LLVMFuzzerTestOneInput (and LLVMFuzzerInitialize when
// it needs set-up). The same file links either with libFuzzer
// (scripts/fuzz.sh, clang) or with replay_main.cc (ctest fuzz_replay_*, g++).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <sys/stat.h>

// An invariant of the code under test broke: report and abort, which both
// libFuzzer and the replay driver count as a crash (and keep the input).
#define FUZZ_CHECK(cond, ...)                                                \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "FUZZ_CHECK failed at %s:%d: %s\n  ", __FILE__,   \
                   __LINE__, #cond);                                         \
      std::fprintf(stderr, __VA_ARGS__);                                     \
      std::fprintf(stderr, "\n");                                            \
      std::abort();                                                          \
    }                                                                        \
  } while (0)

namespace tailorkv::fuzz {

// Exit code for "cannot run here" (the test model is missing); the replay
// tests declare it as ctest's SKIP_RETURN_CODE.
inline constexpr int kSkipExitCode = 77;

// Consumes the fuzz bytes front to back; every call is total (an exhausted
// input yields zeros / empty strings), so targets need no bounds checks.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : p_(data), end_(data + size) {}

  size_t remaining() const { return static_cast<size_t>(end_ - p_); }
  bool empty() const { return p_ == end_; }

  uint8_t Byte() { return p_ == end_ ? 0 : *p_++; }
  bool Bool() { return (Byte() & 1) != 0; }
  template <typename T>
  T Int() {
    T v{};
    const size_t n = sizeof(T) < remaining() ? sizeof(T) : remaining();
    std::memcpy(&v, p_, n);
    p_ += n;
    return v;
  }
  // Up to `n` bytes.
  std::string Bytes(size_t n) {
    n = n < remaining() ? n : remaining();
    std::string s(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    return s;
  }
  // Bytes up to (not including) the next `sep`, which is consumed; the rest
  // when there is none.
  std::string Until(std::string_view sep) {
    const std::string_view rest(reinterpret_cast<const char*>(p_), remaining());
    const size_t at = rest.find(sep);
    if (at == std::string_view::npos) return Rest();
    std::string s(rest.substr(0, at));
    p_ += at + sep.size();
    return s;
  }
  std::string Rest() { return Bytes(remaining()); }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
};

// The test model (scripts/fetch_model.sh): $TAILORKV_MODEL_DIR, else the
// build's TAILORKV_MODEL_DIR. Exits with kSkipExitCode when it is missing.
inline std::string ModelPathOrSkip() {
  const char* env = std::getenv("TAILORKV_MODEL_DIR");
  const std::string dir = env != nullptr && *env != '\0' ? env : TAILORKV_MODEL_DIR;
  const std::string path = dir + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    std::fprintf(stderr,
                 "fuzz: %s is missing: run scripts/fetch_model.sh (or set TAILORKV_MODEL_DIR)\n",
                 path.c_str());
    std::exit(kSkipExitCode);
  }
  return path;
}

}  // namespace tailorkv::fuzz
