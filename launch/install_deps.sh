#!/usr/bin/env bash
# Installs the Debian packages freqkv builds and tests with, only those that are missing
# (idempotent: a second run installs nothing and does not touch the network).
set -euo pipefail

packages=(
  cmake g++ make pkg-config
  libopenblas-dev            # CPU GEMMs
  nlohmann-json3-dev         # safetensors headers, config.json
  libyaml-cpp-dev            # YAML configs
  libopenmpi-dev openmpi-bin libhdf5-openmpi-dev   # ranks and parallel HDF5 checkpoints
  libgtest-dev googletest    # tests
  python3-torch python3-numpy                      # the independent PyTorch reference checks
  python3-matplotlib                               # launch/plot_metrics.py
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "freqkv: installing ${missing[*]}" >&2
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
"${sudo_cmd[@]}" apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends \
  "${missing[@]}" >/dev/null
