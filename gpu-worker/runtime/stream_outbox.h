// StreamOutbox: one generation's stream between the engine's scheduler
// thread (the producer: chunks, then the outcome) and the thread that
// called Engine::Generate (the consumer, which hands chunks to the client).
//
// Bounded, and the producer never blocks: it asks full() first and, while
// the consumer is behind, skips that generation's steps (other sequences
// keep running); the scheduler cuts the generation off when the outbox
// stays full past its bound. Pop blocks the consumer until a chunk or the
// outcome arrives. Thread-safe.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tailorkv::runtime {

template <typename Chunk, typename Outcome>
class StreamOutbox {
 public:
  // `capacity` >= 1 chunks; `on_space` (optional) runs after a Pop that
  // made room in a full outbox (it wakes the producer), outside the lock.
  StreamOutbox(int capacity, std::function<void()> on_space)
      : capacity_(capacity < 1 ? 1 : capacity), on_space_(std::move(on_space)) {}

  // Producer side.
  bool full() const {
    absl::MutexLock lock(&mu_);
    return static_cast<int>(chunks_.size()) >= capacity_;
  }
  // Since when the outbox has been full; time_point::max() when it is not.
  // On the steady clock: a step of the wall clock (NTP, a VM resumed) must
  // neither cut a reader off early nor keep a stalled one for the step.
  std::chrono::steady_clock::time_point full_since() const {
    absl::MutexLock lock(&mu_);
    return static_cast<int>(chunks_.size()) >= capacity_ ? full_since_ : std::chrono::steady_clock::time_point::max();
  }
  // Appends (past the capacity only if the caller ignored full()).
  void Push(Chunk chunk) {
    absl::MutexLock lock(&mu_);
    chunks_.push_back(std::move(chunk));
    if (static_cast<int>(chunks_.size()) == capacity_) full_since_ = std::chrono::steady_clock::now();
  }
  // The end of the stream: Pop returns nullopt once the chunks before it
  // are taken. Later calls are ignored.
  void Finish(Outcome outcome) {
    absl::MutexLock lock(&mu_);
    if (!outcome_.has_value()) outcome_.emplace(std::move(outcome));
  }

  // Consumer side: the next chunk, or nullopt at the end (then outcome()).
  std::optional<Chunk> Pop() {
    bool was_full;
    Chunk c;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](StreamOutbox* o) ABSL_EXCLUSIVE_LOCKS_REQUIRED(o->mu_) {
            return !o->chunks_.empty() || o->outcome_.has_value();
          },
          this));
      if (chunks_.empty()) return std::nullopt;
      was_full = static_cast<int>(chunks_.size()) >= capacity_;
      c = std::move(chunks_.front());
      chunks_.pop_front();
    }
    if (was_full && on_space_) on_space_();
    return c;
  }
  // Blocks until Finish; then its outcome (chunks may remain unread).
  Outcome outcome() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](StreamOutbox* o) ABSL_EXCLUSIVE_LOCKS_REQUIRED(o->mu_) { return o->outcome_.has_value(); }, this));
    return *outcome_;
  }

 private:
  const int capacity_;
  const std::function<void()> on_space_;
  mutable absl::Mutex mu_;
  std::deque<Chunk> chunks_ ABSL_GUARDED_BY(mu_);
  std::chrono::steady_clock::time_point full_since_ ABSL_GUARDED_BY(mu_) = std::chrono::steady_clock::time_point::max();
  std::optional<Outcome> outcome_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tailorkv::runtime
