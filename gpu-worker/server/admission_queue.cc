#include "server/admission_queue.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace tailorkv::worker {

AdmissionQueue::Slot& AdmissionQueue::Slot::operator=(Slot&& other) noexcept {
  if (this != &other) {
    Release();
    queue_ = other.queue_;
    other.queue_ = nullptr;
  }
  return *this;
}

void AdmissionQueue::Slot::Release() {
  if (queue_ != nullptr) {
    queue_->ReleaseSlot();
    queue_ = nullptr;
  }
}

AdmissionQueue::AdmissionQueue(int max_running, int max_waiting)
    : max_running_(std::max(1, max_running)), max_waiting_(std::max(0, max_waiting)) {}

bool AdmissionQueue::CanRun(uint64_t ticket) const {
  return running_ < max_running_ && !waiting_.empty() && waiting_.front() == ticket;
}

absl::StatusOr<AdmissionQueue::Slot> AdmissionQueue::Acquire(
    const std::function<absl::Status()>& check, absl::Duration poll) {
  absl::MutexLock lock(&mu_);
  if (waiting_.empty() && running_ < max_running_) {
    ++running_;
    return Slot(this);
  }
  if (static_cast<int>(waiting_.size()) >= max_waiting_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "server overloaded: ", waiting_.size(), " requests already waiting (max_queue=",
        max_waiting_, "); retry with backoff"));
  }
  const uint64_t ticket = next_ticket_++;
  waiting_.push_back(ticket);
  struct Args {
    const AdmissionQueue* queue;
    uint64_t ticket;
  } args{this, ticket};
  const absl::Condition can_run(
      +[](Args* a) ABSL_NO_THREAD_SAFETY_ANALYSIS { return a->queue->CanRun(a->ticket); }, &args);
  while (true) {
    if (mu_.AwaitWithTimeout(can_run, poll)) {
      waiting_.pop_front();
      ++running_;
      return Slot(this);
    }
    // The check may take other locks (gRPC's call state); run it unlocked.
    mu_.Unlock();
    absl::Status status = check();
    mu_.Lock();
    if (!status.ok()) {
      waiting_.erase(std::find(waiting_.begin(), waiting_.end(), ticket));
      return status;
    }
  }
}

void AdmissionQueue::ReleaseSlot() {
  absl::MutexLock lock(&mu_);
  --running_;
}

int AdmissionQueue::running() const {
  absl::MutexLock lock(&mu_);
  return running_;
}

int AdmissionQueue::waiting() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(waiting_.size());
}

}  // namespace tailorkv::worker
