// Integration: the real GenerationService over a real Engine (SmolLM2-135M,
// CPU backend) behind a real gRPC server on an ephemeral loopback port.
#include "server/generation_service.h"

#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "common/grpc_server.h"
#include "common/health_client.h"
#include "common/test_child_process.h"
#include "common/utf8.h"

namespace tailorkv::worker {
namespace {

constexpr char kModelFile[] = TAILORKV_MODEL_DIR "/SmolLM2-135M-Instruct.Q4_1.gguf";
constexpr int kMaxContext = 256;  // small, so "longer than the context" prompts stay small

struct StreamResult {
  grpc::Status status;
  std::vector<v1::GenerateChunk> chunks;
  std::vector<v1::GenerateFinal> finals;
  bool final_was_last = true;
};

class GenerationServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(std::filesystem::exists(kModelFile))
        << kModelFile << " is missing: run scripts/fetch_model.sh";
    runtime::EngineOptions engine_options;
    engine_options.model_path = kModelFile;
    engine_options.backend = "cpu";
    engine_options.threads = 2;
    engine_options.max_context = kMaxContext;
    // The scheduler sees a cancelled or expired call between prefill chunks:
    // with the CPU backend's default (1,024) a prompt of this context is one
    // forward, and under TSan DeadlineEndsTheCallWithDeadlineExceeded's
    // 200-token prefill ran 87 s past the deadline. 32 keeps the wait after a
    // cancel to one short forward (ExpectIdleSoon), whatever the build.
    engine_options.prefill_chunk = 32;
    auto engine = runtime::Engine::Create(engine_options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);

    GenerationServiceOptions options;
    options.max_queue = 1;
    options.max_running = 1;  // the queue tests below want one running, one queued
    options.model_path = kModelFile;
    service_ = std::make_unique<GenerationService>(*engine_, options);
    common::ServerOptions server_options;
    server_options.listen_address = "127.0.0.1:0";
    server_options.drain_grace_ms = 60000;  // generous: CI cores are shared
    auto server = common::GrpcServer::Start(
        server_options, {{v1::Generation::service_full_name(), service_.get()}});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    server_->AddDrainHook([this] { service_->BeginDrain(); });
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
    stub_ = v1::Generation::NewStub(channel_);
  }

  void TearDown() override {
    if (server_) server_->Drain();
  }

  static v1::GenerateRequest TextRequest(const std::string& text, int max_tokens) {
    v1::GenerateRequest request;
    request.set_text(text);
    request.mutable_sampling()->set_max_tokens(max_tokens);
    request.mutable_sampling()->set_temperature(0.0f);
    return request;
  }

  StreamResult RunStream(const v1::GenerateRequest& request,
                         absl::Duration timeout = absl::Seconds(120)) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    auto reader = stub_->Generate(&context, request);
    StreamResult result;
    v1::GenerateResponse response;
    while (reader->Read(&response)) {
      if (!result.finals.empty()) result.final_was_last = false;
      if (response.has_chunk()) result.chunks.push_back(response.chunk());
      if (response.has_final()) result.finals.push_back(response.final());
    }
    result.status = reader->Finish();
    return result;
  }

  // Waits (bounded) until no request runs or waits: the server freed it.
  void ExpectIdleSoon() {
    v1::Load load;
    for (int i = 0; i < 500 * common::testing::kSanitizerSlowdown; ++i) {
      grpc::ClientContext context;
      ASSERT_TRUE(stub_->GetLoad(&context, v1::GetLoadRequest(), &load).ok());
      if (load.active_requests() == 0 && load.queued_requests() == 0) return;
      absl::SleepFor(absl::Milliseconds(20));
    }
    FAIL() << "still busy: active=" << load.active_requests()
           << " queued=" << load.queued_requests();
  }

  std::unique_ptr<runtime::Engine> engine_;
  std::unique_ptr<GenerationService> service_;
  std::unique_ptr<common::GrpcServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Generation::Stub> stub_;
};

