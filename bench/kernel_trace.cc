#include "kernel_trace.h"

#include <cuda_runtime.h>
#include <cupti.h>
#include <cxxabi.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "cuda/cuda_check.h"

namespace tailorkv::bench {
namespace {

constexpr size_t kBufferBytes = size_t{8} << 20;
constexpr size_t kBufferAlign = 8;  // CUPTI's record alignment
// CONCURRENT_KERNEL, not KERNEL: the latter serializes kernels.
constexpr CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
                                         CUPTI_ACTIVITY_KIND_MEMCPY, CUPTI_ACTIVITY_KIND_MEMSET};

absl::Status CuptiStatus(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return absl::OkStatus();
  const char* text = nullptr;
  if (cuptiGetResultString(r, &text) != CUPTI_SUCCESS || text == nullptr) text = "unknown error";
  return absl::InternalError(absl::StrCat(what, ": ", text, " (CUPTI ", static_cast<int>(r), ")"));
}

#define CUPTI_RETURN_IF_ERROR(expr)                                \
  do {                                                             \
    ::absl::Status tkv_cupti_status_ = CuptiStatus((expr), #expr); \
    if (!tkv_cupti_status_.ok()) return tkv_cupti_status_;         \
  } while (0)

// Shared with CUPTI's callbacks, which take no user pointer and may run on
// CUPTI's own thread. Leaked: CUPTI may deliver a buffer during exit.
struct Collector {
  std::mutex mu;
  bool exists = false;      // a KernelTrace is alive
  bool collecting = false;  // between Start() and Stop()
  std::vector<TraceRecord> records;
  size_t dropped = 0;
};
Collector& TheCollector() {
  static Collector* c = new Collector;
  return *c;
}

const char* CopyKindName(uint8_t kind) {
  switch (kind) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "HtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "DtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "DtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOH: return "HtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_PTOP: return "PtoP";
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOA: return "HtoA";
    case CUPTI_ACTIVITY_MEMCPY_KIND_ATOH: return "AtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_ATOA: return "AtoA";
    case CUPTI_ACTIVITY_MEMCPY_KIND_ATOD: return "AtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOA: return "DtoA";
    default: return "other";
  }
}

// The record structs are those this CUPTI version's header names for each
// kind (cupti_activity.h, CUDA 13.0); kernel names are copied here since
// CUPTI owns the strings, and demangled in Stop() (off CUPTI's thread).
std::optional<TraceRecord> Convert(const CUpti_Activity* a) {
  TraceRecord r;
  switch (a->kind) {
    case CUPTI_ACTIVITY_KIND_KERNEL:
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(a);
      r.kind = TraceRecord::Kind::kKernel;
      r.name = k->name != nullptr ? k->name : "?";
      r.stream_id = k->streamId;
      r.channel_id = k->channelID;
      r.start_ns = k->start;
      r.end_ns = k->end;
      r.grid = {k->gridX, k->gridY, k->gridZ};
      r.block = {k->blockX, k->blockY, k->blockZ};
      r.graph_node_id = k->graphNodeId;
      r.graph_id = k->graphId;
      r.correlation_id = k->correlationId;
      return r;
    }
    case CUPTI_ACTIVITY_KIND_MEMCPY: {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(a);
      r.kind = TraceRecord::Kind::kMemcpy;
      r.name = absl::StrCat("memcpy ", CopyKindName(m->copyKind), " ", m->bytes, " B");
      r.stream_id = m->streamId;
      r.channel_id = m->channelID;
      r.start_ns = m->start;
      r.end_ns = m->end;
      r.bytes = m->bytes;
      r.graph_node_id = m->graphNodeId;
      r.graph_id = m->graphId;
      r.correlation_id = m->correlationId;
      return r;
    }
    case CUPTI_ACTIVITY_KIND_MEMSET: {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(a);
      r.kind = TraceRecord::Kind::kMemset;
      r.name = absl::StrCat("memset ", m->bytes, " B");
      r.stream_id = m->streamId;
      r.channel_id = m->channelID;
      r.start_ns = m->start;
      r.end_ns = m->end;
      r.bytes = m->bytes;
      r.graph_node_id = m->graphNodeId;
      r.graph_id = m->graphId;
      r.correlation_id = m->correlationId;
      return r;
    }
    default: return std::nullopt;
  }
}

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(kBufferAlign, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;  // no buffer: CUPTI drops (and counts) records
  *max_records = 0;                               // as many as fit
}

