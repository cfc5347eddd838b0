#include "cuda/cuda_backend.h"

#include <cuda_bf16.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <deque>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "cuda/attention_kernels.cuh"
#include "cuda/cuda_check.h"
#include "cuda/elementwise_kernels.cuh"
#include "cuda/gemv_kernels.cuh"
#include "cuda/gemv_quant_kernels.cuh"
#include "cuda/quant_kernels.cuh"
#include "cuda/random_fill.cuh"
#include "cuda/sparse_fp8_kernels.cuh"
#include "cuda/sparse_index_kernels.cuh"
#include "cuda/sparse_int4_index_kernels.cuh"
#include "cuda/sparse_kernels.cuh"
#include "cuda/sampling_kernels.cuh"
#include "cuda/sparse_tier_kernels.cuh"
#include "cuda/window_kernels.cuh"
#include "spdlog/spdlog.h"
#include "store/in_process_store.h"
#include "model/ggml_types.h"
#include "runtime/cpu_reference.h"
#include "runtime/quant_kv.h"

namespace tailorkv::cuda {
namespace {

// Host tiers start on a page: the zero-copy gathers read 16-byte rows.
constexpr uint64_t kHostAlign = 4096;
// Side streams for the sparse selections of a batch (CudaBackend::sides_).
constexpr int kSideStreams = 8;

using bf16 = __nv_bfloat16;
using model::ModelConfig;
using runtime::SequenceState;

// Rows of logits computed per head GEMM when all positions' logits are asked
// for: bounds that buffer to kLogitRows x vocab floats.
constexpr int kLogitRows = 64;
static_assert(kLogitRows <= kMaxPickRows, "a decode pass's rows must fit one LaunchGreedyPick");
// cuBLAS gets a fixed workspace so that it never allocates during graph capture.
constexpr size_t kCublasWorkspaceBytes = 32u << 20;

// A layer weight matrix kept as quantized planes (options.layer_weights).
struct QuantDeviceMatrix {
  model::GgmlType type = model::GgmlType::kF32;  // kF32: none (the bf16 copy is used)
  int rows = 0, cols = 0;
  DeviceBuffer qs, d, m;
  bool on() const { return type != model::GgmlType::kF32; }
  QuantMatrixView view() const {
    return {type, rows, cols, qs.as<const uint8_t>(), d.as<const __half>(),
            type == model::GgmlType::kQ4_1 ? m.as<const __half>() : nullptr};
  }
};

// Each matrix is either its bf16 copy or, with options.layer_weights, its
// quantized planes (the other one empty).
struct DeviceLayer {
  DeviceBuffer attn_norm;  // [hidden] f32
  DeviceBuffer w_qkv;      // [(n_heads + 2 n_kv) * head_dim][hidden] bf16: Wq | Wk | Wv rows
                           // (only Wq's rows when q_qkv holds the matrix)
  DeviceBuffer wo;         // [hidden][n_heads * head_dim] bf16
  DeviceBuffer ffn_norm;   // [hidden] f32
  DeviceBuffer w_gate_up;  // [2 ffn][hidden] bf16: gate rows, then up rows
  DeviceBuffer w_down;     // [hidden][ffn] bf16
  QuantDeviceMatrix q_qkv, q_wo, q_gate_up, q_down;  // the same rows, quantized
};

// One layer's KV store, as its policy keeps it.
//   dense:  mem = K | V, each [n_kv][capacity][head_dim] bf16
//   quant:  mem = QuantLayout(qshape) (codes, params, bf16 rings)
//   window: mem = K | V, each [n_kv][wshape.rows][head_dim] bf16
struct LayerKv {
  runtime::KvPolicyKind kind = runtime::KvPolicyKind::kDense;
  DeviceBuffer mem;
  int64_t elems = 0;  // dense / window: elements of K (== of V)
  runtime::QuantShape qshape;
  QuantDeviceCache qcache;
  WindowShape wshape;
  int64_t kv_bytes = 0;  // what kv_bytes() reports (SEMANTICS: no padding, no scratch)
  int64_t kv_bytes_kept = 0;  // sparse: the kept rows' part of kv_bytes
  bf16* k() const { return mem.as<bf16>(); }
  bf16* v() const { return mem.as<bf16>() + elems; }
};

// A sparse layer (runtime/cpu_backend.h has the semantics; cuda_backend.h
// the layout). Host tier: host rows (sparse_tier_kernels.cuh) of every
// position up to the capacity, in a HostKvStore slice registered with CUDA;
// index "faithful" adds the transposed keys there. Device: max|K|, the
// index "gpu" buffers, and, from the end of the prompt, the tier
// [kept | selected | generated] rows per KV head.
struct SparseKv {
  runtime::SparseParams params;
  bool gpu_index = false;
  kvhost::HostSlice host_slice, kt_slice;
  void* host = nullptr;           // [n_kv][capacity][2 head_dim], bf16 or FP8 (host_bits)
  const std::byte* host_cpu = nullptr;  // the same rows at their host address (DMA source)
  __nv_bfloat16* kt = nullptr;    // [n_kv][head_dim][capacity] (faithful)
  DeviceBuffer max_abs;           // [n_kv][head_dim] f32
  DeviceBuffer last_q_mean;       // [n_kv][head_dim] f32 (gpu index)
  DeviceBuffer chans;             // [n_kv][channels] int32
  DeviceBuffer q_chan;            // [n_kv][channels] f32: the query on the channels
  DeviceBuffer index;             // [n_kv][capacity][channels] bf16 or fp8 codes, or 4-bit codes (gpu index)
  DeviceBuffer index_params;      // 4-bit index: zero and step per block and channel (sparse_int4_index_kernels.cuh)
  DeviceBuffer sel;               // [n_kv][top_k] int32
  // The tier's selected rows as a slot pool (LaunchAssignSlots): the token
  // each slot holds, and this step's fetches by slot; null when selected >
  // kAssignSlotsMaxCount (then every step gathers all rows in order).
  DeviceBuffer slot_tok;          // [n_kv][selected] int32 (-1 before the first step)
  DeviceBuffer miss;              // [n_kv][selected] int32: the token each slot fetches, or -1
  // Plan refine: the Top-n_pool candidates of the speculation from the
  // previous layer's input, ascending; the final selection's picks in it.
  int n_pool = 0;
  DeviceBuffer pool;              // [n_kv][n_pool] int32 (refine)
  DeviceBuffer pool_pick;         // [n_kv][selected] int32 (refine)
  DeviceBuffer len;               // int32: rows of the tier attended this step
  // From the end of the prompt.
  int prompt = -1, sink = 0, recent = 0, candidates = 0, selected = 0, tier_rows = 0;
  DeviceBuffer tier;              // K | V, each [n_kv][tier_rows][head_dim] bf16
  CudaEvent selected_ready;       // side stream: the selection is in the tier
  // Prefill: the chunk start whose history [0, start) the copy stream is
  // loading into the scratch (history_ready marks its end); -1 = none.
  int history_prefetched_for = -1;
  int kept() const { return sink + recent; }
  bool prompt_ended() const { return prompt >= 0; }
};

// The host-tier kernels for the layer's format (sparse_tier_kernels.cuh,
// sparse_fp8_kernels.cuh: same semantics, bf16 or FP8 host rows).
absl::Status StoreHost(const SparseKv& sp, const bf16* k, const bf16* v, int64_t head_stride,
                       int first, int n, int n_kv, int hd, int64_t host_rows, cudaStream_t s) {
  if (sp.params.host_bits == 8) {
    return LaunchStoreHostRowsFp8(k, v, head_stride, first, n, n_kv, hd,
                                  static_cast<uint8_t*>(sp.host), host_rows, s);
  }
  return LaunchStoreHostRows(k, v, head_stride, first, n, n_kv, hd, static_cast<bf16*>(sp.host),
                             host_rows, s);
}
absl::Status LoadHost(const SparseKv& sp, int64_t host_rows, int first, int n, int n_kv, int hd,
                      bf16* k, bf16* v, int64_t head_stride, cudaStream_t s) {
  if (sp.params.host_bits == 8) {
    return LaunchLoadHostRowsFp8(static_cast<const uint8_t*>(sp.host), host_rows, first, n, n_kv,
                                 hd, k, v, head_stride, s);
  }
  return LaunchLoadHostRows(static_cast<const bf16*>(sp.host), host_rows, first, n, n_kv, hd, k, v,
                            head_stride, s);
}
absl::Status GatherHost(const SparseKv& sp, int64_t host_rows, int64_t src_first,
                        const int32_t* idx, int count, int n_kv, int hd, bf16* dk, bf16* dv,
                        int64_t dst_head_stride, int dst_first, cudaStream_t s) {
  if (sp.params.host_bits == 8) {
    return LaunchGatherKvRowsFp8(static_cast<const uint8_t*>(sp.host), host_rows, src_first, idx,
                                 count, n_kv, hd, dk, dv, dst_head_stride, dst_first, s);
  }
  return LaunchGatherKvRows(static_cast<const bf16*>(sp.host), host_rows, src_first, idx, count,
                            n_kv, hd, dk, dv, dst_head_stride, dst_first, s);
}
absl::Status BuildIndex(const SparseKv& sp, int64_t host_rows, int rows, int n_kv, int hd,
                        int64_t index_rows, cudaStream_t s) {
  if (sp.params.index_bits == 4) {
    // host_bits 8 with index_bits 4 is refused when the sequence is made.
    return LaunchBuildInt4ChannelIndex(static_cast<const bf16*>(sp.host), host_rows, rows,
                                       sp.chans.as<int32_t>(), sp.params.channels, n_kv, hd,
                                       sp.index.as<uint8_t>(), sp.index_params.as<bf16>(),
                                       index_rows, s);
  }
  if (sp.params.index_bits == 8) {
    uint8_t* index = sp.index.as<uint8_t>();
    if (sp.params.host_bits == 8) {
      return LaunchBuildFp8ChannelIndexFromFp8(static_cast<const uint8_t*>(sp.host), host_rows, rows,
                                               sp.chans.as<int32_t>(), sp.params.channels, n_kv, hd,
                                               index, index_rows, s);
    }
    return LaunchBuildFp8ChannelIndex(static_cast<const bf16*>(sp.host), host_rows, rows,
                                      sp.chans.as<int32_t>(), sp.params.channels, n_kv, hd, index,
                                      index_rows, s);
  }
  if (sp.params.host_bits == 8) {
    return LaunchBuildChannelIndexFp8(static_cast<const uint8_t*>(sp.host), host_rows, rows,
                                      sp.chans.as<int32_t>(), sp.params.channels, n_kv, hd,
                                      sp.index.as<bf16>(), index_rows, s);
  }
  return LaunchBuildChannelIndex(static_cast<const bf16*>(sp.host), host_rows, rows,
                                 sp.chans.as<int32_t>(), sp.params.channels, n_kv, hd,
                                 sp.index.as<bf16>(), index_rows, s);
}

// Page-locked host memory (cudaMallocHost), so device-to-host copies run at
// full PCIe speed. Freed in the destructor; move-only.
class PinnedHostBuffer {
 public:
  PinnedHostBuffer() = default;
  static absl::StatusOr<PinnedHostBuffer> Allocate(size_t bytes) {
    PinnedHostBuffer b;
    CUDA_RETURN_IF_ERROR(cudaMallocHost(&b.ptr_, bytes));
    b.size_ = bytes;
    return b;
  }
  ~PinnedHostBuffer() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
  }
  PinnedHostBuffer(PinnedHostBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  PinnedHostBuffer& operator=(PinnedHostBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(size_, o.size_);
    return *this;
  }
  PinnedHostBuffer(const PinnedHostBuffer&) = delete;
  PinnedHostBuffer& operator=(const PinnedHostBuffer&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }
  size_t size() const { return size_; }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

// What ForwardObserved asks of the last prefill chunk of its call.
struct TapRequest {
  const runtime::Backend::LayerObserver* observer = nullptr;
  int tap_queries = 0;  // the chunk's last rows of q shown
  int n_keys = 0;       // cache rows shown: [0, n_keys), the end of the call
};

class CudaSequence final : public SequenceState {
 public:
  CudaSequence(const void* owner, runtime::KvPlan plan, int capacity, std::vector<LayerKv> layers,
               DeviceBuffer scratch, int64_t scratch_elems, DeviceBuffer attn_workspace,
               DeviceBuffer quant_workspace, DeviceBuffer window_len)
      : sparse(layers.size()),
        owner_(owner),
        plan_(std::move(plan)),
        capacity_(capacity),
        layers_(std::move(layers)),
        scratch_(std::move(scratch)),
        scratch_elems_(scratch_elems),
        attn_workspace_(std::move(attn_workspace)),
        quant_workspace_(std::move(quant_workspace)),
        window_len_(std::move(window_len)) {}

  int length() const override { return length_; }
  int capacity() const override { return capacity_; }
  // Quant and window layers cannot forget what they dropped or quantized:
  // only all-dense sequences shrink (runtime/backend.h).
  void Truncate(int n) override {
    if (plan_.all_dense()) length_ = std::clamp(n, 0, length_);
  }
  const runtime::KvPlan& plan() const override { return plan_; }
  std::vector<runtime::LayerKvBytes> kv_bytes() const override {
    std::vector<runtime::LayerKvBytes> out;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const LayerKv& L = layers_[l];
      runtime::LayerKvBytes b{L.kind, L.kv_bytes, 0};
      if (sparse[l] != nullptr) {
        const SparseKv& sp = *sparse[l];
        b.host_bytes = static_cast<int64_t>(sp.host_slice.length + sp.kt_slice.length);
        if (sp.prompt_ended()) {
          // The selected and generated rows reserved when the prompt ended.
          b.device_bytes += static_cast<int64_t>(sp.tier.size()) - L.kv_bytes_kept;
        }
      }
      out.push_back(b);
    }
    return out;
  }

  const void* owner() const { return owner_; }
  void set_length(int n) { length_ = n; }
  const LayerKv& layer(int l) const { return layers_[l]; }
  // Dense layers: [n_kv][capacity][head_dim] bf16.
  bf16* k(int l) const { return layers_[l].k(); }
  bf16* v(int l) const { return layers_[l].v(); }
  // Full-precision K | V of one layer for prefill (and the decode token of a
  // non-dense layer), [n_kv][capacity][head_dim] each; null when all dense.
  bf16* scratch_k() const { return scratch_.as<bf16>(); }
  bf16* scratch_v() const { return scratch_.as<bf16>() + scratch_elems_; }
  void* attn_workspace() const { return attn_workspace_.get(); }
  void* quant_workspace() const { return quant_workspace_.get(); }
  int32_t* window_len() const { return window_len_.as<int32_t>(); }
  int64_t device_bytes() const {
    int64_t b = scratch_.size() + attn_workspace_.size() + quant_workspace_.size() + window_len_.size() +
                scores.size() + topk_ws.size() + q_mean.size() + reuse_count.size() +
                spec_x.size();
    for (const LayerKv& L : layers_) b += L.mem.size();
    for (const auto& sp : sparse) {
      if (sp == nullptr) continue;
      b += sp->max_abs.size() + sp->last_q_mean.size() + sp->chans.size() + sp->q_chan.size() +
           sp->index.size() + sp->index_params.size() + sp->sel.size() + sp->len.size() + sp->tier.size() +
           sp->slot_tok.size() + sp->miss.size() + sp->pool.size() + sp->pool_pick.size();
    }
    return b;
  }
  // DecodeBatchPick with a repetition penalty: a bit per vocabulary entry
  // for the tokens of the history seen so far (its first seen_count), and a
  // staging buffer for the new ones.
  DeviceBuffer seen, seen_tokens;
  size_t seen_count = 0;
  CudaGraphExec& decode_graph() { return decode_graph_; }
  bool decoded_once = false;  // the first decode runs eagerly, warming cuBLAS before capture
  // Never reused by another sequence of the process: DecodeBatch's graph
  // key (a destroyed sequence's address may come back).
  const uint64_t id = NextId();

  ~CudaSequence() override {
    // Kernels in flight may still read the host tier: wait, then give it back.
    if (host_store != nullptr) {
      cudaDeviceSynchronize();
      host_store->FreeOwner(host_session);
    }
  }
  // Sparse layers (null elsewhere), and what they share: the store their
  // host tiers live in, the scores and the Top-K workspace of the selection.
  std::vector<std::unique_ptr<SparseKv>> sparse;
  kvhost::HostKvStore* host_store = nullptr;
  std::string host_session;                     // the store's owner tag for this sequence
  std::deque<kvhost::HostSlice> host_prealloc;  // taken in order by HostAlloc
  DeviceBuffer scores;        // [n_kv][capacity] f32
  DeviceBuffer topk_ws;
  // Row reuse (CudaBackendOptions::sparse_row_reuse): the rows reused so
  // far (u64), with the steps that selected.
  DeviceBuffer reuse_count;
  int64_t selecting_steps = 0;
  DeviceBuffer q_mean;        // [n_kv][head_dim] f32 (faithful)
  // Sparse layers with index "gpu": the speculative inputs that the side
  // stream's selections read, [2][n_layers][hidden] bf16 (final pass, first
  // pass). The sequence's own, so that another sequence's step (interleaved
  // or in the same batch) never overwrites one still being read.
  DeviceBuffer spec_x;
  bool any_sparse() const {
    for (const auto& sp : sparse) {
      if (sp != nullptr) return true;
    }
    return false;
  }
  bool prompt_ended() const {
    for (const auto& sp : sparse) {
      if (sp != nullptr) return sp->prompt_ended();
    }
    return true;
  }

 private:
  static uint64_t NextId() {
    static std::atomic<uint64_t> next{1};
    return next.fetch_add(1);
  }
  const void* owner_;
  runtime::KvPlan plan_;
  int capacity_;
  int length_ = 0;
  std::vector<LayerKv> layers_;
  DeviceBuffer scratch_;
  int64_t scratch_elems_ = 0;
  DeviceBuffer attn_workspace_;
  DeviceBuffer quant_workspace_;
  DeviceBuffer window_len_;
  CudaGraphExec decode_graph_;
};

class CudaBackend final : public runtime::Backend {
 public:
  ~CudaBackend() override {
    // Work in flight may still read the pinned buffers.
    if (stream_.get() != nullptr) cudaStreamSynchronize(stream_.get());
    for (const CudaStream& side : sides_) cudaStreamSynchronize(side.get());
    if (copy_.get() != nullptr) cudaStreamSynchronize(copy_.get());
    if (step_host_ != nullptr) cudaFreeHost(step_host_);
    if (logits_host_ != nullptr) cudaFreeHost(logits_host_);
    if (batch_host_ != nullptr) cudaFreeHost(batch_host_);
  }
  std::string_view name() const override { return "cuda"; }
  int preferred_prefill_chunk() const override { return options_.max_prefill_chunk; }
  const ModelConfig& config() const override { return config_; }

