#include "runtime/cpu_backend.h"

#include <cblas.h>
#include <omp.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <utility>

#include "absl/container/inlined_vector.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "spdlog/spdlog.h"
#include "common/openmp_env.h"
#include "common/status_macros.h"
#include "model/quant_dot.h"
#include "runtime/cpu_reference.h"
#include "runtime/quant_kv.h"
#include "runtime/fp8_reference.h"
#include "runtime/sparse_reference.h"
#include "runtime/target_clones.h"

namespace tailorkv::runtime {
namespace {

using model::ModelConfig;
using model::ModelWeights;
using model::Tensor;

// Query rows per prefill attention task: bounds each thread's score matrix
// to kQueryBlock x context floats. On 2 cores, 128 beat 256 (2048 tokens:
// 408 vs 372 tokens/s; 8192: 220 vs 144) and 64 (GEMMs too thin).
constexpr int kQueryBlock = 128;

// Rows of head_dim floats per KV head, `head_stride` floats apart: a dense
// layer's cache, a window store, a residual ring or a prefill scratch.
struct KvView {
  const float* k;
  const float* v;
  int64_t head_stride;
};

// A window layer's store: sink rows [0, sink) hold positions [0, sink); the
// `ring` rows after them hold position p >= sink at sink + (p - sink) % ring.
// rows = min(capacity, S + W), so up to rows tokens every position sits at
// its own row, in order (exactly the dense layout).
struct WindowStore {
  int sink = 0;
  int ring = 0;
  int rows = 0;
  int64_t head_stride = 0;
  std::vector<float> k, v;

  int Row(int p) const { return p < sink ? p : sink + (p - sink) % ring; }
};

// The host tier of a sparse layer: K and V of `rows` positions per KV head,
// row p of head h at h * head_stride + p * head_dim (the dense layout, so
// prefill attends over it directly). Its own memory, or (CpuBackendOptions::
// host_store, e.g. kv-host's arenas) a slice of SparseHostBytes that the
// sequence holds: K then V, zeroed here.
int64_t SparseHostBytes(int n_kv_heads, int head_dim, int rows) {
  return 2 * static_cast<int64_t>(n_kv_heads) * rows * head_dim * static_cast<int64_t>(sizeof(float));
}
class SparseHostStore {
 public:
  SparseHostStore() = default;
  SparseHostStore(int n_kv_heads, int head_dim, int rows, absl::Span<std::byte> external = {})
      : head_stride_(static_cast<int64_t>(rows) * head_dim), values_(head_stride_ * n_kv_heads) {
    if (external.empty()) {
      own_.assign(2 * values_, 0.0f);
      base_ = own_.data();
    } else {
      base_ = reinterpret_cast<float*>(external.data());
      std::fill(base_, base_ + 2 * values_, 0.0f);
    }
  }
  float* k(int head) { return base_ + head * head_stride_; }
  float* v(int head) { return base_ + values_ + head * head_stride_; }
  const float* k(int head) const { return base_ + head * head_stride_; }
  const float* v(int head) const { return base_ + values_ + head * head_stride_; }
  int64_t head_stride() const { return head_stride_; }
  int64_t bytes() const { return 2 * values_ * static_cast<int64_t>(sizeof(float)); }

 private:
  int64_t head_stride_ = 0;
  int64_t values_ = 0;  // of K (and of V)
  std::vector<float> own_;
  float* base_ = nullptr;
};

// A sparse layer (semantics in cpu_backend.h). Device rows per KV head:
// [kept prompt rows (kept_cap reserved) | generated rows], head_stride floats apart.
struct SparseLayer {
  SparseParams params;
  SparseHostStore host;
  // With a remote host tier (CpuBackendOptions::remote_rows): this layer's
  // slice on the node. `host` stages the prompt until it ends; then its rows
  // are written to the node, `host` is dropped and `offloaded` set.
  uint64_t remote_slice = 0;
  int64_t remote_head_stride = 0;  // floats between heads there (the capacity's rows)
  int64_t remote_bytes = 0;        // the tier's bytes there, once offloaded
  bool offloaded = false;
  int kept_cap = 0;  // min(capacity, sink + recent)
  int prompt = -1;   // P once the prompt ended, else -1
  int sink = 0;      // min(S, P): kept rows [0, sink) are positions [0, sink)
  int recent = 0;    // kept rows [sink, sink + recent) are positions [P - recent, P)
  int generated = 0;
  int64_t head_stride = 0;
  std::vector<float> k, v;          // the device tier
  std::vector<float> max_abs_k;     // [kv_head][head_dim]
  std::vector<std::vector<int>> last_selection;  // per KV head, ascending
  // Index "gpu": the group-mean query of the last prompt token (recorded by
  // every prefill chunk before the prompt ends), the channels chosen from it
  // when the prompt ends, and those channels of every prompt key,
  // [kv_head][capacity][channels] (capacity rows reserved at creation).
  bool gpu_index = false;
  std::vector<float> last_q_mean;   // [kv_head][head_dim]
  std::vector<int32_t> chans;       // [kv_head][channels], ascending
  std::vector<float> index;
  int64_t index_head_stride = 0;

  bool prompt_ended() const { return prompt >= 0; }
  int64_t device_bytes() const {
    return static_cast<int64_t>(k.size() + v.size() + max_abs_k.size() + index.size()) *
           sizeof(float);
  }
};

// KV cache of one sequence, per layer as its policy says. Dense layers: per
// KV head, `capacity` rows of head_dim floats, so one head's keys are
// contiguous for the GEMMs. Quant layers: a QuantKvCpu. Window layers: a
// WindowStore.
class CpuSequence final : public SequenceState {
 public:
  // host: the sparse layers' host tiers in layer order (SparseHostBytes
  // each), held in `store` under `session` (freed with the sequence); empty:
  // plain memory.
  // remote / remote_slices: the sparse layers' host tiers on a remote node
  // instead (one slice each, in layer order; the session closed with the
  // sequence); the prompt is staged in plain memory until it ends.
  CpuSequence(const ModelConfig& c, int capacity, KvPlan plan,
              std::vector<absl::Span<std::byte>> host = {}, kvhost::HostKvStore* store = nullptr,
              std::string session = "", kvhost::RemoteRowStore* remote = nullptr,
              std::vector<uint64_t> remote_slices = {})
      : store_(store),
        remote_(remote),
        session_(std::move(session)),
        plan_(std::move(plan)),
        capacity_(capacity),
        head_stride_(static_cast<int64_t>(capacity) * c.head_dim),
        layer_stride_(head_stride_ * c.n_kv_heads),
        dense_offset_(c.n_layers, -1),
        quant_(c.n_layers),
        window_(c.n_layers),
        sparse_(c.n_layers) {
    int64_t dense = 0;
    size_t next_host = 0;
    for (int l = 0; l < c.n_layers; ++l) {
      const LayerKvPolicy& p = plan_.layers[l];
      if (p.kind == KvPolicyKind::kDense) {
        dense_offset_[l] = dense;
        dense += layer_stride_;
      } else if (p.kind == KvPolicyKind::kQuant) {
        quant_[l] = std::make_unique<QuantKvCpu>(QuantShape{
            .n_kv_heads = c.n_kv_heads, .head_dim = c.head_dim, .capacity = capacity, .params = p.quant});
      } else if (p.kind == KvPolicyKind::kWindow) {
        WindowStore& w = window_[l];
        w.sink = std::min(p.window.sink, capacity);
        w.rows = static_cast<int>(std::min<int64_t>(capacity, static_cast<int64_t>(p.window.sink) + p.window.recent));
        w.ring = w.rows - w.sink;
        w.head_stride = static_cast<int64_t>(w.rows) * c.head_dim;
        w.k.assign(w.head_stride * c.n_kv_heads, 0.0f);
        w.v.assign(w.k.size(), 0.0f);
      } else if (p.kind == KvPolicyKind::kSparse) {
        auto sp = std::make_unique<SparseLayer>();
        sp->params = p.sparse;
        if (remote != nullptr) sp->remote_slice = remote_slices[next_host];
        sp->host = SparseHostStore(c.n_kv_heads, c.head_dim, capacity,
                                   host.empty() ? absl::Span<std::byte>() : host[next_host]);
        ++next_host;
        sp->kept_cap = static_cast<int>(
            std::min<int64_t>(capacity, static_cast<int64_t>(p.sparse.sink) + p.sparse.recent));
        sp->head_stride = static_cast<int64_t>(sp->kept_cap) * c.head_dim;
        sp->k.assign(sp->head_stride * c.n_kv_heads, 0.0f);
        sp->v.assign(sp->k.size(), 0.0f);
        sp->max_abs_k.assign(static_cast<size_t>(c.n_kv_heads) * c.head_dim, 0.0f);
        if (p.sparse.index == "gpu") {
          sp->gpu_index = true;
          sp->last_q_mean.assign(sp->max_abs_k.size(), 0.0f);
          sp->chans.assign(static_cast<size_t>(c.n_kv_heads) * p.sparse.channels, 0);
          sp->index_head_stride = static_cast<int64_t>(capacity) * p.sparse.channels;
          sp->index.assign(sp->index_head_stride * c.n_kv_heads, 0.0f);
        }
        sparse_[l] = std::move(sp);
      }
    }
    k_.resize(dense);
    v_.resize(dense);
  }

