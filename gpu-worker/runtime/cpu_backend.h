// CpuBackend: the reference implementation of Backend, float32 weights,
// OpenBLAS GEMMs and OpenMP threads. It is the default where no GPU exists
// and the reference the CUDA backend is tested against.
//
// KV policies (semantics in backend.h): dense layers keep fp32 K/V of every
// position; quant layers a QuantKvCpu (fused decode attention over codes +
// fp32 residual); window layers the sink rows and a ring of the most recent
// tokens. A non-dense layer's prefill chunk attends over a full-precision
// scratch [history as stored | chunk] that is not KV memory (kv_bytes()
// leaves it out).
//
// Sparse layers (TailorKV's sparsity-friendly layers). Per layer the sequence keeps
//   host tier   the prompt's K/V in position order (plain memory here,
//               behind a small class a host-memory store can replace);
//               `capacity` rows reserved at creation, since the prompt
//               length is not known then;
//   device tier sink + recent prompt rows, every generated token (never
//               evicted) and max|K| per KV head and channel over the prompt.
// The prompt is every token before the first decode step; it ends (P =
// length) at that step, which then fixes max|K| over [0, P), copies the
// sink [0, min(S, P)) and the recent min(R, P - sink) last prompt rows into
// the device tier, and reserves capacity - P generated rows there.
//   Prefill chunk (any call that is not a decode step): attention is plain,
//   causal and full precision over every token so far, as in the paper
//   (all K/V are available: the prompt in the host tier, generated tokens in
//   the device tier). So chunked prefill equals dense chunked prefill
//   exactly, unlike quant and window layers. Before the prompt ends the
//   chunk's K/V go to the host tier; a chunk after a decode step (the
//   engine never sends one) is appended to the generated rows.
//   Decode step: the token's K/V are appended to the generated rows. Per KV
//   head, with q = the mean over its GQA group of the query heads (after
//   RoPE): channel score |q| x max|K|, the top `channels` channels;
//   approximate score of each prompt position outside the sink and recent
//   windows = the signed dot product of q and K on those channels; the top
//   `top_k` of them (rankings: SparseSelectCpu below). Every
//   query head of the group then attends exactly (one fp32 softmax) over
//   sink + selected + recent + generated, gathered in position order, so
//   when top_k covers every candidate the step is bit-identical to dense.
//   Index: "faithful" is the above, as TailorKV's reference does it.
//   "gpu" (the GPU-resident index, which the CUDA backend keeps in device
//   memory so that only selected rows cross PCIe) differs in two ways:
//   - the channels are fixed once, when the prompt ends: per KV head the
//     `channels` best by |q_last| x max|K|, q_last the last prompt token's
//     group-mean query; those channels of every prompt key are copied into
//     an index ([kv_head][capacity][channels]);
//   - each step scores with a speculative query (InfiniGen / TailorKV's
//     prefetch): q^ = RoPE(Wq_l x) on the fixed channels, group-mean, where
//     x is the previous layer's normalized attention input (layer 0: its
//     own), so the GPU can select layer l while layer l-1 computes
//     (sparse_reference.h: ChooseChannels, SpeculativeQueryMean,
//     ScoreOnChannels, TopKIndices).
//   kv_bytes(): host 2 * n_kv * capacity * hd * 4; device 2 * n_kv *
//   min(capacity, S + R) * hd * 4 + n_kv * hd * 4 (max|K|) at creation
//   (+ n_kv * capacity * channels * 4 for index "gpu"; EstimateKvBytes'
//   figure), plus 2 * n_kv * (capacity - P) * hd * 4 for
//   the generated rows once the prompt ended.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/backend.h"
#include "runtime/quant_kv.h"
#include "store/host_kv_store.h"
#include "store/remote_rows.h"

namespace tailorkv::runtime {

struct CpuBackendOptions {
  int threads = 0;  // 0 = all cores
  // Where the sparse layers' host tiers live: null = the sequence's own
  // memory; else this store (e.g. kv-host's arenas through
  // kvhost::KvHostClientStore), one session per sequence, freed with it.
  // Not owned; must outlive the backend.
  kvhost::HostKvStore* host_store = nullptr;
  // Or on a remote kv-host node (kvhost::RemoteRowsClient): each sequence's
  // prompt is staged in its own memory, written to the node when the prompt
  // ends and dropped here; each decode step gathers the selected rows of
  // every KV head in one request per layer. Index "faithful" (which reads
  // every key each step) is refused with it. Not owned; exclusive with
  // host_store.
  kvhost::RemoteRowStore* remote_rows = nullptr;
};

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(model::ModelWeights weights,
                                                          const CpuBackendOptions& options);

// The quantized store of `layer` of a sequence made by the CPU backend, for
// tests and inspection; nullptr when `seq` is not a CPU sequence or the
// layer is not quant. Valid while `seq` lives.
const QuantKvCpu* CpuQuantStore(const SequenceState& seq, int layer);

// The prompt positions the last decode step of sparse `layer` selected, per
// KV head, ascending; empty when `seq` is not a CPU sequence, the layer is
// not sparse or no decode step ran. For tests and inspection.
std::vector<std::vector<int>> CpuSparseLastSelection(const SequenceState& seq, int layer);

// The channels index "gpu" of sparse `layer` fixed when the prompt ended,
// per KV head, ascending; empty when `seq` is not a CPU sequence, the layer
// is not a sparse layer with index "gpu" or its prompt has not ended.
std::vector<std::vector<int>> CpuSparseChannels(const SequenceState& seq, int layer);

// TailorKV's selection for one KV head, as the CPU backend's decode step runs
// it (exposed for tests). q_mean and max_abs_k: head_dim floats; keys: rows
// of head_dim floats, row p at keys + p * head_dim. Picks the `channels`
// channels with the largest |q_mean| x max_abs_k, scores positions
// [first, end) by the signed dot product of q_mean and the key on those
// channels (fp32, summed in channel order), and writes the
// min(top_k, end - first) best positions to `selected`, ascending. Both
// rankings are TopKIndices' (runtime/sparse_reference.h: ties to the smaller
// index, NaN lowest, -0 below +0), the rule the GPU kernels share. `scores`, when not null,
// receives the end - first approximate scores.
void SparseSelectCpu(const float* q_mean, const float* max_abs_k, const float* keys, int head_dim,
                     int first, int end, int channels, int top_k, std::vector<int>* selected,
                     std::vector<float>* scores = nullptr);

}  // namespace tailorkv::runtime
