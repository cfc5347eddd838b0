#include "cuda/cuda_check.h"

#include <exception>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "runtime/backend.h"

namespace tailorkv::cuda {
namespace {

// Destructors report release failures here: logged, never thrown, and never
// allowed to escape (a logger that cannot be created must not terminate us).
void LogReleaseFailure(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  try {
    common::NamedLogger("cuda")->warn("{} failed: {} ({})", what, cudaGetErrorString(err),
                                      cudaGetErrorName(err));
  } catch (const std::exception&) {
  }
}

void LogReleaseFailure(cublasStatus_t err, const char* what) {
  if (err == CUBLAS_STATUS_SUCCESS) return;
  try {
    common::NamedLogger("cuda")->warn("{} failed: {}", what, cublasGetStatusString(err));
  } catch (const std::exception&) {
  }
}

absl::StatusCode CodeFor(cudaError_t err) {
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::StatusCode::kResourceExhausted;
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
    case cudaErrorInvalidPitchValue:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidMemcpyDirection:
      return absl::StatusCode::kInvalidArgument;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return absl::StatusCode::kFailedPrecondition;
    default:
      return absl::StatusCode::kInternal;
  }
}

// The errors CUDA documents as leaving the context unusable ("any further
// CUDA work will return the same error; the process must be terminated and
// relaunched"): a kernel's fault, an uncorrectable ECC error, a watchdog
// timeout. The runtime marks their status as a lost device.
bool IsStickyError(cudaError_t err) {
  switch (err) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorAssert:
      return true;
    default:
      return false;
  }
}

}  // namespace

absl::Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  // The error now travels in the Status; clear the per-thread last error so
  // that the next launch check (cudaGetLastError) does not report it again.
  // Sticky errors (a faulted context) survive this and keep failing calls.
  (void)cudaGetLastError();
  absl::Status status(CodeFor(err), absl::StrCat(what, ": ", cudaGetErrorString(err), " (",
                                                 cudaGetErrorName(err), ")"));
  // The engine ends everything and the worker exits for its supervisor.
  return IsStickyError(err) ? runtime::MarkDeviceLost(std::move(status)) : status;
}

absl::Status CublasStatus(cublasStatus_t err, const char* what) {
  if (err == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const absl::StatusCode code =
      err == CUBLAS_STATUS_ALLOC_FAILED    ? absl::StatusCode::kResourceExhausted
      : err == CUBLAS_STATUS_INVALID_VALUE ? absl::StatusCode::kInvalidArgument
      : err == CUBLAS_STATUS_NOT_SUPPORTED ? absl::StatusCode::kUnimplemented
                                           : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, ": ", cublasGetStatusString(err)));
}

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    // No driver or no device. Clear the error so that a later launch check
    // (cudaGetLastError) does not report it as its own.
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

// ---- DeviceBuffer ----

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  DeviceBuffer b;
  if (bytes == 0) return b;
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    return CudaStatus(err, absl::StrCat("cudaMalloc(", bytes, " bytes)").c_str());
  }
  b.ptr_ = p;
  b.size_ = bytes;
  return b;
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes, const DeviceMemoryPool* pool) {
  if (pool == nullptr || pool->get() == nullptr) return Allocate(bytes);
  DeviceBuffer b;
  if (bytes == 0) return b;
  void* p = nullptr;
  // On the legacy stream, then waited for: the buffer is usable on any
  // stream when this returns.
  cudaError_t err = cudaMallocFromPoolAsync(&p, bytes, pool->get(), nullptr);
  if (err == cudaSuccess) err = cudaStreamSynchronize(nullptr);
  if (err != cudaSuccess) {
    if (p != nullptr) cudaFreeAsync(p, nullptr);
    return CudaStatus(err, absl::StrCat("cudaMallocFromPoolAsync(", bytes, " bytes, a pool of ",
                                        pool->bytes(), ")").c_str());
  }
  b.ptr_ = p;
  b.size_ = bytes;
  b.pooled_ = true;
  return b;
}

void DeviceBuffer::Release() {
  if (ptr_ == nullptr) return;
  if (pooled_) {
    // Kernels on any stream may still use it (cudaFree would wait for them).
    LogReleaseFailure(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    LogReleaseFailure(cudaFreeAsync(ptr_, nullptr), "cudaFreeAsync");
  } else {
    LogReleaseFailure(cudaFree(ptr_), "cudaFree");
  }
  ptr_ = nullptr;
  size_ = 0;
  pooled_ = false;
}

DeviceBuffer::~DeviceBuffer() { Release(); }

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    Release();
    ptr_ = std::exchange(o.ptr_, nullptr);
    size_ = std::exchange(o.size_, 0);
    pooled_ = std::exchange(o.pooled_, false);
  }
  return *this;
}

// ---- DeviceMemoryPool ----

absl::StatusOr<DeviceMemoryPool> DeviceMemoryPool::Create(int device, size_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("DeviceMemoryPool: bytes must be > 0");
  cudaMemPoolProps props = {};
  props.allocType = cudaMemAllocationTypePinned;
  props.handleTypes = cudaMemHandleTypeNone;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  props.maxSize = bytes;
  DeviceMemoryPool pool;
  CUDA_RETURN_IF_ERROR(cudaMemPoolCreate(&pool.pool_, &props));
  pool.bytes_ = bytes;
  uint64_t keep = UINT64_MAX;
  CUDA_RETURN_IF_ERROR(cudaMemPoolSetAttribute(pool.pool_, cudaMemPoolAttrReleaseThreshold, &keep));
  // Take the memory now: one allocation of all of it, given back to the
  // pool, which keeps it.
  void* p = nullptr;
  cudaError_t err = cudaMallocFromPoolAsync(&p, bytes, pool.pool_, nullptr);
  if (err == cudaSuccess) err = cudaFreeAsync(p, nullptr);
  if (err == cudaSuccess) err = cudaStreamSynchronize(nullptr);
  if (err != cudaSuccess) {
    return CudaStatus(err, absl::StrCat("DeviceMemoryPool: reserving ", bytes, " bytes").c_str());
  }
  return pool;
}

