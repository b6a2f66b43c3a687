"""ActivationDiffusion against the published stack (docs/maths.md, "The stack"; scm_ops.reference)."""
import pytest
import torch

import scm_ops
from scm_ops.reference import activation_diffusion_ref
from scm_ops.testing import assert_rel_rmse, relative_rmse


def inputs(b, c, grid, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, *grid, generator=g, dtype=torch.float64).abs()  # post-ReLU-like maps
    f = torch.rand(b, *grid, generator=g, dtype=torch.float64)
    return f.to(device, dtype).requires_grad_(), s.to(device, dtype).requires_grad_()


def run_reference(module, f, s, dtype, weights):
    """The published stack in `dtype`: outputs and gradients to (F, S, lam, beta)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (f, s, module.lam, module.beta)]
    out = activation_diffusion_ref(*leaves, module.iterations, module.alpha, module.connectivity,
                                   detach_init=not module.exact_gradients)
    loss = sum((o * w.to(dtype)).sum() for o, w in zip(out, weights))
    return list(out) + list(torch.autograd.grad(loss, leaves))


def parity(module, f, s, tol_fwd, tol_grad):
    """Forward and all gradients of `module` against the float64 reference. In float32 the
    bound is also at least twice the error of the published formulation itself run in
    float32: the fast path must be as accurate as the code it replaces."""
    g = torch.Generator().manual_seed(1)
    shapes = (f.shape, s.shape)
    weights = [torch.randn(sh, generator=g, dtype=torch.float64).to(f.device) for sh in shapes]
    out = module(f, s)
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(out, weights))
    ours = list(out) + list(torch.autograd.grad(loss, (f, s, module.lam, module.beta)))
    ref = run_reference(module, f, s, torch.float64, weights)
    published_same_dtype = run_reference(module, f, s, f.dtype, weights) if f.dtype != torch.float64 else None
    names = ("attention", "semantic", "d/dattention", "d/dsemantic", "d/dlam", "d/dbeta")
    for i, (name, a, r) in enumerate(zip(names, ours, ref)):
        tol = tol_fwd if i < 2 else tol_grad
        if published_same_dtype is not None:
            tol = max(tol, 2 * relative_rmse(published_same_dtype[i], r))
        assert_rel_rmse(a, r, tol, name)


# float64: both paths are exact reformulations, so rounding alone separates them: forward
# ~1e-13, gradients ~1e-11 measured, up to 1.1e-8 for the scalar gradient to beta, a sum of
# cancelling terms through tanhshrink near 0 and min-max. float32 against the float64
# reference: forward ~2e-5, gradients ~6e-5 measured, and for beta ~2e-3, as large as the
# published formulation's own float32 error (which `parity` also allows, doubled).
TOL = {torch.float64: (1e-9, 1e-6), torch.float32: (1e-4, 2e-3)}


@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
@pytest.mark.parametrize("grid, channels", [((14, 14), 200), ((7, 9), 200), ((7, 9), 1000)],
                         ids=["14x14-C200", "7x9-C200", "7x9-C1000"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_structured_matches_published(device, backend, dtype, grid, channels, exact):
    module = scm_ops.ActivationDiffusion(grid, exact_gradients=exact, lam=[1.0, 1.1, 0.9, 1.05],
                                         beta=[0.5, 0.4, 0.6, 0.5], backend=backend).to(device)
    f, s = inputs(2, channels, grid, dtype, device)
    parity(module, f, s, *TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
def test_dense_operators_match_published(device, backend, exact, monkeypatch):
    monkeypatch.setenv("SCM_OPS_BACKEND", backend)
    grid = (7, 9)
    module = scm_ops.ActivationDiffusion(grid, iterations=(5, 2), exact_gradients=exact,
                                         implementation="dense").to(device)
    f, s = inputs(2, 200, grid, torch.float64, device)
    parity(module, f, s, *TOL[torch.float64])


@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("route", scm_ops.diffusion.LARGE_P_ROUTES)
def test_every_large_p_route_matches_published(device, backend, route, dtype, exact):
    """The p = 16 block by each route (Chebyshev series, spectral form, dense Newton-Schulz
    on the stencil's L) against the published stack, values and every gradient, with the
    tolerances of TOL for the dtype (the Chebyshev series' own error, float64 ~1e-11 and
    float32 inputs ~1e-7 at the operator, is far inside them); and a diverging lam raises."""
    grid = (5, 6)
    module = scm_ops.ActivationDiffusion(grid, iterations=(16, 4), exact_gradients=exact, lam=[1.05, 0.95],
                                         backend=backend, large_p_route=route).to(device)
    f, s = inputs(2, 60, grid, dtype, device)
    parity(module, f, s, *TOL[dtype])
    diverging = scm_ops.ActivationDiffusion(grid, iterations=(16, 4), lam=[20.0, 1.0], backend=backend,
                                            large_p_route=route).to(device)
    with pytest.raises(scm_ops.NewtonSchulzDivergenceError, match="block 0"):
        diverging(f, s)


def test_default_large_p_route_is_a_route():
    for device in ("cpu", "cuda"):
        for grid in ((7, 9), (14, 14), (56, 56)):
            assert scm_ops.diffusion.default_large_p_route(torch.device(device), grid) in scm_ops.diffusion.LARGE_P_ROUTES


def test_eight_neighbours_and_attention_as_vector(device, backend):
    grid = (6, 5)
    module = scm_ops.ActivationDiffusion(grid, connectivity=8, iterations=(16, 4), backend=backend).to(device).double()
    f, s = inputs(2, 30, grid, torch.float64, device)
    f_flat = f.detach().reshape(2, 30).requires_grad_()
    assert module(f_flat, s)[0].shape == (2, 30)
    parity(module, f_flat, s, *TOL[torch.float64])


def test_semantic_gradient_in_partial_and_repeated_backward(device, backend):
    """S reaches the outputs through the cosines and through the residual scaling; the two
    gradients share one buffer (stencil.GradSlot). Asking for gradients of one output, or of
    lam alone first and of S after on a retained graph, must still give the full gradient."""
    grid = (5, 6)
    module = scm_ops.ActivationDiffusion(grid, backend=backend).to(device).double()
    f, s = inputs(2, 12, grid, torch.float64, device)
    out_f, out_s = module(f, s)
    weights = torch.randn_like(out_s)
    loss_s = (out_s * weights).sum()
    ref_f, ref_s = activation_diffusion_ref(f, s, module.lam, module.beta)
    expected_f = torch.autograd.grad(ref_f.sum(), s, retain_graph=True)[0]
    expected_s = torch.autograd.grad((ref_s * weights).sum(), s)[0]
    assert_rel_rmse(torch.autograd.grad(out_f.sum(), s, retain_graph=True)[0], expected_f, 1e-9, "d(sum F)/dS")
    torch.autograd.grad(loss_s, module.lam, retain_graph=True)  # the cosine node does not run
    assert_rel_rmse(torch.autograd.grad(out_f.sum(), s, retain_graph=True)[0], expected_f, 1e-9,
                    "d(sum F)/dS after a lam-only pass")
    assert_rel_rmse(torch.autograd.grad(loss_s, s)[0], expected_s, 1e-9, "d(S . w)/dS")


def test_gradient_semantics_differ(device):
    """The published (detached X_0) and exact gradients are different functions."""
    grid = (7, 9)
    f, s = inputs(2, 50, grid, torch.float64, device)
    grads = []
    for exact in (False, True):
        module = scm_ops.ActivationDiffusion(grid, exact_gradients=exact).to(device).double()
        out_f, out_s = module(f, s)
        grads.append(torch.autograd.grad(out_f.sum() + out_s.mean(), module.lam)[0])
    assert relative_rmse(grads[0], grads[1]) > 1e-2


def test_zero_vectors_and_constant_maps_give_limits_not_nan(device):
    grid = (7, 9)
    module = scm_ops.ActivationDiffusion(grid).to(device).double()
    f, s = inputs(3, 40, grid, torch.float64, device)
    s = s.detach().clone()
    s[0, :, 2, 3] = 0          # a zero semantic vector: published cosine 0/0
    f = f.detach().clone()
    f[1] = 0                   # an all-zero attention map: published 0/0 in u / max F
    s[2] = 1.0                 # constant semantic map: every cosine 1, tau constant -> min-max 0/0
    out_f, out_s = module(f.requires_grad_(), s.requires_grad_())
    assert torch.isfinite(out_f).all() and torch.isfinite(out_s).all()
    (out_f.sum() + out_s.sum()).backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(s.grad).all()
    published_f, published_s = activation_diffusion_ref(f.detach(), s.detach(), module.lam.detach(),
                                                        module.beta.detach(), strict_published=True)
    finite = torch.isfinite(published_f).reshape(3, -1).all(1) & torch.isfinite(published_s).reshape(3, -1).all(1)
    assert not finite.any()    # each item hits a 0/0 in the published code
    # where the published code is finite it is matched: an item without degenerate input
    f2, s2 = inputs(1, 40, grid, torch.float64, device, seed=5)
    ours = module(f2, s2)
    published = activation_diffusion_ref(f2, s2, module.lam, module.beta, strict_published=True)
    assert_rel_rmse(ours[0], published[0], 1e-9, "finite published attention")


def test_divergent_lam_is_reported(device):
    grid = (7, 9)
    f, s = inputs(2, 30, grid, torch.float64, device)
    for lam in ([20.0, 1.0], [1.0, 20.0]):  # the spectral block, then a matrix-free block
        module = scm_ops.ActivationDiffusion(grid, iterations=(16, 4), lam=lam).to(device).double()
        block = 0 if lam[0] > 1 else 1
        with pytest.raises(scm_ops.NewtonSchulzDivergenceError, match=f"block {block}"):
            module(f, s)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="large_p_route"):
        scm_ops.ActivationDiffusion((7, 9), large_p_route="eigh")
    with pytest.raises(ValueError, match="backend"):
        scm_ops.ActivationDiffusion((7, 9), backend="cuda")


@pytest.mark.parametrize("call, match", [
    (lambda m: m(torch.rand(2, 63), torch.rand(2, 5, 7, 8)), r"semantic must have shape \[B, C, 7, 9\]"),
    (lambda m: m(torch.rand(3, 63), torch.rand(2, 5, 7, 9)), "attention has batch size 3 but semantic has 2"),
    (lambda m: m(torch.rand(2, 62), torch.rand(2, 5, 7, 9)), r"attention must have shape \[B, 63\]"),
    (lambda m: m(torch.rand(2, 63), torch.rand(2, 0, 7, 9)), "C >= 1"),
    (lambda m: m(torch.rand(2, 63).double(), torch.rand(2, 5, 7, 9)), "attention is torch.float64"),
    (lambda m: m(torch.full((2, 63), float("nan")), torch.rand(2, 5, 7, 9)), "attention contains NaN"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(scm_ops.ActivationDiffusion((7, 9)))


def test_helpers_attention_map_and_localization_map():
    B, heads, grid = 2, 3, (2, 3)
    attn = torch.softmax(torch.randn(4, B, heads, 7, 7), -1)
    f0 = scm_ops.attention_map_from_blocks(attn, grid)
    expected = attn.mean(2).sum(0)[:, 0, 1:].reshape(B, *grid)
    expected = (expected - expected.amin((1, 2), keepdim=True))
    expected = expected / expected.amax((1, 2), keepdim=True)
    assert torch.allclose(f0, expected)
    assert torch.equal(scm_ops.attention_map_from_blocks(list(attn), grid), f0)
    s0 = torch.randn(B, 5, *grid)
    m = scm_ops.localization_map(f0, s0, torch.tensor([4, 1]))
    assert torch.equal(m[1], f0[1] * s0[1, 1])
    m2 = scm_ops.localization_map(f0, s0, torch.tensor([[4, 0], [1, 2]]))
    assert torch.equal(m2[0, 1], f0[0] * s0[0, 0])
    assert torch.equal(scm_ops.minmax_normalize(torch.ones(1, 2, 2), (1, 2)), torch.zeros(1, 2, 2))
