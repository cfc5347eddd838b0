// kv-host and the gpu-worker as separate processes (real binaries, CPU
// backend, SmolLM2): greedy generations whose sparse layers' host KV lives
// in kv-host's arenas equal those of a worker that keeps it in-process; the
// sessions close with the requests; a worker killed with SIGKILL is freed
// by kv-host within a second; a worker pointed at a missing kv-host exits 1
// saying so.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <regex>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/test_child_process.h"

namespace {

using tailorkv::common::testing::ChildProcess;
using tailorkv::common::testing::kSanitizerSlowdown;

// The binaries and model are those of this build tree unless the environment
// names others (TKV_BIN_DIR, TAILORKV_MODEL_DIR: the GPU machine's bundle).
std::string FromEnv(const char* var, const std::string& leaf, const std::string& built) {
  const char* dir = std::getenv(var);
  return dir != nullptr && *dir != '\0' ? absl::StrCat(dir, "/", leaf) : built;
}
const std::string kModelFile = FromEnv("TAILORKV_MODEL_DIR", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                       TAILORKV_MODEL_DIR "/SmolLM2-135M-Instruct.Q4_1.gguf");
const std::string kWorkerBinary = FromEnv("TKV_BIN_DIR", "gpu-worker", TAILORKV_WORKER_BINARY);
const std::string kKvHostBinary = FromEnv("TKV_BIN_DIR", "kv-host", TAILORKV_KV_HOST_BINARY);
const std::string kCliBinary = FromEnv("TKV_BIN_DIR", "tailorkv-cli", TAILORKV_CLI_BINARY);
// Sparse layers that select (Top-128 of prompts longer than 8 + 56 + 128).
constexpr char kPlan[] = "hybrid:2:128:8:56:32:gpu:late:i8";

struct ShellRun {
  int code = -1;
  std::string out;
};

ShellRun Shell(const std::string& command) {
  ShellRun r;
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int st = pclose(p);
  if (WIFEXITED(st)) r.code = WEXITSTATUS(st);
  return r;
}

std::string Port(const std::string& log) {
  std::smatch m;
  static const std::regex re("ready on 127\\.0\\.0\\.1:([0-9]+)");
  return std::regex_search(log, m, re) ? m[1].str() : "";
}

// Open descriptors of a process (arenas' memfds, sockets).
int OpenFds(pid_t pid) {
  std::error_code ec;
  int n = 0;
  for (std::filesystem::directory_iterator it(absl::StrCat("/proc/", pid, "/fd"), ec), end; !ec && it != end;
       it.increment(ec)) {
    ++n;
  }
  return n;
}

std::string Cli(const std::string& args) { return absl::StrCat(kCliBinary, " ", args); }

// A fact hidden in ~700 tokens of prose, completed raw.
std::string FactPrompt() {
  std::string p;
  for (int i = 0; i < 24; ++i) {
    absl::StrAppend(&p, "The river bent past the old mill, and the town grew quiet as evening came. ");
    if (i == 9) absl::StrAppend(&p, "The code for the blue door is 4817. ");
  }
  return p + "Question: what is the code for the blue door? Answer: The code for the blue door is";
}

class KvHostProcessesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(std::filesystem::exists(kModelFile)) << kModelFile << " is missing: scripts/fetch_model.sh";
    dir_ = std::filesystem::temp_directory_path() / absl::StrCat("kvh-proc-", getpid());
    std::filesystem::create_directories(dir_);
    sock_ = (dir_ / "kv-host.sock").string();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  // TKV_TEST_BACKEND=cuda runs the same checks with the CUDA backend (the
  // GPU machine); CI runs cpu. Two workers may share the GPU: each takes a
  // fifth of its free memory for KV (the default, 0.9, would leave the
  // second one almost nothing; the CPU backend ignores the flag).
  std::string Worker(const std::string& kv_host) const {
    const char* backend = std::getenv("TKV_TEST_BACKEND");
    return absl::StrCat("exec ", kWorkerBinary, " --model ", kModelFile, " --backend ",
                        backend != nullptr ? backend : "cpu",
                        " --threads 1 --listen 127.0.0.1:0 --max-context 2048 --kv-memory-fraction 0.2 --kv-plan ",
                        kPlan, " --kv-host ", kv_host);
  }
  std::filesystem::path dir_;
  std::string sock_;
};

