"""The grid stencil that every structured piece works on (docs/structured.md, "The stencil").

For the symmetric L an activation diffusion block builds, L is a stencil on the H x W grid:

    (L x)[n] = d[n] x[n] + sum_k ( w_k[n] x[n + o_k] + w_k[n - o_k] x[n - o_k] )

with one weight plane w_k [B, H, W] per neighbour offset o_k (2 for 4-neighbour grids, 4
for 8-neighbour grids; w_k[n] = L[n, n + o_k], zero where n + o_k leaves the grid) and the
diagonal d [B, H, W]. This module holds the stencil's PyTorch form: products, Gershgorin
row sums, the dense matrix (for references and the dense routes), and the reading of an
outer-product gradient at the stencil's entries.
"""
from __future__ import annotations

import functools

import torch

from .._common import kernel_config
from .._common import kernel_module as load_kernel_module

__all__ = ["OFFSETS", "FlatStencil", "PaddedRows", "Stencil", "StencilReader", "flat_launch", "flat_shifts",
           "grid_masks", "shift", "program_backend", "program_block", "program_max_cells", "stencil_to_dense",
           "product_stencil_entries", "sigma_max_bound"]

OFFSETS = {4: ((0, 1), (1, 0)), 8: ((0, 1), (1, 0), (1, 1), (1, -1))}


def _region(height: int, width: int, dr: int, dc: int):
    """Slices (rows, cols) of the cells n whose neighbour n + (dr, dc) is on the grid, and of
    those neighbours."""
    r0, r1 = max(0, -dr), min(height, height - dr)
    c0, c1 = max(0, -dc), min(width, width - dc)
    return (slice(r0, r1), slice(c0, c1)), (slice(r0 + dr, r1 + dr), slice(c0 + dc, c1 + dc))


def shift(x: torch.Tensor, dr: int, dc: int) -> torch.Tensor:
    """y[..., r, c] = x[..., r + dr, c + dc], zero where that leaves the grid."""
    here, there = _region(*x.shape[-2:], dr, dc)
    y = torch.zeros_like(x)
    y[..., here[0], here[1]] = x[..., there[0], there[1]]
    return y


@functools.lru_cache(maxsize=32)
def _grid_masks(height: int, width: int, connectivity: int, dtype, device):
    """(valid [K, H, W]: neighbour n + o_k exists, degree [H, W])."""
    ones = torch.ones(height, width, dtype=dtype, device=device)
    valid = torch.stack([shift(ones, dr, dc) for dr, dc in OFFSETS[connectivity]])
    degree = valid.sum(0) + torch.stack([shift(v, -dr, -dc) for v, (dr, dc)
                                         in zip(valid, OFFSETS[connectivity])]).sum(0)
    return valid, degree


def grid_masks(height, width, connectivity, dtype, device):
    """(valid [K, H, W]: neighbour n + o_k exists, degree [H, W]): cached in eager mode;
    under torch.compile computed in the graph (a few constant-folded ops), since the tracer
    would look through the cache and could not keep its result."""
    if torch.compiler.is_compiling():
        return _grid_masks.__wrapped__(height, width, connectivity, dtype, torch.device(device))
    return _grid_masks(height, width, connectivity, dtype, torch.device(device))


class Stencil:
    """A symmetric stencil operator L on an H x W grid, for repeated products L x.

    Built from w [B, K, H, W] (w_k[n] = L[n, n + o_k]) and d [B, H, W]. A product is the
    diagonal term plus, per offset, two in-place multiply-adds on the sub-grids of cells
    whose neighbour exists (slices, no padding or stacking: the cheapest form on a CPU).
    """

    def __init__(self, w: torch.Tensor, d: torch.Tensor, offsets):
        H, W = d.shape[-2:]
        self.d = d
        self.terms = []
        for k, (dr, dc) in enumerate(offsets):
            here, there = _region(H, W, dr, dc)
            self.terms.append((here, there, w[:, k, here[0], here[1]].contiguous()))

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """L x for x [B, H, W]."""
        y = self.d * x
        for here, there, wk in self.terms:
            y[:, here[0], here[1]].addcmul_(wk, x[:, there[0], there[1]])
            y[:, there[0], there[1]].addcmul_(wk, x[:, here[0], here[1]])
        return y

    def abs_row_sums(self) -> torch.Tensor:
        """sum_j |L[n, j]| per cell, [B, H, W] (Gershgorin radii plus |diagonal|)."""
        y = self.d.abs()
        for here, there, wk in self.terms:
            y[:, here[0], here[1]] += wk.abs()
            y[:, there[0], there[1]] += wk.abs()
        return y


