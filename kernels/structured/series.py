"""u = X_p F as 2^p steps of x <- x + alpha L (F - L x), one program per image holding L
and the vectors in registers for all steps; forward and backward (both gradient semantics)."""
import triton
import triton.language as tl

from .stencil import _flat_add_pair_sums, _flat_grad_planes, _flat_image, _flat_matvec

# One program holds a whole grid: the launcher takes the smallest BLOCK_N here that holds
# the grid's cells (up to 16 x 16, 22 x 22, 32 x 32); larger grids run in PyTorch, and so
# do 8-neighbour grids above EIGHT_NEIGHBOUR_MAX_BLOCK_N cells: at BLOCK_N = 1024 their
# float64 backward spilled registers (4-44 B at 8 warps, 336-400 B at 16 on sm_90).
BLOCK_N_CHOICES = (256, 512, 1024)
EIGHT_NEIGHBOUR_MAX_BLOCK_N = 512
# Warps per program: spill-free for every block size and flag the launcher uses, with Triton
# 3.8 and 3.9, on every target of python -m scm_ops.aot but one (sm_75, below). The float64
# backward takes 16: with 8, Triton 3.8's sm_90 build of the exact backward at BLOCK_N = 1024
# was held to 128 registers and spilled 4 B (Triton 3.9: 172 registers, no spill); with 16
# it needs at most 100 registers on sm_75-sm_90 with either version. The stencil products
# use the flat form of stencil.py; in the masked form the backward spilled at 512 cells with
# 8 warps.
CONFIGS = {
    "stencil_series_fwd_kernel": {"fp32": dict(num_warps=8), "fp64": dict(num_warps=8)},
    "stencil_series_bwd_kernel": {"fp32": dict(num_warps=8), "fp64": dict(num_warps=16)},
}

# Ahead-of-time check (python -m scm_ops.aot): per kernel, the types of its run-time
# arguments ("*in": pointer of the input dtype, "i32"), the input dtypes its launcher passes
# and the values each constexpr takes at launch, less the combinations never launched.
# The backward allows 8 B of spills on sm_75 (4 B stored, 4 B loaded: one value): Triton
# 3.9's sm_75 build of the float64 8-neighbour published backward at BLOCK_N = 256 (16
# warps) is held by ptxas to 64 registers and spills it; Triton 3.8 does not spill there,
# and neither version does on sm_80-sm_90. With 8 warps that build is spill-free, but Triton
# 3.8's sm_90 build spills 4 + 4 B at BLOCK_N = 1024 (above); with a register cap given to
# ptxas (Triton's maxnreg option, 128 or more) neither spills.
_WIDE_EIGHT = [dict(EIGHT_NEIGHBOURS=True, BLOCK_N=b) for b in BLOCK_N_CHOICES if b > EIGHT_NEIGHBOUR_MAX_BLOCK_N]
AOT = {
    "stencil_series_fwd_kernel": dict(args=["*in"] * 8 + ["i32"] * 4, dtypes=("fp32", "fp64"), exclude=_WIDE_EIGHT,
                                      choices={"EIGHT_NEIGHBOURS": (False, True), "BLOCK_N": BLOCK_N_CHOICES}),
    "stencil_series_bwd_kernel": dict(args=["*in"] * 10 + ["i32"] * 4, dtypes=("fp32", "fp64"), exclude=_WIDE_EIGHT,
                                      choices={"EIGHT_NEIGHBOURS": (False, True), "EXACT": (False, True),
                                               "BLOCK_N": BLOCK_N_CHOICES},
                                      max_spill_bytes={75: 8}),
}


