#include "store/in_process_store.h"

#include <algorithm>
#include <iterator>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace tailorkv::kvhost {
namespace {

// Debian's Abseil has its own string_view, distinct from std::string_view.
absl::string_view Absl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

uint64_t AlignUp(uint64_t v, uint64_t alignment) { return (v + alignment - 1) & ~(alignment - 1); }

std::string SliceText(const HostSlice& s) {
  return absl::StrCat("{arena ", s.arena, ", offset ", s.offset, ", length ", s.length, "}");
}

}  // namespace

absl::StatusOr<std::unique_ptr<InProcessStore>> InProcessStore::Create(
    InProcessStoreOptions options) {
  if (options.budget_bytes == 0) {
    return absl::InvalidArgumentError("budget_bytes: must be positive");
  }
  if (options.arena_bytes == 0 || options.arena_bytes % PageSize() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("arena_bytes: ", options.arena_bytes,
                                                   " is not a positive multiple of the page size ",
                                                   PageSize()));
  }
  if (options.arena_bytes > options.budget_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("arena_bytes: ", options.arena_bytes,
                                                   " exceeds budget_bytes ",
                                                   options.budget_bytes));
  }
  if (options.arena_name_prefix.empty() || options.arena_name_prefix.size() > 64) {
    return absl::InvalidArgumentError("arena_name_prefix: must be 1 to 64 bytes long");
  }
  if (static_cast<bool>(options.register_fn) != static_cast<bool>(options.unregister_fn)) {
    return absl::InvalidArgumentError(
        options.register_fn ? "unregister_fn: required when register_fn is given"
                            : "register_fn: required when unregister_fn is given");
  }
  return std::unique_ptr<InProcessStore>(new InProcessStore(std::move(options)));
}

InProcessStore::~InProcessStore() {
  std::map<ArenaId, std::unique_ptr<Arena>> arenas;
  {
    absl::MutexLock lock(&mu_);
    arenas.swap(arenas_);
  }
  // Each MemfdArena unregisters, unmaps and closes in its destructor; the
  // unregister_fn runs without the store's lock held.
  arenas.clear();
}

absl::StatusOr<ArenaId> InProcessStore::ReserveArenaLocked(uint64_t bytes,
                                                          std::string_view request) {
  const uint64_t held = reserved_bytes_ + pending_bytes_;
  if (bytes > options_.budget_bytes || held > options_.budget_bytes - bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "budget: ", Absl(request), " needs a new arena of ", bytes, " bytes; ", held,
        " bytes already reserved (", arenas_.size(), " arenas, ", allocated_bytes_,
        " bytes allocated, largest free block ", LargestFreeBlockLocked(),
        " bytes) and the budget is ", options_.budget_bytes, " bytes"));
  }
  pending_bytes_ += bytes;
  return next_arena_id_++;
}

absl::StatusOr<std::unique_ptr<InProcessStore::Arena>> InProcessStore::MakeArena(
    uint64_t bytes, std::string name) {
  ASSIGN_OR_RETURN(MemfdArena memory, MemfdArena::Create(name, bytes, options_.arena));
  if (options_.register_fn) {
    RETURN_IF_ERROR(memory.Register(options_.register_fn, options_.unregister_fn));
  }
  auto arena = std::make_unique<Arena>();
  arena->memory = std::move(memory);
  arena->name = std::move(name);
  arena->free_blocks.emplace(0, bytes);
  arena->free_bytes = bytes;
  return arena;
}

ArenaId InProcessStore::InsertArenaLocked(ArenaId id, std::unique_ptr<Arena> arena) {
  const uint64_t bytes = arena->memory.size();
  pending_bytes_ -= bytes;
  reserved_bytes_ += bytes;
  arenas_.emplace(id, std::move(arena));
  return id;
}

