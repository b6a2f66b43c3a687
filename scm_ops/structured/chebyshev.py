"""Blocks with many iterations as a Chebyshev series in Z = L^2 (docs/structured.md,
"Chebyshev series").

X_p = g(L) with g(t) = t phi(t^2), phi(z) = (1 - (1 - alpha z)^K) / z, K = 2^p. On the
spectrum of Z, inside [0, R^2] with R a bound on the spectral radius of L (Gershgorin, or
sigma_max where Gershgorin is too loose to show convergence), phi is replaced by a truncated
Chebyshev series; u = X_p F = L phi(Z) F then costs one product with Z (two stencil
products) per degree and O(N) memory per basis vector, never an N x N matrix. The backward
runs the same recurrence in reverse (Clenshaw) on one or two adjoint streams and reads the
gradient of L at the stencil entries as sums of outer products. On the Triton backend one
program per image runs each whole pass (kernels/structured/chebyshev.py); PyTorch otherwise.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

from ..newton_schulz import NewtonSchulzDivergenceError, divergence
from . import cpu
from .stencil import (OFFSETS, FlatStencil, PaddedRows, StencilReader, flat_launch, grid_masks, program_backend,
                      program_max_cells, sigma_max_bound)

__all__ = ["ChebyshevFilter", "chebyshev_filter", "chebyshev_coefficients", "chebyshev_max_cells", "series_radius",
           "DEGREE_TOLERANCE"]

# Truncation tolerance of the series, by input dtype: the series stops where the sum of
# the absolute values of the dropped coefficients is below this fraction of max |f| on the
# interval (f = phi, or psi(z) = (1 - alpha z)^K for the published gradient). The error of
# u = L phi(Z) F is about 200 times that fraction (max phi = alpha K = 131 against
# max g ~ 7, times R); measured at R = 4 against dense Newton-Schulz in float64: tolerance
# 1e-7 -> forward 1.7e-6, gradients 1.9e-5; 1e-8 -> 1.7e-7, 1.8e-6. float32 inputs take
# 1e-9 (forward 8e-8, gradients 2.5e-7: below dense Newton-Schulz's own float32 error of
# 6e-7; with 1e-8 the gradient of lam in a small model was 7e-5 off its float64 value,
# against 1e-5 with 1e-9 and 3e-6 for the spectral route). float64 takes 1e-12, a thousand
# times above the ~1e-15 floor of coefficients computed in float64 (forward ~1e-11,
# gradients ~3e-10). Degrees at alpha = 0.002, p = 16, R = 4.56 (signed i.i.d. maps):
# phi 208, psi 226 (float32); phi 247, psi 264 (float64). The degree grows as R.
DEGREE_TOLERANCE = {torch.float32: 1e-9, torch.float64: 1e-12}

# The recurrence runs in float64 whatever the input dtype: in float32 its rounding,
# amplified as the truncation error is (about 200 times), gave forward errors of 6.5e-6 and
# a gradient of lam in a small model 2e-4 off (dense Newton-Schulz in float32: 6e-7,
# 1e-5). The degree still follows the input dtype's tolerance.
WORKING_DTYPE = torch.float64

# R is rounded up to a point of the grid 2^(j/16) (at most 4.4% larger, degree alike) so
# that the coefficients of nearby radii come from one cache entry.
_RADIUS_STEPS_PER_OCTAVE = 16
_MIN_RADIUS = 2.0 ** -10


def convergence_radius(alpha: float) -> float:
    """sqrt(2 / alpha): the iteration converges for sigma_max(L) below it, and psi(z) =
    (1 - alpha z)^K stays bounded by 1 on [0, R^2] exactly for R up to it."""
    return math.sqrt(2.0 / alpha)


def rounded_radius(radius: float, alpha: float | None = None) -> float:
    """radius rounded up to the cache grid 2^(j/16), at least 2^-10; given alpha, never past
    convergence_radius(alpha) when radius itself is not past it. Past that limit
    (alpha R^2 > 2) psi grows as |1 - alpha z|^K on the part of the interval beyond it and
    its coefficients overflow, although the spectrum of L, below the limit, is where the
    iteration converges: the series would return NaN."""
    radius = max(float(radius), _MIN_RADIUS)
    rounded = 2.0 ** (math.ceil(math.log2(radius) * _RADIUS_STEPS_PER_OCTAVE - 1e-9) / _RADIUS_STEPS_PER_OCTAVE)
    if alpha is not None and radius <= convergence_radius(alpha):
        rounded = min(rounded, convergence_radius(alpha))
    return rounded


def _phi_psi(z: torch.Tensor, alpha: float, iterations: int):
    """(phi(z), psi(z)) in float64: phi = (1 - (1 - alpha z)^K) / z (phi(0) = alpha K) and
    psi = (1 - alpha z)^K, K = 2^p, through log1p/expm1 (the naive power rounds 1 - alpha z
    to 1 for small z). K is even, so |1 - alpha z| is what counts when alpha z > 1."""
    K = 2.0 ** iterations
    q = alpha * z
    log_abs = torch.where(q < 0.5, torch.log1p(-q.clamp(max=0.5)), torch.log((1 - q).abs()))
    power_minus_one = torch.expm1(K * log_abs)
    safe_z = torch.where(z > 0, z, torch.ones_like(z))
    phi = torch.where(z > 0, -power_minus_one / safe_z, torch.full_like(z, alpha * K))
    return phi, power_minus_one + 1


def _chebyshev_transform(values: torch.Tensor) -> torch.Tensor:
    """Chebyshev coefficients c_0..c_{M-1} of the polynomial interpolating `values` at the M
    nodes y_j = cos(pi (j + 1/2) / M) (a DCT-II through one real FFT of the even extension)."""
    M = values.shape[0]
    spectrum = torch.fft.rfft(torch.cat([values, values.flip(0)]))[:M]
    k = torch.arange(M, dtype=torch.float64)
    coef = (spectrum * torch.exp(-0.5j * math.pi * k / M)).real / M
    coef[0] /= 2
    return coef


# Coefficients (relative to max|f|) below this are rounding noise of the transform: the
# coefficients of phi and psi fall as exp(-n^2 / K)-like curves to a floor near 1e-16 and
# stay there up to the number of nodes. Summed over thousands of nodes that floor alone can
# exceed the float64 tolerance (1e-12) and would push the degree to the node count; the
# noise terms carry no part of f, so the tail is summed above the floor only.
_COEFFICIENT_NOISE = 64 * torch.finfo(torch.float64).eps


def _truncation_degree(coef: torch.Tensor, tolerance: float) -> int:
    """The smallest n with sum_{k > n} |c_k| <= tolerance (the dropped tail bounds the
    uniform error; coef relative to max|f|), coefficients in the rounding-noise floor
    (_COEFFICIENT_NOISE) not counted."""
    magnitude = coef.abs()
    tail = torch.where(magnitude > _COEFFICIENT_NOISE, magnitude, 0).flip(0).cumsum(0).flip(0)
    above = (tail > tolerance).nonzero()
    return max(int(above.max()) if above.numel() else 0, 2)


@functools.lru_cache(maxsize=64)
def _coefficients_cached(radius: float, alpha: float, iterations: int, tolerance: float):
    # Nodes: enough that the degree found is far below the aliasing limit M/2 (the degree
    # grows about as 60 R for the tightest tolerance used).
    M = 4096
    while M < 8 * (60 * radius + 64):
        M *= 2
    j = torch.arange(M, dtype=torch.float64)
    y = torch.cos(math.pi * (j + 0.5) / M)                  # y = 1 - 2 z / R^2 in [-1, 1]
    phi, psi = _phi_psi(radius * radius * (1 - y) / 2, alpha, iterations)
    out = []
    for values in (phi, psi):
        coef = _chebyshev_transform(values)
        scale = float(values.abs().max())
        n = _truncation_degree(coef / scale, tolerance)
        out.append(coef[:n + 1].clone())
    return tuple(out)


def chebyshev_coefficients(radius: float, alpha: float, iterations: int, tolerance: float):
    """(c_phi, c_psi): float64 Chebyshev coefficients of phi and psi in the variable
    y = 1 - 2 z / R^2 on z in [0, R^2], each truncated at `tolerance` (see DEGREE_TOLERANCE).
    R is rounded up with rounded_radius; results are cached per (R, alpha, p, tolerance)."""
    return _coefficients_cached(rounded_radius(radius, alpha), float(alpha), int(iterations), float(tolerance))


def series_radius(w: torch.Tensor, d: torch.Tensor, offsets, alpha: float, sigma: torch.Tensor | None = None) -> float:
    """A bound R on the spectral radius of every L of the batch (one float: the series runs
    on the whole batch at once): the largest Gershgorin bound max_n sum_m |L[n, m]|, or,
    for images where that bound is too loose to show convergence (alpha R^2 >= 2),
    sigma_max(L) from a float64 eigvalsh (sigma_max_bound; `sigma` [B], when given, is that
    bound already computed, e.g. by the divergence check). Raises NewtonSchulzDivergenceError
    if an image's iteration diverges (alpha sigma_max^2 >= 2): its series would not converge."""
    bound = sigma_max_bound(w, d, offsets, alpha) if sigma is None else sigma.detach().to(torch.float64)
    problem = divergence(bound, alpha)
    if problem:
        raise NewtonSchulzDivergenceError(problem)
    radius = float(bound.max()) if bound.numel() else 1.0      # an empty batch: any interval
    # A non-finite L (NaN in S) gives a NaN result on any interval; the finite-value checks
    # report it (under torch.compile they may run after this operator).
    return radius if math.isfinite(radius) else 1.0


