#include "profiler/plan_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/utf8.h"
#include "nlohmann/json.hpp"

namespace tailorkv::profiler {
namespace {

using json = nlohmann::json;

constexpr char kMetaFormat[] = "tailorkv.plan_store.meta";
constexpr int kMetaVersion = 1;
constexpr char kTmpPrefix[] = ".tmp-";
constexpr char kLockName[] = ".lock";
constexpr size_t kMaxPlanIdLength = 64;
constexpr int kMaxPageSize = 1000;
// Fixed width (microseconds, 'Z'), so the text sorts like the time.
constexpr char kCreatedAtFormat[] = "%Y-%m-%dT%H:%M:%E6SZ";

// Unavailable for what may pass on retry (space, transient I/O), Internal for
// what will not (permissions, read-only file system, a bug).
absl::Status ErrnoStatus(int err, const std::string& what, const std::string& path) {
  std::string message = absl::StrCat(what, " ", path, ": ", std::strerror(err));
  switch (err) {
    case ENOSPC:
    case EDQUOT:
    case EIO:
    case EAGAIN:
    case EBUSY:
    case ENOMEM:
    case EMFILE:
    case ENFILE:
      return absl::UnavailableError(std::move(message));
    default:
      return absl::InternalError(std::move(message));
  }
}

bool IsPlanIdChar(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-';
}

bool IsValidPlanId(const std::string& id) {
  if (id.empty() || id.size() > kMaxPlanIdLength) return false;
  for (char c : id) {
    if (!IsPlanIdChar(c)) return false;
  }
  return true;
}

absl::Status ValidatePlanId(const std::string& id) {
  if (IsValidPlanId(id)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("plan_id: must match [A-Za-z0-9_-]{1,64}, got \"",
                                                 absl::CHexEscape(id.substr(0, 80)), "\"",
                                                 id.size() > 80 ? "..." : ""));
}

std::string Sha256Hex(std::string_view bytes) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (ctx == nullptr || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1 ||
      EVP_DigestUpdate(ctx.get(), bytes.data(), bytes.size()) != 1 ||
      EVP_DigestFinal_ex(ctx.get(), digest, &len) != 1) {
    return "";  // never matches a stored hash, so the caller reports a mismatch
  }
  return absl::BytesToHexString(
      std::string(reinterpret_cast<const char*>(digest), static_cast<size_t>(len)));
}

bool IsSha256Hex(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  return absl::StrCat(dir, "/", name);
}

std::string FormatCreatedAt(absl::Time t) {
  return absl::FormatTime(kCreatedAtFormat, t, absl::UTCTimeZone());
}

// Whole file; NotFound when it does not exist.
absl::StatusOr<std::string> ReadFile(const std::string& path) {
  int raw;
  do {
    raw = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  } while (raw < 0 && errno == EINTR);
  if (raw < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": missing"));
    return ErrnoStatus(errno, "open", path);
  }
  PlanStore::Fd fd(raw);
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(errno, "fstat", path);
  std::string data;
  data.resize(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (true) {
    if (done == data.size()) data.resize(data.size() + 4096);  // grew since fstat
    const ssize_t n = ::read(fd.get(), data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "read", path);
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  data.resize(done);
  return data;
}

absl::Status WriteAll(int fd, std::string_view data, const std::string& path) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "write", path);
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status FsyncDir(const std::string& dir) {
  PlanStore::Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(errno, "open directory", dir);
  if (::fsync(fd.get()) != 0) return ErrnoStatus(errno, "fsync directory", dir);
  return absl::OkStatus();
}

absl::Status Rename(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    return ErrnoStatus(errno, absl::StrCat("rename ", from, " to"), to);
  }
  return absl::OkStatus();
}

// OK when the file is gone, whether or not it existed.
absl::Status RemoveIfPresent(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return ErrnoStatus(errno, "unlink", path);
  return absl::OkStatus();
}

