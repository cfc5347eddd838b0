// GPU quantized-KV kernels against runtime::QuantKvCpu.
//
// Pack, Append and Materialize must be bit-exact: codes and fp16 params
// equal word for word, the bf16 rings equal the CPU's fp32 rings (the inputs
// are bf16-representable), materialized rows equal the CPU's rounded to bf16.
//
// The fused attention is compared with QuantKvCpu::Attend on the same codes
// (uploaded from the CPU cache) and a bf16-representable q. Tolerance, as
// for the dense decode kernel: max |gpu - ref| <= 2e-2 * max |ref| and
// relative L2 error <= 1e-2. The GPU rounds q*scale*s and p*s to fp16
// (relative 2^-11 each), the output to bf16 (2^-9) and uses an approximate
// exp2; the reference is fp32 throughout. A wrong code bit, group, head,
// token range or a dropped split moves outputs by a large fraction of their
// size, which the relative L2 check catches even over thousands of keys.
// Outputs are NaN-poisoned before each launch.
#include "cuda/quant_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/test_rng.h"
#include "runtime/quant_kv.h"

namespace tailorkv::cuda {
namespace {

using bf16 = __nv_bfloat16;
using runtime::QuantKvCpu;
using runtime::QuantShape;

class QuantKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

using test_util::Rng;

float RoundBf16(float x) { return __bfloat162float(__float2bfloat16(x)); }

// K/V of `rows` positions per head, bf16-representable: K has per-channel
// offsets and scales (outlier channels, as real keys do), V is plain.
struct FullKv {
  std::vector<float> k, v;  // [kv][rows][hd]
  std::vector<bf16> k16, v16;
};

FullKv MakeFullKv(const QuantShape& s, int rows, Rng& rng) {
  FullKv f;
  const int hd = s.head_dim;
  const size_t n = static_cast<size_t>(s.n_kv_heads) * rows * hd;
  f.k.resize(n);
  f.v.resize(n);
  std::vector<float> off(static_cast<size_t>(s.n_kv_heads) * hd), scale(off.size());
  for (size_t i = 0; i < off.size(); ++i) {
    off[i] = rng.Uniform(-2.0f, 2.0f);
    scale[i] = (i % 17 == 3) ? 6.0f : rng.Uniform(0.3f, 1.5f);
  }
  for (int h = 0; h < s.n_kv_heads; ++h) {
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < hd; ++c) {
        const size_t i = (static_cast<size_t>(h) * rows + r) * hd + c;
        f.k[i] = RoundBf16(off[h * hd + c] + scale[h * hd + c] * rng.Uniform(-1.0f, 1.0f));
        f.v[i] = RoundBf16(rng.Uniform(-1.0f, 1.0f));
      }
    }
  }
  // A constant group (s == 0) and a repeated value, to hit the edge cases.
  if (rows >= s.params.group) {
    for (int r = 0; r < s.params.group; ++r) f.k[static_cast<size_t>(r) * hd + 1] = 0.75f;
    for (int c = 0; c < s.params.group; ++c) f.v[c] = -0.5f;
  }
  f.k16.resize(n);
  f.v16.resize(n);
  for (size_t i = 0; i < n; ++i) {
    f.k16[i] = __float2bfloat16(f.k[i]);
    f.v16[i] = __float2bfloat16(f.v[i]);
  }
  return f;
}

