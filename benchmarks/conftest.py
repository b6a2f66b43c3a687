"""Benchmark set-up: every run writes its JSON, and the JSON says which cases were left out.

Without --benchmark-json, the timings go to .benchmarks/latest.json at the repository root,
the file `python benchmarks/report.py` reads when given no path:

    pytest benchmarks/ --benchmark-only -m quick -q
    python benchmarks/report.py
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

DEFAULT_JSON = Path(__file__).resolve().parent.parent / ".benchmarks" / "latest.json"


def pytest_configure(config):
    """--benchmark-json defaults to DEFAULT_JSON (runs before pytest-benchmark reads it)."""
    if getattr(config.option, "benchmark_json", "absent") is None:
        DEFAULT_JSON.parent.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = DEFAULT_JSON


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Beside the timings: the cases cases.py leaves out on this device, with the reason
    (benchmarks/report.py prints them), and the routes of the p = 16 block."""
    from cases import DEVICE, NOT_RUN, default_large_p_route, large_p_routes
    ran = {(b["extra_info"]["group"], json.dumps({k: v for k, v in b["extra_info"].items()
                                                  if k not in ("group", "candidate", "mode", "peak_bytes",
                                                               "saved_bytes")}, sort_keys=True))
           for b in output_json["benchmarks"]}
    # only at the shapes this run timed (a -k or -m selection leaves the others out)
    output_json["not_run"] = [r for r in NOT_RUN if (r["group"], json.dumps(r["shape"], sort_keys=True)) in ran]
    output_json["large_p_routes"] = list(large_p_routes())
    output_json["device"] = DEVICE.type
    output_json["default_large_p_route"] = {
        f"{h}x{w}": default_large_p_route((h, w)) for h, w in ((14, 14), (28, 28), (56, 56))}
