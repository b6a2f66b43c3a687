"""Reference implementations, written for clarity, not speed: one per operator, used by the
tests as ground truth (in float64) and by the benchmarks as the published formulation.

Each follows docs/maths.md ("One activation diffusion block", "Newton-Schulz") literally with dense matrices and autograd through plain
Python loops. They take the same arguments as the fused operators.
"""
from __future__ import annotations

import torch

__all__ = ["cosine_similarity_ref", "grid_laplacian_ref", "spatial_semantic_laplacian_ref",
           "newton_schulz_inverse_ref"]


def cosine_similarity_ref(x: torch.Tensor) -> torch.Tensor:
    """[B, N, D] -> [B, N, N]; a zero row has cosine 0 with everything."""
    norm = x.norm(dim=-1, keepdim=True)
    xn = torch.where(norm > 0, x / torch.where(norm > 0, norm, 1), 0)
    return xn @ xn.transpose(-1, -2)


def grid_laplacian_ref(height: int, width: int, connectivity: int = 4,
                       dtype=torch.float64, device=None) -> torch.Tensor:
    """D - A of the H x W grid graph, patch n at (n // W, n % W)."""
    n = height * width
    adjacency = torch.zeros(n, n, dtype=dtype, device=device)
    steps = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])
    for r in range(height):
        for c in range(width):
            for dr, dc in steps:
                r2, c2 = r + dr, c + dc
                if 0 <= r2 < height and 0 <= c2 < width:
                    adjacency[r * width + c, r2 * width + c2] = 1
                    adjacency[r2 * width + c2, r * width + c] = 1
    return torch.diag(adjacency.sum(1)) - adjacency


def spatial_semantic_laplacian_ref(similarity, grid, lam, connectivity: int = 4) -> torch.Tensor:
    """L = (D - A) * (lam * E - 1); lam a number, a one-element or a [B] tensor."""
    g = grid_laplacian_ref(*grid, connectivity, similarity.dtype, similarity.device)
    lam = torch.as_tensor(lam, dtype=similarity.dtype, device=similarity.device).reshape(-1, 1, 1)
    return g * (lam * similarity - 1)


def newton_schulz_inverse_ref(L, iterations: int, alpha: float, detach_init: bool = False):
    """X_0 = alpha L^T (no gradient if detach_init), X_{k+1} = X_k (2I - L X_k)."""
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    x = alpha * L.transpose(-1, -2)
    if detach_init:
        x = x.detach()
    for _ in range(iterations):
        x = x @ (2 * eye - L @ x)
    return x


def _div(num, den, strict):
    """num / den; unless strict, 0 where den == 0 (the 0/0 limits SCM meets)."""
    if strict:
        return num / den
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def activation_diffusion_ref(attention, semantic, lams, betas, iterations=(16, 4, 4, 4),
                             alpha: float = 0.002, connectivity: int = 4, detach_init: bool = True,
                             strict_published: bool = False):
    """The published SCM stack (docs/maths.md, "The stack"), dense, with autograd through every loop.

    attention [B, N] or [B, H, W], semantic [B, C, H, W]; lams, betas: one per block
    (a sequence of scalars or a [blocks] tensor). detach_init=True is the published gradient.
    strict_published=True divides 0 by 0 as the published code does (NaN); otherwise those
    places get the limit 0. Returns (attention, semantic) after the stack, same shapes.
    """
    B, C, H, W = semantic.shape
    n = H * W
    g = grid_laplacian_ref(H, W, connectivity, semantic.dtype, semantic.device)
    f = attention.reshape(B, n)
    s = semantic
    for lam, beta, p in zip(lams, betas, iterations):
        v = s.reshape(B, C, n).transpose(1, 2)                    # [B, N, C]
        norm = v.norm(dim=-1, keepdim=True)
        vn = _div(v, norm, strict_published)
        e = vn @ vn.transpose(1, 2)
        L = g * (lam * e - 1)
        m = newton_schulz_inverse_ref(L, p, alpha, detach_init).transpose(1, 2)
        u = (m @ f[..., None])[..., 0]
        t = torch.nn.functional.tanhshrink(_div(u, beta * f.amax(1, keepdim=True), strict_published))
        t = t - t.amin(1, keepdim=True)
        tau = _div(t, t.amax(1, keepdim=True), strict_published)
        f = f + tau
        s = s * (1 + tau.reshape(B, 1, H, W))
    return f.reshape(attention.shape), s