// A fully written, fsync'd temporary file, unlinked on destruction unless it
// was renamed away.
class TmpFile {
 public:
  TmpFile() = default;
  TmpFile(TmpFile&& o) noexcept : path_(std::exchange(o.path_, "")) {}
  TmpFile& operator=(TmpFile&&) = delete;
  TmpFile(const TmpFile&) = delete;
  ~TmpFile() {
    if (!path_.empty()) ::unlink(path_.c_str());
  }

  // Writes `data` to "<dir>/.tmp-<name>-<random>".
  static absl::StatusOr<TmpFile> Write(const std::string& dir, const std::string& name,
                                       std::string_view data) {
    thread_local absl::BitGen gen;
    TmpFile tmp;
    PlanStore::Fd fd;
    // A name collision (64 random bits) is all but impossible; EEXIST retries
    // anyway.
    for (int attempt = 0; attempt < 4 && !fd.valid(); ++attempt) {
      const std::string path =
          JoinPath(dir, absl::StrCat(kTmpPrefix, name, "-",
                                     absl::Hex(absl::Uniform<uint64_t>(gen), absl::kZeroPad16)));
      int raw;
      do {
        raw = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      } while (raw < 0 && errno == EINTR);
      if (raw < 0) {
        if (errno == EEXIST) continue;
        return ErrnoStatus(errno, "create", path);
      }
      fd = PlanStore::Fd(raw);
      tmp.path_ = path;
    }
    if (!fd.valid())
      return absl::InternalError(absl::StrCat("create ", dir, "/.tmp-", name, "-*: names taken"));
    RETURN_IF_ERROR(WriteAll(fd.get(), data, tmp.path_));
    if (::fsync(fd.get()) != 0) return ErrnoStatus(errno, "fsync", tmp.path_);
    return tmp;
  }

  absl::Status RenameTo(const std::string& final_path) {
    RETURN_IF_ERROR(Rename(path_, final_path));
    path_.clear();
    return absl::OkStatus();
  }

 private:
  std::string path_;
};

std::string EncodeToken(absl::Time created, const std::string& plan_id,
                        const std::string& model_digest) {
  const json token = {{"t", absl::ToUnixMicros(created)}, {"id", plan_id}, {"d", model_digest}};
  return absl::WebSafeBase64Escape(token.dump());
}

absl::Status BadToken(const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("page_token: ", why));
}

}  // namespace

PlanStore::Fd& PlanStore::Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(o.fd_, -1);
  }
  return *this;
}

PlanStore::Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

PlanStore::PlanStore(std::string dir, Fd lock_fd, Clock clock)
    : dir_(std::move(dir)), lock_fd_(std::move(lock_fd)), clock_(std::move(clock)) {}

absl::StatusOr<std::unique_ptr<PlanStore>> PlanStore::Open(const std::string& dir, Clock clock) {
  if (dir.empty()) return absl::InvalidArgumentError("dir: empty");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return ErrnoStatus(ec.value(), "create directory", dir);
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::InvalidArgumentError(absl::StrCat("dir: ", dir, " is not a directory"));
  }
  // O_RDONLY|O_CREAT opens an existing lock file even in a read-only
  // directory, so a store there still serves reads.
  const std::string lock_path = JoinPath(dir, kLockName);
  Fd lock_fd(::open(lock_path.c_str(), O_RDONLY | O_CREAT | O_CLOEXEC, 0644));
  if (!lock_fd.valid()) return ErrnoStatus(errno, "open lock file", lock_path);
  if (::flock(lock_fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return absl::FailedPreconditionError(
          absl::StrCat("plan store ", dir, " is already open (", lock_path, " is locked)"));
    }
    return ErrnoStatus(errno, "flock", lock_path);
  }
  std::unique_ptr<PlanStore> store(
      new PlanStore(dir, std::move(lock_fd), clock ? std::move(clock) : Clock(&absl::Now)));
  RETURN_IF_ERROR(store->LoadAll());
  return store;
}

