// TKV_TARGET_CLONES(...): __attribute__((target_clones(...))), except under
// ThreadSanitizer. GCC instruments the ifunc resolver that picks the clone,
// and the dynamic loader runs that resolver while relocating the binary,
// before TSan's runtime exists: every binary crashed at startup. TSan builds
// (scripts/sanitize.sh tsan) take the default clone only.
#pragma once

#if defined(__SANITIZE_THREAD__)
#define TKV_TARGET_CLONES(...)
#else
#define TKV_TARGET_CLONES(...) __attribute__((target_clones(__VA_ARGS__)))
#endif
