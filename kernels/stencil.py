"""The structured fast path of activation diffusion on the GPU (SPEC section 4).

L is a stencil on the H x W grid: (L x)[n] = d[n] x[n] + sum_k w_k[n] x[n + o_k] +
w_k[n - o_k] x[n - o_k], with offsets o_k = (0, 1), (1, 0) and, for 8 neighbours, also
(1, 1), (1, -1). Planes are row-major and contiguous: w [B, K, H, W], d and vectors
[B, H, W], the semantic map S [B, C, H, W].

- neighbour_cosine_fwd_kernel / neighbour_cosine_bwd_kernel: cosines of the C-vectors of
  grid neighbours only, reduced over C in registers; the backward adds its gradient into
  the buffer that already holds the gradient of the residual scaling.
- stencil_series_fwd_kernel / stencil_series_bwd_kernel: u = X_p F as 2^p steps of
  x <- x + alpha L (F - L x), one program per image holding L and the vectors in
  registers for all steps. A stencil product needs each vector at the neighbours' cells:
  the program publishes the vector to a per-image scratch row (global memory, cached) and
  reads it back shifted, with a CTA barrier on both sides of the write.
"""
import triton
import triton.language as tl

CONFIGS = {
    # BLOCK_N: cells per program (the series holds a whole grid: next power of two >= N,
    # chosen by the launcher); BLOCK_C: channels per step of the cosine reductions.
    "fp32": dict(BLOCK_C=64, BLOCK_P=64, num_warps=8),
    "fp64": dict(BLOCK_C=32, BLOCK_P=64, num_warps=8),
}


@triton.jit
def _neighbour(r, c, H, W, dr: tl.constexpr, dc: tl.constexpr):
    """(flat index of n + o, whether it is on the grid) for every cell n = (r, c), o = (dr, dc).
    Lanes past the grid (r >= H, padding) are never on it."""
    rr = r + dr
    cc = c + dc
    return rr * W + cc, (r < H) & (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)


@triton.jit
def _shifted(ptr, r, c, H, W, dr: tl.constexpr, dc: tl.constexpr):
    """ptr[n + o] at every cell n = (r, c); 0 where n + o leaves the grid."""
    idx, ok = _neighbour(r, c, H, W, dr, dc)
    return tl.load(ptr + idx, mask=ok, other=0.0)


# ---------------------------------------------------------------- neighbour cosines
@triton.jit
def _shifted_channels(s_ptr, offs_c, c_ok, r, cl, H, W, N, dr: tl.constexpr, dc: tl.constexpr):
    """s[c, n + o] for this channel chunk and every cell n, [BLOCK_C, BLOCK_P]; 0 where
    n + o leaves the grid or c >= C."""
    idx, ok = _neighbour(r, cl, H, W, dr, dc)
    return tl.load(s_ptr + offs_c[:, None] * N + idx[None, :], mask=c_ok[:, None] & ok[None, :], other=0.0)


@triton.jit
def _cosine_offset(s_ptr, offs_c, c_ok, r, cl, H, W, N, here, dr: tl.constexpr, dc: tl.constexpr):
    """(<s_n, s_{n+o}> partial over this channel chunk, |s_{n+o}|^2 partial)."""
    there = _shifted_channels(s_ptr, offs_c, c_ok, r, cl, H, W, N, dr, dc)
    return tl.sum(here * there, axis=0), tl.sum(there * there, axis=0)


