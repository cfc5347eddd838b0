// gpu-worker: loads a model and serves tailorkv.v1.Generation (plus health
// and reflection) until SIGTERM/SIGINT, then drains. SIGHUP reloads the
// layer plan from its source (server/plan_source.h).
// Exit codes: 0 after a drain, 1 cannot start, 2 bad configuration or no
// usable plan, 3 the device was lost while serving (restart the process).
#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>

#include <CLI/CLI.hpp>

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "client/kv_host_client.h"
#include "client/placed_remote_rows.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "common/metrics_http.h"
#include "common/grpc_server.h"
#include "common/logging.h"
#include "common/malloc_env.h"
#include "common/openmp_env.h"
#include "runtime/engine.h"
#ifdef TAILORKV_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif
#include "server/generation_service.h"
#include "server/plan_source.h"

namespace {

// kv-host's loss and return flip the health of the Generation service
// while the plan has sparse layers (their requests cannot be served
// without it); dense and quant-only plans stay SERVING. The client reports
// from its own threads, possibly before the server exists.
class KvHostHealthLink {
 public:
  void Report(bool attached) {
    absl::MutexLock lock(&mu_);
    attached_ = attached;
    if (apply_) apply_(attached);
  }
  // `apply` runs now with the current state, then on every report, until Stop.
  void Start(std::function<void(bool)> apply) {
    absl::MutexLock lock(&mu_);
    apply_ = std::move(apply);
    if (!attached_) apply_(false);
  }
  void Stop() {
    absl::MutexLock lock(&mu_);
    apply_ = nullptr;
  }

 private:
  absl::Mutex mu_;
  bool attached_ ABSL_GUARDED_BY(mu_) = true;
  std::function<void(bool)> apply_ ABSL_GUARDED_BY(mu_);
};

bool NeedsHostTier(const tailorkv::runtime::KvPlan& plan) {
  for (const auto& l : plan.layers) {
    if (l.kind == tailorkv::runtime::KvPolicyKind::kSparse) return true;
  }
  return false;
}

using tailorkv::common::ServerOptions;
using tailorkv::runtime::EngineOptions;
using tailorkv::worker::GenerationServiceOptions;
using tailorkv::worker::PlanSource;
using tailorkv::worker::PlanSourceOptions;

struct WorkerConfig {
  EngineOptions engine;
  PlanSourceOptions plan;
  ServerOptions server;
  GenerationServiceOptions service;
  std::string log_level = "info";
  // "in-process", or kv-host's control plane (a gRPC target).
  std::string kv_host = "in-process";
  // Or a remote kv-host node's data plane (host:port), its token and TLS roots.
  std::string kv_host_remote, kv_host_token, kv_host_remote_tls_ca;
  std::string metrics_listen;  // empty: no /metrics endpoint
  int kv_host_timeout_ms = 30'000;
  int kv_budget_mib = 0;
  int stream_stall_ms = 10'000;
  // bf16, or quantized: the CUDA backend keeps the layer matrices whose GGUF
  // type its GEMV takes as quantized planes (CudaBackendOptions::layer_weights).
  std::string cuda_weights = "bf16";

