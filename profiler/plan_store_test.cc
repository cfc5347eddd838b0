#include "profiler/plan_store.h"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "absl/strings/escaping.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tailorkv::profiler {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr int64_t kEpoch = 1'700'000'000;  // 2023-11-14T22:13:20Z

// Each call returns the current time, then advances it by `step`.
struct FakeClock {
  absl::Time now = absl::FromUnixSeconds(kEpoch);
  absl::Duration step = absl::Seconds(1);
  PlanStore::Clock fn() {
    return [this] {
      const absl::Time t = now;
      now += step;
      return t;
    };
  }
};

std::string Bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng() & 0xff);
  return s;
}

std::string ReadAll(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteAll(const fs::path& p, const std::string& data) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << data;
  ASSERT_TRUE(out.good()) << p;
}

std::vector<std::string> DirNames(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

StoredPlan MakePlan(const std::string& id, const std::string& digest, uint32_t seed,
                    size_t png_bytes = 0) {
  StoredPlan p;
  p.plan_id = id;
  p.model_digest = digest;
  p.model = "SmolLM2-135M";
  p.summary = "plan " + id;
  p.checksum = "sha256:" + std::to_string(seed);
  p.created_at = "ignored";
  p.plan_json = "{\"plan\":\"" + id + "\",\"seed\":" + std::to_string(seed) + "}";
  p.plot_png = Bytes(png_bytes, seed);
  return p;
}

std::vector<std::string> Ids(const std::vector<StoredPlan>& plans) {
  std::vector<std::string> ids;
  for (const StoredPlan& p : plans) ids.push_back(p.plan_id);
  return ids;
}

class PlanStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("plan_store_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::permissions(dir_, fs::perms::owner_all, ec);
    fs::remove_all(dir_, ec);
  }

  std::unique_ptr<PlanStore> OpenStore() {
    auto store = PlanStore::Open(dir_.string(), clock_.fn());
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? *std::move(store) : nullptr;
  }

  fs::path dir_;
  FakeClock clock_;
};

TEST_F(PlanStoreTest, RoundTripIsByteExact) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  StoredPlan in = MakePlan("round_trip-1", "sha256:ab12", 7, 2049);
  in.plan_json = std::string("{\"a\":1}\0\xff\xfe\x80 tail", 16);
  ASSERT_EQ(in.plan_json.size(), 16u);
  ASSERT_NE(in.plot_png.find('\0'),
            std::string::npos);  // the random plot has NUL bytes too

  auto put = store->Put(in);
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->created_at, "2023-11-14T22:13:20.000000Z");
  EXPECT_EQ(put->plan_json, in.plan_json);

  auto got = store->Get("round_trip-1", /*with_plot=*/true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->plan_json, in.plan_json);
  EXPECT_EQ(got->plot_png, in.plot_png);
  EXPECT_EQ(got->model_digest, "sha256:ab12");
  EXPECT_EQ(got->model, in.model);
  EXPECT_EQ(got->summary, in.summary);
  EXPECT_EQ(got->checksum, in.checksum);
  EXPECT_EQ(got->created_at, "2023-11-14T22:13:20.000000Z");
  EXPECT_EQ(ReadAll(dir_ / "round_trip-1.json"), in.plan_json);
  EXPECT_EQ(ReadAll(dir_ / "round_trip-1.png"), in.plot_png);

  auto no_plot = store->Get("round_trip-1", /*with_plot=*/false);
  ASSERT_TRUE(no_plot.ok()) << no_plot.status();
  EXPECT_EQ(no_plot->plan_json, in.plan_json);
  EXPECT_TRUE(no_plot->plot_png.empty());

  EXPECT_EQ(store->Get("absent", true).status().code(), absl::StatusCode::kNotFound);
  // Nothing but the committed files and the lock is left behind.
  EXPECT_THAT(DirNames(dir_), ElementsAre(".lock", "round_trip-1.json", "round_trip-1.meta.json",
                                          "round_trip-1.png"));
}

