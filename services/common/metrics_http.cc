#include "common/metrics_http.h"

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/tcp_listen.h"

namespace tailorkv::common {
namespace {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
}  // namespace

struct MetricsHttpServer::Impl {
  std::function<std::string()> render;
  asio::io_context ioc;
  tcp::acceptor acceptor{ioc};
  tcp::endpoint bound;
  std::atomic<bool> stopping{false};
  std::thread thread;

  void Loop() {
    while (!stopping) {
      beast::error_code ec;
      tcp::socket socket(ioc);
      acceptor.accept(socket, ec);
      if (stopping) return;
      if (ec) continue;
      beast::flat_buffer buffer;
      http::request<http::string_body> req;
      http::read(socket, buffer, req, ec);
      if (ec) continue;
      http::response<http::string_body> res;
      res.version(11);
      res.keep_alive(false);
      res.set(http::field::server, "tailorkv-metrics");
      const std::string target(req.target());
      if (req.method() != http::verb::get && req.method() != http::verb::head) {
        res.result(http::status::method_not_allowed);
        res.body() = "GET /metrics\n";
      } else if (target.substr(0, target.find('?')) != "/metrics") {
        res.result(http::status::not_found);
        res.body() = "GET /metrics\n";
      } else {
        res.result(http::status::ok);
        res.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
        res.body() = render();
      }
      res.prepare_payload();
      http::write(socket, res, ec);
      socket.shutdown(tcp::socket::shutdown_both, ec);
    }
  }
};

MetricsHttpServer::MetricsHttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MetricsHttpServer::~MetricsHttpServer() {
  impl_->stopping = true;
  beast::error_code ec;
  tcp::socket s(impl_->ioc);
  tcp::endpoint to = impl_->bound;
  if (to.address().is_unspecified()) to.address(asio::ip::address_v4::loopback());
  s.connect(to, ec);  // wakes the blocking accept
  if (impl_->thread.joinable()) impl_->thread.join();
}

int MetricsHttpServer::port() const { return impl_->bound.port(); }

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(const std::string& listen,
                                                                           std::function<std::string()> render) {
  auto impl = std::make_unique<Impl>();
  impl->render = std::move(render);
  if (absl::Status s = ListenTcp("metrics-listen", listen, impl->acceptor, 16); !s.ok()) return s;
  impl->bound = impl->acceptor.local_endpoint();
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->Loop(); });
  return std::unique_ptr<MetricsHttpServer>(new MetricsHttpServer(std::move(impl)));
}

}  // namespace tailorkv::common
