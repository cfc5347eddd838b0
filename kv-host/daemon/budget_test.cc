#include "daemon/budget.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace tailorkv::kvhost {
namespace {

namespace fs = std::filesystem;

// A fake root: files written under a fresh temporary directory.
class FakeRoot {
 public:
  explicit FakeRoot(const char* name)
      : root_(fs::path(::testing::TempDir()) / absl::StrCat(name, "-", getpid())) {
    fs::remove_all(root_);
  }
  ~FakeRoot() { fs::remove_all(root_); }
  void Write(const std::string& path, const std::string& text) {
    const fs::path p = root_ / path.substr(1);
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
  }
  std::string root() const { return root_.string(); }

 private:
  fs::path root_;
};

constexpr const char* kMeminfo = "MemTotal:       131072000 kB\nMemFree:  5 kB\n";

TEST(DetectMemoryLimitTest, CgroupV2LimitThenV1ThenMemTotal) {
  {
    FakeRoot r("v2");
    r.Write("/proc/self/cgroup", "0::/docker/abc\n");
    r.Write("/sys/fs/cgroup/docker/abc/memory.max", "8589934592\n");
    r.Write("/proc/meminfo", kMeminfo);
    auto got = DetectMemoryLimit(r.root());
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->bytes, 8589934592u);
    EXPECT_NE(got->source.find("cgroup v2"), std::string::npos) << got->source;
  }
  {
    FakeRoot r("v2max");  // no limit: the machine's memory
    r.Write("/proc/self/cgroup", "0::/\n");
    r.Write("/sys/fs/cgroup/memory.max", "max\n");
    r.Write("/proc/meminfo", kMeminfo);
    auto got = DetectMemoryLimit(r.root());
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->bytes, 131072000ull * 1024);
    EXPECT_EQ(got->source, "MemTotal");
  }
  {
    FakeRoot r("v1");
    r.Write("/proc/self/cgroup", "12:cpu,cpuacct:/x\n9:memory:/kubepods/pod1\n");
    r.Write("/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes", "4294967296\n");
    r.Write("/proc/meminfo", kMeminfo);
    auto got = DetectMemoryLimit(r.root());
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->bytes, 4294967296u);
    EXPECT_NE(got->source.find("cgroup v1"), std::string::npos);
  }
  {
    FakeRoot r("v1unlimited");
    r.Write("/proc/self/cgroup", "9:memory:/\n");
    r.Write("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n");
    r.Write("/proc/meminfo", kMeminfo);
    EXPECT_EQ(DetectMemoryLimit(r.root())->source, "MemTotal");
  }
  FakeRoot empty("none");
  EXPECT_EQ(DetectMemoryLimit(empty.root()).status().code(), absl::StatusCode::kNotFound);
  // This machine: something sensible.
  auto real = DetectMemoryLimit();
  ASSERT_TRUE(real.ok()) << real.status();
  EXPECT_GT(real->bytes, uint64_t{1} << 26);
}

TEST(ParseBudgetTest, SizesFractionsAndErrors) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t limit = uint64_t{64} << 30;
  EXPECT_EQ(*ParseBudget("48G", limit), uint64_t{48} << 30);
  EXPECT_EQ(*ParseBudget("512m", limit), uint64_t{512} << 20);
  EXPECT_EQ(*ParseBudget("1073741825", limit), uint64_t{1} << 30);  // down to a page
  EXPECT_EQ(*ParseBudget("0.5", limit), uint64_t{32} << 30);
  EXPECT_EQ(*ParseBudget("1.0", limit), limit);
  EXPECT_EQ(*ParseBudget(" 2T ", limit), uint64_t{2} << 40);  // a size may exceed the limit
  for (const char* bad : {"", "0", "0.0", "1.5", "-1", "abc", "12X", "1e3", "99999999999999T"}) {
    auto got = ParseBudget(bad, limit);
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(got.status().message().find("budget"), std::string::npos) << bad;
  }
  EXPECT_FALSE(ParseBudget(absl::StrCat(page - 1), limit).ok());
}

}  // namespace
}  // namespace tailorkv::kvhost