TEST_F(PlanStoreTest, ReopenSeesTheSameRecords) {
  std::vector<StoredPlan> stored;
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    for (int i = 0; i < 3; ++i) {
      auto put = store->Put(MakePlan("p" + std::to_string(i), "sha256:d", 100 + i, i * 301));
      ASSERT_TRUE(put.ok()) << put.status();
      stored.push_back(*put);
    }
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_TRUE(store->skipped().empty());
  for (const StoredPlan& want : stored) {
    auto got = store->Get(want.plan_id, true);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->plan_json, want.plan_json);
    EXPECT_EQ(got->plot_png, want.plot_png);
    EXPECT_EQ(got->created_at, want.created_at);
    EXPECT_EQ(got->summary, want.summary);
  }
  auto page = store->List("", 10, "");
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_THAT(Ids(page->plans), ElementsAre("p2", "p1", "p0"));
}

TEST_F(PlanStoreTest, PutReplacesARecordWithTheSameId) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Put(MakePlan("same", "sha256:d", 1, 513)).ok());
  StoredPlan second = MakePlan("same", "sha256:d", 2, 0);
  second.summary = "second";
  ASSERT_TRUE(store->Put(second).ok());

  auto got = store->Get("same", true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->plan_json, second.plan_json);
  EXPECT_EQ(got->summary, "second");
  EXPECT_TRUE(got->plot_png.empty());
  EXPECT_EQ(got->created_at, "2023-11-14T22:13:21.000000Z");
  auto page = store->List("", 10, "");
  ASSERT_TRUE(page.ok());
  EXPECT_THAT(Ids(page->plans), ElementsAre("same"));
  // The old plot is gone with the old record.
  EXPECT_THAT(DirNames(dir_), ElementsAre(".lock", "same.json", "same.meta.json"));

  store.reset();
  store = OpenStore();
  ASSERT_NE(store, nullptr);
  got = store->Get("same", true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->plan_json, second.plan_json);
}

TEST_F(PlanStoreTest, NewestForPicksTheNewestOfADigest) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Put(MakePlan("x1", "sha256:x", 1)).ok());
  ASSERT_TRUE(store->Put(MakePlan("x2", "sha256:x", 2)).ok());
  ASSERT_TRUE(store->Put(MakePlan("x3", "sha256:x", 3, 17)).ok());
  ASSERT_TRUE(store->Put(MakePlan("y1", "sha256:y", 4)).ok());

  auto newest = store->NewestFor("sha256:x", /*with_plot=*/true);
  ASSERT_TRUE(newest.ok()) << newest.status();
  EXPECT_EQ(newest->plan_id, "x3");
  EXPECT_EQ(newest->plan_json, MakePlan("x3", "sha256:x", 3).plan_json);
  EXPECT_EQ(newest->plot_png.size(), 17u);
  EXPECT_EQ(store->NewestFor("sha256:y", false)->plan_id, "y1");
  EXPECT_EQ(store->NewestFor("sha256:none", false).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->NewestFor("", false).status().code(), absl::StatusCode::kInvalidArgument);

  // Re-profiling x1 makes it the newest.
  ASSERT_TRUE(store->Put(MakePlan("x1", "sha256:x", 5)).ok());
  EXPECT_EQ(store->NewestFor("sha256:x", false)->plan_id, "x1");
}

