"""scm_ops.activation_diffusion, the functional form of ActivationDiffusion: the same results
as the module, the published stack's (scm_ops.reference) in float64 and float32, gradients
to lam and beta, errors naming the argument, and torch.compile(fullgraph=True) with its
checks kept."""
import pytest
import torch

import scm_ops
from scm_ops.reference import activation_diffusion_ref
from scm_ops.testing import assert_rel_rmse, relative_rmse

GRID = (5, 6)
# settings other than the defaults, so that a setting the module does not pass on shows
ODD = dict(iterations=(8, 3), alpha=0.003, connectivity=8, exact_gradients=True)


def inputs(b, c, grid=GRID, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(b, *grid, generator=g, dtype=torch.float64)
    s = torch.randn(b, c, *grid, generator=g, dtype=torch.float64)
    return f.to(device, dtype).requires_grad_(), s.to(device, dtype).requires_grad_()


def per_block(values, dtype=torch.float64, device="cpu"):
    return torch.tensor(values, dtype=dtype, device=device).requires_grad_()


def outputs_and_grads(fn, f, s, lam, beta):
    """Outputs and the gradients to (F0, S0, lam, beta) of sum(out * fixed weights)."""
    g = torch.Generator().manual_seed(1)
    out = fn(f, s, lam, beta)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in out)
    return [o.detach() for o in out] + list(torch.autograd.grad(loss, (f, s, lam, beta)))


@pytest.mark.parametrize("implementation, route", [("structured", "chebyshev"), ("structured", "spectral"),
                                                   ("structured", "newton_schulz"), ("dense", None)])
def test_same_as_the_module(device, backend, implementation, route):
    """The module's forward is the function with the module's settings and parameters: the
    same bits, outputs and every gradient (float32, settings other than the defaults)."""
    settings = dict(ODD, implementation=implementation, backend=backend, large_p_route=route)
    module = scm_ops.ActivationDiffusion(GRID, lam=[1.05, 0.95], beta=[0.4, 0.6], **settings).to(device)
    f, s = inputs(2, 7, dtype=torch.float32, device=device)
    by_module = outputs_and_grads(lambda f, s, lam, beta: module(f, s), f, s, module.lam, module.beta)
    lam, beta = (p.detach().clone().requires_grad_() for p in (module.lam, module.beta))
    by_function = outputs_and_grads(
        lambda f, s, lam, beta: scm_ops.activation_diffusion(f, s, lam, beta, grid_size=GRID, **settings),
        f, s, lam, beta)
    for name, a, b in zip(("F", "S", "dF0", "dS0", "dlam", "dbeta"), by_function, by_module):
        assert torch.equal(a, b), name


