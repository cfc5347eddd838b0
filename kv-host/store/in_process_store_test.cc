#include "store/in_process_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace tailorkv::kvhost {
namespace {

int CountOpenFds() {
  int n = 0;
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  while (dirent* entry = readdir(dir)) {
    if (entry->d_name[0] != '.') ++n;
  }
  closedir(dir);
  return n;
}

bool Mentions(const absl::Status& status, std::string_view word) {
  return std::string(status.message()).find(word) != std::string::npos;
}

std::unique_ptr<InProcessStore> MakeStore(uint64_t budget, uint64_t arena_bytes,
                                          bool grow = true) {
  InProcessStoreOptions options;
  options.budget_bytes = budget;
  options.arena_bytes = arena_bytes;
  options.grow_on_demand = grow;
  auto store = InProcessStore::Create(std::move(options));
  EXPECT_TRUE(store.ok()) << store.status();
  return store.ok() ? *std::move(store) : nullptr;
}

// Fills a slice with bytes derived from `tag`, so overlapping slices show up
// as corrupted contents when the other one is checked.
void Stamp(absl::Span<std::byte> bytes, uint32_t tag) {
  for (size_t i = 0; i < bytes.size(); ++i) {
    bytes[i] = static_cast<std::byte>((tag * 2654435761u + i * 97) >> 7);
  }
}
long FirstUnstamped(absl::Span<const std::byte> bytes, uint32_t tag) {
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (bytes[i] != static_cast<std::byte>((tag * 2654435761u + i * 97) >> 7)) {
      return static_cast<long>(i);
    }
  }
  return -1;
}

const uint64_t kPage = PageSize();

TEST(InProcessStoreTest, CreateRejectsBadOptionsNamingTheField) {
  InProcessStoreOptions no_budget;
  auto s1 = InProcessStore::Create(no_budget);
  EXPECT_EQ(s1.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Mentions(s1.status(), "budget_bytes")) << s1.status();

  InProcessStoreOptions odd_arena;
  odd_arena.budget_bytes = 16 * kPage;
  odd_arena.arena_bytes = kPage + 8;
  auto s2 = InProcessStore::Create(odd_arena);
  EXPECT_EQ(s2.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Mentions(s2.status(), "arena_bytes")) << s2.status();

  InProcessStoreOptions arena_over_budget;
  arena_over_budget.budget_bytes = 2 * kPage;
  arena_over_budget.arena_bytes = 4 * kPage;
  auto s3 = InProcessStore::Create(arena_over_budget);
  EXPECT_EQ(s3.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Mentions(s3.status(), "arena_bytes")) << s3.status();

  InProcessStoreOptions half_hook;
  half_hook.budget_bytes = 4 * kPage;
  half_hook.arena_bytes = kPage;
  half_hook.register_fn = [](void*, size_t) { return absl::OkStatus(); };
  auto s4 = InProcessStore::Create(half_hook);
  EXPECT_EQ(s4.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Mentions(s4.status(), "unregister_fn")) << s4.status();
}