TEST_F(PlanStoreTest, ListOrdersNewestFirstAndPages) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  // Seven records; "c" and "d" share a time so the tie goes by plan_id.
  const std::vector<std::pair<std::string, std::string>> records = {
      {"a", "sha256:A"}, {"b", "sha256:B"}, {"d", "sha256:A"}, {"c", "sha256:B"},
      {"e", "sha256:A"}, {"f", "sha256:B"}, {"g", "sha256:A"}};
  for (size_t i = 0; i < records.size(); ++i) {
    clock_.step = records[i].first == "d" ? absl::ZeroDuration() : absl::Seconds(1);
    ASSERT_TRUE(store->Put(MakePlan(records[i].first, records[i].second, i, 5)).ok());
  }
  // Times: a=0 b=1 d=2 c=2 e=3 f=4 g=5.
  std::vector<std::string> all;
  std::string token;
  std::vector<size_t> sizes;
  do {
    auto page = store->List("", 3, token);
    ASSERT_TRUE(page.ok()) << page.status();
    sizes.push_back(page->plans.size());
    for (const StoredPlan& p : page->plans) {
      EXPECT_TRUE(p.plan_json.empty());
      EXPECT_TRUE(p.plot_png.empty());
      EXPECT_FALSE(p.created_at.empty());
      all.push_back(p.plan_id);
    }
    token = page->next_page_token;
    ASSERT_LE(sizes.size(), 4u) << "paging does not end";
  } while (!token.empty());
  EXPECT_THAT(sizes, ElementsAre(3, 3, 1));
  EXPECT_THAT(all, ElementsAre("g", "f", "e", "c", "d", "b", "a"));

  auto a1 = store->List("sha256:A", 3, "");
  ASSERT_TRUE(a1.ok()) << a1.status();
  EXPECT_THAT(Ids(a1->plans), ElementsAre("g", "e", "d"));
  ASSERT_FALSE(a1->next_page_token.empty());
  // A record put between pages neither repeats nor shifts the rest.
  ASSERT_TRUE(store->Put(MakePlan("h", "sha256:A", 9)).ok());
  auto a2 = store->List("sha256:A", 3, a1->next_page_token);
  ASSERT_TRUE(a2.ok()) << a2.status();
  EXPECT_THAT(Ids(a2->plans), ElementsAre("a"));
  EXPECT_EQ(a2->next_page_token, "");
  // Exactly one page: no token.
  auto b = store->List("sha256:B", 3, "");
  ASSERT_TRUE(b.ok());
  EXPECT_THAT(Ids(b->plans), ElementsAre("f", "c", "b"));
  EXPECT_EQ(b->next_page_token, "");
  EXPECT_TRUE(store->List("sha256:none", 1000, "")->plans.empty());

  // A token of one filter is refused under another.
  auto other = store->List("sha256:B", 3, a1->next_page_token);
  EXPECT_EQ(other.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(other.status().message(), HasSubstr("page_token"));
  for (const std::string& bad : {std::string("garbage!!"), absl::WebSafeBase64Escape("not json"),
                                 absl::WebSafeBase64Escape("{}"),
                                 absl::WebSafeBase64Escape("{\"t\":1,\"id\":\"../x\",\"d\":\"\"}"),
                                 a1->next_page_token.substr(0, a1->next_page_token.size() / 2)}) {
    auto r = store->List("", 3, bad);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(r.status().message(), HasSubstr("page_token")) << bad;
  }
  for (int bad : {0, -1, 1001}) {
    auto r = store->List("", bad, "");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(r.status().message(), HasSubstr("page_size")) << bad;
  }
}

TEST_F(PlanStoreTest, RejectsBadFieldsWithoutWriting) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (const std::string& id : {std::string("../x"), std::string(""), std::string(65, 'a'),
                                std::string("a.b"), std::string("a/b"), std::string("a b")}) {
    auto r = store->Put(MakePlan(id, "sha256:d", 1));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << id;
    EXPECT_THAT(r.status().message(), HasSubstr("plan_id")) << id;
    EXPECT_EQ(store->Get(id, false).status().code(), absl::StatusCode::kInvalidArgument) << id;
  }
  StoredPlan no_digest = MakePlan("ok", "", 1);
  EXPECT_THAT(store->Put(no_digest).status().message(), HasSubstr("model_digest"));
  StoredPlan bad_text = MakePlan("ok", "sha256:d", 1);
  bad_text.summary = "caf\xe9";
  auto r = store->Put(bad_text);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("summary"));
  StoredPlan empty_json = MakePlan("ok", "sha256:d", 1);
  empty_json.plan_json.clear();
  EXPECT_THAT(store->Put(empty_json).status().message(), HasSubstr("plan_json"));
  EXPECT_THAT(DirNames(dir_), ElementsAre(".lock"));
  // The longest id is fine.
  EXPECT_TRUE(store->Put(MakePlan(std::string(64, 'Z'), "sha256:d", 1)).ok());
}

