#include "gateway/worker_pool.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "spdlog/spdlog.h"

namespace tailorkv::gateway {

namespace v1 = tailorkv::v1;

absl::StatusOr<std::unique_ptr<WorkerPool>> WorkerPool::Create(WorkerPoolOptions options) {
  if (options.workers.empty()) return absl::InvalidArgumentError("workers: at least one host:port");
  std::set<std::string> seen;
  for (const std::string& w : options.workers) {
    if (w.empty()) return absl::InvalidArgumentError("workers: an empty address");
    if (!seen.insert(w).second) return absl::InvalidArgumentError(absl::StrCat("workers: ", w, " twice"));
  }
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (!options.tls_ca_file.empty()) {
    std::ifstream in(options.tls_ca_file, std::ios::binary);
    if (!in.good()) return absl::InvalidArgumentError(absl::StrCat("workers-tls-ca: cannot read '", options.tls_ca_file, "'"));
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    creds = grpc::SslCredentials(ssl);
  }
  auto pool = std::unique_ptr<WorkerPool>(new WorkerPool(options));
  for (const std::string& address : pool->options_.workers) {
    Worker w;
    w.address = address;
    grpc::ChannelArguments args;
    // Find a restarted worker quickly (gRPC's default backoff grows to 120 s).
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    w.channel = grpc::CreateCustomChannel(address, creds, args);
    w.stub = v1::Generation::NewStub(w.channel);
    w.last_error = "not polled yet";
    pool->workers_.push_back(std::move(w));
  }
  pool->PollOnce();
  pool->poller_ = std::thread([p = pool.get()] { p->PollLoop(); });
  return pool;
}

WorkerPool::~WorkerPool() {
  {
    absl::MutexLock lock(&stop_mu_);
    stop_ = true;
  }
  if (poller_.joinable()) poller_.join();
}

void WorkerPool::PollLoop() {
  while (true) {
    {
      absl::MutexLock lock(&stop_mu_);
      stop_mu_.AwaitWithTimeout(absl::Condition(
                                    +[](std::atomic<bool>* s) { return s->load(); }, &stop_),
                                options_.poll_interval);
      if (stop_) return;
    }
    PollOnce();
  }
}

void WorkerPool::PollOnce() {
  for (size_t i = 0; i < workers_.size(); ++i) {
    Worker& w = workers_[i];
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(absl::ToInt64Milliseconds(options_.probe_timeout)));
    v1::Load load;
    const grpc::Status st = w.stub->GetLoad(&ctx, v1::GetLoadRequest(), &load);
    std::string name;
    if (st.ok()) {
      bool need_name;
      {
        absl::MutexLock lock(&mu_);
        need_name = model_name_.empty();
      }
      if (need_name) {
        grpc::ClientContext ictx;
        ictx.set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(absl::ToInt64Milliseconds(options_.probe_timeout)));
        v1::ModelInfo info;
        if (w.stub->GetModelInfo(&ictx, v1::GetModelInfoRequest(), &info).ok()) {
          // The model file's name (a slug, as OpenAI's ids are), else the
          // name inside it.
          const std::string& path = info.model_path();
          name = path.substr(path.find_last_of('/') + 1);
          if (name.size() > 5 && name.substr(name.size() - 5) == ".gguf") name.resize(name.size() - 5);
          if (name.empty()) name = info.name();
        }
      }
    }
    absl::MutexLock lock(&mu_);
    const bool was_ready = w.ready;
    if (st.ok() && !load.draining()) {
      w.ready = true;
      // Requests there, weighted up as its KV budget fills (a worker whose
      // memory is nearly taken gets new work last).
      int64_t n = load.queued_requests() + load.active_requests();
      if (load.kv_budget_bytes() > 0) {
        n = n * 4 + (4 * load.kv_admitted_bytes()) / load.kv_budget_bytes();
      } else {
        n *= 4;
      }
      w.load = n;
      w.in_flight = 0;  // the poll counts them now
      w.last_error.clear();
      if (!name.empty() && model_name_.empty()) model_name_ = name;
    } else {
      w.ready = false;
      w.last_error = st.ok() ? "draining" : absl::StrCat(st.error_code(), ": ", st.error_message());
    }
    if (was_ready != w.ready) {
      if (w.ready) {
        spdlog::info("gateway: worker {} is ready", w.address);
      } else {
        spdlog::warn("gateway: worker {} left the rotation ({})", w.address, w.last_error);
      }
    }
  }
}

absl::StatusOr<WorkerPool::Choice> WorkerPool::Choose(const std::vector<int>& exclude) {
  absl::MutexLock lock(&mu_);
  const int n = static_cast<int>(workers_.size());
  int best = -1;
  int64_t best_load = 0;
  for (int k = 0; k < n; ++k) {
    const int i = (next_ + k) % n;
    const Worker& w = workers_[i];
    if (!w.ready || std::find(exclude.begin(), exclude.end(), i) != exclude.end()) continue;
    const int64_t load = w.load + 4 * w.in_flight;
    if (best < 0 || load < best_load) {
      best = i;
      best_load = load;
    }
  }
  if (best < 0) {
    std::vector<std::string> why;
    for (const Worker& w : workers_) {
      why.push_back(absl::StrCat(w.address, " (", w.ready ? "excluded" : w.last_error, ")"));
    }
    return absl::UnavailableError(absl::StrCat("no worker is ready: ", absl::StrJoin(why, ", ")));
  }
  next_ = (best + 1) % n;
  ++workers_[best].in_flight;
  ++workers_[best].chosen;
  return Choice{best, workers_[best].address, workers_[best].stub.get()};
}

std::vector<WorkerPool::Choice> WorkerPool::Ready() const {
  absl::MutexLock lock(&mu_);
  std::vector<Choice> out;
  for (size_t i = 0; i < workers_.size(); ++i) {
    if (workers_[i].ready) out.push_back(Choice{static_cast<int>(i), workers_[i].address, workers_[i].stub.get()});
  }
  return out;
}

void WorkerPool::Done(int index) {
  absl::MutexLock lock(&mu_);
  if (index >= 0 && index < static_cast<int>(workers_.size()) && workers_[index].in_flight > 0) {
    --workers_[index].in_flight;
  }
}

void WorkerPool::MarkFailed(int index) {
  absl::MutexLock lock(&mu_);
  if (index < 0 || index >= static_cast<int>(workers_.size())) return;
  if (workers_[index].ready) spdlog::warn("gateway: worker {} failed a call; out of the rotation", workers_[index].address);
  workers_[index].ready = false;
  workers_[index].last_error = "failed a call";
}

int WorkerPool::ready_count() const {
  absl::MutexLock lock(&mu_);
  int n = 0;
  for (const Worker& w : workers_) n += w.ready;
  return n;
}

std::string WorkerPool::model_name() const {
  absl::MutexLock lock(&mu_);
  return model_name_;
}

std::vector<WorkerPool::WorkerState> WorkerPool::states() const {
  absl::MutexLock lock(&mu_);
  std::vector<WorkerState> out;
  for (const Worker& w : workers_) {
    out.push_back({w.address, w.ready, w.load, w.in_flight, w.chosen, w.last_error});
  }
  return out;
}

}  // namespace tailorkv::gateway
