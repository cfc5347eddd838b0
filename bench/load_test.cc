// tkv_load_test: many concurrent clients against a running gpu-worker over
// gRPC (tailorkv.v1.Generation), greedy, with prompts of mixed lengths.
//
// Phases, one after the other on the same worker:
//   alone    one client, its requests in sequence (the baseline);
//   together --clients clients at once, each sending --requests requests;
//   stalled  the same, plus --stalled clients that open a stream and never
//            read it: every other request must still complete. (The worker
//            cuts a stalled generation off once its stream buffer stays
//            full; gRPC's flow-control windows, 64 KiB and up, hold ~2,000
//            tokens first, so short runs only see it generate.)
// For each phase: requests completed and failed (with the status), generated
// tokens, wall time, aggregate tokens/s, and per request the time to first
// token and the gaps between streamed tokens (p50/p99 over all requests),
// and the slowest request's completion (starvation shows there).
// With --via-gateway HOST:PORT (the gateway's HTTP API in front of the same
// worker), the alone and together phases run again through the gateway
// (POST /v1/completions, streamed as server-sent events, greedy, the same
// prompts), and the gateway's added latency is reported: p50 time to first
// token, p50 gap between tokens and p50 request time, gateway minus direct.
// Writes the figures as JSON (--out) and a table to stdout. Exit 0 when every
// request of every phase completed (stalled clients excepted), else 1.
#include <grpcpp/grpcpp.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <functional>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "tailorkv/v1/generation.grpc.pb.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace v1 = tailorkv::v1;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

struct Options {
  std::string server = "127.0.0.1:50051";
  int clients = 32;
  int requests = 1;
  int max_tokens = 32;
  int min_words = 8;
  int max_words = 400;
  int stalled = 1;
  int deadline_s = 300;
  std::string out;
  std::string via_gateway;  // host:port of the gateway's HTTP API
};

struct RequestStats {
  bool ok = false;
  std::string error;
  int tokens = 0;
  double ttft_ms = 0;
  double total_ms = 0;
  std::vector<double> gaps_ms;
};

// Prompt `i`: between min and max words, spread over clients so that short
// and long prompts are in flight together.
std::string Prompt(const Options& o, int i) {
  static const char* kWords[] = {"river", "stone", "lamp", "harbor", "violet", "engine", "quiet", "market",
                                 "seven", "glass", "winter", "orchard", "copper", "signal", "meadow", "north"};
  const int span = std::max(1, o.max_words - o.min_words + 1);
  const int words = o.min_words + static_cast<int>((static_cast<int64_t>(i) * 7919) % span);
  std::string s = "Notes:";
  for (int w = 0; w < words; ++w) {
    s += ' ';
    s += kWords[(w * 5 + i * 3 + w / 7) % 16];
  }
  return s + ". Summary:";
}

RequestStats RunOne(v1::Generation::Stub& stub, const Options& o, int index) {
  RequestStats r;
  v1::GenerateRequest req;
  req.set_text(Prompt(o, index));
  req.mutable_sampling()->set_max_tokens(o.max_tokens);
  req.mutable_sampling()->set_temperature(0);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(o.deadline_s));
  const Clock::time_point t0 = Clock::now();
  Clock::time_point last = t0;
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse resp;
  bool final_seen = false;
  while (reader->Read(&resp)) {
    if (resp.has_chunk()) {
      const Clock::time_point now = Clock::now();
      if (r.tokens == 0) {
        r.ttft_ms = Ms(now - t0);
      } else {
        r.gaps_ms.push_back(Ms(now - last));
      }
      last = now;
      r.tokens += resp.chunk().token_ids_size();
    } else if (resp.has_final()) {
      final_seen = true;
    }
  }
  const grpc::Status s = reader->Finish();
  r.total_ms = Ms(Clock::now() - t0);
  r.ok = s.ok() && final_seen;
  if (!s.ok()) r.error = std::to_string(s.error_code()) + ": " + s.error_message();
  return r;
}

