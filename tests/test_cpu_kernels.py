"""The CPU kernels (kernels/structured/cpu.c, scm_ops/structured/cpu.py) against the PyTorch
loops they replace on the CPU: the Chebyshev series (forward basis, reverse pass, both gradient
semantics) and the matrix-free series (forward, backward), 4 and 8 neighbours, grids with one
row or one column, float32 and float64, an empty batch; the module end to end; and the
fallback to the PyTorch loops where no compiler builds them.

Tolerances: the C loops and the PyTorch loops do the same float64 arithmetic in another order
(per image, the scale applied after the sum): measured up to 7e-14 relative RMSE on these
inputs (Chebyshev degrees 100-370); bound 1e-12. The matrix-free series of float32 inputs
runs in float64 in C and in float32 in PyTorch: measured up to 2.5e-7; bound 2e-6 (a few
float32 roundings over 16 steps)."""
import os
import shutil
import warnings

import pytest
import torch

import scm_ops
from scm_ops.structured import chebyshev, cpu, series
from scm_ops.structured.stencil import OFFSETS
from scm_ops.testing import assert_rel_rmse, random_stencil, semantic_maps

GRIDS = [(5, 7), (1, 9), (9, 1), (4, 4)]
HAS_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None


def _both(monkeypatch, run):
    """run() with the PyTorch loops, then with the C kernels."""
    monkeypatch.setenv("SCM_OPS_CPU_KERNELS", "0")
    torch_loops = run()
    monkeypatch.setenv("SCM_OPS_CPU_KERNELS", "1")
    return torch_loops, run()


def _values_and_grads(fn, inputs, cotangent):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(cotangent)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_kernels_build_here():
    """Where a compiler exists the kernels must build: the fallback would hide a broken file."""
    assert cpu.library() is not None


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
def test_chebyshev_matches_torch_loops(monkeypatch, connectivity, grid, exact):
    offsets = OFFSETS[connectivity]
    w, d = random_stencil(3, connectivity, torch.float64, "cpu", grid=grid)
    f = torch.rand(3, *grid, dtype=torch.float64)
    g = torch.randn(3, *grid, dtype=torch.float64)
    info = {}

    def run():
        return _values_and_grads(lambda *x: chebyshev.ChebyshevFilter.apply(*x, 0.002, 16, offsets, exact, info),
                                 (f, w, d), g)

    torch_loops, c_kernels = _both(monkeypatch, run)
    assert info["basis_degree"] >= 50
    for name, a, b in zip(("u", "dF", "dw", "dd"), c_kernels, torch_loops):
        assert_rel_rmse(a, b, 1e-12, name)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=["float64", "float32"])
@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
def test_matrix_free_series_matches_torch_loops(monkeypatch, connectivity, grid, dtype, tol, exact):
    offsets = OFFSETS[connectivity]
    w, d = random_stencil(3, connectivity, dtype, "cpu", grid=grid)
    f = torch.rand(3, *grid, dtype=dtype)
    g = torch.randn(3, *grid, dtype=dtype)

    def run():
        return _values_and_grads(lambda *x: series.StencilSeries.apply(*x, 0.002, 4, offsets, exact), (f, w, d), g)

    torch_loops, c_kernels = _both(monkeypatch, run)
    for name, a, b in zip(("u", "dF", "dw", "dd"), c_kernels, torch_loops):
        assert a.dtype == dtype
        assert_rel_rmse(a, b, tol, name)


def test_empty_batch(monkeypatch):
    offsets = OFFSETS[4]
    w, d = random_stencil(1, 4, torch.float64, "cpu", grid=(3, 4))
    w, d = w[:0], d[:0]
    f = torch.rand(0, 3, 4, dtype=torch.float64, requires_grad=True)
    for fn in (lambda: chebyshev.ChebyshevFilter.apply(f, w, d, 0.002, 16, offsets, False),
               lambda: series.StencilSeries.apply(f, w, d, 0.002, 4, offsets, False)):
        u = fn()
        u.sum().backward()
        assert u.shape == (0, 3, 4) and f.grad.shape == (0, 3, 4)


@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
def test_module_matches_torch_loops(monkeypatch, exact):
    """ActivationDiffusion (every block structured, float32 as in training) with and without the
    CPU kernels: values, dF0, dS0, dlam, dbeta. Measured between the two: up to 2.8e-6 (values,
    dF0, dS0, dlam) and 1.5e-5 (dbeta), where either is 3e-6 to 9e-6 (dbeta 9e-5) from the
    float64 module: the float32 rounding of the rest of the stack. Bounds about 4x."""
    g = torch.Generator().manual_seed(0)
    s = semantic_maps("signed_iid", 4, 16, 6, 7, g)
    f0 = torch.rand(4, 6, 7, generator=g)

    def run():
        module = scm_ops.ActivationDiffusion((6, 7), exact_gradients=exact, backend="torch",
                                             large_p_route="chebyshev")
        fr, sr = f0.clone().requires_grad_(), s.clone().requires_grad_()
        out_f, out_s = module(fr, sr)
        torch.autograd.backward([out_f.sum(), (out_s * s).sum()])
        return [out_f.detach(), out_s.detach(), fr.grad, sr.grad, module.lam.grad, module.beta.grad]

    torch_loops, c_kernels = _both(monkeypatch, run)
    for name, a, b, tol in zip(("F", "S", "dF0", "dS0", "dlam", "dbeta"), c_kernels, torch_loops,
                               (1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 6e-5)):
        assert_rel_rmse(a, b, tol, name)


def test_without_a_compiler_the_torch_loops_run(monkeypatch, tmp_path):
    """CC naming no compiler: library() warns once and returns None, and the series still
    gives the PyTorch loops' results."""
    monkeypatch.setattr(cpu, "_LIBRARIES", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="did not build"):
        assert cpu.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.library() is None                # remembered: no second attempt, no warning
    offsets = OFFSETS[4]
    w, d = random_stencil(2, 4, torch.float64, "cpu", grid=(4, 5))
    f = torch.rand(2, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        u = chebyshev.ChebyshevFilter.apply(f, w, d, 0.002, 16, offsets, False)
        monkeypatch.setenv("SCM_OPS_CPU_KERNELS", "0")
        reference = chebyshev.ChebyshevFilter.apply(f, w, d, 0.002, 16, offsets, False)
    assert torch.equal(u, reference)