def _neighbour_pairs(height: int, width: int, offsets, device):
    """Per offset k: (k, region of cells n with a neighbour n + o_k, flat indices of n, of n + o_k)."""
    idx = torch.arange(height * width, device=device).reshape(height, width)
    for k, (dr, dc) in enumerate(offsets):
        here, there = _region(height, width, dr, dc)
        yield k, here, idx[here].reshape(-1), idx[there].reshape(-1)


def stencil_to_dense(w: torch.Tensor, d: torch.Tensor, offsets) -> torch.Tensor:
    """The dense symmetric [B, N, N] matrix of a stencil."""
    B, _, H, W = w.shape
    dense = torch.diag_embed(d.reshape(B, H * W))
    for k, here, rows, cols in _neighbour_pairs(H, W, offsets, w.device):
        vals = w[:, k, here[0], here[1]].reshape(B, -1)
        dense[:, rows, cols] = vals
        dense[:, cols, rows] = vals
    return dense


def sigma_max_bound(w: torch.Tensor, d: torch.Tensor, offsets, alpha: float) -> torch.Tensor:
    """Per item [B], float64: a bound on sigma_max(L) of the symmetric stencil L (w, d) that is
    exact where it matters for convergence. The Gershgorin bound max_n sum_m |L[n, m]|
    screens the batch; items it cannot clear (alpha bound^2 >= 2) get their exact sigma_max
    from the eigenvalues of the dense L in float64. Shared by the divergence check and the
    Chebyshev series' radius."""
    bound = Stencil(w.detach(), d.detach(), offsets).abs_row_sums().amax((1, 2)).to(torch.float64)
    suspects = (alpha * bound * bound >= 2).nonzero().flatten()
    if suspects.numel():
        dense = stencil_to_dense(w[suspects].detach(), d[suspects].detach(), offsets).double()
        bound[suspects] = torch.minimum(bound[suspects], torch.linalg.eigvalsh(dense).abs().amax(1))
    return bound


def product_stencil_entries(p: torch.Tensor, q: torch.Tensor, height: int, width: int, offsets):
    """For G = P Q^T (P, Q [B, N, N]), on the stencil only, without forming G:
    (G[n, n + o_k] + G[n + o_k, n] as [B, K, H, W], the diagonal G[n, n] as [B, H, W]).
    Each entry is a dot product of two rows; with the flat offset m = dr W + dc > 0 the
    pairs (n, n + m) are the rows of two contiguous slabs, masked where n + o_k leaves
    the grid (a column wrap)."""
    B, N, _ = p.shape
    valid, _ = grid_masks(height, width, len(offsets) * 2, p.dtype, p.device)
    pairs = p.new_zeros(B, len(offsets), N)
    for k, (dr, dc) in enumerate(offsets):
        m = dr * width + dc
        if m >= N:  # a one-row grid: every pair of this offset leaves the grid
            continue
        dots = _row_dots(p[:, :N - m], q[:, m:]) + _row_dots(p[:, m:], q[:, :N - m])
        pairs[:, k, :N - m] = dots * valid[k].reshape(-1)[:N - m]
    return pairs.reshape(B, len(offsets), height, width), _row_dots(p, q).reshape(B, height, width)