TEST_F(GenerationServiceTest, StreamsChunksOfValidUtf8AndCountsTokens) {
  const std::string prompt = "The capital of France is";
  auto expected_prompt = engine_->tokenizer().Encode(
      prompt, engine_->tokenizer().spec().add_bos, /*parse_special=*/false);
  ASSERT_TRUE(expected_prompt.ok()) << expected_prompt.status();

  v1::GenerateRequest request = TextRequest(prompt, 12);
  request.mutable_sampling()->set_seed(7);
  request.set_request_id("stream-1");
  const StreamResult r = RunStream(request);
  ASSERT_TRUE(r.status.ok()) << r.status.error_code() << " " << r.status.error_message();
  ASSERT_EQ(r.finals.size(), 1u);
  EXPECT_TRUE(r.final_was_last);
  EXPECT_GE(r.chunks.size(), 2u) << "expected the text to arrive in several chunks";

  std::string text;
  int streamed_tokens = 0;
  for (const auto& chunk : r.chunks) {
    EXPECT_TRUE(common::IsValidUtf8(chunk.text())) << "chunk splits a character";
    text += chunk.text();
    streamed_tokens += chunk.token_ids_size();
    for (int id : chunk.token_ids()) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, engine_->config().vocab);
    }
  }
  EXPECT_TRUE(common::IsValidUtf8(text));
  EXPECT_FALSE(text.empty());

  const v1::GenerateFinal& final = r.finals[0];
  EXPECT_EQ(final.usage().prompt_tokens(), static_cast<int>(expected_prompt->size()));
  EXPECT_GE(final.usage().completion_tokens(), 1);
  EXPECT_LE(final.usage().completion_tokens(), 12);
  // Every generated token is streamed, the end-of-generation token included.
  EXPECT_EQ(streamed_tokens, final.usage().completion_tokens());
  if (final.finish_reason() == v1::FINISH_REASON_LENGTH) {
    EXPECT_EQ(final.usage().completion_tokens(), 12);
  } else {
    EXPECT_EQ(final.finish_reason(), v1::FINISH_REASON_STOP);
  }
  EXPECT_GT(final.timings().prefill_ms(), 0.0);

  // Greedy decoding is deterministic: the same request gives the same text.
  const StreamResult again = RunStream(request);
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  std::string text_again;
  for (const auto& chunk : again.chunks) text_again += chunk.text();
  EXPECT_EQ(text_again, text);
}

TEST_F(GenerationServiceTest, ChatPromptUsesTheTemplate) {
  v1::GenerateRequest request;
  auto* message = request.mutable_chat()->add_messages();
  message->set_role(v1::ROLE_USER);
  message->set_content("Say hello.");
  request.mutable_sampling()->set_max_tokens(6);
  const StreamResult r = RunStream(request);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_EQ(r.finals.size(), 1u);
  // The rendered template adds role markers around the 3-token message.
  EXPECT_GT(r.finals[0].usage().prompt_tokens(), 6);
  EXPECT_GE(r.finals[0].usage().completion_tokens(), 1);
}

struct BadInput {
  std::string name;
  std::function<void(v1::GenerateRequest&)> mutate;
  std::string field;          // must appear in the message
  std::string also_contains;  // the limit, where there is one
};