# float64: rounding alone separates the structured path from the dense reference (forward
# ~1e-13, gradients ~1e-11 measured, up to ~1e-8 for the gradient to beta, a sum of
# cancelling terms); float32 against the float64 reference: ~2e-5 forward, up to ~2e-3 for
# beta, as large as the published formulation's own float32 error, which is also allowed
# (doubled). The tolerances of tests/test_diffusion.py.
TOL = {torch.float64: (1e-9, 1e-6), torch.float32: (1e-4, 2e-3)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_matches_the_published_stack(device, backend, dtype, exact):
    """Default iterations (16, 4, 4, 4), per-block lam and beta as plain tensors: outputs and
    the gradients to F0, S0, lam and beta against scm_ops.reference in float64. The Triton
    backend (about 40 s in the interpreter) runs with the slow cases: test_same_as_the_module
    checks the function against the module on it, and tests/test_diffusion.py the module
    against the reference."""
    lam_values, beta_values = [1.0, 1.1, 0.9, 1.05], [0.5, 0.4, 0.6, 0.5]
    f, s = inputs(2, 40, dtype=dtype, device=device)
    lam, beta = per_block(lam_values, dtype, device), per_block(beta_values, dtype, device)
    ours = outputs_and_grads(lambda f, s, lam, beta: scm_ops.activation_diffusion(
        f, s, lam, beta, grid_size=GRID, exact_gradients=exact, backend=backend), f, s, lam, beta)

    def reference(in_dtype):
        leaves = [t.detach().to(in_dtype).requires_grad_() for t in (f, s, lam, beta)]
        return outputs_and_grads(lambda f, s, lam, beta: activation_diffusion_ref(f, s, lam, beta,
                                                                                  detach_init=not exact),
                                 *leaves)

    ref = reference(torch.float64)
    same_dtype = reference(dtype) if dtype != torch.float64 else None
    for i, (name, a, r) in enumerate(zip(("F", "S", "dF0", "dS0", "dlam", "dbeta"), ours, ref)):
        tol = TOL[dtype][0 if i < 2 else 1]
        if same_dtype is not None:
            tol = max(tol, 2 * relative_rmse(same_dtype[i], r))
        assert_rel_rmse(a, r, tol, name)


def test_gradients_to_lam_and_beta_by_finite_differences():
    """With exact_gradients=True the gradient is the derivative of the truncated iteration:
    torch.autograd.gradcheck in float64 on lam and beta (and F0, S0), every route (the p = 8
    block takes the large-p route, the p = 3 block the matrix-free series). Central
    differences with eps 1e-6 on float64 have an error near 1e-9 here; gradcheck's atol 1e-5
    and rtol 1e-3 leave room for that and fail on any wrong term (order 1e-2 and more)."""
    f, s = inputs(1, 3, grid=(3, 4))
    lam, beta = per_block([1.05, 0.9]), per_block([0.45, 0.6])
    for route in ("chebyshev", "spectral", "newton_schulz"):
        def fn(f, s, lam, beta, route=route):
            return scm_ops.activation_diffusion(f, s, lam, beta, grid_size=(3, 4), iterations=(8, 3),
                                                exact_gradients=True, backend="torch", large_p_route=route)
        assert torch.autograd.gradcheck(fn, (f, s, lam, beta), eps=1e-6, atol=1e-5, rtol=1e-3), route


def test_lam_and_beta_in_another_dtype_are_cast():
    """lam and beta in bfloat16 or float64 beside float32 inputs compute as the module does
    after .bfloat16() / .double() of its parameters: cast to the compute dtype."""
    f, s = inputs(2, 5, dtype=torch.float32)
    lam32, beta32 = torch.tensor([1.1, 0.9, 1.0, 1.05]), torch.tensor([0.5, 0.4, 0.6, 0.5])
    want = scm_ops.activation_diffusion(f, s, lam32, beta32, grid_size=GRID)
    for dtype in (torch.bfloat16, torch.float64):
        lam, beta = lam32.to(dtype), beta32.to(dtype)
        got = scm_ops.activation_diffusion(f, s, lam, beta, grid_size=GRID)
        exact = scm_ops.activation_diffusion(f, s, lam.float(), beta.float(), grid_size=GRID)
        for a, b in zip(got, exact):
            assert a.dtype == torch.float32 and torch.equal(a, b)
    assert all(o.dtype == torch.float32 for o in want)


def test_empty_batch_gives_zero_gradients_to_lam_and_beta():
    f, s = torch.rand(0, *GRID, requires_grad=True), torch.randn(0, 3, *GRID, requires_grad=True)
    lam, beta = per_block([1.0] * 4, torch.float32), per_block([0.5] * 4, torch.float32)
    out_f, out_s = scm_ops.activation_diffusion(f, s, lam, beta, grid_size=GRID)
    assert out_f.shape == f.shape and out_s.shape == s.shape
    (out_f.sum() + out_s.sum()).backward()
    assert torch.equal(lam.grad, torch.zeros(4)) and torch.equal(beta.grad, torch.zeros(4))


LAM4, BETA4 = torch.ones(4), torch.full((4,), 0.5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lam=torch.ones(3)), ValueError, r"lam must have one value per block .*\(16, 4, 4, 4\).*got shape \(3,\)"),
    (dict(beta=torch.ones(5)), ValueError, r"beta must have one value per block .*got shape \(5,\)"),
    (dict(lam=torch.ones(1, 4)), ValueError, r"lam must have shape \[4\] \(one value per block\), got shape"),
    (dict(beta=torch.tensor(0.5)), ValueError, r"beta must have shape \[4\]"),
    (dict(lam=[1.0, 1.0, 1.0, 1.0]), TypeError, r"lam must be a torch.Tensor, got list"),
    (dict(beta=torch.ones(4, dtype=torch.int64)), TypeError, r"beta must be float16, bfloat16, float32 or float64"),
    (dict(iterations=()), ValueError, r"iterations must be a non-empty sequence of ints >= 0, got \(\)"),
    (dict(iterations=(16, -1, 4, 4)), ValueError, r"iterations must be a non-empty sequence of ints >= 0"),
    (dict(iterations=(16, 4.0, 4, 4)), ValueError, r"iterations must be a non-empty sequence of ints >= 0"),
    (dict(iterations=(16, 4)), ValueError, r"lam must have one value per block of iterations \(16, 4\)"),
    (dict(grid_size=(4, 0)), ValueError, r"grid_size must be an int or a pair of positive ints"),
    (dict(grid_size=(6, 5)), ValueError, r"semantic must have shape \[B, C, 6, 5\] for grid_size \(6, 5\)"),
    (dict(alpha=0.0), ValueError, r"alpha must be > 0, got 0.0"),
    (dict(connectivity=6), ValueError, r"connectivity must be 4 or 8, got 6"),
    (dict(implementation="sparse"), ValueError, r"implementation must be 'structured' or 'dense'"),
    (dict(backend="cuda"), ValueError, r"backend must be 'triton', 'torch' or None"),
    (dict(large_p_route="eigh"), ValueError, r"large_p_route must be one of \('chebyshev', 'spectral', "),
    (dict(attention=torch.rand(2, 4, 6)), ValueError, r"attention must have shape \[B, 30\] or \[B, 5, 6\]"),
    (dict(lam=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, r"lam or beta .* contains NaN"),
])
def test_errors_name_the_argument(kwargs, error, match):
    args = dict(attention=torch.rand(2, *GRID), semantic=torch.randn(2, 3, *GRID), lam=LAM4, beta=BETA4,
                grid_size=GRID)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        scm_ops.activation_diffusion(**args)