  using runtime::Backend::NewSequence;
  absl::StatusOr<std::unique_ptr<SequenceState>> NewSequence(int capacity,
                                                             const runtime::KvPlan& plan) override;
  using runtime::Backend::Forward;
  absl::Status Forward(SequenceState& state, absl::Span<const int32_t> tokens, bool all_logits,
                       std::vector<float>* logits, Mode mode) override;
  absl::Status ForwardObserved(SequenceState& state, absl::Span<const int32_t> tokens,
                               int tap_queries, const LayerObserver& observer) override;
  // One step over the batch: products through LaunchGemvBatchBf16 (weights
  // read once per 8 sequences; each row's sums in a batch-independent
  // order), attention per sequence, a CUDA graph per batch (captured when
  // the same sequences are stepped twice in a row, replayed while they
  // stay), at most kMaxBatch sequences a pass.
  absl::Status DecodeBatch(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                           std::vector<float>* logits) override;
  // The greedy rows' tokens are picked on the device (LaunchGreedyPick over
  // the logits buffer; the repetition penalty through a per-sequence bitmap
  // of seen tokens); the logits cross to the host only when some row still
  // needs them.
  absl::Status DecodeBatchPick(absl::Span<SequenceState* const> seqs, absl::Span<const int32_t> tokens,
                               absl::Span<const GreedyPickRequest> greedy, std::vector<float>* logits,
                               std::vector<int32_t>* picked, std::vector<absl::Status>* per_seq) override;

  // Every buffer NewSequence, NewSparseLayer and EndSparsePrompt allocate,
  // each rounded up as cudaMalloc does (2 MiB pages from 1 MiB up).
  int64_t SequenceMemoryBytes(int prompt, int capacity, const runtime::KvPlan& plan) const override;
  // A pool of `bytes` that every sequence made from now on is carved from
  // (DeviceMemoryPool): the weights and workspaces stay outside it.
  absl::Status TakeMemoryPool(int64_t bytes) override {
    if (seq_pool_.get() != nullptr) {
      return absl::FailedPreconditionError("the sequences' memory pool is already taken");
    }
    if (bytes <= 0) return absl::InvalidArgumentError("TakeMemoryPool: bytes must be > 0");
    CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
    ASSIGN_OR_RETURN(seq_pool_, DeviceMemoryPool::Create(options_.device, static_cast<size_t>(bytes)));
    return absl::OkStatus();
  }
  int64_t AvailableMemoryBytes() const override {
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(options_.device) != cudaSuccess || cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
      return 0;
    }
    return static_cast<int64_t>(free_b);
  }

  // Allocates every buffer except the weights' contents.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Allocate(const ModelConfig& config,
                                                               const CudaBackendOptions& options);
  absl::Status UploadWeights(const model::ModelWeights& w);
  absl::Status RandomizeWeights(uint64_t seed);
  absl::Status FillRandomKv(CudaSequence& seq, int length, uint64_t seed);
  int64_t device_bytes() const { return device_bytes_; }

 private:
  CudaBackend(const ModelConfig& c, const CudaBackendOptions& o) : config_(c), options_(o) {}

  absl::StatusOr<DeviceBuffer> Alloc(size_t bytes);
  // A buffer of a sequence: from the pool once TakeMemoryPool has run.
  absl::StatusOr<DeviceBuffer> SeqAlloc(size_t bytes) const {
    return DeviceBuffer::Allocate(bytes, seq_pool_.get() != nullptr ? &seq_pool_ : nullptr);
  }
  absl::Status UploadBf16(const std::vector<const model::Tensor*>& parts, DeviceBuffer& dst);
  // A layer matrix made of `parts` (rows appended): quantized planes in `q`
  // when they share a type the GEMV takes, else a bf16 copy in `bf16_dst`.
  absl::Status UploadLayerMatrix(const std::vector<const model::Tensor*>& parts, DeviceBuffer& bf16_dst,
                                 QuantDeviceMatrix& q);
  // Random planes of options_.layer_weights for a rows x cols matrix whose
  // values span about +-value_scale.
  absl::Status RandomQuantMatrix(int rows, int cols, uint64_t seed, float value_scale, QuantDeviceMatrix& q);
  // A layer matrix's product: its planes when it has them (decode rows
  // through LaunchGemvQuantBatch, a batch's rows each what they are alone;
  // prefill rows as GEMMs over dequantized bf16 tiles), else Gemm over the
  // bf16 copy.
  absl::Status LayerGemm(const bf16* x, int n, const DeviceBuffer& w, const QuantDeviceMatrix& q, int out,
                         int in, void* y, bool y_bf16, bool accumulate, bool batched);
  absl::Status UploadF32(const model::Tensor& t, DeviceBuffer& dst);
  // y[n][out] = x[n][in] * W[out][in]^T (+ y when accumulate); bf16 in, fp32
  // accumulation, f32 out (the residual stream and logits). `batched`: rows
  // of different sequences' decode steps (LaunchGemvBatchBf16).
  absl::Status Gemm(const bf16* x, int n, const bf16* w, int out, int in, float* y,
                    bool accumulate, bool batched = false);
  // The same product rounded to a bf16 y (projections that feed RoPE and
  // SwiGLU: half the bytes of an f32 output, written once and read once).
  absl::Status Gemm(const bf16* x, int n, const bf16* w, int out, int in, bf16* y,
                    bool batched = false);
  absl::Status GemmEx(const bf16* x, int n, const bf16* w, int out, int in, void* y,
                      cudaDataType_t y_type, float beta);
  // Where one sequence's rows sit in a step: its first activation row, the
  // position of its first token (host) and [position, length after the
  // step] on the device.
  struct SeqSlot {
    CudaSequence* seq = nullptr;
    int row = 0;
    int start = 0;
    const int32_t* step = nullptr;
  };
  // The work of one pass: `rows` activation rows whose token ids are on the
  // device at `ids`; one sequence's n tokens (prefill, or a decode step of
  // Forward), or one decode token for each of several sequences (row b is
  // slots[b]'s; batched products).
  struct Pass {
    std::vector<SeqSlot> slots;
    int rows = 0;
    const int32_t* ids = nullptr;
    bool decode = false;
    bool batched = false;
  };
  // Enqueues the layers of a pass (decode: graph-capturable). With `tap`
  // (prefill of dense layers only), each layer's attention is followed by
  // TapLayer, which waits for the stream.
  absl::Status EnqueueLayers(const Pass& pass, const TapRequest* tap = nullptr);
  // A pass of one sequence's n tokens at `start`, ids and position in step_.
  Pass SinglePass(CudaSequence& seq, int n, int start, bool decode) {
    return Pass{{SeqSlot{&seq, 0, start, step_.as<int32_t>()}}, n, step_.as<int32_t>() + 2, decode, false};
  }
  // DecodeBatch's checks; the sequences as this backend's.
  absl::StatusOr<std::vector<CudaSequence*>> CheckBatch(absl::Span<SequenceState* const> seqs,
                                                        absl::Span<const int32_t> tokens);
  // One pass of at most max_batch_ sequences. With `greedy` (a request per
  // sequence), picked[b] gets the greedy rows' tokens (-1 elsewhere) and
  // the logits are copied out only when some row is not picked.
  absl::Status DecodeBatchPass(absl::Span<CudaSequence* const> seqs, absl::Span<const int32_t> tokens,
                               float* logits, const GreedyPickRequest* greedy = nullptr,
                               int32_t* picked = nullptr);
  // Brings seq's seen-token bitmap up to `history` (allocated on first use).
  absl::Status MarkSeen(CudaSequence& seq, absl::Span<const int32_t> history);
  // Copies layer l's last tap.tap_queries rows of q_ (of the n in flight) and
  // its dense K/V rows [0, tap.n_keys) to the host as fp32 and calls the
  // observer; its status is returned. Nothing is left in flight on return.
  absl::Status TapLayer(const CudaSequence& seq, int l, int n, const TapRequest& tap);
  // Forward() of any number of tokens through the prefill path, in chunks of
  // at most max_prefill_chunk. With `tap`, the last chunk holds at least
  // tap->tap_queries tokens and is observed, and no logits are computed.
  absl::Status Prefill(CudaSequence& seq, absl::Span<const int32_t> tokens, bool all_logits,
                       std::vector<float>* logits, const TapRequest* tap);
  // RoPE + KV append + attention of layer l for the n tokens at `start`
  // (positions also in the step buffer), as the layer's policy keeps KV;
  // writes attn_. See runtime/SEMANTICS: a prefill chunk of a non-dense layer
  // attends over [history as stored | chunk in full precision], then updates
  // the store; decode appends and attends with positions read on the device.
  absl::Status EnqueueAttention(const SeqSlot& slot, int l, int n, bool decode);
  // Final norm + head for rows [first, first + rows) of the activations into
  // logits_ (rows <= kLogitRows).
  absl::Status EnqueueHead(int first, int rows, bool batched = false);
  absl::Status CopyLogitsOut(int rows, float* dst);
  absl::Status DecodeStep(CudaSequence& seq, int32_t token, std::vector<float>* logits);
  // Sparse layers: the host store (made on first use), a sequence's layer
  // state, the end of its prompt (tier, kept rows, index) and a decode
  // step's selection (speculative on the side stream for index "gpu").
  absl::StatusOr<kvhost::HostKvStore*> HostStore();
  // One host tier of `seq`: from seq.host_prealloc when NewSequence asked
  // the store for all of them at once, else from the store directly.
  absl::StatusOr<kvhost::HostSlice> HostAlloc(CudaSequence& seq, uint64_t bytes, void** device_ptr,
                                              const std::byte** host_ptr = nullptr);
  // Prefill of a chunk at `start` > 0: when the first non-dense layer after
  // `after` (-1: from layer 0) is sparse with a bf16 host tier, its history
  // [0, start) is copied from the host tier into the scratch on the copy
  // stream (DMA, no SMs), once the main stream's work enqueued so far (the
  // scratch's previous reader) is done; that layer's attention waits for it.
  // So the host re-read overlaps the layers in between instead of stalling.
  absl::Status PrefetchSparseHistory(CudaSequence& seq, int after, int start);
  absl::Status NewSparseLayer(CudaSequence& seq, int l, const runtime::SparseParams& p);
  absl::Status EndSparsePrompt(CudaSequence& seq);
  // What one selection pass does (query "after-attention" runs two: a first
  // from the previous layer's input, which overlaps that whole layer, then
  // the final one after its attention).
  enum class SelectPass {
    kFinal,     // score every candidate, Top-K, rows into the tier
    kRefined,   // the final pass of plan refine: score the pool only
    kPool,      // refine's first pass: Top-n_pool candidates into sp.pool
    kPrefetch,  // a first pass that only fetches rows for the final one
  };
  // Layer `target`'s selection from the speculative input x on the side
  // stream; kFinal / kRefined signal sp.selected_ready, first passes nothing.
  absl::Status EnqueueSpeculativeSelection(const SeqSlot& slot, int target, const __nv_bfloat16* x,
                                           SelectPass pass = SelectPass::kFinal);
  // count_reuse: add the rows reused to the sequence's statistics.
  absl::Status EnqueueSelection(CudaSequence& seq, SparseKv& sp, const float* q_chan,
                                cudaStream_t s, SelectPass pass = SelectPass::kFinal);
  absl::Status EnqueueSparseAttention(const SeqSlot& slot, int l, int n, bool decode);

  ModelConfig config_;
  CudaBackendOptions options_;
  // Declared first among the device resources, so destroyed last.
  DeviceMemoryPool seq_pool_;
  int64_t device_bytes_ = 0;
  int qkv_rows_ = 0;  // (n_heads + 2 n_kv) * head_dim
  CudaStream stream_;
  std::vector<CudaStream> sides_;   // sparse selection ahead of the main stream, per batch slot
  CudaStream copy_;                 // prefill: sparse history host -> scratch (DMA)
  CudaEvent scratch_free_, history_ready_;  // PrefetchSparseHistory's two ends
  std::vector<CudaEvent> spec_ready_;  // per layer: its speculative query is written
  std::unique_ptr<kvhost::InProcessStore> host_store_;
  CublasHandle cublas_;
  DeviceBuffer cublas_workspace_;
  // Weights.
  DeviceBuffer tok_embd_, output_norm_, output_, inv_freq_;
  // Input embeddings of an untied model with options.host_embeddings: in
  // pinned host memory, read by the embedding lookup over PCIe.
  PinnedHostBuffer tok_embd_host_;
  // The table the embedding lookup reads (tok_embd_ or tok_embd_host_).
  const bf16* embd_table() const {
    return tok_embd_host_.size() > 0 ? tok_embd_host_dev_ : tok_embd_.as<bf16>();
  }
  bf16* tok_embd_host_dev_ = nullptr;  // tok_embd_host_ as the device sees it
  std::vector<DeviceLayer> layers_;
  // Activations for up to options_.max_prefill_chunk tokens.
  DeviceBuffer x_, xn_, qkv_, q_, attn_, gate_up_, h_, logits_;
  // options_.layer_weights: the bf16 tile a prefill GEMM reads quantized
  // weights from (kDequantTileValues values).
  static constexpr int64_t kDequantTileValues = int64_t{16} << 20;
  DeviceBuffer dequant_tile_;
  // Step parameters: [0] position of the first token, [1] cache length after
  // this step, [2..] token ids. Written from pinned host memory before a run.
  DeviceBuffer step_;
  int32_t* step_host_ = nullptr;  // pinned, same layout
  // DecodeBatch: [ids: kMaxBatch][position, length: kMaxBatch pairs], on the
  // device and pinned; and the graph of the batch last stepped twice in a
  // row (keyed by its sequences' ids, in order).
  DeviceBuffer batch_step_;
  int32_t* batch_host_ = nullptr;
  int max_batch_ = 1;
  std::vector<uint64_t> warm_key_, graph_key_;
  CudaGraphExec batch_graph_;
  float* logits_host_ = nullptr;  // pinned, kLogitRows x vocab
  // ForwardObserved's host buffers, q | K | V of one layer, grown on demand
  // and kept for later layers and calls: the bf16 rows as copied, and their
  // fp32 values, which the observer reads.
  PinnedHostBuffer tap_staging_;
  std::unique_ptr<float[]> tap_values_;
  size_t tap_capacity_ = 0;  // elements of each
};

