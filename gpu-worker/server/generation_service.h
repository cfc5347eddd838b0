// GenerationService: tailorkv.v1.Generation over one runtime::Engine.
//
// Each Generate call is validated (RequestValidator), admitted through a
// bounded AdmissionQueue (RESOURCE_EXHAUSTED when full), then handed to the
// engine's scheduler; the gRPC handler thread streams the chunks as they
// come (a client that stops reading is cut off by the engine). The
// engine's chunk callback returns false as soon as the call is cancelled, its deadline passes, or Abort names it, so the engine
// stops within one decode step; the same checks run while the call waits in
// the queue.
//
// Thread-safe (gRPC calls the handlers from its thread pool). The Engine
// must outlive the service, and the service must outlive the grpc::Server
// it is registered with.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/prometheus.h"
#include "runtime/engine.h"
#include "server/admission_queue.h"
#include "server/request_validator.h"
#include "tailorkv/v1/generation.grpc.pb.h"

namespace tailorkv::worker {

struct GenerationServiceOptions {
  // Requests that may wait while the engine is busy; more get RESOURCE_EXHAUSTED.
  int max_queue = 16;
  // Generations running at once: the engine's max_running (more wait here,
  // up to max_queue).
  int max_running = 4;
  // How often a queued request looks for cancellation, deadline and Abort.
  absl::Duration queue_poll = absl::Milliseconds(20);
  RequestLimits limits;
  // Reported by GetModelInfo.
  std::string model_path;

  absl::Status Validate() const;
};

class GenerationService final : public v1::Generation::Service {
 public:
  GenerationService(runtime::Engine& engine, const GenerationServiceOptions& options);

  // New Generate calls get UNAVAILABLE from now on; running and queued
  // calls continue. Idempotent; thread-safe.
  void BeginDrain();

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status Abort(grpc::ServerContext* context, const v1::AbortRequest* request,
                     v1::AbortResponse* response) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context, const v1::GetModelInfoRequest* request,
                            v1::ModelInfo* response) override;
  grpc::Status GetLoad(grpc::ServerContext* context, const v1::GetLoadRequest* request,
                       v1::Load* response) override;

  // The worker's metrics in Prometheus text, vLLM's meanings under the
  // `tailorkv:` prefix: request latency histograms (TTFT = queue + prefill,
  // time per output token, end to end, queue time), token counters,
  // finished requests by reason, requests running / waiting, KV bytes in
  // use per policy and tier, the KV budget and its use, the plan in use.
  // Thread-safe.
  std::string PrometheusText() const;

 private:
  // Registers a request id for Abort; empty ids are not registered.
  class AbortRegistration;

  runtime::Engine& engine_;
  const GenerationServiceOptions options_;
  RequestValidator validator_;
  AdmissionQueue queue_;
  std::atomic<bool> draining_{false};

  // Metrics of finished requests (PrometheusText).
  common::Histogram ttft_{common::TtftBuckets()};
  common::Histogram tpot_{common::TpotBuckets()};
  common::Histogram e2e_{common::E2eBuckets()};
  common::Histogram queue_time_{common::E2eBuckets()};
  std::atomic<uint64_t> prompt_tokens_{0}, generation_tokens_{0};
  std::atomic<uint64_t> finished_stop_{0}, finished_length_{0}, finished_abort_{0}, failed_{0};

  absl::Mutex abort_mu_;
  std::map<std::string, std::shared_ptr<std::atomic<bool>>> abort_flags_
      ABSL_GUARDED_BY(abort_mu_);
};

}  // namespace tailorkv::worker