  ~CpuSequence() override {
    if (store_ != nullptr) store_->FreeOwner(session_);
    if (remote_ != nullptr) {
      // A node that cannot be reached frees the session when our lease ends.
      if (auto freed = remote_->CloseSession(session_); !freed.ok()) {
        spdlog::warn("remote host tier: closing session {}: {}", session_, freed.status().ToString());
      }
    }
  }
  kvhost::RemoteRowStore* remote() const { return remote_; }
  CpuSequence(const CpuSequence&) = delete;
  CpuSequence& operator=(const CpuSequence&) = delete;

  int length() const override { return length_; }
  int capacity() const override { return capacity_; }
  // Quant and window layers cannot forget: only all-dense sequences shrink.
  void Truncate(int n) override {
    if (plan_.all_dense()) length_ = std::clamp(n, 0, length_);
  }
  const KvPlan& plan() const override { return plan_; }
  std::vector<LayerKvBytes> kv_bytes() const override {
    std::vector<LayerKvBytes> out;
    for (size_t l = 0; l < plan_.layers.size(); ++l) {
      LayerKvBytes b{plan_.layers[l].kind, 0, 0};
      if (quant_[l]) {
        b.device_bytes = quant_[l]->bytes();
      } else if (sparse_[l]) {
        b.device_bytes = sparse_[l]->device_bytes();
        // FP8 host tiers are emulated in fp32; the figure is the format's.
        // (An offloaded tier's bytes are on the remote node.)
        const int64_t tier = sparse_[l]->offloaded ? sparse_[l]->remote_bytes : sparse_[l]->host.bytes();
        b.host_bytes = sparse_[l]->params.host_bits == 8 ? tier / 4 : tier;
      } else if (plan_.layers[l].kind == KvPolicyKind::kWindow) {
        b.device_bytes = static_cast<int64_t>(window_[l].k.size() + window_[l].v.size()) * sizeof(float);
      } else {
        b.device_bytes = 2 * layer_stride_ * static_cast<int64_t>(sizeof(float));
      }
      out.push_back(b);
    }
    return out;
  }

  KvPolicyKind kind(int layer) const { return plan_.layers[layer].kind; }
  // Dense layers only.
  float* k(int layer, int head) { return k_.data() + dense_offset_[layer] + head * head_stride_; }
  float* v(int layer, int head) { return v_.data() + dense_offset_[layer] + head * head_stride_; }
  KvView dense_view(int layer) { return {k(layer, 0), v(layer, 0), head_stride_}; }
  QuantKvCpu* quant(int layer) { return quant_[layer].get(); }
  const QuantKvCpu* quant(int layer) const { return quant_[layer].get(); }
  WindowStore& window(int layer) { return window_[layer]; }
  SparseLayer* sparse(int layer) { return sparse_[layer].get(); }
  const SparseLayer* sparse(int layer) const { return sparse_[layer].get(); }
  void set_length(int n) { length_ = n; }

