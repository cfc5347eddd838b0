// CudaBackend: the Backend on an NVIDIA GPU. Weights are bf16 in device
// memory (converted at load); GEMMs run through cuBLAS (bf16 inputs, fp32
// accumulation; fp32 outputs where they add into the residual stream or make
// logits, bf16 for the QKV and gate/up projections, which the RoPE and SwiGLU
// kernels read as bf16, as PyTorch does); the residual stream stays fp32.
//
// KV per layer as the sequence's plan says (runtime/SEMANTICS in the design
// notes): dense layers keep bf16 K|V [kv_head][capacity][head_dim]; quant
// layers the codes + fp16 params + bf16 residual rings of quant_kernels.cuh
// (decode: append + fused attention over the packed cache); window layers a
// bf16 store of sink + recent rows (window_kernels.cuh). A sequence with any
// non-dense layer also holds one layer's worth of full-precision K|V scratch
// (not counted as KV): prefill chunks write their K/V there, attend over
// [history as stored | chunk], then pack / store; decode steps write the new
// token there before appending it. Sparse layers (runtime/cpu_backend.h has
// the semantics): host tier in registered host memory, device tier of kept,
// selected and generated rows; a prefill chunk's history comes back from
// the host tier by DMA on a copy stream (prefill_prefetch), a decode step
// selects (on a side stream for index "gpu") and gathers its Top-K rows
// into a slot pool (rows selected the step before stay in their slots and
// are not fetched again with sparse_row_reuse).
//
// Prefill runs in chunks of at most `max_prefill_chunk` tokens with the
// flash-attention kernel. Decode (one token) is captured as a CUDA graph the
// first time a sequence decodes and replayed afterwards: the token id and
// position come from a small device buffer written before each replay, so no
// step allocates or re-captures. All work runs on one stream owned by the
// backend; Forward() returns after the logits are on the host.
//
// ForwardObserved (runtime/backend.h) runs the prefill path (one token too,
// never a graph), the last chunk holding the whole tail of the call, so
// tap_queries may be at most max_prefill_chunk (else InvalidArgument). After
// each layer's attention it waits for the stream, copies that layer's q rows
// and dense K/V rows [0, n_keys) to pinned host memory, widens bf16 to fp32
// on the CPU and calls the observer. LayerTap's k and v are packed per KV
// head (kv_head_stride = n_keys * head_dim); its pointers are valid during
// the call only. The host buffers (2 + 4 bytes per value) grow to the
// largest tap and are kept until the backend is destroyed.
//
// Thread-compatible (not thread-safe), like every Backend.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "model/ggml_types.h"
#include "runtime/backend.h"
#include "store/host_kv_store.h"

