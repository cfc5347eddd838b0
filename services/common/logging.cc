#include "common/logging.h"

#include "absl/strings/str_cat.h"
#include "spdlog/sinks/stdout_color_sinks.h"

namespace tailorkv::common {

absl::Status ConfigureLogging(std::string_view level) {
  const spdlog::level::level_enum parsed = spdlog::level::from_str(std::string(level));
  // from_str maps unknown names to "off"; only the literal "off" means off.
  if (parsed == spdlog::level::off && level != "off") {
    return absl::InvalidArgumentError(absl::StrCat(
        "log-level: unknown level '", std::string(level),
        "' (one of trace, debug, info, warn, error, critical, off)"));
  }
  auto logger = spdlog::get("tailorkv");
  if (!logger) logger = spdlog::stderr_color_mt("tailorkv");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%L%$ %n %t] %v");
  spdlog::set_level(parsed);
  spdlog::flush_on(spdlog::level::warn);
  return absl::OkStatus();
}

std::shared_ptr<spdlog::logger> NamedLogger(const std::string& name) {
  if (auto existing = spdlog::get(name)) return existing;
  auto base = spdlog::default_logger();
  auto logger = std::make_shared<spdlog::logger>(name, base->sinks().begin(), base->sinks().end());
  try {
    spdlog::initialize_logger(logger);  // applies the global level and pattern
  } catch (const spdlog::spdlog_ex&) {
    // Another thread registered the same name first; use that one.
    if (auto existing = spdlog::get(name)) return existing;
  }
  return logger;
}

}  // namespace tailorkv::common
