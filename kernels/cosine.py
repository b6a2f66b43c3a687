"""Pairwise cosine similarity of the rows of x [B, N, D]: forward and backward kernels.

Arithmetic is done in float32 (float64 for float64 inputs): half-precision tiles are
upcast after loading, and ``tl.dot`` is pinned to IEEE precision so that a GPU gives the
same answer as the CPU interpreter instead of tf32's 10-bit mantissa.
"""
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_D, num_warps) per accumulation dtype; the launcher uses exactly these.
CONFIGS = {
    "fp32": dict(BLOCK_N=64, BLOCK_D=32, num_warps=4),
    "fp64": dict(BLOCK_N=32, BLOCK_D=16, num_warps=4),
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
    r_i = tl.where(sq_i > 0, 1.0 / tl.sqrt(tl.where(sq_i > 0, sq_i, 1.0)), 0.0)
    r_j = tl.where(sq_j > 0, 1.0 / tl.sqrt(tl.where(sq_j > 0, sq_j, 1.0)), 0.0)
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
