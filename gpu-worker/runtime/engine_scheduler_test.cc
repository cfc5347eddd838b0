// The engine's scheduler on the CPU backend with SmolLM2: generations that
// run together produce what each produces alone (bit-identical logits per
// sequence when Forward calls of several sequences interleave), a short
// prompt's first token does not wait for a long prompt's prefill, a caller
// that stops reading is cut off without holding others back, and the KV
// budget queues what does not fit now and refuses what never fits.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <cstring>
#include <filesystem>
#include <thread>

#include "absl/synchronization/notification.h"
#include "runtime/cpu_backend.h"
#include "runtime/engine.h"

namespace tailorkv::runtime {
namespace {

const char* kModel = TAILORKV_MODEL_DIR "/SmolLM2-135M-Instruct.Q4_1.gguf";

std::unique_ptr<Engine> MakeEngine(EngineOptions o) {
  o.model_path = kModel;
  o.backend = "cpu";
  o.threads = 2;
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

struct Out {
  std::vector<int32_t> ids;
  std::string text;
  absl::StatusOr<GenerationResult> result = absl::UnknownError("not run");
};

Out Generate(Engine& e, const GenerationRequest& r) {
  Out out;
  out.result = e.Generate(r, [&](const StreamChunk& c) {
    out.ids.insert(out.ids.end(), c.token_ids.begin(), c.token_ids.end());
    out.text += c.text;
    return true;
  });
  return out;
}

// A prompt of about `words` words, different per `salt`.
std::vector<int32_t> Prompt(const Engine& e, int words, int salt) {
  static const char* kWords[] = {"river", "stone", "lamp", "harbor", "violet", "engine", "quiet", "market",
                                 "seven", "glass", "winter", "orchard", "copper", "signal", "meadow"};
  std::string text = "Notes:";
  for (int i = 0; i < words; ++i) {
    text += " ";
    text += kWords[(i * 7 + salt * 3 + i / 5) % 15];
  }
  return *e.tokenizer().Encode(text, false, false);
}

// An engine whose KV budget holds one generation of `r` (prompt of `words`
// words, `max_tokens`) and a half: a second one waits for the first.
std::unique_ptr<Engine> EngineForOneAndAHalf(int words, int salt, int max_tokens, GenerationRequest* r) {
  auto probe = MakeEngine({.max_context = 512});
  if (probe == nullptr) return nullptr;
  r->prompt_tokens = Prompt(*probe, words, salt);
  r->max_tokens = max_tokens;
  r->ignore_eos = true;
  int64_t one = 0;
  for (const LayerKvBytes& b : EstimateKvBytes(probe->kv_plan(), probe->config(),
                                               static_cast<int>(r->prompt_tokens.size()) + max_tokens, 4)) {
    one += b.device_bytes;
  }
  return MakeEngine({.max_context = 512, .max_running = 4, .kv_budget_bytes = one + one / 2});
}

class EngineSchedulerTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(std::filesystem::exists(kModel)) << kModel << " is missing: scripts/fetch_model.sh";
  }
};

// Six generations of mixed prompt lengths (1 to 5 prefill chunks of 16),
// greedy and seeded sampling, submitted at once to an engine running four at
// a time: each one's tokens equal its run alone.
TEST_P(EngineSchedulerTest, TogetherEqualsAlone) {
  auto e = MakeEngine({.max_context = 512, .prefill_chunk = 16, .kv_plan = GetParam(), .max_running = 4});
  ASSERT_NE(e, nullptr);
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 6; ++i) {
    GenerationRequest r;
    r.prompt_tokens = Prompt(*e, 6 + 13 * i, i);
    r.max_tokens = 9 + 3 * i;
    r.ignore_eos = true;
    if (i % 2 == 1) r.sampling = {.temperature = 0.9f, .top_p = 0.95f, .seed = static_cast<uint64_t>(1000 + i)};
    reqs.push_back(r);
  }
  std::vector<Out> alone;
  for (const auto& r : reqs) {
    alone.push_back(Generate(*e, r));
    ASSERT_TRUE(alone.back().result.ok()) << alone.back().result.status();
  }
  std::vector<Out> together(reqs.size());
  std::atomic<int> peak_running{0};
  {
    std::vector<std::thread> threads;
    for (size_t i = 0; i < reqs.size(); ++i) {
      threads.emplace_back([&, i] { together[i] = Generate(*e, reqs[i]); });
    }
    // Watch the scheduler while they run.
    for (int k = 0; k < 2000 && peak_running.load() < 4; ++k) {
      peak_running = std::max(peak_running.load(), e->scheduler_load().running);
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
    for (auto& t : threads) t.join();
  }
  EXPECT_GE(peak_running.load(), 2) << "generations never ran together";
  EXPECT_LE(peak_running.load(), 4);
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(together[i].result.ok()) << together[i].result.status();
    EXPECT_EQ(together[i].ids, alone[i].ids) << "request " << i;
    EXPECT_EQ(together[i].text, alone[i].text) << "request " << i;
    EXPECT_EQ(together[i].result->completion_tokens, reqs[i].max_tokens);
  }
  const Engine::SchedulerLoad idle = e->scheduler_load();
  EXPECT_EQ(idle.running, 0);
  EXPECT_EQ(idle.waiting, 0);
  EXPECT_EQ(e->KvInUse().sequences, 0);
}

