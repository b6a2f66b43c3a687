"""An empty batch (B = 0) gives empty outputs of the right shapes and dtypes, forward and
backward, for every operator and for ActivationDiffusion, on both backends."""
import pytest
import torch

import scm_ops

GRID = (3, 4)
N = GRID[0] * GRID[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which, shape, out_shape", [
    ("cosine", (0, N, 5), (0, N, N)),
    ("laplacian", (0, N, N), (0, N, N)),
    ("newton_schulz", (0, N, N), (0, N, N)),
])
def test_operators_on_an_empty_batch(backend, device, dtype, which, shape, out_shape):
    calls = {"cosine": lambda x: scm_ops.cosine_similarity(x, backend=backend),
             "laplacian": lambda e: scm_ops.spatial_semantic_laplacian(e, GRID, 1.0, backend=backend),
             "newton_schulz": lambda m: scm_ops.newton_schulz_inverse(m, 3, 0.002, True, backend=backend)}
    x = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
    out = calls[which](x)
    assert out.shape == out_shape and out.dtype == dtype and out.device == x.device
    out.sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == dtype


def test_laplacian_with_per_item_lam_on_an_empty_batch(backend, device):
    e = torch.zeros(0, N, N, device=device, requires_grad=True)
    lam = torch.zeros(0, device=device, requires_grad=True)
    out = scm_ops.spatial_semantic_laplacian(e, GRID, lam, backend=backend)
    out.sum().backward()
    assert out.shape == (0, N, N) and lam.grad.shape == (0,)


@pytest.mark.parametrize("implementation", ["structured", "dense"])
@pytest.mark.parametrize("attention_shape", [(0, *GRID), (0, N)], ids=["map", "vector"])
def test_module_on_an_empty_batch(backend, device, implementation, attention_shape):
    module = scm_ops.ActivationDiffusion(GRID, implementation=implementation, backend=backend).to(device)
    f0 = torch.zeros(attention_shape, device=device, requires_grad=True)
    s0 = torch.zeros(0, 7, *GRID, device=device, requires_grad=True)
    f, s = module(f0, s0)
    assert f.shape == f0.shape and s.shape == s0.shape
    assert f.dtype == s.dtype == torch.float32
    (f.sum() + s.sum()).backward()
    assert f0.grad.shape == f0.shape and s0.grad.shape == s0.shape
    # the sum over no items: zero gradients for the parameters, not None
    assert torch.equal(module.lam.grad, torch.zeros(4, device=device))
    assert torch.equal(module.beta.grad, torch.zeros(4, device=device))


def test_module_on_an_empty_half_batch_keeps_the_dtype(device):
    module = scm_ops.ActivationDiffusion(GRID).to(device)
    f, s = module(torch.zeros(0, *GRID, device=device, dtype=torch.float16),
                  torch.zeros(0, 2, *GRID, device=device, dtype=torch.float16))
    assert f.dtype == s.dtype == torch.float16 and s.shape == (0, 2, *GRID)