TEST_F(KvHostProcessesTest, GenerationsThroughKvHostEqualInProcessAndKilledWorkersAreFreed) {
  ChildProcess kvh(absl::StrCat("exec ", kKvHostBinary, " --listen unix:", sock_, " --budget 1G"));
  ASSERT_TRUE(kvh.WaitFor("ready on", 0, 30)) << kvh.output();
  const int idle_fds = OpenFds(kvh.pid());
  ASSERT_GT(idle_fds, 3);
  ChildProcess remote(Worker("unix://" + sock_));
  ChildProcess local(Worker("in-process"));
  ASSERT_TRUE(remote.WaitFor("ready on", 0, 120)) << remote.output();
  ASSERT_TRUE(local.WaitFor("ready on", 0, 120)) << local.output();
  EXPECT_NE(remote.output().find("attached to kv-host at unix://" + sock_), std::string::npos) << remote.output();
  const std::string rport = Port(remote.output()), lport = Port(local.output());
  ASSERT_FALSE(rport.empty() || lport.empty()) << remote.output() << local.output();

  const std::string prompts[] = {FactPrompt(), "Write one sentence about the sea."};
  for (const std::string& prompt : prompts) {
    const std::string flags = absl::StrCat(" --max-tokens 24 --temperature 0 --prompt '", prompt, "'");
    const bool raw = prompt.size() > 200;
    const ShellRun a = Shell(Cli(absl::StrCat("generate --server 127.0.0.1:", rport, raw ? " --raw" : "", flags)));
    const ShellRun b = Shell(Cli(absl::StrCat("generate --server 127.0.0.1:", lport, raw ? " --raw" : "", flags)));
    ASSERT_EQ(a.code, 0) << a.out;
    ASSERT_EQ(b.code, 0) << b.out;
    // Text and token counts; the timing fields differ.
    const auto text = [](const std::string& s) { return s.substr(0, s.find("[finish=")); };
    const auto usage = [](const std::string& s) {
      std::smatch m;
      static const std::regex re("prompt_tokens=([0-9]+) completion_tokens=([0-9]+)");
      return std::regex_search(s, m, re) ? m[0].str() : "";
    };
    EXPECT_EQ(text(a.out), text(b.out));
    EXPECT_EQ(usage(a.out), usage(b.out));
    EXPECT_FALSE(usage(a.out).empty()) << a.out;
    if (raw) {
      EXPECT_NE(a.out.find("4817"), std::string::npos) << a.out;
    }
  }
  // The requests' sessions are closed; the worker and its warm arena remain.
  ShellRun st = Shell(Cli("kv-host stats --server unix://" + sock_));
  ASSERT_EQ(st.code, 0) << st.out;
  EXPECT_NE(st.out.find("1 workers attached"), std::string::npos) << st.out;
  EXPECT_NE(st.out.find("0 sessions"), std::string::npos) << st.out;
  EXPECT_GE(OpenFds(kvh.pid()), idle_fds + 2);  // at least its warm arena's memfd and its fd channel

  // SIGKILL the worker: kv-host frees what it held within a second.
  remote.Signal(SIGKILL);
  remote.Wait();
  const auto t0 = std::chrono::steady_clock::now();
  bool freed = false;
  while (!freed && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(3)) {
    st = Shell(Cli("kv-host stats --server unix://" + sock_));
    freed = st.out.find("used:     0 B in 0 arenas, 0 workers attached") != std::string::npos;
    if (!freed) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(freed) << st.out;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1) + std::chrono::milliseconds(500)) << st.out;
  EXPECT_TRUE(kvh.WaitFor("detached (receive: peer closed)", 0, 5)) << kvh.output();
  // No descriptor outlives the worker: its arenas' memfds, its fd channel
  // and its gRPC connection are closed (the CLI's connections close too).
  int fds = OpenFds(kvh.pid());
  for (int i = 0; i < 100 && fds != idle_fds; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    fds = OpenFds(kvh.pid());
  }
  EXPECT_EQ(fds, idle_fds);
  kvh.Signal(SIGTERM);
  EXPECT_EQ(kvh.Wait(), 0) << kvh.output();
}

