#!/usr/bin/env bash
# The main job on an embedded default: builds freqkv, makes a tiny LLaMA (byte-level vocabulary)
# and a token file from this repository's own text, and computes its next-token loss over
# 1024-token windows, with FreqKV (cache 256, so every window is compressed 7 times) and without.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/install_deps.sh"
bash "$root/launch/build.sh"
out="$root/build/demo"
mkdir -p "$out"
freqkv="$root/build/freqkv"
"$freqkv" init-model --config "$root/configs/models/tiny-llama/config.json" --out "$out/model"
"$freqkv" tokenize --out "$out/tokens.bin" "$root"/README.md "$root"/docs/*.md "$root"/kernels/*.h \
  "$root"/model/*.h
echo "== FreqKV attention (cache 256, sink 4, ratio 0.5) =="
"$freqkv" eval-loss --model "$out/model" --tokens "$out/tokens.bin" --seq-len 1024 --batch 4 \
  --cache 256 --sink 4 --ratio 0.5 --grads-out "$out/grads.safetensors"
echo "== full causal attention =="
"$freqkv" eval-loss --model "$out/model" --tokens "$out/tokens.bin" --seq-len 1024 --batch 4 --no-freqkv
echo "demo: model in $out/model, tokens in $out/tokens.bin, gradients in $out/grads.safetensors"
