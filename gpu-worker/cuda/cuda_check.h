// CUDA/cuBLAS error handling and RAII owners for CUDA handles.
//
// Every CUDA call's result becomes an absl::Status naming the call; owners
// are move-only and release in their destructors (logging, never throwing).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tailorkv::cuda {

absl::Status CudaStatus(cudaError_t err, const char* what);
absl::Status CublasStatus(cublasStatus_t err, const char* what);

#define CUDA_RETURN_IF_ERROR(expr)                                                 \
  do {                                                                             \
    ::absl::Status tkv_cuda_status_ = ::tailorkv::cuda::CudaStatus((expr), #expr); \
    if (!tkv_cuda_status_.ok()) return tkv_cuda_status_;                           \
  } while (0)
#define CUBLAS_RETURN_IF_ERROR(expr)                                                 \
  do {                                                                               \
    ::absl::Status tkv_cublas_status_ = ::tailorkv::cuda::CublasStatus((expr), #expr); \
    if (!tkv_cublas_status_.ok()) return tkv_cublas_status_;                         \
  } while (0)
// After a kernel launch: launch-configuration errors surface here.
#define CUDA_RETURN_IF_LAUNCH_FAILED(name) CUDA_RETURN_IF_ERROR(cudaGetLastError())

// Number of CUDA devices; 0 when there is no driver or device (never an error).
int DeviceCount();

// Owns one device allocation (base and size).
// Streaming multiprocessors of the current device (queried once per
// process; 132, an H100's, if the query fails). Launchers size grids by it.
int DeviceSmCount();

class DeviceMemoryPool;

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  // From `pool` when not null (ResourceExhausted when the pool has no room),
  // else as Allocate(bytes). Releasing a pool buffer waits for the device
  // first (as cudaFree does), then gives the bytes back to the pool.
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes, const DeviceMemoryPool* pool);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }
  size_t size() const { return size_; }

 private:
  void Release();
  void* ptr_ = nullptr;
  size_t size_ = 0;
  bool pooled_ = false;
};

// Device memory taken from the driver once and carved into buffers
// (DeviceBuffer::Allocate with a pool): a CUDA memory pool whose `bytes`
// are reserved at creation, kept when buffers are freed (release threshold:
// never) and never exceeded (its maximum size), so other work on the device
// cannot take the memory the pool's users were promised, and a pool
// allocation fails cleanly instead of growing. Every buffer from it must be
// gone before it is destroyed. Move-only.
class DeviceMemoryPool {
 public:
  DeviceMemoryPool() = default;
  // InvalidArgument for bytes == 0; ResourceExhausted when the device
  // cannot give that much now.
  static absl::StatusOr<DeviceMemoryPool> Create(int device, size_t bytes);
  ~DeviceMemoryPool();
  DeviceMemoryPool(DeviceMemoryPool&& o) noexcept { *this = std::move(o); }
  DeviceMemoryPool& operator=(DeviceMemoryPool&& o) noexcept;
  DeviceMemoryPool(const DeviceMemoryPool&) = delete;
  DeviceMemoryPool& operator=(const DeviceMemoryPool&) = delete;
  cudaMemPool_t get() const { return pool_; }
  size_t bytes() const { return bytes_; }

 private:
  cudaMemPool_t pool_ = nullptr;
  size_t bytes_ = 0;
};

class CudaStream {
 public:
  CudaStream() = default;
  // priority: as cudaStreamCreateWithPriority takes it (lower = more urgent;
  // 0 = default), clamped to the device's range.
  static absl::StatusOr<CudaStream> Create(int priority = 0);
  // The device's most urgent stream priority.
  static int GreatestPriority();
  ~CudaStream();
  CudaStream(CudaStream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  CudaStream& operator=(CudaStream&& o) noexcept;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

class CudaEvent {
 public:
  CudaEvent() = default;
  static absl::StatusOr<CudaEvent> Create(bool timing = false);
  ~CudaEvent();
  CudaEvent(CudaEvent&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  CudaEvent& operator=(CudaEvent&& o) noexcept;
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

class CublasHandle {
 public:
  CublasHandle() = default;
  static absl::StatusOr<CublasHandle> Create();
  ~CublasHandle();
  CublasHandle(CublasHandle&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  CublasHandle& operator=(CublasHandle&& o) noexcept;
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  cublasHandle_t get() const { return h_; }

 private:
  cublasHandle_t h_ = nullptr;
};

// An instantiated CUDA graph.
class CudaGraphExec {
 public:
  CudaGraphExec() = default;
  ~CudaGraphExec();
  CudaGraphExec(CudaGraphExec&& o) noexcept : g_(std::exchange(o.g_, nullptr)) {}
  CudaGraphExec& operator=(CudaGraphExec&& o) noexcept;
  CudaGraphExec(const CudaGraphExec&) = delete;
  CudaGraphExec& operator=(const CudaGraphExec&) = delete;
  // Ends the capture begun on `stream` and instantiates it.
  static absl::StatusOr<CudaGraphExec> EndCapture(cudaStream_t stream);
  absl::Status Launch(cudaStream_t stream) const;
  bool valid() const { return g_ != nullptr; }

 private:
  cudaGraphExec_t g_ = nullptr;
};

}  // namespace tailorkv::cuda