// The backend under the scheduler: Forward calls of three sequences
// interleaved chunk by chunk and step by step give each sequence the same
// logits, bit for bit, as running it alone.
TEST_P(EngineSchedulerTest, InterleavedForwardCallsAreBitIdentical) {
  auto e = MakeEngine({.max_context = 512, .kv_plan = GetParam(), .max_running = 1});
  ASSERT_NE(e, nullptr);
  Backend& b = e->backend();
  const KvPlan plan = e->kv_plan();
  const int vocab = e->config().vocab;
  std::vector<std::vector<int32_t>> prompts = {Prompt(*e, 70, 1), Prompt(*e, 9, 2), Prompt(*e, 150, 3)};
  constexpr int kChunk = 32, kSteps = 6;
  // Per sequence: logits after each prefill chunk and each decode step.
  auto run = [&](std::vector<size_t> order) {
    std::vector<std::unique_ptr<SequenceState>> seqs;
    for (const auto& p : prompts) seqs.push_back(*b.NewSequence(static_cast<int>(p.size()) + kSteps + 1, plan));
    std::vector<std::vector<std::vector<float>>> logits(prompts.size());
    std::vector<int> done(prompts.size(), 0), steps(prompts.size(), 0);
    bool any = true;
    while (any) {
      any = false;
      for (size_t i : order) {
        const int n_prompt = static_cast<int>(prompts[i].size());
        std::vector<float> l;
        if (done[i] < n_prompt) {
          const int n = std::min(kChunk, n_prompt - done[i]);
          EXPECT_TRUE(b.Forward(*seqs[i], absl::MakeConstSpan(prompts[i]).subspan(done[i], n), false, &l,
                                Backend::Mode::kPrefill)
                          .ok());
          done[i] += n;
        } else if (steps[i] < kSteps) {
          const int32_t t = static_cast<int32_t>((prompts[i][steps[i]] * 31 + 7) % vocab);
          EXPECT_TRUE(b.Forward(*seqs[i], absl::MakeConstSpan(&t, 1), false, &l, Backend::Mode::kDecode).ok());
          ++steps[i];
        } else {
          continue;
        }
        logits[i].push_back(std::move(l));
        any = true;
      }
    }
    return logits;
  };
  std::vector<std::vector<std::vector<float>>> alone(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) alone[i] = run({i})[i];
  const auto together = run({2, 0, 1});
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_EQ(together[i].size(), alone[i].size()) << i;
    for (size_t k = 0; k < alone[i].size(); ++k) {
      ASSERT_EQ(together[i][k].size(), alone[i][k].size());
      EXPECT_EQ(std::memcmp(together[i][k].data(), alone[i][k].data(), alone[i][k].size() * sizeof(float)), 0)
          << "sequence " << i << " call " << k;
    }
  }
}

