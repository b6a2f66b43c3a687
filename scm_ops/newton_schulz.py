"""Batched Newton-Schulz approximate inverse: X_0 = alpha L^T, X_{k+1} = X_k (2I - L X_k).

Forward and backward are written once, over a batched product with a fused axpby epilogue
(`out = s * A @ B + t * C`): Triton's `bmm_axpby_kernel` on the Triton backend, `baddbmm`
on the PyTorch backend. The forward pass keeps the iterates X_k and T_k = L X_k (2p
matrices, as many as autograd through the loop would keep), and the backward pass walks
them in reverse with four products a step:

    X_{k+1} = X_k (2I - T_k)     =>  H     = X_k^T G
                                     dL   -= H X_k^T
                                     G_k   = 2G - G T_k^T - L^T H
    X_0 = alpha L^T              =>  dL   += alpha G_0^T   (exact gradient only)

With ``detach_init=True`` the last term is dropped: X_0 carries no gradient, which is the
gradient of the published SCM code.
"""
from __future__ import annotations

import math

import torch

from ._common import (autocast_to_float32, cdiv, check_finite, check_float_tensor, checks_enabled, compute_dtype,
                      kernel_config, kernel_module, resolve_backend, without_autocast)

__all__ = ["newton_schulz_inverse", "NewtonSchulzDivergenceError", "spectral_norm_bound"]


class NewtonSchulzDivergenceError(ValueError):
    """alpha * sigma_max(L)^2 >= 2: the Newton-Schulz iteration does not converge."""


def _bmm_torch(a, b, scale=1.0, c=None, c_scale=0.0, out=None):
    if c is None:
        out = torch.bmm(a, b, out=out)
        return out if scale == 1.0 else out.mul_(scale)
    return torch.baddbmm(c, a, b, beta=c_scale, alpha=scale, out=out)


def _bmm_triton(a, b, scale=1.0, c=None, c_scale=0.0, out=None):
    # scale and c_scale are passed to the kernel as float32 scalars: callers only use
    # values exact in float32 (+-1, 2), so float64 products stay float64-exact. `out` may
    # be `c` itself: every program reads its tile of c before writing the same tile; an
    # `out` that overlaps `c` with other strides (c transposed) would race, so it must not.
    kern = kernel_module("newton_schulz")
    cfg, launch = kernel_config(kern, a.dtype)
    batch, m, k = a.shape
    n = b.shape[2]
    if out is None:
        out = torch.empty(batch, m, n, device=a.device, dtype=a.dtype)
    cc = out if c is None else c
    if out.numel() == 0:  # an empty batch: no launch with a zero grid dimension
        return out
    grid = (cdiv(m, cfg["BLOCK_M"]), cdiv(n, cfg["BLOCK_N"]), batch)
    kern.bmm_axpby_kernel[grid](a, b, cc, out, m, n, k, scale, c_scale,
                                *a.stride(), *b.stride(), *cc.stride(), *out.stride(),
                                HAS_C=c is not None, IS_FP64=a.dtype == torch.float64,
                                **cfg, **launch)
    return out


def _bmm(backend):
    return _bmm_triton if backend == "triton" else _bmm_torch


def newton_schulz_fwd(l, iterations, alpha, backend):
    """(X_p, X stack [p, B, N, N] of X_0..X_{p-1}, T stack of T_k = L X_k) in L's compute
    dtype; the products write straight into the stacks."""
    lc = l.to(compute_dtype(l.dtype))
    bmm = _bmm(backend)
    xs = lc.new_empty(iterations, *lc.shape)
    ts = lc.new_empty(iterations, *lc.shape)
    x = alpha * lc.transpose(1, 2)
    for k in range(iterations):
        xs[k] = x
        bmm(lc, xs[k], out=ts[k])
        x = bmm(xs[k], ts[k], -1.0, xs[k], 2.0)          # 2 X - X (L X)
    return x, xs, ts


