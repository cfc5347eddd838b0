// WorkerPool: the gpu-workers behind the gateway, watched and chosen.
//
// A background thread asks every worker for GetLoad (deadline
// `probe_timeout`) every `poll_interval`: a worker that answers and is not
// draining is ready, with a load of its queued + active requests (scaled by
// its share of the KV budget in use, when it has one); one that fails or
// drains leaves the rotation until it answers again. Choose() picks the
// ready worker with the least load (ties: round-robin), counting requests
// the gateway itself has in flight there since the last poll, so a burst
// spreads before the next poll. A request that fails before its first token
// with UNAVAILABLE is retried by the caller on another worker
// (MarkFailed + Choose with that worker excluded).
//
// Thread-safe. The destructor stops the thread.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tailorkv/v1/generation.grpc.pb.h"

namespace tailorkv::gateway {

struct WorkerPoolOptions {
  std::vector<std::string> workers;  // host:port (or unix:path) each
  absl::Duration poll_interval = absl::Milliseconds(500);
  absl::Duration probe_timeout = absl::Milliseconds(1000);
  // PEM root certificates: reach the workers over TLS (their --tls-cert
  // verified against these); empty: plain connections.
  std::string tls_ca_file;
};

class WorkerPool {
 public:
  // InvalidArgument for an empty list or a duplicate. Polls once before
  // returning (no worker needs to be ready yet).
  static absl::StatusOr<std::unique_ptr<WorkerPool>> Create(WorkerPoolOptions options);
  ~WorkerPool();

  struct Choice {
    int index = -1;
    std::string address;
    tailorkv::v1::Generation::Stub* stub = nullptr;  // owned by the pool
  };
  // The least loaded ready worker not in `exclude`; Unavailable naming the
  // workers' states when none is ready.
  absl::StatusOr<Choice> Choose(const std::vector<int>& exclude = {});
  // Every ready worker (not counted in flight): for calls sent to all.
  std::vector<Choice> Ready() const;
  // A request on worker `index` ended (Choose counted it in flight).
  void Done(int index);
  // The worker failed a call: out of the rotation until the next poll that
  // it answers.
  void MarkFailed(int index);

  int ready_count() const;
  int size() const { return static_cast<int>(workers_.size()); }
  // The model the ready workers serve (GetModelInfo's name, else the file
  // name of its path); "" before any answered.
  std::string model_name() const;
  struct WorkerState {
    std::string address;
    bool ready = false;
    int64_t load = 0;
    int in_flight = 0;  // the gateway's own requests there
    uint64_t chosen = 0;  // requests sent there so far
    std::string last_error;
  };
  std::vector<WorkerState> states() const;

 private:
  struct Worker {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<tailorkv::v1::Generation::Stub> stub;
    bool ready = false;
    int64_t load = 0;
    int in_flight = 0;
    uint64_t chosen = 0;
    std::string last_error;
  };
  explicit WorkerPool(WorkerPoolOptions options) : options_(std::move(options)) {}
  void PollOnce();
  void PollLoop();

  WorkerPoolOptions options_;
  std::vector<Worker> workers_;  // fixed after Create; fields under mu_
  mutable absl::Mutex mu_;
  std::string model_name_;
  int next_ = 0;  // round-robin among equals
  std::atomic<bool> stop_{false};
  absl::Mutex stop_mu_;
  std::thread poller_;
};

}  // namespace tailorkv::gateway