TEST(InProcessStoreTest, BadRequestsNameTheFieldAndChangeNothing) {
  auto store = MakeStore(8 * kPage, 2 * kPage);
  ASSERT_NE(store, nullptr);
  auto live = store->Allocate(100, 8, "s");
  ASSERT_TRUE(live.ok()) << live.status();
  const HostKvStoreStats before = store->Stats();

  struct Case {
    uint64_t bytes, alignment;
    std::string owner, field;
  };
  const std::vector<Case> cases = {
      {0, 8, "s", "bytes"},
      {2 * kPage + 1, 8, "s", "bytes"},          // larger than an arena
      {uint64_t{1} << 62, 8, "s", "bytes"},
      {64, 0, "s", "alignment"},
      {64, 3, "s", "alignment"},                 // not a power of two
      {64, 2 * kPage, "s", "alignment"},         // beyond the page
      {64, 8, "", "owner"},
  };
  for (const Case& c : cases) {
    auto slice = store->Allocate(c.bytes, c.alignment, c.owner);
    EXPECT_EQ(slice.status().code(), absl::StatusCode::kInvalidArgument)
        << c.bytes << " " << c.alignment << " " << c.owner;
    EXPECT_TRUE(Mentions(slice.status(), c.field)) << slice.status();
  }

  const std::vector<HostSlice> bogus = {
      {99, live->offset, live->length},              // unknown arena
      {kInvalidArena, 0, 100},                       // the invalid id
      {live->arena, live->offset + 8, live->length}, // inside, not a start
      {live->arena, live->offset, live->length + 1}, // altered length
      {live->arena, kPage, 100},                     // a free range
  };
  for (const HostSlice& s : bogus) {
    const absl::Status free_status = store->Free(s);
    EXPECT_EQ(free_status.code(), absl::StatusCode::kInvalidArgument) << s.offset;
    EXPECT_TRUE(Mentions(free_status, "slice")) << free_status;
    EXPECT_EQ(store->Data(s).status().code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(store->ArenaFd(99).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Mentions(store->ArenaFd(99).status(), "arena"));
  EXPECT_EQ(store->ArenaBytes(0).status().code(), absl::StatusCode::kNotFound);

  auto bad_arena = store->CreateArena(kPage + 1, "x");
  EXPECT_EQ(bad_arena.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Mentions(bad_arena.status(), "bytes")) << bad_arena.status();
  auto unnamed = store->CreateArena(kPage, "");
  EXPECT_EQ(unnamed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Mentions(unnamed.status(), "name")) << unnamed.status();

  const HostKvStoreStats after = store->Stats();
  EXPECT_EQ(after.allocated_bytes, before.allocated_bytes);
  EXPECT_EQ(after.reserved_bytes, before.reserved_bytes);
  EXPECT_EQ(after.arena_count, before.arena_count);
  EXPECT_EQ(after.owner_bytes, before.owner_bytes);
  EXPECT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();
}

TEST(InProcessStoreTest, DoubleFreeIsRejected) {
  auto store = MakeStore(4 * kPage, kPage);
  ASSERT_NE(store, nullptr);
  auto a = store->Allocate(100, 1, "s");
  auto b = store->Allocate(200, 1, "s");
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(store->Free(*a).ok());
  const absl::Status again = store->Free(*a);
  EXPECT_EQ(again.code(), absl::StatusCode::kInvalidArgument) << again;
  EXPECT_TRUE(Mentions(again, "slice"));
  EXPECT_EQ(store->Data(*a).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store->Stats().allocated_bytes, 200u);
  EXPECT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();
}

TEST(InProcessStoreTest, BudgetExceededIsResourceExhaustedAndLeaksNothing) {
  const int fds_start = CountOpenFds();
  {
    auto store = MakeStore(4 * kPage, 2 * kPage);
    ASSERT_NE(store, nullptr);
    auto a = store->Allocate(2 * kPage, 1, "s1");
    auto b = store->Allocate(kPage + 1, 1, "s2");  // needs the second arena
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_NE(a->arena, b->arena);
    auto c = store->Allocate(kPage - 1, 1, "s2");  // fits the tail of b's arena
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->arena, b->arena);

    const HostKvStoreStats before = store->Stats();
    const int fds_before = CountOpenFds();
    EXPECT_EQ(before.reserved_bytes, 4 * kPage);
    auto over = store->Allocate(8, 1, "s3");
    EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
    EXPECT_TRUE(Mentions(over.status(), "budget")) << over.status();
    auto arena = store->CreateArena(kPage, "extra");
    EXPECT_EQ(arena.status().code(), absl::StatusCode::kResourceExhausted) << arena.status();
    EXPECT_TRUE(Mentions(arena.status(), "budget")) << arena.status();

    const HostKvStoreStats after = store->Stats();
    EXPECT_EQ(after.reserved_bytes, before.reserved_bytes);
    EXPECT_EQ(after.allocated_bytes, before.allocated_bytes);
    EXPECT_EQ(after.arena_count, 2u);
    EXPECT_EQ(after.owner_bytes.count("s3"), 0u);
    EXPECT_EQ(CountOpenFds(), fds_before);
    EXPECT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();

    // Space given back is usable again without growing.
    ASSERT_TRUE(store->Free(*a).ok());
    auto d = store->Allocate(kPage, 1, "s3");
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->arena, a->arena);
    EXPECT_EQ(store->Stats().arena_count, 2u);
  }
  EXPECT_EQ(CountOpenFds(), fds_start);
}