void CUPTIAPI BufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::vector<TraceRecord> got;
  size_t untimed = 0;
  CUpti_Activity* a = nullptr;
  // Stops at the end of the buffer (MAX_LIMIT_REACHED) or at a bad record.
  while (buffer != nullptr && cuptiActivityGetNextRecord(buffer, valid, &a) == CUPTI_SUCCESS) {
    std::optional<TraceRecord> r = Convert(a);
    if (!r) continue;
    // 0 timestamps: CUPTI lacked device memory to time this one.
    if (r->start_ns == 0 || r->end_ns < r->start_ns) {
      ++untimed;
    } else {
      got.push_back(std::move(*r));
    }
  }
  std::free(buffer);
  size_t dropped = 0;
  if (cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped) != CUPTI_SUCCESS) dropped = 0;
  Collector& c = TheCollector();
  std::lock_guard<std::mutex> lock(c.mu);
  if (!c.collecting) return;  // a buffer from before Start() or after Stop()
  c.records.insert(c.records.end(), std::make_move_iterator(got.begin()),
                   std::make_move_iterator(got.end()));
  c.dropped += untimed + dropped;
}

absl::Status DisableKinds() {
  absl::Status st;
  for (CUpti_ActivityKind k : kKinds)
    st.Update(CuptiStatus(cuptiActivityDisable(k), "cuptiActivityDisable"));
  return st;
}

// "void ns::(anonymous namespace)::Foo<128>(const T*, int)" -> "Foo<128>".
std::string ShortKernelName(const std::string& mangled) {
  int status = 0;
  char* dem = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
  if (dem == nullptr) return mangled;  // not a C++ name (or not demangleable)
  std::string d = absl::StrReplaceAll(dem, {{"(anonymous namespace)::", ""}});
  std::free(dem);
  int depth = 0;
  size_t cut = d.size(), begin = 0;
  for (size_t i = 0; i < d.size(); ++i) {
    const char ch = d[i];
    if (ch == '<') {
      ++depth;
    } else if (ch == '>') {
      depth = std::max(depth - 1, 0);
    } else if (depth == 0) {
      if (ch == '(') {  // the parameter list
        cut = i;
        break;
      }
      if (ch == ' ') begin = i + 1;                                         // after the return type
      if (ch == ':' && i + 1 < d.size() && d[i + 1] == ':') begin = i + 2;  // after a qualifier
    }
  }
  return begin < cut ? d.substr(begin, cut - begin) : d;
}

// ---- Decode-step analysis ----

struct Step {
  uint64_t begin = 0, end = 0;  // first kernel start, last kernel end
  std::vector<const TraceRecord*> ops;
};

// Steps are told apart by their markers; the boundary between two is the
// longest stretch with no kernel running between their markers (the host's
// round trip: logits out, token in, graph launch), not the marker itself, so
// that kernels starting with or before the marker stay in its step.
std::vector<Step> SplitSteps(const std::vector<TraceRecord>& recs, std::string_view marker) {
  std::vector<const TraceRecord*> kernels;
  for (const auto& r : recs) {
    if (r.kind == TraceRecord::Kind::kKernel) kernels.push_back(&r);
  }
  if (kernels.empty()) return {};
  std::vector<uint64_t> gap(kernels.size(), 0);  // idle time before kernel k
  std::vector<size_t> markers;
  uint64_t max_end = kernels[0]->end_ns;
  for (size_t k = 0; k < kernels.size(); ++k) {
    if (k > 0) {
      gap[k] = kernels[k]->start_ns > max_end ? kernels[k]->start_ns - max_end : 0;
      max_end = std::max(max_end, kernels[k]->end_ns);
    }
    if (kernels[k]->name.find(marker) != std::string::npos) markers.push_back(k);
  }
  std::vector<size_t> cuts = {0};  // first kernel of each step
  for (size_t i = 1; i < markers.size(); ++i) {
    size_t best = markers[i];
    for (size_t k = markers[i - 1] + 1; k <= markers[i]; ++k) {
      if (gap[k] > gap[best]) best = k;
    }
    cuts.push_back(best);
  }
  cuts.push_back(kernels.size());
  std::vector<Step> steps(cuts.size() - 1);
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    Step& s = steps[i];
    s.begin = kernels[cuts[i]]->start_ns;
    s.end = s.begin;
    for (size_t k = cuts[i]; k < cuts[i + 1]; ++k) s.end = std::max(s.end, kernels[k]->end_ns);
    // Copies between steps (the token in, the logits out) are the host's
    // round trip, not the step: only what starts inside the kernels' span.
    for (const auto& r : recs) {
      if (r.start_ns >= s.begin && r.start_ns <= s.end) s.ops.push_back(&r);
    }
  }
  return steps;
}