absl::StatusOr<ArenaId> InProcessStore::CreateArena(uint64_t bytes, std::string_view name) {
  if (bytes == 0 || bytes % PageSize() != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bytes: ", bytes, " is not a positive multiple of the page size ", PageSize()));
  }
  if (name.empty()) return absl::InvalidArgumentError("name: an arena needs a non-empty name");
  ArenaId id;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(id, ReserveArenaLocked(bytes, absl::StrCat("CreateArena(", Absl(name), ")")));
  }
  absl::StatusOr<std::unique_ptr<Arena>> arena = MakeArena(bytes, std::string(name));
  absl::MutexLock lock(&mu_);
  if (!arena.ok()) {
    pending_bytes_ -= bytes;
    return arena.status();
  }
  return InsertArenaLocked(id, *std::move(arena));
}

absl::Status InProcessStore::AdoptArena(ArenaId id, MemfdArena memory, std::string name) {
  const uint64_t bytes = memory.size();
  if (id == kInvalidArena || bytes == 0) return absl::InvalidArgumentError("arena: id 0 or an empty arena");
  auto arena = std::make_unique<Arena>();
  arena->memory = std::move(memory);
  arena->name = std::move(name);
  arena->free_blocks.emplace(0, bytes);
  arena->free_bytes = bytes;
  absl::MutexLock lock(&mu_);
  if (arenas_.count(id) != 0) return absl::InvalidArgumentError(absl::StrCat("arena: id ", id, " is in use"));
  const uint64_t held = reserved_bytes_ + pending_bytes_;
  if (bytes > options_.budget_bytes || held > options_.budget_bytes - bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("budget: adopting arena ", id, " of ", bytes, " bytes; ", held,
                                                     " bytes already reserved and the budget is ",
                                                     options_.budget_bytes, " bytes"));
  }
  reserved_bytes_ += bytes;
  arenas_.emplace(id, std::move(arena));
  next_arena_id_ = std::max(next_arena_id_, id + 1);
  return absl::OkStatus();
}

absl::Status InProcessStore::Claim(const HostSlice& slice, std::string_view owner) {
  absl::MutexLock lock(&mu_);
  auto a = arenas_.find(slice.arena);
  if (a == arenas_.end() || slice.length == 0) {
    return absl::InvalidArgumentError(absl::StrCat("slice: ", SliceText(slice), " is in no arena"));
  }
  Arena& arena = *a->second;
  // The free block that starts at or before the slice must cover it.
  auto it = arena.free_blocks.upper_bound(slice.offset);
  if (it == arena.free_blocks.begin()) {
    return absl::InvalidArgumentError(absl::StrCat("slice: ", SliceText(slice), " overlaps a live slice"));
  }
  --it;
  const uint64_t start = it->first, end = start + it->second;
  if (slice.offset + slice.length < slice.offset || slice.offset + slice.length > end) {
    return absl::InvalidArgumentError(absl::StrCat("slice: ", SliceText(slice), " is not in free space"));
  }
  arena.free_blocks.erase(it);
  if (slice.offset > start) arena.free_blocks.emplace(start, slice.offset - start);
  if (slice.offset + slice.length < end) {
    arena.free_blocks.emplace(slice.offset + slice.length, end - slice.offset - slice.length);
  }
  arena.slices.emplace(slice.offset, Slice{slice.length, std::string(owner)});
  arena.free_bytes -= slice.length;
  allocated_bytes_ += slice.length;
  ++slice_count_;
  owner_bytes_[std::string(owner)] += slice.length;
  return absl::OkStatus();
}