def test_grid_size_is_required():
    with pytest.raises(TypeError, match="grid_size"):
        scm_ops.activation_diffusion(torch.rand(2, *GRID), torch.randn(2, 3, *GRID), LAM4, BETA4)


def test_a_diverging_lam_names_the_block():
    f, s = inputs(2, 5, dtype=torch.float32)
    with pytest.raises(scm_ops.NewtonSchulzDivergenceError, match="block 0: lam=20 makes Newton-Schulz diverge"):
        scm_ops.activation_diffusion(f, s, torch.tensor([20.0, 1.0, 1.0, 1.0]), BETA4, grid_size=GRID)


@pytest.mark.slow                     # about a minute: Inductor compiles forward and backward
def test_compiled_fullgraph_matches_eager_and_keeps_its_checks(monkeypatch):
    """torch.compile(fullgraph=True) of a function that calls activation_diffusion with lam
    and beta of its own and no check token: no graph break, the loss and its gradients as in
    eager, and a NaN input raises in the compiled graph (the checks write the per-device
    token, which the compiler keeps), as does a block whose output turns NaN: its check is
    the last writer of the token, which a token made inside the graph would lose (nothing
    reads the checks' writes in the graph). The compiled graph reorders float32 sums; measured:
    loss 7.7e-7, gradients to F0 6.7e-6 and S0 6.0e-6, to lam 4.2e-5 and beta 6.1e-5
    (sums of cancelling terms, as in tests/test_compile.py); bounds about 10x. A wrong
    route or a lost block is off by order 1."""
    torch.compiler.reset()
    f, s = inputs(2, 5, dtype=torch.float32)
    lam, beta = per_block([1.05, 0.95, 1.0, 1.1], torch.float32), per_block([0.5, 0.4, 0.6, 0.5], torch.float32)

    def step(f, s, lam, beta):
        out_f, out_s = scm_ops.activation_diffusion(f, s, lam, beta, grid_size=GRID)
        return out_f.square().sum() + out_s.mean()

    def loss_and_grads(fn):
        loss = fn(f, s, lam, beta)
        return [loss.detach()] + list(torch.autograd.grad(loss, (f, s, lam, beta)))

    eager = loss_and_grads(step)
    compiled = torch.compile(step, fullgraph=True)
    for name, a, b in zip(("loss", "dF0", "dS0", "dlam", "dbeta"), loss_and_grads(compiled), eager):
        assert_rel_rmse(a, b, 5e-4 if name in ("dlam", "dbeta") else 1e-4, name)
    bad = s.detach().clone()
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="semantic contains NaN or infinite values"):
        compiled(f, bad, lam, beta)
    original = scm_ops.diffusion.stencil_series          # the p = 4 blocks

    def poisoned(*args):
        return original(*args).index_fill(0, torch.tensor([1]), float("nan"))

    monkeypatch.setattr(scm_ops.diffusion, "stencil_series", poisoned)
    with pytest.raises(scm_ops.NonFiniteOutputError, match=r"block 1 \(matrix-free series route, p=4\) produced "
                                                           r"NaN or infinity for batch item 1"):
        torch.compile(step, fullgraph=True)(f, s, lam, beta)