TEST(InProcessStoreTest, NoGrowthMeansOnlyExplicitArenasServe) {
  auto store = MakeStore(8 * kPage, kPage, /*grow=*/false);
  ASSERT_NE(store, nullptr);
  auto none = store->Allocate(8, 1, "s");
  EXPECT_EQ(none.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(Mentions(none.status(), "budget")) << none.status();
  EXPECT_EQ(store->Stats().arena_count, 0u);
  // Explicit arenas may be larger than arena_bytes; slices may not.
  auto id = store->CreateArena(4 * kPage, "big");
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(*store->ArenaBytes(*id), 4 * kPage);
  auto s = store->Allocate(kPage, 1, "s");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->arena, *id);
  EXPECT_EQ(store->Stats().reserved_bytes, 4 * kPage);
}

TEST(InProcessStoreTest, FreedSpaceIsReusedAndNeighboursCoalesce) {
  auto store = MakeStore(4 * kPage, 4 * kPage, /*grow=*/false);
  ASSERT_NE(store, nullptr);
  auto arena = store->CreateArena(4 * kPage, "coalesce");
  ASSERT_TRUE(arena.ok());
  std::vector<HostSlice> s;
  for (int i = 0; i < 4; ++i) {
    auto slice = store->Allocate(kPage, 1, "s");
    ASSERT_TRUE(slice.ok()) << slice.status();
    EXPECT_EQ(slice->offset, i * kPage) << "first fit hands out in address order";
    s.push_back(*slice);
  }
  EXPECT_EQ(store->Allocate(1, 1, "s").status().code(), absl::StatusCode::kResourceExhausted);

  // Reuse: the hole left by slice 1 is the first fit.
  ASSERT_TRUE(store->Free(s[1]).ok());
  auto reuse = store->Allocate(kPage, 1, "s");
  ASSERT_TRUE(reuse.ok());
  EXPECT_EQ(reuse->offset, kPage);
  s[1] = *reuse;

  // Free 0 and 2, then 1 (both neighbours free): one block of 3 pages.
  ASSERT_TRUE(store->Free(s[0]).ok());
  ASSERT_TRUE(store->Free(s[2]).ok());
  EXPECT_EQ(store->Allocate(2 * kPage, 1, "s").status().code(),
            absl::StatusCode::kResourceExhausted)
      << "two separate 1-page holes cannot hold 2 pages";
  ASSERT_TRUE(store->Free(s[1]).ok());
  ASSERT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();
  auto three = store->Allocate(3 * kPage, 1, "s");
  ASSERT_TRUE(three.ok()) << three.status();
  EXPECT_EQ(three->offset, 0u);

  // Free everything: the whole arena is one block again.
  ASSERT_TRUE(store->Free(*three).ok());
  ASSERT_TRUE(store->Free(s[3]).ok());
  auto whole = store->Allocate(4 * kPage, 1, "s");
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(whole->offset, 0u);
  EXPECT_EQ(whole->length, 4 * kPage);
  EXPECT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();
}

TEST(InProcessStoreTest, SlicesAreAlignedAndAlignmentGapsStayUsable) {
  auto store = MakeStore(4 * kPage, 4 * kPage, /*grow=*/false);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->CreateArena(4 * kPage, "align").ok());
  auto one = store->Allocate(1, 1, "s");
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->offset, 0u);
  auto aligned = store->Allocate(100, 64, "s");
  ASSERT_TRUE(aligned.ok());
  EXPECT_EQ(aligned->offset, 64u);
  auto ptr = store->Data(*aligned);
  ASSERT_TRUE(ptr.ok());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(ptr->data()) % 64, 0u);
  // The gap [1, 64) before the aligned slice is free and first in line.
  auto gap = store->Allocate(63, 1, "s");
  ASSERT_TRUE(gap.ok());
  EXPECT_EQ(gap->offset, 1u);
  ASSERT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();

  for (uint64_t alignment = 1; alignment <= kPage; alignment *= 2) {
    for (uint64_t bytes : {uint64_t{1}, uint64_t{7}, uint64_t{2049}}) {
      auto slice = store->Allocate(bytes, alignment, "sweep");
      ASSERT_TRUE(slice.ok()) << slice.status() << " " << bytes << "@" << alignment;
      EXPECT_EQ(slice->offset % alignment, 0u) << bytes << "@" << alignment;
      EXPECT_EQ(slice->length, bytes);
      auto data = store->Data(*slice);
      ASSERT_TRUE(data.ok());
      EXPECT_EQ(reinterpret_cast<uintptr_t>(data->data()) % alignment, 0u);
      EXPECT_EQ(data->size(), bytes);
      ASSERT_TRUE(store->Free(*slice).ok());
    }
  }
  EXPECT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();
}

