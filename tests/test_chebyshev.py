"""The Chebyshev series of the p = 16 block (scm_ops/structured/chebyshev.py) against dense
Newton-Schulz on a dense L built cell by cell (scm_ops.testing.dense_laplacian),
both gradient semantics; its coefficients against the function they approximate; its
radius and divergence check; its Triton kernels (kernels/structured/chebyshev.py) against
the PyTorch path and the dense reference."""
import pytest
import torch

from scm_ops.newton_schulz import NewtonSchulzDivergenceError
from scm_ops.reference import newton_schulz_inverse_ref
from scm_ops.structured.chebyshev import (DEGREE_TOLERANCE, ChebyshevFilter, chebyshev_coefficients,
                                          chebyshev_max_cells, rounded_radius, series_radius)
from scm_ops.structured.stencil import sigma_max_bound
from scm_ops.testing import STENCIL_OFFSETS, assert_rel_rmse, dense_laplacian, random_stencil

OFFSETS = STENCIL_OFFSETS


def reference(f, w, d, alpha, p, offsets, exact):
    """u = X_p^T F with X_p from dense Newton-Schulz (autograd through every product)."""
    L = dense_laplacian(w, d, offsets)
    x = newton_schulz_inverse_ref(L, p, alpha, detach_init=not exact)
    return (x.transpose(1, 2) @ f.reshape(f.shape[0], -1, 1)).reshape(f.shape)


def values_and_gradients(fn, f, w, d, weights):
    leaves = [t.clone().requires_grad_() for t in (f, w, d)]
    u = fn(*leaves)
    return [u] + list(torch.autograd.grad((u * weights).sum(), leaves))


# float64, against dense Newton-Schulz in float64 (p = 16, 7 x 9 grid): measured forward
# 1.1e-11 (4 neighbours) and 1.8e-11 (8), gradients up to 3.8e-10. The series itself is cut
# at 1e-12 of max|phi| (about 2e-12 relative); the rest is rounding in the two float64
# computations (the dense one takes 32 products of 63 x 63 matrices).
TOL_FP64 = (2e-10, 4e-9)


@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_series_matches_dense_newton_schulz_float64(connectivity, exact):
    offsets = OFFSETS[connectivity]
    grid = (7, 9)
    w, d = random_stencil(2, connectivity, torch.float64, "cpu", grid=grid)
    f = torch.rand(2, *grid, dtype=torch.float64)
    weights = torch.randn(2, *grid, dtype=torch.float64)
    ours = values_and_gradients(lambda *x: ChebyshevFilter.apply(*x, 0.002, 16, offsets, exact), f, w, d, weights)
    ref = values_and_gradients(lambda *x: reference(*x, 0.002, 16, offsets, exact), f, w, d, weights)
    for i, (name, a, r) in enumerate(zip(("u", "dF", "dw", "dd"), ours, ref)):
        assert_rel_rmse(a, r, TOL_FP64[i > 0], name)


@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
def test_series_float32_against_float64_reference(exact):
    """float32 inputs against the float64 dense reference. Measured (14 x 14, B = 3,
    R = 4, degree 182-198): forward 8.2e-8, gradients up to 2.5e-7 (the series runs in
    float64 and is cut at the float32 tolerance; dense Newton-Schulz in float32: 6e-7).
    Bounds about 10x."""
    offsets = OFFSETS[4]
    grid = (14, 14)
    w, d = random_stencil(3, 4, torch.float64, "cpu", seed=3, grid=grid)
    f = torch.rand(3, *grid, dtype=torch.float64)
    weights = torch.randn(3, *grid, dtype=torch.float64)
    ours = values_and_gradients(lambda *x: ChebyshevFilter.apply(*x, 0.002, 16, offsets, exact),
                                f.float(), w.float(), d.float(), weights.float())
    ref = values_and_gradients(lambda *x: reference(*x, 0.002, 16, offsets, exact), f, w, d, weights)
    for i, (name, a, r) in enumerate(zip(("u", "dF", "dw", "dd"), ours, ref)):
        assert_rel_rmse(a, r, 1e-6 if i == 0 else 3e-6, name)


