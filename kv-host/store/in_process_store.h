// InProcessStore: the HostKvStore that owns its memfd arenas in this process.
//
// Allocation: first fit over arenas in id order, then over each arena's free
// blocks in offset order; a block is split around the aligned slice (the
// alignment gap before it stays free) and freed slices are merged with free
// neighbours at once, so an arena's free list never holds two adjacent
// blocks. When no arena has room and `grow_on_demand` is set, a new arena of
// `arena_bytes` is created, if the budget allows it. Costs: Allocate walks
// free blocks (O(arenas + free blocks) at worst), Free and Data are
// O(log slices), FreeOwner O(slices); KV slices are large and few (per
// layer and chunk), so the lists stay short.
//
// Arenas live until RetireEmptyArenas gives back empty ones or the store is
// destroyed (a peer that mapped an arena must unmap it too before its memory
// returns to the OS: kv-host tells its worker which ones). The destructor
// unregisters, unmaps and closes each arena; live slices are simply dropped
// with them.
//
// Thread-safety: all methods are thread-safe. Arena creation (memfd_create,
// page population, the register_fn) runs outside the lock with its bytes
// reserved against the budget first, so a slow registration never blocks
// Allocate/Free on other arenas. register_fn / unregister_fn may be called
// from any thread calling CreateArena / Allocate, and from the destructor.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "store/host_kv_store.h"
#include "store/memfd_arena.h"

namespace tailorkv::kvhost {

struct InProcessStoreOptions {
  // The most arena bytes held at once. Required (> 0).
  uint64_t budget_bytes = 0;
  // Size of arenas created on demand, and the largest slice Allocate hands
  // out. A positive multiple of the page size, at most budget_bytes.
  uint64_t arena_bytes = uint64_t{256} << 20;
  // Create an arena when no existing one has room; otherwise only arenas
  // made with CreateArena serve allocations.
  bool grow_on_demand = true;
  // Arenas created on demand are named "<prefix>-<id>".
  std::string arena_name_prefix = "tkv-kv";
  MemfdArenaOptions arena;
  // Both or neither (see host_kv_store.h).
  ArenaRegisterFn register_fn;
  ArenaUnregisterFn unregister_fn;
};

class InProcessStore final : public HostKvStore {
 public:
  // InvalidArgument naming the option ("budget_bytes", "arena_bytes",
  // "arena_name_prefix", "register_fn"/"unregister_fn") when it is invalid.
  static absl::StatusOr<std::unique_ptr<InProcessStore>> Create(InProcessStoreOptions options);

  ~InProcessStore() override;

  absl::StatusOr<ArenaId> CreateArena(uint64_t bytes, std::string_view name) override;
  absl::StatusOr<HostSlice> Allocate(uint64_t bytes, uint64_t alignment,
                                     std::string_view owner) override;
  absl::Status Free(const HostSlice& slice) override;
  uint64_t FreeOwner(std::string_view owner) override;
  absl::StatusOr<absl::Span<std::byte>> Data(const HostSlice& slice) override;
  absl::StatusOr<int> ArenaFd(ArenaId arena) const override;
  absl::StatusOr<uint64_t> ArenaBytes(ArenaId arena) const override;
  HostKvStoreStats Stats() const override;

  // Adoption (kv-host restarted, its worker hands its arenas back): takes
  // `memory` as arena `id` (nonzero, unused), counted against the budget,
  // not registered. InvalidArgument naming "arena" for a used id;
  // ResourceExhausted naming the budget.
  absl::Status AdoptArena(ArenaId id, MemfdArena memory, std::string name);
  // Marks `slice` (as handed out before the restart) live for `owner`.
  // InvalidArgument naming "slice" unless it lies in free space of an
  // arena; the store is unchanged then.
  absl::Status Claim(const HostSlice& slice, std::string_view owner);

  // Gives back arenas that hold no slice, keeping the oldest of them up to
  // `keep_empty_bytes` in all for later requests; returns the ids given
  // back (unregistered, unmapped and closed before this returns: their
  // memory goes back to the OS once no other process maps them).
  std::vector<ArenaId> RetireEmptyArenas(uint64_t keep_empty_bytes);

  // Walks every arena and checks the accounting from scratch: free blocks
  // and live slices tile each arena exactly (no gap, no overlap), no two
  // free blocks touch, and the running counters (free bytes per arena,
  // allocated and reserved totals, bytes per owner) equal what the walk
  // finds. Internal describing the first violation. For tests and debug
  // checks: O(slices + free blocks).
  absl::Status CheckInvariants() const;

 private:
  struct Slice {
    uint64_t length = 0;
    std::string owner;
  };
  struct Arena {
    MemfdArena memory;
    std::string name;
    std::map<uint64_t, uint64_t> free_blocks;  // offset -> length, coalesced
    std::map<uint64_t, Slice> slices;          // offset -> live slice
    uint64_t free_bytes = 0;
  };

  explicit InProcessStore(InProcessStoreOptions options) : options_(std::move(options)) {}

  // Maps and registers an arena whose bytes are already counted in
  // pending_bytes_; returns it unlocked (nothing inserted yet).
  absl::StatusOr<std::unique_ptr<Arena>> MakeArena(uint64_t bytes, std::string name);
  // Reserves `bytes` of budget for an arena being made. ResourceExhausted
  // naming the budget when it does not fit; `request` explains why the
  // arena is needed, for the message.
  absl::StatusOr<ArenaId> ReserveArenaLocked(uint64_t bytes, std::string_view request)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  ArenaId InsertArenaLocked(ArenaId id, std::unique_ptr<Arena> arena)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // First fit inside one arena; false when it has no room.
  bool AllocateInLocked(ArenaId id, Arena& arena, uint64_t bytes, uint64_t alignment,
                        std::string_view owner, HostSlice* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FreeLocked(Arena& arena, std::map<uint64_t, Slice>::iterator slice)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The live slice exactly matching `slice`, or InvalidArgument naming "slice".
  absl::StatusOr<std::pair<Arena*, std::map<uint64_t, Slice>::iterator>> FindLocked(
      const HostSlice& slice) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  uint64_t LargestFreeBlockLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const InProcessStoreOptions options_;
  mutable absl::Mutex mu_;
  std::map<ArenaId, std::unique_ptr<Arena>> arenas_ ABSL_GUARDED_BY(mu_);
  ArenaId next_arena_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t reserved_bytes_ ABSL_GUARDED_BY(mu_) = 0;   // live arenas
  uint64_t pending_bytes_ ABSL_GUARDED_BY(mu_) = 0;    // arenas being made
  uint64_t allocated_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  size_t slice_count_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, uint64_t, std::less<>> owner_bytes_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tailorkv::kvhost
