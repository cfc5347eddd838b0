// tailorkv-cli: a client for the tailorkv services.
//
//   tailorkv-cli generate --server ADDR --prompt TEXT [--chat] [sampling flags]
//       streams the generated text to stdout as it arrives, then usage and
//       timings to stderr; with --http URL the same through a gateway's
//       OpenAI-compatible HTTP API (--api-key; https:// verified with --tls-ca).
//   tailorkv-cli info --server ADDR        model, backend, KV plan and the KV
//       bytes of one full-context sequence (per policy; --layers: per layer)
//   tailorkv-cli load --server ADDR        queued/active requests and the KV
//       bytes the running generations hold (per policy; --layers: per layer)
//   tailorkv-cli abort --server ADDR --request-id ID
//   tailorkv-cli health --server ADDR [--service NAME] [--wait-seconds N]
//       exit 0 when SERVING (a grpc_health_probe replacement).
//   tailorkv-cli kv-host stats --server ADDR   kv-host's budget and bytes
//       per worker and session
//
// Exit codes: 0 success; 1 the RPC failed (the gRPC status code and message
// are printed); 2 bad command line; 3 health check answered but not SERVING.
#include <sys/socket.h>

#include <fstream>
#include <utility>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <nlohmann/json.hpp>
#include <iterator>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include "absl/strings/match.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/health_client.h"
#include "tailorkv/v1/generation.grpc.pb.h"
#include "tailorkv/v1/kv_host.grpc.pb.h"

namespace {

namespace v1 = tailorkv::v1;

const char* CodeName(int code) {
  static const char* kNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT",
                                 "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                                 "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                 "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
                                 "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                                 "UNAUTHENTICATED"};
  return code >= 0 && code <= 16 ? kNames[code] : "UNKNOWN";
}

int Fail(const std::string& what, const std::string& server, const grpc::Status& status) {
  std::fprintf(stderr, "tailorkv-cli: %s on %s failed: %s (code %d): %s\n", what.c_str(),
               server.c_str(), CodeName(status.error_code()), status.error_code(),
               status.error_message().empty() ? "(no message)" : status.error_message().c_str());
  return 1;
}

const char* FinishName(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_STOP: return "stop";
    case v1::FINISH_REASON_LENGTH: return "length";
    case v1::FINISH_REASON_CANCELLED: return "cancelled";
    default: return "unspecified";
  }
}

// --tls-ca: PEM root certificates; the services are then reached over TLS.
std::string g_tls_ca;

std::shared_ptr<grpc::Channel> Connect(const std::string& server) {
  if (g_tls_ca.empty()) return grpc::CreateChannel(server, grpc::InsecureChannelCredentials());
  std::ifstream in(g_tls_ca, std::ios::binary);
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return grpc::CreateChannel(server, grpc::SslCredentials(ssl));
}

void SetDeadline(grpc::ClientContext& context, double seconds) {
  if (seconds > 0) {
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(seconds)));
  }
}

struct GenerateFlags {
  std::string prompt;
  bool chat = true;
  std::string system;
  std::string request_id;
  std::optional<int> max_tokens;
  std::optional<float> temperature, top_p, repetition_penalty;
  std::optional<int> top_k;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  std::string api_key;  // a gateway's --api-key (HTTP header or gRPC metadata)
};