absl::StatusOr<DeviceBuffer> CudaBackend::Alloc(size_t bytes) {
  ASSIGN_OR_RETURN(DeviceBuffer b, DeviceBuffer::Allocate(bytes));
  device_bytes_ += static_cast<int64_t>(bytes);
  return b;
}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Allocate(
    const ModelConfig& c, const CudaBackendOptions& options) {
  RETURN_IF_ERROR(c.Validate());
  if (c.head_dim != 64 && c.head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrFormat("head_dim %d: the CUDA kernels support 64 and 128", c.head_dim));
  }
  if (options.max_mlp_rows < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("max_mlp_rows must be >= 1, got %d", options.max_mlp_rows));
  }
  if (options.max_prefill_chunk < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("max_prefill_chunk must be >= 1, got %d",
                                                      options.max_prefill_chunk));
  }
  if (DeviceCount() <= options.device) {
    return absl::UnavailableError(
        absl::StrFormat("CUDA device %d not found (%d devices)", options.device, DeviceCount()));
  }
  CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  auto b = std::unique_ptr<CudaBackend>(new CudaBackend(c, options));
  b->qkv_rows_ = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim;
  ASSIGN_OR_RETURN(b->stream_, CudaStream::Create());
  // Most urgent priority: the selection's small kernels get SMs as soon as
  // the main stream's GEMV blocks retire, so it finishes inside the layer.
  // One per batch slot (slot b uses sides_[b % kSideStreams]): the
  // selections of a batch's sequences are small kernels (a Top-K over 8
  // rows fills 8 blocks), so they run side by side instead of in turn.
  for (int i = 0; i < kSideStreams; ++i) {
    ASSIGN_OR_RETURN(CudaStream side, CudaStream::Create(options.sparse_side_priority
                                                             ? CudaStream::GreatestPriority()
                                                             : 0));
    b->sides_.push_back(std::move(side));
  }
  for (int l = 0; l < c.n_layers; ++l) {
    ASSIGN_OR_RETURN(CudaEvent e, CudaEvent::Create());
    b->spec_ready_.push_back(std::move(e));
  }
  ASSIGN_OR_RETURN(b->copy_, CudaStream::Create());
  ASSIGN_OR_RETURN(b->scratch_free_, CudaEvent::Create());
  ASSIGN_OR_RETURN(b->history_ready_, CudaEvent::Create());
  ASSIGN_OR_RETURN(b->cublas_, CublasHandle::Create());
  ASSIGN_OR_RETURN(b->cublas_workspace_, b->Alloc(kCublasWorkspaceBytes));
  CUBLAS_RETURN_IF_ERROR(cublasSetStream(b->cublas_.get(), b->stream_.get()));
  CUBLAS_RETURN_IF_ERROR(
      cublasSetWorkspace(b->cublas_.get(), b->cublas_workspace_.get(), kCublasWorkspaceBytes));

  const size_t H = c.hidden, V = c.vocab, F = c.ffn, hd = c.head_dim;
  if (options.host_embeddings && !c.tied_embeddings) {
    ASSIGN_OR_RETURN(b->tok_embd_host_, PinnedHostBuffer::Allocate(V * H * sizeof(bf16)));
    void* dev = nullptr;
    CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(&dev, b->tok_embd_host_.as<void>(), 0));
    b->tok_embd_host_dev_ = static_cast<bf16*>(dev);
  } else {
    ASSIGN_OR_RETURN(b->tok_embd_, b->Alloc(V * H * sizeof(bf16)));
  }
  ASSIGN_OR_RETURN(b->output_norm_, b->Alloc(H * sizeof(float)));
  if (!c.tied_embeddings) {
    ASSIGN_OR_RETURN(b->output_, b->Alloc(V * H * sizeof(bf16)));
  }
  ASSIGN_OR_RETURN(b->inv_freq_, b->Alloc(hd / 2 * sizeof(float)));
  const std::vector<float> inv_freq = runtime::ref::RopeInvFreq(c);
  CUDA_RETURN_IF_ERROR(cudaMemcpy(b->inv_freq_.get(), inv_freq.data(),
                                  inv_freq.size() * sizeof(float), cudaMemcpyHostToDevice));
  b->layers_.resize(c.n_layers);
  const bool quant_layers = options.layer_weights != model::GgmlType::kF32;
  if (quant_layers && !GemvQuantSupports(options.layer_weights)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "layer_weights: type %u has no quantized GEMV (Q4_0, Q4_1, Q8_0)", static_cast<uint32_t>(options.layer_weights)));
  }
  for (DeviceLayer& L : b->layers_) {
    ASSIGN_OR_RETURN(L.attn_norm, b->Alloc(H * sizeof(float)));
    ASSIGN_OR_RETURN(L.ffn_norm, b->Alloc(H * sizeof(float)));
    if (quant_layers) continue;  // planes or bf16 per matrix, at upload
    ASSIGN_OR_RETURN(L.w_qkv, b->Alloc(b->qkv_rows_ * H * sizeof(bf16)));
    ASSIGN_OR_RETURN(L.wo, b->Alloc(H * c.n_heads * hd * sizeof(bf16)));
    ASSIGN_OR_RETURN(L.w_gate_up, b->Alloc(2 * F * H * sizeof(bf16)));
    ASSIGN_OR_RETURN(L.w_down, b->Alloc(H * F * sizeof(bf16)));
  }
  if (quant_layers) {
    // Prefill multiplies quantized matrices as bf16 tiles of this many
    // values (a GEMM per tile).
    ASSIGN_OR_RETURN(b->dequant_tile_, b->Alloc(kDequantTileValues * sizeof(bf16)));
  }
  const size_t T = options.max_prefill_chunk;
  ASSIGN_OR_RETURN(b->x_, b->Alloc(T * H * sizeof(float)));
  ASSIGN_OR_RETURN(b->xn_, b->Alloc(T * H * sizeof(bf16)));
  ASSIGN_OR_RETURN(b->qkv_, b->Alloc(T * b->qkv_rows_ * sizeof(bf16)));
  ASSIGN_OR_RETURN(b->q_, b->Alloc(T * c.n_heads * hd * sizeof(bf16)));
  ASSIGN_OR_RETURN(b->attn_, b->Alloc(T * c.n_heads * hd * sizeof(bf16)));
  const size_t mlp_rows = std::min<size_t>(T, options.max_mlp_rows);
  ASSIGN_OR_RETURN(b->gate_up_, b->Alloc(mlp_rows * 2 * F * sizeof(bf16)));
  ASSIGN_OR_RETURN(b->h_, b->Alloc(mlp_rows * F * sizeof(bf16)));
  ASSIGN_OR_RETURN(b->logits_, b->Alloc(kLogitRows * V * sizeof(float)));
  b->max_batch_ = static_cast<int>(std::min<size_t>(kLogitRows, T));
  // [ids][position, length pairs][picked tokens] (the last written by the device).
  ASSIGN_OR_RETURN(b->batch_step_, b->Alloc(4 * static_cast<size_t>(b->max_batch_) * sizeof(int32_t)));
  CUDA_RETURN_IF_ERROR(cudaMallocHost(&b->batch_host_, 4 * static_cast<size_t>(b->max_batch_) * sizeof(int32_t)));
  ASSIGN_OR_RETURN(b->step_, b->Alloc((T + 2) * sizeof(int32_t)));
  CUDA_RETURN_IF_ERROR(cudaMallocHost(&b->step_host_, (T + 2) * sizeof(int32_t)));
  CUDA_RETURN_IF_ERROR(cudaMallocHost(&b->logits_host_, kLogitRows * V * sizeof(float)));
  return b;
}

