"""TS-CAM baseline against SCM over many seeds, paired: one command.

    python examples/study.py                        # seeds 0-7, study mode; writes docs/example_study.json
    python examples/study.py --seeds 0-1 --runs runs/val --json runs/val/study.json -- --val-size 400 --lr 5e-4

Each seed runs `examples/train_wsol.py --mode study --seed S --threads 1 --out RUNS/seedS`
(both models fine-tune the same backbone on the same data order, schedule and steps; one
thread, so a rerun gives the same numbers), one after another or --jobs at a time. A seed
whose RUNS/seedS/metrics.json exists from the same command is not run again, so an
interrupted study resumes. Arguments after `--` go to every seed's command (e.g. --val-size N
to evaluate on a validation split carved out of the training images, for choosing a
recipe). Writes the JSON (per seed: seed, command, results as in metrics.json; SCM - baseline
in GT-known Loc, mean and a bootstrap 95 % interval over seeds), PREFIX.png, the training
histories of all seeds (examples/summarize.py plot_training), and PREFIX_maps.png, F0 and F
of a held-out image over the first seed's training (plot_probe_maps).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def parse_seeds(text: str) -> list[int]:
    """'0-7' -> [0, ..., 7]; '0,3,5' -> [0, 3, 5]."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    if not seeds:
        raise ValueError(f"--seeds must name at least one seed, got {text!r}")
    return seeds


def bootstrap_ci(values, resamples: int = 10000, seed: int = 0) -> list[float]:
    """The 2.5 and 97.5 percentiles of the mean of `values` resampled with replacement."""
    v = np.asarray(values, dtype=float)
    means = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def seed_command(seed: int, runs: str, extra: list[str]) -> str:
    return " ".join(["python examples/train_wsol.py --mode study", f"--seed {seed}", "--threads 1",
                     *map(shlex.quote, extra), f"--out {os.path.join(runs, f'seed{seed}')}"])


def done(out: str, command: str) -> bool:
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path) or not os.path.exists(os.path.join(out, "command.txt")):
        return False
    return open(os.path.join(out, "command.txt")).read().strip() == command


def run_seeds(seeds, runs, extra, jobs):
    """Runs the seeds' commands not yet done, `jobs` at a time, each logging to RUNS/seedS.log."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    pending = [s for s in seeds if not done(os.path.join(runs, f"seed{s}"), seed_command(s, runs, extra))]
    running = {}
    while pending or running:
        while pending and len(running) < jobs:
            s = pending.pop(0)
            command = seed_command(s, runs, extra)
            out = os.path.join(runs, f"seed{s}")
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(runs, f"seed{s}.log"), "w")
            argv = [sys.executable] + shlex.split(command)[1:]
            running[s] = (subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                          command, out, time.time())
            print(f"seed {s}: {command}", flush=True)
        for s, (proc, command, out, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[s]
            if proc.returncode != 0:
                raise SystemExit(f"seed {s} failed (exit {proc.returncode}): see {runs}/seed{s}.log")
            with open(os.path.join(out, "command.txt"), "w") as f:
                f.write(command + "\n")
            print(f"seed {s}: done in {time.time() - t0:.0f} s", flush=True)
        time.sleep(1)


def summarize(seeds, runs, extra):
    """The study's JSON dict from the seeds' metrics.json files."""
    entries, spreading, metrics = [], {}, []
    for s in seeds:
        m = json.load(open(os.path.join(runs, f"seed{s}", "metrics.json")))
        metrics.append(m)
        entries.append(dict(seed=s, command=seed_command(s, runs, extra), results=m["results"]))
        spreading[str(s)] = {name: {k: v for k, v in m["history"][name]["probe"][-1].items() if k != "step"}
                             for name in ("baseline", "scm")}
        spreading[str(s)]["scm"]["lam"] = m["history"]["scm"]["lam"][-1]
        spreading[str(s)]["scm"]["beta"] = m["history"]["scm"]["beta"][-1]

    def differences(key):       # SCM minus baseline, per seed
        return [e["results"]["scm"][key] - e["results"]["baseline"][key] for e in entries]

    def paired(key):
        d = differences(key)
        return dict(mean=round(float(np.mean(d)), 2), ci95=[round(v, 2) for v in bootstrap_ci(d)])

    def per_seed(key):
        d = [round(v, 2) for v in differences(key)]
        return dict(per_seed=d, scm_above=int(sum(v > 0 for v in d)))

    m = metrics[0]
    recipe = (f"{m['mode']} mode: {m['train_images']} training images, {m['epochs']} epochs, batch "
              f"{m['batch_size']}, AdamW LR {m['lr']:g} ({m['schedule']} schedule), weight decay "
              f"{m['weight_decay']} except on 1-D parameters and biases, initial lam {m['scm_init']['lam']} "
              f"and beta {m['scm_init']['beta']}; evaluated on {m['test_images']} {m['eval_split']} images")
    return dict(seeds=entries, paired_gt_known_loc=paired("gt_known_loc"), recipe=recipe,
                paired_top1_cls=paired("top1_cls"), paired_maxboxacc_v2=paired("maxboxacc_v2"),
                paired_per_seed={k: per_seed(k) for k in ("gt_known_loc", "top1_cls", "maxboxacc_v2")},
                final_spreading=spreading,
                note="paired: SCM minus baseline, the mean over seeds (paired_per_seed: each seed's, and "
                     "in how many SCM is above); ci95: bootstrap over seeds (10000 resamples of "
                     "the mean); final_spreading: the last probe of each model's training on held-out "
                     "images (share of the top-k patches of F0, of F after each block, of F0 * S0[c] "
                     "in the box) and SCM's final lam and beta"), metrics


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-7"), help="e.g. 0-7 or 0,2,5")
    parser.add_argument("--runs", default="runs/study", help="folder of the seeds' runs")
    parser.add_argument("--json", default="docs/example_study.json", help="where the study's JSON goes")
    parser.add_argument("--figure", default=None, help="training-history figure (default: the JSON's path "
                        "with .png)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (one thread each)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    t0 = time.time()
    run_seeds(args.seeds, args.runs, extra, args.jobs)
    study, metrics = summarize(args.seeds, args.runs, extra)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(study, f, indent=1)
    from summarize import plot_probe_maps, plot_training
    figure = args.figure or os.path.splitext(args.json)[0] + ".png"
    plot_training(metrics, figure)
    maps = os.path.splitext(figure)[0] + "_maps.png"
    plot_probe_maps(os.path.join(args.runs, f"seed{args.seeds[0]}"), maps)
    p, q = study["paired_gt_known_loc"], study["paired_per_seed"]["gt_known_loc"]
    print(f"{study['recipe']}\nSCM - baseline, GT-known Loc, over seeds {args.seeds}: mean {p['mean']:+.2f}, "
          f"95 % CI [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}], per seed {q['per_seed']}; SCM above in "
          f"{q['scm_above']} of {len(args.seeds)}\nwrote {args.json}, {figure} and {maps} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
