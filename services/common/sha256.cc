#include "common/sha256.h"

#include <openssl/evp.h>

#include <fstream>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"

namespace tailorkv::common {
namespace {

struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};
using MdCtx = std::unique_ptr<EVP_MD_CTX, MdCtxDeleter>;

MdCtx NewSha256() {
  MdCtx ctx(EVP_MD_CTX_new());
  if (ctx == nullptr || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    // Only allocation failure gets here; nothing sensible can continue.
    std::abort();
  }
  return ctx;
}

std::string Finish(EVP_MD_CTX* ctx) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, digest, &len);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "sha256:";
  for (unsigned int i = 0; i < len; ++i) {
    out.push_back(kHex[digest[i] >> 4]);
    out.push_back(kHex[digest[i] & 15]);
  }
  return out;
}

}  // namespace

std::string Sha256Tag(std::string_view data) {
  MdCtx ctx = NewSha256();
  EVP_DigestUpdate(ctx.get(), data.data(), data.size());
  return Finish(ctx.get());
}

absl::StatusOr<std::string> Sha256File(
    const std::string& path, const std::function<absl::Status(int64_t, int64_t)>& progress) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  const int64_t total = static_cast<int64_t>(in.tellg());
  in.seekg(0);
  MdCtx ctx = NewSha256();
  std::vector<char> block(4 << 20);
  int64_t done = 0;
  while (in) {
    in.read(block.data(), static_cast<std::streamsize>(block.size()));
    const std::streamsize got = in.gcount();
    if (got <= 0) break;
    EVP_DigestUpdate(ctx.get(), block.data(), static_cast<size_t>(got));
    done += got;
    if (progress) {
      if (auto st = progress(done, total); !st.ok()) return st;
    }
  }
  if (in.bad() || done != total) {
    return absl::DataLossError(
        absl::StrCat(path, ": read error after ", done, " of ", total, " bytes"));
  }
  return Finish(ctx.get());
}

bool IsSha256Tag(std::string_view tag) {
  if (tag.size() != 7 + 64 || tag.substr(0, 7) != "sha256:") return false;
  for (char c : tag.substr(7)) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

}  // namespace tailorkv::common
