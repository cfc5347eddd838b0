#include "common/sha256.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>

namespace tailorkv::common {
namespace {

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(Sha256Tag(""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Tag("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_TRUE(IsSha256Tag(Sha256Tag("x")));
  EXPECT_FALSE(IsSha256Tag("sha256:ABC"));
  EXPECT_FALSE(IsSha256Tag(Sha256Tag("x").substr(1)));
  EXPECT_FALSE(IsSha256Tag(std::string(Sha256Tag("x")).replace(10, 1, "g")));
}

TEST(Sha256, FileMatchesMemoryAcrossBlocksAndReportsProgress) {
  // 9 MiB + 3 bytes: two whole 4 MiB blocks and a partial one.
  std::string data((9 << 20) + 3, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>((i * 2654435761u) >> 13);
  const std::string path = ::testing::TempDir() + "/sha256_test.bin";
  { std::ofstream(path, std::ios::binary).write(data.data(), static_cast<std::streamsize>(data.size())); }
  std::vector<int64_t> seen;
  auto tag = Sha256File(path, [&](int64_t done, int64_t total) {
    EXPECT_EQ(total, static_cast<int64_t>(data.size()));
    seen.push_back(done);
    return absl::OkStatus();
  });
  ASSERT_TRUE(tag.ok()) << tag.status();
  EXPECT_EQ(*tag, Sha256Tag(data));
  EXPECT_EQ(seen, (std::vector<int64_t>{4 << 20, 8 << 20, static_cast<int64_t>(data.size())}));
  auto stopped = Sha256File(path, [](int64_t, int64_t) { return absl::CancelledError("stop"); });
  EXPECT_EQ(stopped.status().code(), absl::StatusCode::kCancelled);
  auto missing = Sha256File(path + ".missing");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find(".missing"), std::string_view::npos);
  std::remove(path.c_str());
}

}  // namespace
}  // namespace tailorkv::common