def newton_schulz_bwd(grad_x, l, xs, ts, alpha, detach_init, backend):
    lc = l.to(xs.dtype)
    bmm = _bmm(backend)
    lt = lc.transpose(1, 2)
    g = grad_x.to(xs.dtype)
    # Contiguous, whatever L's strides: zeros_like would copy the strides of a transposed L
    # (the product writes dL -= H X^T in place, through out's strides).
    grad_l = lc.new_zeros(lc.shape)
    for k in range(xs.shape[0] - 1, -1, -1):
        xkt = xs[k].transpose(1, 2)
        h = bmm(xkt, g)                                      # H = X^T G
        bmm(h, xkt, -1.0, grad_l, 1.0, out=grad_l)           # dL -= H X^T
        g = bmm(lt, h, -1.0, bmm(g, ts[k].transpose(1, 2), -1.0, g, 2.0), 1.0)  # 2G - G T^T - L^T H
    if not detach_init:
        grad_l = grad_l + alpha * g.transpose(1, 2)
    return grad_l.to(l.dtype).contiguous()


def spectral_norm_bound(l: torch.Tensor) -> torch.Tensor:
    """A cheap upper bound of sigma_max(L) per batch item, [B]:
    sqrt(max row abs sum * max column abs sum) (Gershgorin / Hoelder); for a symmetric L it
    is the max row abs sum (docs/maths.md, "Convergence and the Gershgorin screen")."""
    a = l.abs().to(compute_dtype(l.dtype))
    return (a.sum(2).amax(1) * a.sum(1).amax(1)).sqrt()