def _row_dots(a: torch.Tensor, b: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """(a * b).sum(-1) for [B, n, N] tensors, a few batch items at a time (small temporaries)."""
    return torch.cat([(a[i:i + chunk] * b[i:i + chunk]).sum(-1) for i in range(0, a.shape[0], chunk)])


def flat_shifts(offsets, width: int, cells: int):
    """(k, m_k) for the offsets whose flat shift m_k = dr W + dc pairs some cells of a flat
    vector of `cells` cells (m_k < cells; a one-row grid's larger shifts pair nothing)."""
    return [(k, dr * width + dc) for k, (dr, dc) in enumerate(offsets) if dr * width + dc < cells]


class PaddedRows:
    """`rows` flat vectors of n cells in one zero-filled buffer, each row with at least `pad`
    zeros on either side (shared between neighbouring rows). Reading rows at cells n + s,
    |s| <= pad, is then a view: [count, n] (`rows`) or, for s = start + i step, i < length,
    [length, count, n] (`stacked`); past either end of a row it reads zeros. Views are
    built once, before a loop; writes go through `rows` views (never into the padding)."""

    def __init__(self, rows: int, cells: int, pad: int, like: torch.Tensor):
        self.cells, self.pad, self.stride = cells, pad, cells + pad
        self.flat = like.new_zeros(pad + rows * self.stride)

    def rows(self, first: int, count: int = 1, shift: int = 0) -> torch.Tensor:
        """[count, n]: rows first .. first + count - 1 read at cells n + shift."""
        return self.flat.as_strided((count, self.cells), (self.stride, 1), self.pad + first * self.stride + shift)

    def row(self, index: int, shift: int = 0) -> torch.Tensor:
        """[n]: one row read at cells n + shift."""
        return self.flat.as_strided((self.cells,), (1,), self.pad + index * self.stride + shift)

    def stacked(self, first: int, count: int, start: int, step: int, length: int) -> torch.Tensor:
        """[length, count, n]: rows first .. first + count - 1 read at cells n + start + i step."""
        return self.flat.as_strided((length, count, self.cells), (step, self.stride, 1),
                                    self.pad + first * self.stride + start)


class FlatStencil:
    """A symmetric stencil acting on flat vectors of B N cells (images back to back).

    In the flat layout the neighbour n + o_k of cell n is n + m_k with m_k = dr W + dc >= 0,
    so (L x)[n] = d[n] x[n] + sum_k ( w_k[n] x[n + m_k] + w_k[n - m_k] x[n - m_k] ): 1 + 2K
    terms, each a coefficient plane times x read at a shift. The weight planes are zeroed
    where n + o_k leaves the grid, which also zeroes the pairs that a flat shift makes
    across a row end or an image end. With x in a PaddedRows buffer every shifted read is a
    view over the whole vector (zeros past its ends), built once (`terms`); a product is
    then 1 + 2K multiply-adds on whole rows ([S, B N] for S rows at once), nothing sliced.
    """

    def __init__(self, w: torch.Tensor, d: torch.Tensor, offsets, scale: float = 1.0):
        B, K, H, W = w.shape
        cells = B * H * W
        valid, _ = grid_masks(H, W, 2 * K, w.dtype, w.device)
        self.d = (d * scale).reshape(-1)
        planes = (w * valid * scale).transpose(0, 1).reshape(K, -1)
        self.neighbours = []                          # (shift s, plane c): out[n] += c[n] x[n + s]
        for k, m in flat_shifts(offsets, W, cells):
            back = torch.zeros_like(planes[k])        # w_k[n - m], zero for n < m
            back[m:] = planes[k, :cells - m]
            self.neighbours += [(m, planes[k]), (-m, back)]
        self.reach = max([abs(s) for s, _ in self.neighbours], default=0)

    def terms(self, x: PaddedRows, first: int, count: int | None = None):
        """The 1 + 2K (coefficient plane [B N], x read at a shift) pairs of L x for x = row
        `first` of a PaddedRows buffer ([B N] views), or rows first .. first + count - 1
        ([count, B N] views). The buffer's pad must be at least `reach`."""
        def read(s):
            return x.row(first, s) if count is None else x.rows(first, count, s)
        return [(self.d, read(0))] + [(plane, read(s)) for s, plane in self.neighbours]

    @staticmethod
    def matmul_into(terms, out: torch.Tensor) -> torch.Tensor:
        """out = L x for the terms of x (`terms`); out [.., B N] must not overlap x."""
        plane, x = terms[0]
        torch.mul(plane, x, out=out)
        for plane, x in terms[1:]:
            out.addcmul_(plane, x)
        return out

    @staticmethod
    def subtract_product(terms, out: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """out = start - L x (start defaults to out itself: out -= L x) for the terms of x;
        out must not overlap x."""
        plane, x = terms[0]
        if start is None:
            out.addcmul_(plane, x, value=-1)
        else:
            torch.addcmul(start, plane, x, value=-1, out=out)
        for plane, x in terms[1:]:
            out.addcmul_(plane, x, value=-1)
        return out

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """L x for one flat x [B N] (copied into a padded buffer; for products outside loops)."""
        rows = PaddedRows(1, x.shape[-1], self.reach, x)
        rows.row(0).copy_(x)
        return self.matmul_into(self.terms(rows, 0), torch.empty_like(x))


def _progressions(shifts):
    """Splits [(k, m_k)] into runs whose shifts form arithmetic progressions (sorted,
    greedy): [(first shift, step, [k, ..])]. A run is read as one stacked view."""
    runs = []                                         # (first, step, planes, last shift)
    for k, m in sorted(shifts, key=lambda km: km[1]):
        if runs:
            first, step, planes, last = runs[-1]
            if len(planes) == 1 or m - last == step:
                runs[-1] = (first, m - last, planes + [k], m)
                continue
        runs.append((m, 0, [k], m))
    return [(first, step, planes) for first, step, planes, _ in runs]


class StencilReader:
    """Accumulates the stencil entries of G = sum_j p_j q_j^T, one term at a time, for flat
    p_j, q_j of S rows each ([S, B N], the rows summed too): G[n, n + o_k] + G[n + o_k, n]
    per plane k, i.e. p[n] q[n + m_k] + p[n + m_k] q[n], and G[n, n] = p[n] q[n].

    p and q are rows of PaddedRows buffers (pad >= the largest m_k), so the shifted reads
    of all offsets whose shifts form an arithmetic progression are one stacked view (both
    offsets with 4 neighbours; two runs with 8): a term costs 1 + 2 R multiply-adds of
    [R_i, S, B N] (R runs), on views built once by `bind`."""

    def __init__(self, rows: int, cells: int, offsets, width: int, like: torch.Tensor):
        self.planes = len(offsets)
        self.runs = _progressions(flat_shifts(offsets, width, cells))
        self.order = [k for _, _, planes in self.runs for k in planes]   # accumulator row -> plane
        self.diag = like.new_zeros(rows, cells)
        self.pairs = like.new_zeros(len(self.order), rows, cells)

    def bind(self, p: PaddedRows, p_first: int, q: PaddedRows, q_first: int, count: int):
        """The multiply-adds of one term, p = rows p_first .. p_first + count - 1 of p and
        q likewise (count <= the reader's rows), as (accumulator, factor, factor) views."""
        pv, qv = p.rows(p_first, count), q.rows(q_first, count)
        bound = [(self.diag[:count], pv, qv)]
        row = 0
        for start, step, planes in self.runs:
            acc = self.pairs[row:row + len(planes), :count]
            bound += [(acc, pv, q.stacked(q_first, count, start, step, len(planes))),
                      (acc, p.stacked(p_first, count, start, step, len(planes)), qv)]
            row += len(planes)
        return bound

    @staticmethod
    def add(bound, weight: float = 1.0) -> None:
        """Accumulates weight times one term (bound by `bind`)."""
        for acc, a, b in bound:
            acc.addcmul_(a, b, value=weight)

    def result(self, shape, valid: torch.Tensor, factor: float = 1.0):
        """factor times (grad_w [B, K, H, W], zero off the grid, grad_d [B, H, W])."""
        B, H, W = shape
        pairs = self.pairs.new_zeros(self.planes, B * H * W)
        if self.order:
            pairs[self.order] = self.pairs.sum(1)
        grad_w = pairs.reshape(self.planes, B, H, W).transpose(0, 1) * (valid * factor)
        return grad_w, self.diag.sum(0).reshape(B, H, W) * factor


# -- one Triton program per image (kernels/structured/series.py, chebyshev.py) ----------------

def program_max_cells(kernel_module: str, connectivity: int) -> int:
    """The largest grid (cells) one program of a one-program-per-image kernel module holds
    with 4 or 8 neighbours: its largest BLOCK_N, capped at EIGHT_NEIGHBOUR_MAX_BLOCK_N with 8.
    A one-row grid with 8 neighbours needs a block one cell wider than the row
    (program_block)."""
    kern = load_kernel_module(kernel_module)
    largest = max(kern.BLOCK_N_CHOICES)
    return min(largest, kern.EIGHT_NEIGHBOUR_MAX_BLOCK_N) if connectivity == 8 else largest


def program_block(kernel_module: str, height: int, width: int, offsets) -> int | None:
    """BLOCK_N of a one-program-per-image kernel for an H x W grid, or None where no block
    of the module holds it. The block holds every cell (BLOCK_N >= N) and every flat shift
    m_k = dr W + dc of the offsets (BLOCK_N >= max m_k: the shifted reads of the scratch row,
    at n +- m_k for n < BLOCK_N, stay inside its 3 BLOCK_N cells). The second condition only
    binds on one-row grids with 8 neighbours, where m = W + 1 > N."""
    reach = max(max(height * width, 1), *(dr * width + dc for dr, dc in offsets))
    limit = program_max_cells(kernel_module, 2 * len(offsets))
    fitting = [b for b in load_kernel_module(kernel_module).BLOCK_N_CHOICES if reach <= b <= limit]
    return min(fitting) if fitting else None


def program_backend(backend: str, height: int, width: int, offsets, kernel_module: str) -> str:
    """The backend a one-program-per-image piece runs on: Triton only where one program holds
    the grid (program_block), PyTorch otherwise."""
    if backend == "triton" and program_block(kernel_module, height, width, offsets) is None:
        return "torch"
    return backend


def flat_launch(kernel_module: str, kernel_name: str, w: torch.Tensor, offsets, dtype: torch.dtype):
    """(kernel, BLOCK_N, launch options, weight planes, scratch) for a kernel of the flat form
    on w [B, K, H, W]: BLOCK_N is program_block's (the smallest of the module's block sizes
    that holds the grid and its flat shifts); the weight planes [B, 2K, BLOCK_N] are w_k,
    zeroed where n + o_k leaves the grid, then w_k shifted by the flat offset
    m_k = dr W + dc (w_k[n - m_k], 0 for n < m_k); the scratch [B, 3 BLOCK_N] is zeroed
    (kernels/structured/stencil.py, "the flat form")."""
    kern = load_kernel_module(kernel_module)
    B, K, H, W = w.shape
    N = H * W
    block = program_block(kernel_module, H, W, offsets)
    if block is None:
        raise ValueError(f"no block of {kernel_module} holds a {H} x {W} grid with {2 * K} neighbours; "
                         "program_backend sends such grids to the PyTorch path")
    _, launch = kernel_config(kern, dtype, kernel_name)
    valid, _ = grid_masks(H, W, 2 * K, w.dtype, w.device)
    planes = w.new_zeros(B, 2 * K, block)
    planes[:, :K, :N] = (w * valid).reshape(B, K, N)
    for k, (dr, dc) in enumerate(offsets):
        m = dr * W + dc
        if 0 < m < N:
            planes[:, K + k, m:N] = planes[:, k, :N - m]
    return getattr(kern, kernel_name), block, launch, planes, w.new_zeros(B, 3 * block)
