#include "common/atomic_file.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

namespace tailorkv::common {
namespace {

std::string Read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(WriteFileAtomically, ReplacesWholeAndLeavesNoTemporaryFiles) {
  const auto dir = std::filesystem::path(::testing::TempDir()) / "atomic_file_test";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "plan.json").string();
  const std::string first("first\0bytes", 11);
  ASSERT_TRUE(WriteFileAtomically(path, first).ok());
  EXPECT_EQ(Read(path), first);
  ASSERT_TRUE(WriteFileAtomically(path, std::string(100000, 'x')).ok());
  EXPECT_EQ(Read(path), std::string(100000, 'x'));
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) files += e.is_regular_file();
  EXPECT_EQ(files, 1);
  // A directory that does not exist: an error naming it, nothing written.
  const absl::Status missing = WriteFileAtomically((dir / "no" / "x.json").string(), "y");
  EXPECT_TRUE(absl::IsInternal(missing)) << missing;
  EXPECT_NE(missing.message().find("no"), std::string_view::npos);
  EXPECT_TRUE(absl::IsInvalidArgument(WriteFileAtomically((dir / "").string(), "y")));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace tailorkv::common
