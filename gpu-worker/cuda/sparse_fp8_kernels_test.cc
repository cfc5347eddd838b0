// FP8 host tier kernels against runtime/fp8_reference.h, bit-exactly:
// - store: every one of the 65536 bf16 patterns (NaN, inf, subnormals,
//   saturating values) placed in K and in V, on the 16-byte (head_dim % 16
//   == 0) and 8-byte (head_dim % 16 == 8) paths; odd shapes with random
//   bits; untouched host rows keep their poison;
// - load and gather: fp8 codes -> bf16 against Fp8E4M3ToBf16Bits (all 256
//   codes appear), -1 / out-of-range / duplicate indices, poisoned
//   destinations, mapped host memory and device memory;
// - gather captured in a CUDA graph, replayed with new device-side indices;
// - the channel index from fp8 rows (and a bad channel giving NaN);
// - bad arguments name the field (no device needed).
#include "cuda/sparse_fp8_kernels.cuh"
#include "cuda/sparse_kernels.cuh"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/test_host_mapped.h"
#include "cuda/test_rng.h"
#include "runtime/fp8_reference.h"
#include "runtime/sparse_reference.h"

namespace tailorkv::cuda {
namespace {

using runtime::Bf16BitsToFp8E4M3;
using runtime::Fp8E4M3ToBf16Bits;
using test_util::RandomPool;
using test_util::Rng;
using Bits = std::vector<uint16_t>;  // bf16 bit patterns
using Bytes = std::vector<uint8_t>;  // fp8 codes

constexpr uint16_t kPoison = 0xDEAD;  // bf16 ~ -6e18: no fp8 value decodes to it
constexpr uint8_t kPoison8 = 0xA5;

class SparseFp8KernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

using test_util::HostMapped;

// Random bf16: mostly moderate values, some in fp8's subnormal range, some
// past 448, some arbitrary bit patterns (NaN, inf, float subnormals).
uint16_t RandBf16(Rng& rng) {
  const float sel = rng.Uniform(0.0f, 1.0f);
  float f;
  if (sel < 0.15f) {
    return static_cast<uint16_t>(rng.Uniform(0.0f, 65536.0f));
  } else if (sel < 0.3f) {
    f = rng.Uniform(-0.02f, 0.02f);
  } else if (sel < 0.4f) {
    f = rng.Uniform(-1000.0f, 1000.0f);
  } else {
    f = rng.Uniform(-8.0f, 8.0f);
  }
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>(b >> 16);
}

Bits RandBits(size_t n, Rng& rng) {
  Bits b(n);
  for (auto& x : b) x = RandBf16(rng);
  return b;
}

Bytes RandCodes(size_t n, Rng& rng) {
  Bytes b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng.Uniform(0.0f, 256.0f));
  return b;
}

template <typename T>
absl::StatusOr<DeviceBuffer> Upload(const std::vector<T>& h) {
  absl::StatusOr<DeviceBuffer> d = DeviceBuffer::Allocate(std::max<size_t>(h.size() * sizeof(T), 16));
  if (!d.ok()) return d.status();
  CUDA_RETURN_IF_ERROR(cudaMemcpy(d->get(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
std::vector<T> Download(const DeviceBuffer& d, size_t n) {
  std::vector<T> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), d.get(), n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

__nv_bfloat16* Bf(const DeviceBuffer& d) { return d.as<__nv_bfloat16>(); }

template <typename T>
void ExpectSame(const T* got, const T* want, size_t n, const std::string& what) {
  size_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i < n; ++i) {
    if (got[i] != want[i]) {
      if (bad < 5) {
        first << " [" << i << "] got 0x" << std::hex << static_cast<uint64_t>(got[i]) << " want 0x"
              << static_cast<uint64_t>(want[i]) << std::dec;
      }
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << n << " elements differ:" << first.str();
}

// ---------------------------------------------------------------- host rows

struct RowsCase {
  int n_kv, head_dim, cap, first, n;
  int64_t host_rows;
};

std::string Name(const RowsCase& c) {
  std::ostringstream s;
  s << "n_kv=" << c.n_kv << " hd=" << c.head_dim << " cap=" << c.cap << " first=" << c.first
    << " n=" << c.n << " host_rows=" << c.host_rows;
  return s.str();
}

// Stores k / v (given, or random when empty) and compares the host bytes.
void CheckStore(const RowsCase& c, Bits k, Bits v, int64_t hs, uint64_t seed) {
  SCOPED_TRACE(Name(c));
  Rng rng(seed);
  const int hd = c.head_dim;
  if (k.empty()) k = RandBits(static_cast<size_t>(c.n_kv) * hs, rng);
  if (v.empty()) v = RandBits(k.size(), rng);
  const size_t host_bytes = static_cast<size_t>(c.n_kv) * c.host_rows * 2 * hd;
  HostMapped host(host_bytes);
  ASSERT_NE(host.host, nullptr);
  ASSERT_NE(host.device<uint8_t>(), nullptr);
  std::fill(host.bytes(), host.bytes() + host_bytes, kPoison8);
  absl::StatusOr<DeviceBuffer> dk = Upload(k), dv = Upload(v);
  ASSERT_TRUE(dk.ok() && dv.ok());
  absl::Status st = LaunchStoreHostRowsFp8(Bf(*dk), Bf(*dv), hs, c.first, c.n, c.n_kv, hd,
                                           host.device<uint8_t>(), c.host_rows, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Bytes want(host_bytes, kPoison8);
  for (int h = 0; h < c.n_kv; ++h) {
    for (int i = 0; i < c.n; ++i) {
      const int64_t r = c.first + i;
      for (int e = 0; e < hd; ++e) {
        want[(h * c.host_rows + r) * 2 * hd + e] = Bf16BitsToFp8E4M3(k[h * hs + r * hd + e]);
        want[(h * c.host_rows + r) * 2 * hd + hd + e] = Bf16BitsToFp8E4M3(v[h * hs + r * hd + e]);
      }
    }
  }
  ExpectSame(host.bytes(), want.data(), host_bytes, "host rows");
}

// All 65536 bf16 patterns in K (in order) and in V (a different order), on
// both chunk paths; rows outside [first, first + n) hold the remaining
// patterns' duplicates and must not be stored.
TEST_F(SparseFp8KernelsTest, StoreHostRowsAllBf16PatternsBitExact) {
  for (int hd : {128, 72}) {
    SCOPED_TRACE(hd);
    const int n_kv = 2;
    const int rows_needed = (65536 + n_kv * hd - 1) / (n_kv * hd);  // rows per head to hold all
    const int first = 3, cap = first + rows_needed + 2;
    const int64_t hs = static_cast<int64_t>(cap) * hd;
    Bits k(static_cast<size_t>(n_kv) * hs), v(k.size());
    size_t at = 0;
    for (int h = 0; h < n_kv; ++h) {
      for (int64_t e = 0; e < hs; ++e) {
        const int64_t r = e / hd;
        const bool inside = r >= first && r < first + rows_needed;
        const uint32_t pat = inside ? static_cast<uint32_t>(at++ % 65536) : static_cast<uint32_t>(e * 977);
        k[h * hs + e] = static_cast<uint16_t>(pat);
        v[h * hs + e] = static_cast<uint16_t>((pat * 40503u + 12345u) & 0xFFFFu);  // odd multiplier: a permutation
      }
    }
    ASSERT_GE(at, 65536u);
    CheckStore({n_kv, hd, cap, first, rows_needed, cap + 1}, k, v, hs, 1);
  }
}

const std::vector<RowsCase>& RowsCases() {
  static const std::vector<RowsCase> cases = {
      {3, 64, 37, 5, 29, 41},  {3, 128, 37, 0, 37, 37}, {3, 128, 40, 13, 1, 50},
      {1, 8, 9, 2, 7, 9},      {2, 72, 33, 1, 31, 35},  {3, 64, 20, 7, 13, 21},
      {8, 128, 8200, 3, 8193, 8201},  // a prefill chunk: several grid-stride steps
  };
  return cases;
}

TEST_F(SparseFp8KernelsTest, StoreHostRowsBitExact) {
  uint64_t seed = 10;
  for (const RowsCase& c : RowsCases()) {
    const int64_t hs = static_cast<int64_t>(c.cap + 3) * c.head_dim;  // heads not back to back
    CheckStore(c, {}, {}, hs, seed++);
  }
}

void CheckLoad(const RowsCase& c, uint64_t seed) {
  SCOPED_TRACE(Name(c));
  Rng rng(seed);
  const int hd = c.head_dim;
  const int64_t hs = static_cast<int64_t>(c.cap + 5) * hd;
  const size_t host_bytes = static_cast<size_t>(c.n_kv) * c.host_rows * 2 * hd;
  HostMapped host(host_bytes);
  ASSERT_NE(host.host, nullptr);
  ASSERT_NE(host.device<uint8_t>(), nullptr);
  const Bytes codes = RandCodes(host_bytes, rng);
  std::copy(codes.begin(), codes.end(), host.bytes());
  for (size_t i = 0; i < std::min<size_t>(256, host_bytes); ++i) host.bytes()[i] = static_cast<uint8_t>(i);
  const Bits poison(static_cast<size_t>(c.n_kv) * hs, kPoison);
  absl::StatusOr<DeviceBuffer> dk = Upload(poison), dv = Upload(poison);
  ASSERT_TRUE(dk.ok() && dv.ok());
  absl::Status st = LaunchLoadHostRowsFp8(host.device<uint8_t>(), c.host_rows, c.first, c.n, c.n_kv, hd,
                                          Bf(*dk), Bf(*dv), hs, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Bits want_k = poison, want_v = poison;
  const uint8_t* hb = host.bytes();
  for (int h = 0; h < c.n_kv; ++h) {
    for (int i = 0; i < c.n; ++i) {
      const int64_t r = c.first + i;
      for (int e = 0; e < hd; ++e) {
        want_k[h * hs + r * hd + e] = Fp8E4M3ToBf16Bits(hb[(h * c.host_rows + r) * 2 * hd + e]);
        want_v[h * hs + r * hd + e] = Fp8E4M3ToBf16Bits(hb[(h * c.host_rows + r) * 2 * hd + hd + e]);
      }
    }
  }
  const Bits got_k = Download<uint16_t>(*dk, poison.size());
  const Bits got_v = Download<uint16_t>(*dv, poison.size());
  ExpectSame(got_k.data(), want_k.data(), want_k.size(), "k");
  ExpectSame(got_v.data(), want_v.data(), want_v.size(), "v");
}

TEST_F(SparseFp8KernelsTest, LoadHostRowsBitExact) {
  uint64_t seed = 100;
  for (const RowsCase& c : RowsCases()) CheckLoad(c, seed++);
  // Row 0 of head 0 holds every code (16-byte and 8-byte paths).
  CheckLoad({1, 128, 2, 0, 1, 1}, seed++);
  CheckLoad({1, 8, 17, 0, 16, 16}, seed++);
}

// Store then load: each element becomes bf16(fp8(x)), the reference's
// round trip; rows outside the range keep the poison.
TEST_F(SparseFp8KernelsTest, StoreThenLoadIsReferenceRoundTrip) {
  Rng rng(7);
  const int n_kv = 3, hd = 128, cap = 301, first = 17, n = 255;
  const int64_t hs = static_cast<int64_t>(cap) * hd, host_rows = cap;
  const Bits k = RandBits(static_cast<size_t>(n_kv) * hs, rng), v = RandBits(k.size(), rng);
  HostMapped host(static_cast<size_t>(n_kv) * host_rows * 2 * hd);
  ASSERT_NE(host.device<uint8_t>(), nullptr);
  absl::StatusOr<DeviceBuffer> dk = Upload(k), dv = Upload(v);
  const Bits poison(k.size(), kPoison);
  absl::StatusOr<DeviceBuffer> bk = Upload(poison), bv = Upload(poison);
  ASSERT_TRUE(dk.ok() && dv.ok() && bk.ok() && bv.ok());
  ASSERT_TRUE(LaunchStoreHostRowsFp8(Bf(*dk), Bf(*dv), hs, first, n, n_kv, hd, host.device<uint8_t>(), host_rows, nullptr).ok());
  ASSERT_TRUE(LaunchLoadHostRowsFp8(host.device<uint8_t>(), host_rows, first, n, n_kv, hd, Bf(*bk), Bf(*bv), hs, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const Bits got_k = Download<uint16_t>(*bk, k.size()), got_v = Download<uint16_t>(*bv, v.size());
  Bits want_k = poison, want_v = poison;
  for (int h = 0; h < n_kv; ++h) {
    for (int64_t e = static_cast<int64_t>(first) * hd; e < static_cast<int64_t>(first + n) * hd; ++e) {
      want_k[h * hs + e] = Fp8E4M3ToBf16Bits(Bf16BitsToFp8E4M3(k[h * hs + e]));
      want_v[h * hs + e] = Fp8E4M3ToBf16Bits(Bf16BitsToFp8E4M3(v[h * hs + e]));
    }
  }
  ExpectSame(got_k.data(), want_k.data(), k.size(), "k round trip");
  ExpectSame(got_v.data(), want_v.data(), v.size(), "v round trip");
}

// -------------------------------------------------------------- gather K/V

struct GatherCase {
  int n_kv, head_dim;
  int64_t host_rows, src_first;
  int count, dst_first;
  bool mapped;  // host tier in mapped host memory (else device memory)
};

void CheckGather(const GatherCase& c, uint64_t seed) {
  std::ostringstream name;
  name << "n_kv=" << c.n_kv << " hd=" << c.head_dim << " host_rows=" << c.host_rows
       << " src_first=" << c.src_first << " count=" << c.count << " dst_first=" << c.dst_first
       << (c.mapped ? " mapped" : " device");
  SCOPED_TRACE(name.str());
  Rng rng(seed);
  const int hd = c.head_dim;
  const size_t host_bytes = static_cast<size_t>(c.n_kv) * c.host_rows * 2 * hd;
  const Bytes codes = RandCodes(host_bytes, rng);
  HostMapped mapped(c.mapped ? host_bytes : 16);
  absl::StatusOr<DeviceBuffer> dev_host = Upload(c.mapped ? Bytes(16) : codes);
  ASSERT_TRUE(dev_host.ok());
  const uint8_t* host = nullptr;
  if (c.mapped) {
    ASSERT_NE(mapped.device<uint8_t>(), nullptr);
    std::copy(codes.begin(), codes.end(), mapped.bytes());
    host = mapped.device<uint8_t>();
  } else {
    host = dev_host->as<uint8_t>();
  }
  const int64_t valid = c.host_rows - c.src_first;
  std::vector<int32_t> idx(static_cast<size_t>(c.n_kv) * c.count);
  for (auto& i : idx) i = static_cast<int32_t>(std::floor(rng.Uniform(-1.0f, static_cast<float>(valid + 3))));
  for (int h = 0; h < c.n_kv && c.count >= 9; ++h) {
    int32_t* ih = idx.data() + static_cast<size_t>(h) * c.count;
    ih[0] = -1;
    ih[1] = ih[2] = ih[c.count / 2] = static_cast<int32_t>(valid / 2);  // duplicates
    ih[3] = static_cast<int32_t>(valid - 1);                            // the last valid row
    ih[4] = static_cast<int32_t>(valid);                                // the first invalid
    ih[5] = std::numeric_limits<int32_t>::max();
    ih[6] = std::numeric_limits<int32_t>::min();
    ih[7] = 0;
  }
  const int64_t dst_hs = static_cast<int64_t>(c.dst_first + c.count + 2) * hd + 8;
  const Bits poison(static_cast<size_t>(c.n_kv) * dst_hs, kPoison);
  absl::StatusOr<DeviceBuffer> d_idx = Upload(idx), dk = Upload(poison), dv = Upload(poison);
  ASSERT_TRUE(d_idx.ok() && dk.ok() && dv.ok());
  absl::Status st = LaunchGatherKvRowsFp8(host, c.host_rows, c.src_first, d_idx->as<int32_t>(), c.count,
                                          c.n_kv, hd, Bf(*dk), Bf(*dv), dst_hs, c.dst_first, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Bits want_k = poison, want_v = poison;
  int copied = 0;
  for (int h = 0; h < c.n_kv; ++h) {
    for (int i = 0; i < c.count; ++i) {
      const int32_t j = idx[static_cast<size_t>(h) * c.count + i];
      const int64_t p = static_cast<int64_t>(j) + c.src_first;
      if (j < 0 || p >= c.host_rows) continue;
      ++copied;
      const int64_t d = h * dst_hs + static_cast<int64_t>(c.dst_first + i) * hd;
      const int64_t s = (h * c.host_rows + p) * 2 * hd;
      for (int e = 0; e < hd; ++e) {
        want_k[d + e] = Fp8E4M3ToBf16Bits(codes[s + e]);
        want_v[d + e] = Fp8E4M3ToBf16Bits(codes[s + hd + e]);
      }
    }
  }
  ASSERT_GT(copied, 0);
  ASSERT_LT(copied, c.n_kv * c.count);  // some rows must stay untouched
  const Bits got_k = Download<uint16_t>(*dk, poison.size()), got_v = Download<uint16_t>(*dv, poison.size());
  ExpectSame(got_k.data(), want_k.data(), want_k.size(), "dst_k");
  ExpectSame(got_v.data(), want_v.data(), want_v.size(), "dst_v");
}

TEST_F(SparseFp8KernelsTest, GatherKvRowsBitExact) {
  const GatherCase cases[] = {
      {3, 64, 301, 7, 129, 3, true},
      {3, 128, 301, 0, 129, 0, true},
      {3, 128, 301, 11, 129, 5, false},
      {3, 72, 101, 1, 33, 2, true},    // 8-byte chunks
      {1, 8, 10, 2, 9, 1, true},
      {8, 128, 5000, 64, 2048, 5, true},    // decode-sized
      {8, 128, 20000, 3, 16385, 0, true},   // several grid-stride steps
  };
  uint64_t seed = 300;
  for (const GatherCase& c : cases) CheckGather(c, seed++);
}

// The decode step as the backend captures it: gather into the device tier
// after the sink rows; replayed with new device-side indices.
TEST_F(SparseFp8KernelsTest, GatherReplaysFromGraph) {
  const int n_kv = 3, hd = 128, prompt = 301, count = 33, sink = 4;
  const int dst_cap = sink + count + 3;
  Rng rng(600);
  const size_t host_bytes = static_cast<size_t>(n_kv) * prompt * 2 * hd;
  HostMapped host(host_bytes);
  ASSERT_NE(host.device<uint8_t>(), nullptr);
  const Bytes codes = RandCodes(host_bytes, rng);
  std::copy(codes.begin(), codes.end(), host.bytes());
  const int64_t dst_hs = static_cast<int64_t>(dst_cap) * hd;
  const Bits poison(static_cast<size_t>(n_kv) * dst_hs, kPoison);
  absl::StatusOr<DeviceBuffer> dk = Upload(poison), dv = Upload(poison);
  absl::StatusOr<DeviceBuffer> d_idx = Upload(std::vector<int32_t>(static_cast<size_t>(n_kv) * count, -1));
  absl::StatusOr<CudaStream> stream = CudaStream::Create();
  ASSERT_TRUE(dk.ok() && dv.ok() && d_idx.ok() && stream.ok());
  const cudaStream_t s = stream->get();
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  absl::Status g = LaunchGatherKvRowsFp8(host.device<uint8_t>(), prompt, 0, d_idx->as<int32_t>(), count, n_kv, hd,
                                         Bf(*dk), Bf(*dv), dst_hs, sink, s);
  absl::StatusOr<CudaGraphExec> graph = CudaGraphExec::EndCapture(s);
  ASSERT_TRUE(g.ok()) << g;
  ASSERT_TRUE(graph.ok()) << graph.status();

  for (int replay = 0; replay < 2; ++replay) {
    SCOPED_TRACE(replay);
    std::vector<int32_t> idx(static_cast<size_t>(n_kv) * count);
    for (auto& i : idx) i = static_cast<int32_t>(std::floor(rng.Uniform(0.0f, static_cast<float>(prompt))));
    for (int h = 0; h < n_kv; ++h) {
      idx[static_cast<size_t>(h) * count + count - 1] = -1;  // LaunchTopK's tail when k > n
      idx[static_cast<size_t>(h) * count + replay] = prompt - 1;
    }
    ASSERT_EQ(cudaMemcpyAsync(d_idx->get(), idx.data(), idx.size() * 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(dk->get(), poison.data(), poison.size() * 2, cudaMemcpyHostToDevice, s), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(dv->get(), poison.data(), poison.size() * 2, cudaMemcpyHostToDevice, s), cudaSuccess);
    ASSERT_TRUE(graph->Launch(s).ok());
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    Bits want_k = poison, want_v = poison;
    for (int h = 0; h < n_kv; ++h) {
      for (int i = 0; i < count; ++i) {
        const int32_t j = idx[static_cast<size_t>(h) * count + i];
        if (j < 0 || j >= prompt) continue;
        const int64_t d = h * dst_hs + static_cast<int64_t>(sink + i) * hd;
        const int64_t src = (static_cast<int64_t>(h) * prompt + j) * 2 * hd;
        for (int e = 0; e < hd; ++e) {
          want_k[d + e] = Fp8E4M3ToBf16Bits(codes[src + e]);
          want_v[d + e] = Fp8E4M3ToBf16Bits(codes[src + hd + e]);
        }
      }
    }
    const Bits got_k = Download<uint16_t>(*dk, poison.size()), got_v = Download<uint16_t>(*dv, poison.size());
    ExpectSame(got_k.data(), want_k.data(), want_k.size(), "dst_k");
    ExpectSame(got_v.data(), want_v.data(), want_v.size(), "dst_v");
  }
}

// ------------------------------------------------------------ channel index

// Per head, d distinct channels, ascending.
std::vector<int32_t> RandChans(int n_kv, int head_dim, int d, Rng& rng) {
  std::vector<int32_t> chans;
  for (int h = 0; h < n_kv; ++h) {
    std::vector<int32_t> all(head_dim);
    for (int c = 0; c < head_dim; ++c) all[c] = c;
    for (int c = head_dim - 1; c > 0; --c) {
      std::swap(all[c], all[static_cast<int>(rng.Uniform(0.0f, static_cast<float>(c + 1)))]);
    }
    std::sort(all.begin(), all.begin() + d);
    chans.insert(chans.end(), all.begin(), all.begin() + d);
  }
  return chans;
}

void CheckBuildIndex(int n_kv, int head_dim, int d, int64_t host_rows, int rows, int64_t index_rows,
                     bool bad_channel, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << n_kv << " head_dim=" << head_dim << " d=" << d
                                  << " rows=" << rows << (bad_channel ? " bad channel" : ""));
  Rng rng(seed);
  const size_t host_bytes = static_cast<size_t>(n_kv) * host_rows * 2 * head_dim;
  HostMapped host(host_bytes);
  ASSERT_NE(host.device<uint8_t>(), nullptr);
  const Bytes codes = RandCodes(host_bytes, rng);
  std::copy(codes.begin(), codes.end(), host.bytes());
  // Per head, d distinct channels (ascending, as LaunchChooseChannels writes).
  std::vector<int32_t> chans = RandChans(n_kv, head_dim, d, rng);
  if (bad_channel) {
    chans[0] = head_dim;
    chans.back() = -1;
  }
  absl::StatusOr<DeviceBuffer> d_chans = Upload(chans);
  const size_t index_elems = static_cast<size_t>(n_kv) * index_rows * d;
  absl::StatusOr<DeviceBuffer> d_index = Upload(Bits(index_elems, kPoison));
  ASSERT_TRUE(d_chans.ok() && d_index.ok());
  absl::Status st = LaunchBuildChannelIndexFp8(host.device<uint8_t>(), host_rows, rows, d_chans->as<int32_t>(), d,
                                               n_kv, head_dim, Bf(*d_index), index_rows, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Bits want(index_elems, kPoison);  // rows past `rows` stay untouched
  for (int h = 0; h < n_kv; ++h) {
    for (int p = 0; p < rows; ++p) {
      for (int j = 0; j < d; ++j) {
        const int c = chans[h * d + j];
        want[(static_cast<size_t>(h) * index_rows + p) * d + j] =
            (c >= 0 && c < head_dim)
                ? Fp8E4M3ToBf16Bits(codes[(static_cast<size_t>(h) * host_rows + p) * 2 * head_dim + c])
                : uint16_t{0x7FC0};
      }
    }
  }
  const Bits got = Download<uint16_t>(*d_index, index_elems);
  ExpectSame(got.data(), want.data(), index_elems, "index");
}

TEST_F(SparseFp8KernelsTest, BuildChannelIndexFromMappedFp8Rows) {
  uint64_t seed = 200;
  for (int head_dim : {64, 128}) {
    for (int d : {1, 7, 8, 32}) CheckBuildIndex(3, head_dim, d, 203, 131, 140, false, ++seed);
  }
  CheckBuildIndex(2, 128, 8, 64, 64, 64, false, 9);  // exactly one full tile
  CheckBuildIndex(1, 64, 5, 10, 1, 3, false, 10);    // a single row
  CheckBuildIndex(2, 128, 6, 100, 99, 100, true, 11);
}

// ------------------------------------------------------------ FP8 index


// FP8 index entries from bf16 host rows (every bf16 pattern class: the
// codes are Bf16BitsToFp8E4M3's) or from an fp8 tier (the codes as stored).
void CheckBuildFp8Index(int n_kv, int head_dim, int d, int64_t host_rows, int rows,
                        int64_t index_rows, bool from_fp8, bool bad_channel, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << n_kv << " head_dim=" << head_dim << " d=" << d
                                  << " rows=" << rows << (from_fp8 ? " fp8 host" : " bf16 host")
                                  << (bad_channel ? " bad channel" : ""));
  Rng rng(seed);
  const size_t host_elems = static_cast<size_t>(n_kv) * host_rows * 2 * head_dim;
  HostMapped host(host_elems * (from_fp8 ? 1 : 2));
  ASSERT_NE(host.device<uint8_t>(), nullptr);
  const Bytes codes = from_fp8 ? RandCodes(host_elems, rng) : Bytes();
  const Bits bits = from_fp8 ? Bits() : RandBits(host_elems, rng);
  if (from_fp8) {
    std::copy(codes.begin(), codes.end(), host.bytes());
  } else {
    std::memcpy(host.bytes(), bits.data(), host_elems * 2);
  }
  std::vector<int32_t> chans = RandChans(n_kv, head_dim, d, rng);
  if (bad_channel) {
    chans[0] = head_dim;
    chans.back() = -1;
  }
  absl::StatusOr<DeviceBuffer> d_chans = Upload(chans);
  const size_t index_elems = static_cast<size_t>(n_kv) * index_rows * d;
  absl::StatusOr<DeviceBuffer> d_index = Upload(Bytes(index_elems, kPoison8));
  ASSERT_TRUE(d_chans.ok() && d_index.ok());
  absl::Status st =
      from_fp8 ? LaunchBuildFp8ChannelIndexFromFp8(host.device<uint8_t>(), host_rows, rows, d_chans->as<int32_t>(),
                                                   d, n_kv, head_dim, d_index->as<uint8_t>(), index_rows, nullptr)
               : LaunchBuildFp8ChannelIndex(host.device<__nv_bfloat16>(), host_rows, rows, d_chans->as<int32_t>(),
                                            d, n_kv, head_dim, d_index->as<uint8_t>(), index_rows, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Bytes want(index_elems, kPoison8);  // rows past `rows` stay untouched
  for (int h = 0; h < n_kv; ++h) {
    for (int p = 0; p < rows; ++p) {
      for (int j = 0; j < d; ++j) {
        const int c = chans[h * d + j];
        const size_t at = (static_cast<size_t>(h) * host_rows + p) * 2 * head_dim + c;
        uint8_t code = 0x7F;  // NaN for a channel out of range
        if (c >= 0 && c < head_dim) code = from_fp8 ? codes[at] : Bf16BitsToFp8E4M3(bits[at]);
        want[(static_cast<size_t>(h) * index_rows + p) * d + j] = code;
      }
    }
  }
  const Bytes got = Download<uint8_t>(*d_index, index_elems);
  ExpectSame(got.data(), want.data(), index_elems, "index");
}

TEST_F(SparseFp8KernelsTest, BuildFp8ChannelIndexBitExact) {
  uint64_t seed = 700;
  for (bool from_fp8 : {false, true}) {
    for (int head_dim : {64, 128}) {
      for (int d : {1, 7, 16, 32, 64}) {
        CheckBuildFp8Index(3, head_dim, d, 203, 131, 140, from_fp8, false, ++seed);
      }
    }
    CheckBuildFp8Index(1, 64, 5, 10, 1, 3, from_fp8, false, ++seed);     // a single row
    CheckBuildFp8Index(2, 128, 6, 100, 99, 100, from_fp8, true, ++seed);  // NaN code for bad channels
  }
}

// Scores over an FP8 index are ScoreOnChannels over the decoded codes, bit
// for bit (fp32 products and sums in channel order); the 16-byte path (d a
// multiple of 16, aligned rows) and the byte path agree with it.
// pooled: the scores of a refine pool's positions (RandomPool) instead of
// [first, first + n).
void CheckScoreFp8Index(int n_kv, int d, int64_t index_rows, int first, int n, bool misalign,
                        uint64_t seed, bool pooled = false) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << n_kv << " d=" << d << " first=" << first << " n=" << n
                                  << (misalign ? " misaligned" : "") << (pooled ? " pooled" : ""));
  Rng rng(seed);
  const size_t elems = static_cast<size_t>(n_kv) * index_rows * d;
  Bytes buf = RandCodes(elems + 1, rng);
  for (uint8_t& b : buf) {
    if ((b & 0x7F) == 0x7F) b = static_cast<uint8_t>(b - 1);  // no NaN codes: their bits would not compare
  }
  const size_t off = misalign ? 1 : 0;
  std::vector<float> q(static_cast<size_t>(n_kv) * d);
  for (float& x : q) x = rng.Uniform(-3.0f, 3.0f);
  const int64_t stride = n + 5;
  const float poison = std::numeric_limits<float>::quiet_NaN();
  const std::vector<int32_t> pool =
      pooled ? RandomPool(n_kv, n, static_cast<int>(index_rows - first), rng) : std::vector<int32_t>();
  absl::StatusOr<DeviceBuffer> d_buf = Upload(buf), d_q = Upload(q),
                               d_scores = Upload(std::vector<float>(n_kv * stride, poison)),
                               d_pool = Upload(pooled ? pool : std::vector<int32_t>(1));
  ASSERT_TRUE(d_buf.ok() && d_q.ok() && d_scores.ok() && d_pool.ok());
  absl::Status st = LaunchScoreFp8ChannelIndex(d_q->as<float>(), d_buf->as<uint8_t>() + off, index_rows, d,
                                               n_kv, first, n, d_scores->as<float>(), stride, nullptr,
                                               pooled ? d_pool->as<int32_t>() : nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = Download<float>(*d_scores, n_kv * stride);
  std::vector<float> rows(static_cast<size_t>(n) * d), want(n);
  int bad = 0;
  for (int h = 0; h < n_kv; ++h) {
    for (int i = 0; i < n; ++i) {
      const int64_t p = first + (pooled ? pool[static_cast<size_t>(h) * n + i] : i);
      for (int j = 0; j < d; ++j) {
        rows[static_cast<size_t>(i) * d + j] =
            p < index_rows ? runtime::Fp8E4M3ToFloat(buf[off + (static_cast<size_t>(h) * index_rows + p) * d + j])
                           : 0.0f;
      }
    }
    runtime::ScoreOnChannels(q.data() + h * d, d, rows.data(), n, want.data());
    if (pooled) want[n - 1] = -INFINITY;  // RandomPool's out-of-range entry
    for (int64_t i = 0; i < stride; ++i) {
      const float g = got[h * stride + i];
      uint32_t gb, wb;
      std::memcpy(&gb, &g, 4);
      if (i < n) {
        std::memcpy(&wb, &want[i], 4);
        if (gb != wb && bad++ < 5) ADD_FAILURE() << "head " << h << " token " << i << ": " << g << " vs " << want[i];
      } else if (!std::isnan(g) && bad++ < 5) {
        ADD_FAILURE() << "head " << h << " sentinel " << i << " overwritten";
      }
    }
  }
}

TEST_F(SparseFp8KernelsTest, ScoreFp8ChannelIndexBitExact) {
  uint64_t seed = 800;
  for (int d : {1, 7, 16, 24, 32, 48, 64}) CheckScoreFp8Index(3, d, 1000, 37, 901, false, ++seed);
  CheckScoreFp8Index(3, 32, 300, 0, 300, true, ++seed);     // byte path for a vector width
  CheckScoreFp8Index(8, 32, 70001, 3, 69997, false, ++seed);  // many blocks
  CheckScoreFp8Index(1, 7, 5, 4, 1, false, ++seed);           // one token, the last row
  // Refine pools: scattered positions, both load paths.
  CheckScoreFp8Index(3, 32, 5000, 37, 300, false, ++seed, /*pooled=*/true);
  CheckScoreFp8Index(3, 7, 5000, 37, 300, false, ++seed, /*pooled=*/true);
  CheckScoreFp8Index(8, 64, 70001, 3, 3584, false, ++seed, /*pooled=*/true);
}

// The fused scoring + Top-K selects exactly what scoring into memory and
// LaunchTopK select (which runtime::TopKIndices checks on the same
// scores): ascending, -1 past min(k, n). `levels` > 0 draws codes from that
// many values only, so many scores tie (broken toward the smaller index).
void CheckScoreFp8TopK(int n_kv, int d, int64_t index_rows, int first, int n, int k, int levels,
                       uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << n_kv << " d=" << d << " first=" << first << " n=" << n
                                  << " k=" << k << " levels=" << levels);
  ASSERT_TRUE(ScoreFp8TopKApplies(n, k, d));
  Rng rng(seed);
  Bytes buf = RandCodes(static_cast<size_t>(n_kv) * index_rows * d, rng);
  for (uint8_t& b : buf) {
    if (levels > 0) b = static_cast<uint8_t>(0x30 + b % levels);
    if ((b & 0x7F) == 0x7F) b = static_cast<uint8_t>(b - 1);
  }
  std::vector<float> q(static_cast<size_t>(n_kv) * d);
  for (float& x : q) x = levels > 0 ? 1.0f : rng.Uniform(-3.0f, 3.0f);
  const size_t ws = TopKWorkspaceBytes(n_kv, n);
  absl::StatusOr<DeviceBuffer> d_buf = Upload(buf), d_q = Upload(q),
                               d_scores = Upload(std::vector<float>(static_cast<size_t>(n_kv) * n)),
                               d_want = Upload(std::vector<int32_t>(static_cast<size_t>(n_kv) * k, 777)),
                               d_got = Upload(std::vector<int32_t>(static_cast<size_t>(n_kv) * k, 777)),
                               d_ws = Upload(std::vector<uint8_t>(ws, 0xCD));
  ASSERT_TRUE(d_buf.ok() && d_q.ok() && d_scores.ok() && d_want.ok() && d_got.ok() && d_ws.ok());
  absl::Status st = LaunchScoreFp8ChannelIndex(d_q->as<float>(), d_buf->as<uint8_t>(), index_rows, d, n_kv,
                                               first, n, d_scores->as<float>(), n, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  st = LaunchTopK(d_scores->as<float>(), n, n_kv, n, nullptr, k, d_want->as<int32_t>(), d_ws->get(), ws,
                  nullptr);
  ASSERT_TRUE(st.ok()) << st;
  st = LaunchScoreFp8TopK(d_q->as<float>(), d_buf->as<uint8_t>(), index_rows, d, n_kv, first, n, k,
                          d_got->as<int32_t>(), d_ws->get(), ws, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto scores = Download<float>(*d_scores, static_cast<size_t>(n_kv) * n);
  const auto want = Download<int32_t>(*d_want, static_cast<size_t>(n_kv) * k);
  const auto got = Download<int32_t>(*d_got, static_cast<size_t>(n_kv) * k);
  std::vector<int32_t> ref(k);
  for (int h = 0; h < n_kv; ++h) {
    auto m = runtime::TopKIndices(scores.data() + static_cast<size_t>(h) * n, n, k, ref.data());
    ASSERT_TRUE(m.ok()) << m.status();
    std::sort(ref.begin(), ref.begin() + *m);
    for (int i = *m; i < k; ++i) ref[i] = -1;
    ASSERT_TRUE(std::equal(ref.begin(), ref.end(), want.begin() + static_cast<size_t>(h) * k))
        << "LaunchTopK against TopKIndices, head " << h;
  }
  EXPECT_EQ(got, want);
}

TEST_F(SparseFp8KernelsTest, ScoreFp8TopKSelectsAsScoresThenTopK) {
  uint64_t seed = 900;
  CheckScoreFp8TopK(8, 32, 131072, 64, 131072 - 128, 896, 0, ++seed);  // the 8B decode shape at 128k
  CheckScoreFp8TopK(8, 32, 32768, 64, 32768 - 128, 896, 0, ++seed);    // at 32k
  CheckScoreFp8TopK(3, 16, 5003, 7, 4991, 100, 0, ++seed);             // odd sizes
  CheckScoreFp8TopK(2, 64, 20000, 3, 19997, 1000, 0, ++seed);
  CheckScoreFp8TopK(3, 32, 700, 5, 600, 600, 0, ++seed);               // every candidate taken
  CheckScoreFp8TopK(2, 32, 40000, 1, 39999, 500, 3, ++seed);           // mostly ties
}

// ------------------------------------------------------------ bad arguments

void ExpectBad(const absl::Status& s, const std::string& want) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s << " (want '" << want << "')";
  EXPECT_NE(s.message().find(want), std::string::npos)
      << "message '" << s.message() << "' does not contain '" << want << "'";
}

// Every check runs before any CUDA call; the pointers are never dereferenced.
TEST(SparseFp8KernelsArgs, BadArgumentsNameTheField) {
  alignas(16) static uint16_t buf[64];
  auto* p = reinterpret_cast<__nv_bfloat16*>(buf);
  auto* odd = p + 1;
  auto* h8 = reinterpret_cast<uint8_t*>(buf);
  auto* h8odd = h8 + 8;  // 8-byte aligned only
  auto* idx = reinterpret_cast<int32_t*>(buf);
  const int64_t hs = 64 * 128;

  ExpectBad(LaunchStoreHostRowsFp8(p, p, hs, 0, 4, 0, 128, h8, 64, nullptr), "LaunchStoreHostRowsFp8: n_kv");
  ExpectBad(LaunchStoreHostRowsFp8(p, p, hs, 0, 4, 2, 12, h8, 64, nullptr), "LaunchStoreHostRowsFp8: head_dim");
  ExpectBad(LaunchStoreHostRowsFp8(p, p, hs, -1, 4, 2, 128, h8, 64, nullptr), "LaunchStoreHostRowsFp8: first");
  ExpectBad(LaunchStoreHostRowsFp8(p, p, hs, 0, -4, 2, 128, h8, 64, nullptr), "LaunchStoreHostRowsFp8: n =");
  ExpectBad(LaunchStoreHostRowsFp8(p, p, hs, 60, 5, 2, 128, h8, 100, nullptr), "LaunchStoreHostRowsFp8: head_stride");
  ExpectBad(LaunchStoreHostRowsFp8(p, p, hs, 60, 5, 2, 128, h8, 64, nullptr), "LaunchStoreHostRowsFp8: host_rows");
  ExpectBad(LaunchStoreHostRowsFp8(p, p, hs + 4, 0, 4, 2, 128, h8, 64, nullptr), "LaunchStoreHostRowsFp8: head_stride");
  ExpectBad(LaunchStoreHostRowsFp8(nullptr, p, hs, 0, 4, 2, 128, h8, 64, nullptr), "LaunchStoreHostRowsFp8: k is null");
  ExpectBad(LaunchStoreHostRowsFp8(p, nullptr, hs, 0, 4, 2, 128, h8, 64, nullptr), "LaunchStoreHostRowsFp8: v is null");
  ExpectBad(LaunchStoreHostRowsFp8(p, p, hs, 0, 4, 2, 128, nullptr, 64, nullptr), "LaunchStoreHostRowsFp8: host is null");
  ExpectBad(LaunchStoreHostRowsFp8(odd, p, hs, 0, 4, 2, 128, h8, 64, nullptr), "LaunchStoreHostRowsFp8: k is not 16-byte");
  ExpectBad(LaunchStoreHostRowsFp8(p, p, hs, 0, 4, 2, 128, h8odd, 64, nullptr), "LaunchStoreHostRowsFp8: host is not 16-byte");
  EXPECT_TRUE(LaunchStoreHostRowsFp8(nullptr, nullptr, hs, 3, 0, 2, 128, nullptr, 64, nullptr).ok());

  ExpectBad(LaunchLoadHostRowsFp8(h8, 64, 0, 4, 2, 100, p, p, hs, nullptr), "LaunchLoadHostRowsFp8: head_dim");
  ExpectBad(LaunchLoadHostRowsFp8(h8, 3, 0, 4, 2, 128, p, p, hs, nullptr), "LaunchLoadHostRowsFp8: host_rows");
  ExpectBad(LaunchLoadHostRowsFp8(h8, 64, 0, 4, 2, 128, p, p, 128, nullptr), "LaunchLoadHostRowsFp8: head_stride");
  ExpectBad(LaunchLoadHostRowsFp8(nullptr, 64, 0, 4, 2, 128, p, p, hs, nullptr), "LaunchLoadHostRowsFp8: host is null");
  ExpectBad(LaunchLoadHostRowsFp8(h8odd, 64, 0, 4, 2, 128, p, p, hs, nullptr), "LaunchLoadHostRowsFp8: host is not 16-byte");
  ExpectBad(LaunchLoadHostRowsFp8(h8, 64, 0, 4, 2, 128, nullptr, p, hs, nullptr), "LaunchLoadHostRowsFp8: k is null");
  ExpectBad(LaunchLoadHostRowsFp8(h8, 64, 0, 4, 2, 128, p, odd, hs, nullptr), "LaunchLoadHostRowsFp8: v is not 16-byte");
  EXPECT_TRUE(LaunchLoadHostRowsFp8(nullptr, 64, 0, 0, 2, 128, nullptr, nullptr, hs, nullptr).ok());

  ExpectBad(LaunchGatherKvRowsFp8(h8, -1, 0, idx, 4, 2, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRowsFp8: host_rows");
  ExpectBad(LaunchGatherKvRowsFp8(h8, 64, -1, idx, 4, 2, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRowsFp8: src_first");
  ExpectBad(LaunchGatherKvRowsFp8(h8, 64, 0, idx, -4, 2, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRowsFp8: count");
  ExpectBad(LaunchGatherKvRowsFp8(h8, 64, 0, idx, 4, 2, 128, p, p, hs, -1, nullptr), "LaunchGatherKvRowsFp8: dst_first");
  ExpectBad(LaunchGatherKvRowsFp8(h8, 64, 0, idx, 4, 2, 128, p, p, hs, 61, nullptr), "LaunchGatherKvRowsFp8: dst_head_stride");
  ExpectBad(LaunchGatherKvRowsFp8(h8, 64, 0, idx, 4, 2, 128, p, p, 100, 0, nullptr), "LaunchGatherKvRowsFp8: dst_head_stride");
  ExpectBad(LaunchGatherKvRowsFp8(h8, 64, 0, idx, 4, 2, 60, p, p, hs, 0, nullptr), "LaunchGatherKvRowsFp8: head_dim");
  ExpectBad(LaunchGatherKvRowsFp8(h8, 64, 0, idx, 4, 70000, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRowsFp8: n_kv");
  ExpectBad(LaunchGatherKvRowsFp8(nullptr, 64, 0, idx, 4, 2, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRowsFp8: host is null");
  ExpectBad(LaunchGatherKvRowsFp8(h8, 64, 0, nullptr, 4, 2, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRowsFp8: idx is null");
  ExpectBad(LaunchGatherKvRowsFp8(h8, 64, 0, idx, 4, 2, 128, nullptr, p, hs, 0, nullptr), "LaunchGatherKvRowsFp8: dst_k is null");
  ExpectBad(LaunchGatherKvRowsFp8(h8, 64, 0, idx, 4, 2, 128, p, nullptr, hs, 0, nullptr), "LaunchGatherKvRowsFp8: dst_v is null");
  ExpectBad(LaunchGatherKvRowsFp8(h8odd, 64, 0, idx, 4, 2, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRowsFp8: host is not 16-byte");
  ExpectBad(LaunchGatherKvRowsFp8(h8, 64, 0, idx, 4, 2, 128, p, odd, hs, 0, nullptr), "LaunchGatherKvRowsFp8: dst_v is not 16-byte");
  EXPECT_TRUE(LaunchGatherKvRowsFp8(nullptr, 64, 0, nullptr, 0, 2, 128, nullptr, nullptr, hs, 0, nullptr).ok());

  // LaunchBuildChannelIndexFp8(host, host_rows, rows, chans, d, n_kv, head_dim, index, index_rows, stream)
  ExpectBad(LaunchBuildChannelIndexFp8(h8, 64, 8, idx, 4, 0, 128, p, 64, nullptr), "LaunchBuildChannelIndexFp8: n_kv");
  ExpectBad(LaunchBuildChannelIndexFp8(h8, 64, 8, idx, 4, 2, 72, p, 64, nullptr), "LaunchBuildChannelIndexFp8: head_dim");
  ExpectBad(LaunchBuildChannelIndexFp8(h8, 64, 8, idx, 0, 2, 128, p, 64, nullptr), "LaunchBuildChannelIndexFp8: d =");
  ExpectBad(LaunchBuildChannelIndexFp8(h8, 64, 8, idx, 65, 2, 128, p, 64, nullptr), "LaunchBuildChannelIndexFp8: d =");
  ExpectBad(LaunchBuildChannelIndexFp8(h8, 64, -1, idx, 4, 2, 128, p, 64, nullptr), "LaunchBuildChannelIndexFp8: rows");
  ExpectBad(LaunchBuildChannelIndexFp8(h8, 64, 65, idx, 4, 2, 128, p, 100, nullptr), "LaunchBuildChannelIndexFp8: rows = 65 > host_rows");
  ExpectBad(LaunchBuildChannelIndexFp8(h8, 100, 65, idx, 4, 2, 128, p, 64, nullptr), "LaunchBuildChannelIndexFp8: rows = 65 > index_rows");
  ExpectBad(LaunchBuildChannelIndexFp8(nullptr, 64, 8, idx, 4, 2, 128, p, 64, nullptr), "LaunchBuildChannelIndexFp8: host is null");
  ExpectBad(LaunchBuildChannelIndexFp8(h8, 64, 8, nullptr, 4, 2, 128, p, 64, nullptr), "LaunchBuildChannelIndexFp8: chans is null");
  ExpectBad(LaunchBuildChannelIndexFp8(h8, 64, 8, idx, 4, 2, 128, nullptr, 64, nullptr), "LaunchBuildChannelIndexFp8: index is null");
  ExpectBad(LaunchBuildChannelIndexFp8(h8odd, 64, 8, idx, 4, 2, 128, p, 64, nullptr), "LaunchBuildChannelIndexFp8: host is not 16-byte");
  EXPECT_TRUE(LaunchBuildChannelIndexFp8(nullptr, 64, 0, nullptr, 4, 2, 128, nullptr, 64, nullptr).ok());

  // The FP8-index builders and scores.
  uint8_t* i8 = reinterpret_cast<uint8_t*>(uintptr_t{0x1000});
  const auto* hb = reinterpret_cast<const __nv_bfloat16*>(h8);
  ExpectBad(LaunchBuildFp8ChannelIndex(hb, 64, 8, idx, 65, 2, 128, i8, 64, nullptr), "LaunchBuildFp8ChannelIndex: d =");
  ExpectBad(LaunchBuildFp8ChannelIndex(hb, 64, 65, idx, 4, 2, 128, i8, 100, nullptr), "LaunchBuildFp8ChannelIndex: rows = 65 > host_rows");
  ExpectBad(LaunchBuildFp8ChannelIndex(hb, 64, 8, idx, 4, 2, 128, nullptr, 64, nullptr), "LaunchBuildFp8ChannelIndex: index is null");
  ExpectBad(LaunchBuildFp8ChannelIndexFromFp8(h8, 64, 8, idx, 4, 2, 72, i8, 64, nullptr), "LaunchBuildFp8ChannelIndexFromFp8: head_dim");
  ExpectBad(LaunchBuildFp8ChannelIndexFromFp8(nullptr, 64, 8, idx, 4, 2, 128, i8, 64, nullptr), "LaunchBuildFp8ChannelIndexFromFp8: host is null");
  const float* qf = reinterpret_cast<const float*>(uintptr_t{0x2000});
  float* sf = reinterpret_cast<float*>(uintptr_t{0x3000});
  ExpectBad(LaunchScoreFp8ChannelIndex(qf, i8, 100, 65, 2, 0, 10, sf, 10, nullptr), "LaunchScoreFp8ChannelIndex: d =");
  ExpectBad(LaunchScoreFp8ChannelIndex(qf, i8, 100, 8, 0, 0, 10, sf, 10, nullptr), "LaunchScoreFp8ChannelIndex: n_kv");
  ExpectBad(LaunchScoreFp8ChannelIndex(qf, i8, 100, 8, 2, 95, 10, sf, 10, nullptr), "first + n = 105 > index_rows = 100");
  ExpectBad(LaunchScoreFp8ChannelIndex(qf, i8, 100, 8, 2, 0, 11, sf, 10, nullptr), "n = 11 > score_stride");
  ExpectBad(LaunchScoreFp8ChannelIndex(nullptr, i8, 100, 8, 2, 0, 10, sf, 10, nullptr), "q_chan is null");
  ExpectBad(LaunchScoreFp8ChannelIndex(qf, nullptr, 100, 8, 2, 0, 10, sf, 10, nullptr), "index is null");
  EXPECT_TRUE(LaunchScoreFp8ChannelIndex(nullptr, nullptr, 100, 8, 2, 0, 0, nullptr, 10, nullptr).ok());

  // LaunchScoreFp8TopK(q_chan, index, index_rows, d, rows, first, n_max, k, out, ws, ws_bytes, stream)
  int32_t* o = reinterpret_cast<int32_t*>(uintptr_t{0x4000});
  void* w = reinterpret_cast<void*>(uintptr_t{0x5000});
  const size_t wsb = TopKWorkspaceBytes(2, 1000);
  ExpectBad(LaunchScoreFp8TopK(qf, i8, 1000, 32, 2, 0, 1000, 10, o, w, wsb - 16, nullptr),
            "LaunchScoreFp8TopK: LaunchTopK: workspace_bytes");
  ExpectBad(LaunchScoreFp8TopK(qf, i8, 1000, 24, 2, 0, 1000, 10, o, w, wsb, nullptr), "outside the fused path");
  ExpectBad(LaunchScoreFp8TopK(qf, i8, 1000, 32, 2, 0, 1000, 2000, o, w, wsb, nullptr), "outside the fused path");
  ExpectBad(LaunchScoreFp8TopK(qf, i8, 1000, 32, 2, 5, 1000, 10, o, w, wsb, nullptr),
            "LaunchScoreFp8TopK: index_rows = 1000 < first + n_max = 1005");
  ExpectBad(LaunchScoreFp8TopK(nullptr, i8, 1000, 32, 2, 0, 1000, 10, o, w, wsb, nullptr), "q_chan is null");
  ExpectBad(LaunchScoreFp8TopK(qf, i8 + 1, 1000, 32, 2, 0, 1000, 10, o, w, wsb, nullptr), "16-byte");
  ExpectBad(LaunchScoreFp8TopK(qf, i8, 1000, 32, 2, 0, 1000, 10, nullptr, w, wsb, nullptr), "out is null");
}

}  // namespace
}  // namespace tailorkv::cuda