// 10,000 seeded alloc/free operations over several arenas. Every slice is
// stamped with its own pattern and checked before it is freed (overlapping
// slices would corrupt each other), and the accounting is re-derived from
// scratch along the way.
TEST(InProcessStoreTest, RandomSequenceKeepsEveryByteAccounted) {
  const uint64_t arena_bytes = 16 * kPage;
  auto store = MakeStore(6 * arena_bytes, arena_bytes);
  ASSERT_NE(store, nullptr);
  std::mt19937_64 rng(20261122);
  struct Live {
    HostSlice slice;
    uint32_t tag;
    std::string owner;
  };
  std::vector<Live> live;
  std::map<std::string, uint64_t> owner_bytes;
  uint64_t live_bytes = 0;
  int exhausted = 0, allocations = 0;
  uint32_t next_tag = 1;
  for (int op = 0; op < 10000; ++op) {
    const bool allocate = live.empty() || rng() % 100 < 55;
    if (allocate) {
      // Mostly small odd sizes, sometimes pages, rarely near a whole arena.
      uint64_t bytes;
      const int kind = static_cast<int>(rng() % 20);
      if (kind < 14) bytes = 1 + rng() % 3000;
      else if (kind < 19) bytes = kPage * (1 + rng() % 4) + rng() % 3;
      else bytes = arena_bytes - rng() % kPage;
      const uint64_t alignment = uint64_t{1} << (rng() % 13);
      const std::string owner = "owner-" + std::to_string(rng() % 5);
      auto slice = store->Allocate(bytes, std::min(alignment, kPage), owner);
      if (!slice.ok()) {
        ASSERT_EQ(slice.status().code(), absl::StatusCode::kResourceExhausted) << slice.status();
        ++exhausted;
        continue;
      }
      ++allocations;
      ASSERT_EQ(slice->length, bytes);
      ASSERT_EQ(slice->offset % std::min(alignment, kPage), 0u);
      auto data = store->Data(*slice);
      ASSERT_TRUE(data.ok()) << data.status();
      Stamp(*data, next_tag);
      live.push_back({*slice, next_tag++, owner});
      live_bytes += bytes;
      owner_bytes[owner] += bytes;
    } else {
      const size_t i = rng() % live.size();
      auto data = store->Data(live[i].slice);
      ASSERT_TRUE(data.ok()) << data.status();
      ASSERT_EQ(FirstUnstamped(*data, live[i].tag), -1) << "slice overwritten at op " << op;
      ASSERT_TRUE(store->Free(live[i].slice).ok());
      live_bytes -= live[i].slice.length;
      if ((owner_bytes[live[i].owner] -= live[i].slice.length) == 0) {
        owner_bytes.erase(live[i].owner);
      }
      live[i] = std::move(live.back());
      live.pop_back();
    }
    if (op % 500 == 0 || op == 9999) {
      ASSERT_TRUE(store->CheckInvariants().ok()) << "op " << op << ": " << store->CheckInvariants();
      const HostKvStoreStats stats = store->Stats();
      ASSERT_EQ(stats.allocated_bytes, live_bytes);
      ASSERT_EQ(stats.allocated_bytes + stats.free_bytes, stats.reserved_bytes);
      ASSERT_LE(stats.reserved_bytes, stats.budget_bytes);
      ASSERT_EQ(stats.slice_count, live.size());
      ASSERT_EQ(stats.owner_bytes, owner_bytes);
    }
  }
  // The sequence must have exercised both growth and the budget.
  EXPECT_GT(allocations, 4000);
  EXPECT_GT(exhausted, 0);
  EXPECT_EQ(store->Stats().arena_count, 6u);

  for (const Live& l : live) {
    auto data = store->Data(l.slice);
    ASSERT_TRUE(data.ok());
    ASSERT_EQ(FirstUnstamped(*data, l.tag), -1);
    ASSERT_TRUE(store->Free(l.slice).ok());
  }
  const HostKvStoreStats empty = store->Stats();
  EXPECT_EQ(empty.allocated_bytes, 0u);
  EXPECT_EQ(empty.free_bytes, empty.reserved_bytes);
  EXPECT_TRUE(empty.owner_bytes.empty());
  EXPECT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();
  // Fully coalesced: every arena holds one whole-arena slice again.
  for (size_t i = 0; i < empty.arena_count; ++i) {
    EXPECT_TRUE(store->Allocate(arena_bytes, kPage, "whole").ok()) << i;
  }
  EXPECT_EQ(store->Stats().free_bytes, 0u);
}

