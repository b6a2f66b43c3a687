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

Backends: NeighbourCosine and StencilSeries run Triton kernels (kernels/stencil.py) on the
"triton" backend and the PyTorch code below on "torch"; SpectralFilter (one batched eigh)
and ScalePatches (one elementwise product) are PyTorch on both.
"""
from __future__ import annotations

import functools

import torch

from ._common import cdiv, kernel_config, kernel_module

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


def product_stencil_entries(p: torch.Tensor, q: torch.Tensor, height: int, width: int, offsets):
    """For G = P Q^T (P, Q [B, N, N]), on the stencil only, without forming G:
    (G[n, n + o_k] + G[n + o_k, n] as [B, K, H, W], the diagonal G[n, n] as [B, H, W]).
    Each entry is a dot product of two rows; with the flat offset m = dr W + dc > 0 the
    pairs (n, n + m) are the rows of two contiguous slabs, masked where n + o_k leaves
    the grid (a column wrap)."""
    B, N, _ = p.shape
    valid, _ = grid_masks(height, width, len(offsets) * 2, p.dtype, p.device)
    pairs = p.new_zeros(B, len(offsets), N)
    for k, (dr, dc) in enumerate(offsets):
        m = dr * width + dc
        dots = _row_dots(p[:, :N - m], q[:, m:]) + _row_dots(p[:, m:], q[:, :N - m])
        pairs[:, k, :N - m] = dots * valid[k].reshape(-1)[:N - m]
    return pairs.reshape(B, len(offsets), height, width), _row_dots(p, q).reshape(B, height, width)


def _row_dots(a: torch.Tensor, b: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """(a * b).sum(-1) for [B, n, N] tensors, a few batch items at a time (small temporaries)."""
    return torch.cat([(a[i:i + chunk] * b[i:i + chunk]).sum(-1) for i in range(0, a.shape[0], chunk)])


# ---------------------------------------------------------------- neighbour cosines
CHANNEL_CHUNK = 32


def channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_c a[:, c] * b[:, c] for [B, C, h, w] tensors, in chunks of channels so that no
    [B, C, h, w] temporary is formed."""
    out = (a[:, :CHANNEL_CHUNK] * b[:, :CHANNEL_CHUNK]).sum(1)
    for c0 in range(CHANNEL_CHUNK, a.shape[1], CHANNEL_CHUNK):
        out += (a[:, c0:c0 + CHANNEL_CHUNK] * b[:, c0:c0 + CHANNEL_CHUNK]).sum(1)
    return out


class GradSlot:
    """Hands the gradient of S from ScalePatches to NeighbourCosine within one backward pass.

    S reaches the output twice: through the residual scaling S * scale and through the
    neighbour cosines that build scale. Autograd would hold one [B, C, H, W] gradient for
    each and add them. Instead ScalePatches, whose backward runs first, leaves the incoming
    gradient and the scale here, and NeighbourCosine forms grad * scale and adds its own
    terms into that one buffer, once the small per-block graph in between (whose spectral
    block needs [B, N, N] temporaries) has been differentiated and freed. What is left here
    is tagged with the graph task that left it and is taken by that task only.
    """

    def __init__(self):
        self._task, self._value = None, None

    def put(self, grad: torch.Tensor, scale: torch.Tensor) -> None:
        self._task, self._value = torch._C._current_graph_task_id(), (grad, scale)

    def take_scaled_grad(self) -> torch.Tensor | None:
        """grad * scale (broadcast over C) as a new buffer, or None if nothing was left."""
        value, task = self._value, self._task
        self._task, self._value = None, None
        if value is None or task != torch._C._current_graph_task_id():
            return None
        grad, scale = value
        return grad * scale[:, None]


class ScalePatches(torch.autograd.Function):
    """S [B, C, H, W] * scale [B, H, W] (broadcast over C), whose backward reduces over C
    in chunks instead of forming grad * S. Given a GradSlot and the autograd node of the
    NeighbourCosine of the same S, the gradient of S is left to that node whenever it runs
    in the same backward pass (see GradSlot)."""

    @staticmethod
    def forward(ctx, s, scale, slot=None, cosine_node=None):
        ctx.save_for_backward(s, scale)
        ctx.slot, ctx.cosine_node = slot, cosine_node
        return s * scale[:, None]

    @staticmethod
    def backward(ctx, grad):
        s, scale = ctx.saved_tensors
        grad_s = None
        if ctx.needs_input_grad[0]:
            if (ctx.slot is not None and ctx.cosine_node is not None
                    and torch._C._will_engine_execute_node(ctx.cosine_node)):
                ctx.slot.put(grad, scale)
            else:
                grad_s = grad * scale[:, None]
        grad_scale = channel_dot(grad, s) if ctx.needs_input_grad[1] else None
        return grad_s, grad_scale, None, None


