#include "store/memfd_arena.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace tailorkv::kvhost {
namespace {

std::shared_ptr<spdlog::logger> Log() { return common::NamedLogger("kv-host.store"); }

// Debian's Abseil has its own string_view, distinct from std::string_view.
absl::string_view Absl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

absl::Status ErrnoStatus(int error, const std::string& what) {
  return absl::ErrnoToStatus(error, what);
}

}  // namespace

size_t PageSize() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

ScopedFd& ScopedFd::operator=(ScopedFd&& other) noexcept {
  if (this != &other) reset(other.release());
  return *this;
}

int ScopedFd::release() { return std::exchange(fd_, -1); }

void ScopedFd::reset(int fd) {
  const int old = std::exchange(fd_, fd);
  // close() is not retried on EINTR: on Linux the fd is released regardless.
  if (old >= 0 && close(old) != 0) Log()->error("close({}) failed: errno {}", old, errno);
}

absl::StatusOr<SharedMapping> SharedMapping::Map(int fd, size_t bytes, bool writable,
                                                 bool populate) {
  if (bytes == 0) return absl::InvalidArgumentError("bytes: a mapping needs at least 1 byte");
  struct stat st {};
  if (fstat(fd, &st) != 0) return ErrnoStatus(errno, absl::StrCat("fstat(fd ", fd, ")"));
  if (st.st_size < 0 || static_cast<uint64_t>(st.st_size) < bytes) {
    return absl::InvalidArgumentError(absl::StrCat("bytes: ", bytes, " exceeds the file size ",
                                                   st.st_size, " of fd ", fd));
  }
  const int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  const int flags = MAP_SHARED | (populate ? MAP_POPULATE : 0);
  void* base = mmap(nullptr, bytes, prot, flags, fd, 0);
  if (base == MAP_FAILED) {
    return ErrnoStatus(errno, absl::StrCat("mmap(", bytes, " bytes of fd ", fd, ")"));
  }
  return SharedMapping(static_cast<std::byte*>(base), bytes);
}