absl::Status PlanStore::LoadAll() {
  // Names in the directory, by plan id, with what each is.
  struct Files {
    bool meta = false;
    std::vector<std::string> data;  // json, png, next.json, next.png present
  };
  std::map<std::string, Files> ids;
  std::vector<std::string> leftovers;
  {
    DIR* raw = ::opendir(dir_.c_str());
    if (raw == nullptr) return ErrnoStatus(errno, "list directory", dir_);
    std::unique_ptr<DIR, int (*)(DIR*)> d(raw, &::closedir);
    errno = 0;
    while (const dirent* e = ::readdir(d.get())) {
      const std::string name = e->d_name;
      if (absl::StartsWith(name, kTmpPrefix)) {
        leftovers.push_back(name);
        continue;
      }
      const size_t dot = name.find('.');
      if (dot == std::string::npos || dot == 0) continue;  // ".", "..", ".lock", foreign files
      const std::string id = name.substr(0, dot);
      const std::string suffix = name.substr(dot + 1);
      if (!IsValidPlanId(id)) continue;
      if (suffix == "meta.json") {
        ids[id].meta = true;
      } else if (suffix == "json" || suffix == "png" || suffix == "next.json" ||
                 suffix == "next.png") {
        ids[id].data.push_back(suffix);
      }
    }
    if (errno != 0) return ErrnoStatus(errno, "list directory", dir_);
  }

  // Cleanup is best effort: a read-only store still serves what it has.
  bool changed = false;
  for (const std::string& name : leftovers) {
    changed |= RemoveIfPresent(JoinPath(dir_, name)).ok();
  }

  absl::MutexLock lock(&mu_);
  for (const auto& [id, files] : ids) {
    if (!files.meta) {
      // Data of a Put that crashed before its first commit.
      for (const std::string& suffix : files.data) {
        changed |= RemoveIfPresent(JoinPath(dir_, absl::StrCat(id, ".", suffix))).ok();
      }
      continue;
    }
    const std::string meta_name = absl::StrCat(id, ".meta.json");
    auto skip = [&](const std::string& file, const std::string& reason) {
      skipped_.push_back(absl::StrCat(file, ": ", reason));
    };
    absl::StatusOr<std::string> text = ReadFile(JoinPath(dir_, meta_name));
    if (!text.ok()) {
      skip(meta_name, std::string(text.status().message()));
      continue;
    }
    const json j = json::parse(*text, /*cb=*/nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      skip(meta_name, "not a JSON object");
      continue;
    }
    auto str = [&](const char* key, std::string* out) {
      auto it = j.find(key);
      if (it == j.end() || !it->is_string()) return false;
      *out = it->get<std::string>();
      return true;
    };
    auto int64 = [&](const char* key, int64_t* out) {
      auto it = j.find(key);
      if (it == j.end() || !it->is_number_integer()) return false;
      *out = it->get<int64_t>();
      return *out >= 0;
    };
    Meta meta;
    std::string format;
    bool fields_ok = str("format", &format) && format == kMetaFormat;
    if (!fields_ok || !j.contains("version") || j["version"] != kMetaVersion) {
      skip(meta_name, absl::StrCat("not a ", kMetaFormat, " version ", kMetaVersion, " file"));
      continue;
    }
    StoredPlan& f = meta.fields;
    const char* bad = nullptr;
    if (!str("plan_id", &f.plan_id))
      bad = "plan_id";
    else if (!str("model_digest", &f.model_digest) || f.model_digest.empty())
      bad = "model_digest";
    else if (!str("model", &f.model))
      bad = "model";
    else if (!str("summary", &f.summary))
      bad = "summary";
    else if (!str("checksum", &f.checksum))
      bad = "checksum";
    else if (!str("created_at", &f.created_at))
      bad = "created_at";
    else if (!str("json_sha256", &meta.json_sha256) || !IsSha256Hex(meta.json_sha256))
      bad = "json_sha256";
    else if (!int64("json_bytes", &meta.json_bytes))
      bad = "json_bytes";
    else if (!int64("png_bytes", &meta.png_bytes))
      bad = "png_bytes";
    else if (!str("png_sha256", &meta.png_sha256) ||
             !(meta.png_bytes == 0 ? meta.png_sha256.empty() : IsSha256Hex(meta.png_sha256))) {
      bad = "png_sha256";
    }
    if (bad != nullptr) {
      skip(meta_name, absl::StrCat("field ", bad, " missing or invalid"));
      continue;
    }
    if (f.plan_id != id) {
      skip(meta_name, absl::StrCat("plan_id \"", f.plan_id, "\" does not match the file name"));
      continue;
    }
    std::string time_error;
    if (!absl::ParseTime(absl::RFC3339_full, f.created_at, &meta.created, &time_error)) {
      skip(meta_name, absl::StrCat("created_at: ", time_error));
      continue;
    }

    // Each data file resolves to its final name or, after a crash between the
    // commit and the final renames, to its next name, which is then renamed.
    bool ok = true;
    for (const std::string kind : {"json", "png"}) {
      const bool wanted = kind == "json" || meta.png_bytes > 0;
      const std::string final_path = JoinPath(dir_, absl::StrCat(id, ".", kind));
      const std::string next_path = JoinPath(dir_, absl::StrCat(id, ".next.", kind));
      if (!wanted) {
        // A plot of the record this one replaced.
        changed |= RemoveIfPresent(final_path).ok();
        changed |= RemoveIfPresent(next_path).ok();
        continue;
      }
      const absl::StatusOr<Data> data = ReadData(meta, kind);
      if (!data.ok()) {
        skip(absl::StrCat(id, ".", kind), std::string(data.status().message()));
        ok = false;
        break;
      }
      changed |=
          (data->from_next ? Rename(next_path, final_path) : RemoveIfPresent(next_path)).ok();
    }
    if (!ok) continue;
    IndexLocked(std::move(meta));
  }
  if (changed) FsyncDir(dir_).IgnoreError();  // best effort, like the cleanup itself
  return absl::OkStatus();
}

