#!/usr/bin/env bash
# Installs every build and runtime dependency from Debian 12's packages.
# Idempotent: packages already present are skipped by apt.
set -euo pipefail
PKGS=(
  build-essential cmake ninja-build pkg-config git ca-certificates unzip python3 python3-pip python3-venv
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libspdlog-dev libfmt-dev libboost-dev libgtest-dev libgmock-dev
  libopenblas-dev libopenblas-openmp-dev nlohmann-json3-dev libcli11-dev libicu-dev libssl-dev
  zlib1g-dev
  # The fuzz targets' clang tree (scripts/fuzz.sh, ctest fuzz_short): libFuzzer
  # and the sanitizers live in libclang-rt, OpenMP for clang in libomp.
  clang libclang-rt-14-dev libomp-dev
  # scripts/sanitize.sh (ctest sanitize_slice): g++'s sanitizer runtimes (also
  # pulled in by build-essential through libgcc-12-dev; named for the slice).
  libasan8 libubsan1 liblsan0 libtsan2
  # ctest sanitize_tsan_slice unpacks Debian's Abseil source (dpkg-source).
  dpkg-dev
  # ctest fault_clock_jump steps the services' wall clock with libfaketime.
  faketime
  # ctest fault_syscall_faults injects syscall failures into kv-host (strace --inject).
  strace
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[install-deps] installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "[install-deps] all packages present"
fi
