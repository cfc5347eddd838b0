// KvHostDaemon: tailorkv.v1.KvHost for real (proto/tailorkv/v1/kv_host.proto
// has the protocol). It owns the host memory of the sparse layers' KV as
// memfd arenas, one InProcessStore per attached worker (so a worker's
// arenas are only ever its own), under one byte budget for all workers and
// a quota per worker.
//
// Threads: gRPC's for the RPCs, plus one fd thread that accepts fd-channel
// connections, authenticates them (nonce + SO_PEERCRED uid) and watches every
// attached worker's connection: EOF there (the worker exited or was killed)
// detaches the worker and frees all it held at once.
//
// Locking: mu_ guards the worker tables and pending attaches; the budget
// counter is atomic; each worker's own mutex guards its store, slices and
// sessions and serializes sends on its connection. Lock order: mu_ before
// a worker's.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "store/fd_channel.h"
#include "store/in_process_store.h"
#include "tailorkv/v1/kv_host.grpc.pb.h"

namespace tailorkv::kvhost {

struct KvHostDaemonOptions {
  uint64_t budget_bytes = 0;        // required (> 0), a page multiple
  std::string budget_source;        // how it was chosen, for stats and logs
  uint64_t worker_quota_bytes = 0;  // 0: the whole budget
  // Arenas are made this large, or as large as the slice that needs one.
  uint64_t arena_bytes = uint64_t{256} << 20;
  // Empty arenas each worker keeps when its sessions close (the rest go
  // back to the OS).
  uint64_t warm_bytes = uint64_t{256} << 20;
  std::string fd_socket_path;       // required
  std::vector<uid_t> allowed_uids;  // besides the daemon's own uid
  absl::Duration nonce_ttl = absl::Seconds(10);
  // A connection that sends no FdHello within this is closed.
  absl::Duration hello_timeout = absl::Seconds(5);
  // A worker that does not take an arena's fd within this fails the RPC.
  absl::Duration send_timeout = absl::Seconds(5);
  MemfdArenaOptions arena;
};

class KvHostDaemon final : public v1::KvHost::Service {
 public:
  // Binds the fd socket and starts the fd thread. InvalidArgument naming the
  // option; the socket's errno otherwise.
  static absl::StatusOr<std::unique_ptr<KvHostDaemon>> Start(KvHostDaemonOptions options);
  // Stops the fd thread and frees every arena.
  ~KvHostDaemon() override;

  grpc::Status Attach(grpc::ServerContext*, const v1::AttachRequest*, v1::AttachResponse*) override;
  grpc::Status Reserve(grpc::ServerContext*, const v1::ReserveRequest*, v1::ReserveResponse*) override;
  grpc::Status Release(grpc::ServerContext*, const v1::ReleaseRequest*, v1::ReleaseResponse*) override;
  grpc::Status CloseSession(grpc::ServerContext*, const v1::CloseSessionRequest*,
                            v1::CloseSessionResponse*) override;
  grpc::Status GetStats(grpc::ServerContext*, const v1::GetStatsRequest*, v1::KvHostStats*) override;
  grpc::Status Drain(grpc::ServerContext*, const v1::DrainRequest*, v1::DrainResponse*) override;

  // What GetStats answers (also for logs and tests).
  v1::KvHostStats Stats() const;
  // No new attaches or sessions from now on (SIGTERM does this first).
  void BeginDrain() { draining_.store(true); }
  // Sessions open over all workers.
  int OpenSessions() const;

  // The node's one budget, shared with the remote data plane
  // (daemon/data_service.h): takes `bytes` (compare and swap), or
  // ResourceExhausted naming the budget and what `what` needs; Return gives
  // bytes taken back.
  absl::Status TakeBudget(uint64_t bytes, const std::string& what);
  void ReturnBudget(uint64_t bytes) { used_bytes_.fetch_sub(bytes); }
  uint64_t FreeBudget() const { return options_.budget_bytes - used_bytes_.load(); }

 private:
  struct Worker {
    std::string id;
    std::string key;
    PeerCredentials cred;
    mutable absl::Mutex mu;
    ScopedFd conn ABSL_GUARDED_BY(mu);
    std::unique_ptr<InProcessStore> store ABSL_GUARDED_BY(mu);
    std::map<uint64_t, HostSlice> slices ABSL_GUARDED_BY(mu);                  // by slice id
    std::map<std::string, std::set<uint64_t>> sessions ABSL_GUARDED_BY(mu);    // slice ids
    std::set<ArenaId> arenas ABSL_GUARDED_BY(mu);                               // sent to the worker
    uint64_t next_slice_id ABSL_GUARDED_BY(mu) = 1;
    bool detached ABSL_GUARDED_BY(mu) = false;
  };
  struct PendingAttach {
    std::string worker_id;
    std::string nonce;
    absl::Time expires;
  };
  struct Hello {  // a connection that has not said FdHello yet
    ScopedFd conn;
    absl::Time deadline;
  };

  explicit KvHostDaemon(KvHostDaemonOptions options) : options_(std::move(options)) {}
  void FdLoop();
  // FdHello on a new connection: the worker on success, else why not.
  absl::StatusOr<std::shared_ptr<Worker>> Authenticate(ScopedFd conn);
  // The hello's checks; `conn` moves into the worker when it is accepted.
  absl::StatusOr<std::shared_ptr<Worker>> AuthenticateHello(ScopedFd& conn);
  void Detach(const std::shared_ptr<Worker>& w, const std::string& why);
  // FdAdopt: the worker's live arenas (fds in order) and slices, after a
  // restart of kv-host. Fails whole (the caller drops what was adopted).
  absl::Status AdoptLocked(Worker& w, const v1::FdAdopt& adopt, std::vector<ScopedFd>& fds)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(w.mu);
  absl::StatusOr<std::shared_ptr<Worker>> FindWorker(const std::string& key) const;
  // The attached workers now (each then read under its own lock).
  std::vector<std::shared_ptr<Worker>> Workers() const;
  // Grows `w` by an arena that fits `size` (within quota and budget) and
  // sends it to the worker.
  absl::Status GrowLocked(Worker& w, uint64_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(w.mu);
  // Retires `w`'s empty arenas beyond the warm reserve; returns their ids.
  std::vector<ArenaId> RetireLocked(Worker& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(w.mu);

  const KvHostDaemonOptions options_;
  ScopedFd listener_;
  ScopedFd wake_;  // eventfd: wakes the fd thread to stop
  std::thread fd_thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> draining_{false};
  // Arena bytes over all workers (<= the budget): reserved by compare and
  // swap before an arena is made, so no lock is needed across workers.
  std::atomic<uint64_t> used_bytes_{0};

  mutable absl::Mutex mu_;
  uint64_t next_attach_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<uint64_t, PendingAttach> pending_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::shared_ptr<Worker>> workers_ ABSL_GUARDED_BY(mu_);  // by key
};

}  // namespace tailorkv::kvhost
