// How long libgomp's idle threads spin must be set before libgomp loads: it
// reads the environment in a library constructor, before main() runs.
// libgomp's default spins ~300,000 rounds between parallel regions; whenever
// the cores are shared (other processes, gRPC threads) that made a SmolLM2
// decode step 20x slower (measured: 12 s vs 0.57 s for 12 tokens on a loaded
// 2-core machine). Not spinning at all (passive) costs a futex wake-up per
// region instead, ~150 of them a decode token. Spinning 1,000 rounds (tens of
// microseconds) then sleeping covers the gaps inside a step and bounds the
// loss when the cores are shared. Measured on this 2-core machine, quantized
// SmolLM2 decode after 512 tokens, tokens/s (docs/results.md, "Quantized
// weights on the CPU"): quiet 41 passive, 61 at 1,000 rounds; beside one busy
// process 34 passive, 29 at 1,000 rounds.
#pragma once

namespace tailorkv {

// libgomp's spin rounds between regions that BoundOpenMpSpinning sets.
inline constexpr const char* kOpenMpSpinCount = "1000";

// Call first thing in main(). When neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT
// is set, sets GOMP_SPINCOUNT to kOpenMpSpinCount and re-executes the program
// (argv unchanged) so libgomp sees it; otherwise returns (an explicit user
// choice is kept). If re-executing fails, returns and the program runs with
// libgomp's default.
void BoundOpenMpSpinning(char** argv);

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
