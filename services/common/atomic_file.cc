#include "common/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"

namespace tailorkv::common {
namespace {

absl::Status ErrnoError(int err, const char* what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(err)));
}

// Closes the descriptor it owns.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // Closes now, reporting the error a deferred write may surface only here.
  int Close() {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc;
  }

 private:
  int fd_;
};

// Removes the temporary file unless it was renamed into place.
class TempFileGuard {
 public:
  explicit TempFileGuard(std::string path) : path_(std::move(path)) {}
  ~TempFileGuard() {
    if (!path_.empty()) ::unlink(path_.c_str());
  }
  TempFileGuard(const TempFileGuard&) = delete;
  TempFileGuard& operator=(const TempFileGuard&) = delete;
  void Release() { path_.clear(); }

 private:
  std::string path_;
};

}  // namespace

absl::Status WriteFileAtomically(const std::string& path, std::string_view contents) {
  const std::filesystem::path target(path);
  if (target.filename().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a file name"));
  }
  const std::string dir = target.has_parent_path() ? target.parent_path().string() : ".";
  // Same directory: rename() is atomic only within one filesystem.
  std::string tmp = (std::filesystem::path(dir) / ("." + target.filename().string() + ".XXXXXX"))
                        .string();
  Fd fd(::mkstemp(tmp.data()));
  if (fd.get() < 0) return ErrnoError(errno, "create a temporary file beside", path);
  TempFileGuard guard(tmp);
  // mkstemp makes 0600; a plan is not a secret, and others may read the cache.
  if (::fchmod(fd.get(), 0644) != 0) return ErrnoError(errno, "chmod", tmp);
  for (size_t done = 0; done < contents.size();) {
    const ssize_t n = ::write(fd.get(), contents.data() + done, contents.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, "write", tmp);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd.get()) != 0) return ErrnoError(errno, "fsync", tmp);
  if (fd.Close() != 0) return ErrnoError(errno, "close", tmp);
  if (::rename(tmp.c_str(), path.c_str()) != 0) return ErrnoError(errno, "rename to", path);
  guard.Release();
  // The rename itself is durable only once the directory is.
  Fd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.get() < 0) return ErrnoError(errno, "open directory", dir);
  if (::fsync(dir_fd.get()) != 0) return ErrnoError(errno, "fsync directory", dir);
  return absl::OkStatus();
}

}  // namespace tailorkv::common
