"""Device functions shared by the structured kernels.

- Masked shifted loads on the grid (`_neighbour`, `_shifted`): the neighbour cosines read
  a neighbour's channels with a mask where it leaves the grid.
- The flat form of the stencil product of a vector that one program holds for a whole image
  (`_flat_matvec`), and the reading of a gradient at the stencil's entries as pair sums
  (`_flat_add_pair_sums`): the series kernels. The program publishes the vector to a
  per-image scratch row (global memory, cached) and reads it back shifted, with a CTA
  barrier on both sides of the write.
"""
import triton
import triton.language as tl


@triton.jit
def _neighbour(r, c, H, W, dr: tl.constexpr, dc: tl.constexpr):
    """(flat index of n + o, whether it is on the grid) for every cell n = (r, c), o = (dr, dc).
    Lanes past the grid (r >= H, padding) are never on it."""
    rr = r + dr
    cc = c + dc
    return rr * W + cc, (r < H) & (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)


@triton.jit
def _shifted(ptr, r, c, H, W, dr: tl.constexpr, dc: tl.constexpr):
    """ptr[n + o] at every cell n = (r, c); 0 where n + o leaves the grid."""
    idx, ok = _neighbour(r, c, H, W, dr, dc)
    return tl.load(ptr + idx, mask=ok, other=0.0)


# -- the flat form: no masks on the shifted reads ------------------------------------------
# In the flat layout the neighbour n + o_k of cell n is n + m_k, m_k = dr W + dc. The launcher
# passes 2K weight planes per image, [w_k, w_k shifted by m_k] with w_k zero wherever n + o_k
# leaves the grid (this also zeroes the pairs that a flat shift makes across a row end), and a
# zeroed scratch row of 3 BLOCK_N per image whose middle third holds the published vector.
# The launcher picks BLOCK_N >= N and BLOCK_N >= every m_k (structured.stencil.program_block;
# the second binds on one-row grids with 8 neighbours, m = W + 1 > N), so a shifted read at
# n +- m_k, n < BLOCK_N, stays inside the image's own row and lands on a finite value (0
# beyond the grid): no mask or index arithmetic of its own. Fewer live masks and indices:
# fewer registers. tests/test_race_barrier.py checks these reads and the barriers.

@triton.jit
def _flat_image(d_ptr, planes_ptr, scratch_ptr, H, W, EIGHT_NEIGHBOURS: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one program per image: this program's image b, its cells (offs, in-grid mask), the
    diagonal d, and pointers to the image's 2K weight planes [2K, BLOCK_N] and to the middle
    of its scratch row."""
    K: tl.constexpr = 4 if EIGHT_NEIGHBOURS else 2
    N = H * W
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    inside = offs < N
    d = tl.load(d_ptr + b * N + offs, mask=inside, other=0.0)
    return b, offs, inside, d, planes_ptr + b * 2 * K * BLOCK_N, scratch_ptr + (3 * b + 1) * BLOCK_N


@triton.jit
def _flat_publish(scratch_ptr, offs, x):
    """Write x (zero on the lanes past the grid) to the middle third of the scratch row."""
    tl.debug_barrier()  # every read of the previous vector is done
    tl.store(scratch_ptr + offs, x)
    tl.debug_barrier()  # the write is visible to the whole CTA


@triton.jit
def _flat_term(scratch_ptr, planes_ptr, offs, inside, m, k: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr):
    """w_k[n] x[n + m_k] + w_k[n - m_k] x[n - m_k] for the published x."""
    return (tl.load(planes_ptr + k * BLOCK_N + offs, mask=inside, other=0.0) * tl.load(scratch_ptr + offs + m)
            + tl.load(planes_ptr + (K + k) * BLOCK_N + offs, mask=inside, other=0.0) * tl.load(scratch_ptr + offs - m))


@triton.jit
def _flat_matvec(scratch_ptr, planes_ptr, d, x, offs, inside, W, EIGHT_NEIGHBOURS: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """L x in the flat form (planes [2K, BLOCK_N] of this image); leaves x published."""
    K: tl.constexpr = 4 if EIGHT_NEIGHBOURS else 2
    _flat_publish(scratch_ptr, offs, x)
    y = d * x
    y += _flat_term(scratch_ptr, planes_ptr, offs, inside, 1, 0, K, BLOCK_N)
    y += _flat_term(scratch_ptr, planes_ptr, offs, inside, W, 1, K, BLOCK_N)
    if EIGHT_NEIGHBOURS:
        y += _flat_term(scratch_ptr, planes_ptr, offs, inside, W + 1, 2, K, BLOCK_N)
        y += _flat_term(scratch_ptr, planes_ptr, offs, inside, W - 1, 3, K, BLOCK_N)
    return y


@triton.jit
def _flat_add_pair_sum(plane_ptr, weight, scratch_ptr, p, q_ptr, offs, inside, N, m):
    """plane[n] += weight (p[n] q[n + m] + p[n + m] q[n]), p published, q in global memory
    (n + m past the grid reads 0). Pairs across a row end are left for the caller to zero."""
    there = offs + m
    pair = (p * tl.load(q_ptr + there, mask=there < N, other=0.0)
            + tl.load(scratch_ptr + there) * tl.load(q_ptr + offs, mask=inside, other=0.0))
    tl.store(plane_ptr + offs, tl.load(plane_ptr + offs, mask=inside, other=0.0) + weight * pair, mask=inside)


@triton.jit
def _flat_grad_planes(grad_w_ptr, b, offs, inside, N, EIGHT_NEIGHBOURS: tl.constexpr):
    """Pointer to image b's K gradient planes in grad_w [B, K, N], which it zeroes for the
    pair sums to accumulate into (each thread its own cells)."""
    K: tl.constexpr = 4 if EIGHT_NEIGHBOURS else 2
    grad_w_ptr += b * K * N
    for plane in tl.static_range(K):
        tl.store(grad_w_ptr + plane * N + offs, 0.0, mask=inside)
    return grad_w_ptr


@triton.jit
def _flat_add_pair_sums(grad_w_ptr, weight, scratch_ptr, p, q_ptr, offs, inside, N, W,
                        EIGHT_NEIGHBOURS: tl.constexpr):
    """_flat_add_pair_sum for every plane k of grad_w [K, N] (accumulated in memory)."""
    _flat_add_pair_sum(grad_w_ptr, weight, scratch_ptr, p, q_ptr, offs, inside, N, 1)
    _flat_add_pair_sum(grad_w_ptr + N, weight, scratch_ptr, p, q_ptr, offs, inside, N, W)
    if EIGHT_NEIGHBOURS:
        _flat_add_pair_sum(grad_w_ptr + 2 * N, weight, scratch_ptr, p, q_ptr, offs, inside, N, W + 1)
        _flat_add_pair_sum(grad_w_ptr + 3 * N, weight, scratch_ptr, p, q_ptr, offs, inside, N, W - 1)
