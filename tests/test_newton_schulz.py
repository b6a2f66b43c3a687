"""scm_ops.newton_schulz_inverse against the float64 reference, scipy.linalg.inv, gradcheck,
and its divergence detection."""
import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings, strategies as st

import scm_ops
from scm_ops.reference import (cosine_similarity_ref, newton_schulz_inverse_ref,
                               spatial_semantic_laplacian_ref)
from scm_ops.testing import assert_rel_rmse, device_under_test, dtype_params

ALPHA = 0.002  # the published constant


def scm_laplacian(b, grid, lam=1.0, seed=0, channels=16):
    """A Laplacian as SCM builds it: symmetric, stencil-shaped, near-singular at lam = 1."""
    g = torch.Generator().manual_seed(seed)
    e = cosine_similarity_ref(torch.randn(b, grid[0] * grid[1], channels, generator=g, dtype=torch.float64))
    return spatial_semantic_laplacian_ref(e, grid, lam)


def well_conditioned(n, symmetric, seed):
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
    q2 = q1 if symmetric else np.linalg.qr(rng.standard_normal((n, n)))[0]
    return q1 @ np.diag(rng.uniform(1.0, 4.0, n)) @ q2.T  # singular values in [1, 4]


@pytest.mark.parametrize("symmetric", [True, False])
def test_converges_to_scipy_inverse(backend, device, symmetric):
    n = 33
    mats = np.stack([well_conditioned(n, symmetric, s) for s in range(2)])
    L = torch.tensor(mats, device=device)
    alpha = 1.0 / 16  # 1 / sigma_max^2 bound: residual factor (1 - 1/16)^(2^k)
    X = scm_ops.newton_schulz_inverse(L, 12, alpha, backend=backend).cpu().numpy()
    for b in range(2):
        residual = np.linalg.norm(X[b] @ mats[b] - np.eye(n))
        assert residual < 1e-6, residual
        np.testing.assert_allclose(X[b], scipy.linalg.inv(mats[b]), rtol=0, atol=1e-9)


# Relative RMSE bounds (forward X, gradient dX/dL) per (dtype, p) for the SCM Laplacian of
# the test below, about 10x the largest error measured over 3 seeds, both backends and both
# gradient semantics (2026-11-29): float64 p = 4 4e-16 / 4e-16, p = 16 1.3e-15 / 2.4e-15;
# float32 p = 4 6.8e-8 / 1.6e-7, p = 16 3.2e-7 / 6.7e-7; float16 2.4e-4 / 2.1e-4 at both p
# (the rounding of the half-precision input and output dominates). bfloat16 runs on CUDA
# only and is not measured here: its unit roundoff is 8x float16's, so 8x the float16 bound.
NS_TOLERANCE = {
    (torch.float64, 4): (5e-15, 5e-15), (torch.float64, 16): (1.5e-14, 2.5e-14),
    (torch.float32, 4): (7e-7, 1.6e-6), (torch.float32, 16): (3.2e-6, 7e-6),
    (torch.float16, 4): (2.5e-3, 2.5e-3), (torch.float16, 16): (2.5e-3, 2.5e-3),
    (torch.bfloat16, 4): (2e-2, 2e-2), (torch.bfloat16, 16): (2e-2, 2e-2),
}


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("iterations", [4, 16])
def test_scm_laplacian_forward_backward(backend, device, dtype, iterations):
    L64 = scm_laplacian(2, (5, 6), lam=1.2).to(device)
    L = L64.to(dtype).requires_grad_()
    L_ref = L.detach().double().requires_grad_()
    X = scm_ops.newton_schulz_inverse(L, iterations, ALPHA, backend=backend)
    X_ref = newton_schulz_inverse_ref(L_ref, iterations, ALPHA)
    assert X.dtype == dtype
    tol_x, tol_grad = NS_TOLERANCE[dtype, iterations]
    assert_rel_rmse(X, X_ref, tol_x, "X")
    grad = torch.randn_like(X_ref).to(dtype)  # rounded once, given to both (an input, not an error)
    for detach_init in (False, True):
        (dl,) = torch.autograd.grad(scm_ops.newton_schulz_inverse(L, iterations, ALPHA, detach_init,
                                                                  backend=backend), L, grad)
        (dl_ref,) = torch.autograd.grad(newton_schulz_inverse_ref(L_ref, iterations, ALPHA, detach_init),
                                        L_ref, grad.double())
        assert_rel_rmse(dl, dl_ref, tol_grad, f"dX/dL detach_init={detach_init}")


