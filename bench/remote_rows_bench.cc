// The remote data plane's cost per request (issue 17): against a running
// kv-host --data-listen node, one slice shaped as a sparse layer's host tier
// (K of every KV head, then V), written once, then Gathers shaped as a decode
// step's (every head's K and V rows of a random selection, one request) of
// several sizes: median and p99 latency, and the bytes. What the cost model
// in docs/architecture.md ("Remote kv-host nodes") is fitted to.
//
//   tkv_remote_rows_bench --target 10.0.0.1:50600 --token T --heads 8 --row-bytes 256
//       --rows 48,128,512,896 --requests 200 --out results/remote_rows.json
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <vector>

#include "client/remote_rows_client.h"

namespace {

using Clock = std::chrono::steady_clock;

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(p * static_cast<double>(v.size() - 1))];
}

}  // namespace

int main(int argc, char** argv) {
  std::string target, token, out_path;
  int heads = 8, row_bytes = 256, capacity = 32768, requests = 200;
  std::vector<int> rows = {48, 128, 512, 896};
  CLI::App app{"kv-host remote data plane: Gather latency by request size"};
  app.add_option("--target", target, "host:port of kv-host --data-listen")->required();
  app.add_option("--token", token, "its --data-token (or env TAILORKV_KV_HOST_TOKEN)");
  app.add_option("--heads", heads, "KV heads a request covers")->check(CLI::Range(1, 64));
  app.add_option("--row-bytes", row_bytes, "bytes of one K (or V) row of one head")->check(CLI::Range(16, 65536));
  app.add_option("--capacity", capacity, "rows per head in the slice")->check(CLI::Range(1024, 1 << 22));
  app.add_option("--rows", rows, "rows per head per request")->delimiter(',');
  app.add_option("--requests", requests, "timed requests per size")->check(CLI::Range(10, 100000));
  app.add_option("--out", out_path, "JSON results file");
  CLI11_PARSE(app, argc, argv);
  if (token.empty()) {
    if (const char* t = std::getenv("TAILORKV_KV_HOST_TOKEN")) token = t;
  }
  auto client = tailorkv::kvhost::RemoteRowsClient::Open(
      {.target = target, .token = token, .worker_id = "tkv_remote_rows_bench", .tls_ca_file = ""});
  if (!client.ok()) {
    std::fprintf(stderr, "open: %s\n", client.status().ToString().c_str());
    return 1;
  }
  auto& c = **client;
  const uint64_t tier = 2ull * heads * capacity * row_bytes;
  auto ids = c.Reserve("bench", {tier});
  if (!ids.ok()) {
    std::fprintf(stderr, "reserve %llu bytes: %s\n", static_cast<unsigned long long>(tier), ids.status().ToString().c_str());
    return 1;
  }
  const uint64_t slice = (*ids)[0];
  std::vector<std::byte> data(tier);
  std::mt19937 rng(5);
  for (auto& b : data) b = static_cast<std::byte>(rng());
  const auto w0 = Clock::now();
  if (auto s = c.Write(slice, 0, data); !s.ok()) {
    std::fprintf(stderr, "write: %s\n", s.ToString().c_str());
    return 1;
  }
  const double write_s = std::chrono::duration<double>(Clock::now() - w0).count();
  std::printf("target %s: wrote %.1f MB in %.3f s (%.0f MB/s)\n", target.c_str(), tier / 1e6, write_s,
              tier / 1e6 / write_s);
  nlohmann::json out = {{"target", target}, {"heads", heads}, {"row_bytes", row_bytes},
                        {"write_bytes", tier}, {"write_seconds", write_s}};
  std::printf("%8s %12s %10s %10s %10s\n", "rows", "bytes", "p50 us", "p99 us", "MB/s p50");
  for (int n : rows) {
    n = std::min(n, capacity);
    std::vector<tailorkv::kvhost::RowRequest> req;
    for (int h = 0; h < heads; ++h) {
      for (int kv = 0; kv < 2; ++kv) {
        req.push_back({.slice_id = slice,
                       .offset = (static_cast<uint64_t>(kv) * heads + h) * capacity * row_bytes,
                       .stride = static_cast<uint64_t>(row_bytes),
                       .row_bytes = static_cast<uint32_t>(row_bytes),
                       .rows = {}});
      }
    }
    const uint64_t bytes = 2ull * heads * n * row_bytes;
    std::vector<std::byte> got(bytes);
    std::vector<double> us;
    std::uniform_int_distribution<uint32_t> pick(0, capacity - 1);
    for (int i = 0; i < requests + 5; ++i) {
      for (auto& r : req) {
        r.rows.resize(n);
        for (auto& x : r.rows) x = pick(rng);
        std::sort(r.rows.begin(), r.rows.end());  // a selection is in position order
      }
      const auto t0 = Clock::now();
      if (auto s = c.Gather(req, absl::MakeSpan(got)); !s.ok()) {
        std::fprintf(stderr, "gather: %s\n", s.ToString().c_str());
        return 1;
      }
      if (i >= 5) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
    const double p50 = Percentile(us, 0.5), p99 = Percentile(us, 0.99);
    std::printf("%8d %12llu %10.1f %10.1f %10.0f\n", n, static_cast<unsigned long long>(bytes), p50, p99,
                bytes / p50);
    out["gather"].push_back({{"rows_per_head", n}, {"bytes", bytes}, {"p50_us", p50}, {"p99_us", p99},
                             {"requests", requests}});
  }
  (void)c.CloseSession("bench");
  if (!out_path.empty()) std::ofstream(out_path) << out.dump(1) << "\n";
  return 0;
}
