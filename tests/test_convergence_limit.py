"""ActivationDiffusion near the convergence limit alpha sigma_max(L)^2 = 2, from both sides.

Below the limit the published iteration converges and every route must give the dense
result; at and past it every route must raise NewtonSchulzDivergenceError. lam is learnable,
so training can walk a block towards the limit: a route that turns to NaN or to a wrong
value there does so silently in the middle of a run. The Chebyshev series is the route at
risk: its interval [0, R^2] must stay inside alpha z <= 2 (docs/structured.md, "Chebyshev
series"), and near the limit its degree grows to ~1700.

Property over lam: for each input, lam is found by bisection such that the largest
alpha sigma_max(L)^2 of the batch (L of the first block, which every block shares at equal
lam) equals a target q; q runs from 1.95 to 1.9999 below the limit and from 2.0001 to 2.2
past it, lam on both sides of 1 (negative lam: a large negative diagonal; lam > 1: large
positive). Grids square, non-square, one row and one column; 4 and 8 neighbours; float32
and float64; both backends (the Triton cases, slow in the interpreter, take p = 10 for the
first block: the same failure, a radius rounded past sqrt(2/alpha), showed there as 254
against 0.58).
"""
import pytest
import torch

import scm_ops
from scm_ops.newton_schulz import NewtonSchulzDivergenceError
from scm_ops.reference import activation_diffusion_ref
from scm_ops.structured import OFFSETS, NeighbourCosine, grid_masks, stencil_to_dense
from scm_ops.testing import relative_rmse

ALPHA = 0.002
ROUTES = ("chebyshev", "spectral", "newton_schulz")
QUANTITIES = ("f", "s", "dF0", "dS0", "dlam", "dbeta")

# Relative RMSE against the float64 dense reference (autograd through every product),
# per quantity (f, s, dF0, dS0, dlam, dbeta), measured over the cases below (largest of the
# eight inputs), bounds 5-10x:
# - float64, spectral and dense Newton-Schulz: values 3e-14, dF0 1.5e-13, dS0/dlam/dbeta up
#   to 6.8e-11 (sums of cancelling terms, amplified near the limit).
# - float64, Chebyshev: values 3.2e-9, dF0 1e-8, dS0 2.1e-6, dlam 3e-5, dbeta 2.3e-8: the
#   series is cut at 1e-12 of max|phi|, and its ~1700 steps near the limit add rounding.
# - float32, every route alike (the float32 cosines, tanhshrink and min-max dominate; dense
#   Newton-Schulz in float32 shows the same): values 1.5e-5, dF0 6.4e-5, dS0 2.8e-2,
#   dlam 4.2e-2, dbeta 7.6e-2. Near the limit the S0, lam and beta gradients of a float32
#   run are ill-conditioned on every route; a NaN or a series off its interval is far
#   outside these bounds (before the radius was capped: 254 against 0.58 at p = 10).
TOLERANCE = {
    (torch.float64, "spectral"): (2e-13, 2e-13, 1e-12, 5e-10, 5e-10, 5e-10),
    (torch.float64, "newton_schulz"): (2e-13, 2e-13, 1e-12, 5e-10, 5e-10, 5e-10),
    (torch.float64, "chebyshev"): (2e-8, 3e-8, 1e-7, 2e-5, 3e-4, 2e-7),
}
FLOAT32_TOLERANCE = (1e-4, 1.5e-4, 1e-3, 0.15, 0.25, 0.4)


def _stack_q(s0, lam, connectivity):
    """max over the batch of alpha sigma_max(L)^2 for L of a block at lam, float64."""
    H, W = s0.shape[-2:]
    e, e_self = NeighbourCosine.apply(s0.double(), OFFSETS[connectivity], "torch", None)
    valid, degree = grid_masks(H, W, connectivity, torch.float64, s0.device)
    L = stencil_to_dense(valid * (1 - lam * e), degree * (lam * e_self - 1), OFFSETS[connectivity])
    return ALPHA * float(torch.linalg.eigvalsh(L.cpu()).abs().amax()) ** 2


def lam_at(s0, q, connectivity, side):
    """lam on `side` (-1: below 1, +1: above 1) with _stack_q(lam) = q, by bisection, rounded
    to float32 (the module keeps lam in float32; near the limit the output is sensitive
    enough to lam that the reference must use the same value)."""
    inner, outer = 1.0, 1.0 + 2 * side
    while _stack_q(s0, outer, connectivity) < q:
        outer = 1 + 2 * (outer - 1)
    for _ in range(60):
        mid = (inner + outer) / 2
        inner, outer = (mid, outer) if _stack_q(s0, mid, connectivity) < q else (inner, mid)
    return float(torch.tensor(inner if q < 2 else outer, dtype=torch.float32))


def _loss_weights(f, s):
    wf = torch.linspace(-1, 1, f.numel(), dtype=torch.float64, device=f.device).reshape(f.shape)
    ws = torch.linspace(-1, 1, s.numel(), dtype=torch.float64, device=s.device).reshape(s.shape).flip(-1)
    return wf, ws


def run_module(module, f0, s0):
    """(f, s, dF0, dS0, dlam, dbeta) of a fixed weighted loss on both outputs."""
    f0, s0 = f0.clone().requires_grad_(), s0.clone().requires_grad_()
    f, s = module(f0, s0)
    wf, ws = _loss_weights(f, s)
    loss = (f.double() * wf).sum() + (s.double() * ws).sum()
    return [f, s, *torch.autograd.grad(loss, [f0, s0, module.lam, module.beta])]


