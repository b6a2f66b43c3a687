"""Device functions shared by the structured kernels: shifted loads on the grid, and the
stencil product of a vector that one program holds for a whole image.

A stencil product needs each vector at the neighbours' cells: the program publishes the
vector to a per-image scratch row (global memory, cached) and reads it back shifted, with
a CTA barrier on both sides of the write.
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


@triton.jit
def _publish(scratch_ptr, offs, inside, x):
    """Write x to this program's scratch row so every thread can read it shifted."""
    tl.debug_barrier()  # every read of the previous vector is done
    tl.store(scratch_ptr + offs, x, mask=inside)
    tl.debug_barrier()  # the write is visible to the whole CTA


@triton.jit
def _stencil_term(scratch_ptr, w_ptr, r, c, H, W, inside, offs, dr: tl.constexpr, dc: tl.constexpr):
    """w_k[n] x[n + o] + w_k[n - o] x[n - o], x the published vector."""
    w_here = tl.load(w_ptr + offs, mask=inside, other=0.0)
    return (w_here * _shifted(scratch_ptr, r, c, H, W, dr, dc)
            + _shifted(w_ptr, r, c, H, W, -dr, -dc) * _shifted(scratch_ptr, r, c, H, W, -dr, -dc))


@triton.jit
def _stencil_matvec(scratch_ptr, w_ptr, d, x, r, c, H, W, inside, offs, EIGHT_NEIGHBOURS: tl.constexpr):
    """L x; leaves x published in the scratch row."""
    N = H * W
    _publish(scratch_ptr, offs, inside, x)
    y = d * x
    y += _stencil_term(scratch_ptr, w_ptr, r, c, H, W, inside, offs, 0, 1)
    y += _stencil_term(scratch_ptr, w_ptr + N, r, c, H, W, inside, offs, 1, 0)
    if EIGHT_NEIGHBOURS:
        y += _stencil_term(scratch_ptr, w_ptr + 2 * N, r, c, H, W, inside, offs, 1, 1)
        y += _stencil_term(scratch_ptr, w_ptr + 3 * N, r, c, H, W, inside, offs, 1, -1)
    return y


@triton.jit
def _pair_sum(scratch_ptr, p, q_ptr, r, c, H, W, inside, offs, dr: tl.constexpr, dc: tl.constexpr):
    """p[n] q[n + o] + p[n + o] q[n], p the published vector (also given in registers)."""
    q_here = tl.load(q_ptr + offs, mask=inside, other=0.0)
    return p * _shifted(q_ptr, r, c, H, W, dr, dc) + _shifted(scratch_ptr, r, c, H, W, dr, dc) * q_here


@triton.jit
def _add_pair_sum(plane_ptr, scale, scratch_ptr, p, q_ptr, r, c, H, W, inside, offs,
                  dr: tl.constexpr, dc: tl.constexpr):
    """plane[n] += scale (p[n] q[n + o] + p[n + o] q[n]) in global memory (each thread reads
    and writes only its own cells)."""
    total = tl.load(plane_ptr + offs, mask=inside, other=0.0)
    total += scale * _pair_sum(scratch_ptr, p, q_ptr, r, c, H, W, inside, offs, dr, dc)
    tl.store(plane_ptr + offs, total, mask=inside)


@triton.jit
def _add_pair_sums(grad_w_ptr, scale, scratch_ptr, p, q_ptr, r, c, H, W, inside, offs,
                   EIGHT_NEIGHBOURS: tl.constexpr):
    """_add_pair_sum for every plane k of grad_w: the planes accumulate in memory, because
    keeping 2 or 4 of them in registers across the loop made the 8-neighbour kernels spill."""
    N = H * W
    _add_pair_sum(grad_w_ptr, scale, scratch_ptr, p, q_ptr, r, c, H, W, inside, offs, 0, 1)
    _add_pair_sum(grad_w_ptr + N, scale, scratch_ptr, p, q_ptr, r, c, H, W, inside, offs, 1, 0)
    if EIGHT_NEIGHBOURS:
        _add_pair_sum(grad_w_ptr + 2 * N, scale, scratch_ptr, p, q_ptr, r, c, H, W, inside, offs, 1, 1)
        _add_pair_sum(grad_w_ptr + 3 * N, scale, scratch_ptr, p, q_ptr, r, c, H, W, inside, offs, 1, -1)