TEST(InProcessStoreTest, FreeOwnerFreesOnlyThatOwner) {
  auto store = MakeStore(8 * kPage, 2 * kPage);
  ASSERT_NE(store, nullptr);
  std::vector<HostSlice> keep;
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(store->Allocate(1000 + i, 16, "gone").ok());
    auto k = store->Allocate(500 + i, 16, "kept");
    ASSERT_TRUE(k.ok());
    keep.push_back(*k);
  }
  EXPECT_EQ(store->FreeOwner("gone"), 6 * 1000u + 15);
  EXPECT_EQ(store->FreeOwner("gone"), 0u);
  EXPECT_EQ(store->FreeOwner("nobody"), 0u);
  const HostKvStoreStats stats = store->Stats();
  EXPECT_EQ(stats.owner_bytes.count("gone"), 0u);
  EXPECT_EQ(stats.owner_bytes.at("kept"), 6 * 500u + 15);
  EXPECT_EQ(stats.allocated_bytes, 6 * 500u + 15);
  for (const HostSlice& k : keep) EXPECT_TRUE(store->Data(k).ok());
  EXPECT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();
}

// Empty arenas go back (their fds closed) beyond the kept reserve; arenas
// with a live slice stay, and so does their data; the budget is free again.
TEST(InProcessStoreTest, RetireEmptyArenasKeepsTheReserveAndLiveOnes) {
  auto store = MakeStore(8 * kPage, 2 * kPage);
  ASSERT_NE(store, nullptr);
  const int fds_before = CountOpenFds();
  std::vector<HostSlice> slices;
  for (int i = 0; i < 4; ++i) {
    auto s = store->Allocate(2 * kPage, 64, i == 2 ? "live" : "burst");  // one arena each
    ASSERT_TRUE(s.ok()) << s.status();
    slices.push_back(*s);
  }
  EXPECT_EQ(store->Stats().arena_count, 4u);
  EXPECT_EQ(CountOpenFds(), fds_before + 4);
  Stamp(*store->Data(slices[2]), 9);
  EXPECT_TRUE(store->RetireEmptyArenas(0).empty());  // nothing empty yet
  store->FreeOwner("burst");
  const std::vector<ArenaId> gone = store->RetireEmptyArenas(2 * kPage);  // keep one empty arena
  EXPECT_EQ(gone, (std::vector<ArenaId>{slices[1].arena, slices[3].arena}));
  HostKvStoreStats st = store->Stats();
  EXPECT_EQ(st.arena_count, 2u);
  EXPECT_EQ(st.reserved_bytes, 4 * kPage);
  EXPECT_EQ(CountOpenFds(), fds_before + 2);
  EXPECT_EQ(FirstUnstamped(*store->Data(slices[2]), 9), -1);
  EXPECT_EQ(store->ArenaFd(slices[1].arena).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();
  // The budget given back serves new arenas.
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(store->Allocate(2 * kPage, 64, "again").ok());
  EXPECT_EQ(store->RetireEmptyArenas(0).size(), 0u);
  store->FreeOwner("again");
  store->FreeOwner("live");
  EXPECT_EQ(store->RetireEmptyArenas(0).size(), 3u);  // the kept one was reused, one new
  st = store->Stats();
  EXPECT_EQ(st.arena_count, 0u);
  EXPECT_EQ(st.reserved_bytes, 0u);
  EXPECT_EQ(CountOpenFds(), fds_before);
  EXPECT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();
}

// A restarted kv-host adopts a worker's arenas and live slices: same bytes,
// same ids, exact accounting; overlapping or stray claims and unsealed or
// wrongly sized fds are refused.
TEST(InProcessStoreTest, AdoptedArenasAndClaimedSlicesKeepTheirBytes) {
  auto before = MakeStore(8 * kPage, 4 * kPage);
  ASSERT_NE(before, nullptr);
  auto a = before->Allocate(kPage + 10, 64, "s1");
  auto b = before->Allocate(2 * kPage, 64, "s2");
  ASSERT_TRUE(a.ok() && b.ok());
  Stamp(*before->Data(*a), 1);
  Stamp(*before->Data(*b), 2);
  auto after = MakeStore(8 * kPage, 4 * kPage, /*grow=*/false);
  ASSERT_NE(after, nullptr);
  ScopedFd dup(fcntl(*before->ArenaFd(a->arena), F_DUPFD_CLOEXEC, 0));
  auto memory = MemfdArena::Adopt(std::move(dup), 4 * kPage);
  ASSERT_TRUE(memory.ok()) << memory.status();
  ASSERT_TRUE(after->AdoptArena(a->arena, *std::move(memory), "adopted").ok());
  ASSERT_TRUE(after->Claim(*a, "s1").ok());
  ASSERT_TRUE(after->Claim(*b, "s2").ok());
  EXPECT_EQ(FirstUnstamped(*after->Data(*a), 1), -1);
  EXPECT_EQ(FirstUnstamped(*after->Data(*b), 2), -1);
  EXPECT_EQ(after->Claim(*a, "again").code(), absl::StatusCode::kInvalidArgument);  // live already
  EXPECT_EQ(after->Claim(HostSlice{a->arena, 4 * kPage - 8, 16}, "x").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(after->Claim(HostSlice{99, 0, 16}, "x").code(), absl::StatusCode::kInvalidArgument);
  HostKvStoreStats st = after->Stats();
  EXPECT_EQ(st.allocated_bytes, kPage + 10 + 2 * kPage);
  EXPECT_EQ(st.owner_bytes.at("s2"), 2 * kPage);
  EXPECT_TRUE(after->CheckInvariants().ok()) << after->CheckInvariants();
  // New slices land in the free space left around the claimed ones.
  auto c = after->Allocate(kPage / 2, 64, "s3");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arena, a->arena);
  EXPECT_EQ(after->FreeOwner("s1"), kPage + 10);
  EXPECT_TRUE(after->CheckInvariants().ok()) << after->CheckInvariants();
  // The id is taken; a wrong size or an unsealed file is not adopted.
  ScopedFd dup2(fcntl(*before->ArenaFd(a->arena), F_DUPFD_CLOEXEC, 0));
  EXPECT_EQ(MemfdArena::Adopt(std::move(dup2), 2 * kPage).status().code(), absl::StatusCode::kInvalidArgument);
  ScopedFd plain(memfd_create("unsealed", MFD_CLOEXEC));
  ASSERT_EQ(ftruncate(plain.get(), static_cast<off_t>(kPage)), 0);
  auto unsealed = MemfdArena::Adopt(std::move(plain), kPage);
  EXPECT_EQ(unsealed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unsealed.status().message().find("sealed"), std::string::npos);
}

TEST(InProcessStoreTest, ArenaFdMapsTheSameBytesASecondTime) {
  auto store = MakeStore(8 * kPage, 4 * kPage);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Allocate(kPage + 3, 1, "pad").ok());
  auto slice = store->Allocate(5000, 64, "s");
  ASSERT_TRUE(slice.ok());
  auto data = store->Data(*slice);
  ASSERT_TRUE(data.ok());
  Stamp(*data, 77);
  auto fd = store->ArenaFd(slice->arena);
  auto bytes = store->ArenaBytes(slice->arena);
  ASSERT_TRUE(fd.ok() && bytes.ok());
  auto mapping = SharedMapping::Map(*fd, *bytes, /*writable=*/true, /*populate=*/false);
  ASSERT_TRUE(mapping.ok()) << mapping.status();
  absl::Span<std::byte> view(mapping->data() + slice->offset, slice->length);
  EXPECT_EQ(FirstUnstamped(view, 77), -1);
  Stamp(view, 78);
  EXPECT_EQ(FirstUnstamped(*data, 78), -1);
}