def _neighbour_cosine_fwd_torch(s, offsets):
    H, W = s.shape[-2:]
    sq = channel_dot(s, s)
    rnorm = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
    e = s.new_zeros(s.shape[0], len(offsets), H, W)
    for k, (dr, dc) in enumerate(offsets):
        here, there = _region(H, W, dr, dc)
        e[:, k, here[0], here[1]] = (channel_dot(s[..., here[0], here[1]], s[..., there[0], there[1]])
                                     * rnorm[:, here[0], here[1]] * rnorm[:, there[0], there[1]])
    return e, sq


def _neighbour_cosine_fwd_triton(s, offsets):
    kern = kernel_module("stencil")
    cfg, launch = kernel_config(kern, s.dtype)
    B, C, H, W = s.shape
    e = s.new_empty(B, len(offsets), H, W)
    sq = s.new_empty(B, H, W)
    kern.neighbour_cosine_fwd_kernel[(cdiv(H * W, cfg["BLOCK_P"]), B)](
        s, e, sq, C, H, W, EIGHT_NEIGHBOURS=len(offsets) == 4, IS_FP64=s.dtype == torch.float64,
        BLOCK_C=cfg["BLOCK_C"], BLOCK_P=cfg["BLOCK_P"], **launch)
    return e, sq


def _neighbour_cosine_bwd_torch(grad_s, s, coef, radial, offsets):
    H, W = s.shape[-2:]
    for k, (dr, dc) in enumerate(offsets):
        here, there = _region(H, W, dr, dc)
        ck = coef[:, k, here[0], here[1]][:, None]
        grad_s[..., here[0], here[1]].addcmul_(ck, s[..., there[0], there[1]])
        grad_s[..., there[0], there[1]].addcmul_(ck, s[..., here[0], here[1]])
    return grad_s.addcmul_(s, radial[:, None], value=-1)


def _neighbour_cosine_bwd_triton(grad_s, s, coef, radial, offsets):
    kern = kernel_module("stencil")
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
    "triton" (kernels/stencil.py; S is made contiguous) or "torch".
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


# ---------------------------------------------------------------- matrix-free series
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


# The Triton series holds a whole grid in one program; larger grids take the PyTorch steps.
# Both block sizes up to this one are compiled ahead of time (scm_ops.aot).
SERIES_MAX_CELLS = 1024


def _series_launch(f):
    """(kernel module, grid, BLOCK_N, launch options, scratch [B, BLOCK_N]) for one image a program."""
    kern = kernel_module("stencil")
    _, launch = kernel_config(kern, f.dtype)
    block = 1 << max(0, f.shape[1] * f.shape[2] - 1).bit_length()
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
    x_0 = 0, x_{j+1} = x_j + alpha L (F - L x_j), 2^p steps (SPEC section 4).

    Inputs F [B, H, W], w [B, K, H, W], d [B, H, W]; returns u [B, H, W]. Saves the 2^p
    iterates and residuals ([2^p, B, H, W] each). Backward, with a_J = du,
    b_j = alpha L a_{j+1}, a_j = a_{j+1} - L b_j:
        dF = sum_j b_j,
        dL = sum_j alpha a_{j+1} r_j^T - b_j x_j^T   (exact: the outer alpha L of every
             step is differentiated) or  -sum_j b_j x_j^T  (X_0 detached: it is constant),
    read off on the stencil only. `backend` "triton" runs all steps of an image in one
    program (kernels/stencil.py; grids up to SERIES_MAX_CELLS cells), "torch" runs them as
    stencil products in PyTorch.
    """

    @staticmethod
    def forward(ctx, f, w, d, alpha, iterations, offsets, exact, backend="torch"):
        if backend == "triton" and f.shape[1] * f.shape[2] > SERIES_MAX_CELLS:
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
