// The gpu-worker binary refuses a bad --kv-plan at startup: non-zero exit
// and the parser's message, no crash. Plans for another model and a
// profiler that gives no plan (without a usable cache) exit 2; with the
// cache it serves, and SIGHUP keeps the plan when the profiler still fails.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/sha256.h"
#include "common/test_child_process.h"

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

struct Case {
  std::string flag;
  int code;
  std::string message;
};

TEST(WorkerMainTest, BadKvPlanExitsNonZeroWithTheMessage) {
  ASSERT_TRUE(std::filesystem::exists(kModelFile)) << kModelFile << " is missing";
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

// The scheduler's flags: out of range is a configuration error (exit 2)
// naming the flag, before the model loads.
TEST(WorkerMainTest, BadSchedulerFlagsExit2NamingTheFlag) {
  const Case cases[] = {
      {"--max-running 0", 2, "max-running: must be >= 1, got 0"},
      {"--kv-budget-mib -1", 2, "kv-budget-mib: must be >= 0 (0 = no limit), got -1"},
      {"--stream-stall-ms 0", 2, "stream-stall-ms: must be > 0, got 0"},
      {"--kv-memory-fraction 0", 2, "kv-memory-fraction: must be in (0, 1], got 0"},
      {"--kv-memory-fraction 1.5", 2, "kv-memory-fraction: must be in (0, 1], got 1.5"},
      {"--prefill-chunk -5", 2, "prefill-chunk: must be >= 0, got -5"},
      {"--cuda-weights int3", 2, "cuda-weights: must be bf16 or quantized, got 'int3'"},
      {"--cuda-weights quantized --weights float", 2, "cuda-weights: quantized needs --weights quantized"},
  };
  for (const Case& tc : cases) {
    const Exit e = RunWorker(tc.flag);
    EXPECT_EQ(e.code, tc.code) << tc.flag << "\n" << e.output;
    EXPECT_NE(e.output.find(tc.message), std::string::npos) << tc.flag << "\n" << e.output;
    EXPECT_EQ(e.output.find("loading model"), std::string::npos) << tc.flag << "\n" << e.output;
  }
}

TEST(WorkerMainTest, HelpDocumentsKvPlan) {
  const Exit e = RunWorker("--help");
  EXPECT_EQ(e.code, 0) << e.output;
  for (const char* text : {"--kv-plan", "tailorkv:BITS[:LAYERS]", "--profiler ",
                           "--profiler-timeout-ms", "--plan-cache", "SIGHUP"}) {
    EXPECT_NE(e.output.find(text), std::string::npos) << text << "\n" << e.output;
  }
}

// A version-1 plan for SmolLM2-135M's shape: layer 0 `policy0`, the rest
// dense, naming `digest` (none when empty).
std::string PlanJson(const std::string& digest, const std::string& policy0) {
  std::string layers = absl::StrCat("{\"layer\": 0, \"policy\": \"", policy0, "\"}");
  for (int l = 1; l < 30; ++l) absl::StrAppend(&layers, ", {\"layer\": ", l, ", \"policy\": \"dense\"}");
  const std::string digest_field = digest.empty() ? "" : absl::StrCat(", \"digest\": \"", digest, "\"");
  return absl::StrCat(R"({"format": "tailorkv.kv_plan", "version": 1, "name": "handmade",
      "model": {"n_layers": 30, "n_kv_heads": 3, "head_dim": 64)", digest_field, "}, \"layers\": [",
                      layers, "]}");
}

std::string TempPath(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          absl::StrCat("worker_main_test_", ::getpid(), "_", name))
      .string();
}

// A port on 127.0.0.1 that nothing listens on, for "the profiler is down".
constexpr char kDeadProfiler[] = "127.0.0.1:1";

