"""Masked spatial-semantic Laplacian L = (D - A) * (lam * E - 1) on an H x W patch grid."""
from __future__ import annotations

import functools

import torch

from ._common import (autocast_to_float32, cdiv, check_finite, check_float_tensor, check_same, compute_dtype,
                      kernel_config, kernel_module, resolve_backend, without_autocast)

__all__ = ["spatial_semantic_laplacian", "grid_laplacian"]


@functools.lru_cache(maxsize=32)
def _grid_laplacian_cached(height: int, width: int, connectivity: int, dtype, device) -> torch.Tensor:
    rows = torch.arange(height * width, device=device) // width
    cols = torch.arange(height * width, device=device) % width
    dr = (rows[:, None] - rows[None, :]).abs()
    dc = (cols[:, None] - cols[None, :]).abs()
    if connectivity == 4:
        adjacency = (dr + dc) == 1
    else:
        adjacency = torch.maximum(dr, dc) == 1
    adjacency = adjacency.to(dtype)
    return torch.diag(adjacency.sum(1)) - adjacency


def grid_laplacian(grid: tuple[int, int], connectivity: int = 4, *, dtype=torch.float32,
                   device=None) -> torch.Tensor:
    """D - A of the H x W grid graph, [N, N], patches row-major. Cached; do not modify."""
    height, width = _check_grid(grid)
    _check_connectivity(connectivity)
    return _grid_laplacian_cached(height, width, connectivity, dtype, torch.device(device or "cpu"))