def run_reference(f0, s0, lam, iterations, connectivity, exact):
    """The same from the dense published stack in float64 (scm_ops.reference)."""
    f0, s0 = f0.double().clone().requires_grad_(), s0.double().clone().requires_grad_()
    lams = torch.full((len(iterations),), lam, dtype=torch.float64, device=f0.device, requires_grad=True)
    betas = torch.full((len(iterations),), 0.5, dtype=torch.float64, device=f0.device, requires_grad=True)
    f, s = activation_diffusion_ref(f0, s0, lams, betas, iterations, ALPHA, connectivity, detach_init=not exact)
    wf, ws = _loss_weights(f, s)
    loss = (f * wf).sum() + (s * ws).sum()
    return [f, s, *torch.autograd.grad(loss, [f0, s0, lams, betas])]


def assert_matches(ours, ref, tolerance, what):
    for name, a, r, tol in zip(QUANTITIES, ours, ref, tolerance):
        assert bool(torch.isfinite(a).all()), f"{what}: {name} is not finite"
        err = relative_rmse(a, r)
        assert err <= tol, f"{what}: {name} relative RMSE {err:.2e} > {tol:.1e}"


def _inputs(grid, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    f0 = torch.rand(2, *grid, generator=g, dtype=torch.float64)
    s0 = torch.randn(2, 6, *grid, generator=g, dtype=torch.float64)
    return f0.to(device), s0.to(device)


# (grid, connectivity, side of lam)
CASES = [((6, 6), 4, -1), ((5, 8), 8, 1), ((1, 24), 8, -1), ((24, 1), 4, 1)]


def _case_id(case):
    grid, connectivity, side = case
    return f"{grid[0]}x{grid[1]}-{connectivity}n-lam{'<' if side < 0 else '>'}1"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=map(_case_id, CASES))
def test_every_route_gives_the_dense_result_below_the_limit(case, dtype, device):
    """Values and both gradient semantics, every large-p route (torch backend; the p = 4 blocks
    take the matrix-free series), at q = 1.95 and q = 1.9999."""
    grid, connectivity, side = case
    f0, s0 = _inputs(grid, device)
    for q, exact in ((1.95, False), (1.9999, True)):
        lam = lam_at(s0, q, connectivity, side)
        ref = run_reference(f0, s0, lam, (16, 4, 4, 4), connectivity, exact)
        for route in ROUTES:
            module = scm_ops.ActivationDiffusion(grid, lam=lam, connectivity=connectivity, exact_gradients=exact,
                                                 large_p_route=route, backend="torch").to(device, dtype)
            tolerance = TOLERANCE[dtype, route] if dtype == torch.float64 else FLOAT32_TOLERANCE
            assert_matches(run_module(module, f0.to(dtype), s0.to(dtype)), ref, tolerance,
                           f"{route}, q={q}, lam={lam:.6g}, {'exact' if exact else 'published'} gradients")


@pytest.mark.parametrize("q", [2.0001, 2.2])
@pytest.mark.parametrize("case", CASES, ids=map(_case_id, CASES))
def test_every_route_raises_past_the_limit(case, q, device):
    grid, connectivity, side = case
    f0, s0 = _inputs(grid, device)
    lam = lam_at(s0, q, connectivity, side)
    for kwargs in [dict(large_p_route=route) for route in ROUTES] + [dict(implementation="dense")]:
        for dtype in (torch.float64, torch.float32):
            module = scm_ops.ActivationDiffusion(grid, lam=lam, connectivity=connectivity, backend="torch",
                                                 **kwargs).to(device, dtype)
            with pytest.raises(NewtonSchulzDivergenceError, match="block 0: lam="):
                module(f0.to(dtype), s0.to(dtype))


TRITON_CASES = [((3, 4), 4, -1, torch.float32, False), ((1, 9), 8, 1, torch.float64, True)]


@pytest.mark.slow
@pytest.mark.parametrize("grid, connectivity, side, dtype, exact", TRITON_CASES,
                         ids=["3x4-4n-float32-published", "1x9-8n-float64-exact"])
def test_triton_backend_near_the_limit(grid, connectivity, side, dtype, exact, device):
    """The Triton kernels (neighbour cosines, matrix-free series, Chebyshev series) at
    q = 1.99 with p = (10, 4): about 15-30 s each in the interpreter. Measured against the
    float64 reference: as the torch backend (float32 dbeta 1.5e-2; float64 dlam 7.5e-7)."""
    f0, s0 = _inputs(grid, device)
    lam = lam_at(s0, 1.99, connectivity, side)
    iterations = (10, 4)
    ref = run_reference(f0, s0, lam, iterations, connectivity, exact)
    module = scm_ops.ActivationDiffusion(grid, iterations, lam=lam, connectivity=connectivity, exact_gradients=exact,
                                         large_p_route="chebyshev", backend="triton").to(device, dtype)
    tolerance = TOLERANCE[dtype, "chebyshev"] if dtype == torch.float64 else FLOAT32_TOLERANCE
    assert_matches(run_module(module, f0.to(dtype), s0.to(dtype)), ref, tolerance, "triton")
