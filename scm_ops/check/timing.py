"""The self-check's group "timing": ActivationDiffusion per large-p route on both backends,
and the route the default (large_p_route=None) takes here (not a check)."""
from __future__ import annotations

import statistics
import time

import torch

from .report import BACKENDS, QUICK_ITERATIONS, Context, Report
from .stack import large_p_routes

# -- timing -------------------------------------------------------------------------------------

def time_routes(report: Report, ctx: Context) -> None:
    from .. import ActivationDiffusion
    if ctx.quick:
        batch, channels, grid, iterations, runs = 2, 8, (7, 9), QUICK_ITERATIONS, 1
    else:
        batch, channels, grid, iterations, runs = 64, 200, (14, 14), (16, 4, 4, 4), 10
    warmup = 0 if ctx.interpreted else 1    # the interpreter compiles nothing
    report.line(f"      (ActivationDiffusion B={batch}, C={channels}, {grid[0]}x{grid[1]}, iterations {iterations}, "
                f"float32, published gradients; median of {runs} after {warmup} warm-up call(s)"
                + ("; the interpreter's times say nothing about a GPU)" if ctx.interpreted else ")"))
    g = torch.Generator().manual_seed(7)
    s0 = torch.randn(batch, channels, *grid, generator=g).to(ctx.device)
    f0 = torch.rand(batch, *grid, generator=g).to(ctx.device)
    for route in large_p_routes():
        parts = []
        t0 = time.monotonic()
        try:
            for backend in BACKENDS:
                model = ActivationDiffusion(grid, iterations, backend=backend, large_p_route=route).to(ctx.device)
                s = s0.clone().requires_grad_(True)
                times = {}
                for what in ("forward", "forward+backward"):
                    samples = []
                    for i in range(warmup + runs):
                        ctx.sync()
                        start = time.perf_counter()
                        if what == "forward":
                            with torch.no_grad():
                                model(f0, s0)
                        else:
                            out_f, out_s = model(f0, s)
                            (out_f.sum() + out_s.sum()).backward()
                        ctx.sync()
                        if i >= warmup:
                            samples.append(time.perf_counter() - start)
                    times[what] = statistics.median(samples)
                parts.append(f"{backend} forward {1e3 * times['forward']:.1f} ms, forward+backward "
                             f"{1e3 * times['forward+backward']:.1f} ms")
            report.result("TIME", "timing", route, "; ".join(parts), time.monotonic() - t0)
        except Exception as err:  # noqa: BLE001
            report.error("timing", route, err, time.monotonic() - t0)
    try:
        from ..route_choice import explain_large_p_route
        model, s = ActivationDiffusion(grid, iterations).to(ctx.device), s0.clone().requires_grad_(True)
        if ctx.device.type == "cuda":   # a first call measures the routes (route_choice), or reads the cache
            out_f, out_s = model(f0, s)
            (out_f.sum() + out_s.sum()).backward()
        report.line(f"      default route (large_p_route=None) here: {explain_large_p_route(model, s)}")
    except Exception as err:  # noqa: BLE001
        report.error("timing", "default route", err)

