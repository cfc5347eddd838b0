// Placeholder for tailorkv.v1.KvHost until the kv-host server lands: every
// RPC answers UNIMPLEMENTED with a message naming it, so that callers see
// why instead of gRPC's empty UNIMPLEMENTED. Stateless; thread-safe.
#pragma once

#include "tailorkv/v1/kv_host.grpc.pb.h"

namespace tailorkv::kvhost {

class KvHostPlaceholderService final : public v1::KvHost::Service {
 public:
  grpc::Status Attach(grpc::ServerContext*, const v1::AttachRequest*,
                      v1::AttachResponse*) override;
  grpc::Status CreateSession(grpc::ServerContext*, const v1::CreateSessionRequest*,
                             v1::Session*) override;
  grpc::Status CloseSession(grpc::ServerContext*, const v1::CloseSessionRequest*,
                            v1::CloseSessionResponse*) override;
  grpc::Status Reserve(grpc::ServerContext*, const v1::ReserveRequest*,
                       v1::Reservation*) override;
  grpc::Status Release(grpc::ServerContext*, const v1::ReleaseRequest*,
                       v1::ReleaseResponse*) override;
  grpc::Status GetStats(grpc::ServerContext*, const v1::GetStatsRequest*,
                        v1::KvHostStats*) override;
  grpc::Status Drain(grpc::ServerContext*, const v1::DrainRequest*,
                     v1::DrainResponse*) override;
};

}  // namespace tailorkv::kvhost
