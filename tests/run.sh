#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what is missing, builds, runs ctest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/install_deps.sh"
bash "$root/launch/build.sh"
cd "$root/build"
ctest --output-on-failure -j "$(nproc 2>/dev/null || echo 2)" "$@"