@triton.jit
def stencil_series_fwd_kernel(
    f_ptr, planes_ptr, d_ptr, u_ptr, xs_ptr, rs_ptr, scratch_ptr, alpha_ptr, B, H, W, STEPS,
    EIGHT_NEIGHBOURS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """u = x_STEPS with x_0 = 0, r_j = F - L x_j, x_{j+1} = x_j + alpha L r_j; the x_j and
    r_j go to xs, rs [STEPS, B, H, W] for the backward. Grid (B,); planes [B, 2K, BLOCK_N]
    and a zeroed scratch [B, 3 BLOCK_N] (stencil.py, the flat form); alpha is a one-element
    tensor of the vectors' dtype (a float argument would be fp32)."""
    N = H * W
    b, offs, inside, d, planes_ptr, scratch_ptr = _flat_image(d_ptr, planes_ptr, scratch_ptr, H, W,
                                                              EIGHT_NEIGHBOURS, BLOCK_N)
    alpha = tl.load(alpha_ptr)
    f = tl.load(f_ptr + b * N + offs, mask=inside, other=0.0)
    x = tl.zeros_like(f)
    for j in range(STEPS):
        res = f - _flat_matvec(scratch_ptr, planes_ptr, d, x, offs, inside, W, EIGHT_NEIGHBOURS, BLOCK_N)
        tl.store(xs_ptr + (j * B + b) * N + offs, x, mask=inside)
        tl.store(rs_ptr + (j * B + b) * N + offs, res, mask=inside)
        x += alpha * _flat_matvec(scratch_ptr, planes_ptr, d, res, offs, inside, W, EIGHT_NEIGHBOURS, BLOCK_N)
    tl.store(u_ptr + b * N + offs, x, mask=inside)


@triton.jit
def stencil_series_bwd_kernel(
    grad_u_ptr, planes_ptr, d_ptr, xs_ptr, rs_ptr, grad_f_ptr, grad_w_ptr, grad_d_ptr, scratch_ptr,
    alpha_ptr, B, H, W, STEPS,
    EXACT: tl.constexpr, EIGHT_NEIGHBOURS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of stencil_series_fwd_kernel. From a = du, for j = STEPS-1 .. 0:
    b_j = alpha L a, then a <- a - L b_j (a before the update is a_{j+1}), and
        dF += b_j;  dw_k[n] -= b_j[n] x_j[n+m] + b_j[n+m] x_j[n];  dd -= b_j x_j,
    plus, with EXACT, alpha (a_{j+1}[n] r_j[n+m] + a_{j+1}[n+m] r_j[n]) and alpha a_{j+1} r_j.
    The dw planes accumulate in grad_w [B, K, H, W] itself; their pairs across a row end
    are left for the launcher to zero. Grid (B,)."""
    N = H * W
    b, offs, inside, d, planes_ptr, scratch_ptr = _flat_image(d_ptr, planes_ptr, scratch_ptr, H, W,
                                                              EIGHT_NEIGHBOURS, BLOCK_N)
    alpha = tl.load(alpha_ptr)
    a = tl.load(grad_u_ptr + b * N + offs, mask=inside, other=0.0)
    grad_f = tl.zeros_like(a)
    grad_d = tl.zeros_like(a)
    grad_w_ptr = _flat_grad_planes(grad_w_ptr, b, offs, inside, N, EIGHT_NEIGHBOURS)
    for i in range(STEPS):
        j = STEPS - 1 - i
        x_ptr = xs_ptr + (j * B + b) * N
        res_ptr = rs_ptr + (j * B + b) * N
        bj = alpha * _flat_matvec(scratch_ptr, planes_ptr, d, a, offs, inside, W, EIGHT_NEIGHBOURS, BLOCK_N)
        if EXACT:  # a = a_{j+1} is published now
            res = tl.load(res_ptr + offs, mask=inside, other=0.0)
            grad_d += alpha * a * res
            _flat_add_pair_sums(grad_w_ptr, alpha, scratch_ptr, a, res_ptr, offs, inside, N, W, EIGHT_NEIGHBOURS)
        a -= _flat_matvec(scratch_ptr, planes_ptr, d, bj, offs, inside, W, EIGHT_NEIGHBOURS, BLOCK_N)
        # b_j is published now
        grad_f += bj
        grad_d -= bj * tl.load(x_ptr + offs, mask=inside, other=0.0)
        _flat_add_pair_sums(grad_w_ptr, -1.0, scratch_ptr, bj, x_ptr, offs, inside, N, W, EIGHT_NEIGHBOURS)
    tl.store(grad_f_ptr + b * N + offs, grad_f, mask=inside)
    tl.store(grad_d_ptr + b * N + offs, grad_d, mask=inside)