absl::Status CudaBackend::UploadBf16(const std::vector<const model::Tensor*>& parts,
                                     DeviceBuffer& dst) {
  std::vector<uint16_t> host;
  for (const model::Tensor* t : parts) {
    if (t->quantized()) {  // kept in its GGUF blocks by the load: floats first
      std::vector<float> f(static_cast<size_t>(t->rows() * t->cols()));
      RETURN_IF_ERROR(model::Dequantize(t->quant.type, t->quant.bytes, t->quant.size, f.data(),
                                        static_cast<int64_t>(f.size())));
      for (float v : f) host.push_back(model::FloatToBf16(v));
      continue;
    }
    for (float v : t->data) host.push_back(model::FloatToBf16(v));
  }
  if (host.size() * sizeof(bf16) != dst.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "weight of %d elements does not fill its %d-byte device buffer", host.size(), dst.size()));
  }
  CUDA_RETURN_IF_ERROR(cudaMemcpy(dst.get(), host.data(), dst.size(), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

absl::Status CudaBackend::UploadF32(const model::Tensor& t, DeviceBuffer& dst) {
  if (t.data.size() * sizeof(float) != dst.size()) {
    return absl::InvalidArgumentError("norm weight does not match its device buffer");
  }
  CUDA_RETURN_IF_ERROR(cudaMemcpy(dst.get(), t.data.data(), dst.size(), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

absl::Status CudaBackend::UploadWeights(const model::ModelWeights& w) {
  if (static_cast<int>(w.layers.size()) != config_.n_layers) {
    return absl::InvalidArgumentError(absl::StrFormat("weights have %d layers, config says %d",
                                                      w.layers.size(), config_.n_layers));
  }
  if (tok_embd_host_.size() > 0) {
    std::vector<float> dequantized;
    const std::vector<float>* table = &w.tok_embd.data;
    if (w.tok_embd.quantized()) {
      dequantized.resize(static_cast<size_t>(w.tok_embd.rows() * w.tok_embd.cols()));
      RETURN_IF_ERROR(model::Dequantize(w.tok_embd.quant.type, w.tok_embd.quant.bytes, w.tok_embd.quant.size,
                                        dequantized.data(), static_cast<int64_t>(dequantized.size())));
      table = &dequantized;
    }
    if (table->size() * sizeof(bf16) != tok_embd_host_.size()) {
      return absl::InvalidArgumentError("token embeddings do not match their host buffer");
    }
    uint16_t* dst = tok_embd_host_.as<uint16_t>();
    for (size_t i = 0; i < table->size(); ++i) dst[i] = model::FloatToBf16((*table)[i]);
  } else {
    RETURN_IF_ERROR(UploadBf16({&w.tok_embd}, tok_embd_));
  }
  RETURN_IF_ERROR(UploadF32(w.output_norm, output_norm_));
  if (!config_.tied_embeddings) RETURN_IF_ERROR(UploadBf16({&w.output}, output_));
  for (int l = 0; l < config_.n_layers; ++l) {
    const model::LayerWeights& src = w.layers[l];
    DeviceLayer& L = layers_[l];
    RETURN_IF_ERROR(UploadF32(src.attn_norm, L.attn_norm));
    RETURN_IF_ERROR(UploadF32(src.ffn_norm, L.ffn_norm));
    if (options_.layer_weights == model::GgmlType::kF32) {
      RETURN_IF_ERROR(UploadBf16({&src.wq, &src.wk, &src.wv}, L.w_qkv));
      RETURN_IF_ERROR(UploadBf16({&src.wo}, L.wo));
      RETURN_IF_ERROR(UploadBf16({&src.w_gate, &src.w_up}, L.w_gate_up));
      RETURN_IF_ERROR(UploadBf16({&src.w_down}, L.w_down));
      continue;
    }
    RETURN_IF_ERROR(UploadLayerMatrix({&src.wq, &src.wk, &src.wv}, L.w_qkv, L.q_qkv));
    if (L.q_qkv.on()) {
      // The speculative query (LaunchSpeculativeQuery) reads Wq's rows as
      // bf16: they keep a copy (1 GB at the 8B shape, against ~11 GB saved).
      ASSIGN_OR_RETURN(L.w_qkv, Alloc(static_cast<size_t>(src.wq.rows() * src.wq.cols()) * sizeof(bf16)));
      RETURN_IF_ERROR(UploadBf16({&src.wq}, L.w_qkv));
    }
    RETURN_IF_ERROR(UploadLayerMatrix({&src.wo}, L.wo, L.q_wo));
    RETURN_IF_ERROR(UploadLayerMatrix({&src.w_gate, &src.w_up}, L.w_gate_up, L.q_gate_up));
    RETURN_IF_ERROR(UploadLayerMatrix({&src.w_down}, L.w_down, L.q_down));
  }
  if (options_.layer_weights != model::GgmlType::kF32) {
    int quantized = 0, total = 0;
    for (const DeviceLayer& L : layers_) {
      for (const QuantDeviceMatrix* q : {&L.q_qkv, &L.q_wo, &L.q_gate_up, &L.q_down}) quantized += q->on(), ++total;
    }
    spdlog::info("cuda: {} of {} layer weight matrices kept quantized for the GEMV, the rest bf16 "
                 "(a type it does not take, or parts of different types)", quantized, total);
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::UploadLayerMatrix(const std::vector<const model::Tensor*>& parts, DeviceBuffer& bf16_dst,
                                            QuantDeviceMatrix& q) {
  const model::GgmlType type = parts.front()->quant.type;
  bool keep = GemvQuantSupports(type);
  int64_t rows = 0;
  for (const model::Tensor* t : parts) {
    keep = keep && t->quantized() && t->quant.type == type && t->cols() == parts.front()->cols();
    rows += t->rows();
  }
  const int64_t cols = parts.front()->cols();
  if (!keep) {
    ASSIGN_OR_RETURN(bf16_dst, Alloc(static_cast<size_t>(rows * cols) * sizeof(bf16)));
    return UploadBf16(parts, bf16_dst);
  }
  // The parts' planes one after another: rows append.
  QuantPlanes all;
  for (const model::Tensor* t : parts) {
    ASSIGN_OR_RETURN(QuantPlanes p, RepackForGemv(type, t->quant.bytes, t->quant.size, t->rows(), t->cols()));
    all.qs.insert(all.qs.end(), p.qs.begin(), p.qs.end());
    all.d.insert(all.d.end(), p.d.begin(), p.d.end());
    all.m.insert(all.m.end(), p.m.begin(), p.m.end());
  }
  q.type = type;
  q.rows = static_cast<int>(rows);
  q.cols = static_cast<int>(cols);
  ASSIGN_OR_RETURN(q.qs, Alloc(all.qs.size()));
  ASSIGN_OR_RETURN(q.d, Alloc(all.d.size() * sizeof(uint16_t)));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(q.qs.get(), all.qs.data(), all.qs.size(), cudaMemcpyHostToDevice));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(q.d.get(), all.d.data(), all.d.size() * sizeof(uint16_t), cudaMemcpyHostToDevice));
  if (!all.m.empty()) {
    ASSIGN_OR_RETURN(q.m, Alloc(all.m.size() * sizeof(uint16_t)));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(q.m.get(), all.m.data(), all.m.size() * sizeof(uint16_t), cudaMemcpyHostToDevice));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::RandomQuantMatrix(int rows, int cols, uint64_t seed, float value_scale,
                                            QuantDeviceMatrix& q) {
  const model::GgmlType t = options_.layer_weights;
  const int64_t blocks = static_cast<int64_t>(rows) * (cols / 32);
  q.type = t;
  q.rows = rows;
  q.cols = cols;
  ASSIGN_OR_RETURN(q.qs, Alloc(static_cast<size_t>(blocks) * (t == model::GgmlType::kQ8_0 ? 32 : 16)));
  ASSIGN_OR_RETURN(q.d, Alloc(static_cast<size_t>(blocks) * sizeof(uint16_t)));
  if (t == model::GgmlType::kQ4_1) {
    ASSIGN_OR_RETURN(q.m, Alloc(static_cast<size_t>(blocks) * sizeof(uint16_t)));
  }
  // Values d (q - 8) within about +-8 d for 4 bits, d q within +-128 d for Q8_0.
  const float d = value_scale / (t == model::GgmlType::kQ8_0 ? 128.0f : 8.0f);
  return LaunchFillRandomQuantPlanes(t, q.qs.as<uint8_t>(), q.d.as<__half>(),
                                     t == model::GgmlType::kQ4_1 ? q.m.as<__half>() : nullptr, rows, cols, seed, d,
                                     stream_.get());
}

absl::Status CudaBackend::RandomizeWeights(uint64_t seed) {
  cudaStream_t s = stream_.get();
  auto bf = [&](DeviceBuffer& b, float scale) {
    return LaunchFillRandomBf16(b.as<bf16>(), b.size() / sizeof(bf16), seed++, scale, 0.0f, s);
  };
  auto norm = [&](DeviceBuffer& b) {
    return LaunchFillRandomF32(b.as<float>(), b.size() / sizeof(float), seed++, 0.1f, 1.0f, s);
  };
  // Scales keep activations O(1) through 32 random layers (values do not
  // change speed, but NaN or Inf would make a benchmark meaningless).
  const float in_scale = 1.0f / std::sqrt(static_cast<float>(config_.hidden));
  if (tok_embd_host_.size() > 0) {
    // Written by the GPU straight into the mapped host table.
    RETURN_IF_ERROR(LaunchFillRandomBf16(tok_embd_host_dev_, tok_embd_host_.size() / sizeof(bf16),
                                         seed++, 1.0f, 0.0f, s));
  } else {
    RETURN_IF_ERROR(bf(tok_embd_, 1.0f));
  }
  RETURN_IF_ERROR(norm(output_norm_));
  if (!config_.tied_embeddings) RETURN_IF_ERROR(bf(output_, in_scale));
  const float down_scale = 1.0f / std::sqrt(static_cast<float>(config_.ffn));
  const int H = config_.hidden, q_dim = config_.n_heads * config_.head_dim;
  for (DeviceLayer& L : layers_) {
    RETURN_IF_ERROR(norm(L.attn_norm));
    RETURN_IF_ERROR(norm(L.ffn_norm));
    if (options_.layer_weights != model::GgmlType::kF32) {
      RETURN_IF_ERROR(RandomQuantMatrix(qkv_rows_, H, seed++, in_scale, L.q_qkv));
      // Wq's rows in bf16 too, for the speculative query (as UploadWeights).
      ASSIGN_OR_RETURN(L.w_qkv, Alloc(static_cast<size_t>(q_dim) * H * sizeof(bf16)));
      RETURN_IF_ERROR(bf(L.w_qkv, in_scale));
      RETURN_IF_ERROR(RandomQuantMatrix(H, q_dim, seed++, in_scale, L.q_wo));
      RETURN_IF_ERROR(RandomQuantMatrix(2 * config_.ffn, H, seed++, in_scale, L.q_gate_up));
      RETURN_IF_ERROR(RandomQuantMatrix(H, config_.ffn, seed++, down_scale, L.q_down));
      continue;
    }
    RETURN_IF_ERROR(bf(L.w_qkv, in_scale));
    RETURN_IF_ERROR(bf(L.wo, in_scale));
    RETURN_IF_ERROR(bf(L.w_gate_up, in_scale));
    RETURN_IF_ERROR(bf(L.w_down, down_scale));
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SequenceState>> CudaBackend::NewSequence(
    int capacity, const runtime::KvPlan& plan) {
  if (capacity < 1 || capacity > config_.max_context) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "sequence capacity must be in [1, %d], got %d", config_.max_context, capacity));
  }
  RETURN_IF_ERROR(plan.Validate(config_));
  const ModelConfig& c = config_;
  // The two indexes select on different streams but share the sequence's
  // scores and Top-K workspace: one index per sequence.
  std::string index;
  for (int l = 0; l < c.n_layers; ++l) {
    const runtime::LayerKvPolicy& p = plan.layers[l];
    if (p.kind != runtime::KvPolicyKind::kSparse) continue;
    if (!index.empty() && p.sparse.index != index) {
      return absl::UnimplementedError(absl::StrFormat(
          "layer %d: sparse index \"%s\" after \"%s\": the CUDA backend runs one index per plan", l,
          p.sparse.index, index));
    }
    index = p.sparse.index;
  }
  const int64_t dense_elems = static_cast<int64_t>(c.n_kv_heads) * capacity * c.head_dim;
  std::vector<LayerKv> layers(c.n_layers);
  size_t quant_ws = 0;
  bool any_window = false;
  for (int l = 0; l < c.n_layers; ++l) {
    const runtime::LayerKvPolicy& p = plan.layers[l];
    LayerKv& L = layers[l];
    L.kind = p.kind;
    switch (p.kind) {
      case runtime::KvPolicyKind::kDense: {
        L.elems = dense_elems;
        ASSIGN_OR_RETURN(L.mem, SeqAlloc(2 * dense_elems * sizeof(bf16)));
        L.kv_bytes = 2 * dense_elems * static_cast<int64_t>(sizeof(bf16));
        break;
      }
      case runtime::KvPolicyKind::kQuant: {
        L.qshape = runtime::QuantShape{.n_kv_heads = c.n_kv_heads, .head_dim = c.head_dim,
                                       .capacity = capacity, .params = p.quant};
        RETURN_IF_ERROR(ValidateQuantShape(L.qshape));
        if (c.n_heads / c.n_kv_heads > 8) {
          return absl::UnimplementedError(absl::StrFormat(
              "layer %d: the quant decode kernel takes at most 8 query heads per KV head, the "
              "model has %d", l, c.n_heads / c.n_kv_heads));
        }
        const QuantDeviceLayout layout = QuantLayout(L.qshape);
        ASSIGN_OR_RETURN(L.mem, SeqAlloc(layout.bytes));
        // The format's arrays start zeroed (quant_kv.h), as QuantKvCpu's do.
        CUDA_RETURN_IF_ERROR(cudaMemset(L.mem.get(), 0, layout.bytes));
        L.qcache = QuantCacheAt(L.mem.get(), L.qshape);
        L.kv_bytes = L.qshape.Bytes(sizeof(bf16));
        quant_ws = std::max(quant_ws, QuantDecodeWorkspaceBytes(L.qshape, c.n_heads));
        break;
      }
      case runtime::KvPolicyKind::kWindow: {
        const int rows = static_cast<int>(std::min<int64_t>(
            capacity, static_cast<int64_t>(p.window.sink) + p.window.recent));
        L.wshape = WindowShape{c.n_kv_heads, c.head_dim, p.window.sink, p.window.recent, rows,
                               capacity};
        L.elems = static_cast<int64_t>(c.n_kv_heads) * rows * c.head_dim;
        ASSIGN_OR_RETURN(L.mem, SeqAlloc(2 * L.elems * sizeof(bf16)));
        L.kv_bytes = 2 * L.elems * static_cast<int64_t>(sizeof(bf16));
        any_window = true;
        break;
      }
      case runtime::KvPolicyKind::kSparse: {
        // The kept rows (tier at creation) are counted as EstimateKvBytes does;
        // buffers come in NewSparseLayer once the sequence exists.
        const runtime::LayerKvBytes est =
            runtime::EstimateKvBytes(runtime::KvPlan::Uniform(1, p, ""), c, capacity, 2)[0];
        L.kv_bytes = est.device_bytes;
        L.kv_bytes_kept = 2 * static_cast<int64_t>(c.n_kv_heads) * c.head_dim * 2 *
                          std::min<int64_t>(capacity, static_cast<int64_t>(p.sparse.sink) + p.sparse.recent);
        if (p.sparse.index_bits == 4 && p.sparse.host_bits == 8) {
          return absl::UnimplementedError(absl::StrFormat(
              "layer %d: sparse index_bits 4 with host_bits 8: no CUDA kernel builds a 4-bit index "
              "from an FP8 host tier",
              l));
        }
        if (p.sparse.refine > 0 && p.sparse.query != "after-attention") {
          return absl::UnimplementedError(absl::StrFormat(
              "layer %d: sparse refine %d with query \"%s\": the CUDA backend refines the "
              "after-attention query only (the CPU backend runs it)",
              l, p.sparse.refine, p.sparse.query));
        }
        if (p.sparse.group_score != "mean") {
          return absl::UnimplementedError(absl::StrFormat(
              "layer %d: sparse group_score \"%s\": the CUDA kernels score the group mean only", l,
              p.sparse.group_score));
        }
        if (p.sparse.channels > kSparseMaxChannels) {
          return absl::UnimplementedError(absl::StrFormat(
              "layer %d: sparse channels %d: the CUDA kernels take at most %d", l, p.sparse.channels,
              kSparseMaxChannels));
        }
        break;
      }
    }
  }
  DeviceBuffer scratch;
  if (!plan.all_dense()) {
    ASSIGN_OR_RETURN(scratch, SeqAlloc(2 * dense_elems * sizeof(bf16)));
  }
  // The dense decode workspace also serves window layers (their capacity is
  // at most the sequence's).
  const AttentionShape shape{c.n_heads, c.n_kv_heads, c.head_dim, capacity};
  ASSIGN_OR_RETURN(DeviceBuffer ws,
                   SeqAlloc(std::max<size_t>(DecodeAttentionWorkspaceBytes(shape), 16)));
  DeviceBuffer qws, wlen;
  if (quant_ws > 0) {
    ASSIGN_OR_RETURN(qws, SeqAlloc(quant_ws));
  }
  if (any_window) {
    ASSIGN_OR_RETURN(wlen, SeqAlloc(sizeof(int32_t)));
  }
  auto seq = std::make_unique<CudaSequence>(this, plan, capacity, std::move(layers),
                                            std::move(scratch), dense_elems, std::move(ws),
                                            std::move(qws), std::move(wlen));
  static std::atomic<uint64_t> next_session{0};
  seq->host_session = absl::StrCat("cuda-", getpid(), "-", next_session.fetch_add(1));
  if (options_.host_store != nullptr) {
    // Every sparse layer's host tiers in one request (NewSparseLayer's sizes
    // and order): one round trip to kv-host per sequence.
    std::vector<uint64_t> sizes;
    for (int l = 0; l < c.n_layers; ++l) {
      if (plan.layers[l].kind != runtime::KvPolicyKind::kSparse) continue;
      const runtime::SparseParams& p = plan.layers[l].sparse;
      const uint64_t values = 2ull * c.n_kv_heads * capacity * c.head_dim;
      sizes.push_back(values * (p.host_bits == 8 ? 1 : sizeof(bf16)));
      if (p.index != "gpu") sizes.push_back(values / 2 * sizeof(bf16));
    }
    if (!sizes.empty()) {
      seq->host_store = options_.host_store;
      auto slices = options_.host_store->AllocateMany(sizes, kHostAlign, seq->host_session);
      if (!slices.ok()) {
        return absl::Status(slices.status().code(),
                            absl::StrCat("host KV for the sparse layers: ", slices.status().message()));
      }
      seq->host_prealloc.assign(slices->begin(), slices->end());
    }
  }
  for (int l = 0; l < c.n_layers; ++l) {
    if (plan.layers[l].kind == runtime::KvPolicyKind::kSparse) {
      RETURN_IF_ERROR(NewSparseLayer(*seq, l, plan.layers[l].sparse));
    }
  }
  if (seq->any_sparse()) {
    const int64_t cells = static_cast<int64_t>(c.n_kv_heads) * capacity;
    ASSIGN_OR_RETURN(seq->scores, SeqAlloc(cells * sizeof(float)));
    ASSIGN_OR_RETURN(seq->topk_ws, SeqAlloc(TopKWorkspaceBytes(c.n_kv_heads, capacity)));
    ASSIGN_OR_RETURN(seq->q_mean,
                     SeqAlloc(static_cast<size_t>(c.n_kv_heads) * c.head_dim * sizeof(float)));
    ASSIGN_OR_RETURN(seq->spec_x, SeqAlloc(2 * static_cast<size_t>(c.n_layers) *
                                                         c.hidden * sizeof(bf16)));
  }
  return std::unique_ptr<SequenceState>(std::move(seq));
}

int64_t CudaBackend::SequenceMemoryBytes(int prompt, int capacity, const runtime::KvPlan& plan) const {
  const ModelConfig& c = config_;
  auto buf = [](int64_t bytes) -> int64_t {
    if (bytes <= 0) return 0;
    const int64_t g = bytes >= (int64_t{1} << 20) ? (int64_t{2} << 20) : 512;
    return (bytes + g - 1) / g * g;
  };
  const int64_t hd = c.head_dim, n_kv = c.n_kv_heads, cap = capacity;
  const int64_t dense_elems = n_kv * cap * hd, bf = sizeof(bf16);
  const int P = std::clamp(prompt, 0, capacity);
  int64_t total = 0;
  size_t quant_ws = 0;
  bool any_window = false, any_sparse = false;
  for (int l = 0; l < c.n_layers && l < static_cast<int>(plan.layers.size()); ++l) {
    const runtime::LayerKvPolicy& p = plan.layers[l];
    switch (p.kind) {
      case runtime::KvPolicyKind::kDense:
        total += buf(2 * dense_elems * bf);
        break;
      case runtime::KvPolicyKind::kQuant: {
        const runtime::QuantShape q{.n_kv_heads = c.n_kv_heads, .head_dim = c.head_dim,
                                    .capacity = capacity, .params = p.quant};
        total += buf(static_cast<int64_t>(QuantLayout(q).bytes));
        quant_ws = std::max(quant_ws, QuantDecodeWorkspaceBytes(q, c.n_heads));
        break;
      }
      case runtime::KvPolicyKind::kWindow: {
        const int64_t rows = std::min<int64_t>(cap, static_cast<int64_t>(p.window.sink) + p.window.recent);
        total += buf(2 * n_kv * rows * hd * bf);
        any_window = true;
        break;
      }
      case runtime::KvPolicyKind::kSparse: {
        const runtime::SparseParams& sp = p.sparse;
        any_sparse = true;
        const bool gpu_index = sp.index == "gpu";
        const int64_t heads_dim = n_kv * hd, d = n_kv * sp.channels;
        total += buf(heads_dim * 4) + 2 * buf(d * 4) + buf(n_kv * std::min<int64_t>(sp.top_k, cap) * 4) + buf(4);
        if (gpu_index) {
          total += buf(heads_dim * 4);
          if (sp.index_bits == 4) {
            total += buf(Int4IndexCodeBytes(c.n_kv_heads, cap, sp.channels)) +
                     buf(Int4IndexParamBytes(c.n_kv_heads, cap, sp.channels));
          } else {
            total += buf(d * cap * (sp.index_bits == 8 ? 1 : bf));
          }
        }
        // From the end of the prompt (EndSparsePrompt).
        const int64_t sink = std::min(sp.sink, P);
        const int64_t recent = std::min<int64_t>(sp.recent, P - sink);
        const int64_t candidates = P - sink - recent;
        const int64_t selected = std::min<int64_t>(sp.top_k, candidates);
        total += buf(2 * n_kv * (sink + recent + selected + (cap - P)) * hd * bf);
        if (gpu_index && sp.refine > 0 && l > 0 && selected > 0) {
          const int64_t pool = std::min<int64_t>(candidates, static_cast<int64_t>(sp.refine) * sp.top_k);
          total += buf(n_kv * pool * 4) + buf(n_kv * selected * 4);
        }
        if (selected > 0 && selected <= kAssignSlotsMaxCount) total += 2 * buf(n_kv * selected * 4);
        break;
      }
    }
  }
  if (!plan.all_dense()) total += buf(2 * dense_elems * bf);  // the scratch
  const AttentionShape shape{c.n_heads, c.n_kv_heads, c.head_dim, capacity};
  total += buf(std::max<int64_t>(DecodeAttentionWorkspaceBytes(shape), 16));
  total += buf(static_cast<int64_t>(quant_ws));
  if (any_window) total += buf(4);
  if (any_sparse) {
    total += buf(n_kv * cap * 4) + buf(static_cast<int64_t>(TopKWorkspaceBytes(c.n_kv_heads, capacity))) +
             buf(n_kv * hd * 4) + buf(2 * static_cast<int64_t>(c.n_layers) * c.hidden * bf);
    if (options_.sparse_row_reuse) total += buf(8);
  }
  return total;
}

absl::StatusOr<kvhost::HostKvStore*> CudaBackend::HostStore() {
  if (options_.host_store != nullptr) return options_.host_store;
  if (host_store_ != nullptr) return host_store_.get();
  kvhost::InProcessStoreOptions o;
  uint64_t budget = options_.host_kv_budget_bytes;
  if (budget == 0) {
    // Default: 80% of physical memory, a page multiple.
    const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
    budget = static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * page / 5 * 4 / page * page;
  }
  o.budget_bytes = budget;
  // With grow_on_demand off this only bounds a slice: HostAlloc sizes arenas
  // to the request (one sparse layer's host rows: 2 GiB at 1M tokens).
  o.arena_bytes = budget;
  o.grow_on_demand = false;
  o.arena_name_prefix = "tkv-sparse-kv";
  const int device = options_.device;
  o.register_fn = [device](void* base, size_t bytes) { return RegisterHostMemory(base, bytes, device); };
  o.unregister_fn = [](void* base, size_t) { return UnregisterHostMemory(base); };
  ASSIGN_OR_RETURN(host_store_, kvhost::InProcessStore::Create(std::move(o)));
  return host_store_.get();
}

absl::StatusOr<kvhost::HostSlice> CudaBackend::HostAlloc(CudaSequence& seq, uint64_t bytes,
                                                          void** device_ptr, const std::byte** host_ptr) {
  ASSIGN_OR_RETURN(kvhost::HostKvStore * store, HostStore());
  absl::StatusOr<kvhost::HostSlice> slice;
  if (!seq.host_prealloc.empty()) {
    // NewSequence asked for every host tier at once (one round trip to kv-host).
    slice = seq.host_prealloc.front();
    seq.host_prealloc.pop_front();
    if (slice->length != bytes) return absl::InternalError("HostAlloc: preallocated slice of another size");
  } else {
    slice = store->Allocate(bytes, kHostAlign, seq.host_session);
  }
  if (!slice.ok() && store == host_store_.get()) {
    // No arena has room: one of a whole number of slices of this size (up to
    // 1 GiB, so that small sequences share arenas; freed slices are reused by
    // later ones). A whole number: 1 GiB arenas of 268.6 MB slices (a 128k
    // sequence's FP8 layer at the 8B shape) left a quarter of the budget in
    // unusable 267.9 MB tails (tkv_batch_bench, H100, 2026-12-07).
    const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
    const uint64_t need = (bytes + page - 1) / page * page;
    const kvhost::HostKvStoreStats st = store->Stats();
    const uint64_t left = st.budget_bytes - st.reserved_bytes;
    const uint64_t arena = need * std::max<uint64_t>(1, std::min<uint64_t>(uint64_t{1} << 30, left) / need);
    auto id = store->CreateArena(arena, "tkv-sparse-kv");
    if (!id.ok() && !host_store_->RetireEmptyArenas(0).empty()) {
      // Empty arenas of slices of another size (sequences of other
      // capacities or plans, all ended) held the budget: give them back.
      const uint64_t now_left = store->Stats().budget_bytes - store->Stats().reserved_bytes;
      id = store->CreateArena(
          need * std::max<uint64_t>(1, std::min<uint64_t>(uint64_t{1} << 30, now_left) / need), "tkv-sparse-kv");
    }
    if (!id.ok()) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "host KV store: cannot hold %d more bytes for a sparse layer: %s", bytes, id.status().message()));
    }
    slice = store->Allocate(bytes, kHostAlign, seq.host_session);
  }
  if (!slice.ok()) {
    return absl::Status(slice.status().code(),
                        absl::StrCat("host KV for a sparse layer: ", slice.status().message()));
  }
  ASSIGN_OR_RETURN(absl::Span<std::byte> data, store->Data(*slice));
  void* dev = nullptr;
  CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(&dev, data.data(), 0));
  *device_ptr = dev;
  if (host_ptr != nullptr) *host_ptr = data.data();
  return *slice;
}

absl::Status CudaBackend::NewSparseLayer(CudaSequence& seq, int l, const runtime::SparseParams& p) {
  const ModelConfig& c = config_;
  const int cap = seq.capacity();
  auto sp = std::make_unique<SparseKv>();
  sp->params = p;
  sp->gpu_index = p.index == "gpu";
  ASSIGN_OR_RETURN(seq.host_store, HostStore());
  void* dev = nullptr;
  const uint64_t values = 2ull * c.n_kv_heads * cap * c.head_dim;
  const uint64_t rows_bytes = values * (p.host_bits == 8 ? 1 : sizeof(bf16));
  // Registered before any failure below can return, so the destructor frees it.
  ASSIGN_OR_RETURN(sp->host_slice, HostAlloc(seq, rows_bytes, &dev, &sp->host_cpu));
  sp->host = dev;
  seq.sparse[l] = std::move(sp);
  SparseKv& s = *seq.sparse[l];
  if (!s.gpu_index) {
    ASSIGN_OR_RETURN(s.kt_slice, HostAlloc(seq, values / 2 * sizeof(bf16), &dev));
    s.kt = static_cast<bf16*>(dev);
  }
  const size_t heads_dim = static_cast<size_t>(c.n_kv_heads) * c.head_dim;
  ASSIGN_OR_RETURN(s.max_abs, SeqAlloc(heads_dim * sizeof(float)));
  CUDA_RETURN_IF_ERROR(cudaMemset(s.max_abs.get(), 0, s.max_abs.size()));
  const size_t d = static_cast<size_t>(c.n_kv_heads) * p.channels;
  ASSIGN_OR_RETURN(s.chans, SeqAlloc(d * sizeof(int32_t)));
  ASSIGN_OR_RETURN(s.q_chan, SeqAlloc(d * sizeof(float)));
  ASSIGN_OR_RETURN(s.sel, SeqAlloc(static_cast<size_t>(c.n_kv_heads) *
                                                 std::min(p.top_k, cap) * sizeof(int32_t)));
  ASSIGN_OR_RETURN(s.len, SeqAlloc(sizeof(int32_t)));
  if (s.gpu_index) {
    ASSIGN_OR_RETURN(s.last_q_mean, SeqAlloc(heads_dim * sizeof(float)));
    CUDA_RETURN_IF_ERROR(cudaMemset(s.last_q_mean.get(), 0, s.last_q_mean.size()));
    if (p.index_bits == 4) {
      ASSIGN_OR_RETURN(s.index, SeqAlloc(Int4IndexCodeBytes(c.n_kv_heads, cap, p.channels)));
      ASSIGN_OR_RETURN(s.index_params,
                       SeqAlloc(Int4IndexParamBytes(c.n_kv_heads, cap, p.channels)));
    } else {
      ASSIGN_OR_RETURN(s.index, SeqAlloc(d * cap * (p.index_bits == 8 ? 1 : sizeof(bf16))));
    }
  }
  ASSIGN_OR_RETURN(s.selected_ready, CudaEvent::Create());
  return absl::OkStatus();
}

absl::Status CudaBackend::Gemm(const bf16* x, int n, const bf16* w, int out, int in, float* y,
                               bool accumulate, bool batched) {
  if (batched) {
    return LaunchGemvBatchBf16(w, x, n, out, in, y, /*y_bf16=*/false, accumulate, stream_.get());
  }
  if (n == 1 && options_.custom_gemv) {
    return LaunchGemvBf16(w, x, out, in, y, /*y_bf16=*/false, accumulate, stream_.get());
  }
  return GemmEx(x, n, w, out, in, y, CUDA_R_32F, accumulate ? 1.0f : 0.0f);
}

absl::Status CudaBackend::Gemm(const bf16* x, int n, const bf16* w, int out, int in, bf16* y,
                               bool batched) {
  if (batched) {
    return LaunchGemvBatchBf16(w, x, n, out, in, y, /*y_bf16=*/true, false, stream_.get());
  }
  if (n == 1 && options_.custom_gemv) {
    return LaunchGemvBf16(w, x, out, in, y, /*y_bf16=*/true, false, stream_.get());
  }
  return GemmEx(x, n, w, out, in, y, CUDA_R_16BF, 0.0f);
}

absl::Status CudaBackend::GemmEx(const bf16* x, int n, const bf16* w, int out, int in, void* y,
                                 cudaDataType_t y_type, float beta) {
  // Row-major y[n][out] = x[n][in] W[out][in]^T is, column-major,
  // y^T (out x n) = W^T (stored in x out, hence OP_T) * x^T (in x n).
  const float alpha = 1.0f;
  CUBLAS_RETURN_IF_ERROR(cublasGemmEx(cublas_.get(), CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &alpha,
                                      w, CUDA_R_16BF, in, x, CUDA_R_16BF, in, &beta, y, y_type, out,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

absl::Status CudaBackend::LayerGemm(const bf16* x, int n, const DeviceBuffer& w, const QuantDeviceMatrix& q,
                                    int out, int in, void* y, bool y_bf16, bool accumulate, bool batched) {
  if (!q.on()) {
    return y_bf16 ? Gemm(x, n, w.as<bf16>(), out, in, static_cast<bf16*>(y), batched)
                  : Gemm(x, n, w.as<bf16>(), out, in, static_cast<float*>(y), accumulate, batched);
  }
  if (q.rows != out || q.cols != in) {
    return absl::InternalError(absl::StrFormat("quantized matrix is %d x %d, the product wants %d x %d", q.rows,
                                               q.cols, out, in));
  }
  const size_t y_elem = y_bf16 ? sizeof(bf16) : sizeof(float);
  if (n == 1 || batched) {
    // Decode rows: the weights read once per pass of up to 8 rows, each
    // row's result bit-identical to its own alone.
    return LaunchGemvQuantBatch(q.view(), x, n, y, y_bf16, accumulate, stream_.get(),
                                options_.gemv_quant_pipelined ? GemvQuantKernelKind::kPipelined
                                                              : GemvQuantKernelKind::kSimple);
  }
  // Prefill: y[:, r0:r0+m] from tiles of m weight rows, as GemmEx computes
  // it (column-major y^T, leading dimension out).
  const int tile_rows = static_cast<int>(std::max<int64_t>(1, kDequantTileValues / in));
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  for (int r0 = 0; r0 < out; r0 += tile_rows) {
    const int m = std::min(tile_rows, out - r0);
    RETURN_IF_ERROR(LaunchDequantizeRows(q.view(), r0, m, dequant_tile_.as<bf16>(), stream_.get()));
    CUBLAS_RETURN_IF_ERROR(cublasGemmEx(cublas_.get(), CUBLAS_OP_T, CUBLAS_OP_N, m, n, in, &alpha,
                                        dequant_tile_.get(), CUDA_R_16BF, in, x, CUDA_R_16BF, in, &beta,
                                        static_cast<char*>(y) + static_cast<int64_t>(r0) * y_elem,
                                        y_bf16 ? CUDA_R_16BF : CUDA_R_32F, out, CUBLAS_COMPUTE_32F,
                                        CUBLAS_GEMM_DEFAULT));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::EnqueueLayers(const Pass& pass, const TapRequest* tap) {
  const ModelConfig& c = config_;
  cudaStream_t s = stream_.get();
  const int n = pass.rows;
  const bool decode = pass.decode;
  const bool batched = pass.batched;
  // Tokens per sequence: a batch holds one of each.
  const int per_seq = batched ? 1 : n;
  const int q_dim = c.n_heads * c.head_dim;
  float* x = x_.as<float>();
  bf16* xn = xn_.as<bf16>();
  RETURN_IF_ERROR(LaunchEmbedding(embd_table(), c.vocab, pass.ids, n, c.hidden, x, s));
  // Prefill passes hold one sequence.
  CudaSequence& first = *pass.slots[0].seq;
  const int first_start = pass.slots[0].start;
  if (!decode) RETURN_IF_ERROR(PrefetchSparseHistory(first, -1, first_start));
  // Index "gpu", query "previous" / "after-attention": layer l + 1's
  // selection starts from this layer's input / from the stream after this
  // layer's attention, and runs on the side stream meanwhile (layer 0's
  // from its own input; query "real" selects in line).
  auto next_query = [&](const CudaSequence& seq, int l) -> const std::string* {
    return (decode && l + 1 < c.n_layers && seq.sparse[l + 1] != nullptr && seq.sparse[l + 1]->gpu_index)
               ? &seq.sparse[l + 1]->params.query
               : nullptr;
  };
  for (int l = 0; l < c.n_layers; ++l) {
    const DeviceLayer& L = layers_[l];
    RETURN_IF_ERROR(LaunchRmsNorm(x, L.attn_norm.as<float>(), n, c.hidden, c.rms_eps, xn, s));
    for (const SeqSlot& slot : pass.slots) {
      if (!decode) break;
      CudaSequence& seq = *slot.seq;
      const bf16* row_xn = xn + static_cast<int64_t>(slot.row) * c.hidden;
      const std::string* nq = next_query(seq, l);
      if (l == 0) RETURN_IF_ERROR(EnqueueSpeculativeSelection(slot, 0, row_xn));
      if (nq != nullptr && *nq == "previous") {
        RETURN_IF_ERROR(EnqueueSpeculativeSelection(slot, l + 1, row_xn));
      }
      // Query "after-attention": a first pass from this layer's input,
      // overlapping the whole layer. Plan refine: its Top-(refine x K) pool,
      // which the final pass ranks instead of every candidate. Else, with
      // row reuse (option sparse_late_prefetch): it fetches most of the rows
      // the final pass will pick, so that only the misses cross PCIe once
      // that starts, after this layer's attention, with only the MLP left
      // to overlap it.
      if (nq != nullptr && *nq == "after-attention") {
        if (seq.sparse[l + 1]->n_pool > 0) {
          RETURN_IF_ERROR(EnqueueSpeculativeSelection(slot, l + 1, row_xn, SelectPass::kPool));
        } else if (options_.sparse_row_reuse && options_.sparse_late_prefetch &&
                   options_.sparse_overlap) {
          RETURN_IF_ERROR(EnqueueSpeculativeSelection(slot, l + 1, row_xn, SelectPass::kPrefetch));
        }
      }
    }
    RETURN_IF_ERROR(LayerGemm(xn, n, L.w_qkv, L.q_qkv, qkv_rows_, c.hidden, qkv_.get(), true, false, batched));
    for (const SeqSlot& slot : pass.slots) RETURN_IF_ERROR(EnqueueAttention(slot, l, per_seq, decode));
    if (!decode && first.layer(l).kind != runtime::KvPolicyKind::kDense) {
      RETURN_IF_ERROR(PrefetchSparseHistory(first, l, first_start));
    }
    if (tap != nullptr) RETURN_IF_ERROR(TapLayer(first, l, n, *tap));
    RETURN_IF_ERROR(LayerGemm(attn_.as<bf16>(), n, L.wo, L.q_wo, c.hidden, q_dim, x, false, true, batched));
    for (const SeqSlot& slot : pass.slots) {
      const std::string* nq = next_query(*slot.seq, l);
      if (nq == nullptr || *nq != "after-attention") continue;
      // Layer l + 1's own norm over the stream as it stands now (xn is free
      // until the FFN norm below overwrites it).
      const int64_t at = static_cast<int64_t>(slot.row) * c.hidden;
      RETURN_IF_ERROR(LaunchRmsNorm(x + at, layers_[l + 1].attn_norm.as<float>(), 1, c.hidden,
                                    c.rms_eps, xn + at, s));
      RETURN_IF_ERROR(EnqueueSpeculativeSelection(
          slot, l + 1, xn + at,
          slot.seq->sparse[l + 1]->n_pool > 0 ? SelectPass::kRefined : SelectPass::kFinal));
    }
    RETURN_IF_ERROR(LaunchRmsNorm(x, L.ffn_norm.as<float>(), n, c.hidden, c.rms_eps, xn, s));
    // The MLP in row blocks (options_.max_mlp_rows): its intermediates
    // (3 x ffn values a row) are the largest activations.
    for (int r = 0; r < n; r += options_.max_mlp_rows) {
      const int m = std::min(options_.max_mlp_rows, n - r);
      const int64_t at = static_cast<int64_t>(r) * c.hidden;
      RETURN_IF_ERROR(LayerGemm(xn + at, m, L.w_gate_up, L.q_gate_up, 2 * c.ffn, c.hidden, gate_up_.get(), true,
                                false, batched));
      RETURN_IF_ERROR(LaunchSwiGlu(gate_up_.as<bf16>(), m, c.ffn, h_.as<bf16>(), s));
      RETURN_IF_ERROR(
          LayerGemm(h_.as<bf16>(), m, L.w_down, L.q_down, c.hidden, c.ffn, x + at, false, true, batched));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::EnqueueAttention(const SeqSlot& slot, int l, int n, bool decode) {
  const ModelConfig& c = config_;
  cudaStream_t s = stream_.get();
  CudaSequence& seq = *slot.seq;
  const int start = slot.start;
  const int32_t* d_pos = slot.step;
  const int32_t* d_len = slot.step + 1;
  const int cap = seq.capacity();
  const AttentionShape shape{c.n_heads, c.n_kv_heads, c.head_dim, cap};
  const bool adjacent = c.rope_style == model::RopeStyle::kAdjacentPairs;
  const LayerKv& L = seq.layer(l);
  const int64_t q_at = static_cast<int64_t>(slot.row) * c.n_heads * c.head_dim;
  bf16* q = q_.as<bf16>() + q_at;
  bf16* out = attn_.as<bf16>() + q_at;
  const bf16* qkv = qkv_.as<bf16>() + static_cast<int64_t>(slot.row) * qkv_rows_;
  if (L.kind == runtime::KvPolicyKind::kSparse) return EnqueueSparseAttention(slot, l, n, decode);
  if (L.kind == runtime::KvPolicyKind::kDense) {
    RETURN_IF_ERROR(LaunchRopeAppendKv(qkv, n, d_pos, c.n_heads, c.n_kv_heads,
                                       c.head_dim, inv_freq_.as<float>(), adjacent, q, L.k(), L.v(),
                                       cap, s));
    if (decode) {
      return LaunchDecodeAttention(q, L.k(), L.v(), d_len, shape, seq.attn_workspace(), out, s);
    }
    return LaunchPrefillAttention(q, L.k(), L.v(), n, start, shape, out, s);
  }
  // Non-dense: the new K/V go to the scratch at their positions first.
  bf16* sk = seq.scratch_k();
  bf16* sv = seq.scratch_v();
  const int64_t head_stride = static_cast<int64_t>(cap) * c.head_dim;
  if (L.kind == runtime::KvPolicyKind::kQuant) {
    if (!decode && start > 0) {
      RETURN_IF_ERROR(LaunchQuantMaterialize(start, L.qshape, L.qcache, sk, sv, head_stride, s));
    }
    RETURN_IF_ERROR(LaunchRopeAppendKv(qkv, n, d_pos, c.n_heads, c.n_kv_heads,
                                       c.head_dim, inv_freq_.as<float>(), adjacent, q, sk, sv, cap,
                                       s));
    if (decode) {
      RETURN_IF_ERROR(LaunchQuantAppend(sk, sv, head_stride, d_pos, L.qshape, L.qcache, s));
      return LaunchQuantDecodeAttention(q, c.n_heads, L.qshape, L.qcache, d_len,
                                        seq.quant_workspace(), out, s);
    }
    RETURN_IF_ERROR(LaunchPrefillAttention(q, sk, sv, n, start, shape, out, s));
    return LaunchQuantPack(sk, sv, head_stride, start, start + n, L.qshape, L.qcache, s);
  }
  // Window.
  RETURN_IF_ERROR(LaunchRopeAppendKv(qkv, n, d_pos, c.n_heads, c.n_kv_heads,
                                     c.head_dim, inv_freq_.as<float>(), adjacent, q, sk, sv, cap, s));
  if (decode) {
    RETURN_IF_ERROR(LaunchWindowAppend(sk, sv, d_pos, L.wshape, L.k(), L.v(), seq.window_len(), s));
    const AttentionShape wshape{c.n_heads, c.n_kv_heads, c.head_dim, L.wshape.rows};
    return LaunchDecodeAttention(q, L.k(), L.v(), seq.window_len(), wshape, seq.attn_workspace(),
                                 out, s);
  }
  // History compacted right before the chunk: attention over scratch rows
  // [start - h, start + n) is [kept history | chunk].
  const int h = std::min(start, L.wshape.sink + L.wshape.recent);
  RETURN_IF_ERROR(LaunchWindowGatherHistory(L.k(), L.v(), start, L.wshape, sk, sv, s));
  const int64_t off = static_cast<int64_t>(start - h) * c.head_dim;
  RETURN_IF_ERROR(LaunchPrefillAttention(q, sk + off, sv + off, n, h, shape, out, s));
  return LaunchWindowStoreChunk(sk, sv, start, n, L.wshape, L.k(), L.v(), s);
}

absl::Status CudaBackend::EndSparsePrompt(CudaSequence& seq) {
  const ModelConfig& c = config_;
  cudaStream_t s = stream_.get();
  const int P = seq.length(), cap = seq.capacity(), hd = c.head_dim;
  for (int l = 0; l < c.n_layers; ++l) {
    if (seq.sparse[l] == nullptr) continue;
    SparseKv& sp = *seq.sparse[l];
    sp.prompt = P;
    sp.sink = std::min(sp.params.sink, P);
    sp.recent = std::min(sp.params.recent, P - sp.sink);
    sp.candidates = P - sp.kept();
    sp.selected = std::min(sp.params.top_k, sp.candidates);
    sp.tier_rows = sp.kept() + sp.selected + (cap - P);
    ASSIGN_OR_RETURN(sp.tier, SeqAlloc(2 * static_cast<size_t>(c.n_kv_heads) *
                                                     sp.tier_rows * hd * sizeof(bf16)));
    bf16* tk = sp.tier.as<bf16>();
    bf16* tv = tk + static_cast<int64_t>(c.n_kv_heads) * sp.tier_rows * hd;
    // Kept rows: sink positions, then the last `recent` prompt positions.
    std::vector<int32_t> kept;
    for (int h = 0; h < c.n_kv_heads; ++h) {
      for (int p = 0; p < sp.sink; ++p) kept.push_back(p);
      for (int p = P - sp.recent; p < P; ++p) kept.push_back(p);
    }
    if (!kept.empty()) {
      // The scores buffer (not in use yet this step) carries the positions.
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(seq.scores.get(), kept.data(), kept.size() * sizeof(int32_t),
                                           cudaMemcpyHostToDevice, s));
      RETURN_IF_ERROR(GatherHost(sp, cap, 0, seq.scores.as<int32_t>(), sp.kept(), c.n_kv_heads, hd,
                                 tk, tv, static_cast<int64_t>(sp.tier_rows) * hd, 0, s));
      // The copy's source must outlive it.
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    }
    if (sp.gpu_index) {
      RETURN_IF_ERROR(LaunchChooseChannels(sp.last_q_mean.as<float>(), sp.max_abs.as<float>(),
                                           c.n_kv_heads, hd, sp.params.channels,
                                           sp.chans.as<int32_t>(), nullptr, s));
      RETURN_IF_ERROR(BuildIndex(sp, cap, P, c.n_kv_heads, hd, cap, s));
    }
    // Refine: layer 0 has no previous layer to speculate from (it selects
    // from its own input, as without refine).
    sp.n_pool = (sp.gpu_index && sp.params.refine > 0 && l > 0 && sp.selected > 0)
                    ? static_cast<int>(std::min<int64_t>(
                          sp.candidates, static_cast<int64_t>(sp.params.refine) * sp.params.top_k))
                    : 0;
    if (sp.n_pool > 0) {
      ASSIGN_OR_RETURN(sp.pool, SeqAlloc(static_cast<size_t>(c.n_kv_heads) * sp.n_pool *
                                                       sizeof(int32_t)));
      ASSIGN_OR_RETURN(sp.pool_pick, SeqAlloc(static_cast<size_t>(c.n_kv_heads) *
                                                            sp.selected * sizeof(int32_t)));
    }
    // The slot pool runs with row reuse off too (it then fetches every
    // slot's row), so the tier's bytes, and the logits, are the same both ways.
    if (sp.selected > 0 && sp.selected <= kAssignSlotsMaxCount) {
      const size_t slots = static_cast<size_t>(c.n_kv_heads) * sp.selected;
      ASSIGN_OR_RETURN(sp.slot_tok, SeqAlloc(slots * sizeof(int32_t)));
      ASSIGN_OR_RETURN(sp.miss, SeqAlloc(slots * sizeof(int32_t)));
      // Nothing held yet: every row of the first step is fetched.
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(sp.slot_tok.get(), 0xFF, sp.slot_tok.size(), s));
    }
  }
  if (options_.sparse_row_reuse && seq.reuse_count.get() == nullptr) {
    ASSIGN_OR_RETURN(seq.reuse_count, SeqAlloc(sizeof(unsigned long long)));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(seq.reuse_count.get(), 0, seq.reuse_count.size(), s));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::PrefetchSparseHistory(CudaSequence& seq, int after, int start) {
  if (after < 0) {
    // A new chunk: nothing is in flight for it (a failed call may have left a mark).
    for (auto& sp : seq.sparse) {
      if (sp != nullptr) sp->history_prefetched_for = -1;
    }
  }
  if (!options_.prefill_prefetch || start == 0) return absl::OkStatus();
  int next = after + 1;
  while (next < config_.n_layers && seq.layer(next).kind == runtime::KvPolicyKind::kDense) ++next;
  if (next == config_.n_layers || seq.sparse[next] == nullptr) return absl::OkStatus();
  SparseKv& sp = *seq.sparse[next];
  // FP8 rows need a kernel to widen them, which would take SMs from the
  // layers it overlaps: those load in line.
  if (sp.prompt_ended() || sp.params.host_bits != 16 || sp.host_cpu == nullptr) {
    return absl::OkStatus();
  }
  const ModelConfig& c = config_;
  const size_t hd = c.head_dim, cap = seq.capacity();
  const size_t row = hd * sizeof(bf16);  // one K (or V) row; a host row is K | V
  CUDA_RETURN_IF_ERROR(cudaEventRecord(scratch_free_.get(), stream_.get()));
  CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(copy_.get(), scratch_free_.get(), 0));
  for (int h = 0; h < c.n_kv_heads; ++h) {
    const std::byte* src = sp.host_cpu + h * cap * 2 * row;
    bf16* dk = seq.scratch_k() + h * cap * hd;
    bf16* dv = seq.scratch_v() + h * cap * hd;
    CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(dk, row, src, 2 * row, row, start,
                                           cudaMemcpyHostToDevice, copy_.get()));
    CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(dv, row, src + row, 2 * row, row, start,
                                           cudaMemcpyHostToDevice, copy_.get()));
  }
  CUDA_RETURN_IF_ERROR(cudaEventRecord(history_ready_.get(), copy_.get()));
  sp.history_prefetched_for = start;
  return absl::OkStatus();
}

absl::Status CudaBackend::EnqueueSelection(CudaSequence& seq, SparseKv& sp, const float* q_chan,
                                           cudaStream_t s, SelectPass pass) {
  const ModelConfig& c = config_;
  const int cap = seq.capacity();
  if (sp.selected == 0) return absl::OkStatus();
  const bool refined = pass == SelectPass::kRefined;
  if (refined && sp.n_pool == 0) return absl::InternalError("EnqueueSelection: refined pass without a pool");
  // Every candidate, or (refined) the pool's: n scores a row of `stride`.
  const int n_scored = refined ? sp.n_pool : sp.candidates;
  const int64_t stride = refined ? sp.n_pool : cap;
  const int32_t* pool = refined ? sp.pool.as<int32_t>() : nullptr;
  float* scores = seq.scores.as<float>();
  // FP8 index: scoring fused into the Top-K's first stage where it applies
  // (the same selection; the scores never go through memory).
  const int want = pass == SelectPass::kPool ? sp.n_pool : sp.selected;
  const bool fused = sp.gpu_index && sp.params.index_bits == 8 && !refined &&
                     options_.sparse_fused_topk &&
                     ScoreFp8TopKApplies(sp.candidates, want, sp.params.channels);
  if (fused) {
    RETURN_IF_ERROR(LaunchScoreFp8TopK(q_chan, sp.index.as<uint8_t>(), cap, sp.params.channels,
                                       c.n_kv_heads, sp.sink, sp.candidates, want,
                                       pass == SelectPass::kPool ? sp.pool.as<int32_t>() : sp.sel.as<int32_t>(),
                                       seq.topk_ws.get(), seq.topk_ws.size(), s,
                                       options_.sparse_fused_chunk_threads));
    if (pass == SelectPass::kPool) return absl::OkStatus();
  } else if (sp.gpu_index && sp.params.index_bits == 4) {
    RETURN_IF_ERROR(LaunchScoreInt4ChannelIndex(q_chan, sp.index.as<uint8_t>(), sp.index_params.as<bf16>(),
                                                cap, sp.params.channels, c.n_kv_heads, sp.sink, n_scored,
                                                scores, stride, s, pool));
  } else if (sp.gpu_index && sp.params.index_bits == 8) {
    RETURN_IF_ERROR(LaunchScoreFp8ChannelIndex(q_chan, sp.index.as<uint8_t>(), cap,
                                               sp.params.channels, c.n_kv_heads, sp.sink, n_scored,
                                               scores, stride, s, pool));
  } else if (sp.gpu_index) {
    RETURN_IF_ERROR(LaunchScoreChannelIndex(q_chan, sp.index.as<bf16>(), cap, sp.params.channels,
                                            c.n_kv_heads, sp.sink, n_scored, scores, stride, s,
                                            pool));
  } else {
    RETURN_IF_ERROR(LaunchScoreFaithful(q_chan, sp.chans.as<int32_t>(), sp.params.channels, sp.kt,
                                        cap, c.n_kv_heads, c.head_dim, sp.sink, sp.candidates,
                                        scores, cap, s));
  }
  if (pass == SelectPass::kPool) {
    return LaunchTopK(scores, cap, c.n_kv_heads, sp.candidates, nullptr, sp.n_pool,
                      sp.pool.as<int32_t>(), seq.topk_ws.get(), seq.topk_ws.size(), s);
  }
  if (fused) {
    // Selected above.
  } else if (refined) {
    RETURN_IF_ERROR(LaunchTopK(scores, stride, c.n_kv_heads, n_scored, nullptr, sp.selected,
                               sp.pool_pick.as<int32_t>(), seq.topk_ws.get(), seq.topk_ws.size(), s));
    RETURN_IF_ERROR(LaunchMapThroughPool(sp.pool_pick.as<int32_t>(), sp.selected, pool, sp.n_pool,
                                         c.n_kv_heads, sp.sel.as<int32_t>(), s));
  } else {
    RETURN_IF_ERROR(LaunchTopK(scores, cap, c.n_kv_heads, sp.candidates, nullptr, sp.selected,
                               sp.sel.as<int32_t>(), seq.topk_ws.get(), seq.topk_ws.size(), s));
  }
  const bool count_reuse = pass != SelectPass::kPrefetch;
  bf16* tk = sp.tier.as<bf16>();
  bf16* tv = tk + static_cast<int64_t>(c.n_kv_heads) * sp.tier_rows * c.head_dim;
  const int64_t tier_stride = static_cast<int64_t>(sp.tier_rows) * c.head_dim;
  if (sp.slot_tok.get() == nullptr) {
    return GatherHost(sp, cap, sp.sink, sp.sel.as<int32_t>(), sp.selected, c.n_kv_heads,
                      c.head_dim, tk, tv, tier_stride, sp.kept(), s);
  }
  // Slot pool: a row selected again stays in its slot; the new ones take the
  // freed slots. Row reuse fetches only those; without it every slot's row
  // is fetched again (the same bytes end up in the tier either way).
  const bool reuse = options_.sparse_row_reuse;
  RETURN_IF_ERROR(LaunchAssignSlots(
      sp.slot_tok.as<int32_t>(), sp.sel.as<int32_t>(), sp.selected, c.n_kv_heads,
      sp.miss.as<int32_t>(), reuse && count_reuse ? seq.reuse_count.as<unsigned long long>() : nullptr,
      s));
  return GatherHost(sp, cap, sp.sink, reuse ? sp.miss.as<int32_t>() : sp.slot_tok.as<int32_t>(),
                    sp.selected, c.n_kv_heads, c.head_dim, tk, tv, tier_stride, sp.kept(), s);
}

absl::Status CudaBackend::EnqueueSpeculativeSelection(const SeqSlot& slot, int target,
                                                      const bf16* x, SelectPass pass) {
  CudaSequence& seq = *slot.seq;
  if (seq.sparse[target] == nullptr || !seq.sparse[target]->gpu_index) return absl::OkStatus();
  SparseKv& sp = *seq.sparse[target];
  if (sp.params.query == "real") return absl::OkStatus();  // selected in line
  const ModelConfig& c = config_;
  cudaStream_t s = stream_.get();
  // The main stream keeps a copy of `x` (8 KB: cheaper than running the
  // speculative query there), since the layer overwrites it; the side
  // stream does the rest.
  // Two inputs per layer: a first pass's must survive until its query ran.
  const bool first_pass = pass == SelectPass::kPool || pass == SelectPass::kPrefetch;
  bf16* spec_x = seq.spec_x.as<bf16>() + (static_cast<int64_t>(first_pass ? c.n_layers : 0) + target) * c.hidden;
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(spec_x, x, c.hidden * sizeof(bf16), cudaMemcpyDeviceToDevice, s));
  cudaStream_t side = options_.sparse_overlap ? sides_[slot.row % sides_.size()].get() : s;
  if (options_.sparse_overlap) {
    CUDA_RETURN_IF_ERROR(cudaEventRecord(spec_ready_[target].get(), s));
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(side, spec_ready_[target].get(), 0));
  }
  RETURN_IF_ERROR(LaunchSpeculativeQuery(
      spec_x, layers_[target].w_qkv.as<bf16>(), c.hidden, c.n_heads, c.n_kv_heads, c.head_dim,
      sp.chans.as<int32_t>(), sp.params.channels, slot.step, inv_freq_.as<float>(),
      c.rope_style == model::RopeStyle::kAdjacentPairs, sp.q_chan.as<float>(), side));
  RETURN_IF_ERROR(EnqueueSelection(seq, sp, sp.q_chan.as<float>(), side, pass));
  if (!first_pass) CUDA_RETURN_IF_ERROR(cudaEventRecord(sp.selected_ready.get(), side));
  return absl::OkStatus();
}

absl::Status CudaBackend::EnqueueSparseAttention(const SeqSlot& slot, int l, int n, bool decode) {
  const ModelConfig& c = config_;
  cudaStream_t s = stream_.get();
  CudaSequence& seq = *slot.seq;
  const int start = slot.start;
  SparseKv& sp = *seq.sparse[l];
  const int cap = seq.capacity(), hd = c.head_dim;
  const int64_t head_stride = static_cast<int64_t>(cap) * hd;
  const bool adjacent = c.rope_style == model::RopeStyle::kAdjacentPairs;
  const AttentionShape shape{c.n_heads, c.n_kv_heads, hd, cap};
  const int64_t q_at = static_cast<int64_t>(slot.row) * c.n_heads * hd;
  bf16* q = q_.as<bf16>() + q_at;
  bf16* out = attn_.as<bf16>() + q_at;
  bf16* sk = seq.scratch_k();
  bf16* sv = seq.scratch_v();
  const bf16* qkv = qkv_.as<bf16>() + static_cast<int64_t>(slot.row) * qkv_rows_;
  RETURN_IF_ERROR(LaunchRopeAppendKv(qkv, n, slot.step, c.n_heads,
                                     c.n_kv_heads, hd, inv_freq_.as<float>(), adjacent, q, sk, sv,
                                     cap, s));
  if (!decode) {
    if (sp.prompt_ended()) {
      return absl::UnimplementedError(
          "sparse layers on the CUDA backend: a prefill chunk after decode steps (the engine never "
          "sends one; the CPU backend runs it)");
    }
    // Plain causal attention over the prompt so far (runtime/cpu_backend.h):
    // history from the host tier, the chunk from the scratch; then the chunk
    // joins the host tier, max|K| and (index "gpu") the last query.
    if (sp.history_prefetched_for == start) {
      CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(s, history_ready_.get(), 0));
      sp.history_prefetched_for = -1;
    } else if (start > 0) {
      RETURN_IF_ERROR(LoadHost(sp, cap, 0, start, c.n_kv_heads, hd, sk, sv, head_stride, s));
    }
    RETURN_IF_ERROR(LaunchPrefillAttention(q, sk, sv, n, start, shape, out, s));
    RETURN_IF_ERROR(StoreHost(sp, sk, sv, head_stride, start, n, c.n_kv_heads, hd, cap, s));
    if (sp.kt != nullptr) {
      RETURN_IF_ERROR(LaunchStoreHostKT(sk, head_stride, start, n, c.n_kv_heads, hd, sp.kt, cap, s));
    }
    RETURN_IF_ERROR(LaunchMaxAbsUpdate(sk, head_stride, start, n, c.n_kv_heads, hd,
                                       sp.max_abs.as<float>(), s));
    if (sp.gpu_index) {
      RETURN_IF_ERROR(LaunchGroupMeanQuery(q + static_cast<int64_t>(n - 1) * c.n_heads * hd,
                                           c.n_heads, c.n_kv_heads, hd,
                                           sp.last_q_mean.as<float>(), s));
    }
    return absl::OkStatus();
  }
  // Decode: the token joins the generated rows of the tier.
  bf16* tk = sp.tier.as<bf16>();
  bf16* tv = tk + static_cast<int64_t>(c.n_kv_heads) * sp.tier_rows * hd;
  RETURN_IF_ERROR(LaunchSparseAppendToken(sk, sv, head_stride, slot.step,
                                          sp.kept() + sp.selected - sp.prompt, c.n_kv_heads, hd, tk,
                                          tv, static_cast<int64_t>(sp.tier_rows) * hd,
                                          sp.len.as<int32_t>(), s));
  if (sp.gpu_index && sp.params.query == "real") {
    RETURN_IF_ERROR(LaunchGroupMeanOnChannels(q, c.n_heads, c.n_kv_heads, hd, sp.chans.as<int32_t>(),
                                              sp.params.channels, sp.q_chan.as<float>(), s));
    RETURN_IF_ERROR(EnqueueSelection(seq, sp, sp.q_chan.as<float>(), s));
  } else if (sp.gpu_index) {
    // Selected on the side stream (EnqueueSpeculativeSelection).
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(s, sp.selected_ready.get(), 0));
  } else {
    // TailorKV's own: channels from the real query, keys from the host.
    RETURN_IF_ERROR(LaunchGroupMeanQuery(q, c.n_heads, c.n_kv_heads, hd, seq.q_mean.as<float>(), s));
    RETURN_IF_ERROR(LaunchChooseChannels(seq.q_mean.as<float>(), sp.max_abs.as<float>(),
                                         c.n_kv_heads, hd, sp.params.channels,
                                         sp.chans.as<int32_t>(), sp.q_chan.as<float>(), s));
    RETURN_IF_ERROR(EnqueueSelection(seq, sp, sp.q_chan.as<float>(), s));
  }
  const AttentionShape tshape{c.n_heads, c.n_kv_heads, hd, sp.tier_rows};
  return LaunchDecodeAttention(q, tk, tv, sp.len.as<int32_t>(), tshape, seq.attn_workspace(), out, s);
}

absl::Status CudaBackend::EnqueueHead(int first, int rows, bool batched) {
  const ModelConfig& c = config_;
  cudaStream_t s = stream_.get();
  const bf16* head = c.tied_embeddings ? tok_embd_.as<bf16>() : output_.as<bf16>();
  RETURN_IF_ERROR(LaunchRmsNorm(x_.as<float>() + static_cast<int64_t>(first) * c.hidden,
                                output_norm_.as<float>(), rows, c.hidden, c.rms_eps,
                                xn_.as<bf16>(), s));
  return Gemm(xn_.as<bf16>(), rows, head, c.vocab, c.hidden, logits_.as<float>(), false, batched);
}

absl::Status CudaBackend::CopyLogitsOut(int rows, float* dst) {
  const size_t bytes = static_cast<size_t>(rows) * config_.vocab * sizeof(float);
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(logits_host_, logits_.get(), bytes, cudaMemcpyDeviceToHost, stream_.get()));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));
  std::memcpy(dst, logits_host_, bytes);
  return absl::OkStatus();
}

