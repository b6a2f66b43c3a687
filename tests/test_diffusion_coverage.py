"""ActivationDiffusion cases that tests/test_diffusion.py leaves out: 8 neighbours in float32
(exact gradients, and the dense implementation), C = 1, SCM_OPS_CHECKS=0, divergence in the
dense implementation, p = 0 blocks, a grid above 1024 cells on the Triton backend, and the
constructor's bad arguments. Every parity check is against the float64 published stack
(scm_ops.reference.activation_diffusion_ref); errors are relative RMSE.
"""
import pytest
import torch

import scm_ops
from scm_ops.reference import activation_diffusion_ref
from scm_ops.structured import series_max_cells
from scm_ops.testing import relative_rmse

NAMES = ("attention", "semantic", "d/dattention", "d/dsemantic", "d/dlam", "d/dbeta")


def make_inputs(batch, channels, grid, dtype, device, seed=0):
    """F uniform in [0, 1), S signed standard normal (a convolution output)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(batch, *grid, generator=g, dtype=torch.float64)
    s = torch.randn(batch, channels, *grid, generator=g, dtype=torch.float64)
    return f.to(device, dtype).requires_grad_(), s.to(device, dtype).requires_grad_()


def outputs_and_gradients(module, f, s, seed=1):
    """(F, S) after the module and the gradients of a random linear loss of both to
    (F, S, lam, beta); the same loss for the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(f.device) for t in (f, s)]
    out = module(f, s)
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(out, weights))
    ours = list(out) + list(torch.autograd.grad(loss, (f, s, module.lam, module.beta)))
    leaves = [t.detach().double().requires_grad_() for t in (f, s, module.lam, module.beta)]
    ref_out = activation_diffusion_ref(*leaves, module.iterations, module.alpha, module.connectivity,
                                      detach_init=not module.exact_gradients)
    ref_loss = sum((o * w).sum() for o, w in zip(ref_out, weights))
    ref = list(ref_out) + list(torch.autograd.grad(ref_loss, leaves))
    return ours, ref


def errors(module, f, s):
    ours, ref = outputs_and_gradients(module, f, s)
    for name, a in zip(NAMES, ours):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
    return {name: relative_rmse(a, r) for name, a, r in zip(NAMES, ours, ref)}


def assert_within(errs, tolerances):
    """tolerances: one bound for the forward outputs and one for the gradients, or per name."""
    for i, name in enumerate(NAMES):
        tol = tolerances[name] if isinstance(tolerances, dict) else tolerances[0 if i < 2 else 1]
        assert errs[name] <= tol, f"{name}: relative RMSE {errs[name]:.3e} > {tol:.1e}"


# ------------------------------------------------------------------ 8 neighbours, float32
@pytest.mark.parametrize("implementation, exact", [("structured", True), ("dense", False), ("dense", True)],
                         ids=["structured-exact_grad", "dense-published_grad", "dense-exact_grad"])
def test_eight_neighbours_float32(device, backend, implementation, exact):
    module = scm_ops.ActivationDiffusion((5, 6), iterations=(16, 2), connectivity=8, exact_gradients=exact,
                                         lam=[1.05, 0.95], beta=[0.5, 0.4], implementation=implementation,
                                         backend=backend).to(device)
    f, s = make_inputs(2, 7, (5, 6), torch.float32, device)
    # measured, max over both backends and the three variants: forward 5.7e-6, d/dattention
    # 2.0e-5, d/dsemantic 9.5e-6, d/dlam 1.6e-5, d/dbeta 8.7e-5 (a scalar summing cancelling
    # terms through tanhshrink near 0 and min-max)
    assert_within(errors(module, f, s), {"attention": 6e-5, "semantic": 6e-5, "d/dattention": 2e-4,
                                         "d/dsemantic": 1e-4, "d/dlam": 2e-4, "d/dbeta": 9e-4})


# ------------------------------------------------------------------ C = 1
@pytest.mark.parametrize("implementation", ["structured", "dense"])
def test_single_channel(device, backend, implementation):
    """With C = 1 every cosine is the product of two signs (+1 or -1), so L mixes both."""
    module = scm_ops.ActivationDiffusion((5, 6), iterations=(16, 2), lam=[1.05, 0.95],
                                         implementation=implementation, backend=backend).to(device).double()
    f, s = make_inputs(2, 1, (5, 6), torch.float64, device)
    assert (s < 0).any() and (s > 0).any()
    # measured, both backends: forward <= 7.8e-16, gradients <= 1.8e-14
    assert_within(errors(module, f, s), (8e-15, 2e-13))


# ------------------------------------------------------------------ p = 0 blocks
@pytest.mark.parametrize("implementation", ["structured", "dense"])
def test_blocks_without_iterations(device, backend, implementation):
    """p = 0: M = X_0^T = alpha L, one stencil product (no Newton-Schulz step)."""
    module = scm_ops.ActivationDiffusion((5, 6), iterations=(0, 1, 0), lam=[1.1, 0.9, 1.0],
                                         implementation=implementation, backend=backend).to(device).double()
    f, s = make_inputs(2, 4, (5, 6), torch.float64, device)
    for exact in (False, True):
        module.exact_gradients = exact
        # measured, both backends and semantics: forward <= 1.1e-16, gradients <= 1.3e-11
        # (d/dbeta: tanhshrink of u / (beta max F) ~ 1e-3 cancels; the others <= 1.2e-14)
        assert_within(errors(module, f, s), (2e-15, 1.5e-10))


