#!/usr/bin/env bash
# The package's dependencies resolve, as wheels, on every platform JAX supports for CPUs.
# For each platform: uv resolves pyproject.toml's dependencies there, then resolves that
# exact set again with wheels only. `promise` (a tensorflow-datasets dependency, pure Python)
# is published as a source distribution only: it installs without a compiler.
#
#     bash scripts/check_platforms.sh          # needs uv (pip install uv) and the index
set -euo pipefail
cd "$(dirname "$0")/.."
PURE_PYTHON_SDISTS="promise"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for platform in x86_64-manylinux_2_28 aarch64-manylinux_2_28 aarch64-apple-darwin \
  x86_64-pc-windows-msvc; do
  for python in 3.11 3.12; do
    resolved="$out/$platform-$python.txt"
    uv pip compile -q pyproject.toml --python-platform "$platform" --python-version "$python" \
      --no-header --no-annotate -o "$resolved"
    grep -v -E "^($(echo "$PURE_PYTHON_SDISTS" | tr ' ' '|'))==" "$resolved" >"$resolved.wheels"
    uv pip compile -q "$resolved.wheels" --python-platform "$platform" \
      --python-version "$python" --only-binary :all: --no-deps -o /dev/null
    echo "$platform, Python $python: $(wc -l <"$resolved") packages resolve," \
      "$(grep -E '^tensorflow(-cpu)?==' "$resolved" | tr '\n' ' ')$(grep -E '^jaxlib==' "$resolved")"
  done
done
