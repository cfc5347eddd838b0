// GenerationProxy: the gateway's gRPC face, the same tailorkv.v1.Generation
// service the workers serve, so that a gRPC client also needs one address.
//
// Generate goes to the least loaded ready worker (WorkerPool) and its
// responses are relayed as they come; a call that fails with UNAVAILABLE
// before its first response is retried on another ready worker; a client
// that cancels cancels the worker's call (the generation is aborted there).
// Abort is sent to every ready worker (request ids are the client's; the
// one running it aborts, the others answer OK). GetModelInfo is a ready
// worker's. GetLoad sums the ready workers' loads (max_queue and
// max_running too; draining only when every worker drains). With an API
// key, every call must carry `authorization: Bearer <key>` metadata
// (UNAUTHENTICATED otherwise), as the HTTP API's requests must.
#pragma once

#include <grpcpp/grpcpp.h>

#include "gateway/metrics.h"
#include "gateway/worker_pool.h"
#include "tailorkv/v1/generation.grpc.pb.h"

namespace tailorkv::gateway {

class GenerationProxy final : public tailorkv::v1::Generation::Service {
 public:
  // `pool` and `metrics` must outlive the service.
  GenerationProxy(WorkerPool* pool, GatewayMetrics* metrics, absl::Duration request_timeout,
                  std::string api_key = "")
      : pool_(pool), metrics_(metrics), request_timeout_(request_timeout), api_key_(std::move(api_key)) {}

  grpc::Status Generate(grpc::ServerContext* context, const tailorkv::v1::GenerateRequest* request,
                        grpc::ServerWriter<tailorkv::v1::GenerateResponse>* writer) override;
  grpc::Status Abort(grpc::ServerContext* context, const tailorkv::v1::AbortRequest* request,
                     tailorkv::v1::AbortResponse* response) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context, const tailorkv::v1::GetModelInfoRequest* request,
                            tailorkv::v1::ModelInfo* response) override;
  grpc::Status GetLoad(grpc::ServerContext* context, const tailorkv::v1::GetLoadRequest* request,
                       tailorkv::v1::Load* response) override;

 private:
  WorkerPool* pool_;
  GatewayMetrics* metrics_;
  absl::Duration request_timeout_;
  std::string api_key_;
  // OK, or UNAUTHENTICATED when a key is set and the call lacks it.
  grpc::Status CheckKey(const grpc::ServerContext* context) const;
};

}  // namespace tailorkv::gateway
