// The quantized KV cache of one layer (the `quant` policy) on the GPU: pack,
// decode-step append, fused decode attention and materialize, in the byte
// format of runtime/quant_kv.h (codes and fp16 params bit-identical to
// QuantKvCpu; the residual rings hold bf16 instead of fp32). CPU reference:
// runtime::QuantKvCpu. Tests: quant_kernels_test.cc.
//
// Supported: head_dim 64 or 128, bits 1/2/4, group 32/64/128 (dividing
// head_dim), residual a multiple of group up to 4096 (QuantShape::Validate),
// and for the fused attention at most 8 query heads per KV head.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "runtime/quant_kv.h"

namespace tailorkv::cuda {

// Device pointers to one layer's arrays (quant_kv.h's layout, all KV heads).
struct QuantDeviceCache {
  uint32_t* k_codes = nullptr;
  uint32_t* k_params = nullptr;  // QuantGroupParams as {scale | min << 16}
  uint32_t* v_codes = nullptr;
  uint32_t* v_params = nullptr;
  __nv_bfloat16* k_res = nullptr;  // [kv_head][R][head_dim]
  __nv_bfloat16* v_res = nullptr;
};

// Byte offsets of the six arrays inside one device allocation of `bytes`
// bytes. Each array starts 256-byte aligned and is followed by at least 256
// bytes of padding: the attention kernel's 16-byte tile copies may run up to
// 16 bytes past the last valid row (never used, but must be addressable).
// QuantShape::Bytes(2) is the cache's size proper; `bytes` adds the padding.
struct QuantDeviceLayout {
  size_t k_codes = 0, k_params = 0, v_codes = 0, v_params = 0, k_res = 0, v_res = 0;
  size_t bytes = 0;
};
QuantDeviceLayout QuantLayout(const runtime::QuantShape& shape);
// The arrays at `base` (an allocation of QuantLayout(shape).bytes bytes).
QuantDeviceCache QuantCacheAt(void* base, const runtime::QuantShape& shape);

// InvalidArgument unless the kernels support `shape` (see above).
absl::Status ValidateQuantShape(const runtime::QuantShape& shape);

// QuantKvCpu::Pack(k_full, v_full, head_stride, start, end) on the device:
// k_full, v_full: [kv_head][rows >= end][head_dim] bf16, head stride
// `head_stride` elements; positions [0, start) already stored and
// bit-identical in k_full/v_full. The cache must be zero-initialized before
// its first Pack/Append (as QuantKvCpu's vectors are).
absl::Status LaunchQuantPack(const __nv_bfloat16* k_full, const __nv_bfloat16* v_full,
                             int64_t head_stride, int start, int end,
                             const runtime::QuantShape& shape, const QuantDeviceCache& cache,
                             cudaStream_t stream);

// QuantKvCpu::Append(pos, k, v) with pos = *pos read on the device (so a
// captured graph replays at any position; 0 <= *pos < capacity). The new
// rows are read at position *pos of k_full / v_full (layout as in Pack), so
// a per-sequence scratch written by LaunchRopeAppendKv can be passed as is.
absl::Status LaunchQuantAppend(const __nv_bfloat16* k_full, const __nv_bfloat16* v_full,
                               int64_t head_stride, const int32_t* pos,
                               const runtime::QuantShape& shape, const QuantDeviceCache& cache,
                               cudaStream_t stream);

// QuantKvCpu::Materialize(len, ...) into bf16: rows [0, len) of every head
// get fmaf(s, code, z) (rounded to bf16) or the residual row; rows >= len
// are not written.
absl::Status LaunchQuantMaterialize(int len, const runtime::QuantShape& shape,
                                    const QuantDeviceCache& cache, __nv_bfloat16* k_full,
                                    __nv_bfloat16* v_full, int64_t head_stride,
                                    cudaStream_t stream);

// Bytes of device workspace LaunchQuantDecodeAttention needs.
size_t QuantDecodeWorkspaceBytes(const runtime::QuantShape& shape, int n_heads);

// Fused decode attention over positions [0, *length) (read on the device,
// 1 <= *length <= capacity), QuantKvCpu::Attend semantics with softmax scale
// 1/sqrt(head_dim):
//   q:   [n_heads][head_dim] bf16    out: [n_heads][head_dim] bf16
// Tokens whose K and V are both quantized are processed by split-K blocks
// that decode the codes in registers (tensor-core products of the fp16
// codes with q*s / p*s, fp32 accumulation); the residual tokens (at most R)
// by blocks that read the bf16 rings and dequantize the few keys that are
// already quantized while their values are still in the ring. One fp32
// online softmax over everything, merged by a second kernel.
absl::Status LaunchQuantDecodeAttention(const __nv_bfloat16* q, int n_heads,
                                        const runtime::QuantShape& shape,
                                        const QuantDeviceCache& cache, const int32_t* length,
                                        void* workspace, __nv_bfloat16* out, cudaStream_t stream);

}  // namespace tailorkv::cuda
