// MappedFile: the one RAII owner of a read-only memory mapping of a whole
// file (base and size together). Move-only; the destructor unmaps. Used by
// the GGUF and safetensors readers so weights are paged in on demand instead
// of read into a heap copy first. All const methods are thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tailorkv::model {

class MappedFile {
 public:
  MappedFile() = default;
  // NotFound when the file does not exist, InvalidArgument for an empty file
  // (nothing to map), Internal for other OS failures; messages name `path`.
  static absl::StatusOr<MappedFile> Open(const std::string& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return static_cast<const uint8_t*>(base_); }
  size_t size() const { return size_; }
  absl::Span<const uint8_t> bytes() const { return {data(), size_}; }

 private:
  void Reset();
  void* base_ = nullptr;
  size_t size_ = 0;
};

}  // namespace tailorkv::model
