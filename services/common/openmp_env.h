// OpenMP's wait policy must be set before libgomp loads: it reads the
// environment in a library constructor, before main() runs. With the default
// (spin), idle OpenMP threads busy-wait between the hundreds of parallel
// regions of one decode step; whenever the cores are shared (other processes,
// gRPC threads) that made a SmolLM2 decode step 20x slower (measured: 12 s vs
// 0.57 s for 12 tokens on a loaded 2-core machine).
#pragma once

namespace tailorkv {

// Call first thing in main(). When OMP_WAIT_POLICY is unset, sets it to
// "passive" and re-executes the program (argv unchanged) so libgomp sees it;
// otherwise returns (an explicit user choice is kept). If re-executing fails,
// returns and the program runs with the default policy.
void EnsurePassiveOpenMpWait(char** argv);

// The OpenMP team (and OpenBLAS thread count) to use where `requested`
// threads were asked for: `requested`, but 1 in ThreadSanitizer builds
// (scripts/sanitize.sh tsan). Debian's libgomp is not built with TSan, so the
// fork, barriers and join of a parallel region are invisible to it and every
// region's writes read as races with the code after the region (hundreds of
// reports per forward pass, none of them ours). With one thread a region runs
// on its caller; the threads the services start themselves (scheduler, gRPC,
// callers, kv-host) stay checked.
constexpr int OpenMpTeamSize(int requested) {
#if defined(__SANITIZE_THREAD__)
  return requested > 0 ? 1 : requested;
#else
  return requested;
#endif
}

}  // namespace tailorkv
