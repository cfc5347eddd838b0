// Prometheus metrics in the text exposition format (version 0.0.4), with
// the meanings of vLLM's (`vllm:` -> `tailorkv:`), so dashboards built for
// vLLM need only the prefix changed. Counters and histograms are
// thread-safe; labels are fixed at registration (one series per label set).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/prometheus.h"
#include "gateway/worker_pool.h"

namespace tailorkv::gateway {

using common::Histogram;

// The gateway's own series; Render adds the workers' states.
struct GatewayMetrics {
  // vLLM's buckets for these three.
  Histogram ttft{common::TtftBuckets()};
  Histogram tpot{common::TpotBuckets()};
  Histogram e2e{common::E2eBuckets()};
  std::atomic<uint64_t> prompt_tokens{0}, generation_tokens{0};
  std::atomic<uint64_t> finished_stop{0}, finished_length{0}, finished_abort{0};
  std::atomic<uint64_t> client_disconnects{0}, retries{0};
  std::atomic<int64_t> running{0};
  absl::Mutex errors_mu;
  std::map<int, uint64_t> errors_by_http_status;  // requests that ended in an error

  void Error(int http_status) {
    absl::MutexLock lock(&errors_mu);
    ++errors_by_http_status[http_status];
  }
  // Every series, the workers' states included.
  std::string Render(const std::vector<WorkerPool::WorkerState>& workers) {
    using common::AppendHeader;
    using common::AppendSample;
    std::string out;
    AppendHeader(&out, "tailorkv:time_to_first_token_seconds", "histogram", "Time to first token, as the gateway saw it.");
    out += ttft.Render("tailorkv:time_to_first_token_seconds");
    AppendHeader(&out, "tailorkv:time_per_output_token_seconds", "histogram", "Time between output tokens.");
    out += tpot.Render("tailorkv:time_per_output_token_seconds");
    AppendHeader(&out, "tailorkv:e2e_request_latency_seconds", "histogram", "Request latency, arrival to last byte.");
    out += e2e.Render("tailorkv:e2e_request_latency_seconds");
    AppendHeader(&out, "tailorkv:prompt_tokens_total", "counter", "Prompt tokens of finished requests.");
    AppendSample(&out, "tailorkv:prompt_tokens_total", "", prompt_tokens.load());
    AppendHeader(&out, "tailorkv:generation_tokens_total", "counter", "Generated tokens.");
    AppendSample(&out, "tailorkv:generation_tokens_total", "", generation_tokens.load());
    AppendHeader(&out, "tailorkv:request_success_total", "counter", "Finished requests by finish reason.");
    AppendSample(&out, "tailorkv:request_success_total", "finished_reason=\"stop\"", finished_stop.load());
    AppendSample(&out, "tailorkv:request_success_total", "finished_reason=\"length\"", finished_length.load());
    AppendSample(&out, "tailorkv:request_success_total", "finished_reason=\"abort\"", finished_abort.load());
    AppendHeader(&out, "tailorkv:request_errors_total", "counter", "Requests that ended in an error, by HTTP status.");
    {
      absl::MutexLock lock(&errors_mu);
      for (const auto& [code, n] : errors_by_http_status) {
        AppendSample(&out, "tailorkv:request_errors_total", absl::StrCat("status=\"", code, "\""), n);
      }
    }
    AppendHeader(&out, "tailorkv:client_disconnects_total", "counter",
                 "Streams whose client went away (generation aborted).");
    AppendSample(&out, "tailorkv:client_disconnects_total", "", client_disconnects.load());
    AppendHeader(&out, "tailorkv:gateway_retries_total", "counter",
                 "Requests moved to another worker before their first token.");
    AppendSample(&out, "tailorkv:gateway_retries_total", "", retries.load());
    AppendHeader(&out, "tailorkv:num_requests_running", "gauge", "Requests the gateway is serving now.");
    AppendSample(&out, "tailorkv:num_requests_running", "", running.load());
    int ready = 0;
    for (const WorkerPool::WorkerState& w : workers) ready += w.ready;
    AppendHeader(&out, "tailorkv:gateway_workers_ready", "gauge", "Workers in the rotation.");
    AppendSample(&out, "tailorkv:gateway_workers_ready", "", ready);
    AppendHeader(&out, "tailorkv:gateway_workers", "gauge", "Workers configured.");
    AppendSample(&out, "tailorkv:gateway_workers", "", static_cast<double>(workers.size()));
    AppendHeader(&out, "tailorkv:gateway_worker_requests_total", "counter", "Requests sent to each worker.");
    for (const WorkerPool::WorkerState& w : workers) {
      AppendSample(&out, "tailorkv:gateway_worker_requests_total",
                   absl::StrCat("worker=\"", common::LabelValue(w.address), "\""), static_cast<double>(w.chosen));
    }
    AppendHeader(&out, "tailorkv:gateway_worker_ready", "gauge", "1 while the worker is in the rotation.");
    for (const WorkerPool::WorkerState& w : workers) {
      AppendSample(&out, "tailorkv:gateway_worker_ready",
                   absl::StrCat("worker=\"", common::LabelValue(w.address), "\""), w.ready ? 1 : 0);
    }
    return out;
  }
};

}  // namespace tailorkv::gateway
