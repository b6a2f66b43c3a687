"""scm_ops.cosine_similarity against the float64 reference, SciPy, and gradcheck."""
import numpy as np
import pytest
import scipy.spatial.distance
import torch
from hypothesis import given, settings, strategies as st

import scm_ops
from scm_ops.reference import cosine_similarity_ref
from scm_ops.testing import TOLERANCE, assert_rel_rmse, dtype_params


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", [(2, 37, 5), (1, 70, 129)])
def test_forward_backward_match_reference(backend, device, dtype, shape):
    torch.manual_seed(0)
    x64 = torch.randn(shape, dtype=torch.float64, device=device)
    x = x64.to(dtype).requires_grad_()
    ref_x = x.detach().to(torch.float64).requires_grad_()
    e = scm_ops.cosine_similarity(x, backend=backend)
    e_ref = cosine_similarity_ref(ref_x)
    assert e.dtype == dtype
    assert_rel_rmse(e, e_ref, TOLERANCE[dtype], "E")
    grad_e = torch.randn_like(e_ref).to(dtype)  # rounded once, given to both (an input, not an error)
    (dx,) = torch.autograd.grad(e, x, grad_e)
    (dx_ref,) = torch.autograd.grad(e_ref, ref_x, grad_e.double())
    assert_rel_rmse(dx, dx_ref, TOLERANCE[dtype], "dE/dx")


def test_matches_scipy_cdist(backend, device):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 45, 17))
    e = scm_ops.cosine_similarity(torch.tensor(x, device=device), backend=backend).cpu().numpy()
    for b in range(3):
        expected = 1 - scipy.spatial.distance.cdist(x[b], x[b], "cosine")
        np.testing.assert_allclose(e[b], expected, rtol=0, atol=1e-13)


def test_zero_row_has_zero_cosine_and_gradient(backend, device):
    x = torch.randn(1, 6, 4, dtype=torch.float64, device=device)
    x[0, 2] = 0
    x.requires_grad_()
    e = scm_ops.cosine_similarity(x, backend=backend)
    assert torch.all(e[0, 2] == 0) and torch.all(e[0, :, 2] == 0)
    assert torch.allclose(e[0].diagonal()[[0, 1, 3, 4, 5]], torch.ones(5, dtype=torch.float64, device=device))
    e.sum().backward()
    assert torch.all(x.grad[0, 2] == 0)
    assert torch.isfinite(x.grad).all()


def test_gradcheck(backend, device):
    x = torch.randn(2, 7, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: scm_ops.cosine_similarity(t, backend=backend), (x,))


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 2), n=st.integers(1, 70), d=st.integers(1, 1000),
       backend=st.sampled_from(["torch", "triton"]), seed=st.integers(0, 2**16))
def test_property_shapes(b, n, d, backend, seed):
    from scm_ops.testing import device_under_test
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(device_under_test())
    e = scm_ops.cosine_similarity(x, backend=backend)
    assert_rel_rmse(e, cosine_similarity_ref(x), 1e-12, f"E {b}x{n}x{d}")
    assert torch.all(e.abs() <= 1 + 1e-12)
