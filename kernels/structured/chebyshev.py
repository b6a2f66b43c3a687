"""u = X_p F as a Chebyshev series in Z = L^2 (docs/structured.md, "Chebyshev series"), one
program per image for the whole series: the forward builds the basis v_k = T_k(Y) F,
Y = I - Lh^2 / 2, Lh = (2/R) L, by its three-term recurrence and sums phi(Z) F = sum_k c_k v_k;
the backward runs the recurrence in reverse (Clenshaw) on one or two adjoint streams and
reads the gradient of L at the stencil entries as it goes. The recurrence's vectors stay in
registers for all steps; the memory traffic per step is the shifted reads of the stencil
products (a per-image scratch row, cached), the basis (written once by the forward, read
once by the backward), and in the backward the gradient planes and diagonal (accumulated
in memory) and the two cotangent streams (re-read rather than held: fewer live registers).

Everything runs in float64 (the launcher converts): the recurrence's rounding is amplified
as the truncation error is, and float32 lost two digits against dense Newton-Schulz.
"""
import triton
import triton.language as tl

from .stencil import _flat_add_pair_sums, _flat_grad_planes, _flat_image, _flat_matvec, _flat_publish

# One program holds a whole grid: the launcher takes the smallest BLOCK_N here that holds
# the grid's cells (up to 16 x 16, 22 x 22, 32 x 32); larger grids take the PyTorch series,
# and so do 8-neighbour grids above EIGHT_NEIGHBOUR_MAX_BLOCK_N cells: their backward
# spilled registers at 512 and 1024 cells on sm_80 or sm_90 with 8 or 16 warps (8-1200 B).
BLOCK_N_CHOICES = (256, 512, 1024)
EIGHT_NEIGHBOUR_MAX_BLOCK_N = 256
# Warps: the fewest found spill-free by python -m scm_ops.aot at every block size
# (float64 only: the launcher always passes float64).
CONFIGS = {
    "chebyshev_fwd_kernel": {"fp64": dict(num_warps=8)},
    "chebyshev_bwd_kernel": {"fp64": dict(num_warps=8)},
}

# Ahead-of-time check (python -m scm_ops.aot): run-time argument types, the constexprs that
# vary at launch, and the combinations the launcher never makes.
_WIDE_EIGHT = [dict(EIGHT_NEIGHBOURS=True, BLOCK_N=b) for b in BLOCK_N_CHOICES if b > EIGHT_NEIGHBOUR_MAX_BLOCK_N]
AOT = {
    "chebyshev_fwd_kernel": dict(args=["*in"] * 9 + ["i32"] * 4, dtypes=("fp64",), exclude=_WIDE_EIGHT,
                                 choices={"EIGHT_NEIGHBOURS": (False, True), "STORE_BASIS": (False, True),
                                          "BLOCK_N": BLOCK_N_CHOICES}),
    "chebyshev_bwd_kernel": dict(args=["*in"] * 11 + ["i32"] * 4, dtypes=("fp64",), exclude=_WIDE_EIGHT,
                                 choices={"EIGHT_NEIGHBOURS": (False, True), "PUBLISHED": (False, True),
                                          "BLOCK_N": BLOCK_N_CHOICES}),
}


