"""Cosines of grid neighbours only (docs/structured.md, "Neighbour cosines").

L reads the cosine matrix E only at grid-neighbour pairs, so E is never formed: the
cosine of each C-vector of S with its 2 (or 4) forward neighbours is reduced over C in one
pass, O(N C) work and O(N) output. Triton kernels in kernels/structured/neighbour_cosine.py.
"""
from __future__ import annotations

import torch

from .._common import cdiv, kernel_config, kernel_module
from .stencil import grid_masks, shift

__all__ = ["NeighbourCosine", "channel_dot"]

CHANNEL_CHUNK = 32


def channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_c a[:, c] * b[:, c] for [B, C, ...] tensors, in chunks of channels so that no
    [B, C, ...] temporary is formed."""
    out = (a[:, :CHANNEL_CHUNK] * b[:, :CHANNEL_CHUNK]).sum(1)
    for c0 in range(CHANNEL_CHUNK, a.shape[1], CHANNEL_CHUNK):
        out += (a[:, c0:c0 + CHANNEL_CHUNK] * b[:, c0:c0 + CHANNEL_CHUNK]).sum(1)
    return out


def _neighbour_cosine_fwd_torch(s, offsets):
    """On flat cells (s as [B, C, N]): the neighbour n + o_k of cell n is n + m_k with
    m_k = dr W + dc, so each offset is one channel reduction of two contiguous slices;
    pairs that leave the grid (a row end) are zeroed by the grid mask."""
    B, C, H, W = s.shape
    N = H * W
    flat = s.reshape(B, C, N)
    sq = channel_dot(flat, flat)
    rnorm = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
    valid, _ = grid_masks(H, W, 2 * len(offsets), s.dtype, s.device)
    e = s.new_zeros(B, len(offsets), N)
    for k, (dr, dc) in enumerate(offsets):
        m = dr * W + dc
        if m >= N:  # a one-row grid: every pair of this offset leaves the grid
            continue
        e[:, k, :N - m] = channel_dot(flat[..., :N - m], flat[..., m:]) * rnorm[:, :N - m] * rnorm[:, m:]
    return e.reshape(B, -1, H, W) * valid, sq.reshape(B, H, W)


def _neighbour_cosine_fwd_triton(s, offsets):
    kern = kernel_module("structured.neighbour_cosine")
    cfg, launch = kernel_config(kern, s.dtype)
    B, C, H, W = s.shape
    e = s.new_empty(B, len(offsets), H, W)
    sq = s.new_empty(B, H, W)
    kern.neighbour_cosine_fwd_kernel[(cdiv(H * W, cfg["BLOCK_P"]), B)](
        s, e, sq, C, H, W, EIGHT_NEIGHBOURS=len(offsets) == 4, IS_FP64=s.dtype == torch.float64,
        BLOCK_C=cfg["BLOCK_C"], BLOCK_P=cfg["BLOCK_P"], **launch)
    return e, sq


def _neighbour_cosine_bwd_torch(grad_s, s, coef, radial, offsets):
    """Flat cells as in the forward; coef is zero where n + o_k leaves the grid."""
    B, C, H, W = s.shape
    N = H * W
    grad_s = grad_s.contiguous()
    flat, out = s.reshape(B, C, N), grad_s.view(B, C, N)
    coef = coef.reshape(B, -1, N)
    for k, (dr, dc) in enumerate(offsets):
        m = dr * W + dc
        if m >= N:  # a one-row grid: every pair of this offset leaves the grid
            continue
        ck = coef[:, k, None, :N - m]
        out[..., :N - m].addcmul_(ck, flat[..., m:])
        out[..., m:].addcmul_(ck, flat[..., :N - m])
    return grad_s.addcmul_(s, radial[:, None], value=-1)


def _neighbour_cosine_bwd_triton(grad_s, s, coef, radial, offsets):
    kern = kernel_module("structured.neighbour_cosine")
    cfg, launch = kernel_config(kern, s.dtype)
    B, C, H, W = s.shape
    grad_s = grad_s.contiguous()
    grid = (cdiv(H * W, cfg["BLOCK_P"]), cdiv(C, cfg["BLOCK_C"]), B)
    kern.neighbour_cosine_bwd_kernel[grid](
        s, coef.contiguous(), radial.contiguous(), grad_s, C, H, W, EIGHT_NEIGHBOURS=len(offsets) == 4,
        IS_FP64=s.dtype == torch.float64, BLOCK_C=cfg["BLOCK_C"], BLOCK_P=cfg["BLOCK_P"], **launch)
    return grad_s


class NeighbourCosine(torch.autograd.Function):
    """S [B, C, H, W] -> (e [B, K, H, W], e_self [B, H, W]).

    e[:, k, r, c] is the cosine of the C-vectors at (r, c) and (r, c) + o_k (0 off the grid);
    e_self is the cosine of each vector with itself: 1, or 0 for a zero vector (the limit
    the published 0/0 misses). e_self is constant and carries no gradient. Saves S (which
    the residual update keeps anyway) and the inverse norms [B, H, W]. With
    e = r_n r_m <s_n, s_m>, the gradient is
        dS_n = sum_pairs g r_n r_m s_m - r_n^2 s_n sum_pairs g e,
    added into the gradient the GradSlot hands over, if any (see GradSlot). `backend` is
    "triton" (kernels/structured/neighbour_cosine.py; S is made contiguous) or "torch".
    """

    @staticmethod
    def forward(ctx, s, offsets, backend="torch", slot=None):
        if backend == "triton":
            s = s.contiguous()
        e, sq = (_neighbour_cosine_fwd_triton if backend == "triton" else _neighbour_cosine_fwd_torch)(s, offsets)
        rnorm = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
        e_self = (sq > 0).to(s.dtype)
        ctx.mark_non_differentiable(e_self)
        ctx.save_for_backward(s, rnorm, e)
        ctx.offsets, ctx.backend, ctx.slot = offsets, backend, slot
        return e, e_self

    @staticmethod
    def backward(ctx, grad_e, _grad_self):
        s, rnorm, e = ctx.saved_tensors
        coef = grad_e * rnorm[:, None] * torch.stack([shift(rnorm, dr, dc) for dr, dc in ctx.offsets], 1)
        ge = grad_e * e
        radial = ge.sum(1) + sum(shift(ge[:, k], -dr, -dc) for k, (dr, dc) in enumerate(ctx.offsets))
        radial = radial * rnorm * rnorm
        grad_s = ctx.slot.take_scaled_grad() if ctx.slot is not None else None
        if grad_s is None:
            grad_s = torch.zeros_like(s)
        bwd = _neighbour_cosine_bwd_triton if ctx.backend == "triton" else _neighbour_cosine_bwd_torch
        return bwd(grad_s, s, coef, radial, ctx.offsets), None, None, None