def _check_grid(grid) -> tuple[int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    return int(grid[0]), int(grid[1])


def _check_connectivity(connectivity) -> None:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")


# ---------------------------------------------------------------- plain PyTorch path
def _laplacian_fwd_torch(e, lam, height, width, connectivity):
    ct = compute_dtype(e.dtype)
    g = _grid_laplacian_cached(height, width, connectivity, ct, e.device)
    return (g * (lam.to(ct)[:, None, None] * e.to(ct) - 1)).to(e.dtype).contiguous()


def _laplacian_bwd_torch(grad_l, e, lam, height, width, connectivity):
    ct = compute_dtype(e.dtype)
    g = _grid_laplacian_cached(height, width, connectivity, ct, e.device)
    gdl = g * grad_l.to(ct)
    return ((gdl * lam.to(ct)[:, None, None]).to(e.dtype).contiguous(),
            (gdl * e.to(ct)).sum((1, 2)).to(lam.dtype))


# ---------------------------------------------------------------- Triton path
def _launch_grid(kern, e):
    cfg, launch = kernel_config(kern, e.dtype)
    B, N, _ = e.shape
    tiles = cdiv(N, cfg["BLOCK"])
    return (tiles, tiles, B), cfg, launch


def _laplacian_fwd_triton(e, lam, height, width, connectivity):
    kern = kernel_module("laplacian")
    B, N, _ = e.shape
    out = torch.empty(B, N, N, device=e.device, dtype=e.dtype)
    if out.numel() == 0:  # an empty batch: no launch with a zero grid dimension
        return out
    grid, cfg, launch = _launch_grid(kern, e)
    kern.laplacian_fwd_kernel[grid](e, lam.contiguous(), out, N, height, width, *e.stride(),
                                    IS_FP64=e.dtype == torch.float64,
                                    EIGHT_NEIGHBOURS=connectivity == 8, **cfg, **launch)
    return out


def _laplacian_bwd_triton(grad_l, e, lam, height, width, connectivity):
    kern = kernel_module("laplacian")
    B, N, _ = e.shape
    grad_e = torch.empty(B, N, N, device=e.device, dtype=e.dtype)
    if grad_e.numel() == 0:
        return grad_e, lam.new_zeros(lam.shape)
    grid, cfg, launch = _launch_grid(kern, e)
    partial = torch.empty(B, grid[0] * grid[1], device=e.device, dtype=compute_dtype(e.dtype))
    kern.laplacian_bwd_kernel[grid](grad_l, e, lam.contiguous(), grad_e, partial, N, height, width,
                                    *grad_l.stride(), *e.stride(),
                                    IS_FP64=e.dtype == torch.float64,
                                    EIGHT_NEIGHBOURS=connectivity == 8, **cfg, **launch)
    return grad_e, partial.sum(1).to(lam.dtype)


# ---------------------------------------------------------------- registered operators
@torch.library.custom_op("scm_ops::spatial_semantic_laplacian", mutates_args=())
def _laplacian_op(e: torch.Tensor, lam: torch.Tensor, height: int, width: int,
                  connectivity: int, backend: str) -> torch.Tensor:
    check_finite("similarity", e)
    check_finite("lam", lam)
    impl = _laplacian_fwd_triton if backend == "triton" else _laplacian_fwd_torch
    with without_autocast(e.device):
        return impl(e, lam, height, width, connectivity)


@_laplacian_op.register_fake
def _(e, lam, height, width, connectivity, backend):
    return e.new_empty(e.shape)  # contiguous, as both backends return it, whatever E's strides


@torch.library.custom_op("scm_ops::spatial_semantic_laplacian_backward", mutates_args=())
def _laplacian_backward_op(grad_l: torch.Tensor, e: torch.Tensor, lam: torch.Tensor, height: int,
                           width: int, connectivity: int, backend: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _laplacian_bwd_triton if backend == "triton" else _laplacian_bwd_torch
    with without_autocast(e.device):
        return impl(grad_l, e, lam, height, width, connectivity)


@_laplacian_backward_op.register_fake
def _(grad_l, e, lam, height, width, connectivity, backend):
    return e.new_empty(e.shape), lam.new_empty(lam.shape)


def _setup_context(ctx, inputs, output):
    e, lam, height, width, connectivity, backend = inputs
    ctx.save_for_backward(e, lam)
    ctx.args = (height, width, connectivity, backend)


def _backward(ctx, grad_l):
    e, lam = ctx.saved_tensors
    grad_e, grad_lam = _laplacian_backward_op(grad_l, e, lam, *ctx.args)
    return grad_e, grad_lam, None, None, None, None


_laplacian_op.register_autograd(_backward, setup_context=_setup_context)


def spatial_semantic_laplacian(similarity: torch.Tensor, grid: tuple[int, int], lam,
                               connectivity: int = 4, *, backend: str | None = None) -> torch.Tensor:
    """L = (D - A) * (lam * E - 1), elementwise, for the H x W patch grid.

    Args:
        similarity: E, [B, N, N] float16, bfloat16, float32 or float64 tensor, N = H * W,
            patches row-major; computed in float32 (float64 for float64). B may be 0.
        grid: (H, W).
        lam: a Python number (kept in the compute precision), a tensor with one element
            (shared by the batch) or a [B] tensor (one value per item), same dtype and
            device as `similarity` (inside a torch.autocast region half and float32 may be
            mixed: both become float32).
        connectivity: 4 or 8 grid neighbours; D - A is the unnormalised grid Laplacian.
        backend: "triton", "torch" or None (SCM_OPS_BACKEND, else by device).

    Returns:
        L: [B, N, N] in E's dtype (float32 for half inputs inside a torch.autocast region,
        docs/maths.md, "Mixed precision"): L[i, i] = deg_i (lam E[i, i] - 1), L[i, j] = 1 - lam E[i, j]
        for grid neighbours, 0 elsewhere (E is only read on that stencil). Differentiable with
        respect to `similarity` and `lam`.
    """
    check_float_tensor("similarity", similarity, 3, "[B, N, N]")
    B, N, N2 = similarity.shape
    height, width = _check_grid(grid)
    _check_connectivity(connectivity)
    if N != N2 or N != height * width:
        raise ValueError(f"similarity must have shape [B, H*W, H*W] = [B, {height * width}, "
                         f"{height * width}] for grid {grid}, got {tuple(similarity.shape)}")
    if not isinstance(lam, torch.Tensor):
        # a number keeps the compute precision: not rounded to a half E's dtype
        (similarity,) = autocast_to_float32(similarity)
        lam = torch.tensor(float(lam), dtype=compute_dtype(similarity.dtype), device=similarity.device)
    else:
        check_float_tensor("lam", lam, (0, 1), "[] or [B]")
        if lam.device == similarity.device:
            similarity, lam = autocast_to_float32(similarity, lam)
        check_same("similarity", similarity, "lam", lam)
    if lam.numel() == 1:
        lam = lam.reshape(1).expand(B)
    elif lam.shape != (B,):
        raise ValueError(f"lam must have one element or shape [B] = [{B}], got {tuple(lam.shape)}")
    return _laplacian_op(similarity, lam, height, width, connectivity,
                         resolve_backend(backend, similarity))
