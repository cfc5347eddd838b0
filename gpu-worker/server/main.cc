// gpu-worker: loads a model and serves tailorkv.v1.Generation (plus health
// and reflection) until SIGTERM/SIGINT, then drains.
#include <chrono>
#include <cstdio>
#include <memory>

#include <CLI/CLI.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/grpc_server.h"
#include "common/logging.h"
#include "common/openmp_env.h"
#include "runtime/engine.h"
#ifdef TAILORKV_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif
#include "server/generation_service.h"

namespace {

using tailorkv::common::ServerOptions;
using tailorkv::runtime::EngineOptions;
using tailorkv::worker::GenerationServiceOptions;

struct WorkerConfig {
  EngineOptions engine;
  ServerOptions server;
  GenerationServiceOptions service;
  std::string log_level = "info";

  absl::Status Validate() const {
    if (engine.model_path.empty()) return absl::InvalidArgumentError("model: required");
    if (engine.backend != "auto" && engine.backend != "cpu" && engine.backend != "cuda") {
      return absl::InvalidArgumentError(
          absl::StrCat("backend: must be auto, cpu or cuda, got '", engine.backend, "'"));
    }
    if (engine.threads < 0) {
      return absl::InvalidArgumentError(absl::StrCat("threads: must be >= 0, got ", engine.threads));
    }
    if (engine.kv_plan.empty()) {
      return absl::InvalidArgumentError("kv-plan: must not be empty (\"dense\" keeps every layer dense)");
    }
    if (engine.max_context < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("max-context: must be >= 0, got ", engine.max_context));
    }
    if (absl::Status s = server.Validate(); !s.ok()) return s;
    return service.Validate();
  }

  std::string ToString() const {
    return absl::StrFormat(
        "model=%s backend=%s threads=%d max_context=%d kv_plan=%s max_queue=%d "
        "default_max_tokens=%d log_level=%s %s",
        engine.model_path, engine.backend, engine.threads, engine.max_context, engine.kv_plan,
        service.max_queue,
        service.limits.default_max_tokens, log_level, server.ToString());
  }
};

}  // namespace

int main(int argc, char** argv) {
  tailorkv::EnsurePassiveOpenMpWait(argv);
  WorkerConfig config;
  CLI::App app{"tailorkv gpu-worker: serves tailorkv.v1.Generation over gRPC"};
  app.add_option("--model", config.engine.model_path, "model file (.gguf) or safetensors directory")
      ->required();
  app.add_option("--listen", config.server.listen_address, "host:port to serve on")
      ->capture_default_str();
  app.add_option("--backend", config.engine.backend, "auto, cpu or cuda")->capture_default_str();
  app.add_option("--threads", config.engine.threads, "CPU threads (0 = all cores)")
      ->capture_default_str();
  app.add_option("--max-context", config.engine.max_context,
                 "tokens per sequence (0 = the model's trained context)")
      ->capture_default_str();
  app.add_option("--kv-plan", config.engine.kv_plan,
                 "how each layer keeps its KV cache: dense, quant:BITS[:GROUP[:RESIDUAL]] "
                 "(every layer quantized), window:SINK:RECENT (every layer windowed), "
                 "tailorkv:BITS[:LAYERS] (the first LAYERS layers quantized, default 1), "
                 "sparse:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX][:fp8] (every layer sparse; INDEX gpu or "
                 "faithful; fp8: host tier in FP8), "
                 "hybrid:BITS:TOPK[:SINK:RECENT[:CHANNELS]][:INDEX][:fp8] (layer 0 quantized, the rest "
                 "sparse), or "
                 "@plan.json (a profiler plan; format in gpu-worker/runtime/kv_plan.h)")
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
  CLI11_PARSE(app, argc, argv);
  config.service.model_path = config.engine.model_path;

  if (absl::Status s = tailorkv::common::ConfigureLogging(config.log_level); !s.ok()) {
    std::fprintf(stderr, "gpu-worker: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (absl::Status s = config.Validate(); !s.ok()) {
    spdlog::error("invalid configuration: {}", s.ToString());
    return 2;
  }
  spdlog::info("gpu-worker starting: {}", config.ToString());
  // From here on SIGTERM/SIGINT are caught, also while the model loads.
  tailorkv::common::TerminationSignals signals;

  spdlog::info("loading model {} (backend {})", config.engine.model_path, config.engine.backend);
  const auto load_start = std::chrono::steady_clock::now();
#ifdef TAILORKV_HAVE_CUDA
  config.engine.cuda_factory = [](const tailorkv::model::ModelWeights& w) {
    return tailorkv::cuda::CreateCudaBackend(w, {});
  };
#endif
  auto engine = tailorkv::runtime::Engine::Create(config.engine);
  if (!engine.ok()) {
    // A bad --kv-plan lands here too: the plan is checked against the loaded model.
    spdlog::error("cannot start the engine: {}", engine.status().ToString());
    return 1;
  }
  const auto& mc = (*engine)->config();
  spdlog::info(
      "model loaded in {:.1f} s: {} '{}', {} layers, hidden {}, {} heads ({} kv), vocab {}, "
      "context {}, backend {}, kv plan '{}' ({})",
      std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count(),
      mc.arch, mc.name, mc.n_layers, mc.hidden, mc.n_heads, mc.n_kv_heads, mc.vocab,
      (*engine)->max_context(), (*engine)->backend_name(), (*engine)->kv_plan().name,
      (*engine)->kv_plan().Summary());

  tailorkv::worker::GenerationService service(**engine, config.service);
  auto server = tailorkv::common::GrpcServer::Start(
      config.server, {{tailorkv::v1::Generation::service_full_name(), &service}});
  if (!server.ok()) {
    spdlog::error("cannot start the server: {}", server.status().ToString());
    return 1;
  }
  (*server)->AddDrainHook([&service] { service.BeginDrain(); });
  spdlog::info("ready on {}", (*server)->address());

  const int signo = signals.Wait();
  spdlog::info("received signal {}, draining", signo);
  (*server)->Drain();
  server->reset();
  engine->reset();
  spdlog::info("gpu-worker stopped");
  spdlog::shutdown();
  return 0;
}