absl::Status CudaBackend::DecodeStep(CudaSequence& seq, int32_t token,
                                     std::vector<float>* logits) {
  cudaStream_t s = stream_.get();
  const int pos = seq.length();
  step_host_[0] = pos;
  step_host_[1] = pos + 1;
  step_host_[2] = token;
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(step_.get(), step_host_, 3 * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, s));
  if (!seq.prompt_ended()) {
    RETURN_IF_ERROR(EndSparsePrompt(seq));
    seq.decoded_once = false;  // shapes changed: capture afresh after an eager step
    seq.decode_graph() = CudaGraphExec();
  }
  if (!options_.use_graphs || !seq.decoded_once) {
    RETURN_IF_ERROR(EnqueueLayers(SinglePass(seq, 1, pos, /*decode=*/true)));
    RETURN_IF_ERROR(EnqueueHead(0, 1));
    seq.decoded_once = true;
  } else {
    if (!seq.decode_graph().valid()) {
      CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      absl::Status st = EnqueueLayers(SinglePass(seq, 1, pos, /*decode=*/true));
      if (st.ok()) st = EnqueueHead(0, 1);
      // End the capture whatever happened, so the stream is usable again.
      auto graph = CudaGraphExec::EndCapture(s);
      RETURN_IF_ERROR(st);
      ASSIGN_OR_RETURN(seq.decode_graph(), std::move(graph));
    }
    RETURN_IF_ERROR(seq.decode_graph().Launch(s));
  }
  logits->resize(config_.vocab);
  RETURN_IF_ERROR(CopyLogitsOut(1, logits->data()));
  seq.set_length(pos + 1);
  ++seq.selecting_steps;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<CudaSequence*>> CudaBackend::CheckBatch(absl::Span<SequenceState* const> seqs,
                                                                   absl::Span<const int32_t> tokens) {
  if (seqs.size() != tokens.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tokens: %d for %d sequences (one each)", tokens.size(), seqs.size()));
  }
  if (seqs.empty()) return absl::InvalidArgumentError("seqs: empty batch");
  std::vector<CudaSequence*> cuda_seqs;
  for (size_t b = 0; b < seqs.size(); ++b) {
    auto* seq = dynamic_cast<CudaSequence*>(seqs[b]);
    if (seq == nullptr || seq->owner() != this) {
      return absl::InvalidArgumentError(
          absl::StrFormat("seqs[%d]: sequence was not made by this CUDA backend", b));
    }
    if (std::find(cuda_seqs.begin(), cuda_seqs.end(), seq) != cuda_seqs.end()) {
      return absl::InvalidArgumentError(absl::StrFormat("seqs[%d]: the same sequence twice", b));
    }
    if (absl::Status st = runtime::ValidateForwardInput(config_, *seq, tokens.subspan(b, 1), Mode::kDecode);
        !st.ok()) {
      return absl::Status(st.code(), absl::StrFormat("seqs[%d]: %s", b, st.message()));
    }
    cuda_seqs.push_back(seq);
  }
  return cuda_seqs;
}

