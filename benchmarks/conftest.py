import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Record the cases left out for this machine's budget, with the reason, beside the
    timings (benchmarks/report.py prints them)."""
    from cases import NOT_RUN, default_large_p_route, large_p_routes
    ran = {(b["extra_info"]["group"], json.dumps({k: v for k, v in b["extra_info"].items()
                                                  if k not in ("group", "candidate", "mode", "peak_bytes",
                                                               "saved_bytes")}, sort_keys=True))
           for b in output_json["benchmarks"]}
    # only the shapes this session ran (a -k or -m selection leaves the others out)
    output_json["not_run"] = [r for r in NOT_RUN if (r["group"], json.dumps(r["shape"], sort_keys=True)) in ran]
    output_json["large_p_routes"] = list(large_p_routes())
    output_json["default_large_p_route"] = {
        f"{h}x{w}": default_large_p_route((h, w)) for h, w in ((14, 14), (28, 28), (56, 56))}
