#!/usr/bin/env bash
# The CPU test suite under sanitizers (docs/reliability.md, "Sanitizers").
# Configures its own tree with -DTAILORKV_CUDA=OFF and g++'s sanitizers on
# every compile and link, builds, and runs ctest there.
#
# Usage: scripts/sanitize.sh MODE [--slice] [--build-only] [ctest args...]
#   asan   AddressSanitizer + UndefinedBehaviorSanitizer (+ LeakSanitizer),
#          tree build-asan/; runs the whole CPU suite except the tests
#          excluded below.
#   tsan   ThreadSanitizer, tree build-tsan/; builds and runs only the
#          engine, services (gpu-worker server, gateway, profiler) and
#          kv-host tests, and the Python tests that drive those binaries
#          (the threaded code; the parsers have no threads).
#   --slice       asan: the CI slice, the parsers' unit tests
#                 (tkv_tokenizer_test, tkv_model_test) in build-asan-slice/;
#                 ctest runs it as the test "sanitize_slice".
#                 tsan: kv-host's data plane and host KV store
#                 (tkv_kvhost_daemon_test, tkv_hostkv_test: gRPC streams, the
#                 rows channel, leases, budgets), the generation service
#                 (tkv_generation_service_test) and the engine's scheduler
#                 (tkv_runtime_test's EngineScheduler suite) in
#                 build-tsan-slice/; ctest runs it as "sanitize_tsan_slice".
#   --build-only  configure and build, run nothing.
# Extra arguments go to ctest after ours (a -R there replaces tsan's default
# selection; -j overrides ours). Env: BUILD_DIR, JOBS (default nproc).
# Exit status: ctest's (non-zero when a test failed or a sanitizer reported),
# 2 on a usage or build error.
#
# Every finding ends its process (halt_on_error / -fno-sanitize-recover), so
# a report fails its test. Suppressions (scripts/sanitizers/*.supp) name only
# third-party code that Debian ships uninstrumented; each says why.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

usage() { sed -n '2,29p' "$0"; }
mode="${1:-}"
[ $# -gt 0 ] && shift
slice=0
build_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --slice) slice=1; shift ;;
    --build-only) build_only=1; shift ;;
    *) break ;;
  esac
done
supp="$root/scripts/sanitizers"
case "$mode" in
  asan)
    flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    build="${BUILD_DIR:-build-asan}"
    [ "$slice" = 1 ] && build="${BUILD_DIR:-build-asan-slice}"
    ;;
  tsan)
    flags="-fsanitize=thread -fno-omit-frame-pointer"
    build="${BUILD_DIR:-build-tsan}"
    [ "$slice" = 1 ] && build="${BUILD_DIR:-build-tsan-slice}"
    ;;
  -h|--help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac
