"""What a first GPU session must see, as one markdown summary (scripts/gpu_check.sh runs it).

    python scripts/gpu_check.py --summary OUT/summary.md            # CUDA: B = 64, 20 repeats
    TRITON_INTERPRET=1 python scripts/gpu_check.py --small --summary /tmp/summary.md   # CPU dry run

Sections, in order (each check PASS or FAIL with its numbers; a check that cannot run on
this machine says "skipped" and why):

1. The structured path of ActivationDiffusion on the Triton backend (neighbour-cosine,
   matrix-free series and Chebyshev series kernels, and every route of the p = 16 block;
   8-neighbour grids above 256 cells run the Chebyshev series in PyTorch) on grids 14x14, 32x32,
   20x20, 7x7, 1x5, 4 and 8 neighbours, float32 and float64, both gradient semantics:
   `repeats` runs of forward + backward must be bitwise equal (the kernels use no atomics),
   and agree with backend="torch".
2. Every operator on non-contiguous inputs (transposed views, channels_last semantic maps,
   expanded batches), forward and backward, both backends, against the same operator on a
   contiguous copy.
3. Registers, spills and shared memory of every Triton kernel launched in 1, 2 and 4, read
   from Triton's compile caches (CUDA only).
4. Precision against a float64 reference in float32 and bfloat16 (bfloat16: CUDA only),
   both backends, and a float32 cosine row whose squared norm is subnormal.
5. Versions: torch, CUDA, Triton, the driver (nvidia-smi).

Only the public API of scm_ops is used. Exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import platform
import subprocess
import sys
import time
import traceback

import torch

import scm_ops
from scm_ops.reference import (activation_diffusion_ref, cosine_similarity_ref, newton_schulz_inverse_ref,
                               spatial_semantic_laplacian_ref)
from scm_ops.testing import relative_rmse

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
BACKENDS = ("triton", "torch")
GRIDS = [(14, 14), (32, 32), (20, 20), (7, 7), (1, 5)]
ALPHA = 0.002
# Relative RMSE allowed between the two backends of the structured path (both compute in the
# dtype given; the tests hold each backend to 1e-4 / 2e-3 of the float64 published stack in
# float32, so two of them differ by at most about twice that).
BACKEND_TOL = {torch.float32: (2e-4, 4e-3), torch.float64: (1e-10, 1e-8)}   # (forward, gradients)
# A non-contiguous input must give what a contiguous copy gives, up to a different order of
# the same sums: a few units of roundoff for the operators. The ActivationDiffusion stack
# amplifies such a change (channels_last S on the torch backend, CPU, float32: measured
# 6e-6 forward, 2e-5 gradients), so it gets the tolerances between backends. A stride bug
# gives errors of order 1 (12-120 % for the Newton-Schulz backward on a transposed L).
LAYOUT_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# Against the float64 reference: a backend passes if its error is below the operator tests'
# tolerance for the dtype or within twice the torch backend's own error.
PRECISION_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


class Summary:
    """Markdown summary written after every section (a time-out leaves what was done)."""

    def __init__(self, path):
        self.path = path
        self.lines = []
        self.failed = 0

    def head(self, text):
        self.lines += ["", f"## {text}", ""]
        self.flush()

    def text(self, text):
        self.lines.append(text)

    def table(self, header, rows):
        self.lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.lines.append("")
        self.flush()

    def verdict(self, ok: bool) -> str:
        if not ok:
            self.failed += 1
        return "PASS" if ok else "**FAIL**"

    def flush(self):
        with open(self.path, "w") as f:
            f.write("\n".join(self.lines) + "\n")
        print(self.lines[-1] if self.lines else "", flush=True)


def large_p_routes():
    routes = getattr(scm_ops.diffusion, "LARGE_P_ROUTES", None)
    if routes is not None:
        return tuple(routes)
    out = []
    for r in ("spectral", "newton_schulz", "chebyshev"):
        try:
            scm_ops.ActivationDiffusion((2, 2), large_p_route=r)
            out.append(r)
        except ValueError:
            pass
    return tuple(out)


def _fmt(x):
    return "-" if x is None else f"{x:.1e}"


def _sync():
    if ON_CUDA:
        torch.cuda.synchronize()


# -- 1. the series kernels: determinism and backend agreement --------------------------------

def diffusion_pass(model, f0, s0, gf, gs):
    """Forward + backward with fixed cotangents; returns the outputs and every gradient."""
    f = f0.detach().clone().requires_grad_(True)
    s = s0.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out_f, out_s = model(f, s)
    torch.autograd.backward([out_f, out_s], [gf, gs])
    _sync()
    return [out_f.detach(), out_s.detach(), f.grad, s.grad, model.lam.grad, model.beta.grad]


def series_configs(grids, dtypes):
    """(grid, connectivity, dtype, exact_gradients) of every configuration of section 1."""
    return [(grid, c, dtype, exact) for grid in grids for c in (4, 8) for dtype in dtypes for exact in (False, True)]


def series_variants(configs):
    """(variant name, module kwargs, configs) in the order they run: the matrix-free series
    alone and the default route everywhere first, then each route by name (the dense ones,
    newton_schulz and spectral, only up to 400 cells), so that a time-out cuts the least
    important rows."""
    variants = [("series", dict(iterations=(4, 4, 4)), configs), ("default", {}, configs)]
    for route in large_p_routes():
        dense = route in ("newton_schulz", "spectral")
        variants.append((route, dict(large_p_route=route),
                         [c for c in configs if not dense or c[0][0] * c[0][1] <= 400]))
    return variants


def _default_route(grid):
    """The route ActivationDiffusion(large_p_route=None) takes for this grid on DEVICE."""
    fn = getattr(scm_ops.diffusion, "default_large_p_route", None)
    if fn is None:
        return None
    try:
        return fn(DEVICE, grid)
    except TypeError:
        return fn(DEVICE)


def _error_text(err):
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"


def check_series(summary, batch, channels, repeats, variants, deadline):
    summary.head(f"1. ActivationDiffusion structured path, backend='triton': {repeats} runs bitwise equal, "
                 "and against backend='torch'")
    summary.text(f"B = {batch}, C = {channels}, S0 signed i.i.d., F0 uniform in [0, 1), fixed cotangents; "
                 "compared: both outputs and the gradients to F0, S0, lam and beta. Variants: `series` = "
                 "iterations (4, 4, 4) (neighbour-cosine and matrix-free series kernels only), `default` = "
                 "(16, 4, 4, 4) with the default route of the p = 16 block, then each route by name (dense "
                 "routes only up to 400 cells). Tolerance between backends (relative RMSE, forward / "
                 "gradients): float32 2e-4 / 4e-3, float64 1e-10 / 1e-8. Seconds include Triton compilation. "
                 "Where the p = 16 block runs a dense route (newton_schulz, spectral) above 400 cells, 3 runs.")
    summary.text("")
    rows = []
    for name, kwargs, configs in variants:
        for grid, connectivity, dtype, exact in configs:
            label = [name, f"{grid[0]}x{grid[1]}", connectivity, str(dtype).replace("torch.", ""),
                     "exact" if exact else "published"]
            if time.monotonic() > deadline:
                rows.append(label + ["-", "-", "-", "-", "skipped: time budget"])
                continue
            g = torch.Generator().manual_seed(0)
            s0 = torch.randn(batch, channels, *grid, generator=g, dtype=dtype).to(DEVICE)
            f0 = torch.rand(batch, *grid, generator=g, dtype=dtype).to(DEVICE)
            gf = torch.randn(batch, *grid, generator=g, dtype=dtype).to(DEVICE)
            gs = torch.randn(batch, channels, *grid, generator=g, dtype=dtype).to(DEVICE)
            route = kwargs.get("large_p_route") or (None if "iterations" in kwargs else _default_route(grid))
            # a dense p = 16 route above 400 cells costs ~1 s a pass in float64: 3 runs there
            runs = repeats if route not in ("newton_schulz", "spectral") or grid[0] * grid[1] <= 400 else min(3, repeats)
            t0 = time.monotonic()
            models = {b: scm_ops.ActivationDiffusion(grid, connectivity=connectivity, exact_gradients=exact,
                                                     backend=b, **kwargs).to(DEVICE) for b in BACKENDS}
            try:
                first = diffusion_pass(models["triton"], f0, s0, gf, gs)
                unequal = 0
                for _ in range(runs - 1):
                    again = diffusion_pass(models["triton"], f0, s0, gf, gs)
                    unequal += sum(not torch.equal(a, b) for a, b in zip(first, again))
            except Exception as err:  # noqa: BLE001 - reported, the run goes on
                rows.append(label + ["-", "-", "-", f"{time.monotonic() - t0:.1f}",
                                     summary.verdict(False) + " triton raised " + _error_text(err)])
                continue
            same = f"{unequal} of {6 * (runs - 1)}"
            try:
                ref = diffusion_pass(models["torch"], f0, s0, gf, gs)
            except Exception as err:  # noqa: BLE001
                rows.append(label + [same, "-", "-", f"{time.monotonic() - t0:.1f}",
                                     summary.verdict(False) + " torch backend raised " + _error_text(err)])
                continue
            fwd = max(relative_rmse(a, b) for a, b in zip(first[:2], ref[:2]))
            grad = max(relative_rmse(a, b) for a, b in zip(first[2:], ref[2:]))
            tol_f, tol_g = BACKEND_TOL[dtype]
            ok = unequal == 0 and fwd <= tol_f and grad <= tol_g
            rows.append(label + [same, _fmt(fwd), _fmt(grad), f"{time.monotonic() - t0:.1f}", summary.verdict(ok)])
    summary.table(["variant", "grid", "neighbours", "dtype", "gradients", "tensors differing from the first run",
                   "fwd rel. RMSE vs torch", "grad rel. RMSE vs torch", "seconds", "verdict"], rows)


# -- 2. non-contiguous inputs ------------------------------------------------------------------

def _grads_of(fn, leaves, cotangents):
    for t in leaves:
        t.grad = None
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(list(outs), list(cotangents(outs)))
    _sync()
    return [o.detach() for o in outs], [t.grad.clone() for t in leaves]


def _layout_cases(batch, dtype):
    """(operator, layout, leaves, fn(view), view builder): fn applied to the non-contiguous
    view and to a contiguous copy of it (the copy keeps the gradient path to the leaves)."""
    g = torch.Generator().manual_seed(1)
    n, d, grid = 35, 24, (5, 7)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE)

    x_sim = cosine_similarity_ref(torch.randn(batch, n, 16, generator=g, dtype=torch.float64).abs())
    lap = spatial_semantic_laplacian_ref(x_sim, grid, 1.2).to(dtype).to(DEVICE)
    cases = []
    # cosine_similarity: x [B, N, D]
    xt = rand(batch, d, n).requires_grad_(True)
    cases.append(("cosine_similarity", "x = [B, D, N].transpose(1, 2)", [xt], lambda v: v(xt.transpose(1, 2)),
                  lambda b, v: scm_ops.cosine_similarity(v, backend=b)))
    xe = rand(1, n, d).requires_grad_(True)
    cases.append(("cosine_similarity", "x = [1, N, D].expand(B, N, D)", [xe], lambda v: v(xe.expand(batch, n, d)),
                  lambda b, v: scm_ops.cosine_similarity(v, backend=b)))
    # spatial_semantic_laplacian: E [B, N, N]
    e = (x_sim.to(dtype).to(DEVICE) + 0.1 * rand(batch, n, n)).requires_grad_(True)
    cases.append(("spatial_semantic_laplacian", "E = E.mT", [e], lambda v: v(e.mT),
                  lambda b, v: scm_ops.spatial_semantic_laplacian(v, grid, 1.1, backend=b)))
    e1 = e.detach()[:1].clone().requires_grad_(True)
    cases.append(("spatial_semantic_laplacian", "E = [1, N, N].expand(B, N, N)", [e1],
                  lambda v: v(e1.expand(batch, n, n)),
                  lambda b, v: scm_ops.spatial_semantic_laplacian(v, grid, 1.1, backend=b)))
    # newton_schulz_inverse: L [B, N, N] (a convergent SCM Laplacian)
    for detach in (False, True):
        lt = (lap + 0.01 * rand(batch, n, n)).requires_grad_(True)
        cases.append(("newton_schulz_inverse", f"L = L.mT, detach_init={detach}", [lt], lambda v, lt=lt: v(lt.mT),
                      lambda b, v, detach=detach: scm_ops.newton_schulz_inverse(v, 4, ALPHA, detach, backend=b)))
    l1 = lap[:1].clone().requires_grad_(True)
    cases.append(("newton_schulz_inverse", "L = [1, N, N].expand(B, N, N)", [l1], lambda v: v(l1.expand(batch, n, n)),
                  lambda b, v: scm_ops.newton_schulz_inverse(v, 4, ALPHA, True, backend=b)))
    # ActivationDiffusion: S channels_last, F a transposed view; expanded batch
    channels = 40
    s_cl = rand(batch, channels, *grid).to(memory_format=torch.channels_last).requires_grad_(True)
    f_t = torch.rand(batch, grid[1], grid[0], generator=g, dtype=dtype).to(DEVICE).requires_grad_(True)
    for exact in (False, True):
        cases.append(("ActivationDiffusion", f"S channels_last, F = [B, W, H].transpose(1, 2), exact_gradients={exact}",
                      [s_cl, f_t], lambda v: (v(f_t.transpose(1, 2)), v(s_cl)),
                      lambda b, f, s, exact=exact: scm_ops.ActivationDiffusion(
                          grid, exact_gradients=exact, backend=b).to(device=DEVICE)(f, s)))
    s1 = rand(1, channels, *grid).requires_grad_(True)
    f1 = torch.rand(1, *grid, generator=g, dtype=dtype).to(DEVICE).requires_grad_(True)
    cases.append(("ActivationDiffusion", "S, F = [1, ...].expand(B, ...)", [s1, f1],
                  lambda v: (v(f1.expand(batch, *grid)), v(s1.expand(batch, channels, *grid))),
                  lambda b, f, s: scm_ops.ActivationDiffusion(grid, backend=b).to(device=DEVICE)(f, s)))
    return cases


def check_layouts(summary, batch, dtypes, deadline):
    summary.head("2. Operators on non-contiguous inputs, forward and backward, both backends")
    summary.text("Each operator on the non-contiguous view against the same operator on a contiguous copy of "
                 "it (gradients reach the same leaves); B = %d, 5 x 7 grid (N = 35), random cotangents. "
                 "Tolerance (relative RMSE): operators float32 1e-5, float64 1e-12; ActivationDiffusion as in "
                 "section 1 (the stack amplifies a different order of sums). Last column: the Triton backend "
                 "against the torch backend on the view (same tolerances as section 1)." % batch)
    summary.text("")
    rows = []
    for dtype in dtypes:
        for op, layout, leaves, apply_view, fn in _layout_cases(batch, dtype):
            results = {}
            for backend in BACKENDS:
                label = [op, layout, str(dtype).replace("torch.", ""), backend]
                if time.monotonic() > deadline:
                    rows.append(label + ["-", "-", "-", "skipped: time budget"])
                    continue
                try:
                    gen = torch.Generator().manual_seed(2)

                    def cot(outs):
                        return [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs]

                    def run(view):
                        return fn(backend, *apply_view(view)) if op == "ActivationDiffusion" else \
                            fn(backend, apply_view(view))

                    gen.manual_seed(2)
                    out_v, grad_v = _grads_of(lambda: run(lambda t: t), leaves, cot)
                    gen.manual_seed(2)
                    out_c, grad_c = _grads_of(lambda: run(lambda t: t.contiguous()), leaves, cot)
                    fwd = max(relative_rmse(a, b) for a, b in zip(out_v, out_c))
                    grad = max(relative_rmse(a, b) for a, b in zip(grad_v, grad_c))
                    results[backend] = (out_v, grad_v)
                    vs_torch = "-"
                    if backend == "torch" and "triton" in results:
                        tf, tg = results["triton"]
                        vs = max([relative_rmse(a, b) for a, b in zip(tf, out_v)]
                                 + [relative_rmse(a, b) for a, b in zip(tg, grad_v)])
                        vs_torch = _fmt(vs)
                        ok_vs = vs <= BACKEND_TOL.get(dtype, (1e-5, 1e-5))[1]
                    else:
                        ok_vs = True
                    tol_f, tol_g = ((LAYOUT_TOL[dtype],) * 2 if op != "ActivationDiffusion" else BACKEND_TOL[dtype])
                    rows.append(label + [_fmt(fwd), _fmt(grad), vs_torch,
                                         summary.verdict(fwd <= tol_f and grad <= tol_g and ok_vs)])
                except Exception as err:  # noqa: BLE001
                    rows.append(label + ["-", "-", "-", summary.verdict(False) + f" {type(err).__name__}: "
                                         f"{str(err).splitlines()[0][:120]}"])
    summary.table(["operator", "layout", "dtype", "backend", "fwd rel. RMSE vs contiguous",
                   "grad rel. RMSE vs contiguous", "triton vs torch (max)", "verdict"], rows)


# -- 3. registers and spills of the launched kernels ---------------------------------------------

def _jit_functions():
    """Every @triton.jit function in scm_ops.kernels (and its subpackages), unwrapped from
    autotuners/heuristics."""
    import triton
    kernels = importlib.import_module("scm_ops.kernels")
    modules = [kernels] + [importlib.import_module(m.name) for m in
                           pkgutil.walk_packages(kernels.__path__, kernels.__name__ + ".")]
    found = {}
    for module in modules:
        for name, obj in vars(module).items():
            fn = obj
            while fn is not None and not isinstance(fn, triton.runtime.jit.JITFunction):
                fn = getattr(fn, "fn", None)
            if fn is not None:  # named where it is defined (modules re-export helpers)
                py = getattr(fn, "fn", None)
                found[f"{getattr(py, '__module__', module.__name__)}.{getattr(py, '__name__', name)}"] = fn
    return found


def _compiled(fn):
    """(device, key, CompiledKernel) of every compiled specialisation of a JITFunction:
    `device_caches` (Triton >= 3.2) or `cache` (older)."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        for device, entry in list(caches.items()):
            for key, kernel in list(entry[0].items()):
                yield device, key, kernel
    else:
        for device, entry in list(getattr(fn, "cache", {}).items()):
            for key, kernel in list(entry.items()):
                yield device, key, kernel