std::vector<ArenaId> InProcessStore::RetireEmptyArenas(uint64_t keep_empty_bytes) {
  std::vector<ArenaId> ids;
  std::vector<std::unique_ptr<Arena>> gone;
  {
    absl::MutexLock lock(&mu_);
    uint64_t kept = 0;
    for (auto it = arenas_.begin(); it != arenas_.end();) {
      Arena& a = *it->second;
      const uint64_t bytes = a.memory.size();
      if (!a.slices.empty() || kept + bytes <= keep_empty_bytes) {
        if (a.slices.empty()) kept += bytes;
        ++it;
        continue;
      }
      reserved_bytes_ -= bytes;
      ids.push_back(it->first);
      gone.push_back(std::move(it->second));
      it = arenas_.erase(it);
    }
  }
  gone.clear();  // unregister, unmap, close: outside the lock
  return ids;
}

bool InProcessStore::AllocateInLocked(ArenaId id, Arena& arena, uint64_t bytes,
                                      uint64_t alignment, std::string_view owner,
                                      HostSlice* out) {
  if (arena.free_bytes < bytes) return false;
  for (auto it = arena.free_blocks.begin(); it != arena.free_blocks.end(); ++it) {
    const uint64_t start = it->first;
    const uint64_t end = start + it->second;
    const uint64_t offset = AlignUp(start, alignment);
    if (offset > end || end - offset < bytes) continue;
    arena.free_blocks.erase(it);
    if (offset > start) arena.free_blocks.emplace(start, offset - start);
    if (offset + bytes < end) arena.free_blocks.emplace(offset + bytes, end - offset - bytes);
    arena.slices.emplace(offset, Slice{bytes, std::string(owner)});
    arena.free_bytes -= bytes;
    allocated_bytes_ += bytes;
    ++slice_count_;
    auto owner_it = owner_bytes_.find(owner);
    if (owner_it == owner_bytes_.end()) owner_it = owner_bytes_.emplace(owner, 0).first;
    owner_it->second += bytes;
    *out = HostSlice{id, offset, bytes};
    return true;
  }
  return false;
}

absl::StatusOr<HostSlice> InProcessStore::Allocate(uint64_t bytes, uint64_t alignment,
                                                   std::string_view owner) {
  if (bytes == 0) return absl::InvalidArgumentError("bytes: must be positive");
  if (bytes > options_.arena_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bytes: ", bytes, " exceeds the largest slice (arena_bytes) ", options_.arena_bytes));
  }
  if (!IsPowerOfTwo(alignment) || alignment > PageSize()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "alignment: ", alignment, " is not a power of two in [1, ", PageSize(), "]"));
  }
  if (owner.empty()) return absl::InvalidArgumentError("owner: must be non-empty");

  const std::string request = absl::StrCat("allocating ", bytes, " bytes for ", Absl(owner));
  ArenaId new_id;
  {
    absl::MutexLock lock(&mu_);
    for (;;) {
      HostSlice slice;
      for (auto& [id, arena] : arenas_) {
        if (AllocateInLocked(id, *arena, bytes, alignment, owner, &slice)) return slice;
      }
      if (!options_.grow_on_demand) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "budget: ", Absl(request), ": no arena has room (", arenas_.size(), " arenas, ",
            reserved_bytes_, " bytes reserved, ", allocated_bytes_,
            " allocated, largest free block ", LargestFreeBlockLocked(),
            " bytes) and growing on demand is off"));
      }
      absl::StatusOr<ArenaId> reserved = ReserveArenaLocked(options_.arena_bytes, request);
      if (reserved.ok()) {
        new_id = *reserved;
        break;
      }
      // Another thread is making an arena the budget has no room for twice:
      // wait for it and retry rather than fail while space is on its way.
      if (pending_bytes_ == 0) return reserved.status();
      mu_.Await(absl::Condition(
          +[](uint64_t* pending) { return *pending == 0; }, &pending_bytes_));
    }
  }
  absl::StatusOr<std::unique_ptr<Arena>> arena =
      MakeArena(options_.arena_bytes, absl::StrCat(options_.arena_name_prefix, "-", new_id));
  absl::MutexLock lock(&mu_);
  if (!arena.ok()) {
    pending_bytes_ -= options_.arena_bytes;
    return arena.status();
  }
  Arena& inserted = *arena->get();
  InsertArenaLocked(new_id, *std::move(arena));
  HostSlice slice;
  // A fresh arena of arena_bytes >= bytes holds any page-aligned request.
  if (!AllocateInLocked(new_id, inserted, bytes, alignment, owner, &slice)) {
    return absl::InternalError(absl::StrCat("a fresh arena could not hold ", request));
  }
  return slice;
}

