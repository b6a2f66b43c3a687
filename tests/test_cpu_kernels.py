"""The CPU kernels (kernels/structured/cpu.c, scm_ops/structured/cpu.py) against the PyTorch
loops they replace on the CPU: the Chebyshev series (forward basis, reverse pass, both gradient
semantics, and the forward alone without a kept basis) and the matrix-free series (forward,
backward), 4 and 8 neighbours, grids with one row or one column, float32 and float64, stencil
weights that are not zero off the grid, one and several threads (the images of a batch are
shared among threads: a working row shared between them shows only with two or more), an
empty batch; the module end to end; and the fallback to the PyTorch loops where no compiler
builds them.

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
from scm_ops.structured.stencil import OFFSETS, grid_masks
from scm_ops.testing import assert_rel_rmse, random_stencil, semantic_maps

GRIDS = [(5, 7), (1, 9), (9, 1), (4, 4)]
HAS_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None
BATCH = 5          # more images than threads: every thread runs several, one after another


@pytest.fixture(params=[1, 3], ids=lambda n: f"{n}threads")
def threads(request):
    """The kernels share a batch's images among torch.get_num_threads() threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _off_grid_noise(w: torch.Tensor, offsets, seed: int = 1) -> torch.Tensor:
    """w with random values where the neighbour n + o_k leaves the grid (entries the operator
    never reads: every path must give the results of w with zeros there)."""
    valid, _ = grid_masks(w.shape[2], w.shape[3], 2 * len(offsets), w.dtype, w.device)
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed), dtype=w.dtype)
    return w + noise * (1 - valid)


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
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
def test_chebyshev_matches_torch_loops(monkeypatch, threads, connectivity, grid, dtype, exact):
    """Both paths run the series in float64 for every input dtype, so float32 inputs are held
    to the same bound (the results are then rounded to float32 alike)."""
    offsets = OFFSETS[connectivity]
    w, d = random_stencil(BATCH, connectivity, dtype, "cpu", grid=grid)
    f = torch.rand(BATCH, *grid, dtype=dtype)
    g = torch.randn(BATCH, *grid, dtype=dtype)
    info = {}

    def run():
        return _values_and_grads(lambda *x: chebyshev.ChebyshevFilter.apply(*x, 0.002, 16, offsets, exact, info),
                                 (f, w, d), g)

    torch_loops, c_kernels = _both(monkeypatch, run)
    assert info["basis_degree"] >= 50
    for name, a, b in zip(("u", "dF", "dw", "dd"), c_kernels, torch_loops):
        assert a.dtype == dtype
        assert_rel_rmse(a, b, 1e-12 if dtype == torch.float64 else 1e-7, name)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_chebyshev_forward_without_basis_matches_torch_loops(monkeypatch, threads, connectivity, grid):
    """No gradient asked: the forward keeps no basis and stops at phi's degree (another call
    of the C kernel, without the basis rows)."""
    offsets = OFFSETS[connectivity]
    w, d = random_stencil(BATCH, connectivity, torch.float64, "cpu", grid=grid)
    f = torch.rand(BATCH, *grid, dtype=torch.float64)
    info = {}

    def run():
        with torch.no_grad():
            return chebyshev.ChebyshevFilter.apply(f, w, d, 0.002, 16, OFFSETS[connectivity], False, info)

    torch_loops, c_kernels = _both(monkeypatch, run)
    assert info["degree_phi"] >= 50
    assert_rel_rmse(c_kernels, torch_loops, 1e-12, "u")


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=["float64", "float32"])
@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
def test_matrix_free_series_matches_torch_loops(monkeypatch, threads, connectivity, grid, dtype, tol, exact):
    offsets = OFFSETS[connectivity]
    w, d = random_stencil(BATCH, connectivity, dtype, "cpu", grid=grid)
    f = torch.rand(BATCH, *grid, dtype=dtype)
    g = torch.randn(BATCH, *grid, dtype=dtype)

    def run():
        return _values_and_grads(lambda *x: series.StencilSeries.apply(*x, 0.002, 4, offsets, exact), (f, w, d), g)

    torch_loops, c_kernels = _both(monkeypatch, run)
    for name, a, b in zip(("u", "dF", "dw", "dd"), c_kernels, torch_loops):
        assert a.dtype == dtype
        assert_rel_rmse(a, b, tol, name)


def _series(name: str, offsets):
    """(f, w, d) -> u of the p = 16 Chebyshev series or the p = 4 matrix-free series, published gradient."""
    if name == "chebyshev":
        return lambda *x: chebyshev.ChebyshevFilter.apply(*x, 0.002, 16, offsets, False)
    return lambda *x: series.StencilSeries.apply(*x, 0.002, 4, offsets, False)


@pytest.mark.parametrize("series_name", ["chebyshev", "matrix_free"])
def test_threads_give_identical_bits(series_name):
    """Each image is computed by one thread with the same arithmetic, so any thread count must
    give the bits of one thread; a working row shared between threads breaks that. Images large
    enough (28 x 28, a few ms each) that threads overlap or are preempted mid-image, 2-4 threads,
    10 calls each (a row shared in the forward basis was caught in 5-9 of these 30 calls on a
    loaded 2-core machine)."""
    offsets = OFFSETS[4]
    w, d = random_stencil(8, 4, torch.float64, "cpu", grid=(28, 28))
    f = torch.rand(8, 28, 28, dtype=torch.float64)
    g = torch.randn(8, 28, 28, dtype=torch.float64)
    series_of = _series(series_name, offsets)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = _values_and_grads(series_of, (f, w, d), g)
        for threads in (2, 3, 4):
            torch.set_num_threads(threads)
            for call in range(10):
                for name, a, b in zip(("u", "dF", "dw", "dd"), _values_and_grads(series_of, (f, w, d), g), one_thread):
                    assert torch.equal(a, b), f"{name} with {threads} threads (call {call}) differs from one thread"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("series_name", ["chebyshev", "matrix_free"])
def test_weights_off_the_grid_are_not_read(monkeypatch, connectivity, series_name):
    """Non-zero stencil weights where a neighbour leaves the grid (the kernels read pairs across
    a row end there): the C kernels and the loops both give the results of the zeroed weights,
    and a zero gradient there."""
    offsets = OFFSETS[connectivity]
    w, d = random_stencil(BATCH, connectivity, torch.float64, "cpu", grid=(4, 6))
    noisy = _off_grid_noise(w, offsets)
    assert not torch.equal(noisy, w)
    f = torch.rand(BATCH, 4, 6, dtype=torch.float64)
    g = torch.randn(BATCH, 4, 6, dtype=torch.float64)
    series_of = _series(series_name, offsets)
    monkeypatch.setenv("SCM_OPS_CPU_KERNELS", "0")
    clean = _values_and_grads(series_of, (f, w, d), g)
    torch_loops, c_kernels = _both(monkeypatch, lambda: _values_and_grads(series_of, (f, noisy, d), g))
    valid, _ = grid_masks(4, 6, 2 * len(offsets), torch.float64, "cpu")
    for path, results in (("C kernels", c_kernels), ("PyTorch loops", torch_loops)):
        for name, a, b in zip(("u", "dF", "dw", "dd"), results, clean):
            assert_rel_rmse(a, b, 1e-12, f"{path} {name}")
        assert torch.all(results[2] * (1 - valid) == 0), f"{path}: a gradient off the grid"


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
