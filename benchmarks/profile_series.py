"""Operations and time per step of the PyTorch series (docs/structured.md, "The PyTorch
path's cost per step").

    python benchmarks/profile_series.py --threads 1
    python benchmarks/profile_series.py --threads 2 --family positive

One forward + backward of ActivationDiffusion (structured, Chebyshev route for the p = 16
block, PyTorch backend, loss on both outputs) at B = 64, C = 200, 14 x 14, float32 on the
CPU. Prints, for the Chebyshev series (forward basis, Clenshaw backward) and the
matrix-free p = 4 blocks (forward, backward): the operators torch.profiler records inside
each autograd Function (those called from Python, and every nested one), divided by the
number of steps, and the time per step (min over --repeat runs, without the profiler).

It profiles the PyTorch loops (what runs on CUDA above the Triton kernels' on-chip limits,
one kernel launch per operation); on the CPU the structured path runs the same series in C
(scm_ops/structured/cpu.py), which --cpu-kernels times instead (its operation counts are
then those of the one call per series).
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import scm_ops
from scm_ops.structured import chebyshev, series
from scm_ops.testing import semantic_maps

PIECES = {"ChebyshevFilter": "chebyshev forward", "ChebyshevFilterBackward": "chebyshev backward",
          "StencilSeries": "p = 4 forward", "StencilSeriesBackward": "p = 4 backward"}


def _timed(module, name, clock):
    """Replace module.name by a wrapper that adds its wall time to clock[name]."""
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        clock[name] += time.perf_counter() - start
        return out

    setattr(module, name, wrapper)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--family", default="signed_iid", choices=("signed_iid", "signed_smooth", "positive"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cpu-kernels", action="store_true", help="time the C kernels, not the PyTorch loops")
    args = parser.parse_args()
    os.environ["SCM_OPS_CPU_KERNELS"] = "1" if args.cpu_kernels else "0"
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    s = semantic_maps(args.family, args.batch, 200, 14, 14, g).requires_grad_()
    f = torch.rand(args.batch, 14, 14, generator=g).requires_grad_()
    module = scm_ops.ActivationDiffusion((14, 14), large_p_route="chebyshev", backend="torch")

    degrees = []
    plan_of = chebyshev._series_plan

    def recording_plan(*a, **k):
        plan = plan_of(*a, **k)
        degrees.append(plan.degree)
        return plan

    chebyshev._series_plan = recording_plan

    def run():
        out_f, out_s = module(f, s)
        torch.autograd.backward([out_f.sum(), out_s.sum()])
        f.grad = s.grad = None

    run()                                                   # warm-up (coefficients, caches)
    degree = degrees[-1]
    p4_steps = sum(2 ** p for p in module.iterations if 2 ** p <= 64)
    steps = {"chebyshev forward": degree, "chebyshev backward": degree,
             "p = 4 forward": p4_steps, "p = 4 backward": p4_steps}

    # operator counts
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    direct, nested = defaultdict(int), defaultdict(int)
    top = defaultdict(lambda: defaultdict(int))

    def descend(event, piece, depth):
        for child in event.cpu_children:
            nested[piece] += 1
            if depth == 0:
                direct[piece] += 1
                top[piece][child.name] += 1
            descend(child, piece, depth + 1)

    for event in prof.events():
        if event.name in PIECES and (event.cpu_parent is None or event.cpu_parent.name not in PIECES):
            descend(event, PIECES[event.name], 0)

    # wall time of the series functions, without the profiler
    clock = defaultdict(float)
    names = {"chebyshev forward": (chebyshev, "_series_forward"), "chebyshev backward": (chebyshev, "_series_backward"),
             "p = 4 forward": (series, "_series_fwd"), "p = 4 backward": (series, "_series_bwd")}
    for module_, name in names.values():
        _timed(module_, name, clock)
    best = defaultdict(lambda: float("inf"))
    whole = float("inf")
    for _ in range(args.repeat):
        clock.clear()
        start = time.perf_counter()
        run()
        whole = min(whole, time.perf_counter() - start)
        for piece, (_, name) in names.items():
            best[piece] = min(best[piece], clock[name])

    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    print(f"family {args.family}, B = {args.batch}, threads {args.threads}, Chebyshev degree {degree}, "
          f"load average {load}")
    print(f"{'piece':<20}{'steps':>6}{'ops/step':>10}{'nested/step':>13}{'ms':>9}{'us/step':>9}")
    for piece, n in steps.items():
        print(f"{piece:<20}{n:>6}{direct[piece] / n:>10.1f}{nested[piece] / n:>13.1f}"
              f"{best[piece] * 1e3:>9.1f}{best[piece] / n * 1e6:>9.1f}")
    print(f"whole forward + backward: {whole * 1e3:.1f} ms")
    for piece in steps:
        common = sorted(top[piece].items(), key=lambda kv: -kv[1])[:6]
        print(f"  {piece}: " + ", ".join(f"{k} {v}" for k, v in common))


if __name__ == "__main__":
    main()