absl::Status CudaBackend::DecodeBatch(absl::Span<SequenceState* const> seqs,
                                      absl::Span<const int32_t> tokens, std::vector<float>* logits) {
  ASSIGN_OR_RETURN(std::vector<CudaSequence*> cuda_seqs, CheckBatch(seqs, tokens));
  CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
  const size_t V = config_.vocab;
  logits->resize(seqs.size() * V);
  for (size_t b0 = 0; b0 < seqs.size(); b0 += max_batch_) {
    const size_t n = std::min<size_t>(max_batch_, seqs.size() - b0);
    RETURN_IF_ERROR(DecodeBatchPass(absl::MakeConstSpan(cuda_seqs).subspan(b0, n),
                                    tokens.subspan(b0, n), logits->data() + b0 * V));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::DecodeBatchPick(absl::Span<SequenceState* const> seqs,
                                          absl::Span<const int32_t> tokens,
                                          absl::Span<const GreedyPickRequest> greedy,
                                          std::vector<float>* logits, std::vector<int32_t>* picked,
                                          std::vector<absl::Status>* per_seq) {
  if (greedy.size() != seqs.size()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("greedy: %d requests for %d sequences (one each)", greedy.size(), seqs.size()));
  }
  // A repetition penalty on the device is not yet checked on a GPU (its test
  // first ran on a model where no penalty changed a pick): such batches pick
  // on the host.
  const bool penalized = std::any_of(greedy.begin(), greedy.end(), [](const GreedyPickRequest& g) {
    return g.pick && g.repetition_penalty != 1.0f;
  });
  if (!options_.device_greedy_pick || penalized) {
    return Backend::DecodeBatchPick(seqs, tokens, greedy, logits, picked, per_seq);
  }
  ASSIGN_OR_RETURN(std::vector<CudaSequence*> cuda_seqs, CheckBatch(seqs, tokens));
  CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
  const size_t V = config_.vocab;
  logits->resize(seqs.size() * V);
  picked->assign(seqs.size(), -1);
  // A device failure is the whole batch's (no sequence is remote here).
  absl::Status st;
  for (size_t b0 = 0; b0 < seqs.size() && st.ok(); b0 += max_batch_) {
    const size_t n = std::min<size_t>(max_batch_, seqs.size() - b0);
    st = DecodeBatchPass(absl::MakeConstSpan(cuda_seqs).subspan(b0, n), tokens.subspan(b0, n),
                         logits->data() + b0 * V, greedy.data() + b0, picked->data() + b0);
  }
  per_seq->assign(seqs.size(), st);
  return absl::OkStatus();
}

absl::Status CudaBackend::MarkSeen(CudaSequence& seq, absl::Span<const int32_t> history) {
  cudaStream_t s = stream_.get();
  const size_t words = (static_cast<size_t>(config_.vocab) + 31) / 32;
  if (seq.seen.get() == nullptr || history.size() < seq.seen_count) {
    if (seq.seen.get() == nullptr) {
      ASSIGN_OR_RETURN(seq.seen, Alloc(words * sizeof(uint32_t)));
    }
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(seq.seen.get(), 0, seq.seen.size(), s));
    seq.seen_count = 0;
  }
  const size_t n = history.size() - seq.seen_count;
  if (n == 0) return absl::OkStatus();
  // Usually the one token sampled last step; the whole prompt the first time.
  if (seq.seen_tokens.size() < n) {
    seq.seen_tokens = DeviceBuffer();
    ASSIGN_OR_RETURN(seq.seen_tokens, Alloc(std::max<size_t>(n, 256) * sizeof(int32_t)));
  }
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(seq.seen_tokens.get(), history.data() + seq.seen_count,
                                       n * sizeof(int32_t), cudaMemcpyHostToDevice, s));
  RETURN_IF_ERROR(LaunchMarkSeen(seq.seen_tokens.as<int32_t>(), static_cast<int>(n), config_.vocab,
                                 seq.seen.as<uint32_t>(), s));
  seq.seen_count = history.size();
  return absl::OkStatus();
}

