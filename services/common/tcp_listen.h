// Binds a Boost.Asio acceptor to a "host:port" flag value (an IP literal,
// IPv6 in brackets or not; an empty host means all interfaces; port 0 picks
// a free one) and starts listening. Shared by the HTTP servers (the
// gateway's API, the /metrics endpoints).
#pragma once

#include <boost/asio.hpp>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace tailorkv::common {

// InvalidArgument naming `flag` for a malformed value, Unavailable when the
// address cannot be bound.
inline absl::Status ListenTcp(const std::string& flag, const std::string& listen,
                              boost::asio::ip::tcp::acceptor& acceptor, int backlog) {
  namespace asio = boost::asio;
  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || !absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": want host:port, got '", listen, "'"));
  }
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  boost::system::error_code ec;
  const asio::ip::address addr = asio::ip::make_address(host.empty() ? "0.0.0.0" : host, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat(flag, ": '", host, "' is not an IP address"));
  const asio::ip::tcp::endpoint ep(addr, static_cast<uint16_t>(port));
  acceptor.open(ep.protocol(), ec);
  if (!ec) acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor.bind(ep, ec);
  if (!ec) acceptor.listen(backlog, ec);
  if (ec) return absl::UnavailableError(absl::StrCat(flag, " ", listen, ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace tailorkv::common