jobs="${JOBS:-$(nproc)}"
case "$build" in /*) ;; *) build="$root/$build" ;; esac

# Set for the build too: gtest_discover_tests runs each test binary
# (--gtest_list_tests) right after linking it.
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:strict_string_checks=1:check_initialization_order=1:strict_init_order=1:detect_stack_use_after_return=1:print_summary=1"
export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:print_summary=1:suppressions=$supp/ubsan.supp"
# history_size=4: the engine's and gRPC's threads run long enough that the
# default history loses the earlier access ("failed to restore the stack").
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:history_size=4:print_suppressions=0:suppressions=$supp/tsan.supp"

# Debian's Abseil is not built with TSan, so absl::Mutex and absl::CondVar
# (ours, and gRPC's locks) would synchronize where TSan cannot see it, and
# every access they guard would read as a race. The same version, from
# Debian's source package (its patches: the inline namespace), is built with
# TSan once into $build/absl-tsan and loaded in place of Debian's through
# LD_LIBRARY_PATH (same sonames, same ABI), by our binaries and by gRPC.
build_tsan_absl() {
  local dir="$build/absl-tsan"
  [ -f "$dir/lib/.complete" ] && return 0
  local pkg ver
  pkg=$(dpkg-query -W -f='${source:Package}' libabsl-dev)
  ver=$(dpkg-query -W -f='${source:Version}' libabsl-dev)
  command -v dpkg-source >/dev/null || { echo "sanitize.sh: tsan needs dpkg-dev (apt-get install dpkg-dev)" >&2; exit 2; }
  echo "sanitize.sh: building $pkg $ver with TSan into $dir"
  rm -rf "$dir" && mkdir -p "$dir/apt/lists/partial" "$dir/lib"
  # A private source list: deb-src entries without touching the system's.
  {
    echo "deb-src http://deb.debian.org/debian bookworm main"
    echo "deb-src http://deb.debian.org/debian bookworm-updates main"
    echo "deb-src http://deb.debian.org/debian-security bookworm-security main"
  } >"$dir/apt/sources.list"
  local apt=(apt-get -q -o Dir::Etc::SourceList="$dir/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
             -o Dir::State::Lists="$dir/apt/lists" -o APT::Sandbox::User=root)
  "${apt[@]}" update >/dev/null || exit 2
  (cd "$dir" && "${apt[@]}" source --download-only "$pkg=$ver" >/dev/null && dpkg-source -x ./*.dsc src >/dev/null 2>&1) || exit 2
  # Debian's own shared-library configuration (debian/rules), plus TSan.
  cmake -S "$dir/src" -B "$dir/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_STANDARD=17 \
    -DBUILD_SHARED_LIBS=ON -DBUILD_TESTING=OFF -DCMAKE_CXX_FLAGS="$flags" \
    -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=thread" >/dev/null || exit 2
  nice -n 10 cmake --build "$dir/build" -j "$jobs" || exit 2
  find "$dir/build" -name 'libabsl_*.so*' -exec cp -P {} "$dir/lib/" \;
  touch "$dir/lib/.complete"
}

if [ "$mode" = tsan ]; then
  # libgomp is not built with TSan: a parallel region's fork, barriers and
  # join are invisible to it, so whatever a region's threads write reads as
  # racing with what runs after it. One OpenMP thread by default keeps such
  # noise out; where our code asks for more (the CPU backend's --threads,
  # the profiler's scoring), OpenMpTeamSize() (common/openmp_env.h) makes it
  # one thread in TSan builds, and tsan.supp drops what still involves
  # libgomp's or OpenBLAS's threads. (Not
  # OMP_THREAD_LIMIT=1: OpenBLAS then waits for GEMM threads that never
  # start.) The engine's own threads (scheduler, gRPC, callers) are checked.
  export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
fi

# The test binaries of the threaded code, for tsan, and the tests that
# drive its binaries from Python (gateway, worker, kv-host, profiler).
tsan_bins="tkv_runtime_test tkv_cpu_backend_model_test tkv_worker_server_test tkv_plan_source_test
  tkv_generation_service_test tkv_plan_source_engine_test tkv_worker_main_test
  tkv_common_test gateway_worker_pool_test gateway_openai_api_test
  profiler_service_test profiler_runner_test profiler_main_test
  tkv_kvhost_daemon_test tkv_hostkv_test tkv_remote_placement_test
  tkv_kv_host_processes_test tkv_load_test_smoke"
tsan_tests="gateway_openai_client gateway_failover_client prometheus_scrape"
slice_bins="tkv_tokenizer_test tkv_model_test"
slice_more_targets=""  # built for slice_suites, whose binaries' other suites stay out
slice_suites=""
if [ "$mode" = tsan ]; then
  slice_bins="tkv_kvhost_daemon_test tkv_hostkv_test tkv_generation_service_test"
  slice_more_targets="tkv_runtime_test"
  slice_suites="EngineScheduler"
fi

start=$(date +%s)
if [ ! -f "$build/build.ninja" ]; then
  # RelWithDebInfo (-O2 -g) as the normal build: the code under test is the
  # code that ships; the frame pointers keep the reports' stacks whole.
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTAILORKV_CUDA=OFF \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
    -DCMAKE_EXE_LINKER_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="$flags" >/dev/null || exit 2
fi
if [ "$mode" = tsan ]; then
  build_tsan_absl
  export LD_LIBRARY_PATH="$build/absl-tsan/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
targets=()
# shellcheck disable=SC2206  # the lists split on blanks and newlines
if [ "$slice" = 1 ]; then
  targets=($slice_bins $slice_more_targets)
elif [ "$mode" = tsan ]; then
  targets=($tsan_bins gpu-worker kv-host tailorkv-cli profiler gateway tkv_load_test)
fi
nice -n 10 cmake --build "$build" -j "$jobs" ${targets[@]:+--target "${targets[@]}"} || exit 2
echo "sanitize.sh: $mode build of $build took $(( $(date +%s) - start )) s"
[ "$build_only" = 1 ] && exit 0

# A ctest -R selecting the tests of the binaries in $1 (their gtest suites,
# read from ctest's own list), the tests named in $2 and the suites in $3.
select_tests() {
  ctest --test-dir "$build" --show-only=json-v1 | python3 -c '
import json, os, re, sys
bins, names = set(sys.argv[1].split()), sys.argv[2].split()
suites = set(sys.argv[3].split())
for t in json.load(sys.stdin)["tests"]:
    cmd = t.get("command") or []
    if cmd and os.path.basename(cmd[0]) in bins:
        suites.add(t["name"].split(".")[0])
if not suites:
    sys.exit("sanitize.sh: no tests of " + sys.argv[1])
alt = ["^(" + "|".join(re.escape(s) for s in sorted(suites)) + ")\\."]
if names:
    alt.append("^(" + "|".join(re.escape(n) for n in names) + ")$")
print("|".join(alt))
' "$1" "${2:-}" "${3:-}"
}

# Not run under sanitizers:
#  - compose (Docker, root) and remote_kv_host (network namespaces, root):
#    they need a privileged machine, and run the binaries that
#    tkv_kv_host_processes_test and the Python tests run here.
#  - k8s_manifests: no C++ (kubectl and a Python schema validator).
#  - fuzz_short: scripts/fuzz.sh builds its own ASan+UBSan tree already.
#  - sanitize_slice: this script's CI slice (a tree built inside a tree).
#  - soak_short: it judges RSS growth, which under ASan measures the
#    sanitizer (256 MiB quarantine of freed blocks, shadow memory), not the
#    services; LSan checks every process for leaks here instead.
#  - label gpu: no CUDA in these trees.
exclude='^(compose|remote_kv_host|k8s_manifests|fuzz_short|sanitize_slice|soak_short)$'
args=(--test-dir "$build" --output-on-failure -j "$jobs" --timeout 1800 -LE gpu -E "$exclude")
if [ "$slice" = 1 ]; then
  args+=(-R "$(select_tests "$slice_bins" "" "$slice_suites")")
elif [ "$mode" = tsan ]; then
  args+=(-R "$(select_tests "$tsan_bins" "$tsan_tests")")
fi
# Reports go to files, one per reporting process, so that those of child
# processes (a worker a test starts, the binaries the Python tests drive)
# count as well, even where the test itself would pass.
logs="$build/sanitizer-logs"
rm -rf "$logs" && mkdir -p "$logs"
export ASAN_OPTIONS="$ASAN_OPTIONS:log_path=$logs/asan"
export UBSAN_OPTIONS="$UBSAN_OPTIONS:log_path=$logs/ubsan"
export TSAN_OPTIONS="$TSAN_OPTIONS:log_path=$logs/tsan"
start=$(date +%s)
set +e
nice -n 10 ctest "${args[@]}" "$@"
rc=$?
set -e
echo "sanitize.sh: $mode ctest took $(( $(date +%s) - start )) s (exit $rc)"
reports=$(find "$logs" -type f | sort)
if [ -n "$reports" ]; then
  echo "sanitize.sh: $(echo "$reports" | wc -l) sanitizer report(s) in $logs:"
  for f in $reports; do
    echo "=== $f"
    cat "$f"
  done
  [ "$rc" = 0 ] && rc=1
fi
exit $rc
