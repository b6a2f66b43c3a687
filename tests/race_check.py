"""A race and bounds checker for Triton kernels run in Triton's CPU interpreter.

The one-program-per-image kernels (kernels/structured/series.py, chebyshev.py) publish a
vector to a per-image scratch row in global memory and read it back shifted by the flat
neighbour offsets, with a `tl.debug_barrier()` on both sides of the store
(kernels/structured/stencil.py, `_flat_publish`). The interpreter runs the elements of a
block in lockstep (vectorised numpy) and the programs of a grid one after the other, so a
missing barrier or a read past a row end gives the same numbers as correct code there and
only shows on a GPU. This checker makes both visible on the CPU.

While a `RaceChecker` is active (a context manager; `race_checker` is the pytest fixture):

- Every masked or unmasked load and store of the interpreter (`InterpreterBuilder.
  create_masked_load` / `create_masked_store`, which the unmasked, atomic-load/store and
  descriptor forms call) is recorded per memory cell of the storage of every tensor passed
  to a kernel (`GridExecutor.__call__`, which runs a launch's programs one after another):
  which lane (the element's index in the flattened block tensor of the access) and which
  program last wrote the cell, which last read it, and in which barrier interval. An
  interval is the stretch of one program between two `tl.debug_barrier()` calls
  (`InterpreterBuilder.create_barrier`); a new program (`set_grid_idx`, called by the
  interpreter's `GridExecutor` before each program) starts a new one.
- It reports, per kernel launch (state is reset at each launch):
  * "read-after-write", "write-after-read", "write-after-write": two different lanes of one
    program touch a cell inside one barrier interval, at least one of them writing (two
    lanes of one store writing the same cell included). On a GPU the lanes are threads
    (or elements of threads) without an order inside an interval. Counting every element
    as its own lane is stricter than a GPU, where a thread holds several elements.
  * "cross-program": a cell that one program writes and another program reads or writes
    during the same launch (programs run concurrently and have no barrier between them).
  * "foreign row": program b touches a row other than row b of a per-image buffer.
  * "guard": an access to a guard cell (below).
  * "outside the arguments": an access to memory in no tensor argument's storage (the
    kernel can own no other memory).
- Per-image buffers get guard cells: `guarded_copy` returns a copy of a [B, ...] tensor,
  same shape, strides and contents, placed in the middle of a larger buffer whose cells
  outside it (one row's worth before and after) hold NaN (the largest value for integer
  types); the rows are registered so that an access can be mapped to (row, column) and
  the owning program. While active, the checker replaces `flat_launch`
  (scm_ops/structured/stencil.py, also imported by name into the series and Chebyshev
  modules) with a wrapper that puts the weight planes [B, 2K, BLOCK_N] and the scratch
  [B, 3 BLOCK_N] of every one-program-per-image launch into such buffers: a read past a
  row end then lands on another image's row (reported) or on NaN (reported, and poisoning
  the result).

Limitations: tensors must be on the CPU (the interpreter then runs on their own memory);
atomic read-modify-write operations and `tl.atomic_cas` are not recorded (no kernel here
uses them); the checker sees the accesses of the launches that run, not those of block
sizes or flags no test launches.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

KINDS = ("read-after-write", "write-after-read", "write-after-write", "cross-program", "foreign row", "guard",
         "outside the arguments")


@dataclasses.dataclass
class _Guarded:
    """A per-image buffer in a guarded allocation: `whole` (kept alive), the rows start
    `before` cells into it, `rows` rows of `row_cells` cells."""
    whole: torch.Tensor
    name: str
    before: int
    rows: int
    row_cells: int


class _Region:
    """The per-cell record of one tensor storage during one launch."""

    def __init__(self, name: str, start: int, nbytes: int, itemsize: int, guarded: _Guarded | None):
        self.name = name
        self.start = start
        self.itemsize = itemsize
        self.cells = nbytes // itemsize
        self.end = start + self.cells * itemsize
        self.guarded = guarded
        self.owner = None
        if guarded is not None:
            self.owner = np.full(self.cells, -1, dtype=np.int64)    # -1: guard cell
            inner = slice(guarded.before, guarded.before + guarded.rows * guarded.row_cells)
            self.owner[inner] = np.repeat(np.arange(guarded.rows), guarded.row_cells)
        n = self.cells
        self.w_epoch = np.full(n, -1, dtype=np.int64)        # interval of the last write
        self.w_lane = np.full(n, -1, dtype=np.int64)
        self.w_prog = np.full(n, -1, dtype=np.int64)         # program of the last write (this launch)
        self.r_epoch = np.full(n, -1, dtype=np.int64)        # interval of the reads recorded below
        self.r_lane = np.full(n, -1, dtype=np.int64)         # a lane that read in that interval
        self.r_lanes_many = np.zeros(n, dtype=bool)          # more than one lane read in it
        self.r_prog = np.full(n, -1, dtype=np.int64)         # a program that read (this launch)
        self.r_progs_many = np.zeros(n, dtype=bool)          # more than one program read

    def where(self, cell: int) -> str:
        g = self.guarded
        if g is None:
            return f"element {cell}"
        rel = cell - g.before
        if rel < 0:
            return f"guard cell {-rel} before row 0"
        if rel >= g.rows * g.row_cells:
            return f"guard cell {rel - g.rows * g.row_cells + 1} after row {g.rows - 1}"
        return f"row {rel // g.row_cells}, column {rel % g.row_cells}"


@dataclasses.dataclass
class Violation:
    """All accesses of one kind to one buffer in one kernel, with the first one described."""
    kernel: str
    kind: str
    buffer: str
    count: int
    first: str

    def __str__(self):
        return f"{self.kernel}: {self.kind} on {self.buffer} ({self.count} element accesses); first: {self.first}"


class RaceChecker:
    """Records the memory accesses of the Triton kernels launched in the interpreter while it
    is active (`with RaceChecker() as checker:`) and collects the violations described in
    the module docstring; `assert_clean()` fails on any of them."""

    def __init__(self):
        self._violations: dict[tuple, Violation] = {}
        self._guarded: dict[int, _Guarded] = {}       # storage address -> guarded buffer
        self._regions: list[_Region] = []
        self._starts = self._ends = np.zeros(0, dtype=np.uint64)
        self._kernel = None
        self._program = -1
        self._interval = -1
        self._epoch = 0
        self._undo = []
        self.launches: list[str] = []                 # kernel names, in launch order
        self.guarded: list[tuple[str, int, int]] = []  # (name, rows, cells per row) of each guarded buffer

    # -- activation --------------------------------------------------------------------
    def __enter__(self):
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the race checker needs Triton's interpreter (TRITON_INTERPRET=1)")
        from triton.runtime import interpreter

        builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
        load, store = builder.create_masked_load, builder.create_masked_store
        barrier, grid_idx, run = builder.create_barrier, builder.set_grid_idx, executor.__call__
        checker = self

        def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
            checker._access(ptrs.data, mask.data, store=False)
            return load(self, ptrs, mask, other, cache_policy, is_volatile)

        def create_masked_store(self, ptrs, value, mask, cache_policy):
            checker._access(ptrs.data, mask.data, store=True)
            return store(self, ptrs, value, mask, cache_policy)

        def create_barrier(self):
            checker._barrier()
            return barrier(self)

        def set_grid_idx(self, x, y, z):
            grid_idx(self, x, y, z)
            nx, ny, _ = self.grid_dim
            checker._program_start(x + nx * (y + ny * z))

        def __call__(self, *args, **kwargs):
            named = [*zip(self.arg_names, args), *kwargs.items()]
            checker._launch_start(getattr(self.fn, "__name__", "kernel"), named)
            try:
                return run(self, *args, **kwargs)
            finally:
                checker._launch_end()

        self._patch(builder, "create_masked_load", create_masked_load)
        self._patch(builder, "create_masked_store", create_masked_store)
        self._patch(builder, "create_barrier", create_barrier)
        self._patch(builder, "set_grid_idx", set_grid_idx)
        self._patch(executor, "__call__", __call__)
        self._patch_flat_launch()
        return self

    def __exit__(self, *exc):
        while self._undo:
            owner, name, value = self._undo.pop()
            setattr(owner, name, value)
        return False

    def _patch(self, owner, name, value):
        self._undo.append((owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)))
        setattr(owner, name, value)

    def _patch_flat_launch(self):
        """Every module holding `flat_launch` by name gets the guarding wrapper."""
        import importlib

        stencil = importlib.import_module("scm_ops.structured.stencil")
        original = stencil.flat_launch

        def flat_launch(kernel_module, kernel_name, *args, **kwargs):
            kernel, block, launch, planes, scratch = original(kernel_module, kernel_name, *args, **kwargs)
            return (kernel, block, launch, self.guarded_copy(planes, f"weight planes of {kernel_name}"),
                    self.guarded_copy(scratch, f"scratch of {kernel_name}"))

        for name in ("scm_ops.structured.stencil", "scm_ops.structured.series", "scm_ops.structured.chebyshev"):
            module = importlib.import_module(name)
            if getattr(module, "flat_launch", None) is original:
                self._patch(module, "flat_launch", flat_launch)

    # -- guarded buffers ---------------------------------------------------------------
    def guarded_copy(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """t [B, ...] (contiguous) copied into the middle of a buffer with one row of guard
        cells before and after; its rows are image b's, owned by program b."""
        if t.dim() == 0 or t.shape[0] == 0 or t.numel() == 0:
            return t
        rows, row_cells = t.shape[0], t[0].numel()
        fill = float("nan") if t.dtype.is_floating_point else torch.iinfo(t.dtype).max
        whole = torch.full(((rows + 2) * row_cells,), fill, dtype=t.dtype, device=t.device)
        inner = whole[row_cells:(rows + 1) * row_cells].view(t.shape)
        inner.copy_(t)
        self._guarded[whole.untyped_storage().data_ptr()] = _Guarded(whole, name, row_cells, rows, row_cells)
        self.guarded.append((name, rows, row_cells))
        return inner

    def guarded_zeros(self, rows: int, row_cells: int, name: str, dtype=torch.float32) -> torch.Tensor:
        """A zeroed [rows, row_cells] per-image buffer with guard cells (guarded_copy)."""
        return self.guarded_copy(torch.zeros(rows, row_cells, dtype=dtype), name)

    # -- events ------------------------------------------------------------------------
    def _launch_start(self, kernel: str, args):
        """A launch of `kernel` with (name, value) arguments: a fresh record of the storage of
        each tensor argument (a guarded buffer's whole allocation, guards included)."""
        self.launches.append(kernel)
        self._kernel = kernel
        regions, seen = [], set()
        for arg_name, arg in args:
            if not isinstance(arg, torch.Tensor):
                continue
            if arg.device.type != "cpu":
                raise RuntimeError(f"{kernel}: the race checker reads CPU tensors only ({arg_name} is on "
                                   f"{arg.device})")
            storage = arg.untyped_storage()
            start = storage.data_ptr()
            if start in seen or storage.nbytes() == 0:
                continue
            seen.add(start)
            guarded = self._guarded.get(start)
            name = guarded.name if guarded else f"{arg_name} of {kernel}"
            regions.append(_Region(name, start, storage.nbytes(), arg.element_size(), guarded))
        regions.sort(key=lambda r: r.start)
        self._regions = regions
        self._starts = np.array([r.start for r in regions], dtype=np.uint64)
        self._ends = np.array([r.end for r in regions], dtype=np.uint64)
        self._program = -1

    def _launch_end(self):
        self._kernel = None
        self._regions = []
        self._starts = self._ends = np.zeros(0, dtype=np.uint64)

    def _program_start(self, program: int):
        self._program = program
        self._interval = 0
        self._epoch += 1

    def _barrier(self):
        self._interval += 1
        self._epoch += 1

    # -- accesses ----------------------------------------------------------------------
    def _access(self, addresses: np.ndarray, mask: np.ndarray, store: bool):
        if self._kernel is None:
            return
        addresses = np.asarray(addresses)
        lanes = np.flatnonzero(np.broadcast_to(np.asarray(mask, dtype=bool), addresses.shape))
        if lanes.size == 0:
            return
        addresses = addresses.reshape(-1)[lanes].astype(np.uint64)
        which = np.searchsorted(self._starts, addresses, side="right").astype(np.int64) - 1
        outside = which < 0
        outside[~outside] = addresses[~outside] >= self._ends[which[~outside]]
        if outside.any():
            op, prog, interval = ("store" if store else "load"), self._program, self._interval
            self._violation("outside the arguments", "memory", outside, addresses.astype(np.int64), lanes,
                            lambda a, l: f"a {op} by lane {l} of program {prog} (interval {interval}) at address "
                            f"{a:#x}, in no tensor argument's storage")
            addresses, lanes, which = addresses[~outside], lanes[~outside], which[~outside]
            if addresses.size == 0:
                return
        lo, hi = which.min(), which.max()
        if lo == hi:          # the usual case: one buffer
            self._record(self._regions[lo], addresses, lanes, store)
            return
        for r in np.unique(which):
            pick = which == r
            self._record(self._regions[r], addresses[pick], lanes[pick], store)

    def _record(self, region: _Region, addresses, lanes, store: bool):
        """Checks and records an access of `lanes` to `region` at `addresses`."""
        cells = ((addresses - np.uint64(region.start)) // np.uint64(region.itemsize)).astype(np.int64)
        prog, epoch, here = self._program, self._epoch, f"program {self._program}, interval {self._interval}"
        op = "store" if store else "load"

        def flag(kind, bad, describe):
            if bad.any():
                self._violation(kind, region.name, bad, cells, lanes, describe)

        if region.owner is not None:
            owner = region.owner[cells]
            flag("guard", owner < 0, lambda c, l: f"{here}: a {op} by lane {l} at {region.where(c)}")
            flag("foreign row", (owner >= 0) & (owner != prog),
                 lambda c, l: f"{here}: a {op} by lane {l} at {region.where(c)}")

        def other_lane(recorded, c, l):
            return f"lane {recorded[c]}" if recorded[c] != l else "another lane"

        def other_program(c):
            for recorded in (region.w_prog, region.r_prog):
                if recorded[c] >= 0 and recorded[c] != prog:
                    return f"program {recorded[c]}"
            return "another program"

        if not store:
            flag("read-after-write", (region.w_epoch[cells] == epoch) & (region.w_lane[cells] != lanes),
                 lambda c, l: f"{here}: lane {l} read {region.where(c)} after "
                 f"{other_lane(region.w_lane, c, l)} wrote it, with no barrier between")
            w_prog = region.w_prog[cells]
            flag("cross-program", (w_prog >= 0) & (w_prog != prog),
                 lambda c, l: f"{here}: lane {l} read {region.where(c)}, which {other_program(c)} wrote")
            stale = region.r_epoch[cells] != epoch           # the first read of the cell in this interval
            fresh = cells[stale]
            region.r_epoch[fresh] = epoch
            region.r_lane[fresh] = lanes[stale]
            region.r_lanes_many[fresh] = False
            region.r_lanes_many[cells[region.r_lane[cells] != lanes]] = True
            r_prog = region.r_prog[cells]
            region.r_prog[cells[r_prog < 0]] = prog
            region.r_progs_many[cells[(r_prog >= 0) & (r_prog != prog)]] = True
            return

        bad = (region.w_epoch[cells] == epoch) & (region.w_lane[cells] != lanes)
        unique, counts = np.unique(cells, return_counts=True)
        if (counts > 1).any():        # two lanes of this store on one cell
            bad |= np.isin(cells, unique[counts > 1])
        flag("write-after-write", bad, lambda c, l: f"{here}: lane {l} wrote {region.where(c)}, which another "
             "lane wrote in the same interval")
        flag("write-after-read",
             (region.r_epoch[cells] == epoch) & (region.r_lanes_many[cells] | (region.r_lane[cells] != lanes)),
             lambda c, l: f"{here}: lane {l} wrote {region.where(c)} after {other_lane(region.r_lane, c, l)} "
             "read it, with no barrier between")
        w_prog, r_prog = region.w_prog[cells], region.r_prog[cells]
        flag("cross-program",
             ((w_prog >= 0) & (w_prog != prog)) | ((r_prog >= 0) & (r_prog != prog)) | region.r_progs_many[cells],
             lambda c, l: f"{here}: lane {l} wrote {region.where(c)}, which {other_program(c)} also accessed")
        region.w_epoch[cells] = epoch
        region.w_lane[cells] = lanes
        region.w_prog[cells] = prog

    def _violation(self, kind, buffer, bad, where, lanes, describe):
        """Counts the accesses flagged in `bad`; describes the first of each (kernel, kind,
        buffer) by describe(where[i], lanes[i])."""
        assert kind in KINDS, kind
        key = (self._kernel, kind, buffer)
        count = int(np.count_nonzero(bad))
        if key in self._violations:
            self._violations[key].count += count
            return
        i = int(np.flatnonzero(bad)[0])
        self._violations[key] = Violation(self._kernel, kind, buffer, count, describe(int(where[i]), int(lanes[i])))

    # -- results -----------------------------------------------------------------------
    @property
    def violations(self) -> list[Violation]:
        return list(self._violations.values())

    def kinds(self) -> set[str]:
        """The kinds of violation recorded so far."""
        return {v.kind for v in self._violations.values()}

    def take(self) -> list[Violation]:
        """The violations recorded so far, forgetting them."""
        found = self.violations
        self._violations.clear()
        return found

    def assert_clean(self):
        """Fails, listing them, on the violations recorded since the last call."""
        found = self.take()
        if found:
            raise AssertionError("Triton kernel memory accesses that race or leave their row:\n  "
                                 + "\n  ".join(map(str, found)))


@pytest.fixture
def race_checker(request):
    """An active RaceChecker; skips where the Triton kernels are compiled rather than
    interpreted. Violations that a passing test left unasserted fail it at teardown."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the race checker hooks Triton's CPU interpreter (TRITON_INTERPRET=1)")
    failed = request.session.testsfailed
    with RaceChecker() as checker:
        yield checker
    if request.session.testsfailed == failed:
        checker.assert_clean()
