"""Mean and spread over seeds of the example's metrics.json files, and SCM - baseline paired
by seed (both fine-tune the same backbone on the same data order), as markdown tables.

    python examples/summarize.py runs/full-seed*/metrics.json
"""
import json
import sys

import numpy as np

KEYS = ("top1_cls", "top1_loc", "gt_known_loc", "maxboxacc_v2")
ROWS = ("baseline", "scm", "pretrained_f0", "whole_image_box", "centred_box", "untrained")


def _cell(values):
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.1f} +- {v.std():.1f} ({v.min():.1f} to {v.max():.1f})"


def main(paths):
    if not paths:
        raise SystemExit("usage: summarize.py runs/full-seed*/metrics.json")
    runs = sorted((json.load(open(p)) for p in paths), key=lambda r: r["seed"])
    seeds = ", ".join(str(r["seed"]) for r in runs)
    print(f"{runs[0]['mode']} mode, {runs[0].get('dataset', 'synthetic')}, seeds {seeds}: "
          f"mean +- std (min to max) over {len(runs)} runs\n")
    print("| | " + " | ".join(KEYS) + " |")
    print("|---|" + "---:|" * len(KEYS))
    for row in [r for r in ROWS if all(r in run["results"] for run in runs)]:
        cells = [_cell([r["results"][row][k] for r in runs]) if all(k in r["results"][row] for r in runs) else "-"
                 for k in KEYS]
        print(f"| {row} | " + " | ".join(cells) + " |")
    diffs = {k: [r["results"]["scm"][k] - r["results"]["baseline"][k] for r in runs] for k in KEYS}
    print("| scm - baseline, paired | " + " | ".join(_cell(diffs[k]) for k in KEYS) + " |")
    print("\nper seed, GT-known Loc: baseline / SCM / difference\n")
    print("| seed | baseline | SCM | SCM - baseline |")
    print("|---:|---:|---:|---:|")
    for r in runs:
        b, s = r["results"]["baseline"]["gt_known_loc"], r["results"]["scm"]["gt_known_loc"]
        print(f"| {r['seed']} | {b:.1f} | {s:.1f} | {s - b:+.1f} |")
    wins = sum(d > 0 for d in diffs["gt_known_loc"])
    print(f"\nSCM above the baseline in GT-known Loc in {wins} of {len(runs)} seeds")


if __name__ == "__main__":
    main(sys.argv[1:])
