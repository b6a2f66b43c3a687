"""Mean and spread over seeds of the example's metrics.json files, and SCM - baseline paired
by seed (both fine-tune the same backbone on the same data order), as markdown tables; with
--plot PATH, their training histories (plot_training).

    python examples/summarize.py runs/full-seed*/metrics.json
    python examples/summarize.py runs/study/seed*/metrics.json --plot training.png
"""
import json
import os
import sys

import numpy as np

KEYS = ("top1_cls", "top1_loc", "gt_known_loc", "maxboxacc_v2")
ROWS = ("baseline", "scm", "pretrained_f0", "whole_image_box", "centred_box", "untrained")


def _cell(values):
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.1f} +- {v.std():.1f} ({v.min():.1f} to {v.max():.1f})"


def plot_training(runs, path):
    """One figure of the training histories of metrics.json dicts `runs` (one line per run,
    thin; the mean over runs, thick): the loss of both models; each SCM block's lam and beta;
    the spreading on held-out images (share of the top-k patches in the box, k the box's patch
    count) of the baseline's F0, the SCM model's F0 and F after each block, and both
    inference maps F0 * S0[c]. Writes `path` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in runs if "history" in r and "scm" in r["history"]]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def lines(ax, xs, ys, label, colour, ls="-"):
        for y in ys:
            ax.plot(xs, y, color=colour, lw=0.5, alpha=0.35, ls=ls)
        ax.plot(xs, np.mean(ys, 0), color=colour, lw=2, label=label, ls=ls)

    steps = runs[0]["history"]["scm"]["step"]
    for i, name in enumerate(("baseline", "scm")):
        loss = np.array([r["history"][name]["loss"] for r in runs])
        k = max(1, len(steps) // 25)   # a running mean over k steps
        smooth = np.array([np.convolve(v, np.ones(k) / k, mode="valid") for v in loss])
        lines(axes[0], steps[k - 1:], smooth, {"baseline": "TS-CAM baseline", "scm": "SCM"}[name], colours[i])
    axes[0].set(title="training loss (running mean)", xlabel="step")
    for key, ax in (("lam", axes[1]), ("beta", axes[2])):
        values = np.array([r["history"]["scm"][key] for r in runs])   # [runs, steps, blocks]
        for b in range(values.shape[2]):
            lines(ax, steps, values[:, :, b], f"block {b + 1}", colours[b])
        ax.set(title=f"SCM: {key} per block", xlabel="step")
    ax = axes[3]
    probe_steps = [p["step"] for p in runs[0]["history"]["scm"]["probe"]]

    def probes(name, pick):
        return np.array([[pick(p) for p in r["history"][name]["probe"]] for r in runs])

    lines(ax, probe_steps, probes("baseline", lambda p: p["f0"]), "baseline F0", colours[0])
    lines(ax, probe_steps, probes("baseline", lambda p: p["map"]), "baseline F0*S0[c]", colours[0], ":")
    lines(ax, probe_steps, probes("scm", lambda p: p["f0"]), "SCM F0", colours[1])
    blocks = len(runs[0]["history"]["scm"]["probe"][0]["f"])
    for b in range(blocks):
        lines(ax, probe_steps, probes("scm", lambda p: p["f"][b]), f"SCM F after block {b + 1}", colours[2 + b], "--")
    lines(ax, probe_steps, probes("scm", lambda p: p["map"]), "SCM F0*S0[c]", colours[1], ":")
    ax.set(title="held-out: share of top-k patches in the box", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    r = runs[0]
    fig.suptitle(f"{r['mode']} mode, {len(runs)} run(s) (seeds {', '.join(str(x['seed']) for x in runs)}): "
                 f"LR {r['lr']:g} ({r.get('schedule', 'cosine')}), batch {r.get('batch_size', 64)}, "
                 f"{r['epochs']} epoch(s); thin: each run, thick: mean", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_probe_maps(run_dir, path, image=0, rows=4):
    """F0 against F over training, from a run folder's probe_maps.npz: for one held-out image,
    one row per probe step (`rows` of them, first to last), the image with its box, the
    baseline's F0, the SCM model's F0 and F after each block (each panel min-max scaled, the
    box drawn at patch scale). Writes `path` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    data = np.load(os.path.join(run_dir, "probe_maps.npz"))
    steps = sorted(int(k.split("step")[1]) for k in data.files if k.startswith("scm_step"))
    picked = [steps[round(i * (len(steps) - 1) / max(1, rows - 1))] for i in range(min(rows, len(steps)))]
    img, box = data["images"][image].transpose(1, 2, 0), data["boxes"][image]
    size = img.shape[0]
    blocks = data[f"scm_step{steps[0]}"].shape[1] - 1
    names = ["image, box", "baseline F0", "SCM F0"] + [f"SCM F, block {b + 1}" for b in range(blocks)]
    fig, axes = plt.subplots(len(picked), len(names), figsize=(1.9 * len(names), 2.0 * len(picked)), squeeze=False)
    for r, step in enumerate(picked):
        base, scm = data[f"baseline_step{step}"][image].astype(float), data[f"scm_step{step}"][image].astype(float)
        panels = [None, base[0], scm[0], *scm[1:]]
        for c, (ax, panel) in enumerate(zip(axes[r], panels)):
            if panel is None:
                ax.imshow(np.clip(img, 0, 1))
                scale = 1.0
            else:
                ax.imshow((panel - panel.min()) / max(panel.max() - panel.min(), 1e-12), cmap="viridis")
                scale = panel.shape[0] / size
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0 * scale - 0.5, y0 * scale - 0.5), (x1 - x0 + 1) * scale, (y1 - y0 + 1) * scale,
                                   fill=False, color="#ff3b30", lw=1.2))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c], fontsize=8)
        axes[r][0].set_ylabel(f"step {step}", fontsize=8)
    fig.suptitle(f"{os.path.basename(os.path.normpath(run_dir))}: a held-out image over training "
                 f"(each map min-max scaled; red: the object's box)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv):
    plot = None
    if "--plot" in argv:
        i = argv.index("--plot")
        plot, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    paths = argv
    if not paths:
        raise SystemExit("usage: summarize.py runs/full-seed*/metrics.json [--plot PATH]")
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
    if plot:
        plot_training(runs, plot)
        print(f"wrote {plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
