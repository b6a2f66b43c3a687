"""u = X_p F as 2^p steps of x <- x + alpha L (F - L x), one program per image holding L
and the vectors in registers for all steps; forward and backward (both gradient semantics)."""
import triton
import triton.language as tl

from .stencil import _add_pair_sums, _stencil_matvec

# One program holds a whole grid: the launcher takes the smallest BLOCK_N here that holds
# the grid's cells (up to 16 x 16, 22 x 22, 32 x 32); larger grids run in PyTorch, and so
# do 8-neighbour grids above EIGHT_NEIGHBOUR_MAX_BLOCK_N cells: at BLOCK_N = 1024 their
# backward spilled registers at every warp count tried (8 warps: up to 440 B in float64,
# 40 B in float32; 16 warps, capped at 128 registers a thread: 52-184 B).
BLOCK_N_CHOICES = (256, 512, 1024)
EIGHT_NEIGHBOUR_MAX_BLOCK_N = 512
# Blocks up to NARROW_MAX_BLOCK_N cells take the kernels as written; larger ones take the
# *_wide_kernel copies of the same code (4 neighbours only), whose backward runs 16 warps
# so that a thread holds fewer cells. Warps per kernel and dtype are the spill-free ones
# found by python -m scm_ops.aot (e.g. the float64 backward at BLOCK_N = 512 spilled 8 B at
# 8 warps, the float64 forward at 512, 8 neighbours, 4 B at 16 warps).
NARROW_MAX_BLOCK_N = 512
CONFIGS = {
    "stencil_series_fwd_kernel": {"fp32": dict(num_warps=8), "fp64": dict(num_warps=8)},
    "stencil_series_bwd_kernel": {"fp32": dict(num_warps=8), "fp64": dict(num_warps=16)},
    "stencil_series_fwd_wide_kernel": {"fp32": dict(num_warps=8), "fp64": dict(num_warps=8)},
    "stencil_series_bwd_wide_kernel": {"fp32": dict(num_warps=16), "fp64": dict(num_warps=16)},
}

# Ahead-of-time check (python -m scm_ops.aot): per kernel, the types of its run-time
# arguments ("*in": pointer of the input dtype, "*acc": of the accumulation dtype, "i32",
# "fp32"), the input dtypes its launcher passes (default all four) and the values each
# constexpr that is not in CONFIGS takes at launch (IS_FP64 follows the dtype).
_NARROW = tuple(b for b in BLOCK_N_CHOICES if b <= NARROW_MAX_BLOCK_N)
_WIDE = tuple(b for b in BLOCK_N_CHOICES if b > NARROW_MAX_BLOCK_N)
_FWD = dict(args=["*in"] * 8 + ["i32"] * 4, dtypes=("fp32", "fp64"))
_BWD = dict(args=["*in"] * 10 + ["i32"] * 4, dtypes=("fp32", "fp64"))
AOT = {
    "stencil_series_fwd_kernel": dict(_FWD, choices={"EIGHT_NEIGHBOURS": (False, True), "BLOCK_N": _NARROW}),
    "stencil_series_bwd_kernel": dict(_BWD, choices={"EIGHT_NEIGHBOURS": (False, True), "EXACT": (False, True),
                                                     "BLOCK_N": _NARROW}),
    "stencil_series_fwd_wide_kernel": dict(_FWD, choices={"EIGHT_NEIGHBOURS": (False,), "BLOCK_N": _WIDE}),
    "stencil_series_bwd_wide_kernel": dict(_BWD, choices={"EIGHT_NEIGHBOURS": (False,), "EXACT": (False, True),
                                                          "BLOCK_N": _WIDE}),
}


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
def stencil_series_bwd_kernel(
    grad_u_ptr, w_ptr, d_ptr, xs_ptr, rs_ptr, grad_f_ptr, grad_w_ptr, grad_d_ptr, scratch_ptr,
    alpha_ptr, B, H, W, STEPS,
    EXACT: tl.constexpr, EIGHT_NEIGHBOURS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of stencil_series_fwd_kernel. From a = du, for j = STEPS-1 .. 0:
    b_j = alpha L a, then a <- a - L b_j (a before the update is a_{j+1}), and
        dF += b_j;  dw_k[n] -= b_j[n] x_j[n+o] + b_j[n+o] x_j[n];  dd -= b_j x_j,
    plus, with EXACT, alpha (a_{j+1}[n] r_j[n+o] + a_{j+1}[n+o] r_j[n]) and alpha a_{j+1} r_j.
    The dw planes accumulate in grad_w itself. Grid (B,)."""
    K: tl.constexpr = 4 if EIGHT_NEIGHBOURS else 2
    N = H * W
    b, offs, inside, r, c, alpha, d, w_ptr, scratch_ptr = _series_program(
        alpha_ptr, d_ptr, w_ptr, scratch_ptr, H, W, EIGHT_NEIGHBOURS, BLOCK_N)
    a = tl.load(grad_u_ptr + b * N + offs, mask=inside, other=0.0)
    grad_f = tl.zeros_like(a)
    grad_d = tl.zeros_like(a)
    grad_w_ptr += b * K * N  # 0 where n + o_k is off the grid: _shifted reads 0 there
    for k in tl.static_range(K):
        tl.store(grad_w_ptr + k * N + offs, grad_f, mask=inside)
    for i in range(STEPS):
        j = STEPS - 1 - i
        x_ptr = xs_ptr + (j * B + b) * N
        res_ptr = rs_ptr + (j * B + b) * N
        bj = alpha * _stencil_matvec(scratch_ptr, w_ptr, d, a, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
        if EXACT:  # a = a_{j+1} is published now
            res = tl.load(res_ptr + offs, mask=inside, other=0.0)
            grad_d += alpha * a * res
            _add_pair_sums(grad_w_ptr, alpha, scratch_ptr, a, res_ptr, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
        a -= _stencil_matvec(scratch_ptr, w_ptr, d, bj, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
        # b_j is published now
        grad_f += bj
        grad_d -= bj * tl.load(x_ptr + offs, mask=inside, other=0.0)
        _add_pair_sums(grad_w_ptr, -1.0, scratch_ptr, bj, x_ptr, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
    tl.store(grad_f_ptr + b * N + offs, grad_f, mask=inside)
    tl.store(grad_d_ptr + b * N + offs, grad_d, mask=inside)


# The same kernels for blocks above NARROW_MAX_BLOCK_N (4 neighbours), launched with CONFIGS' warps.
stencil_series_fwd_wide_kernel = triton.jit(stencil_series_fwd_kernel.fn)
stencil_series_bwd_wide_kernel = triton.jit(stencil_series_bwd_kernel.fn)
