// kv-host: serves tailorkv.v1.KvHost (placeholder RPCs for now), health and
// reflection until SIGTERM/SIGINT, then drains.
#include "common/service_main.h"
#include "kv_host_placeholder_service.h"

int main(int argc, char** argv) {
  tailorkv::kvhost::KvHostPlaceholderService service;
  return tailorkv::common::RunServiceMain(
      argc, argv,
      {.name = "kv-host",
       .description = "tailorkv kv-host: host memory for offloaded KV",
       .default_listen = "127.0.0.1:50061",
       .services = {{tailorkv::v1::KvHost::service_full_name(), &service}}});
}
