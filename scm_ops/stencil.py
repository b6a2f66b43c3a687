"""The structured fast path of activation diffusion (SPEC section 4), plain PyTorch.

For the symmetric L an ADB builds, L is a stencil on the H x W grid:

    (L x)[n] = d[n] x[n] + sum_k ( w_k[n] x[n + o_k] + w_k[n - o_k] x[n - o_k] )

with one weight plane w_k [B, H, W] per neighbour offset o_k (2 for 4-neighbour grids, 4
for 8-neighbour grids; w_k[n] = L[n, n + o_k], zero where n + o_k leaves the grid) and the
diagonal d [B, H, W]. Three autograd Functions, each with its own backward:

- NeighbourCosine: the cosines of grid neighbours only, from S [B, C, H, W]; no N x N matrix.
- StencilSeries: u = X_p F matrix-free, as 2^p steps of x <- x + alpha L (F - L x).
- SpectralFilter: u = Q g(t) Q^T F from one eigendecomposition L = Q diag(t) Q^T, with
  g(t) = (1 - (1 - alpha t^2)^(2^p)) / t and the closed-form derivative of SPEC section 4.

Both Newton-Schulz gradient semantics are supported: exact (X_0 = alpha L differentiated)
and the published one (X_0 carries no gradient).
"""
from __future__ import annotations

import functools

import torch

OFFSETS = {4: ((0, 1), (1, 0)), 8: ((0, 1), (1, 0), (1, 1), (1, -1))}


def _region(height: int, width: int, dr: int, dc: int):
    """Slices (rows, cols) of the cells n whose neighbour n + (dr, dc) is on the grid, and of
    those neighbours."""
    r0, r1 = max(0, -dr), min(height, height - dr)
    c0, c1 = max(0, -dc), min(width, width - dc)
    return (slice(r0, r1), slice(c0, c1)), (slice(r0 + dr, r1 + dr), slice(c0 + dc, c1 + dc))


def shift(x: torch.Tensor, dr: int, dc: int) -> torch.Tensor:
    """y[..., r, c] = x[..., r + dr, c + dc], zero where that leaves the grid."""
    here, there = _region(*x.shape[-2:], dr, dc)
    y = torch.zeros_like(x)
    y[..., here[0], here[1]] = x[..., there[0], there[1]]
    return y


@functools.lru_cache(maxsize=32)
def _grid_masks(height: int, width: int, connectivity: int, dtype, device):
    """(valid [K, H, W]: neighbour n + o_k exists, degree [H, W])."""
    ones = torch.ones(height, width, dtype=dtype, device=device)
    valid = torch.stack([shift(ones, dr, dc) for dr, dc in OFFSETS[connectivity]])
    degree = valid.sum(0) + torch.stack([shift(v, -dr, -dc) for v, (dr, dc)
                                         in zip(valid, OFFSETS[connectivity])]).sum(0)
    return valid, degree


def grid_masks(height, width, connectivity, dtype, device):
    return _grid_masks(height, width, connectivity, dtype, torch.device(device))


class Stencil:
    """A symmetric stencil operator L on an H x W grid, for repeated products L x.

    Built from w [B, K, H, W] (w_k[n] = L[n, n + o_k]) and d [B, H, W]. A product is the
    diagonal term plus, per offset, two in-place multiply-adds on the sub-grids of cells
    whose neighbour exists (slices, no padding or stacking: the cheapest form on a CPU).
    """

    def __init__(self, w: torch.Tensor, d: torch.Tensor, offsets):
        H, W = d.shape[-2:]
        self.d = d
        self.terms = []
        for k, (dr, dc) in enumerate(offsets):
            here, there = _region(H, W, dr, dc)
            self.terms.append((here, there, w[:, k, here[0], here[1]].contiguous()))

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """L x for x [B, H, W]."""
        y = self.d * x
        for here, there, wk in self.terms:
            y[:, here[0], here[1]].addcmul_(wk, x[:, there[0], there[1]])
            y[:, there[0], there[1]].addcmul_(wk, x[:, here[0], here[1]])
        return y

    def abs_row_sums(self) -> torch.Tensor:
        """sum_j |L[n, j]| per cell, [B, H, W] (Gershgorin radii plus |diagonal|)."""
        y = self.d.abs()
        for here, there, wk in self.terms:
            y[:, here[0], here[1]] += wk.abs()
            y[:, there[0], there[1]] += wk.abs()
        return y