def test_gradcheck_exact_gradient_small_degree():
    """Finite differences through the whole Function (p = 6: a short series). Only the
    exact gradient is the derivative of the forward; the published one (X_0 detached) is
    held to the dense reference above."""
    offsets = OFFSETS[4]
    w, d = random_stencil(1, 4, torch.float64, "cpu", grid=(3, 4))
    f = torch.rand(1, 3, 4, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (f, w, d)]
    assert torch.autograd.gradcheck(lambda *x: ChebyshevFilter.apply(*x, 0.05, 6, offsets, True), leaves)


@pytest.mark.parametrize("radius", [0.3, 1.0, 4.5, 12.0])
def test_coefficients_reproduce_phi_and_psi(radius):
    """The truncated series evaluated by the three-term recurrence at 2000 points of
    [0, R^2] against phi and psi in float64: max error within the truncation tolerance
    (measured below 1e-12 of max|f| everywhere for both)."""
    alpha, p = 0.002, 16
    K = 2.0 ** p
    c_phi, c_psi = chebyshev_coefficients(radius, alpha, p, DEGREE_TOLERANCE[torch.float64])
    R = rounded_radius(radius)
    z = torch.linspace(0, R * R, 2000, dtype=torch.float64)
    y = 1 - 2 * z / (R * R)
    with torch.no_grad():
        logs = torch.log1p(-alpha * z)
        phi = torch.where(z > 0, -torch.expm1(K * logs) / z.clamp(min=1e-300), torch.full_like(z, alpha * K))
        psi = torch.exp(K * logs)
    for coef, exact, scale in ((c_phi, phi, alpha * K), (c_psi, psi, 1.0)):
        t0, t1 = torch.ones_like(y), y
        series = coef[0] * t0 + coef[1] * t1
        for c in coef[2:]:
            t0, t1 = t1, 2 * y * t1 - t0
            series = series + c * t1
        assert (series - exact).abs().max() <= 2 * DEGREE_TOLERANCE[torch.float64] * scale


def test_coefficients_cached_and_degree_grows_with_radius():
    tol = DEGREE_TOLERANCE[torch.float32]
    first = chebyshev_coefficients(4.5, 0.002, 16, tol)
    assert chebyshev_coefficients(4.49, 0.002, 16, tol) is first          # same rounded radius
    degrees = [chebyshev_coefficients(r, 0.002, 16, tol)[0].shape[0] - 1 for r in (1.0, 2.0, 4.0)]
    assert degrees[0] < degrees[1] < degrees[2]
    assert 1.8 < degrees[2] / degrees[1] < 2.2                            # about linear in R
    assert rounded_radius(4.5) >= 4.5 and rounded_radius(4.5) < 4.5 * 2 ** (1 / 16) + 1e-12


def test_radius_uses_sigma_where_gershgorin_is_loose_and_divergence_raises():
    """A stencil whose Gershgorin bound (32) is too loose to show convergence
    (alpha R^2 = 2.05) but whose sigma_max (~25.9) converges: the series runs on
    [0, sigma_max^2]. A larger entry that makes Newton-Schulz diverge raises."""
    offsets = OFFSETS[4]
    w = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    d = torch.zeros(1, 4, 4, dtype=torch.float64)
    w[0, 0, 1, 1] = 16.0                    # L[(1,1), (1,2)]
    d[0, 1, 1] = 16.0                        # row sum of (1,1): 32
    sigma = torch.linalg.eigvalsh(dense_laplacian(w, d, offsets)).abs().max().item()
    assert 0.002 * 32.0 ** 2 >= 2 > 0.002 * sigma ** 2
    assert series_radius(w, d, offsets, 0.002) == pytest.approx(sigma, rel=1e-12)
    d[0, 1, 1] = 30.0
    with pytest.raises(NewtonSchulzDivergenceError, match="sigma_max"):
        series_radius(w, d, offsets, 0.002)


