// Fuzz target: what a remote worker sends kv-host's data plane
// (kv-host/daemon/data_service.h): frames on the rows channel
// (kv-host/store/rows_channel.h, decoded by the node's connection thread)
// and the gRPC requests Gather / Write / Reserve, against a real service
// holding one worker with two slices. The rows channel is a real TCP
// connection on loopback; gRPC goes through an in-process channel.
//
// Input: byte 0 picks the path:
//   0 rows channel after a valid hello (fresh ticket): the rest is frames;
//   1 rows channel from the first byte (hello included: the rest as is);
//   2 gRPC Gather, 3 gRPC Write, 4 gRPC Reserve (then CloseSession of the
//     same session, so the node's memory stays bounded): the rest is the
//     request serialized; byte 0 bit 3 keeps its worker_key instead of
//     putting the worker's in.
// Invariants: the node answers every frame with a well-formed response
// (request id echoed, no data with an error, data within the limit) or
// closes the connection; the RPCs fail only with the documented codes.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "daemon/data_service.h"
#include "fuzz_util.h"
#include "spdlog/spdlog.h"
#include "store/remote_rows.h"
#include "store/rows_channel.h"
#include "tailorkv/v1/kv_host_data.grpc.pb.h"

namespace kh = tailorkv::kvhost;
namespace v1 = tailorkv::v1;
namespace rows = tailorkv::kvhost::rows;