// DecodeBatch: a sequence's logits are the same, bit for bit, whether it
// steps alone (a batch of one) or beside others in batches of changing
// size; bad batches are refused naming the sequence, before any work.
TEST_P(EngineSchedulerTest, DecodeBatchIsBitIdenticalWhateverTheBatch) {
  auto e = MakeEngine({.max_context = 512, .kv_plan = GetParam(), .max_running = 1});
  ASSERT_NE(e, nullptr);
  Backend& b = e->backend();
  const KvPlan plan = e->kv_plan();
  const int vocab = e->config().vocab;
  const std::vector<std::vector<int32_t>> prompts = {Prompt(*e, 70, 1), Prompt(*e, 9, 2), Prompt(*e, 150, 3)};
  constexpr int kSteps = 7;
  auto fresh = [&] {
    std::vector<std::unique_ptr<SequenceState>> seqs;
    for (const auto& p : prompts) {
      seqs.push_back(*b.NewSequence(static_cast<int>(p.size()) + kSteps + 1, plan));
      std::vector<float> l;
      EXPECT_TRUE(b.Forward(*seqs.back(), p, false, &l, Backend::Mode::kPrefill).ok());
    }
    return seqs;
  };
  auto token = [&](size_t i, int step) { return static_cast<int32_t>((prompts[i][step] * 31 + 7) % vocab); };
  // Alone: batches of one.
  std::vector<std::vector<std::vector<float>>> alone(prompts.size());
  {
    auto seqs = fresh();
    for (size_t i = 0; i < prompts.size(); ++i) {
      for (int step = 0; step < kSteps; ++step) {
        SequenceState* one[] = {seqs[i].get()};
        const int32_t t[] = {token(i, step)};
        std::vector<float> l;
        ASSERT_TRUE(b.DecodeBatch(one, t, &l).ok());
        alone[i].push_back(l);
      }
    }
  }
  // Together: all three, then (step 3) only the first two, then all again.
  auto seqs = fresh();
  std::vector<int> steps(prompts.size(), 0);
  for (int round = 0; round < kSteps + 1; ++round) {
    std::vector<size_t> who;
    for (size_t i = 0; i < prompts.size(); ++i) {
      if (steps[i] < kSteps && !(round == 3 && i == 2)) who.push_back(i);
    }
    std::vector<SequenceState*> batch;
    std::vector<int32_t> toks;
    for (size_t i : who) {
      batch.push_back(seqs[i].get());
      toks.push_back(token(i, steps[i]));
    }
    if (batch.empty()) break;
    std::vector<float> l;
    ASSERT_TRUE(b.DecodeBatch(batch, toks, &l).ok());
    ASSERT_EQ(l.size(), who.size() * vocab);
    for (size_t k = 0; k < who.size(); ++k) {
      const std::vector<float>& want = alone[who[k]][steps[who[k]]];
      EXPECT_EQ(std::memcmp(&l[k * vocab], want.data(), vocab * sizeof(float)), 0)
          << "sequence " << who[k] << " step " << steps[who[k]] << " in a batch of " << who.size();
      ++steps[who[k]];
    }
  }
  // Refused before any work: sizes, a repeated sequence, one still empty.
  std::vector<float> l;
  SequenceState* two[] = {seqs[0].get(), seqs[0].get()};
  const int32_t t2[] = {1, 2};
  const int32_t t1[] = {1};
  EXPECT_EQ(b.DecodeBatch(two, t1, &l).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(b.DecodeBatch(two, t2, &l).code(), absl::StatusCode::kInvalidArgument);
  auto empty = *b.NewSequence(8, plan);
  SequenceState* with_empty[] = {seqs[1].get(), empty.get()};
  const int len = seqs[1]->length();
  const absl::Status st = b.DecodeBatch(with_empty, t2, &l);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("sequence 1"), std::string::npos) << st;
  EXPECT_EQ(seqs[1]->length(), len);  // nothing ran
}

INSTANTIATE_TEST_SUITE_P(Plans, EngineSchedulerTest,
                         ::testing::Values("dense", "quant:2", "hybrid:2:128:8:56:32:gpu:late:i8"),
                         [](const ::testing::TestParamInfo<std::string>& p) {
                           return p.param == "dense" ? std::string("dense")
                                  : p.param == "quant:2" ? std::string("quant")
                                                         : std::string("hybrid");
                         });

// A short prompt submitted while a long one prefills gets its first token
// first: prefill chunks go round-robin, one per iteration.
TEST(EngineScheduler, ShortPromptDoesNotWaitForALongPrefill) {
  auto e = MakeEngine({.max_context = 2048, .prefill_chunk = 32, .max_running = 4});
  ASSERT_NE(e, nullptr);
  GenerationRequest long_r, short_r;
  long_r.prompt_tokens = Prompt(*e, 900, 5);  // ~30 chunks
  long_r.max_tokens = 2;
  short_r.prompt_tokens = Prompt(*e, 5, 6);
  short_r.max_tokens = 2;
  std::atomic<int> order{0};
  int long_first = -1, short_first = -1;
  absl::Notification long_started;
  std::thread t([&] {
    long_r.cancelled = [&] {
      if (!long_started.HasBeenNotified()) long_started.Notify();
      return false;
    };
    (void)e->Generate(long_r, [&](const StreamChunk&) {
      if (long_first < 0) long_first = order++;
      return true;
    });
  });
  long_started.WaitForNotification();  // the long prompt is prefilling
  auto res = e->Generate(short_r, [&](const StreamChunk&) {
    if (short_first < 0) short_first = order++;
    return true;
  });
  t.join();
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(short_first, 0);
  EXPECT_EQ(long_first, 1);
}