def test_gradcheck_exact(backend, device):
    L = (torch.randn(1, 5, 5, dtype=torch.float64, device=device) * 0.3
         + 2 * torch.eye(5, dtype=torch.float64, device=device)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: scm_ops.newton_schulz_inverse(t, 3, 0.1, backend=backend), (L,))


def test_gradcheck_detached_init(backend, device):
    """With detach_init the gradient is that of the iteration run from a fixed X_0: checked
    numerically against a function of L alone whose X_0 is a constant."""
    L0 = (torch.randn(1, 5, 5, dtype=torch.float64, device=device) * 0.3
          + 2 * torch.eye(5, dtype=torch.float64, device=device))
    x0 = 0.1 * L0.transpose(1, 2)
    eye = torch.eye(5, dtype=torch.float64, device=device)

    def from_fixed_start(L):
        x = x0
        for _ in range(3):
            x = x @ (2 * eye - L @ x)
        return x

    L = L0.clone().requires_grad_()
    grad = torch.randn(1, 5, 5, dtype=torch.float64, device=device)
    (ours,) = torch.autograd.grad(scm_ops.newton_schulz_inverse(L, 3, 0.1, True, backend=backend), L, grad)
    assert torch.autograd.gradcheck(from_fixed_start, (L,))  # the target is itself right
    (target,) = torch.autograd.grad(from_fixed_start(L), L, grad)
    assert_rel_rmse(ours, target, 1e-12, "detached-init gradient")
    (exact,) = torch.autograd.grad(scm_ops.newton_schulz_inverse(L, 3, 0.1, False, backend=backend), L, grad)
    assert (exact - ours).norm() > 1e-3 * exact.norm()  # the two semantics really differ


def test_zero_iterations_is_scaled_transpose(backend, device):
    L = torch.randn(1, 4, 4, dtype=torch.float64, device=device)
    X = scm_ops.newton_schulz_inverse(L, 0, 0.5, backend=backend)
    assert torch.equal(X, 0.5 * L.transpose(1, 2))


def test_divergence_is_reported(backend, device):
    L = scm_laplacian(2, (4, 4), lam=1.0).to(device)
    L[1] *= 40  # sigma_max ~ 100 > sqrt(2 / 0.002) = 31.6
    with pytest.raises(scm_ops.NewtonSchulzDivergenceError, match="batch item 1"):
        scm_ops.newton_schulz_inverse(L, 4, ALPHA, backend=backend)


def test_gershgorin_false_alarm_is_cleared(backend, device):
    """Random signs: Gershgorin bound 40 flags alpha=0.002, the true sigma_max (~13) does not."""
    g = torch.Generator().manual_seed(0)
    L = (torch.randint(0, 2, (1, 40, 40), generator=g) * 2 - 1).double().to(device)
    assert ALPHA * scm_ops.spectral_norm_bound(L).item() ** 2 >= 2
    X = scm_ops.newton_schulz_inverse(L, 2, ALPHA, backend=backend)
    assert torch.isfinite(X).all()


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 2), n=st.integers(1, 50), iterations=st.integers(0, 6),
       backend=st.sampled_from(["torch", "triton"]), seed=st.integers(0, 2**16))
def test_property_any_square(b, n, iterations, backend, seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(b, n, n, generator=g, dtype=torch.float64).to(device_under_test())
    X = scm_ops.newton_schulz_inverse(L, iterations, 1e-3, backend=backend)
    assert_rel_rmse(X, newton_schulz_inverse_ref(L, iterations, 1e-3), 1e-12, "X")
