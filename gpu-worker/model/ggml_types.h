// ggml tensor storage types and their block geometry, plus dequantization
// of each supported type to float32. The CPU implementations here are the
// reference every other (e.g. CUDA) dequantizer is tested against; they are
// bit-exact with the gguf Python package (ggml_types_test.cc compares against
// vectors written by scripts/make_dequant_vectors.py with 0 ulp tolerance).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tailorkv::model {

// Numbered as in ggml. Only the types listed are supported.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ6_K = 14,
  kBF16 = 30,
};

struct GgmlTypeTraits {
  std::string_view name;
  int64_t block_elems;  // elements per block (1 for plain floats)
  int64_t block_bytes;  // bytes per block
};

// Traits for a raw type id; InvalidArgument for unknown/unsupported ids.
absl::StatusOr<GgmlTypeTraits> TraitsOf(uint32_t raw_type);

// Dequantizes `n` elements (a multiple of the block size) from `src`
// (holding exactly the bytes for n elements) into `dst`.
absl::Status Dequantize(GgmlType type, const uint8_t* src, size_t src_bytes, float* dst, int64_t n);

// Half-precision conversions shared by loaders and kernels' references.
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);
float Bf16ToFloat(uint16_t h);
uint16_t FloatToBf16(float f);  // round to nearest even

}  // namespace tailorkv::model