 private:
  kvhost::HostKvStore* store_;
  kvhost::RemoteRowStore* remote_;
  std::string session_;
  KvPlan plan_;
  int capacity_;
  int length_ = 0;
  int64_t head_stride_;
  int64_t layer_stride_;
  std::vector<int64_t> dense_offset_;  // into k_/v_, -1 for other policies
  std::vector<float> k_, v_;
  std::vector<std::unique_ptr<QuantKvCpu>> quant_;
  std::vector<WindowStore> window_;
  std::vector<std::unique_ptr<SparseLayer>> sparse_;
};

// A decode batch's y[n][out] (=|+=) x[n][in] * W[out][in]^T. Every sum runs
// in one fixed order (16 partial sums over k, added in turn, then the tail),
// whatever n or the thread count, so a row's result does not depend on its
// batch (BLAS picks kernels by shape). The batch shares each block of weight
// rows while it is in cache: one pass over the weights per step.
TKV_TARGET_CLONES("avx2", "default") void BatchLinear(const float* x, int n, const float* w, int out, int in,
                                                      float* y, bool accumulate) {
  constexpr int kRows = 8;  // weight rows per block: 8 x in floats stay in L1/L2 across the batch
#pragma omp parallel for schedule(static)
  for (int o0 = 0; o0 < out; o0 += kRows) {
    const int o1 = std::min(out, o0 + kRows);
    for (int b = 0; b < n; ++b) {
      const float* xb = x + static_cast<size_t>(b) * in;
      for (int o = o0; o < o1; ++o) {
        const float* wo = w + static_cast<size_t>(o) * in;
        float acc[16] = {};
        int k = 0;
        for (; k + 16 <= in; k += 16) {
#pragma omp simd
          for (int j = 0; j < 16; ++j) acc[j] += wo[k + j] * xb[k + j];
        }
        float sum = 0;
        for (int j = 0; j < 16; ++j) sum += acc[j];
        for (; k < in; ++k) sum += wo[k] * xb[k];
        float& dst = y[static_cast<size_t>(b) * out + o];
        dst = accumulate ? dst + sum : sum;
      }
    }
  }
}

// What a Linear's rows are. Quantized weights multiply prefill rows as float
// tiles (GEMM over dequantized weights, float activations) and decode rows
// through QuantMatmul (int8 activations): the path depends on the kind of
// row, never on how many rows a call has, so a prompt's result does not
// depend on how it was chunked (a 5-token chunk and a 1,024-token one take
// the same path for every row).
enum class Rows {
  kPrefill,      // prompt rows of one sequence
  kDecode,       // one sequence's decode step
  kDecodeBatch,  // one decode row per sequence (BatchLinear for floats: each
                 // row's sums do not depend on the batch)
};

// y[n][out] (=|+=) x[n][in] * W[out][in]^T.
void Linear(const float* x, int n, const Tensor& w, float* y, bool accumulate, Rows kind) {
  const int out = static_cast<int>(w.rows()), in = static_cast<int>(w.cols());
  const bool batch = kind == Rows::kDecodeBatch;
  if (w.quantized() && kind == Rows::kPrefill) {
    // A prefill chunk: GEMM over float tiles of the weights, dequantized a
    // block of rows at a time (each tile is reused by all n rows, so the
    // dequantization costs 1/n of the multiply).
    // Tiles of ~2 MB of floats: large enough for an efficient GEMM, small
    // enough to stay in L2 while the chunk's rows go through them.
    const int kTile = std::max(64, (1 << 19) / in);
    thread_local std::vector<float> tile, part;
    tile.resize(static_cast<size_t>(kTile) * in);
    part.resize(static_cast<size_t>(n) * kTile);
    const int64_t rb = w.quant_row_bytes();
    for (int r0 = 0; r0 < out; r0 += kTile) {
      const int m = std::min(kTile, out - r0);
      float* t = tile.data();
      // Cannot fail: the tensor's size was checked at load.
#pragma omp parallel for schedule(static)
      for (int r = 0; r < m; ++r) {
        (void)model::Dequantize(w.quant.type, w.quant.bytes + (r0 + r) * rb, static_cast<size_t>(rb),
                                t + static_cast<int64_t>(r) * in, in);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, m, in, 1.0f, x, in, tile.data(), in, 0.0f,
                  part.data(), m);
      for (int i = 0; i < n; ++i) {
        float* dst = y + static_cast<int64_t>(i) * out + r0;
        const float* src = part.data() + static_cast<int64_t>(i) * m;
        for (int j = 0; j < m; ++j) dst[j] = accumulate ? dst[j] + src[j] : src[j];
      }
    }
    return;
  }
  if (w.quantized()) {
    // The weights in their GGUF blocks (model/quant_dot.h): activations to
    // int8 per block of 32, integer block dots. Each row's result depends
    // on its own activations only, so batches need nothing more.
    thread_local model::Q8Activations xq;
    absl::Status st = model::QuantizeActivations(x, n, in, &xq);
    if (st.ok()) {
      st = model::QuantMatmul(w.quant.type, w.quant.bytes, w.quant.size, out, in, xq, y, accumulate);
    }
    if (!st.ok()) {
      // Only a non-finite activation gets here (shapes were checked at
      // load): the float path would carry it into every output too.
      std::fill(y, y + static_cast<int64_t>(n) * out, std::numeric_limits<float>::quiet_NaN());
    }
    return;
  }
  if (batch) {
    BatchLinear(x, n, w.data.data(), out, in, y, accumulate);
  } else if (n == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w.data.data(), in, x, 1,
                accumulate ? 1.0f : 0.0f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w.data.data(),
                in, accumulate ? 1.0f : 0.0f, y, out);
  }
}

// y_g = x * W_g^T for products of one input (q/k/v, gate/up). Quantized
// decode rows go through one QuantMatmulGroup: the activations are quantized
// once and the team forks and joins once, where one Linear each would pay
// both per matrix (libgomp's passive wake-ups are most of a small model's
// decode step). Anything else is one Linear per product, unchanged.
void LinearGroup(const float* x, int n, std::initializer_list<std::pair<const Tensor*, float*>> products,
                 Rows kind) {
  bool grouped = kind != Rows::kPrefill;
  for (const auto& [w, y] : products) grouped = grouped && w->quantized();
  if (!grouped) {
    for (const auto& [w, y] : products) Linear(x, n, *w, y, false, kind);
    return;
  }
  const int in = static_cast<int>(products.begin()->first->cols());
  thread_local model::Q8Activations xq;
  absl::Status st = model::QuantizeActivations(x, n, in, &xq);
  absl::InlinedVector<model::QuantProduct, 3> group;
  for (const auto& [w, y] : products) {
    group.push_back({w->quant.type, w->quant.bytes, w->quant.size, w->rows(), y, false});
  }
  if (st.ok()) st = model::QuantMatmulGroup(group, xq);
  if (!st.ok()) {
    // As in Linear: only a non-finite activation gets here.
    for (const auto& [w, y] : products) std::fill(y, y + static_cast<int64_t>(n) * w->rows(),
                                                   std::numeric_limits<float>::quiet_NaN());
  }
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(ModelWeights w, int threads) : CpuBackend(std::move(w), threads, nullptr, nullptr) {}
  CpuBackend(ModelWeights w, int threads, kvhost::HostKvStore* host_store, kvhost::RemoteRowStore* remote_rows)
      : w_(std::move(w)),
        threads_(threads),
        host_store_(host_store),
        remote_rows_(remote_rows),
        inv_freq_(ref::RopeInvFreq(w_.config)),
        wq_f32_(w_.layers.size()),
        wq_once_(std::make_unique<std::once_flag[]>(w_.layers.size())) {}

  std::string_view name() const override { return "cpu"; }
  const ModelConfig& config() const override { return w_.config; }
  // NewSequence and a sequence's destructor touch only that sequence, the
  // thread-safe host stores and an atomic counter.
  bool ConcurrentSequenceLifetime() const override { return true; }

  using Backend::NewSequence;
  absl::StatusOr<std::unique_ptr<SequenceState>> NewSequence(int capacity,
                                                             const KvPlan& plan) override {
    if (capacity < 1 || capacity > w_.config.max_context) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "sequence capacity must be in [1, %d], got %d", w_.config.max_context, capacity));
    }
    if (auto st = plan.Validate(w_.config); !st.ok()) return st;
    for (size_t l = 0; l < plan.layers.size(); ++l) {
      const LayerKvPolicy& p = plan.layers[l];
      if (p.kind == KvPolicyKind::kQuant) {
        const QuantShape shape{.n_kv_heads = w_.config.n_kv_heads, .head_dim = w_.config.head_dim,
                               .capacity = capacity, .params = p.quant};
        if (auto st = shape.Validate(); !st.ok()) {
          return absl::InvalidArgumentError(absl::StrFormat("layer %d: quant: %s", l, st.message()));
        }
      }
      if (p.kind == KvPolicyKind::kWindow && (p.window.sink < 0 || p.window.recent < 1)) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "layer %d: window: sink must be >= 0 and recent >= 1, got %d and %d", l, p.window.sink,
            p.window.recent));
      }
    }
    const bool any_sparse = std::any_of(plan.layers.begin(), plan.layers.end(), [](const LayerKvPolicy& p) {
      return p.kind == KvPolicyKind::kSparse;
    });
    if ((host_store_ == nullptr && remote_rows_ == nullptr) || !any_sparse) {
      return std::make_unique<CpuSequence>(w_.config, capacity, plan);
    }
    // The co-located store first; remote nodes when it is full (or absent).
    absl::Status local_full;
    if (host_store_ != nullptr) {
      auto seq = NewHostStoreSequence(capacity, plan);
      if (seq.ok() || remote_rows_ == nullptr || !absl::IsResourceExhausted(seq.status())) return seq;
      local_full = seq.status();
    }
    {
      std::vector<uint64_t> sizes;
      for (size_t l = 0; l < plan.layers.size(); ++l) {
        const LayerKvPolicy& p = plan.layers[l];
        if (p.kind != KvPolicyKind::kSparse) continue;
        if (p.sparse.index != "gpu") {
          return absl::InvalidArgumentError(absl::StrFormat(
              "layer %d: sparse index \"%s\" reads every key of the host tier each step: not with a remote "
              "host tier (use index \"gpu\")", l, p.sparse.index));
        }
        sizes.push_back(static_cast<uint64_t>(SparseHostBytes(w_.config.n_kv_heads, w_.config.head_dim, capacity)));
      }
      const std::string session = absl::StrCat("cpu-", getpid(), "-", next_session_.fetch_add(1));
      auto slices = remote_rows_->Reserve(session, sizes);
      if (!slices.ok()) {
        return absl::Status(slices.status().code(),
                            absl::StrCat("remote host KV for the sparse layers: ", slices.status().message(),
                                         local_full.ok() ? "" : absl::StrCat(" (and ", local_full.message(), ")")));
      }
      return std::make_unique<CpuSequence>(w_.config, capacity, plan, std::vector<absl::Span<std::byte>>{}, nullptr,
                                           session, remote_rows_, std::move(*slices));
    }
  }

  // A sequence whose sparse layers' host tiers are slices of host_store_.
  absl::StatusOr<std::unique_ptr<SequenceState>> NewHostStoreSequence(int capacity, const KvPlan& plan) {
    // Every sparse layer's host tier in one request to the store.
    std::vector<uint64_t> sizes;
    for (const LayerKvPolicy& p : plan.layers) {
      if (p.kind == KvPolicyKind::kSparse) {
        sizes.push_back(static_cast<uint64_t>(SparseHostBytes(w_.config.n_kv_heads, w_.config.head_dim, capacity)));
      }
    }
    const std::string session = absl::StrCat("cpu-", getpid(), "-", next_session_.fetch_add(1));
    auto slices = host_store_->AllocateMany(sizes, 64, session);
    if (!slices.ok()) {
      return absl::Status(slices.status().code(),
                          absl::StrCat("host KV for the sparse layers: ", slices.status().message()));
    }
    std::vector<absl::Span<std::byte>> host;
    for (const kvhost::HostSlice& sl : *slices) {
      auto data = host_store_->Data(sl);
      if (!data.ok()) {
        host_store_->FreeOwner(session);
        return data.status();
      }
      host.push_back(*data);
    }
    return std::make_unique<CpuSequence>(w_.config, capacity, plan, std::move(host), host_store_, session);
  }

  using Backend::Forward;
  absl::Status Forward(SequenceState& state, absl::Span<const int32_t> tokens, bool all_logits,
                       std::vector<float>* logits, Mode mode) override {
    SequenceState* one[] = {&state};
    return Run(one, tokens, all_logits, logits, mode, 0, nullptr, /*batch=*/false);
  }
  absl::Status ForwardObserved(SequenceState& state, absl::Span<const int32_t> tokens,
                               int tap_queries, const LayerObserver& observer) override {
    if (auto st = ValidateObservedForward(w_.config, state, tokens, tap_queries); !st.ok()) {
      return st;
    }
    SequenceState* one[] = {&state};
    return Run(one, tokens, false, nullptr, Mode::kPrefill, tap_queries, &observer, /*batch=*/false);
  }
  // Each linear layer runs once over the batch (BatchLinear: weights read
  // once for all of them, sums in a fixed order);
  // attention per sequence as its plan says.
  absl::Status DecodeBatch(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                           std::vector<float>* logits) override {
    if (seqs.empty() || seqs.size() != tokens.size()) {
      return absl::InvalidArgumentError(absl::StrFormat("tokens: %d for %d sequences (one each, at least one)",
                                                        tokens.size(), seqs.size()));
    }
    return Run(seqs, tokens, true, logits, Mode::kDecode, 0, nullptr, /*batch=*/true);
  }
  absl::Status DecodeBatchIsolated(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                                   std::vector<float>* logits, std::vector<absl::Status>* per_seq) override {
    if (seqs.empty() || seqs.size() != tokens.size()) {
      return absl::InvalidArgumentError(absl::StrFormat("tokens: %d for %d sequences (one each, at least one)",
                                                        tokens.size(), seqs.size()));
    }
    per_seq->assign(seqs.size(), absl::OkStatus());
    return Run(seqs, tokens, true, logits, Mode::kDecode, 0, nullptr, /*batch=*/true, per_seq);
  }

 private:
  // Forward() of seqs[0] (batch false), or one decode step of each of
  // `seqs` with tokens[b] (batch true: row b is seqs[b]'s). With an
  // observer, calls it after every layer's attention and computes no logits.
  // per_seq (batch only): a sequence whose attention fails is recorded
  // there and left out of the rest of the step (its row computes zeros);
  // null: the first failure is the call's.
  absl::Status Run(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens, bool all_logits,
                   std::vector<float>* logits, Mode mode, int tap_queries,
                   const LayerObserver* observer, bool batch, std::vector<absl::Status>* per_seq = nullptr);
  // Attention of the n chunk queries against a layer as its policy says
  // (runtime/backend.h); non-dense layers read the chunk's K/V from k_/v_.
  // spec_x: a decode step's speculative input for sparse layers with index
  // "gpu": by the layer's query (kv_plan.h), the previous layer's normalized
  // input or the stream after its attention normalized by this layer's norm
  // (layer 0: its own input); unused for query "real".
  // prev_x: the previous layer's normalized input (refine's first pass).
  absl::Status LayerAttention(CpuSequence& seq, int layer, const float* q, int n, int start, bool decode,
                      const float* spec_x, const float* prev_x, float* out);
  // Causal attention over a view: query i sees rows [0, offset + i + 1).
  void Attention(const KvView& kv, const float* q, int n, int offset, float* out);
  // Copies chunk row i of every KV head (k_, v_) into rows `first` + i of a
  // [kv_head][head_stride] scratch.
  void CopyChunk(float* k, float* v, int64_t head_stride, int first, int n);
  // A sparse layer's prefill chunk and decode step (cpu_backend.h); with
  // `remote` (the sequence's remote host tier) rows come from the node once
  // the prompt was offloaded there, and a failure there is the step's.
  absl::Status SparsePrefill(SparseLayer& sp, const float* q, int n, int start, float* out,
                             kvhost::RemoteRowStore* remote);
  absl::Status SparseDecode(SparseLayer& sp, int layer, const float* q, int start, const float* spec_x,
                            const float* prev_x, float* out, kvhost::RemoteRowStore* remote);
  // Ends the prompt of a sparse layer at P tokens: max|K|, kept rows,
  // generated rows reserved for the rest of the capacity; with `remote`,
  // writes the prompt's rows to the node and drops them here.
  absl::Status EndSparsePrompt(SparseLayer& sp, int prompt, int capacity, kvhost::RemoteRowStore* remote);
  // Rows `rows` (positions) of every KV head of an offloaded layer, K and V,
  // from the node in one request: out_k / out_v [kv_head][rows.size()][head_dim].
  absl::Status GatherRemote(const SparseLayer& sp, kvhost::RemoteRowStore* remote,
                            const std::vector<std::vector<int>>& rows, float* out_k, float* out_v,
                            int64_t out_head_stride);

  // Layer l's query weights as floats: the speculative query reads rows of
  // them (sparse_reference.h). A quantized wq is dequantized the first time
  // a sparse layer asks, so dense-only serving never holds the copy.
  const float* QueryWeights(int l) {
    const model::Tensor& wq = w_.layers[static_cast<size_t>(l)].wq;
    if (!wq.quantized()) return wq.data.data();
    std::call_once(wq_once_[static_cast<size_t>(l)], [&] {
      std::vector<float>& f = wq_f32_[static_cast<size_t>(l)];
      f.resize(static_cast<size_t>(wq.rows() * wq.cols()));
      (void)model::Dequantize(wq.quant.type, wq.quant.bytes, static_cast<size_t>(wq.quant.size), f.data(),
                              wq.rows() * wq.cols());
    });
    return wq_f32_[static_cast<size_t>(l)].data();
  }

  ModelWeights w_;
  int threads_;
  kvhost::HostKvStore* host_store_ = nullptr;  // not owned; null: plain memory
  kvhost::RemoteRowStore* remote_rows_ = nullptr;  // not owned; null: not remote
  std::atomic<uint64_t> next_session_{0};
  std::vector<float> inv_freq_;
  std::vector<std::vector<float>> wq_f32_;
  std::unique_ptr<std::once_flag[]> wq_once_;
  // Scratch reused across calls (resized, never shrunk).
  std::vector<float> x_, xn_, q_, k_, v_, attn_, gate_, up_, scores_;
  // Full-precision [history | chunk] K/V of a non-dense layer's prefill chunk.
  std::vector<float> chunk_k_, chunk_v_;
  // A decode step's normalized attention input of the current and the
  // previous layer, and the previous layer's stream after its attention
  // under this layer's norm (speculative queries of index "gpu").
  std::vector<float> xn_cur_, xn_prev_, xn_late_;
};

