// The gpu-worker binary refuses a bad --kv-plan at startup: non-zero exit
// and the parser's message, no crash.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <string>

namespace {

constexpr char kModelFile[] = TAILORKV_MODEL_DIR "/SmolLM2-135M-Instruct.Q4_1.gguf";

struct Exit {
  int code = -1;  // exit status, or -1 when killed by a signal
  std::string output;
};

Exit RunWorker(const std::string& args) {
  const std::string command = std::string(TAILORKV_WORKER_BINARY) + " --model " + kModelFile +
                              " --backend cpu --threads 2 --listen 127.0.0.1:0 " + args + " 2>&1";
  Exit result;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) result.output.append(buf.data(), n);
  const int status = pclose(pipe);
  if (WIFEXITED(status)) result.code = WEXITSTATUS(status);
  return result;
}

TEST(WorkerMainTest, BadKvPlanExitsNonZeroWithTheMessage) {
  ASSERT_TRUE(std::filesystem::exists(kModelFile)) << kModelFile << " is missing";
  struct Case {
    std::string flag;
    int code;
    std::string message;
  };
  const Case cases[] = {
      {"--kv-plan quant:3", 1,
       "kv plan spec \"quant:3\": layers[0].bits: must be 1, 2 or 4, got 3"},
      {"--kv-plan window:4", 1, "kv plan spec \"window:4\": expected window:SINK:RECENT"},
      {"--kv-plan @/nonexistent/plan.json", 1, "kv plan file /nonexistent/plan.json: cannot open"},
      {"--kv-plan ''", 2, "kv-plan: must not be empty"},
  };
  for (const Case& tc : cases) {
    const Exit e = RunWorker(tc.flag);
    EXPECT_EQ(e.code, tc.code) << tc.flag << "\n" << e.output;
    EXPECT_NE(e.output.find(tc.message), std::string::npos) << tc.flag << "\n" << e.output;
  }
}

TEST(WorkerMainTest, HelpDocumentsKvPlan) {
  const Exit e = RunWorker("--help");
  EXPECT_EQ(e.code, 0) << e.output;
  EXPECT_NE(e.output.find("--kv-plan"), std::string::npos) << e.output;
  EXPECT_NE(e.output.find("tailorkv:BITS[:LAYERS]"), std::string::npos) << e.output;
}

}  // namespace
