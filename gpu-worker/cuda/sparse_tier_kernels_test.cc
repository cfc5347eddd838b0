// Sparse-tier data movement against plain CPU loops, bit-exactly (the
// kernels only move bf16 bit patterns; the max-abs update is an exact max):
// - host rows store / load, keys transposed to the host (aligned and
//   unaligned kt rows), zero-copy K/V gather (-1, out-of-range and
//   duplicate indices; mapped host memory and device memory), max-abs
//   update (NaN, inf, rows outside the range holding huge values), decode
//   token append; odd sizes, head_dim 64 / 128 and odd others, destinations
//   poisoned so untouched elements must keep the sentinel;
// - gather + append captured in one CUDA graph, replayed with different
//   device-side indices and position;
// - bad arguments name the field (no device needed).
#include "cuda/sparse_tier_kernels.cuh"

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
#include "runtime/sparse_reference.h"

namespace tailorkv::cuda {
namespace {

using test_util::Rng;
using Bits = std::vector<uint16_t>;  // bf16 bit patterns

constexpr uint16_t kPoison = 0xDEAD;  // a finite bf16 (~ -6e18) no random value equals
constexpr uint16_t kNaN = 0x7FC0, kNegNaN = 0xFFC0, kInf = 0x7F80, kNegInf = 0xFF80;
constexpr uint16_t kHuge = 0x7F00;  // ~1.7e38

class SparseTierKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

using test_util::HostMapped;

uint16_t RandBf16(Rng& rng) {
  const float f = rng.Uniform(-4.0f, 4.0f);
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>(b >> 16);
}

Bits RandBits(size_t n, Rng& rng) {
  Bits b(n);
  for (auto& x : b) x = RandBf16(rng);
  return b;
}

float Bf16ToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
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

// Every element equal; reports the count and the first few mismatches.
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

void CheckStoreHostRows(const RowsCase& c, uint64_t seed) {
  SCOPED_TRACE(Name(c));
  Rng rng(seed);
  const int hd = c.head_dim;
  const int64_t hs = static_cast<int64_t>(c.cap + 3) * hd;  // heads not back to back
  const Bits k = RandBits(static_cast<size_t>(c.n_kv) * hs, rng);
  const Bits v = RandBits(k.size(), rng);
  const size_t host_elems = static_cast<size_t>(c.n_kv) * c.host_rows * 2 * hd;
  HostMapped host(host_elems * 2);
  ASSERT_NE(host.host, nullptr);
  ASSERT_NE(host.device(), nullptr);
  std::fill(host.bits(), host.bits() + host_elems, kPoison);
  absl::StatusOr<DeviceBuffer> dk = Upload(k), dv = Upload(v);
  ASSERT_TRUE(dk.ok() && dv.ok());
  absl::Status st = LaunchStoreHostRows(Bf(*dk), Bf(*dv), hs, c.first, c.n, c.n_kv, hd,
                                        static_cast<__nv_bfloat16*>(host.device()), c.host_rows,
                                        nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Bits want(host_elems, kPoison);
  for (int h = 0; h < c.n_kv; ++h) {
    for (int i = 0; i < c.n; ++i) {
      const int64_t r = c.first + i;
      for (int e = 0; e < hd; ++e) {
        want[(h * c.host_rows + r) * 2 * hd + e] = k[h * hs + r * hd + e];
        want[(h * c.host_rows + r) * 2 * hd + hd + e] = v[h * hs + r * hd + e];
      }
    }
  }
  ExpectSame(host.bits(), want.data(), host_elems, "host rows");
}

void CheckLoadHostRows(const RowsCase& c, uint64_t seed) {
  SCOPED_TRACE(Name(c));
  Rng rng(seed);
  const int hd = c.head_dim;
  const int64_t hs = static_cast<int64_t>(c.cap + 5) * hd;
  const size_t host_elems = static_cast<size_t>(c.n_kv) * c.host_rows * 2 * hd;
  HostMapped host(host_elems * 2);
  ASSERT_NE(host.host, nullptr);
  ASSERT_NE(host.device(), nullptr);
  for (size_t i = 0; i < host_elems; ++i) host.bits()[i] = RandBf16(rng);
  const Bits poison(static_cast<size_t>(c.n_kv) * hs, kPoison);
  absl::StatusOr<DeviceBuffer> dk = Upload(poison), dv = Upload(poison);
  ASSERT_TRUE(dk.ok() && dv.ok());
  absl::Status st = LaunchLoadHostRows(static_cast<const __nv_bfloat16*>(host.device()), c.host_rows,
                                       c.first, c.n, c.n_kv, hd, Bf(*dk), Bf(*dv), hs, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Bits want_k = poison, want_v = poison;
  const uint16_t* hb = host.bits();
  for (int h = 0; h < c.n_kv; ++h) {
    for (int i = 0; i < c.n; ++i) {
      const int64_t r = c.first + i;
      for (int e = 0; e < hd; ++e) {
        want_k[h * hs + r * hd + e] = hb[(h * c.host_rows + r) * 2 * hd + e];
        want_v[h * hs + r * hd + e] = hb[(h * c.host_rows + r) * 2 * hd + hd + e];
      }
    }
  }
  const Bits got_k = Download<uint16_t>(*dk, poison.size());
  const Bits got_v = Download<uint16_t>(*dv, poison.size());
  ExpectSame(got_k.data(), want_k.data(), want_k.size(), "k");
  ExpectSame(got_v.data(), want_v.data(), want_v.size(), "v");
}

const std::vector<RowsCase>& RowsCases() {
  static const std::vector<RowsCase> cases = {
      {3, 64, 37, 5, 29, 41},  {3, 128, 37, 0, 37, 37}, {3, 128, 40, 13, 1, 50},
      {1, 8, 9, 2, 7, 9},      {2, 72, 33, 1, 31, 35},
      {8, 128, 8200, 3, 8193, 8201},  // a prefill chunk: several grid-stride steps
  };
  return cases;
}

TEST_F(SparseTierKernelsTest, StoreHostRowsBitExact) {
  uint64_t seed = 1;
  for (const RowsCase& c : RowsCases()) CheckStoreHostRows(c, seed++);
}

TEST_F(SparseTierKernelsTest, LoadHostRowsBitExact) {
  uint64_t seed = 100;
  for (const RowsCase& c : RowsCases()) CheckLoadHostRows(c, seed++);
}

// Store then load back into fresh arrays: the round trip is the identity
// on the stored rows.
TEST_F(SparseTierKernelsTest, StoreThenLoadRoundTrips) {
  Rng rng(7);
  const int n_kv = 3, hd = 128, cap = 301, first = 17, n = 255;
  const int64_t hs = static_cast<int64_t>(cap) * hd, host_rows = cap;
  const Bits k = RandBits(static_cast<size_t>(n_kv) * hs, rng), v = RandBits(k.size(), rng);
  HostMapped host(static_cast<size_t>(n_kv) * host_rows * 2 * hd * 2);
  ASSERT_NE(host.device(), nullptr);
  absl::StatusOr<DeviceBuffer> dk = Upload(k), dv = Upload(v);
  const Bits poison(k.size(), kPoison);
  absl::StatusOr<DeviceBuffer> bk = Upload(poison), bv = Upload(poison);
  ASSERT_TRUE(dk.ok() && dv.ok() && bk.ok() && bv.ok());
  auto* hp = static_cast<__nv_bfloat16*>(host.device());
  ASSERT_TRUE(LaunchStoreHostRows(Bf(*dk), Bf(*dv), hs, first, n, n_kv, hd, hp, host_rows, nullptr).ok());
  ASSERT_TRUE(LaunchLoadHostRows(hp, host_rows, first, n, n_kv, hd, Bf(*bk), Bf(*bv), hs, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const Bits got_k = Download<uint16_t>(*bk, k.size()), got_v = Download<uint16_t>(*bv, v.size());
  Bits want_k = poison, want_v = poison;
  for (int h = 0; h < n_kv; ++h) {
    const size_t at = h * hs + static_cast<size_t>(first) * hd;
    std::copy(k.begin() + at, k.begin() + at + static_cast<size_t>(n) * hd, want_k.begin() + at);
    std::copy(v.begin() + at, v.begin() + at + static_cast<size_t>(n) * hd, want_v.begin() + at);
  }
  ExpectSame(got_k.data(), want_k.data(), k.size(), "k round trip");
  ExpectSame(got_v.data(), want_v.data(), v.size(), "v round trip");
}

// ----------------------------------------------------------------- host KT

struct KTCase {
  int n_kv, head_dim, cap, first, n;
  int64_t kt_cols;
  int kt_offset;  // elements: a non-zero offset makes every kt chunk unaligned
};

void CheckStoreHostKT(const KTCase& c, uint64_t seed) {
  std::ostringstream name;
  name << "n_kv=" << c.n_kv << " hd=" << c.head_dim << " first=" << c.first << " n=" << c.n
       << " kt_cols=" << c.kt_cols << " kt_offset=" << c.kt_offset;
  SCOPED_TRACE(name.str());
  Rng rng(seed);
  const int hd = c.head_dim;
  const int64_t hs = static_cast<int64_t>(c.cap) * hd + 8;
  const Bits k = RandBits(static_cast<size_t>(c.n_kv) * hs, rng);
  const size_t kt_elems = static_cast<size_t>(c.n_kv) * hd * c.kt_cols + c.kt_offset + 16;
  HostMapped kt(kt_elems * 2);
  ASSERT_NE(kt.host, nullptr);
  ASSERT_NE(kt.device(), nullptr);
  std::fill(kt.bits(), kt.bits() + kt_elems, kPoison);
  absl::StatusOr<DeviceBuffer> dk = Upload(k);
  ASSERT_TRUE(dk.ok());
  absl::Status st = LaunchStoreHostKT(Bf(*dk), hs, c.first, c.n, c.n_kv, hd,
                                      static_cast<__nv_bfloat16*>(kt.device()) + c.kt_offset,
                                      c.kt_cols, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Bits want(kt_elems, kPoison);
  for (int h = 0; h < c.n_kv; ++h) {
    for (int ch = 0; ch < hd; ++ch) {
      for (int i = 0; i < c.n; ++i) {
        const int64_t r = c.first + i;
        want[c.kt_offset + (static_cast<int64_t>(h) * hd + ch) * c.kt_cols + r] = k[h * hs + r * hd + ch];
      }
    }
  }
  ExpectSame(kt.bits(), want.data(), kt_elems, "kt");
}

TEST_F(SparseTierKernelsTest, StoreHostKTBitExact) {
  const KTCase cases[] = {
      {3, 64, 210, 5, 150, 203, 0},     // kt_cols % 8 != 0: element stores
      {3, 128, 210, 5, 150, 208, 0},    // aligned interior, partial tiles at both ends
      {3, 128, 256, 64, 128, 256, 0},   // whole tiles only
      {3, 128, 210, 5, 150, 208, 1},    // kt unaligned
      {2, 72, 100, 63, 2, 72, 0},       // a partial channel tile, a token tile boundary
      {1, 8, 9, 0, 1, 9, 0},
      {8, 128, 8200, 7, 8193, 8200, 0}, // a prefill chunk
  };
  uint64_t seed = 200;
  for (const KTCase& c : cases) CheckStoreHostKT(c, seed++);
}

// -------------------------------------------------------------- gather K/V

struct GatherCase {
  int n_kv, head_dim;
  int64_t host_rows, src_first;
  int count, dst_first;
  bool mapped;  // host tier in mapped host memory (else device memory)
};

// Runs a gather of `idx` into poisoned dst arrays and compares.
void CheckGatherKv(const GatherCase& c, uint64_t seed) {
  std::ostringstream name;
  name << "n_kv=" << c.n_kv << " hd=" << c.head_dim << " host_rows=" << c.host_rows
       << " src_first=" << c.src_first << " count=" << c.count << " dst_first=" << c.dst_first
       << (c.mapped ? " mapped" : " device");
  SCOPED_TRACE(name.str());
  Rng rng(seed);
  const int hd = c.head_dim;
  const size_t host_elems = static_cast<size_t>(c.n_kv) * c.host_rows * 2 * hd;
  const Bits host_bits = RandBits(host_elems, rng);
  HostMapped mapped(c.mapped ? host_elems * 2 : 16);
  absl::StatusOr<DeviceBuffer> dev_host = Upload(c.mapped ? Bits(8) : host_bits);
  ASSERT_TRUE(dev_host.ok());
  const __nv_bfloat16* host = nullptr;
  if (c.mapped) {
    ASSERT_NE(mapped.device(), nullptr);
    std::copy(host_bits.begin(), host_bits.end(), mapped.bits());
    host = static_cast<const __nv_bfloat16*>(mapped.device());
  } else {
    host = Bf(*dev_host);
  }
  // Valid indices are [0, valid); draw from [-1, valid + 3).
  const int64_t valid = c.host_rows - c.src_first;
  std::vector<int32_t> idx(static_cast<size_t>(c.n_kv) * c.count);
  for (auto& i : idx) {
    i = static_cast<int32_t>(std::floor(rng.Uniform(-1.0f, static_cast<float>(valid + 3))));
  }
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
  absl::Status st = LaunchGatherKvRows(host, c.host_rows, c.src_first, d_idx->as<int32_t>(), c.count,
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
        want_k[d + e] = host_bits[s + e];
        want_v[d + e] = host_bits[s + hd + e];
      }
    }
  }
  ASSERT_GT(copied, 0);
  ASSERT_LT(copied, c.n_kv * c.count);  // some rows must stay untouched
  const Bits got_k = Download<uint16_t>(*dk, poison.size()), got_v = Download<uint16_t>(*dv, poison.size());
  ExpectSame(got_k.data(), want_k.data(), want_k.size(), "dst_k");
  ExpectSame(got_v.data(), want_v.data(), want_v.size(), "dst_v");
}

TEST_F(SparseTierKernelsTest, GatherKvRowsBitExact) {
  const GatherCase cases[] = {
      {3, 64, 301, 7, 129, 3, true},
      {3, 128, 301, 0, 129, 0, true},
      {3, 128, 301, 11, 129, 5, false},
      {1, 8, 10, 2, 9, 1, true},
      {8, 128, 5000, 64, 2048, 5, true},  // decode-sized
      {8, 128, 20000, 3, 16385, 0, true},  // > 8 blocks per SM of items: several grid-stride steps
  };
  uint64_t seed = 300;
  for (const GatherCase& c : cases) CheckGatherKv(c, seed++);
}

// ----------------------------------------------------------------- max-abs

struct MaxAbsCase {
  int n_kv, head_dim, cap, first, n;
};

void CheckMaxAbs(const MaxAbsCase& c, bool split_in_two, uint64_t seed) {
  std::ostringstream name;
  name << "n_kv=" << c.n_kv << " hd=" << c.head_dim << " first=" << c.first << " n=" << c.n
       << (split_in_two ? " (two launches)" : "");
  SCOPED_TRACE(name.str());
  Rng rng(seed);
  const int hd = c.head_dim;
  const int64_t hs = static_cast<int64_t>(c.cap) * hd;
  Bits k(static_cast<size_t>(c.n_kv) * hs);
  for (int h = 0; h < c.n_kv; ++h) {
    for (int r = 0; r < c.cap; ++r) {
      for (int e = 0; e < hd; ++e) {
        uint16_t b = RandBf16(rng);
        const float u = rng.Uniform(0.0f, 1.0f);
        if (u < 0.04f) b = kNaN;
        else if (u < 0.08f) b = kNegNaN;
        if (r < c.first || r >= c.first + c.n) b = (u < 0.5f) ? kHuge : kNegInf;  // must not count
        k[h * hs + static_cast<int64_t>(r) * hd + e] = b;
      }
    }
    if (c.n >= 3) k[h * hs + static_cast<int64_t>(c.first + 2) * hd + 3] = kNegInf;  // |-inf| = inf
    // The last channel is NaN over the whole range: its old value stays.
    for (int r = c.first; r < c.first + c.n; ++r) k[h * hs + static_cast<int64_t>(r) * hd + hd - 1] = kNaN;
  }
  std::vector<float> old(static_cast<size_t>(c.n_kv) * hd);
  for (auto& m : old) m = rng.Uniform(0.0f, 3.0f);  // some kept, most raised
  old[1] = 100.0f;
  old[old.size() - 2] = 0.0f;
  std::vector<float> want = old;
  for (int h = 0; h < c.n_kv; ++h) {
    for (int r = c.first; r < c.first + c.n; ++r) {
      for (int e = 0; e < hd; ++e) {
        float& m = want[static_cast<size_t>(h) * hd + e];
        m = std::max(m, std::fabs(Bf16ToFloat(k[h * hs + static_cast<int64_t>(r) * hd + e])));
      }
    }
  }
  absl::StatusOr<DeviceBuffer> dk = Upload(k), dm = Upload(old);
  ASSERT_TRUE(dk.ok() && dm.ok());
  if (split_in_two) {
    const int half = c.n / 2;
    absl::Status st = LaunchMaxAbsUpdate(Bf(*dk), hs, c.first, half, c.n_kv, hd, dm->as<float>(), nullptr);
    ASSERT_TRUE(st.ok()) << st;
    st = LaunchMaxAbsUpdate(Bf(*dk), hs, c.first + half, c.n - half, c.n_kv, hd, dm->as<float>(), nullptr);
    ASSERT_TRUE(st.ok()) << st;
  } else {
    absl::Status st = LaunchMaxAbsUpdate(Bf(*dk), hs, c.first, c.n, c.n_kv, hd, dm->as<float>(), nullptr);
    ASSERT_TRUE(st.ok()) << st;
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = Download<float>(*dm, want.size());
  std::vector<uint32_t> got_bits(got.size()), want_bits(want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    got_bits[i] = FloatBits(got[i]);
    want_bits[i] = FloatBits(want[i]);
  }
  ExpectSame(got_bits.data(), want_bits.data(), got_bits.size(), "max_abs bits");
  EXPECT_EQ(want[1], 100.0f);  // the reference itself: kept values and raised ones both occur
  if (c.n >= 3) {
    EXPECT_TRUE(std::isinf(want[3]));
  }
}

TEST_F(SparseTierKernelsTest, MaxAbsUpdateExact) {
  const MaxAbsCase cases[] = {
      {3, 64, 1100, 5, 1000},  {3, 128, 1100, 3, 1001}, {3, 72, 600, 1, 513},
      {2, 128, 20, 7, 1},      {1, 8, 50, 0, 49},
      {1, 4096, 40, 3, 33},      // 512 chunks a row: more than a block's threads
      {8, 128, 8200, 7, 8193},   // a prefill chunk
  };
  uint64_t seed = 400;
  for (const MaxAbsCase& c : cases) {
    CheckMaxAbs(c, false, seed++);
    if (c.n >= 2) CheckMaxAbs(c, true, seed++);
  }
}

// ------------------------------------------------------------ append token

TEST_F(SparseTierKernelsTest, SparseAppendTokenCopiesOneRow) {
  for (int hd : {64, 128}) {
    SCOPED_TRACE(hd);
    Rng rng(500 + hd);
    const int n_kv = 3, src_cap = 23, dst_cap = 13, pos = 11, row_offset = -4;  // row 7
    const int64_t src_hs = static_cast<int64_t>(src_cap) * hd, dst_hs = static_cast<int64_t>(dst_cap) * hd + 8;
    const Bits sk = RandBits(static_cast<size_t>(n_kv) * src_hs, rng), sv = RandBits(sk.size(), rng);
    const Bits poison(static_cast<size_t>(n_kv) * dst_hs, kPoison);
    absl::StatusOr<DeviceBuffer> d_sk = Upload(sk), d_sv = Upload(sv), dk = Upload(poison),
                                 dv = Upload(poison);
    absl::StatusOr<DeviceBuffer> d_pos = Upload(std::vector<int32_t>{pos});
    absl::StatusOr<DeviceBuffer> d_len = Upload(std::vector<int32_t>{-7});
    ASSERT_TRUE(d_sk.ok() && d_sv.ok() && dk.ok() && dv.ok() && d_pos.ok() && d_len.ok());
    absl::Status st = LaunchSparseAppendToken(Bf(*d_sk), Bf(*d_sv), src_hs, d_pos->as<int32_t>(),
                                              row_offset, n_kv, hd, Bf(*dk), Bf(*dv), dst_hs,
                                              d_len->as<int32_t>(), nullptr);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    Bits want_k = poison, want_v = poison;
    const int row = pos + row_offset;
    for (int h = 0; h < n_kv; ++h) {
      for (int e = 0; e < hd; ++e) {
        want_k[h * dst_hs + static_cast<int64_t>(row) * hd + e] = sk[h * src_hs + static_cast<int64_t>(pos) * hd + e];
        want_v[h * dst_hs + static_cast<int64_t>(row) * hd + e] = sv[h * src_hs + static_cast<int64_t>(pos) * hd + e];
      }
    }
    const Bits got_k = Download<uint16_t>(*dk, poison.size()), got_v = Download<uint16_t>(*dv, poison.size());
    ExpectSame(got_k.data(), want_k.data(), want_k.size(), "dst_k");
    ExpectSame(got_v.data(), want_v.data(), want_v.size(), "dst_v");
    EXPECT_EQ(Download<int32_t>(*d_len, 1)[0], row + 1);
  }
}

// --------------------------------------------------------- graph: gather + append

// A sparse layer's decode step as the backend captures it: the selected
// prompt rows gathered from the host tier into the device tier after the
// sink rows, then the new token appended after them; replayed with different
// device-side indices (written by Top-K in the real graph) and position.
TEST_F(SparseTierKernelsTest, GatherAndAppendReplayFromGraph) {
  const int n_kv = 3, hd = 128, prompt = 301, count = 33, sink = 4, gen_cap = 10;
  const int scratch_cap = prompt + gen_cap;
  const int dst_cap = sink + count + gen_cap;
  const int row_offset = sink + count - prompt;  // generated token at pos -> row sink + count + (pos - prompt)
  Rng rng(600);
  const size_t host_elems = static_cast<size_t>(n_kv) * prompt * 2 * hd;
  HostMapped host(host_elems * 2);
  ASSERT_NE(host.device(), nullptr);
  for (size_t i = 0; i < host_elems; ++i) host.bits()[i] = RandBf16(rng);
  const int64_t src_hs = static_cast<int64_t>(scratch_cap) * hd, dst_hs = static_cast<int64_t>(dst_cap) * hd;
  const Bits sk = RandBits(static_cast<size_t>(n_kv) * src_hs, rng), sv = RandBits(sk.size(), rng);
  const Bits poison(static_cast<size_t>(n_kv) * dst_hs, kPoison);
  absl::StatusOr<DeviceBuffer> d_sk = Upload(sk), d_sv = Upload(sv), dk = Upload(poison), dv = Upload(poison);
  absl::StatusOr<DeviceBuffer> d_idx = Upload(std::vector<int32_t>(static_cast<size_t>(n_kv) * count, -1));
  absl::StatusOr<DeviceBuffer> d_pos = Upload(std::vector<int32_t>{0});
  absl::StatusOr<DeviceBuffer> d_len = Upload(std::vector<int32_t>{0});
  absl::StatusOr<CudaStream> stream = CudaStream::Create();
  ASSERT_TRUE(d_sk.ok() && d_sv.ok() && dk.ok() && dv.ok() && d_idx.ok() && d_pos.ok() && d_len.ok() &&
              stream.ok());
  const cudaStream_t s = stream->get();
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  absl::Status g = LaunchGatherKvRows(static_cast<const __nv_bfloat16*>(host.device()), prompt, 0,
                                      d_idx->as<int32_t>(), count, n_kv, hd, Bf(*dk), Bf(*dv), dst_hs,
                                      sink, s);
  absl::Status a = LaunchSparseAppendToken(Bf(*d_sk), Bf(*d_sv), src_hs, d_pos->as<int32_t>(), row_offset,
                                           n_kv, hd, Bf(*dk), Bf(*dv), dst_hs, d_len->as<int32_t>(), s);
  absl::StatusOr<CudaGraphExec> graph = CudaGraphExec::EndCapture(s);
  ASSERT_TRUE(g.ok()) << g;
  ASSERT_TRUE(a.ok()) << a;
  ASSERT_TRUE(graph.ok()) << graph.status();

  for (int replay = 0; replay < 2; ++replay) {
    SCOPED_TRACE(replay);
    const int pos = prompt + 2 + 5 * replay;  // rows sink + count + 2, then + 7
    std::vector<int32_t> idx(static_cast<size_t>(n_kv) * count);
    for (auto& i : idx) i = static_cast<int32_t>(std::floor(rng.Uniform(0.0f, static_cast<float>(prompt))));
    for (int h = 0; h < n_kv; ++h) {
      idx[static_cast<size_t>(h) * count + count - 1] = -1;  // LaunchTopK's tail when k > n
      idx[static_cast<size_t>(h) * count + replay] = prompt - 1;
    }
    const int32_t len_poison = -3;
    ASSERT_EQ(cudaMemcpyAsync(d_idx->get(), idx.data(), idx.size() * 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(d_pos->get(), &pos, 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(d_len->get(), &len_poison, 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(dk->get(), poison.data(), poison.size() * 2, cudaMemcpyHostToDevice, s), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(dv->get(), poison.data(), poison.size() * 2, cudaMemcpyHostToDevice, s), cudaSuccess);
    ASSERT_TRUE(graph->Launch(s).ok());
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);

    Bits want_k = poison, want_v = poison;
    const uint16_t* hb = host.bits();
    for (int h = 0; h < n_kv; ++h) {
      for (int i = 0; i < count; ++i) {
        const int32_t j = idx[static_cast<size_t>(h) * count + i];
        if (j < 0 || j >= prompt) continue;
        const int64_t d = h * dst_hs + static_cast<int64_t>(sink + i) * hd;
        const int64_t src = (static_cast<int64_t>(h) * prompt + j) * 2 * hd;
        for (int e = 0; e < hd; ++e) {
          want_k[d + e] = hb[src + e];
          want_v[d + e] = hb[src + hd + e];
        }
      }
      const int64_t d = h * dst_hs + static_cast<int64_t>(pos + row_offset) * hd;
      for (int e = 0; e < hd; ++e) {
        want_k[d + e] = sk[h * src_hs + static_cast<int64_t>(pos) * hd + e];
        want_v[d + e] = sv[h * src_hs + static_cast<int64_t>(pos) * hd + e];
      }
    }
    const Bits got_k = Download<uint16_t>(*dk, poison.size()), got_v = Download<uint16_t>(*dv, poison.size());
    ExpectSame(got_k.data(), want_k.data(), want_k.size(), "dst_k");
    ExpectSame(got_v.data(), want_v.data(), want_v.size(), "dst_v");
    EXPECT_EQ(Download<int32_t>(*d_len, 1)[0], pos + row_offset + 1);
  }
}

// ------------------------------------------------------------ bad arguments

void ExpectBad(const absl::Status& s, const std::string& want) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s << " (want '" << want << "')";
  EXPECT_NE(s.message().find(want), std::string::npos)
      << "message '" << s.message() << "' does not contain '" << want << "'";
}

// Slot pool: LaunchAssignSlots then LaunchGatherKvRows over its misses
// matches runtime::AssignSlots (miss list, slots, count) and leaves every
// slot holding the host row of its token; kept slots' host rows are
// poisoned before the gather, so a row fetched again would show, and a
// freed slot left over keeps its old bytes. Per head the slots end up
// holding exactly the new selection. Cases: slots in no order, -1 in slots
// and in next's tail, odd counts, head_dim 64 / 128, a decode-sized 8 x 896
// and the largest count.
TEST_F(SparseTierKernelsTest, AssignSlotsThenGatherMissesHoldsTheSelection) {
  struct Case {
    int n_kv, count, hd, host_rows, slots_empty, next_empty;
  };
  const Case cases[] = {{3, 7, 64, 40, 0, 0},     {2, 33, 128, 70, 3, 2},
                        {8, 896, 128, 5000, 0, 0}, {1, 5, 64, 9, 5, 0},
                        {2, 1001, 64, 3000, 0, 40}, {1, kAssignSlotsMaxCount, 64, 20000, 7, 0}};
  uint32_t seed = 71;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "n_kv " << c.n_kv << " count " << c.count << " hd " << c.hd);
    Rng rng(seed++);
    const int hd = c.hd, dst_first = 5;
    const int64_t row = 2 * hd;  // host row: K | V
    Bits host = RandBits(static_cast<size_t>(c.n_kv) * c.host_rows * row, rng);
    std::vector<int32_t> slots(static_cast<size_t>(c.n_kv) * c.count), next(slots.size());
    auto draw = [&](int from, int to) {
      return std::min(to - 1, from + static_cast<int>(rng.Uniform(0.0f, 1.0f) * (to - from)));
    };
    for (int h = 0; h < c.n_kv; ++h) {
      std::vector<int32_t> pos(c.host_rows);
      for (int p = 0; p < c.host_rows; ++p) pos[p] = p;
      for (int i = 0; i < c.host_rows; ++i) std::swap(pos[i], pos[draw(i, c.host_rows)]);
      // Slots: the first `count` of a shuffle, in shuffled order; next keeps
      // ~60% of them.
      std::vector<int32_t> a(pos.begin(), pos.begin() + c.count), b;
      for (int i = 0; i < c.slots_empty; ++i) a[draw(0, c.count)] = -1;
      int fresh = c.count;
      for (int32_t p : a) {
        if (p >= 0) b.push_back(rng.Uniform(0.0f, 1.0f) < 0.6f ? p : pos[fresh++ % c.host_rows]);
      }
      while (static_cast<int>(b.size()) < c.count) b.push_back(pos[fresh++ % c.host_rows]);
      std::sort(b.begin(), b.end());
      b.erase(std::unique(b.begin(), b.end()), b.end());
      while (static_cast<int>(b.size()) < c.count) b.push_back(-1);
      for (int i = 0; i < c.next_empty; ++i) b[c.count - 1 - i] = -1;
      std::copy(a.begin(), a.end(), slots.begin() + static_cast<int64_t>(h) * c.count);
      std::copy(b.begin(), b.end(), next.begin() + static_cast<int64_t>(h) * c.count);
    }
    // The tier before: each slot's host row (random where the slot is empty).
    const int64_t dst_hs = static_cast<int64_t>(dst_first + c.count + 3) * hd;
    Bits tier_k = RandBits(static_cast<size_t>(c.n_kv) * dst_hs, rng), tier_v = tier_k;
    auto host_row = [&](int h, int32_t p) {
      return &host[(static_cast<int64_t>(h) * c.host_rows + p) * row];
    };
    auto put = [&](Bits& k, Bits& v, int h, int s, int32_t p) {
      const int64_t at = h * dst_hs + static_cast<int64_t>(dst_first + s) * hd;
      std::copy_n(host_row(h, p), hd, &k[at]);
      std::copy_n(host_row(h, p) + hd, hd, &v[at]);
    };
    for (int h = 0; h < c.n_kv; ++h) {
      for (int sl = 0; sl < c.count; ++sl) {
        if (slots[h * c.count + sl] >= 0) put(tier_k, tier_v, h, sl, slots[h * c.count + sl]);
      }
    }
    // Reference: slots, misses, count; the tier after = before + the misses.
    std::vector<int32_t> want_slots = slots, want_miss(slots.size());
    int want_reused = 0;
    Bits want_k = tier_k, want_v = tier_v;
    for (int h = 0; h < c.n_kv; ++h) {
      auto n = runtime::AssignSlots(&want_slots[h * c.count], &next[h * c.count], c.count,
                                    &want_miss[h * c.count]);
      ASSERT_TRUE(n.ok()) << n.status();
      want_reused += *n;
      for (int sl = 0; sl < c.count; ++sl) {
        if (want_miss[h * c.count + sl] >= 0) put(want_k, want_v, h, sl, want_miss[h * c.count + sl]);
      }
      // The slots hold exactly the selection.
      std::vector<int32_t> held, sel;
      for (int i = 0; i < c.count; ++i) {
        if (want_slots[h * c.count + i] >= 0) held.push_back(want_slots[h * c.count + i]);
        if (next[h * c.count + i] >= 0) sel.push_back(next[h * c.count + i]);
      }
      std::sort(held.begin(), held.end());
      ASSERT_EQ(held, sel) << "head " << h;
    }
    if (2 * c.slots_empty < c.count) ASSERT_GT(want_reused, 0) << "the case must reuse something";
    // Poison the host rows of the kept tokens: they must not be read.
    for (int h = 0; h < c.n_kv; ++h) {
      for (int sl = 0; sl < c.count; ++sl) {
        const int32_t p = want_slots[h * c.count + sl];
        if (p >= 0 && want_miss[h * c.count + sl] < 0) std::fill_n(host_row(h, p), row, kPoison);
      }
    }
    absl::StatusOr<DeviceBuffer> d_host = Upload(host), d_slots = Upload(slots), d_next = Upload(next),
                                 dk = Upload(tier_k), dv = Upload(tier_v),
                                 d_miss = Upload(std::vector<int32_t>(next.size(), 12345)),
                                 d_count = Upload(std::vector<unsigned long long>(1, 0));
    ASSERT_TRUE(d_host.ok() && d_slots.ok() && d_next.ok() && dk.ok() && dv.ok() && d_miss.ok() &&
                d_count.ok());
    absl::Status st = LaunchAssignSlots(d_slots->as<int32_t>(), d_next->as<int32_t>(), c.count, c.n_kv,
                                        d_miss->as<int32_t>(), d_count->as<unsigned long long>(), nullptr);
    ASSERT_TRUE(st.ok()) << st;
    st = LaunchGatherKvRows(Bf(*d_host), c.host_rows, 0, d_miss->as<int32_t>(), c.count, c.n_kv, hd,
                            Bf(*dk), Bf(*dv), dst_hs, dst_first, nullptr);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(Download<int32_t>(*d_miss, next.size()), want_miss);
    EXPECT_EQ(Download<int32_t>(*d_slots, slots.size()), want_slots);
    EXPECT_EQ(Download<unsigned long long>(*d_count, 1)[0], static_cast<unsigned long long>(want_reused));
    const Bits got_k = Download<uint16_t>(*dk, want_k.size()), got_v = Download<uint16_t>(*dv, want_v.size());
    ExpectSame(got_k.data(), want_k.data(), want_k.size(), "tier k");
    ExpectSame(got_v.data(), want_v.data(), want_v.size(), "tier v");
  }
}

// Every check runs before any CUDA call, so no device is needed; the
// pointers are never dereferenced.
TEST(SparseTierKernelsArgs, BadArgumentsNameTheField) {
  alignas(16) static uint16_t buf[64];
  auto* p = reinterpret_cast<__nv_bfloat16*>(buf);
  auto* odd = p + 1;  // 2-byte aligned only
  auto* idx = reinterpret_cast<int32_t*>(buf);
  auto* f = reinterpret_cast<float*>(buf);
  const int64_t hs = 64 * 128;  // 64 rows of head_dim 128

  // LaunchStoreHostRows(k, v, head_stride, first, n, n_kv, head_dim, host, host_rows, stream)
  ExpectBad(LaunchStoreHostRows(p, p, hs, 0, 4, 0, 128, p, 64, nullptr), "LaunchStoreHostRows: n_kv");
  ExpectBad(LaunchStoreHostRows(p, p, hs, 0, 4, 2, 0, p, 64, nullptr), "LaunchStoreHostRows: head_dim");
  ExpectBad(LaunchStoreHostRows(p, p, hs, 0, 4, 2, 12, p, 64, nullptr), "LaunchStoreHostRows: head_dim");
  ExpectBad(LaunchStoreHostRows(p, p, hs, -1, 4, 2, 128, p, 64, nullptr), "LaunchStoreHostRows: first");
  ExpectBad(LaunchStoreHostRows(p, p, hs, 0, -4, 2, 128, p, 64, nullptr), "LaunchStoreHostRows: n =");
  ExpectBad(LaunchStoreHostRows(p, p, hs, 60, 5, 2, 128, p, 100, nullptr), "LaunchStoreHostRows: head_stride");
  ExpectBad(LaunchStoreHostRows(p, p, hs, 60, 5, 2, 128, p, 64, nullptr), "LaunchStoreHostRows: host_rows");
  ExpectBad(LaunchStoreHostRows(p, p, hs + 4, 0, 4, 2, 128, p, 64, nullptr), "LaunchStoreHostRows: head_stride");
  ExpectBad(LaunchStoreHostRows(nullptr, p, hs, 0, 4, 2, 128, p, 64, nullptr), "LaunchStoreHostRows: k is null");
  ExpectBad(LaunchStoreHostRows(p, nullptr, hs, 0, 4, 2, 128, p, 64, nullptr), "LaunchStoreHostRows: v is null");
  ExpectBad(LaunchStoreHostRows(p, p, hs, 0, 4, 2, 128, nullptr, 64, nullptr), "LaunchStoreHostRows: host is null");
  ExpectBad(LaunchStoreHostRows(odd, p, hs, 0, 4, 2, 128, p, 64, nullptr), "LaunchStoreHostRows: k is not 16-byte");
  ExpectBad(LaunchStoreHostRows(p, p, hs, 0, 4, 2, 128, odd, 64, nullptr), "LaunchStoreHostRows: host is not 16-byte");
  // n == 0 enqueues nothing (and touches no pointer).
  EXPECT_TRUE(LaunchStoreHostRows(nullptr, nullptr, hs, 3, 0, 2, 128, nullptr, 64, nullptr).ok());

  // LaunchLoadHostRows(host, host_rows, first, n, n_kv, head_dim, k, v, head_stride, stream)
  ExpectBad(LaunchLoadHostRows(p, 64, 0, 4, 2, 100, p, p, hs, nullptr), "LaunchLoadHostRows: head_dim");
  ExpectBad(LaunchLoadHostRows(p, 3, 0, 4, 2, 128, p, p, hs, nullptr), "LaunchLoadHostRows: host_rows");
  ExpectBad(LaunchLoadHostRows(p, 64, 0, 4, 2, 128, p, p, 128, nullptr), "LaunchLoadHostRows: head_stride");
  ExpectBad(LaunchLoadHostRows(nullptr, 64, 0, 4, 2, 128, p, p, hs, nullptr), "LaunchLoadHostRows: host is null");
  ExpectBad(LaunchLoadHostRows(p, 64, 0, 4, 2, 128, nullptr, p, hs, nullptr), "LaunchLoadHostRows: k is null");
  ExpectBad(LaunchLoadHostRows(p, 64, 0, 4, 2, 128, p, odd, hs, nullptr), "LaunchLoadHostRows: v is not 16-byte");
  EXPECT_TRUE(LaunchLoadHostRows(nullptr, 64, 0, 0, 2, 128, nullptr, nullptr, hs, nullptr).ok());

  // LaunchStoreHostKT(k, head_stride, first, n, n_kv, head_dim, kt, kt_cols, stream)
  ExpectBad(LaunchStoreHostKT(p, hs, 0, 4, 2, 128, p, 3, nullptr), "LaunchStoreHostKT: kt_cols");
  ExpectBad(LaunchStoreHostKT(p, hs, 0, 4, 2, 128, nullptr, 64, nullptr), "LaunchStoreHostKT: kt is null");
  ExpectBad(LaunchStoreHostKT(odd, hs, 0, 4, 2, 128, p, 64, nullptr), "LaunchStoreHostKT: k is not 16-byte");
  ExpectBad(LaunchStoreHostKT(p, hs, 0, 65, 2, 128, p, 100, nullptr), "LaunchStoreHostKT: head_stride");
  ExpectBad(LaunchStoreHostKT(p, hs, 0, 4, -2, 128, p, 64, nullptr), "LaunchStoreHostKT: n_kv");
  EXPECT_TRUE(LaunchStoreHostKT(nullptr, hs, 0, 0, 2, 128, nullptr, 64, nullptr).ok());

  // LaunchGatherKvRows(host, host_rows, src_first, idx, count, n_kv, head_dim,
  //                    dst_k, dst_v, dst_head_stride, dst_first, stream)
  ExpectBad(LaunchGatherKvRows(p, -1, 0, idx, 4, 2, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRows: host_rows");
  ExpectBad(LaunchGatherKvRows(p, 64, -1, idx, 4, 2, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRows: src_first");
  ExpectBad(LaunchGatherKvRows(p, 64, 0, idx, -4, 2, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRows: count");
  ExpectBad(LaunchGatherKvRows(p, 64, 0, idx, 4, 2, 128, p, p, hs, -1, nullptr), "LaunchGatherKvRows: dst_first");
  ExpectBad(LaunchGatherKvRows(p, 64, 0, idx, 4, 2, 128, p, p, hs, 61, nullptr), "LaunchGatherKvRows: dst_head_stride");
  ExpectBad(LaunchGatherKvRows(p, 64, 0, idx, 4, 2, 128, p, p, 100, 0, nullptr), "LaunchGatherKvRows: dst_head_stride");
  ExpectBad(LaunchGatherKvRows(p, 64, 0, idx, 4, 2, 60, p, p, hs, 0, nullptr), "LaunchGatherKvRows: head_dim");
  ExpectBad(LaunchGatherKvRows(nullptr, 64, 0, idx, 4, 2, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRows: host is null");
  ExpectBad(LaunchGatherKvRows(p, 64, 0, nullptr, 4, 2, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRows: idx is null");
  ExpectBad(LaunchGatherKvRows(p, 64, 0, idx, 4, 2, 128, nullptr, p, hs, 0, nullptr), "LaunchGatherKvRows: dst_k is null");
  ExpectBad(LaunchGatherKvRows(p, 64, 0, idx, 4, 2, 128, p, nullptr, hs, 0, nullptr), "LaunchGatherKvRows: dst_v is null");
  ExpectBad(LaunchGatherKvRows(odd, 64, 0, idx, 4, 2, 128, p, p, hs, 0, nullptr), "LaunchGatherKvRows: host is not 16-byte");
  EXPECT_TRUE(LaunchGatherKvRows(nullptr, 64, 0, nullptr, 0, 2, 128, nullptr, nullptr, hs, 0, nullptr).ok());

  // LaunchAssignSlots(slot_tok, next, count, n_kv, miss, reused, stream)
  ExpectBad(LaunchAssignSlots(idx, idx + 4, 4, 0, idx + 8, nullptr, nullptr), "LaunchAssignSlots: n_kv");
  ExpectBad(LaunchAssignSlots(idx, idx + 4, -1, 2, idx + 8, nullptr, nullptr), "LaunchAssignSlots: count");
  ExpectBad(LaunchAssignSlots(idx, idx + 4, kAssignSlotsMaxCount + 1, 2, idx + 8, nullptr, nullptr),
            "LaunchAssignSlots: count");
  ExpectBad(LaunchAssignSlots(nullptr, idx + 4, 4, 2, idx + 8, nullptr, nullptr),
            "LaunchAssignSlots: slot_tok is null");
  ExpectBad(LaunchAssignSlots(idx, nullptr, 4, 2, idx + 8, nullptr, nullptr), "LaunchAssignSlots: next is null");
  ExpectBad(LaunchAssignSlots(idx, idx + 4, 4, 2, nullptr, nullptr, nullptr), "LaunchAssignSlots: miss is null");
  EXPECT_TRUE(LaunchAssignSlots(nullptr, nullptr, 0, 2, nullptr, nullptr, nullptr).ok());

  // LaunchMaxAbsUpdate(k, head_stride, first, n, n_kv, head_dim, max_abs, stream)
  ExpectBad(LaunchMaxAbsUpdate(p, hs, 0, 4, 2, 128, nullptr, nullptr), "LaunchMaxAbsUpdate: max_abs is null");
  ExpectBad(LaunchMaxAbsUpdate(nullptr, hs, 0, 4, 2, 128, f, nullptr), "LaunchMaxAbsUpdate: k is null");
  ExpectBad(LaunchMaxAbsUpdate(p, hs, 60, 5, 2, 128, f, nullptr), "LaunchMaxAbsUpdate: head_stride");
  ExpectBad(LaunchMaxAbsUpdate(p, hs, -1, 5, 2, 128, f, nullptr), "LaunchMaxAbsUpdate: first");
  ExpectBad(LaunchMaxAbsUpdate(p, hs, 0, 4, 2, 7, f, nullptr), "LaunchMaxAbsUpdate: head_dim");
  EXPECT_TRUE(LaunchMaxAbsUpdate(nullptr, hs, 0, 0, 2, 128, nullptr, nullptr).ok());

  // LaunchSparseAppendToken(src_k, src_v, src_head_stride, d_pos, row_offset, n_kv,
  //                         head_dim, dst_k, dst_v, dst_head_stride, d_len, stream)
  ExpectBad(LaunchSparseAppendToken(p, p, hs, idx, 0, 0, 128, p, p, hs, idx, nullptr), "LaunchSparseAppendToken: n_kv");
  ExpectBad(LaunchSparseAppendToken(p, p, 4, idx, 0, 2, 128, p, p, hs, idx, nullptr), "LaunchSparseAppendToken: src_head_stride");
  ExpectBad(LaunchSparseAppendToken(p, p, hs, idx, 0, 2, 128, p, p, 64, idx, nullptr), "LaunchSparseAppendToken: dst_head_stride");
  ExpectBad(LaunchSparseAppendToken(p, p, hs, nullptr, 0, 2, 128, p, p, hs, idx, nullptr), "LaunchSparseAppendToken: d_pos is null");
  ExpectBad(LaunchSparseAppendToken(p, p, hs, idx, 0, 2, 128, p, p, hs, nullptr, nullptr), "LaunchSparseAppendToken: d_len is null");
  ExpectBad(LaunchSparseAppendToken(nullptr, p, hs, idx, 0, 2, 128, p, p, hs, idx, nullptr), "LaunchSparseAppendToken: src_k is null");
  ExpectBad(LaunchSparseAppendToken(p, odd, hs, idx, 0, 2, 128, p, p, hs, idx, nullptr), "LaunchSparseAppendToken: src_v is not 16-byte");
  ExpectBad(LaunchSparseAppendToken(p, p, hs, idx, 0, 2, 128, nullptr, p, hs, idx, nullptr), "LaunchSparseAppendToken: dst_k is null");
  ExpectBad(LaunchSparseAppendToken(p, p, hs, idx, 0, 2, 128, p, odd, hs, idx, nullptr), "LaunchSparseAppendToken: dst_v is not 16-byte");
}

}  // namespace
}  // namespace tailorkv::cuda
