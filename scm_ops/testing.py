"""Error measures, tolerances and inputs (random stencils, the semantic-map families) shared
by the tests and benchmarks."""
from __future__ import annotations

import torch


def relative_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / ||expected||_2 over all elements, in float64
    (0 when both are zero)."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    den = e.norm().item()
    num = (a - e).norm().item()
    return num / den if den > 0 else num


def assert_rel_rmse(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{what}: non-finite values")
    err = relative_rmse(actual, expected)
    if not err <= tol:
        raise AssertionError(f"{what}: relative RMSE {err:.3e} > {tol:.1e}")


def device_under_test() -> torch.device:
    """Device the test suite runs the operators on: $SCM_OPS_TEST_DEVICE, else CUDA when
    available, else the CPU (where Triton kernels run in the interpreter)."""
    import os
    name = os.environ.get("SCM_OPS_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# Tolerances on the relative RMSE against a float64 reference, by input dtype. float64 and
# float32 follow from unit roundoff (1.1e-16, 6e-8) times the growth of sums of up to ~1000
# terms and of up to 16 Newton-Schulz products; half types from the storage precision of
# their inputs and outputs (fp16 4.9e-4, bf16 3.9e-3).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def dtype_params():
    """pytest params: float64, float32, float16 everywhere; bfloat16 on CUDA only (the
    Triton CPU interpreter has no bfloat16)."""
    import pytest
    on_cuda = device_under_test().type == "cuda"
    return [torch.float64, torch.float32, torch.float16,
            pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
                not on_cuda, reason="bfloat16 needs CUDA (not in the Triton interpreter)"))]


# ---------------------------------------------------------------- stencil test inputs
# Dense references and random stencils for the tests of the structured path, written cell by
# cell here, independently of scm_ops.structured (whose grid_masks / stencil_to_dense they
# check), and shared by tests/test_stencil.py and tests/test_chebyshev.py.
STENCIL_GRID = (4, 5)
# Forward neighbour offsets (row, column), written out here rather than taken from the package.
STENCIL_OFFSETS = {4: ((0, 1), (1, 0)), 8: ((0, 1), (1, 0), (1, 1), (1, -1))}


def on_grid(r, c, grid):
    return 0 <= r < grid[0] and 0 <= c < grid[1]


def dense_laplacian(w, d, offsets):
    """The dense [B, N, N] symmetric L of a stencil, entry by entry (independent of the
    package's stencil_to_dense): L[n, n] = d[n], L[n, n + o_k] = L[n + o_k, n] = w_k[n]."""
    B, _, H, W = w.shape
    rows, cols, vals = [], [], []
    for r in range(H):
        for c in range(W):
            n = r * W + c
            rows.append(n)
            cols.append(n)
            vals.append(d[:, r, c])
            for k, (dr, dc) in enumerate(offsets):
                if on_grid(r + dr, c + dc, (H, W)):
                    m = (r + dr) * W + c + dc
                    rows += [n, m]
                    cols += [m, n]
                    vals += [w[:, k, r, c], w[:, k, r, c]]
    dense = w.new_zeros(B, H * W, H * W)
    return dense.index_put((torch.arange(B)[:, None], torch.tensor(rows)[None], torch.tensor(cols)[None]),
                           torch.stack(vals, 1))


def neighbour_entries(dense, height, width, offsets):
    """dense[b, n, n + o_k] as [B, K, H, W], 0 where n + o_k leaves the grid."""
    B = dense.shape[0]
    out = dense.new_zeros(B, len(offsets), height, width)
    for k, (dr, dc) in enumerate(offsets):
        for r in range(height):
            for c in range(width):
                if 0 <= r + dr < height and 0 <= c + dc < width:
                    out[:, k, r, c] = dense[:, r * width + c, (r + dr) * width + c + dc]
    return out


def random_stencil(batch, connectivity, dtype, device, seed=0, grid=STENCIL_GRID):
    """w [B, K, H, W] (0 where the neighbour is off the grid), d [B, H, W] of a symmetric L
    shaped like a block's at lam near 1: off-diagonal entries in (-0.2, 1], small diagonal."""
    g = torch.Generator().manual_seed(seed)
    offsets = STENCIL_OFFSETS[connectivity]
    w = 1 - 1.2 * torch.rand(batch, len(offsets), *grid, generator=g, dtype=dtype)
    for k, (dr, dc) in enumerate(offsets):
        for r in range(grid[0]):
            for c in range(grid[1]):
                if not on_grid(r + dr, c + dc, grid):
                    w[:, k, r, c] = 0
    d = 0.5 * torch.rand(batch, *grid, generator=g, dtype=dtype)
    return w.to(device), d.to(device)


# -- semantic maps S0 of the input families the benchmarks and tests run on -----------------
MAP_FAMILIES = ("signed_iid", "signed_smooth", "positive")


def semantic_maps(family: str, batch: int, channels: int, height: int, width: int,
                  generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Semantic maps S0 [batch, channels, height, width] of one input family (on the CPU).

    - "signed_iid": i.i.d. standard normal entries.
    - "signed_smooth": standard normal entries averaged over the 5 x 5 window of grid cells
      around each cell (the window clipped at the border), then divided by the standard
      deviation of the whole tensor: signed, with neighbouring cells correlated, as the
      3 x 3 convolution output that S0 is in SCM.
    - "positive": absolute values of standard normal entries.

    The same generator state gives the same draw for every family.
    """
    if family not in MAP_FAMILIES:
        raise ValueError(f"family must be one of {MAP_FAMILIES}, got {family!r}")
    x = torch.randn(batch, channels, height, width, generator=generator, dtype=dtype)
    if family == "positive":
        return x.abs()
    if family == "signed_smooth":
        x = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
        return x / x.std()
    return x