// The same request through the gateway's HTTP API, streamed: one event per
// worker chunk; the tokens counted from the usage event.
RequestStats RunOneHttp(const std::string& host, const std::string& port, const Options& o, int index) {
  namespace asio = boost::asio;
  namespace beast = boost::beast;
  namespace http = beast::http;
  RequestStats r;
  const Clock::time_point t0 = Clock::now();
  Clock::time_point last = t0;
  try {
    asio::io_context ioc;
    asio::ip::tcp::socket sock(ioc);
    asio::connect(sock, asio::ip::tcp::resolver(ioc).resolve(host, port));
    nlohmann::json body = {{"model", "load-test"}, {"prompt", Prompt(o, index)}, {"max_tokens", o.max_tokens},
                           {"temperature", 0}, {"stream", true}, {"stream_options", {{"include_usage", true}}}};
    http::request<http::string_body> req{http::verb::post, "/v1/completions", 11};
    req.set(http::field::host, host);
    req.set(http::field::content_type, "application/json");
    req.body() = body.dump();
    req.prepare_payload();
    http::write(sock, req);
    beast::flat_buffer buf;
    http::response_parser<http::buffer_body> parser;
    parser.body_limit(std::uint64_t{1} << 40);
    http::read_header(sock, buf, parser);
    if (parser.get().result() != http::status::ok) {
      r.error = "HTTP " + std::to_string(parser.get().result_int());
      return r;
    }
    std::string pending;
    bool done = false;
    int events = 0;
    char data[16384];
    while (!parser.is_done() && !done) {
      parser.get().body().data = data;
      parser.get().body().size = sizeof(data);
      beast::error_code ec;
      http::read_some(sock, buf, parser, ec);  // what has arrived: events as they come
      if (ec == http::error::need_buffer) ec = {};
      if (ec) {
        r.error = ec.message();
        return r;
      }
      pending.append(data, sizeof(data) - parser.get().body().size);
      for (size_t end; (end = pending.find("\n\n")) != std::string::npos;) {
        const std::string event = pending.substr(0, end);
        pending.erase(0, end + 2);
        if (event.rfind("data: ", 0) != 0) continue;
        if (event == "data: [DONE]") {
          done = true;
          break;
        }
        const nlohmann::json j = nlohmann::json::parse(event.substr(6), nullptr, false);
        if (j.is_discarded()) continue;
        if (j.contains("error")) {
          r.error = j["error"].value("message", "error event");
          return r;
        }
        if (j.contains("usage") && j["usage"].is_object()) r.tokens = j["usage"].value("completion_tokens", 0);
        if (j.contains("choices") && !j["choices"].empty() && !j["choices"][0].value("text", "").empty()) {
          const Clock::time_point now = Clock::now();
          if (events++ == 0) {
            r.ttft_ms = Ms(now - t0);
          } else {
            r.gaps_ms.push_back(Ms(now - last));
          }
          last = now;
        }
      }
    }
    r.ok = done;
    if (!done && r.error.empty()) r.error = "the stream ended without [DONE]";
  } catch (const std::exception& e) {
    r.error = e.what();
  }
  r.total_ms = Ms(Clock::now() - t0);
  return r;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

// A client that asks for a long generation and never reads its stream.
class StalledClient {
 public:
  StalledClient(v1::Generation::Stub& stub, const Options& o, int index) {
    v1::GenerateRequest req;
    req.set_text(Prompt(o, index));
    req.mutable_sampling()->set_max_tokens(std::max(o.max_tokens * 8, 256));
    ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(o.deadline_s));
    reader_ = stub.Generate(&ctx_, req);  // sent; nothing is read
  }
  ~StalledClient() {
    ctx_.TryCancel();
    v1::GenerateResponse resp;
    while (reader_->Read(&resp)) {
    }
    (void)reader_->Finish();
  }

 private:
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader_;
};

