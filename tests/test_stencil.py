"""The structured fast path's pieces (scm_ops.structured) on both backends, against the dense
references: neighbour cosines against the full cosine matrix, the matrix-free series
against Newton-Schulz on the dense L, and gradcheck of each."""
import pytest
import torch

from scm_ops.reference import cosine_similarity_ref, newton_schulz_inverse_ref
from scm_ops.structured import NeighbourCosine, StencilSeries
from scm_ops.testing import (STENCIL_GRID, STENCIL_OFFSETS, assert_rel_rmse, dense_laplacian, neighbour_entries,
                             random_stencil)

GRID = STENCIL_GRID
OFFSETS = STENCIL_OFFSETS


# Against the float64 dense cosine matrix, both backends: measured float64 4.4e-16
# (values) and 2.7e-16 (d/dS); float32 1.7e-7 and 1.1e-7. Bounds about 10x.
COSINE_TOL = {torch.float64: 5e-15, torch.float32: 2e-6}


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_neighbour_cosine_matches_dense_cosine(device, backend, dtype, connectivity):
    """Values and the gradient to S against autograd through the dense cosine matrix."""
    offsets = OFFSETS[connectivity]
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 70, *GRID, generator=g, dtype=torch.float64)   # C not a multiple of a block
    s[1, :, 2, 3] = 0                                                   # a zero vector: cosine 0
    ours = s.to(device, dtype).requires_grad_()
    e, e_self = NeighbourCosine.apply(ours, offsets, backend)
    ref = s.clone().requires_grad_()
    e_ref = neighbour_entries(cosine_similarity_ref(ref.flatten(2).transpose(1, 2)), *GRID, offsets)
    assert_rel_rmse(e, e_ref, COSINE_TOL[dtype], "neighbour cosines")
    assert torch.equal(e_self.cpu(), (s.norm(dim=1) > 0).to(dtype))
    weights = torch.randn(e.shape, generator=g, dtype=torch.float64)
    grad = torch.autograd.grad((e * weights.to(device, dtype)).sum(), ours)[0]
    grad_ref = torch.autograd.grad((e_ref * weights).sum(), ref)[0]
    assert_rel_rmse(grad, grad_ref, COSINE_TOL[dtype], "d/dS")


@pytest.mark.parametrize("connectivity", [4, 8])
def test_neighbour_cosine_gradcheck_torch_path(device, connectivity):
    """Finite differences on the PyTorch path (the Triton path is held to the same
    reference gradients above; finite differences in the interpreter cost minutes)."""
    s = torch.randn(2, 6, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: NeighbourCosine.apply(x, OFFSETS[connectivity], "torch")[0], (s,))


@pytest.mark.parametrize("exact, connectivity, grid", [
    (False, 4, GRID), (True, 4, GRID), (False, 8, GRID), (True, 8, GRID),
    (True, 8, (1, 5)), (True, 8, (5, 1)), (True, 4, (1, 1)),          # degenerate grids
    (False, 4, (23, 23)),                       # 529 cells: BLOCK_N 1024, flat offsets wrap at each row end
    (True, 8, (22, 22)),                        # 484 cells: 8 neighbours at BLOCK_N 512, the most on chip
], ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v))
def test_stencil_series_matches_dense_newton_schulz(device, backend, connectivity, exact, grid):
    """u = X_p^T F with X_p from Newton-Schulz on the dense L, value and gradients (float64)."""
    offsets = OFFSETS[connectivity]
    alpha, p = 0.05, 3
    w, d = random_stencil(2, connectivity, torch.float64, device, grid=grid)
    f = torch.rand(2, *grid, dtype=torch.float64, device=device)
    leaves = [t.clone().requires_grad_() for t in (f, w, d)]
    u = StencilSeries.apply(*leaves, alpha, p, offsets, exact, backend)
    ref_leaves = [t.clone().requires_grad_() for t in (f, w, d)]
    L = dense_laplacian(ref_leaves[1], ref_leaves[2], offsets)
    x = newton_schulz_inverse_ref(L, p, alpha, detach_init=not exact)
    u_ref = (x.transpose(1, 2) @ ref_leaves[0].reshape(2, -1, 1)).reshape(u.shape)
    # float64, both backends: measured u up to 8.6e-16, gradients up to 8.9e-16 (23 x 23;
    # 4e-16 on the small grids); bounds about 6-10x
    assert_rel_rmse(u, u_ref, 5e-15, "u")
    weights = torch.randn_like(u)
    grads = torch.autograd.grad((u * weights).sum(), leaves)
    grads_ref = torch.autograd.grad((u_ref * weights).sum(), ref_leaves, materialize_grads=True)
    for name, a, b in zip(("dF", "dw", "dd"), grads, grads_ref):
        assert_rel_rmse(a, b, 5e-15, name)


