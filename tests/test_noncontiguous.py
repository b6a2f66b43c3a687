"""Every operator and ActivationDiffusion on non-contiguous inputs (transposed views,
channels_last semantic maps, batches expanded from one item), forward and backward, on both
backends, against the same call on contiguous copies of the same values.

Kernels address their operands through strides, or the launchers make them contiguous;
either way a view must give the answer its contiguous copy gives. (The Newton-Schulz
backward once stored its gradient as if a transposed L were contiguous: 12-34 % error.)
All in float64, so any layout mistake shows far above rounding: the contiguous and the
strided call run the same arithmetic in the same order except where a kernel reads a
transposed tile, which reorders no sum. Measured: at most 1e-15 relative RMSE.
"""
import pytest
import torch

import scm_ops
from scm_ops.testing import assert_rel_rmse

TOL = 1e-13  # float64; measured <= 1e-15 (see the module docstring)


def _run(fn, inputs, weights):
    """fn's outputs and the gradients of sum(out * weight) to the given inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return list(outs), list(torch.autograd.grad(loss, leaves))


def _compare(fn, strided, weights, what):
    """fn on `strided` inputs (leaves that are views) against fn on contiguous copies."""
    leaves = [base.detach().clone().requires_grad_() for base, _ in strided]
    views = [make(leaf) for leaf, (_, make) in zip(leaves, strided)]
    assert any(not v.is_contiguous() for v in views), "the case must exercise a non-contiguous input"
    outs = fn(*views)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, leaves)
    ref_outs, ref_grads = _run(lambda *xs: fn(*[make(x).contiguous() for x, (_, make) in zip(xs, strided)]),
                               [base for base, _ in strided], weights)
    for i, (a, r) in enumerate(zip(outs, ref_outs)):
        assert_rel_rmse(a, r, TOL, f"{what}: output {i}")
    for i, (a, r) in enumerate(zip(grads, ref_grads)):
        assert_rel_rmse(a, r, TOL, f"{what}: gradient {i}")


def _weights(*shapes):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_cosine_similarity(backend, device, layout):
    B, N, D = 3, 20, 7
    if layout == "transposed":       # x [B, N, D] as the transpose of a [B, D, N] tensor
        base = torch.randn(B, D, N, dtype=torch.float64, device=device)
        make = lambda t: t.transpose(1, 2)  # noqa: E731
    else:                            # one item repeated over the batch (stride 0)
        base = torch.randn(1, N, D, dtype=torch.float64, device=device)
        make = lambda t: t.expand(B, N, D)  # noqa: E731
    w = [x.to(device) for x in _weights((B, N, N))]
    _compare(lambda x: scm_ops.cosine_similarity(x, backend=backend), [(base, make)], w, f"cosine {layout}")


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_spatial_semantic_laplacian(backend, device, layout):
    grid, B = (4, 5), 2
    N = grid[0] * grid[1]
    e = scm_ops.cosine_similarity(torch.randn(B, N, 6, dtype=torch.float64, device=device))
    base = e if layout == "transposed" else e[:1]
    make = (lambda t: t.transpose(1, 2)) if layout == "transposed" else (lambda t: t.expand(B, N, N))
    w = [x.to(device) for x in _weights((B, N, N))]
    _compare(lambda x: scm_ops.spatial_semantic_laplacian(x, grid, 0.9, backend=backend), [(base, make)], w,
             f"laplacian {layout}")


@pytest.mark.parametrize("detach_init", [False, True])
@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_newton_schulz_inverse(backend, device, layout, detach_init):
    B, N = 2, 30
    g = torch.Generator().manual_seed(1)
    base = (0.3 * torch.randn(B if layout == "transposed" else 1, N, N, generator=g, dtype=torch.float64)).to(device)
    make = (lambda t: t.transpose(1, 2)) if layout == "transposed" else (lambda t: t.expand(B, N, N))
    w = [x.to(device) for x in _weights((B, N, N))]
    _compare(lambda x: scm_ops.newton_schulz_inverse(x, 4, 0.05, detach_init=detach_init, backend=backend),
             [(base, make)], w, f"newton_schulz {layout}")


@pytest.mark.parametrize("implementation", ["structured", "dense"])
def test_activation_diffusion(backend, device, implementation):
    """attention as the transpose of a [B, W, H] map, semantic channels_last and expanded
    over the batch from one item."""
    B, C, H, W = 2, 5, 4, 6
    module = scm_ops.ActivationDiffusion((H, W), iterations=(16, 4), implementation=implementation,
                                         backend=backend).to(device)
    g = torch.Generator().manual_seed(2)
    f_base = torch.rand(B, W, H, generator=g, dtype=torch.float64).to(device)
    s_base = torch.randn(1, C, H, W, generator=g, dtype=torch.float64).to(device)
    strided = [(f_base, lambda t: t.transpose(1, 2)),
               (s_base, lambda t: t.contiguous(memory_format=torch.channels_last).expand(B, C, H, W))]
    w = [x.to(device) for x in _weights((B, H, W), (B, C, H, W))]
    _compare(lambda f, s: module(f, s), strided, w, f"ActivationDiffusion {implementation}")


def test_cosine_float32_subnormal_norm(backend, device):
    """A float32 row whose squared norm is subnormal (entries 1e-20: |x|^2 = 2e-40) has
    finite cosines equal to torch's float64 answer. On a GPU the kernel needs correctly
    rounded sqrt and division for this (approximate ones flush the subnormal to 0 and give
    inf / NaN); in the interpreter this checks the arithmetic path."""
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    x[0, 1] = 1e-20 * torch.tensor([1.0, -2, 0.5, 1, 3, -1, 2, 1], dtype=torch.float64)
    x[0, 2] = 0.0
    e = scm_ops.cosine_similarity(x.to(device, torch.float32), backend=backend)
    ref = torch.nn.functional.cosine_similarity(x[0][:, None], x[0][None], dim=-1, eps=1e-300)
    assert bool(torch.isfinite(e).all()), e
    assert_rel_rmse(e[0].double(), ref, 1e-6, "cosine with a subnormal norm")  # float32 rounding ~1e-7
