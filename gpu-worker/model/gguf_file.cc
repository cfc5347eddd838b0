#include "model/gguf_file.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <new>
#include <system_error>
#include <thread>
#include <unordered_set>
#include <utility>

#include "absl/strings/str_format.h"
#include "common/status_macros.h"

namespace tailorkv::model {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as little-endian u32
constexpr uint32_t kMaxDims = 4;             // GGML_MAX_DIMS
constexpr uint64_t kDefaultAlignment = 32;
// Smallest possible encodings, used to reject counts that cannot fit in the
// bytes left before anything is allocated for them.
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;  // key length, type, 1-byte value
constexpr uint64_t kMinTensorInfoBytes =
    8 + 4 + 8 + 4 + 8;  // name len, n_dims, 1 dim, type, offset

std::string_view TypeName(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
      return "uint8";
    case GgufValueType::kInt8:
      return "int8";
    case GgufValueType::kUint16:
      return "uint16";
    case GgufValueType::kInt16:
      return "int16";
    case GgufValueType::kUint32:
      return "uint32";
    case GgufValueType::kInt32:
      return "int32";
    case GgufValueType::kFloat32:
      return "float32";
    case GgufValueType::kBool:
      return "bool";
    case GgufValueType::kString:
      return "string";
    case GgufValueType::kArray:
      return "array";
    case GgufValueType::kUint64:
      return "uint64";
    case GgufValueType::kInt64:
      return "int64";
    case GgufValueType::kFloat64:
      return "float64";
  }
  return "unknown";
}

bool IsInteger(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kBool:
      return true;
    default:
      return false;
  }
}

bool IsFloat(GgufValueType t) {
  return t == GgufValueType::kFloat32 || t == GgufValueType::kFloat64;
}

// Encoded size of one scalar; 8 for strings (their length prefix, a minimum).
uint64_t MinEncodedSize(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    default:
      return 8;
  }
}

// Bounds-checked little-endian reader over the file image. Every read checks
// the remaining length first; `what` names the field in errors.
class Cursor {
 public:
  Cursor(const std::string& file, const uint8_t* data, size_t size)
      : file_(file), data_(data), size_(size) {}

  size_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  absl::Status Need(uint64_t n, std::string_view what) const {
    if (n > remaining()) {
      return absl::DataLossError(
          absl::StrFormat("%s: %s at offset %d needs %d bytes but only %d remain (file size %d)",
                          file_, what, pos_, n, remaining(), size_));
    }
    return absl::OkStatus();
  }

  template <typename T>
  absl::StatusOr<T> Read(std::string_view what) {
    RETURN_IF_ERROR(Need(sizeof(T), what));
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));  // the host is little-endian like the format
    pos_ += sizeof(T);
    return v;
  }

  absl::StatusOr<std::string> ReadString(std::string_view what) {
    ASSIGN_OR_RETURN(uint64_t len, Read<uint64_t>(what));
    if (len > remaining()) {
      return absl::DataLossError(absl::StrFormat(
          "%s: %s: string length %d at offset %d exceeds the %d bytes remaining (file size %d)",
          file_, what, len, pos_ - 8, remaining(), size_));
    }
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(len));
    pos_ += len;
    return s;
  }

 private:
  const std::string& file_;
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

