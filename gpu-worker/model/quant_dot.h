// Matrix-vector products over weights kept in their GGUF block formats
// (issue 19): the weight bytes are read as the file stores them (no fp32
// copy), and the activations are quantized per block of 32 values to int8,
// so each block's dot product is an exact integer sum, scaled once.
//
// Contract (the reference, QuantKernel::kReference, defines the result):
// for weight row r and activation row i,
//   y[i][r] = sum over 32-value blocks b, in order, of c_b (fp32 adds),
// where c_b is the block's contribution from exact integer sums:
//   Q4_0: dw * dx * (sum (qw - 8) qx)
//   Q4_1: dw * dx * (sum qw qx) + mw * (dx * isum)
//   Q8_0: dw * dx * (sum qw qx)
//   Q4_K: dx * (d * sc_j * (sum qw qx) - dmin * m_j * isum), sub-block j
//   Q6_K: d * dx * (sc_a * s_a + sc_b * s_b), an exact integer in the
//         parentheses, s_a and s_b the sums of (qw - 32) qx over the block's
//         two halves of 16 values and sc_a, sc_b their int8 scales
// with dx, isum the activation block's scale and sum of its int8 values, and
// the weights' scales as ggml_types.h's dequantizers decode them. F16 and
// BF16 weights (no blocks) multiply the float activations themselves
// (Q8Activations::source): y = sum over k, in order, of w_k * x_k in fp32. The SIMD
// kernels add the same integer sums in another order of fp32 operations;
// quant_dot_test.cc bounds the difference (1e-5 of the sum of |c_b|).
// Each (i, r) result depends only on weight row r and activation row i, so
// a row's output does not depend on the batch it is computed in.
//
// Thread-safety: functions are reentrant; QuantMatmul and QuantMatmulGroup
// run one OpenMP parallel loop over weight rows.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "model/ggml_types.h"

namespace tailorkv::model {

// n rows of `cols` values (cols a multiple of 32), quantized per block:
// q = round_half_even(x / dx) with dx = max|x| / 127 (0 for an all-zero
// block: then q = 0), isum = sum of the block's q.
struct Q8Activations {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<int8_t> q;      // [rows * cols]
  std::vector<float> d;       // [rows * cols / 32]
  std::vector<int32_t> isum;  // [rows * cols / 32]
  // The float rows these were quantized from (QuantizeActivations' x; not
  // owned: it must outlive the products that read it, the F16/BF16 ones).
  const float* source = nullptr;
};

// InvalidArgument when cols is not a positive multiple of 32, rows < 1, or a
// value is not finite (a NaN would make the block's scale NaN silently).
absl::Status QuantizeActivations(const float* x, int64_t rows, int64_t cols, Q8Activations* out);

enum class QuantKernel {
  kAuto,       // the fastest this CPU runs
  kReference,  // scalar, the contract above
  kAvx2,       // AVX2 + FMA (maddubs); needs the CPU to have them
  kAvxVnni,    // AVX-VNNI (dpbusd on 256 bits); needs avxvnni
  kAvx512Vnni, // AVX-512 VNNI, two blocks per op for Q4_0/Q4_1/Q8_0 (K-quants:
               // kAvxVnni's); needs avx512f/bw/dq/vnni and avxvnni
};

// Whether this CPU can run `kernel` (kReference and kAuto always).
bool QuantKernelAvailable(QuantKernel kernel);
// The kernel kAuto picks for `type` on this CPU.
QuantKernel AutoQuantKernel(GgmlType type);

// Types QuantMatmul takes: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, and F16, BF16
// (against x.source's floats; InvalidArgument when it is null).
bool QuantMatmulSupports(GgmlType type);

// y[i * rows + r] = (accumulate ? y[i * rows + r] : 0) + dot(weight row r,
// activation row i) for i < x.rows, r < rows. `w` holds rows x cols values
// of `type` row after row (w_bytes exactly that many bytes; cols a multiple
// of the type's block size). InvalidArgument naming the argument otherwise,
// or when the CPU lacks `kernel`'s instructions.
absl::Status QuantMatmul(GgmlType type, const uint8_t* w, int64_t w_bytes, int64_t rows, int64_t cols,
                         const Q8Activations& x, float* y, bool accumulate,
                         QuantKernel kernel = QuantKernel::kAuto);

// One product of a group: `rows` weight rows of `type` at `w` (w_bytes
// bytes), times the group's activations, into (or onto) y as QuantMatmul.
struct QuantProduct {
  GgmlType type = GgmlType::kF32;
  const uint8_t* w = nullptr;
  int64_t w_bytes = 0;
  int64_t rows = 0;
  float* y = nullptr;
  bool accumulate = false;
};

// Every product of `group` over the same activations `x` (cols = x.cols),
// in one parallel loop over all their rows: one fork and join where a
// decode step would pay one per matrix (q/k/v, gate/up). Each product's y
// is exactly what QuantMatmul gives for it alone. The whole group is
// checked before anything is written; InvalidArgument names the product.
absl::Status QuantMatmulGroup(absl::Span<const QuantProduct> group, const Q8Activations& x,
                              QuantKernel kernel = QuantKernel::kAuto);

}  // namespace tailorkv::model
