#!/usr/bin/python3
"""`freqkv eval-loss` under mpirun with --tp 2, --sp 2 and --dp 2 (and tp 2 x sp 2 on 4 ranks)
gives the loss and the gradient of every parameter of the one-rank run: the parallel paths
end to end through the command line, with a model directory and token file made here.

    /usr/bin/python3 tests/cli_parallel_check.py --freqkv build/freqkv --mpirun mpirun [--np4]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference"))
import hf_io  # noqa: E402


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"FAILED: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--freqkv", required=True)
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--np4", action="store_true", help="also tp 2 x sp 2 on 4 ranks")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = hf_io.make_config(vocab_size=48, hidden_size=16, intermediate_size=24,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=4, max_position_embeddings=12)
        model = os.path.join(tmp, "model")
        hf_io.write_model_dir(model, cfg, seed=3)
        rng = np.random.default_rng(4)
        tokens = os.path.join(tmp, "tokens.bin")
        hf_io.write_tokens(tokens, rng.integers(0, 48, size=400), "uint16")
        base = [args.freqkv, "eval-loss", "--model", model, "--tokens", tokens, "--seq-len", "40",
                "--batch", "2", "--cache", "12", "--sink", "2", "--ratio", "0.5"]
        ref = run(base + ["--grads-out", os.path.join(tmp, "ref.safetensors")])
        ref_grads = hf_io.load_safetensors(os.path.join(tmp, "ref.safetensors"))
        cases = [("tp2", 2, ["--tp", "2"]), ("sp2", 2, ["--sp", "2"]), ("dp2", 2, ["--dp", "2"])]
        if args.np4:
            cases.append(("tp2_sp2", 4, ["--tp", "2", "--sp", "2"]))
        failed = 0
        print(f"{'case':10} {'loss':>12} {'rel err':>10} {'worst grad rel err':>20}")
        print(f"{'1 rank':10} {ref['loss']:12.8f}")
        for name, np_, flags in cases:
            grads_path = os.path.join(tmp, name + ".safetensors")
            got = run([args.mpirun, "-np", str(np_), "--oversubscribe"] + base + flags +
                      ["--grads-out", grads_path])
            grads = hf_io.load_safetensors(grads_path)
            loss_err = abs(got["loss"] - ref["loss"]) / abs(ref["loss"])
            worst, worst_name = 0.0, ""
            if set(grads) != set(ref_grads):
                print(f"{name}: gradient names differ: {sorted(set(grads) ^ set(ref_grads))}")
                failed += 1
                continue
            for k, g in ref_grads.items():
                err = np.linalg.norm(grads[k] - g) / max(np.linalg.norm(g), 1e-30)
                if err > worst:
                    worst, worst_name = err, k
            ok = loss_err <= 1e-5 and worst <= 1e-4 and got["windows"] == ref["windows"]
            failed += not ok
            print(f"{name:10} {got['loss']:12.8f} {loss_err:10.2e} {worst:12.2e} {worst_name}"
                  f"{'' if ok else '   FAIL'}")
        print(f"{len(cases) - failed} passed, {failed} failed")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
