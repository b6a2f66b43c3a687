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
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

GROUPS = ("operators", "layouts", "diffusion", "reference", "launches", "resources", "timing")
BACKENDS = ("triton", "torch")
ALPHA = 0.002
QUICK_ITERATIONS = (7, 2)
# Relative RMSE allowed between the two backends of ActivationDiffusion, (forward, gradients).
# The tests hold each backend to 1e-4 / 2e-3 of the float64 published stack in float32,
# so two of them differ by about twice that at most (the quick set measured up to 1.1e-6 /
# 1.7e-4). In float64 both compute the same sums in another order: the quick set measured
# up to 2e-14 / 3e-14; bound 1e-10 / 1e-7 (the gradient to beta is a sum of cancelling
# terms). bfloat16: the two float32 results rounded to bfloat16 (unit roundoff 3.9e-3).
BACKEND_TOL = {torch.float32: (2e-4, 4e-3), torch.float64: (1e-10, 1e-7), torch.bfloat16: (2e-2, 2e-2)}
# Against a float64 reference (the operator tests' tolerances, scm_ops.testing.TOLERANCE):
# the Triton backend passes within this or within twice the torch backend's own error.
OPERATOR_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}
# A non-contiguous input must give what a contiguous copy gives up to a different order of
# the same sums: a few units of roundoff for the operators; ActivationDiffusion amplifies
# it and gets BACKEND_TOL. A stride bug gives errors of order 1.
LAYOUT_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# ActivationDiffusion in float32 against the float64 published stack (the parity tests).
REFERENCE_TOL = (1e-4, 2e-3)


class Report:
    """Check lines printed as they come, and kept for the JSON file and the exit status."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.rows = []

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def result(self, status: str, group: str, name: str, detail: str = "", seconds: float | None = None) -> bool:
        self.rows.append(dict(status=status, group=group, name=name, detail=detail, seconds=seconds))
        timing = f" [{seconds:.1f} s]" if seconds is not None else ""
        self.line(f"{status:4s}  {group}: {name}" + (f": {detail}" if detail else "") + timing)
        return status == "PASS"

    def check(self, ok: bool, group: str, name: str, detail: str = "", seconds: float | None = None) -> bool:
        return self.result("PASS" if ok else "FAIL", group, name, detail, seconds)

    def error(self, group: str, name: str, err: BaseException, seconds: float | None = None) -> bool:
        text = (str(err).strip().splitlines() or [""])[0][:300]
        return self.result("FAIL", group, name, f"raised {type(err).__name__}: {text}", seconds)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)


def native_bf16() -> bool:
    """Whether the CUDA device computes in bfloat16 (sm_80 and later), not only emulates it."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:   # an older torch without the argument, which counts sm_80 and later only
        return torch.cuda.is_bf16_supported()


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    from .testing import relative_rmse
    return relative_rmse(a, b)


class Context:
    """What the groups share: device, mode, sizes, deadline, recorded launches."""

    def __init__(self, device: torch.device, quick: bool, repeats: int, deadline: float | None):
        self.device = device
        self.quick = quick
        self.repeats = repeats
        self.deadline = deadline
        self.launches: list = []
        self.interpreted = device.type != "cuda"
        self.bf16 = device.type == "cuda" and native_bf16()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


# -- operators --------------------------------------------------------------------------------

def _operator_cases(ctx: Context, dtype: torch.dtype):
    """(name, float64 input, float64 reference function, fn(backend, input))."""
    from . import cosine_similarity, newton_schulz_inverse, spatial_semantic_laplacian
    from .reference import cosine_similarity_ref, newton_schulz_inverse_ref, spatial_semantic_laplacian_ref
    g = torch.Generator().manual_seed(3)
    batch, grid, depth = (2, (4, 5), 16) if ctx.quick else (8, (14, 14), 200)
    n = grid[0] * grid[1]
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(batch, n, depth, **f64)
    e = cosine_similarity_ref(torch.randn(batch, n, 16, **f64))
    lap = spatial_semantic_laplacian_ref(cosine_similarity_ref(torch.randn(batch, n, 16, **f64).abs()), grid, 1.2)
    cases = [("cosine_similarity", x, cosine_similarity_ref, lambda b, t: cosine_similarity(t, backend=b))]
    for conn in (4, 8):
        cases.append((f"spatial_semantic_laplacian {conn} neighbours", e,
                      lambda t, conn=conn: spatial_semantic_laplacian_ref(t, grid, 1.1, conn),
                      lambda b, t, conn=conn: spatial_semantic_laplacian(t, grid, 1.1, conn, backend=b)))
    for detach in (False, True):
        cases.append((f"newton_schulz_inverse p=4 detach_init={detach}", lap,
                      lambda t, detach=detach: newton_schulz_inverse_ref(t, 4, ALPHA, detach),
                      lambda b, t, detach=detach: newton_schulz_inverse(t, 4, ALPHA, detach, backend=b)))
    return cases, f"B={batch}, {grid[0]}x{grid[1]} grid, D={depth}"


