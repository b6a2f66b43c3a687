"""Turn pytest-benchmark JSON into a markdown table of ratios against the published
formulation (and a PNG plot).

    python benchmarks/report.py bench.json [--markdown out.md] [--png out.png]

Speed-up = published median time / candidate median time; memory ratio = published peak /
candidate peak, both from the same run. Values > 1 favour the candidate.
"""
from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict


def load_rows(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        shape = {k: v for k, v in info.items()
                 if k not in ("group", "candidate", "mode", "peak_bytes", "saved_bytes")}
        rows.append(dict(group=info["group"], mode=info["mode"], candidate=info["candidate"],
                         shape=" ".join(f"{k}={v}" for k, v in shape.items()),
                         median_s=bench["stats"]["median"], peak=info.get("peak_bytes"),
                         saved=info.get("saved_bytes")))
    return data, rows


def with_ratios(rows):
    published = {(r["group"], r["mode"], r["shape"]): r for r in rows if r["candidate"] == "published"}
    for r in rows:
        p = published.get((r["group"], r["mode"], r["shape"]))
        r["speedup"] = p["median_s"] / r["median_s"] if p else None
        for key in ("peak", "saved"):
            ok = p and p.get(key) and r.get(key) and r[key] > 0
            r[key + "_ratio"] = p[key] / r[key] if ok else None
    return rows


def markdown(data, rows) -> str:
    machine = data.get("machine_info", {})
    when = data.get("datetime", "")
    cpu = machine.get("cpu", {}).get("brand_raw", platform.processor())
    lines = [f"Measured {when[:10]} on {machine.get('node', '?')} ({cpu}); "
             f"median of the timed rounds; peak memory as described in the README.", "",
             "| group | shape | mode | candidate | median ms | speed-up | peak MB | peak ratio "
             "| saved MB | saved ratio |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    order = ["cosine", "laplacian", "newton_schulz", "diffusion"]
    for r in sorted(rows, key=lambda r: (order.index(r["group"]) if r["group"] in order else 9,
                                         r["shape"], r["mode"], r["candidate"] != "published", r["median_s"])):
        def ratio(v):
            return "-" if not v else (f"{v:.1f}x" if v < 100 else "> 100x")

        def mb(v):
            return f"{v / 2**20:.1f}" if v is not None else "-"

        su = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        saved = (mb(r["saved"]), ratio(r["saved_ratio"])) if r["mode"] == "forward_backward" else ("-", "-")
        lines.append(f"| {r['group']} | {r['shape']} | {r['mode']} | {r['candidate']} | "
                     f"{r['median_s'] * 1e3:.1f} | {su} | {mb(r['peak'])} | {ratio(r['peak_ratio'])} | "
                     f"{saved[0]} | {saved[1]} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = defaultdict(dict)
    for r in rows:
        if r["speedup"]:
            label = "\n".join([r["group"], *r["shape"].split(), r["mode"]])
            cases[label][r["candidate"]] = r["speedup"]
    names = sorted({c for v in cases.values() for c in v})
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cases)), 6))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(cases))]
        ax.bar(xs, [v.get(name, 0) for v in cases.values()], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(list(cases), fontsize=7)
    ax.set_yscale("log")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_ylabel("speed-up over the published formulation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--markdown", help="write the table here too")
    parser.add_argument("--png", help="write a bar plot of the speed-ups here")
    args = parser.parse_args(argv)
    data, rows = load_rows(args.json)
    table = markdown(data, with_ratios(rows))
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
