"""Blocks with few iterations, matrix-free (docs/structured.md, "Matrix-free series").

X_p F equals 2^p steps of x <- x + alpha L (F - L x) from x = 0: for p = 4, 16 steps of
two stencil products, no dense matrix. Triton kernels (one program per image) in
kernels/structured/series.py.
"""
from __future__ import annotations

import torch

from .._common import kernel_config, kernel_module
from .stencil import Stencil, stencil_pair_sum

__all__ = ["StencilSeries", "series_max_cells"]


def _series_fwd_torch(f, w, d, alpha, steps, offsets):
    L = Stencil(w, d, offsets)
    x = torch.zeros_like(f)
    xs, rs = [], []
    for _ in range(steps):
        r = f - L @ x
        xs.append(x)
        rs.append(r)
        x = x + alpha * (L @ r)
    return x, torch.stack(xs), torch.stack(rs)


def _series_bwd_torch(grad_u, w, d, xs, rs, alpha, offsets, exact):
    L = Stencil(w, d, offsets)
    a = grad_u
    a_next, bs = [], []
    for _ in range(xs.shape[0]):
        b = alpha * (L @ a)
        a_next.append(a)
        bs.append(b)
        a = a - L @ b
    a_next = torch.stack(a_next[::-1])
    bs = torch.stack(bs[::-1])
    grad_f = bs.sum(0)
    grad_w = torch.stack([-stencil_pair_sum(bs, xs, dr, dc) for dr, dc in offsets], 1)
    grad_d = -(bs * xs).sum(0)
    if exact:
        grad_w = grad_w + alpha * torch.stack([stencil_pair_sum(a_next, rs, dr, dc) for dr, dc in offsets], 1)
        grad_d = grad_d + alpha * (a_next * rs).sum(0)
    return grad_f, grad_w, grad_d


def series_max_cells() -> int:
    """The largest grid (cells) the Triton series holds in one program; larger grids take
    the PyTorch steps."""
    return max(kernel_module("structured.series").BLOCK_N_CHOICES)


def _series_launch(f):
    """(kernel module, grid, BLOCK_N, launch options, scratch [B, BLOCK_N]) for one image a
    program; BLOCK_N is the smallest of the kernel's compiled block sizes that holds the grid."""
    kern = kernel_module("structured.series")
    _, launch = kernel_config(kern, f.dtype)
    block = min(b for b in kern.BLOCK_N_CHOICES if b >= f.shape[1] * f.shape[2])
    return kern, (f.shape[0],), block, launch, f.new_empty(f.shape[0], block)


def _series_fwd_triton(f, w, d, alpha, steps, offsets):
    kern, grid, block, launch, scratch = _series_launch(f)
    B, H, W = f.shape
    u = torch.empty_like(f)
    xs, rs = f.new_empty(steps, B, H, W), f.new_empty(steps, B, H, W)
    kern.stencil_series_fwd_kernel[grid](f, w, d, u, xs, rs, scratch, f.new_full((1,), alpha), B, H, W, steps,
                                         EIGHT_NEIGHBOURS=len(offsets) == 4, BLOCK_N=block, **launch)
    return u, xs, rs


def _series_bwd_triton(grad_u, w, d, xs, rs, alpha, offsets, exact):
    kern, grid, block, launch, scratch = _series_launch(grad_u)
    B, H, W = grad_u.shape
    grad_f, grad_d = torch.empty_like(grad_u), torch.empty_like(grad_u)
    grad_w = torch.empty_like(w)
    kern.stencil_series_bwd_kernel[grid](grad_u, w, d, xs, rs, grad_f, grad_w, grad_d, scratch,
                                         grad_u.new_full((1,), alpha),
                                         B, H, W, xs.shape[0], EXACT=exact,
                                         EIGHT_NEIGHBOURS=len(offsets) == 4, BLOCK_N=block, **launch)
    return grad_f, grad_w, grad_d


class StencilSeries(torch.autograd.Function):
    """u = X_p F with X_p the p-step Newton-Schulz iterate of the stencil L, matrix-free:
    x_0 = 0, x_{j+1} = x_j + alpha L (F - L x_j), 2^p steps (docs/structured.md).

    Inputs F [B, H, W], w [B, K, H, W], d [B, H, W]; returns u [B, H, W]. Saves the 2^p
    iterates and residuals ([2^p, B, H, W] each). Backward, with a_J = du,
    b_j = alpha L a_{j+1}, a_j = a_{j+1} - L b_j:
        dF = sum_j b_j,
        dL = sum_j alpha a_{j+1} r_j^T - b_j x_j^T   (exact: the outer alpha L of every
             step is differentiated) or  -sum_j b_j x_j^T  (X_0 detached: it is constant),
    read off on the stencil only. `backend` "triton" runs all steps of an image in one
    program (kernels/structured/series.py; grids up to series_max_cells() cells), "torch" runs them as
    stencil products in PyTorch.
    """

    @staticmethod
    def forward(ctx, f, w, d, alpha, iterations, offsets, exact, backend="torch"):
        if backend == "triton" and f.shape[1] * f.shape[2] > series_max_cells():
            backend = "torch"
        if backend == "triton":
            f, w, d = f.contiguous(), w.contiguous(), d.contiguous()
        fwd = _series_fwd_triton if backend == "triton" else _series_fwd_torch
        u, xs, rs = fwd(f, w, d, alpha, 2 ** iterations, offsets)
        ctx.save_for_backward(w, d, xs, rs)
        ctx.args = (alpha, offsets, exact, backend)
        return u

    @staticmethod
    def backward(ctx, grad_u):
        w, d, xs, rs = ctx.saved_tensors
        alpha, offsets, exact, backend = ctx.args
        if backend == "triton":
            grads = _series_bwd_triton(grad_u.contiguous(), w, d, xs, rs, alpha, offsets, exact)
        else:
            grads = _series_bwd_torch(grad_u, w, d, xs, rs, alpha, offsets, exact)
        return (*grads, None, None, None, None, None)