namespace {

constexpr char kToken[] = "fuzz-token";
std::atomic<uint64_t> g_used{0};
uint64_t g_budget = uint64_t{64} << 20;
std::unique_ptr<kh::KvHostDataService> g_service;
std::unique_ptr<grpc::Server> g_server;
std::unique_ptr<v1::KvHostData::Stub> g_stub;
std::string g_key;
uint64_t g_session_counter = 0;

void Authorize(grpc::ClientContext& ctx) {
  ctx.AddMetadata("authorization", std::string("Bearer ") + kToken);
}

bool Ok(grpc::StatusCode c, std::initializer_list<grpc::StatusCode> allowed) {
  for (auto a : allowed) {
    if (c == a) return true;
  }
  return false;
}

// recv / send that go on after EINTR: libFuzzer's -timeout watchdog is a
// periodic SIGALRM, and socket calls with SO_RCVTIMEO are never restarted.
ssize_t Recv(int fd, char* buf, size_t n) {
  while (true) {
    const ssize_t r = ::recv(fd, buf, n, 0);
    if (r >= 0 || errno != EINTR) return r;
  }
}

// Exactly n bytes; false when the node closed first or 5 s passed.
bool RecvExactly(int fd, char* buf, size_t n) {
  while (n > 0) {
    const ssize_t r = Recv(fd, buf, n);
    if (r <= 0) return false;
    buf += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// All the node sends until it closes the connection (5 s timeout per read).
// *reset: it closed with our bytes unread (a bad frame), which TCP reports
// as a reset; what it sent last may then be lost.
std::string ReadToEof(int fd, bool* reset) {
  std::string out;
  char buf[65536];
  *reset = false;
  while (true) {
    const ssize_t n = Recv(fd, buf, sizeof(buf));
    if (n < 0 && errno == ECONNRESET) {
      *reset = true;
      break;
    }
    FUZZ_CHECK(n >= 0, "recv: %s (the node neither answered nor closed)", strerror(errno));
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

int Connect() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  FUZZ_CHECK(fd >= 0, "socket");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(g_service->rows_port()));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    // Interrupted (libFuzzer's SIGALRM): the connection goes on; wait for it.
    FUZZ_CHECK(errno == EINTR, "connect: %s", strerror(errno));
    pollfd p{fd, POLLOUT, 0};
    while (::poll(&p, 1, 5000) < 0 && errno == EINTR) {
    }
    int err = 0;
    socklen_t len = sizeof(err);
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    FUZZ_CHECK(err == 0, "connect: %s", strerror(err));
  }
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  return fd;
}

void SendAll(int fd, const std::string& bytes) {
  size_t at = 0;
  while (at < bytes.size()) {
    const ssize_t n = ::send(fd, bytes.data() + at, bytes.size() - at, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the node closed first (a bad frame): fine
    at += static_cast<size_t>(n);
  }
}

// Frames after a valid hello: every complete response must be well formed.
void RowsChannel(const std::string& frames, bool with_hello) {
  const int fd = Connect();
  if (with_hello) {
    grpc::ClientContext ctx;
    Authorize(ctx);
    v1::DataTicketRequest req;
    req.set_worker_key(g_key);
    v1::DataTicketResponse resp;
    const grpc::Status st = g_stub->Ticket(&ctx, req, &resp);
    FUZZ_CHECK(st.ok() && resp.ticket().size() == rows::kTicketBytes, "Ticket: %s",
               st.error_message().c_str());
    std::string hello;
    rows::Put32(hello, rows::kMagic);
    rows::Put32(hello, rows::kVersion);
    hello += resp.ticket();
    SendAll(fd, hello);
    char welcome[8];
    FUZZ_CHECK(RecvExactly(fd, welcome, 8), "no welcome: %s", strerror(errno));
    FUZZ_CHECK(rows::Get32(welcome) == 0 && rows::Get32(welcome + 4) == 0, "hello refused");
  }
  SendAll(fd, frames);
  ::shutdown(fd, SHUT_WR);
  bool reset = false;
  const std::string got = ReadToEof(fd, &reset);
  ::close(fd);
  if (!with_hello) return;  // the welcome's shape depends on the bytes sent
  // Responses: request_id u64, code u32, msg_len u32, data_len u64, msg, data.
  size_t at = 0;
  while (got.size() - at >= 24) {
    const char* p = got.data() + at;
    const uint32_t code = rows::Get32(p + 8), msg_len = rows::Get32(p + 12);
    const uint64_t data_len = rows::Get64(p + 16);
    FUZZ_CHECK(code <= 16, "status code %u", code);
    FUZZ_CHECK(code == 0 || data_len == 0, "data with error %u", code);
    FUZZ_CHECK(data_len <= kh::kMaxGatherBytes, "%llu bytes of rows",
               static_cast<unsigned long long>(data_len));
    if (got.size() - at - 24 < msg_len + data_len) break;  // cut short (checked below)
    at += 24 + msg_len + data_len;
  }
  // The node writes each response whole before it reads the next frame, so
  // a connection it closed cleanly ends on a response boundary.
  FUZZ_CHECK(reset || at == got.size(), "%zu bytes of a truncated response", got.size() - at);
}

void Gather(v1::DataGatherRequest req) {
  grpc::ClientContext ctx;
  Authorize(ctx);
  auto stream = g_stub->Gather(&ctx);
  stream->Write(req);
  stream->WritesDone();
  v1::DataGatherResponse resp;
  while (stream->Read(&resp)) {
    FUZZ_CHECK(resp.request_id() == req.request_id(), "request_id not echoed");
  }
  const grpc::Status st = stream->Finish();
  FUZZ_CHECK(Ok(st.error_code(), {grpc::StatusCode::OK, grpc::StatusCode::INVALID_ARGUMENT,
                                  grpc::StatusCode::NOT_FOUND, grpc::StatusCode::OUT_OF_RANGE,
                                  grpc::StatusCode::UNAUTHENTICATED}),
             "Gather: %d %s", static_cast<int>(st.error_code()), st.error_message().c_str());
}

void Write(const v1::DataWriteChunk& chunk) {
  grpc::ClientContext ctx;
  Authorize(ctx);
  v1::DataWriteResponse resp;
  auto w = g_stub->Write(&ctx, &resp);
  w->Write(chunk);
  w->WritesDone();
  const grpc::Status st = w->Finish();
  FUZZ_CHECK(Ok(st.error_code(), {grpc::StatusCode::OK, grpc::StatusCode::INVALID_ARGUMENT,
                                  grpc::StatusCode::NOT_FOUND, grpc::StatusCode::OUT_OF_RANGE,
                                  grpc::StatusCode::UNAUTHENTICATED}),
             "Write: %d %s", static_cast<int>(st.error_code()), st.error_message().c_str());
  if (st.ok()) FUZZ_CHECK(resp.bytes_written() == static_cast<int64_t>(chunk.data().size()), "written");
}

void Reserve(v1::DataReserveRequest req) {
  // The seeded session stays as it is; any other is closed again below.
  if (req.session_id() == "s1") req.set_session_id("fz" + std::to_string(g_session_counter++));
  grpc::Status st;
  v1::DataReserveResponse resp;
  {
    grpc::ClientContext ctx;
    Authorize(ctx);
    st = g_stub->Reserve(&ctx, req, &resp);
  }
  FUZZ_CHECK(Ok(st.error_code(), {grpc::StatusCode::OK, grpc::StatusCode::INVALID_ARGUMENT,
                                  grpc::StatusCode::RESOURCE_EXHAUSTED,
                                  grpc::StatusCode::UNAUTHENTICATED}),
             "Reserve: %d %s", static_cast<int>(st.error_code()), st.error_message().c_str());
  if (st.ok()) FUZZ_CHECK(resp.slice_ids_size() == req.sizes_size(), "slice ids");
  grpc::ClientContext ctx;
  Authorize(ctx);
  v1::DataCloseSessionRequest close;
  close.set_worker_key(g_key);
  close.set_session_id(req.session_id());
  v1::DataCloseSessionResponse closed;
  const grpc::Status cs = g_stub->CloseSession(&ctx, close, &closed);
  FUZZ_CHECK(cs.ok() || cs.error_code() == grpc::StatusCode::NOT_FOUND, "CloseSession: %s",
             cs.error_message().c_str());
  FUZZ_CHECK(!st.ok() || cs.ok(), "reserved session not found at close");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);  // a line per refused frame otherwise
  kh::KvHostDataOptions o;
  o.token = kToken;
  o.budget_bytes = g_budget;
  o.take_budget = [](uint64_t bytes, const std::string& what) {
    if (g_used.fetch_add(bytes) + bytes > g_budget) {
      g_used.fetch_sub(bytes);
      return absl::ResourceExhaustedError("budget: " + what);
    }
    return absl::OkStatus();
  };
  o.return_budget = [](uint64_t bytes) { g_used.fetch_sub(bytes); };
  o.free_bytes = [] { return g_budget - g_used.load(); };
  o.arena_bytes = uint64_t{4} << 20;
  o.lease = absl::Hours(24);
  o.arena.huge_pages = false;
  o.rows_listen = "127.0.0.1:0";
  auto service = kh::KvHostDataService::Create(std::move(o));
  FUZZ_CHECK(service.ok(), "%s", service.status().ToString().c_str());
  g_service = *std::move(service);
  grpc::ServerBuilder builder;
  builder.RegisterService(g_service.get());
  builder.SetMaxReceiveMessageSize(-1);
  g_server = builder.BuildAndStart();
  FUZZ_CHECK(g_server != nullptr, "gRPC server");
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  g_stub = v1::KvHostData::NewStub(g_server->InProcessChannel(args));

  grpc::ClientContext open_ctx;
  Authorize(open_ctx);
  v1::DataOpenRequest open;
  open.set_worker_id("fuzz-worker");
  v1::DataOpenResponse opened;
  grpc::Status st = g_stub->Open(&open_ctx, open, &opened);
  FUZZ_CHECK(st.ok(), "Open: %s", st.error_message().c_str());
  g_key = opened.worker_key();
  // Slices 1 (4 KiB) and 2 (64 KiB) of session "s1", filled with a pattern.
  grpc::ClientContext res_ctx;
  Authorize(res_ctx);
  v1::DataReserveRequest res;
  res.set_worker_key(g_key);
  res.set_session_id("s1");
  res.add_sizes(4096);
  res.add_sizes(65536);
  v1::DataReserveResponse reserved;
  st = g_stub->Reserve(&res_ctx, res, &reserved);
  FUZZ_CHECK(st.ok() && reserved.slice_ids_size() == 2, "Reserve: %s", st.error_message().c_str());
  for (uint64_t id : reserved.slice_ids()) {
    v1::DataWriteChunk c;
    c.set_worker_key(g_key);
    c.set_slice_id(id);
    std::string pattern(id == reserved.slice_ids(0) ? 4096 : 65536, '\0');
    for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<char>(i * 7);
    c.set_data(pattern);
    Write(c);
  }
  std::atexit([] {
    g_stub.reset();
    if (g_server) g_server->Shutdown();
    g_server.reset();
    g_service.reset();
  });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tailorkv::fuzz::Reader in(data, size);
  const uint8_t mode = in.Byte();
  const bool keep_key = (mode & 8) != 0;
  const std::string rest = in.Rest();
  switch (mode % 8 % 5) {
    case 0: RowsChannel(rest, true); break;
    case 1: RowsChannel(rest, false); break;
    case 2: {
      v1::DataGatherRequest req;
      if (!req.ParseFromString(rest)) return 0;
      if (!keep_key) req.set_worker_key(g_key);
      Gather(req);
      break;
    }
    case 3: {
      v1::DataWriteChunk chunk;
      if (!chunk.ParseFromString(rest)) return 0;
      if (!keep_key) chunk.set_worker_key(g_key);
      Write(chunk);
      break;
    }
    case 4: {
      v1::DataReserveRequest req;
      if (!req.ParseFromString(rest)) return 0;
      if (!keep_key) req.set_worker_key(g_key);
      Reserve(req);
      break;
    }
  }
  return 0;
}
