// HostKvStore: host memory for the sparse layers' KV, addressed as
// (arena, offset, length) so that it can live in another process.
//
// An arena is one memfd mapping. Callers address memory only by HostSlice
// (ids, offsets and lengths, never pointers): that is the only form that can
// cross the worker <-> kv-host boundary. The in-process implementation
// (in_process_store.h) owns its memfds; a later kv-host client implements the
// same interface over a UNIX socket, receiving the arena fds with SCM_RIGHTS.
//
// Every byte is accounted: for every arena, bytes handed out plus bytes free
// equal the arena's size, and the sum of arena sizes never exceeds the byte
// budget given at construction (RLIMIT_MEMLOCK does not bound
// cudaHostRegister, so the store must enforce its own budget).
//
// Registration with the GPU: the store calls `register_fn(base, bytes)` once
// per arena right after mapping it, and `unregister_fn(base, bytes)` once when
// the arena goes away, before unmapping. The worker passes lambdas calling
// cudaHostRegister / cudaHostUnregister; tests pass recording fakes; the
// library itself never depends on CUDA.
//
// Thread-safety: every method of an implementation is thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tailorkv::kvhost {

// Ids start at 1; 0 is never a valid arena.
using ArenaId = uint32_t;
inline constexpr ArenaId kInvalidArena = 0;

// A range of bytes inside one arena, as handed out by Allocate.
struct HostSlice {
  ArenaId arena = kInvalidArena;
  uint64_t offset = 0;  // from the arena's start; a multiple of the requested alignment
  uint64_t length = 0;  // exactly the bytes requested
  bool operator==(const HostSlice&) const = default;
};

// Called once per arena with its mapped base and size. An error fails the
// arena's creation (the arena is unmapped and its budget returned). Neither
// hook may call back into the store.
using ArenaRegisterFn = std::function<absl::Status(void* base, size_t bytes)>;
// Called once per successfully registered arena before it is unmapped. An
// error is logged (there is nobody to return it to) and the unmap proceeds.
using ArenaUnregisterFn = std::function<absl::Status(void* base, size_t bytes)>;

struct HostKvStoreStats {
  uint64_t budget_bytes = 0;     // the most arena bytes the store may ever hold at once
  uint64_t reserved_bytes = 0;   // sum of live arena sizes (<= budget_bytes)
  uint64_t allocated_bytes = 0;  // sum of live slice lengths
  uint64_t free_bytes = 0;       // reserved_bytes - allocated_bytes, counted independently
  size_t arena_count = 0;
  size_t slice_count = 0;                          // live slices
  std::map<std::string, uint64_t> owner_bytes;     // allocated bytes per owner tag (no zero entries)
};

class HostKvStore {
 public:
  virtual ~HostKvStore() = default;

  // Maps (and registers) a new arena of `bytes`, a positive multiple of the
  // page size. `name` labels the memfd (visible in /proc/<pid>/fd) and must
  // be non-empty. InvalidArgument naming "bytes" / "name"; ResourceExhausted
  // naming the budget when the arena would take reserved bytes past it; a
  // failing syscall's errno as absl::ErrnoToStatus maps it (ENOMEM, EMFILE:
  // ResourceExhausted); the register_fn's error as is. Nothing is held on
  // error.
  virtual absl::StatusOr<ArenaId> CreateArena(uint64_t bytes, std::string_view name) = 0;

  // Hands out `bytes` at an offset that is a multiple of `alignment`, taken
  // from an existing arena or from a new one when the implementation grows
  // on demand. InvalidArgument naming "bytes" (0 or more than one arena can
  // hold), "alignment" (not a power of two, or past the page size) or
  // "owner" (empty); ResourceExhausted naming the budget when no arena has
  // room and a new one would exceed the budget. Nothing is held on error.
  virtual absl::StatusOr<HostSlice> Allocate(uint64_t bytes, uint64_t alignment,
                                             std::string_view owner) = 0;

  // Allocate for each size, all or nothing (on error nothing is held).
  // A remote store makes it one round trip: a sequence asks for all its
  // layers at once.
  virtual absl::StatusOr<std::vector<HostSlice>> AllocateMany(absl::Span<const uint64_t> sizes,
                                                              uint64_t alignment, std::string_view owner) {
    std::vector<HostSlice> out;
    for (uint64_t bytes : sizes) {
      absl::StatusOr<HostSlice> s = Allocate(bytes, alignment, owner);
      if (!s.ok()) {
        for (const HostSlice& got : out) (void)Free(got);
        return s.status();
      }
      out.push_back(*s);
    }
    return out;
  }

  // Returns a slice handed out by Allocate and not yet freed (exactly as
  // given: same arena, offset and length). InvalidArgument naming "slice"
  // for anything else, a second Free of the same slice included; the store
  // is unchanged then.
  virtual absl::Status Free(const HostSlice& slice) = 0;

  // Frees every live slice of `owner` (a session that went away); returns
  // the bytes freed (0 for an unknown owner).
  virtual uint64_t FreeOwner(std::string_view owner) = 0;

  // In-process access to a live slice's bytes, valid while its arena lives
  // (for the in-process store: until the store is destroyed), also after
  // Free (the memory stays mapped, but may be handed out again).
  // InvalidArgument naming "slice" for a slice that is not live.
  virtual absl::StatusOr<absl::Span<std::byte>> Data(const HostSlice& slice) = 0;

  // The arena's memfd, owned by the store (do not close it), for handing
  // to another process with SCM_RIGHTS. The fd is CLOEXEC and sealed
  // against shrinking and growing, so a peer cannot cause SIGBUS here.
  // NotFound naming "arena" for an unknown id.
  virtual absl::StatusOr<int> ArenaFd(ArenaId arena) const = 0;
  // The arena's size in bytes. NotFound naming "arena" for an unknown id.
  virtual absl::StatusOr<uint64_t> ArenaBytes(ArenaId arena) const = 0;

  virtual HostKvStoreStats Stats() const = 0;
};

}  // namespace tailorkv::kvhost