def _basis(f, scaled, c_phi, degree, keep):
    """Forward basis for flat F [B N]: v_k = T_k(Y) F for k <= degree, where
    Y = I - (2/R^2) Z = I - Lh^2 / 2 and Lh = (2/R) L (`scaled`), by y_k = Lh v_k and
    v_{k+1} = 2 v_k - v_{k-1} - Lh y_k. Returns (phi(Z) F = sum_k c_k v_k [B N] for the
    forward coefficients c_phi [n_phi + 1], the basis v [degree + 1, B N] or None without
    `keep`).

    A step is two stencil products, a lerp, a term of the sum and (with `keep`) one copy:
    v_k and v_{k-1} take turns in two padded rows (v_{k+1} overwrites v_{k-1}) and y_k has
    a third (PaddedRows), so every shifted view is built once, before the loop."""
    cells = f.shape[-1]
    coef = c_phi.tolist()
    basis = f.new_empty(degree + 1, cells) if keep else None
    kept = basis.unbind(0) if keep else ()
    work = PaddedRows(3, cells, scaled.reach, f)                # rows 0-1: v (in turn), row 2: y
    v, y = [work.row(j) for j in range(2)], work.row(2)
    of_v, of_y = [scaled.terms(work, j) for j in range(2)], scaled.terms(work, 2)
    v[0].copy_(f)
    scaled.matmul_into(of_v[0], y)                              # y_0 = Lh F
    scaled.matmul_into(of_y, v[1])
    torch.add(f, v[1], alpha=-0.5, out=v[1])                    # v_1 = Y F
    phi_f = f * coef[0]
    if keep:
        kept[0].copy_(f)
    for k in range(1, degree):
        now, before = k % 2, (k - 1) % 2
        scaled.matmul_into(of_v[now], y)                        # y_k = Lh v_k
        if keep:
            kept[k].copy_(v[now])
        if k < len(coef):
            phi_f.add_(v[now], alpha=coef[k])
        v[before].lerp_(v[now], 2.0)                            # v_{k+1} = 2 v_k - v_{k-1}
        scaled.subtract_product(of_y, v[before])                #           - Lh^2 v_k
    if keep:
        kept[degree].copy_(v[degree % 2])
    if degree < len(coef):
        phi_f.add_(v[degree % 2], alpha=coef[degree])
    return phi_f, basis


