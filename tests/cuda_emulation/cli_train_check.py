#!/usr/bin/python3
"""`freqkv train --set device=cuda` end to end on the emulated GPU (tests/cuda_emulation): the
binary built against the emulated CUDA backend and NCCL runs the CUDA training path -- bf16
weights, fp32 master weights, the flash attention kernels (head_dim 64), FreqKV compression,
the optimiser on the device -- on one rank and under mpirun with --tp 2, --sp 2 and --dp 2
(collectives over the emulated NCCL), and resumes from a checkpoint written on the device. The
loss of every step must track the CPU fp32 run of the ordinary binary, the parallel runs must
track the one-rank run, and the resumed run must repeat the uninterrupted one exactly. Then the
exported model is evaluated and decoded with --device cuda (the FreqKV decoder on the GPU), on
one rank and with --tp 2: perplexities must track the CPU's, and generation must run.

    /usr/bin/python3 tests/cuda_emulation/cli_train_check.py --freqkv build/freqkv \
        --freqkv-emulated build/tests/cuda_emulation/freqkv_emulated --mpirun mpirun
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
import hf_io  # noqa: E402

STEPS = 8


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"FAILED: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def losses(run_dir):
    values = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                values[record["step"]] = record["loss"]
    return [values[s] for s in sorted(values)]


def write_config(path, tmp, run_dir, device):
    with open(path, "w") as f:
        f.write(f"""model:
  init_config: {tmp}/config.json
  init_seed: 7
device: {device}
precision: {"bf16" if device == "cuda" else "fp32"}
freqkv: {{enabled: true, cache: 32, sink: 2, ratio: 0.5}}
data: {{train: [{tmp}/tokens.bin], token_dtype: uint16, seq_len: 64, batch_size: 2,
        grad_accum: 1}}