absl::StatusOr<std::pair<InProcessStore::Arena*, std::map<uint64_t, InProcessStore::Slice>::iterator>>
InProcessStore::FindLocked(const HostSlice& slice) {
  auto arena_it = arenas_.find(slice.arena);
  if (arena_it == arenas_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("slice: ", SliceText(slice), " names an unknown arena"));
  }
  Arena& arena = *arena_it->second;
  auto it = arena.slices.find(slice.offset);
  if (it == arena.slices.end() || it->second.length != slice.length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "slice: ", SliceText(slice), " is not a live slice of this store (never handed out, "
        "already freed, or altered)"));
  }
  return std::make_pair(&arena, it);
}

void InProcessStore::FreeLocked(Arena& arena, std::map<uint64_t, Slice>::iterator slice) {
  uint64_t offset = slice->first;
  uint64_t length = slice->second.length;
  auto owner_it = owner_bytes_.find(slice->second.owner);
  owner_it->second -= length;
  if (owner_it->second == 0) owner_bytes_.erase(owner_it);
  arena.slices.erase(slice);
  arena.free_bytes += length;
  allocated_bytes_ -= length;
  --slice_count_;
  // Merge with the free neighbours so the free list stays coalesced.
  auto next = arena.free_blocks.lower_bound(offset);
  if (next != arena.free_blocks.end() && next->first == offset + length) {
    length += next->second;
    next = arena.free_blocks.erase(next);
  }
  if (next != arena.free_blocks.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      prev->second += length;
      return;
    }
  }
  arena.free_blocks.emplace_hint(next, offset, length);
}

absl::Status InProcessStore::Free(const HostSlice& slice) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(auto found, FindLocked(slice));
  FreeLocked(*found.first, found.second);
  return absl::OkStatus();
}

uint64_t InProcessStore::FreeOwner(std::string_view owner) {
  absl::MutexLock lock(&mu_);
  if (owner_bytes_.find(owner) == owner_bytes_.end()) return 0;
  uint64_t freed = 0;
  for (auto& [id, arena] : arenas_) {
    for (auto it = arena->slices.begin(); it != arena->slices.end();) {
      auto current = it++;
      if (current->second.owner != owner) continue;
      freed += current->second.length;
      FreeLocked(*arena, current);
    }
  }
  return freed;
}

absl::StatusOr<absl::Span<std::byte>> InProcessStore::Data(const HostSlice& slice) {
  // A shared lock: readers of slices do not serialise behind each other.
  absl::ReaderMutexLock lock(&mu_);
  auto arena_it = arenas_.find(slice.arena);
  if (arena_it != arenas_.end()) {
    const Arena& arena = *arena_it->second;
    auto it = arena.slices.find(slice.offset);
    if (it != arena.slices.end() && it->second.length == slice.length) {
      return absl::Span<std::byte>(arena.memory.data() + slice.offset, slice.length);
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("slice: ", SliceText(slice), " is not a live slice of this store"));
}

absl::StatusOr<int> InProcessStore::ArenaFd(ArenaId arena) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = arenas_.find(arena);
  if (it == arenas_.end()) return absl::NotFoundError(absl::StrCat("arena: unknown id ", arena));
  return it->second->memory.fd();
}

absl::StatusOr<uint64_t> InProcessStore::ArenaBytes(ArenaId arena) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = arenas_.find(arena);
  if (it == arenas_.end()) return absl::NotFoundError(absl::StrCat("arena: unknown id ", arena));
  return it->second->memory.size();
}

