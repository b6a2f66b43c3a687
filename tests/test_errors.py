"""Bad input gets a clear error naming what is wrong."""
import pytest
import torch

import scm_ops


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: scm_ops.cosine_similarity(f64(4, 3)), ValueError, r"x must have shape \[B, N, D\]"),
    (lambda: scm_ops.cosine_similarity(torch.ones(1, 4, 3, dtype=torch.int64)), TypeError, "x must be float"),
    (lambda: scm_ops.cosine_similarity([[1.0]]), TypeError, "x must be a torch.Tensor"),
    (lambda: scm_ops.cosine_similarity(f64(1, 4, 0)), ValueError, "D >= 1"),
    (lambda: scm_ops.spatial_semantic_laplacian(f64(1, 12, 12), (3, 5), 1.0), ValueError, r"grid \(3, 5\)"),
    (lambda: scm_ops.spatial_semantic_laplacian(f64(1, 12, 11), (3, 4), 1.0), ValueError, "similarity must have shape"),
    (lambda: scm_ops.spatial_semantic_laplacian(f64(1, 12, 12), (3, 4), 1.0, 6), ValueError, "connectivity must be 4 or 8"),
    (lambda: scm_ops.spatial_semantic_laplacian(f64(1, 12, 12), (3, 4.0), 1.0), ValueError, "grid must be a pair"),
    (lambda: scm_ops.spatial_semantic_laplacian(f64(2, 4, 4), (2, 2), f64(3)), ValueError, r"lam must have one element or shape \[B\]"),
    (lambda: scm_ops.spatial_semantic_laplacian(f64(1, 4, 4), (2, 2), torch.ones(1)), TypeError, "similarity is torch.float64 but lam is torch.float32"),
    (lambda: scm_ops.spatial_semantic_laplacian(f64(1, 4, 4), (2, 2), torch.ones(1, dtype=torch.float64, device="meta")), ValueError, "lam is on meta"),
    (lambda: scm_ops.newton_schulz_inverse(f64(1, 4, 5), 2, 0.1), ValueError, "L must be square"),
    (lambda: scm_ops.newton_schulz_inverse(f64(4, 4), 2, 0.1), ValueError, r"L must have shape \[B, N, N\]"),
    (lambda: scm_ops.newton_schulz_inverse(f64(1, 4, 4), -1, 0.1), ValueError, "iterations must be an int >= 0"),
    (lambda: scm_ops.newton_schulz_inverse(f64(1, 4, 4), 2.0, 0.1), ValueError, "iterations must be an int"),
    (lambda: scm_ops.newton_schulz_inverse(f64(1, 4, 4), 2, 0.0), ValueError, "alpha must be a finite float > 0"),
    (lambda: scm_ops.newton_schulz_inverse(torch.ones(1, 4, 4, dtype=torch.int32), 2, 0.1), TypeError, "L must be float"),
    (lambda: scm_ops.cosine_similarity(f64(1, 4, 3), backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_input_is_reported(backend, device):
    x = torch.randn(1, 4, 3, dtype=torch.float64, device=device)
    x[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or infinite"):
        scm_ops.cosine_similarity(x, backend=backend)
    e = torch.randn(1, 4, 4, dtype=torch.float64, device=device)
    e[0, 0, 1] = float("inf")
    with pytest.raises(ValueError, match="similarity contains NaN"):
        scm_ops.spatial_semantic_laplacian(e, (2, 2), 1.0, backend=backend)
    with pytest.raises(ValueError, match="lam contains NaN"):
        scm_ops.spatial_semantic_laplacian(e.nan_to_num(), (2, 2), float("nan"), backend=backend)
    with pytest.raises(ValueError, match="L contains NaN"):
        scm_ops.newton_schulz_inverse(e, 2, 0.1, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_screen_is_exact(dtype):
    """The finite check screens by the sum: a sum that overflows (every element finite) must
    pass, a single NaN or infinity anywhere must fail, also where +inf and -inf meet."""
    from scm_ops._common import all_finite
    big = torch.full((3, 1000), torch.finfo(dtype).max, dtype=dtype)
    assert not torch.isfinite(big.sum()) and all_finite(big)
    for value in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(7, 300).to(dtype)
        t[5, 123] = value
        assert not all_finite(t)
    both = torch.zeros(50, dtype=dtype)
    both[3], both[40] = float("inf"), float("-inf")
    assert not all_finite(both)
    assert all_finite(torch.zeros(0, dtype=dtype)) and all_finite(torch.arange(5))


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        scm_ops.cosine_similarity(f64(1, 4, 3), backend="triton")


def test_environment_forces_backend(monkeypatch):
    monkeypatch.setenv("SCM_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        scm_ops.cosine_similarity(f64(1, 4, 3))


@pytest.mark.parametrize("call, exc, match", [
    # outside autocast the two maps must share a dtype (inside, half and float32 may mix)
    (lambda m: m(torch.rand(2, 12), torch.rand(2, 3, 3, 4).half()), TypeError,
     "attention is torch.float32 but semantic is torch.float16"),
    (lambda m: m(torch.rand(2, 12), torch.rand(2, 3, 3, 4, device="meta")), ValueError,
     "attention is on cpu but semantic is on meta"),
    (lambda m: m(torch.rand(2, 12), torch.rand(2, 3, 3, 4).int()), TypeError, "semantic must be float"),
    (lambda m: m(torch.rand(2, 12), torch.full((2, 3, 3, 4), float("inf"))), ValueError, "semantic contains NaN"),
    (lambda m: m(torch.rand(2, 12) - torch.tensor([[0.0], [0.5]]), torch.rand(2, 3, 3, 4)), ValueError,
     "attention must be non-negative .* batch item 1 has minimum"),
])
def test_module_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call(scm_ops.ActivationDiffusion((3, 4)))


def test_module_non_finite_parameter_is_reported():
    module = scm_ops.ActivationDiffusion((3, 4))
    with torch.no_grad():
        module.beta[2] = float("nan")
    with pytest.raises(ValueError, match="lam or beta of ActivationDiffusion contains NaN"):
        module(torch.rand(2, 12), torch.rand(2, 3, 3, 4))


def test_checks_off_skip_the_finite_check(monkeypatch):
    """SCM_OPS_CHECKS=0: no host synchronisation, so a NaN goes through (and comes out)."""
    monkeypatch.setenv("SCM_OPS_CHECKS", "0")
    module = scm_ops.ActivationDiffusion((3, 4), iterations=(4,))  # (eigh, for p = 16, fails on NaN)
    f, s = module(torch.rand(2, 12), torch.full((2, 3, 3, 4), float("nan")))
    assert torch.isnan(s).all()


@pytest.mark.parametrize("connectivity, alpha, lam, blamed", [
    (4, 1.0, 1.0, "alpha=1 is out of range.*must stay below 0.03125"),      # alpha (2 * 4)^2 >= 2
    (8, 0.05, 1.0, "alpha=0.05 is out of range.*must stay below 0.0078"),   # alpha (2 * 8)^2 >= 2
    (4, 0.002, -20.0, "lam=-20 makes Newton-Schulz diverge.*keep lam nearer 1"),
])
def test_divergence_names_alpha_or_lam(connectivity, alpha, lam, blamed):
    """The divergence error blames alpha where even lam = 1 can diverge (sigma_max(L) reaches
    2 x the largest degree there), lam otherwise; on every route."""
    s0 = torch.randn(2, 5, 4, 5, generator=torch.Generator().manual_seed(1))
    for kwargs in (dict(), dict(large_p_route="spectral"), dict(large_p_route="newton_schulz"),
                   dict(implementation="dense")):
        module = scm_ops.ActivationDiffusion((4, 5), alpha=alpha, lam=lam, connectivity=connectivity, **kwargs)
        with pytest.raises(scm_ops.NewtonSchulzDivergenceError, match=blamed):
            module(torch.rand(2, 4, 5), s0)


def _poison_item(item):
    """A wrapper that sets batch item `item` of a function's first output to NaN."""
    def wrap(fn):
        def poisoned(*args, **kwargs):
            out = fn(*args, **kwargs)
            first = out[0] if isinstance(out, tuple) else out
            first[item] = float("nan")
            return out
        return poisoned
    return wrap


@pytest.mark.parametrize("route, target, block", [
    ("chebyshev", "scm_ops.structured.chebyshev._series_forward", 0),
    ("spectral", "scm_ops.structured.spectral.spectral_filter", 0),
    ("newton_schulz", "scm_ops.newton_schulz.newton_schulz_fwd", 0),
    ("matrix-free series", "scm_ops.diffusion.stencil_series", 1),
])
def test_non_finite_block_output_is_reported(monkeypatch, route, target, block):
    """The last line of defence: a block whose output is NaN (here forced, on batch item 1)
    raises NonFiniteOutputError naming the block, its route, the item and lam, instead of
    passing NaN on to the loss."""
    module_name, name = target.rsplit(".", 1)
    import importlib
    owner = importlib.import_module(module_name)
    monkeypatch.setattr(owner, name, _poison_item(1)(getattr(owner, name)))
    large_p_route = route if route != "matrix-free series" else "chebyshev"
    module = scm_ops.ActivationDiffusion((4, 5), lam=0.9, large_p_route=large_p_route)
    with pytest.raises(scm_ops.NonFiniteOutputError,
                       match=rf"block {block} \({route} route, p=\d+\) .* batch item 1 \(lam=0.9\)"):
        module(torch.rand(3, 4, 5), torch.randn(3, 2, 4, 5))