optimizer: {{lr: 3.0e-3, weight_decay: 0.01, grad_clip: 1.0}}
schedule: {{steps: {STEPS}, warmup_steps: 2}}
lora: {{enabled: false}}
checkpoint: {{every: 4, keep_last: 2}}
logging: {{every: 1, run_dir: {run_dir}}}
""")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--freqkv", required=True, help="the ordinary (CPU) binary")
    ap.add_argument("--freqkv-emulated", required=True, help="the binary on the emulated GPU")
    ap.add_argument("--mpirun", default="mpirun")
    args = ap.parse_args()
    # Each emulated rank stands for a GPU of its own (as on a node with one GPU per rank); the
    # emulated NCCL otherwise refuses two ranks on "device 0", as NCCL does.
    os.environ["FREQKV_EMU_NCCL_DISTINCT_GPUS"] = "1"
    failed = []

    def expect_close(name, got, want, rel):
        worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
        ok = len(got) == len(want) and worst <= rel
        print(f"{name:34} worst relative difference {worst:9.2e} (limit {rel:.0e}) "
              f"{'ok' if ok else 'FAILED'}")
        if not ok:
            failed.append(name)

    with tempfile.TemporaryDirectory() as tmp:
        # head_dim 64: the tensor-core flash kernels; heads, kv heads, vocabulary and FFN divide
        # by 2 for --tp 2.
        cfg = hf_io.make_config(vocab_size=64, hidden_size=128, intermediate_size=192,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=64, max_position_embeddings=64)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        rng = np.random.default_rng(5)
        tokens = [int(rng.integers(0, 64)) if rng.random() < 0.1 else (i * 7) % 61
                  for i in range(6000)]
        hf_io.write_tokens(os.path.join(tmp, "tokens.bin"), np.array(tokens), "uint16")

        def train(name, binary, device, np_=1, extra=()):
            run_dir = os.path.join(tmp, name)
            config = os.path.join(tmp, name + ".yaml")
            write_config(config, tmp, run_dir, device)
            cmd = [binary, "train", config, *extra]
            if np_ > 1:
                cmd = [args.mpirun, "-np", str(np_), "--oversubscribe"] + cmd
            run(cmd)
            return run_dir

        cpu = losses(train("cpu", args.freqkv, "cpu"))
        gpu_dir = train("gpu", args.freqkv_emulated, "cuda")
        gpu = losses(gpu_dir)
        print(f"{'step':>4} {'CPU fp32':>10} {'GPU bf16':>10}")
        for step, (c, g) in enumerate(zip(cpu, gpu), start=1):
            print(f"{step:4d} {c:10.5f} {g:10.5f}")
        if len(cpu) != STEPS or len(gpu) != STEPS:
            failed.append(f"expected {STEPS} losses, got {len(cpu)} (CPU) and {len(gpu)} (GPU)")
        expect_close("GPU bf16 vs CPU fp32", gpu, cpu, 5e-2)
        if not gpu[-1] < gpu[0] - 0.3:
            failed.append(f"the GPU run did not learn: {gpu[0]:.4f} -> {gpu[-1]:.4f}")

        for name, flags in [("tp2", ["--set", "parallel.tp=2"]), ("sp2", ["--set", "parallel.sp=2"]),
                            ("dp2", ["--set", "parallel.dp=2"])]:
            parallel = losses(train(name, args.freqkv_emulated, "cuda", 2, flags))
            expect_close(f"GPU {name} (emulated NCCL) vs 1 GPU", parallel, gpu, 2e-2)

        # Stop after the checkpoint of step 4, resume from it: steps 5..8 as without the stop.
        resumed_dir = train("stopped", args.freqkv_emulated, "cuda", 1, ["--stop-at", "4"])
        run([args.freqkv_emulated, "train", os.path.join(tmp, "stopped.yaml"),
             "--resume", "latest"])
        resumed = losses(resumed_dir)
        expect_close("GPU resumed at step 4 vs straight", resumed[4:], gpu[4:], 1e-6)

        # Inference on the GPU path: the export of the GPU run, evaluated and decoded.
        model = os.path.join(tmp, "export")
        run([args.freqkv_emulated, "export", "--checkpoint", os.path.join(gpu_dir, "checkpoints"),
             "--out", model])
        cache = ["--cache", "32", "--sink", "2", "--ratio", "0.5"]
        evaluate = ["eval", "--model", model, "--tokens", os.path.join(tmp, "tokens.bin"),
                    "--lengths", "64,128", "--stride", "64", "--max-windows", "3",
                    "--compare-full"] + cache

        def perplexities(name, cmd):
            path = os.path.join(tmp, name + ".json")
            run(cmd + ["--json", path])
            with open(path) as f:
                result = json.load(f)
            return [entry[mode]["ppl"] for entry in result["lengths"]
                    for mode in ("freqkv", "full") if mode in entry]

        cpu_ppl = perplexities("eval_cpu", [args.freqkv] + evaluate)
        gpu_ppl = perplexities("eval_gpu", [args.freqkv_emulated] + evaluate + ["--device", "cuda"])
        tp_ppl = perplexities("eval_gpu_tp2", [args.mpirun, "-np", "2", "--oversubscribe",
                                               args.freqkv_emulated] + evaluate +
                              ["--device", "cuda", "--tp", "2"])
        print("eval perplexities (64 FreqKV, 64 full, 128 FreqKV, 128 full):")
        print("  CPU fp32      " + " ".join(f"{p:9.4f}" for p in cpu_ppl))
        print("  GPU bf16      " + " ".join(f"{p:9.4f}" for p in gpu_ppl))
        print("  GPU bf16 tp2  " + " ".join(f"{p:9.4f}" for p in tp_ppl))
        expect_close("eval GPU bf16 vs CPU fp32", gpu_ppl, cpu_ppl, 3e-2)
        expect_close("eval GPU tp2 vs 1 GPU", tp_ppl, gpu_ppl, 1e-2)

        prompt = os.path.join(tmp, "prompt.txt")
        with open(prompt, "w") as f:
            f.write(" ".join(str((i * 7) % 61) for i in range(40)))
        generate = ["generate", "--model", model, "--prompt-tokens", prompt, "--max-new-tokens",
                    "24", "--print-ids", "--greedy", "--device", "cuda"] + cache
        for name, cmd in [("1 GPU", [args.freqkv_emulated] + generate),
                          ("tp2", [args.mpirun, "-np", "2", "--oversubscribe",
                                   args.freqkv_emulated] + generate + ["--tp", "2"])]:
            ids = run(cmd).split()
            ok = len(ids) == 24 and all(0 <= int(t) < 64 for t in ids)
            print(f"generate GPU {name}: {' '.join(ids)} {'ok' if ok else 'FAILED'}")
            if not ok:
                failed.append(f"generate GPU {name} gave {len(ids)} tokens, not 24 ids < 64")

    if failed:
        sys.exit("FAILED: " + "; ".join(failed))
    print("all checks passed")


if __name__ == "__main__":
    main()
