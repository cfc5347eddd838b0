// Selection-index kernels against runtime/sparse_reference.h:
// - group mean, channel choice, index build and both score kernels are
//   compared BIT-EXACTLY (the contract: same arithmetic as the CPU on
//   bf16 inputs, so GPU and CPU select the same tokens); channel choice
//   with heavy ties, NaN (0 * inf, NaN queries) and negative products;
// - the speculative query within a tolerance (its dot products are summed
//   in another order), both RoPE styles, replayed from a CUDA graph at two
//   positions read from the device;
// - odd sizes (n_kv 3, G 1 and 4, d 1/7/8/32, odd first and n), host memory
//   mapped with cudaHostAlloc for the host rows and kt, poisoned outputs
//   whose slots past the written range must stay poisoned;
// - argument validation (runs without a device: nothing is launched).
#include "cuda/sparse_index_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/test_host_mapped.h"
#include "cuda/test_rng.h"
#include "runtime/sparse_reference.h"

namespace tailorkv::cuda {
namespace {

using bf16 = __nv_bfloat16;
using test_util::RandomPool;
using test_util::Rng;

constexpr uint32_t kPoisonBits = 0x7BADBEEFu;  // a float pattern no kernel writes
constexpr uint16_t kPoisonBf16 = 0x7BAD;

uint32_t Bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
float FromBits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}
uint16_t Bits16(bf16 x) { return static_cast<__nv_bfloat16_raw>(x).x; }
bf16 FromBits16(uint16_t b) {
  __nv_bfloat16_raw r;
  r.x = b;
  return bf16(r);
}
float ToF(bf16 x) { return __bfloat162float(x); }

std::vector<bf16> RandomBf16(size_t n, Rng& rng, float lo, float hi) {
  std::vector<bf16> v(n);
  for (auto& e : v) e = __float2bfloat16(rng.Uniform(lo, hi));
  return v;
}

class SparseIndexKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

using test_util::HostMapped;

template <typename T>
DeviceBuffer Upload(const std::vector<T>& v) {
  absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(std::max<size_t>(v.size(), 1) * sizeof(T));
  EXPECT_TRUE(b.ok()) << b.status();
  if (!b.ok()) return DeviceBuffer();
  EXPECT_EQ(cudaMemcpy(b->get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return std::move(*b);
}

template <typename T>
std::vector<T> Download(const DeviceBuffer& b, size_t n) {
  std::vector<T> v(n);
  EXPECT_EQ(cudaMemcpy(v.data(), b.get(), n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return v;
}

// Per head, d distinct channels ascending; pairs (c, c ^ 1) and (c, c +-
// head_dim / 2) are made likely so the speculative query rotates both
// members of a pair in one launch.
std::vector<int32_t> RandomChans(int n_kv, int head_dim, int d, Rng& rng) {
  std::vector<int32_t> chans;
  for (int h = 0; h < n_kv; ++h) {
    std::vector<int> all(head_dim);
    std::iota(all.begin(), all.end(), 0);
    for (int i = head_dim - 1; i > 0; --i) {
      const int j = std::min(i, static_cast<int>(rng.Uniform(0.0f, static_cast<float>(i + 1))));
      std::swap(all[i], all[j]);
    }
    std::vector<int> pick;
    for (int i = 0; static_cast<int>(pick.size()) < d; ++i) {
      const int c = all[i];
      if (std::find(pick.begin(), pick.end(), c) != pick.end()) continue;
      pick.push_back(c);
      const int mate = (i % 2 == 0) ? (c ^ 1) : (c + head_dim / 2) % head_dim;
      if (static_cast<int>(pick.size()) < d && std::find(pick.begin(), pick.end(), mate) == pick.end()) {
        pick.push_back(mate);
      }
    }
    std::sort(pick.begin(), pick.end());
    chans.insert(chans.end(), pick.begin(), pick.end());
  }
  return chans;
}

// ---------------------------------------------------------------------------
// Group mean
// ---------------------------------------------------------------------------

void CheckGroupMean(int n_kv, int group, int head_dim, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << n_kv << " G=" << group << " head_dim=" << head_dim);
  Rng rng(seed);
  const int n_heads = n_kv * group;
  std::vector<bf16> q = RandomBf16(static_cast<size_t>(n_heads) * head_dim, rng, -40.0f, 40.0f);
  q[1] = __float2bfloat16(3.0e38f);  // sums that overflow to inf must do so on both sides
  if (group > 1) q[head_dim + 1] = __float2bfloat16(3.0e38f);
  DeviceBuffer d_q = Upload(q);
  std::vector<float> poison(static_cast<size_t>(n_kv) * head_dim + 3, FromBits(kPoisonBits));
  DeviceBuffer d_mean = Upload(poison);
  ASSERT_TRUE(LaunchGroupMeanQuery(d_q.as<bf16>(), n_heads, n_kv, head_dim, d_mean.as<float>(), nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = Download<float>(d_mean, poison.size());
  int bad = 0;
  for (int h = 0; h < n_kv; ++h) {
    for (int c = 0; c < head_dim; ++c) {
      float sum = 0.0f;
      for (int g = 0; g < group; ++g) sum += ToF(q[(static_cast<size_t>(h) * group + g) * head_dim + c]);
      const float want = sum / static_cast<float>(group);
      const float g = got[static_cast<size_t>(h) * head_dim + c];
      if (Bits(g) != Bits(want) && bad++ < 5) {
        ADD_FAILURE() << "h " << h << " c " << c << ": got " << g << " want " << want;
      }
    }
  }
  for (size_t i = static_cast<size_t>(n_kv) * head_dim; i < got.size(); ++i) {
    EXPECT_EQ(Bits(got[i]), kPoisonBits) << "sentinel " << i << " overwritten";
  }
}

TEST_F(SparseIndexKernelsTest, GroupMeanQueryIsBitExact) {
  CheckGroupMean(3, 1, 64, 1);
  CheckGroupMean(3, 4, 128, 2);
  CheckGroupMean(8, 4, 128, 3);
  CheckGroupMean(2, 3, 64, 4);  // G = 3: the division rounds
  CheckGroupMean(1, 7, 128, 5);
}

// The real query on fixed channels: the group mean's bits, picked.
void CheckGroupMeanOnChannels(int n_kv, int group, int head_dim, int d, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << n_kv << " G=" << group << " head_dim=" << head_dim
                                  << " d=" << d);
  Rng rng(seed);
  const int n_heads = n_kv * group;
  const std::vector<bf16> q = RandomBf16(static_cast<size_t>(n_heads) * head_dim, rng, -40.0f, 40.0f);
  const std::vector<int32_t> chans = RandomChans(n_kv, head_dim, d, rng);
  DeviceBuffer d_q = Upload(q), d_chans = Upload(chans);
  std::vector<float> poison(static_cast<size_t>(n_kv) * d + 3, FromBits(kPoisonBits));
  DeviceBuffer d_out = Upload(poison);
  DeviceBuffer d_mean = Upload(std::vector<float>(static_cast<size_t>(n_kv) * head_dim));
  ASSERT_TRUE(LaunchGroupMeanOnChannels(d_q.as<bf16>(), n_heads, n_kv, head_dim, d_chans.as<int32_t>(),
                                        d, d_out.as<float>(), nullptr).ok());
  ASSERT_TRUE(LaunchGroupMeanQuery(d_q.as<bf16>(), n_heads, n_kv, head_dim, d_mean.as<float>(), nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = Download<float>(d_out, poison.size());
  const std::vector<float> mean = Download<float>(d_mean, static_cast<size_t>(n_kv) * head_dim);
  for (int h = 0; h < n_kv; ++h) {
    for (int j = 0; j < d; ++j) {
      const float want = mean[static_cast<size_t>(h) * head_dim + chans[h * d + j]];
      EXPECT_EQ(Bits(got[static_cast<size_t>(h) * d + j]), Bits(want)) << "h " << h << " j " << j;
    }
  }
  for (size_t i = static_cast<size_t>(n_kv) * d; i < got.size(); ++i) {
    EXPECT_EQ(Bits(got[i]), kPoisonBits) << "sentinel " << i << " overwritten";
  }
}

TEST_F(SparseIndexKernelsTest, GroupMeanOnChannelsPicksTheGroupMean) {
  CheckGroupMeanOnChannels(3, 3, 64, 32, 11);  // G = 3: the division rounds
  CheckGroupMeanOnChannels(8, 4, 128, 32, 12);
  CheckGroupMeanOnChannels(2, 1, 64, 64, 13);  // every channel
  CheckGroupMeanOnChannels(1, 7, 128, 5, 14);
}

// ---------------------------------------------------------------------------
// Channel choice
// ---------------------------------------------------------------------------

enum class ChanDist { kContinuous, kTies, kNaN };

void CheckChooseChannels(int n_kv, int head_dim, int d, ChanDist dist, bool with_q_chan,
                         uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << n_kv << " head_dim=" << head_dim << " d=" << d
                                  << " dist=" << static_cast<int>(dist) << " q_chan=" << with_q_chan);
  Rng rng(seed);
  const size_t total = static_cast<size_t>(n_kv) * head_dim;
  std::vector<float> q(total), mx(total);
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (size_t i = 0; i < total; ++i) {
    q[i] = rng.Uniform(-3.0f, 3.0f);
    mx[i] = rng.Uniform(0.0f, 5.0f);
    if (dist == ChanDist::kTies) {  // few distinct products, -0.0 and +0.0 among them
      q[i] = std::floor(rng.Uniform(-2.0f, 3.0f));
      mx[i] = std::floor(rng.Uniform(0.0f, 3.0f));
      if (rng.Uniform(0.0f, 1.0f) < 0.1f) mx[i] = -0.0f;  // |q| * -0 = -0, just below +0
    } else if (dist == ChanDist::kNaN) {
      const float u = rng.Uniform(0.0f, 1.0f);
      if (u < 0.15f) q[i] = nan;
      else if (u < 0.25f) { q[i] = 0.0f; mx[i] = inf; }  // 0 * inf = NaN
      else if (u < 0.30f) mx[i] = inf;
      else if (u < 0.35f) mx[i] = -rng.Uniform(0.0f, 5.0f);  // negative products rank low
      else if (u < 0.40f) q[i] = -nan;
    }
  }
  DeviceBuffer d_q = Upload(q), d_mx = Upload(mx);
  const int slots = n_kv * d + 5;
  std::vector<int32_t> chan_poison(slots, static_cast<int32_t>(kPoisonBits));
  std::vector<float> qc_poison(slots, FromBits(kPoisonBits));
  DeviceBuffer d_chans = Upload(chan_poison), d_qc = Upload(qc_poison);
  absl::Status st = LaunchChooseChannels(d_q.as<float>(), d_mx.as<float>(), n_kv, head_dim, d,
                                         d_chans.as<int32_t>(), with_q_chan ? d_qc.as<float>() : nullptr,
                                         nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<int32_t> chans = Download<int32_t>(d_chans, slots);
  const std::vector<float> qc = Download<float>(d_qc, slots);
  std::vector<int32_t> want(d);
  for (int h = 0; h < n_kv; ++h) {
    absl::StatusOr<int> m = runtime::ChooseChannels(q.data() + h * head_dim, mx.data() + h * head_dim,
                                                    head_dim, d, want.data());
    ASSERT_TRUE(m.ok()) << m.status();
    ASSERT_EQ(*m, d);
    for (int j = 0; j < d; ++j) {
      ASSERT_EQ(chans[h * d + j], want[j]) << "head " << h << " slot " << j;
      if (with_q_chan) {
        ASSERT_EQ(Bits(qc[h * d + j]), Bits(q[h * head_dim + want[j]])) << "q_chan head " << h << " slot " << j;
      }
    }
  }
  for (int i = n_kv * d; i < slots; ++i) {
    EXPECT_EQ(static_cast<uint32_t>(chans[i]), kPoisonBits) << "chans sentinel " << i;
    EXPECT_EQ(Bits(qc[i]), kPoisonBits) << "q_chan sentinel " << i;
  }
  if (!with_q_chan) {
    for (int i = 0; i < slots; ++i) ASSERT_EQ(Bits(qc[i]), kPoisonBits) << "q_chan written while null";
  }
}

TEST_F(SparseIndexKernelsTest, ChooseChannelsMatchesReference) {
  uint64_t seed = 100;
  for (int head_dim : {64, 128}) {
    for (int d : {1, 7, 8, 32, 64}) {
      for (ChanDist dist : {ChanDist::kContinuous, ChanDist::kTies, ChanDist::kNaN}) {
        CheckChooseChannels(3, head_dim, d, dist, true, ++seed);
      }
    }
  }
  CheckChooseChannels(8, 128, 16, ChanDist::kTies, false, 7);
}

TEST_F(SparseIndexKernelsTest, ChooseChannelsAllEqualTakesLowestIndices) {
  // Every product equal (and every one NaN): ties go to the smaller index.
  for (float v : {1.0f, std::numeric_limits<float>::quiet_NaN()}) {
    const int n_kv = 2, head_dim = 64, d = 7;
    std::vector<float> q(n_kv * head_dim, v), mx(n_kv * head_dim, 1.0f);
    DeviceBuffer d_q = Upload(q), d_mx = Upload(mx);
    DeviceBuffer d_chans = Upload(std::vector<int32_t>(n_kv * d, -5));
    ASSERT_TRUE(LaunchChooseChannels(d_q.as<float>(), d_mx.as<float>(), n_kv, head_dim, d,
                                     d_chans.as<int32_t>(), nullptr, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<int32_t> got = Download<int32_t>(d_chans, n_kv * d);
    for (int h = 0; h < n_kv; ++h) {
      for (int j = 0; j < d; ++j) EXPECT_EQ(got[h * d + j], j) << "v=" << v << " head " << h;
    }
  }
}

// ---------------------------------------------------------------------------
// Index build (host rows in mapped memory)
// ---------------------------------------------------------------------------

void CheckBuildIndex(int n_kv, int head_dim, int d, int64_t host_rows, int rows, int64_t index_rows,
                     uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << n_kv << " head_dim=" << head_dim << " d=" << d
                                  << " rows=" << rows);
  Rng rng(seed);
  const size_t host_elems = static_cast<size_t>(n_kv) * host_rows * 2 * head_dim;
  HostMapped host(host_elems * sizeof(bf16));
  ASSERT_NE(host.host, nullptr);
  ASSERT_NE(host.device(), nullptr);
  bf16* hp = static_cast<bf16*>(host.host);
  for (size_t i = 0; i < host_elems; ++i) hp[i] = __float2bfloat16(rng.Uniform(-8.0f, 8.0f));
  const std::vector<int32_t> chans = RandomChans(n_kv, head_dim, d, rng);
  DeviceBuffer d_chans = Upload(chans);
  const size_t index_elems = static_cast<size_t>(n_kv) * index_rows * d;
  DeviceBuffer d_index = Upload(std::vector<bf16>(index_elems, FromBits16(kPoisonBf16)));
  absl::Status st = LaunchBuildChannelIndex(static_cast<const bf16*>(host.device()), host_rows, rows,
                                            d_chans.as<int32_t>(), d, n_kv, head_dim,
                                            d_index.as<bf16>(), index_rows, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<bf16> got = Download<bf16>(d_index, index_elems);
  int bad = 0;
  for (int h = 0; h < n_kv; ++h) {
    for (int64_t p = 0; p < index_rows; ++p) {
      for (int j = 0; j < d; ++j) {
        const size_t at = (static_cast<size_t>(h) * index_rows + p) * d + j;
        const uint16_t want =
            p < rows ? Bits16(hp[(static_cast<size_t>(h) * host_rows + p) * 2 * head_dim + chans[h * d + j]])
                     : kPoisonBf16;  // rows past `rows` stay untouched
        if (Bits16(got[at]) != want && bad++ < 5) {
          ADD_FAILURE() << "head " << h << " row " << p << " j " << j << ": got " << Bits16(got[at])
                        << " want " << want;
        }
      }
    }
  }
}

TEST_F(SparseIndexKernelsTest, BuildChannelIndexFromMappedHostRows) {
  uint64_t seed = 200;
  for (int head_dim : {64, 128}) {
    for (int d : {1, 7, 8, 32, 48, 64}) CheckBuildIndex(3, head_dim, d, 203, 131, 140, ++seed);
  }
  CheckBuildIndex(2, 128, 8, 64, 64, 64, 9);  // exactly one full tile
  CheckBuildIndex(1, 64, 5, 10, 1, 3, 10);     // a single row
}

// ---------------------------------------------------------------------------
// Speculative query
// ---------------------------------------------------------------------------

struct SpecCase {
  int n_kv, group, head_dim, hidden, d;
  bool adjacent;
};

struct SpecData {
  std::vector<bf16> x16, w16;
  std::vector<float> x, w, inv_freq;
  std::vector<int32_t> chans;
};

SpecData MakeSpecData(const SpecCase& c, uint64_t seed) {
  Rng rng(seed);
  SpecData s;
  const size_t rows = static_cast<size_t>(c.n_kv) * c.group * c.head_dim;
  s.x16 = RandomBf16(c.hidden, rng, -1.0f, 1.0f);
  s.w16 = RandomBf16(rows * c.hidden, rng, -0.1f, 0.1f);
  for (bf16 v : s.x16) s.x.push_back(ToF(v));
  for (bf16 v : s.w16) s.w.push_back(ToF(v));
  for (int i = 0; i < c.head_dim / 2; ++i) {
    s.inv_freq.push_back(std::pow(500000.0f, -2.0f * i / static_cast<float>(c.head_dim)));
  }
  s.chans = RandomChans(c.n_kv, c.head_dim, c.d, rng);
  return s;
}

// Tolerance: the GPU sums each dot product as 32 lane partial sums then a
// butterfly (and may fuse multiply-adds); the CPU sums in input order.
// Both are fp32 with errors ~ hidden * 2^-24 * sum |w_i x_i| at worst, far
// below 1e-3 of the vector's largest value for these magnitudes; bounding by
// the largest value (not each entry's own) because an entry near zero after
// cancellation has no meaningful relative error. cosf/sinf (CUDA's, within
// 2 ulp) vs glibc's add ~1e-7 relative.
void ExpectSpecClose(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  float max_abs = 0.0f;
  for (float v : want) max_abs = std::max(max_abs, std::fabs(v));
  ASSERT_GT(max_abs, 0.0f);
  const float tol = 1e-3f * max_abs;
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(got[i] - want[i]) <= tol) && bad++ < 5) {
      ADD_FAILURE() << what << " entry " << i << ": got " << got[i] << " want " << want[i]
                    << " (tol " << tol << ")";
    }
  }
}

void CheckSpec(const SpecCase& c, int pos, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << c.n_kv << " G=" << c.group << " head_dim=" << c.head_dim
                                  << " hidden=" << c.hidden << " d=" << c.d << " adjacent=" << c.adjacent
                                  << " pos=" << pos);
  const SpecData s = MakeSpecData(c, seed);
  const int n_heads = c.n_kv * c.group;
  DeviceBuffer d_x = Upload(s.x16), d_w = Upload(s.w16), d_chans = Upload(s.chans),
               d_freq = Upload(s.inv_freq), d_pos = Upload(std::vector<int32_t>{pos});
  const int n_out = c.n_kv * c.d;
  DeviceBuffer d_out = Upload(std::vector<float>(n_out + 3, FromBits(kPoisonBits)));
  absl::Status st = LaunchSpeculativeQuery(d_x.as<bf16>(), d_w.as<bf16>(), c.hidden, n_heads, c.n_kv,
                                           c.head_dim, d_chans.as<int32_t>(), c.d, d_pos.as<int32_t>(),
                                           d_freq.as<float>(), c.adjacent, d_out.as<float>(), nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got = Download<float>(d_out, n_out + 3);
  for (int i = n_out; i < n_out + 3; ++i) EXPECT_EQ(Bits(got[i]), kPoisonBits) << "sentinel " << i;
  got.resize(n_out);
  std::vector<float> want(n_out);
  runtime::SpeculativeQueryMean(s.x.data(), s.w.data(), c.hidden, n_heads, c.n_kv, c.head_dim,
                                s.chans.data(), c.d, pos, s.inv_freq.data(), c.adjacent, want.data());
  ExpectSpecClose(got, want, "spec");
}

TEST_F(SparseIndexKernelsTest, SpeculativeQueryMatchesReference) {
  uint64_t seed = 300;
  for (bool adjacent : {true, false}) {
    // hidden 4096: Llama-8B's; 1000: 16-byte loads with a ragged tail; 999:
    // the scalar path (rows not 16-byte aligned).
    CheckSpec({3, 1, 64, 1000, 7, adjacent}, 5, ++seed);
    CheckSpec({3, 4, 128, 4096, 8, adjacent}, 12345, ++seed);
    CheckSpec({3, 4, 128, 999, 32, adjacent}, 77, ++seed);
    CheckSpec({2, 4, 64, 4096, 1, adjacent}, 0, ++seed);
    CheckSpec({8, 4, 128, 4096, 32, adjacent}, 131071, ++seed);
  }
}

// Captured once, replayed at two positions written to d_pos between replays:
// the position must be read on the device at replay time.
TEST_F(SparseIndexKernelsTest, SpeculativeQueryGraphReplaysAtDevicePosition) {
  for (bool adjacent : {true, false}) {
    const SpecCase c{3, 4, 128, 4096, 8, adjacent};
    const SpecData s = MakeSpecData(c, adjacent ? 401 : 402);
    const int n_heads = c.n_kv * c.group, n_out = c.n_kv * c.d;
    DeviceBuffer d_x = Upload(s.x16), d_w = Upload(s.w16), d_chans = Upload(s.chans),
                 d_freq = Upload(s.inv_freq), d_pos = Upload(std::vector<int32_t>{0}),
                 d_out = Upload(std::vector<float>(n_out, FromBits(kPoisonBits)));
    absl::StatusOr<CudaStream> stream = CudaStream::Create();
    ASSERT_TRUE(stream.ok()) << stream.status();
    ASSERT_EQ(cudaStreamBeginCapture(stream->get(), cudaStreamCaptureModeThreadLocal), cudaSuccess);
    absl::Status st = LaunchSpeculativeQuery(d_x.as<bf16>(), d_w.as<bf16>(), c.hidden, n_heads, c.n_kv,
                                             c.head_dim, d_chans.as<int32_t>(), c.d, d_pos.as<int32_t>(),
                                             d_freq.as<float>(), c.adjacent, d_out.as<float>(),
                                             stream->get());
    absl::StatusOr<CudaGraphExec> graph = CudaGraphExec::EndCapture(stream->get());
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_TRUE(graph.ok()) << graph.status();
    std::vector<std::vector<float>> results;
    for (int pos : {9, 40000}) {
      SCOPED_TRACE(testing::Message() << "adjacent=" << adjacent << " pos=" << pos);
      ASSERT_EQ(cudaMemcpyAsync(d_pos.get(), &pos, 4, cudaMemcpyHostToDevice, stream->get()), cudaSuccess);
      ASSERT_TRUE(graph->Launch(stream->get()).ok());
      ASSERT_EQ(cudaStreamSynchronize(stream->get()), cudaSuccess);
      const std::vector<float> got = Download<float>(d_out, n_out);
      std::vector<float> want(n_out);
      runtime::SpeculativeQueryMean(s.x.data(), s.w.data(), c.hidden, n_heads, c.n_kv, c.head_dim,
                                    s.chans.data(), c.d, pos, s.inv_freq.data(), c.adjacent, want.data());
      ExpectSpecClose(got, want, "graph");
      results.push_back(got);
    }
    // The two positions rotate differently: a graph that froze the position
    // at capture would give the same vector twice.
    int differ = 0;
    for (int i = 0; i < n_out; ++i) differ += results[0][i] != results[1][i];
    EXPECT_GT(differ, n_out / 2) << "adjacent=" << adjacent;
  }
}

// ---------------------------------------------------------------------------
// Scores
// ---------------------------------------------------------------------------

// q values on the chosen channels: arbitrary fp32 (not bf16-rounded), so
// the products round and any change of order or fusion shows.
std::vector<float> RandomQChan(int n, Rng& rng) {
  std::vector<float> q(n);
  for (auto& v : q) v = rng.Uniform(-3.0f, 3.0f);
  return q;
}

// Compares scores [n_kv][stride] bit-exactly with want [n_kv][n]; slots past
// n stay poisoned.
void ExpectScores(const std::vector<float>& got, const std::vector<float>& want, int n_kv, int n,
                  int64_t stride) {
  int bad = 0;
  for (int h = 0; h < n_kv; ++h) {
    for (int64_t i = 0; i < stride; ++i) {
      const float g = got[h * stride + i];
      const uint32_t w = i < n ? Bits(want[static_cast<size_t>(h) * n + i]) : kPoisonBits;
      if (Bits(g) != w && bad++ < 5) {
        ADD_FAILURE() << "head " << h << " token " << i << ": got " << g << " want " << FromBits(w)
                      << (i >= n ? " (sentinel)" : "");
      }
    }
  }
}

// pooled: the scores of a refine pool's positions (RandomPool) instead of
// [first, first + n).
void CheckScoreIndex(int n_kv, int d, int64_t index_rows, int first, int n, bool misalign,
                     uint64_t seed, bool pooled = false) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << n_kv << " d=" << d << " first=" << first << " n=" << n
                                  << " misaligned=" << misalign << (pooled ? " pooled" : ""));
  Rng rng(seed);
  const size_t elems = static_cast<size_t>(n_kv) * index_rows * d;
  // One leading element when misaligned: the rows are then not 16-byte
  // aligned and the kernel must take its 2-byte path.
  std::vector<bf16> buf = RandomBf16(elems + 1, rng, -4.0f, 4.0f);
  const size_t off = misalign ? 1 : 0;
  const std::vector<float> q = RandomQChan(n_kv * d, rng);
  const int64_t stride = n + 5;
  const std::vector<int32_t> pool =
      pooled ? RandomPool(n_kv, n, static_cast<int>(index_rows - first), rng) : std::vector<int32_t>();
  DeviceBuffer d_buf = Upload(buf), d_q = Upload(q),
               d_scores = Upload(std::vector<float>(n_kv * stride, FromBits(kPoisonBits))),
               d_pool = Upload(pooled ? pool : std::vector<int32_t>(1));
  absl::Status st = LaunchScoreChannelIndex(d_q.as<float>(), d_buf.as<bf16>() + off, index_rows, d, n_kv,
                                            first, n, d_scores.as<float>(), stride, nullptr,
                                            pooled ? d_pool.as<int32_t>() : nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = Download<float>(d_scores, n_kv * stride);
  std::vector<float> want(static_cast<size_t>(n_kv) * n), rows(static_cast<size_t>(n) * d);
  for (int h = 0; h < n_kv; ++h) {
    for (int i = 0; i < n; ++i) {
      const int64_t p = first + (pooled ? pool[static_cast<size_t>(h) * n + i] : i);
      for (int j = 0; j < d; ++j) {
        rows[static_cast<size_t>(i) * d + j] =
            p < index_rows ? ToF(buf[off + (static_cast<size_t>(h) * index_rows + p) * d + j]) : 0.0f;
      }
    }
    runtime::ScoreOnChannels(q.data() + h * d, d, rows.data(), n, want.data() + static_cast<size_t>(h) * n);
    if (pooled) want[static_cast<size_t>(h) * n + n - 1] = -INFINITY;  // RandomPool's out-of-range entry
  }
  ExpectScores(got, want, n_kv, n, stride);
}

TEST_F(SparseIndexKernelsTest, ScoreChannelIndexIsBitExact) {
  uint64_t seed = 500;
  for (int d : {1, 7, 8, 16, 24, 32, 40, 48, 64}) CheckScoreIndex(3, d, 1000, 37, 901, false, ++seed);
  CheckScoreIndex(3, 8, 1000, 37, 901, true, ++seed);   // d = 8 on the 2-byte path
  CheckScoreIndex(3, 32, 300, 0, 300, true, ++seed);    // every row, 2-byte path
  CheckScoreIndex(8, 8, 70001, 3, 69997, false, ++seed);  // many blocks
  CheckScoreIndex(1, 7, 5, 4, 1, false, ++seed);          // one token, the last row
  // Refine pools: scattered positions, both load paths.
  CheckScoreIndex(3, 32, 5000, 37, 300, false, ++seed, /*pooled=*/true);
  CheckScoreIndex(3, 7, 5000, 37, 300, false, ++seed, /*pooled=*/true);
  CheckScoreIndex(8, 64, 70001, 3, 3584, false, ++seed, /*pooled=*/true);
}

void CheckScoreFaithful(int n_kv, int head_dim, int d, int64_t kt_cols, int first, int n,
                        uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "n_kv=" << n_kv << " head_dim=" << head_dim << " d=" << d
                                  << " first=" << first << " n=" << n);
  Rng rng(seed);
  const size_t elems = static_cast<size_t>(n_kv) * head_dim * kt_cols;
  HostMapped kt(elems * sizeof(bf16));
  ASSERT_NE(kt.host, nullptr);
  ASSERT_NE(kt.device(), nullptr);
  bf16* kp = static_cast<bf16*>(kt.host);
  for (size_t i = 0; i < elems; ++i) kp[i] = __float2bfloat16(rng.Uniform(-4.0f, 4.0f));
  const std::vector<int32_t> chans = RandomChans(n_kv, head_dim, d, rng);
  const std::vector<float> q = RandomQChan(n_kv * d, rng);
  const int64_t stride = n + 3;
  DeviceBuffer d_chans = Upload(chans), d_q = Upload(q),
               d_scores = Upload(std::vector<float>(n_kv * stride, FromBits(kPoisonBits)));
  absl::Status st = LaunchScoreFaithful(d_q.as<float>(), d_chans.as<int32_t>(), d,
                                        static_cast<const bf16*>(kt.device()), kt_cols, n_kv, head_dim,
                                        first, n, d_scores.as<float>(), stride, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = Download<float>(d_scores, n_kv * stride);
  std::vector<float> want(static_cast<size_t>(n_kv) * n), rows(static_cast<size_t>(n) * d);
  for (int h = 0; h < n_kv; ++h) {
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < d; ++j) {
        const int c = chans[h * d + j];
        rows[static_cast<size_t>(i) * d + j] =
            ToF(kp[(static_cast<size_t>(h) * head_dim + c) * kt_cols + first + i]);
      }
    }
    runtime::ScoreOnChannels(q.data() + h * d, d, rows.data(), n, want.data() + static_cast<size_t>(h) * n);
  }
  ExpectScores(got, want, n_kv, n, stride);
}

TEST_F(SparseIndexKernelsTest, ScoreFaithfulFromMappedHostIsBitExact) {
  uint64_t seed = 600;
  for (int head_dim : {64, 128}) {
    for (int d : {1, 7, 8, 32, 64}) CheckScoreFaithful(3, head_dim, d, 517, 13, 491, ++seed);
  }
  CheckScoreFaithful(2, 128, 8, 4099, 0, 4099, ++seed);  // every column, several blocks
  CheckScoreFaithful(1, 64, 3, 9, 8, 1, ++seed);          // one token, the last column
}

// The index path end to end on the GPU: group mean -> channels -> index build
// -> scores equals the CPU's chain on the same bf16 inputs.
TEST_F(SparseIndexKernelsTest, ChooseThenBuildThenScoreMatchesCpuChain) {
  const int n_kv = 3, group = 4, head_dim = 128, d = 8, rows = 257;
  const int n_heads = n_kv * group;
  Rng rng(700);
  const std::vector<bf16> q = RandomBf16(static_cast<size_t>(n_heads) * head_dim, rng, -2.0f, 2.0f);
  std::vector<float> mx(n_kv * head_dim);
  for (auto& v : mx) v = rng.Uniform(0.0f, 6.0f);
  const size_t host_elems = static_cast<size_t>(n_kv) * rows * 2 * head_dim;
  HostMapped host(host_elems * sizeof(bf16));
  ASSERT_NE(host.host, nullptr);
  bf16* hp = static_cast<bf16*>(host.host);
  for (size_t i = 0; i < host_elems; ++i) hp[i] = __float2bfloat16(rng.Uniform(-3.0f, 3.0f));
  DeviceBuffer d_q = Upload(q), d_mx = Upload(mx),
               d_mean = Upload(std::vector<float>(n_kv * head_dim)),
               d_chans = Upload(std::vector<int32_t>(n_kv * d)), d_qc = Upload(std::vector<float>(n_kv * d)),
               d_index = Upload(std::vector<bf16>(static_cast<size_t>(n_kv) * rows * d)),
               d_scores = Upload(std::vector<float>(static_cast<size_t>(n_kv) * rows));
  ASSERT_TRUE(LaunchGroupMeanQuery(d_q.as<bf16>(), n_heads, n_kv, head_dim, d_mean.as<float>(), nullptr).ok());
  ASSERT_TRUE(LaunchChooseChannels(d_mean.as<float>(), d_mx.as<float>(), n_kv, head_dim, d,
                                   d_chans.as<int32_t>(), d_qc.as<float>(), nullptr).ok());
  ASSERT_TRUE(LaunchBuildChannelIndex(static_cast<const bf16*>(host.device()), rows, rows,
                                      d_chans.as<int32_t>(), d, n_kv, head_dim, d_index.as<bf16>(), rows,
                                      nullptr).ok());
  ASSERT_TRUE(LaunchScoreChannelIndex(d_qc.as<float>(), d_index.as<bf16>(), rows, d, n_kv, 0, rows,
                                      d_scores.as<float>(), rows, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = Download<float>(d_scores, static_cast<size_t>(n_kv) * rows);
  for (int h = 0; h < n_kv; ++h) {
    std::vector<float> mean(head_dim);
    for (int c = 0; c < head_dim; ++c) {
      float s = 0.0f;
      for (int g = 0; g < group; ++g) s += ToF(q[(static_cast<size_t>(h) * group + g) * head_dim + c]);
      mean[c] = s / static_cast<float>(group);
    }
    std::vector<int32_t> ch(d);
    ASSERT_TRUE(runtime::ChooseChannels(mean.data(), mx.data() + h * head_dim, head_dim, d, ch.data()).ok());
    std::vector<float> qc(d), rws(static_cast<size_t>(rows) * d), want(rows);
    for (int j = 0; j < d; ++j) qc[j] = mean[ch[j]];
    for (int p = 0; p < rows; ++p) {
      for (int j = 0; j < d; ++j) {
        rws[static_cast<size_t>(p) * d + j] = ToF(hp[(static_cast<size_t>(h) * rows + p) * 2 * head_dim + ch[j]]);
      }
    }
    runtime::ScoreOnChannels(qc.data(), d, rws.data(), rows, want.data());
    for (int p = 0; p < rows; ++p) {
      ASSERT_EQ(Bits(got[static_cast<size_t>(h) * rows + p]), Bits(want[p])) << "head " << h << " row " << p;
    }
  }
}

// ---------------------------------------------------------------------------
// Argument validation: no launch happens, so these run without a device.
// ---------------------------------------------------------------------------

void ExpectInvalid(const absl::Status& st, const std::string& field) {
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(std::string(st.message()).find(field), std::string::npos)
      << "message \"" << st.message() << "\" does not name " << field;
}

TEST(SparseIndexKernelsArgsTest, BadArgumentsAreInvalidArgument) {
  // Never dereferenced: validation fails before any launch.
  alignas(16) static char fake[64];
  const auto* bq = reinterpret_cast<const bf16*>(fake);
  auto* bo = reinterpret_cast<bf16*>(fake);
  const auto* f = reinterpret_cast<const float*>(fake);
  auto* fo = reinterpret_cast<float*>(fake);
  const auto* ic = reinterpret_cast<const int32_t*>(fake);
  auto* io = reinterpret_cast<int32_t*>(fake);

  // Group mean.
  ExpectInvalid(LaunchGroupMeanQuery(nullptr, 8, 2, 128, fo, nullptr), "q is null");
  ExpectInvalid(LaunchGroupMeanQuery(bq, 8, 2, 128, nullptr, nullptr), "q_mean is null");
  ExpectInvalid(LaunchGroupMeanQuery(bq, 8, 0, 128, fo, nullptr), "n_kv");
  ExpectInvalid(LaunchGroupMeanQuery(bq, 8, 3, 128, fo, nullptr), "n_heads");
  ExpectInvalid(LaunchGroupMeanQuery(bq, 8, 2, 96, fo, nullptr), "head_dim");

  // Channel choice.
  ExpectInvalid(LaunchChooseChannels(nullptr, f, 2, 128, 8, io, fo, nullptr), "q_mean");
  ExpectInvalid(LaunchChooseChannels(f, nullptr, 2, 128, 8, io, fo, nullptr), "max_abs");
  ExpectInvalid(LaunchChooseChannels(f, f, 2, 128, 8, nullptr, fo, nullptr), "chans");
  ExpectInvalid(LaunchChooseChannels(f, f, -1, 128, 8, io, fo, nullptr), "n_kv");
  ExpectInvalid(LaunchChooseChannels(f, f, 2, 100, 8, io, fo, nullptr), "head_dim");
  ExpectInvalid(LaunchChooseChannels(f, f, 2, 128, 0, io, fo, nullptr), "d = ");
  ExpectInvalid(LaunchChooseChannels(f, f, 2, 64, 65, io, fo, nullptr), "d = ");

  // Index build.
  ExpectInvalid(LaunchBuildChannelIndex(nullptr, 10, 5, ic, 8, 2, 128, bo, 10, nullptr), "host is null");
  ExpectInvalid(LaunchBuildChannelIndex(bq, 10, 5, nullptr, 8, 2, 128, bo, 10, nullptr), "chans is null");
  ExpectInvalid(LaunchBuildChannelIndex(bq, 10, 5, ic, 8, 2, 128, nullptr, 10, nullptr), "index is null");
  ExpectInvalid(LaunchBuildChannelIndex(bq, 10, -1, ic, 8, 2, 128, bo, 10, nullptr), "rows = -1");
  ExpectInvalid(LaunchBuildChannelIndex(bq, 4, 5, ic, 8, 2, 128, bo, 10, nullptr), "host_rows");
  ExpectInvalid(LaunchBuildChannelIndex(bq, 10, 5, ic, 8, 2, 128, bo, 4, nullptr), "index_rows");
  ExpectInvalid(LaunchBuildChannelIndex(bq, 10, 5, ic, 65, 2, 128, bo, 10, nullptr), "d = ");
  ExpectInvalid(LaunchBuildChannelIndex(bq, 10, 5, ic, 8, 0, 128, bo, 10, nullptr), "n_kv");
  ExpectInvalid(LaunchBuildChannelIndex(bq, 10, 5, ic, 8, 2, 32, bo, 10, nullptr), "head_dim");
  ExpectInvalid(LaunchBuildChannelIndex(bq + 1, 10, 5, ic, 8, 2, 128, bo, 10, nullptr), "aligned");
  EXPECT_TRUE(LaunchBuildChannelIndex(nullptr, 10, 0, nullptr, 8, 2, 128, nullptr, 10, nullptr).ok());

  // Speculative query.
  auto spec = [&](const bf16* x, const bf16* w, int hidden, int n_heads, int n_kv, int hd,
                  const int32_t* ch, int d, const int32_t* pos, const float* freq, float* out) {
    return LaunchSpeculativeQuery(x, w, hidden, n_heads, n_kv, hd, ch, d, pos, freq, true, out, nullptr);
  };
  ExpectInvalid(spec(nullptr, bq, 64, 8, 2, 128, ic, 8, ic, f, fo), "x is null");
  ExpectInvalid(spec(bq, nullptr, 64, 8, 2, 128, ic, 8, ic, f, fo), "wq");
  ExpectInvalid(spec(bq, bq, 64, 8, 2, 128, nullptr, 8, ic, f, fo), "chans");
  ExpectInvalid(spec(bq, bq, 64, 8, 2, 128, ic, 8, nullptr, f, fo), "d_pos");
  ExpectInvalid(spec(bq, bq, 64, 8, 2, 128, ic, 8, ic, nullptr, fo), "inv_freq");
  ExpectInvalid(spec(bq, bq, 64, 8, 2, 128, ic, 8, ic, f, nullptr), "out is null");
  ExpectInvalid(spec(bq, bq, 0, 8, 2, 128, ic, 8, ic, f, fo), "hidden");
  ExpectInvalid(spec(bq, bq, 64, 7, 2, 128, ic, 8, ic, f, fo), "n_heads");
  ExpectInvalid(spec(bq, bq, 64, 8, 0, 128, ic, 8, ic, f, fo), "n_kv");
  ExpectInvalid(spec(bq, bq, 64, 8, 2, 256, ic, 8, ic, f, fo), "head_dim");
  ExpectInvalid(spec(bq, bq, 64, 8, 2, 128, ic, 0, ic, f, fo), "d = ");

  // Index scores.
  auto score = [&](const float* q, const bf16* idx, int64_t index_rows, int d, int n_kv, int first,
                   int n, float* out, int64_t stride) {
    return LaunchScoreChannelIndex(q, idx, index_rows, d, n_kv, first, n, out, stride, nullptr);
  };
  ExpectInvalid(score(nullptr, bq, 100, 8, 2, 0, 10, fo, 10), "q_chan");
  ExpectInvalid(score(f, nullptr, 100, 8, 2, 0, 10, fo, 10), "index is null");
  ExpectInvalid(score(f, bq, 100, 8, 2, 0, 10, nullptr, 10), "scores");
  ExpectInvalid(score(f, bq, 100, 0, 2, 0, 10, fo, 10), "d = ");
  ExpectInvalid(score(f, bq, 100, 65, 2, 0, 10, fo, 10), "d = ");
  ExpectInvalid(score(f, bq, 100, 8, 0, 0, 10, fo, 10), "n_kv");
  ExpectInvalid(score(f, bq, 100, 8, 2, -1, 10, fo, 10), "first");
  ExpectInvalid(score(f, bq, 100, 8, 2, 0, -1, fo, 10), "n = -1");
  ExpectInvalid(score(f, bq, 100, 8, 2, 95, 10, fo, 10), "index_rows");
  ExpectInvalid(score(f, bq, 100, 8, 2, 0, 11, fo, 10), "score_stride");
  EXPECT_TRUE(score(nullptr, nullptr, 100, 8, 2, 0, 0, nullptr, 10).ok());

  // Faithful scores.
  auto faithful = [&](const float* q, const int32_t* ch, int d, const bf16* kt, int64_t cols, int n_kv,
                      int hd, int first, int n, float* out, int64_t stride) {
    return LaunchScoreFaithful(q, ch, d, kt, cols, n_kv, hd, first, n, out, stride, nullptr);
  };
  ExpectInvalid(faithful(nullptr, ic, 8, bq, 100, 2, 128, 0, 10, fo, 10), "q_chan");
  ExpectInvalid(faithful(f, nullptr, 8, bq, 100, 2, 128, 0, 10, fo, 10), "chans");
  ExpectInvalid(faithful(f, ic, 8, nullptr, 100, 2, 128, 0, 10, fo, 10), "kt is null");
  ExpectInvalid(faithful(f, ic, 8, bq, 100, 2, 128, 0, 10, nullptr, 10), "scores");
  ExpectInvalid(faithful(f, ic, 0, bq, 100, 2, 128, 0, 10, fo, 10), "d = ");
  ExpectInvalid(faithful(f, ic, 8, bq, 100, 0, 128, 0, 10, fo, 10), "n_kv");
  ExpectInvalid(faithful(f, ic, 8, bq, 100, 2, 80, 0, 10, fo, 10), "head_dim");
  ExpectInvalid(faithful(f, ic, 8, bq, 100, 2, 128, -3, 10, fo, 10), "first");
  ExpectInvalid(faithful(f, ic, 8, bq, 100, 2, 128, 0, -1, fo, 10), "n = -1");
  ExpectInvalid(faithful(f, ic, 8, bq, 100, 2, 128, 91, 10, fo, 10), "kt_cols");
  ExpectInvalid(faithful(f, ic, 8, bq, 100, 2, 128, 0, 11, fo, 10), "score_stride");
  EXPECT_TRUE(faithful(nullptr, nullptr, 8, nullptr, 100, 2, 128, 0, 0, nullptr, 10).ok());
}

}  // namespace
}  // namespace tailorkv::cuda
