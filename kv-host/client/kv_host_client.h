// KvHostClientStore: the worker's HostKvStore backed by a kv-host daemon
// (kv-host/daemon/kv_host_daemon.h; protocol in proto/tailorkv/v1/kv_host.proto).
//
// Connect() attaches: the Attach RPC, then the fd channel (FdHello ->
// FdWelcome). A receiver thread maps each arena the daemon sends (FdArena)
// and registers it once (register_fn: cudaHostRegister in the CUDA worker),
// so the GPU reads kv-host's memory directly; per request the worker only
// asks for slices (one Reserve RPC for a whole sequence with
// AllocateMany) and reads them through its own mapping: no RPC per token.
//
// Owners are kv-host sessions: FreeOwner closes the session, and the arenas
// the daemon retires then are unregistered and unmapped here.
//
// When the daemon goes away (the fd channel closes), what is mapped stays
// readable and writable here (a memfd lives while anyone maps it), so work
// in flight finishes. A background thread then tries to attach again every
// reattach_interval and hands the new daemon every live arena and slice
// (FdAdopt), so its accounting continues; on_attach_change reports the loss
// and the return (the worker flips its health). An allocation meanwhile
// waits up to reattach_timeout for the return, then fails with Unavailable
// naming the cause. Thread-safe.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <set>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "store/host_kv_store.h"
#include "store/memfd_arena.h"

namespace tailorkv::kvhost {

struct KvHostClientOptions {
  std::string target;     // gRPC target of the control plane, e.g. "unix:///run/tkv/kv-host.sock"
  std::string worker_id;  // printable ASCII label in kv-host's stats
  // Both or neither (host_kv_store.h).
  ArenaRegisterFn register_fn;
  ArenaUnregisterFn unregister_fn;
  absl::Duration rpc_timeout = absl::Seconds(10);
  // How long an allocation waits for a new arena's fd to arrive and map.
  absl::Duration arena_timeout = absl::Seconds(10);
  // After kv-host went away, how long an allocation keeps trying to attach
  // to it again (a supervisor restarts it), handing it the live arenas and
  // slices (FdAdopt), before failing with Unavailable.
  absl::Duration reattach_timeout = absl::Seconds(10);
  // How often the background thread tries to attach again after a loss.
  absl::Duration reattach_interval = absl::Milliseconds(200);
  // Optional: called with false when the daemon is lost and with true when
  // attached again, from the client's own threads (never under its locks).
  std::function<void(bool attached)> on_attach_change;
};

class KvHostClientStore final : public HostKvStore {
 public:
  // Attaches to the daemon. Unavailable naming the target when it cannot be
  // reached; the daemon's status otherwise (e.g. PermissionDenied).
  static absl::StatusOr<std::unique_ptr<KvHostClientStore>> Connect(KvHostClientOptions options);
  // Detaches (closes the fd channel: the daemon frees what this worker
  // held) and unregisters and unmaps every arena.
  ~KvHostClientStore() override;

  // Arenas come from the daemon: Unimplemented.
  absl::StatusOr<ArenaId> CreateArena(uint64_t bytes, std::string_view name) override;
  absl::StatusOr<HostSlice> Allocate(uint64_t bytes, uint64_t alignment, std::string_view owner) override;
  // One Reserve RPC for all sizes (all or nothing).
  absl::StatusOr<std::vector<HostSlice>> AllocateMany(absl::Span<const uint64_t> sizes, uint64_t alignment,
                                                      std::string_view owner) override;
  absl::Status Free(const HostSlice& slice) override;
  uint64_t FreeOwner(std::string_view owner) override;
  // Sessions whose closing is still owed to the daemon (tests, stats).
  size_t unclosed_sessions() const;
  absl::StatusOr<absl::Span<std::byte>> Data(const HostSlice& slice) override;
  absl::StatusOr<int> ArenaFd(ArenaId arena) const override;
  absl::StatusOr<uint64_t> ArenaBytes(ArenaId arena) const override;
  // What this worker holds (reserved: arenas mapped here).
  HostKvStoreStats Stats() const override;

  // OK while the daemon is attached; else Unavailable saying why.
  absl::Status Health() const;

 private:
  struct Arena {
    ScopedFd fd;
    SharedMapping mapping;
    bool registered = false;
  };
  struct Live {
    uint64_t slice_id = 0;
    uint64_t length = 0;
    std::string owner;
  };
  struct Impl;

  explicit KvHostClientStore(KvHostClientOptions options);
  void ReceiveLoop();
  // Attach + fd channel; with `adopt`, FdAdopt carrying every live arena and
  // slice instead of FdHello. Starts the receiver.
  absl::Status AttachOnce(bool adopt);
  // One re-attach attempt after a loss (OK at once when attached).
  absl::Status TryReattach();
  // Waits up to reattach_timeout for the daemon to be back (trying too).
  absl::Status Reattach();
  // The background re-attacher (started at Connect).
  void ReattachLoop();
  std::string Key() const;
  // Unregisters and unmaps (outside mu_).
  void DropArena(Arena& arena);

  const KvHostClientOptions options_;
  std::unique_ptr<Impl> impl_;  // gRPC stub, fd channel
  std::thread receiver_;     // joined only under reattach_mu_ (or at destruction)
  std::thread reattacher_;
  absl::Mutex reattach_mu_;  // one re-attach at a time; before mu_
  mutable absl::Mutex mu_;
  absl::CondVar arrived_;
  // CloseSession for `owner`; unmaps the arenas the daemon retired. Returns
  // the bytes it freed; a failure other than "not open" keeps `owner` in
  // unclosed_.
  absl::StatusOr<uint64_t> CloseSessionRpc(const std::string& owner);
  void CloseUnclosed();
  std::map<ArenaId, Arena> arenas_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<ArenaId, uint64_t>, Live> live_ ABSL_GUARDED_BY(mu_);  // by (arena, offset)
  absl::Status lost_ ABSL_GUARDED_BY(mu_);  // why the daemon is gone; OK while attached
  // Sessions the daemon may still hold though the worker is done with them:
  // a CloseSession that failed (a frozen or overloaded daemon), a Reserve
  // whose outcome is unknown (its deadline passed; the daemon may run it
  // later). Closed again before the next Reserve (CloseUnclosed).
  std::set<std::string> unclosed_ ABSL_GUARDED_BY(mu_);
  absl::Status last_attach_error_ ABSL_GUARDED_BY(mu_);  // of the latest re-attach attempt
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::CondVar changed_;  // lost_ or stopping_ changed
};

}  // namespace tailorkv::kvhost