absl::StatusOr<PlanStore::Data> PlanStore::ReadData(const Meta& meta,
                                                    const std::string& kind) const {
  const std::string& want_sha = kind == "json" ? meta.json_sha256 : meta.png_sha256;
  const int64_t want_bytes = kind == "json" ? meta.json_bytes : meta.png_bytes;
  std::string why;
  for (const bool from_next : {false, true}) {
    const std::string name = absl::StrCat(meta.fields.plan_id, from_next ? ".next." : ".", kind);
    absl::StatusOr<std::string> data = ReadFile(JoinPath(dir_, name));
    if (!data.ok()) {
      if (absl::IsNotFound(data.status())) continue;
      return data.status();
    }
    if (static_cast<int64_t>(data->size()) != want_bytes) {
      if (why.empty())
        why = absl::StrCat(name, " has ", data->size(), " bytes, meta says ", want_bytes);
      continue;
    }
    const std::string sha = Sha256Hex(*data);
    if (sha != want_sha) {
      if (why.empty()) why = absl::StrCat(name, " has sha256 ", sha, ", meta says ", want_sha);
      continue;
    }
    return Data{*std::move(data), from_next};
  }
  return absl::DataLossError(why.empty() ? absl::StrCat(meta.fields.plan_id, ".", kind, " missing")
                                         : why);
}

void PlanStore::IndexLocked(Meta meta) {
  const std::string id = meta.fields.plan_id;
  auto it = by_id_.find(id);
  if (it != by_id_.end()) {
    order_.erase(OrderKey{it->second.created, id});
    by_id_.erase(it);
  }
  order_.insert(OrderKey{meta.created, id});
  by_id_.emplace(id, std::move(meta));
}

