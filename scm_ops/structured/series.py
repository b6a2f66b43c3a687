"""Blocks with few iterations, matrix-free (docs/structured.md, "Matrix-free series").

X_p F equals 2^p steps of x <- x + alpha L (F - L x) from x = 0: for p = 4, 16 steps of
two stencil products, no dense matrix. Triton kernels (one program per image) in
kernels/structured/series.py.
"""
from __future__ import annotations

import torch

from . import cpu
from .stencil import (OFFSETS, FlatStencil, PaddedRows, StencilReader, flat_launch, grid_masks, program_backend,
                      program_max_cells)

__all__ = ["StencilSeries", "series_max_cells", "stencil_series"]


def _series_fwd_torch(f, w, d, alpha, steps, offsets, rows=2):
    """The steps on flat vectors (FlatStencil). Keeps, per step, q_j = (-x_j, alpha r_j)
    as [steps, rows, B N], the first `rows` of the two (the published gradient needs -x_j
    only): with these signs and scale x_{j+1} = x_j + L (alpha r_j) and the backward's
    stencil entries are plain sums of products (see _series_bwd_torch).

    A step is two stencil products and one copy into q: the iterates live in two padded
    slots (-x, alpha r) (PaddedRows) that take turns, their shifted views built once."""
    B, H, W = f.shape
    cells = B * H * W
    L = FlatStencil(w, d, offsets)
    neg_alpha_l = FlatStencil(w, d, offsets, -alpha)
    alpha_f = alpha * f.reshape(-1)
    q = f.new_empty(steps, rows, cells)
    work = PaddedRows(4, cells, L.reach, f)                 # slot j: rows 2j (-x), 2j + 1 (alpha r); x_0 = 0
    x = [work.row(2 * j) for j in range(2)]
    r = [work.row(2 * j + 1) for j in range(2)]
    pair = [work.rows(2 * j, rows) for j in range(2)]
    of_x = [neg_alpha_l.terms(work, 2 * j) for j in range(2)]
    of_r = [L.terms(work, 2 * j + 1) for j in range(2)]
    for j, kept in enumerate(q.unbind(0)):
        now, after = j % 2, (j + 1) % 2
        neg_alpha_l.subtract_product(of_x[now], r[now], start=alpha_f)   # alpha r_j = alpha (F - L x_j)
        kept.copy_(pair[now])
        L.subtract_product(of_r[now], x[after], start=x[now])           # -x_{j+1} = -x_j - L alpha r_j
    return -x[steps % 2].reshape(B, H, W), q


def _series_bwd_torch(grad_u, w, d, q, alpha, offsets, exact):
    """From a = du, for j = steps-1 .. 0: b_j = alpha L a_{j+1}, a_j = a_{j+1} - L b_j;
    dF = sum_j b_j and the stencil entries of sum_j b_j (-x_j)^T [+ a_{j+1} (alpha r_j)^T],
    read as each pair is made (StencilReader).

    A step is two stencil products, one copy of q_j into padded rows, the reading and the
    sum; every view is built once, before the loop."""
    B, H, W = grad_u.shape
    cells = B * H * W
    L = FlatStencil(w, d, offsets)
    alpha_l = FlatStencil(w, d, offsets, alpha)
    rows = 2 if exact else 1
    work = PaddedRows(4, cells, L.reach, grad_u)            # rows (b_j, a_{j+1}), then q_j[:rows]
    b, a = work.row(0), work.row(1)
    a.copy_(grad_u.reshape(-1))
    of_a, of_b = alpha_l.terms(work, 1), L.terms(work, 0)
    basis = work.rows(2, rows)
    reader = StencilReader(rows, cells, offsets, W, grad_u)
    read = reader.bind(work, 0, work, 2, rows)
    grad_f = torch.zeros_like(b)
    for kept in reversed(q[:, :rows].unbind(0)):
        alpha_l.matmul_into(of_a, b)                        # b_j = alpha L a_{j+1}
        basis.copy_(kept)
        reader.add(read)
        grad_f += b
        L.subtract_product(of_b, a)                         # a_j = a_{j+1} - L b_j
    valid, _ = grid_masks(H, W, 2 * len(offsets), w.dtype, w.device)
    grad_w, grad_d = reader.result((B, H, W), valid)
    return grad_f.reshape(B, H, W), grad_w, grad_d


