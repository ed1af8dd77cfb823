"""The PyTorch step of bench/torch_reference_step.py against `freqkv eval-loss` (C++), in float64.

  /usr/bin/python3 tests/reference/check_torch_step.py --freqkv build/freqkv [--workdir DIR]

bench/torch_reference_step.py is the PyTorch side of the issue's speed comparison; its figures
only mean something if it computes the same step. For every case: write a random HF LLaMA model
directory (hf_io) and a token file, run
  freqkv eval-loss --model DIR --tokens FILE --token-dtype uint32 --seq-len T --batch B
                   --cache C --sink S --ratio R --precision fp64 --grads-out FILE
and the reference step's mean_loss in fp64 on the same weights and windows, for the compression
as one GEMM and through FFTs, with and without activation recomputation (torch.utils.checkpoint),
with its batched chunks, its partial last chunk and its blocked LM-head cross-entropy. Required:
loss relative error <= 1e-6 and, per gradient tensor, ||g_step - g_cpp|| / ||g_cpp|| <= 1e-5 (the
C++ gradients are written as F32). The independent reference (torch_freqkv.py) is compared too,
and then the step's own --self-check runs (its code paths against each other).
Exit status 0 when all agree, 1 when one does not, 77 (ctest: skipped) without torch or numpy.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

try:
    import numpy as np
    import torch
except ImportError as e:
    print("check_torch_step: skipped (%s)" % e)
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))
import hf_io  # noqa: E402
import torch_freqkv  # noqa: E402
import torch_reference_step as step  # noqa: E402

LOSS_TOL = 1e-6
GRAD_TOL = 1e-5

CASES = [
    dict(name="gqa_partial_last",
         why="GQA 4:2, C=16 S=2 r=.5 (F=14 L=7 step=7), T=45: chunks 16,7,7,7,7,1 (4 compressions, "
             "a partial last chunk), 2 windows in one batch, rope_theta 5e5",
         model=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    max_position_embeddings=16, rope_theta=500000.0),
         T=45, windows=2, batch=2, cache=16, sink=2, ratio=0.5, seed=1),
    dict(name="tied_r025_s0_full_last",
         why="tied head, r=.25 S=0 C=16 (F=16 L=4 step=12), T=40: chunks 16,12,12 (all full), "
             "2 heads x 8 != hidden 24, GQA 2:1",
         model=dict(vocab_size=80, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                    max_position_embeddings=16, tie_word_embeddings=True),
         T=40, windows=1, batch=1, cache=16, sink=0, ratio=0.25, seed=2),
    dict(name="odd_sizes_r07",
         why="C=12 S=1 r=.7 (F=11 L=7 step=4: L > F/2, odd F), T=31: chunks 12,4,4,4,4,3; 3 layers",
         model=dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                    max_position_embeddings=12),
         T=31, windows=1, batch=1, cache=12, sink=1, ratio=0.7, seed=3),
    dict(name="one_chunk",
         why="T=12 <= C=16: one chunk, plain causal attention",
         model=dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                    max_position_embeddings=16),
         T=12, windows=1, batch=1, cache=16, sink=4, ratio=0.5, seed=4),
]

# (compression, activation recomputation) of the reference step
VARIANTS = [("gemm", True), ("gemm", False), ("fft", True), ("fft", False)]


def rel_grad_error(a, b):
    """max over tensors of ||a - b|| / ||b||, and the worst tensor's name."""
    worst, name = 0.0, "-"
    for n in sorted(b):
        ref = np.asarray(b[n], dtype=np.float64)
        diff = np.linalg.norm(np.asarray(a[n], dtype=np.float64) - ref)
        e = diff / np.linalg.norm(ref) if np.linalg.norm(ref) > 0 else diff
        if not np.isfinite(e):
            e = float("inf")
        if e > worst:
            worst, name = float(e), n
    return worst, name


def step_loss_and_grads(cfg, params_np, windows, case, dct, recompute):
    """The reference step's mean loss and gradients over all windows, in fp64 on the CPU."""
    params = {n: torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)
              for n, a in params_np.items()}
    freqkv = step.FreqKV(case["cache"], case["sink"], case["ratio"])
    ctx = step.StepContext(cfg, case["T"], freqkv, dct, "sdpa", torch.float64, torch.device("cpu"))
    ids = torch.as_tensor(windows)
    # loss_block 7: several blocks of rows, the last one short, exercise the blocked cross-entropy
    loss = step.mean_loss(params, cfg, ids[:, :-1], ids[:, 1:], ctx, recompute, loss_block=7)
    loss.backward()
    return float(loss), {n: p.grad.numpy() for n, p in params.items()}