def _adjoint_sweep(g, lg, coef, scaled, basis, radius, offsets, width):
    """Reverse pass (Clenshaw) of sum_k c_k v_k for the cotangent g [B N] of u (lg = L g),
    coef [degree + 1, S] zero-padded (column 0: phi; column 1, if present: psi). For a
    series with cotangent h (L g for phi, g for psi) the adjoints are
        b_k = c_k h + 2 Y b_{k+1} - b_{k+2} (k >= 1),   b_0 = c_0 h + Y b_1 - b_2,
    and b_{k+1} is read against the basis, with weight -2/R (-1/R at k = 0), as the pairs
    (Lh b_phi + (2/R) b_psi <-> v_k) and (b_phi <-> y_k) (StencilReader), as it is
    produced: no adjoint is kept. Returns (b_0 of phi = dF [B N], the reader); the caller
    adds the g (phi(Z) F)^T term.

    With psi (S = 2) the second stream carries e = Lh b_phi + (2/R) b_psi instead of b_psi:
    Lh commutes with Y, so e obeys the same recurrence, with cotangent
    c_phi Lh L g + (2/R) c_psi g, and is read against v_k as it stands. Two slots take
    turns (b_k overwrites b_{k+2}), each of 2S + 2 padded rows (PaddedRows)
    [Lh b (S rows), y_k, b (S rows), v_k], b = (b_phi) or (e, b_phi): one stencil product
    maps rows S + 1 .. 2S + 1 to rows 0 .. S, i.e. Lh of the streams and y_k = Lh v_k,
    recomputed from the kept v_k. With S = 2 the reading is one two-row term, p = rows
    2-3 (y_k, e) against q = rows 4-5 (b_phi, v_k); with S = 1 two one-row terms,
    (Lh b_phi, v_k) and (b_phi, y_k). A step is two stencil products, one copy of v_k, the
    reading, a lerp and the cotangent terms, on views built once, before the loop."""
    degree, S = coef.shape[0] - 1, coef.shape[1]
    cells = g.shape[-1]
    c_phi = coef[:, 0].tolist()
    c_psi = (coef[:, 1] * (2.0 / radius)).tolist() if S == 2 else None
    h = torch.stack([scaled.matmul(lg), lg]) if S == 2 else lg[None]   # cotangents of b, times c_phi
    size = 2 * S + 2                                            # rows of a slot
    work = PaddedRows(2 * size, cells, scaled.reach, g)
    b = [work.rows(size * j + S + 1, S) for j in range(2)]
    e = [work.row(size * j + S + 1) for j in range(2)]                  # with S = 2
    v = [work.row(size * j + 2 * S + 1) for j in range(2)]
    of_b = [scaled.terms(work, size * j + S + 1, S + 1) for j in range(2)]
    of_lb = [scaled.terms(work, size * j, S) for j in range(2)]
    out = [work.rows(size * j, S + 1) for j in range(2)]
    reader = StencilReader(S, cells, offsets, width, g)
    if S == 2:
        reads = [reader.bind(work, size * j + 2, work, size * j + 4, 2) for j in range(2)]
    else:
        reads = [reader.bind(work, size * j, work, size * j + 3, 1) +
                 reader.bind(work, size * j + 2, work, size * j + 1, 1) for j in range(2)]
    kept = basis.unbind(0)
    first = degree % 2
    torch.mul(h, c_phi[degree], out=b[first])                   # b_n = c_n h
    if S == 2:
        e[first].add_(g, alpha=c_psi[degree])
    for k in range(degree - 1, -1, -1):
        now, after = k % 2, (k + 1) % 2                         # slot `now` holds b_{k+2}, then b_k
        v[after].copy_(kept[k])
        scaled.matmul_into(of_b[after], out[after])             # Lh b_{k+1} and y_k = Lh v_k
        reader.add(reads[after], (-2.0 if k else -1.0) / radius)
        if k == 0:
            break
        b[now].lerp_(b[after], 2.0)                             # 2 b_{k+1} - b_{k+2}
        b[now].add_(h, alpha=c_phi[k])
        if S == 2:
            e[now].add_(g, alpha=c_psi[k])
        scaled.subtract_product(of_lb[after], b[now])           # - Lh^2 b_{k+1}
    # b_0 of phi (the last b row): c_0 L g + Y b_1 - b_2, with b_1 in slot 1 and b_2 in slot 0
    b_0 = (lg * c_phi[0] + b[1][-1] - b[0][-1]).mul_(2)
    scaled.subtract_product(scaled.terms(work, size + S - 1), b_0)   # Lh (Lh b_1)
    return b_0.mul_(0.5), reader