DeviceMemoryPool::~DeviceMemoryPool() {
  if (pool_ != nullptr) LogReleaseFailure(cudaMemPoolDestroy(pool_), "cudaMemPoolDestroy");
}

DeviceMemoryPool& DeviceMemoryPool::operator=(DeviceMemoryPool&& o) noexcept {
  if (this != &o) {
    if (pool_ != nullptr) LogReleaseFailure(cudaMemPoolDestroy(pool_), "cudaMemPoolDestroy");
    pool_ = std::exchange(o.pool_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

// ---- CudaStream ----

int DeviceSmCount() {
  static const int sms = [] {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
      return 132;
    }
    return n;
  }();
  return sms;
}

absl::StatusOr<CudaStream> CudaStream::Create(int priority) {
  CudaStream s;
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(&s.s_, cudaStreamNonBlocking, priority));
  return s;
}

int CudaStream::GreatestPriority() {
  int least = 0, greatest = 0;
  if (cudaDeviceGetStreamPriorityRange(&least, &greatest) != cudaSuccess) return 0;
  return greatest;
}

CudaStream::~CudaStream() {
  if (s_ != nullptr) LogReleaseFailure(cudaStreamDestroy(s_), "cudaStreamDestroy");
}

CudaStream& CudaStream::operator=(CudaStream&& o) noexcept {
  if (this != &o) {
    if (s_ != nullptr) LogReleaseFailure(cudaStreamDestroy(s_), "cudaStreamDestroy");
    s_ = std::exchange(o.s_, nullptr);
  }
  return *this;
}

// ---- CudaEvent ----

absl::StatusOr<CudaEvent> CudaEvent::Create(bool timing) {
  CudaEvent e;
  CUDA_RETURN_IF_ERROR(
      cudaEventCreateWithFlags(&e.e_, timing ? cudaEventDefault : cudaEventDisableTiming));
  return e;
}

CudaEvent::~CudaEvent() {
  if (e_ != nullptr) LogReleaseFailure(cudaEventDestroy(e_), "cudaEventDestroy");
}

CudaEvent& CudaEvent::operator=(CudaEvent&& o) noexcept {
  if (this != &o) {
    if (e_ != nullptr) LogReleaseFailure(cudaEventDestroy(e_), "cudaEventDestroy");
    e_ = std::exchange(o.e_, nullptr);
  }
  return *this;
}

// ---- CublasHandle ----

absl::StatusOr<CublasHandle> CublasHandle::Create() {
  CublasHandle h;
  CUBLAS_RETURN_IF_ERROR(cublasCreate(&h.h_));
  return h;
}

CublasHandle::~CublasHandle() {
  if (h_ != nullptr) LogReleaseFailure(cublasDestroy(h_), "cublasDestroy");
}

CublasHandle& CublasHandle::operator=(CublasHandle&& o) noexcept {
  if (this != &o) {
    if (h_ != nullptr) LogReleaseFailure(cublasDestroy(h_), "cublasDestroy");
    h_ = std::exchange(o.h_, nullptr);
  }
  return *this;
}

// ---- CudaGraphExec ----

absl::StatusOr<CudaGraphExec> CudaGraphExec::EndCapture(cudaStream_t stream) {
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  if (end != cudaSuccess) {
    // An invalidated capture may still hand back a partial graph.
    if (graph != nullptr) LogReleaseFailure(cudaGraphDestroy(graph), "cudaGraphDestroy");
    return CudaStatus(end, "cudaStreamEndCapture");
  }
  if (graph == nullptr) {
    return absl::FailedPreconditionError("cudaStreamEndCapture: no graph was captured");
  }
  CudaGraphExec exec;
  const cudaError_t inst = cudaGraphInstantiate(&exec.g_, graph, 0);
  // The executable graph holds its own copy; the template is not needed again.
  LogReleaseFailure(cudaGraphDestroy(graph), "cudaGraphDestroy");
  if (inst != cudaSuccess) {
    exec.g_ = nullptr;
    return CudaStatus(inst, "cudaGraphInstantiate");
  }
  return exec;
}

absl::Status CudaGraphExec::Launch(cudaStream_t stream) const {
  if (g_ == nullptr) return absl::FailedPreconditionError("CudaGraphExec::Launch: no graph");
  CUDA_RETURN_IF_ERROR(cudaGraphLaunch(g_, stream));
  return absl::OkStatus();
}

CudaGraphExec::~CudaGraphExec() {
  if (g_ != nullptr) LogReleaseFailure(cudaGraphExecDestroy(g_), "cudaGraphExecDestroy");
}

CudaGraphExec& CudaGraphExec::operator=(CudaGraphExec&& o) noexcept {
  if (this != &o) {
    if (g_ != nullptr) LogReleaseFailure(cudaGraphExecDestroy(g_), "cudaGraphExecDestroy");
    g_ = std::exchange(o.g_, nullptr);
  }
  return *this;
}

}  // namespace tailorkv::cuda