absl::Status CudaBackend::DecodeBatchPass(absl::Span<CudaSequence* const> seqs,
                                          absl::Span<const int32_t> tokens, float* logits,
                                          const GreedyPickRequest* greedy, int32_t* picked) {
  cudaStream_t s = stream_.get();
  const int B = static_cast<int>(seqs.size());
  // The previous pass's copy out of batch_host_ has completed (CopyLogitsOut
  // synchronizes), so it may be rewritten.
  int32_t* ids = batch_host_;
  int32_t* pos_len = batch_host_ + max_batch_;
  Pass pass;
  pass.rows = B;
  pass.ids = batch_step_.as<int32_t>();
  pass.decode = true;
  pass.batched = true;
  std::vector<uint64_t> key;
  for (int b = 0; b < B; ++b) {
    const int pos = seqs[b]->length();
    ids[b] = tokens[b];
    pos_len[2 * b] = pos;
    pos_len[2 * b + 1] = pos + 1;
    pass.slots.push_back(SeqSlot{seqs[b], b, pos, batch_step_.as<int32_t>() + max_batch_ + 2 * b});
    key.push_back(seqs[b]->id);
  }
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(batch_step_.get(), batch_host_,
                                       3 * static_cast<size_t>(max_batch_) * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, s));
  for (CudaSequence* seq : seqs) {
    if (!seq->prompt_ended()) RETURN_IF_ERROR(EndSparsePrompt(*seq));
  }
  // A batch runs eagerly the first time (shapes settle, the prompt ends),
  // is captured the second time in a row, and replays after that.
  if (!options_.use_graphs || key != warm_key_) {
    RETURN_IF_ERROR(EnqueueLayers(pass));
    RETURN_IF_ERROR(EnqueueHead(0, B, /*batched=*/true));
    warm_key_ = key;
  } else {
    if (key != graph_key_ || !batch_graph_.valid()) {
      graph_key_.clear();
      batch_graph_ = CudaGraphExec();
      CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      absl::Status st = EnqueueLayers(pass);
      if (st.ok()) st = EnqueueHead(0, B, /*batched=*/true);
      // End the capture whatever happened, so the stream is usable again.
      auto graph = CudaGraphExec::EndCapture(s);
      RETURN_IF_ERROR(st);
      ASSIGN_OR_RETURN(batch_graph_, std::move(graph));
      graph_key_ = key;
    }
    RETURN_IF_ERROR(batch_graph_.Launch(s));
  }
  if (greedy != nullptr) {
    bool logits_out = false;
    GreedyPickRows rows;
    for (int b = 0; b < B; ++b) {
      rows.penalty[b] = 1.0f;
      if (!greedy[b].pick) {
        logits_out = true;
        continue;
      }
      if (greedy[b].repetition_penalty != 1.0f) {
        RETURN_IF_ERROR(MarkSeen(*seqs[b], greedy[b].history));
        rows.seen[b] = seqs[b]->seen.as<uint32_t>();
        rows.penalty[b] = greedy[b].repetition_penalty;
      }
    }
    int32_t* d_picked = batch_step_.as<int32_t>() + 3 * max_batch_;
    int32_t* h_picked = batch_host_ + 3 * max_batch_;
    RETURN_IF_ERROR(LaunchGreedyPick(logits_.as<float>(), config_.vocab, B, config_.vocab, rows, d_picked, s));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_picked, d_picked, B * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    if (logits_out) {
      RETURN_IF_ERROR(CopyLogitsOut(B, logits));  // synchronizes
    } else {
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    }
    for (int b = 0; b < B; ++b) picked[b] = greedy[b].pick ? h_picked[b] : -1;
  } else {
    RETURN_IF_ERROR(CopyLogitsOut(B, logits));
  }
  for (CudaSequence* seq : seqs) {
    seq->set_length(seq->length() + 1);
    ++seq->selecting_steps;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Forward(SequenceState& state, absl::Span<const int32_t> tokens,
                                  bool all_logits, std::vector<float>* logits, Mode mode) {
  auto* seq = dynamic_cast<CudaSequence*>(&state);
  if (seq == nullptr || seq->owner() != this) {
    return absl::InvalidArgumentError("sequence was not made by this CUDA backend");
  }
  RETURN_IF_ERROR(runtime::ValidateForwardInput(config_, state, tokens, mode));
  // The device is per host thread, and callers may come from any thread.
  CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
  if (IsDecode(state, tokens, mode)) return DecodeStep(*seq, tokens[0], logits);
  return Prefill(*seq, tokens, all_logits, logits, nullptr);
}

absl::Status CudaBackend::ForwardObserved(SequenceState& state, absl::Span<const int32_t> tokens,
                                          int tap_queries, const LayerObserver& observer) {
  auto* seq = dynamic_cast<CudaSequence*>(&state);
  if (seq == nullptr || seq->owner() != this) {
    return absl::InvalidArgumentError("sequence was not made by this CUDA backend");
  }
  RETURN_IF_ERROR(runtime::ValidateObservedForward(config_, state, tokens, tap_queries));
  // The tapped queries must sit in one prefill chunk (q_ holds one chunk).
  if (tap_queries > options_.max_prefill_chunk) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tap_queries: at most max_prefill_chunk (%d) on the CUDA backend, got %d",
        options_.max_prefill_chunk, tap_queries));
  }
  CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
  const TapRequest tap{.observer = &observer,
                       .tap_queries = tap_queries,
                       .n_keys = seq->length() + static_cast<int>(tokens.size())};
  // One token runs the prefill path too: decode steps are graph-captured and
  // have no taps.
  return Prefill(*seq, tokens, false, nullptr, &tap);
}