TEST(WorkerMainTest, PlansForAnotherModelAndMissingProfilerPlansExit2) {
  ASSERT_TRUE(std::filesystem::exists(kModelFile)) << kModelFile << " is missing";
  const std::string other = tailorkv::common::Sha256Tag("another model");
  const std::string foreign = TempPath("foreign.json");
  std::ofstream(foreign) << PlanJson(other, "quant");
  Exit e = RunWorker("--kv-plan @" + foreign);
  EXPECT_EQ(e.code, 2) << e.output;
  EXPECT_NE(e.output.find("FAILED_PRECONDITION: kv plan \"handmade\" was made for model " +
                          other + ", this model is sha256:"),
            std::string::npos)
      << e.output;
  std::filesystem::remove(foreign);

  e = RunWorker(absl::StrCat("--kv-plan profiler --profiler ", kDeadProfiler,
                             " --profiler-timeout-ms 2000 --plan-cache ", TempPath("absent.json")));
  EXPECT_EQ(e.code, 2) << e.output;
  EXPECT_NE(e.output.find(absl::StrCat("no usable kv plan: UNAVAILABLE: profiler ", kDeadProfiler,
                                       ": GetPlan: ")),
            std::string::npos)
      << e.output;
  EXPECT_NE(e.output.find(absl::StrCat("; plan cache ", TempPath("absent.json"),
                                       " not used: cannot open it")),
            std::string::npos)
      << e.output;

  const Case flag_cases[] = {
      {"--kv-plan profiler", 2, "profiler: required with --kv-plan profiler"},
      {"--profiler 127.0.0.1:5", 2, "profiler: used only with --kv-plan profiler"},
      {"--kv-plan dense --plan-cache /tmp/x.json", 2, "plan-cache: used only with --kv-plan profiler"},
  };
  for (const Case& tc : flag_cases) {
    e = RunWorker(tc.flag);
    EXPECT_EQ(e.code, tc.code) << tc.flag << "\n" << e.output;
    EXPECT_NE(e.output.find(tc.message), std::string::npos) << tc.flag << "\n" << e.output;
  }
}

// The worker as a child process whose output is read as it comes.
class Child : public tailorkv::common::testing::ChildProcess {
 public:
  explicit Child(const std::string& args)
      : ChildProcess(absl::StrCat("exec ", TAILORKV_WORKER_BINARY, " --model ", kModelFile,
                                  " --backend cpu --threads 2 --listen 127.0.0.1:0 ", args)) {}
};

TEST(WorkerMainTest, ServesTheCachedPlanWhenTheProfilerIsDownAndKeepsItOnSighup) {
  ASSERT_TRUE(std::filesystem::exists(kModelFile)) << kModelFile << " is missing";
  const auto digest = tailorkv::common::Sha256File(kModelFile);
  ASSERT_TRUE(digest.ok()) << digest.status();
  const std::string cache = TempPath("cache.json");
  std::ofstream(cache) << PlanJson(*digest, "quant");
  Child worker(absl::StrCat("--kv-plan profiler --profiler ", kDeadProfiler,
                            " --profiler-timeout-ms 2000 --plan-cache ", cache));
  ASSERT_TRUE(worker.WaitFor("ready on")) << worker.output();
  EXPECT_NE(worker.output().find("using the last good plan, cached in " + cache +
                                 ": 'handmade' (quant(1b g64 r128) x1, dense x29)"),
            std::string::npos)
      << worker.output();
  EXPECT_NE(worker.output().find("digest " + *digest), std::string::npos) << worker.output();
  const size_t before_hup = worker.output().size();
  worker.Signal(SIGHUP);
  ASSERT_TRUE(worker.WaitFor("kv plan reload failed, the current plan stays: UNAVAILABLE",
                             before_hup))
      << worker.output();
  worker.Signal(SIGTERM);
  EXPECT_EQ(worker.Wait(), 0) << worker.output();
  EXPECT_NE(worker.output().find("gpu-worker stopped"), std::string::npos) << worker.output();
  std::filesystem::remove(cache);
}

}  // namespace