absl::Status CpuBackend::Run(absl::Span<SequenceState* const> states, absl::Span<const int32_t> tokens,
                             bool all_logits, std::vector<float>* logits, Mode mode,
                             int tap_queries, const LayerObserver* observer, bool batch,
                             std::vector<absl::Status>* per_seq) {
  // Row i of this call belongs to seqs[batch ? i : 0], at position pos[i].
  std::vector<CpuSequence*> seqs(states.size());
  for (size_t b = 0; b < states.size(); ++b) {
    seqs[b] = dynamic_cast<CpuSequence*>(states[b]);
    if (seqs[b] == nullptr) {
      return absl::InvalidArgumentError(absl::StrFormat("sequence %d was not made by the CPU backend", b));
    }
    for (size_t a = 0; a < b; ++a) {
      if (seqs[a] == seqs[b]) return absl::InvalidArgumentError(absl::StrFormat("sequences %d and %d are one", a, b));
    }
    const absl::Span<const int32_t> mine = batch ? tokens.subspan(b, 1) : tokens;
    if (auto st = ValidateForwardInput(w_.config, *seqs[b], mine, mode); !st.ok()) {
      return batch ? absl::Status(st.code(), absl::StrFormat("sequence %d: %s", b, st.message())) : st;
    }
  }
  CpuSequence* seq = seqs[0];
  const bool decode = batch || IsDecode(*seq, tokens, mode);
  const Rows rows_kind = batch ? Rows::kDecodeBatch : (decode ? Rows::kDecode : Rows::kPrefill);
  const ModelConfig& c = w_.config;
  const int n = static_cast<int>(tokens.size());
  const int start = seq->length();
  std::vector<int> pos(n);
  for (int i = 0; i < n; ++i) pos[i] = batch ? seqs[i]->length() : start + i;
  auto row_seq = [&](int i) { return batch ? seqs[i] : seq; };
  omp_set_num_threads(threads_);
  openblas_set_num_threads(threads_);

  const int H = c.hidden, hd = c.head_dim, nh = c.n_heads, nkv = c.n_kv_heads;
  const int64_t nq_dim = static_cast<int64_t>(nh) * hd, nkv_dim = static_cast<int64_t>(nkv) * hd;
  x_.resize(static_cast<size_t>(n) * H);
  xn_.resize(x_.size());
  q_.resize(n * nq_dim);
  k_.resize(n * nkv_dim);
  v_.resize(n * nkv_dim);
  attn_.resize(n * nq_dim);
  gate_.resize(static_cast<size_t>(n) * c.ffn);
  up_.resize(gate_.size());

  const model::Tensor& embd = w_.tok_embd;
  for (int i = 0; i < n; ++i) {
    float* row = &x_[static_cast<size_t>(i) * H];
    if (embd.quantized()) {
      const int64_t rb = embd.quant_row_bytes();
      // Cannot fail: the row's size was checked at load, the id by the caller.
      (void)model::Dequantize(embd.quant.type, embd.quant.bytes + tokens[i] * rb, static_cast<size_t>(rb), row, H);
    } else {
      std::memcpy(row, &embd.data[static_cast<size_t>(tokens[i]) * H], sizeof(float) * H);
    }
  }
  for (int l = 0; l < c.n_layers; ++l) {
    const model::LayerWeights& L = w_.layers[l];
#pragma omp parallel for if (n > 1)  // one row: no fork (a wake-up costs more)
    for (int i = 0; i < n; ++i) {
      ref::RmsNorm(&x_[static_cast<size_t>(i) * H], L.attn_norm.data.data(), H, c.rms_eps,
                   &xn_[static_cast<size_t>(i) * H]);
    }
    if (decode) {  // every row is a decode step: keep each one's normalized input
      xn_prev_.swap(xn_cur_);
      xn_cur_.assign(xn_.begin(), xn_.begin() + static_cast<size_t>(n) * H);
      if (l == 0) xn_prev_ = xn_cur_;
    }
    LinearGroup(xn_.data(), n, {{&L.wq, q_.data()}, {&L.wk, k_.data()}, {&L.wv, v_.data()}}, rows_kind);
#pragma omp parallel for if (n > 1)  // one row: no fork (a wake-up costs more)
    for (int i = 0; i < n; ++i) {
      CpuSequence* rs = row_seq(i);
      const bool dense = rs->kind(l) == KvPolicyKind::kDense;
      for (int h = 0; h < nh; ++h) ref::ApplyRope(&q_[i * nq_dim + h * hd], hd, pos[i], inv_freq_, c.rope_style);
      for (int h = 0; h < nkv; ++h) {
        ref::ApplyRope(&k_[i * nkv_dim + h * hd], hd, pos[i], inv_freq_, c.rope_style);
        if (!dense) continue;  // the layer's store takes k_/v_ in LayerAttention
        std::memcpy(rs->k(l, h) + static_cast<int64_t>(pos[i]) * hd, &k_[i * nkv_dim + h * hd],
                    sizeof(float) * hd);
        std::memcpy(rs->v(l, h) + static_cast<int64_t>(pos[i]) * hd, &v_[i * nkv_dim + h * hd],
                    sizeof(float) * hd);
      }
    }
    // A decode row's speculative input for its sparse layer (kv_plan.h).
    auto spec_of = [&](int i) -> const float* {
      const SparseLayer* sp = row_seq(i)->kind(l) == KvPolicyKind::kSparse ? row_seq(i)->sparse(l) : nullptr;
      const bool late = l > 0 && sp != nullptr && sp->params.query == "after-attention";
      return (late ? xn_late_.data() : xn_prev_.data()) + static_cast<size_t>(i) * H;
    };
    if (!batch) {
      RETURN_IF_ERROR(LayerAttention(*seq, l, q_.data(), n, start, decode, decode ? spec_of(0) : nullptr,
                                     decode ? xn_prev_.data() : nullptr, attn_.data()));
    } else {
      for (int b = 0; b < n; ++b) {
        // LayerAttention reads a decode step's K/V from row 0 of k_/v_;
        // rows before b are done with.
        if (b > 0) {
          std::memcpy(k_.data(), &k_[b * nkv_dim], sizeof(float) * nkv_dim);
          std::memcpy(v_.data(), &v_[b * nkv_dim], sizeof(float) * nkv_dim);
        }
        if (per_seq != nullptr && !(*per_seq)[b].ok()) {
          std::fill_n(&attn_[b * nq_dim], nq_dim, 0.0f);  // failed earlier: out of this step
          continue;
        }
        absl::Status st = LayerAttention(*seqs[b], l, &q_[b * nq_dim], 1, pos[b], true, spec_of(b),
                                         &xn_prev_[static_cast<size_t>(b) * H], &attn_[b * nq_dim]);
        if (!st.ok()) {
          // A remote host tier's node failing ends its own sequences only.
          if (per_seq == nullptr) return st;
          (*per_seq)[b] = std::move(st);
          std::fill_n(&attn_[b * nq_dim], nq_dim, 0.0f);
        }
      }
    }
    if (observer != nullptr) {
      const KvView kv = seq->dense_view(l);
      const LayerTap tap{.layer = l,
                         .n_keys = start + n,
                         .first_query = start + n - tap_queries,
                         .n_queries = tap_queries,
                         .q = &q_[(n - tap_queries) * nq_dim],
                         .k = kv.k,
                         .v = kv.v,
                         .kv_head_stride = kv.head_stride};
      if (auto st = (*observer)(tap); !st.ok()) return st;
    }
    Linear(attn_.data(), n, L.wo, x_.data(), /*accumulate=*/true, rows_kind);
    if (decode && l + 1 < c.n_layers) {
      // Query "after-attention" of layer l + 1: its own norm over the stream now.
      xn_late_.resize(static_cast<size_t>(n) * H);
      for (int i = 0; i < n; ++i) {
        ref::RmsNorm(&x_[static_cast<size_t>(i) * H], w_.layers[l + 1].attn_norm.data.data(), H, c.rms_eps,
                     &xn_late_[static_cast<size_t>(i) * H]);
      }
    }

#pragma omp parallel for if (n > 1)  // one row: no fork (a wake-up costs more)
    for (int i = 0; i < n; ++i) {
      ref::RmsNorm(&x_[static_cast<size_t>(i) * H], L.ffn_norm.data.data(), H, c.rms_eps,
                   &xn_[static_cast<size_t>(i) * H]);
    }
    LinearGroup(xn_.data(), n, {{&L.w_gate, gate_.data()}, {&L.w_up, up_.data()}}, rows_kind);
    const int64_t total = static_cast<int64_t>(n) * c.ffn;
#pragma omp parallel for if (total > 4096)
    for (int64_t b = 0; b < total; b += 4096) {
      ref::SwiGlu(&gate_[b], &up_[b], std::min<int64_t>(4096, total - b));
    }
    Linear(gate_.data(), n, L.w_down, x_.data(), /*accumulate=*/true, rows_kind);
  }
  if (batch) {
    for (int b = 0; b < n; ++b) seqs[b]->set_length(pos[b] + 1);
  } else {
    seq->set_length(start + n);
  }
  if (observer != nullptr) return absl::OkStatus();

  const int first = all_logits ? 0 : n - 1;
  const int rows = n - first;
#pragma omp parallel for if (rows > 1)
  for (int i = first; i < n; ++i) {
    ref::RmsNorm(&x_[static_cast<size_t>(i) * H], w_.output_norm.data.data(), H, c.rms_eps,
                 &xn_[static_cast<size_t>(i) * H]);
  }
  logits->resize(static_cast<size_t>(rows) * c.vocab);
  // The head takes its rows as the layers did: a prompt's rows as prefill
  // rows (float activations), a decode step's as decode rows.
  Linear(&xn_[static_cast<size_t>(first) * H], rows, w_.head(), logits->data(), false, rows_kind);
  return absl::OkStatus();
}