class SeriesPlan(NamedTuple):
    """What the series of one batch runs with: float64 tensors on the inputs' device."""
    radius: float               # R, rounded up (rounded_radius)
    c_phi: torch.Tensor         # [n_phi + 1], the forward coefficients
    c_phi_padded: torch.Tensor  # [n + 1], zero-padded to the basis degree
    coef: torch.Tensor          # [n + 1, S], the backward streams' coefficients (phi[, psi])
    degree: int                 # n, the basis degree


@functools.lru_cache(maxsize=64)
def _plan_cached(radius, alpha, iterations, tolerance, exact, device):
    c_phi, c_psi = chebyshev_coefficients(radius, alpha, iterations, tolerance)
    streams = (c_phi,) if exact else (c_phi, c_psi)
    degree = max(c.shape[0] for c in streams) - 1
    coef = torch.zeros(degree + 1, len(streams), dtype=torch.float64)
    for s, c in enumerate(streams):
        coef[:c.shape[0], s] = c
    return SeriesPlan(radius, c_phi.to(device), coef[:, 0].contiguous().to(device), coef.to(device), degree)


def _series_plan(w, d, alpha, iterations, offsets, exact, dtype, sigma=None):
    """The SeriesPlan of a batch: its radius (one host sync), the forward coefficients and
    the basis degree n (phi's, or the larger of phi's and psi's when the published gradient
    needs psi too); cached per (R, alpha, p, tolerance, semantics, device)."""
    radius = rounded_radius(series_radius(w, d, offsets, alpha, sigma), alpha)
    return _plan_cached(radius, float(alpha), int(iterations), DEGREE_TOLERANCE[dtype], bool(exact), w.device)