@triton.jit
def _store_cosine(e_ptr, k: tl.constexpr, dot, sq_here, sq_there, offs, inside, N):
    den = tl.sqrt(sq_here) * tl.sqrt(sq_there)
    e = tl.where(den > 0, dot / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(e_ptr + k * N + offs, e.to(e_ptr.dtype.element_ty), mask=inside)


@triton.jit
def neighbour_cosine_fwd_kernel(
    s_ptr, e_ptr, sq_ptr, C, H, W,
    EIGHT_NEIGHBOURS: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """e[b, k, n] = cos(s_n, s_{n + o_k}) (0 off the grid or for a zero vector) and
    sq[b, n] = |s_n|^2. Grid (cdiv(N, BLOCK_P), B); s contiguous [B, C, H, W]."""
    acc_t = tl.float64 if IS_FP64 else tl.float32
    N = H * W
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = offs < N
    r = offs // W
    cl = offs % W
    s_ptr += b * C * N
    sq = tl.zeros([BLOCK_P], acc_t)
    dot0 = tl.zeros([BLOCK_P], acc_t)
    dot1 = tl.zeros([BLOCK_P], acc_t)
    dot2 = tl.zeros([BLOCK_P], acc_t)
    dot3 = tl.zeros([BLOCK_P], acc_t)
    sq0 = tl.zeros([BLOCK_P], acc_t)
    sq1 = tl.zeros([BLOCK_P], acc_t)
    sq2 = tl.zeros([BLOCK_P], acc_t)
    sq3 = tl.zeros([BLOCK_P], acc_t)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        here = tl.load(s_ptr + offs_c[:, None] * N + offs[None, :], mask=c_ok[:, None] & inside[None, :],
                       other=0.0).to(acc_t)
        sq += tl.sum(here * here, axis=0)
        d, q = _cosine_offset(s_ptr, offs_c, c_ok, r, cl, H, W, N, here, 0, 1)
        dot0 += d
        sq0 += q
        d, q = _cosine_offset(s_ptr, offs_c, c_ok, r, cl, H, W, N, here, 1, 0)
        dot1 += d
        sq1 += q
        if EIGHT_NEIGHBOURS:
            d, q = _cosine_offset(s_ptr, offs_c, c_ok, r, cl, H, W, N, here, 1, 1)
            dot2 += d
            sq2 += q
            d, q = _cosine_offset(s_ptr, offs_c, c_ok, r, cl, H, W, N, here, 1, -1)
            dot3 += d
            sq3 += q
    K: tl.constexpr = 4 if EIGHT_NEIGHBOURS else 2
    e_ptr += b * K * N
    _store_cosine(e_ptr, 0, dot0, sq, sq0, offs, inside, N)
    _store_cosine(e_ptr, 1, dot1, sq, sq1, offs, inside, N)
    if EIGHT_NEIGHBOURS:
        _store_cosine(e_ptr, 2, dot2, sq, sq2, offs, inside, N)
        _store_cosine(e_ptr, 3, dot3, sq, sq3, offs, inside, N)
    tl.store(sq_ptr + b * N + offs, sq.to(sq_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _cosine_grad_offset(s_ptr, coef_ptr, offs_c, c_ok, r, cl, H, W, N, dr: tl.constexpr, dc: tl.constexpr):
    """coef_k[n] s_{n+o} + coef_k[n-o] s_{n-o} for this channel chunk, [BLOCK_C, BLOCK_P]."""
    plus = _shifted_channels(s_ptr, offs_c, c_ok, r, cl, H, W, N, dr, dc)
    minus = _shifted_channels(s_ptr, offs_c, c_ok, r, cl, H, W, N, -dr, -dc)
    coef_here = _shifted(coef_ptr, r, cl, H, W, 0, 0)
    coef_minus = _shifted(coef_ptr, r, cl, H, W, -dr, -dc)
    return coef_here[None, :] * plus + coef_minus[None, :] * minus


@triton.jit
def neighbour_cosine_bwd_kernel(
    s_ptr, coef_ptr, radial_ptr, grad_s_ptr, C, H, W,
    EIGHT_NEIGHBOURS: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_s[b, :, n] += sum_k (coef_k[n] s_{n+o_k} + coef_k[n-o_k] s_{n-o_k}) - radial[n] s_n,
    in place. coef [B, K, H, W] = grad_e r_n r_{n+o_k}; radial [B, H, W] = r_n^2 sum of
    grad_e e over the pairs of n. Grid (cdiv(N, BLOCK_P), cdiv(C, BLOCK_C), B)."""
    acc_t = tl.float64 if IS_FP64 else tl.float32
    K: tl.constexpr = 4 if EIGHT_NEIGHBOURS else 2
    N = H * W
    b = tl.program_id(2).to(tl.int64)
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = offs < N
    c_ok = offs_c < C
    r = offs // W
    cl = offs % W
    s_ptr += b * C * N
    coef_ptr += b * K * N
    tile = offs_c[:, None] * N + offs[None, :]
    mask = c_ok[:, None] & inside[None, :]
    here = tl.load(s_ptr + tile, mask=mask, other=0.0).to(acc_t)
    radial = tl.load(radial_ptr + b * N + offs, mask=inside, other=0.0).to(acc_t)
    acc = tl.load(grad_s_ptr + b * C * N + tile, mask=mask, other=0.0).to(acc_t) - radial[None, :] * here
    acc += _cosine_grad_offset(s_ptr, coef_ptr, offs_c, c_ok, r, cl, H, W, N, 0, 1).to(acc_t)
    acc += _cosine_grad_offset(s_ptr, coef_ptr + N, offs_c, c_ok, r, cl, H, W, N, 1, 0).to(acc_t)
    if EIGHT_NEIGHBOURS:
        acc += _cosine_grad_offset(s_ptr, coef_ptr + 2 * N, offs_c, c_ok, r, cl, H, W, N, 1, 1).to(acc_t)
        acc += _cosine_grad_offset(s_ptr, coef_ptr + 3 * N, offs_c, c_ok, r, cl, H, W, N, 1, -1).to(acc_t)
    tl.store(grad_s_ptr + b * C * N + tile, acc.to(grad_s_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- matrix-free series
@triton.jit
def _publish(scratch_ptr, offs, inside, x):
    """Write x to this program's scratch row so every thread can read it shifted."""
    tl.debug_barrier()  # every read of the previous vector is done
    tl.store(scratch_ptr + offs, x, mask=inside)
    tl.debug_barrier()  # the write is visible to the whole CTA


@triton.jit
def _stencil_term(scratch_ptr, w_ptr, r, c, H, W, inside, offs, dr: tl.constexpr, dc: tl.constexpr):
    """w_k[n] x[n + o] + w_k[n - o] x[n - o], x the published vector."""
    w_here = tl.load(w_ptr + offs, mask=inside, other=0.0)
    return (w_here * _shifted(scratch_ptr, r, c, H, W, dr, dc)
            + _shifted(w_ptr, r, c, H, W, -dr, -dc) * _shifted(scratch_ptr, r, c, H, W, -dr, -dc))


@triton.jit
def _stencil_matvec(scratch_ptr, w_ptr, d, x, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS: tl.constexpr):
    """L x; leaves x published in the scratch row."""
    N = H * W
    _publish(scratch_ptr, offs, inside, x)
    y = d * x
    y += _stencil_term(scratch_ptr, w_ptr, r, c, H, W, inside, offs, 0, 1)
    y += _stencil_term(scratch_ptr, w_ptr + N, r, c, H, W, inside, offs, 1, 0)
    if EIGHT_NEIGHBOURS:
        y += _stencil_term(scratch_ptr, w_ptr + 2 * N, r, c, H, W, inside, offs, 1, 1)
        y += _stencil_term(scratch_ptr, w_ptr + 3 * N, r, c, H, W, inside, offs, 1, -1)
    return y


@triton.jit
def _series_program(alpha_ptr, d_ptr, w_ptr, scratch_ptr, H, W, EIGHT_NEIGHBOURS: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """This program's image b and cells (offs, in-grid mask, row, column), alpha, the
    diagonal d, and pointers to the image's weight planes and scratch row."""
    K: tl.constexpr = 4 if EIGHT_NEIGHBOURS else 2
    N = H * W
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    inside = offs < N
    d = tl.load(d_ptr + b * N + offs, mask=inside, other=0.0)
    return (b, offs, inside, offs // W, offs % W, tl.load(alpha_ptr), d, w_ptr + b * K * N,
            scratch_ptr + b * BLOCK_N)


@triton.jit
def stencil_series_fwd_kernel(
    f_ptr, w_ptr, d_ptr, u_ptr, xs_ptr, rs_ptr, scratch_ptr, alpha_ptr, B, H, W, STEPS,
    EIGHT_NEIGHBOURS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """u = x_STEPS with x_0 = 0, r_j = F - L x_j, x_{j+1} = x_j + alpha L r_j; the x_j and
    r_j go to xs, rs [STEPS, B, H, W] for the backward. Grid (B,); scratch [B, BLOCK_N];
    alpha is a one-element tensor of the vectors' dtype (a float argument would be fp32)."""
    N = H * W
    b, offs, inside, r, c, alpha, d, w_ptr, scratch_ptr = _series_program(
        alpha_ptr, d_ptr, w_ptr, scratch_ptr, H, W, EIGHT_NEIGHBOURS, BLOCK_N)
    f = tl.load(f_ptr + b * N + offs, mask=inside, other=0.0)
    x = tl.zeros_like(f)
    for j in range(STEPS):
        res = f - _stencil_matvec(scratch_ptr, w_ptr, d, x, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
        tl.store(xs_ptr + (j * B + b) * N + offs, x, mask=inside)
        tl.store(rs_ptr + (j * B + b) * N + offs, res, mask=inside)
        x += alpha * _stencil_matvec(scratch_ptr, w_ptr, d, res, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
    tl.store(u_ptr + b * N + offs, x, mask=inside)


@triton.jit
def _pair_sum(scratch_ptr, p, q_ptr, r, c, H, W, inside, offs, dr: tl.constexpr, dc: tl.constexpr):
    """p[n] q[n + o] + p[n + o] q[n], p the published vector (also given in registers)."""
    q_here = tl.load(q_ptr + offs, mask=inside, other=0.0)
    return p * _shifted(q_ptr, r, c, H, W, dr, dc) + _shifted(scratch_ptr, r, c, H, W, dr, dc) * q_here


@triton.jit
def stencil_series_bwd_kernel(
    grad_u_ptr, w_ptr, d_ptr, xs_ptr, rs_ptr, grad_f_ptr, grad_w_ptr, grad_d_ptr, scratch_ptr,
    alpha_ptr, B, H, W, STEPS,
    EXACT: tl.constexpr, EIGHT_NEIGHBOURS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of stencil_series_fwd_kernel. From a = du, for j = STEPS-1 .. 0:
    b_j = alpha L a, then a <- a - L b_j (a before the update is a_{j+1}), and
        dF += b_j;  dw_k[n] -= b_j[n] x_j[n+o] + b_j[n+o] x_j[n];  dd -= b_j x_j,
    plus, with EXACT, alpha (a_{j+1}[n] r_j[n+o] + a_{j+1}[n+o] r_j[n]) and alpha a_{j+1} r_j.
    Grid (B,)."""
    K: tl.constexpr = 4 if EIGHT_NEIGHBOURS else 2
    N = H * W
    b, offs, inside, r, c, alpha, d, w_ptr, scratch_ptr = _series_program(
        alpha_ptr, d_ptr, w_ptr, scratch_ptr, H, W, EIGHT_NEIGHBOURS, BLOCK_N)
    a = tl.load(grad_u_ptr + b * N + offs, mask=inside, other=0.0)
    grad_f = tl.zeros_like(a)
    grad_d = tl.zeros_like(a)
    gw0 = tl.zeros_like(a)
    gw1 = tl.zeros_like(a)
    gw2 = tl.zeros_like(a)
    gw3 = tl.zeros_like(a)
    for i in range(STEPS):
        j = STEPS - 1 - i
        x_ptr = xs_ptr + (j * B + b) * N
        res_ptr = rs_ptr + (j * B + b) * N
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
        bj = alpha * _stencil_matvec(scratch_ptr, w_ptr, d, a, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
        if EXACT:  # a = a_{j+1} is published now
            res = tl.load(res_ptr + offs, mask=inside, other=0.0)
            grad_d += alpha * a * res
            gw0 += alpha * _pair_sum(scratch_ptr, a, res_ptr, r, c, H, W, inside, offs, 0, 1)
            gw1 += alpha * _pair_sum(scratch_ptr, a, res_ptr, r, c, H, W, inside, offs, 1, 0)
            if EIGHT_NEIGHBOURS:
                gw2 += alpha * _pair_sum(scratch_ptr, a, res_ptr, r, c, H, W, inside, offs, 1, 1)
                gw3 += alpha * _pair_sum(scratch_ptr, a, res_ptr, r, c, H, W, inside, offs, 1, -1)
        a -= _stencil_matvec(scratch_ptr, w_ptr, d, bj, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
        # b_j is published now
        grad_f += bj
        grad_d -= bj * x
        gw0 -= _pair_sum(scratch_ptr, bj, x_ptr, r, c, H, W, inside, offs, 0, 1)
        gw1 -= _pair_sum(scratch_ptr, bj, x_ptr, r, c, H, W, inside, offs, 1, 0)
        if EIGHT_NEIGHBOURS:
            gw2 -= _pair_sum(scratch_ptr, bj, x_ptr, r, c, H, W, inside, offs, 1, 1)
            gw3 -= _pair_sum(scratch_ptr, bj, x_ptr, r, c, H, W, inside, offs, 1, -1)
    tl.store(grad_f_ptr + b * N + offs, grad_f, mask=inside)
    tl.store(grad_d_ptr + b * N + offs, grad_d, mask=inside)
    grad_w_ptr += b * K * N  # 0 where n + o_k is off the grid: _shifted reads 0 there
    tl.store(grad_w_ptr + offs, gw0, mask=inside)
    tl.store(grad_w_ptr + N + offs, gw1, mask=inside)
    if EIGHT_NEIGHBOURS:
        tl.store(grad_w_ptr + 2 * N + offs, gw2, mask=inside)
        tl.store(grad_w_ptr + 3 * N + offs, gw3, mask=inside)
