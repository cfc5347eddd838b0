// Prometheus text: cumulative histogram buckets with _sum and _count,
// escaped label values, and the /metrics endpoint over a real socket.
#include "common/prometheus.h"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "common/metrics_http.h"

namespace tailorkv::common {
namespace {

TEST(Prometheus, HistogramBucketsAreCumulative) {
  Histogram h({0.1, 1.0});
  h.Observe(0.05);
  h.Observe(0.1);  // on a bound: counted in it (le)
  h.Observe(0.5);
  h.Observe(7.0);
  const std::string text = h.Render("x_seconds", "job=\"w\"");
  EXPECT_NE(text.find("x_seconds_bucket{job=\"w\",le=\"0.1\"} 2\n"), std::string::npos) << text;
  EXPECT_NE(text.find("x_seconds_bucket{job=\"w\",le=\"1\"} 3\n"), std::string::npos) << text;
  EXPECT_NE(text.find("x_seconds_bucket{job=\"w\",le=\"+Inf\"} 4\n"), std::string::npos) << text;
  EXPECT_NE(text.find("x_seconds_sum{job=\"w\"} 7.650000\n"), std::string::npos) << text;
  EXPECT_NE(text.find("x_seconds_count{job=\"w\"} 4\n"), std::string::npos) << text;
  EXPECT_NE(Histogram({1}).Render("y").find("y_bucket{le=\"+Inf\"} 0\ny_sum 0.000000\ny_count 0\n"),
            std::string::npos);
}

TEST(Prometheus, LabelValuesAreEscaped) {
  EXPECT_EQ(LabelValue("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
  std::string out;
  AppendHeader(&out, "m", "gauge", "help text");
  AppendSample(&out, "m", "k=\"v\"", 2.5);
  EXPECT_EQ(out, "# HELP m help text\n# TYPE m gauge\nm{k=\"v\"} 2.5\n");
}

std::string Get(int port, const std::string& request) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  EXPECT_EQ(write(fd, request.data(), request.size()), static_cast<ssize_t>(request.size()));
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

TEST(MetricsHttpServer, ServesMetricsAndRefusesOtherPaths) {
  int scrapes = 0;
  auto server = MetricsHttpServer::Start("127.0.0.1:0", [&scrapes] {
    ++scrapes;
    return std::string("up_thing 1\n");
  });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  const std::string ok = Get(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(ok.rfind("HTTP/1.1 200", 0), 0u) << ok;
  EXPECT_NE(ok.find("text/plain; version=0.0.4"), std::string::npos) << ok;
  EXPECT_NE(ok.find("\r\n\r\nup_thing 1\n"), std::string::npos) << ok;
  EXPECT_EQ(Get(port, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n").rfind("HTTP/1.1 404", 0), 0u);
  EXPECT_EQ(Get(port, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").rfind("HTTP/1.1 405", 0), 0u);
  EXPECT_EQ(scrapes, 1);
  EXPECT_EQ(MetricsHttpServer::Start("nonsense", [] { return std::string(); }).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tailorkv::common