def chebyshev_max_cells(connectivity: int = 4) -> int:
    """The largest grid (cells) one Triton program holds for the series with 4 or 8
    neighbours (1024 and 256); larger grids take the PyTorch series on the Triton backend."""
    return program_max_cells("structured.chebyshev", connectivity)


def _chebyshev_backend(backend, f, offsets):
    return program_backend(backend, f.shape[1], f.shape[2], offsets, "structured.chebyshev")


def _launch(kernel_name, w, offsets):
    return flat_launch("structured.chebyshev", kernel_name, w, offsets, torch.float64)


def _forward_triton(f, w, d, plan, offsets, keep_basis):
    """chebyshev_fwd_kernel on float64 contiguous f [B, H, W], w [B, K, H, W], d [B, H, W]."""
    kernel, block, launch, planes, scratch = _launch("chebyshev_fwd_kernel", w, offsets)
    B, H, W = f.shape
    degree = plan.degree if keep_basis else plan.c_phi.shape[0] - 1
    coef = plan.c_phi_padded if keep_basis else plan.c_phi
    u, phi_f = torch.empty_like(f), torch.empty_like(f)
    vy = f.new_empty(degree + 1, 2, B * H * W) if keep_basis else scratch
    if B:
        kernel[(B,)](f, planes, d, coef, f.new_full((1,), 2.0 / plan.radius), u, phi_f, vy, scratch, B, H, W, degree,
                     EIGHT_NEIGHBOURS=len(offsets) == 4, STORE_BASIS=keep_basis, BLOCK_N=block, **launch)
    return u, (vy if keep_basis else None), phi_f.reshape(-1)