// kv-host killed (SIGKILL) in the middle of a generation: the worker keeps
// the arenas it mapped, so the request finishes with the same tokens as an
// uninterrupted run; a new request that needs the host tier waits up to
// --kv-host-timeout-ms for kv-host, then ends UNAVAILABLE saying why; once
// kv-host is restarted, the worker attaches again, hands over its arenas and
// serves.
TEST_F(KvHostProcessesTest, KvHostKilledMidGenerationLosesNoTokens) {
  auto kvh = std::make_unique<ChildProcess>(
      absl::StrCat("exec ", kKvHostBinary, " --listen unix:", sock_, " --budget 1G"));
  ASSERT_TRUE(kvh->WaitFor("ready on", 0, 30)) << kvh->output();
  ChildProcess remote(Worker("unix://" + sock_) + " --kv-host-timeout-ms 1500");
  ChildProcess local(Worker("in-process"));
  ASSERT_TRUE(remote.WaitFor("ready on", 0, 120)) << remote.output();
  ASSERT_TRUE(local.WaitFor("ready on", 0, 120)) << local.output();
  const std::string rport = Port(remote.output()), lport = Port(local.output());
  const std::string flags = absl::StrCat(" --raw --max-tokens 160 --temperature 0 --stop '\x01' --prompt '",
                                         FactPrompt(), "'");
  const ShellRun want = Shell(Cli(absl::StrCat("generate --server 127.0.0.1:", lport, flags)));
  ASSERT_EQ(want.code, 0) << want.out;
  ChildProcess gen(Cli(absl::StrCat("generate --server 127.0.0.1:", rport, flags)));
  // Once the first tokens stream, kv-host dies.
  ASSERT_TRUE(gen.WaitFor(" 4817", 0, 60)) << gen.output();
  ASSERT_EQ(gen.output().find("[finish="), std::string::npos) << "finished before kv-host died: " << gen.output();
  const std::string health = Cli(absl::StrCat("health --server 127.0.0.1:", rport, " --service tailorkv.v1.Generation"));
  ASSERT_EQ(Shell(health).code, 0);
  kvh->Signal(SIGKILL);
  kvh->Wait();
  // The worker notices within a second: its Generation health goes NOT_SERVING (exit 3).
  const auto killed = std::chrono::steady_clock::now();
  int code = 0;
  while (code != 3 && std::chrono::steady_clock::now() - killed < std::chrono::seconds(3 * kSanitizerSlowdown)) {
    code = Shell(health).code;
  }
  EXPECT_EQ(code, 3);
  EXPECT_LT(std::chrono::steady_clock::now() - killed, std::chrono::seconds(1 * kSanitizerSlowdown));
  EXPECT_EQ(gen.Wait(), 0) << gen.output();
  const auto text = [](const std::string& s) { return s.substr(0, s.find("[finish=")); };
  EXPECT_EQ(text(gen.output()), text(want.out));
  EXPECT_TRUE(remote.WaitFor("kv-host fd channel closed", 0, 5)) << remote.output();
  const ShellRun after = Shell(Cli(absl::StrCat("generate --server 127.0.0.1:", rport, flags)));
  EXPECT_NE(after.code, 0) << after.out;
  EXPECT_NE(after.out.find("UNAVAILABLE"), std::string::npos) << after.out;
  EXPECT_NE(after.out.find("kv-host not back within 1.5s"), std::string::npos) << after.out;
  // The supervisor restarts kv-host: the worker re-attaches by itself
  // (handing over its live arenas), is SERVING again before any request,
  // and generates the same text.
  kvh = std::make_unique<ChildProcess>(
      absl::StrCat("exec ", kKvHostBinary, " --listen unix:", sock_, " --budget 1G"));
  ASSERT_TRUE(kvh->WaitFor("ready on", 0, 30)) << kvh->output();
  EXPECT_EQ(Shell(health + " --wait-seconds 5").code, 0) << remote.output();
  EXPECT_TRUE(kvh->WaitFor("adopted", 0, 5)) << kvh->output();
  EXPECT_TRUE(remote.WaitFor("kv-host is back: health of tailorkv.v1.Generation SERVING", 0, 5)) << remote.output();
  const ShellRun back = Shell(Cli(absl::StrCat("generate --server 127.0.0.1:", rport, flags)));
  ASSERT_EQ(back.code, 0) << back.out << remote.output();
  EXPECT_EQ(text(back.out), text(want.out));
  EXPECT_TRUE(kvh->WaitFor("adopted", 0, 5)) << kvh->output();
  const ShellRun st = Shell(Cli("kv-host stats --server unix://" + sock_));
  EXPECT_NE(st.out.find("1 workers attached"), std::string::npos) << st.out;
  EXPECT_NE(st.out.find("0 sessions"), std::string::npos) << st.out;
}

