"""scm_ops.spatial_semantic_laplacian against the float64 reference, SciPy, and gradcheck."""
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph
import torch
from hypothesis import given, settings, strategies as st

import scm_ops
from scm_ops.reference import cosine_similarity_ref, spatial_semantic_laplacian_ref
from scm_ops.testing import TOLERANCE, assert_rel_rmse, device_under_test, dtype_params


def scipy_grid_laplacian(height, width, connectivity):
    """D - A of the grid graph, built by SciPy from path graphs (an independent construction)."""
    def path(n):
        return scipy.sparse.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1], shape=(n, n))
    eye_h, eye_w = scipy.sparse.identity(height), scipy.sparse.identity(width)
    adjacency = scipy.sparse.kron(eye_h, path(width)) + scipy.sparse.kron(path(height), eye_w)
    if connectivity == 8:
        adjacency = adjacency + scipy.sparse.kron(path(height), path(width))
    return scipy.sparse.csgraph.laplacian(adjacency.tocsr()).toarray()


def random_similarity(b, n, device, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return cosine_similarity_ref(torch.randn(b, n, 8, generator=g, dtype=torch.float64)).to(device, dtype)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("grid", [(7, 13), (14, 14), (1, 5)])
def test_matches_scipy_csgraph(backend, device, grid, connectivity):
    e = random_similarity(2, grid[0] * grid[1], device)
    lam = torch.tensor([0.6, 1.7], dtype=torch.float64, device=device)
    out = scm_ops.spatial_semantic_laplacian(e, grid, lam, connectivity, backend=backend).cpu().numpy()
    g = scipy_grid_laplacian(*grid, connectivity)
    for b in range(2):
        expected = g * (lam[b].item() * e[b].cpu().numpy() - 1)
        np.testing.assert_allclose(out[b], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("connectivity", [4, 8])
def test_forward_backward_match_reference(backend, device, dtype, connectivity):
    grid = (7, 9)
    e = random_similarity(3, 63, device).to(dtype).requires_grad_()
    lam = torch.tensor(0.9, dtype=dtype, device=device, requires_grad=True)
    e_ref = e.detach().double().requires_grad_()
    lam_ref = lam.detach().double().requires_grad_()
    out = scm_ops.spatial_semantic_laplacian(e, grid, lam, connectivity, backend=backend)
    ref = spatial_semantic_laplacian_ref(e_ref, grid, lam_ref, connectivity)
    assert out.dtype == dtype
    assert_rel_rmse(out, ref, TOLERANCE[dtype], "L")
    # the cotangent is rounded to `dtype` once and given to both: its rounding is an input,
    # not an error of the operator (dL/dlam is a cancelling sum of ~1000 products, where
    # float16 rounding of each product would dominate)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = grad.to(device, dtype)
    de, dlam = torch.autograd.grad(out, (e, lam), grad)
    de_ref, dlam_ref = torch.autograd.grad(ref, (e_ref, lam_ref), grad.double())
    assert_rel_rmse(de, de_ref, TOLERANCE[dtype], "dL/dE")
    assert_rel_rmse(dlam, dlam_ref, TOLERANCE[dtype], "dL/dlam")


@pytest.mark.parametrize("lam_shape", ["scalar", "per_item"])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_gradcheck(backend, device, lam_shape, connectivity):
    e = torch.randn(2, 6, 6, dtype=torch.float64, device=device, requires_grad=True)
    lam = torch.tensor(1.3 if lam_shape == "scalar" else [0.4, 1.1], dtype=torch.float64,
                       device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: scm_ops.spatial_semantic_laplacian(a, (2, 3), b, connectivity, backend=backend),
        (e, lam))


def test_lam_python_float_and_structure(backend, device):
    e = random_similarity(1, 12, device)
    out = scm_ops.spatial_semantic_laplacian(e, (3, 4), 1.0, backend=backend)[0]
    assert torch.equal(out, out.T)  # symmetric E, symmetric stencil
    # lam = 1 and E_ii = 1: zero diagonal; corner patch 0 has neighbours 1 and 4 only
    assert torch.allclose(out.diagonal(), torch.zeros(12, dtype=torch.float64, device=device), atol=1e-15)
    assert torch.count_nonzero(out[0, [2, 3, 5, 6, 7, 8, 9, 10, 11]]) == 0
    assert out[0, 1] == 1 - e[0, 0, 1] and out[0, 4] == 1 - e[0, 0, 4]


@settings(max_examples=12, deadline=None)
@given(h=st.integers(1, 13), w=st.integers(1, 13), b=st.integers(1, 2),
       connectivity=st.sampled_from([4, 8]), backend=st.sampled_from(["torch", "triton"]),
       seed=st.integers(0, 2**16))
def test_property_grids(h, w, b, connectivity, backend, seed):
    e = random_similarity(b, h * w, device_under_test(), seed=seed)
    lam = torch.rand(b, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(e.device) * 2
    out = scm_ops.spatial_semantic_laplacian(e, (h, w), lam, connectivity, backend=backend)
    assert_rel_rmse(out, spatial_semantic_laplacian_ref(e, (h, w), lam, connectivity), 1e-15, "L")
