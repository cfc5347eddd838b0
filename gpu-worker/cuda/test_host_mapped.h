// Host-mapped (zero-copy) memory for the CUDA kernel tests: cudaHostAlloc'd
// with cudaHostAllocMapped, freed on destruction. `host` is null when the
// allocation failed (tests ASSERT on device() != nullptr).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace tailorkv::cuda::test_util {

struct HostMapped {
  void* host = nullptr;
  explicit HostMapped(size_t bytes) {
    // At least 16 bytes: a zero-sized case still gets a valid, aligned pointer.
    if (cudaHostAlloc(&host, std::max<size_t>(bytes, 16), cudaHostAllocMapped) != cudaSuccess) {
      host = nullptr;
    }
  }
  ~HostMapped() {
    if (host != nullptr) cudaFreeHost(host);
  }
  HostMapped(const HostMapped&) = delete;
  HostMapped& operator=(const HostMapped&) = delete;
  uint16_t* bits() const { return static_cast<uint16_t*>(host); }  // bf16 patterns
  uint8_t* bytes() const { return static_cast<uint8_t*>(host); }
  // The device's pointer to the same memory (null on failure).
  template <typename T = void>
  T* device() const {
    void* d = nullptr;
    return cudaHostGetDevicePointer(&d, host, 0) == cudaSuccess ? static_cast<T*>(d) : nullptr;
  }
};

}  // namespace tailorkv::cuda::test_util
