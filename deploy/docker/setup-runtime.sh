#!/bin/sh
# Run once while a runtime image is built (deploy/Dockerfile,
# deploy/docker/Dockerfile.prebuilt): the unprivileged user the services run
# as, the folders they write (owned by it, so named volumes mounted there
# start writable), and the loader path for the bundled libraries.
set -eu
groupadd --system --gid 10001 tailorkv
useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tailorkv --no-create-home \
  --shell /usr/sbin/nologin tailorkv
mkdir -p /run/tailorkv /var/lib/tailorkv /plans /models
chown tailorkv:tailorkv /run/tailorkv /var/lib/tailorkv /plans
echo /usr/local/lib/tailorkv > /etc/ld.so.conf.d/tailorkv.conf
ldconfig
# Every program must find every library it needs (but the GPU driver's
# libcuda, which the NVIDIA container toolkit mounts when a container starts).
for b in /usr/local/bin/*; do
  missing="$(ldd "$b" | grep "not found" | grep -v 'libcuda\.so' || true)"
  if [ -n "$missing" ]; then echo "$b: $missing" >&2; exit 1; fi
done