def stencil_pair_sum(p: torch.Tensor, q: torch.Tensor, dr: int, dc: int) -> torch.Tensor:
    """For G = sum_j p_j q_j^T (p, q [J, B, H, W]): G[n, n + o] + G[n + o, n], [B, H, W]."""
    return (p * shift(q, dr, dc) + shift(p, dr, dc) * q).sum(0)


def _neighbour_pairs(height: int, width: int, offsets, device):
    """Per offset k: (k, region of cells n with a neighbour n + o_k, flat indices of n, of n + o_k)."""
    idx = torch.arange(height * width, device=device).reshape(height, width)
    for k, (dr, dc) in enumerate(offsets):
        here, there = _region(height, width, dr, dc)
        yield k, here, idx[here].reshape(-1), idx[there].reshape(-1)


def stencil_to_dense(w: torch.Tensor, d: torch.Tensor, offsets) -> torch.Tensor:
    """The dense symmetric [B, N, N] matrix of a stencil."""
    B, _, H, W = w.shape
    dense = torch.diag_embed(d.reshape(B, H * W))
    for k, here, rows, cols in _neighbour_pairs(H, W, offsets, w.device):
        vals = w[:, k, here[0], here[1]].reshape(B, -1)
        dense[:, rows, cols] = vals
        dense[:, cols, rows] = vals
    return dense


def dense_stencil_entries(g: torch.Tensor, height: int, width: int, offsets):
    """From a dense [B, N, N] G: (G[n, n + o_k] + G[n + o_k, n] as [B, K, H, W], diag [B, H, W])."""
    B = g.shape[0]
    pairs = g.new_zeros(B, len(offsets), height, width)
    for k, here, rows, cols in _neighbour_pairs(height, width, offsets, g.device):
        region = pairs[:, k, here[0], here[1]]
        region.copy_((g[:, rows, cols] + g[:, cols, rows]).reshape(region.shape))
    return pairs, g.diagonal(dim1=1, dim2=2).reshape(B, height, width)


# ---------------------------------------------------------------- neighbour cosines
CHANNEL_CHUNK = 32


def channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_c a[:, c] * b[:, c] for [B, C, h, w] tensors, in chunks of channels so that no
    [B, C, h, w] temporary is formed."""
    out = (a[:, :CHANNEL_CHUNK] * b[:, :CHANNEL_CHUNK]).sum(1)
    for c0 in range(CHANNEL_CHUNK, a.shape[1], CHANNEL_CHUNK):
        out += (a[:, c0:c0 + CHANNEL_CHUNK] * b[:, c0:c0 + CHANNEL_CHUNK]).sum(1)
    return out


class ScalePatches(torch.autograd.Function):
    """S [B, C, H, W] * scale [B, H, W] (broadcast over C), whose backward reduces over C
    in chunks instead of forming grad * S."""

    @staticmethod
    def forward(ctx, s, scale):
        ctx.save_for_backward(s, scale)
        return s * scale[:, None]

    @staticmethod
    def backward(ctx, grad):
        s, scale = ctx.saved_tensors
        grad_s = grad * scale[:, None] if ctx.needs_input_grad[0] else None
        grad_scale = channel_dot(grad, s) if ctx.needs_input_grad[1] else None
        return grad_s, grad_scale


class NeighbourCosine(torch.autograd.Function):
    """S [B, C, H, W] -> (e [B, K, H, W], e_self [B, H, W]).

    e[:, k, r, c] is the cosine of the C-vectors at (r, c) and (r, c) + o_k (0 off the grid);
    e_self is the cosine of each vector with itself: 1, or 0 for a zero vector (the limit
    the published 0/0 misses). e_self is constant and carries no gradient. Saves S (which
    the residual update keeps anyway) and the inverse norms [B, H, W]. With
    e = r_n r_m <s_n, s_m>, the gradient is
        dS_n = sum_pairs g r_n r_m s_m - r_n^2 s_n sum_pairs g e.
    """

    @staticmethod
    def forward(ctx, s, offsets):
        H, W = s.shape[-2:]
        sq = channel_dot(s, s)
        rnorm = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
        e = s.new_zeros(s.shape[0], len(offsets), H, W)
        for k, (dr, dc) in enumerate(offsets):
            here, there = _region(H, W, dr, dc)
            e[:, k, here[0], here[1]] = (channel_dot(s[..., here[0], here[1]], s[..., there[0], there[1]])
                                         * rnorm[:, here[0], here[1]] * rnorm[:, there[0], there[1]])
        e_self = (sq > 0).to(s.dtype)
        ctx.mark_non_differentiable(e_self)
        ctx.save_for_backward(s, rnorm, e)
        ctx.offsets = offsets
        return e, e_self

    @staticmethod
    def backward(ctx, grad_e, _grad_self):
        s, rnorm, e = ctx.saved_tensors
        H, W = s.shape[-2:]
        grad_s = torch.zeros_like(s)
        radial = torch.zeros_like(rnorm)
        for k, (dr, dc) in enumerate(ctx.offsets):
            here, there = _region(H, W, dr, dc)
            coef = (grad_e[:, k, here[0], here[1]] * rnorm[:, here[0], here[1]]
                    * rnorm[:, there[0], there[1]])[:, None]
            grad_s[..., here[0], here[1]].addcmul_(coef, s[..., there[0], there[1]])
            grad_s[..., there[0], there[1]].addcmul_(coef, s[..., here[0], here[1]])
            ge = grad_e[:, k] * e[:, k]
            radial += ge + shift(ge, -dr, -dc)
        grad_s.addcmul_(s, (radial * rnorm * rnorm)[:, None], value=-1)
        return grad_s, None


# ---------------------------------------------------------------- matrix-free series
class StencilSeries(torch.autograd.Function):
    """u = X_p F with X_p the p-step Newton-Schulz iterate of the stencil L, matrix-free:
    x_0 = 0, x_{j+1} = x_j + alpha L (F - L x_j), 2^p steps (SPEC section 4).

    Inputs F [B, H, W], w [B, K, H, W], d [B, H, W]; returns u [B, H, W]. Saves the 2^p
    iterates and residuals ([2^p, B, H, W] each). Backward, with a_J = du,
    b_j = alpha L a_{j+1}, a_j = a_{j+1} - L b_j:
        dF = sum_j b_j,
        dL = sum_j alpha a_{j+1} r_j^T - b_j x_j^T   (exact: the outer alpha L of every
             step is differentiated) or  -sum_j b_j x_j^T  (X_0 detached: it is constant),
    read off on the stencil only.
    """

    @staticmethod
    def forward(ctx, f, w, d, alpha, iterations, offsets, exact):
        L = Stencil(w, d, offsets)
        x = torch.zeros_like(f)
        xs, rs = [], []
        for _ in range(2 ** iterations):
            r = f - L @ x
            xs.append(x)
            rs.append(r)
            x = x + alpha * (L @ r)
        ctx.save_for_backward(w, d, torch.stack(xs), torch.stack(rs))
        ctx.args = (alpha, offsets, exact)
        return x

    @staticmethod
    def backward(ctx, grad_u):
        w, d, xs, rs = ctx.saved_tensors
        alpha, offsets, exact = ctx.args
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
            grad_w = grad_w + alpha * torch.stack([stencil_pair_sum(a_next, rs, dr, dc)
                                                   for dr, dc in offsets], 1)
            grad_d = grad_d + alpha * (a_next * rs).sum(0)
        return grad_f, grad_w, grad_d, None, None, None, None


# ---------------------------------------------------------------- spectral form
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
    """A [B, N, N] with Q^T dX_p Q = A * (Q^T P Q) for symmetric P (SPEC section 4):
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
    dF = Q g(t) Q^T du; dL = Q (A * (Q^T du)(Q^T F)^T) Q^T, read off on the stencil.
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
        grad_dense = torch.bmm(q, k @ q.transpose(1, 2), out=k)   # Q K Q^T, in K's buffer
        grad_w, grad_d = dense_stencil_entries(grad_dense, H, W, offsets)
        return grad_f, grad_w, grad_d, None, None, None, None
