// A CUPTI Activity-API tracer for benchmarks: the real, concurrent timeline
// of the GPU work (kernels, memcpys, memsets) on every stream. ncu
// serializes kernels and nsys is not on the GPU machine; this shows which
// stream sat idle waiting for which. Kernels launched from a CUDA graph come
// back one record per kernel node, with the node's id.
//
// Contract:
//  - At most one KernelTrace per process: CUPTI's buffer callbacks are
//    process-wide. Create() fails (FailedPrecondition) while one exists.
//  - Create() registers the buffer callbacks, which loads and attaches CUPTI
//    but enables nothing. Create it before the CUDA graphs to trace are
//    captured (i.e. before the backend): PyTorch attaches CUPTI before graph
//    capture too, since attaching late was unsafe with graphs on older
//    drivers.
//  - Start() enables CONCURRENT_KERNEL (not KERNEL, which serializes
//    kernels), MEMCPY and MEMSET. CUPTI documents no need to enable them
//    before a graph is instantiated, so Start() may follow warm-up steps that
//    captured the graph; reports for CUDA 13.0 agree. Unverified here: if
//    Stop() returns no kernel records for graph launches, that assumption
//    failed (start before the graph's capture instead).
//  - Stop() waits for the device, flushes CUPTI's buffers, disables the kinds
//    and returns the records of the work that ran since Start(), sorted by
//    start. Records CUPTI could not time (0 timestamps) or had no buffer for
//    are counted in dropped_records(), not returned. Start/Stop may repeat.
//  - Every CUPTI error is an absl::Status carrying CUPTI's text. Destroying a
//    started trace disables what Start() enabled and discards its records.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tailorkv::bench {

struct TraceRecord {
  enum class Kind { kKernel, kMemcpy, kMemset };
  Kind kind = Kind::kKernel;
  // Kernel: demangled, without return type, namespaces or parameters (its
  // template arguments kept), e.g. "DecodeAttentionKernel<128>".
  // Memcpy: "memcpy HtoD 1234 B"; memset: "memset 1234 B".
  std::string name;
  uint32_t stream_id = 0;
  uint32_t channel_id = 0;                 // the hardware channel the work ran on
  uint64_t start_ns = 0, end_ns = 0;       // CUPTI timestamps (ns)
  std::array<int32_t, 3> grid{}, block{};  // kernels only
  uint64_t bytes = 0;                      // memcpy / memset only
  uint64_t graph_node_id = 0;              // 0: not launched from a graph
  uint32_t graph_id = 0;
  uint32_t correlation_id = 0;
};

class KernelTrace {
 public:
  static absl::StatusOr<std::unique_ptr<KernelTrace>> Create();
  ~KernelTrace();
  KernelTrace(const KernelTrace&) = delete;
  KernelTrace& operator=(const KernelTrace&) = delete;

  absl::Status Start();
  absl::StatusOr<std::vector<TraceRecord>> Stop();
  // Records lost since Create() (no buffer, or no timestamps).
  size_t dropped_records() const;

 private:
  KernelTrace() = default;
  bool started_ = false;
};

// Decode-step analysis of a trace of consecutive decode steps, one kernel
// per step named with `step_marker` (all of it one step when none is); two
// steps part at the longest GPU-idle stretch between their markers. Per
// step: wall (first kernel start to last kernel end), the sum of kernel
// durations and the main stream's idle time; per stream (the main one: the
// most busy): ops, busy time (the union of its kernels', memcpys' and
// memsets' intervals) and the top ops by summed duration.
std::string SummarizeDecodeTrace(const std::vector<TraceRecord>& records,
                                 std::string_view step_marker = "EmbeddingKernel",
                                 int top_kernels = 12);

// The records as JSON: `meta`'s fields plus "records", each with times in
// microseconds (floats) relative to the earliest record's start.
nlohmann::json TraceToJson(const std::vector<TraceRecord>& records, nlohmann::json meta);

}  // namespace tailorkv::bench
