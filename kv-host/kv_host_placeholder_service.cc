#include "kv_host_placeholder_service.h"

#include <string>

namespace tailorkv::kvhost {

namespace {
grpc::Status NotYet(const char* method) {
  return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                      std::string("tailorkv.v1.KvHost/") + method +
                          " is not implemented yet in this kv-host build");
}
}  // namespace

grpc::Status KvHostPlaceholderService::Attach(grpc::ServerContext*, const v1::AttachRequest*,
                                              v1::AttachResponse*) {
  return NotYet("Attach");
}
grpc::Status KvHostPlaceholderService::CreateSession(grpc::ServerContext*,
                                                     const v1::CreateSessionRequest*,
                                                     v1::Session*) {
  return NotYet("CreateSession");
}
grpc::Status KvHostPlaceholderService::CloseSession(grpc::ServerContext*,
                                                    const v1::CloseSessionRequest*,
                                                    v1::CloseSessionResponse*) {
  return NotYet("CloseSession");
}
grpc::Status KvHostPlaceholderService::Reserve(grpc::ServerContext*, const v1::ReserveRequest*,
                                               v1::Reservation*) {
  return NotYet("Reserve");
}
grpc::Status KvHostPlaceholderService::Release(grpc::ServerContext*, const v1::ReleaseRequest*,
                                               v1::ReleaseResponse*) {
  return NotYet("Release");
}
grpc::Status KvHostPlaceholderService::GetStats(grpc::ServerContext*, const v1::GetStatsRequest*,
                                                v1::KvHostStats*) {
  return NotYet("GetStats");
}
grpc::Status KvHostPlaceholderService::Drain(grpc::ServerContext*, const v1::DrainRequest*,
                                             v1::DrainResponse*) {
  return NotYet("Drain");
}

}  // namespace tailorkv::kvhost
