"""Masked spatial-semantic Laplacian L = (D - A) * (lam * E - 1) on an H x W patch grid.

D - A is never loaded: each program derives the stencil of its tile from the patch
indices (row-major, patch n at row n // W, column n % W), and reads E only where the
stencil is non-zero (the diagonal and the 4 or 8 grid neighbours).
"""
import triton
import triton.language as tl

# Per accumulation dtype; float64 runs 8 warps: with 4, the 8-neighbour backward spills
# on sm_90 (python -m scm_ops.aot).
CONFIGS = {
    "fp32": dict(BLOCK=64, num_warps=4),
    "fp64": dict(BLOCK=32, num_warps=8),
}

# Ahead-of-time check (python -m scm_ops.aot): per kernel, the types of its run-time
# arguments ("*in": pointer of the input dtype, "*acc": of the accumulation dtype, "i32",
# "fp32"), the input dtypes its launcher passes (default all four) and the values each
# constexpr that is not in CONFIGS takes at launch (IS_FP64 follows the dtype).
AOT = {
    "laplacian_fwd_kernel": dict(args=["*in", "*in", "*in", "i32", "i32", "i32"] + ["i32"] * 3,
                                 choices={"EIGHT_NEIGHBOURS": (False, True)}),
    "laplacian_bwd_kernel": dict(args=["*in", "*in", "*in", "*in", "*acc", "i32", "i32", "i32"] + ["i32"] * 6,
                                 choices={"EIGHT_NEIGHBOURS": (False, True)}),
}


@triton.jit
def _grid_stencil(offs_i, offs_j, H, W, EIGHT_NEIGHBOURS: tl.constexpr):
    """Entries of D - A for the tile offs_i x offs_j (int32: degree, -1 or 0)."""
    ri = offs_i // W
    ci = offs_i % W
    rj = offs_j // W
    cj = offs_j % W
    adr = tl.abs(ri[:, None] - rj[None, :])
    adc = tl.abs(ci[:, None] - cj[None, :])
    up = (ri > 0).to(tl.int32)
    down = (ri < H - 1).to(tl.int32)
    left = (ci > 0).to(tl.int32)
    right = (ci < W - 1).to(tl.int32)
    if EIGHT_NEIGHBOURS:
        adjacent = (tl.maximum(adr, adc) == 1)
        degree = (1 + up + down) * (1 + left + right) - 1
    else:
        adjacent = (adr + adc) == 1
        degree = up + down + left + right
    diagonal = offs_i[:, None] == offs_j[None, :]
    return tl.where(diagonal, degree[:, None], tl.where(adjacent, -1, 0))


@triton.jit
def _tile(N, H, W, EIGHT_NEIGHBOURS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile: (batch index, row and column indices, in-bounds mask, D - A)."""
    pid_b = tl.program_id(2).to(tl.int64)
    offs_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = (offs_i[:, None] < N) & (offs_j[None, :] < N)
    return pid_b, offs_i, offs_j, inside, _grid_stencil(offs_i, offs_j, H, W, EIGHT_NEIGHBOURS)


@triton.jit
def laplacian_fwd_kernel(
    e_ptr, lam_ptr, l_ptr, N, H, W,
    stride_eb, stride_ei, stride_ej,
    IS_FP64: tl.constexpr, EIGHT_NEIGHBOURS: tl.constexpr, BLOCK: tl.constexpr,
):
    """L[b] = G * (lam[b] * E[b] - 1), G = D - A. Grid (cdiv(N, BLOCK), cdiv(N, BLOCK), B);
    L is contiguous [B, N, N]."""
    acc_t = tl.float64 if IS_FP64 else tl.float32
    pid_b, offs_i, offs_j, inside, g = _tile(N, H, W, EIGHT_NEIGHBOURS, BLOCK)
    g = g.to(acc_t)
    e = tl.load(e_ptr + pid_b * stride_eb + offs_i[:, None] * stride_ei + offs_j[None, :] * stride_ej,
                mask=inside & (g != 0), other=0.0).to(acc_t)
    lam = tl.load(lam_ptr + pid_b).to(acc_t)
    out = g * (lam * e - 1.0)
    tl.store(l_ptr + pid_b * N * N + offs_i[:, None] * N + offs_j[None, :],
             out.to(l_ptr.dtype.element_ty), mask=inside)


@triton.jit
def laplacian_bwd_kernel(
    grad_l_ptr, e_ptr, lam_ptr, grad_e_ptr, grad_lam_partial_ptr, N, H, W,
    stride_gb, stride_gi, stride_gj,
    stride_eb, stride_ei, stride_ej,
    IS_FP64: tl.constexpr, EIGHT_NEIGHBOURS: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad_E = G * lam * grad_L (contiguous [B, N, N]); the per-tile partial sums of
    G * E * grad_L go to grad_lam_partial[b, tile] (float32/float64), summed by the host
    in a fixed order so the result is deterministic."""
    acc_t = tl.float64 if IS_FP64 else tl.float32
    pid_b, offs_i, offs_j, inside, g = _tile(N, H, W, EIGHT_NEIGHBOURS, BLOCK)
    g = g.to(acc_t)
    on_stencil = inside & (g != 0)
    dl = tl.load(grad_l_ptr + pid_b * stride_gb + offs_i[:, None] * stride_gi + offs_j[None, :] * stride_gj,
                 mask=on_stencil, other=0.0).to(acc_t)
    e = tl.load(e_ptr + pid_b * stride_eb + offs_i[:, None] * stride_ei + offs_j[None, :] * stride_ej,
                mask=on_stencil, other=0.0).to(acc_t)
    lam = tl.load(lam_ptr + pid_b).to(acc_t)
    tl.store(grad_e_ptr + pid_b * N * N + offs_i[:, None] * N + offs_j[None, :],
             (g * lam * dl).to(grad_e_ptr.dtype.element_ty), mask=inside)
    n_tiles = tl.num_programs(0) * tl.num_programs(1)
    partial = tl.sum(tl.sum(g * e * dl, axis=1), axis=0)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(grad_lam_partial_ptr + pid_b * n_tiles + tile, partial)
