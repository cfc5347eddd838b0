// MetricsHttpServer: GET /metrics over plain HTTP/1.1 for a Prometheus
// server to scrape (one thread, one connection at a time, each closed after
// its response: scrapes are seconds apart). `render` builds the text on each
// scrape. Other paths get 404; other methods 405. A client that connects and
// sends nothing holds the loop until it goes away (synchronous asio): bind it
// where only the scraper reaches it (loopback or the cluster network).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace tailorkv::common {

class MetricsHttpServer {
 public:
  // Binds `listen` (host:port; port 0 picks one) and serves until
  // destroyed. InvalidArgument for a bad address, Unavailable when it
  // cannot bind.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& listen,
                                                                   std::function<std::string()> render);
  ~MetricsHttpServer();
  int port() const;

 private:
  struct Impl;
  explicit MetricsHttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tailorkv::common
