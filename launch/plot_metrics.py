#!/usr/bin/python3
"""Plots a freqkv metrics file (JSON lines) to PNG: training loss (and learning rate) by step,
and validation loss by step.

    /usr/bin/python3 launch/plot_metrics.py RUN_DIR/metrics.jsonl [--out loss.png]
"""
import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", help="metrics.jsonl written by freqkv train")
    ap.add_argument("--out", help="PNG to write (default: next to the metrics file, loss.png)")
    args = ap.parse_args()
    train, val = {}, {}
    try:
        with open(args.metrics) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{args.metrics}:{n}: not a JSON line ({e})")
                if "loss" in rec:  # a resumed run rewrites later steps: the last record wins
                    train[rec["step"]] = (rec["loss"], rec.get("lr", float("nan")))
                if "val_loss" in rec:
                    val[rec["step"]] = rec["val_loss"]
    except OSError as e:
        sys.exit(f"cannot read {args.metrics}: {e}")
    if not train:
        sys.exit(f"{args.metrics} holds no training steps")
    out = args.out or (args.metrics.rsplit("/", 1)[0] + "/loss.png" if "/" in args.metrics else "loss.png")

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    steps = sorted(train)
    ax_loss.plot(steps, [train[s][0] for s in steps], label="train loss", lw=1.2)
    if val:
        vs = sorted(val)
        ax_loss.plot(vs, [val[s] for s in vs], "o-", label="validation loss", lw=1.5)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_loss.set_title(args.metrics)
    ax_lr.plot(steps, [train[s][1] for s in steps], color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot_metrics: {len(steps)} steps, {len(val)} validations -> {out}")


if __name__ == "__main__":
    main()
