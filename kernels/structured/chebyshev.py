"""u = X_p F as a Chebyshev series in Z = L^2 (docs/structured.md, "Chebyshev series"), one
program per image for the whole series: the forward builds the basis v_k = T_k(Y) F,
Y = I - Lh^2 / 2, Lh = (2/R) L, by its three-term recurrence and sums phi(Z) F = sum_k c_k v_k;
the backward runs the recurrence in reverse (Clenshaw) on one or two adjoint streams and
reads the gradient of L at the stencil entries as it goes. The vectors of an image stay in
registers for all steps; the only memory traffic per step is the shifted reads of the
stencil products (a per-image scratch row, cached), the basis written once by the forward
and read once by the backward, and the gradient planes (accumulated in memory).

Everything runs in float64 (the launcher converts): the recurrence's rounding is amplified
as the truncation error is, and float32 lost two digits against dense Newton-Schulz.
"""
import triton
import triton.language as tl

from .stencil import _add_pair_sums, _publish, _stencil_matvec

# One program holds a whole grid: the launcher takes the smallest BLOCK_N here that holds
# the grid's cells (up to 16 x 16, 22 x 22, 32 x 32); larger grids take the PyTorch series.
# 8-neighbour grids stop at EIGHT_NEIGHBOUR_MAX_BLOCK_N cells (see CONFIGS).
BLOCK_N_CHOICES = (256, 512, 1024)
EIGHT_NEIGHBOUR_MAX_BLOCK_N = 1024
# Warps per kernel, chosen with python -m scm_ops.aot as the fewest with no register spill at
# every block size (fp64 only: the launcher always passes float64).
CONFIGS = {
    "chebyshev_fwd_kernel": {"fp64": dict(num_warps=8)},
    "chebyshev_bwd_kernel": {"fp64": dict(num_warps=8)},
}

# Ahead-of-time check (python -m scm_ops.aot): run-time argument types and the constexprs
# that vary at launch.
AOT = {
    "chebyshev_fwd_kernel": dict(args=["*in"] * 9 + ["i32"] * 4, dtypes=("fp64",),
                                 choices={"EIGHT_NEIGHBOURS": (False, True), "STORE_BASIS": (False, True),
                                          "BLOCK_N": BLOCK_N_CHOICES}),
    "chebyshev_bwd_kernel": dict(args=["*in"] * 11 + ["i32"] * 4, dtypes=("fp64",),
                                 choices={"EIGHT_NEIGHBOURS": (False, True), "PUBLISHED": (False, True),
                                          "BLOCK_N": BLOCK_N_CHOICES}),
}


