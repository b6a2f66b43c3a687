"""The self-check's groups "operators" and "layouts": each operator on backend="triton" against
a float64 reference and backend="torch"; every operator and ActivationDiffusion on
non-contiguous inputs against a contiguous copy."""
from __future__ import annotations

import time

import torch

from .report import ALPHA, BACKEND_TOL, BACKENDS, QUICK_ITERATIONS, Context, Report, dtype_name, fmt, rel

# Against a float64 reference (the operator tests' tolerances, scm_ops.testing.TOLERANCE):
# the Triton backend passes within this or within twice the torch backend's own error.
OPERATOR_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}
# A non-contiguous input must give what a contiguous copy gives up to a different order of
# the same sums: a few units of roundoff for the operators; ActivationDiffusion amplifies
# it and gets BACKEND_TOL. A stride bug gives errors of order 1.
LAYOUT_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# -- operators --------------------------------------------------------------------------------

def _operator_cases(ctx: Context, dtype: torch.dtype):
    """(name, float64 input, float64 reference function, fn(backend, input))."""
    from .. import cosine_similarity, newton_schulz_inverse, spatial_semantic_laplacian
    from ..reference import cosine_similarity_ref, newton_schulz_inverse_ref, spatial_semantic_laplacian_ref
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
            label = f"{name} {dtype_name(dtype)} ({shape})"
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
                err_t = (rel(runs[0][0], out_r), rel(runs[0][1], xr.grad))
                err_p = (rel(torch_out[0], out_r), rel(torch_out[1], xr.grad))
                vs_torch = (rel(runs[0][0], torch_out[0]), rel(runs[0][1], torch_out[1]))
                tol = OPERATOR_TOL[dtype]
                # within the tolerance of the float64 reference (or twice torch's own error), and
                # within twice the tolerance of the torch backend
                ok = equal and finite and all(err_t[i] <= max(tol, 2 * err_p[i]) and vs_torch[i] <= 2 * tol
                                              for i in (0, 1))
                report.check(ok, "operators", label,
                             f"vs float64: triton fwd {fmt(err_t[0])} grad {fmt(err_t[1])}, torch fwd "
                             f"{fmt(err_p[0])} grad {fmt(err_p[1])} (tol max({tol:.0e}, 2x torch)); "
                             f"triton vs torch fwd {fmt(vs_torch[0])} grad {fmt(vs_torch[1])} (tol {2 * tol:.0e}); "
                             f"2 runs bitwise {'equal' if equal else 'DIFFERENT'}"
                             + ("" if finite else "; NON-FINITE values"), time.monotonic() - t0)
            except Exception as err:  # noqa: BLE001 - reported, the run goes on
                report.error("operators", label, err, time.monotonic() - t0)
    _check_subnormal_row(report, ctx)


def _check_subnormal_row(report: Report, ctx: Context) -> None:
    """A float32 row whose squared norm is subnormal (0 < |x|^2 < 1.2e-38)."""
    from .. import cosine_similarity
    from ..reference import cosine_similarity_ref
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
    from .. import ActivationDiffusion, cosine_similarity, newton_schulz_inverse, spatial_semantic_laplacian
    from ..reference import cosine_similarity_ref, spatial_semantic_laplacian_ref
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
            label = f"{op} {dtype_name(dtype)}, {layout}"
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
                    errs.append((max(rel(a, b) for a, b in zip(out_v, out_c)),
                                 max(rel(a, b) for a, b in zip(grad_v, grad_c))))
                vs_torch = max(rel(a, b) for a, b in zip(results["triton"], results["torch"]))
                tol_f, tol_g = (LAYOUT_TOL[dtype],) * 2 if op != "ActivationDiffusion" else BACKEND_TOL[dtype]
                ok = all(f <= tol_f and g <= tol_g for f, g in errs) and vs_torch <= BACKEND_TOL[dtype][1]
                report.check(ok, "layouts", label,
                             "vs contiguous copy: " + ", ".join(f"{b} fwd {fmt(f)} grad {fmt(g)}"
                                                                for b, (f, g) in zip(BACKENDS, errs)) +
                             f" (tol {tol_f:.0e}/{tol_g:.0e}); triton vs torch {fmt(vs_torch)}",
                             time.monotonic() - t0)
            except Exception as err:  # noqa: BLE001
                report.error("layouts", label, err, time.monotonic() - t0)