absl::StatusOr<int64_t> ReadInteger(Cursor& c, GgufValueType t, const std::string& what,
                                    const std::string& file) {
  switch (t) {
    case GgufValueType::kUint8: {
      ASSIGN_OR_RETURN(auto v, c.Read<uint8_t>(what));
      return v;
    }
    case GgufValueType::kInt8: {
      ASSIGN_OR_RETURN(auto v, c.Read<int8_t>(what));
      return v;
    }
    case GgufValueType::kBool: {
      ASSIGN_OR_RETURN(auto v, c.Read<uint8_t>(what));
      if (v > 1) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: %s: bool value %d is neither 0 nor 1", file, what, v));
      }
      return v;
    }
    case GgufValueType::kUint16: {
      ASSIGN_OR_RETURN(auto v, c.Read<uint16_t>(what));
      return v;
    }
    case GgufValueType::kInt16: {
      ASSIGN_OR_RETURN(auto v, c.Read<int16_t>(what));
      return v;
    }
    case GgufValueType::kUint32: {
      ASSIGN_OR_RETURN(auto v, c.Read<uint32_t>(what));
      return v;
    }
    case GgufValueType::kInt32: {
      ASSIGN_OR_RETURN(auto v, c.Read<int32_t>(what));
      return v;
    }
    case GgufValueType::kInt64: {
      ASSIGN_OR_RETURN(auto v, c.Read<int64_t>(what));
      return v;
    }
    case GgufValueType::kUint64: {
      ASSIGN_OR_RETURN(uint64_t v, c.Read<uint64_t>(what));
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: %s: uint64 value %d does not fit in int64", file, what, v));
      }
      return static_cast<int64_t>(v);
    }
    default:
      return absl::InternalError("ReadInteger on a non-integer type");
  }
}

absl::StatusOr<double> ReadFloat(Cursor& c, GgufValueType t, const std::string& what) {
  if (t == GgufValueType::kFloat32) {
    ASSIGN_OR_RETURN(float v, c.Read<float>(what));
    return v;
  }
  ASSIGN_OR_RETURN(double v, c.Read<double>(what));
  return v;
}

absl::StatusOr<GgufValueType> ReadValueType(Cursor& c, const std::string& what,
                                            const std::string& file) {
  ASSIGN_OR_RETURN(uint32_t raw, c.Read<uint32_t>(what));
  if (raw > static_cast<uint32_t>(GgufValueType::kFloat64)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: %s: unknown metadata value type %d", file, what, raw));
  }
  return static_cast<GgufValueType>(raw);
}

