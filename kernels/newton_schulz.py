"""Batched matrix product with a fused axpby epilogue, the one kernel Newton-Schulz needs.

out[b] = alpha * A[b] @ B[b] + beta * C[b]

Every step of the forward iteration X <- 2X - X (L X) and of its backward pass is one or
two such products; transposes are expressed through strides, so no operand is copied.
"""
import triton
import triton.language as tl

CONFIGS = {
    "fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    "fp64": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2),
}

# Ahead-of-time check (python -m scm_ops.aot): per kernel, the types of its run-time
# arguments ("*in": pointer of the input dtype, "*acc": of the accumulation dtype, "i32",
# "fp32"), the input dtypes its launcher passes (default all four) and the values each
# constexpr that is not in CONFIGS takes at launch (IS_FP64 follows the dtype).
# Newton-Schulz runs its products in the accumulation dtype.
AOT = {
    "bmm_axpby_kernel": dict(args=["*acc"] * 4 + ["i32"] * 3 + ["fp32"] * 2 + ["i32"] * 12, dtypes=("fp32", "fp64"),
                             choices={"HAS_C": (False, True)}),
}


@triton.jit
def bmm_axpby_kernel(
    a_ptr, b_ptr, c_ptr, out_ptr, M, N, K, alpha, beta,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_ob, stride_om, stride_on,
    HAS_C: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), batch). Every operand, out included, is
    addressed through its strides (out may be a transposed view, or C itself: each program
    reads its tile of C before it writes the same tile of out)."""
    acc_t = tl.float64 if IS_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_b = a_ptr + pid_b * stride_ab
    b_b = b_ptr + pid_b * stride_bb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_b + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0).to(acc_t)
        b = tl.load(b_b + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(k[:, None] < K) & (offs_n[None, :] < N), other=0.0).to(acc_t)
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc_t)
    acc = acc * alpha
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_C:
        c = tl.load(c_ptr + pid_b * stride_cb + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                    mask=inside, other=0.0).to(acc_t)
        acc += beta * c
    tl.store(out_ptr + pid_b * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=inside)