TEST_F(GenerationServiceTest, RejectsEachBadInputNamingTheField) {
  const int vocab = engine_->config().vocab;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<BadInput> cases = {
      // B2: invalid UTF-8
      {"text bad utf8", [](auto& r) { r.set_text("hi \xC0\x80"); }, "text", "UTF-8"},
      {"chat bad utf8",
       [](auto& r) {
         auto* m = r.mutable_chat()->add_messages();
         m->set_role(v1::ROLE_USER);
         m->set_content("\xED\xA0\x80");
       },
       "chat.messages[0].content", "UTF-8"},
      {"stop bad utf8", [](auto& r) { r.mutable_sampling()->add_stop("\xFF"); },
       "sampling.stop[0]", "UTF-8"},
      // B5: empty prompts and ids outside the vocabulary
      {"no prompt", [](auto& r) { r.clear_text(); }, "prompt", ""},
      {"empty text", [](auto& r) { r.set_text(""); }, "text", "empty"},
      {"empty token ids", [](auto& r) { r.mutable_token_ids(); }, "token_ids", "empty"},
      {"empty chat", [](auto& r) { r.mutable_chat(); }, "chat.messages", "empty"},
      {"chat role unset",
       [](auto& r) { r.mutable_chat()->add_messages()->set_content("hi"); },
       "chat.messages[0].role", ""},
      {"token id = vocab",
       [vocab](auto& r) {
         r.mutable_token_ids()->add_ids(1);
         r.mutable_token_ids()->add_ids(vocab);
       },
       "token_ids.ids[1]", std::to_string(vocab)},
      {"negative token id", [](auto& r) { r.mutable_token_ids()->add_ids(-1); },
       "token_ids.ids[0]", ""},
      // B3: lengths against the context
      {"prompt longer than context",
       [](auto& r) {
         for (int i = 0; i < kMaxContext + 5; ++i) r.mutable_token_ids()->add_ids(42);
       },
       "prompt", std::to_string(kMaxContext)},
      {"max_tokens 0", [](auto& r) { r.mutable_sampling()->set_max_tokens(0); },
       "sampling.max_tokens", ">= 1"},
      {"max_tokens huge", [](auto& r) { r.mutable_sampling()->set_max_tokens(1 << 30); },
       "sampling.max_tokens", std::to_string(kMaxContext)},
      {"prompt + max_tokens > context",
       [](auto& r) {
         for (int i = 0; i < kMaxContext - 10; ++i) r.mutable_token_ids()->add_ids(42);
         r.mutable_sampling()->set_max_tokens(11);
       },
       "sampling.max_tokens", "at most 10"},
      // B4: sampling values
      {"temperature NaN", [nan](auto& r) { r.mutable_sampling()->set_temperature(nan); },
       "sampling.temperature", "NaN"},
      {"temperature negative", [](auto& r) { r.mutable_sampling()->set_temperature(-0.5f); },
       "sampling.temperature", "[0, 100]"},
      {"top_p 0", [](auto& r) { r.mutable_sampling()->set_top_p(0.0f); }, "sampling.top_p",
       "(0, 1]"},
      {"top_p above 1", [](auto& r) { r.mutable_sampling()->set_top_p(1.5f); },
       "sampling.top_p", "(0, 1]"},
      {"top_p NaN", [nan](auto& r) { r.mutable_sampling()->set_top_p(nan); }, "sampling.top_p",
       "NaN"},
      {"top_k above vocab", [vocab](auto& r) { r.mutable_sampling()->set_top_k(vocab + 1); },
       "sampling.top_k", std::to_string(vocab)},
      {"top_k negative", [](auto& r) { r.mutable_sampling()->set_top_k(-1); }, "sampling.top_k",
       ""},
      {"repetition_penalty 0",
       [](auto& r) { r.mutable_sampling()->set_repetition_penalty(0.0f); },
       "sampling.repetition_penalty", "(0, 10]"},
      {"empty stop", [](auto& r) { r.mutable_sampling()->add_stop(""); }, "sampling.stop[0]",
       "empty"},
      {"17 stops",
       [](auto& r) {
         for (int i = 0; i < 17; ++i) r.mutable_sampling()->add_stop("x");
       },
       "sampling.stop", "16"},
      {"10^5 stops",
       [](auto& r) {
         for (int i = 0; i < 100000; ++i) r.mutable_sampling()->add_stop("x");
       },
       "sampling.stop", "16"},
      {"request_id too long", [](auto& r) { r.set_request_id(std::string(129, 'a')); },
       "request_id", "128"},
      {"request_id not printable", [](auto& r) { r.set_request_id("a\nb"); }, "request_id", ""},
  };
  for (const BadInput& c : cases) {
    SCOPED_TRACE(c.name);
    v1::GenerateRequest request = TextRequest("Hello", 4);
    c.mutate(request);
    const StreamResult r = RunStream(request, absl::Seconds(30));
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << r.status.error_message();
    EXPECT_NE(r.status.error_message().find(c.field), std::string::npos)
        << "message '" << r.status.error_message() << "' does not name " << c.field;
    EXPECT_NE(r.status.error_message().find(c.also_contains), std::string::npos)
        << "message '" << r.status.error_message() << "' lacks '" << c.also_contains << "'";
    EXPECT_TRUE(r.chunks.empty());
    EXPECT_TRUE(r.finals.empty());
  }
  ExpectIdleSoon();
}

TEST_F(GenerationServiceTest, ClientCancelMidStreamEndsTheCallAndFreesTheEngine) {
  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, TextRequest("Once upon a time", 16));
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  ASSERT_TRUE(response.has_chunk());
  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  ExpectIdleSoon();
  // The engine is free for the next request.
  const StreamResult next = RunStream(TextRequest("Hi", 2));
  EXPECT_TRUE(next.status.ok()) << next.status.error_message();
}