absl::Status ReadValue(Cursor& c, const std::string& key, const std::string& file, GgufValue& out) {
  const std::string what = absl::StrFormat("metadata key '%s'", key);
  ASSIGN_OR_RETURN(out.type, ReadValueType(c, what + " type", file));
  if (out.type == GgufValueType::kString) {
    ASSIGN_OR_RETURN(out.s, c.ReadString(what));
    return absl::OkStatus();
  }
  if (IsInteger(out.type)) {
    ASSIGN_OR_RETURN(out.i, ReadInteger(c, out.type, what, file));
    return absl::OkStatus();
  }
  if (IsFloat(out.type)) {
    ASSIGN_OR_RETURN(out.f, ReadFloat(c, out.type, what));
    return absl::OkStatus();
  }
  // Array.
  ASSIGN_OR_RETURN(out.array_type, ReadValueType(c, what + " array element type", file));
  if (out.array_type == GgufValueType::kArray) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: %s: arrays of arrays are not supported", file, what));
  }
  ASSIGN_OR_RETURN(uint64_t count, c.Read<uint64_t>(what + " array count"));
  const uint64_t min_size = MinEncodedSize(out.array_type);
  if (count > c.remaining() / min_size) {
    return absl::DataLossError(
        absl::StrFormat("%s: %s: array of %d %s elements cannot fit in the %d bytes remaining",
                        file, what, count, TypeName(out.array_type), c.remaining()));
  }
  const size_t n = static_cast<size_t>(count);
  if (out.array_type == GgufValueType::kString) {
    out.strings.reserve(n);
    for (size_t j = 0; j < n; ++j) {
      ASSIGN_OR_RETURN(std::string s, c.ReadString(absl::StrFormat("%s[%d]", what, j)));
      out.strings.push_back(std::move(s));
    }
  } else if (IsInteger(out.array_type)) {
    out.ints.resize(n);
    for (size_t j = 0; j < n; ++j) {
      ASSIGN_OR_RETURN(out.ints[j], ReadInteger(c, out.array_type, what, file));
    }
  } else {
    out.floats.resize(n);
    for (size_t j = 0; j < n; ++j) {
      ASSIGN_OR_RETURN(out.floats[j], ReadFloat(c, out.array_type, what));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  ASSIGN_OR_RETURN(MappedFile mapping, MappedFile::Open(path));
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  f->mapping_ = std::move(mapping);
  f->data_ = f->mapping_.data();
  f->size_ = f->mapping_.size();
  RETURN_IF_ERROR(f->Parse());
  return f;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::FromBytes(std::string name,
                                                              std::vector<uint8_t> bytes) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = std::move(name);
  f->owned_ = std::move(bytes);
  f->data_ = f->owned_.data();
  f->size_ = f->owned_.size();
  RETURN_IF_ERROR(f->Parse());
  return f;
}

GgufFile::~GgufFile() = default;  // mapping_ unmaps itself

absl::Status GgufFile::Parse() {
  Cursor c(path_, data_, size_);
  ASSIGN_OR_RETURN(uint32_t magic, c.Read<uint32_t>("magic"));
  if (magic != kGgufMagic) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: bad magic 0x%08x, not a GGUF file", path_, magic));
  }
  ASSIGN_OR_RETURN(version_, c.Read<uint32_t>("version"));
  if (version_ != 2 && version_ != 3) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: unsupported GGUF version %d (supported: 2, 3)", path_, version_));
  }
  ASSIGN_OR_RETURN(uint64_t n_tensors, c.Read<uint64_t>("tensor count"));
  ASSIGN_OR_RETURN(uint64_t n_kv, c.Read<uint64_t>("metadata kv count"));
  if (n_kv > c.remaining() / kMinKvBytes) {
    return absl::DataLossError(
        absl::StrFormat("%s: metadata kv count %d cannot fit in the %d bytes remaining", path_,
                        n_kv, c.remaining()));
  }
  if (n_tensors > c.remaining() / kMinTensorInfoBytes) {
    return absl::DataLossError(
        absl::StrFormat("%s: tensor count %d cannot fit in the %d bytes remaining", path_,
                        n_tensors, c.remaining()));
  }

  kv_.reserve(static_cast<size_t>(n_kv));
  // Duplicates are found in a hash set, not with Find (a linear scan): a
  // crafted header of 80k keys (1.7 MB) took minutes to parse that way.
  std::unordered_set<std::string> keys;
  for (uint64_t k = 0; k < n_kv; ++k) {
    ASSIGN_OR_RETURN(std::string key, c.ReadString(absl::StrFormat("metadata key #%d", k)));
    if (!keys.insert(key).second) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: metadata key '%s' appears twice", path_, key));
    }
    GgufValue value;
    RETURN_IF_ERROR(ReadValue(c, key, path_, value));
    kv_.emplace_back(std::move(key), std::move(value));
  }

  if (const GgufValue* a = Find("general.alignment"); a != nullptr) {
    if (!IsInteger(a->type) || a->type == GgufValueType::kBool) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: general.alignment has type %s, expected an integer", path_, TypeName(a->type)));
    }
    if (a->i <= 0 || (a->i & (a->i - 1)) != 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: general.alignment %d is not a nonzero power of two", path_, a->i));
    }
    alignment_ = static_cast<uint64_t>(a->i);
  } else {
    alignment_ = kDefaultAlignment;
  }

  if (n_tensors > c.remaining() / kMinTensorInfoBytes) {
    return absl::DataLossError(
        absl::StrFormat("%s: tensor count %d cannot fit in the %d bytes remaining", path_,
                        n_tensors, c.remaining()));
  }
  tensors_.reserve(static_cast<size_t>(n_tensors));
  std::unordered_set<std::string> names;  // as `keys` above
  for (uint64_t t = 0; t < n_tensors; ++t) {
    GgufTensorInfo info;
    ASSIGN_OR_RETURN(info.name, c.ReadString(absl::StrFormat("tensor info #%d name", t)));
    const std::string what = absl::StrFormat("tensor '%s'", info.name);
    if (!names.insert(info.name).second) {
      return absl::InvalidArgumentError(absl::StrFormat("%s: %s appears twice", path_, what));
    }
    ASSIGN_OR_RETURN(uint32_t n_dims, c.Read<uint32_t>(what + " n_dims"));
    if (n_dims == 0 || n_dims > kMaxDims) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: %s: n_dims %d is outside [1, %d]", path_, what, n_dims, kMaxDims));
    }
    uint64_t n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      ASSIGN_OR_RETURN(uint64_t ne, c.Read<uint64_t>(what + " dims"));
      if (ne == 0 || ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: %s: dimension %d is %d, must be positive", path_, what, d, ne));
      }
      if (n_elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / ne) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: %s: product of dimensions overflows int64 at dimension %d", path_, what, d));
      }
      n_elements *= ne;
      info.ne.push_back(static_cast<int64_t>(ne));
    }
    ASSIGN_OR_RETURN(uint32_t raw_type, c.Read<uint32_t>(what + " type"));
    auto traits = TraitsOf(raw_type);
    if (!traits.ok()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: %s: %s", path_, what, traits.status().message()));
    }
    info.type = static_cast<GgmlType>(raw_type);
    if (info.ne[0] % traits->block_elems != 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: %s: row length %d is not a multiple of the %s block size %d", path_,
                          what, info.ne[0], traits->name, traits->block_elems));
    }
    const uint64_t n_blocks = n_elements / static_cast<uint64_t>(traits->block_elems);
    const uint64_t block_bytes = static_cast<uint64_t>(traits->block_bytes);
    if (n_blocks > std::numeric_limits<uint64_t>::max() / block_bytes) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: %s: byte size overflows", path_, what));
    }
    info.n_elements = n_elements;
    info.n_bytes = n_blocks * block_bytes;
    ASSIGN_OR_RETURN(info.offset, c.Read<uint64_t>(what + " offset"));
    if (info.offset % alignment_ != 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: %s: data offset %d is not a multiple of the alignment %d", path_,
                          what, info.offset, alignment_));
    }
    tensors_.push_back(std::move(info));
  }

  // The data section starts at the next multiple of the alignment.
  const uint64_t pos = c.pos();
  data_offset_ = pos + (alignment_ - pos % alignment_) % alignment_;
  if (!tensors_.empty() && data_offset_ > size_) {
    return absl::DataLossError(
        absl::StrFormat("%s: tensor data section starts at %d, past end of file (size %d)", path_,
                        data_offset_, size_));
  }
  for (const GgufTensorInfo& t : tensors_) {
    const uint64_t section = size_ - data_offset_;
    if (t.offset > section || t.n_bytes > section - t.offset) {
      return absl::DataLossError(absl::StrFormat(
          "%s: tensor '%s': data [offset %d (section start %d + %d), %d bytes] extends past end "
          "of file (size %d)",
          path_, t.name, data_offset_ + std::min<uint64_t>(t.offset, section), data_offset_,
          t.offset, t.n_bytes, size_));
    }
  }
  return absl::OkStatus();
}