absl::StatusOr<StoredPlan> PlanStore::Put(StoredPlan plan) {
  RETURN_IF_ERROR(ValidatePlanId(plan.plan_id));
  if (plan.model_digest.empty()) return absl::InvalidArgumentError("model_digest: empty");
  if (plan.plan_json.empty()) return absl::InvalidArgumentError("plan_json: empty");
  // The meta file is JSON, whose strings must be UTF-8.
  RETURN_IF_ERROR(common::ValidateUtf8(plan.model_digest, "model_digest"));
  RETURN_IF_ERROR(common::ValidateUtf8(plan.model, "model"));
  RETURN_IF_ERROR(common::ValidateUtf8(plan.summary, "summary"));
  RETURN_IF_ERROR(common::ValidateUtf8(plan.checksum, "checksum"));
  const std::string& id = plan.plan_id;

  Meta meta;
  meta.json_sha256 = Sha256Hex(plan.plan_json);
  meta.json_bytes = static_cast<int64_t>(plan.plan_json.size());
  meta.png_bytes = static_cast<int64_t>(plan.plot_png.size());
  if (!plan.plot_png.empty()) meta.png_sha256 = Sha256Hex(plan.plot_png);

  // The data files are the bulk of the bytes: written outside the lock.
  ASSIGN_OR_RETURN(TmpFile json_tmp,
                   TmpFile::Write(dir_, absl::StrCat(id, ".json"), plan.plan_json));
  std::optional<TmpFile> png_tmp;
  if (!plan.plot_png.empty()) {
    ASSIGN_OR_RETURN(TmpFile t, TmpFile::Write(dir_, absl::StrCat(id, ".png"), plan.plot_png));
    png_tmp.emplace(std::move(t));
  }

  absl::MutexLock lock(&mu_);
  // Microseconds, so the time read back from created_at is the same.
  meta.created = absl::FromUnixMicros(absl::ToUnixMicros(clock_()));
  plan.created_at = FormatCreatedAt(meta.created);
  meta.fields = plan;
  meta.fields.plan_json.clear();
  meta.fields.plot_png.clear();
  const json meta_json = {
      {"format", kMetaFormat},
      {"version", kMetaVersion},
      {"plan_id", id},
      {"model_digest", plan.model_digest},
      {"model", plan.model},
      {"summary", plan.summary},
      {"checksum", plan.checksum},
      {"created_at", plan.created_at},
      {"json_sha256", meta.json_sha256},
      {"json_bytes", meta.json_bytes},
      {"png_sha256", meta.png_sha256},
      {"png_bytes", meta.png_bytes},
  };
  const std::string meta_name = absl::StrCat(id, ".meta.json");
  ASSIGN_OR_RETURN(TmpFile meta_tmp, TmpFile::Write(dir_, meta_name, meta_json.dump(2) + "\n"));

  // Before the commit: the old record (its meta and final files) is untouched.
  const std::string next_json = JoinPath(dir_, absl::StrCat(id, ".next.json"));
  const std::string next_png = JoinPath(dir_, absl::StrCat(id, ".next.png"));
  RETURN_IF_ERROR(json_tmp.RenameTo(next_json));
  if (png_tmp.has_value()) RETURN_IF_ERROR(png_tmp->RenameTo(next_png));
  RETURN_IF_ERROR(FsyncDir(dir_));
  RETURN_IF_ERROR(meta_tmp.RenameTo(JoinPath(dir_, meta_name)));  // the commit point

  IndexLocked(std::move(meta));
  auto after_commit = [&](const absl::Status& s) {
    return absl::Status(s.code(),
                        absl::StrCat("plan ", id, " committed, durability unknown: ", s.message()));
  };
  if (absl::Status s = FsyncDir(dir_); !s.ok()) return after_commit(s);
  const std::string final_png = JoinPath(dir_, absl::StrCat(id, ".png"));
  absl::Status s = Rename(next_json, JoinPath(dir_, absl::StrCat(id, ".json")));
  if (s.ok()) s = png_tmp.has_value() ? Rename(next_png, final_png) : RemoveIfPresent(final_png);
  if (s.ok() && !png_tmp.has_value()) s = RemoveIfPresent(next_png);
  if (s.ok()) s = FsyncDir(dir_);
  if (!s.ok()) return after_commit(s);
  return plan;
}