TEST_F(GenerationServiceTest, DeadlineEndsTheCallWithDeadlineExceeded) {
  v1::GenerateRequest request;
  // A long prompt so the deadline passes during the work, not before it.
  for (int i = 0; i < 200; ++i) request.mutable_token_ids()->add_ids(100 + i);
  request.mutable_sampling()->set_max_tokens(16);
  const StreamResult r = RunStream(request, absl::Milliseconds(100));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED)
      << r.status.error_message();
  EXPECT_TRUE(r.finals.empty());
  ExpectIdleSoon();
}

TEST_F(GenerationServiceTest, FullQueueGivesResourceExhaustedAndQueuedCancelLeaves) {
  // One running, one queued (max_queue = 1), the third is refused.
  grpc::ClientContext running_context;
  auto running = stub_->Generate(&running_context, TextRequest("Count to ten:", 16));
  v1::GenerateResponse response;
  ASSERT_TRUE(running->Read(&response));

  grpc::ClientContext queued_context;
  auto queued = stub_->Generate(&queued_context, TextRequest("Queued", 4));
  v1::Load load;
  for (int i = 0; i < 500 && load.queued_requests() == 0; ++i) {
    grpc::ClientContext c;
    ASSERT_TRUE(stub_->GetLoad(&c, v1::GetLoadRequest(), &load).ok());
    if (load.queued_requests() == 0) absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(load.queued_requests(), 1);
  EXPECT_EQ(load.active_requests(), 1);
  EXPECT_EQ(load.max_queue(), 1);
  EXPECT_EQ(load.max_running(), 1);
  EXPECT_EQ(load.engine_running(), 1);  // the running one is in the engine's scheduler
  EXPECT_EQ(load.engine_waiting(), 0);  // the queued one waits here, not there
  EXPECT_EQ(load.kv_budget_bytes(), 0);
  EXPECT_GT(load.kv_admitted_bytes(), 0);

  const StreamResult refused = RunStream(TextRequest("Refused", 4));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << refused.status.error_message();
  EXPECT_NE(refused.status.error_message().find("max_queue=1"), std::string::npos);

  queued_context.TryCancel();
  while (queued->Read(&response)) {
  }
  EXPECT_EQ(queued->Finish().error_code(), grpc::StatusCode::CANCELLED);
  running_context.TryCancel();
  while (running->Read(&response)) {
  }
  EXPECT_EQ(running->Finish().error_code(), grpc::StatusCode::CANCELLED);
  ExpectIdleSoon();
}

TEST_F(GenerationServiceTest, AbortEndsTheStreamWithCancelledFinishReason) {
  grpc::ClientContext context;
  v1::GenerateRequest request = TextRequest("Tell me a long story", 16);
  request.set_request_id("abort-me");
  auto reader = stub_->Generate(&context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  ASSERT_TRUE(response.has_chunk());

  // Same id while in flight: refused.
  v1::GenerateRequest duplicate = TextRequest("dup", 2);
  duplicate.set_request_id("abort-me");
  EXPECT_EQ(RunStream(duplicate).status.error_code(), grpc::StatusCode::ALREADY_EXISTS);

  grpc::ClientContext abort_context;
  v1::AbortRequest abort;
  abort.set_request_id("abort-me");
  v1::AbortResponse abort_response;
  ASSERT_TRUE(stub_->Abort(&abort_context, abort, &abort_response).ok());

  std::vector<v1::GenerateFinal> finals;
  int completion_streamed = response.chunk().token_ids_size();
  while (reader->Read(&response)) {
    if (response.has_final()) finals.push_back(response.final());
    if (response.has_chunk()) completion_streamed += response.chunk().token_ids_size();
  }
  ASSERT_TRUE(reader->Finish().ok());
  ASSERT_EQ(finals.size(), 1u);
  EXPECT_EQ(finals[0].finish_reason(), v1::FINISH_REASON_CANCELLED);
  EXPECT_LT(finals[0].usage().completion_tokens(), 16);

  grpc::ClientContext unknown_context;
  abort.set_request_id("no-such-request");
  EXPECT_EQ(stub_->Abort(&unknown_context, abort, &abort_response).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(GenerationServiceTest, HealthIsServingAndModelInfoDescribesTheModel) {
  for (const std::string service : {"", "tailorkv.v1.Generation"}) {
    auto status = common::CheckHealth(channel_, service, absl::Seconds(5));
    ASSERT_TRUE(status.ok()) << status.status();
    EXPECT_EQ(*status, grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }
  grpc::ClientContext context;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&context, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.n_layers(), 30);  // SmolLM2-135M
  EXPECT_EQ(info.hidden(), 576);
  EXPECT_EQ(info.vocab_size(), engine_->config().vocab);
  EXPECT_EQ(info.max_context(), kMaxContext);
  EXPECT_EQ(info.backend(), "cpu");
  EXPECT_EQ(info.model_path(), kModelFile);
}

TEST_F(GenerationServiceTest, ModelInfoReportsTheKvPlanAndBytesPerSequence) {
  grpc::ClientContext context;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&context, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.kv_plan().name(), "dense");
  EXPECT_EQ(info.kv_plan().summary(), "dense x30");
  ASSERT_EQ(info.kv_plan().layers_size(), 30);
  for (int i = 0; i < 30; ++i) {
    const v1::KvLayerPolicy& l = info.kv_plan().layers(i);
    EXPECT_EQ(l.layer(), i);
    EXPECT_EQ(l.policy(), "dense");
    EXPECT_EQ(l.bits(), 0);
    EXPECT_LT(l.dense_preference(), 0);
  }
  // SmolLM2-135M: 3 KV heads of 64 dims; the CPU backend keeps fp32.
  const int64_t per_layer = 2LL * 3 * kMaxContext * 64 * 4;
  const v1::KvMemory& kv = info.kv_per_sequence();
  EXPECT_EQ(kv.sequences(), 1);
  EXPECT_EQ(kv.capacity_tokens(), kMaxContext);
  EXPECT_EQ(kv.device_bytes(), 30 * per_layer);
  EXPECT_EQ(kv.host_bytes(), 0);
  ASSERT_EQ(kv.layers_size(), 30);
  for (int i = 0; i < 30; ++i) {
    EXPECT_EQ(kv.layers(i).layer(), i);
    EXPECT_EQ(kv.layers(i).policy(), "dense");
    EXPECT_EQ(kv.layers(i).device_bytes(), per_layer);
  }
  ASSERT_EQ(kv.policies_size(), 1);
  EXPECT_EQ(kv.policies(0).policy(), "dense");
  EXPECT_EQ(kv.policies(0).layers(), 30);
  EXPECT_EQ(kv.policies(0).device_bytes(), 30 * per_layer);
}

TEST_F(GenerationServiceTest, LoadReportsTheKvBytesOfRunningGenerations) {
  // Greedy counting goes on well past the first chunk (no early EOS).
  const std::string prompt = "1, 2, 3, 4, 5, 6, 7,";
  auto prompt_ids = engine_->tokenizer().Encode(prompt, engine_->tokenizer().spec().add_bos,
                                                /*parse_special=*/false);
  ASSERT_TRUE(prompt_ids.ok()) << prompt_ids.status();
  constexpr int kMaxTokens = 40;
  const int64_t capacity = static_cast<int64_t>(prompt_ids->size()) + kMaxTokens;

  v1::GenerateRequest request = TextRequest(prompt, kMaxTokens);
  grpc::ClientContext stream_context;
  auto reader = stub_->Generate(&stream_context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));  // the generation holds its sequence now
  v1::Load load;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->GetLoad(&context, v1::GetLoadRequest(), &load).ok());
  }
  stream_context.TryCancel();
  while (reader->Read(&response)) {
  }
  reader->Finish();

  EXPECT_EQ(load.active_requests(), 1);
  const v1::KvMemory& kv = load.kv_in_use();
  EXPECT_EQ(kv.sequences(), 1);
  EXPECT_EQ(kv.capacity_tokens(), capacity);
  const int64_t per_layer = 2 * 3 * capacity * 64 * 4;
  EXPECT_EQ(kv.device_bytes(), 30 * per_layer);
  ASSERT_EQ(kv.layers_size(), 30);
  EXPECT_EQ(kv.layers(7).device_bytes(), per_layer);
  ASSERT_EQ(kv.policies_size(), 1);
  EXPECT_EQ(kv.policies(0).device_bytes(), 30 * per_layer);

  ExpectIdleSoon();
  grpc::ClientContext context;
  ASSERT_TRUE(stub_->GetLoad(&context, v1::GetLoadRequest(), &load).ok());
  EXPECT_EQ(load.kv_in_use().sequences(), 0);
  EXPECT_EQ(load.kv_in_use().device_bytes(), 0);
  EXPECT_EQ(load.kv_in_use().layers_size(), 30);
}