const GgufValue* GgufFile::Find(std::string_view key) const {
  for (const auto& [k, v] : kv_) {
    if (k == key) return &v;
  }
  return nullptr;
}

namespace {

absl::Status TypeMismatch(const std::string& path, std::string_view key, const GgufValue& v,
                          std::string_view expected) {
  std::string got(TypeName(v.type));
  if (v.type == GgufValueType::kArray) got += absl::StrFormat(" of %s", TypeName(v.array_type));
  return absl::InvalidArgumentError(
      absl::StrFormat("%s: metadata key '%s' has type %s, expected %s", path, key, got, expected));
}

absl::Status KeyNotFound(const std::string& path, std::string_view key) {
  return absl::NotFoundError(absl::StrFormat("%s: metadata key '%s' not found", path, key));
}

}  // namespace

absl::StatusOr<int64_t> GgufFile::GetInt(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return KeyNotFound(path_, key);
  if (!IsInteger(v->type)) return TypeMismatch(path_, key, *v, "an integer");
  return v->i;
}

absl::StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return KeyNotFound(path_, key);
  if (IsFloat(v->type)) return v->f;
  if (IsInteger(v->type) && v->type != GgufValueType::kBool) return static_cast<double>(v->i);
  return TypeMismatch(path_, key, *v, "a number");
}