// A caller that stops reading holds back only its own generation, which is
// cut off after the stall bound (Aborted, `stalled` called); another one
// runs to its end meanwhile.
TEST(EngineScheduler, StalledReaderIsCutOffWithoutHoldingOthersBack) {
  auto e = MakeEngine({.max_context = 512,
                       .max_running = 4,
                       .stream_buffer_chunks = 2,
                       .stream_stall_timeout = absl::Milliseconds(300)});
  ASSERT_NE(e, nullptr);
  GenerationRequest slow, fast;
  slow.prompt_tokens = Prompt(*e, 10, 7);
  slow.max_tokens = 200;
  slow.ignore_eos = true;
  std::atomic<bool> stalled_called{false};
  slow.stalled = [&] { stalled_called = true; };
  fast.prompt_tokens = Prompt(*e, 12, 8);
  fast.max_tokens = 40;
  fast.ignore_eos = true;
  const Out fast_alone = Generate(*e, fast);
  ASSERT_TRUE(fast_alone.result.ok());

  absl::Notification release;
  absl::StatusOr<GenerationResult> slow_result;
  std::thread t([&] {
    slow_result = e->Generate(slow, [&](const StreamChunk&) {
      release.WaitForNotification();  // reads one chunk, then stalls
      return true;
    });
  });
  const Out fast_out = Generate(*e, fast);
  ASSERT_TRUE(fast_out.result.ok()) << fast_out.result.status();
  EXPECT_EQ(fast_out.ids, fast_alone.ids);
  // The stalled generation is cut off by itself (the reader is still stuck).
  for (int i = 0; i < 300 && !stalled_called.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(stalled_called.load());
  release.Notify();
  t.join();
  ASSERT_FALSE(slow_result.ok());
  EXPECT_EQ(slow_result.status().code(), absl::StatusCode::kAborted) << slow_result.status();
  EXPECT_NE(slow_result.status().message().find("cut off"), std::string::npos);
  EXPECT_EQ(e->scheduler_load().running, 0);
  EXPECT_EQ(e->KvInUse().sequences, 0);
}

// The KV budget: a request that could never fit is refused at once saying
// so; two that fit one at a time run one after the other (the second
// waits, in order), and both complete.
TEST(EngineScheduler, KvBudgetQueuesWhatDoesNotFitNowAndRefusesWhatNeverFits) {
  GenerationRequest r;
  auto e = EngineForOneAndAHalf(20, 9, 30, &r);
  ASSERT_NE(e, nullptr);

  GenerationRequest huge = r;
  huge.max_tokens = 300;
  const auto refused = e->Generate(huge, [](const StreamChunk&) { return true; });
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("more than the whole KV budget"), std::string::npos);

  const Out alone = Generate(*e, r);
  ASSERT_TRUE(alone.result.ok());
  std::vector<Out> outs(2);
  std::atomic<int> max_waiting{0}, max_running{0};
  std::atomic<bool> done{false};
  std::thread watch([&] {
    while (!done.load()) {
      const Engine::SchedulerLoad l = e->scheduler_load();
      max_waiting = std::max(max_waiting.load(), l.waiting);
      max_running = std::max(max_running.load(), l.running);
      EXPECT_LE(l.kv_admitted_bytes, l.kv_budget_bytes);
      std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
  });
  std::thread a([&] { outs[0] = Generate(*e, r); });
  std::thread b([&] { outs[1] = Generate(*e, r); });
  a.join();
  b.join();
  done = true;
  watch.join();
  for (const Out& o : outs) {
    ASSERT_TRUE(o.result.ok()) << o.result.status();
    EXPECT_EQ(o.ids, alone.ids);
  }
  EXPECT_EQ(max_running.load(), 1);
  EXPECT_GE(max_waiting.load(), 1);  // the second waited (both may wait before the first starts)
}

// A backend with a fixed memory pool, as a GPU has: the CPU backend's work,
// AvailableMemoryBytes() reporting `pool` bytes and each sequence counted at
// twice its KV (its "working buffers").
// The CPU backend's work behind another backend's face: tests override
// what they change.
class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}
  const model::ModelConfig& config() const override { return inner_->config(); }
  using Backend::NewSequence;
  absl::StatusOr<std::unique_ptr<SequenceState>> NewSequence(int capacity, const KvPlan& plan) override {
    return inner_->NewSequence(capacity, plan);
  }
  using Backend::Forward;
  absl::Status Forward(SequenceState& seq, absl::Span<const int32_t> tokens, bool all_logits,
                       std::vector<float>* logits, Mode mode) override {
    return inner_->Forward(seq, tokens, all_logits, logits, mode);
  }
  absl::Status DecodeBatch(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                           std::vector<float>* logits) override {
    return inner_->DecodeBatch(seqs, tokens, logits);
  }

 protected:
  std::unique_ptr<Backend> inner_;
};