TEST_F(PlanStoreTest, OpenCleansUpAfterACrash) {
  std::string good_json;
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    auto good = store->Put(MakePlan("good", "sha256:d", 1, 99));
    ASSERT_TRUE(good.ok());
    good_json = good->plan_json;
    ASSERT_TRUE(store->Put(MakePlan("truncated", "sha256:d", 2)).ok());
    ASSERT_TRUE(store->Put(MakePlan("flipped", "sha256:d", 3, 64)).ok());
    ASSERT_TRUE(store->Put(MakePlan("badmeta", "sha256:d", 4)).ok());
    ASSERT_TRUE(store->Put(MakePlan("nojson", "sha256:d", 5)).ok());
  }
  // A write interrupted before its rename.
  WriteAll(dir_ / ".tmp-good.json-0123456789abcdef", "{\"half");
  // Committed records damaged afterwards.
  const std::string t = ReadAll(dir_ / "truncated.json");
  WriteAll(dir_ / "truncated.json", t.substr(0, t.size() - 3));
  std::string png = ReadAll(dir_ / "flipped.png");
  png[10] ^= 0x01;
  WriteAll(dir_ / "flipped.png", png);
  WriteAll(dir_ / "badmeta.meta.json", "{not json");
  fs::remove(dir_ / "nojson.json");
  // A Put that crashed before its first commit: data, no meta.
  WriteAll(dir_ / "orphan.json", "{}");
  WriteAll(dir_ / "orphan.next.png", "png");
  // A foreign file is left alone.
  WriteAll(dir_ / "README", "hello");

  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  std::vector<std::string> skipped = store->skipped();
  std::sort(skipped.begin(), skipped.end());
  ASSERT_EQ(skipped.size(), 4u) << ::testing::PrintToString(skipped);
  EXPECT_THAT(skipped[0], HasSubstr("badmeta.meta.json: not a JSON object"));
  EXPECT_THAT(skipped[1], HasSubstr("flipped.png: flipped.png has sha256"));
  EXPECT_THAT(skipped[2], HasSubstr("nojson.json: nojson.json missing"));
  EXPECT_THAT(skipped[3], HasSubstr("truncated.json: truncated.json has"));

  auto page = store->List("", 10, "");
  ASSERT_TRUE(page.ok());
  EXPECT_THAT(Ids(page->plans), ElementsAre("good"));
  auto good = store->Get("good", true);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(good->plan_json, good_json);
  EXPECT_EQ(good->plot_png.size(), 99u);
  EXPECT_EQ(store->Get("truncated", false).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->Get("orphan", false).status().code(), absl::StatusCode::kNotFound);

  // The leftovers are gone; damaged records stay for inspection.
  const std::vector<std::string> names = DirNames(dir_);
  for (const std::string& n : names) {
    EXPECT_FALSE(n.rfind(".tmp-", 0) == 0) << n;
    EXPECT_FALSE(n.rfind("orphan", 0) == 0) << n;
  }
  EXPECT_TRUE(fs::exists(dir_ / "truncated.json"));
  EXPECT_TRUE(fs::exists(dir_ / "README"));

  // A damaged record heals when it is put again.
  ASSERT_TRUE(store->Put(MakePlan("truncated", "sha256:d", 2)).ok());
  EXPECT_TRUE(store->Get("truncated", false).ok());
}

// States a crash leaves between a Put's steps, built from the files of two
// real Puts of the same id.
TEST_F(PlanStoreTest, CrashAroundTheCommitLeavesTheOldOrTheNewRecord) {
  const StoredPlan v1 = MakePlan("p", "sha256:d", 1, 40);
  StoredPlan v2 = MakePlan("p", "sha256:d", 2, 0);
  v2.summary = "v2";
  const fs::path v2_dir = dir_.string() + "_v2";
  fs::remove_all(v2_dir);
  {
    auto other = PlanStore::Open(v2_dir.string());
    ASSERT_TRUE(other.ok()) << other.status();
    ASSERT_TRUE((*other)->Put(v2).ok());
  }
  const std::string v2_meta = ReadAll(v2_dir / "p.meta.json");
  fs::remove_all(v2_dir);
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->Put(v1).ok());
  }

  // Crash before the commit: the new data sits under the next name.
  WriteAll(dir_ / "p.next.json", v2.plan_json);
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    EXPECT_TRUE(store->skipped().empty());
    auto got = store->Get("p", true);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->plan_json, v1.plan_json);
    EXPECT_EQ(got->plot_png, v1.plot_png);
    EXPECT_FALSE(fs::exists(dir_ / "p.next.json"));
  }

  // Crash after the commit, before the final renames: new meta, old finals.
  WriteAll(dir_ / "p.next.json", v2.plan_json);
  WriteAll(dir_ / "p.meta.json", v2_meta);
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    EXPECT_TRUE(store->skipped().empty()) << ::testing::PrintToString(store->skipped());
    auto got = store->Get("p", true);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->plan_json, v2.plan_json);
    EXPECT_EQ(got->summary, "v2");
    EXPECT_TRUE(got->plot_png.empty());
  }
  EXPECT_THAT(DirNames(dir_), ElementsAre(".lock", "p.json", "p.meta.json"));
  EXPECT_EQ(ReadAll(dir_ / "p.json"), v2.plan_json);
}