def _operator_pass(ctx, fn, backend, x, cotangent):
    xb = x.detach().clone().to(ctx.device).requires_grad_(True)
    out = fn(backend, xb)
    out.backward(cotangent.to(ctx.device))
    ctx.sync()
    return out.detach(), xb.grad


def check_operators(report: Report, ctx: Context) -> None:
    dtypes = [torch.float32, torch.float64] + ([torch.bfloat16] if ctx.bf16 else [])
    if not ctx.bf16:
        report.result("SKIP", "operators", "bfloat16", "no bfloat16 here" +
                      (" (the Triton interpreter has none)" if ctx.interpreted else " (device before sm_80)"))
    for dtype in dtypes:
        cases, shape = _operator_cases(ctx, dtype)
        for name, x64, ref, fn in cases:
            label = f"{name} {_dtype_name(dtype)} ({shape})"
            t0 = time.monotonic()
            try:
                x = x64.to(dtype)
                xr = x.double().clone().requires_grad_(True)   # the reference sees the rounded input
                out_r = ref(xr)
                cot = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(4),
                                  dtype=torch.float64).to(dtype)
                out_r.backward(cot.double())
                runs = [_operator_pass(ctx, fn, "triton", x, cot) for _ in range(2)]
                torch_out = _operator_pass(ctx, fn, "torch", x, cot)
                equal = all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
                finite = all(bool(torch.isfinite(t).all()) for t in runs[0])
                err_t = (_rel(runs[0][0], out_r), _rel(runs[0][1], xr.grad))
                err_p = (_rel(torch_out[0], out_r), _rel(torch_out[1], xr.grad))
                vs_torch = (_rel(runs[0][0], torch_out[0]), _rel(runs[0][1], torch_out[1]))
                tol = OPERATOR_TOL[dtype]
                # within the tolerance of the float64 reference (or twice torch's own error), and
                # within twice the tolerance of the torch backend
                ok = equal and finite and all(err_t[i] <= max(tol, 2 * err_p[i]) and vs_torch[i] <= 2 * tol
                                              for i in (0, 1))
                report.check(ok, "operators", label,
                             f"vs float64: triton fwd {_fmt(err_t[0])} grad {_fmt(err_t[1])}, torch fwd "
                             f"{_fmt(err_p[0])} grad {_fmt(err_p[1])} (tol max({tol:.0e}, 2x torch)); "
                             f"triton vs torch fwd {_fmt(vs_torch[0])} grad {_fmt(vs_torch[1])} (tol {2 * tol:.0e}); "
                             f"2 runs bitwise {'equal' if equal else 'DIFFERENT'}"
                             + ("" if finite else "; NON-FINITE values"), time.monotonic() - t0)
            except Exception as err:  # noqa: BLE001 - reported, the run goes on
                report.error("operators", label, err, time.monotonic() - t0)
    _check_subnormal_row(report, ctx)


