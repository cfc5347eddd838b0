#include "common/same_secret.h"

#include <gtest/gtest.h>

#include <string>

namespace tailorkv::common {
namespace {

TEST(SameSecretTest, EqualOnlyForTheSameBytes) {
  EXPECT_TRUE(SameSecret("Bearer s3cret", "Bearer s3cret"));
  EXPECT_TRUE(SameSecret("", ""));
  EXPECT_FALSE(SameSecret("Bearer s3cret", "Bearer s3creT"));
  EXPECT_FALSE(SameSecret("Bearer s3cre", "Bearer s3cret"));   // a prefix
  EXPECT_FALSE(SameSecret("Bearer s3cretx", "Bearer s3cret"));  // longer
  EXPECT_FALSE(SameSecret("", "Bearer s3cret"));
  // Embedded NULs count: no C-string truncation.
  EXPECT_FALSE(SameSecret(std::string("ab\0c", 4), std::string("ab\0d", 4)));
  EXPECT_TRUE(SameSecret(std::string("ab\0c", 4), std::string("ab\0c", 4)));
}

}  // namespace
}  // namespace tailorkv::common