SharedMapping::SharedMapping(SharedMapping&& other) noexcept
    : base_(std::exchange(other.base_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

SharedMapping& SharedMapping::operator=(SharedMapping&& other) noexcept {
  if (this != &other) {
    reset();
    base_ = std::exchange(other.base_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void SharedMapping::reset() {
  if (base_ != nullptr && munmap(base_, bytes_) != 0) {
    Log()->error("munmap({} bytes) failed: errno {}", bytes_, errno);
  }
  base_ = nullptr;
  bytes_ = 0;
}

absl::StatusOr<MemfdArena> MemfdArena::Create(std::string_view name, size_t bytes,
                                              const MemfdArenaOptions& options) {
  if (name.empty()) return absl::InvalidArgumentError("name: an arena needs a non-empty name");
  // The kernel limits memfd names to 249 bytes; longer names fail with EINVAL.
  if (name.size() > 200) {
    return absl::InvalidArgumentError(
        absl::StrCat("name: ", name.size(), " bytes long, at most 200 allowed"));
  }
  if (name.find('\0') != std::string_view::npos) {
    return absl::InvalidArgumentError("name: contains a NUL byte");
  }
  if (bytes == 0 || bytes % PageSize() != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bytes: ", bytes, " is not a positive multiple of the page size ", PageSize()));
  }
  const std::string name_z(name);
  ScopedFd fd(memfd_create(name_z.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return ErrnoStatus(errno, absl::StrCat("memfd_create(", Absl(name), ")"));
  if (ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
    return ErrnoStatus(errno, absl::StrCat("ftruncate(memfd ", Absl(name), ", ", bytes, ")"));
  }
  // Sealing fixes the size for every holder of the fd: a peer that could
  // shrink the file would turn our accesses into SIGBUS.
  if (fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return ErrnoStatus(errno, absl::StrCat("F_ADD_SEALS(memfd ", Absl(name), ")"));
  }
  // Map without MAP_POPULATE first so the huge-page hint applies before the
  // pages are faulted in; populate afterwards with MADV_POPULATE_WRITE.
  auto mapping = SharedMapping::Map(fd.get(), bytes, /*writable=*/true, /*populate=*/false);
  if (!mapping.ok()) return mapping.status();
  if (options.huge_pages) {
    // Best-effort: EINVAL where THP for shmem is unavailable is fine.
    (void)madvise(mapping->data(), bytes, MADV_HUGEPAGE);
  }
  if (options.populate) {
#ifdef MADV_POPULATE_WRITE
    if (madvise(mapping->data(), bytes, MADV_POPULATE_WRITE) != 0) {
      const int error = errno;
      // Kernels before 5.14 lack MADV_POPULATE_WRITE: fall back to remapping
      // with MAP_POPULATE. Anything else (ENOMEM) is a real failure.
      if (error != EINVAL) {
        return ErrnoStatus(error, absl::StrCat("populate(memfd ", Absl(name), ", ", bytes, ")"));
      }
      mapping->reset();
      mapping = SharedMapping::Map(fd.get(), bytes, /*writable=*/true, /*populate=*/true);
      if (!mapping.ok()) return mapping.status();
    }
#else
    mapping->reset();
    mapping = SharedMapping::Map(fd.get(), bytes, /*writable=*/true, /*populate=*/true);
    if (!mapping.ok()) return mapping.status();
#endif
  }
  return MemfdArena(std::move(fd), *std::move(mapping));
}

absl::StatusOr<MemfdArena> MemfdArena::Adopt(ScopedFd fd, size_t bytes) {
  if (bytes == 0 || bytes % PageSize() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("bytes: ", bytes, " is not a positive multiple of the page size"));
  }
  struct stat st{};
  if (!fd.valid() || fstat(fd.get(), &st) != 0) return absl::InvalidArgumentError("fd: not an open file");
  if (static_cast<uint64_t>(st.st_size) != bytes) {
    return absl::InvalidArgumentError(absl::StrCat("fd: ", st.st_size, " bytes long, expected ", bytes));
  }
  const int seals = fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW)) {
    return absl::InvalidArgumentError("fd: not a memfd sealed against shrinking and growing");
  }
  auto mapping = SharedMapping::Map(fd.get(), bytes, /*writable=*/true, /*populate=*/false);
  if (!mapping.ok()) return mapping.status();
  return MemfdArena(std::move(fd), *std::move(mapping));
}

MemfdArena::MemfdArena(MemfdArena&& other) noexcept
    : fd_(std::move(other.fd_)),
      mapping_(std::move(other.mapping_)),
      unregister_fn_(std::exchange(other.unregister_fn_, nullptr)) {}

MemfdArena& MemfdArena::operator=(MemfdArena&& other) noexcept {
  if (this != &other) {
    reset();  // unregister before the old mapping goes
    fd_ = std::move(other.fd_);
    mapping_ = std::move(other.mapping_);
    unregister_fn_ = std::exchange(other.unregister_fn_, nullptr);
  }
  return *this;
}

absl::Status MemfdArena::Register(const ArenaRegisterFn& register_fn,
                                  ArenaUnregisterFn unregister_fn) {
  if (mapping_.data() == nullptr) {
    return absl::FailedPreconditionError("arena: registering an empty arena");
  }
  if (registered()) return absl::FailedPreconditionError("arena: already registered");
  if (!register_fn) return absl::InvalidArgumentError("register_fn: empty function");
  if (!unregister_fn) return absl::InvalidArgumentError("unregister_fn: empty function");
  if (absl::Status status = register_fn(mapping_.data(), mapping_.size()); !status.ok()) {
    return status;
  }
  unregister_fn_ = std::move(unregister_fn);
  return absl::OkStatus();
}

void MemfdArena::reset() {
  if (unregister_fn_) {
    ArenaUnregisterFn unregister = std::exchange(unregister_fn_, nullptr);
    if (absl::Status status = unregister(mapping_.data(), mapping_.size()); !status.ok()) {
      Log()->error("unregistering arena of {} bytes failed: {}", mapping_.size(),
                   status.ToString());
    }
  }
  mapping_.reset();
  fd_.reset();
}

}  // namespace tailorkv::kvhost