class FixedPoolBackend final : public ForwardingBackend {
 public:
  FixedPoolBackend(std::unique_ptr<Backend> inner, int64_t pool) : ForwardingBackend(std::move(inner)), pool_(pool) {}
  std::string_view name() const override { return "fixed-pool"; }
  int64_t SequenceMemoryBytes(int prompt, int capacity, const KvPlan& plan) const override {
    return 2 * inner_->SequenceMemoryBytes(prompt, capacity, plan);
  }
  int64_t AvailableMemoryBytes() const override { return pool_; }

 private:
  int64_t pool_;
};

// With no --kv-budget-mib, a backend with a fixed pool gets a budget of
// kv_memory_fraction of it, each generation counted at the backend's
// SequenceMemoryBytes: what fits runs, what never could is refused.
TEST(EngineScheduler, KvBudgetFollowsTheBackendsFreeMemory) {
  GenerationRequest r;
  auto probe = MakeEngine({.max_context = 512});
  ASSERT_NE(probe, nullptr);
  r.prompt_tokens = Prompt(*probe, 20, 4);
  r.max_tokens = 12;
  r.ignore_eos = true;
  const int capacity = static_cast<int>(r.prompt_tokens.size()) + r.max_tokens;
  int64_t kv = 0;
  for (const LayerKvBytes& b : EstimateKvBytes(probe->kv_plan(), probe->config(), capacity, 4)) {
    kv += b.device_bytes;
  }
  const int64_t pool = 5 * kv;  // the budget (half of it) holds one generation at 2 x kv
  EngineOptions o{.max_context = 512, .max_running = 4, .kv_memory_fraction = 0.5};
  o.model_path = kModel;
  o.backend = "cuda";
  o.cuda_factory = [pool](const model::ModelWeights& w) -> absl::StatusOr<std::unique_ptr<Backend>> {
    auto cpu = CreateCpuBackend(w, {.threads = 2});
    if (!cpu.ok()) return cpu.status();
    return std::unique_ptr<Backend>(std::make_unique<FixedPoolBackend>(std::move(*cpu), pool));
  };
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->scheduler_load().kv_budget_bytes, pool / 2);
  const Out ok = Generate(**e, r);
  ASSERT_TRUE(ok.result.ok()) << ok.result.status();
  EXPECT_EQ(ok.ids.size(), 12u);
  GenerationRequest big = r;
  big.max_tokens = 4 * capacity;  // 2 x KV at this capacity passes half the pool
  const auto refused = (*e)->Generate(big, [](const StreamChunk&) { return true; });
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("more than the whole KV budget"), std::string::npos);

  o.kv_memory_fraction = 0;
  EXPECT_EQ(Engine::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  // An explicit budget wins over the pool.
  o.kv_memory_fraction = 0.5;
  o.kv_budget_bytes = 123456789;
  auto explicit_budget = Engine::Create(o);
  ASSERT_TRUE(explicit_budget.ok()) << explicit_budget.status();
  EXPECT_EQ((*explicit_budget)->scheduler_load().kv_budget_bytes, 123456789);
}

