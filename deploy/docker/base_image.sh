#!/usr/bin/env bash
# Makes the base image `debian:12` when the engine lacks it: no image registry
# is reachable from these machines, so it is bootstrapped from Debian's
# package mirror (debootstrap --variant=minbase bookworm) and `docker import`ed.
# The root filesystem's tarball is kept in CACHE_DIR so a later run (or a
# fresh engine) imports it again in seconds.
# Usage: deploy/docker/base_image.sh   Env: TAILORKV_CACHE_DIR (default /var/cache/tailorkv)
set -euo pipefail
image=debian:12
cache="${TAILORKV_CACHE_DIR:-/var/cache/tailorkv}"
tarball="$cache/debian12-minbase.tar"
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "[base] $image present" >&2; exit 0
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [[ ! -s "$tarball" ]]; then
  command -v debootstrap >/dev/null || {
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  }
  mirror="$(awk '/^deb(-src)? / && /debian/ {print $2; exit}' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)"
  if [[ -z "$mirror" ]]; then
    mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
  fi
  mirror="${mirror:-http://deb.debian.org/debian}"
  root="$(mktemp -d /tmp/tailorkv-rootfs.XXXXXX)"
  trap '$SUDO rm -rf "$root"' EXIT
  echo "[base] debootstrap --variant=minbase bookworm from $mirror" >&2
  start=$SECONDS
  $SUDO debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -n 20 "$root.log" >&2; exit 1; }
  # No package lists, caches, logs, manuals or translations in the image
  # (the services log to stderr in English).
  $SUDO rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* "$root.log" \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
  $SUDO mkdir -p "$cache"
  $SUDO tar -C "$root" -cf "$tarball.part" . && $SUDO mv "$tarball.part" "$tarball"
  echo "[base] root filesystem in $((SECONDS - start)) s" >&2
fi
docker import --change 'CMD ["bash"]' "$tarball" "$image" >/dev/null
echo "[base] imported $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))" >&2