int RunGenerate(const std::string& server, double timeout_s, const GenerateFlags& f) {
  v1::GenerateRequest request;
  request.set_request_id(f.request_id);
  if (f.chat) {
    if (!f.system.empty()) {
      auto* m = request.mutable_chat()->add_messages();
      m->set_role(v1::ROLE_SYSTEM);
      m->set_content(f.system);
    }
    auto* m = request.mutable_chat()->add_messages();
    m->set_role(v1::ROLE_USER);
    m->set_content(f.prompt);
  } else {
    request.set_text(f.prompt);
  }
  v1::SamplingParams* s = request.mutable_sampling();
  if (f.max_tokens) s->set_max_tokens(*f.max_tokens);
  if (f.temperature) s->set_temperature(*f.temperature);
  if (f.top_p) s->set_top_p(*f.top_p);
  if (f.top_k) s->set_top_k(*f.top_k);
  if (f.repetition_penalty) s->set_repetition_penalty(*f.repetition_penalty);
  if (f.seed) s->set_seed(*f.seed);
  for (const std::string& stop : f.stop) s->add_stop(stop);

  auto stub = v1::Generation::NewStub(Connect(server));
  grpc::ClientContext context;
  SetDeadline(context, timeout_s);
  if (!f.api_key.empty()) context.AddMetadata("authorization", "Bearer " + f.api_key);
  const absl::Time start = absl::Now();
  std::optional<absl::Time> first_token;
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  std::optional<v1::GenerateFinal> final;
  while (reader->Read(&response)) {
    if (response.has_chunk()) {
      if (!first_token) first_token = absl::Now();
      std::fwrite(response.chunk().text().data(), 1, response.chunk().text().size(), stdout);
      std::fflush(stdout);
    } else if (response.has_final()) {
      final = response.final();
    }
  }
  const grpc::Status status = reader->Finish();
  std::fputc('\n', stdout);
  std::fflush(stdout);
  if (!status.ok()) return Fail("Generate", server, status);
  if (final) {
    const auto& u = final->usage();
    const auto& t = final->timings();
    std::fprintf(stderr,
                 "[finish=%s prompt_tokens=%d completion_tokens=%d queue=%.1fms "
                 "prefill=%.1fms decode=%.1fms %.1f tok/s ttft(client)=%.1fms]\n",
                 FinishName(final->finish_reason()), u.prompt_tokens(), u.completion_tokens(),
                 t.queue_ms(), t.prefill_ms(), t.decode_ms(), t.decode_tokens_per_second(),
                 first_token ? absl::ToDoubleMilliseconds(*first_token - start) : 0.0);
  }
  return 0;
}

