"""Turn pytest-benchmark JSON into markdown tables of ratios against the published
formulation, and plots.

    python benchmarks/report.py bench.json [--markdown out.md] [--png speedups.png]
                                           [--per-cell-png per_cell.png]

Speed-up = published median time / candidate median time; memory ratio = published peak /
candidate peak, both from the same run and the same inputs (for ActivationDiffusion: the
same family of semantic maps). Values > 1 favour the candidate. Cases the benchmark left
out for this machine's budget (conftest.py records them) are listed with the reason.
"""
from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict

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
        su = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        saved = (_mb(r["saved"]), _ratio(r["saved_ratio"])) if r["mode"] == "forward_backward" else ("-", "-")
        lines.append(f"| {r['shape']} | {r['mode']} | {_name(r, defaults)} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['rounds']} | {su} | {_mb(r['peak'])} | {_ratio(r['peak_ratio'])} | "
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


def diffusion_summary(rows, candidate="scm_structured", mode="forward_backward"):
    """{shape: {family: (speed-up, peak ratio)}} of one candidate against the published stack."""
    out = defaultdict(dict)
    for r in _sorted(rows):
        if r["group"] == "diffusion" and r["candidate"] == candidate and r["mode"] == mode:
            out[r["shape"]][r["family"]] = (r["speedup"], r["peak_ratio"], r["median_s"])
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
        lines += [f"Routes of the p = 16 block accepted at run time: {', '.join(data['large_p_routes'])}; "
                  f"default route per grid ({defaults or 'not known'}) is what `scm_structured` runs.", ""]
    rows = _sorted(rows)
    ops = [r for r in rows if r["group"] != "diffusion"]
    if ops:
        lines += ["## Operators", ""]
        for group in [g for g in GROUP_ORDER if any(r["group"] == g for r in ops)]:
            lines += [f"### {group}", ""] + _table([r for r in ops if r["group"] == group],
                                                     [n for n in not_run if n["group"] == group]) + [""]
    diff = [r for r in rows if r["group"] == "diffusion"]
    if diff:
        families = _families(diff)
        lines += ["## ActivationDiffusion", "",
                  "Forward + backward (loss on both outputs), `scm_structured` (default route) against the "
                  "published stack on the same inputs: speed-up / peak-memory ratio; where the published stack "
                  "did not run, the structured path's time.", "",
                  "| shape | " + " | ".join(FAMILY_TEXT.get(f, f) for f in families) + " | least favourable |",
                  "|---|" + "---:|" * len(families) + "---|"]
        for shape, per in diffusion_summary(diff).items():
            cells = []
            for f in families:
                su, pr, t = per.get(f, (None, None, None))
                cells.append(f"{su:.1f}x / {_ratio(pr)}" if su else
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


def plot_per_cell(rows, path, mode="forward_backward", channels=200):
    """Time per cell (ms / (B * N)) against N, log-log, one panel per family of semantic
    maps, one line per candidate (ActivationDiffusion, C = channels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    diff = [r for r in rows if r["group"] == "diffusion" and r["mode"] == mode and r["channels"] == channels]
    families = _families(diff)
    if not families:
        return
    fig, axes = plt.subplots(1, len(families), figsize=(4.6 * len(families), 4.2), sharey=True, squeeze=False)
    names = sorted({r["candidate"] for r in diff}, key=lambda c: (c != "published", c))
    label = {"scm_structured": "scm_structured (default route)"}
    for ax, family in zip(axes[0], families):
        for name in names:
            pts = sorted((r["n"], r["median_s"] * 1e3 / r["cells"], r["cells"] // r["n"]) for r in diff
                         if r["family"] == family and r["candidate"] == name)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label.get(name, name))
                for n, t, b in pts:
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
    fig.suptitle(f"ActivationDiffusion, {mode.replace('_', ' + ')}, C = {channels}", fontsize=10)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_speedups(rows, path, mode="forward_backward"):
    """Bar plot of every candidate's speed-up over the published stack (ActivationDiffusion,
    one bar group per shape and family; the operators' groups after them)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = defaultdict(dict)
    for r in _sorted(rows):
        if r["speedup"] and r["candidate"] != "published" and r["mode"] == mode:
            label = "\n".join([r["group"], *r["shape"].split(), *([r["family"]] if r["family"] else [])])
            cases[label][r["candidate"]] = r["speedup"]
    if not cases:
        return
    names = sorted({c for v in cases.values() for c in v})
    fig, ax = plt.subplots(figsize=(max(8, 1.0 * len(cases)), 6))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(cases))]
        ax.bar(xs, [v.get(name, 0) for v in cases.values()], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(list(cases), fontsize=6)
    ax.set_yscale("log")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_ylabel(f"speed-up over the published formulation ({mode.replace('_', ' + ')})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--markdown", help="write the tables here too")
    parser.add_argument("--png", help="write a bar plot of the forward + backward speed-ups here")
    parser.add_argument("--per-cell-png", help="write the ActivationDiffusion time per cell against N here")
    args = parser.parse_args(argv)
    data, rows = load_rows(args.json)
    table = markdown(data, with_ratios(rows))
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.png:
        plot_speedups(rows, args.png)
    if args.per_cell_png:
        plot_per_cell(rows, args.per_cell_png)


if __name__ == "__main__":
    main()
