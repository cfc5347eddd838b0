#!/usr/bin/env bash
# Builds the fuzz targets (tests/fuzz) with clang + libFuzzer + ASan/UBSan in
# build-fuzz/ and runs each for a while on a scratch copy of its corpus
# (tests/fuzz/corpus/<target> only grows when minimized inputs are copied
# there by hand). Writes per-target logs, crash artifacts, the grown corpora
# and a summary (summary.json, summary.txt) to the output directory.
#
# Usage: scripts/fuzz.sh [--seconds N] [--targets a,b,...] [--parallel P]
#                        [--out DIR] [--build-only]
#   --seconds   run time per target (default 60)
#   --targets   comma-separated (default: every tests/fuzz/*_fuzz.cc)
#   --parallel  targets run at once (default 1; each uses one core)
#   --out       results (default build-fuzz/results-<UTC time>)
# Env: BUILD_DIR (default build-fuzz), CC/CXX (default clang/clang++),
#      FUZZ_ARGS (extra libFuzzer flags), TAILORKV_MODEL_DIR.
# Exit status: 0 when no target crashed, 1 otherwise, 2 on a usage or build error.
# Needs Debian's clang, libclang-rt-<ver>-dev (libFuzzer, sanitizers) and
# libomp-dev (OpenMP for clang).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

seconds=60
targets=""
parallel=1
out=""
build_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --targets) targets="$2"; shift 2 ;;
    --parallel) parallel="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --build-only) build_only=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "fuzz.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
build="${BUILD_DIR:-build-fuzz}"
case "$build" in /*) ;; *) build="$root/$build" ;; esac
all_targets=$(ls tests/fuzz/*_fuzz.cc | sed 's|.*/||; s|_fuzz\.cc$||' | tr '\n' ' ')
if [ -z "$targets" ]; then targets="$all_targets"; else targets=$(echo "$targets" | tr ',' ' '); fi
for t in $targets; do
  [ -f "tests/fuzz/${t}_fuzz.cc" ] || { echo "fuzz.sh: no target '$t' (have: $all_targets)" >&2; exit 2; }
done
export CC="${CC:-clang}" CXX="${CXX:-clang++}"
command -v "$CXX" >/dev/null || { echo "fuzz.sh: $CXX not found (apt-get install clang libclang-rt-14-dev libomp-dev)" >&2; exit 2; }

# Every library the targets use is instrumented (coverage + sanitizers);
# only the fuzz executables link libFuzzer's main.
flags="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
build_start=$(date +%s)
if [ ! -f "$build/build.ninja" ]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DTAILORKV_FUZZ=ON -DTAILORKV_BUILD_TESTS=OFF -DTAILORKV_CUDA=OFF \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" >/dev/null || exit 2
fi
fuzz_exes=""
for t in $targets; do fuzz_exes="$fuzz_exes ${t}_fuzz"; done
nice -n 10 cmake --build "$build" --target $fuzz_exes || exit 2
build_seconds=$(( $(date +%s) - build_start ))
echo "fuzz.sh: built $(echo $targets | wc -w) targets in ${build_seconds} s"
[ "$build_only" = 1 ] && exit 0

out="${out:-$build/results-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
out=$(cd "$out" && pwd)