absl::Status CudaBackend::Prefill(CudaSequence& seq, absl::Span<const int32_t> tokens,
                                  bool all_logits, std::vector<float>* logits,
                                  const TapRequest* tap) {
  const int n = static_cast<int>(tokens.size());
  const int V = config_.vocab;
  if (tap == nullptr) logits->resize(static_cast<size_t>(all_logits ? n : 1) * V);
  cudaStream_t s = stream_.get();
  // Observed: the last chunk is as long as allowed, so that it holds every
  // tapped query (tap_queries <= max_prefill_chunk).
  const int tail = tap != nullptr ? std::min(n, options_.max_prefill_chunk) : 0;
  for (int done = 0; done < n;) {
    const int rows =
        done < n - tail ? std::min(options_.max_prefill_chunk, n - tail - done) : n - done;
    const bool last = done + rows == n;
    const int start = seq.length();
    step_host_[0] = start;
    step_host_[1] = start + rows;
    std::memcpy(step_host_ + 2, tokens.data() + done, rows * sizeof(int32_t));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(step_.get(), step_host_, (rows + 2) * sizeof(int32_t),
                                         cudaMemcpyHostToDevice, s));
    RETURN_IF_ERROR(EnqueueLayers(SinglePass(seq, rows, start, /*decode=*/false), last ? tap : nullptr));
    if (tap != nullptr) {
      // No logits; the step buffer is rewritten by the next chunk or call.
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    } else if (all_logits) {
      for (int r = 0; r < rows; r += kLogitRows) {
        const int m = std::min(kLogitRows, rows - r);
        RETURN_IF_ERROR(EnqueueHead(r, m));
        RETURN_IF_ERROR(CopyLogitsOut(m, logits->data() + static_cast<size_t>(done + r) * V));
      }
    } else if (last) {
      RETURN_IF_ERROR(EnqueueHead(rows - 1, 1));
      RETURN_IF_ERROR(CopyLogitsOut(1, logits->data()));
    } else {
      // The step buffer is rewritten for the next chunk: wait for this one.
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    }
    seq.set_length(start + rows);
    done += rows;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::TapLayer(const CudaSequence& seq, int l, int n, const TapRequest& tap) {
  const ModelConfig& c = config_;
  cudaStream_t s = stream_.get();
  const int hd = c.head_dim, tq = tap.tap_queries;
  const int64_t q_elems = static_cast<int64_t>(tq) * c.n_heads * hd;
  const int64_t head_elems = static_cast<int64_t>(tap.n_keys) * hd;  // one KV head's rows
  const int64_t kv_elems = c.n_kv_heads * head_elems;
  const size_t total = static_cast<size_t>(q_elems + 2 * kv_elems);
  if (total > tap_capacity_) {
    tap_staging_ = PinnedHostBuffer();  // give the old one back first
    tap_values_.reset();
    tap_capacity_ = 0;
    ASSIGN_OR_RETURN(tap_staging_, PinnedHostBuffer::Allocate(total * sizeof(bf16)));
    tap_values_ = std::make_unique_for_overwrite<float[]>(total);
    tap_capacity_ = total;
  }
  // bf16 NaN everywhere first (the stream is idle: TapLayer waited for the
  // previous layer's copies), so rows the copies miss show as NaN rather
  // than as another layer's values.
  uint16_t* stage = tap_staging_.as<uint16_t>();
  std::fill_n(stage, total, uint16_t{0x7FC0});
  const bf16* q_rows = q_.as<bf16>() + static_cast<int64_t>(n - tq) * c.n_heads * hd;
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(stage, q_rows, q_elems * sizeof(bf16),
                                       cudaMemcpyDeviceToHost, s));
  // The cache rows [0, n_keys) of each KV head, packed head after head.
  const size_t row_bytes = static_cast<size_t>(head_elems) * sizeof(bf16);
  const size_t cache_pitch = static_cast<size_t>(seq.capacity()) * hd * sizeof(bf16);
  CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(stage + q_elems, row_bytes, seq.k(l), cache_pitch,
                                         row_bytes, c.n_kv_heads, cudaMemcpyDeviceToHost, s));
  CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(stage + q_elems + kv_elems, row_bytes, seq.v(l),
                                         cache_pitch, row_bytes, c.n_kv_heads,
                                         cudaMemcpyDeviceToHost, s));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  // bf16 -> fp32 is exact: the bits become the float's upper half.
  float* values = tap_values_.get();
  for (size_t i = 0; i < total; ++i) {
    values[i] = std::bit_cast<float>(static_cast<uint32_t>(stage[i]) << 16);
  }
  const LayerTap t{.layer = l,
                   .n_keys = tap.n_keys,
                   .first_query = tap.n_keys - tq,
                   .n_queries = tq,
                   .q = values,
                   .k = values + q_elems,
                   .v = values + q_elems + kv_elems,
                   .kv_head_stride = head_elems};
  return (*tap.observer)(t);
}

absl::Status CudaBackend::FillRandomKv(CudaSequence& seq, int length, uint64_t seed) {
  if (length < 0 || length > seq.capacity()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("length must be in [0, %d], got %d", seq.capacity(), length));
  }
  cudaStream_t s = stream_.get();
  const int64_t head_stride = static_cast<int64_t>(seq.capacity()) * config_.head_dim;
  for (int l = 0; l < config_.n_layers; ++l) {
    const LayerKv& L = seq.layer(l);
    if (L.kind == runtime::KvPolicyKind::kDense) {
      // Filling the whole cache (not only `length` rows) keeps this simple; the
      // rows past `length` are overwritten by later steps anyway.
      RETURN_IF_ERROR(LaunchFillRandomBf16(L.k(), 2 * L.elems, seed + l, 1.0f, 0.0f, s));
      continue;
    }
    // Other policies store what they would have kept of random full-precision K/V.
    RETURN_IF_ERROR(LaunchFillRandomBf16(seq.scratch_k(), 2 * static_cast<int64_t>(config_.n_kv_heads) *
                                                              head_stride,
                                         seed + l, 1.0f, 0.0f, s));
    if (L.kind == runtime::KvPolicyKind::kSparse) {
      SparseKv& sp = *seq.sparse[l];
      if (sp.prompt_ended()) return absl::FailedPreconditionError("the sequence has decoded already");
      RETURN_IF_ERROR(StoreHost(sp, seq.scratch_k(), seq.scratch_v(), head_stride, 0, length,
                                config_.n_kv_heads, config_.head_dim, seq.capacity(), s));
      if (sp.kt != nullptr) {
        RETURN_IF_ERROR(LaunchStoreHostKT(seq.scratch_k(), head_stride, 0, length, config_.n_kv_heads,
                                          config_.head_dim, sp.kt, seq.capacity(), s));
      }
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(sp.max_abs.get(), 0, sp.max_abs.size(), s));
      RETURN_IF_ERROR(LaunchMaxAbsUpdate(seq.scratch_k(), head_stride, 0, length, config_.n_kv_heads,
                                         config_.head_dim, sp.max_abs.as<float>(), s));
      if (sp.gpu_index) {
        RETURN_IF_ERROR(LaunchFillRandomF32(sp.last_q_mean.as<float>(),
                                            sp.last_q_mean.size() / sizeof(float), seed + 1000 + l,
                                            1.0f, 0.0f, s));
      }
      continue;
    }
    if (L.kind == runtime::KvPolicyKind::kQuant) {
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(L.mem.get(), 0, L.mem.size(), s));
      RETURN_IF_ERROR(LaunchQuantPack(seq.scratch_k(), seq.scratch_v(), head_stride, 0, length,
                                      L.qshape, L.qcache, s));
    } else {
      RETURN_IF_ERROR(LaunchWindowStoreChunk(seq.scratch_k(), seq.scratch_v(), 0, length, L.wshape,
                                             L.k(), L.v(), s));
    }
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  seq.set_length(length);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<runtime::Backend>> CreateCudaBackend(
    const model::ModelWeights& weights, const CudaBackendOptions& options) {
  ASSIGN_OR_RETURN(auto backend, CudaBackend::Allocate(weights.config, options));
  RETURN_IF_ERROR(backend->UploadWeights(weights));
  return std::unique_ptr<runtime::Backend>(std::move(backend));
}

absl::StatusOr<std::unique_ptr<runtime::Backend>> CreateCudaBackendWithRandomWeights(
    const model::ModelConfig& config, uint64_t seed, const CudaBackendOptions& options) {
  ASSIGN_OR_RETURN(auto backend, CudaBackend::Allocate(config, options));
  RETURN_IF_ERROR(backend->RandomizeWeights(seed));
  return std::unique_ptr<runtime::Backend>(std::move(backend));
}

absl::Status RegisterHostMemory(void* base, size_t bytes, int device) {
  CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  CUDA_RETURN_IF_ERROR(cudaHostRegister(base, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable));
  return absl::OkStatus();
}

absl::Status UnregisterHostMemory(void* base) {
  CUDA_RETURN_IF_ERROR(cudaHostUnregister(base));
  return absl::OkStatus();
}

absl::Status FillSequenceWithRandomKv(runtime::SequenceState& seq, int length, uint64_t seed) {
  auto* s = dynamic_cast<CudaSequence*>(&seq);
  if (s == nullptr) return absl::InvalidArgumentError("not a CUDA sequence");
  auto* backend = const_cast<CudaBackend*>(static_cast<const CudaBackend*>(s->owner()));
  return backend->FillRandomKv(*s, length, seed);
}

int64_t BackendDeviceBytes(const runtime::Backend& backend) {
  auto* b = dynamic_cast<const CudaBackend*>(&backend);
  return b == nullptr ? 0 : b->device_bytes();
}

SparseReuseStats SequenceSparseReuse(const runtime::SequenceState& seq) {
  SparseReuseStats out;
  auto* s = dynamic_cast<const CudaSequence*>(&seq);
  if (s == nullptr || s->reuse_count.get() == nullptr) return out;
  unsigned long long reused = 0;
  if (cudaMemcpy(&reused, s->reuse_count.get(), sizeof(reused), cudaMemcpyDeviceToHost) !=
      cudaSuccess) {
    return out;
  }
  const int n_kv = static_cast<const CudaBackend*>(s->owner())->config().n_kv_heads;
  int64_t per_step = 0;
  for (const auto& sp : s->sparse) {
    if (sp != nullptr) per_step += static_cast<int64_t>(sp->selected) * n_kv;
  }
  out.reused_rows = static_cast<int64_t>(reused);
  out.selected_rows = per_step * s->selecting_steps;
  return out;
}

int64_t SequenceDeviceBytes(const runtime::SequenceState& seq) {
  auto* s = dynamic_cast<const CudaSequence*>(&seq);
  return s == nullptr ? 0 : s->device_bytes();
}

}  // namespace tailorkv::cuda