// `http`: run each request through the gateway instead (no stalled clients).
nlohmann::json RunPhase(const std::string& name, v1::Generation::Stub& stub, v1::Generation::Stub& stalled_stub,
                        const Options& o, int clients, int stalled, bool* all_ok,
                        const std::function<RequestStats(int)>* http = nullptr) {
  std::vector<std::unique_ptr<StalledClient>> stuck;
  for (int i = 0; i < stalled; ++i) stuck.push_back(std::make_unique<StalledClient>(stalled_stub, o, 1000 + i));
  std::vector<std::vector<RequestStats>> per_client(clients);
  const Clock::time_point t0 = Clock::now();
  {
    std::vector<std::thread> threads;
    for (int c = 0; c < clients; ++c) {
      threads.emplace_back([&, c] {
        for (int k = 0; k < o.requests; ++k) {
          const int index = c * o.requests + k;
          per_client[c].push_back(http != nullptr ? (*http)(index) : RunOne(stub, o, index));
        }
      });
    }
    for (auto& t : threads) t.join();
  }
  const double wall_ms = Ms(Clock::now() - t0);
  stuck.clear();
  int ok = 0, failed = 0;
  int64_t tokens = 0;
  std::vector<double> ttft, gaps, totals;
  std::vector<std::string> errors;
  for (const auto& v : per_client) {
    for (const RequestStats& r : v) {
      if (r.ok) {
        ++ok;
      } else {
        ++failed;
        if (errors.size() < 5) errors.push_back(r.error);
      }
      tokens += r.tokens;
      ttft.push_back(r.ttft_ms);
      totals.push_back(r.total_ms);
      gaps.insert(gaps.end(), r.gaps_ms.begin(), r.gaps_ms.end());
    }
  }
  if (failed > 0) *all_ok = false;
  nlohmann::json j = {{"phase", name},
                      {"clients", clients},
                      {"stalled_clients", stalled},
                      {"requests_completed", ok},
                      {"requests_failed", failed},
                      {"errors", errors},
                      {"generated_tokens", tokens},
                      {"wall_s", wall_ms / 1000},
                      {"tokens_per_s", tokens / (wall_ms / 1000)},
                      {"ttft_ms_p50", Percentile(ttft, 0.5)},
                      {"ttft_ms_p99", Percentile(ttft, 0.99)},
                      {"inter_token_ms_p50", Percentile(gaps, 0.5)},
                      {"inter_token_ms_p99", Percentile(gaps, 0.99)},
                      {"request_ms_p50", Percentile(totals, 0.5)},
                      {"slowest_request_s", Percentile(totals, 1.0) / 1000}};
  std::printf("%-9s %7d %7d %6d %6d %8lld %8.2f %9.1f %9.1f %9.1f %9.1f %9.1f %9.2f\n", name.c_str(), clients,
              stalled, ok, failed, static_cast<long long>(tokens), wall_ms / 1000, tokens / (wall_ms / 1000),
              Percentile(ttft, 0.5), Percentile(ttft, 0.99), Percentile(gaps, 0.5), Percentile(gaps, 0.99),
              Percentile(totals, 1.0) / 1000);
  for (const std::string& e : errors) std::printf("          error: %s\n", e.c_str());
  std::fflush(stdout);
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"tkv_load_test: concurrent gRPC clients against a gpu-worker"};
  app.add_option("--server", o.server, "the worker's host:port")->capture_default_str();
  app.add_option("--clients", o.clients, "clients at once")->capture_default_str()->check(CLI::Range(1, 1024));
  app.add_option("--requests", o.requests, "requests per client, in sequence")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_option("--max-tokens", o.max_tokens, "tokens per request")->capture_default_str()->check(CLI::Range(1, 100000));
  app.add_option("--min-words", o.min_words, "shortest prompt, words")->capture_default_str()->check(CLI::Range(1, 100000));
  app.add_option("--max-words", o.max_words, "longest prompt, words")->capture_default_str()->check(CLI::Range(1, 100000));
  app.add_option("--stalled", o.stalled, "clients that never read (phase 'stalled'; 0 skips it)")
      ->capture_default_str()
      ->check(CLI::Range(0, 64));
  app.add_option("--deadline-s", o.deadline_s, "deadline of each request")->capture_default_str()->check(CLI::Range(1, 86400));
  app.add_option("--via-gateway", o.via_gateway,
                 "host:port of a gateway's HTTP API in front of the same worker: run alone and together again "
                 "through it and report its added latency");
  app.add_option("--out", o.out, "JSON results file");
  CLI11_PARSE(app, argc, argv);
  if (o.min_words > o.max_words) {
    std::fprintf(stderr, "tkv_load_test: --min-words %d > --max-words %d\n", o.min_words, o.max_words);
    return 2;
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(16 << 20);
  // One connection per client thread would measure the network stack; one
  // channel multiplexes the streams like a gateway would.
  auto channel = grpc::CreateCustomChannel(o.server, grpc::InsecureChannelCredentials(), args);
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
    std::fprintf(stderr, "tkv_load_test: cannot connect to %s\n", o.server.c_str());
    return 1;
  }
  auto stub = v1::Generation::NewStub(channel);
  // Stalled clients use a connection of their own (their unread stream
  // fills its flow-control window, not the measured clients').
  auto stalled_stub = v1::Generation::NewStub(grpc::CreateCustomChannel(
      o.server, grpc::InsecureChannelCredentials(), [] {
        grpc::ChannelArguments a;
        a.SetString("tkv.load_test.channel", "stalled");  // a distinct channel, not a shared subchannel
        return a;
      }()));
  std::printf("%-9s %7s %7s %6s %6s %8s %8s %9s %9s %9s %9s %9s %9s\n", "phase", "clients", "stalled", "ok",
              "failed", "tokens", "wall s", "tok/s", "ttft p50", "ttft p99", "gap p50", "gap p99", "slowest s");
  bool all_ok = true;
  nlohmann::json phases = nlohmann::json::array();
  phases.push_back(RunPhase("alone", *stub, *stalled_stub, o, 1, 0, &all_ok));
  phases.push_back(RunPhase("together", *stub, *stalled_stub, o, o.clients, 0, &all_ok));
  if (o.stalled > 0) phases.push_back(RunPhase("stalled", *stub, *stalled_stub, o, o.clients, o.stalled, &all_ok));
  const nlohmann::json alone = phases[0];
  const nlohmann::json together = phases[1];
  const double speedup = together["tokens_per_s"].get<double>() / alone["tokens_per_s"].get<double>();
  std::printf("aggregate tokens/s, %d clients vs one: %.2fx\n", o.clients, speedup);
  if (o.stalled > 0) {
    std::printf("inter-token p50 with %d stalled client(s) vs without: %.2fx\n", o.stalled,
                phases[2]["inter_token_ms_p50"].get<double>() / std::max(1e-9, together["inter_token_ms_p50"].get<double>()));
  }
  nlohmann::json overhead;
  if (!o.via_gateway.empty()) {
    const size_t colon = o.via_gateway.rfind(':');
    if (colon == std::string::npos) {
      std::fprintf(stderr, "tkv_load_test: --via-gateway wants host:port\n");
      return 2;
    }
    const std::string host = o.via_gateway.substr(0, colon), port = o.via_gateway.substr(colon + 1);
    const std::function<RequestStats(int)> http = [&](int index) { return RunOneHttp(host, port, o, index); };
    const nlohmann::json g_alone = RunPhase("gw-alone", *stub, *stalled_stub, o, 1, 0, &all_ok, &http);
    const nlohmann::json g_together = RunPhase("gw-togeth", *stub, *stalled_stub, o, o.clients, 0, &all_ok, &http);
    phases.push_back(g_alone);
    phases.push_back(g_together);
    for (const auto& [label, direct, via] : {std::tuple{"alone", alone, g_alone}, std::tuple{"together", together, g_together}}) {
      const double dt = via["ttft_ms_p50"].get<double>() - direct["ttft_ms_p50"].get<double>();
      const double dg = via["inter_token_ms_p50"].get<double>() - direct["inter_token_ms_p50"].get<double>();
      const double dr = via["request_ms_p50"].get<double>() - direct["request_ms_p50"].get<double>();
      std::printf("gateway added (%s, p50): ttft %+.2f ms, per token %+.3f ms, per request %+.2f ms\n", label, dt, dg,
                  dr);
      overhead[label] = {{"ttft_ms_p50", dt}, {"inter_token_ms_p50", dg}, {"request_ms_p50", dr}};
    }
  }
  if (!o.out.empty()) {
    nlohmann::json j = {{"server", o.server},
                        {"via_gateway", o.via_gateway},
                        {"gateway_added", overhead},
                        {"max_tokens", o.max_tokens},
                        {"requests_per_client", o.requests},
                        {"prompt_words", {o.min_words, o.max_words}},
                        {"phases", phases},
                        {"speedup_vs_one_client", speedup}};
    std::ofstream(o.out) << j.dump(2) << "\n";
  }
  return all_ok ? 0 : 1;
}