template <typename T>
absl::StatusOr<DeviceBuffer> Upload(const std::vector<T>& host) {
  auto buf = DeviceBuffer::Allocate(std::max<size_t>(host.size() * sizeof(T), 16));
  if (!buf.ok()) return buf.status();
  if (!host.empty()) {
    absl::Status st = CudaStatus(
        cudaMemcpy(buf->get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
        "upload");
    if (!st.ok()) return st;
  }
  return buf;
}

// A zero-initialized device cache for `shape`.
struct DeviceQuant {
  DeviceBuffer mem;
  QuantDeviceCache cache;
};

DeviceQuant MakeDeviceQuant(const QuantShape& shape) {
  DeviceQuant d;
  const QuantDeviceLayout layout = QuantLayout(shape);
  auto mem = DeviceBuffer::Allocate(layout.bytes);
  EXPECT_TRUE(mem.ok()) << mem.status();
  d.mem = std::move(*mem);
  EXPECT_EQ(cudaMemset(d.mem.get(), 0, layout.bytes), cudaSuccess);
  d.cache = QuantCacheAt(d.mem.get(), shape);
  return d;
}

template <typename T>
std::vector<T> Download(const void* dev, size_t n) {
  std::vector<T> out(n);
  EXPECT_EQ(cudaMemcpy(out.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return out;
}

// Uploads the CPU cache's arrays into `d` (rings rounded to bf16).
void UploadCpuCache(const QuantKvCpu& cpu, DeviceQuant& d) {
  auto put = [](void* dst, const void* src, size_t bytes) {
    ASSERT_EQ(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), cudaSuccess);
  };
  put(d.cache.k_codes, cpu.k_codes().data(), cpu.k_codes().size() * 4);
  put(d.cache.k_params, cpu.k_params().data(), cpu.k_params().size() * 4);
  put(d.cache.v_codes, cpu.v_codes().data(), cpu.v_codes().size() * 4);
  put(d.cache.v_params, cpu.v_params().data(), cpu.v_params().size() * 4);
  std::vector<bf16> kr(cpu.k_res().size()), vr(cpu.v_res().size());
  for (size_t i = 0; i < kr.size(); ++i) {
    kr[i] = __float2bfloat16(cpu.k_res()[i]);
    vr[i] = __float2bfloat16(cpu.v_res()[i]);
  }
  put(d.cache.k_res, kr.data(), kr.size() * 2);
  put(d.cache.v_res, vr.data(), vr.size() * 2);
}

// Every array of the device cache equals the CPU cache's.
void ExpectSameArrays(const QuantKvCpu& cpu, const DeviceQuant& d, const std::string& what) {
  auto words = [](const auto& v) {
    std::vector<uint32_t> out(v.size());
    std::memcpy(out.data(), v.data(), v.size() * 4);
    return out;
  };
  struct Arr {
    const char* name;
    std::vector<uint32_t> want;
    const void* dev;
  };
  const Arr arrs[] = {{"k_codes", cpu.k_codes(), d.cache.k_codes},
                      {"k_params", words(cpu.k_params()), d.cache.k_params},
                      {"v_codes", cpu.v_codes(), d.cache.v_codes},
                      {"v_params", words(cpu.v_params()), d.cache.v_params}};
  for (const Arr& a : arrs) {
    const std::vector<uint32_t> got = Download<uint32_t>(a.dev, a.want.size());
    size_t bad = 0, first = a.want.size();
    for (size_t i = 0; i < a.want.size(); ++i) {
      if (got[i] != a.want[i]) {
        ++bad;
        if (first == a.want.size()) first = i;
      }
    }
    EXPECT_EQ(bad, 0u) << what << ": " << a.name << " differs at " << bad << " words, first " << first
                       << " (got " << (first < got.size() ? got[first] : 0) << ", want "
                       << (first < got.size() ? a.want[first] : 0) << ")";
  }
  const std::vector<bf16> kr = Download<bf16>(d.cache.k_res, cpu.k_res().size());
  const std::vector<bf16> vr = Download<bf16>(d.cache.v_res, cpu.v_res().size());
  size_t bad = 0;
  for (size_t i = 0; i < kr.size(); ++i) {
    bad += __bfloat162float(kr[i]) != cpu.k_res()[i];
    bad += __bfloat162float(vr[i]) != cpu.v_res()[i];
  }
  EXPECT_EQ(bad, 0u) << what << ": residual rings differ";
}

void ExpectClose(const std::vector<float>& got, const std::vector<float>& ref, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size());
  double max_ref = 0, diff_sq = 0, ref_sq = 0, max_diff = 0;
  for (float r : ref) max_ref = std::max(max_ref, std::fabs(static_cast<double>(r)));
  size_t first_bad = got.size();
  const double tol = 2e-2 * max_ref;
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - ref[i]);
    if (!(diff <= tol) && first_bad == got.size()) first_bad = i;
    if (!(diff <= max_diff)) max_diff = diff;
    diff_sq += diff * diff;
    ref_sq += static_cast<double>(ref[i]) * ref[i];
  }
  EXPECT_EQ(first_bad, got.size()) << what << ": element " << first_bad << " got "
                                   << (first_bad < got.size() ? got[first_bad] : 0) << " want "
                                   << (first_bad < got.size() ? ref[first_bad] : 0) << " (tol " << tol
                                   << ")";
  EXPECT_LE(std::sqrt(diff_sq / std::max(ref_sq, 1e-30)), 1e-2) << what << ": relative L2 error";
}