def _backward_triton(grad_u, w, d, vy, phi_f, plan, offsets):
    kernel, block, launch, planes, scratch = _launch("chebyshev_bwd_kernel", w, offsets)
    B, H, W = grad_u.shape
    grad_f, grad_d, grad_w = torch.empty_like(grad_u), torch.empty_like(grad_u), torch.empty_like(w)
    if B:
        kernel[(B,)](grad_u, planes, d, vy, phi_f, plan.coef, grad_u.new_full((1,), 2.0 / plan.radius),
                     grad_f, grad_w, grad_d, scratch, B, H, W, plan.degree,
                     PUBLISHED=plan.coef.shape[1] == 2, EIGHT_NEIGHBOURS=len(offsets) == 4, BLOCK_N=block, **launch)
    valid, _ = grid_masks(H, W, 2 * len(offsets), w.dtype, w.device)
    return grad_f, grad_w * valid, grad_d


def _series_forward(f, w, d, plan, offsets, backend="torch", keep_basis=True):
    """(u [B, H, W], the basis or None without keep_basis, phi(Z) F [B N]) for a plan of
    _series_plan; float64 inputs. The basis is v_k [n + 1, B N] on the PyTorch path (its
    backward recomputes y_k = Lh v_k) and (v_k, y_k) [n + 1, 2, B N] on the Triton path."""
    if _chebyshev_backend(backend, f, offsets) == "triton":
        return _forward_triton(f.contiguous(), w.contiguous(), d.contiguous(), plan, offsets, keep_basis)
    degree = plan.degree if keep_basis else plan.c_phi.shape[0] - 1
    lib = cpu.library() if f.device.type == "cpu" and degree >= 1 else None
    if lib is not None:   # one image at a time in C (scm_ops/structured/cpu.py)
        phi_f, basis = cpu.chebyshev_basis(lib, f, w, d, offsets, 2.0 / plan.radius, plan.c_phi, degree, keep_basis)
    else:
        scaled = FlatStencil(w, d, offsets, 2.0 / plan.radius)
        phi_f, basis = _basis(f.reshape(-1), scaled, plan.c_phi, degree, keep_basis)
    u = FlatStencil(w, d, offsets).matmul(phi_f)
    return u.reshape(f.shape), basis, phi_f


def _series_backward(grad_u, w, d, basis, phi_f, plan, offsets, backend="torch"):
    """(dF, dw, dd) from the basis that _series_forward kept; float64 inputs."""
    if _chebyshev_backend(backend, grad_u, offsets) == "triton":
        return _backward_triton(grad_u.contiguous(), w.contiguous(), d.contiguous(), basis, phi_f, plan, offsets)
    B, H, W = grad_u.shape
    g = grad_u.reshape(-1)
    lg = FlatStencil(w, d, offsets).matmul(g)
    lib = cpu.library() if grad_u.device.type == "cpu" and plan.degree >= 1 else None
    if lib is not None:   # one image at a time in C (scm_ops/structured/cpu.py)
        return cpu.chebyshev_adjoint(lib, grad_u, lg, w, d, offsets, 2.0 / plan.radius, plan.radius, plan.coef, basis,
                                     phi_f)
    scaled = FlatStencil(w, d, offsets, 2.0 / plan.radius)
    grad_f, reader = _adjoint_sweep(g, lg, plan.coef, scaled, basis, plan.radius, offsets, W)
    outer = PaddedRows(2, g.shape[0], scaled.reach, g)          # + g (phi(Z) F)^T
    outer.row(0).copy_(g)
    outer.row(1).copy_(phi_f)
    reader.add(reader.bind(outer, 0, outer, 1, 1))
    valid, _ = grid_masks(H, W, 2 * len(offsets), w.dtype, w.device)
    grad_w, grad_d = reader.result((B, H, W), valid)
    return grad_f.reshape(B, H, W), grad_w, grad_d