  absl::Status Validate() const {
    if (engine.max_running < 1) {
      return absl::InvalidArgumentError(absl::StrCat("max-running: must be >= 1, got ", engine.max_running));
    }
    if (engine.prefill_chunk < 0) {
      return absl::InvalidArgumentError(absl::StrCat("prefill-chunk: must be >= 0, got ", engine.prefill_chunk));
    }
    if (kv_budget_mib < 0) {
      return absl::InvalidArgumentError(absl::StrCat("kv-budget-mib: must be >= 0 (0 = no limit), got ", kv_budget_mib));
    }
    if (stream_stall_ms <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("stream-stall-ms: must be > 0, got ", stream_stall_ms));
    }
    if (!(engine.kv_memory_fraction > 0 && engine.kv_memory_fraction <= 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("kv-memory-fraction: must be in (0, 1], got ", engine.kv_memory_fraction));
    }
    if (kv_host != "in-process" && kv_host.find(':') == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "kv-host: want in-process or kv-host's address (unix:///path/kv-host.sock or host:port), got '", kv_host,
          "'"));
    }
    if (kv_host_timeout_ms <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("kv-host-timeout-ms: must be > 0, got ", kv_host_timeout_ms));
    }
    if (!kv_host_remote.empty()) {
      if (kv_host_token.empty()) {
        return absl::InvalidArgumentError("kv-host-token: required with --kv-host-remote (or TAILORKV_KV_HOST_TOKEN)");
      }
      if (engine.backend != "cpu") {
        return absl::InvalidArgumentError(absl::StrCat(
            "kv-host-remote: needs --backend cpu for now (the CUDA backend's remote path is not built), got '",
            engine.backend, "'"));
      }
    }
    if (cuda_weights != "bf16" && cuda_weights != "quantized") {
      return absl::InvalidArgumentError(absl::StrCat("cuda-weights: must be bf16 or quantized, got '", cuda_weights, "'"));
    }
    if (cuda_weights == "quantized" && engine.weights != "quantized") {
      return absl::InvalidArgumentError(
          "cuda-weights: quantized needs --weights quantized (the GGUF blocks it repacks), got --weights float");
    }
    if (engine.model_path.empty()) return absl::InvalidArgumentError("model: required");
    if (engine.backend != "auto" && engine.backend != "cpu" && engine.backend != "cuda") {
      return absl::InvalidArgumentError(
          absl::StrCat("backend: must be auto, cpu or cuda, got '", engine.backend, "'"));
    }
    if (engine.threads < 0) {
      return absl::InvalidArgumentError(absl::StrCat("threads: must be >= 0, got ", engine.threads));
    }
    if (absl::Status s = plan.Validate(); !s.ok()) return s;
    if (engine.max_context < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("max-context: must be >= 0, got ", engine.max_context));
    }
    if (absl::Status s = server.Validate(); !s.ok()) return s;
    return service.Validate();
  }

  std::string ToString() const {
    return absl::StrFormat(
        "model=%s backend=%s threads=%d max_context=%d kv_plan=%s profiler=%s "
        "profiler_timeout_ms=%d plan_cache=%s max_running=%d max_queue=%d kv_budget_mib=%d kv_memory_fraction=%g stream_stall_ms=%d "
        "default_max_tokens=%d log_level=%s kv_host=%s %s",
        engine.model_path, engine.backend, engine.threads, engine.max_context, plan.kv_plan,
        plan.profiler_address, plan.profiler_timeout_ms, plan.plan_cache, engine.max_running, service.max_queue,
        kv_budget_mib, engine.kv_memory_fraction, stream_stall_ms, service.limits.default_max_tokens, log_level, kv_host, server.ToString());
  }
};

// SIGHUP re-resolves the plan (PlanSource::Reload) for requests that start
// afterwards. SIGHUP is blocked in every thread (main blocks it before any
// thread starts; threads inherit the mask) and taken here with
// sigtimedwait, so nothing runs in signal context.
class ReloadOnSighup {
 public:
  static void BlockInThisThread() {
    sigset_t set = HupSet();
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
  }
  ReloadOnSighup(PlanSource& source, tailorkv::runtime::Engine& engine)
      : thread_([this, &source, &engine] { Run(source, engine); }) {}
  ~ReloadOnSighup() {
    stop_.store(true);
    thread_.join();
  }
  ReloadOnSighup(const ReloadOnSighup&) = delete;
  ReloadOnSighup& operator=(const ReloadOnSighup&) = delete;

 private:
  static sigset_t HupSet() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGHUP);
    return set;
  }
  void Run(PlanSource& source, tailorkv::runtime::Engine& engine) {
    const sigset_t set = HupSet();
    const timespec poll{0, 200'000'000};  // how soon the destructor is noticed
    while (!stop_.load()) {
      if (sigtimedwait(&set, nullptr, &poll) != SIGHUP) continue;
      spdlog::info("SIGHUP: reloading the kv plan ({})", source.options().kv_plan);
      if (absl::Status s = source.Reload(engine); !s.ok()) {
        spdlog::error("kv plan reload failed, the current plan stays: {}", s.ToString());
      }
    }
  }
  std::atomic<bool> stop_{false};
  std::thread thread_;  // last: starts once stop_ exists
};

}  // namespace

