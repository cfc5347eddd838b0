// RAII owners for the pieces of a memfd arena: a file descriptor, a shared
// mapping (base and size together), and the arena that combines them with
// an optional GPU registration.
//
// All three are move-only and release in their destructors, which log and
// never throw. None is thread-safe; the owner serialises access (the bytes
// themselves may of course be read and written concurrently by anyone).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "store/host_kv_store.h"

namespace tailorkv::kvhost {

// The system page size (what arena sizes must be multiples of).
size_t PageSize();

// Owns one file descriptor; closes it on destruction. -1 means none.
class ScopedFd {
 public:
  ScopedFd() = default;
  explicit ScopedFd(int fd) : fd_(fd) {}
  ScopedFd(ScopedFd&& other) noexcept : fd_(other.release()) {}
  ScopedFd& operator=(ScopedFd&& other) noexcept;
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  ~ScopedFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Gives up ownership without closing.
  int release();
  // Closes the owned fd (if any) and takes `fd`.
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// Owns one MAP_SHARED mapping of a file; munmaps it on destruction.
class SharedMapping {
 public:
  // Maps the first `bytes` of `fd` (which is only borrowed: it may be closed
  // afterwards, the mapping stays). The file must already be at least
  // `bytes` long: fstat is checked, so a short file (e.g. an fd a peer
  // truncated) fails here with InvalidArgument instead of SIGBUS on access.
  // `populate` pre-faults the pages (MAP_POPULATE). InvalidArgument naming
  // "bytes" for 0; the failing syscall's errno otherwise.
  static absl::StatusOr<SharedMapping> Map(int fd, size_t bytes, bool writable, bool populate);

  SharedMapping() = default;
  SharedMapping(SharedMapping&& other) noexcept;
  SharedMapping& operator=(SharedMapping&& other) noexcept;
  SharedMapping(const SharedMapping&) = delete;
  SharedMapping& operator=(const SharedMapping&) = delete;
  ~SharedMapping() { reset(); }

  std::byte* data() const { return base_; }
  size_t size() const { return bytes_; }
  void reset();

 private:
  SharedMapping(std::byte* base, size_t bytes) : base_(base), bytes_(bytes) {}
  std::byte* base_ = nullptr;
  size_t bytes_ = 0;
};

struct MemfdArenaOptions {
  // Pre-fault every page at creation (MAP_POPULATE), so that the first GPU
  // gather or registration does not pay for page faults.
  bool populate = false;
  // Ask for transparent huge pages (madvise MADV_HUGEPAGE); best-effort,
  // honoured only where /sys/kernel/mm/transparent_hugepage/shmem_enabled
  // allows it. Fewer TLB misses on random gathers.
  bool huge_pages = true;
};

// One memfd of fixed size, mapped MAP_SHARED read-write, sealed against
// shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) so that
// a process it is handed to cannot truncate it under us. Destruction order:
// unregister (if registered), munmap, close.
class MemfdArena {
 public:
  // `name` labels the memfd (/proc/<pid>/fd shows "memfd:<name>");
  // `bytes` must be a positive multiple of PageSize(). InvalidArgument
  // naming "name" / "bytes"; memfd_create / ftruncate / mmap failures map
  // their errno (ENOMEM, EMFILE, ENFILE -> ResourceExhausted).
  static absl::StatusOr<MemfdArena> Create(std::string_view name, size_t bytes,
                                           const MemfdArenaOptions& options);

  // Takes over an arena made elsewhere (another process handed its fd back):
  // maps it read-write. InvalidArgument naming "fd" when the file is not
  // exactly `bytes` long or not sealed against shrinking and growing (a
  // holder could otherwise cause SIGBUS here), "bytes" when not a positive
  // page multiple.
  static absl::StatusOr<MemfdArena> Adopt(ScopedFd fd, size_t bytes);

  MemfdArena() = default;
  MemfdArena(MemfdArena&& other) noexcept;
  MemfdArena& operator=(MemfdArena&& other) noexcept;
  MemfdArena(const MemfdArena&) = delete;
  MemfdArena& operator=(const MemfdArena&) = delete;
  ~MemfdArena() { reset(); }

  // Calls `register_fn(data(), size())` and, on success, keeps
  // `unregister_fn` to call on destruction. FailedPrecondition when already
  // registered or empty; the register_fn's error as is (nothing kept then).
  absl::Status Register(const ArenaRegisterFn& register_fn, ArenaUnregisterFn unregister_fn);
  bool registered() const { return static_cast<bool>(unregister_fn_); }

  int fd() const { return fd_.get(); }
  std::byte* data() const { return mapping_.data(); }
  size_t size() const { return mapping_.size(); }

  // Unregisters, unmaps and closes now (what the destructor does).
  void reset();

 private:
  MemfdArena(ScopedFd fd, SharedMapping mapping)
      : fd_(std::move(fd)), mapping_(std::move(mapping)) {}
  ScopedFd fd_;
  SharedMapping mapping_;
  ArenaUnregisterFn unregister_fn_;
};

}  // namespace tailorkv::kvhost