class ChebyshevFilter(torch.autograd.Function):
    """u = X_p F = L phi(Z) F, Z = L^2, phi by a Chebyshev series on [0, R^2]
    (docs/structured.md, "Chebyshev series").

    Inputs F [B, H, W], w [B, K, H, W], d [B, H, W] (float32 or float64); returns u [B, H, W].
    The degree n follows from R (rounded up, see rounded_radius) and DEGREE_TOLERANCE of the
    dtype; `info` (a dict, optional) receives the radius and degrees. The recurrence runs in
    float64 (WORKING_DTYPE) for every input dtype. Saves for backward the basis
    v_k = T_k(Y) F, (n + 1) B N float64 elements (the Triton path also keeps y_k = Lh v_k,
    Lh = (2/R) L, which the PyTorch backward recomputes), besides w, d and phi(Z) F; the
    backward adds O(B N) (its adjoints are read as they are made).
    Backward, with cotangent g of u:
        dF = X_p g  (stream 0 of the reverse recurrence, started from L g),
        dL = g (phi(Z) F)^T + G_phi L + L G_phi  [+ G_psi for the published gradient],
    G_phi, G_psi the gradients with respect to Z, as an independent matrix, of
    (L g)^T phi(Z) F and g^T psi(Z) F, psi(z) = (1 - alpha z)^K: sums over k of outer
    products of the adjoint vectors with v_k and y_k, read at the stencil entries only.
    `backend` "triton" runs the forward and the backward each in one program per image
    (kernels/structured/chebyshev.py; grids up to chebyshev_max_cells(connectivity) cells,
    larger ones in PyTorch); "torch" runs the recurrence as stencil products in PyTorch.
    Without a gradient to compute the forward keeps no basis and stops at phi's degree.
    Under torch.compile use chebyshev_filter (a custom operator).
    """

    @staticmethod
    def forward(ctx, f, w, d, alpha, iterations, offsets, exact, info=None, backend="torch", sigma=None):
        plan = _series_plan(w, d, alpha, iterations, offsets, exact, f.dtype, sigma)
        dtype = f.dtype
        f, w, d = (t.to(WORKING_DTYPE) for t in (f, w, d))
        keep_basis = any(ctx.needs_input_grad[:3])
        u, vy, phi_f = _series_forward(f, w, d, plan, offsets, backend, keep_basis)
        if info is not None:
            info.update(radius=plan.radius, degree_phi=plan.c_phi.shape[0] - 1, basis_degree=plan.degree,
                        degree_psi=None if exact else int(plan.coef[:, 1].nonzero().max()),
                        backend=_chebyshev_backend(backend, f, offsets))
        ctx.save_for_backward(w, d, vy, phi_f)
        ctx.args = (plan, offsets, dtype, backend)
        return u.to(dtype)

    @staticmethod
    def backward(ctx, grad_u):
        w, d, vy, phi_f = ctx.saved_tensors
        plan, offsets, dtype, backend = ctx.args
        grads = _series_backward(grad_u.to(WORKING_DTYPE), w, d, vy, phi_f, plan, offsets, backend)
        return (*(g.to(dtype) for g in grads), None, None, None, None, None, None, None)