absl::StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return KeyNotFound(path_, key);
  if (v->type != GgufValueType::kString) return TypeMismatch(path_, key, *v, "a string");
  return v->s;
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return KeyNotFound(path_, key);
  if (v->type != GgufValueType::kArray || v->array_type != GgufValueType::kString) {
    return TypeMismatch(path_, key, *v, "an array of string");
  }
  return v->strings;
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return KeyNotFound(path_, key);
  if (v->type != GgufValueType::kArray || !IsInteger(v->array_type)) {
    return TypeMismatch(path_, key, *v, "an array of integers");
  }
  return v->ints;
}

absl::StatusOr<std::vector<double>> GgufFile::GetFloatArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return KeyNotFound(path_, key);
  if (v->type == GgufValueType::kArray && IsFloat(v->array_type)) return v->floats;
  if (v->type == GgufValueType::kArray && IsInteger(v->array_type)) {
    return std::vector<double>(v->ints.begin(), v->ints.end());
  }
  return TypeMismatch(path_, key, *v, "an array of numbers");
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  for (const GgufTensorInfo& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

absl::Span<const uint8_t> GgufFile::TensorBytes(const GgufTensorInfo& t) const {
  return {data_ + data_offset_ + t.offset, static_cast<size_t>(t.n_bytes)};
}

absl::StatusOr<std::vector<float>> GgufFile::DequantizeTensor(std::string_view name) const {
  const GgufTensorInfo* t = FindTensor(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrFormat("%s: tensor '%s' not found", path_, name));
  }
  ASSIGN_OR_RETURN(GgmlTypeTraits traits, TraitsOf(static_cast<uint32_t>(t->type)));
  // The float32 copy is the one large allocation of a load: when the host
  // refuses it (RLIMIT_AS, overcommit off; a cgroup limit kills instead) the
  // caller gets an error naming the tensor, not std::bad_alloc (std::terminate).
  std::vector<float> out;
  try {
    out.resize(static_cast<size_t>(t->n_elements));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "%s: tensor '%s': host memory exhausted: cannot allocate %d bytes for its %d values as float32",
        path_, name, t->n_elements * sizeof(float), t->n_elements));
  }
  const absl::Span<const uint8_t> src = TensorBytes(*t);
  const int64_t n_blocks = static_cast<int64_t>(t->n_elements) / traits.block_elems;

  // Dequantization is memory-bound but still ~1 ns/element on one core;
  // splitting large tensors over a few threads makes a full model load
  // several times faster. Small tensors are not worth a thread start.
  constexpr int64_t kMinElementsPerThread = int64_t{1} << 20;
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t n_threads = std::clamp<int64_t>(
      static_cast<int64_t>(t->n_elements) / kMinElementsPerThread, 1, std::min<int64_t>(hw, 8));
  const int64_t blocks_per_thread = (n_blocks + n_threads - 1) / n_threads;

  std::vector<absl::Status> statuses(static_cast<size_t>(n_threads));
  auto work = [&](int64_t i) {
    const int64_t b0 = i * blocks_per_thread;
    const int64_t b1 = std::min(n_blocks, b0 + blocks_per_thread);
    if (b0 >= b1) return;
    statuses[static_cast<size_t>(i)] =
        Dequantize(t->type, src.data() + b0 * traits.block_bytes,
                   static_cast<size_t>((b1 - b0) * traits.block_bytes),
                   out.data() + b0 * traits.block_elems, (b1 - b0) * traits.block_elems);
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n_threads));
  for (int64_t i = 1; i < n_threads; ++i) {
    try {
      threads.emplace_back(work, i);
    } catch (const std::system_error&) {
      work(i);  // no thread to be had (its stack under RLIMIT_AS, RLIMIT_NPROC): this one does it
    }
  }
  work(0);
  for (std::thread& th : threads) th.join();
  for (const absl::Status& s : statuses) {
    if (!s.ok()) {
      return absl::Status(s.code(),
                          absl::StrFormat("%s: tensor '%s': %s", path_, name, s.message()));
    }
  }
  return out;
}

}  // namespace tailorkv::model