def _check_subnormal_row(report: Report, ctx: Context) -> None:
    """A float32 row whose squared norm is subnormal (0 < |x|^2 < 1.2e-38)."""
    from . import cosine_similarity
    from .reference import cosine_similarity_ref
    label = "cosine_similarity float32, rows with subnormal |x|^2 (6.4e-39)"
    t0 = time.monotonic()
    try:
        x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(6))
        x[:, 0] = 1e-20
        x[1, 1] = -1e-20
        outs, grads = {}, {}
        for backend in BACKENDS:
            xb = x.to(ctx.device).requires_grad_(True)
            out = cosine_similarity(xb, backend=backend)
            out.backward(torch.ones_like(out))
            ctx.sync()
            outs[backend], grads[backend] = out.detach().cpu(), xb.grad.cpu()
        ref = cosine_similarity_ref(x.double())
        finite = all(bool(torch.isfinite(t).all()) for t in (*outs.values(), *grads.values()))
        diff = (outs["triton"].double() - outs["torch"].double()).abs().max().item()
        err_t = (outs["triton"].double() - ref).abs().max().item()
        err_p = (outs["torch"].double() - ref).abs().max().item()
        # a subnormal |x|^2 keeps fewer significant bits: the torch backend's own error here
        # (5.5e-6 measured on the CPU) sets the scale, with 1e-6 as the floor
        ok = finite and err_t <= max(1e-6, 2 * err_p) and diff <= 1e-5
        report.check(ok, "operators", label,
                     f"finite {finite}; max |triton - torch| {diff:.1e} (tol 1e-5); max error vs float64: "
                     f"triton {err_t:.1e}, torch {err_p:.1e} (tol max(1e-6, 2x torch))", time.monotonic() - t0)
    except Exception as err:  # noqa: BLE001
        report.error("operators", label, err, time.monotonic() - t0)


# -- layouts ----------------------------------------------------------------------------------

def _layout_cases(ctx: Context, batch: int, dtype: torch.dtype):
    """(operator, layout, leaves, apply_view, fn): fn runs on apply_view(view) where view is
    the identity (the non-contiguous input) or .contiguous() (a copy on the gradient path)."""
    from . import ActivationDiffusion, cosine_similarity, newton_schulz_inverse, spatial_semantic_laplacian
    from .reference import cosine_similarity_ref, spatial_semantic_laplacian_ref
    g = torch.Generator().manual_seed(1)
    n, d, grid = 35, 24, (5, 7)
    dev = ctx.device

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(dev)

    x_sim = cosine_similarity_ref(torch.randn(batch, n, 16, generator=g, dtype=torch.float64).abs())
    lap = spatial_semantic_laplacian_ref(x_sim, grid, 1.2).to(dtype).to(dev)
    cases = []
    xt = rand(batch, d, n).requires_grad_(True)
    cases.append(("cosine_similarity", "x = [B, D, N].transpose(1, 2)", [xt], lambda v: v(xt.transpose(1, 2)),
                  lambda b, v: cosine_similarity(v, backend=b)))
    xe = rand(1, n, d).requires_grad_(True)
    cases.append(("cosine_similarity", "x = [1, N, D].expand(B, N, D)", [xe], lambda v: v(xe.expand(batch, n, d)),
                  lambda b, v: cosine_similarity(v, backend=b)))
    e = (x_sim.to(dtype).to(dev) + 0.1 * rand(batch, n, n)).requires_grad_(True)
    cases.append(("spatial_semantic_laplacian", "E = E.mT", [e], lambda v: v(e.mT),
                  lambda b, v: spatial_semantic_laplacian(v, grid, 1.1, backend=b)))
    e1 = e.detach()[:1].clone().requires_grad_(True)
    cases.append(("spatial_semantic_laplacian", "E = [1, N, N].expand(B, N, N)", [e1],
                  lambda v: v(e1.expand(batch, n, n)),
                  lambda b, v: spatial_semantic_laplacian(v, grid, 1.1, backend=b)))
    for detach in (False,) if ctx.quick else (False, True):
        lt = (lap + 0.01 * rand(batch, n, n)).requires_grad_(True)
        cases.append(("newton_schulz_inverse", f"L = L.mT, detach_init={detach}", [lt], lambda v, lt=lt: v(lt.mT),
                      lambda b, v, detach=detach: newton_schulz_inverse(v, 4, ALPHA, detach, backend=b)))
    l1 = lap[:1].clone().requires_grad_(True)
    cases.append(("newton_schulz_inverse", "L = [1, N, N].expand(B, N, N)", [l1], lambda v: v(l1.expand(batch, n, n)),
                  lambda b, v: newton_schulz_inverse(v, 4, ALPHA, True, backend=b)))
    channels = 8 if ctx.quick else 40
    iterations = QUICK_ITERATIONS if ctx.quick else (16, 4, 4, 4)
    s_cl = rand(batch, channels, *grid).to(memory_format=torch.channels_last).requires_grad_(True)
    f_t = torch.rand(batch, grid[1], grid[0], generator=g, dtype=dtype).to(dev).requires_grad_(True)
    for exact in (False,) if ctx.quick else (False, True):
        cases.append(("ActivationDiffusion", f"S channels_last, F = [B, W, H].transpose(1, 2), exact_gradients={exact}",
                      [s_cl, f_t], lambda v: (v(f_t.transpose(1, 2)), v(s_cl)),
                      lambda b, f, s, exact=exact: ActivationDiffusion(
                          grid, iterations, exact_gradients=exact, backend=b).to(dev)(f, s)))
    s1 = rand(1, channels, *grid).requires_grad_(True)
    f1 = torch.rand(1, *grid, generator=g, dtype=dtype).to(dev).requires_grad_(True)
    cases.append(("ActivationDiffusion", "S, F = [1, ...].expand(B, ...)", [s1, f1],
                  lambda v: (v(f1.expand(batch, *grid)), v(s1.expand(batch, channels, *grid))),
                  lambda b, f, s: ActivationDiffusion(grid, iterations, backend=b).to(dev)(f, s)))
    return cases


