"""The self-check's groups "diffusion" and "reference": ActivationDiffusion on backend="triton"
against backend="torch" (bitwise repeatable), and in float32 against the float64 published
stack."""
from __future__ import annotations

import math
import time

import torch

from .report import ALPHA, BACKEND_TOL, BACKENDS, QUICK_ITERATIONS, Context, Report, dtype_name, fmt, rel

# ActivationDiffusion in float32 against the float64 published stack (the parity tests).
REFERENCE_TOL = (1e-4, 2e-3)


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
    from .._common import kernel_module
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
    from ..route_choice import LARGE_P_ROUTES
    return tuple(LARGE_P_ROUTES)


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
    from .. import ActivationDiffusion
    batch, channels = (2, 8) if ctx.quick else (16, 200)
    iterations = QUICK_ITERATIONS if ctx.quick else (16, 4, 4, 4)
    report.line(f"      (ActivationDiffusion: B={batch}, C={channels}, iterations {iterations}, S0 signed i.i.d., "
                f"F0 uniform, fixed cotangents; {ctx.repeats} Triton runs compared bit for bit; "
                "compared to torch: both outputs, gradients to F0, S0, lam, beta)")
    names = ("F", "S", "dF0", "dS0", "dlam", "dbeta")
    for route, grid, conn, dtype, exact in diffusion_configs(ctx):
        label = (f"{route or 'default route'} {grid[0]}x{grid[1]} {conn} neighbours {dtype_name(dtype)} "
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
            fwd = max(rel(a, b) for a, b in zip(first[:2], ref[:2]))
            grad = max(rel(a, b) for a, b in zip(first[2:], ref[2:]))
            finite = all(bool(torch.isfinite(t).all()) for t in first)
            tol_f, tol_g = BACKEND_TOL[dtype]
            ok = not differing and finite and fwd <= tol_f and grad <= tol_g
            report.check(ok, "diffusion", label,
                         f"vs torch fwd {fmt(fwd)} grad {fmt(grad)} (tol {tol_f:.0e}/{tol_g:.0e}); "
                         f"{ctx.repeats} runs bitwise " + ("equal" if not differing else
                                                           f"DIFFERENT in {', '.join(sorted(differing))}") +
                         ("" if finite else "; NON-FINITE values"), time.monotonic() - t0)
        except Exception as err:  # noqa: BLE001
            report.error("diffusion", label, err, time.monotonic() - t0)


def check_reference(report: Report, ctx: Context) -> None:
    """ActivationDiffusion in float32 against the float64 published stack."""
    from .. import ActivationDiffusion
    from ..reference import activation_diffusion_ref
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
            errs[backend] = (max(rel(of, ofr), rel(os_, osr)),
                             max(rel(fb.grad, fr.grad), rel(sb.grad, sr.grad), rel(model.lam.grad, lam.grad),
                                 rel(model.beta.grad, beta.grad)))
        ok = errs["triton"][0] <= REFERENCE_TOL[0] and errs["triton"][1] <= REFERENCE_TOL[1]
        report.check(ok, "reference", label,
                     f"triton fwd {fmt(errs['triton'][0])} grad {fmt(errs['triton'][1])}, torch fwd "
                     f"{fmt(errs['torch'][0])} grad {fmt(errs['torch'][1])} "
                     f"(tol {REFERENCE_TOL[0]:.0e}/{REFERENCE_TOL[1]:.0e})", time.monotonic() - t0)
    except Exception as err:  # noqa: BLE001
        report.error("reference", label, err, time.monotonic() - t0)