// A generation waiting for KV memory ends as soon as its caller cancels,
// while the one holding the memory runs on.
TEST(EngineScheduler, WaitingForMemoryEndsWhenCancelled) {
  GenerationRequest r;
  auto e = EngineForOneAndAHalf(20, 10, 150, &r);
  ASSERT_NE(e, nullptr);
  std::atomic<bool> stop_a{false};
  absl::Notification a_streaming;
  std::thread a([&] {
    (void)e->Generate(r, [&](const StreamChunk&) {
      if (!a_streaming.HasBeenNotified()) a_streaming.Notify();
      return !stop_a.load();
    });
  });
  a_streaming.WaitForNotification();
  std::atomic<bool> cancel_b{false};
  GenerationRequest b = r;
  b.cancelled = [&] { return cancel_b.load(); };
  absl::StatusOr<GenerationResult> b_result;
  int b_chunks = 0;
  std::thread bt([&] { b_result = e->Generate(b, [&](const StreamChunk&) { return ++b_chunks > 0; }); });
  for (int i = 0; i < 2000 && e->scheduler_load().waiting == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_EQ(e->scheduler_load().waiting, 1);
  cancel_b = true;
  bt.join();
  EXPECT_EQ(e->scheduler_load().running, 1) << "the first generation runs on";
  ASSERT_TRUE(b_result.ok()) << b_result.status();
  EXPECT_EQ(b_result->finish_reason, FinishReason::kCancelled);
  EXPECT_EQ(b_result->completion_tokens, 0);
  EXPECT_EQ(b_chunks, 0);
  stop_a = true;
  a.join();
}

// A lost device (a sticky CUDA error on a GPU; DeviceLossInjector here):
// every generation, running or waiting, ends Unavailable saying the device
// is lost, on_device_lost runs once, new requests are refused the same way,
// and nothing is left holding KV.
TEST(EngineScheduler, LostDeviceEndsEveryGenerationAndRefusesNewOnes) {
  std::atomic<int> reported{0};
  absl::Notification lost;
  std::string lost_message;
  auto e = MakeEngine({.max_context = 512,
                       .max_running = 2,
                       .on_device_lost =
                           [&](const absl::Status& s) {
                             lost_message = std::string(s.message());
                             if (reported.fetch_add(1) == 0) lost.Notify();
                           },
                       .inject_device_loss_after_steps = 6});
  ASSERT_NE(e, nullptr);
  EXPECT_TRUE(e->device_status().ok());
  GenerationRequest r;
  r.prompt_tokens = Prompt(*e, 12, 3);
  r.max_tokens = 40;
  r.ignore_eos = true;
  // Three at once with two running: one waits when the device goes.
  std::vector<Out> outs(3);
  std::vector<std::thread> ts;
  for (int i = 0; i < 3; ++i) ts.emplace_back([&, i] { outs[i] = Generate(*e, r); });
  for (auto& t : ts) t.join();
  ASSERT_TRUE(lost.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_EQ(reported.load(), 1);
  EXPECT_NE(lost_message.find("illegal memory access"), std::string::npos) << lost_message;
  for (const Out& o : outs) {
    ASSERT_FALSE(o.result.ok()) << "completed " << o.ids.size() << " tokens on a lost device";
    EXPECT_EQ(o.result.status().code(), absl::StatusCode::kUnavailable) << o.result.status();
    EXPECT_NE(o.result.status().message().find("device is lost"), std::string::npos) << o.result.status();
    EXPECT_LT(o.ids.size(), 40u);
  }
  EXPECT_TRUE(IsDeviceLost(e->device_status())) << e->device_status();
  const Out after = Generate(*e, r);
  ASSERT_FALSE(after.result.ok());
  EXPECT_EQ(after.result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(after.ids.empty());
  EXPECT_EQ(e->scheduler_load().running, 0);
  EXPECT_EQ(e->scheduler_load().waiting, 0);
  EXPECT_EQ(e->scheduler_load().kv_admitted_bytes, 0);
  EXPECT_EQ(e->KvInUse().sequences, 0);
  EXPECT_EQ(reported.load(), 1);
}

// Any other backend error ends only its own generation: the device stays.
TEST(EngineScheduler, DeviceLossMarkIsOnlyWhatTheBackendSetsAndSurvivesCopies) {
  EXPECT_FALSE(IsDeviceLost(absl::OkStatus()));
  EXPECT_FALSE(IsDeviceLost(absl::InternalError("kernel failed")));
  EXPECT_FALSE(IsDeviceLost(MarkDeviceLost(absl::OkStatus())));
  const absl::Status lost = MarkDeviceLost(absl::InternalError("cudaStreamSynchronize: illegal address"));
  EXPECT_TRUE(IsDeviceLost(lost));
  EXPECT_EQ(lost.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(lost.message(), "cudaStreamSynchronize: illegal address");
  const absl::StatusOr<int> carried = lost;
  EXPECT_TRUE(IsDeviceLost(carried.status()));
}

}  // namespace
}  // namespace tailorkv::runtime

namespace tailorkv::runtime {
namespace {

// A backend whose NewSequence, once armed, waits until released (as a
// reservation waits on a frozen kv-host), and that may or may not let the
// engine call NewSequence off the scheduler thread.
class HeldNewSequenceBackend final : public ForwardingBackend {
 public:
  HeldNewSequenceBackend(std::unique_ptr<Backend> inner, bool concurrent)
      : ForwardingBackend(std::move(inner)), concurrent_(concurrent) {}
  std::string_view name() const override { return "held"; }
  bool ConcurrentSequenceLifetime() const override { return concurrent_; }
  using Backend::NewSequence;
  absl::StatusOr<std::unique_ptr<SequenceState>> NewSequence(int capacity, const KvPlan& plan) override {
    if (armed_.exchange(false)) {
      entered_.Notify();
      release_.WaitForNotificationWithTimeout(absl::Seconds(120));
    }
    return inner_->NewSequence(capacity, plan);
  }

  std::atomic<bool> armed_{false};
  absl::Notification entered_, release_;

 private:
  bool concurrent_;
};

// A new generation's reservation that hangs (kv-host frozen: up to its call
// deadline) does not pause the generation already streaming: the engine
// reserves off the scheduler thread. The running one gains tokens while the
// reservation is held; once released, the new one runs too.
TEST(EngineScheduler, AHangingReservationDoesNotPauseRunningGenerations) {
  ASSERT_TRUE(std::filesystem::exists(kModel)) << kModel << " is missing: run scripts/fetch_model.sh";
  HeldNewSequenceBackend* held = nullptr;
  EngineOptions o{.max_context = 512, .max_running = 2};
  o.model_path = kModel;
  o.backend = "cuda";  // the factory below: the CPU backend behind a hold
  o.cuda_factory = [&held](const model::ModelWeights& w) -> absl::StatusOr<std::unique_ptr<Backend>> {
    auto cpu = CreateCpuBackend(w, {.threads = 2});
    if (!cpu.ok()) return cpu.status();
    auto b = std::make_unique<HeldNewSequenceBackend>(std::move(*cpu), /*concurrent=*/true);
    held = b.get();
    return std::unique_ptr<Backend>(std::move(b));
  };
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_NE(held, nullptr);
  GenerationRequest a;
  a.prompt_tokens = Prompt(**e, 20, 1);
  a.max_tokens = 40;
  a.ignore_eos = true;
  std::atomic<int> a_tokens{0};
  absl::StatusOr<GenerationResult> a_result = absl::UnknownError("not run");
  std::thread ta([&] {
    a_result = (*e)->Generate(a, [&](const StreamChunk& c) {
      a_tokens += static_cast<int>(c.token_ids.size());
      return true;
    });
  });
  auto wait_for = [](const std::function<bool()>& cond) {
    // A bound against hanging the suite, not a timing check.
    for (int i = 0; i < 6000 && !cond(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return cond();
  };
  ASSERT_TRUE(wait_for([&] { return a_tokens.load() >= 2; }));
  held->armed_ = true;
  GenerationRequest b = a;
  b.prompt_tokens = Prompt(**e, 12, 2);
  b.max_tokens = 4;
  Out b_out;
  std::thread tb([&] { b_out = Generate(**e, b); });
  held->entered_.WaitForNotification();
  const int before = a_tokens.load();
  const bool a_moved = wait_for([&] { return a_tokens.load() >= before + 5; });
  const int during = a_tokens.load() - before;
  held->release_.Notify();
  tb.join();
  ta.join();
  EXPECT_TRUE(a_moved) << "the running generation made " << during << " tokens while a reservation was held";
  EXPECT_GE(during, 5);
  ASSERT_TRUE(a_result.ok()) << a_result.status();
  EXPECT_EQ(a_result->completion_tokens, 40);
  ASSERT_TRUE(b_out.result.ok()) << b_out.result.status();
  EXPECT_EQ(b_out.ids.size(), 4u);
}

}  // namespace
}  // namespace tailorkv::runtime