def _grads_of(ctx, fn, leaves, cotangents):
    for t in leaves:
        t.grad = None
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(list(outs), list(cotangents(outs)))
    ctx.sync()
    return [o.detach() for o in outs], [t.grad.clone() for t in leaves]


def check_layouts(report: Report, ctx: Context) -> None:
    batch = 2 if ctx.quick else 8
    dtypes = [torch.float32] if ctx.quick else [torch.float32, torch.float64]
    for dtype in dtypes:
        for op, layout, leaves, apply_view, fn in _layout_cases(ctx, batch, dtype):
            label = f"{op} {_dtype_name(dtype)}, {layout}"
            if ctx.out_of_time():
                report.result("SKIP", "layouts", label, "time budget spent")
                continue
            t0 = time.monotonic()
            try:
                results, errs = {}, []
                for backend in BACKENDS:
                    gen = torch.Generator()

                    def cot(outs):
                        return [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs]

                    def run(view, backend=backend):
                        args = apply_view(view)
                        return fn(backend, *args) if op == "ActivationDiffusion" else fn(backend, args)

                    gen.manual_seed(2)
                    out_v, grad_v = _grads_of(ctx, lambda: run(lambda t: t), leaves, cot)
                    gen.manual_seed(2)
                    out_c, grad_c = _grads_of(ctx, lambda: run(lambda t: t.contiguous()), leaves, cot)
                    results[backend] = out_v + grad_v
                    errs.append((max(_rel(a, b) for a, b in zip(out_v, out_c)),
                                 max(_rel(a, b) for a, b in zip(grad_v, grad_c))))
                vs_torch = max(_rel(a, b) for a, b in zip(results["triton"], results["torch"]))
                tol_f, tol_g = (LAYOUT_TOL[dtype],) * 2 if op != "ActivationDiffusion" else BACKEND_TOL[dtype]
                ok = all(f <= tol_f and g <= tol_g for f, g in errs) and vs_torch <= BACKEND_TOL[dtype][1]
                report.check(ok, "layouts", label,
                             "vs contiguous copy: " + ", ".join(f"{b} fwd {_fmt(f)} grad {_fmt(g)}"
                                                                for b, (f, g) in zip(BACKENDS, errs)) +
                             f" (tol {tol_f:.0e}/{tol_g:.0e}); triton vs torch {_fmt(vs_torch)}",
                             time.monotonic() - t0)
            except Exception as err:  # noqa: BLE001
                report.error("layouts", label, err, time.monotonic() - t0)


# -- ActivationDiffusion: triton against torch, bitwise repeatability ---------------------------