namespace tailorkv::cuda {

struct CudaBackendOptions {
  int device = 0;
  bool use_graphs = true;        // capture decode steps as CUDA graphs
  // Tokens per prefill pass (bounds activation memory). Llama-8B shape on an
  // H100, 128k-token prefill: 15.70 s at 4096, 15.62 s at 8192, 15.59 s at
  // 16384 (+1.3 GB more activations than 8192).
  int max_prefill_chunk = 8192;
  // Rows per MLP pass within a prefill chunk: the MLP's intermediates (3 x
  // ffn bf16 values a row: 86 KB at 8B) are the largest activations, and
  // GEMMs of 2,048 rows already run at full speed. >= 1.
  int max_mlp_rows = 2048;
  // Most bytes of host memory the sparse layers' host tier may hold (pinned
  // and registered with the GPU); 0 = 80% of physical memory.
  uint64_t host_kv_budget_bytes = 0;
  // Where the sparse layers' host tiers live: null = a store of the
  // backend's own (InProcessStore, host_kv_budget_bytes); else this one,
  // e.g. kv-host's arenas through kvhost::KvHostClientStore, whose arenas
  // must be registered with this device (RegisterHostMemory below). One
  // session per sequence, freed with it. Not owned; must outlive the backend.
  kvhost::HostKvStore* host_store = nullptr;
  // Sparse layers with index "gpu": run the speculative selection (query,
  // scores, Top-K, gather) on a side stream overlapping the previous layer
  // (false: in line on the main stream, for measuring what the overlap buys),
  // and give that stream the device's most urgent priority.
  bool sparse_overlap = true;
  // One-token products (decode) through LaunchGemvBf16 (gemv_kernels.cuh,
  // 1.10-1.24x cuBLAS's n = 1 GEMM on the H100) instead of cuBLAS.
  bool custom_gemv = true;
  bool sparse_side_priority = true;
  // Prefill chunks after the first: a sparse layer's history (bf16 host
  // tier) is copied back into the scratch by DMA on a copy stream while the
  // layers before it compute (false: in line, for measuring the overlap).
  bool prefill_prefetch = true;
  // Sparse decode: a row selected again at the next step stays in its slot
  // of the tier (a slot pool, LaunchAssignSlots) instead of crossing PCIe
  // again; only the new rows are fetched, into the freed slots (the tier's
  // contents are the same either way, so are the logits).
  // SmolLM2 reselects 81% of Top-896 rows from one step to the next
  // (tkv_selection_locality); 8B shape at 128k, H100: 9.83 -> 8.20 ms a
  // token with 75% of rows reused (docs/results.md).
  bool sparse_row_reuse = true;
  // Index "gpu" with FP8 entries: the scoring runs inside the Top-K's first
  // stage (LaunchScoreFp8TopK) where that applies, so the scores never go
  // through memory (the selection is the same). Off: on an H200 it made the
  // default plan slower (32k 5.94 vs 5.60 ms, 128k 6.50 vs 6.43: 64 blocks
  // of stage 1 read the index with fewer loads in flight than the scoring
  // kernel's 512), though faster for query "previous" at 128k (5.68 vs 5.82).
  bool sparse_fused_topk = false;
  int sparse_fused_chunk_threads = 0;  // its stage-1 block (LaunchScoreFp8TopK's chunk_threads)
  // DecodeBatchPick picks greedy tokens on the GPU (LaunchGreedyPick), so
  // only token ids cross back; false: the logits cross and the host picks
  // (Backend's default). On the H100 the device's picks equalled the host's
  // (dense and sparse, batches of 3, 8 steps) and the batch bench's 32k
  // default plan at batch 8 went from 370 to 416 tokens/s
  // (docs/results.md). A batch with a repetition penalty still picks on the
  // host until the penalty's GPU test has run on a model where it bites.
  bool device_greedy_pick = true;
  // Sparse layers with query "after-attention" and row reuse: a first
  // selection from the previous layer's input (TailorKV's speculation,
  // overlapping that whole layer) gathers rows ahead, so the final
  // selection, which can start only after the previous layer's attention,
  // finds most of its rows on the device (the logits do not change).
  // Off until its GPU test and timing have run (written 2026-12-07, when no
  // GPU could be had for the rest of the session).
  bool sparse_late_prefetch = false;
  // Untied models (Llama-3.1-8B): the input embedding table (1.05 GB at
  // 8B) stays in pinned host memory and the lookup reads only the rows of
  // the step's tokens over PCIe (8 KB a token), as llama.cpp keeps it on
  // the CPU. Tied models keep their one table on the GPU (it is the head).
  bool host_embeddings = true;
  // The layers' weight matrices (q/k/v, o, gate/up, down) as block-quantized
  // planes that LaunchGemvQuant reads (gemv_quant_kernels.cuh: W4A16/W8A16
  // decode GEMVs; prefill multiplies bf16 tiles dequantized on the fly)
  // instead of bf16 copies. kF32: bf16 copies. Random weights: this type
  // (Q4_0, Q4_1 or Q8_0). Real weights (from a load that kept them
  // quantized): a matrix whose GGUF parts share a type the GEMV takes keeps
  // it, any other becomes bf16 (logged at load). Embeddings and the head
  // stay bf16. Off by default until its GPU tests have run (written
  // 2026-12-07, when no GPU could be had).
  model::GgmlType layer_weights = model::GgmlType::kF32;
  // The quantized GEMV reads them with GemvQuantKernelKind::kPipelined
  // (true) or kSimple (gemv_quant_kernels.cuh; bit-identical results):
  // kSimple until kPipelined is timed on a GPU.
  bool gemv_quant_pipelined = false;
};

// Unavailable when no CUDA device exists; InvalidArgument for shapes the
// kernels do not support (head_dim other than 64/128).
absl::StatusOr<std::unique_ptr<runtime::Backend>> CreateCudaBackend(
    const model::ModelWeights& weights, const CudaBackendOptions& options);

// A backend whose weights are seeded random values generated on the GPU
// (benchmarks of large shapes: no host copy of the weights exists).
absl::StatusOr<std::unique_ptr<runtime::Backend>> CreateCudaBackendWithRandomWeights(
    const model::ModelConfig& config, uint64_t seed, const CudaBackendOptions& options);

// Registers host memory with `device` (mapped: kernels read it in place)
// and unregisters it: the register / unregister hooks for a HostKvStore
// whose arenas a CUDA backend reads (kvhost::KvHostClientStore).
absl::Status RegisterHostMemory(void* base, size_t bytes, int device);
absl::Status UnregisterHostMemory(void* base);

// Benchmarks: makes `seq` (from a CUDA backend) hold `length` tokens of
// random K/V without running a prefill.
absl::Status FillSequenceWithRandomKv(runtime::SequenceState& seq, int length, uint64_t seed);

// Bytes of device memory currently held by the backend's weights and
// workspaces, and by one sequence's cache.
int64_t BackendDeviceBytes(const runtime::Backend& backend);
int64_t SequenceDeviceBytes(const runtime::SequenceState& seq);

// Sparse row reuse of a CUDA sequence so far: rows selected by decode steps
// (every sparse layer and KV head) and rows of them copied on the device
// instead of fetched from host memory; zeros when reuse is off or `seq` is
// not a CUDA sequence with sparse layers. Synchronizes with the device.
struct SparseReuseStats {
  int64_t selected_rows = 0;
  int64_t reused_rows = 0;
};
SparseReuseStats SequenceSparseReuse(const runtime::SequenceState& seq);

}  // namespace tailorkv::cuda
