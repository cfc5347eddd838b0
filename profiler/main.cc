// profiler: serves tailorkv.v1.Profiler (profile a model of --models-dir,
// fetch and list the plans kept in --plans-dir), health and reflection until
// SIGTERM/SIGINT, then drains (a running profile is cancelled).
#include <memory>

#include <CLI/CLI.hpp>

#include "absl/strings/str_cat.h"
#include "common/service_main.h"
#include "profiler/plan_store.h"
#include "profiler/profiler_service.h"
#include "profiler/cuda_factories.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
  namespace tp = tailorkv::profiler;
  tp::RunnerOptions runner;
  std::string plans_dir = "plans";
  std::unique_ptr<tp::PlanStore> store;
  std::unique_ptr<tp::ProfilerService> service;
  tp::AddCudaFactories(runner);
  return tailorkv::common::RunServiceMain(
      argc, argv,
      {.name = "profiler",
       .description = "tailorkv profiler: measures models and serves per-layer KV plans",
       .default_listen = "127.0.0.1:50071",
       .services = {},
       .add_flags =
           [&](CLI::App& app) {
             app.add_option("--models-dir", runner.models_dir,
                            "directory of the GGUF models callers may profile (by file name)")
                 ->required();
             app.add_option("--plans-dir", plans_dir, "where finished plans are kept")
                 ->capture_default_str();
             app.add_option("--backend", runner.backend, "auto, cpu or cuda")
                 ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
                 ->capture_default_str();
             app.add_option("--threads", runner.threads, "CPU threads (0 = all cores)")
                 ->check(CLI::NonNegativeNumber)
                 ->capture_default_str();
           },
       .init =
           [&](const tailorkv::common::ServerOptions&,
               std::vector<tailorkv::common::ServiceEntry>& services) -> absl::Status {
             auto opened = tp::PlanStore::Open(plans_dir);
             if (!opened.ok()) return opened.status();
             store = *std::move(opened);
             for (const std::string& s : store->skipped()) spdlog::warn("plan store: skipped {}", s);
             spdlog::info("models from {}, plans in {}, backend {}", runner.models_dir,
                          store->dir(), runner.backend);
             service = std::make_unique<tp::ProfilerService>(runner, store.get());
             services.push_back(
                 {tailorkv::v1::Profiler::service_full_name(), service.get()});
             return absl::OkStatus();
           },
       .metrics = [&]() -> std::string { return service != nullptr ? service->PrometheusText() : std::string(); }});
}
