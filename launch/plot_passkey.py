#!/usr/bin/python3
"""Draws the passkey retrieval accuracy written by `freqkv passkey --json` as a heat map:
prompt length across, key depth down, each cell the share of trials answered right.

    /usr/bin/python3 launch/plot_passkey.py RESULTS.json [--out passkey.png]
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="JSON written by freqkv passkey --json")
    ap.add_argument("--out", help="PNG to write (default: the results path with .png)")
    args = ap.parse_args()
    try:
        with open(args.results) as f:
            results = json.load(f)
        lengths, depths, accuracy = results["lengths"], results["depths"], results["accuracy"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"plot_passkey: cannot read {args.results}: {e}")
    if len(accuracy) != len(lengths) or any(len(row) != len(depths) for row in accuracy):
        sys.exit(f"plot_passkey: {args.results}: accuracy is not a {len(lengths)} x {len(depths)} "
                 "table (lengths x depths)")

    # Rows of the image are depths (0 at the top, as the key moves down the prompt), columns lengths.
    grid = [[100.0 * accuracy[li][di] for li in range(len(lengths))] for di in range(len(depths))]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 2.0))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for di in range(len(depths)):
        for li in range(len(lengths)):
            value = grid[di][li]
            ax.text(li, di, f"{value:.0f}", ha="center", va="center",
                    color="white" if value < 20 or value > 80 else "black", fontsize=9)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("depth of the pass key")
    trials = results.get("trials_per_cell", "?")
    ax.set_title(f"passkey retrieval accuracy (%), {trials} trial(s) per cell\n"
                 f"{results.get('attention', '')}", fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(f"plot_passkey: wrote {out}")


if __name__ == "__main__":
    main()
