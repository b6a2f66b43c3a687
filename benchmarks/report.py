"""Turn pytest-benchmark JSON into markdown tables of ratios against the published
formulation, and plots.

    pytest benchmarks/ --benchmark-only -m quick -q      # writes .benchmarks/latest.json
    python benchmarks/report.py                          # reads it
    python benchmarks/report.py [bench.json] [--markdown out.md] [--png speedups.png]
                                [--per-cell-png per_cell.png]

Without a path the report reads .benchmarks/latest.json at the repository root, where
benchmarks/conftest.py sends the JSON of every run not given --benchmark-json.

Speed-up = published median time / candidate median time; memory ratio = published peak /
candidate peak, both from the same run and the same inputs (for ActivationDiffusion: the
same family of semantic maps). Values > 1 favour the candidate. A speed-up is marked when
the candidate or the published reference was timed in fewer than MIN_ROUNDS rounds: the
median of so few rounds moves with whatever else the machine does (one round is a single
sample). Cases that cases.py leaves out on the device that ran (over its time or memory
budget; conftest.py records them) are listed with the reason.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections import defaultdict

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".benchmarks",
                            "latest.json")
MIN_ROUNDS = 5
FEW = "\u2020"   # the mark of a speed-up from fewer than MIN_ROUNDS rounds

GROUP_ORDER = ["cosine", "laplacian", "newton_schulz", "diffusion"]
FAMILY_ORDER = ["signed_iid", "signed_smooth", "positive"]
FAMILY_TEXT = {"signed_iid": "signed i.i.d. (randn)",
               "signed_smooth": "signed, spatially smooth (randn averaged over 5 x 5 cells)",
               "positive": "positive (|randn|)"}
_NOT_SHAPE = ("group", "candidate", "mode", "peak_bytes", "saved_bytes", "maps")


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if k not in _NOT_SHAPE)


def load_rows(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        rows.append(dict(group=info["group"], mode=info["mode"], candidate=info["candidate"],
                         family=info.get("maps"), shape=_shape_text(info),
                         cells=info.get("B", 0) * info.get("H", 0) * info.get("W", 0),
                         n=info.get("H", 0) * info.get("W", 0), channels=info.get("C"),
                         grid=f"{info.get('H')}x{info.get('W')}" if "H" in info else None,
                         median_s=bench["stats"]["median"], rounds=bench["stats"]["rounds"],
                         peak=info.get("peak_bytes"), saved=info.get("saved_bytes")))
    return data, rows


def _key(r):
    return (r["group"], r["mode"], r["shape"], r["family"])


def with_ratios(rows):
    published = {_key(r): r for r in rows if r["candidate"] == "published"}
    for r in rows:
        p = published.get(_key(r))
        r["speedup"] = p["median_s"] / r["median_s"] if p else None
        r["few_rounds"] = r["rounds"] < MIN_ROUNDS or bool(p and p["rounds"] < MIN_ROUNDS)
        for key in ("peak", "saved"):
            ok = p and p.get(key) and r.get(key) and r[key] > 0
            r[key + "_ratio"] = p[key] / r[key] if ok else None
    return rows


def _ratio(v):
    return "-" if not v else (f"{v:.1f}x" if v < 100 else "> 100x")


def _mb(v):
    return f"{v / 2**20:.1f}" if v is not None else "-"


def _name(r, defaults):
    """The candidate, with the route the default structured path takes at its grid."""
    route = (defaults or {}).get(r.get("grid")) if r["candidate"] == "scm_structured" else None
    return f"{r['candidate']} (default: {route})" if route else r["candidate"]


def _table(rows, not_run, defaults=None):
    head = ["shape", "mode", "candidate", "median ms", "rounds", "speed-up", "peak MB", "peak ratio",
            "saved MB", "saved ratio"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for r in rows:
        few = r.get("few_rounds") and r["candidate"] != "published"
        su = f"{r['speedup']:.2f}x" + (FEW if few else "") if r["speedup"] else "-"
        saved = (_mb(r["saved"]), _ratio(r["saved_ratio"])) if r["mode"] == "forward_backward" else ("-", "-")
        lines.append(f"| {r['shape']} | {r['mode']} | {_name(r, defaults)} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['rounds']}{' (few)' if r['rounds'] < MIN_ROUNDS else ''} | {su} | {_mb(r['peak'])} | "
                     f"{_ratio(r['peak_ratio'])} | "
                     f"{saved[0]} | {saved[1]} |")
    for n in not_run:
        shape = n["shape"]
        r = dict(candidate=n["candidate"], grid=f"{shape.get('H')}x{shape.get('W')}" if "H" in shape else None)
        lines.append(f"| {_shape_text(shape)} | both | {_name(r, defaults)} | {n['reason']} |"
                     + " |" * (len(head) - 4))
    return lines


def _sorted(rows):
    def key(r):
        return (GROUP_ORDER.index(r["group"]) if r["group"] in GROUP_ORDER else 9, r["n"], r["cells"],
                r["channels"] or 0, r["shape"], r["mode"], r["candidate"] != "published", r["median_s"])
    return sorted(rows, key=key)


def _families(rows):
    found = {r["family"] for r in rows if r["family"]}
    return [f for f in FAMILY_ORDER if f in found] + sorted(found - set(FAMILY_ORDER))


def _published_rounds(rows, r):
    """Rounds of the published reference a row is compared with (the row's own if none)."""
    for p in rows:
        if p["candidate"] == "published" and _key(p) == _key(r):
            return p["rounds"]
    return r["rounds"]


def diffusion_summary(rows, candidate="scm_structured", mode="forward_backward"):
    """{shape: {family: (speed-up, peak ratio, median s, fewer than MIN_ROUNDS rounds?)}} of one
    candidate against the published stack."""
    out = defaultdict(dict)
    for r in _sorted(rows):
        if r["group"] == "diffusion" and r["candidate"] == candidate and r["mode"] == mode:
            out[r["shape"]][r["family"]] = (r["speedup"], r["peak_ratio"], r["median_s"], r.get("few_rounds"))
    return out


def markdown(data, rows) -> str:
    machine = data.get("machine_info", {})
    when = data.get("datetime", "")
    cpu = machine.get("cpu", {}).get("brand_raw", platform.processor())
    not_run = data.get("not_run", [])
    lines = [f"Measured {when[:16].replace('T', ' ')} UTC on {machine.get('node', '?')} ({cpu}, "
             f"{machine.get('cpu', {}).get('count', '?')} logical CPUs), Python {machine.get('python_version', '?')}; "
             "median of the timed rounds (after one warm-up call); peak memory as described in the README.", ""]
    if data.get("large_p_routes"):
        defaults = ", ".join(f"{g}: {r}" for g, r in (data.get("default_large_p_route") or {}).items())
        if data.get("device") == "cuda":
            runs = ("on CUDA `scm_structured` runs the route measured fastest at its first call "
                    f"(scm_ops/route_choice.py; the static default per grid, {defaults or 'not known'}, "
                    "is the first candidate)")
        else:
            runs = f"default route per grid ({defaults or 'not known'}) is what `scm_structured` runs"
        lines += [f"Routes of the p = 16 block accepted at run time: {', '.join(data['large_p_routes'])}; {runs}.", ""]
    rows = _sorted(rows)
    few = [r for r in rows if r.get("few_rounds") and r["speedup"] and r["candidate"] != "published"]
    with_speedup = [r for r in rows if r["speedup"] and r["candidate"] != "published"]
    if few:
        single = sum(1 for r in few if min(r["rounds"], _published_rounds(rows, r)) == 1)
        lines += [f"**{FEW} {len(few)} of {len(with_speedup)} speed-ups come from fewer than {MIN_ROUNDS} timed "
                  f"rounds** of the candidate or of the published reference"
                  + (f" ({single} from a single round)" if single else "")
                  + ": the median of so few rounds is noisy; treat those speed-ups as indicative and time "
                  "them again before quoting them.", ""]
    ops = [r for r in rows if r["group"] != "diffusion"]
    if ops:
        lines += ["## Operators", ""]
        for group in [g for g in GROUP_ORDER if any(r["group"] == g for r in ops)]:
            lines += [f"### {group}", ""] + _table([r for r in ops if r["group"] == group],
                                                     [n for n in not_run if n["group"] == group]) + [""]
    diff = [r for r in rows if r["group"] == "diffusion"]
    if diff:
        families = _families(diff)
        lines += ["## ActivationDiffusion", ""]
        for mode, what in (("forward_backward", "Forward + backward (loss on both outputs)"),
                           ("forward", "Forward alone (no gradient)")):
            summary = diffusion_summary(diff, mode=mode)
            if not summary:
                continue
            lines += [f"{what}, `scm_structured` (default route) against the published stack on the same "
                      "inputs: speed-up / peak-memory ratio; where the published stack did not run, the "
                      "structured path's time.", "",
                      "| shape | " + " | ".join(FAMILY_TEXT.get(f, f) for f in families) + " | least favourable |",
                      "|---|" + "---:|" * len(families) + "---|"]
            for shape, per in summary.items():
                cells = []
                for f in families:
                    su, pr, t, few = per.get(f, (None, None, None, False))
                    cells.append(f"{su:.1f}x{FEW if few else ''} / {_ratio(pr)}" if su else
                                 (f"published not run ({t * 1e3:.0f} ms)" if t else "-"))
                known = {f: v[0] for f, v in per.items() if v[0]}
                worst = min(known, key=known.get) if known else "-"
                lines.append(f"| {shape} | " + " | ".join(cells) + f" | {worst} |")
            lines.append("")
        for family in families:
            lines += [f"### S0 {FAMILY_TEXT.get(family, family)}", ""]
            lines += _table([r for r in diff if r["family"] == family],
                            [n for n in not_run if n["group"] == "diffusion" and n["shape"].get("maps") == family],
                            data.get("default_large_p_route"))
            lines.append("")
    return "\n".join(lines) + "\n"


def plot_per_cell(rows, path, mode="forward_backward", channels=200) -> list[str]:
    """Time per cell (ms / (B * N)) against N, log-log, one panel per family of semantic
    maps, one line per candidate (ActivationDiffusion, C = channels). Points timed in fewer
    than MIN_ROUNDS rounds are hollow; with a single grid size the figure says that it shows
    one shape only. Returns those notes (empty when there is nothing to plot or say)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    diff = [r for r in rows if r["group"] == "diffusion" and r["mode"] == mode and r["channels"] == channels]
    families = _families(diff)
    if not families:
        return []
    fig, axes = plt.subplots(1, len(families), figsize=(max(6.0, 4.6 * len(families)), 4.8), sharey=True,
                             squeeze=False)
    names = sorted({r["candidate"] for r in diff}, key=lambda c: (c != "published", c))
    label = {"scm_structured": "scm_structured (default route)"}
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    for ax, family in zip(axes[0], families):
        for name in names:
            pts = sorted((r["n"], r["median_s"] * 1e3 / r["cells"], r["cells"] // r["n"], r["rounds"]) for r in diff
                         if r["family"] == family and r["candidate"] == name)
            if pts:
                c = colours[name]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, label=label.get(name, name))
                for n, t, b, rounds in pts:
                    few = rounds < MIN_ROUNDS
                    ax.plot([n], [t], marker="o", ls="", color=c, markerfacecolor="white" if few else c)
                    ax.annotate(f"B={b}", (n, t), textcoords="offset points", xytext=(4, 3), fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["n"] for r in diff}))
        ax.set_xticklabels([str(n) for n in sorted({r["n"] for r in diff})])
        ax.minorticks_off()
        ax.set_title(FAMILY_TEXT.get(family, family), fontsize=9)
        ax.set_xlabel("N = H x W (cells per image)")
        ax.grid(True, which="both", lw=0.3)
    axes[0][0].set_ylabel("ms per cell (median time / (B N))")
    notes = []
    grids = sorted({(r["grid"], r["cells"] // max(1, r["n"])) for r in diff})
    if len({r["n"] for r in diff}) == 1:
        shape = ", ".join(f"{g} (B = {b})" for g, b in grids)
        notes.append(f"The time-per-cell plot has a single grid size, {shape}: it shows one shape only, "
                     "not how the time per cell changes with N (run the full selection for that).")
    if any(r["rounds"] < MIN_ROUNDS for r in diff):
        notes.append(f"Hollow points: timed in fewer than {MIN_ROUNDS} rounds.")
    title = f"ActivationDiffusion, {mode.replace('_', ' + ')}, C = {channels}"
    if len({r["n"] for r in diff}) == 1:
        title += f"\none shape only: a single grid size, {shape}"
        for ax in axes[0]:
            ax.text(0.5, 0.5, "one grid size only:\nno trend in N can be read here", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="0.35", style="italic")
    fig.suptitle(title, fontsize=10)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if any(r["rounds"] < MIN_ROUNDS for r in diff):
        handles.append(Line2D([], [], marker="o", ls="", color="grey", markerfacecolor="white"))
        labels.append(f"hollow: < {MIN_ROUNDS} timed rounds")
    axes[0][-1].legend(handles, labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return notes


def plot_speedups(rows, path, mode="forward_backward") -> list[str]:
    """Bar plot of every candidate's speed-up over the published stack (ActivationDiffusion,
    one bar group per shape and family; the operators' groups after them). Hatched bars:
    the candidate or the published reference was timed in fewer than MIN_ROUNDS rounds.
    Returns a note about those (empty when none)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    cases = defaultdict(dict)
    for r in _sorted(rows):
        if r["speedup"] and r["candidate"] != "published" and r["mode"] == mode:
            label = "\n".join([r["group"], *r["shape"].split(), *([r["family"]] if r["family"] else [])])
            cases[label][r["candidate"]] = (r["speedup"], r.get("few_rounds", False))
    if not cases:
        return []
    names = sorted({c for v in cases.values() for c in v})
    fig, ax = plt.subplots(figsize=(max(8, 1.0 * len(cases)), 6))
    width = 0.8 / max(1, len(names))
    any_few = False
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(cases))]
        values = [v.get(name, (0, False)) for v in cases.values()]
        bars = ax.bar(xs, [v[0] for v in values], width, label=name, color=f"C{i}")
        for bar, (_, few) in zip(bars, values):
            if few:
                bar.set_hatch("///")
                bar.set_edgecolor("black")
                any_few = True
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(list(cases), fontsize=6)
    ax.set_yscale("log")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_ylabel(f"speed-up over the published formulation ({mode.replace('_', ' + ')})")
    handles = [Patch(facecolor=f"C{i}", label=name) for i, name in enumerate(names)]
    labels = list(names)
    if any_few:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///"))
        labels.append(f"hatched: < {MIN_ROUNDS} timed rounds (noisy)")
    ax.legend(handles, labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [f"Hatched bars in the speed-up plot: fewer than {MIN_ROUNDS} timed rounds."] if any_few else []


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="?", default=DEFAULT_JSON,
                        help=f"pytest-benchmark JSON (default: {os.path.relpath(DEFAULT_JSON)}, where "
                             "`pytest benchmarks/ --benchmark-only` writes when not given --benchmark-json)")
    parser.add_argument("--markdown", help="write the tables here too")
    parser.add_argument("--png", help="write a bar plot of the forward + backward speed-ups here")
    parser.add_argument("--per-cell-png", help="write the ActivationDiffusion time per cell against N here")
    args = parser.parse_args(argv)
    if not os.path.exists(args.json):
        sys.exit(f"report.py: no benchmark JSON at {args.json}. Run `pytest benchmarks/ --benchmark-only` "
                 "(add `-m quick` for the quick selection) first: it writes there; or pass a JSON path.")
    data, rows = load_rows(args.json)
    table = markdown(data, with_ratios(rows))
    notes = []
    if args.png:
        notes += [f"{args.png}: {n}" for n in plot_speedups(rows, args.png)]
    if args.per_cell_png:
        notes += [f"{args.per_cell_png}: {n}" for n in plot_per_cell(rows, args.per_cell_png)]
    if notes:
        table += "\n## Plots\n\n" + "".join(f"- {n}\n" for n in notes)
    shown = os.path.relpath(args.json)
    print(f"(from {args.json if shown.startswith('..') else shown})\n")
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
