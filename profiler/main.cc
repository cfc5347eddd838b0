// profiler: serves tailorkv.v1.Profiler (placeholder RPCs for now), health and
// reflection until SIGTERM/SIGINT, then drains.
#include "common/service_main.h"
#include "profiler_placeholder_service.h"

int main(int argc, char** argv) {
  tailorkv::profiler::ProfilerPlaceholderService service;
  return tailorkv::common::RunServiceMain(
      argc, argv,
      {.name = "profiler",
       .description = "tailorkv profiler: per-layer KV plans",
       .default_listen = "127.0.0.1:50071",
       .services = {{tailorkv::v1::Profiler::service_full_name(), &service}}});
}
