#include "model/gguf_file.h"

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/gguf_test_util.h"

namespace tailorkv::model {
namespace {

using testing::ByteWriter;
using testing::GgufBuilder;
using ::testing::HasSubstr;
using testing::Patch;

constexpr uint32_t kF32 = static_cast<uint32_t>(GgmlType::kF32);
constexpr uint32_t kQ8_0 = static_cast<uint32_t>(GgmlType::kQ8_0);

std::vector<float> Iota(size_t n, float start, float step) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = start + step * static_cast<float>(i);
  return v;
}

// A small but complete file: every scalar type, arrays of each element kind,
// and three tensors of which the last ends exactly at end of file.
GgufBuilder ValidBuilder() {
  GgufBuilder b;
  ByteWriter scalars;
  auto raw_scalar = [](const std::string& key, GgufValueType t, auto v) {
    ByteWriter w;
    w.Str(key);
    w.Put<uint32_t>(static_cast<uint32_t>(t));
    w.Put(v);
    return w.bytes();
  };
  b.String("general.architecture", "llama")
      .RawKv(raw_scalar("t.u8", GgufValueType::kUint8, uint8_t{200}))
      .RawKv(raw_scalar("t.i8", GgufValueType::kInt8, int8_t{-7}))
      .RawKv(raw_scalar("t.u16", GgufValueType::kUint16, uint16_t{60000}))
      .RawKv(raw_scalar("t.i16", GgufValueType::kInt16, int16_t{-300}))
      .U32("t.u32", 4000000000u)
      .I32("t.i32", -123456)
      .F32("t.f32", 0.5f)
      .RawKv(raw_scalar("t.bool", GgufValueType::kBool, uint8_t{1}))
      .U64("t.u64", uint64_t{1} << 40)
      .RawKv(raw_scalar("t.i64", GgufValueType::kInt64, int64_t{-(int64_t{1} << 40)}))
      .RawKv(raw_scalar("t.f64", GgufValueType::kFloat64, 2.25))
      .StringArray("t.strings", {"a", "", "hello"})
      .I32Array("t.ints", {1, -2, 3})
      .F32Array("t.floats", {1.5f, -2.5f})
      .TensorF32("norm.weight", {5}, Iota(5, 1.0f, 1.0f))
      .TensorF32("mat.weight", {3, 2}, Iota(6, -1.0f, 0.5f));
  // Q8_0, one row of 32: d = 0.5 (f16 0x3800), q = -16..15.
  std::vector<uint8_t> q8 = {0x00, 0x38};
  for (int i = 0; i < 32; ++i) q8.push_back(static_cast<uint8_t>(static_cast<int8_t>(i - 16)));
  b.Tensor("q8.weight", {32, 1}, kQ8_0, q8);
  return b;
}

absl::StatusOr<std::unique_ptr<GgufFile>> Parse(std::vector<uint8_t> bytes) {
  return GgufFile::FromBytes("test.gguf", std::move(bytes));
}

TEST(GgufFileTest, ParsesEveryValueTypeAndTensor) {
  auto f = Parse(ValidBuilder().Build());
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(g.alignment(), 32u);
  EXPECT_EQ(*g.GetString("general.architecture"), "llama");
  EXPECT_EQ(*g.GetInt("t.u8"), 200);
  EXPECT_EQ(*g.GetInt("t.i8"), -7);
  EXPECT_EQ(*g.GetInt("t.u16"), 60000);
  EXPECT_EQ(*g.GetInt("t.i16"), -300);
  EXPECT_EQ(*g.GetInt("t.u32"), 4000000000LL);
  EXPECT_EQ(*g.GetInt("t.i32"), -123456);
  EXPECT_EQ(*g.GetFloat("t.f32"), 0.5);
  EXPECT_EQ(*g.GetInt("t.bool"), 1);
  EXPECT_EQ(*g.GetInt("t.u64"), int64_t{1} << 40);
  EXPECT_EQ(*g.GetInt("t.i64"), -(int64_t{1} << 40));
  EXPECT_EQ(*g.GetFloat("t.f64"), 2.25);
  EXPECT_EQ(*g.GetFloat("t.i32"), -123456.0);  // ints are accepted as floats
  EXPECT_THAT(*g.GetStringArray("t.strings"), ::testing::ElementsAre("a", "", "hello"));
  EXPECT_THAT(*g.GetIntArray("t.ints"), ::testing::ElementsAre(1, -2, 3));
  EXPECT_THAT(*g.GetFloatArray("t.floats"), ::testing::ElementsAre(1.5, -2.5));
  EXPECT_EQ(g.metadata().size(), 15u);

  ASSERT_EQ(g.tensors().size(), 3u);
  const GgufTensorInfo* mat = g.FindTensor("mat.weight");
  ASSERT_NE(mat, nullptr);
  EXPECT_EQ(mat->ne, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(mat->n_elements, 6u);
  EXPECT_EQ(mat->n_bytes, 24u);
  EXPECT_EQ(mat->offset % 32, 0u);
  EXPECT_EQ(g.FindTensor("missing"), nullptr);
  auto values = g.DequantizeTensor("mat.weight");
  ASSERT_TRUE(values.ok()) << values.status();
  EXPECT_EQ(*values, Iota(6, -1.0f, 0.5f));
  auto q8 = g.DequantizeTensor("q8.weight");
  ASSERT_TRUE(q8.ok()) << q8.status();
  EXPECT_EQ(*q8, Iota(32, -8.0f, 0.5f));
  EXPECT_EQ(g.TensorBytes(*g.FindTensor("q8.weight")).size(), 34u);
}

TEST(GgufFileTest, TypedGettersNameKeyOnMismatchAndNotFound) {
  auto f = Parse(ValidBuilder().Build());
  ASSERT_TRUE(f.ok()) << f.status();
  auto missing = (*f)->GetInt("nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("'nope'"));
  auto mismatch = (*f)->GetInt("general.architecture");
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(mismatch.status().message(), HasSubstr("general.architecture"));
  EXPECT_FALSE((*f)->GetString("t.u32").ok());
  EXPECT_FALSE((*f)->GetStringArray("t.ints").ok());
  EXPECT_FALSE((*f)->GetIntArray("t.strings").ok());
  EXPECT_EQ((*f)->DequantizeTensor("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST(GgufFileTest, AcceptsVersion2) {
  auto f = Parse(GgufBuilder(2).TensorF32("x", {3}, {1, 2, 3}).Build());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->version(), 2u);
}

TEST(GgufFileTest, HonoursCustomAlignment) {
  auto bytes = GgufBuilder()
                   .Alignment(64)
                   .U32("general.alignment", 64)
                   .TensorF32("a", {3}, {1, 2, 3})
                   .TensorF32("b", {2}, {4, 5})
                   .Build();
  auto f = Parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->alignment(), 64u);
  EXPECT_EQ((*f)->FindTensor("b")->offset, 64u);
  EXPECT_EQ(*(*f)->DequantizeTensor("b"), (std::vector<float>{4, 5}));
}

TEST(GgufFileTest, RejectsBadAlignment) {
  for (uint32_t a : {0u, 48u}) {
    auto f = Parse(GgufBuilder().U32("general.alignment", a).Build());
    ASSERT_FALSE(f.ok()) << a;
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(f.status().message(), HasSubstr("general.alignment"));
  }
}

TEST(GgufFileTest, RejectsEveryTruncation) {
  const std::vector<uint8_t> full = ValidBuilder().Build();
  ASSERT_TRUE(Parse(full).ok());
  for (size_t len = 0; len < full.size(); ++len) {
    auto f = Parse(std::vector<uint8_t>(full.begin(), full.begin() + len));
    ASSERT_FALSE(f.ok()) << "prefix of " << len << " of " << full.size() << " bytes parsed";
    EXPECT_THAT(f.status().message(), HasSubstr("test.gguf")) << len;
  }
}

TEST(GgufFileTest, RejectsBadMagic) {
  auto bytes = ValidBuilder().Build();
  bytes[0] = 'X';
  auto f = Parse(bytes);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(f.status().message(), HasSubstr("magic"));
}

TEST(GgufFileTest, RejectsUnsupportedVersion) {
  for (uint32_t v : {1u, 4u, 0x03000000u}) {
    auto f = Parse(GgufBuilder(v).Build());
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << v;
    EXPECT_THAT(f.status().message(), HasSubstr("version"));
  }
}

TEST(GgufFileTest, RejectsHugeKvCountWithoutAllocating) {
  auto bytes = ValidBuilder().Build();
  Patch<uint64_t>(bytes, testing::kKvCountPos, uint64_t{1} << 60);
  auto f = Parse(bytes);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(f.status().message(), HasSubstr("kv count"));
}

TEST(GgufFileTest, RejectsHugeTensorCount) {
  auto bytes = ValidBuilder().Build();
  Patch<uint64_t>(bytes, testing::kTensorCountPos, ~uint64_t{0});
  auto f = Parse(bytes);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(f.status().message(), HasSubstr("tensor count"));
}

TEST(GgufFileTest, RejectsHugeStringLength) {
  auto bytes = ValidBuilder().Build();
  Patch<uint64_t>(bytes, testing::kFirstKeyLengthPos, uint64_t{1} << 62);
  auto f = Parse(bytes);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(f.status().message(), HasSubstr("string length 4611686018427387904"));

  // The same inside a string value.
  ByteWriter w;
  w.Str("k");
  w.Put<uint32_t>(static_cast<uint32_t>(GgufValueType::kString));
  w.Put<uint64_t>(~uint64_t{0});
  auto g = Parse(GgufBuilder().RawKv(w.bytes()).Build());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(g.status().message(), HasSubstr("metadata key 'k'"));
}

TEST(GgufFileTest, RejectsHugeArrayCount) {
  for (GgufValueType elem :
       {GgufValueType::kUint8, GgufValueType::kString, GgufValueType::kFloat64}) {
    ByteWriter w;
    w.Str("arr");
    w.Put<uint32_t>(static_cast<uint32_t>(GgufValueType::kArray));
    w.Put<uint32_t>(static_cast<uint32_t>(elem));
    w.Put<uint64_t>(uint64_t{1} << 61);
    w.Put<uint64_t>(0);  // a few bytes that a count of 2^61 cannot fit in
    auto f = Parse(GgufBuilder().RawKv(w.bytes()).Build());
    EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(f.status().message(), HasSubstr("metadata key 'arr'"));
  }
}

TEST(GgufFileTest, RejectsArrayOfArrays) {
  ByteWriter w;
  w.Str("nested");
  w.Put<uint32_t>(static_cast<uint32_t>(GgufValueType::kArray));
  w.Put<uint32_t>(static_cast<uint32_t>(GgufValueType::kArray));
  w.Put<uint64_t>(0);
  auto f = Parse(GgufBuilder().RawKv(w.bytes()).Build());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(f.status().message(), HasSubstr("arrays of arrays"));
}

TEST(GgufFileTest, RejectsUnknownValueTypeAndBadBool) {
  ByteWriter w;
  w.Str("k");
  w.Put<uint32_t>(13);
  w.Put<uint64_t>(0);
  EXPECT_EQ(Parse(GgufBuilder().RawKv(w.bytes()).Build()).status().code(),
            absl::StatusCode::kInvalidArgument);
  ByteWriter b;
  b.Str("flag");
  b.Put<uint32_t>(static_cast<uint32_t>(GgufValueType::kBool));
  b.Put<uint8_t>(2);
  EXPECT_EQ(Parse(GgufBuilder().RawKv(b.bytes()).Build()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GgufFileTest, RejectsDuplicateKeysAndTensors) {
  EXPECT_FALSE(Parse(GgufBuilder().U32("a", 1).U32("a", 2).Build()).ok());
  EXPECT_FALSE(Parse(GgufBuilder().TensorF32("t", {1}, {1}).TensorF32("t", {1}, {2}).Build()).ok());
}

// Found with tests/fuzz (a crafted header for the GGUF target): duplicate
// keys and tensor names were looked up with a linear scan per entry, so
// parsing was quadratic; 80k one-byte keys (1.7 MB) ran over 20 s, and the
// 300k here for minutes. Linear now: well under a second even unoptimized.
TEST(GgufFileTest, ManyKeysAndTensorsParseInLinearTime) {
  constexpr int kKeys = 300000, kTensors = 100000;
  GgufBuilder b;
  for (int i = 0; i < kKeys; ++i) {
    ByteWriter w;
    w.Str("k" + std::to_string(i));
    w.Put<uint32_t>(static_cast<uint32_t>(GgufValueType::kUint8));
    w.Put<uint8_t>(1);
    b.RawKv(w.bytes());
  }
  // One tensor's data, the others' offsets pointing at it.
  b.TensorF32("t0", {1}, {1.0f});
  for (int i = 1; i < kTensors; ++i) b.Tensor("t" + std::to_string(i), {1}, kF32, {}, 0);
  const std::vector<uint8_t> bytes = b.Build();
  const auto start = std::chrono::steady_clock::now();
  auto f = Parse(bytes);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->metadata().size(), static_cast<size_t>(kKeys));
  EXPECT_EQ((*f)->tensors().size(), static_cast<size_t>(kTensors));
  EXPECT_LT(seconds, 10.0);
}

TEST(GgufFileTest, RejectsTensorPastEndOfFile) {
  auto f = Parse(GgufBuilder()
                     .TensorF32("blk.0.attn_q.weight", {4}, {1, 2, 3, 4})
                     .Tensor("blk.0.attn_k.weight", {1024}, kF32, {}, /*offset=*/4096)
                     .Build());
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(f.status().message(), HasSubstr("test.gguf: tensor 'blk.0.attn_k.weight': data"));
  EXPECT_THAT(f.status().message(), HasSubstr("4096 bytes] extends past end of file"));
  // An offset near 2^64 must not wrap around.
  auto g = Parse(GgufBuilder().Tensor("w", {8}, kF32, {}, ~uint64_t{0} - 31).Build());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kDataLoss);
}

TEST(GgufFileTest, RejectsUnalignedOffset) {
  auto f = Parse(GgufBuilder().Tensor("w", {1}, kF32, {}, /*offset=*/4).Build());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(f.status().message(), HasSubstr("tensor 'w': data offset 4 is not a multiple"));
}

TEST(GgufFileTest, RejectsUnknownTensorType) {
  auto f = Parse(GgufBuilder().Tensor("w", {32}, 99, std::vector<uint8_t>(128)).Build());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(f.status().message(), HasSubstr("tensor 'w'"));
  EXPECT_THAT(f.status().message(), HasSubstr("type id 99"));
  // Known to ggml but not supported here (Q5_K = 13).
  EXPECT_FALSE(Parse(GgufBuilder().Tensor("w", {256}, 13, std::vector<uint8_t>(176)).Build()).ok());
}

TEST(GgufFileTest, RejectsDimensionProductOverflow) {
  auto f =
      Parse(GgufBuilder().Tensor("w", {uint64_t{1} << 32, uint64_t{1} << 32}, kF32, {}, 0).Build());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(f.status().message(), HasSubstr("overflows"));
  // A product that fits in int64 but whose byte size does not fit the file.
  auto g =
      Parse(GgufBuilder().Tensor("w", {uint64_t{1} << 31, uint64_t{1} << 30}, kF32, {}, 0).Build());
  EXPECT_FALSE(g.ok());
}

TEST(GgufFileTest, RejectsZeroOrTooManyDims) {
  EXPECT_FALSE(Parse(GgufBuilder().Tensor("w", {4, 0}, kF32, {}, 0).Build()).ok());
  EXPECT_FALSE(Parse(GgufBuilder().Tensor("w", {}, kF32, {}, 0).Build()).ok());
  EXPECT_FALSE(Parse(GgufBuilder().Tensor("w", {1, 1, 1, 1, 1}, kF32, {0, 0, 0, 0}).Build()).ok());
}

TEST(GgufFileTest, RejectsRowNotMultipleOfBlock) {
  auto f = Parse(GgufBuilder().Tensor("w", {48, 1}, kQ8_0, std::vector<uint8_t>(68)).Build());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(f.status().message(), HasSubstr("block size"));
}

// Limits this process's address space to what is mapped plus 8 MiB,
// dequantizes `name`, prints the status on stderr and exits: 0 when it was
// ResourceExhausted (for EXPECT_EXIT).
[[noreturn]] void DequantizeUnderTightAddressSpace(const GgufFile& f, const std::string& name) {
  std::ifstream status("/proc/self/status");
  uint64_t vm_kb = 0;
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmSize:", 0) == 0) vm_kb = std::strtoull(line.c_str() + 7, nullptr, 10);
  }
  rlimit limit{};
  limit.rlim_cur = limit.rlim_max = (vm_kb << 10) + (8 << 20);
  if (vm_kb == 0 || ::setrlimit(RLIMIT_AS, &limit) != 0) std::_Exit(3);
  auto values = f.DequantizeTensor(name);
  std::fprintf(stderr, "%s\n", values.status().ToString().c_str());
  std::_Exit(values.status().code() == absl::StatusCode::kResourceExhausted ? 0 : 1);
}

// The float32 copy of a tensor that the address space cannot hold is
// ResourceExhausted naming the tensor: it was std::bad_alloc, which ended a
// float load of the 8B shape under a 20 GiB RLIMIT_AS in std::terminate
// (docs/results.md, "Loading an 8B-shape Q4 file"). In a child process whose
// address space is limited to what is mapped plus 8 MiB.
TEST(GgufFileTest, DequantizeBeyondTheAddressSpaceIsResourceExhausted) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizers' shadow memory needs more address space than RLIMIT_AS leaves";
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
  GTEST_SKIP() << "the sanitizers' shadow memory needs more address space than RLIMIT_AS leaves";
#endif
#endif
  // Q8_0 [65536 x 4096]: 285 MB of blocks in a sparse file (never read:
  // the allocation fails first), 1 GiB as float32.
  const std::string path =
      ::testing::TempDir() + "/gguf_file_test_big_" + std::to_string(::getpid()) + ".gguf";
  const uint64_t cols = 4096, rows = 65536;
  {
    const auto bytes = GgufBuilder().Tensor("big.weight", {cols, rows}, kQ8_0, {}, /*offset=*/0).Build();
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  std::filesystem::resize_file(path, std::filesystem::file_size(path) + rows * cols / 32 * 34);
  auto f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EXIT(DequantizeUnderTightAddressSpace(**f, "big.weight"), ::testing::ExitedWithCode(0),
              "RESOURCE_EXHAUSTED: .*gguf_file_test_big_[0-9]+.gguf: tensor 'big.weight': "
              "host memory exhausted: cannot allocate 1073741824 bytes for its 268435456 values as float32");
  f->reset();
  std::filesystem::remove(path);
}

TEST(GgufFileTest, OpenMapsFileAndReportsMissingFile) {
  const std::string dir = ::testing::TempDir();
  const std::string path = dir + "/gguf_file_test_" + std::to_string(::getpid()) + ".gguf";
  {
    const auto bytes = ValidBuilder().Build();
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
  }
  {
    auto f = GgufFile::Open(path);
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ((*f)->path(), path);
    EXPECT_EQ(*(*f)->DequantizeTensor("norm.weight"), Iota(5, 1.0f, 1.0f));
  }
  std::filesystem::remove(path);
  auto missing = GgufFile::Open(path);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr(path));
}

}  // namespace
}  // namespace tailorkv::model
