#!/usr/bin/env bash
# The main job on an embedded default: a short FreqKV fine-tune of a tiny LLaMA on the CPU.
#   1. installs what is missing and builds;
#   2. tokenizes text every Debian system has (the license texts in /usr/share/common-licenses)
#      plus this repository's docs, with the byte-level vocabulary;
#   3. trains configs/tiny-cpu.yaml: 1024-token sequences through a 256-row FreqKV cache (every
#      sequence is compressed 7 times), loss and validation loss logged, checkpoints in HDF5;
#   4. plots the metrics, exports the result as a Hugging Face directory and evaluates it with
#      and without FreqKV.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/install_deps.sh"
bash "$root/launch/build.sh"
cd "$root"
freqkv=build/freqkv
out=build/demo
rm -rf "$out/run" "$out/export"
mkdir -p "$out"

texts=("$root"/README.md "$root"/docs/*.md)
for f in GPL-3 LGPL-3 Apache-2.0 MPL-2.0 Artistic GFDL-1.3 GPL-2 LGPL-2.1; do
  [ -f "/usr/share/common-licenses/$f" ] && texts+=("/usr/share/common-licenses/$f")
done
"$freqkv" tokenize --out "$out/tokens.bin" "${texts[@]}"

"$freqkv" train configs/tiny-cpu.yaml --set logging.run_dir="$out/run"
/usr/bin/python3 launch/plot_metrics.py "$out/run/metrics.jsonl" --out "$out/run/loss.png"
"$freqkv" export --checkpoint "$out/run/checkpoints" --out "$out/export"

echo "== loss of the exported model, 1024-token windows, FreqKV (cache 256) =="
"$freqkv" eval-loss --model "$out/export" --tokens "$out/tokens.bin" --seq-len 1024 --batch 4 \
  --max-windows 16 --cache 256
echo "== the same, full causal attention (positions beyond the trained 256-row cache) =="
"$freqkv" eval-loss --model "$out/export" --tokens "$out/tokens.bin" --seq-len 1024 --batch 4 \
  --max-windows 16 --no-freqkv
cat <<EOF2

demo: everything is under $root/$out
  tokens         $out/tokens.bin
  run            $out/run (config.yaml, metrics.jsonl, loss.png)
  checkpoints    $out/run/checkpoints
  exported model $out/export (Hugging Face LLaMA: config.json + model.safetensors)
EOF2
