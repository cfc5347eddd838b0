// Tests that run a service binary as a child process (real process, real
// signals): its combined stdout/stderr read as it comes, SIGKILLed and
// reaped on destruction so nothing outlives a failed test.
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <string>

namespace tailorkv::common::testing {

// Time bounds that tests assert are this many times longer in sanitizer
// builds (scripts/sanitize.sh), where every process runs several times
// slower (a CLI's start-up alone takes half a second under ASan).
inline constexpr int kSanitizerSlowdown =
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    3;
#else
    1;
#endif

class ChildProcess {
 public:
  // Runs `command` with /bin/sh -c (prefix it with "exec " so signals reach
  // the binary itself).
  explicit ChildProcess(const std::string& command) {
    int fds[2];
    if (::pipe(fds) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(fds[1], 1);
      ::dup2(fds[1], 2);
      ::close(fds[0]);
      ::close(fds[1]);
      ::execl("/bin/sh", "sh", "-c", command.c_str(), nullptr);
      ::_exit(127);
    }
    ::close(fds[1]);
    fd_ = fds[0];
  }
  ~ChildProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (fd_ >= 0) ::close(fd_);
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }  // -1 once waited for

  // Reads output until `text` appears after `from` (true), EOF or `seconds` pass.
  bool WaitFor(const std::string& text, size_t from = 0, int seconds = 120) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    while (output_.find(text, from) == std::string::npos) {
      if (std::chrono::steady_clock::now() > until) return false;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      std::array<char, 4096> buf;
      const ssize_t n = ::read(fd_, buf.data(), buf.size());
      if (n <= 0) return output_.find(text, from) != std::string::npos;
      output_.append(buf.data(), static_cast<size_t>(n));
    }
    return true;
  }
  void Signal(int signo) { ::kill(pid_, signo); }
  // Waits for the exit, reading the output to its end; the exit code, or -1
  // when killed by a signal. No time bound of its own (ctest's timeout is
  // the test's): with one, a child that took longer (a worker generating
  // under a sanitizer) lost the output it wrote after it. Returns once the
  // child has exited, even where a process it started still holds the pipe.
  int Wait() {
    if (pid_ <= 0) return -1;
    int status = 0;
    bool exited = false;
    while (true) {
      if (!exited && ::waitpid(pid_, &status, WNOHANG) == pid_) exited = true;
      // Once exited, everything it wrote is in the pipe: take what is there.
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, exited ? 0 : 100) <= 0) {
        if (exited) break;
        continue;
      }
      std::array<char, 4096> buf;
      const ssize_t n = ::read(fd_, buf.data(), buf.size());
      if (n <= 0) break;  // EOF: every writer closed it
      output_.append(buf.data(), static_cast<size_t>(n));
    }
    if (!exited) ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  const std::string& output() const { return output_; }

 private:
  pid_t pid_ = -1;
  int fd_ = -1;
  std::string output_;
};

}  // namespace tailorkv::common::testing
