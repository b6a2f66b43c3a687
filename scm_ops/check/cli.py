"""Self-check of scm_ops on this machine: the Triton kernels against the PyTorch path.

    python -m scm_ops.check [--quick] [--only GROUP ...] [--budget-s S] [--json FILE]
    scm-ops-check ...                       (the same, installed as a console script)

Prints the device, its compute capability and the versions (torch, triton, scm_ops,
Python), then one line per check, PASS or FAIL with its numbers (SKIP where a check cannot
run here, and why). Groups, in order (--only selects some):

- operators: cosine_similarity, spatial_semantic_laplacian (4 and 8 neighbours) and
  newton_schulz_inverse (both gradient semantics), forward and backward, float32, float64
  and bfloat16 where the device has it: backend="triton" against a float64 reference,
  within the operator tests' tolerance or twice the error of backend="torch"; two
  identical runs give identical bits; a float32 cosine row whose squared norm is subnormal.
- layouts: every operator and ActivationDiffusion on non-contiguous inputs (transposed
  views, channels_last, expanded batches) against a contiguous copy, both backends.
- diffusion: ActivationDiffusion on backend="triton" against backend="torch" (both
  outputs and the gradients to F0, S0, lam and beta), every large-p route (chebyshev,
  spectral, newton_schulz), both gradient semantics, 4 and 8 neighbours, float32 and
  float64 (bfloat16 where the device has it, default route), grids 1 x N, 7 x 9, 14 x 14
  and the largest grids one program holds; repeated runs must give identical bits.
- reference: ActivationDiffusion in float32, both backends, against the published stack
  in float64 (scm_ops.reference).
- launches: every kernel of the AOT tables ran, and every launch was a configuration that
  python -m scm_ops.aot compiles and checks (kernel, input dtype, constexprs, warps, stages).
- resources: registers and spills of each compiled kernel that ran (CUDA; read from
  Triton's compiled kernels, where this Triton version exposes them).
- timing: forward and forward + backward of ActivationDiffusion per large-p route on both
  backends, B = 64, C = 200, 14 x 14, float32 (not a check).

On a CUDA device the full set runs. Without one the Triton kernels run in Triton's CPU
interpreter (TRITON_INTERPRET=1, set here before triton is imported when unset) and the
quick set runs: small shapes, blocks of p = (7, 2) instead of (16, 4, 4, 4) (the p = 7
block still takes the large-p route), one configuration per route and grid, about a minute.
The interpreter checks the kernels' arithmetic, not their behaviour on a GPU. --quick
selects the quick set on a GPU too.

Exit status: 0 when every check passes, 1 when one fails, 2 when the check cannot run
(triton missing, or neither CUDA nor the interpreter available).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import torch

from .kernels import check_launches, check_resources, recording_launches
from .operators import check_layouts, check_operators
from .report import Context, Report, native_bf16
from .stack import check_diffusion, check_reference
from .timing import time_routes

GROUPS = ("operators", "layouts", "diffusion", "reference", "launches", "resources", "timing")


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"


def describe_machine(report: Report, device: torch.device) -> None:
    import scm_ops
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        report.line(f"device: {p.name}, compute capability {p.major}.{p.minor} (sm_{p.major}{p.minor}), "
                    f"{p.multi_processor_count} SMs, {p.total_memory / 2 ** 30:.0f} GiB; bfloat16 "
                    f"{'yes' if native_bf16() else 'no'}; driver {_driver_version()}")
    else:
        report.line(f"device: CPU ({platform.machine()}, {os.cpu_count()} cores), no CUDA: Triton kernels in the "
                    "interpreter (TRITON_INTERPRET=1); compute capability: none")
    report.line(f"versions: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
                f"scm_ops {scm_ops.__version__} ({os.path.dirname(scm_ops.__file__)}), "
                f"Python {platform.python_version()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scm_ops.check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small shapes (the default without CUDA, where the kernels run in the interpreter)")
    parser.add_argument("--only", action="append", choices=GROUPS, metavar="GROUP",
                        help=f"run only these groups (repeatable): {', '.join(GROUPS)}")
    parser.add_argument("--repeats", type=int, default=None,
                        help="Triton runs compared bit for bit per ActivationDiffusion configuration "
                             "(default 3; 2 in the quick set)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget: checks not started by then are reported as SKIP")
    parser.add_argument("--json", help="also write the check lines as JSON to this file")
    args = parser.parse_args(argv)
    start = time.monotonic()
    report = Report()
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    if not on_cuda:
        if "TRITON_INTERPRET" not in os.environ:
            os.environ["TRITON_INTERPRET"] = "1"   # before any kernel module is imported
        elif os.environ["TRITON_INTERPRET"] != "1":
            print("no CUDA device, and TRITON_INTERPRET is set to something else than 1: nothing can run the "
                  "Triton kernels", file=sys.stderr)
            return 2
    quick = args.quick or not on_cuda
    groups = [g for g in GROUPS if not args.only or g in args.only]
    report.line(f"scm_ops self-check ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}), "
                f"{'quick' if quick else 'full'} set; groups: {', '.join(groups)}")
    describe_machine(report, device)
    from .._common import TRITON_INSTALLED, TRITON_EXTRA_HINT
    if not TRITON_INSTALLED:
        report.result("FAIL", "setup", "triton", f"not installed: the Triton backend cannot run; {TRITON_EXTRA_HINT}")
        return 2
    repeats = args.repeats if args.repeats is not None else (2 if quick else 3)
    ctx = Context(device, quick, max(2, repeats), start + args.budget_s if args.budget_s else None)
    runners = {"operators": check_operators, "layouts": check_layouts, "diffusion": check_diffusion,
               "reference": check_reference}
    with recording_launches(ctx.launches):
        for group in groups:
            if group not in runners:
                continue
            report.line(f"== {group}")
            try:
                runners[group](report, ctx)
            except Exception as err:  # noqa: BLE001 - a group that cannot even start
                report.error(group, "the group raised", err)
                traceback.print_exc()
    for group, run in (("launches", lambda: check_launches(report, ctx, {"operators", "diffusion"} <= set(groups))),
                       ("resources", lambda: check_resources(report, ctx)), ("timing", lambda: time_routes(report, ctx))):
        if group in groups:
            report.line(f"== {group}")
            try:
                run()
            except Exception as err:  # noqa: BLE001
                report.error(group, "the group raised", err)
                traceback.print_exc()
    failed, passed, skipped = report.count("FAIL"), report.count("PASS"), report.count("SKIP")
    report.line(f"== {'ALL CHECKS PASS' if not failed else f'{failed} CHECK(S) FAILED'}: {passed} passed, "
                f"{failed} failed, {skipped} skipped, in {time.monotonic() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), quick=quick, rows=report.rows), f, indent=1)
    return 1 if failed else 0


