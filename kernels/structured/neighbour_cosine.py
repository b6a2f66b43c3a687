"""Cosines of the C-vectors of grid neighbours only, reduced over C in registers; the
backward adds its gradient into the buffer that already holds the gradient of the residual
scaling (scm_ops/structured/grad_slot.py)."""
import triton
import triton.language as tl

from .stencil import _neighbour, _shifted

CONFIGS = {
    # BLOCK_P: cells per program; BLOCK_C: channels per step of the reductions.
    "fp32": dict(BLOCK_C=64, BLOCK_P=64, num_warps=8),
    "fp64": dict(BLOCK_C=32, BLOCK_P=64, num_warps=8),
}

# Ahead-of-time check (python -m scm_ops.aot): per kernel, the types of its run-time
# arguments ("*in": pointer of the input dtype, "*acc": of the accumulation dtype, "i32",
# "fp32"), the input dtypes its launcher passes (default all four) and the values each
# constexpr that is not in CONFIGS takes at launch (IS_FP64 follows the dtype).
AOT = {
    "neighbour_cosine_fwd_kernel": dict(args=["*in"] * 3 + ["i32"] * 3, dtypes=("fp32", "fp64"),
                                        choices={"EIGHT_NEIGHBOURS": (False, True)}),
    "neighbour_cosine_bwd_kernel": dict(args=["*in"] * 4 + ["i32"] * 3, dtypes=("fp32", "fp64"),
                                        choices={"EIGHT_NEIGHBOURS": (False, True)}),
}


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
def _store_cosine(e_ptr, k: tl.constexpr, dot, sq_here, sq_there, offs, inside, N, IS_FP64: tl.constexpr):
    """e = dot / (|s_n| |s_m|), 0 where a norm is 0. float32 takes correctly rounded sqrt
    and division (sqrt_rn, div_rn): the GPU's default approximate ones flush subnormal
    inputs, so a vector with 0 < |s|^2 < 1.2e-38 would get the cosine 0 instead of its
    value. float64 sqrt and division are IEEE already (and the _rn forms are fp32 only)."""
    if IS_FP64:
        den = tl.sqrt(sq_here) * tl.sqrt(sq_there)
        e = tl.where(den > 0, dot / tl.where(den > 0, den, 1.0), 0.0)
    else:
        den = tl.sqrt_rn(sq_here) * tl.sqrt_rn(sq_there)
        e = tl.where(den > 0, tl.div_rn(dot, tl.where(den > 0, den, 1.0)), 0.0)
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
    _store_cosine(e_ptr, 0, dot0, sq, sq0, offs, inside, N, IS_FP64)
    _store_cosine(e_ptr, 1, dot1, sq, sq1, offs, inside, N, IS_FP64)
    if EIGHT_NEIGHBOURS:
        _store_cosine(e_ptr, 2, dot2, sq, sq2, offs, inside, N, IS_FP64)
        _store_cosine(e_ptr, 3, dot3, sq, sq3, offs, inside, N, IS_FP64)
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