// The same generation through a gateway's OpenAI-compatible HTTP API
// (http[s]://host:port), streamed as server-sent events; text to stdout,
// usage to stderr. HTTPS verifies the server against --tls-ca (else the
// system's roots).
int RunGenerateHttp(const std::string& url, const std::string& api_key, double timeout_s, const GenerateFlags& f) {
  namespace asio = boost::asio;
  namespace beast = boost::beast;
  namespace http = beast::http;
  auto fail = [&](const std::string& why) {
    std::fprintf(stderr, "tailorkv-cli: %s: %s\n", url.c_str(), why.c_str());
    return 1;
  };
  const bool https = absl::StartsWith(url, "https://");
  if (!https && !absl::StartsWith(url, "http://")) return fail("--http wants http://host:port or https://host:port");
  std::string hostport = url.substr(https ? 8 : 7);
  if (const size_t slash = hostport.find('/'); slash != std::string::npos) hostport.resize(slash);
  const size_t colon = hostport.rfind(':');
  const std::string host = colon == std::string::npos ? hostport : hostport.substr(0, colon);
  const std::string port = colon == std::string::npos ? (https ? "443" : "80") : hostport.substr(colon + 1);
  if (f.top_k || f.repetition_penalty) return fail("--top-k and --repetition-penalty are not in the OpenAI API (use gRPC)");
  nlohmann::json body = {{"model", "tailorkv"}, {"stream", true}, {"stream_options", {{"include_usage", true}}}};
  if (f.chat) {
    nlohmann::json messages = nlohmann::json::array();
    if (!f.system.empty()) messages.push_back({{"role", "system"}, {"content", f.system}});
    messages.push_back({{"role", "user"}, {"content", f.prompt}});
    body["messages"] = messages;
  } else {
    body["prompt"] = f.prompt;
  }
  if (f.max_tokens) body["max_tokens"] = *f.max_tokens;
  // Greedy unless asked, as over gRPC (OpenAI's own default is 1).
  body["temperature"] = f.temperature ? *f.temperature : 0.0f;
  if (f.top_p) body["top_p"] = *f.top_p;
  if (f.seed) body["seed"] = *f.seed;
  if (!f.stop.empty()) body["stop"] = f.stop;
  http::request<http::string_body> req{http::verb::post, f.chat ? "/v1/chat/completions" : "/v1/completions", 11};
  req.set(http::field::host, host);
  req.set(http::field::content_type, "application/json");
  if (!api_key.empty()) req.set(http::field::authorization, "Bearer " + api_key);
  req.body() = body.dump();
  req.prepare_payload();
  try {
    asio::io_context ioc;
    asio::ip::tcp::socket sock(ioc);
    asio::connect(sock, asio::ip::tcp::resolver(ioc).resolve(host, port));
    if (timeout_s > 0) {
      struct timeval tv = {static_cast<time_t>(timeout_s), 0};
      setsockopt(sock.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    }
    asio::ssl::context ctx(asio::ssl::context::tls_client);
    std::unique_ptr<asio::ssl::stream<asio::ip::tcp::socket&>> tls;
    if (https) {
      ctx.set_verify_mode(asio::ssl::verify_peer);
      if (!g_tls_ca.empty()) {
        ctx.load_verify_file(g_tls_ca);
      } else {
        ctx.set_default_verify_paths();
      }
      tls = std::make_unique<asio::ssl::stream<asio::ip::tcp::socket&>>(sock, ctx);
      SSL_set_tlsext_host_name(tls->native_handle(), host.c_str());
      tls->set_verify_callback(asio::ssl::host_name_verification(host));
      tls->handshake(asio::ssl::stream_base::client);
    }
    auto io = [&](auto&& fn) { return tls ? fn(*tls) : fn(sock); };
    io([&](auto& s) { http::write(s, req); });
    beast::flat_buffer buf;
    http::response_parser<http::buffer_body> parser;
    parser.body_limit(std::uint64_t{1} << 40);
    io([&](auto& s) { http::read_header(s, buf, parser); });
    if (parser.get().result() != http::status::ok) {
      // An error object: read it whole and show its message.
      http::response_parser<http::string_body> whole{std::move(parser)};
      whole.body_limit(std::uint64_t{1} << 20);
      beast::error_code ec;
      io([&](auto& s) { http::read(s, buf, whole, ec); });
      const nlohmann::json j = nlohmann::json::parse(whole.get().body(), nullptr, false);
      const std::string msg = !j.is_discarded() && j.contains("error") ? j["error"].value("message", whole.get().body())
                                                                       : whole.get().body();
      return fail(absl::StrCat("HTTP ", whole.get().result_int(), ": ", msg));
    }
    std::string pending, usage;
    const bool ok_status = true;
    char data[16384];
    bool done = false;
    while (!parser.is_done() && !done) {
      parser.get().body().data = data;
      parser.get().body().size = sizeof(data);
      beast::error_code ec;
      io([&](auto& s) { http::read_some(s, buf, parser, ec); });
      if (ec == http::error::need_buffer) ec = {};
      if (ec) return fail(ec.message());
      pending.append(data, sizeof(data) - parser.get().body().size);
      if (!ok_status) continue;
      for (size_t end; (end = pending.find("\n\n")) != std::string::npos;) {
        const std::string event = pending.substr(0, end);
        pending.erase(0, end + 2);
        if (event == "data: [DONE]") {
          done = true;
          break;
        }
        if (event.rfind("data: ", 0) != 0) continue;
        const nlohmann::json j = nlohmann::json::parse(event.substr(6), nullptr, false);
        if (j.is_discarded()) continue;
        if (j.contains("error")) return fail(j["error"].value("message", "error"));
        if (j.contains("usage") && j["usage"].is_object()) usage = j["usage"].dump();
        for (const auto& choice : j.value("choices", nlohmann::json::array())) {
          const std::string text = f.chat ? choice["delta"].value("content", "") : choice.value("text", "");
          std::fwrite(text.data(), 1, text.size(), stdout);
          std::fflush(stdout);
        }
      }
    }
    if (!ok_status) {
      return fail(absl::StrCat("HTTP ", parser.get().result_int(), ": ", pending));
    }
    std::fputc('\n', stdout);
    std::fprintf(stderr, "[usage %s]\n", usage.c_str());
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

std::string Bytes(int64_t n) {
  if (n >= (1LL << 30)) return absl::StrFormat("%.2f GiB", n / double(1LL << 30));
  if (n >= (1LL << 20)) return absl::StrFormat("%.1f MiB", n / double(1LL << 20));
  if (n >= (1LL << 10)) return absl::StrFormat("%.1f KiB", n / double(1LL << 10));
  return absl::StrFormat("%d B", n);
}

std::string DeviceHost(int64_t device, int64_t host) {
  return host > 0 ? absl::StrFormat("%s device + %s host", Bytes(device), Bytes(host))
                  : Bytes(device);
}

std::string LayerPolicyText(const v1::KvLayerPolicy& l) {
  if (l.policy() == "quant") {
    return absl::StrFormat("quant bits=%d group=%d residual=%d", l.bits(), l.group(), l.residual());
  }
  if (l.policy() == "window") return absl::StrFormat("window sink=%d recent=%d", l.sink(), l.recent());
  if (l.policy() == "sparse") {
    return absl::StrFormat("sparse sink=%d recent=%d top_k=%d channels=%d index=%s", l.sink(),
                           l.recent(), l.top_k(), l.channels(), l.index());
  }
  return l.policy();
}

// KV bytes per policy, then (when `layers`) per layer with its policy's parameters.
void PrintKvMemory(const v1::KvMemory& kv, const v1::KvPlanInfo* plan, bool layers) {
  std::printf("  total:        %s\n", DeviceHost(kv.device_bytes(), kv.host_bytes()).c_str());
  for (const v1::PolicyKvMemory& p : kv.policies()) {
    std::printf("  %-13s %s (%d layers)\n", (p.policy() + ":").c_str(),
                DeviceHost(p.device_bytes(), p.host_bytes()).c_str(), p.layers());
  }
  if (!layers) return;
  for (const v1::LayerKvMemory& l : kv.layers()) {
    const bool described = plan != nullptr && l.layer() >= 0 && l.layer() < plan->layers_size();
    std::printf("  layer %3d     %-12s %s\n", l.layer(),
                DeviceHost(l.device_bytes(), l.host_bytes()).c_str(),
                described ? LayerPolicyText(plan->layers(l.layer())).c_str() : l.policy().c_str());
  }
}

int RunInfo(const std::string& server, double timeout_s, bool layers) {
  auto stub = v1::Generation::NewStub(Connect(server));
  grpc::ClientContext context;
  SetDeadline(context, timeout_s);
  v1::ModelInfo info;
  const grpc::Status status = stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
  if (!status.ok()) return Fail("GetModelInfo", server, status);
  std::printf(
      "model:          %s\narch:           %s\npath:           %s\ndigest:         %s\n"
      "layers:         %d\nhidden:         %d\nheads:          %d (kv %d, head dim %d)\n"
      "vocab:          %d\ncontext:        %d (trained %d)\nbackend:        %s\n"
      "chat template:  %s\n",
      info.name().c_str(), info.arch().c_str(), info.model_path().c_str(),
      info.model_digest().empty() ? "(not computed)" : info.model_digest().c_str(),
      info.n_layers(), info.hidden(), info.n_heads(), info.n_kv_heads(), info.head_dim(),
      info.vocab_size(), info.max_context(), info.trained_context(), info.backend().c_str(),
      info.chat_template().c_str());
  std::printf("kv plan:        %s: %s\n", info.kv_plan().name().c_str(),
              info.kv_plan().summary().c_str());
  std::printf("kv per sequence of %lld tokens:\n",
              static_cast<long long>(info.kv_per_sequence().capacity_tokens()));
  PrintKvMemory(info.kv_per_sequence(), &info.kv_plan(), layers);
  return 0;
}

int RunLoad(const std::string& server, double timeout_s, bool layers) {
  auto stub = v1::Generation::NewStub(Connect(server));
  grpc::ClientContext context;
  SetDeadline(context, timeout_s);
  v1::Load load;
  const grpc::Status status = stub->GetLoad(&context, v1::GetLoadRequest(), &load);
  if (!status.ok()) return Fail("GetLoad", server, status);
  std::printf("active=%d queued=%d max_queue=%d draining=%s\n", load.active_requests(),
              load.queued_requests(), load.max_queue(), load.draining() ? "yes" : "no");
  std::printf("engine: running=%d (max %d) waiting_for_memory=%d kv_budget=%s admitted=%.1f MiB\n",
              load.engine_running(), load.max_running(), load.engine_waiting(),
              load.kv_budget_bytes() > 0 ? absl::StrFormat("%.1f MiB", load.kv_budget_bytes() / 1048576.0).c_str()
                                         : "none",
              load.kv_admitted_bytes() / 1048576.0);
  std::printf("kv in use (%d sequences, %lld tokens of capacity):\n", load.kv_in_use().sequences(),
              static_cast<long long>(load.kv_in_use().capacity_tokens()));
  PrintKvMemory(load.kv_in_use(), nullptr, layers);
  return 0;
}

int RunAbort(const std::string& server, double timeout_s, const std::string& request_id) {
  auto stub = v1::Generation::NewStub(Connect(server));
  grpc::ClientContext context;
  SetDeadline(context, timeout_s);
  v1::AbortRequest request;
  request.set_request_id(request_id);
  v1::AbortResponse response;
  const grpc::Status status = stub->Abort(&context, request, &response);
  if (!status.ok()) return Fail("Abort", server, status);
  std::printf("aborted %s\n", request_id.c_str());
  return 0;
}

int RunKvHostStats(const std::string& server, double timeout_s) {
  auto stub = v1::KvHost::NewStub(Connect(server));
  grpc::ClientContext context;
  SetDeadline(context, timeout_s);
  v1::KvHostStats st;
  const grpc::Status status = stub->GetStats(&context, v1::GetStatsRequest(), &st);
  if (!status.ok()) return Fail("GetStats", server, status);
  std::printf("budget:   %s (%s)%s\n", Bytes(st.budget_bytes()).c_str(), st.budget_source().c_str(),
              st.draining() ? ", draining" : "");
  std::printf("used:     %s in %d arenas, %d workers attached\n", Bytes(st.used_bytes()).c_str(), st.arenas(),
              st.attached_workers());
  for (const v1::WorkerStats& w : st.workers()) {
    std::printf("worker %s (pid %u): %s of arenas, %s reserved, %d sessions\n", w.worker_id().c_str(), w.pid(),
                Bytes(w.arena_bytes()).c_str(), Bytes(w.reserved_bytes()).c_str(), w.sessions_size());
    for (const v1::SessionStats& s : w.sessions()) {
      std::printf("  session %-28s %s in %d slices\n", s.session_id().c_str(), Bytes(s.reserved_bytes()).c_str(),
                  s.slices());
    }
  }
  return 0;
}

int RunHealth(const std::string& server, const std::string& service, double wait_seconds) {
  auto status = tailorkv::common::WaitForServing(Connect(server), service,
                                                 absl::Seconds(std::max(0.0, wait_seconds)));
  const std::string name = service.empty() ? "(server)" : service;
  if (!status.ok()) {
    std::fprintf(stderr, "tailorkv-cli: health check of %s on %s failed: %s (code %d): %s\n",
                 name.c_str(), server.c_str(),
                 CodeName(static_cast<int>(status.status().code())),
                 static_cast<int>(status.status().code()),
                 std::string(status.status().message()).c_str());
    return 1;
  }
  const std::string word = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(*status);
  std::printf("%s %s: %s\n", server.c_str(), name.c_str(), word.c_str());
  return *status == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 3;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tailorkv-cli: client for tailorkv gRPC services"};
  app.require_subcommand(1);
  std::string server = "127.0.0.1:50051";
  double timeout_s = 0;
  app.add_option("--server", server, "host:port of the service")->capture_default_str();
  app.add_option("--timeout", timeout_s, "call deadline in seconds (0 = none)")
      ->capture_default_str();
  app.add_option("--tls-ca", g_tls_ca, "PEM root certificate(s): connect over TLS (services started with --tls-cert)")
      ->check(CLI::ExistingFile);

  GenerateFlags gen;
  CLI::App* generate = app.add_subcommand("generate", "stream a generation to stdout");
  generate->add_option("--server", server, "host:port of the gpu-worker");
  generate->add_option("--timeout", timeout_s, "call deadline in seconds (0 = none)");
  generate->add_option("--tls-ca", g_tls_ca, "PEM root certificate(s): connect over TLS")->check(CLI::ExistingFile);
  generate->add_option("--prompt", gen.prompt, "prompt text")->required();
  generate->add_flag("--chat,!--raw", gen.chat,
                     "apply the model's chat template (default); --raw sends the text as-is");
  generate->add_option("--system", gen.system, "system message (chat mode)");
  generate->add_option("--request-id", gen.request_id, "id for abort and logs");
  generate->add_option("--max-tokens", gen.max_tokens, "tokens to generate");
  generate->add_option("--temperature", gen.temperature, "0 = greedy");
  generate->add_option("--top-p", gen.top_p, "nucleus sampling, (0, 1]");
  generate->add_option("--top-k", gen.top_k, "0 = off");
  generate->add_option("--seed", gen.seed, "sampling seed");
  generate->add_option("--repetition-penalty", gen.repetition_penalty, "1 = off");
  generate->add_option("--stop", gen.stop, "stop string (repeatable)");
  std::string http_url;
  if (const char* k = std::getenv("TAILORKV_API_KEY"); k != nullptr) gen.api_key = k;
  generate->add_option("--http", http_url,
                       "a gateway's OpenAI-compatible HTTP API (http://host:port or https://...) instead of gRPC");
  generate->add_option("--api-key", gen.api_key, "a gateway's API key, sent over HTTP or gRPC (or env TAILORKV_API_KEY)");

  bool per_layer = false;
  CLI::App* info = app.add_subcommand(
      "info", "describe the worker's model, KV plan and KV bytes per full-context sequence");
  info->add_option("--server", server, "host:port of the gpu-worker");
  info->add_flag("--layers", per_layer, "also list each layer's policy and KV bytes");
  CLI::App* load = app.add_subcommand(
      "load", "queued and active requests of a worker and the KV bytes they hold");
  load->add_option("--server", server, "host:port of the gpu-worker");
  load->add_option("--tls-ca", g_tls_ca, "PEM root certificate(s): connect over TLS")->check(CLI::ExistingFile);
  load->add_flag("--layers", per_layer, "also list the KV bytes per layer");
  std::string abort_id;
  CLI::App* abort = app.add_subcommand("abort", "stop a request by its request id");
  abort->add_option("--server", server, "host:port of the gpu-worker");
  abort->add_option("--request-id", abort_id, "the request's id")->required();

  std::string health_service;
  double wait_seconds = 0;
  CLI::App* health = app.add_subcommand("health", "grpc.health.v1 check; exit 0 when SERVING");
  health->add_option("--server", server, "host:port of any tailorkv service");
  health->add_option("--service", health_service, "service name ('' = the whole server)");
  health->add_option("--wait-seconds", wait_seconds, "retry until SERVING for this long");

  CLI::App* kvhost = app.add_subcommand("kv-host", "the kv-host daemon");
  CLI::App* kvhost_stats = kvhost->add_subcommand("stats", "budget, bytes used, per worker and per session");
  kvhost->require_subcommand(1);
  kvhost_stats->add_option("--server", server, "kv-host's control plane (unix:///path/kv-host.sock or host:port)");

  CLI11_PARSE(app, argc, argv);

  if (*generate) {
    return http_url.empty() ? RunGenerate(server, timeout_s, gen) : RunGenerateHttp(http_url, gen.api_key, timeout_s, gen);
  }
  if (*info) return RunInfo(server, timeout_s, per_layer);
  if (*load) return RunLoad(server, timeout_s, per_layer);
  if (*abort) return RunAbort(server, timeout_s, abort_id);
  if (*health) return RunHealth(server, health_service, wait_seconds);
  if (*kvhost_stats) return RunKvHostStats(server, timeout_s);
  return 2;
}