@triton.jit
def _image(d_ptr, w_ptr, scratch_ptr, H, W, EIGHT_NEIGHBOURS: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's image b, its cells (offs, in-grid mask, row, column), the diagonal d and
    pointers to the image's weight planes and scratch row."""
    K: tl.constexpr = 4 if EIGHT_NEIGHBOURS else 2
    N = H * W
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    inside = offs < N
    d = tl.load(d_ptr + b * N + offs, mask=inside, other=0.0)
    return b, offs, inside, offs // W, offs % W, d, w_ptr + b * K * N, scratch_ptr + b * BLOCK_N


@triton.jit
def chebyshev_fwd_kernel(
    f_ptr, w_ptr, d_ptr, coef_ptr, scale_ptr, u_ptr, phi_f_ptr, basis_ptr, scratch_ptr, B, H, W, DEGREE,
    EIGHT_NEIGHBOURS: tl.constexpr, STORE_BASIS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """phi(Z) F = sum_{k <= DEGREE} c_k v_k and u = L phi(Z) F, with
        v_0 = F,  v_1 = Y F,  v_{k+1} = 2 v_k - v_{k-1} - Lh y_k,  y_k = Lh v_k.
    coef [DEGREE + 1] (zero-padded), scale = 2/R [1]; all float64. With STORE_BASIS the
    basis goes to basis [DEGREE + 1, 2, B, N] as (v_k, y_k), y_DEGREE = 0 (the layout of
    the PyTorch path). Grid (B,); scratch [B, BLOCK_N]."""
    N = H * W
    b, offs, inside, r, c, d, w_ptr, scratch_ptr = _image(d_ptr, w_ptr, scratch_ptr, H, W, EIGHT_NEIGHBOURS, BLOCK_N)
    scale = tl.load(scale_ptr)
    v_prev = tl.load(f_ptr + b * N + offs, mask=inside, other=0.0)
    y = scale * _stencil_matvec(scratch_ptr, w_ptr, d, v_prev, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
    v = v_prev - 0.5 * scale * _stencil_matvec(scratch_ptr, w_ptr, d, y, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
    if STORE_BASIS:
        tl.store(basis_ptr + b * N + offs, v_prev, mask=inside)
        tl.store(basis_ptr + (B + b) * N + offs, y, mask=inside)
    acc = tl.load(coef_ptr) * v_prev + tl.load(coef_ptr + 1) * v
    for k in range(1, DEGREE):
        y = scale * _stencil_matvec(scratch_ptr, w_ptr, d, v, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
        v_next = 2.0 * v - v_prev - scale * _stencil_matvec(scratch_ptr, w_ptr, d, y, r, c, H, W, inside, offs,
                                                            EIGHT_NEIGHBOURS)
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
    u = _stencil_matvec(scratch_ptr, w_ptr, d, acc, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
    tl.store(u_ptr + b * N + offs, u, mask=inside)


@triton.jit
def _read_step(grad_w_ptr, grad_d, weight, scale, b0, b1, v_ptr, y_ptr, scratch_ptr, w_ptr, d, r, c, H, W,
               inside, offs, PUBLISHED: tl.constexpr, EIGHT_NEIGHBOURS: tl.constexpr):
    """One reverse step's products and reads, b0 = b_{k+1} of stream phi, b1 of stream psi:
    returns (Lh b0, Lh b1 (b1 itself without PUBLISHED), grad_d) after adding weight times
    the stencil entries of b0 y_k^T and (Lh b0 + (2/R) b1) v_k^T to grad_w and grad_d."""
    lb1 = b1
    if PUBLISHED:
        lb1 = scale * _stencil_matvec(scratch_ptr, w_ptr, d, b1, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
    lb0 = scale * _stencil_matvec(scratch_ptr, w_ptr, d, b0, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
    # b0 is published now: its pairs with y_k
    grad_d += weight * b0 * tl.load(y_ptr + offs, mask=inside, other=0.0)
    _add_pair_sums(grad_w_ptr, weight, scratch_ptr, b0, y_ptr, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
    pair = lb0
    if PUBLISHED:
        pair += scale * b1
    _publish(scratch_ptr, offs, inside, pair)
    grad_d += weight * pair * tl.load(v_ptr + offs, mask=inside, other=0.0)
    _add_pair_sums(grad_w_ptr, weight, scratch_ptr, pair, v_ptr, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
    return lb0, lb1, grad_d


@triton.jit
def chebyshev_bwd_kernel(
    grad_u_ptr, w_ptr, d_ptr, basis_ptr, phi_f_ptr, coef_ptr, scale_ptr, grad_f_ptr, grad_w_ptr, grad_d_ptr,
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
    [B, K, H, W] accumulates in place. Grid (B,); scratch [B, BLOCK_N]."""
    S: tl.constexpr = 2 if PUBLISHED else 1
    K: tl.constexpr = 4 if EIGHT_NEIGHBOURS else 2
    N = H * W
    b, offs, inside, r, c, d, w_ptr, scratch_ptr = _image(d_ptr, w_ptr, scratch_ptr, H, W, EIGHT_NEIGHBOURS, BLOCK_N)
    scale = tl.load(scale_ptr)
    g = tl.load(grad_u_ptr + b * N + offs, mask=inside, other=0.0)
    grad_w_ptr += b * K * N
    zero = tl.zeros_like(g)
    for k in tl.static_range(K):
        tl.store(grad_w_ptr + k * N + offs, zero, mask=inside)
    # the outer term g (phi(Z) F)^T, with g published by the product L g
    h0 = _stencil_matvec(scratch_ptr, w_ptr, d, g, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)
    grad_d = g * tl.load(phi_f_ptr + b * N + offs, mask=inside, other=0.0)
    _add_pair_sums(grad_w_ptr, 1.0, scratch_ptr, g, phi_f_ptr + b * N, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS)

    b0 = tl.load(coef_ptr + DEGREE * S) * h0
    b0_next = zero
    b1 = zero
    b1_next = zero
    if PUBLISHED:
        b1 = tl.load(coef_ptr + DEGREE * S + 1) * g
    for i in range(DEGREE - 1):
        k = DEGREE - 1 - i
        lb0, lb1, grad_d = _read_step(grad_w_ptr, grad_d, -scale, scale, b0, b1,
                                      basis_ptr + (2 * k * B + b) * N, basis_ptr + ((2 * k + 1) * B + b) * N,
                                      scratch_ptr, w_ptr, d, r, c, H, W, inside, offs, PUBLISHED, EIGHT_NEIGHBOURS)
        b0_new = (2.0 * b0 - b0_next + tl.load(coef_ptr + k * S) * h0
                  - scale * _stencil_matvec(scratch_ptr, w_ptr, d, lb0, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS))
        b0_next = b0
        b0 = b0_new
        if PUBLISHED:
            b1_new = (2.0 * b1 - b1_next + tl.load(coef_ptr + k * S + 1) * g
                      - scale * _stencil_matvec(scratch_ptr, w_ptr, d, lb1, r, c, H, W, inside, offs,
                                                EIGHT_NEIGHBOURS))
            b1_next = b1
            b1 = b1_new
    # k = 0: weight 1, and only stream 0 goes on (to dF)
    lb0, lb1, grad_d = _read_step(grad_w_ptr, grad_d, -0.5 * scale, scale, b0, b1, basis_ptr + b * N,
                                  basis_ptr + (B + b) * N, scratch_ptr, w_ptr, d, r, c, H, W, inside, offs,
                                  PUBLISHED, EIGHT_NEIGHBOURS)
    grad_f = (tl.load(coef_ptr) * h0 + b0 - b0_next
              - 0.5 * scale * _stencil_matvec(scratch_ptr, w_ptr, d, lb0, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS))
    tl.store(grad_f_ptr + b * N + offs, grad_f, mask=inside)
    tl.store(grad_d_ptr + b * N + offs, grad_d, mask=inside)