std::string Name(const QuantShape& s, int n_heads, int len) {
  return "heads " + std::to_string(n_heads) + "/" + std::to_string(s.n_kv_heads) + " hd " +
         std::to_string(s.head_dim) + " bits " + std::to_string(s.params.bits) + " G " +
         std::to_string(s.params.group) + " R " + std::to_string(s.params.residual) + " len " +
         std::to_string(len);
}

QuantShape Shape(int n_kv, int hd, int cap, int bits, int group, int residual) {
  QuantShape s;
  s.n_kv_heads = n_kv;
  s.head_dim = hd;
  s.capacity = cap;
  s.params.bits = bits;
  s.params.group = group;
  s.params.residual = residual;
  return s;
}

// GPU attention over `d` at device length `len` vs cpu.Attend.
void CheckAttention(const QuantKvCpu& cpu, const DeviceQuant& d, int n_heads, int len, Rng& rng,
                    const std::string& what) {
  const QuantShape& s = cpu.shape();
  const int hd = s.head_dim;
  std::vector<float> q(static_cast<size_t>(n_heads) * hd);
  std::vector<bf16> q16(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    q[i] = RoundBf16(rng.Uniform(-2.0f, 2.0f));
    q16[i] = __float2bfloat16(q[i]);
  }
  std::vector<float> ref(q.size());
  cpu.Attend(q.data(), n_heads, len, 1.0f / std::sqrt(static_cast<float>(hd)), ref.data());

  auto dq = Upload(q16);
  ASSERT_TRUE(dq.ok());
  auto dlen = Upload(std::vector<int32_t>{len});
  ASSERT_TRUE(dlen.ok());
  auto ws = DeviceBuffer::Allocate(std::max<size_t>(QuantDecodeWorkspaceBytes(s, n_heads), 16));
  ASSERT_TRUE(ws.ok());
  auto out = DeviceBuffer::Allocate(q.size() * sizeof(bf16));
  ASSERT_TRUE(out.ok());
  ASSERT_EQ(cudaMemset(out->get(), 0xff, q.size() * sizeof(bf16)), cudaSuccess);  // NaN
  ASSERT_TRUE(LaunchQuantDecodeAttention(dq->as<bf16>(), n_heads, s, d.cache, dlen->as<int32_t>(),
                                         ws->get(), out->as<bf16>(), nullptr)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << what;
  const std::vector<bf16> got16 = Download<bf16>(out->get(), q.size());
  std::vector<float> got(q.size());
  for (size_t i = 0; i < got.size(); ++i) got[i] = __bfloat162float(got16[i]);
  ExpectClose(got, ref, what);
}

TEST_F(QuantKernelsTest, PackIsBitExactInChunks) {
  Rng rng(11);
  struct Case {
    int n_kv, hd, cap, bits, group, residual;
    std::vector<int> cuts;  // chunk ends
  };
  const Case cases[] = {
      {3, 64, 1000, 1, 32, 128, {1, 127, 300, 301, 999}},
      {3, 64, 777, 2, 64, 64, {700, 777}},
      {2, 128, 1100, 4, 128, 256, {129, 640, 1100}},
      {2, 128, 900, 1, 64, 128, {900}},
      {1, 128, 650, 2, 32, 32, {33, 64, 65, 600}},
  };
  for (const Case& c : cases) {
    const QuantShape s = Shape(c.n_kv, c.hd, c.cap, c.bits, c.group, c.residual);
    const FullKv f = MakeFullKv(s, c.cap, rng);
    QuantKvCpu cpu(s);
    DeviceQuant d = MakeDeviceQuant(s);
    auto dk = Upload(f.k16);
    auto dv = Upload(f.v16);
    ASSERT_TRUE(dk.ok() && dv.ok());
    const int64_t stride = static_cast<int64_t>(c.cap) * c.hd;
    int start = 0;
    for (int end : c.cuts) {
      cpu.Pack(f.k.data(), f.v.data(), stride, start, end);
      ASSERT_TRUE(LaunchQuantPack(dk->as<bf16>(), dv->as<bf16>(), stride, start, end, s, d.cache,
                                  nullptr)
                      .ok());
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      ExpectSameArrays(cpu, d, "pack " + Name(s, c.n_kv, end));
      start = end;
    }
  }
}

TEST_F(QuantKernelsTest, AppendMatchesCpuAndAttentionFollowsDeviceLength) {
  Rng rng(12);
  struct Case {
    int n_kv, n_heads, hd, bits, group, residual, prefill, steps;
  };
  const Case cases[] = {
      {3, 9, 64, 1, 32, 64, 50, 150},
      {8, 32, 128, 2, 64, 128, 250, 140},
      {2, 8, 128, 4, 128, 128, 0, 300},
  };
  for (const Case& c : cases) {
    const int cap = c.prefill + c.steps + 5;
    const QuantShape s = Shape(c.n_kv, c.hd, cap, c.bits, c.group, c.residual);
    const FullKv f = MakeFullKv(s, cap, rng);
    QuantKvCpu cpu(s);
    DeviceQuant d = MakeDeviceQuant(s);
    auto dk = Upload(f.k16);
    auto dv = Upload(f.v16);
    auto dpos = Upload(std::vector<int32_t>{0});
    ASSERT_TRUE(dk.ok() && dv.ok() && dpos.ok());
    const int64_t stride = static_cast<int64_t>(cap) * c.hd;
    cpu.Pack(f.k.data(), f.v.data(), stride, 0, c.prefill);
    ASSERT_TRUE(LaunchQuantPack(dk->as<bf16>(), dv->as<bf16>(), stride, 0, c.prefill, s, d.cache,
                                nullptr)
                    .ok());
    std::vector<float> kn(static_cast<size_t>(c.n_kv) * c.hd), vn(kn.size());
    for (int pos = c.prefill; pos < c.prefill + c.steps; ++pos) {
      for (int h = 0; h < c.n_kv; ++h) {
        std::memcpy(&kn[h * c.hd], &f.k[h * stride + static_cast<int64_t>(pos) * c.hd], c.hd * 4);
        std::memcpy(&vn[h * c.hd], &f.v[h * stride + static_cast<int64_t>(pos) * c.hd], c.hd * 4);
      }
      cpu.Append(pos, kn.data(), vn.data());
      ASSERT_EQ(cudaMemcpy(dpos->get(), &pos, 4, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_TRUE(LaunchQuantAppend(dk->as<bf16>(), dv->as<bf16>(), stride, dpos->as<int32_t>(), s,
                                    d.cache, nullptr)
                      .ok());
      const int len = pos + 1;
      if (len % 37 == 0 || len % c.residual <= 1 || pos + 1 == c.prefill + c.steps) {
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        ExpectSameArrays(cpu, d, "append " + Name(s, c.n_heads, len));
        CheckAttention(cpu, d, c.n_heads, len, rng, "attention after append " + Name(s, c.n_heads, len));
      }
    }
  }
}

TEST_F(QuantKernelsTest, FusedAttentionMatchesCpuAttend) {
  Rng rng(13);
  struct Model {
    int n_kv, n_heads, hd;
  };
  const Model models[] = {{3, 9, 64}, {8, 32, 128}};
  const int lens[] = {1, 127, 128, 129, 4097 + 34};
  for (const Model& m : models) {
    for (int bits : {1, 2, 4}) {
      for (int group : {32, 64, 128}) {
        if (m.hd % group != 0) continue;
        const int residual = group == 32 ? 96 : 128;
        for (int len : lens) {
          const int cap = len + 45;
          const QuantShape s = Shape(m.n_kv, m.hd, cap, bits, group, residual);
          const FullKv f = MakeFullKv(s, cap, rng);
          QuantKvCpu cpu(s);
          cpu.Pack(f.k.data(), f.v.data(), static_cast<int64_t>(cap) * m.hd, 0, len);
          DeviceQuant d = MakeDeviceQuant(s);
          UploadCpuCache(cpu, d);
          CheckAttention(cpu, d, m.n_heads, len, rng, "attend " + Name(s, m.n_heads, len));
        }
      }
    }
  }
}

TEST_F(QuantKernelsTest, FusedAttentionLongContextManySplits) {
  Rng rng(14);
  for (int bits : {1, 4}) {
    const int len = 40000 + 17;
    const QuantShape s = Shape(2, 128, len + 3, bits, 64, 128);
    const FullKv f = MakeFullKv(s, len + 3, rng);
    QuantKvCpu cpu(s);
    cpu.Pack(f.k.data(), f.v.data(), static_cast<int64_t>(len + 3) * 128, 0, len);
    DeviceQuant d = MakeDeviceQuant(s);
    UploadCpuCache(cpu, d);
    CheckAttention(cpu, d, 8, len, rng, "long " + Name(s, 8, len));
  }
}

TEST_F(QuantKernelsTest, MaterializeIsExact) {
  Rng rng(15);
  for (int bits : {1, 2, 4}) {
    for (int len : {1, 100, 128, 333, 1029}) {
      const int cap = 1100;
      const QuantShape s = Shape(3, 64, cap, bits, bits == 2 ? 32 : 64, 128);
      const FullKv f = MakeFullKv(s, cap, rng);
      QuantKvCpu cpu(s);
      const int64_t stride = static_cast<int64_t>(cap) * 64;
      cpu.Pack(f.k.data(), f.v.data(), stride, 0, len);
      std::vector<float> km(f.k.size(), 0.0f), vm(f.v.size(), 0.0f);
      cpu.Materialize(len, km.data(), vm.data(), stride);
      DeviceQuant d = MakeDeviceQuant(s);
      UploadCpuCache(cpu, d);
      auto dk = DeviceBuffer::Allocate(f.k.size() * 2);
      auto dv = DeviceBuffer::Allocate(f.v.size() * 2);
      ASSERT_TRUE(dk.ok() && dv.ok());
      ASSERT_EQ(cudaMemset(dk->get(), 0xff, f.k.size() * 2), cudaSuccess);
      ASSERT_EQ(cudaMemset(dv->get(), 0xff, f.v.size() * 2), cudaSuccess);
      ASSERT_TRUE(LaunchQuantMaterialize(len, s, d.cache, dk->as<bf16>(), dv->as<bf16>(), stride,
                                         nullptr)
                      .ok());
      const std::vector<bf16> gk = Download<bf16>(dk->get(), f.k.size());
      const std::vector<bf16> gv = Download<bf16>(dv->get(), f.v.size());
      size_t bad = 0, untouched_bad = 0;
      for (int h = 0; h < 3; ++h) {
        for (int r = 0; r < cap; ++r) {
          for (int c = 0; c < 64; ++c) {
            const size_t i = h * stride + static_cast<size_t>(r) * 64 + c;
            uint16_t rk, rv;
            std::memcpy(&rk, &gk[i], 2);
            std::memcpy(&rv, &gv[i], 2);
            if (r < len) {
              bad += __bfloat162float(gk[i]) != RoundBf16(km[i]);
              bad += __bfloat162float(gv[i]) != RoundBf16(vm[i]);
            } else {
              untouched_bad += rk != 0xffff || rv != 0xffff;
            }
          }
        }
      }
      EXPECT_EQ(bad, 0u) << "materialize bits " << bits << " len " << len;
      EXPECT_EQ(untouched_bad, 0u) << "materialize wrote rows >= len";
    }
  }
}

TEST(QuantKernelsValidation, RejectsBadArguments) {
  const QuantShape s = Shape(2, 96, 100, 1, 32, 128);  // head_dim 96 unsupported
  EXPECT_FALSE(ValidateQuantShape(s).ok());
  const QuantShape ok = Shape(2, 128, 100, 1, 64, 128);
  EXPECT_TRUE(ValidateQuantShape(ok).ok());
  QuantDeviceCache none;
  EXPECT_FALSE(LaunchQuantPack(nullptr, nullptr, 128 * 100, 0, 10, ok, none, nullptr).ok());
  EXPECT_FALSE(LaunchQuantPack(nullptr, nullptr, 128 * 100, 5, 200, ok, none, nullptr).ok());
  // 16 query heads per KV head is more than the fused kernel takes.
  EXPECT_FALSE(LaunchQuantDecodeAttention(nullptr, 32, ok, none, nullptr, nullptr, nullptr, nullptr).ok());
  EXPECT_EQ(QuantDecodeWorkspaceBytes(s, 8), 0u);
  EXPECT_GT(QuantDecodeWorkspaceBytes(ok, 8), 0u);
}

}  // namespace
}  // namespace tailorkv::cuda