def check_kernels(summary):
    summary.head("3. Registers, spills and shared memory of every Triton kernel launched above")
    if not ON_CUDA:
        summary.text("skipped: no CUDA (the interpreter compiles nothing)")
        summary.flush()
        return
    summary.text("Read from each @triton.jit function's compile cache after sections 1, 2 and 4 "
                 "(ptxas figures as the driver reports them when loading the cubin). FAIL on any spill.")
    summary.text("")
    rows = []
    for qualname, fn in sorted(_jit_functions().items()):
        for device, key, kernel in _compiled(fn):
            if not hasattr(kernel, "metadata"):  # an unfinished asynchronous compile
                continue
            try:
                kernel._init_handles()  # loaded at the first launch: a no-op here
            except Exception:  # noqa: BLE001
                pass
            md = kernel.metadata
            regs = getattr(kernel, "n_regs", None)
            spills = getattr(kernel, "n_spills", None)
            constants = getattr(getattr(kernel, "src", None), "constants", None)
            if isinstance(constants, dict):
                def arg(k):  # constants are keyed by (argument index,) in recent Triton
                    i = k[0] if isinstance(k, tuple) and len(k) == 1 else k
                    return fn.arg_names[i] if isinstance(i, int) and i < len(fn.arg_names) else k
                const_text = ", ".join(f"{arg(k)}={v}" for k, v in constants.items() if not callable(v))[:200]
            else:
                const_text = str(key)[:200]
            rows.append([qualname.split(".")[-1], getattr(md, "name", "?"), const_text,
                         getattr(md, "num_warps", "?"), getattr(md, "num_stages", "?"), getattr(md, "shared", "?"),
                         regs, spills, summary.verdict(spills == 0)])
    if not rows:
        summary.text("**FAIL**: no compiled Triton kernel found in scm_ops.kernels' compile caches")
        summary.failed += 1
        summary.flush()
        return
    summary.table(["kernel", "compiled name", "constants", "warps", "stages", "shared bytes", "registers / thread",
                   "spills", "verdict"], rows)