// A worker whose engine quantizes the first layers reports that plan.
TEST(GenerationServiceKvPlan, ModelInfoReportsAQuantPlan) {
  ASSERT_TRUE(std::filesystem::exists(kModelFile)) << kModelFile << " is missing";
  runtime::EngineOptions engine_options;
  engine_options.model_path = kModelFile;
  engine_options.backend = "cpu";
  engine_options.threads = 2;
  engine_options.max_context = kMaxContext;
  engine_options.kv_plan = "tailorkv:2:3";
  auto engine = runtime::Engine::Create(engine_options);
  if (absl::IsUnimplemented(engine.status())) {
    GTEST_SKIP() << "the CPU backend has no quant policy yet: " << engine.status();
  }
  ASSERT_TRUE(engine.ok()) << engine.status();
  GenerationService service(**engine, GenerationServiceOptions{});
  common::ServerOptions server_options;
  server_options.listen_address = "127.0.0.1:0";
  auto server = common::GrpcServer::Start(server_options,
                                          {{v1::Generation::service_full_name(), &service}});
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Generation::NewStub(
      grpc::CreateChannel((*server)->address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  v1::ModelInfo info;
  ASSERT_TRUE(stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info).ok());
  (*server)->Drain();

  EXPECT_EQ(info.kv_plan().name(), "tailorkv:2:3");
  EXPECT_EQ(info.kv_plan().summary(), "quant(2b g64 r128) x3, dense x27");
  ASSERT_EQ(info.kv_plan().layers_size(), 30);
  EXPECT_EQ(info.kv_plan().layers(2).policy(), "quant");
  EXPECT_EQ(info.kv_plan().layers(2).bits(), 2);
  EXPECT_EQ(info.kv_plan().layers(2).group(), 64);
  EXPECT_EQ(info.kv_plan().layers(2).residual(), 128);
  EXPECT_EQ(info.kv_plan().layers(3).policy(), "dense");

  const v1::KvMemory& kv = info.kv_per_sequence();
  // quant, 3 KV heads, 256 tokens, 2 bits, group 64, residual 128, fp32:
  // words/group 4; K: 4 groups * 64 ch * 4 words + 4*64 params; V: 256 * 1
  // group * 4 words + 256 params -> (1024 + 256 + 1024 + 256) * 4 = 10240
  // bytes per head, plus residual 2 * 128 * 64 * 4 = 65536.
  const int64_t quant_layer = 3 * (10240 + 65536);
  const int64_t dense_layer = 2LL * 3 * kMaxContext * 64 * 4;
  EXPECT_EQ(kv.layers(0).policy(), "quant");
  EXPECT_EQ(kv.layers(0).device_bytes(), quant_layer);
  EXPECT_EQ(kv.layers(3).device_bytes(), dense_layer);
  ASSERT_EQ(kv.policies_size(), 2);
  EXPECT_EQ(kv.policies(0).policy(), "quant");
  EXPECT_EQ(kv.policies(0).layers(), 3);
  EXPECT_EQ(kv.policies(0).device_bytes(), 3 * quant_layer);
  EXPECT_EQ(kv.policies(1).policy(), "dense");
  EXPECT_EQ(kv.policies(1).device_bytes(), 27 * dense_layer);
  EXPECT_EQ(kv.device_bytes(), 3 * quant_layer + 27 * dense_layer);
}

TEST_F(GenerationServiceTest, DrainingRefusesNewRequestsWithUnavailable) {
  service_->BeginDrain();
  const StreamResult r = RunStream(TextRequest("Hello", 2));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
  grpc::ClientContext context;
  v1::Load load;
  ASSERT_TRUE(stub_->GetLoad(&context, v1::GetLoadRequest(), &load).ok());
  EXPECT_TRUE(load.draining());
}

TEST_F(GenerationServiceTest, DrainLetsTheInFlightRequestFinish) {
  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, TextRequest("One, two, three,", 8));
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  ASSERT_TRUE(response.has_chunk());

  std::thread drainer([this] { server_->Drain(); });  // what SIGTERM does in main()
  int finals = 0;
  while (reader->Read(&response)) finals += response.has_final() ? 1 : 0;
  const grpc::Status status = reader->Finish();
  drainer.join();
  EXPECT_TRUE(status.ok()) << status.error_code() << " " << status.error_message();
  EXPECT_EQ(finals, 1);
  // After the drain nothing is accepted.
  const StreamResult after = RunStream(TextRequest("Hello", 2), absl::Seconds(5));
  EXPECT_FALSE(after.status.ok());
}

}  // namespace
}  // namespace tailorkv::worker