# ------------------------------------------------------------------ SCM_OPS_CHECKS=0
def test_checks_off_still_correct_and_really_off(device, monkeypatch):
    """The switch only skips the finite-value and convergence screens, which run before
    either backend's kernels: the PyTorch backend stands for both."""
    grid = (5, 6)
    module = scm_ops.ActivationDiffusion(grid, iterations=(16, 4), backend="torch").to(device).double()
    f, s = make_inputs(2, 5, grid, torch.float64, device)
    nan_f = f.detach().clone()
    nan_f[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="attention contains NaN"):
        module(nan_f, s.detach())
    monkeypatch.setenv("SCM_OPS_CHECKS", "0")
    module(nan_f, s.detach())          # no check, no error: the switch is read at call time
    # measured: forward 2.2e-15, gradients <= 2.2e-13
    assert_within(errors(module, f, s), (3e-14, 3e-12))


# ------------------------------------------------------------------ divergence, dense
def test_divergence_in_dense_implementation(device, backend):
    """lam = 20 gives neighbour entries 1 - 20 E of size ~20 and alpha sigma_max^2 >= 2."""
    f, s = make_inputs(2, 5, (5, 6), torch.float64, device)
    s = s.detach().abs()               # positive maps: cosines near 1, L entries near -19
    for lam, block in (([20.0, 1.0], 0), ([1.0, 20.0], 1)):
        module = scm_ops.ActivationDiffusion((5, 6), iterations=(4, 2), lam=lam, implementation="dense",
                                             backend=backend).to(device).double()
        with pytest.raises(scm_ops.NewtonSchulzDivergenceError, match=f"block {block}: lam=20 "):
            module(f.detach(), s)


# ------------------------------------------------------------------ constructor
@pytest.mark.parametrize("kwargs, match", [
    (dict(grid_size=(0, 3)), "grid_size"),
    (dict(grid_size=(2.5, 3)), "grid_size"),
    (dict(grid_size=(2, 3, 4)), "grid_size"),
    (dict(iterations=()), "iterations"),
    (dict(iterations=(4, -1)), "iterations"),
    (dict(iterations=(4.0,)), "iterations"),
    (dict(connectivity=6), "connectivity"),
    (dict(implementation="fast"), "implementation"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=-0.002), "alpha"),
    (dict(lam=[1.0, 1.0]), "lam must be a number or have one value per block"),
    (dict(beta=[0.5, 0.5, 0.5]), "beta must be a number or have one value per block"),
    (dict(backend="cuda"), "backend"),
    (dict(large_p_route="eigh"), "large_p_route"),
])
def test_constructor_rejects_bad_arguments(kwargs, match):
    args = dict(grid_size=(5, 6), iterations=(16, 4, 4, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        scm_ops.ActivationDiffusion(**args)


# ------------------------------------------------------------------ Triton, above 1024 cells
def test_triton_grid_above_1024_cells_matches_torch(device):
    """33 x 32 = 1056 cells: the Triton matrix-free kernel holds a grid of up to
    series_max_cells() cells in one program, larger ones take the PyTorch steps (the
    neighbour cosines stay on Triton); both backends must agree. One p = 4 block keeps the interpreter
    fast (the p = 16 block would need the N x N spectral form)."""
    grid = (33, 32)
    assert grid[0] * grid[1] > series_max_cells()      # 1024 when written
    f, s = make_inputs(1, 2, grid, torch.float64, device)
    results = []
    for backend in ("torch", "triton"):
        module = scm_ops.ActivationDiffusion(grid, iterations=(4,), lam=1.05, backend=backend).to(device).double()
        out_f, out_s = module(f, s)
        loss = out_f.sum() + (out_s * s.detach()).sum()
        results.append([out_f, out_s, *torch.autograd.grad(loss, (f, s, module.lam, module.beta))])
    # measured: forward 8.7e-17 / 7.3e-17, gradients <= 3.6e-16 except d/dbeta 6.0e-15;
    # Triton in the interpreter took 1.3 s
    for name, a, b in zip(NAMES, *results):
        assert relative_rmse(a, b) <= 6e-14, name


# Measured (2026-11-29, both backends, grids 1 x 5, 5 x 1 and 1 x 2; worst case per quantity): Chebyshev
# forward 3.7e-11, d/dF 1.1e-10, d/dS 4.2e-9, d/dlam 5.9e-8, d/dbeta 5.8e-9 (its float64
# truncation); spectral 1.2e-13, 3.3e-13, 3.5e-13, 1.8e-8, 5.8e-9; Newton-Schulz 1.4e-15,
# 6.4e-15, 9.5e-15, 1.8e-8, 5.8e-9. d/dlam and d/dbeta are small sums with cancellation on
# these 2-5 cell grids, so every route shows the same ~1e-8 there. Bounds about 10x.
ONE_ROW_TOLERANCE = {
    "chebyshev": dict(zip(NAMES, (4e-10, 4e-10, 1.1e-9, 4.2e-8, 6e-7, 6e-8))),
    "spectral": dict(zip(NAMES, (1.2e-12, 1.2e-12, 3.3e-12, 3.5e-12, 2e-7, 6e-8))),
    "newton_schulz": dict(zip(NAMES, (1.4e-14, 1.4e-14, 6.4e-14, 1e-13, 2e-7, 6e-8))),
}


@pytest.mark.parametrize("route", ["chebyshev", "spectral", "newton_schulz"])
@pytest.mark.parametrize("grid", [(1, 5), (5, 1)])
def test_one_row_or_column_grids_with_eight_neighbours(device, backend, grid, route):
    """On a one-row grid the flat shift of a diagonal offset (W + 1) reaches past the last
    cell: the flat-cell PyTorch path must skip it (with B = 1 it has no next image to land
    in). float64, one image, every large-p route."""
    module = scm_ops.ActivationDiffusion(grid, connectivity=8, large_p_route=route, backend=backend).to(device)
    f, s = make_inputs(1, 3, grid, torch.float64, device)
    assert_within(errors(module, f, s), ONE_ROW_TOLERANCE[route])
