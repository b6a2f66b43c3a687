"""Blocks with many iterations by one eigendecomposition (docs/structured.md, "Spectral form").

With L = Q diag(t) Q^T, X_p = Q diag(g(t)) Q^T, g(t) = (1 - (1 - alpha t^2)^(2^p)) / t, and
the derivative of X_p has a closed form in the eigenbasis for both gradient semantics.
O(N^3) per image (a batched eigh); PyTorch on both backends.
"""
from __future__ import annotations

import torch

from .stencil import product_stencil_entries, stencil_to_dense

__all__ = ["SpectralFilter", "spectral_filter", "spectral_derivative"]


def spectral_filter(t: torch.Tensor, alpha: float, iterations: int) -> torch.Tensor:
    """g(t) = (1 - (1 - alpha t^2)^(2^p)) / t, evaluated as -expm1(2^p log|1 - alpha t^2|) / t
    (log1p for small alpha t^2): the naive power rounds to 1 and zeroes the near-null modes."""
    if iterations == 0:
        return alpha * t
    q = alpha * t * t
    log_abs = torch.where(q < 0.5, torch.log1p(-q.clamp(max=0.5)), torch.log((1 - q).abs()))
    safe_t = torch.where(t != 0, t, torch.ones_like(t))
    return torch.where(t != 0, -torch.expm1(2.0 ** iterations * log_abs) / safe_t, torch.zeros_like(t))


def spectral_derivative(t: torch.Tensor, alpha: float, iterations: int, exact: bool) -> torch.Tensor:
    """A [B, N, N] with Q^T dX_p Q = A * (Q^T P Q) for symmetric P (docs/structured.md):
    a_{k+1} = (2 - t_i x_k(t_i) - t_j x_k(t_j)) a_k - x_k(t_i) x_k(t_j), x_0(t) = alpha t,
    a_0 = alpha (exact) or 0 (X_0 detached)."""
    x = alpha * t
    a = torch.full(t.shape + t.shape[-1:], alpha if exact else 0.0, dtype=t.dtype, device=t.device)
    for _ in range(iterations):
        c = 1 - t * x
        a.mul_(c[:, :, None] + c[:, None, :])
        a.baddbmm_(x[:, :, None], x[:, None, :], alpha=-1)
        x = x * (2 - t * x)
    return a


class SpectralFilter(torch.autograd.Function):
    """u = X_p F = Q g(t) Q^T F from L = Q diag(t) Q^T (dense [B, N, N] from the stencil).

    Inputs F [B, H, W], w [B, K, H, W], d [B, H, W]; returns (u [B, H, W], t [B, N]), the
    eigenvalues for the convergence check (no gradient). Saves Q, t and Q^T F. Backward:
    dF = Q g(t) Q^T du; dL = Q (A * (Q^T du)(Q^T F)^T) Q^T, of which only the stencil
    entries are formed (row dot products of Q K and Q: one N x N product, not two).
    """

    @staticmethod
    def forward(ctx, f, w, d, alpha, iterations, offsets, exact):
        B, H, W = f.shape
        t, q = torch.linalg.eigh(stencil_to_dense(w, d, offsets))
        psi = (q.transpose(1, 2) @ f.reshape(B, -1, 1))[..., 0]
        u = q @ (spectral_filter(t, alpha, iterations) * psi)[..., None]
        ctx.mark_non_differentiable(t)
        ctx.save_for_backward(q, t, psi)
        ctx.args = (alpha, iterations, offsets, exact)
        return u.reshape(B, H, W), t

    @staticmethod
    def backward(ctx, grad_u, _grad_t):
        q, t, psi = ctx.saved_tensors
        alpha, iterations, offsets, exact = ctx.args
        B, H, W = grad_u.shape
        phi = (q.transpose(1, 2) @ grad_u.reshape(B, -1, 1))[..., 0]
        grad_f = (q @ (spectral_filter(t, alpha, iterations) * phi)[..., None]).reshape(B, H, W)
        k = spectral_derivative(t, alpha, iterations, exact)
        k.mul_(phi[:, :, None] * psi[:, None, :])
        qk = torch.bmm(q, k)
        del k
        grad_w, grad_d = product_stencil_entries(qk, q, H, W, offsets)   # of dL = (Q K) Q^T
        return grad_f, grad_w, grad_d, None, None, None, None