// A separate process maps the arena fd and reads and writes a slice at the
// offset the store handed out: what a co-located worker will do.
TEST(InProcessStoreTest, ForkedChildMapsArenaFdAndSharesSliceBytes) {
  auto store = MakeStore(8 * kPage, 4 * kPage);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Allocate(777, 1, "pad").ok());
  auto slice = store->Allocate(3 * kPage - 5, 128, "s");
  ASSERT_TRUE(slice.ok());
  auto data = store->Data(*slice);
  ASSERT_TRUE(data.ok());
  Stamp(*data, 11);
  const int fd = *store->ArenaFd(slice->arena);
  const uint64_t arena_bytes = *store->ArenaBytes(slice->arena);

  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    void* base = mmap(nullptr, arena_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) _exit(10);
    absl::Span<std::byte> view(static_cast<std::byte*>(base) + slice->offset, slice->length);
    if (FirstUnstamped(view, 11) != -1) _exit(11);
    Stamp(view, 12);
    _exit(0);
  }
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFEXITED(wstatus));
  ASSERT_EQ(WEXITSTATUS(wstatus), 0) << "child failed at step " << WEXITSTATUS(wstatus);
  EXPECT_EQ(FirstUnstamped(*data, 12), -1) << "child's writes not visible";
}

TEST(InProcessStoreTest, RegistersEachArenaOnceAndUnregistersOnDestruction) {
  std::vector<std::pair<void*, size_t>> registered, unregistered;
  const int fds_before = CountOpenFds();
  {
    InProcessStoreOptions options;
    options.budget_bytes = 16 * kPage;
    options.arena_bytes = 2 * kPage;
    options.register_fn = [&](void* base, size_t bytes) {
      registered.emplace_back(base, bytes);
      return absl::OkStatus();
    };
    options.unregister_fn = [&](void* base, size_t bytes) {
      unregistered.emplace_back(base, bytes);
      return absl::OkStatus();
    };
    auto store = InProcessStore::Create(std::move(options));
    ASSERT_TRUE(store.ok()) << store.status();
    EXPECT_TRUE(registered.empty()) << "no arena before the first need";
    std::set<ArenaId> arenas;
    for (int i = 0; i < 20; ++i) {
      auto slice = (*store)->Allocate(kPage / 2 + 1, 8, "s");  // 3 fit in one 2-page arena
      ASSERT_TRUE(slice.ok()) << i << " " << slice.status();
      arenas.insert(slice->arena);
      if (i % 3 == 0) {
        ASSERT_TRUE((*store)->Free(*slice).ok());
      }
    }
    auto explicit_arena = (*store)->CreateArena(kPage, "explicit");
    ASSERT_TRUE(explicit_arena.ok()) << explicit_arena.status();
    arenas.insert(*explicit_arena);
    EXPECT_EQ(registered.size(), arenas.size());
    EXPECT_EQ(registered.size(), (*store)->Stats().arena_count);
    std::set<void*> bases;
    for (const auto& [base, bytes] : registered) bases.insert(base);
    EXPECT_EQ(bases.size(), registered.size()) << "an arena was registered twice";
    EXPECT_TRUE(unregistered.empty());
  }
  ASSERT_EQ(unregistered.size(), registered.size());
  std::sort(registered.begin(), registered.end());
  std::sort(unregistered.begin(), unregistered.end());
  EXPECT_EQ(unregistered, registered);
  EXPECT_EQ(CountOpenFds(), fds_before);
}

