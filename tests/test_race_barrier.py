"""The one-program-per-image Triton kernels under the race and bounds checker (race_check.py).

The series kernels (kernels/structured/series.py) and the Chebyshev kernels
(kernels/structured/chebyshev.py) publish a vector to a per-image scratch row and read it
back shifted by the flat neighbour offsets, with a barrier on both sides of the store. In
Triton's CPU interpreter a missing barrier or a read past the scratch row gives the same
numbers as correct code (lanes run in lockstep, programs one after another); the checker
records every access per cell, lane, program and barrier interval, and puts the weight
planes and the scratch of every launch between NaN guard cells, so that both fail here.

Checked: the checker itself on small kernels written to race or to leave their row (and
their correct forms), then forward and backward of both kernel families on small grids:
both gradient semantics, 4 and 8 neighbours, a non-square grid, one-row and one-column
grids, the grids whose one row is as wide as the block (W = BLOCK_N: the 8-neighbour flat
offset W + 1 then reaches one cell past the scratch row), and the largest block once. The
results are also held to the PyTorch path. Batches of 2 images: a read past a row lands on
the other image's row or on a guard. Short series (2 steps; Chebyshev degree 3-4) keep the
interpreter's time low: 12-20 s for this file on 2 shared CPU cores (pytest's count; about
25 s of wall time with the start-up).
"""
import importlib.util
import os
import pathlib
import sys

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from scm_ops._common import kernel_module as kernel_module_named
from scm_ops.structured.chebyshev import ChebyshevFilter
from scm_ops.structured.series import StencilSeries
from scm_ops.testing import STENCIL_OFFSETS, assert_rel_rmse, random_stencil