int main(int argc, char** argv) {
  tailorkv::BoundOpenMpSpinning(argv);
  tailorkv::BoundMallocCaching();
  ReloadOnSighup::BlockInThisThread();  // before any thread exists
  WorkerConfig config;
  CLI::App app{"tailorkv gpu-worker: serves tailorkv.v1.Generation over gRPC"};
  app.add_option("--model", config.engine.model_path, "model file (.gguf) or safetensors directory")
      ->required();
  app.add_option("--tls-cert", config.server.tls_cert_file, "PEM certificate chain: the gRPC port speaks TLS only");
  app.add_option("--tls-key", config.server.tls_key_file, "PEM private key of --tls-cert");
  app.add_option("--listen", config.server.listen_address, "host:port to serve on")
      ->capture_default_str();
  app.add_option("--backend", config.engine.backend, "auto, cpu or cuda")->capture_default_str();
  app.add_option("--weights", config.engine.weights,
                 "a GGUF model's linear weights: quantized (kept in their GGUF blocks; the CPU backend "
                 "multiplies them as they are, CUDA takes a bf16 copy unless --cuda-weights quantized) or "
                 "float (dequantized to float32 at load)")
      ->check(CLI::IsMember({"float", "quantized"}))
      ->capture_default_str();
  app.add_option("--cuda-weights", config.cuda_weights,
                 "the CUDA backend's layer matrices: bf16, or quantized (those of GGUF type Q4_0, Q4_1 or Q8_0 "
                 "stay in their blocks and a W4A16/W8A16 GEMV reads them; any other type becomes bf16)")
      ->capture_default_str();
  app.add_option("--threads", config.engine.threads, "CPU threads (0 = all cores)")
      ->capture_default_str();
  app.add_option("--max-context", config.engine.max_context,
                 "tokens per sequence (0 = the model's trained context)")
      ->capture_default_str();
  app.add_option("--kv-plan", config.plan.kv_plan,
                 "how each layer keeps its KV cache: dense, quant:BITS[:GROUP[:RESIDUAL]] "
                 "(every layer quantized), window:SINK:RECENT (every layer windowed), "
                 "tailorkv:BITS[:LAYERS] (the first LAYERS layers quantized, default 1), "
                 "sparse:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX][:fp8] (every layer sparse; INDEX gpu or "
                 "faithful; fp8: host tier in FP8), "
                 "hybrid:BITS:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX][:fp8] (layer 0 quantized, the rest "
                 "sparse), or "
                 "@plan.json (a plan file; format in gpu-worker/runtime/kv_plan.h), or profiler "
                 "(the newest plan for this model from --profiler). A plan naming another "
                 "model's digest is refused (exit 2); SIGHUP reloads the plan from its source")
      ->capture_default_str();
  app.add_option("--profiler", config.plan.profiler_address,
                 "host:port of the profiler service, for --kv-plan profiler");
  app.add_option("--profiler-timeout-ms", config.plan.profiler_timeout_ms,
                 "deadline of the profiler's GetPlan call")
      ->capture_default_str();
  app.add_option("--plan-cache", config.plan.plan_cache,
                 "file that keeps the last plan accepted from the profiler (written atomically); "
                 "used when the profiler is unreachable, has no plan or sends an invalid one");
  app.add_option("--prefill-chunk", config.engine.prefill_chunk,
                 "prompt tokens per prefill step (0 = the backend's choice: CPU 1024, CUDA its largest); "
                 "smaller chunks let a short prompt's first token overtake a long prompt's prefill sooner")
      ->capture_default_str();
  app.add_option("--max-running", config.engine.max_running,
                 "generations the engine runs at once (interleaved step by step); more wait in the queue")
      ->capture_default_str();
  app.add_option("--kv-budget-mib", config.kv_budget_mib,
                 "KV memory the running generations may hold on the backend (each counted at its capacity, "
                 "prompt + max_tokens); a request waits until it fits, one that never could is refused "
                 "(RESOURCE_EXHAUSTED). 0 = no limit, or on a GPU --kv-memory-fraction of its free memory")
      ->capture_default_str();
  app.add_option("--kv-memory-fraction", config.engine.kv_memory_fraction,
                 "with --kv-budget-mib 0 on a GPU: the share of the device memory free after the model loads "
                 "that running generations may take (KV and working buffers, counted at their capacity)")
      ->capture_default_str();
  app.add_option("--stream-stall-ms", config.stream_stall_ms,
                 "a client that reads nothing for this long while its stream buffer is full is cut off")
      ->capture_default_str();
  app.add_option("--max-queue", config.service.max_queue,
                 "requests that may wait for the engine; more get RESOURCE_EXHAUSTED")
      ->capture_default_str();
  app.add_option("--default-max-tokens", config.service.limits.default_max_tokens,
                 "max_tokens when a request leaves it unset")
      ->capture_default_str();
  app.add_option("--drain-grace-ms", config.server.drain_grace_ms,
                 "how long in-flight requests may run after SIGTERM")
      ->capture_default_str();
  app.add_option("--log-level", config.log_level, "trace, debug, info, warn, error")
      ->capture_default_str();
  app.add_option("--kv-host", config.kv_host,
                 "where the sparse layers' host KV lives: in-process, or the kv-host daemon's control "
                 "plane (unix:///path/kv-host.sock; the daemon must run on this machine: arenas are "
                 "shared memory)")
      ->capture_default_str();
  app.add_option("--kv-host-remote", config.kv_host_remote,
                 "kv-host nodes' remote data planes (their --data-listen), comma-separated: a sequence's "
                 "sparse layers' host KV goes to the co-located kv-host (--kv-host) while it has room, else to "
                 "the reachable node with the most free budget (CPU backend)");
  app.add_option("--kv-host-token", config.kv_host_token,
                 "that node's --data-token (or env TAILORKV_KV_HOST_TOKEN)");
  app.add_option("--kv-host-remote-tls-ca", config.kv_host_remote_tls_ca,
                 "PEM roots: reach that node over TLS")
      ->check(CLI::ExistingFile);
  app.add_option("--metrics-listen", config.metrics_listen,
                 "host:port of a Prometheus endpoint (GET /metrics; empty: none)");
  app.add_option("--inject-device-loss-after", config.engine.inject_device_loss_after_steps,
                 "testing: after this many decode steps the backend behaves as a lost device (a sticky CUDA "
                 "error's path on any backend): the worker fails its generations UNAVAILABLE, goes NOT_SERVING "
                 "and exits 3. 0 = off")
      ->capture_default_str();
  app.add_option("--kv-host-timeout-ms", config.kv_host_timeout_ms,
                 "how long to keep trying to attach to kv-host: at start, and when a request needs "
                 "it after kv-host went away (then UNAVAILABLE)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  const bool token_on_command_line = !config.kv_host_token.empty();
  if (config.kv_host_token.empty()) {
    if (const char* t = std::getenv("TAILORKV_KV_HOST_TOKEN")) config.kv_host_token = t;
  }
  config.service.model_path = config.engine.model_path;
  config.service.max_running = config.engine.max_running;
  config.engine.kv_budget_bytes = int64_t{config.kv_budget_mib} << 20;
  config.engine.stream_stall_timeout = absl::Milliseconds(config.stream_stall_ms);
  config.engine.kv_plan = config.plan.kv_plan;  // for the record: the source below decides

  if (absl::Status s = tailorkv::common::ConfigureLogging(config.log_level); !s.ok()) {
    std::fprintf(stderr, "gpu-worker: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (token_on_command_line) {
    spdlog::warn("--kv-host-token on the command line is readable by every local user (/proc/PID/cmdline); "
                 "set TAILORKV_KV_HOST_TOKEN instead");
  }
  if (absl::Status s = config.Validate(); !s.ok()) {
    spdlog::error("invalid configuration: {}", s.ToString());
    return 2;
  }
  spdlog::info("gpu-worker starting: {}", config.ToString());
  // From here on SIGTERM/SIGINT are caught, also while the model loads.
  tailorkv::common::TerminationSignals signals;

  // kv-host: attach before the model loads (a missing daemon fails fast).
  // Arenas arrive later, once the backend exists: they are registered with
  // the GPU when the backend is CUDA.
  std::atomic<int> cuda_device{-1};
  std::unique_ptr<tailorkv::kvhost::KvHostClientStore> kv_host;
  KvHostHealthLink kv_host_health;
  if (config.kv_host != "in-process") {
    tailorkv::kvhost::KvHostClientOptions ko;
    ko.target = config.kv_host;
    ko.worker_id = absl::StrCat("gpu-worker-", getpid());
    ko.reattach_timeout = absl::Milliseconds(config.kv_host_timeout_ms);
    ko.on_attach_change = [&kv_host_health](bool attached) { kv_host_health.Report(attached); };
#ifdef TAILORKV_HAVE_CUDA
    ko.register_fn = [&cuda_device](void* base, size_t bytes) -> absl::Status {
      const int d = cuda_device.load();
      return d < 0 ? absl::OkStatus() : tailorkv::cuda::RegisterHostMemory(base, bytes, d);
    };
    ko.unregister_fn = [&cuda_device](void* base, size_t) -> absl::Status {
      return cuda_device.load() < 0 ? absl::OkStatus() : tailorkv::cuda::UnregisterHostMemory(base);
    };
#endif
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(config.kv_host_timeout_ms);
    while (true) {
      auto c = tailorkv::kvhost::KvHostClientStore::Connect(ko);
      if (c.ok()) {
        kv_host = std::move(*c);
        break;
      }
      if (!absl::IsUnavailable(c.status()) || std::chrono::steady_clock::now() > until) {
        spdlog::error("cannot attach to kv-host at {}: {}", config.kv_host, c.status().ToString());
        return 1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    spdlog::info("attached to kv-host at {}: the sparse layers' host KV lives there", config.kv_host);
    config.engine.host_store = kv_host.get();
  }
  std::unique_ptr<tailorkv::kvhost::PlacedRemoteRows> remote_rows;
  if (!config.kv_host_remote.empty()) {
    std::vector<tailorkv::kvhost::RemoteRowsOptions> nodes;
    for (absl::string_view t : absl::StrSplit(config.kv_host_remote, ',', absl::SkipEmpty())) {
      nodes.push_back({.target = std::string(t),
                       .token = config.kv_host_token,
                       .worker_id = absl::StrCat("gpu-worker-", getpid()),
                       .tls_ca_file = config.kv_host_remote_tls_ca});
    }
    auto r = tailorkv::kvhost::PlacedRemoteRows::Open(std::move(nodes));
    if (!r.ok()) {
      spdlog::error("cannot open kv-host's remote data plane ({}): {}", config.kv_host_remote, r.status().ToString());
      return 1;
    }
    remote_rows = std::move(*r);
    for (size_t i = 0; i < remote_rows->nodes(); ++i) {
      auto& n = remote_rows->node(i);
      spdlog::info("the sparse layers' host KV lives on the kv-host node {} ({} of its {} bytes free, lease {}){}",
                   n.target(), n.free_bytes(), n.budget_bytes(), absl::FormatDuration(n.lease()),
                   config.kv_host != "in-process" ? " when the co-located kv-host is full" : "");
    }
    config.engine.remote_rows = remote_rows.get();
  }
  spdlog::info("loading model {} (backend {})", config.engine.model_path, config.engine.backend);
  const auto load_start = std::chrono::steady_clock::now();
#ifdef TAILORKV_HAVE_CUDA
  config.engine.cuda_factory = [&kv_host, &cuda_device, &config](const tailorkv::model::ModelWeights& w) {
    tailorkv::cuda::CudaBackendOptions o;
    o.host_store = kv_host.get();
    // Any type the GEMV takes switches it on; each matrix keeps its own.
    if (config.cuda_weights == "quantized") o.layer_weights = tailorkv::model::GgmlType::kQ4_0;
    auto b = tailorkv::cuda::CreateCudaBackend(w, o);
    if (b.ok()) cuda_device.store(o.device);
    return b;
  };
#endif
  // A lost device (a sticky CUDA error) ends every generation in the engine;
  // the worker then goes NOT_SERVING and exits 3 for its supervisor to
  // restart it, instead of answering SERVING with a device that fails
  // every request. The engine reports from its scheduler thread.
  std::atomic<bool> device_lost{false};
  std::function<void()> on_device_lost_health;  // set once the server exists
  absl::Mutex device_lost_mu;
  config.engine.on_device_lost = [&](const absl::Status& s) {
    spdlog::critical("device lost: {}; NOT_SERVING, exiting 3 for the supervisor to restart the worker",
                     s.ToString());
    device_lost.store(true);
    {
      absl::MutexLock lock(&device_lost_mu);
      if (on_device_lost_health) on_device_lost_health();
    }
    signals.Interrupt();
  };
  PlanSource plan_source(config.plan);
  config.engine.kv_plan_source = plan_source.AsEngineSource();
  auto engine = tailorkv::runtime::Engine::Create(config.engine);
  if (!engine.ok()) {
    // A bad --kv-plan lands here too: the plan is checked against the loaded
    // model. A plan for another model, or none from the profiler and its
    // cache, is a configuration error (2); a spec that does not parse keeps 1.
    const absl::Status plan_error = plan_source.last_error();
    if (!plan_error.ok() &&
        (config.plan.from_profiler() || absl::IsFailedPrecondition(plan_error))) {
      spdlog::error("no usable kv plan: {}", plan_error.ToString());
      return 2;
    }
    spdlog::error("cannot start the engine: {}", engine.status().ToString());
    return 1;
  }
  if (absl::Status s = plan_source.CommitToCache(); !s.ok()) {
    spdlog::warn("kv plan in use but not cached: {}", s.ToString());
  }
  const auto& mc = (*engine)->config();
  spdlog::info(
      "model loaded in {:.1f} s: {} '{}', {} layers, hidden {}, {} heads ({} kv), vocab {}, "
      "context {}, backend {}, digest {}, kv plan '{}' ({})",
      std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count(),
      mc.arch, mc.name, mc.n_layers, mc.hidden, mc.n_heads, mc.n_kv_heads, mc.vocab,
      (*engine)->max_context(), (*engine)->backend_name(), (*engine)->model_digest(),
      (*engine)->kv_plan().name,
      (*engine)->kv_plan().Summary());

  config.service.max_running = (*engine)->max_running();  // the backend may allow fewer
  tailorkv::worker::GenerationService service(**engine, config.service);
  auto server = tailorkv::common::GrpcServer::Start(
      config.server, {{tailorkv::v1::Generation::service_full_name(), &service}});
  if (!server.ok()) {
    spdlog::error("cannot start the server: {}", server.status().ToString());
    return 1;
  }
  (*server)->AddDrainHook([&service] { service.BeginDrain(); });
  {
    absl::MutexLock lock(&device_lost_mu);
    on_device_lost_health = [&server] {
      (*server)->SetServing("", false);
      (*server)->SetServing(tailorkv::v1::Generation::service_full_name(), false);
    };
    if (device_lost.load()) on_device_lost_health();
  }
  if (kv_host != nullptr) {
    kv_host_health.Start([&server, &engine](bool attached) {
      const bool needs = NeedsHostTier((*engine)->kv_plan());
      const std::string name = tailorkv::v1::Generation::service_full_name();
      (*server)->SetServing(name, attached || !needs);
      if (needs && attached) spdlog::info("kv-host is back: health of {} SERVING", name);
      if (needs && !attached) spdlog::warn("kv-host is away: health of {} NOT_SERVING until it is back", name);
    });
  }
  auto reload = std::make_unique<ReloadOnSighup>(plan_source, **engine);
  std::unique_ptr<tailorkv::common::MetricsHttpServer> metrics;
  if (!config.metrics_listen.empty()) {
    auto m = tailorkv::common::MetricsHttpServer::Start(config.metrics_listen,
                                                         [&service] { return service.PrometheusText(); });
    if (!m.ok()) {
      spdlog::error("cannot serve metrics: {}", m.status().ToString());
      return 1;
    }
    metrics = std::move(*m);
    spdlog::info("metrics on http://{}/metrics (port {})", config.metrics_listen, metrics->port());
  }
  spdlog::info("ready on {}", (*server)->address());

  const int signo = signals.Wait();
  if (device_lost.load()) {
    spdlog::info("draining after the device loss");
  } else {
    spdlog::info("received signal {}, draining", signo);
  }
  (*server)->Drain();
  {
    absl::MutexLock lock(&device_lost_mu);
    on_device_lost_health = nullptr;
  }
  metrics.reset();
  kv_host_health.Stop();
  reload.reset();
  server->reset();
  engine->reset();
  kv_host.reset();  // after the engine: its sequences hold kv-host's memory
  if (device_lost.load()) {
    spdlog::error("gpu-worker stopped: its device is lost (exit 3)");
    spdlog::shutdown();
    return 3;
  }
  spdlog::info("gpu-worker stopped");
  spdlog::shutdown();
  return 0;
}
