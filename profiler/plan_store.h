// PlanStore: the profiler's on-disk store of finished plans.
//
// The store knows nothing of a plan's internals: it keeps records (a plan
// document, an optional plot and a few text fields) keyed by plan_id, and
// survives a crash at any point with either the old or the new version of a
// record, never a half-written one.
//
// On disk, in one directory owned by one process (held with flock on
// "<dir>/.lock"; a second Open of the same directory fails while the first
// store lives):
//   <id>.json        the plan document, byte-exact
//   <id>.png         the plot, only when non-empty
//   <id>.meta.json   every other field, plus the SHA-256 hex and byte count of
//                    the json and png bytes. Its presence is the commit point.
//   <id>.next.json,  data files of a Put whose meta was not yet renamed into
//   <id>.next.png    place (or whose final renames did not happen yet)
//   .tmp-<name>-<r>  a file being written; a leftover after a crash
// plan_id never contains '.', so the part before the first '.' of a name is
// always the id.
//
// A Put writes each file to ".tmp-<name>-<random>" (O_CREAT|O_EXCL), fully,
// fsyncs it, renames it, and fsyncs the directory. Order: json and png go to
// <id>.next.*; then <id>.meta.json is renamed over the old meta (commit);
// then the next files are renamed to the final names. A reader resolves each
// data file by content: the final name when its hash matches the meta,
// otherwise the next name. So a crash before the commit leaves the old record
// (its meta and final files untouched), and a crash after it leaves the new
// one (Open finishes the renames).
//
// Open removes ".tmp-*" leftovers, next files no meta refers to, and data
// files with no meta (a Put that crashed before its first commit). A record
// whose meta is unreadable or whose data is missing or fails its hash is
// skipped, left on disk for inspection, and reported by skipped().
//
// Errors: InvalidArgument for a bad field (named); NotFound; DataLoss when a
// file changed under the store; Unavailable for I/O failures worth retrying
// (disk full, EIO) and Internal for the others (read-only or unwritable
// directory), each with the path and strerror. Never a crash.
//
// Thread-safe: one mutex. Reads share it; a Put writes its data files
// outside it and holds it exclusively only to commit.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tailorkv::profiler {

struct StoredPlan {
  std::string plan_id;       // [A-Za-z0-9_-]{1,64}: it becomes a file name
  std::string model_digest;  // non-empty UTF-8, e.g. "sha256:ab12..."
  std::string model;         // UTF-8 free text (the model name)
  std::string summary;       // UTF-8 free text
  std::string checksum;      // UTF-8 free text (the plan's own checksum)
  std::string created_at;    // RFC 3339 UTC with microseconds, set by Put; ignored
                             // on input
  std::string plan_json;     // non-empty, any bytes, stored byte-exact
  std::string plot_png;      // any bytes; may be empty (no plot)
};

class PlanStore {
 public:
  using Clock = std::function<absl::Time()>;

  // Opens `dir` (creating it and missing parents), loads every committed
  // record and cleans up as described above. `clock` (default absl::Now)
  // stamps created_at; tests inject one. Internal/Unavailable when the
  // directory cannot be created, listed or locked.
  static absl::StatusOr<std::unique_ptr<PlanStore>> Open(const std::string& dir,
                                                         Clock clock = nullptr);

  PlanStore(const PlanStore&) = delete;
  PlanStore& operator=(const PlanStore&) = delete;

  // Stores `plan` atomically, replacing any record with the same plan_id.
  // Returns the record as stored (created_at set, data included). On an
  // error before the commit point the old record stays; after it (a failed
  // directory fsync or final rename) the store already serves the new record
  // and the error says its durability is unknown.
  absl::StatusOr<StoredPlan> Put(StoredPlan plan);

  // The record `plan_id`, with plan_json and (when with_plot) plot_png read
  // from disk and verified. NotFound; DataLoss when a file no longer matches.
  absl::StatusOr<StoredPlan> Get(const std::string& plan_id, bool with_plot) const;

  // The newest record (first in List order) for `model_digest`. NotFound.
  absl::StatusOr<StoredPlan> NewestFor(const std::string& model_digest, bool with_plot) const;

  struct Page {
    std::vector<StoredPlan> plans;  // summaries: plan_json and plot_png empty
    std::string next_page_token;    // "" at the end
  };
  // Records newest first (created_at descending, then plan_id ascending),
  // only those of `model_digest` unless it is "". page_size in [1, 1000];
  // page_token "" or a next_page_token an earlier List with the same
  // model_digest returned (opaque; it names a position, so records put
  // between pages neither repeat nor shift the rest). InvalidArgument naming
  // the field otherwise.
  absl::StatusOr<Page> List(const std::string& model_digest, int page_size,
                            const std::string& page_token) const;

  // "file: reason" for each record skipped at Open.
  std::vector<std::string> skipped() const;

  const std::string& dir() const { return dir_; }

  // Owns one file descriptor and closes it on destruction; -1 means none.
  class Fd {
   public:
    Fd() = default;
    explicit Fd(int fd) : fd_(fd) {}
    Fd(Fd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
    Fd& operator=(Fd&& o) noexcept;
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd();
    int get() const { return fd_; }
    bool valid() const { return fd_ >= 0; }

   private:
    int fd_ = -1;
  };

 private:
  // What the meta file holds and the index keeps (no data bytes).
  struct Meta {
    StoredPlan fields;  // plan_json and plot_png empty
    absl::Time created;
    std::string json_sha256;
    std::string png_sha256;  // "" when there is no plot
    int64_t json_bytes = 0;
    int64_t png_bytes = 0;
  };
  // List order: created descending, then plan_id ascending.
  struct OrderKey {
    absl::Time created;
    std::string plan_id;
    bool operator<(const OrderKey& o) const {
      if (created != o.created) return created > o.created;
      return plan_id < o.plan_id;
    }
  };

  PlanStore(std::string dir, Fd lock_fd, Clock clock);

  absl::Status LoadAll();
  struct Data {
    std::string bytes;
    bool from_next = false;  // found under the next name, not the final one
  };
  // Reads the data file `kind` ("json" or "png") of `meta`, final name first
  // then the next name, and checks it against the meta's size and hash.
  // DataLoss naming the file and what differs.
  absl::StatusOr<Data> ReadData(const Meta& meta, const std::string& kind) const;
  absl::StatusOr<StoredPlan> WithData(const Meta& meta, bool with_plot) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void IndexLocked(Meta meta) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string dir_;
  const Fd lock_fd_;  // flock'd for the store's lifetime
  const Clock clock_;

  mutable absl::Mutex mu_;
  std::map<std::string, Meta> by_id_ ABSL_GUARDED_BY(mu_);
  std::set<OrderKey> order_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> skipped_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tailorkv::profiler
