#include "common/test_child_process.h"

#include <gtest/gtest.h>

#include <chrono>
#include <string>

namespace tailorkv::common::testing {
namespace {

// Wait() returned after a fixed 60 s of reading, losing what a slow child
// (a worker generating under ASan) wrote later; it now reads to the end.
// A child that outlives 60 s is too slow for a unit test: the checks below
// are the parts of that contract that fail fast.

// Wait() returns with the child's exit, not when the last holder of the
// pipe closes it: a process it left behind (here a 20 s sleep) kept the old
// Wait() reading until EOF.
TEST(ChildProcessTest, WaitEndsWithTheChildNotWithWhatItLeftRunning) {
  ChildProcess c("sleep 20 & echo started; exit 3");
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(c.Wait(), 3);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  EXPECT_EQ(c.output(), "started\n");
}

// Everything written up to the exit is read, more than a pipe holds, with
// the last bytes written just before it.
TEST(ChildProcessTest, WaitReadsEverythingWrittenBeforeTheExit) {
  ChildProcess c("head -c 300000 /dev/zero | tr '\\0' x; sleep 0.3; printf end");
  EXPECT_EQ(c.Wait(), 0);
  EXPECT_EQ(c.output(), std::string(300000, 'x') + "end");
}

TEST(ChildProcessTest, WaitReportsAKillAsMinusOne) {
  ChildProcess c("exec sleep 30");
  c.Signal(SIGKILL);
  EXPECT_EQ(c.Wait(), -1);
  EXPECT_EQ(c.pid(), -1);
  EXPECT_EQ(c.Wait(), -1);  // once waited for, nothing to wait for
}

}  // namespace
}  // namespace tailorkv::common::testing
