#!/usr/bin/python3
"""The inference commands split by tensor parallelism print what one rank prints:

  - `mpirun -np 2 freqkv generate --tp 2` the same token ids (greedy and sampled) as one rank;
  - `freqkv eval --tp 2` the same tables (fp64: identical text but for the seconds column; fp32:
    every perplexity in the JSON within 1e-5);
  - `freqkv passkey --tp 2` the same table and answers;
  - only rank 0 prints, and the errors (world != --tp, heads not divisible by --tp) name the fix.

A model directory (vocabulary 260, so that the byte tokenizer fits), a token file and a prompt
are made here.

    /usr/bin/python3 tests/cli_inference_tp_check.py --freqkv build/freqkv --mpirun mpirun [--np4]
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

FAILURES = []


def run(cmd, expect_ok=True):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if expect_ok and proc.returncode != 0:
        sys.exit(f"FAILED: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc


def check(ok, what):
    print(f"{'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        FAILURES.append(what)


def without_seconds(table):
    """The eval table with its last column (seconds) dropped from the rows that have it."""
    lines = []
    for line in table.splitlines():
        fields = line.split()
        if fields and fields[0].isdigit() and "." in fields[-1] and len(fields) >= 5:
            fields = fields[:-1]
        lines.append(" ".join(fields))
    return lines


def ppl_values(result):
    """Every perplexity in an eval JSON, flattened in a fixed order."""
    out = []
    for entry in result["lengths"]:
        for mode in ("freqkv", "full"):
            if mode in entry:
                out.append(entry[mode]["ppl"])
                out.extend(b["ppl"] for b in entry[mode]["buckets"] if b["ppl"] is not None)
    return np.array(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--freqkv", required=True)
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--np4", action="store_true", help="also --tp 4 on 4 ranks")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = hf_io.make_config(vocab_size=260, hidden_size=16, intermediate_size=24,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=4, max_position_embeddings=12)
        model = os.path.join(tmp, "model")
        hf_io.write_model_dir(model, cfg, seed=3)
        rng = np.random.default_rng(4)
        tokens = os.path.join(tmp, "tokens.bin")
        hf_io.write_tokens(tokens, rng.integers(0, 260, size=300), "uint16")
        prompt = os.path.join(tmp, "prompt.txt")
        with open(prompt, "w") as f:
            f.write(" ".join(str(t) for t in rng.integers(0, 260, size=17)))
        cache = ["--cache", "12", "--sink", "2", "--ratio", "0.5"]
        tps = [2] + ([4] if args.np4 else [])

        def mpi(np_, cmd):
            return [args.mpirun, "-np", str(np_), "--oversubscribe"] + cmd

        # generate: greedy and sampled, token ids on stdout.
        for name, extra in [("greedy", ["--greedy"]),
                            ("sampled", ["--temperature", "1.3", "--top-k", "50", "--seed", "7"])]:
            cmd = [args.freqkv, "generate", "--model", model, "--prompt-tokens", prompt,
                   "--max-new-tokens", "40", "--print-ids"] + cache + extra
            want = run(cmd).stdout
            for tp in [2]:  # the model's 2 kv heads divide by 2 only
                got = run(mpi(tp, cmd + ["--tp", str(tp)])).stdout
                check(got == want and len(want.split()) == 40,
                      f"generate {name} --tp {tp}: the same 40 tokens as one rank "
                      f"({' '.join(want.split()[:8])} ...)")

        # eval: fp64 tables identical but for the seconds; fp32 perplexities within 1e-5.
        for precision in ("fp64", "fp32"):
            json_one = os.path.join(tmp, f"eval_{precision}_1.json")
            cmd = [args.freqkv, "eval", "--model", model, "--tokens", tokens, "--lengths", "24,40",
                   "--stride", "16", "--max-windows", "5", "--compare-full", "--buckets", "3",
                   "--precision", precision] + cache
            want = run(cmd + ["--json", json_one])
            json_tp = os.path.join(tmp, f"eval_{precision}_2.json")
            got = run(mpi(2, cmd + ["--tp", "2", "--json", json_tp]))
            a, b = ppl_values(json.load(open(json_one))), ppl_values(json.load(open(json_tp)))
            err = float(np.max(np.abs(a - b) / np.abs(a))) if a.shape == b.shape else np.inf
            if precision == "fp64":
                check(without_seconds(got.stdout) == without_seconds(want.stdout),
                      "eval fp64 --tp 2: the same table as one rank (seconds aside)")
            check(err <= (1e-12 if precision == "fp64" else 1e-5),
                  f"eval {precision} --tp 2: {len(a)} perplexities within {err:.1e} of one rank")
            check(got.stdout.count("perplexity, freqkv protocol") == 1,
                  f"eval {precision} --tp 2: only rank 0 prints")

        # passkey with the byte tokenizer: the same table and answers.
        json_one, json_tp = os.path.join(tmp, "pk1.json"), os.path.join(tmp, "pk2.json")
        cmd = [args.freqkv, "passkey", "--model", model, "--tokenizer", "bytes", "--lengths",
               "300,400", "--depths", "0,1", "--trials", "1", "--max-new-tokens", "6"] + cache
        want = run(cmd + ["--json", json_one])
        got = run(mpi(2, cmd + ["--tp", "2", "--json", json_tp]))
        answers = lambda path: [t["generated"] for t in json.load(open(path))["trials"]]
        check(got.stdout == want.stdout and answers(json_one) == answers(json_tp),
              "passkey --tp 2: the same table and generated answers as one rank")

        # Errors name the problem and the fix.
        base = [args.freqkv, "generate", "--model", model, "--prompt-tokens", prompt,
                "--max-new-tokens", "2", "--print-ids"] + cache
        proc = run(mpi(2, base + ["--tp", "1"]), expect_ok=False)
        check(proc.returncode != 0 and "mpirun -np equal to --tp" in proc.stderr,
              "generate --tp 1 on 2 ranks: refused, naming mpirun -np")
        if args.np4:
            proc = run(mpi(4, base + ["--tp", "4"]), expect_ok=False)
            check(proc.returncode != 0 and "num_key_value_heads" in proc.stderr
                  and "--tp 4" in proc.stderr,
                  "generate --tp 4 with 2 kv heads: refused, naming the heads and --tp")
        print(f"{len(FAILURES)} failed")
        return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
