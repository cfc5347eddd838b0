#include "server/admission_queue.h"

#include <atomic>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/synchronization/notification.h"

namespace tailorkv::worker {
namespace {

const auto kPoll = absl::Milliseconds(5);
absl::Status Ok() { return absl::OkStatus(); }

TEST(AdmissionQueueTest, AdmitsUpToMaxRunningAtOnceWhenIdle) {
  AdmissionQueue queue(2, 0);
  auto a = queue.Acquire(Ok, kPoll);
  auto b = queue.Acquire(Ok, kPoll);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(queue.running(), 2);
  // No waiting room: the third is refused at once.
  auto c = queue.Acquire(Ok, kPoll);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(c.status().message().find("max_queue=0"), std::string_view::npos) << c.status();
  a->Release();
  EXPECT_EQ(queue.running(), 1);
  EXPECT_TRUE(queue.Acquire(Ok, kPoll).ok());  // released at the end of the statement
  EXPECT_EQ(queue.running(), 1);
}

TEST(AdmissionQueueTest, RefusesWhenTheWaitQueueIsFull) {
  AdmissionQueue queue(1, 1);
  auto running = queue.Acquire(Ok, kPoll);
  ASSERT_TRUE(running.ok());
  absl::Notification waiter_admitted;
  std::thread waiter([&] {
    auto slot = queue.Acquire(Ok, kPoll);
    EXPECT_TRUE(slot.ok());
    waiter_admitted.Notify();
  });
  while (queue.waiting() != 1) absl::SleepFor(absl::Milliseconds(1));
  auto refused = queue.Acquire(Ok, kPoll);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(waiter_admitted.HasBeenNotified());
  running->Release();
  waiter.join();
  EXPECT_TRUE(waiter_admitted.HasBeenNotified());
  EXPECT_EQ(queue.running(), 0);
  EXPECT_EQ(queue.waiting(), 0);
}

TEST(AdmissionQueueTest, AdmitsWaitersInArrivalOrder) {
  AdmissionQueue queue(1, 8);
  auto running = queue.Acquire(Ok, kPoll);
  ASSERT_TRUE(running.ok());
  constexpr int kWaiters = 5;
  std::vector<int> order;
  absl::Mutex order_mu;
  std::vector<std::thread> threads;
  for (int i = 0; i < kWaiters; ++i) {
    threads.emplace_back([&, i] {
      auto slot = queue.Acquire(Ok, kPoll);
      ASSERT_TRUE(slot.ok());
      absl::MutexLock lock(&order_mu);
      order.push_back(i);
    });
    // Each thread is in line before the next starts.
    while (queue.waiting() != i + 1) absl::SleepFor(absl::Milliseconds(1));
  }
  running->Release();
  for (auto& t : threads) t.join();
  ASSERT_EQ(order.size(), static_cast<size_t>(kWaiters));
  for (int i = 0; i < kWaiters; ++i) EXPECT_EQ(order[i], i) << "position " << i;
}

TEST(AdmissionQueueTest, CancelledWaiterLeavesTheQueueAndTheNextOneRuns) {
  AdmissionQueue queue(1, 4);
  auto running = queue.Acquire(Ok, kPoll);
  ASSERT_TRUE(running.ok());
  std::atomic<bool> cancel_first{false};
  absl::Status first_status;
  std::thread first([&] {
    auto slot = queue.Acquire(
        [&] { return cancel_first ? absl::CancelledError("gone") : absl::OkStatus(); }, kPoll);
    first_status = slot.status();
  });
  while (queue.waiting() != 1) absl::SleepFor(absl::Milliseconds(1));
  absl::Notification second_admitted;
  std::thread second([&] {
    auto slot = queue.Acquire(Ok, kPoll);
    EXPECT_TRUE(slot.ok());
    second_admitted.Notify();
  });
  while (queue.waiting() != 2) absl::SleepFor(absl::Milliseconds(1));
  cancel_first = true;
  first.join();
  EXPECT_EQ(first_status.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(queue.waiting(), 1);
  EXPECT_FALSE(second_admitted.HasBeenNotified());
  running->Release();
  second.join();
  EXPECT_TRUE(second_admitted.HasBeenNotified());
  EXPECT_EQ(queue.running(), 0);
}

TEST(AdmissionQueueTest, MovedSlotReleasesOnce) {
  AdmissionQueue queue(1, 0);
  {
    auto slot = queue.Acquire(Ok, kPoll);
    ASSERT_TRUE(slot.ok());
    AdmissionQueue::Slot moved = std::move(*slot);
    EXPECT_EQ(queue.running(), 1);
  }
  EXPECT_EQ(queue.running(), 0);
}

}  // namespace
}  // namespace tailorkv::worker
