// Process-wide logging setup (spdlog), done once in main().
//
// Libraries never configure logging: they ask for a named logger, which
// shares the sinks and level main() configured. Thread-safe.
#pragma once

#include <memory>
#include <string_view>

#include "absl/status/status.h"
#include "spdlog/spdlog.h"

namespace tailorkv::common {

// Sends every logger to stderr at `level` (trace, debug, info, warn, error,
// critical, off). InvalidArgument naming "log-level" for an unknown level.
// Call once, from main(), before starting threads that log.
absl::Status ConfigureLogging(std::string_view level);

// The logger called `name`, created on first use with the default logger's
// sinks and the global level.
std::shared_ptr<spdlog::logger> NamedLogger(const std::string& name);

}  // namespace tailorkv::common
