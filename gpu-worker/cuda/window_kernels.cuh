// The `window` KV policy on the GPU (StreamingLLM-style): a store of
// S + W rows per KV head, bf16 [kv_head][rows][head_dim], rows = min(S + W,
// capacity). Position p < S lives in row p (the sink), position p >= S in row
// S + (p - S) % W (a ring of the W most recent). Attention reads the store
// rows in any order (softmax does not depend on it) and K is stored after
// RoPE at its true position, so no row ever needs re-rotating. CPU
// reference: the CPU backend's window layers; tests: cuda_backend_test.cc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace tailorkv::cuda {

struct WindowShape {
  int n_kv_heads = 0;
  int head_dim = 0;
  int sink = 0;      // S >= 0
  int recent = 0;    // W >= 1
  int rows = 0;      // store rows per head: min(S + W, capacity)
  int capacity = 0;  // rows per head of the full-precision scratch
};

// Decode: copies scratch row *pos (K and V, every head) into its store row
// and writes *kept = min(*pos + 1, rows), the length the decode attention
// then reads (both on the device, so a captured graph replays).
//   scratch_k, scratch_v: [kv_head][capacity][head_dim]   store_k, store_v: [kv_head][rows][head_dim]
absl::Status LaunchWindowAppend(const __nv_bfloat16* scratch_k, const __nv_bfloat16* scratch_v,
                                const int32_t* pos, const WindowShape& shape,
                                __nv_bfloat16* store_k, __nv_bfloat16* store_v, int32_t* kept,
                                cudaStream_t stream);

// Prefill of a chunk at [start, start + n): writes the h = min(start, S + W)
// kept history rows, in position order, into scratch rows [start - h, start)
// (just before the chunk, so attention over scratch rows [start - h, start +
// n) sees [history | chunk]).
absl::Status LaunchWindowGatherHistory(const __nv_bfloat16* store_k, const __nv_bfloat16* store_v,
                                       int start, const WindowShape& shape,
                                       __nv_bfloat16* scratch_k, __nv_bfloat16* scratch_v,
                                       cudaStream_t stream);

// After the chunk: copies the chunk rows that stay kept (positions < S and
// the last W of [0, start + n)) from the scratch into the store.
absl::Status LaunchWindowStoreChunk(const __nv_bfloat16* scratch_k, const __nv_bfloat16* scratch_v,
                                    int start, int n, const WindowShape& shape,
                                    __nv_bfloat16* store_k, __nv_bfloat16* store_v,
                                    cudaStream_t stream);

}  // namespace tailorkv::cuda