# -- the same as custom operators, for torch.compile --------------------------------------
# The degree depends on the data (R), so a traced graph cannot hold the loop; the operators
# are opaque to the compiler. Their backward recomputes the basis instead of saving it (a
# saved basis would be an output whose length depends on the data): one more forward series
# in the backward, and no basis held between forward and backward.

@torch.library.custom_op("scm_ops::chebyshev_filter", mutates_args=())
def _chebyshev_filter_op(f: torch.Tensor, w: torch.Tensor, d: torch.Tensor, alpha: float, iterations: int,
                         connectivity: int, exact: bool, backend: str, sigma: Optional[torch.Tensor]) -> torch.Tensor:
    offsets = OFFSETS[connectivity]
    plan = _series_plan(w, d, alpha, iterations, offsets, True, f.dtype, sigma)
    u = _series_forward(*(t.to(WORKING_DTYPE) for t in (f, w, d)), plan, offsets, backend, keep_basis=False)[0]
    return u.to(f.dtype).contiguous()


@_chebyshev_filter_op.register_fake
def _(f, w, d, alpha, iterations, connectivity, exact, backend, sigma):
    return f.new_empty(f.shape)


@torch.library.custom_op("scm_ops::chebyshev_filter_backward", mutates_args=())
def _chebyshev_filter_backward_op(grad_u: torch.Tensor, f: torch.Tensor, w: torch.Tensor, d: torch.Tensor,
                                  alpha: float, iterations: int, connectivity: int, exact: bool, backend: str,
                                  sigma: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    offsets = OFFSETS[connectivity]
    plan = _series_plan(w, d, alpha, iterations, offsets, exact, f.dtype, sigma)
    dtype = f.dtype
    grad_u, f, w, d = (t.to(WORKING_DTYPE) for t in (grad_u, f, w, d))
    _, vy, phi_f = _series_forward(f, w, d, plan, offsets, backend)
    grads = _series_backward(grad_u.contiguous(), w, d, vy, phi_f, plan, offsets, backend)
    return tuple(g.to(dtype).contiguous() for g in grads)


@_chebyshev_filter_backward_op.register_fake
def _(grad_u, f, w, d, alpha, iterations, connectivity, exact, backend, sigma):
    return f.new_empty(f.shape), w.new_empty(w.shape), d.new_empty(d.shape)   # contiguous, as the real ones


def _setup_context(ctx, inputs, output):
    f, w, d, alpha, iterations, connectivity, exact, backend, sigma = inputs
    ctx.save_for_backward(f, w, d, sigma)
    ctx.args = (alpha, iterations, connectivity, exact, backend)


def _backward(ctx, grad_u):
    f, w, d, sigma = ctx.saved_tensors
    grads = _chebyshev_filter_backward_op(grad_u, f, w, d, *ctx.args, sigma)
    return (*grads, None, None, None, None, None, None)


_chebyshev_filter_op.register_autograd(_backward, setup_context=_setup_context)


def chebyshev_filter(f: torch.Tensor, w: torch.Tensor, d: torch.Tensor, alpha: float, iterations: int,
                     offsets, exact: bool, backend: str = "torch", sigma: torch.Tensor | None = None) -> torch.Tensor:
    """u = X_p F by the Chebyshev series (see ChebyshevFilter): the autograd Function in eager
    mode (the basis saved for backward), the custom operator under torch.compile (the basis
    recomputed in backward). `backend` "triton" runs the series in one program per image
    (grids up to chebyshev_max_cells(connectivity) cells), "torch" in PyTorch. `sigma` [B]:
    sigma_max_bound of the stencil if already computed (the divergence check returns it)."""
    if torch.compiler.is_compiling():
        return _chebyshev_filter_op(f, w, d, float(alpha), int(iterations), 2 * len(offsets), bool(exact), backend,
                                    sigma)
    return ChebyshevFilter.apply(f, w, d, alpha, iterations, offsets, exact, None, backend, sigma)