run_one() {
  local t="$1"
  local corpus="$out/corpus/$t" art="$out/artifacts/$t/"
  rm -rf "$corpus" "$art"
  mkdir -p "$corpus" "$art"
  cp tests/fuzz/corpus/"$t"/* "$corpus"/
  local seeds start rc dict=""
  seeds=$(ls "$corpus" | wc -l)
  [ -f "tests/fuzz/$t.dict" ] && dict="-dict=$root/tests/fuzz/$t.dict"
  start=$(date +%s)
  set +e
  # -timeout: an input running 10 s is a hang; -rss_limit_mb: the targets
  # that hold the test model need ~1.5 GB with ASan's shadow;
  # -error_exitcode: not libFuzzer's 77, which here means "no test model".
  # shellcheck disable=SC2086
  nice -n 10 "$build/tests/fuzz/${t}_fuzz" -max_total_time="$seconds" -timeout=10 \
    -rss_limit_mb=4096 -error_exitcode=1 -print_final_stats=1 -artifact_prefix="$art" $dict ${FUZZ_ARGS:-} \
    "$corpus" >"$out/$t.log" 2>&1
  rc=$?
  set -e
  echo "$t $rc $(( $(date +%s) - start )) $seeds" >"$out/$t.rc"
}

running=0
for t in $targets; do
  echo "fuzz.sh: $t for ${seconds} s"
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$parallel" ]; then wait -n || true; running=$((running - 1)); fi
done
wait

python3 - "$out" "$seconds" "$build_seconds" $targets <<'PY'
import json, os, re, sys
out, seconds, build_seconds, targets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
rows, crashed = [], False
for t in targets:
    log = open(os.path.join(out, t + ".log"), errors="replace").read()
    name, rc, wall, seeds = open(os.path.join(out, t + ".rc")).read().split()
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", log))
    # The last status line carries coverage: "#N ... cov: C ft: F corp: n/size ... exec/s: E".
    status = [l for l in log.splitlines() if re.match(r"#\d+\s", l) and " cov: " in l]
    last = status[-1] if status else ""
    def field(pat):
        m = re.search(pat, last)
        return m.group(1) if m else None
    corpus_dir = os.path.join(out, "corpus", t)
    files = os.listdir(corpus_dir)
    artifacts = sorted(os.listdir(os.path.join(out, "artifacts", t)))
    row = {
        "target": t,
        "exit_code": int(rc),
        "seconds": int(wall),
        "execs": int(stats.get("number_of_executed_units", 0)),
        "execs_per_second": int(stats.get("average_exec_per_sec", 0)),
        "cov": int(field(r"cov: (\d+)") or 0),
        "ft": int(field(r"ft: (\d+)") or 0),
        "corpus_files_start": int(seeds),
        "corpus_files_end": len(files),
        "corpus_bytes_end": sum(os.path.getsize(os.path.join(corpus_dir, f)) for f in files),
        "peak_rss_mb": int(stats.get("peak_rss_mb", 0)),
        "artifacts": artifacts,
    }
    # 77: the target needs the test model and it is missing (not a crash).
    row["skipped"] = row["exit_code"] == 77 and not artifacts
    crashed |= (row["exit_code"] != 0 and not row["skipped"]) or bool(artifacts)
    rows.append(row)
summary = {"seconds_per_target": seconds, "build_seconds": build_seconds, "targets": rows}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
lines = ["%-17s %9s %7s %6s %6s %13s %6s %s" % ("target", "execs", "exec/s", "cov", "ft",
         "corpus", "secs", "result")]
for r in rows:
    result = "ok" if r["exit_code"] == 0 and not r["artifacts"] else \
        "skipped (no test model)" if r["skipped"] else \
        "CRASH rc=%d %s" % (r["exit_code"], " ".join(r["artifacts"]))
    lines.append("%-17s %9d %7d %6d %6d %5d->%-5d %6d %s" % (r["target"], r["execs"],
                 r["execs_per_second"], r["cov"], r["ft"], r["corpus_files_start"],
                 r["corpus_files_end"], r["seconds"], result))
lines.append("build: %d s (incremental when build-fuzz/ existed)" % build_seconds)
open(os.path.join(out, "summary.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
# Why a target failed, where the caller sees it (ctest keeps only the output).
for r in rows:
    if (r["exit_code"] != 0 and not r["skipped"]) or r["artifacts"]:
        log = open(os.path.join(out, r["target"] + ".log"), errors="replace").read().splitlines()
        print("\n== %s: last lines of %s.log" % (r["target"], r["target"]))
        print("\n".join(l[:300] for l in log[-40:]))
sys.exit(1 if crashed else 0)
PY
