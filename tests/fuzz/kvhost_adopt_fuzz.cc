// Fuzz target: the first message a co-located worker sends kv-host's fd
// channel (kv-host/daemon/kv_host_daemon.h): FdHello, or FdAdopt handing
// its live memfd arenas and slices to a restarted daemon, with the memfds
// attached (SCM_RIGHTS, kv-host/store/fd_channel.h). A real daemon, a real
// UNIX SOCK_SEQPACKET connection.
//
// Input: byte 0 = flags (bits 0-2: memfds to attach, up to 4; bit 3: keep
// the message's attach_id and nonce instead of a fresh Attach's; bit 4:
// send the bytes as they are instead of a parsed and re-serialized
// FdAdopt); one byte per memfd (bits 0-1 its size: 1, 4 or 16 pages, or a
// page and a byte; bit 2: left unsealed); the rest is the message.
// Invariants: the daemon welcomes only a hello with a fresh attach's nonce;
// whatever it refuses or adopts, once the connection closes every byte of
// the node's budget comes back and no worker stays attached.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "daemon/kv_host_daemon.h"
#include "fuzz_util.h"
#include "spdlog/spdlog.h"
#include "store/fd_channel.h"
#include "tailorkv/v1/kv_host.pb.h"

namespace kh = tailorkv::kvhost;
namespace v1 = tailorkv::v1;

namespace {

std::string g_dir;
std::unique_ptr<kh::KvHostDaemon> g_daemon;

kh::ScopedFd MakeMemfd(uint8_t code) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t sizes[] = {page, 4 * page, 16 * page, page + 1};
  kh::ScopedFd fd(::memfd_create("tkv-fuzz", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  FUZZ_CHECK(fd.valid(), "memfd_create");
  FUZZ_CHECK(::ftruncate(fd.get(), static_cast<off_t>(sizes[code & 3])) == 0, "ftruncate");
  if ((code & 4) == 0) (void)::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
  return fd;
}

// Waits until the daemon holds nothing (it detaches a worker when its
// connection closes, on its own thread).
bool Settled() {
  for (int i = 0; i < 2000; ++i) {
    const v1::KvHostStats s = g_daemon->Stats();
    if (s.attached_workers() == 0 && s.used_bytes() == 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);  // a line per refused hello otherwise
  std::string tmpl = std::filesystem::temp_directory_path().string() + "/tkv_fuzz_kvh_XXXXXX";
  FUZZ_CHECK(::mkdtemp(tmpl.data()) != nullptr, "mkdtemp");
  g_dir = tmpl;
  kh::KvHostDaemonOptions o;
  o.budget_bytes = uint64_t{64} << 20;
  o.worker_quota_bytes = uint64_t{16} << 20;
  o.arena_bytes = uint64_t{1} << 20;
  o.warm_bytes = 0;
  o.fd_socket_path = g_dir + "/kv.sock";
  // Attaches whose hello never comes (the input did not parse) stay pending
  // this long; short, so they never reach the daemon's limit of 1024.
  o.nonce_ttl = absl::Milliseconds(200);
  o.hello_timeout = absl::Seconds(2);
  o.send_timeout = absl::Milliseconds(50);  // FdAdopt's more_parts wait this long
  o.arena.huge_pages = false;
  auto d = kh::KvHostDaemon::Start(std::move(o));
  FUZZ_CHECK(d.ok(), "%s", d.status().ToString().c_str());
  g_daemon = *std::move(d);
  std::atexit([] {
    g_daemon.reset();
    std::filesystem::remove_all(g_dir);
  });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tailorkv::fuzz::Reader in(data, size);
  const uint8_t flags = in.Byte();
  const bool keep_auth = (flags & 8) != 0, raw = (flags & 16) != 0;
  std::vector<kh::ScopedFd> fds;
  for (int i = 0, n = (flags & 7) % 5; i < n; ++i) fds.push_back(MakeMemfd(in.Byte()));
  std::string payload = in.Rest();
  if (payload.size() > kh::kFdMessageMaxPayload) payload.resize(kh::kFdMessageMaxPayload);

  std::string nonce;
  if (!keep_auth) {
    v1::AttachRequest req;
    req.set_worker_id("fuzz-worker");
    v1::AttachResponse resp;
    grpc::Status st = g_daemon->Attach(nullptr, &req, &resp);
    if (st.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      // 1024 attaches pending: those of inputs that sent no usable hello
      // expire after nonce_ttl; wait for that once.
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
      st = g_daemon->Attach(nullptr, &req, &resp);
    }
    FUZZ_CHECK(st.ok(), "Attach: %s", st.error_message().c_str());
    nonce = resp.nonce();
    if (!raw) {
      v1::FdAdopt adopt;
      if (adopt.ParseFromString(payload)) {
        adopt.set_attach_id(resp.attach_id());
        adopt.set_nonce(resp.nonce());
        payload = adopt.SerializeAsString();
        if (payload.size() > kh::kFdMessageMaxPayload) return 0;
      }
    }
  }
  auto sock = kh::ConnectSeqpacket(g_dir + "/kv.sock");
  FUZZ_CHECK(sock.ok(), "%s", sock.status().ToString().c_str());
  std::vector<int> raw_fds;
  for (const kh::ScopedFd& f : fds) raw_fds.push_back(f.get());
  const absl::Status sent = kh::SendFdMessage(sock->get(), payload, raw_fds);
  FUZZ_CHECK(sent.ok(), "send: %s", sent.ToString().c_str());
  fds.clear();  // the daemon has its own copies now
  auto reply = kh::ReceiveFdMessage(sock->get(), absl::Seconds(5));
  v1::FdWelcome welcome;
  if (reply.ok() && welcome.ParseFromString(reply->payload) && welcome.worker_key().empty() &&
      !welcome.refused().empty()) {
    // A refusal says why, then the daemon closes.
    FUZZ_CHECK(welcome.refused_code() != 0, "a refusal without a status code: %s", welcome.refused().c_str());
    reply = kh::ReceiveFdMessage(sock->get(), absl::Seconds(5));
    FUZZ_CHECK(!reply.ok(), "a message after a refusal");
  }
  if (reply.ok()) {
    FUZZ_CHECK(welcome.ParseFromString(reply->payload) && !welcome.worker_key().empty(),
               "a reply that is not a welcome");
    v1::FdAdopt hello;
    FUZZ_CHECK(!keep_auth && hello.ParseFromString(payload) && hello.nonce() == nonce,
               "welcomed without a fresh attach's nonce");
    const v1::KvHostStats s = g_daemon->Stats();
    FUZZ_CHECK(s.attached_workers() == 1, "%d workers attached", s.attached_workers());
    FUZZ_CHECK(s.used_bytes() <= s.budget_bytes(), "over budget");
  } else {
    FUZZ_CHECK(reply.status().code() == absl::StatusCode::kUnavailable,
               "neither welcome nor close: %s", reply.status().ToString().c_str());
  }
  *sock = kh::ScopedFd();  // the worker goes away
  FUZZ_CHECK(Settled(), "after the connection closed: %d workers, %lld bytes of budget held",
             g_daemon->Stats().attached_workers(),
             static_cast<long long>(g_daemon->Stats().used_bytes()));
  return 0;
}
