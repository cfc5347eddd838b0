// Test-only helpers: a writer for synthetic GGUF images, so the parser and
// loader tests control every byte (including deliberately wrong ones).
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "model/ggml_types.h"
#include "model/gguf_file.h"

namespace tailorkv::model::testing {

class ByteWriter {
 public:
  template <typename T>
  void Put(T v) {
    const size_t at = bytes_.size();
    bytes_.resize(at + sizeof(T));
    std::memcpy(bytes_.data() + at, &v, sizeof(T));
  }
  void Str(const std::string& s) {
    Put<uint64_t>(s.size());
    bytes_.insert(bytes_.end(), s.begin(), s.end());
  }
  void Raw(const std::vector<uint8_t>& b) { bytes_.insert(bytes_.end(), b.begin(), b.end()); }
  void PadTo(uint64_t alignment) {
    while (bytes_.size() % alignment != 0) bytes_.push_back(0);
  }
  size_t size() const { return bytes_.size(); }
  std::vector<uint8_t>& bytes() { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
};

// Overwrites a little-endian value inside an image.
template <typename T>
void Patch(std::vector<uint8_t>& bytes, size_t pos, T v) {
  std::memcpy(bytes.data() + pos, &v, sizeof(T));
}

// Byte offsets of the GGUF header fields.
inline constexpr size_t kTensorCountPos = 8;
inline constexpr size_t kKvCountPos = 16;
inline constexpr size_t kFirstKeyLengthPos = 24;

class GgufBuilder {
 public:
  explicit GgufBuilder(uint32_t version = 3) : version_(version) {}

  GgufBuilder& U32(const std::string& key, uint32_t v) {
    return Scalar(key, GgufValueType::kUint32, v);
  }
  GgufBuilder& I32(const std::string& key, int32_t v) {
    return Scalar(key, GgufValueType::kInt32, v);
  }
  GgufBuilder& U64(const std::string& key, uint64_t v) {
    return Scalar(key, GgufValueType::kUint64, v);
  }
  GgufBuilder& F32(const std::string& key, float v) {
    return Scalar(key, GgufValueType::kFloat32, v);
  }
  GgufBuilder& String(const std::string& key, const std::string& v) {
    ByteWriter w;
    w.Str(key);
    w.Put<uint32_t>(static_cast<uint32_t>(GgufValueType::kString));
    w.Str(v);
    kvs_.push_back(w.bytes());
    return *this;
  }
  GgufBuilder& StringArray(const std::string& key, const std::vector<std::string>& v) {
    ByteWriter w = ArrayHeader(key, GgufValueType::kString, v.size());
    for (const std::string& s : v) w.Str(s);
    kvs_.push_back(w.bytes());
    return *this;
  }
  GgufBuilder& I32Array(const std::string& key, const std::vector<int32_t>& v) {
    ByteWriter w = ArrayHeader(key, GgufValueType::kInt32, v.size());
    for (int32_t x : v) w.Put(x);
    kvs_.push_back(w.bytes());
    return *this;
  }
  GgufBuilder& F32Array(const std::string& key, const std::vector<float>& v) {
    ByteWriter w = ArrayHeader(key, GgufValueType::kFloat32, v.size());
    for (float x : v) w.Put(x);
    kvs_.push_back(w.bytes());
    return *this;
  }
  // Any pre-encoded key/value (for malformed or unusual values).
  GgufBuilder& RawKv(std::vector<uint8_t> encoded) {
    kvs_.push_back(std::move(encoded));
    return *this;
  }

  // A tensor whose data is appended to the data section at the next aligned
  // offset, unless `offset` forces the recorded offset (data then not written).
  GgufBuilder& Tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t raw_type,
                      std::vector<uint8_t> data, std::optional<uint64_t> offset = std::nullopt) {
    tensors_.push_back({name, std::move(ne), raw_type, std::move(data), offset});
    return *this;
  }
  GgufBuilder& TensorF32(const std::string& name, std::vector<uint64_t> ne,
                         const std::vector<float>& values) {
    std::vector<uint8_t> data(values.size() * 4);
    std::memcpy(data.data(), values.data(), data.size());
    return Tensor(name, std::move(ne), static_cast<uint32_t>(GgmlType::kF32), std::move(data));
  }
  GgufBuilder& Alignment(uint64_t a) {
    alignment_ = a;
    return *this;
  }

  std::vector<uint8_t> Build() const {
    ByteWriter w;
    w.Put<uint32_t>(0x46554747);
    w.Put<uint32_t>(version_);
    w.Put<uint64_t>(tensors_.size());
    w.Put<uint64_t>(kvs_.size());
    for (const auto& kv : kvs_) w.Raw(kv);
    // Data layout first, so infos can carry offsets.
    std::vector<uint64_t> offsets;
    uint64_t cursor = 0;
    for (const TensorSpec& t : tensors_) {
      if (t.offset.has_value()) {
        offsets.push_back(*t.offset);
        continue;
      }
      cursor = (cursor + alignment_ - 1) / alignment_ * alignment_;
      offsets.push_back(cursor);
      cursor += t.data.size();
    }
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const TensorSpec& t = tensors_[i];
      w.Str(t.name);
      w.Put<uint32_t>(static_cast<uint32_t>(t.ne.size()));
      for (uint64_t d : t.ne) w.Put<uint64_t>(d);
      w.Put<uint32_t>(t.raw_type);
      w.Put<uint64_t>(offsets[i]);
    }
    w.PadTo(alignment_);
    const size_t data_start = w.size();
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (tensors_[i].offset.has_value()) continue;
      w.bytes().resize(data_start + offsets[i]);
      w.Raw(tensors_[i].data);
    }
    return w.bytes();
  }

 private:
  struct TensorSpec {
    std::string name;
    std::vector<uint64_t> ne;
    uint32_t raw_type;
    std::vector<uint8_t> data;
    std::optional<uint64_t> offset;
  };

  template <typename T>
  GgufBuilder& Scalar(const std::string& key, GgufValueType type, T v) {
    ByteWriter w;
    w.Str(key);
    w.Put<uint32_t>(static_cast<uint32_t>(type));
    w.Put(v);
    kvs_.push_back(w.bytes());
    return *this;
  }
  static ByteWriter ArrayHeader(const std::string& key, GgufValueType elem, size_t n) {
    ByteWriter w;
    w.Str(key);
    w.Put<uint32_t>(static_cast<uint32_t>(GgufValueType::kArray));
    w.Put<uint32_t>(static_cast<uint32_t>(elem));
    w.Put<uint64_t>(n);
    return w;
  }

  uint32_t version_;
  uint64_t alignment_ = 32;
  std::vector<std::vector<uint8_t>> kvs_;
  std::vector<TensorSpec> tensors_;
};

}  // namespace tailorkv::model::testing