@triton.jit
def chebyshev_fwd_kernel(
    f_ptr, planes_ptr, d_ptr, coef_ptr, scale_ptr, u_ptr, phi_f_ptr, basis_ptr, scratch_ptr, B, H, W, DEGREE,
    EIGHT_NEIGHBOURS: tl.constexpr, STORE_BASIS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """phi(Z) F = sum_{k <= DEGREE} c_k v_k and u = L phi(Z) F, with
        v_0 = F,  v_1 = Y F,  v_{k+1} = 2 v_k - v_{k-1} - Lh y_k,  y_k = Lh v_k.
    coef [DEGREE + 1] (zero-padded), scale = 2/R [1]; all float64. With STORE_BASIS the
    basis goes to basis [DEGREE + 1, 2, B, N] as (v_k, y_k), y_DEGREE = 0 (the layout of
    the PyTorch path). planes [B, 2K, BLOCK_N] and a zeroed scratch [B, 3 BLOCK_N] as
    described in stencil.py's flat form. Grid (B,)."""
    N = H * W
    b, offs, inside, d, planes_ptr, scratch_ptr = _flat_image(d_ptr, planes_ptr, scratch_ptr, H, W,
                                                              EIGHT_NEIGHBOURS, BLOCK_N)
    scale = tl.load(scale_ptr)
    v_prev = tl.load(f_ptr + b * N + offs, mask=inside, other=0.0)
    y = scale * _flat_matvec(scratch_ptr, planes_ptr, d, v_prev, offs, inside, W, EIGHT_NEIGHBOURS, BLOCK_N)
    v = v_prev - 0.5 * scale * _flat_matvec(scratch_ptr, planes_ptr, d, y, offs, inside, W, EIGHT_NEIGHBOURS, BLOCK_N)
    if STORE_BASIS:
        tl.store(basis_ptr + b * N + offs, v_prev, mask=inside)
        tl.store(basis_ptr + (B + b) * N + offs, y, mask=inside)
    acc = tl.load(coef_ptr) * v_prev + tl.load(coef_ptr + 1) * v
    for k in range(1, DEGREE):
        y = scale * _flat_matvec(scratch_ptr, planes_ptr, d, v, offs, inside, W, EIGHT_NEIGHBOURS, BLOCK_N)
        v_next = 2.0 * v - v_prev - scale * _flat_matvec(scratch_ptr, planes_ptr, d, y, offs, inside, W,
                                                         EIGHT_NEIGHBOURS, BLOCK_N)
        if STORE_BASIS:
            tl.store(basis_ptr + (2 * k * B + b) * N + offs, v, mask=inside)
            tl.store(basis_ptr + ((2 * k + 1) * B + b) * N + offs, y, mask=inside)
        acc += tl.load(coef_ptr + k + 1) * v_next
        v_prev = v
        v = v_next
    if STORE_BASIS:
        tl.store(basis_ptr + (2 * DEGREE * B + b) * N + offs, v, mask=inside)
        tl.store(basis_ptr + ((2 * DEGREE + 1) * B + b) * N + offs, tl.zeros_like(v), mask=inside)
    tl.store(phi_f_ptr + b * N + offs, acc, mask=inside)
    u = _flat_matvec(scratch_ptr, planes_ptr, d, acc, offs, inside, W, EIGHT_NEIGHBOURS, BLOCK_N)
    tl.store(u_ptr + b * N + offs, u, mask=inside)


@triton.jit
def _read_step(grad_w_ptr, grad_d_ptr, weight, scale, b0, b1, v_ptr, y_ptr, scratch_ptr, planes_ptr, d, offs,
               inside, N, W, PUBLISHED: tl.constexpr, EIGHT_NEIGHBOURS: tl.constexpr, BLOCK_N: tl.constexpr):
    """One reverse step's products and reads, b0 = b_{k+1} of stream phi, b1 of stream psi:
    returns (Lh b0, Lh b1 (b1 itself without PUBLISHED)) after adding weight times the stencil
    entries of b0 y_k^T and (Lh b0 + (2/R) b1) v_k^T to grad_w and grad_d (in memory)."""
    lb1 = b1
    if PUBLISHED:
        lb1 = scale * _flat_matvec(scratch_ptr, planes_ptr, d, b1, offs, inside, W, EIGHT_NEIGHBOURS, BLOCK_N)
    lb0 = scale * _flat_matvec(scratch_ptr, planes_ptr, d, b0, offs, inside, W, EIGHT_NEIGHBOURS, BLOCK_N)
    # b0 is published now: its pairs with y_k
    _flat_add_pair_sums(grad_w_ptr, weight, scratch_ptr, b0, y_ptr, offs, inside, N, W, EIGHT_NEIGHBOURS)
    pair = lb0
    if PUBLISHED:
        pair += scale * b1
    _flat_publish(scratch_ptr, offs, pair)
    _flat_add_pair_sums(grad_w_ptr, weight, scratch_ptr, pair, v_ptr, offs, inside, N, W, EIGHT_NEIGHBOURS)
    diag = (b0 * tl.load(y_ptr + offs, mask=inside, other=0.0) + pair * tl.load(v_ptr + offs, mask=inside, other=0.0))
    tl.store(grad_d_ptr + offs, tl.load(grad_d_ptr + offs, mask=inside, other=0.0) + weight * diag, mask=inside)
    return lb0, lb1


@triton.jit
def chebyshev_bwd_kernel(
    grad_u_ptr, planes_ptr, d_ptr, basis_ptr, phi_f_ptr, coef_ptr, scale_ptr, grad_f_ptr, grad_w_ptr, grad_d_ptr,
    scratch_ptr, B, H, W, DEGREE,
    PUBLISHED: tl.constexpr, EIGHT_NEIGHBOURS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of chebyshev_fwd_kernel for the cotangent g of u. Clenshaw on the streams
    h_0 = L g (coefficients of phi) and, with PUBLISHED, h_1 = g (of psi):
        b_DEGREE = c_DEGREE h,  b_k = c_k h + 2 b_{k+1} - b_{k+2} - Lh^2 b_{k+1}  (k >= 1),
        dF = b_0 of stream 0 = c_0 h_0 + b_1 - b_2 - Lh^2 b_1 / 2,
    and, with weights 2 (1 at k = 0) times -1/R, the stencil entries of b_{k+1} y_k^T and
    (Lh b_{k+1} [+ (2/R) b'_{k+1}]) v_k^T, plus those of g (phi(Z) F)^T. coef [DEGREE + 1, S]
    (S = 2 with PUBLISHED, else 1), basis as written by the forward; all float64. grad_w
    [B, K, H, W] accumulates in place; its pairs across a row end are left for the launcher to
    zero. planes and scratch as in chebyshev_fwd_kernel. Grid (B,)."""
    S: tl.constexpr = 2 if PUBLISHED else 1
    N = H * W
    b, offs, inside, d, planes_ptr, scratch_ptr = _flat_image(d_ptr, planes_ptr, scratch_ptr, H, W,
                                                              EIGHT_NEIGHBOURS, BLOCK_N)
    scale = tl.load(scale_ptr)
    g = tl.load(grad_u_ptr + b * N + offs, mask=inside, other=0.0)
    grad_w_ptr = _flat_grad_planes(grad_w_ptr, b, offs, inside, N, EIGHT_NEIGHBOURS)
    grad_d_ptr += b * N
    grad_f_ptr += b * N
    zero = tl.zeros_like(g)
    # the outer term g (phi(Z) F)^T, with g published by the product L g
    h0 = _flat_matvec(scratch_ptr, planes_ptr, d, g, offs, inside, W, EIGHT_NEIGHBOURS, BLOCK_N)
    tl.store(grad_d_ptr + offs, g * tl.load(phi_f_ptr + b * N + offs, mask=inside, other=0.0), mask=inside)
    _flat_add_pair_sums(grad_w_ptr, 1.0, scratch_ptr, g, phi_f_ptr + b * N, offs, inside, N, W, EIGHT_NEIGHBOURS)
    # h_0 = L g and h_1 = g are read back from memory at each step (fewer live registers):
    # h_0 waits in grad_f, which it leaves at the end
    tl.store(grad_f_ptr + offs, h0, mask=inside)

    b0 = tl.load(coef_ptr + DEGREE * S) * h0
    b0_next = zero
    b1 = zero
    b1_next = zero
    if PUBLISHED:
        b1 = tl.load(coef_ptr + DEGREE * S + 1) * g
    for i in range(DEGREE - 1):
        k = DEGREE - 1 - i
        lb0, lb1 = _read_step(grad_w_ptr, grad_d_ptr, -scale, scale, b0, b1,
                              basis_ptr + (2 * k * B + b) * N, basis_ptr + ((2 * k + 1) * B + b) * N,
                              scratch_ptr, planes_ptr, d, offs, inside, N, W, PUBLISHED, EIGHT_NEIGHBOURS, BLOCK_N)
        b0_new = (2.0 * b0 - b0_next + tl.load(coef_ptr + k * S) * tl.load(grad_f_ptr + offs, mask=inside, other=0.0)
                  - scale * _flat_matvec(scratch_ptr, planes_ptr, d, lb0, offs, inside, W, EIGHT_NEIGHBOURS, BLOCK_N))
        b0_next = b0
        b0 = b0_new
        if PUBLISHED:
            b1_new = (2.0 * b1 - b1_next
                      + tl.load(coef_ptr + k * S + 1) * tl.load(grad_u_ptr + b * N + offs, mask=inside, other=0.0)
                      - scale * _flat_matvec(scratch_ptr, planes_ptr, d, lb1, offs, inside, W, EIGHT_NEIGHBOURS,
                                             BLOCK_N))
            b1_next = b1
            b1 = b1_new
    # k = 0: weight 1, and only stream 0 goes on (to dF)
    lb0, lb1 = _read_step(grad_w_ptr, grad_d_ptr, -0.5 * scale, scale, b0, b1, basis_ptr + b * N,
                          basis_ptr + (B + b) * N, scratch_ptr, planes_ptr, d, offs, inside, N, W,
                          PUBLISHED, EIGHT_NEIGHBOURS, BLOCK_N)
    grad_f = (tl.load(coef_ptr) * tl.load(grad_f_ptr + offs, mask=inside, other=0.0) + b0 - b0_next
              - 0.5 * scale * _flat_matvec(scratch_ptr, planes_ptr, d, lb0, offs, inside, W, EIGHT_NEIGHBOURS,
                                           BLOCK_N))
    tl.store(grad_f_ptr + offs, grad_f, mask=inside)
