"""Pairwise cosine similarity of the rows of x [B, N, D]: forward and backward kernels.

Arithmetic is done in float32 (float64 for float64 inputs): half-precision tiles are
upcast after loading, and ``tl.dot`` is pinned to IEEE precision so that a GPU gives the
same answer as the CPU interpreter instead of tf32's 10-bit mantissa.
"""
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_D, num_warps) per kernel and accumulation dtype ("fp32" serves float16,
# bfloat16 and float32 inputs); the launchers use exactly these. Chosen so that no
# configuration spills registers on sm_80 or sm_90 (python -m scm_ops.aot). The backward
# keeps a [BLOCK_N, BLOCK_D] accumulator and reloads its [BLOCK_N, N] rows of dE, dE^T and E
# once per channel tile, so it takes a wide channel tile (4 tiles at D = 200, not 7) and
# fewer rows (BLOCK_N = 64 spilled kilobytes and needed 107 KB of shared memory). The
# forward's float32 channel tile is 8: at 16 its correctly rounded division spills on sm_90.
CONFIGS = {
    "cosine_fwd_kernel": {
        "fp32": dict(BLOCK_N=64, BLOCK_D=8, num_warps=4),
        "fp64": dict(BLOCK_N=32, BLOCK_D=16, num_warps=8),
    },
    "cosine_bwd_kernel": {
        "fp32": dict(BLOCK_N=32, BLOCK_D=64, num_warps=8),
        "fp64": dict(BLOCK_N=32, BLOCK_D=16, num_warps=4),
    },
}

# Ahead-of-time check (python -m scm_ops.aot): per kernel, the types of its run-time
# arguments ("*in": pointer of the input dtype, "*acc": of the accumulation dtype, "i32",
# "fp32"), the input dtypes its launcher passes (default all four) and the values each
# constexpr that is not in CONFIGS takes at launch (IS_FP64 follows the dtype).
AOT = {
    "cosine_fwd_kernel": dict(args=["*in", "*in", "*acc", "i32", "i32"] + ["i32"] * 6),
    "cosine_bwd_kernel": dict(args=["*in", "*in", "*in", "*acc", "*in", "i32", "i32"] + ["i32"] * 9),
}


@triton.jit
def inverse_norm(sq, IS_FP64: tl.constexpr):
    """1 / sqrt(sq) where sq > 0, else 0, correctly rounded: a GPU's default float32 sqrt
    and division are approximate and flush subnormals, which turns a row with
    0 < |x|^2 < 1.2e-38 into inf / NaN (float64 sqrt and division are always IEEE)."""
    ok = sq > 0
    safe = tl.where(ok, sq, 1.0)
    if IS_FP64:
        r = 1.0 / tl.sqrt(safe)
    else:
        r = tl.div_rn(tl.full(safe.shape, 1.0, tl.float32), tl.sqrt_rn(safe))
    return tl.where(ok, r, 0.0)


@triton.jit
def cosine_fwd_kernel(
    x_ptr, e_ptr, rnorm_ptr, N, D,
    stride_xb, stride_xn, stride_xd,
    stride_eb, stride_ei, stride_ej,
    IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """E[b, i, j] = <x_i, x_j> * r_i * r_j with r = 1/|x| (0 for a zero row).

    Grid (cdiv(N, BLOCK_N), cdiv(N, BLOCK_N), B). Programs of the first column of tiles
    also write r[b, i] (float32/float64) for the backward pass.
    """
    acc_t = tl.float64 if IS_FP64 else tl.float32
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_i = pid_i * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    x_b = x_ptr + pid_b * stride_xb
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=acc_t)
    sq_i = tl.zeros((BLOCK_N,), dtype=acc_t)
    sq_j = tl.zeros((BLOCK_N,), dtype=acc_t)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        xi = tl.load(x_b + offs_i[:, None] * stride_xn + d[None, :] * stride_xd,
                     mask=(offs_i[:, None] < N) & (d[None, :] < D), other=0.0).to(acc_t)
        xj = tl.load(x_b + offs_j[:, None] * stride_xn + d[None, :] * stride_xd,
                     mask=(offs_j[:, None] < N) & (d[None, :] < D), other=0.0).to(acc_t)
        acc = tl.dot(xi, tl.trans(xj), acc, input_precision="ieee", out_dtype=acc_t)
        sq_i += tl.sum(xi * xi, axis=1)
        sq_j += tl.sum(xj * xj, axis=1)
    r_i = inverse_norm(sq_i, IS_FP64)
    r_j = inverse_norm(sq_j, IS_FP64)
    e = acc * r_i[:, None] * r_j[None, :]
    e_b = e_ptr + pid_b * stride_eb
    tl.store(e_b + offs_i[:, None] * stride_ei + offs_j[None, :] * stride_ej,
             e.to(e_ptr.dtype.element_ty),
             mask=(offs_i[:, None] < N) & (offs_j[None, :] < N))
    if pid_j == 0:
        tl.store(rnorm_ptr + pid_b * N + offs_i, r_i, mask=offs_i < N)


@triton.jit
def cosine_bwd_kernel(
    grad_e_ptr, e_ptr, x_ptr, rnorm_ptr, grad_x_ptr, N, D,
    stride_gb, stride_gi, stride_gj,
    stride_eb, stride_ei, stride_ej,
    stride_xb, stride_xn, stride_xd,
    IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_x[i] = r_i * (g_i - r_i x_i * s_i), with G = dE + dE^T,
    g_i = sum_j G[i, j] r_j x_j and s_i = sum_j G[i, j] E[i, j] (= <x_i r_i, g_i>).

    Grid (cdiv(N, BLOCK_N), cdiv(D, BLOCK_D), B); grad_x is contiguous [B, N, D].
    """
    acc_t = tl.float64 if IS_FP64 else tl.float32
    pid_i = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_i = pid_i * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_i = offs_i < N
    mask_d = offs_d < D
    g_b = grad_e_ptr + pid_b * stride_gb
    e_b = e_ptr + pid_b * stride_eb
    x_b = x_ptr + pid_b * stride_xb
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_t)
    s = tl.zeros((BLOCK_N,), dtype=acc_t)
    for j0 in range(0, N, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        m_ij = mask_i[:, None] & (offs_j[None, :] < N)
        g = tl.load(g_b + offs_i[:, None] * stride_gi + offs_j[None, :] * stride_gj,
                    mask=m_ij, other=0.0).to(acc_t)
        g += tl.load(g_b + offs_j[None, :] * stride_gi + offs_i[:, None] * stride_gj,
                     mask=m_ij, other=0.0).to(acc_t)
        e = tl.load(e_b + offs_i[:, None] * stride_ei + offs_j[None, :] * stride_ej,
                    mask=m_ij, other=0.0).to(acc_t)
        s += tl.sum(g * e, axis=1)
        r_j = tl.load(rnorm_ptr + pid_b * N + offs_j, mask=offs_j < N, other=0.0)
        xj = tl.load(x_b + offs_j[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                     mask=(offs_j[:, None] < N) & mask_d[None, :], other=0.0).to(acc_t)
        acc = tl.dot(g, xj * r_j[:, None], acc, input_precision="ieee", out_dtype=acc_t)
    r_i = tl.load(rnorm_ptr + pid_b * N + offs_i, mask=mask_i, other=0.0)
    xi = tl.load(x_b + offs_i[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                 mask=mask_i[:, None] & mask_d[None, :], other=0.0).to(acc_t)
    gx = r_i[:, None] * (acc - xi * (r_i * s)[:, None])
    tl.store(grad_x_ptr + pid_b * N * D + offs_i[:, None] * D + offs_d[None, :],
             gx.to(grad_x_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_d[None, :])
