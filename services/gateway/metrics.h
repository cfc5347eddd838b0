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
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/prometheus.h"

namespace tailorkv::gateway {

using common::Histogram;

// The gateway's own series (GatewayMetrics::Render adds the workers').
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
  std::string Render(int workers_ready, int workers) {
    std::string out;
    auto help = [&out](const char* name, const char* type, const char* text) {
      absl::StrAppend(&out, "# HELP ", name, " ", text, "\n# TYPE ", name, " ", type, "\n");
    };
    help("tailorkv:time_to_first_token_seconds", "histogram", "Time to first token, as the gateway saw it.");
    out += ttft.Render("tailorkv:time_to_first_token_seconds", "");
    help("tailorkv:time_per_output_token_seconds", "histogram", "Time between output tokens.");
    out += tpot.Render("tailorkv:time_per_output_token_seconds", "");
    help("tailorkv:e2e_request_latency_seconds", "histogram", "Request latency, arrival to last byte.");
    out += e2e.Render("tailorkv:e2e_request_latency_seconds", "");
    help("tailorkv:prompt_tokens_total", "counter", "Prompt tokens of finished requests.");
    absl::StrAppend(&out, "tailorkv:prompt_tokens_total ", prompt_tokens.load(), "\n");
    help("tailorkv:generation_tokens_total", "counter", "Generated tokens.");
    absl::StrAppend(&out, "tailorkv:generation_tokens_total ", generation_tokens.load(), "\n");
    help("tailorkv:request_success_total", "counter", "Finished requests by finish reason.");
    absl::StrAppend(&out, "tailorkv:request_success_total{finished_reason=\"stop\"} ", finished_stop.load(), "\n");
    absl::StrAppend(&out, "tailorkv:request_success_total{finished_reason=\"length\"} ", finished_length.load(),
                    "\n");
    absl::StrAppend(&out, "tailorkv:request_success_total{finished_reason=\"abort\"} ", finished_abort.load(),
                    "\n");
    help("tailorkv:request_errors_total", "counter", "Requests that ended in an error, by HTTP status.");
    {
      absl::MutexLock lock(&errors_mu);
      for (const auto& [code, n] : errors_by_http_status) {
        absl::StrAppend(&out, "tailorkv:request_errors_total{status=\"", code, "\"} ", n, "\n");
      }
    }
    help("tailorkv:client_disconnects_total", "counter", "Streams whose client went away (generation aborted).");
    absl::StrAppend(&out, "tailorkv:client_disconnects_total ", client_disconnects.load(), "\n");
    help("tailorkv:gateway_retries_total", "counter", "Requests moved to another worker before their first token.");
    absl::StrAppend(&out, "tailorkv:gateway_retries_total ", retries.load(), "\n");
    help("tailorkv:num_requests_running", "gauge", "Requests the gateway is serving now.");
    absl::StrAppend(&out, "tailorkv:num_requests_running ", running.load(), "\n");
    help("tailorkv:gateway_workers_ready", "gauge", "Workers in the rotation.");
    absl::StrAppend(&out, "tailorkv:gateway_workers_ready ", workers_ready, "\n");
    help("tailorkv:gateway_workers", "gauge", "Workers configured.");
    absl::StrAppend(&out, "tailorkv:gateway_workers ", workers, "\n");
    return out;
  }
};

}  // namespace tailorkv::gateway
