// KvHostDataService: tailorkv.v1.KvHostData, the remote data plane
// (proto/tailorkv/v1/kv_host_data.proto): workers on other hosts keep their
// sparse layers' host KV here and move rows over gRPC (kv-host's
// --data-listen TCP address).
//
// Each remote worker gets its own InProcessStore (so no worker ever reads
// another's bytes); its arenas draw on the node's one budget through
// `take_budget` / `return_budget` (the daemon's counter, shared with the
// co-located workers). Every id, offset and length a peer sends is checked
// against the slices handed to that worker.
//
// Liveness: a worker whose last call is older than `lease` is dropped by a
// reaper thread and everything it held is freed; its key stops working
// (UNAUTHENTICATED), so it must Open again and rebuild.
//
// Thread-safety: gRPC's threads call the RPCs; mu_ guards the worker table,
// each worker's mutex its store's bookkeeping (lock order: mu_ first).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "store/fd_channel.h"
#include "store/in_process_store.h"
#include "tailorkv/v1/kv_host_data.grpc.pb.h"

namespace tailorkv::kvhost {

struct KvHostDataOptions {
  // Required, non-empty: the shared secret every call presents as
  // `authorization: Bearer <token>` (KV is user data).
  std::string token;
  uint64_t budget_bytes = 0;  // the node's budget (reported to workers; > 0)
  // Takes bytes of the node's budget for a new arena (ResourceExhausted
  // naming the budget when it cannot); returns them when the arena goes.
  std::function<absl::Status(uint64_t bytes, const std::string& what)> take_budget;
  std::function<void(uint64_t bytes)> return_budget;
  // Bytes of the node's budget nobody holds (for workers' placement).
  std::function<uint64_t()> free_bytes;
  uint64_t arena_bytes = uint64_t{256} << 20;
  absl::Duration lease = absl::Seconds(30);
  MemfdArenaOptions arena;
  // host:port of the rows channel (store/rows_channel.h; port 0: any);
  // empty: none (the rows travel in the gRPC calls; e.g. under TLS).
  std::string rows_listen;
};

class KvHostDataService final : public v1::KvHostData::Service {
 public:
  // InvalidArgument naming the option.
  static absl::StatusOr<std::unique_ptr<KvHostDataService>> Create(KvHostDataOptions options);
  // Stops the reaper; frees every worker's memory.
  ~KvHostDataService() override;

  grpc::Status Open(grpc::ServerContext*, const v1::DataOpenRequest*, v1::DataOpenResponse*) override;
  grpc::Status Reserve(grpc::ServerContext*, const v1::DataReserveRequest*, v1::DataReserveResponse*) override;
  grpc::Status Write(grpc::ServerContext*, grpc::ServerReader<v1::DataWriteChunk>*,
                     v1::DataWriteResponse*) override;
  grpc::Status Gather(grpc::ServerContext*,
                      grpc::ServerReaderWriter<v1::DataGatherResponse, v1::DataGatherRequest>*) override;
  grpc::Status CloseSession(grpc::ServerContext*, const v1::DataCloseSessionRequest*,
                            v1::DataCloseSessionResponse*) override;
  grpc::Status KeepAlive(grpc::ServerContext*, const v1::DataKeepAliveRequest*,
                         v1::DataKeepAliveResponse*) override;
  grpc::Status Ticket(grpc::ServerContext*, const v1::DataTicketRequest*, v1::DataTicketResponse*) override;
  // The rows channel's TCP port (0: none).
  int rows_port() const { return rows_port_; }

  // No new workers or sessions from now on.
  void BeginDrain() { draining_.store(true); }
  int Workers() const;
  int OpenSessions() const;
  // Arena bytes held for remote workers (their share of the node's budget).
  uint64_t HeldBytes() const;

 private:
  struct Worker {
    std::string id;
    std::atomic<int64_t> last_seen_ns{0};
    mutable absl::Mutex mu;
    std::unique_ptr<InProcessStore> store ABSL_GUARDED_BY(mu);
    std::map<uint64_t, HostSlice> slices ABSL_GUARDED_BY(mu);                // by slice id
    std::map<std::string, std::set<uint64_t>> sessions ABSL_GUARDED_BY(mu);  // slice ids
    uint64_t next_slice_id ABSL_GUARDED_BY(mu) = 1;
  };

  // One range of rows to read (the gRPC and the rows channel's requests).
  struct Range {
    uint64_t slice = 0, offset = 0, stride = 0;
    uint32_t row_bytes = 0;
    const uint32_t* rows = nullptr;
    uint32_t n_rows = 0;
  };

  explicit KvHostDataService(KvHostDataOptions options) : options_(std::move(options)) {}
  // The bytes `ranges` read, or InvalidArgument naming the bad range / the limit.
  static absl::StatusOr<uint64_t> RowBytes(absl::Span<const Range> ranges);
  // Their rows into dst (RowBytes long), or NotFound / OutOfRange naming the row.
  static absl::Status CopyRows(Worker& w, absl::Span<const Range> ranges, char* dst);
  // The rows channel (store/rows_channel.h): accepts, then a thread per
  // connection, bound to the worker whose ticket it presents.
  absl::Status StartRowsChannel();
  void AcceptLoop();
  void ServeRows(int fd);
  grpc::Status CheckToken(const grpc::ServerContext* ctx) const;
  // The worker by key (renewing its lease), or UNAUTHENTICATED.
  absl::StatusOr<std::shared_ptr<Worker>> Find(const std::string& key);
  // A live slice's bytes [offset, offset + length), or NotFound / OutOfRange.
  static absl::StatusOr<std::byte*> At(Worker& w, uint64_t slice_id, uint64_t offset, uint64_t length)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(w.mu);
  void ReapLoop();

  const KvHostDataOptions options_;
  std::atomic<bool> draining_{false};
  int rows_port_ = 0;
  ScopedFd rows_listener_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Worker>> workers_ ABSL_GUARDED_BY(mu_);  // by key
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  struct PendingTicket {
    std::weak_ptr<Worker> worker;
    absl::Time expires;
  };
  std::map<std::string, PendingTicket> tickets_ ABSL_GUARDED_BY(mu_);
  std::map<int, std::thread> rows_conns_ ABSL_GUARDED_BY(mu_);  // by fd, shut down at stop
  std::vector<std::thread> finished_conns_ ABSL_GUARDED_BY(mu_);
  std::thread reaper_;
  std::thread acceptor_;
};

}  // namespace tailorkv::kvhost