TEST(InProcessStoreTest, FailedRegistrationFailsTheRequestAndReturnsTheBudget) {
  int failures_left = 1;
  int unregistered = 0;
  const int fds_before = CountOpenFds();
  {
    InProcessStoreOptions options;
    options.budget_bytes = 2 * kPage;
    options.arena_bytes = 2 * kPage;
    options.register_fn = [&](void*, size_t) {
      if (failures_left > 0) {
        --failures_left;
        return absl::ResourceExhaustedError("fake: cudaHostRegister out of memory");
      }
      return absl::OkStatus();
    };
    options.unregister_fn = [&](void*, size_t) {
      ++unregistered;
      return absl::OkStatus();
    };
    auto store = InProcessStore::Create(std::move(options));
    ASSERT_TRUE(store.ok());
    auto first = (*store)->Allocate(64, 8, "s");
    EXPECT_EQ(first.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_TRUE(Mentions(first.status(), "fake: cudaHostRegister")) << first.status();
    EXPECT_EQ((*store)->Stats().reserved_bytes, 0u);
    EXPECT_EQ((*store)->Stats().arena_count, 0u);
    EXPECT_EQ(CountOpenFds(), fds_before);
    // The whole budget is available again.
    auto second = (*store)->Allocate(2 * kPage, 8, "s");
    ASSERT_TRUE(second.ok()) << second.status();
    EXPECT_TRUE((*store)->CheckInvariants().ok());
  }
  EXPECT_EQ(unregistered, 1);
  EXPECT_EQ(CountOpenFds(), fds_before);
}

// F9: memfd_create failing with EMFILE (out of file descriptors) is a typed
// error, the reserved budget comes back, and the store works once fds do.
TEST(InProcessStoreTest, FdExhaustionIsResourceExhaustedAndRecoverable) {
  auto store = MakeStore(4 * kPage, 2 * kPage);
  ASSERT_NE(store, nullptr);
  rlimit saved{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &saved), 0);
  // A new fd takes the lowest free number, and fails with EMFILE when that
  // number is not below the soft limit.
  int lowest_free = 0;
  while (fcntl(lowest_free, F_GETFD) != -1) ++lowest_free;
  ASSERT_GE(lowest_free, 3);
  rlimit tight = saved;
  tight.rlim_cur = static_cast<rlim_t>(lowest_free);
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &tight), 0);
  auto slice = store->Allocate(64, 8, "s");
  auto arena = store->CreateArena(kPage, "no-fds");
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &saved), 0);

  EXPECT_EQ(slice.status().code(), absl::StatusCode::kResourceExhausted) << slice.status();
  EXPECT_TRUE(Mentions(slice.status(), "memfd_create")) << slice.status();
  EXPECT_EQ(arena.status().code(), absl::StatusCode::kResourceExhausted) << arena.status();
  const HostKvStoreStats stats = store->Stats();
  EXPECT_EQ(stats.reserved_bytes, 0u);
  EXPECT_EQ(stats.arena_count, 0u);
  EXPECT_TRUE(stats.owner_bytes.empty());
  // The whole budget is still there.
  EXPECT_TRUE(store->Allocate(2 * kPage, 8, "s").ok());
  EXPECT_TRUE(store->Allocate(2 * kPage, 8, "s").ok());
  EXPECT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();
}

