// The profiler as a real process: SIGKILL in the middle of a profile leaves
// no plan and no temporary file behind; a restarted profiler on the same
// directory serves, profiles, stores, and drains on SIGTERM.
#include <gtest/gtest.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <unistd.h>

#include <filesystem>
#include <regex>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/test_child_process.h"
#include "profiler/test_support.h"
#include "tailorkv/v1/profiler.grpc.pb.h"

namespace tailorkv::profiler {
namespace {

using common::testing::ChildProcess;
namespace fs = std::filesystem;

class Profiler : public ChildProcess {
 public:
  explicit Profiler(const std::string& plans)
      : ChildProcess(absl::StrCat("exec ", TAILORKV_PROFILER_BINARY, " --models-dir ",
                                  testing::ModelDir(), " --plans-dir ", plans,
                                  " --backend cpu --threads 2 --listen 127.0.0.1:0")) {}
  // The bound address from the "ready on host:port" line; "" when it never came.
  std::string Address() {
    if (!WaitFor("ready on ", 0, 60) || !WaitFor("\n", output().find("ready on "), 5)) return "";
    std::smatch m;
    const std::string& out = output();
    return std::regex_search(out, m, std::regex("ready on (127\\.0\\.0\\.1:[0-9]+)")) ? m[1].str()
                                                                                    : "";
  }
};

v1::ProfileRequest Request(int tokens) {
  v1::ProfileRequest r;
  r.set_model(testing::kModel);
  r.set_calibration_text(testing::Prose(30000));
  r.set_max_calibration_tokens(tokens);
  // A budget that a short calibration can measure (the default is 1,024 tokens).
  r.mutable_settings()->set_sink(8);
  r.mutable_settings()->set_recent(56);
  r.mutable_settings()->set_top_k(64);
  return r;
}

// Plan files in `dir` (the lock file and nothing else may remain).
std::vector<std::string> Files(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename() != ".lock") out.push_back(e.path().filename().string());
  }
  return out;
}

TEST(ProfilerProcess, KillMidProfileLeavesNothingAndARestartServes) {
  if (!fs::exists(testing::ModelDir() + "/" + testing::kModel)) {
    GTEST_SKIP() << "the model is missing (scripts/fetch_model.sh)";
  }
  const std::string plans =
      (fs::path(::testing::TempDir()) / absl::StrCat("profiler_main_test_", ::getpid())).string();
  fs::remove_all(plans);
  {
    Profiler p(plans);
    const std::string addr = p.Address();
    ASSERT_FALSE(addr.empty()) << p.output();
    auto stub = v1::Profiler::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    auto reader = stub->Profile(&ctx, Request(2048));
    v1::ProfileProgress msg;
    bool in_layers = false;
    while (!in_layers && reader->Read(&msg)) in_layers = msg.stage() == "layers";
    ASSERT_TRUE(in_layers) << "no layer progress before the end";
    p.Signal(SIGKILL);
    while (reader->Read(&msg)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(p.Wait(), -1);
  }
  EXPECT_TRUE(Files(plans).empty()) << "left behind: " << Files(plans).front();

  Profiler p(plans);
  const std::string addr = p.Address();
  ASSERT_FALSE(addr.empty()) << p.output();
  auto stub = v1::Profiler::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  {
    v1::ListPlansResponse list;
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->ListPlans(&ctx, {}, &list).ok());
    EXPECT_EQ(list.plans_size(), 0);
  }
  {
    grpc::ClientContext ctx;
    auto reader = stub->Profile(&ctx, Request(400));
    v1::ProfileProgress msg, last;
    while (reader->Read(&msg)) last = msg;
    const grpc::Status st = reader->Finish();
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(last.plan().n_layers(), 30);
  }
  const auto files = Files(plans);
  EXPECT_EQ(files.size(), 3u);  // <id>.json, <id>.png, <id>.meta.json
  p.Signal(SIGTERM);
  EXPECT_EQ(p.Wait(), 0) << p.output();
  fs::remove_all(plans);
}

}  // namespace
}  // namespace tailorkv::profiler