def test_custom_operator_matches_function_and_passes_opcheck():
    """scm_ops::chebyshev_filter (what torch.compile calls; its backward recomputes the
    basis) gives the Function's values and gradients, both semantics (same arithmetic:
    measured 0), with the radius computed inside or given as the divergence check's bound
    (sigma), and passes torch.library.opcheck (schema, fake tensor, autograd registration)."""
    offsets = OFFSETS[4]
    w, d = random_stencil(2, 4, torch.float64, "cpu", grid=(5, 6))
    f = torch.rand(2, 5, 6, dtype=torch.float64)
    weights = torch.randn(2, 5, 6, dtype=torch.float64)
    bound = sigma_max_bound(w, d, offsets, 0.002)
    for exact, sigma in ((False, None), (True, bound)):
        ours = values_and_gradients(
            lambda *x: torch.ops.scm_ops.chebyshev_filter(*x, 0.002, 12, 4, exact, "torch", sigma), f, w, d, weights)
        ref = values_and_gradients(lambda *x: ChebyshevFilter.apply(*x, 0.002, 12, offsets, exact), f, w, d, weights)
        for name, a, r in zip(("u", "dF", "dw", "dd"), ours, ref):
            assert_rel_rmse(a, r, 1e-14, name)
        leaves = [t.clone().requires_grad_() for t in (f, w, d)]
        torch.library.opcheck(torch.ops.scm_ops.chebyshev_filter, (*leaves, 0.002, 12, 4, exact, "torch", sigma))


def test_given_sigma_sets_the_radius_and_diverging_sigma_raises():
    """A bound passed as sigma is the one the series uses (a larger one: a larger radius and
    degree); a bound that fails the convergence test raises."""
    offsets = OFFSETS[4]
    w, d = random_stencil(1, 4, torch.float64, "cpu", grid=(4, 4))
    f = torch.rand(1, 4, 4, dtype=torch.float64)
    own, given = {}, {}
    bound = sigma_max_bound(w, d, offsets, 0.002)
    with torch.no_grad():
        ChebyshevFilter.apply(f, w, d, 0.002, 16, offsets, True, own)
        ChebyshevFilter.apply(f, w, d, 0.002, 16, offsets, True, given, "torch", 2 * bound)
    assert own["radius"] == rounded_radius(float(bound[0]))
    assert given["radius"] == rounded_radius(2 * float(bound[0])) and given["degree_phi"] > own["degree_phi"]
    with pytest.raises(NewtonSchulzDivergenceError, match="batch item 0"):
        ChebyshevFilter.apply(f, w, d, 0.002, 16, offsets, True, None, "torch", torch.full((1,), 40.0))


# -- the Triton kernels against the PyTorch path ------------------------------------------
# Both run the same float64 recurrence with the same coefficients; only the order of the
# stencil terms differs. Measured at p = 6, alpha = 0.05 (degree 16-46, cheap in the
# interpreter): at most 1.8e-15 forward, 3.6e-15 gradients; at p = 16 (degree 191-375, 5 x 7
# grid, 4 and 8 neighbours, both semantics) at most 5.4e-14. Bound 1e-12.
TRITON_CASES = [((5, 7), 4, 2), ((5, 7), 8, 2), ((1, 6), 4, 2), ((6, 1), 8, 2), ((3, 2), 8, 0)]


def _torch_and_triton(grid, connectivity, batch, exact, device, p=6, alpha=0.05):
    offsets = OFFSETS[connectivity]
    w, d = random_stencil(batch, connectivity, torch.float64, device, seed=5, grid=grid)
    f = torch.rand(batch, *grid, dtype=torch.float64, device=device)
    weights = torch.randn(batch, *grid, dtype=torch.float64, device=device)
    out, infos = {}, {}
    for backend in ("torch", "triton"):
        infos[backend] = {}
        out[backend] = values_and_gradients(
            lambda *x: ChebyshevFilter.apply(*x, alpha, p, offsets, exact, infos[backend], backend), f, w, d, weights)
    return out, infos