// Threads racing to allocate (and to grow the store into a tight budget) and
// free: no slice is corrupted, the budget holds, and the accounting closes.
TEST(InProcessStoreTest, ConcurrentAllocateAndFreeKeepAccounting) {
  const uint64_t arena_bytes = 8 * kPage;
  auto store = MakeStore(4 * arena_bytes, arena_bytes);
  ASSERT_NE(store, nullptr);
  constexpr int kThreads = 4;
  std::vector<int> errors(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(1000 + t);
      std::vector<std::pair<HostSlice, uint32_t>> mine;
      const std::string owner = "thread-" + std::to_string(t);
      for (int op = 0; op < 2000; ++op) {
        if (mine.empty() || rng() % 100 < 55) {
          auto slice = store->Allocate(1 + rng() % 5000, 8, owner);
          if (!slice.ok()) {
            if (slice.status().code() != absl::StatusCode::kResourceExhausted) ++errors[t];
            continue;
          }
          const uint32_t tag = static_cast<uint32_t>(t * 100000 + op);
          Stamp(*store->Data(*slice), tag);
          mine.emplace_back(*slice, tag);
        } else {
          const size_t i = rng() % mine.size();
          auto data = store->Data(mine[i].first);
          if (!data.ok() || FirstUnstamped(*data, mine[i].second) != -1) ++errors[t];
          if (!store->Free(mine[i].first).ok()) ++errors[t];
          mine[i] = mine.back();
          mine.pop_back();
        }
      }
      store->FreeOwner(owner);
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(errors[t], 0) << "thread " << t;
  const HostKvStoreStats stats = store->Stats();
  EXPECT_EQ(stats.allocated_bytes, 0u);
  EXPECT_EQ(stats.free_bytes, stats.reserved_bytes);
  EXPECT_LE(stats.reserved_bytes, stats.budget_bytes);
  EXPECT_GT(stats.arena_count, 1u);
  EXPECT_TRUE(store->CheckInvariants().ok()) << store->CheckInvariants();
}

}  // namespace
}  // namespace tailorkv::kvhost
