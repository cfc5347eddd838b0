// The registration hook with the real CUDA runtime: the worker's lambdas
// (cudaHostRegister / cudaHostUnregister) make every arena readable and
// writable by the GPU in place, through the device alias of the host
// mapping. Skips without a CUDA device; label gpu.
#include <cuda_runtime.h>
#include <sys/mman.h>

#include <cstdint>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "store/in_process_store.h"

namespace tailorkv::kvhost {
namespace {

absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(std::string(what) + ": " + cudaGetErrorString(error));
}

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

class CudaRegistrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(CudaRegistrationTest, GpuReadsAndWritesRegisteredArenaInPlace) {
  int registrations = 0, unregistrations = 0;
  const uint64_t page = PageSize();
  {
    InProcessStoreOptions options;
    options.budget_bytes = 64 << 20;
    options.arena_bytes = 16 << 20;
    options.arena.populate = true;
    options.register_fn = [&](void* base, size_t bytes) {
      ++registrations;
      return CudaStatus(cudaHostRegister(base, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable),
                        "cudaHostRegister");
    };
    options.unregister_fn = [&](void* base, size_t) {
      ++unregistrations;
      return CudaStatus(cudaHostUnregister(base), "cudaHostUnregister");
    };
    auto store = InProcessStore::Create(std::move(options));
    ASSERT_TRUE(store.ok()) << store.status();

    ASSERT_TRUE((*store)->Allocate(3 * page + 17, 1, "pad").ok());
    const size_t n = (5 << 20) + 123;  // odd size, crosses huge-page boundaries
    auto slice = (*store)->Allocate(n, 256, "s");
    ASSERT_TRUE(slice.ok()) << slice.status();
    auto host = (*store)->Data(*slice);
    ASSERT_TRUE(host.ok());
    for (size_t i = 0; i < n; ++i) (*host)[i] = static_cast<std::byte>((i * 37 + (i >> 12)) & 0xff);

    void* device_alias = nullptr;
    ASSERT_EQ(cudaHostGetDevicePointer(&device_alias, host->data(), 0), cudaSuccess);
    void* device_copy = nullptr;
    ASSERT_EQ(cudaMalloc(&device_copy, n), cudaSuccess);
    ASSERT_EQ(cudaMemset(device_copy, 0xA5, n), cudaSuccess);  // poison
    // Device-to-device from the alias: the GPU reads host memory in place.
    ASSERT_EQ(cudaMemcpy(device_copy, device_alias, n, cudaMemcpyDeviceToDevice), cudaSuccess);
    std::vector<std::byte> back(n);
    ASSERT_EQ(cudaMemcpy(back.data(), device_copy, n, cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(back[i], (*host)[i]) << "first difference at byte " << i;
    }

    // The GPU writes through the alias; a second mapping of the arena fd
    // (what another process would map) sees the bytes.
    ASSERT_EQ(cudaMemset(device_alias, 0x3C, n), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    auto fd = (*store)->ArenaFd(slice->arena);
    auto bytes = (*store)->ArenaBytes(slice->arena);
    ASSERT_TRUE(fd.ok() && bytes.ok());
    auto mapping = SharedMapping::Map(*fd, *bytes, /*writable=*/false, /*populate=*/false);
    ASSERT_TRUE(mapping.ok()) << mapping.status();
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(mapping->data()[slice->offset + i], std::byte{0x3C}) << "byte " << i;
    }
    EXPECT_NE(mapping->data()[slice->offset + n], std::byte{0x3C}) << "wrote past the slice";
    EXPECT_EQ(cudaFree(device_copy), cudaSuccess);
    EXPECT_EQ(registrations, 1);
    EXPECT_EQ(unregistrations, 0);
  }
  EXPECT_EQ(unregistrations, 1);
  // Unregistered: the runtime no longer knows the range.
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
}  // namespace tailorkv::kvhost