def _grid_of(cells: int) -> tuple[int, int]:
    """A grid of `cells` cells (a power of two), as square as it goes: 256 -> 16 x 16,
    512 -> 16 x 32, 1024 -> 32 x 32."""
    h = 2 ** (int(math.log2(cells)) // 2)
    return h, cells // h


def largest_grids() -> list[tuple[tuple[int, int], int]]:
    """(grid, connectivity) of the largest grid one program holds, for each kernel module
    with one program per image (the matrix-free series, the Chebyshev series) and each
    connectivity, read from the kernel modules (BLOCK_N_CHOICES, EIGHT_NEIGHBOUR_MAX_BLOCK_N)."""
    from ._common import kernel_module
    out = []
    for connectivity in (4, 8):
        cells = set()
        for name in ("structured.series", "structured.chebyshev"):
            kern = kernel_module(name)
            largest = max(kern.BLOCK_N_CHOICES)
            cells.add(min(largest, kern.EIGHT_NEIGHBOUR_MAX_BLOCK_N) if connectivity == 8 else largest)
        out += [(_grid_of(c), connectivity) for c in sorted(cells, reverse=True)]
    return out


def large_p_routes() -> tuple[str, ...]:
    from . import diffusion
    return tuple(diffusion.LARGE_P_ROUTES)


def diffusion_configs(ctx: Context) -> list[tuple]:
    """(route, grid, connectivity, dtype, exact_gradients) in the order they run (a time
    budget cuts the last ones)."""
    routes = large_p_routes()
    largest = largest_grids()
    if ctx.quick:
        # one configuration per route and grid, every flag and block size at least once
        big4 = [g for g, c in largest if c == 4][0]
        big8 = sorted((g for g, c in largest if c == 8), key=lambda g: g[0] * g[1])
        f32, f64 = torch.float32, torch.float64
        configs = [("chebyshev", (14, 14), 4, f32, False), ("chebyshev", (7, 9), 8, f64, True),
                   ("spectral", (7, 9), 4, f64, False), ("newton_schulz", (1, 5), 8, f32, True),
                   ("chebyshev", (1, 5), 4, f64, True), ("chebyshev", big4, 4, f64, True),
                   ("chebyshev", big8[0], 8, f32, False)]
        configs += [("chebyshev", g, 8, f64, False) for g in big8[1:]]
        return [c for c in configs if c[0] in routes]
    grids = [((14, 14), 4), ((14, 14), 8), ((7, 9), 4), ((7, 9), 8), ((1, 37), 4), ((1, 37), 8)] + largest
    configs = [(route, grid, conn, dtype, exact) for grid, conn in grids for route in routes
               for dtype in (torch.float32, torch.float64) for exact in (False, True)]
    if ctx.bf16:
        configs[4 * len(routes):4 * len(routes)] = [(None, (14, 14), conn, torch.bfloat16, exact)
                                                    for conn in (4, 8) for exact in (False, True)]
    return configs


def _diffusion_pass(ctx, model, f0, s0, gf, gs):
    f = f0.detach().clone().requires_grad_(True)
    s = s0.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out_f, out_s = model(f, s)
    torch.autograd.backward([out_f, out_s], [gf, gs])
    ctx.sync()
    return [out_f.detach(), out_s.detach(), f.grad, s.grad, model.lam.grad, model.beta.grad]


def check_diffusion(report: Report, ctx: Context) -> None:
    from . import ActivationDiffusion
    batch, channels = (2, 8) if ctx.quick else (16, 200)
    iterations = QUICK_ITERATIONS if ctx.quick else (16, 4, 4, 4)
    report.line(f"      (ActivationDiffusion: B={batch}, C={channels}, iterations {iterations}, S0 signed i.i.d., "
                f"F0 uniform, fixed cotangents; {ctx.repeats} Triton runs compared bit for bit; "
                "compared to torch: both outputs, gradients to F0, S0, lam, beta)")
    names = ("F", "S", "dF0", "dS0", "dlam", "dbeta")
    for route, grid, conn, dtype, exact in diffusion_configs(ctx):
        label = (f"{route or 'default route'} {grid[0]}x{grid[1]} {conn} neighbours {_dtype_name(dtype)} "
                 f"{'exact' if exact else 'published'} gradients")
        if ctx.out_of_time():
            report.result("SKIP", "diffusion", label, "time budget spent")
            continue
        t0 = time.monotonic()
        try:
            g = torch.Generator().manual_seed(0)
            s0 = torch.randn(batch, channels, *grid, generator=g).to(ctx.device, dtype)
            f0 = torch.rand(batch, *grid, generator=g).to(ctx.device, dtype)
            gf = torch.randn(batch, *grid, generator=g).to(ctx.device, dtype)
            gs = torch.randn(batch, channels, *grid, generator=g).to(ctx.device, dtype)
            models = {b: ActivationDiffusion(grid, iterations, connectivity=conn, exact_gradients=exact, backend=b,
                                             large_p_route=route).to(ctx.device) for b in BACKENDS}
            first = _diffusion_pass(ctx, models["triton"], f0, s0, gf, gs)
            differing = set()
            for _ in range(ctx.repeats - 1):
                again = _diffusion_pass(ctx, models["triton"], f0, s0, gf, gs)
                differing |= {n for n, a, b in zip(names, first, again) if not torch.equal(a, b)}
            ref = _diffusion_pass(ctx, models["torch"], f0, s0, gf, gs)
            fwd = max(_rel(a, b) for a, b in zip(first[:2], ref[:2]))
            grad = max(_rel(a, b) for a, b in zip(first[2:], ref[2:]))
            finite = all(bool(torch.isfinite(t).all()) for t in first)
            tol_f, tol_g = BACKEND_TOL[dtype]
            ok = not differing and finite and fwd <= tol_f and grad <= tol_g
            report.check(ok, "diffusion", label,
                         f"vs torch fwd {_fmt(fwd)} grad {_fmt(grad)} (tol {tol_f:.0e}/{tol_g:.0e}); "
                         f"{ctx.repeats} runs bitwise " + ("equal" if not differing else
                                                           f"DIFFERENT in {', '.join(sorted(differing))}") +
                         ("" if finite else "; NON-FINITE values"), time.monotonic() - t0)
        except Exception as err:  # noqa: BLE001
            report.error("diffusion", label, err, time.monotonic() - t0)


def check_reference(report: Report, ctx: Context) -> None:
    """ActivationDiffusion in float32 against the float64 published stack."""
    from . import ActivationDiffusion
    from .reference import activation_diffusion_ref
    batch, channels, grid = (2, 8, (7, 9)) if ctx.quick else (16, 200, (14, 14))
    iterations = QUICK_ITERATIONS if ctx.quick else (16, 4, 4, 4)
    label = f"ActivationDiffusion float32 vs float64 published stack (B={batch}, C={channels}, {grid[0]}x{grid[1]})"
    t0 = time.monotonic()
    try:
        g = torch.Generator().manual_seed(5)
        s64 = torch.randn(batch, channels, *grid, generator=g, dtype=torch.float64)
        f64 = torch.rand(batch, *grid, generator=g, dtype=torch.float64)
        lam = torch.ones(len(iterations), dtype=torch.float64, requires_grad=True)
        beta = torch.full((len(iterations),), 0.5, dtype=torch.float64, requires_grad=True)
        fr, sr = f64.float().double().requires_grad_(True), s64.float().double().requires_grad_(True)
        ofr, osr = activation_diffusion_ref(fr, sr, lam, beta, iterations, ALPHA)
        cf = torch.randn(ofr.shape, generator=g, dtype=torch.float64).float()
        cs = torch.randn(osr.shape, generator=g, dtype=torch.float64).float()
        torch.autograd.backward([ofr, osr], [cf.double(), cs.double()])
        errs = {}
        for backend in BACKENDS:
            model = ActivationDiffusion(grid, iterations, backend=backend).to(ctx.device)
            fb = f64.float().to(ctx.device).requires_grad_(True)
            sb = s64.float().to(ctx.device).requires_grad_(True)
            of, os_ = model(fb, sb)
            torch.autograd.backward([of, os_], [cf.to(ctx.device), cs.to(ctx.device)])
            ctx.sync()
            errs[backend] = (max(_rel(of, ofr), _rel(os_, osr)),
                             max(_rel(fb.grad, fr.grad), _rel(sb.grad, sr.grad), _rel(model.lam.grad, lam.grad),
                                 _rel(model.beta.grad, beta.grad)))
        ok = errs["triton"][0] <= REFERENCE_TOL[0] and errs["triton"][1] <= REFERENCE_TOL[1]
        report.check(ok, "reference", label,
                     f"triton fwd {_fmt(errs['triton'][0])} grad {_fmt(errs['triton'][1])}, torch fwd "
                     f"{_fmt(errs['torch'][0])} grad {_fmt(errs['torch'][1])} "
                     f"(tol {REFERENCE_TOL[0]:.0e}/{REFERENCE_TOL[1]:.0e})", time.monotonic() - t0)
    except Exception as err:  # noqa: BLE001
        report.error("reference", label, err, time.monotonic() - t0)


# -- launches: which kernels ran, with which configurations -----------------------------------

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _describe_launch(module, kernel_name: str, fn, args, kwargs) -> tuple:
    """aot.launch_key of one launch: the input dtype (of the first "*in" pointer argument,
    else the first "*acc" one), the constexprs and the launch options."""
    from . import aot
    constexpr_args = aot.constexpr_names(fn)
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    runtime = [n for n in fn.arg_names if n not in constexpr_args]
    types = dict(zip(runtime, module.AOT[kernel_name]["args"]))
    dtype = None
    for wanted in ("*in", "*acc"):
        tensors = [bound[n] for n in runtime if types.get(n) == wanted and isinstance(bound.get(n), torch.Tensor)]
        if tensors:
            dtype = _DTYPE_NAMES.get(tensors[0].dtype, str(tensors[0].dtype))
            break
    constexprs = {n: bound[n] for n in constexpr_args if n in bound}
    options = {k: kwargs[k] for k in aot.LAUNCH_OPTIONS if k in kwargs}
    return aot.launch_key(dtype, constexprs, options)


def aot_kernels():
    """(kernel module name, module, kernel name, @triton.jit function) of every kernel that
    the AOT tables declare."""
    from . import aot
    for mod_name, module in aot.kernel_modules():
        for kernel_name in module.AOT:
            yield mod_name, module, kernel_name, getattr(module, kernel_name)


@contextlib.contextmanager
def recording_launches(launches: list):
    """Append (module name, kernel name, aot.launch_key) to `launches` for every launch of a
    kernel of the AOT tables while the context is open (the kernels' `run` is wrapped on the
    instance and restored on exit)."""
    wrapped = []
    try:
        for mod_name, module, kernel_name, fn in aot_kernels():
            original = fn.run

            def run(*args, _original=original, _module=module, _name=kernel_name, _mod_name=mod_name, _fn=fn,
                    **kwargs):
                try:
                    launches.append((_mod_name, _name, _describe_launch(_module, _name, _fn, args, kwargs)))
                except Exception as err:  # noqa: BLE001 - a launch the table cannot describe
                    launches.append((_mod_name, _name, ("undescribed", repr(err))))
                return _original(*args, **kwargs)

            fn.run = run
            wrapped.append(fn)
        yield launches
    finally:
        for fn in wrapped:
            del fn.run


def check_launches(report: Report, ctx: Context, complete: bool) -> None:
    """Every launch was a configuration the AOT check compiles; with `complete` (the groups
    that launch kernels all ran), every kernel ran at least once."""
    from . import aot
    declared = {}
    kernels = []
    for mod_name, module, kernel_name, _ in aot_kernels():
        declared[(mod_name, kernel_name)] = aot.declared_launches(module, kernel_name)
        kernels.append((mod_name, kernel_name))
    seen = {}
    for mod_name, kernel_name, key in ctx.launches:
        seen.setdefault((mod_name, kernel_name), set()).add(key)
    undeclared = [(k, key) for k, keys in seen.items() for key in keys if key not in declared.get(k, ())]
    configs = sum(len(v) for v in seen.values())
    report.check(not undeclared, "launches", "every launch is a configuration python -m scm_ops.aot compiles",
                 f"{len(ctx.launches)} launches, {configs} distinct configurations of {len(seen)} kernels" +
                 ("" if not undeclared else "; NOT DECLARED: " + "; ".join(
                     f"{name} {_key_text(key)}" for (_, name), key in undeclared[:8])))
    for (mod_name, kernel_name), keys in sorted(seen.items()):
        report.line(f"      {kernel_name}: " + "; ".join(_key_text(k) for k in sorted(keys, key=str)))
    if complete:
        missing = [name for mod_name, name in kernels if (mod_name, name) not in seen]
        report.check(not missing, "launches", f"every kernel of the AOT tables ran ({len(kernels)})",
                     "all ran" if not missing else "never launched: " + ", ".join(missing))
    else:
        report.result("SKIP", "launches", "every kernel of the AOT tables ran",
                      "needs the groups operators and diffusion")


def _key_text(key) -> str:
    if len(key) != 3 or not isinstance(key[1], tuple):
        return str(key)
    dtype, constexprs, options = key
    return f"{dtype} " + ", ".join(f"{k}={v}" for k, v in constexprs + options)


# -- resources: registers and spills of the compiled kernels -----------------------------------

def _compiled(fn):
    """(key, compiled kernel) of every compiled specialisation of a JITFunction:
    `device_caches` (Triton >= 3.2) or `cache` (older)."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        for entry in list(caches.values()):
            for key, kernel in list(entry[0].items()):
                yield key, kernel
    else:
        for entry in list(getattr(fn, "cache", {}).values()):
            for key, kernel in list(entry.items()):
                yield key, kernel


def _constants_text(fn, kernel) -> str:
    constants = getattr(getattr(kernel, "src", None), "constants", None)
    if not isinstance(constants, dict):
        return ""
    names = set(getattr(fn, "arg_names", ()))
    out = []
    for k, v in constants.items():
        i = k[0] if isinstance(k, tuple) and len(k) == 1 else k   # keyed by (argument index,) in recent Triton
        name = fn.arg_names[i] if isinstance(i, int) and i < len(fn.arg_names) else k
        if name in names and not callable(v) and str(name).isupper():
            out.append(f"{name}={v}")
    return ", ".join(out)


def check_resources(report: Report, ctx: Context) -> None:
    if ctx.interpreted:
        report.line("      registers/spills: not available (Triton interpreter: nothing is compiled)")
        return
    from . import aot
    props = torch.cuda.get_device_properties(ctx.device)
    capability = 10 * props.major + props.minor
    rows = 0
    unavailable = False
    for _, module, kernel_name, fn in aot_kernels():
        allowance = aot.spill_allowance(module.AOT[kernel_name], capability)
        for _, kernel in _compiled(fn):
            if not hasattr(kernel, "metadata"):   # an unfinished asynchronous compile
                continue
            with contextlib.suppress(Exception):
                kernel._init_handles()            # done at the first launch: a no-op here
            md = kernel.metadata
            regs, spills = getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None)
            where = (f"{kernel_name} [{_constants_text(fn, kernel)}, num_warps={getattr(md, 'num_warps', '?')}, "
                     f"num_stages={getattr(md, 'num_stages', '?')}]")
            rows += 1
            if regs is None or spills is None:
                unavailable = True
                report.line(f"      {where}: registers/spills not available (this Triton version does not expose "
                            f"n_regs/n_spills); shared {getattr(md, 'shared', '?')} B")
                continue
            # n_spills: the local memory per thread as the driver reports it, in 4-byte words
            report.check(spills * 4 <= allowance, "resources", where,
                         f"{regs} registers/thread, {spills} spilled words ({spills * 4} B; allowed {allowance} B), "
                         f"shared {getattr(md, 'shared', '?')} B")
    if rows == 0:
        report.line("      registers/spills: no compiled kernel found in the kernels' caches")
    elif unavailable:
        report.line("      (registers/spills: not available from this Triton version for some kernels)")


# -- timing -------------------------------------------------------------------------------------

def time_routes(report: Report, ctx: Context) -> None:
    from . import ActivationDiffusion
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
        from .route_choice import explain_large_p_route
        model, s = ActivationDiffusion(grid, iterations).to(ctx.device), s0.clone().requires_grad_(True)
        if ctx.device.type == "cuda":   # a first call measures the routes (route_choice), or reads the cache
            out_f, out_s = model(f0, s)
            (out_f.sum() + out_s.sum()).backward()
        report.line(f"      default route (large_p_route=None) here: {explain_large_p_route(model, s)}")
    except Exception as err:  # noqa: BLE001
        report.error("timing", "default route", err)


# -- header and main ----------------------------------------------------------------------------

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
    from ._common import TRITON_INSTALLED, TRITON_EXTRA_HINT
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


if __name__ == "__main__":
    sys.exit(main())
