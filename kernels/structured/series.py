"""u = X_p F as 2^p steps of x <- x + alpha L (F - L x), one program per image holding L
and the vectors in registers for all steps; forward and backward (both gradient semantics)."""
import triton
import triton.language as tl

from .stencil import _pair_sum, _stencil_matvec

CONFIGS = {"fp32": dict(num_warps=8), "fp64": dict(num_warps=8)}
# One program holds a whole grid: the launcher takes the smallest BLOCK_N here that holds
# the grid's cells (up to 16 x 16, 22 x 22, 32 x 32); larger grids run in PyTorch.
BLOCK_N_CHOICES = (256, 512, 1024)

# Ahead-of-time check (python -m scm_ops.aot): per kernel, the types of its run-time
# arguments ("*in": pointer of the input dtype, "*acc": of the accumulation dtype, "i32",
# "fp32"), the input dtypes its launcher passes (default all four) and the values each
# constexpr that is not in CONFIGS takes at launch (IS_FP64 follows the dtype).
AOT = {
    "stencil_series_fwd_kernel": dict(args=["*in"] * 8 + ["i32"] * 4, dtypes=("fp32", "fp64"),
                                      choices={"EIGHT_NEIGHBOURS": (False, True), "BLOCK_N": BLOCK_N_CHOICES}),
    "stencil_series_bwd_kernel": dict(args=["*in"] * 10 + ["i32"] * 4, dtypes=("fp32", "fp64"),
                                      choices={"EIGHT_NEIGHBOURS": (False, True), "EXACT": (False, True),
                                               "BLOCK_N": BLOCK_N_CHOICES}),
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