def _import_race_check():
    """tests/race_check.py (the tests run with --import-mode=importlib: tests/ is not on sys.path)."""
    if "race_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("race_check", pathlib.Path(__file__).with_name("race_check.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["race_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["race_check"]


race_check = _import_race_check()
race_checker = race_check.race_checker           # the fixture


# -- the checker on kernels written to be wrong ---------------------------------------------

@triton.jit
def _publish_and_shift_kernel(x_ptr, scratch_ptr, out_ptr, SHIFT: tl.constexpr, BEFORE: tl.constexpr,
                              AFTER: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    """ROUNDS times: publish x to the middle third of this program's scratch row [3 BLOCK]
    (with a barrier before and after as asked), then x <- x[n + SHIFT] + x[n - SHIFT]."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    row = scratch_ptr + (3 * b + 1) * BLOCK
    x = tl.load(x_ptr + b * BLOCK + offs)
    for _ in tl.static_range(ROUNDS):
        if BEFORE:
            tl.debug_barrier()
        tl.store(row + offs, x)
        if AFTER:
            tl.debug_barrier()
        x = tl.load(row + offs + SHIFT) + tl.load(row + offs - SHIFT)
    tl.store(out_ptr + b * BLOCK + offs, x)


@triton.jit
def _collide_kernel(scratch_ptr, out_ptr, SHARED_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """Lanes 2i and 2i + 1 both write cell i of the scratch row; with SHARED_OUT every
    program writes the same cells of out."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    tl.store(scratch_ptr + (3 * b + 1) * BLOCK + offs // 2, offs.to(tl.float32))
    tl.store(out_ptr + (0 if SHARED_OUT else b * BLOCK) + offs, offs.to(tl.float32))


@triton.jit
def _shifted_copy_kernel(x_ptr, out_ptr, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs + SHIFT))


BLOCK, IMAGES = 16, 2


def _shift_reference(x, shift, rounds):
    for _ in range(rounds):
        padded = torch.nn.functional.pad(x, (shift, shift))
        x = padded[:, 2 * shift:] + padded[:, :-2 * shift]
    return x


def _publish_and_shift(checker, shift=1, before=True, after=True, rounds=2):
    x = torch.rand(IMAGES, BLOCK)
    scratch = checker.guarded_zeros(IMAGES, 3 * BLOCK, "scratch")
    out = torch.empty_like(x)
    _publish_and_shift_kernel[(IMAGES,)](x, scratch, out, SHIFT=shift, BEFORE=before, AFTER=after, ROUNDS=rounds,
                                         BLOCK=BLOCK)
    return x, out


def test_race_checker_passes_barriers_on_both_sides(race_checker):
    x, out = _publish_and_shift(race_checker)
    race_checker.assert_clean()
    assert race_checker.launches == ["_publish_and_shift_kernel"]
    torch.testing.assert_close(out, _shift_reference(x, 1, 2))


def test_race_checker_reports_a_missing_barrier_after_the_store(race_checker):
    _publish_and_shift(race_checker, after=False, rounds=1)
    assert race_checker.kinds() == {"read-after-write"}
    with pytest.raises(AssertionError, match="read-after-write on scratch"):
        race_checker.assert_clean()


def test_race_checker_reports_a_missing_barrier_before_the_store(race_checker):
    """The second round's store overwrites cells that other lanes read in the first."""
    _publish_and_shift(race_checker, before=False, rounds=2)
    assert race_checker.kinds() == {"write-after-read"}
    with pytest.raises(AssertionError, match="write-after-read on scratch"):
        race_checker.assert_clean()


def test_race_checker_reports_a_read_past_the_row(race_checker):
    """A shift of BLOCK + 1 reaches one cell past the scratch row at either end: image 0
    reads the guard before it and image 1's first cell, image 1 image 0's last cell and
    the guard after it (NaN, which reaches the result)."""
    _, out = _publish_and_shift(race_checker, shift=BLOCK + 1, rounds=1)
    assert race_checker.kinds() == {"foreign row", "guard"}
    assert out[0, 0].isnan() and out[1, -1].isnan() and not out[0, 1:].isnan().any()
    assert "guard cell 1 before row 0" in str(race_checker.violations)
    race_checker.take()
    _publish_and_shift(race_checker, shift=BLOCK, rounds=1)           # the row's last and first cell: in bounds
    race_checker.assert_clean()


def test_race_checker_reports_colliding_writes(race_checker):
    scratch = race_checker.guarded_zeros(IMAGES, 3 * BLOCK, "scratch")
    out = torch.empty(IMAGES, BLOCK)
    _collide_kernel[(IMAGES,)](scratch, out, SHARED_OUT=False, BLOCK=BLOCK)
    assert race_checker.kinds() == {"write-after-write"}
    race_checker.take()
    _collide_kernel[(IMAGES,)](scratch, out, SHARED_OUT=True, BLOCK=BLOCK)
    assert race_checker.kinds() == {"write-after-write", "cross-program"}
    race_checker.take()


def test_race_checker_reports_memory_of_no_argument(race_checker):
    """x's storage is the middle of a larger array that the kernel is not given: a read
    past x lands in memory of no argument (allocated, so the read itself is safe)."""
    pool = np.zeros(4 * BLOCK, dtype=np.float32)
    x, out = torch.from_numpy(pool[BLOCK:2 * BLOCK]), torch.empty(BLOCK)
    assert x.untyped_storage().nbytes() == 4 * BLOCK
    _shifted_copy_kernel[(1,)](x, out, SHIFT=0, BLOCK=BLOCK)
    race_checker.assert_clean()
    _shifted_copy_kernel[(1,)](x, out, SHIFT=BLOCK // 2, BLOCK=BLOCK)
    assert race_checker.kinds() == {"outside the arguments"}
    assert race_checker.take()[0].count == BLOCK // 2


def test_race_checker_restores_the_interpreter_and_flat_launch():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the race checker hooks Triton's CPU interpreter (TRITON_INTERPRET=1)")
    from triton.runtime import interpreter

    import scm_ops.structured.chebyshev
    import scm_ops.structured.series
    import scm_ops.structured.stencil
    modules = (scm_ops.structured.stencil, scm_ops.structured.series, scm_ops.structured.chebyshev)
    builder = interpreter.InterpreterBuilder

    def hooks():
        return [builder.create_masked_load, builder.create_masked_store, builder.create_barrier,
                builder.set_grid_idx, interpreter.GridExecutor.__call__, *(m.flat_launch for m in modules)]

    before = hooks()
    with race_check.RaceChecker():
        assert not any(now is then for now, then in zip(hooks(), before))
    assert all(now is then for now, then in zip(hooks(), before))


# -- the package's kernels -------------------------------------------------------------------
# (grid, connectivity, exact). A one-row grid with 8 neighbours needs BLOCK_N >= W + 1 (the
# flat offset of the diagonal neighbours): 1 x 256 takes block 512 in the series and, past
# the Chebyshev kernels' 8-neighbour limit of 256, the PyTorch series there; 1 x 512 takes the
# PyTorch steps in the series (its 8-neighbour limit is 512). 1 x 255 and 1 x 511 fill their
# block exactly (W + 1 = BLOCK_N).

def _case_id(case):
    grid, connectivity, exact = case
    return f"{grid[0]}x{grid[1]}-{connectivity}n-{'exact' if exact else 'published'}"


SERIES_CASES = [
    ((3, 5), 4, False), ((3, 5), 4, True), ((3, 5), 8, False), ((3, 5), 8, True),    # non-square
    ((1, 7), 8, True), ((7, 1), 8, False), ((1, 6), 4, False), ((6, 1), 4, True),     # one row, one column
    ((1, 256), 8, True), ((1, 512), 8, False),      # W = 256, 512 (the largest blocks with 8 neighbours)
    ((1, 255), 8, False), ((1, 511), 8, True),      # W + 1 = BLOCK_N
    ((256, 1), 8, True), ((512, 1), 8, False),
    ((23, 23), 4, False),                           # BLOCK_N 1024, the largest
]
CHEBYSHEV_CASES = [
    ((3, 5), 4, False), ((3, 5), 4, True), ((3, 5), 8, False), ((3, 5), 8, True),
    ((1, 7), 8, False), ((7, 1), 8, True), ((1, 6), 4, True), ((6, 1), 4, False),
    ((1, 256), 8, True),                            # W = 256, the largest block with 8 neighbours
    ((1, 255), 8, False),                           # W + 1 = BLOCK_N = 256
    ((256, 1), 8, False),
    ((23, 23), 4, True),                            # BLOCK_N 1024, the largest
]
RUNS_IN_PYTORCH = {("series", (1, 512)), ("chebyshev", (1, 256))}     # no block holds W + 1
LARGEST_BLOCK_GRID = (23, 23)                       # 529 cells


def _inputs(grid, connectivity, seed=4):
    w, d = random_stencil(IMAGES, connectivity, torch.float64, "cpu", seed=seed, grid=grid)
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(IMAGES, *grid, dtype=torch.float64, generator=g)
    weights = torch.randn(IMAGES, *grid, dtype=torch.float64, generator=g)
    return f, 0.5 * w, 0.5 * d, weights                # a small radius: a short Chebyshev series


def _value_and_gradients(apply, f, w, d, weights):
    leaves = [t.clone().requires_grad_() for t in (f, w, d)]
    u = apply(*leaves)
    return [u.detach(), *torch.autograd.grad((u * weights).sum(), leaves)]


def _check_under_race_checker(checker, apply, case, kernel_module, kernels):
    """Forward and backward on the Triton backend under the checker, then against PyTorch.
    The largest grid must take the module's largest block."""
    grid, connectivity, exact = case
    kern = kernel_module_named(f"structured.{kernel_module}")
    f, w, d, weights = _inputs(grid, connectivity)
    ours = _value_and_gradients(lambda *x: apply(*x, STENCIL_OFFSETS[connectivity], exact, "triton"),
                                f, w, d, weights)
    checker.assert_clean()
    assert sorted(checker.launches) == ([] if (kernel_module, grid) in RUNS_IN_PYTORCH else sorted(kernels))
    if grid == LARGEST_BLOCK_GRID:
        assert {cells for name, _, cells in checker.guarded if name.startswith("scratch")} \
            == {3 * max(kern.BLOCK_N_CHOICES)}
    ref = _value_and_gradients(lambda *x: apply(*x, STENCIL_OFFSETS[connectivity], exact, "torch"),
                               f, w, d, weights)
    for name, a, r in zip(("u", "dF", "dw", "dd"), ours, ref):
        assert_rel_rmse(a, r, 1e-12, f"{name} ({_case_id(case)})")


def _series(f, w, d, offsets, exact, backend):
    return StencilSeries.apply(f, w, d, 0.05, 1, offsets, exact, backend)             # 2 steps


def _chebyshev(f, w, d, offsets, exact, backend):
    return ChebyshevFilter.apply(f, w, d, 0.05, 2, offsets, exact, None, backend)      # degree 3-4


@pytest.mark.parametrize("case", SERIES_CASES, ids=map(_case_id, SERIES_CASES))
def test_series_kernels_race_free(race_checker, case):
    """stencil_series_fwd_kernel and stencil_series_bwd_kernel."""
    _check_under_race_checker(race_checker, _series, case, "series",
                              ["stencil_series_fwd_kernel", "stencil_series_bwd_kernel"])


@pytest.mark.parametrize("case", CHEBYSHEV_CASES, ids=map(_case_id, CHEBYSHEV_CASES))
def test_chebyshev_kernels_race_free(race_checker, case):
    """chebyshev_fwd_kernel (storing the basis) and chebyshev_bwd_kernel (with the published
    gradient, on its second stream too)."""
    _check_under_race_checker(race_checker, _chebyshev, case, "chebyshev",
                              ["chebyshev_fwd_kernel", "chebyshev_bwd_kernel"])


def test_series_kernels_float32_race_free(race_checker):
    """The series kernels also run in float32 (4-byte cells)."""
    f, w, d, weights = (t.float() for t in _inputs((4, 6), 8))
    ours = _value_and_gradients(lambda *x: _series(*x, STENCIL_OFFSETS[8], True, "triton"), f, w, d, weights)
    race_checker.assert_clean()
    assert sorted(race_checker.launches) == ["stencil_series_bwd_kernel", "stencil_series_fwd_kernel"]
    ref = _value_and_gradients(lambda *x: _series(*x, STENCIL_OFFSETS[8], True, "torch"), f, w, d, weights)
    for name, a, r in zip(("u", "dF", "dw", "dd"), ours, ref):
        assert_rel_rmse(a, r, 2e-5, name)


def test_chebyshev_forward_without_basis_race_free(race_checker):
    """Under no_grad the forward kernel keeps no basis (the scratch is passed as its unused
    basis pointer too)."""
    f, w, d, _ = _inputs((3, 5), 8)
    with torch.no_grad():
        u = _chebyshev(f, w, d, STENCIL_OFFSETS[8], False, "triton")
        race_checker.assert_clean()
        assert race_checker.launches == ["chebyshev_fwd_kernel"]
        assert_rel_rmse(u, _chebyshev(f, w, d, STENCIL_OFFSETS[8], False, "torch"), 1e-12, "u")
