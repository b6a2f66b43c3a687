"""Mean and spread over seeds of the example's metrics.json files, as a markdown table.

    python examples/summarize.py runs/full-seed*/metrics.json
"""
import json
import sys

import numpy as np

KEYS = ("top1_cls", "top1_loc", "gt_known_loc", "maxboxacc_v2")
ROWS = ("baseline", "scm", "pretrained", "whole_image_box", "centred_box", "untrained")


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    seeds = ", ".join(str(r["seed"]) for r in runs)
    print(f"{runs[0]['mode']} mode, seeds {seeds}: mean +- std (min to max) over {len(runs)} runs\n")
    print("| | " + " | ".join(KEYS) + " |")
    print("|---|" + "---:|" * len(KEYS))
    for row in [r for r in ROWS if all(r in run["results"] for run in runs)] + ["scm - baseline"]:
        cells = []
        for k in KEYS:
            if row == "scm - baseline":  # paired by seed: both fine-tune the same backbone
                v = np.array([r["results"]["scm"][k] - r["results"]["baseline"][k] for r in runs])
            else:
                v = np.array([r["results"][row][k] for r in runs])
            cells.append(f"{v.mean():.1f} +- {v.std():.1f} ({v.min():.1f} to {v.max():.1f})")
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
