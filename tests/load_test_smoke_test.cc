// The issue-14 load test's CI slice: a real gpu-worker (CPU backend,
// SmolLM2, four generations at once) and tkv_load_test with 12 concurrent
// clients of mixed prompt lengths, then the same with a client that never
// reads: every request completes (none starves or fails). (Cutting off a
// stalled reader is tested at the engine: engine_scheduler_test.cc.)
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "common/test_child_process.h"

namespace {

using tailorkv::common::testing::ChildProcess;

constexpr char kModelFile[] = TAILORKV_MODEL_DIR "/SmolLM2-135M-Instruct.Q4_1.gguf";

TEST(LoadTestSmoke, ConcurrentClientsAllCompleteWithAStalledOneBeside) {
  ASSERT_TRUE(std::filesystem::exists(kModelFile)) << kModelFile << " is missing: scripts/fetch_model.sh";
  ChildProcess worker(absl::StrCat("exec ", TAILORKV_WORKER_BINARY, " --model ", kModelFile,
                                   " --backend cpu --threads 2 --listen 127.0.0.1:0 --max-context 2048",
                                   " --max-running 4 --max-queue 32 --stream-stall-ms 1500"));
  ASSERT_TRUE(worker.WaitFor("ready on", 0, 120)) << worker.output();
  std::smatch m;
  const std::string log = worker.output();
  ASSERT_TRUE(std::regex_search(log, m, std::regex("ready on 127\\.0\\.0\\.1:([0-9]+)"))) << log;
  const std::string out = (std::filesystem::temp_directory_path() / absl::StrCat("load-", getpid(), ".json")).string();
  ChildProcess load(absl::StrCat("exec ", TAILORKV_LOAD_TEST_BINARY, " --server 127.0.0.1:", m[1].str(),
                                 " --clients 12 --max-tokens 12 --min-words 4 --max-words 300 --stalled 1",
                                 " --deadline-s 240 --out ", out));
  const int code = load.Wait();
  EXPECT_EQ(code, 0) << load.output() << worker.output();
  std::ifstream in(out);
  ASSERT_TRUE(in.good()) << load.output();
  const nlohmann::json j = nlohmann::json::parse(in);
  std::filesystem::remove(out);
  ASSERT_EQ(j["phases"].size(), 3u);
  for (const auto& p : j["phases"]) {
    EXPECT_EQ(p["requests_failed"].get<int>(), 0) << p.dump();
    EXPECT_EQ(p["requests_completed"].get<int>(), p["clients"].get<int>()) << p.dump();
    EXPECT_GT(p["generated_tokens"].get<int64_t>(), 0) << p.dump();
  }
}

}  // namespace