@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
@pytest.mark.parametrize("grid,connectivity,batch", TRITON_CASES,
                         ids=["5x7-4n", "5x7-8n", "1x6-4n", "6x1-8n", "empty-batch"])
def test_triton_kernels_match_torch_path(grid, connectivity, batch, exact, device):
    out, infos = _torch_and_triton(grid, connectivity, batch, exact, device)
    assert infos["triton"]["backend"] == "triton"
    assert infos["triton"]["basis_degree"] == infos["torch"]["basis_degree"] >= 2
    for name, a, r in zip(("u", "dF", "dw", "dd"), out["triton"], out["torch"]):
        assert a.shape == r.shape
        if batch:
            assert_rel_rmse(a, r, 1e-12, f"{name} ({grid}, {connectivity} neighbours)")


def test_triton_kernels_on_the_largest_block(device):
    """A 23 x 23 grid (529 cells: BLOCK_N 1024, the largest; flat offsets wrap at every row
    end) and a 16 x 16 grid (256 cells: exactly one block), published gradient."""
    for grid in ((23, 23), (16, 16)):
        out, infos = _torch_and_triton(grid, 4, 1, False, device, p=5, alpha=0.02)
        assert infos["triton"]["backend"] == "triton"
        for name, a, r in zip(("u", "dF", "dw", "dd"), out["triton"], out["torch"]):
            assert_rel_rmse(a, r, 1e-12, f"{name} ({grid})")


def test_triton_forward_without_gradient_and_float32(device):
    """Under no_grad the kernel keeps no basis and stops at phi's degree: the same u. float32
    inputs run in float64 and return float32."""
    offsets = OFFSETS[4]
    w, d = random_stencil(2, 4, torch.float64, device, seed=2, grid=(4, 5))
    f = torch.rand(2, 4, 5, dtype=torch.float64, device=device)
    with torch.no_grad():
        u = {b: ChebyshevFilter.apply(f, w, d, 0.05, 6, offsets, False, None, b) for b in ("torch", "triton")}
        u32 = ChebyshevFilter.apply(f.float(), w.float(), d.float(), 0.05, 6, offsets, False, None, "triton")
    assert_rel_rmse(u["triton"], u["torch"], 1e-12, "u")
    assert u32.dtype == torch.float32
    assert_rel_rmse(u32.double(), u["torch"], 1e-6, "u float32")     # input rounding only: measured 6e-8


def test_triton_matches_dense_newton_schulz_p16(device):
    """The published p = 16 block on the Triton backend against dense Newton-Schulz in float64
    (the bound of the PyTorch path's test above, TOL_FP64)."""
    offsets = OFFSETS[4]
    grid = (4, 5)
    w, d = random_stencil(1, 4, torch.float64, device, seed=1, grid=grid)
    w, d = 0.5 * w, 0.5 * d                                   # a small radius: a short series
    f = torch.rand(1, *grid, dtype=torch.float64, device=device)
    weights = torch.randn(1, *grid, dtype=torch.float64, device=device)
    ours = values_and_gradients(lambda *x: ChebyshevFilter.apply(*x, 0.002, 16, offsets, False, None, "triton"),
                                f, w, d, weights)
    ref = values_and_gradients(lambda *x: reference(*x, 0.002, 16, offsets, False), f, w, d, weights)
    for i, (name, a, r) in enumerate(zip(("u", "dF", "dw", "dd"), ours, ref)):
        assert_rel_rmse(a, r, TOL_FP64[i > 0], name)


def test_triton_falls_back_above_one_program():
    """Grids larger than one program holds run the PyTorch series on the Triton backend."""
    assert chebyshev_max_cells(4) == 1024 and chebyshev_max_cells(8) == 256
    info = {}
    w, d = random_stencil(1, 8, torch.float64, "cpu", grid=(17, 16))    # 272 cells > 256
    f = torch.rand(1, 17, 16, dtype=torch.float64)
    with torch.no_grad():
        ChebyshevFilter.apply(f, w, d, 0.05, 2, OFFSETS[8], True, info, "triton")
    assert info["backend"] == "torch"
