// AdmissionQueue: bounds how many requests run on the engine and how many
// may wait for it, and admits waiters in arrival order.
//
// A request that finds the wait queue full is refused at once with
// ResourceExhausted (overload sheds quickly instead of piling up). A waiting
// request polls a caller-supplied check so that a cancelled or expired call
// leaves the queue within one poll interval.
//
// Thread-safe. A Slot must not outlive the queue that granted it.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tailorkv::worker {

class AdmissionQueue {
 public:
  // The right to run on the engine; released on destruction. Move-only.
  class Slot {
   public:
    Slot() = default;
    Slot(Slot&& other) noexcept : queue_(other.queue_) { other.queue_ = nullptr; }
    Slot& operator=(Slot&& other) noexcept;
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    ~Slot() { Release(); }
    void Release();

   private:
    friend class AdmissionQueue;
    explicit Slot(AdmissionQueue* queue) : queue_(queue) {}
    AdmissionQueue* queue_ = nullptr;
  };

  // max_running >= 1; max_waiting >= 0.
  AdmissionQueue(int max_running, int max_waiting);

  // Returns a Slot once this request is first in line and a slot is free.
  // ResourceExhausted (with the limit) when max_waiting requests already
  // wait; otherwise, while waiting, calls `check` every `poll` and returns
  // its status (leaving the queue) when that is not OK.
  absl::StatusOr<Slot> Acquire(const std::function<absl::Status()>& check, absl::Duration poll);

  int running() const;
  int waiting() const;
  int max_waiting() const { return max_waiting_; }

 private:
  bool CanRun(uint64_t ticket) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseSlot();

  const int max_running_;
  const int max_waiting_;
  mutable absl::Mutex mu_;
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<uint64_t> waiting_ ABSL_GUARDED_BY(mu_);  // tickets, arrival order
  uint64_t next_ticket_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tailorkv::worker