// Length of the union of [start, end) intervals clipped to [lo, hi].
uint64_t UnionNs(std::vector<std::pair<uint64_t, uint64_t>> iv, uint64_t lo, uint64_t hi) {
  std::sort(iv.begin(), iv.end());
  uint64_t total = 0, cur_b = 0, cur_e = 0;
  bool open = false;
  for (auto [b, e] : iv) {
    b = std::clamp(b, lo, hi);
    e = std::clamp(e, lo, hi);
    if (open && b <= cur_e) {
      cur_e = std::max(cur_e, e);
      continue;
    }
    if (open) total += cur_e - cur_b;
    cur_b = b, cur_e = e, open = true;
  }
  if (open) total += cur_e - cur_b;
  return total;
}

}  // namespace

absl::StatusOr<std::unique_ptr<KernelTrace>> KernelTrace::Create() {
  Collector& c = TheCollector();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.exists) return absl::FailedPreconditionError("a KernelTrace exists already");
    c.exists = true;
  }
  // Once per process: CUPTI cannot unregister them (they ignore buffers
  // while nothing collects).
  static const absl::Status registered =
      CuptiStatus(cuptiActivityRegisterCallbacks(BufferRequested, BufferCompleted),
                  "cuptiActivityRegisterCallbacks");
  if (!registered.ok()) {
    std::lock_guard<std::mutex> lock(c.mu);
    c.exists = false;
    return registered;
  }
  return std::unique_ptr<KernelTrace>(new KernelTrace());
}

KernelTrace::~KernelTrace() {
  if (started_) {
    (void)DisableKinds();
    (void)cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  }
  Collector& c = TheCollector();
  std::lock_guard<std::mutex> lock(c.mu);
  c.collecting = false;
  c.records.clear();
  c.exists = false;
}

absl::Status KernelTrace::Start() {
  if (started_) return absl::FailedPreconditionError("KernelTrace started already");
  Collector& c = TheCollector();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.records.clear();
    c.collecting = true;
  }
  for (CUpti_ActivityKind k : kKinds) {
    absl::Status st = CuptiStatus(cuptiActivityEnable(k), "cuptiActivityEnable");
    if (!st.ok()) {
      (void)DisableKinds();
      std::lock_guard<std::mutex> lock(c.mu);
      c.collecting = false;
      return st;
    }
  }
  started_ = true;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<TraceRecord>> KernelTrace::Stop() {
  if (!started_) return absl::FailedPreconditionError("KernelTrace not started");
  started_ = false;
  // FlushAll does not wait for the GPU: records of unfinished work would
  // come back without timestamps.
  absl::Status st = cuda::CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  // Not under the lock: the flush may call BufferCompleted on this thread.
  st.Update(CuptiStatus(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED),
                        "cuptiActivityFlushAll"));
  st.Update(DisableKinds());
  st.Update(CuptiStatus(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED),
                        "cuptiActivityFlushAll"));
  std::vector<TraceRecord> out;
  Collector& c = TheCollector();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.collecting = false;
    out.swap(c.records);
  }
  if (!st.ok()) return st;
  std::map<std::string, std::string> names;  // a few hundred distinct kernels
  for (auto& r : out) {
    if (r.kind != TraceRecord::Kind::kKernel) continue;
    auto [it, added] = names.try_emplace(r.name);
    if (added) it->second = ShortKernelName(r.name);
    r.name = it->second;
  }
  std::stable_sort(out.begin(), out.end(), [](const TraceRecord& a, const TraceRecord& b) {
    return a.start_ns < b.start_ns;
  });
  return out;
}

size_t KernelTrace::dropped_records() const {
  Collector& c = TheCollector();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.dropped;
}

