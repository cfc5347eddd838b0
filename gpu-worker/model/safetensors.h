// SafetensorsFile: a read-only, validated view of one .safetensors file
// (u64 little-endian header length, a JSON header mapping tensor names to
// {dtype, shape, data_offsets:[begin, end]} plus optional "__metadata__",
// then the data section the offsets are relative to).
//
// Open() maps the file and validates the whole header before returning: the
// header length against the file size, the JSON syntax and field types, each
// dtype, and that every [begin, end) lies inside the data section and holds
// exactly prod(shape) * sizeof(dtype) bytes. Errors name the file and the
// tensor: DataLoss for ranges past the end of the file, InvalidArgument for
// malformed or inconsistent headers.
//
// Ownership: the object owns its mapping. All const methods are thread-safe.
// LoadWeightsFromSafetensors (llama_weights.h) is the main user.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/mapped_file.h"

namespace tailorkv::model {

struct SafetensorsTensorInfo {
  std::string name;
  std::string dtype;           // as in the header: "F32", "BF16", "I64", ...
  int64_t element_bytes = 0;   // size of one element of `dtype`
  std::vector<int64_t> shape;  // outermost first
  uint64_t n_elements = 0;
  uint64_t begin = 0, end = 0;  // byte range relative to the data section
};

class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // Parses an in-memory image (tests). `name` is used in errors.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBytes(std::string name,
                                                                    std::vector<uint8_t> bytes);
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsTensorInfo>& tensors() const { return tensors_; }
  const SafetensorsTensorInfo* Find(std::string_view name) const;
  absl::Span<const uint8_t> TensorBytes(const SafetensorsTensorInfo& t) const;
  // Converts an F32, F16 or BF16 tensor to float32; InvalidArgument for other
  // dtypes, NotFound for an unknown name.
  absl::StatusOr<std::vector<float>> ToFloat(std::string_view name) const;

 private:
  SafetensorsFile() = default;
  absl::Status Parse();

  std::string path_;
  // Exactly one of mapping_ / owned_ backs data_.
  MappedFile mapping_;
  std::vector<uint8_t> owned_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  uint64_t data_offset_ = 0;  // 8 + header length
  std::vector<SafetensorsTensorInfo> tensors_;
};

}  // namespace tailorkv::model
