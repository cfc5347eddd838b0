// Weight-only quantized GEMV for the decode step (issue 19): GGUF Q4_0, Q4_1
// and Q8_0 weights (W4A16 / W8A16), bf16 activations, float32 sums. The
// weights are repacked once at load (RepackForGemv) into separate planes so
// that a warp's loads are coalesced 16-byte vectors: one block of 32 values
// is one 16-byte chunk of nibbles (Q4) or two chunks of int8 (Q8_0), and its
// fp16 scale (and Q4_1's min) sit in planes of their own. A decode step
// reads each weight byte once: at 4.5 bits a value (Q4_0) that is 0.28 of
// bf16's bytes.
//
// Launchers validate their arguments before any CUDA call (so validation
// needs no device), launch on `stream`, check the launch, and never allocate
// or synchronize: a decode step that calls them can be captured in a graph.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/ggml_types.h"

namespace tailorkv::cuda {

// Whether LaunchGemvQuant and LaunchDequantizeRows take `type`.
bool GemvQuantSupports(model::GgmlType type);

// One matrix of `rows` x `cols` block-quantized values in the GEMV's planes
// (cols a multiple of 32; nb = cols / 32 blocks a row):
//   qs: [rows][nb][16] bytes for Q4_0/Q4_1 (GGUF's nibble order: byte j of a
//       block holds value j in its low nibble and value j + 16 in its high
//       one), [rows][nb][32] int8 for Q8_0
//   d:  [rows][nb] fp16 scales;  m: [rows][nb] fp16 mins (Q4_1 only)
// Value k of block b of row r is (GGUF's dequantization, in float32):
//   Q4_0: d * (q - 8)    Q4_1: d * q + m    Q8_0: d * q
struct QuantPlanes {
  model::GgmlType type = model::GgmlType::kF32;
  int64_t rows = 0, cols = 0;
  std::vector<uint8_t> qs;
  std::vector<uint16_t> d, m;  // fp16 bits
};

// GGUF bytes of `rows` x `cols` values of `type` (row after row, exactly
// rows * cols / 32 blocks) -> the planes. InvalidArgument naming the argument
// for an unsupported type, cols not a positive multiple of 32, rows < 1, or
// a byte count that does not match.
absl::StatusOr<QuantPlanes> RepackForGemv(model::GgmlType type, const uint8_t* bytes, int64_t n_bytes,
                                          int64_t rows, int64_t cols);

// Device pointers to a matrix's planes (each 16-byte aligned; m null but for
// Q4_1).
struct QuantMatrixView {
  model::GgmlType type = model::GgmlType::kF32;
  int rows = 0, cols = 0;
  const uint8_t* qs = nullptr;
  const __half* d = nullptr;
  const __half* m = nullptr;
};

// y[r] = sum_k value(r, k) * x[k] for r < w.rows, summed in float32, with the
// output modes of LaunchGemvBf16 (gemv_kernels.cuh):
//   y_bf16:                y is bf16 [rows], y[r] = bf16_rn(sum)
//   !y_bf16, !accumulate:  y is f32 [rows],  y[r] = sum (y is not read)
//   !y_bf16, accumulate:   y is f32 [rows],  y[r] += sum
//   x: [cols] bf16, 16-byte aligned; y must not overlap the planes or x.
// Each row's sum is its blocks' partial sums added in an order fixed by
// (cols), so results are deterministic run to run. InvalidArgument (naming
// the field) for: an unsupported type, a null pointer (m for Q4_1), rows < 1,
// cols not a positive multiple of 32, misaligned qs/d/m/x/y, accumulate with
// a bf16 output.
// How the kernel issues its work; both give bit-identical results (the same
// operations in the same order for every output), only the speed differs:
//   kSimple: a lane loads one block of each of its warp's rows, then sums it.
//   kPipelined: a lane issues its next 4 blocks' loads before their sums,
//     and converts quants to float through exponent bits instead of
//     int-to-float instructions. Not yet timed on a GPU (written 2026-12-08
//     after the H100 measured kSimple at 37-79% of the bandwidth).
enum class GemvQuantKernelKind { kSimple, kPipelined };

absl::Status LaunchGemvQuant(const QuantMatrixView& w, const __nv_bfloat16* x, void* y, bool y_bf16,
                             bool accumulate, cudaStream_t stream,
                             GemvQuantKernelKind kind = GemvQuantKernelKind::kSimple);

// A decode batch: for b < batch, y[b][r] as LaunchGemvQuant gives for x's
// row b alone, bit-identical (each output's operations and their order do
// not depend on the batch); the weights are read once per pass of up to
// kGemvQuantMaxBatch rows. x: [batch][cols] bf16 (16-byte aligned rows since
// cols % 32 == 0), y: [batch][rows]. InvalidArgument as LaunchGemvQuant, and
// for batch < 1.
inline constexpr int kGemvQuantMaxBatch = 8;
absl::Status LaunchGemvQuantBatch(const QuantMatrixView& w, const __nv_bfloat16* x, int batch, void* y,
                                  bool y_bf16, bool accumulate, cudaStream_t stream,
                                  GemvQuantKernelKind kind = GemvQuantKernelKind::kSimple);

// Rows [first, first + count) of `w` dequantized to bf16 (bf16_rn of the
// float32 value above) into out[count][cols]: the tile a prefill GEMM
// multiplies. InvalidArgument as above, and for a range outside [0, rows).
absl::Status LaunchDequantizeRows(const QuantMatrixView& w, int first, int count, __nv_bfloat16* out,
                                  cudaStream_t stream);

// Benchmarks: seeded random planes for a rows x cols matrix of `type`
// (uniform random quants; scales d = scale * (0.75 + 0.5 u), u uniform in
// [0, 1); Q4_1 mins m = -8 d, so values are centred like Q4_0's), written
// on `stream`. InvalidArgument for an unsupported type, null planes, rows
// < 1 or cols not a positive multiple of 32.
absl::Status LaunchFillRandomQuantPlanes(model::GgmlType type, uint8_t* qs, __half* d, __half* m, int64_t rows,
                                         int64_t cols, uint64_t seed, float scale, cudaStream_t stream);

}  // namespace tailorkv::cuda
