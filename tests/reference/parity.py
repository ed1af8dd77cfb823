"""End-to-end parity of `freqkv eval-loss` (C++) against the independent float64 torch reference.

  /usr/bin/python3 tests/reference/parity.py --freqkv build/freqkv [--workdir DIR] [--only a,b]
  /usr/bin/python3 tests/reference/parity.py --self-test          # reference self-checks, no binary

For every case: write a random HF LLaMA model directory and a token file, run
  freqkv eval-loss --model DIR --tokens FILE --token-dtype .. --seq-len T [--batch B] [--stride K]
                   [--cache C --sink S --ratio R | --no-freqkv] --grads-out FILE
and compare with torch_freqkv.eval_loss on the SAME files (weights read back, so bf16 rounding is
shared): relative loss error <= 1e-4, windows/tokens equal, and for every gradient tensor
||g_cpp - g_ref|| / ||g_ref|| <= 1e-3 with the same set of names. Negative cases: the CLI must
exit non-zero with a message when --sink >= --cache. Exit status 1 if anything fails.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_io  # noqa: E402
import torch_freqkv as R  # noqa: E402

LOSS_TOL = 1e-4
GRAD_TOL = 1e-3

# model: hf_io.make_config kwargs. run: CLI options (None = not passed, so the CLI default applies;
# the reference then uses the documented default: cache = max_position_embeddings, sink 4, ratio 0.5).
CASES = [
    dict(name="a_mha_untied_short",
         why="MHA, untied, T <= C (plain causal), all FreqKV options left at defaults (C=32,S=4,r=.5)",
         model=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=32),
         dtype="F32", shards=1, token_dtype="uint32", n_tokens=3 * 25 + 7,
         run=dict(T=24)),
    dict(name="b_gqa_chunks",
         why="GQA 4:2, C=16 S=2 r=.5 (F=14 L=7 step=7), T=45: chunks 16,7,7,7,7,1; rope_theta 5e5",
         model=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=16,
                    rope_theta=500000.0),
         dtype="F32", shards=1, token_dtype="uint32", n_tokens=2 * 46 + 5,
         run=dict(T=45, cache=16, sink=2, ratio=0.5)),
    dict(name="c_tied_r025_s0_stride",
         why="tied, r=.25 S=0 (F=16 L=4 step=12), T=40, batch 2, stride 20 (overlapping windows), "
             "head_dim*heads != hidden (2x8 vs 24), GQA 2:1",
         model=dict(vocab_size=80, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=16,
                    tie_word_embeddings=True),
         dtype="F32", shards=1, token_dtype="uint16", n_tokens=110,
         run=dict(T=40, batch=2, stride=20, cache=16, sink=0, ratio=0.25)),
    dict(name="d_no_freqkv_long",
         why="--no-freqkv, T=64 far beyond max_position_embeddings=16 (absolute RoPE positions)",
         model=dict(vocab_size=72, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=16),
         dtype="F32", shards=1, token_dtype="uint32", n_tokens=2 * 65 + 3,
         run=dict(T=64, no_freqkv=True, batch=2)),
    dict(name="e1_bf16_sharded_int32",
         why="bf16 weights in 2 shards + index, GQA 4:1, eps 1e-6, default cache (16) / sink 4 / ratio .5 "
             "(F=12 L=6 step=6), T=30: chunks 16,6,6,2; int32 tokens",
         model=dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=16,
                    rms_norm_eps=1e-6),
         dtype="BF16", shards=2, token_dtype="int32", n_tokens=2 * 31 + 10, seed=7,
         run=dict(T=30)),
    dict(name="e2_bf16_sharded_uint32",
         why="same bf16 sharded model, uint32 tokens, stride 17, explicit --cache 16 --sink 4 --ratio .5",
         model=dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=16,
                    rms_norm_eps=1e-6),
         dtype="BF16", shards=2, token_dtype="uint32", n_tokens=80, seed=7,
         run=dict(T=30, stride=17, batch=3, cache=16, sink=4, ratio=0.5)),
    dict(name="f_partial_chunk_uint16",
         why="C=12 S=1 r=.5 (F=11 L=5 step=6), T=27: chunks 12,6,6,3 (partial last); vocab 300 in "
             "uint16; 3 windows in batch 2 (partial last batch)",
         model=dict(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=12),
         dtype="F32", shards=1, token_dtype="uint16", n_tokens=3 * 28,
         run=dict(T=27, batch=2, cache=12, sink=1, ratio=0.5)),
]

NEGATIVE = [
    dict(name="n1_sink_eq_cache", extra=["--cache", "16", "--sink", "16"]),
    dict(name="n2_sink_gt_cache", extra=["--cache", "16", "--sink", "20"]),
]


def cli_args(run):
    a = ["--seq-len", str(run["T"])]
    if run.get("batch") is not None:
        a += ["--batch", str(run["batch"])]
    if run.get("stride") is not None:
        a += ["--stride", str(run["stride"])]
    if run.get("no_freqkv"):
        a += ["--no-freqkv"]
    else:
        for k in ["cache", "sink", "ratio"]:
            if run.get(k) is not None:
                a += ["--" + k, str(run[k])]
    return a


def prepare(case, d):
    cfg = hf_io.make_config(**case["model"])
    mdir = os.path.join(d, "model")
    hf_io.write_model_dir(mdir, cfg, seed=case.get("seed", 0), dtype=case["dtype"], shards=case["shards"])
    rng = np.random.default_rng(100 + case.get("seed", 0))
    toks = rng.integers(0, cfg["vocab_size"], size=case["n_tokens"])
    toks[:3] = [cfg["vocab_size"] - 1, 0, cfg["vocab_size"] - 1]  # extremes of the id range
    tfile = os.path.join(d, "tokens.%s.bin" % case["token_dtype"])
    hf_io.write_tokens(tfile, toks, case["token_dtype"])
    return mdir, tfile


def reference(case, mdir, tfile):
    cfg, params = hf_io.load_model_dir(mdir)  # what is on disk (bf16-rounded where stored so)
    toks = hf_io.read_tokens(tfile, case["token_dtype"])
    run = case["run"]
    return R.eval_loss(cfg, params, toks, run["T"], stride=run.get("stride"), batch=run.get("batch") or 1,
                       freqkv=not run.get("no_freqkv"), cache=run.get("cache"),
                       sink=4 if run.get("sink") is None else run["sink"],
                       ratio=0.5 if run.get("ratio") is None else run["ratio"], grads=True)


def run_cli(binary, args, timeout=300):
    t0 = time.time()
    try:
        p = subprocess.run([binary, "eval-loss"] + args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", "timed out after %ds" % timeout, time.time() - t0
    return p.returncode, p.stdout, p.stderr, time.time() - t0


def parse_json(stdout):
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def compare(case, ref, rc, out, err, gfile):
    row = dict(case=case["name"], ref=ref["loss"], cpp=float("nan"), rel=float("nan"), worst="-",
               gerr=float("nan"), ok=False, notes=[])
    if rc != 0:
        row["notes"].append("CLI exit %s: %s" % (rc, (err.strip().splitlines() or ["(no stderr)"])[-1][:200]))
        return row
    res = parse_json(out)
    if res is None or "loss" not in res:
        row["notes"].append("no JSON line with 'loss' on stdout: %r" % out[-200:])
        return row
    row["cpp"] = float(res["loss"])
    row["rel"] = abs(row["cpp"] - ref["loss"]) / abs(ref["loss"])
    ok = row["rel"] <= LOSS_TOL
    for key in ["windows", "tokens"]:
        if res.get(key) != ref[key]:
            ok = False
            row["notes"].append("%s: cpp %s ref %s" % (key, res.get(key), ref[key]))
    if "ppl" not in res or abs(float(res["ppl"]) - math.exp(ref["loss"])) > LOSS_TOL * math.exp(ref["loss"]):
        ok = False
        row["notes"].append("ppl: cpp %s ref %.6g" % (res.get("ppl"), math.exp(ref["loss"])))
    if not os.path.exists(gfile):
        row["notes"].append("no --grads-out file")
        row["ok"] = False
        return row
    try:
        g, gdt = hf_io.load_safetensors(gfile, with_dtypes=True)
    except Exception as e:  # malformed file
        row["notes"].append("cannot read grads: %r" % e)
        return row
    names_ref, names_cpp = set(ref["grads"]), set(g)
    if names_ref != names_cpp:
        ok = False
        row["notes"].append("names: missing %s extra %s" % (sorted(names_ref - names_cpp), sorted(names_cpp - names_ref)))
    bad_dt = sorted(n for n, dt in gdt.items() if dt != "F32")
    if bad_dt:
        ok = False
        row["notes"].append("non-F32 grads: %s" % bad_dt[:3])
    worst, wname = -1.0, "-"
    for n in sorted(names_ref & names_cpp):
        gr = np.asarray(ref["grads"][n], dtype=np.float64)
        gc = np.asarray(g[n], dtype=np.float64)
        if gc.shape != gr.shape:
            ok = False
            row["notes"].append("%s shape cpp %s ref %s" % (n, gc.shape, gr.shape))
            continue
        den = np.linalg.norm(gr)
        e = np.linalg.norm(gc - gr) / den if den > 0 else np.linalg.norm(gc)
        if not np.isfinite(e):
            e = float("inf")
        if e > worst:
            worst, wname = float(e), n
    row["worst"], row["gerr"] = wname, worst
    if worst > GRAD_TOL or worst < 0:
        ok = False
    row["ok"] = ok
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--freqkv", help="path to the freqkv binary")
    ap.add_argument("--workdir", help="keep the case files here (default: a temporary dir, removed)")
    ap.add_argument("--only", help="comma-separated case-name prefixes to run")
    ap.add_argument("--self-test", action="store_true", help="run the reference self-checks (no binary)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per CLI call")
    args = ap.parse_args()
    if args.self_test:
        import self_test
        return self_test.run_all()
    if not args.freqkv:
        ap.error("--freqkv PATH is required (or --self-test)")
    binary = os.path.abspath(args.freqkv)
    if not os.access(binary, os.X_OK):
        print("error: %s is not an executable" % binary, file=sys.stderr)
        return 2
    work = args.workdir or tempfile.mkdtemp(prefix="freqkv_parity_")
    os.makedirs(work, exist_ok=True)
    only = [s for s in (args.only or "").split(",") if s]
    rows, failed = [], 0
    try:
        for case in CASES:
            if only and not any(case["name"].startswith(o) for o in only):
                continue
            d = os.path.join(work, case["name"])
            os.makedirs(d, exist_ok=True)
            mdir, tfile = prepare(case, d)
            t0 = time.time()
            ref = reference(case, mdir, tfile)
            tref = time.time() - t0
            gfile = os.path.join(d, "grads.safetensors")
            if os.path.exists(gfile):
                os.remove(gfile)
            cli = ["--model", mdir, "--tokens", tfile, "--token-dtype", case["token_dtype"]] + \
                cli_args(case["run"]) + ["--grads-out", gfile]
            rc, out, err, tcpp = run_cli(binary, cli, args.timeout)
            row = compare(case, ref, rc, out, err, gfile)
            row["t"] = "ref %.1fs cpp %.1fs" % (tref, tcpp)
            row["cmd"] = " ".join(["freqkv", "eval-loss"] + cli)
            rows.append(row)
            failed += not row["ok"]
        neg_rows = []
        if not only or any("n".startswith(o) or o.startswith("n") for o in only):
            d = os.path.join(work, "neg")
            os.makedirs(d, exist_ok=True)
            mdir, tfile = prepare(CASES[1], d)
            for neg in NEGATIVE:
                cli = ["--model", mdir, "--tokens", tfile, "--token-dtype", CASES[1]["token_dtype"],
                       "--seq-len", "45"] + neg["extra"]
                rc, out, err, _ = run_cli(binary, cli, args.timeout)
                msg = (err.strip() or out.strip()).splitlines()
                ok = rc not in (0, None) and bool(msg) and (rc < 128 and rc > 0)
                neg_rows.append((neg["name"], rc, msg[-1][:100] if msg else "(no message)", ok))
                failed += not ok
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print("%-24s %13s %13s %9s  %-44s %9s  %s" % ("case", "loss ref", "loss cpp", "rel err",
                                                  "worst gradient tensor", "grad err", "result"))
    print("-" * 132)
    for r in rows:
        print("%-24s %13.8f %13.8f %9.2e  %-44s %9.2e  %s" % (r["case"], r["ref"], r["cpp"], r["rel"], r["worst"],
                                                              r["gerr"], "PASS" if r["ok"] else "FAIL"))
        for n in r["notes"]:
            print("    ! " + n)
    for name, rc, msg, ok in neg_rows:
        print("%-24s exit %-4s %-86s %s" % (name, rc, msg, "PASS" if ok else "FAIL"))
    print("-" * 132)
    print("tolerances: loss rel <= %.0e, per-tensor gradient rel L2 <= %.0e" % (LOSS_TOL, GRAD_TOL))
    for r in rows:
        print("  %s: %s | %s" % (r["case"], next(c["why"] for c in CASES if c["name"] == r["case"]), r["t"]))
    total = len(rows) + len(neg_rows)
    print("parity: %d/%d passed" % (total - failed, total))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
