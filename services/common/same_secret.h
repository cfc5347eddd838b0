// Comparing a presented credential (an API key, a bearer token) with the
// configured one.
#pragma once

#include <string_view>

namespace tailorkv::common {

// True when `presented` equals `expected`, in time that depends on neither
// where they differ nor the presented length: both are hashed (SHA-256) and
// the digests compared with OpenSSL's constant-time CRYPTO_memcmp. A plain
// == returns at the first differing byte, which lets a client that times
// many attempts recover a key byte by byte.
bool SameSecret(std::string_view presented, std::string_view expected);

}  // namespace tailorkv::common