def _series_fwd(f, w, d, alpha, steps, offsets, rows):
    """The PyTorch backend's forward: on the CPU in C where the CPU kernels build
    (scm_ops/structured/cpu.py; float64 arithmetic, results and the kept q_j in the input
    dtype), else the PyTorch loop in the input dtype."""
    lib = cpu.library() if f.device.type == "cpu" and f.dtype in (torch.float32, torch.float64) else None
    if lib is None:
        return _series_fwd_torch(f, w, d, alpha, steps, offsets, rows)
    return cpu.series_forward(lib, f, w, d, offsets, alpha, steps, rows)


def _series_bwd(grad_u, w, d, q, alpha, offsets, exact):
    """The PyTorch backend's backward (see _series_fwd)."""
    lib = cpu.library() if grad_u.device.type == "cpu" and grad_u.dtype in (torch.float32, torch.float64) else None
    if lib is None:
        return _series_bwd_torch(grad_u, w, d, q, alpha, offsets, exact)
    return cpu.series_backward(lib, grad_u, w, d, q, offsets, alpha, 2 if exact else 1)


def series_max_cells(connectivity: int = 4) -> int:
    """The largest grid (cells) the Triton series holds in one program for 4 or 8
    neighbours (1024 and 512); larger grids take the PyTorch steps."""
    return program_max_cells("structured.series", connectivity)


def _series_backend(backend, f, offsets):
    return program_backend(backend, f.shape[1], f.shape[2], offsets, "structured.series")


def _series_launch(w, offsets, dtype, direction):
    """(kernel, grid (B,), BLOCK_N, launch options, weight planes, scratch)."""
    kernel, block, launch, planes, scratch = flat_launch("structured.series", f"stencil_series_{direction}_kernel",
                                                         w, offsets, dtype)
    return kernel, (w.shape[0],), block, launch, planes, scratch


def _series_fwd_triton(f, w, d, alpha, steps, offsets):
    kernel, grid, block, launch, planes, scratch = _series_launch(w, offsets, f.dtype, "fwd")
    B, H, W = f.shape
    u = torch.empty_like(f)
    xs, rs = f.new_empty(steps, B, H, W), f.new_empty(steps, B, H, W)
    kernel[grid](f, planes, d, u, xs, rs, scratch, f.new_full((1,), alpha), B, H, W, steps,
                 EIGHT_NEIGHBOURS=len(offsets) == 4, BLOCK_N=block, **launch)
    return u, xs, rs


def _series_bwd_triton(grad_u, w, d, xs, rs, alpha, offsets, exact):
    kernel, grid, block, launch, planes, scratch = _series_launch(w, offsets, grad_u.dtype, "bwd")
    B, H, W = grad_u.shape
    grad_f, grad_d = torch.empty_like(grad_u), torch.empty_like(grad_u)
    grad_w = torch.empty_like(w)
    kernel[grid](grad_u, planes, d, xs, rs, grad_f, grad_w, grad_d, scratch, grad_u.new_full((1,), alpha),
                 B, H, W, xs.shape[0], EXACT=exact, EIGHT_NEIGHBOURS=len(offsets) == 4, BLOCK_N=block, **launch)
    valid, _ = grid_masks(H, W, 2 * len(offsets), w.dtype, w.device)
    return grad_f, grad_w * valid, grad_d       # the kernel leaves pairs across a row end to zero


class StencilSeries(torch.autograd.Function):
    """u = X_p F with X_p the p-step Newton-Schulz iterate of the stencil L, matrix-free:
    x_0 = 0, x_{j+1} = x_j + alpha L (F - L x_j), 2^p steps (docs/structured.md).

    Inputs F [B, H, W], w [B, K, H, W], d [B, H, W]; returns u [B, H, W]. Saves the 2^p
    iterates and residuals (2 x [2^p, B, H, W]; the PyTorch path keeps them as -x_j and
    alpha r_j, and for the published gradient, which does not read r_j, -x_j only). Backward, with a_J = du,
    b_j = alpha L a_{j+1}, a_j = a_{j+1} - L b_j:
        dF = sum_j b_j,
        dL = sum_j alpha a_{j+1} r_j^T - b_j x_j^T   (exact: the outer alpha L of every
             step is differentiated) or  -sum_j b_j x_j^T  (X_0 detached: it is constant),
    read off on the stencil only. `backend` "triton" runs all steps of an image in one
    program (kernels/structured/series.py; grids up to series_max_cells(connectivity) cells:
    1024 with 4 neighbours, 512 with 8), "torch" runs them as
    stencil products in PyTorch.
    """

    @staticmethod
    def forward(ctx, f, w, d, alpha, iterations, offsets, exact, backend="torch"):
        backend = _series_backend(backend, f, offsets)
        if backend == "triton":
            f, w, d = f.contiguous(), w.contiguous(), d.contiguous()
            u, xs, rs = _series_fwd_triton(f, w, d, alpha, 2 ** iterations, offsets)
            ctx.save_for_backward(w, d, xs, rs)
        else:
            u, q = _series_fwd(f, w, d, alpha, 2 ** iterations, offsets, 2 if exact else 1)
            ctx.save_for_backward(w, d, q)
        ctx.args = (alpha, offsets, exact, backend)
        return u

    @staticmethod
    def backward(ctx, grad_u):
        alpha, offsets, exact, backend = ctx.args
        if backend == "triton":
            w, d, xs, rs = ctx.saved_tensors
            grads = _series_bwd_triton(grad_u.contiguous(), w, d, xs, rs, alpha, offsets, exact)
        else:
            w, d, q = ctx.saved_tensors
            grads = _series_bwd(grad_u, w, d, q, alpha, offsets, exact)
        return (*grads, None, None, None, None, None)