TEST_F(PlanStoreTest, UnwritableDirectoryFailsPutAndKeepsReads) {
  if (::geteuid() == 0) GTEST_SKIP() << "root ignores directory modes";
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Put(MakePlan("kept", "sha256:d", 1, 33)).ok());
  ASSERT_EQ(::chmod(dir_.c_str(), 0500), 0);

  auto put = store->Put(MakePlan("new", "sha256:d", 2));
  EXPECT_EQ(put.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(put.status().message(), HasSubstr(dir_.string()));
  EXPECT_THAT(put.status().message(), HasSubstr("Permission denied"));
  auto replace = store->Put(MakePlan("kept", "sha256:d", 3));
  EXPECT_FALSE(replace.ok());

  auto got = store->Get("kept", true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->plan_json, MakePlan("kept", "sha256:d", 1).plan_json);
  EXPECT_EQ(got->plot_png.size(), 33u);
  EXPECT_EQ(store->Get("new", false).status().code(), absl::StatusCode::kNotFound);
  auto page = store->List("", 10, "");
  ASSERT_TRUE(page.ok());
  EXPECT_THAT(Ids(page->plans), ElementsAre("kept"));

  // A store over the read-only directory still opens and serves.
  store.reset();
  store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_TRUE(store->Get("kept", false).ok());

  ASSERT_EQ(::chmod(dir_.c_str(), 0700), 0);
  EXPECT_TRUE(store->Put(MakePlan("new", "sha256:d", 2)).ok());
}

TEST_F(PlanStoreTest, SecondOpenOfTheSameDirectoryFails) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto second = PlanStore::Open(dir_.string());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(second.status().message(), HasSubstr("already open"));
  store.reset();
  EXPECT_TRUE(PlanStore::Open(dir_.string()).ok());
}

TEST_F(PlanStoreTest, OpenRefusesAFileAsDirectory) {
  fs::create_directories(dir_);
  WriteAll(dir_ / "file", "x");
  auto store = PlanStore::Open((dir_ / "file").string());
  EXPECT_FALSE(store.ok());
}

// Gets during Puts of the same id see one whole version or the other.
TEST_F(PlanStoreTest, GetsDuringPutsSeeWholeRecords) {
  auto opened = PlanStore::Open(dir_.string());
  ASSERT_TRUE(opened.ok()) << opened.status();
  PlanStore& store = **opened;
  StoredPlan a = MakePlan("race", "sha256:d", 1, 1000);
  StoredPlan b = MakePlan("race", "sha256:d", 2, 3001);
  a.summary = "a";
  b.summary = "b";
  ASSERT_TRUE(store.Put(a).ok());
  std::atomic<bool> done{false};
  std::atomic<int> reads{0};
  std::thread reader([&] {
    while (!done.load()) {
      auto got = store.Get("race", true);
      ASSERT_TRUE(got.ok()) << got.status();
      const StoredPlan& want = got->summary == "a" ? a : b;
      EXPECT_EQ(got->plan_json, want.plan_json);
      EXPECT_EQ(got->plot_png, want.plot_png);
      reads.fetch_add(1);
    }
  });
  for (int i = 0; i < 20; ++i) {
    auto put = store.Put(i % 2 == 0 ? b : a);
    EXPECT_TRUE(put.ok()) << put.status();
  }
  while (reads.load() == 0) std::this_thread::yield();
  done = true;
  reader.join();
  EXPECT_GT(reads.load(), 0);
}

}  // namespace
}  // namespace tailorkv::profiler
