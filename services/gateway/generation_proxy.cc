#include "gateway/generation_proxy.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/same_secret.h"
#include "spdlog/spdlog.h"

namespace tailorkv::gateway {

namespace v1 = tailorkv::v1;

namespace {

grpc::Status Unavailable(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

std::chrono::system_clock::time_point Deadline(const grpc::ServerContext* context, absl::Duration cap) {
  const auto capped = std::chrono::system_clock::now() + std::chrono::milliseconds(absl::ToInt64Milliseconds(cap));
  return std::min(capped, context->deadline());
}

}  // namespace

grpc::Status GenerationProxy::CheckKey(const grpc::ServerContext* context) const {
  if (api_key_.empty()) return grpc::Status::OK;
  const auto& md = context->client_metadata();
  const auto it = md.find("authorization");
  if (it != md.end() && common::SameSecret(std::string_view(it->second.data(), it->second.size()), "Bearer " + api_key_)) {
    return grpc::Status::OK;
  }
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                      "authorization: 'Bearer <api key>' metadata is required (the gateway's --api-key)");
}

grpc::Status GenerationProxy::Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                                       grpc::ServerWriter<v1::GenerateResponse>* writer) {
  if (grpc::Status st = CheckKey(context); !st.ok()) return st;
  std::vector<int> tried;
  metrics_->running.fetch_add(1);
  struct Guard {
    GatewayMetrics* m;
    ~Guard() { m->running.fetch_sub(1); }
  } guard{metrics_};
  while (true) {
    absl::StatusOr<WorkerPool::Choice> choice = pool_->Choose(tried);
    if (!choice.ok()) return Unavailable(choice.status());
    grpc::ClientContext upstream;
    upstream.set_deadline(Deadline(context, request_timeout_));
    // The client's cancellation reaches the worker: a watcher cancels the
    // upstream call when the client's call is done early.
    std::atomic<bool> finished{false};
    auto reader = choice->stub->Generate(&upstream, *request);
    bool got_any = false, client_gone = false;
    v1::GenerateResponse resp;
    std::thread watcher([&] {
      while (!finished.load()) {
        if (context->IsCancelled()) {
          upstream.TryCancel();
          return;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    });
    while (reader->Read(&resp)) {
      got_any = true;
      if (!writer->Write(resp)) {
        client_gone = true;
        upstream.TryCancel();
        break;
      }
    }
    const grpc::Status st = reader->Finish();
    finished = true;
    watcher.join();
    pool_->Done(choice->index);
    if (client_gone || context->IsCancelled()) {
      metrics_->client_disconnects.fetch_add(1);
      return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
    }
    if (!st.ok() && !got_any && st.error_code() == grpc::StatusCode::UNAVAILABLE) {
      spdlog::warn("gateway: gRPC Generate on {} failed before its first response ({}); trying another worker",
                   choice->address, st.error_message());
      pool_->MarkFailed(choice->index);
      tried.push_back(choice->index);
      metrics_->retries.fetch_add(1);
      continue;
    }
    if (!st.ok() && got_any) {
      return grpc::Status(st.error_code(), absl::StrCat("the worker serving this request (", choice->address,
                                                        ") failed after it had started: ", st.error_message()));
    }
    return st;
  }
}

grpc::Status GenerationProxy::Abort(grpc::ServerContext* context, const v1::AbortRequest* request,
                                    v1::AbortResponse* response) {
  if (grpc::Status st = CheckKey(context); !st.ok()) return st;
  for (const WorkerPool::Choice& w : pool_->Ready()) {
    grpc::ClientContext upstream;
    upstream.set_deadline(Deadline(context, absl::Seconds(5)));
    v1::AbortResponse ignored;
    const grpc::Status st = w.stub->Abort(&upstream, *request, &ignored);
    // An id unknown there is not an error; a bad id is the same everywhere.
    if (st.error_code() == grpc::StatusCode::INVALID_ARGUMENT) return st;
  }
  return grpc::Status::OK;
}

grpc::Status GenerationProxy::GetModelInfo(grpc::ServerContext* context, const v1::GetModelInfoRequest* request,
                                           v1::ModelInfo* response) {
  if (grpc::Status st = CheckKey(context); !st.ok()) return st;
  const std::vector<WorkerPool::Choice> ready = pool_->Ready();
  if (ready.empty()) return Unavailable(absl::UnavailableError("no worker is ready"));
  grpc::ClientContext upstream;
  upstream.set_deadline(Deadline(context, absl::Seconds(5)));
  return ready.front().stub->GetModelInfo(&upstream, *request, response);
}

grpc::Status GenerationProxy::GetLoad(grpc::ServerContext* context, const v1::GetLoadRequest* request,
                                      v1::Load* response) {
  if (grpc::Status st = CheckKey(context); !st.ok()) return st;
  const std::vector<WorkerPool::Choice> ready = pool_->Ready();
  if (ready.empty()) return Unavailable(absl::UnavailableError("no worker is ready"));
  bool all_draining = true;
  for (const WorkerPool::Choice& w : ready) {
    grpc::ClientContext upstream;
    upstream.set_deadline(Deadline(context, absl::Seconds(2)));
    v1::Load l;
    if (!w.stub->GetLoad(&upstream, *request, &l).ok()) continue;
    response->set_queued_requests(response->queued_requests() + l.queued_requests());
    response->set_active_requests(response->active_requests() + l.active_requests());
    response->set_max_queue(response->max_queue() + l.max_queue());
    response->set_max_running(response->max_running() + l.max_running());
    response->set_engine_running(response->engine_running() + l.engine_running());
    response->set_engine_waiting(response->engine_waiting() + l.engine_waiting());
    response->set_kv_budget_bytes(response->kv_budget_bytes() + l.kv_budget_bytes());
    response->set_kv_admitted_bytes(response->kv_admitted_bytes() + l.kv_admitted_bytes());
    all_draining = all_draining && l.draining();
  }
  response->set_draining(all_draining);
  return grpc::Status::OK;
}

}  // namespace tailorkv::gateway