# -- 4. precision ---------------------------------------------------------------------------------

def _precision_cases(batch, dtype):
    g = torch.Generator().manual_seed(3)
    n, d, grid = 196, 200, (14, 14)
    x = torch.randn(batch, n, d, generator=g, dtype=torch.float64)
    e = cosine_similarity_ref(torch.randn(batch, n, 16, generator=g, dtype=torch.float64))
    lap = spatial_semantic_laplacian_ref(cosine_similarity_ref(
        torch.randn(batch, n, 16, generator=g, dtype=torch.float64).abs()), grid, 1.2)
    return [("cosine_similarity", x, cosine_similarity_ref, lambda b, t: scm_ops.cosine_similarity(t, backend=b)),
            ("spatial_semantic_laplacian", e, lambda t: spatial_semantic_laplacian_ref(t, grid, 1.1),
             lambda b, t: scm_ops.spatial_semantic_laplacian(t, grid, 1.1, backend=b)),
            ("newton_schulz_inverse (p = 4, detach_init)", lap,
             lambda t: newton_schulz_inverse_ref(t, 4, ALPHA, True),
             lambda b, t: scm_ops.newton_schulz_inverse(t, 4, ALPHA, True, backend=b))]


def check_precision(summary, batch, deadline):
    summary.head("4. Precision against a float64 reference, and the subnormal-norm cosine row")
    summary.text("Relative RMSE of the forward and of the gradient (the float64 reference gets the same "
                 "rounded cotangent). PASS: the Triton backend within the operator tests' tolerance "
                 "(float32 2e-5, bfloat16 2e-2) or within twice the torch backend's own error. "
                 "ActivationDiffusion (float32 only; it computes in float32/float64) against the float64 "
                 "published stack: forward 1e-4, gradients 2e-3, as in the parity tests.")
    summary.text("")
    rows = []
    dtypes = [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        if dtype == torch.bfloat16 and not ON_CUDA:
            rows.append(["all operators", "bfloat16", "-", "-", "-", "-", "skipped: no CUDA (the interpreter has "
                         "no bfloat16)"])
            continue
        for name, x64, ref, fn in _precision_cases(batch, dtype):
            if time.monotonic() > deadline:
                rows.append([name, str(dtype), "-", "-", "-", "-", "skipped: time budget"])
                continue
            try:
                g = torch.Generator().manual_seed(4)
                xr = x64.clone().requires_grad_(True)
                out_r = ref(xr)
                cot = torch.randn(out_r.shape, generator=g, dtype=torch.float64).to(dtype)
                out_r.backward(cot.double())
                errs = {}
                for backend in BACKENDS:
                    xb = x64.to(dtype).to(DEVICE).requires_grad_(True)
                    out = fn(backend, xb)
                    out.backward(cot.to(DEVICE))
                    _sync()
                    errs[backend] = (relative_rmse(out, out_r), relative_rmse(xb.grad, xr.grad))
                tol = PRECISION_TOL[dtype]
                ok = all(errs["triton"][i] <= max(tol, 2 * errs["torch"][i]) for i in (0, 1))
                rows.append([name, str(dtype).replace("torch.", ""), _fmt(errs["triton"][0]), _fmt(errs["torch"][0]),
                             _fmt(errs["triton"][1]), _fmt(errs["torch"][1]), summary.verdict(ok)])
            except Exception as err:  # noqa: BLE001
                rows.append([name, str(dtype), "-", "-", "-", "-", summary.verdict(False) +
                             f" {type(err).__name__}: {str(err).splitlines()[0][:120]}"])
    # ActivationDiffusion, float32, against the float64 published stack
    try:
        g = torch.Generator().manual_seed(5)
        s64 = torch.randn(batch, 200, 14, 14, generator=g, dtype=torch.float64)
        f64 = torch.rand(batch, 14, 14, generator=g, dtype=torch.float64)
        lam = torch.ones(4, dtype=torch.float64, requires_grad=True)
        beta = torch.full((4,), 0.5, dtype=torch.float64, requires_grad=True)
        fr, sr = f64.clone().requires_grad_(True), s64.clone().requires_grad_(True)
        ofr, osr = activation_diffusion_ref(fr, sr, lam, beta)
        cf = torch.randn(ofr.shape, generator=g).double()
        cs = torch.randn(osr.shape, generator=g).double()
        torch.autograd.backward([ofr, osr], [cf, cs])
        errs = {}
        for backend in BACKENDS:
            model = scm_ops.ActivationDiffusion((14, 14), backend=backend).to(DEVICE)
            fb = f64.float().to(DEVICE).requires_grad_(True)
            sb = s64.float().to(DEVICE).requires_grad_(True)
            of, os_ = model(fb, sb)
            torch.autograd.backward([of, os_], [cf.float().to(DEVICE), cs.float().to(DEVICE)])
            _sync()
            errs[backend] = (max(relative_rmse(of, ofr), relative_rmse(os_, osr)),
                             max(relative_rmse(fb.grad, fr.grad), relative_rmse(sb.grad, sr.grad),
                                 relative_rmse(model.lam.grad, lam.grad), relative_rmse(model.beta.grad, beta.grad)))
        ok = errs["triton"][0] <= 1e-4 and errs["triton"][1] <= 2e-3
        rows.append(["ActivationDiffusion (default route)", "float32", _fmt(errs["triton"][0]), _fmt(errs["torch"][0]),
                     _fmt(errs["triton"][1]), _fmt(errs["torch"][1]), summary.verdict(ok)])
    except Exception as err:  # noqa: BLE001
        rows.append(["ActivationDiffusion", "float32", "-", "-", "-", "-", summary.verdict(False) +
                     f" {type(err).__name__}: {str(err).splitlines()[0][:120]}"])
    summary.table(["operator", "dtype", "triton fwd", "torch fwd", "triton grad", "torch grad", "verdict"], rows)

    # a float32 row whose squared norm is subnormal (0 < |x|^2 < 1.2e-38)
    try:
        g = torch.Generator().manual_seed(6)
        d = 64
        x = torch.randn(2, 4, d, generator=g)
        x[:, 0] = 1e-20                      # |x_0|^2 = 6.4e-39: subnormal in float32
        x[1, 1] = -1e-20
        outs, grads = {}, {}
        for backend in BACKENDS:
            xb = x.to(DEVICE).requires_grad_(True)
            out = scm_ops.cosine_similarity(xb, backend=backend)
            out.backward(torch.ones_like(out))
            _sync()
            outs[backend], grads[backend] = out.detach().cpu(), xb.grad.cpu()
        ref = cosine_similarity_ref(x.double())
        finite = all(bool(torch.isfinite(t).all()) for t in (*outs.values(), *grads.values()))
        diff = (outs["triton"].double() - outs["torch"].double()).abs().max().item()
        err_ref = (outs["triton"].double() - ref).abs().max().item()
        err_torch = (outs["torch"].double() - ref).abs().max().item()
        # a subnormal |x|^2 keeps fewer significant bits: the torch backend's own error here
        # (5.5e-6 measured on the CPU) sets the scale, with 1e-6 as the floor
        ok = finite and err_ref <= max(1e-6, 2 * err_torch) and diff <= 1e-5
        summary.text(f"Subnormal-norm row (float32, entries +-1e-20, D = {d}, |x|^2 = 6.4e-39): outputs and "
                     f"gradients finite on both backends: {finite}; max |triton - torch| = {diff:.1e} (tolerance "
                     f"1e-5); max |cosine - float64 reference|: triton {err_ref:.1e}, torch {err_torch:.1e} "
                     f"(triton's tolerance: max(1e-6, twice torch's)); cosine of the row "
                     f"with itself: triton {outs['triton'][0, 0, 0].item():.7g}, torch "
                     f"{outs['torch'][0, 0, 0].item():.7g}. {summary.verdict(ok)}")
    except Exception as err:  # noqa: BLE001
        summary.text(f"Subnormal-norm row: {summary.verdict(False)} {type(err).__name__}: {err}")
    summary.text("")
    summary.flush()


# -- 5. versions ----------------------------------------------------------------------------------

def versions(summary):
    summary.head("5. Versions")
    import triton
    lines = [f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
             f"Python {platform.python_version()}, scm_ops {scm_ops.__version__} from {os.path.dirname(scm_ops.__file__)}"]
    if ON_CUDA:
        p = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                     f"{p.multi_processor_count} SMs")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
            lines.append(f"- nvidia-smi: {smi}")
        except (OSError, subprocess.SubprocessError) as err:
            lines.append(f"- nvidia-smi: not available ({err})")
    else:
        lines.append(f"- device: CPU ({platform.processor() or platform.machine()}); skipped: no CUDA, no driver; "
                     f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    summary.lines += lines
    summary.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", required=True, help="markdown file to write")
    parser.add_argument("--small", action="store_true",
                        help="dry run: B = 2, 2 repeats, C = 16, grids 1x5 and 2x5, float32 (CPU interpreter)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of sections 1, 2 and 4 (55 %%, 25 %%, 20 %%); cases past it are "
                             "reported as skipped (default 240 s, 600 s with --small)")
    args = parser.parse_args(argv)
    if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        message = "no CUDA device, and TRITON_INTERPRET=1 is not set (the CPU dry run needs it)"
        with open(args.summary, "w") as f:
            f.write(f"# scm_ops GPU check\n\n**FAIL**: {message}; torch {torch.__version__}.\n")
        print(message, file=sys.stderr)
        return 2
    start = time.monotonic()
    if args.budget_s is None:
        args.budget_s = 600.0 if args.small else 240.0
    summary = Summary(args.summary)
    summary.lines = [f"# scm_ops GPU check ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
                     f"Device: {torch.cuda.get_device_name() if ON_CUDA else 'CPU (Triton interpreter)'}; "
                     f"mode: {'small dry run' if args.small else 'full'}."]
    if args.small:
        # the interpreter takes ~25 s per row on a shared 2-core CPU: one configuration per
        # variant, and 8 neighbours / exact gradients once
        batch, repeats, channels = 2, 2, 16
        base = [((1, 5), 4, torch.float32, False)]
        variants = [(n, k, base) for n, k, _ in series_variants(base)]
        variants.insert(1, ("series", dict(iterations=(4, 4, 4)), [((2, 5), 8, torch.float32, True)]))
    else:
        batch, repeats, channels = 64, 20, 200
        variants = series_variants(series_configs(GRIDS, [torch.float32, torch.float64]))
    budget = args.budget_s
    sections = [lambda: check_series(summary, batch, channels, repeats, variants, start + 0.55 * budget),
                lambda: check_layouts(summary, batch if args.small else 8, [torch.float32, torch.float64],
                                      start + 0.8 * budget),
                lambda: check_precision(summary, batch if args.small else 16, start + budget),
                lambda: check_kernels(summary),
                lambda: versions(summary)]
    # order of the summary: 1, 2, 3, 4, 5; section 3 reads the kernels that 4 launched too, so
    # it runs after 4 and is moved into place at the end
    for i, section in enumerate(sections):
        mark = len(summary.lines)
        t0 = time.monotonic()
        try:
            section()
        except Exception:  # noqa: BLE001
            summary.failed += 1
            summary.lines += ["", "**FAIL**: the section raised:", "", "```", traceback.format_exc(), "```"]
        summary.lines.append(f"_(section took {time.monotonic() - t0:.1f} s)_")
        if i == 3:  # kernels: move before precision
            kernel_lines = summary.lines[mark:]
            del summary.lines[mark:]
            prec_start = next(j for j, line in enumerate(summary.lines) if line.startswith("## 4."))
            summary.lines[prec_start - 1:prec_start - 1] = kernel_lines
        summary.flush()
    summary.lines.insert(3, "")
    summary.lines.insert(4, f"**{'ALL CHECKS PASS' if summary.failed == 0 else f'{summary.failed} CHECK(S) FAILED'}** "
                            f"(sections 1-5 took {time.monotonic() - start:.0f} s; budget {args.budget_s:.0f} s for 1, 2, 4).")
    summary.flush()
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
