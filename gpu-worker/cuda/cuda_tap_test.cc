// CudaBackend::ForwardObserved (the profiler's taps) against the CPU
// backend's on a small random model: the same rows, the same post-RoPE q and
// cached K/V within bf16 tolerance, observer errors stopping the call, and
// the backend usable afterwards.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string_view>
#include <tuple>
#include <vector>

#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"
#include "model/ggml_types.h"
#include "runtime/cpu_backend.h"
#include "runtime/kv_plan.h"
#include "runtime/test_model.h"

namespace tailorkv::cuda {
namespace {

using model::ModelWeights;
using runtime::Backend;

class CudaTapTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

// Two KV heads (so kv_head_stride matters), GQA group 3, head_dim 64, q
// width (384) unlike hidden (160), odd vocab and FFN.
ModelWeights TapModel() {
  runtime::testing::TinyShape shape;
  shape.n_layers = 3;
  shape.n_heads = 6;
  shape.n_kv_heads = 2;
  shape.head_dim = 64;
  shape.hidden = 160;
  shape.ffn = 200;
  shape.vocab = 257;
  shape.max_context = 256;
  shape.weight_scale = 0.08f;
  ModelWeights w = runtime::testing::TinyModel(31, model::RopeStyle::kHalves, false, shape);
  runtime::testing::RoundWeightsToBf16(w);
  return w;
}

using runtime::testing::RandomTokens;

// One layer's tap, copied out: q [n_queries][n_heads][head_dim], k and v
// packed [n_kv_heads][n_keys][head_dim] whatever the backend's stride.
struct Tap {
  int layer = -1, n_keys = 0, first_query = 0, n_queries = 0;
  std::vector<float> q, k, v;
};

Tap CopyTap(const Backend::LayerTap& t, const model::ModelConfig& c) {
  Tap out{t.layer, t.n_keys, t.first_query, t.n_queries, {}, {}, {}};
  const int64_t row = static_cast<int64_t>(t.n_keys) * c.head_dim;
  out.q.assign(t.q, t.q + static_cast<int64_t>(t.n_queries) * c.n_heads * c.head_dim);
  for (int h = 0; h < c.n_kv_heads; ++h) {
    out.k.insert(out.k.end(), t.k + h * t.kv_head_stride, t.k + h * t.kv_head_stride + row);
    out.v.insert(out.v.end(), t.v + h * t.kv_head_stride, t.v + h * t.kv_head_stride + row);
  }
  return out;
}

// Runs ForwardObserved and keeps every layer's tap; the GPU's must be finite
// everywhere (its host buffers are NaN-poisoned before each copy).
absl::Status Observe(Backend& b, runtime::SequenceState& seq, absl::Span<const int32_t> tokens,
                     int tap_queries, std::vector<Tap>* taps) {
  const model::ModelConfig& c = b.config();
  return b.ForwardObserved(seq, tokens, tap_queries, [&](const Backend::LayerTap& t) {
    EXPECT_GE(t.kv_head_stride, static_cast<int64_t>(t.n_keys) * c.head_dim) << b.name();
    taps->push_back(CopyTap(t, c));
    return absl::OkStatus();
  });
}

// Largest |gpu - cpu| over the largest |cpu|; infinite when a value is NaN
// or the sizes differ. *first_bad: the first index past `tol` of that.
float RelError(const std::vector<float>& gpu, const std::vector<float>& cpu, float tol,
               int64_t* first_bad, float* max_ref) {
  if (gpu.size() != cpu.size()) return INFINITY;
  *max_ref = 0;
  for (float x : cpu) *max_ref = std::max(*max_ref, std::fabs(x));
  float worst = 0;
  *first_bad = -1;
  for (size_t i = 0; i < gpu.size(); ++i) {
    const float d = std::fabs(gpu[i] - cpu[i]);
    if (!(d <= tol * *max_ref) && *first_bad < 0) *first_bad = static_cast<int64_t>(i);
    worst = std::isnan(d) ? INFINITY : std::max(worst, d);
  }
  return worst / *max_ref;
}

// bf16 activations (normed input, Q/K/V, attention output) carry ~3
// significant digits and differences grow through the layers: 3% of the
// tensor's largest |value|, as the logits comparison in cuda_backend_test.
constexpr float kTol = 0.03f;

void ExpectTapsMatch(const std::vector<Tap>& gpu, const std::vector<Tap>& cpu, int n_layers,
                     const char* what) {
  ASSERT_EQ(cpu.size(), static_cast<size_t>(n_layers)) << what;
  ASSERT_EQ(gpu.size(), static_cast<size_t>(n_layers)) << what;
  for (int l = 0; l < n_layers; ++l) {
    const Tap& g = gpu[l];
    const Tap& x = cpu[l];
    EXPECT_EQ(g.layer, l) << what;
    EXPECT_EQ(x.layer, l) << what;
    EXPECT_EQ(g.n_keys, x.n_keys) << what << " layer " << l;
    EXPECT_EQ(g.first_query, x.first_query) << what << " layer " << l;
    EXPECT_EQ(g.n_queries, x.n_queries) << what << " layer " << l;
    for (auto [name, gv, xv] : {std::tuple{"q", &g.q, &x.q}, std::tuple{"k", &g.k, &x.k},
                                std::tuple{"v", &g.v, &x.v}}) {
      // No copy may be missed: the poison would show as NaN.
      const auto nan = std::find_if(gv->begin(), gv->end(), [](float f) { return !std::isfinite(f); });
      EXPECT_EQ(nan, gv->end()) << what << " layer " << l << " " << name << "[" << (nan - gv->begin())
                                << "] not finite";
      int64_t bad = -1;
      float max_ref = 0;
      const float err = RelError(*gv, *xv, kTol, &bad, &max_ref);
      EXPECT_GT(max_ref, 0.1f) << what << " layer " << l << " " << name << ": trivial reference";
      EXPECT_LE(err, kTol) << what << " layer " << l << " " << name << ": first bad index " << bad
                           << " gpu " << (bad >= 0 ? (*gv)[bad] : 0) << " cpu "
                           << (bad >= 0 ? (*xv)[bad] : 0);
    }
  }
}

// Logits of a fresh 37-token prompt and 3 decode steps (the last two replay
// a graph) agree with the CPU backend's.
void ExpectFreshSequenceMatches(Backend& gpu, Backend& cpu, uint32_t seed) {
  const auto prompt = RandomTokens(37, gpu.config().vocab, seed);
  auto gs = *gpu.NewSequence(64);
  auto cs = *cpu.NewSequence(64);
  std::vector<float> gl, cl;
  for (int step = 0; step < 4; ++step) {
    const auto in = step == 0 ? absl::MakeConstSpan(prompt) : absl::MakeConstSpan(&prompt[step], 1);
    ASSERT_TRUE(gpu.Forward(*gs, in, false, &gl).ok());
    ASSERT_TRUE(cpu.Forward(*cs, in, false, &cl).ok());
    int64_t bad = -1;
    float max_ref = 0;
    EXPECT_LE(RelError(gl, cl, kTol, &bad, &max_ref), kTol) << "step " << step << " index " << bad;
    EXPECT_GT(max_ref, 0.1f);
  }
  EXPECT_EQ(gs->length(), 40);
}

// 203 tokens as the profiler feeds them: 128 by Forward, the last 75
// observed (the GPU splits them 11 + 64, its chunk being 64), 32 tapped
// queries; then one more token observed (prefill path, one row), then a
// plain decode step reading the cache the observed calls wrote.
TEST_F(CudaTapTest, TapsMatchCpuBackend) {
  const ModelWeights w = TapModel();
  const auto& c = w.config;
  auto gpu = CreateCudaBackend(w, {.max_prefill_chunk = 64});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cpu = runtime::CreateCpuBackend(w, {.threads = 4});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  const auto tokens = RandomTokens(205, c.vocab, 41);
  const auto span = absl::MakeConstSpan(tokens);
  auto gs = *(*gpu)->NewSequence(230);
  auto cs = *(*cpu)->NewSequence(230);
  std::vector<float> gl, cl;
  ASSERT_TRUE((*gpu)->Forward(*gs, span.subspan(0, 128), false, &gl).ok());
  ASSERT_TRUE((*cpu)->Forward(*cs, span.subspan(0, 128), false, &cl).ok());

  std::vector<Tap> gt, ct;
  auto st = Observe(**gpu, *gs, span.subspan(128, 75), 32, &gt);
  ASSERT_TRUE(st.ok()) << st;
  st = Observe(**cpu, *cs, span.subspan(128, 75), 32, &ct);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_FALSE(gt.empty());
  EXPECT_EQ(gt[0].n_keys, 203);
  EXPECT_EQ(gt[0].first_query, 171);
  EXPECT_EQ(gt[0].n_queries, 32);
  ExpectTapsMatch(gt, ct, c.n_layers, "75-token call");
  EXPECT_EQ(gs->length(), 203);

  gt.clear();
  ct.clear();
  st = Observe(**gpu, *gs, span.subspan(203, 1), 1, &gt);
  ASSERT_TRUE(st.ok()) << st;
  st = Observe(**cpu, *cs, span.subspan(203, 1), 1, &ct);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_FALSE(gt.empty());
  EXPECT_EQ(gt[0].n_keys, 204);
  EXPECT_EQ(gt[0].first_query, 203);
  ExpectTapsMatch(gt, ct, c.n_layers, "1-token call");

  ASSERT_TRUE((*gpu)->Forward(*gs, span.subspan(204, 1), false, &gl).ok());
  ASSERT_TRUE((*cpu)->Forward(*cs, span.subspan(204, 1), false, &cl).ok());
  int64_t bad = -1;
  float max_ref = 0;
  EXPECT_LE(RelError(gl, cl, kTol, &bad, &max_ref), kTol) << "decode after taps, index " << bad;
  EXPECT_GT(max_ref, 0.1f);
  EXPECT_EQ(gs->length(), 205);
}

TEST_F(CudaTapTest, ObserverErrorStopsTheCallAndTheBackendStaysUsable) {
  const ModelWeights w = TapModel();
  auto gpu = CreateCudaBackend(w, {.max_prefill_chunk = 64});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cpu = runtime::CreateCpuBackend(w, {.threads = 4});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  const auto tokens = RandomTokens(101, w.config.vocab, 43);
  auto seq = *(*gpu)->NewSequence(128);
  std::vector<int> seen;
  auto st = (*gpu)->ForwardObserved(*seq, tokens, 17, [&](const Backend::LayerTap& t) {
    seen.push_back(t.layer);
    return t.layer == 1 ? absl::DataLossError("observer gave up") : absl::OkStatus();
  });
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_EQ(st.message(), "observer gave up");
  EXPECT_EQ(seen, (std::vector<int>{0, 1}));
  seq.reset();

  ExpectFreshSequenceMatches(**gpu, **cpu, 44);
  // Taps work again too, on a fresh sequence.
  auto gs = *(*gpu)->NewSequence(128);
  auto cs = *(*cpu)->NewSequence(128);
  std::vector<Tap> gt, ct;
  st = Observe(**gpu, *gs, tokens, 17, &gt);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_TRUE(Observe(**cpu, *cs, tokens, 17, &ct).ok());
  ExpectTapsMatch(gt, ct, w.config.n_layers, "after an observer error");
}

TEST_F(CudaTapTest, RefusesBadTapQueriesAndNonDensePlans) {
  const ModelWeights w = TapModel();
  auto gpu = CreateCudaBackend(w, {.max_prefill_chunk = 64});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  const auto tokens = RandomTokens(75, w.config.vocab, 45);
  int calls = 0;
  auto count = [&](const Backend::LayerTap&) {
    ++calls;
    return absl::OkStatus();
  };
  auto seq = *(*gpu)->NewSequence(128);
  for (int tq : {0, -1, 76}) {
    auto st = (*gpu)->ForwardObserved(*seq, tokens, tq, count);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << "tap_queries " << tq;
    EXPECT_NE(st.message().find("tap_queries"), std::string_view::npos) << st;
  }
  // More than one chunk's queries: q is held for one chunk only.
  auto st = (*gpu)->ForwardObserved(*seq, tokens, 65, count);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("max_prefill_chunk"), std::string_view::npos) << st;
  auto plan = runtime::ParseKvPlanSpec("window:4:16", w.config);
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto window = *(*gpu)->NewSequence(128, *plan);
  st = (*gpu)->ForwardObserved(*window, tokens, 8, count);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("layers[0]"), std::string_view::npos) << st;
  EXPECT_EQ(calls, 0);
  EXPECT_EQ(seq->length(), 0);
  EXPECT_EQ(window->length(), 0);
  // The same sequence then runs with valid taps, the largest allowed.
  st = (*gpu)->ForwardObserved(*seq, tokens, 64, count);
  EXPECT_TRUE(st.ok()) << st;
  EXPECT_EQ(calls, w.config.n_layers);
  EXPECT_EQ(seq->length(), 75);
}

}  // namespace
}  // namespace tailorkv::cuda