// A worker whose plan has no sparse layers needs no host tier: it keeps
// serving, and stays SERVING, while kv-host is away.
TEST_F(KvHostProcessesTest, QuantOnlyPlanKeepsServingWithoutKvHost) {
  auto kvh = std::make_unique<ChildProcess>(
      absl::StrCat("exec ", kKvHostBinary, " --listen unix:", sock_, " --budget 1G"));
  ASSERT_TRUE(kvh->WaitFor("ready on", 0, 30)) << kvh->output();
  std::string cmd = Worker("unix://" + sock_);
  cmd.replace(cmd.find(kPlan), std::string(kPlan).size(), "quant:2");
  ChildProcess w(cmd + " --kv-host-timeout-ms 500");
  ASSERT_TRUE(w.WaitFor("ready on", 0, 120)) << w.output();
  const std::string port = Port(w.output());
  const std::string gen =
      Cli(absl::StrCat("generate --server 127.0.0.1:", port, " --max-tokens 12 --temperature 0 --prompt 'Hi'"));
  const ShellRun before = Shell(gen);
  ASSERT_EQ(before.code, 0) << before.out;
  kvh->Signal(SIGKILL);
  kvh->Wait();
  ASSERT_TRUE(w.WaitFor("kv-host fd channel closed", 0, 5)) << w.output();
  const ShellRun after = Shell(gen);
  EXPECT_EQ(after.code, 0) << after.out;
  const auto text = [](const std::string& s) { return s.substr(0, s.find("[finish=")); };
  EXPECT_EQ(text(after.out), text(before.out));
  EXPECT_EQ(Shell(Cli(absl::StrCat("health --server 127.0.0.1:", port, " --service tailorkv.v1.Generation"))).code, 0);
  EXPECT_EQ(w.output().find("NOT_SERVING"), std::string::npos) << w.output();
}

// kv-host's budget fits one worker's arena: a second worker's request ends
// RESOURCE_EXHAUSTED naming the budget, while the first one's generation
// runs on untouched (same tokens as before); once that session closes and
// its arena is retired (--warm-bytes 0), the second worker is served.
TEST_F(KvHostProcessesTest, ExhaustedBudgetRefusesCleanlyAndSparesOthers) {
  ChildProcess kvh(absl::StrCat("exec ", kKvHostBinary, " --listen unix:", sock_,
                                " --budget 40M --arena-bytes 24M --warm-bytes 0"));
  ASSERT_TRUE(kvh.WaitFor("ready on", 0, 30)) << kvh.output();
  ChildProcess a(Worker("unix://" + sock_));
  ChildProcess b(Worker("unix://" + sock_));
  ASSERT_TRUE(a.WaitFor("ready on", 0, 120)) << a.output();
  ASSERT_TRUE(b.WaitFor("ready on", 0, 120)) << b.output();
  const std::string aport = Port(a.output()), bport = Port(b.output());
  const std::string flags = absl::StrCat(" --raw --max-tokens 120 --temperature 0 --stop '\x01' --prompt '",
                                         FactPrompt(), "'");
  const ShellRun want = Shell(Cli(absl::StrCat("generate --server 127.0.0.1:", aport, flags)));
  ASSERT_EQ(want.code, 0) << want.out;
  ChildProcess running(Cli(absl::StrCat("generate --server 127.0.0.1:", aport, flags)));
  ASSERT_TRUE(running.WaitFor(" 4817", 0, 60)) << running.output();
  const ShellRun refused = Shell(Cli(absl::StrCat("generate --server 127.0.0.1:", bport, flags)));
  EXPECT_EQ(refused.code, 1) << refused.out;
  EXPECT_NE(refused.out.find("RESOURCE_EXHAUSTED"), std::string::npos) << refused.out;
  EXPECT_NE(refused.out.find("budget"), std::string::npos) << refused.out;
  ASSERT_EQ(running.output().find("[finish="), std::string::npos) << "finished too early: " << running.output();
  EXPECT_EQ(running.Wait(), 0) << running.output();
  const auto text = [](const std::string& s) { return s.substr(0, s.find("[finish=")); };
  EXPECT_EQ(text(running.output()), text(want.out));
  const ShellRun served = Shell(Cli(absl::StrCat("generate --server 127.0.0.1:", bport, flags)));
  EXPECT_EQ(served.code, 0) << served.out;
  EXPECT_EQ(text(served.out), text(want.out));
}

TEST_F(KvHostProcessesTest, MissingKvHostIsAClearStartupError) {
  ChildProcess w(Worker("unix://" + sock_) + " --kv-host-timeout-ms 600");
  EXPECT_EQ(w.Wait(), 1) << w.output();
  EXPECT_NE(w.output().find("cannot attach to kv-host at unix://" + sock_), std::string::npos) << w.output();
}

}  // namespace