absl::StatusOr<StoredPlan> PlanStore::WithData(const Meta& meta, bool with_plot) const {
  StoredPlan plan = meta.fields;
  ASSIGN_OR_RETURN(Data json_data, ReadData(meta, "json"));
  plan.plan_json = std::move(json_data.bytes);
  if (with_plot && meta.png_bytes > 0) {
    ASSIGN_OR_RETURN(Data png_data, ReadData(meta, "png"));
    plan.plot_png = std::move(png_data.bytes);
  }
  return plan;
}

absl::StatusOr<StoredPlan> PlanStore::Get(const std::string& plan_id, bool with_plot) const {
  RETURN_IF_ERROR(ValidatePlanId(plan_id));
  absl::ReaderMutexLock lock(&mu_);
  auto it = by_id_.find(plan_id);
  if (it == by_id_.end()) return absl::NotFoundError(absl::StrCat("plan ", plan_id, " not found"));
  return WithData(it->second, with_plot);
}

absl::StatusOr<StoredPlan> PlanStore::NewestFor(const std::string& model_digest,
                                                bool with_plot) const {
  if (model_digest.empty()) return absl::InvalidArgumentError("model_digest: empty");
  absl::ReaderMutexLock lock(&mu_);
  for (const OrderKey& key : order_) {
    const Meta& meta = by_id_.at(key.plan_id);
    if (meta.fields.model_digest == model_digest) return WithData(meta, with_plot);
  }
  return absl::NotFoundError(absl::StrCat("no plan for model digest ", model_digest));
}

absl::StatusOr<PlanStore::Page> PlanStore::List(const std::string& model_digest, int page_size,
                                                const std::string& page_token) const {
  if (page_size < 1 || page_size > kMaxPageSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size: must be in [1, ", kMaxPageSize, "], got ", page_size));
  }
  std::optional<OrderKey> after;
  if (!page_token.empty()) {
    std::string decoded;
    if (!absl::WebSafeBase64Unescape(page_token, &decoded)) return BadToken("not base64url");
    const json j = json::parse(decoded, /*cb=*/nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || !j.contains("t") || !j["t"].is_number_integer() ||
        !j.contains("id") || !j["id"].is_string() || !j.contains("d") || !j["d"].is_string() ||
        !IsValidPlanId(j["id"].get<std::string>())) {
      return BadToken("not a token this store issued");
    }
    if (j["d"].get<std::string>() != model_digest) {
      return BadToken("issued for another model_digest filter");
    }
    after = OrderKey{absl::FromUnixMicros(j["t"].get<int64_t>()), j["id"].get<std::string>()};
  }
  Page page;
  absl::ReaderMutexLock lock(&mu_);
  auto it = after.has_value() ? order_.upper_bound(*after) : order_.begin();
  for (; it != order_.end(); ++it) {
    const Meta& meta = by_id_.at(it->plan_id);
    if (!model_digest.empty() && meta.fields.model_digest != model_digest) continue;
    if (static_cast<int>(page.plans.size()) == page_size) {
      // One more matches: the page ends at the last record taken.
      const StoredPlan& last = page.plans.back();
      page.next_page_token =
          EncodeToken(by_id_.at(last.plan_id).created, last.plan_id, model_digest);
      break;
    }
    page.plans.push_back(meta.fields);
  }
  return page;
}

std::vector<std::string> PlanStore::skipped() const {
  absl::ReaderMutexLock lock(&mu_);
  return skipped_;
}

}  // namespace tailorkv::profiler