def test_stencil_series_gradcheck_torch_path(device):
    w, d = random_stencil(1, 4, torch.float64, device)
    f = torch.rand(1, *GRID, dtype=torch.float64, device=device)
    leaves = [t.clone().requires_grad_() for t in (f, w, d)]
    assert torch.autograd.gradcheck(lambda *x: StencilSeries.apply(*x, 0.05, 2, OFFSETS[4], True, "torch"), leaves)


def test_neighbour_cosine_of_subnormal_norms(device, backend):
    """Vectors whose squared norm is subnormal in float32 (entries ~1e-20, |s|^2 ~ 7e-39 <
    1.2e-38) still get their cosines, equal to the float64 values: the Triton kernels take
    sqrt and division correctly rounded (sqrt_rn, div_rn) because the GPU's approximate
    ones flush subnormal inputs to 0. On a CPU this runs in the Triton interpreter, whose
    sqrt and division are NumPy's IEEE ones: it checks the arithmetic path, not the GPU's
    rounding. Measured error 1.4e-6 on both backends (the subnormal squares keep fewer
    bits); bound about 10x."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 70, *GRID, generator=g, dtype=torch.float64)
    s[:, :, 1] *= 1e-20                                   # a whole row of tiny vectors
    sq = (s[:, :, 1].float() ** 2).sum(1)
    assert bool(((sq > 0) & (sq < torch.finfo(torch.float32).tiny)).all())
    e, _ = NeighbourCosine.apply(s.to(device, torch.float32), OFFSETS[4], backend)
    e_ref = neighbour_entries(cosine_similarity_ref(s.flatten(2).transpose(1, 2)), *GRID, OFFSETS[4])
    assert torch.isfinite(e).all()
    assert_rel_rmse(e, e_ref, 1.5e-5, "cosines with subnormal norms")


def test_stencil_series_custom_operator_matches_function(device, backend):
    """scm_ops::stencil_series (what torch.compile calls) against the Function, values and
    gradients, both semantics (the same arithmetic: measured 0), and torch.library.opcheck
    (schema, fake tensor, autograd registration) on the PyTorch path."""
    w, d = random_stencil(2, 4, torch.float64, device)
    f = torch.rand(2, *GRID, dtype=torch.float64, device=device)
    weights = torch.randn(2, *GRID, dtype=torch.float64, device=device)
    for exact in (False, True):
        results = []
        for fn in (lambda *x: torch.ops.scm_ops.stencil_series(*x, 0.05, 3, 4, exact, backend)[0],
                   lambda *x: StencilSeries.apply(*x, 0.05, 3, OFFSETS[4], exact, backend)):
            leaves = [t.clone().requires_grad_() for t in (f, w, d)]
            u = fn(*leaves)
            results.append([u] + list(torch.autograd.grad((u * weights).sum(), leaves)))
        for name, a, b in zip(("u", "dF", "dw", "dd"), *results):
            assert_rel_rmse(a, b, 1e-15, name)
    if backend == "torch":
        leaves = [t.clone().requires_grad_() for t in (f, w, d)]
        torch.library.opcheck(torch.ops.scm_ops.stencil_series, (*leaves, 0.05, 3, 4, True, backend))
