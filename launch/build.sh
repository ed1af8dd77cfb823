#!/usr/bin/env bash
# Configures and builds freqkv into build/ (Release). Extra arguments go to cmake's configure step,
# e.g. -DCMAKE_CUDA_ARCHITECTURES="80;90" or -DFREQKV_CUDA=OFF.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jobs="$(nproc 2>/dev/null || echo 2)"
cmake -S "$root" -B "$root/build" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$root/build" -j "$jobs"