def run_case(case, binary, work):
    d = os.path.join(work, case["name"])
    os.makedirs(d, exist_ok=True)
    cfg = hf_io.make_config(**case["model"])
    mdir = os.path.join(d, "model")
    hf_io.write_model_dir(mdir, cfg, seed=case["seed"], dtype="F32")
    cfg, params = hf_io.load_model_dir(mdir)  # the weights as stored
    T = case["T"]
    rng = np.random.default_rng(200 + case["seed"])
    tokens = rng.integers(0, cfg["vocab_size"], size=case["windows"] * (T + 1))
    tfile = os.path.join(d, "tokens.uint32.bin")
    hf_io.write_tokens(tfile, tokens, "uint32")
    windows = torch_freqkv.make_windows(hf_io.read_tokens(tfile, "uint32"), T)
    gfile = os.path.join(d, "grads.safetensors")
    cmd = [binary, "eval-loss", "--model", mdir, "--tokens", tfile, "--token-dtype", "uint32",
           "--seq-len", str(T), "--batch", str(case["batch"]), "--cache", str(case["cache"]),
           "--sink", str(case["sink"]), "--ratio", str(case["ratio"]), "--precision", "fp64",
           "--grads-out", gfile]
    rows = []
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    t_cpp = time.time() - t0
    result = None
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            result = __import__("json").loads(line)
            break
    if p.returncode != 0 or result is None or not os.path.exists(gfile):
        msg = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return [dict(case=case["name"], variant="-", ok=False, note="freqkv eval-loss failed (exit %d): %s"
                     % (p.returncode, msg), cmd=" ".join(cmd))]
    if result.get("windows") != case["windows"]:
        return [dict(case=case["name"], variant="-", ok=False,
                     note="eval-loss saw %s windows, expected %d" % (result.get("windows"), case["windows"]))]
    cpp_loss = float(result["loss"])
    cpp_grads = hf_io.load_safetensors(gfile)
    independent = torch_freqkv.eval_loss(cfg, params, hf_io.read_tokens(tfile, "uint32"), T,
                                         cache=case["cache"], sink=case["sink"], ratio=case["ratio"],
                                         grads=True)
    references = [("freqkv eval-loss fp64", cpp_loss, cpp_grads),
                  ("torch_freqkv.py", independent["loss"], independent["grads"])]
    for dct, recompute in VARIANTS:
        t0 = time.time()
        loss, grads = step_loss_and_grads(cfg, params, windows, case, dct, recompute)
        t_step = time.time() - t0
        for ref_name, ref_loss, ref_grads in references:
            row = dict(case=case["name"], variant="%s%s" % (dct, ", recompute" if recompute else ""),
                       against=ref_name, loss=loss, ref=ref_loss, rel=abs(loss - ref_loss) / abs(ref_loss),
                       note="", t="step %.2fs, cpp %.2fs" % (t_step, t_cpp))
            if set(grads) != set(ref_grads):
                row["ok"] = False
                row["note"] = "gradient names differ: %s" % sorted(set(grads) ^ set(ref_grads))
                rows.append(row)
                continue
            row["gerr"], row["worst"] = rel_grad_error(grads, ref_grads)
            row["ok"] = row["rel"] <= LOSS_TOL and row["gerr"] <= GRAD_TOL
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--freqkv", required=True, help="path to the freqkv binary")
    ap.add_argument("--workdir", help="keep the case files here (default: a temporary dir, removed)")
    args = ap.parse_args()
    binary = os.path.abspath(args.freqkv)
    if not os.access(binary, os.X_OK):
        print("error: %s is not an executable" % binary, file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = args.workdir or tempfile.mkdtemp(prefix="freqkv_torch_step_")
    start = time.time()
    rows = []
    try:
        for case in CASES:
            rows += run_case(case, binary, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("%-24s %-16s %-22s %18s %9s  %-46s %9s  %s" % ("case", "step variant", "against", "loss (step)",
                                                        "loss rel", "worst gradient tensor", "grad rel", "result"))
    print("-" * 158)
    for r in rows:
        if "rel" not in r:
            print("%-24s FAIL: %s" % (r["case"], r["note"]))
            continue
        print("%-24s %-16s %-22s %18.12f %9.2e  %-46s %9.2e  %s%s"
              % (r["case"], r["variant"], r["against"], r["loss"], r["rel"], r.get("worst", "-"),
                 r.get("gerr", float("nan")), "PASS" if r["ok"] else "FAIL",
                 ("  ! " + r["note"]) if r["note"] else ""))
    print("-" * 158)
    print("tolerances: loss rel <= %.0e, per-tensor gradient rel L2 <= %.0e (fp64 step; C++ fp64, "
          "gradients written as F32)" % (LOSS_TOL, GRAD_TOL))
    for case in CASES:
        print("  %s: %s" % (case["name"], case["why"]))
    failed = sum(not r["ok"] for r in rows)
    # The step's code paths against each other (GEMM vs FFT, recompute or not, bf16 vs fp64; SDPA
    # vs the explicit softmax where torch has SDPA) on a larger shape than the cases above.
    print()
    self_check_ok = step.main(["--self-check", "--device", "cpu"]) == 0
    print("check_torch_step: %d/%d comparisons agree, self-check %s (%.1fs)"
          % (len(rows) - failed, len(rows), "ok" if self_check_ok else "FAILED", time.time() - start))
    return 1 if failed or not self_check_ok else 0


if __name__ == "__main__":
    sys.exit(main())