void CpuBackend::CopyChunk(float* k, float* v, int64_t head_stride, int first, int n) {
  const int hd = w_.config.head_dim, nkv = w_.config.n_kv_heads;
  const int64_t nkv_dim = static_cast<int64_t>(nkv) * hd;
  for (int h = 0; h < nkv; ++h) {
    for (int i = 0; i < n; ++i) {
      const int64_t dst = h * head_stride + static_cast<int64_t>(first + i) * hd;
      std::memcpy(k + dst, &k_[i * nkv_dim + h * hd], sizeof(float) * hd);
      std::memcpy(v + dst, &v_[i * nkv_dim + h * hd], sizeof(float) * hd);
    }
  }
}

absl::Status CpuBackend::LayerAttention(CpuSequence& seq, int layer, const float* q, int n, int start,
                                bool decode, const float* spec_x, const float* prev_x, float* out) {
  const ModelConfig& c = w_.config;
  const int hd = c.head_dim, nkv = c.n_kv_heads, nh = c.n_heads;
  switch (seq.kind(layer)) {
    case KvPolicyKind::kDense:
      Attention(seq.dense_view(layer), q, n, start, out);
      return absl::OkStatus();
    case KvPolicyKind::kQuant: {
      QuantKvCpu& store = *seq.quant(layer);
      const int R = store.shape().params.residual;
      if (decode) {
        // Decode: k_/v_ hold [kv_head][head_dim], Append's layout.
        store.Append(start, k_.data(), v_.data());
        const int len = start + 1;
        const int64_t res = store.shape().residual_elems_per_head();
        if (QuantizedKeys(len, R) == 0 && QuantizedValues(len, R) == 0) {
          // Nothing quantized yet: the rings hold positions [0, len) in
          // order, so this is plain attention (the dense code, same bits).
          Attention({store.k_res().data(), store.v_res().data(), res}, q, 1, start, out);
          return absl::OkStatus();
        }
        const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
        const int group = nh / nkv;
#pragma omp parallel
        {
          std::vector<float> scores(len);
#pragma omp for
          for (int h = 0; h < nh; ++h) {
            store.AttendHead(q + static_cast<int64_t>(h) * hd, h / group, len, scale, scores.data(),
                             out + static_cast<int64_t>(h) * hd);
          }
        }
        return absl::OkStatus();
      }
      // Prefill chunk: history as stored (dequantized + exact residual),
      // the chunk in full precision, then pack.
      const int64_t stride = static_cast<int64_t>(start + n) * hd;
      chunk_k_.resize(stride * nkv);
      chunk_v_.resize(stride * nkv);
      store.Materialize(start, chunk_k_.data(), chunk_v_.data(), stride);
      CopyChunk(chunk_k_.data(), chunk_v_.data(), stride, start, n);
      Attention({chunk_k_.data(), chunk_v_.data(), stride}, q, n, start, out);
      store.Pack(chunk_k_.data(), chunk_v_.data(), stride, start, start + n);
      return absl::OkStatus();
    }
    case KvPolicyKind::kWindow: {
      WindowStore& w = seq.window(layer);
      auto store_rows = [&](int first_pos, int count) {
        // Writes chunk rows whose positions stay kept (sink, or among the
        // last `ring` positions of the sequence after the chunk).
        const int end = first_pos + count;
        for (int h = 0; h < nkv; ++h) {
          for (int i = 0; i < count; ++i) {
            const int p = first_pos + i;
            if (p >= w.sink && p < end - w.ring) continue;
            const int64_t dst = h * w.head_stride + static_cast<int64_t>(w.Row(p)) * hd;
            std::memcpy(&w.k[dst], &k_[(static_cast<int64_t>(i) * nkv + h) * hd], sizeof(float) * hd);
            std::memcpy(&w.v[dst], &v_[(static_cast<int64_t>(i) * nkv + h) * hd], sizeof(float) * hd);
          }
        }
      };
      if (decode) {
        store_rows(start, 1);
        // Every stored row is a kept token; order does not change attention.
        const int kept = std::min(start + 1, w.rows);
        Attention({w.k.data(), w.v.data(), w.head_stride}, q, 1, kept - 1, out);
        return absl::OkStatus();
      }
      // Prefill chunk: kept history compacted in position order, then the chunk.
      const int hist = std::min(start, w.rows);
      const int64_t stride = static_cast<int64_t>(hist + n) * hd;
      chunk_k_.resize(stride * nkv);
      chunk_v_.resize(stride * nkv);
      for (int h = 0; h < nkv; ++h) {
        for (int r = 0; r < hist; ++r) {
          // r-th kept position: the sink, then the last `hist - sink` ones.
          const int p = (start <= w.rows || r < w.sink) ? r : start - (hist - r);
          const int64_t src = h * w.head_stride + static_cast<int64_t>(w.Row(p)) * hd;
          std::memcpy(&chunk_k_[h * stride + static_cast<int64_t>(r) * hd], &w.k[src], sizeof(float) * hd);
          std::memcpy(&chunk_v_[h * stride + static_cast<int64_t>(r) * hd], &w.v[src], sizeof(float) * hd);
        }
      }
      CopyChunk(chunk_k_.data(), chunk_v_.data(), stride, hist, n);
      Attention({chunk_k_.data(), chunk_v_.data(), stride}, q, n, hist, out);
      store_rows(start, n);
      return absl::OkStatus();
    }
    case KvPolicyKind::kSparse: {
      SparseLayer& sp = *seq.sparse(layer);
      if (decode) {
        if (!sp.prompt_ended()) RETURN_IF_ERROR(EndSparsePrompt(sp, start, seq.capacity(), seq.remote()));
        return SparseDecode(sp, layer, q, start, spec_x, prev_x, out, seq.remote());
      } else {
        return SparsePrefill(sp, q, n, start, out, seq.remote());
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::EndSparsePrompt(SparseLayer& sp, int prompt, int capacity,
                                         kvhost::RemoteRowStore* remote) {
  const int hd = w_.config.head_dim, nkv = w_.config.n_kv_heads;
  sp.prompt = prompt;
  sp.sink = std::min(sp.params.sink, prompt);
  sp.recent = std::min(sp.params.recent, prompt - sp.sink);
  const int gen_cap = capacity - prompt;
  sp.head_stride = static_cast<int64_t>(sp.kept_cap + gen_cap) * hd;
  sp.k.assign(sp.head_stride * nkv, 0.0f);
  sp.v.assign(sp.k.size(), 0.0f);
  for (int h = 0; h < nkv; ++h) {
    const float* hk = sp.host.k(h);
    const float* hv = sp.host.v(h);
    // max|K| over the prompt: kept up to date by every prefill chunk.
    float* mx = &sp.max_abs_k[static_cast<size_t>(h) * hd];
    float* dk = sp.k.data() + h * sp.head_stride;
    float* dv = sp.v.data() + h * sp.head_stride;
    std::memcpy(dk, hk, sizeof(float) * sp.sink * hd);
    std::memcpy(dv, hv, sizeof(float) * sp.sink * hd);
    const int64_t from = static_cast<int64_t>(prompt - sp.recent) * hd;
    std::memcpy(dk + static_cast<int64_t>(sp.sink) * hd, hk + from, sizeof(float) * sp.recent * hd);
    std::memcpy(dv + static_cast<int64_t>(sp.sink) * hd, hv + from, sizeof(float) * sp.recent * hd);
    if (!sp.gpu_index) continue;
    // Index "gpu": channels fixed now from the last prompt token's query,
    // and those channels of every prompt key copied into the index.
    const int d = sp.params.channels;
    int32_t* ch = &sp.chans[static_cast<size_t>(h) * d];
    (void)ChooseChannels(&sp.last_q_mean[static_cast<size_t>(h) * hd], mx, hd, d, ch);
    float* idx = sp.index.data() + h * sp.index_head_stride;
    const bool fp8 = sp.params.index_bits == 8;
    for (int p = 0; p < prompt; ++p) {
      for (int j = 0; j < d; ++j) {
        const float k = hk[static_cast<int64_t>(p) * hd + ch[j]];
        idx[static_cast<int64_t>(p) * d + j] = fp8 ? Fp8E4M3ToFloat(FloatToFp8E4M3(k)) : k;
      }
    }
    if (sp.params.index_bits == 4) {
      // KIVI's key quantization: per channel, blocks of kIndexBlock positions.
      for (int b = 0; b < prompt; b += kIndexBlock) {
        const int n = std::min(kIndexBlock, prompt - b);
        for (int j = 0; j < d; ++j) RoundIndexBlock4(idx + static_cast<int64_t>(b) * d + j, n, d);
      }
    }
  }
  if (remote == nullptr) return absl::OkStatus();
  // The prompt's rows to the node (the slice has SparseHostStore's layout:
  // K of every head, then V), then the staging memory goes.
  const size_t rows_bytes = sizeof(float) * static_cast<size_t>(prompt) * hd;
  for (int h = 0; h < nkv; ++h) {
    const auto* k = reinterpret_cast<const std::byte*>(sp.host.k(h));
    const auto* v = reinterpret_cast<const std::byte*>(sp.host.v(h));
    const uint64_t k_at = sizeof(float) * static_cast<uint64_t>(h) * sp.host.head_stride();
    const uint64_t v_at = k_at + sizeof(float) * static_cast<uint64_t>(nkv) * sp.host.head_stride();
    RETURN_IF_ERROR(remote->Write(sp.remote_slice, k_at, absl::MakeConstSpan(k, rows_bytes)));
    RETURN_IF_ERROR(remote->Write(sp.remote_slice, v_at, absl::MakeConstSpan(v, rows_bytes)));
  }
  sp.remote_head_stride = sp.host.head_stride();
  sp.remote_bytes = sp.host.bytes();
  sp.host = SparseHostStore();
  sp.offloaded = true;
  return absl::OkStatus();
}

absl::Status CpuBackend::SparsePrefill(SparseLayer& sp, const float* q, int n, int start, float* out,
                                       kvhost::RemoteRowStore* remote) {
  const int hd = w_.config.head_dim, nkv = w_.config.n_kv_heads;
  if (!sp.prompt_ended()) {
    if (sp.gpu_index) {
      // The last prompt token's group-mean query picks the index's channels
      // if the prompt ends after this chunk.
      const int group = w_.config.n_heads / nkv;
      const float* last = q + static_cast<int64_t>(n - 1) * w_.config.n_heads * hd;
      for (int h = 0; h < nkv; ++h) {
        float* m = &sp.last_q_mean[static_cast<size_t>(h) * hd];
        for (int d = 0; d < hd; ++d) {
          float sum = 0.0f;
          for (int g = 0; g < group; ++g) sum += last[static_cast<int64_t>(h * group + g) * hd + d];
          m[d] = sum / static_cast<float>(group);
        }
      }
    }
    // The host tier is the dense layout of the prompt: attend over it as is.
    CopyChunk(sp.host.k(0), sp.host.v(0), sp.host.head_stride(), start, n);
    Attention({sp.host.k(0), sp.host.v(0), sp.host.head_stride()}, q, n, start, out);
    // max|K| over the chunk as computed (before any FP8 rounding), as the GPU.
    for (int h = 0; h < nkv; ++h) {
      float* mx = &sp.max_abs_k[static_cast<size_t>(h) * hd];
      const float* rows = sp.host.k(h) + static_cast<int64_t>(start) * hd;
      for (int i = 0; i < n; ++i) {
        for (int d = 0; d < hd; ++d) mx[d] = std::max(mx[d], std::fabs(rows[static_cast<int64_t>(i) * hd + d]));
      }
    }
    if (sp.params.host_bits == 8) {
      // The chunk attended in full precision; it is kept as FP8 E4M3 (as the
      // GPU does: history read back from the host tier, the chunk from its
      // scratch).
      for (int h = 0; h < nkv; ++h) {
        for (float* base : {sp.host.k(h), sp.host.v(h)}) {
          float* rows = base + static_cast<int64_t>(start) * hd;
          for (int64_t i = 0; i < static_cast<int64_t>(n) * hd; ++i) {
            rows[i] = Fp8E4M3ToFloat(FloatToFp8E4M3(rows[i]));
          }
        }
      }
    }
    return absl::OkStatus();
  }
  // After a decode step: [prompt (host) | generated (device) | chunk], all
  // full precision, then the chunk joins the generated rows.
  const int P = sp.prompt;
  const int64_t stride = static_cast<int64_t>(start + n) * hd;
  chunk_k_.resize(stride * nkv);
  chunk_v_.resize(stride * nkv);
  const int64_t kept_rows = static_cast<int64_t>(sp.kept_cap) * hd;
  if (sp.offloaded) {
    // Every prompt row back from the node (a prompt continued after decode
    // steps: rare, and as costly as it sounds).
    std::vector<std::vector<int>> all(nkv, std::vector<int>(P));
    for (auto& r : all) std::iota(r.begin(), r.end(), 0);
    RETURN_IF_ERROR(GatherRemote(sp, remote, all, chunk_k_.data(), chunk_v_.data(), stride));
  }
  for (int h = 0; h < nkv; ++h) {
    if (!sp.offloaded) {
      std::memcpy(&chunk_k_[h * stride], sp.host.k(h), sizeof(float) * P * hd);
      std::memcpy(&chunk_v_[h * stride], sp.host.v(h), sizeof(float) * P * hd);
    }
    std::memcpy(&chunk_k_[h * stride + static_cast<int64_t>(P) * hd], &sp.k[h * sp.head_stride + kept_rows],
                sizeof(float) * sp.generated * hd);
    std::memcpy(&chunk_v_[h * stride + static_cast<int64_t>(P) * hd], &sp.v[h * sp.head_stride + kept_rows],
                sizeof(float) * sp.generated * hd);
  }
  CopyChunk(chunk_k_.data(), chunk_v_.data(), stride, start, n);
  Attention({chunk_k_.data(), chunk_v_.data(), stride}, q, n, start, out);
  CopyChunk(sp.k.data() + kept_rows, sp.v.data() + kept_rows, sp.head_stride, sp.generated, n);
  sp.generated += n;
  return absl::OkStatus();
}

absl::Status CpuBackend::GatherRemote(const SparseLayer& sp, kvhost::RemoteRowStore* remote,
                                      const std::vector<std::vector<int>>& rows, float* out_k, float* out_v,
                                      int64_t out_head_stride) {
  if (remote == nullptr) return absl::InternalError("GatherRemote: an offloaded layer without its remote store");
  const int hd = w_.config.head_dim, nkv = w_.config.n_kv_heads;
  const uint32_t row_bytes = static_cast<uint32_t>(sizeof(float) * hd);
  const uint64_t v_base = sizeof(float) * static_cast<uint64_t>(nkv) * sp.remote_head_stride;
  // At most kMaxGatherBytes a request: every head's K and V rows of a span
  // of row numbers (one request a layer for a decode step's selection).
  size_t per_head = 0;
  for (const auto& r : rows) per_head = std::max(per_head, r.size());
  const size_t span = std::max<size_t>(
      1, kvhost::kMaxGatherBytes / (2 * static_cast<size_t>(nkv) * row_bytes));
  std::vector<std::byte> buf;
  for (size_t lo = 0; lo < per_head; lo += span) {
    std::vector<kvhost::RowRequest> req;
    size_t bytes = 0;
    for (int h = 0; h < nkv; ++h) {
      const size_t hi = std::min(rows[h].size(), lo + span);
      if (lo >= hi) continue;
      for (int kv = 0; kv < 2; ++kv) {
        kvhost::RowRequest r{.slice_id = sp.remote_slice,
                             .offset = (kv == 0 ? 0 : v_base) + sizeof(float) * static_cast<uint64_t>(h) * sp.remote_head_stride,
                             .stride = row_bytes,
                             .row_bytes = row_bytes,
                             .rows = {}};
        r.rows.assign(rows[h].begin() + lo, rows[h].begin() + hi);
        bytes += r.rows.size() * row_bytes;
        req.push_back(std::move(r));
      }
    }
    buf.resize(bytes);
    absl::Status st = remote->Gather(req, absl::MakeSpan(buf));
    if (absl::IsUnavailable(st)) st = remote->Gather(req, absl::MakeSpan(buf));  // the stream opens again
    if (!st.ok()) return absl::Status(st.code(), absl::StrCat("remote host tier: ", st.message()));
    const std::byte* at = buf.data();
    for (int h = 0; h < nkv; ++h) {
      const size_t hi = std::min(rows[h].size(), lo + span);
      if (lo >= hi) continue;
      const size_t n = (hi - lo) * row_bytes;
      std::memcpy(out_k + h * out_head_stride + static_cast<int64_t>(lo) * hd, at, n);
      at += n;
      std::memcpy(out_v + h * out_head_stride + static_cast<int64_t>(lo) * hd, at, n);
      at += n;
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::SparseDecode(SparseLayer& sp, int layer, const float* q, int start,
                                      const float* spec_x, const float* prev_x, float* out,
                                      kvhost::RemoteRowStore* remote) {
  const ModelConfig& c = w_.config;
  const int hd = c.head_dim, nkv = c.n_kv_heads, group = c.n_heads / c.n_kv_heads;
  const int64_t kept_rows = static_cast<int64_t>(sp.kept_cap) * hd;
  // The token joins the generated rows (never evicted).
  CopyChunk(sp.k.data() + kept_rows, sp.v.data() + kept_rows, sp.head_stride, sp.generated, 1);
  sp.generated += 1;
  const int P = sp.prompt;
  const int first = sp.sink, end = P - sp.recent;  // candidates
  const int selected = std::clamp(end - first, 0, sp.params.top_k);
  const int rows = sp.sink + selected + sp.recent + sp.generated;
  const int64_t stride = static_cast<int64_t>(rows) * hd;
  chunk_k_.resize(stride * nkv);
  chunk_v_.resize(stride * nkv);
  sp.last_selection.resize(nkv);
  const int d_s = sp.params.channels;
  std::vector<float> q_spec;
  const bool group_max = sp.gpu_index && sp.params.group_score == "max";
  if (group_max) {
    // Every query head's own query on its KV head's channels.
    q_spec.resize(static_cast<size_t>(c.n_heads) * d_s);
    if (sp.params.query == "real") {
      for (int qh = 0; qh < c.n_heads; ++qh) {
        for (int j = 0; j < d_s; ++j) {
          const int ch = sp.chans[static_cast<size_t>(qh / group) * d_s + j];
          q_spec[static_cast<size_t>(qh) * d_s + j] = q[static_cast<int64_t>(qh) * hd + ch];
        }
      }
    } else {
      SpeculativeQueryHeads(spec_x, QueryWeights(layer), c.hidden, c.n_heads, nkv, hd,
                            sp.chans.data(), d_s, start, inv_freq_.data(),
                            c.rope_style == model::RopeStyle::kAdjacentPairs, q_spec.data());
    }
  } else if (sp.gpu_index && sp.params.query == "real") {
    // The real query's group mean on the fixed channels.
    q_spec.assign(static_cast<size_t>(nkv) * d_s, 0.0f);
    for (int h = 0; h < nkv; ++h) {
      for (int j = 0; j < d_s; ++j) {
        const int ch = sp.chans[static_cast<size_t>(h) * d_s + j];
        float sum = 0.0f;
        for (int g = 0; g < group; ++g) sum += q[static_cast<int64_t>(h * group + g) * hd + ch];
        q_spec[static_cast<size_t>(h) * d_s + j] = sum / static_cast<float>(group);
      }
    }
  } else if (sp.gpu_index) {
    // The speculative query on the fixed channels (cpu_backend.h).
    q_spec.resize(static_cast<size_t>(nkv) * d_s);
    SpeculativeQueryMean(spec_x, QueryWeights(layer), c.hidden, c.n_heads, nkv, hd,
                         sp.chans.data(), d_s, start, inv_freq_.data(),
                         c.rope_style == model::RopeStyle::kAdjacentPairs, q_spec.data());
  }
  // Refine: the candidates of TailorKV's speculative query come first.
  std::vector<float> q_prev;
  if (sp.gpu_index && sp.params.refine > 0) {
    q_prev.resize(static_cast<size_t>(nkv) * d_s);
    SpeculativeQueryMean(prev_x, QueryWeights(layer), c.hidden, c.n_heads, nkv, hd,
                         sp.chans.data(), d_s, start, inv_freq_.data(),
                         c.rope_style == model::RopeStyle::kAdjacentPairs, q_prev.data());
  }
#pragma omp parallel for
  for (int h = 0; h < nkv; ++h) {
    std::vector<int>& sel = sp.last_selection[h];
    if (sp.gpu_index) {
      const int n_cand = std::max(end - first, 0);
      std::vector<float> approx(n_cand);
      const float* rows = sp.index.data() + h * sp.index_head_stride + static_cast<int64_t>(first) * d_s;
      if (group_max) {
        std::vector<float> mine(n_cand);
        for (int g = 0; g < group; ++g) {
          ScoreOnChannels(&q_spec[static_cast<size_t>(h * group + g) * d_s], d_s, rows, n_cand,
                          g == 0 ? approx.data() : mine.data());
          if (g > 0) {
            for (int i = 0; i < n_cand; ++i) approx[i] = std::max(approx[i], mine[i]);
          }
        }
      } else {
        ScoreOnChannels(&q_spec[static_cast<size_t>(h) * d_s], d_s, rows, n_cand, approx.data());
      }
      std::vector<int32_t> picked(selected);
      if (!q_prev.empty()) {
        // Top-(refine x top_k) by the previous layer's speculation, then the
        // Top-K of those by this layer's query (both ascending: the mapping
        // keeps the order).
        std::vector<float> prev_scores(n_cand);
        ScoreOnChannels(&q_prev[static_cast<size_t>(h) * d_s], d_s, rows, n_cand, prev_scores.data());
        const int n_pool = std::min<int64_t>(n_cand, static_cast<int64_t>(sp.params.refine) * sp.params.top_k);
        std::vector<int32_t> pool(n_pool);
        (void)TopKIndices(prev_scores.data(), n_cand, n_pool, pool.data());
        std::vector<float> pooled(n_pool);
        for (int i = 0; i < n_pool; ++i) pooled[i] = approx[pool[i]];
        std::vector<int32_t> in_pool(selected);
        (void)TopKIndices(pooled.data(), n_pool, selected, in_pool.data());
        MapThroughPool(in_pool.data(), selected, pool.data(), n_pool, 1, picked.data());
      } else {
        (void)TopKIndices(approx.data(), n_cand, selected, picked.data());
      }
      sel.assign(picked.begin(), picked.end());
      for (int& p : sel) p += first;
    } else {
      std::vector<float> q_mean(hd, 0.0f);
      for (int g = 0; g < group; ++g) {
        const float* qh = q + static_cast<int64_t>(h * group + g) * hd;
        for (int d = 0; d < hd; ++d) q_mean[d] += qh[d];
      }
      for (int d = 0; d < hd; ++d) q_mean[d] /= static_cast<float>(group);
      SparseSelectCpu(q_mean.data(), &sp.max_abs_k[static_cast<size_t>(h) * hd], sp.host.k(h), hd,
                      first, end, d_s, sp.params.top_k, &sel);
    }
    // Gather in position order: sink, selected, recent, generated.
    float* gk = &chunk_k_[h * stride];
    float* gv = &chunk_v_[h * stride];
    const float* dk = sp.k.data() + h * sp.head_stride;
    const float* dv = sp.v.data() + h * sp.head_stride;
    const size_t row = sizeof(float) * hd;
    std::memcpy(gk, dk, row * sp.sink);
    std::memcpy(gv, dv, row * sp.sink);
    int64_t at = static_cast<int64_t>(sp.sink) * hd;
    if (!sp.offloaded) {
      for (int p : sel) {
        std::memcpy(gk + at, sp.host.k(h) + static_cast<int64_t>(p) * hd, row);
        std::memcpy(gv + at, sp.host.v(h) + static_cast<int64_t>(p) * hd, row);
        at += hd;
      }
    } else {
      at += static_cast<int64_t>(sel.size()) * hd;  // filled from the node below
    }
    std::memcpy(gk + at, dk + static_cast<int64_t>(sp.sink) * hd, row * sp.recent);
    std::memcpy(gv + at, dv + static_cast<int64_t>(sp.sink) * hd, row * sp.recent);
    at += static_cast<int64_t>(sp.recent) * hd;
    std::memcpy(gk + at, dk + kept_rows, row * sp.generated);
    std::memcpy(gv + at, dv + kept_rows, row * sp.generated);
  }
  if (sp.offloaded) {
    // Every head's selected rows in one request to the node.
    RETURN_IF_ERROR(GatherRemote(sp, remote, sp.last_selection, chunk_k_.data() + static_cast<int64_t>(sp.sink) * hd,
                                 chunk_v_.data() + static_cast<int64_t>(sp.sink) * hd, stride));
  }
  Attention({chunk_k_.data(), chunk_v_.data(), stride}, q, 1, rows - 1, out);
  return absl::OkStatus();
}

void CpuBackend::Attention(const KvView& kv, const float* q, int n, int start, float* out) {
  const ModelConfig& c = w_.config;
  const int hd = c.head_dim, nh = c.n_heads, group = c.n_heads / c.n_kv_heads;
  const int64_t q_stride = static_cast<int64_t>(nh) * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  if (n <= 4) {
    // Decode: one thread per (token, query head); the dot products and the
    // weighted sum of V are GEMVs (OpenBLAS runs single-threaded inside an
    // OpenMP region), which vectorize where plain loops over a float
    // reduction would not.
#pragma omp parallel
    {
      std::vector<float> p(start + n);
#pragma omp for collapse(2)
      for (int i = 0; i < n; ++i) {
        for (int h = 0; h < nh; ++h) {
          const float* qi = q + i * q_stride + h * hd;
          const int len = start + i + 1;
          cblas_sgemv(CblasRowMajor, CblasNoTrans, len, hd, scale, kv.k + (h / group) * kv.head_stride,
                      hd, qi, 1, 0.0f, p.data(), 1);
          const float sum = ref::ExpShiftedSum(p.data(), len, ref::RowMax(p.data(), len), p.data());
          cblas_sgemv(CblasRowMajor, CblasTrans, len, hd, 1.0f / sum, kv.v + (h / group) * kv.head_stride,
                      hd, p.data(), 1, 0.0f, out + i * q_stride + h * hd, 1);
        }
      }
    }
    return;
  }
  // Prefill: one task per (query block, query head), each on one thread with
  // single-threaded GEMMs (OpenBLAS inside an OpenMP region) and its own score
  // scratch: S = Q K^T, softmax rows, O = P V, then O's rows divided by the
  // softmax sums. Largest blocks (last rows, most keys) go first. Measured at
  // 2048 tokens on 2 cores: 377 tokens/s against 353 for heads in sequence
  // with OpenBLAS threading each GEMM.
  const int blocks = (n + kQueryBlock - 1) / kQueryBlock;
  const int threads = std::min(threads_, blocks * nh);
  // Per thread: the scores, then one reciprocal softmax sum per query row.
  const size_t scratch_per_thread = static_cast<size_t>(kQueryBlock) * (start + n + 1);
  scores_.resize(scratch_per_thread * threads);
#pragma omp parallel num_threads(threads)
  {
    float* scores = scores_.data() + scratch_per_thread * omp_get_thread_num();
    float* inv_sum = scores + static_cast<size_t>(kQueryBlock) * (start + n);
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < blocks * nh; ++task) {
      const int b = (blocks - 1 - task / nh) * kQueryBlock;
      const int h = task % nh;
      const float* K = kv.k + (h / group) * kv.head_stride;
      const float* V = kv.v + (h / group) * kv.head_stride;
      const int rows = std::min(kQueryBlock, n - b);
      const int len = start + b + rows;  // keys visible to the block's last row
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, len, hd, scale,
                  q + b * q_stride + h * hd, static_cast<int>(q_stride), K, hd, 0.0f, scores, len);
      for (int r = 0; r < rows; ++r) {
        float* s = scores + static_cast<size_t>(r) * len;
        const int visible = start + b + r + 1;
        inv_sum[r] = 1.0f / ref::ExpShiftedSum(s, visible, ref::RowMax(s, visible), s);
        std::fill(s + visible, s + len, 0.0f);
      }
      float* o = out + b * q_stride + h * hd;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, len, 1.0f, scores, len, V,
                  hd, 0.0f, o, static_cast<int>(q_stride));
      for (int r = 0; r < rows; ++r) {
        for (int d = 0; d < hd; ++d) o[r * q_stride + d] *= inv_sum[r];
      }
    }
  }
}

}  // namespace

const QuantKvCpu* CpuQuantStore(const SequenceState& seq, int layer) {
  const auto* s = dynamic_cast<const CpuSequence*>(&seq);
  if (s == nullptr || layer < 0 || layer >= static_cast<int>(s->plan().layers.size())) return nullptr;
  return s->quant(layer);
}

std::vector<std::vector<int>> CpuSparseLastSelection(const SequenceState& seq, int layer) {
  const auto* s = dynamic_cast<const CpuSequence*>(&seq);
  if (s == nullptr || layer < 0 || layer >= static_cast<int>(s->plan().layers.size())) return {};
  const SparseLayer* sp = s->sparse(layer);
  return sp == nullptr ? std::vector<std::vector<int>>{} : sp->last_selection;
}

std::vector<std::vector<int>> CpuSparseChannels(const SequenceState& seq, int layer) {
  const auto* s = dynamic_cast<const CpuSequence*>(&seq);
  if (s == nullptr || layer < 0 || layer >= static_cast<int>(s->plan().layers.size())) return {};
  const SparseLayer* sp = s->sparse(layer);
  if (sp == nullptr || !sp->gpu_index || !sp->prompt_ended()) return {};
  const int d = sp->params.channels;
  std::vector<std::vector<int>> out(sp->chans.size() / d);
  for (size_t h = 0; h < out.size(); ++h) out[h].assign(sp->chans.begin() + h * d, sp->chans.begin() + (h + 1) * d);
  return out;
}

void SparseSelectCpu(const float* q_mean, const float* max_abs_k, const float* keys, int head_dim,
                     int first, int end, int channels, int top_k, std::vector<int>* selected,
                     std::vector<float>* scores) {
  const int n = std::max(end - first, 0);
  // TopKIndices (sparse_reference.h) is the ranking the GPU kernels share.
  const int d_s = std::clamp(channels, 0, head_dim);
  std::vector<float> channel_score(head_dim);
  for (int d = 0; d < head_dim; ++d) channel_score[d] = std::fabs(q_mean[d]) * max_abs_k[d];
  std::vector<int32_t> chan(d_s);
  const auto n_chan = TopKIndices(channel_score.data(), head_dim, d_s, chan.data());
  chan.resize(n_chan.ok() ? *n_chan : 0);
  std::vector<float> approx(n);
  for (int i = 0; i < n; ++i) {
    const float* k = keys + static_cast<int64_t>(first + i) * head_dim;
    float dot = 0.0f;
    for (int d : chan) dot += q_mean[d] * k[d];
    approx[i] = dot;
  }
  const int k = std::clamp(top_k, 0, n);
  std::vector<int32_t> picked(k);
  const auto n_picked = TopKIndices(approx.data(), n, k, picked.data());
  picked.resize(n_picked.ok() ? *n_picked : 0);
  selected->assign(picked.begin(), picked.end());
  for (int& p : *selected) p += first;
  if (scores != nullptr) *scores = std::move(approx);
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(model::ModelWeights weights,
                                                          const CpuBackendOptions& options) {
  if (auto s = weights.config.Validate(); !s.ok()) return s;
  if (static_cast<int>(weights.layers.size()) != weights.config.n_layers) {
    return absl::InvalidArgumentError(absl::StrFormat("weights have %d layers, config says %d",
                                                      weights.layers.size(), weights.config.n_layers));
  }
  if (options.threads < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("threads must be >= 0, got %d", options.threads));
  }
  const int threads = OpenMpTeamSize(options.threads > 0
                                         ? options.threads
                                         : std::max(1, static_cast<int>(std::thread::hardware_concurrency())));
  return std::unique_ptr<Backend>(
      new CpuBackend(std::move(weights), threads, options.host_store, options.remote_rows));
}

}  // namespace tailorkv::runtime