def sigma_max_screen(l: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per batch item [B], float64: sigma_max(L) where it matters for convergence. The
    Gershgorin bound screens the batch in one pass; only items it cannot clear
    (alpha bound^2 >= 2) get an exact sigma_max (an SVD); the others keep the bound."""
    bound = spectral_norm_bound(l).to(torch.float64)
    suspects = torch.nonzero(alpha * bound * bound >= 2).flatten()
    if suspects.numel():
        bound[suspects] = torch.linalg.matrix_norm(l[suspects].detach().double(), ord=2)
    return bound


def check_convergence(l: torch.Tensor, alpha: float) -> None:
    """Raise NewtonSchulzDivergenceError where alpha * sigma_max(L)^2 >= 2.

    The residual obeys I - X_k L = (I - alpha L^T L)^(2^k), so the iteration converges iff
    alpha sigma_max^2 < 2; sigma_max_screen makes a false alarm impossible."""
    problem = divergence(sigma_max_screen(l, alpha), alpha)
    if problem:
        raise NewtonSchulzDivergenceError(f"newton_schulz_inverse diverges: {problem}. Lower alpha, or "
                                          "rescale L (in SCM: keep lam near 1).")


def divergence(sigma: torch.Tensor, alpha: float) -> str:
    """"" if alpha * sigma[b]^2 < 2 for every batch item b, else what fails for the first
    item that diverges (sigma: sigma_max(L) per item, [B]); shared by newton_schulz_inverse
    and ActivationDiffusion's structured path, which get sigma in different ways."""
    bad = alpha * sigma.detach() ** 2 >= 2
    if not bool(bad.any()):
        return ""
    item = int(bad.nonzero()[0, 0])
    s = float(sigma[item])
    return (f"alpha * sigma_max(L)^2 = {alpha * s * s:.4g} >= 2 for batch item {item} (alpha={alpha:g}, "
            f"sigma_max(L)={s:.4g}, so it converges only for alpha < {2 / (s * s):.4g} or "
            f"sigma_max(L) < {(2 / alpha) ** 0.5:.4g})")


# ------------------------------------------- ActivationDiffusion's divergence checks
# Custom operators, so that torch.compile keeps them in its graph without a graph break
# (docs/maths.md, "Checks under torch.compile"): each declares that it writes `token`, a
# 0-d tensor of the module that is never read, so it is never removed as dead code.
def _raise_if_divergent_block(sigma: torch.Tensor, alpha: float, block: int, lam: torch.Tensor,
                              connectivity: int) -> None:
    """The block's divergence error, blaming alpha where alpha is out of range: at lam = 1 (the
    published start) L = (D - A) * (E - 1) has a zero diagonal and off-diagonal entries in
    [0, 2], so sigma_max(L) <= 2 max degree (8 with 4 neighbours, 16 with 8); an alpha with
    alpha (2 max degree)^2 >= 2 can diverge whatever lam is, otherwise lam is the cause."""
    problem = divergence(sigma, alpha)
    if not problem:
        return
    reach = 2 * connectivity
    if alpha * reach * reach >= 2:
        raise NewtonSchulzDivergenceError(
            f"ActivationDiffusion block {block}: alpha={alpha:g} is out of range: {problem}. With "
            f"{connectivity} neighbours sigma_max(L) reaches {reach} at lam = 1, so alpha must stay below "
            f"{2 / (reach * reach):.4g} (published 0.002)")
    raise NewtonSchulzDivergenceError(
        f"ActivationDiffusion block {block}: lam={float(lam):.4g} makes Newton-Schulz diverge: "
        f"{problem}; keep lam nearer 1")


@torch.library.custom_op("scm_ops::assert_block_converges", mutates_args=("token",))
def _assert_block_converges_op(token: torch.Tensor, sigma: torch.Tensor, lam: torch.Tensor, alpha: float,
                               block: int, connectivity: int = 4) -> None:
    """Raise NewtonSchulzDivergenceError if alpha sigma[b]^2 >= 2 for an item b; sigma [B] is
    sigma_max(L) per item (e.g. the largest |eigenvalue| of a symmetric L), lam the block's
    lam (0-d), named in the message."""
    _raise_if_divergent_block(sigma, alpha, block, lam, connectivity)


@_assert_block_converges_op.register_fake
def _(token, sigma, lam, alpha, block, connectivity=4):
    return None


@torch.library.custom_op("scm_ops::assert_stencil_converges", mutates_args=("token",))
def _assert_stencil_converges_op(token: torch.Tensor, w: torch.Tensor, d: torch.Tensor, lam: torch.Tensor,
                                 alpha: float, block: int, connectivity: int) -> torch.Tensor:
    """Raise NewtonSchulzDivergenceError if the symmetric stencil L (w [B, K, H, W], d [B, H, W],
    docs/maths.md, "The stencil") makes Newton-Schulz diverge: the Gershgorin bound (max
    absolute row sum) screens the batch; items it cannot clear get their exact sigma_max
    from the eigenvalues of the dense L, in float64. Returns that bound, [B] float64 (the
    Chebyshev series takes its radius from it)."""
    from .structured.stencil import OFFSETS, sigma_max_bound
    with without_autocast(w.device):
        sigma = sigma_max_bound(w, d, OFFSETS[connectivity], alpha)
    _raise_if_divergent_block(sigma, alpha, block, lam, connectivity)
    return sigma


@_assert_stencil_converges_op.register_fake
def _(token, w, d, lam, alpha, block, connectivity):
    return w.new_empty(w.shape[0], dtype=torch.float64)


@torch.library.custom_op("scm_ops::assert_dense_converges", mutates_args=("token",))
def _assert_dense_converges_op(token: torch.Tensor, l: torch.Tensor, lam: torch.Tensor, alpha: float,
                               block: int, connectivity: int = 4) -> torch.Tensor:
    """Raise NewtonSchulzDivergenceError, naming the block and its lam, if the dense L
    [B, N, N] makes Newton-Schulz diverge (sigma_max_screen). Returns a 0-d zero of L's
    dtype, for the caller to add to L where it needs the check ordered first."""
    with without_autocast(l.device):
        sigma = sigma_max_screen(l, alpha)
    _raise_if_divergent_block(sigma, alpha, block, lam, connectivity)
    return l.new_zeros(())


@_assert_dense_converges_op.register_fake
def _(token, l, lam, alpha, block, connectivity=4):
    return l.new_zeros(())


def assert_dense_converges(token: torch.Tensor, l: torch.Tensor, lam: torch.Tensor, alpha: float,
                           block: int, connectivity: int = 4) -> torch.Tensor:
    """ActivationDiffusion's check of a block given as a dense L [B, N, N]. Returns L, with
    the check's 0-d zero added under torch.compile: that data dependency orders the check
    (and its error naming the block) before whatever consumes L, which a token alone does
    not."""
    zero = _assert_dense_converges_op(token, l.detach(), lam.detach(), alpha, block, connectivity)
    return l + zero if torch.compiler.is_compiling() else l


def assert_block_converges(token: torch.Tensor, sigma: torch.Tensor, lam: torch.Tensor, alpha: float,
                           block: int, connectivity: int = 4) -> None:
    """ActivationDiffusion's check of a block whose sigma_max(L) per item is known (sigma [B])."""
    _assert_block_converges_op(token, sigma.detach(), lam.detach(), alpha, block, connectivity)


def assert_stencil_converges(token: torch.Tensor, w: torch.Tensor, d: torch.Tensor, lam: torch.Tensor,
                             alpha: float, block: int, connectivity: int) -> torch.Tensor:
    """ActivationDiffusion's check of a block given as a stencil (w, d); returns the bound on
    sigma_max(L) per item it checked, [B] float64. Passing it on to the operator that needs
    it also orders the check before that operator in a compiled graph."""
    return _assert_stencil_converges_op(token, w.detach(), d.detach(), lam.detach(), alpha, block, connectivity)


# ---------------------------------------------------------------- registered operators
@torch.library.custom_op("scm_ops::newton_schulz_inverse", mutates_args=())
def _newton_schulz_op(l: torch.Tensor, iterations: int, alpha: float, detach_init: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns X_p in L's dtype and the saved iterates (X_k and L X_k stacks) for backward."""
    check_finite("L", l)
    with without_autocast(l.device):
        if iterations > 0 and checks_enabled():
            check_convergence(l, alpha)
        x, xs, ts = newton_schulz_fwd(l, iterations, alpha, backend)
    return x.to(l.dtype).contiguous(), xs, ts


@_newton_schulz_op.register_fake
def _(l, iterations, alpha, detach_init, backend):
    stack = l.new_empty(iterations, *l.shape, dtype=compute_dtype(l.dtype))
    return l.new_empty(l.shape), stack, torch.empty_like(stack)  # X contiguous, whatever L's strides


@torch.library.custom_op("scm_ops::newton_schulz_inverse_backward", mutates_args=())
def _newton_schulz_backward_op(grad_x: torch.Tensor, l: torch.Tensor, xs: torch.Tensor, ts: torch.Tensor,
                               alpha: float, detach_init: bool, backend: str) -> torch.Tensor:
    with without_autocast(l.device):
        return newton_schulz_bwd(grad_x, l, xs, ts, alpha, detach_init, backend)


@_newton_schulz_backward_op.register_fake
def _(grad_x, l, xs, ts, alpha, detach_init, backend):
    return l.new_empty(l.shape)


def _setup_context(ctx, inputs, output):
    l, iterations, alpha, detach_init, backend = inputs
    _, xs, ts = output
    ctx.mark_non_differentiable(xs, ts)
    ctx.save_for_backward(l, xs, ts)
    ctx.args = (alpha, detach_init, backend)


def _backward(ctx, grad_x, _grad_xs, _grad_ts):
    l, xs, ts = ctx.saved_tensors
    return _newton_schulz_backward_op(grad_x, l, xs, ts, *ctx.args), None, None, None, None


_newton_schulz_op.register_autograd(_backward, setup_context=_setup_context)


def newton_schulz_inverse(L: torch.Tensor, iterations: int, alpha: float,
                          detach_init: bool = False, *, backend: str | None = None) -> torch.Tensor:
    """Approximate inverse of each square L[b] by `iterations` Newton-Schulz steps.

    X_0 = alpha L^T, X_{k+1} = X_k (2I - L X_k); returns X_iterations. For a symmetric L
    (as SCM builds) this is the spectral filter g(t) = (1 - (1 - alpha t^2)^(2^p)) / t.

    Args:
        L: [B, N, N] float16, bfloat16, float32 or float64, any square matrices; computed
            in float32 (float64 for float64). B may be 0.
        iterations: p >= 0.
        alpha: initial scale, > 0. The iteration converges iff alpha * sigma_max(L)^2 < 2.
        detach_init: False: exact gradient of the truncated iteration. True: the gradient of
            the published SCM code, where X_0 = alpha L^T carries no gradient.
        backend: "triton", "torch" or None (SCM_OPS_BACKEND, else by device).

    Returns:
        X: [B, N, N] in L's dtype, or float32 for a half L inside a torch.autocast region
        (docs/maths.md, "Mixed precision").

    Raises:
        NewtonSchulzDivergenceError (a ValueError) when alpha * sigma_max(L)^2 >= 2 for some
        batch item, checked at forward time unless SCM_OPS_CHECKS=0.
    """
    check_float_tensor("L", L, 3, "[B, N, N]")
    if L.shape[1] != L.shape[2]:
        raise ValueError(f"L must be square, [B, N, N], got shape {tuple(L.shape)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    if isinstance(alpha, torch.Tensor):
        raise TypeError("alpha must be a Python float (a constant of the iteration), not a tensor")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite float > 0, got {alpha!r}")
    (L,) = autocast_to_float32(L)
    return _newton_schulz_op(L, iterations, alpha, bool(detach_init), resolve_backend(backend, L))[0]