uint64_t InProcessStore::LargestFreeBlockLocked() const {
  uint64_t largest = 0;
  for (const auto& [id, arena] : arenas_) {
    for (const auto& [offset, length] : arena->free_blocks) largest = std::max(largest, length);
  }
  return largest;
}

HostKvStoreStats InProcessStore::Stats() const {
  absl::ReaderMutexLock lock(&mu_);
  HostKvStoreStats stats;
  stats.budget_bytes = options_.budget_bytes;
  stats.reserved_bytes = reserved_bytes_;
  stats.allocated_bytes = allocated_bytes_;
  for (const auto& [id, arena] : arenas_) stats.free_bytes += arena->free_bytes;
  stats.arena_count = arenas_.size();
  stats.slice_count = slice_count_;
  stats.owner_bytes.insert(owner_bytes_.begin(), owner_bytes_.end());
  return stats;
}

absl::Status InProcessStore::CheckInvariants() const {
  absl::ReaderMutexLock lock(&mu_);
  uint64_t reserved = 0, allocated = 0;
  size_t slices = 0;
  std::map<std::string, uint64_t, std::less<>> owners;
  for (const auto& [id, arena] : arenas_) {
    const uint64_t size = arena->memory.size();
    reserved += size;
    // Merge the two ordered maps and walk the arena from 0 to its end.
    uint64_t cursor = 0, free_sum = 0;
    bool last_was_free = false;
    auto f = arena->free_blocks.begin();
    auto s = arena->slices.begin();
    while (f != arena->free_blocks.end() || s != arena->slices.end()) {
      const bool take_free =
          s == arena->slices.end() || (f != arena->free_blocks.end() && f->first < s->first);
      const uint64_t offset = take_free ? f->first : s->first;
      const uint64_t length = take_free ? f->second : s->second.length;
      if (offset != cursor) {
        return absl::InternalError(absl::StrCat("arena ", id, ": ", take_free ? "free block" : "slice",
                                                " at ", offset, " but the previous range ends at ",
                                                cursor, offset > cursor ? " (gap)" : " (overlap)"));
      }
      if (length == 0) return absl::InternalError(absl::StrCat("arena ", id, ": empty range at ", offset));
      if (take_free && last_was_free) {
        return absl::InternalError(absl::StrCat("arena ", id, ": free blocks touch at ", offset,
                                                " (not coalesced)"));
      }
      if (take_free) {
        free_sum += length;
        ++f;
      } else {
        allocated += length;
        ++slices;
        owners[s->second.owner] += length;
        ++s;
      }
      last_was_free = take_free;
      cursor = offset + length;
    }
    if (cursor != size) {
      return absl::InternalError(absl::StrCat("arena ", id, ": ranges end at ", cursor,
                                              ", the arena at ", size));
    }
    if (free_sum != arena->free_bytes) {
      return absl::InternalError(absl::StrCat("arena ", id, ": free blocks sum to ", free_sum,
                                              ", counter says ", arena->free_bytes));
    }
  }
  if (reserved != reserved_bytes_ || allocated != allocated_bytes_ || slices != slice_count_) {
    return absl::InternalError(absl::StrCat("totals: walked reserved ", reserved, " allocated ",
                                            allocated, " slices ", slices, "; counters say ",
                                            reserved_bytes_, " / ", allocated_bytes_, " / ",
                                            slice_count_));
  }
  if (reserved_bytes_ + pending_bytes_ > options_.budget_bytes) {
    return absl::InternalError(absl::StrCat("budget: ", reserved_bytes_, " reserved + ",
                                            pending_bytes_, " pending exceed ",
                                            options_.budget_bytes));
  }
  if (owners != owner_bytes_) {
    return absl::InternalError("owners: bytes per owner differ from the walk");
  }
  return absl::OkStatus();
}

}  // namespace tailorkv::kvhost