std::string SummarizeDecodeTrace(const std::vector<TraceRecord>& recs, std::string_view step_marker,
                                 int top_kernels) {
  std::string out;
  size_t n_kernels = 0, n_memcpy = 0, n_memset = 0;
  for (const auto& r : recs) {
    n_kernels += r.kind == TraceRecord::Kind::kKernel;
    n_memcpy += r.kind == TraceRecord::Kind::kMemcpy;
    n_memset += r.kind == TraceRecord::Kind::kMemset;
  }
  const std::vector<Step> steps = SplitSteps(recs, step_marker);
  absl::StrAppendFormat(&out, "  trace: %d steps (marker %s), %d kernels, %d memcpys, %d memsets\n",
                        steps.size(), step_marker, n_kernels, n_memcpy, n_memset);
  if (n_kernels == 0) {
    out +=
        "  no kernel records: CUPTI traced no kernel of the graph launches (see "
        "bench/kernel_trace.h)\n";
    return out;
  }
  // Per stream over all steps: busy time (clipped to each step) and ops.
  struct StreamStats {
    uint64_t busy_ns = 0;
    size_t ops = 0, kernels = 0;
    std::map<std::string, std::pair<uint64_t, size_t>> by_name;  // total ns, count
  };
  std::map<uint32_t, StreamStats> streams;
  std::vector<std::map<uint32_t, uint64_t>> step_busy(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    std::map<uint32_t, std::vector<std::pair<uint64_t, uint64_t>>> iv;
    for (const TraceRecord* r : steps[i].ops) {
      iv[r->stream_id].push_back({r->start_ns, r->end_ns});
      StreamStats& s = streams[r->stream_id];
      ++s.ops;
      s.kernels += r->kind == TraceRecord::Kind::kKernel;
      auto& [ns, count] = s.by_name[r->name];
      ns += r->end_ns - r->start_ns;
      ++count;
    }
    for (auto& [id, v] : iv) {
      step_busy[i][id] = UnionNs(std::move(v), steps[i].begin, steps[i].end);
      streams[id].busy_ns += step_busy[i][id];
    }
  }
  uint32_t main_id = streams.begin()->first;
  for (const auto& [id, s] : streams) {
    if (s.busy_ns > streams[main_id].busy_ns) main_id = id;
  }
  out += "  step   wall ms   kernel sum ms   sum/wall   main-stream idle ms\n";
  for (size_t i = 0; i < steps.size(); ++i) {
    uint64_t sum = 0;
    for (const TraceRecord* r : steps[i].ops) {
      if (r->kind == TraceRecord::Kind::kKernel) sum += r->end_ns - r->start_ns;
    }
    const uint64_t wall = steps[i].end - steps[i].begin;
    const uint64_t idle = wall - std::min(wall, step_busy[i][main_id]);
    absl::StrAppendFormat(&out, "  %-6d %8.3f   %13.3f   %8.2f   %19.3f\n", i, wall / 1e6,
                          sum / 1e6, wall > 0 ? static_cast<double>(sum) / wall : 0.0, idle / 1e6);
  }
  const double n = static_cast<double>(steps.size());
  out += "  stream       ops/step  kernels/step  busy ms/step\n";
  for (const auto& [id, s] : streams) {
    absl::StrAppendFormat(&out, "  %-6d%-6s %8.1f  %12.1f  %12.3f\n", id,
                          id == main_id ? " main" : "", s.ops / n, s.kernels / n,
                          s.busy_ns / 1e6 / n);
  }
  for (const auto& [id, s] : streams) {
    std::vector<std::pair<uint64_t, std::string>> top;
    for (const auto& [name, v] : s.by_name) top.push_back({v.first, name});
    std::sort(top.rbegin(), top.rend());
    if (top.size() > static_cast<size_t>(top_kernels)) top.resize(top_kernels);
    absl::StrAppendFormat(&out, "  stream %d%s, top by summed time:  ms/step  count/step  avg us\n",
                          id, id == main_id ? " (main)" : "");
    for (const auto& [ns, name] : top) {
      const size_t count = s.by_name.at(name).second;
      absl::StrAppendFormat(&out, "    %-60.60s %8.3f  %10.1f  %6.1f\n", name, ns / 1e6 / n,
                            count / n, ns / 1e3 / count);
    }
  }
  return out;
}

nlohmann::json TraceToJson(const std::vector<TraceRecord>& recs, nlohmann::json meta) {
  uint64_t t0 = std::numeric_limits<uint64_t>::max();
  for (const auto& r : recs) t0 = std::min(t0, r.start_ns);
  nlohmann::json list = nlohmann::json::array();
  for (const auto& r : recs) {
    const char* kind = r.kind == TraceRecord::Kind::kKernel   ? "kernel"
                       : r.kind == TraceRecord::Kind::kMemcpy ? "memcpy"
                                                              : "memset";
    nlohmann::json j = {{"kind", kind},
                        {"name", r.name},
                        {"stream", r.stream_id},
                        {"channel", r.channel_id},
                        {"start_us", (r.start_ns - t0) / 1e3},
                        {"end_us", (r.end_ns - t0) / 1e3},
                        {"graph_id", r.graph_id},
                        {"graph_node", r.graph_node_id},
                        {"corr", r.correlation_id}};
    if (r.kind == TraceRecord::Kind::kKernel) {
      j["grid"] = r.grid;
      j["block"] = r.block;
    } else {
      j["bytes"] = r.bytes;
    }
    list.push_back(std::move(j));
  }
  meta["records"] = std::move(list);
  return meta;
}

}  // namespace tailorkv::bench