# -- the same as custom operators, for torch.compile --------------------------------------
# Traced, the 2^p steps of three blocks (forward and backward) unroll into a graph of
# thousands of small operations that Inductor compiles for many minutes; as opaque
# operators they stay two nodes a block. What the forward keeps for backward is an output
# of fixed shape [2^p, 2, B N]: the PyTorch path's (-x_j, alpha r_j), or the Triton
# kernel's (x_j, r_j), stacked (one more copy of them under torch.compile).

@torch.library.custom_op("scm_ops::stencil_series", mutates_args=())
def _stencil_series_op(f: torch.Tensor, w: torch.Tensor, d: torch.Tensor, alpha: float, iterations: int,
                       connectivity: int, exact: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = OFFSETS[connectivity]
    steps = 2 ** iterations
    if _series_backend(backend, f, offsets) == "triton":
        u, xs, rs = _series_fwd_triton(f.contiguous(), w.contiguous(), d.contiguous(), alpha, steps, offsets)
        return u, torch.stack([xs, rs], 1).reshape(steps, 2, -1)
    u, saved = _series_fwd(f, w, d, alpha, steps, offsets, 2)
    return u.contiguous(), saved


@_stencil_series_op.register_fake
def _(f, w, d, alpha, iterations, connectivity, exact, backend):
    return f.new_empty(f.shape), f.new_empty(2 ** iterations, 2, f.numel())


@torch.library.custom_op("scm_ops::stencil_series_backward", mutates_args=())
def _stencil_series_backward_op(grad_u: torch.Tensor, f: torch.Tensor, w: torch.Tensor, d: torch.Tensor,
                                saved: torch.Tensor, alpha: float, connectivity: int, exact: bool,
                                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    offsets = OFFSETS[connectivity]
    if _series_backend(backend, f, offsets) == "triton":
        steps, (B, H, W) = saved.shape[0], f.shape
        xs, rs = (saved[:, i].reshape(steps, B, H, W).contiguous() for i in range(2))
        grads = _series_bwd_triton(grad_u.contiguous(), w.contiguous(), d.contiguous(), xs, rs, alpha, offsets, exact)
    else:
        grads = _series_bwd(grad_u, w, d, saved, alpha, offsets, exact)
    return tuple(g.contiguous() for g in grads)


@_stencil_series_backward_op.register_fake
def _(grad_u, f, w, d, saved, alpha, connectivity, exact, backend):
    return f.new_empty(f.shape), w.new_empty(w.shape), d.new_empty(d.shape)   # contiguous, as the real ones


def _setup_context(ctx, inputs, output):
    f, w, d, alpha, iterations, connectivity, exact, backend = inputs
    ctx.save_for_backward(f, w, d, output[1])
    ctx.args = (alpha, connectivity, exact, backend)


def _backward(ctx, grad_u, _grad_saved):
    f, w, d, saved = ctx.saved_tensors
    grads = _stencil_series_backward_op(grad_u, f, w, d, saved, *ctx.args)
    return (*grads, None, None, None, None, None)


_stencil_series_op.register_autograd(_backward, setup_context=_setup_context)


def stencil_series(f: torch.Tensor, w: torch.Tensor, d: torch.Tensor, alpha: float, iterations: int, offsets,
                   exact: bool, backend: str = "torch") -> torch.Tensor:
    """u = X_p F by the matrix-free series (see StencilSeries): the autograd Function in
    eager mode, the custom operator under torch.compile."""
    if torch.compiler.is_compiling():
        return _stencil_series_op(f, w, d, float(alpha), int(iterations), 2 * len(offsets), bool(exact), backend)[0]
    return StencilSeries.apply(f, w, d, alpha, iterations, offsets, exact, backend)
