"""Pairwise cosine similarity of patch vectors: E[b, i, j] = <x_i, x_j> / (|x_i| |x_j|)."""
from __future__ import annotations

import torch

from ._common import (autocast_to_float32, cdiv, check_finite, check_float_tensor, compute_dtype, kernel_config,
                      kernel_module, resolve_backend, without_autocast)

__all__ = ["cosine_similarity"]


# ---------------------------------------------------------------- plain PyTorch path
def _cosine_fwd_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.to(compute_dtype(x.dtype))
    sq = (xf * xf).sum(-1)
    rnorm = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
    xn = xf * rnorm[..., None]
    return (xn @ xn.transpose(1, 2)).to(x.dtype).contiguous(), rnorm


def _cosine_bwd_torch(grad_e, e, x, rnorm):
    ct = rnorm.dtype
    g = grad_e.to(ct) + grad_e.to(ct).transpose(1, 2)
    xn = x.to(ct) * rnorm[..., None]
    s = (g * e.to(ct)).sum(-1, keepdim=True)
    return (rnorm[..., None] * (g @ xn - xn * s)).to(x.dtype).contiguous()


# ---------------------------------------------------------------- Triton path
def _cosine_fwd_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kern = kernel_module("cosine")
    B, N, D = x.shape
    e = torch.empty(B, N, N, device=x.device, dtype=x.dtype)
    rnorm = torch.empty(B, N, device=x.device, dtype=compute_dtype(x.dtype))
    if e.numel() == 0:
        return e, rnorm
    cfg, launch = kernel_config(kern, x.dtype, "cosine_fwd_kernel")
    grid = (cdiv(N, cfg["BLOCK_N"]), cdiv(N, cfg["BLOCK_N"]), B)
    kern.cosine_fwd_kernel[grid](x, e, rnorm, N, D, *x.stride(), *e.stride(),
                                 IS_FP64=x.dtype == torch.float64, **cfg, **launch)
    return e, rnorm


def _cosine_bwd_triton(grad_e, e, x, rnorm):
    kern = kernel_module("cosine")
    B, N, D = x.shape
    grad_x = torch.empty(B, N, D, device=x.device, dtype=x.dtype)
    if grad_x.numel() == 0:
        return grad_x
    cfg, launch = kernel_config(kern, x.dtype, "cosine_bwd_kernel")
    grid = (cdiv(N, cfg["BLOCK_N"]), cdiv(D, cfg["BLOCK_D"]), B)
    kern.cosine_bwd_kernel[grid](grad_e, e, x, rnorm, grad_x, N, D,
                                 *grad_e.stride(), *e.stride(), *x.stride(),
                                 IS_FP64=x.dtype == torch.float64, **cfg, **launch)
    return grad_x


# ---------------------------------------------------------------- registered operators
@torch.library.custom_op("scm_ops::cosine_similarity", mutates_args=())
def _cosine_similarity_op(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_finite("x", x)
    with without_autocast(x.device):
        return _cosine_fwd_triton(x) if backend == "triton" else _cosine_fwd_torch(x)


@_cosine_similarity_op.register_fake
def _(x, backend):
    B, N, _ = x.shape
    return x.new_empty(B, N, N), x.new_empty(B, N, dtype=compute_dtype(x.dtype))


@torch.library.custom_op("scm_ops::cosine_similarity_backward", mutates_args=())
def _cosine_similarity_backward_op(grad_e: torch.Tensor, e: torch.Tensor, x: torch.Tensor,
                                   rnorm: torch.Tensor, backend: str) -> torch.Tensor:
    with without_autocast(x.device):
        if backend == "triton":
            return _cosine_bwd_triton(grad_e, e, x, rnorm)
        return _cosine_bwd_torch(grad_e, e, x, rnorm)


@_cosine_similarity_backward_op.register_fake
def _(grad_e, e, x, rnorm, backend):
    return x.new_empty(x.shape)  # contiguous, as both backends return it, whatever x's strides


def _setup_context(ctx, inputs, output):
    x, backend = inputs
    e, rnorm = output
    ctx.mark_non_differentiable(rnorm)
    ctx.save_for_backward(x, e, rnorm)
    ctx.backend = backend


def _backward(ctx, grad_e, _grad_rnorm):
    x, e, rnorm = ctx.saved_tensors
    return _cosine_similarity_backward_op(grad_e, e, x, rnorm, ctx.backend), None


_cosine_similarity_op.register_autograd(_backward, setup_context=_setup_context)


def cosine_similarity(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Cosine similarity of every pair of rows of each batch item.

    Args:
        x: [B, N, D] float16, bfloat16, float32 or float64; computed in float32 (float64
            for float64). B may be 0. The Triton interpreter (TRITON_INTERPRET=1) has no
            bfloat16: there bfloat16 needs the "torch" backend.
        backend: "triton", "torch" or None (SCM_OPS_BACKEND, else by device).

    Returns:
        E: [B, N, N], E[b, i, j] = <x_i, x_j> / (|x_i| |x_j|), in x's dtype, or float32 for
        a half x inside a torch.autocast region (docs/maths.md, "Mixed precision"). A zero
        row has cosine 0 with every row, itself included (the limit the published code
        leaves as 0/0 = NaN), and receives a zero gradient.
    """
    check_float_tensor("x", x, 3, "[B, N, D]")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x must have N >= 1 rows of D >= 1 features, got shape {tuple(x.shape)}")
    (x,) = autocast_to_float32(x)
    return _cosine_similarity_op(x, resolve_backend(backend, x))[0]
