// GgufFile: a read-only, validated view of a GGUF (v2/v3) model file.
//
// Open() maps the file and parses the header, every metadata key/value and
// every tensor info. Every length, count and offset is checked against the
// file size before it is used, so a corrupt or truncated file yields an
// InvalidArgument/DataLoss status naming the file and the field; no
// allocation is ever larger than the file. After Open() succeeds, accessors
// never fail on structure, only on type mismatches or missing keys.
//
// Errors: DataLoss when a length, count or offset runs past the end of the
// file (truncation); InvalidArgument for values that are wrong in themselves
// (bad magic, unsupported version or type id, unaligned offset, overflowing
// dimensions, arrays of arrays).
//
// Ownership: GgufFile owns the mapping; spans it returns stay valid for the
// lifetime of the GgufFile. All const methods are thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/ggml_types.h"
#include "model/mapped_file.h"

namespace tailorkv::model {

// GGUF metadata value types, numbered as in the file format.
enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// One metadata value. Scalars of every integer width are widened to int64
// (uint64 values above INT64_MAX are rejected at parse time), floats to
// double. Arrays keep their element type.
struct GgufValue {
  GgufValueType type = GgufValueType::kUint8;
  GgufValueType array_type = GgufValueType::kUint8;  // valid when type == kArray
  int64_t i = 0;                                     // integer and bool scalars
  double f = 0;                                      // float scalars
  std::string s;                                     // string scalar
  std::vector<int64_t> ints;                         // integer/bool arrays
  std::vector<double> floats;                        // float arrays
  std::vector<std::string> strings;                  // string arrays
};

struct GgufTensorInfo {
  std::string name;
  // Dimensions as stored: ne[0] is the contiguous (innermost) dimension.
  std::vector<int64_t> ne;
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;      // relative to the start of the tensor data section
  uint64_t n_elements = 0;  // product of ne
  uint64_t n_bytes = 0;     // storage size for `type`
};

class GgufFile {
 public:
  // Opens and fully validates `path`.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  // Parses an in-memory image (tests, fuzzing). `name` is used in errors.
  static absl::StatusOr<std::unique_ptr<GgufFile>> FromBytes(std::string name,
                                                             std::vector<uint8_t> bytes);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }

  // Metadata. Find returns nullptr when absent; the typed getters return
  // NotFound when absent and InvalidArgument (naming the key) on a type mismatch.
  const GgufValue* Find(std::string_view key) const;
  absl::StatusOr<int64_t> GetInt(std::string_view key) const;
  absl::StatusOr<double> GetFloat(std::string_view key) const;  // accepts ints too
  absl::StatusOr<std::string> GetString(std::string_view key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(std::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(std::string_view key) const;
  absl::StatusOr<std::vector<double>> GetFloatArray(std::string_view key) const;
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }

  // Tensors.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* FindTensor(std::string_view name) const;
  // Raw bytes of a tensor (already checked to lie inside the file).
  absl::Span<const uint8_t> TensorBytes(const GgufTensorInfo& t) const;
  // Dequantizes a whole tensor to float32 (row-major, ne[0] contiguous).
  // Tensors above ~1M elements are split over up to 8 short-lived threads.
  absl::StatusOr<std::vector<float>> DequantizeTensor(std::string_view name) const;

 private:
  GgufFile() = default;
  absl::Status Parse();

  std::string path_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  // Exactly one of mapping_ / owned_ backs data_.
  MappedFile mapping_;
  std::vector<uint8_t> owned_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  uint64_t data_offset_ = 0;  // start of the tensor data section
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<GgufTensorInfo> tensors_;
};

}  // namespace tailorkv::model
