"""Benchmark cases: every candidate of every group, as a callable on prepared inputs.

Used by test_benchmarks.py for timing, and run as a worker process for the CPU
peak-memory measurement (``python benchmarks/cases.py --serve``: one JSON request
[group, candidate, mode, shape] per input line, one peak in bytes per output line).

Groups and their shapes are defined here once; candidates that do not apply to a device
(Triton needs CUDA, SciPy runs on the CPU) are left out, never skipped at run time. A
candidate that applies but does not fit this machine's budget at a shape (the dense N x N
formulations at 56 x 56 on a CPU) is left out too and listed in NOT_RUN with the reason;
the report prints those rows.

The ActivationDiffusion group runs on three families of semantic maps S0
(`scm_ops.testing.semantic_maps`), because the published stack's speed depends on its input: positive maps
make part of its Newton-Schulz iterates subnormal, which slows x86 BLAS down about 2x.
"""
from __future__ import annotations

import inspect
import json
import os
import sys

import torch

import scm_ops
from scm_ops.reference import (activation_diffusion_ref, cosine_similarity_ref,
                               newton_schulz_inverse_ref, spatial_semantic_laplacian_ref)
from scm_ops.testing import MAP_FAMILIES, semantic_maps

ALPHA = 0.002
NS_ITERATIONS = 4  # the published p of blocks 2-4; see the README for why not 16
PUBLISHED_ITERATIONS = (16, 4, 4, 4)

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

# -- inputs -------------------------------------------------------------------------------

def _inputs(group, shape):
    g = torch.Generator().manual_seed(0)
    if group == "cosine":
        return (torch.randn(shape["B"], shape["N"], shape["D"], generator=g),)
    if group == "laplacian":
        n = shape["H"] * shape["W"]
        x = torch.randn(shape["B"], n, 16, generator=g)
        return (cosine_similarity_ref(x), torch.tensor(1.0))
    if group == "newton_schulz":
        n = shape["N"]
        side = int(round(n ** 0.5))
        x = torch.randn(shape["B"], n, 16, generator=g).abs()
        return (spatial_semantic_laplacian_ref(cosine_similarity_ref(x), (side, side), 1.2),)
    s = semantic_maps(shape["maps"], shape["B"], shape["C"], shape["H"], shape["W"], g)
    f = torch.rand(shape["B"], shape["H"], shape["W"], generator=g)
    return (f, s)


# -- the routes of ActivationDiffusion's p = 16 block, found at run time -------------------

_KNOWN_ROUTES = ("spectral", "newton_schulz", "chebyshev")


def large_p_routes() -> tuple[str, ...]:
    """The values ActivationDiffusion(large_p_route=...) accepts: scm_ops.diffusion's
    LARGE_P_ROUTES where it exists, else the known names the constructor accepts."""
    routes = getattr(scm_ops.diffusion, "LARGE_P_ROUTES", None)
    if routes is not None:
        return tuple(routes)
    accepted = []
    for route in _KNOWN_ROUTES:
        try:
            scm_ops.ActivationDiffusion((2, 2), large_p_route=route)
        except ValueError:
            continue
        accepted.append(route)
    return tuple(accepted)


def default_large_p_route(grid) -> str | None:
    """The static route of ActivationDiffusion(large_p_route=None) on DEVICE for this grid, as
    scm_ops.diffusion.default_large_p_route tells it (device, and the grid or its number of
    cells where the function takes them); None where that cannot be told. It is what runs
    on a CPU; on CUDA the module measures the routes at its first call and runs the fastest
    (scm_ops/route_choice.py), this one the first candidate."""
    fn = getattr(scm_ops.diffusion, "default_large_p_route", None)
    if fn is None:
        return None
    params = list(inspect.signature(fn).parameters)
    if len(params) == 1:
        args = (DEVICE,)
    elif len(params) == 2 and "grid" in params[1]:
        args = (DEVICE, tuple(grid))
    elif len(params) == 2 and params[1] in ("n", "cells", "n_cells", "num_cells", "N"):
        args = (DEVICE, grid[0] * grid[1])
    else:
        return None
    route = fn(*args)
    return route if route in large_p_routes() else None


# -- shapes, candidates and the budget ------------------------------------------------------

def _diffusion_shapes():
    """Per family: C = 200 at 14 x 14 (B = 64), 28 x 28 and 56 x 56 (B = 4); C = 1000 at
    14 x 14 for signed i.i.d. maps (on CUDA for every family). On the CPU 28 x 28 runs at
    B = 4 (the published stack takes ~5 s a pass there), on CUDA at B = 16, the cells of
    B = 64 at 14 x 14. Quick: B = 64, C = 200, signed i.i.d."""
    shapes = []
    for family in MAP_FAMILIES:
        shapes += [dict(B=64, C=200, H=14, W=14, maps=family, quick=family == "signed_iid")]
        if ON_CUDA or family == "signed_iid":
            shapes.append(dict(B=64, C=1000, H=14, W=14, maps=family))
        shapes += [dict(B=16 if ON_CUDA else 4, C=200, H=28, W=28, maps=family),
                   dict(B=4, C=200, H=56, W=56, maps=family)]
    return shapes


# (shape dict, quick?) per group; CPU shapes are scaled to fit the 10-minute budget of a
# 2-core machine, CUDA shapes span batch 8 to 256.
SHAPES = {
    "cosine": [dict(B=64, N=196, D=200, quick=True), dict(B=64, N=196, D=1000)],
    "laplacian": [dict(B=64, H=14, W=14, quick=True), dict(B=16, H=28, W=28)],
    "newton_schulz": ([dict(B=256, N=196), dict(B=128, N=256), dict(B=16, N=576), dict(B=8, N=784)] if ON_CUDA
                      else [dict(B=64, N=196, quick=True), dict(B=16, N=256), dict(B=4, N=576), dict(B=2, N=784)]),
    "diffusion": _diffusion_shapes(),
}

# What one call of a dense candidate may cost here: estimated forward work and memory kept
# for backward (see dense_cost). A 2-core CPU does ~50 GFLOP/s in float32 products when it
# is not shared: 1000 GFLOP is about 20 s a call, and a case makes 4 to 6 calls per mode.
BUDGET = (dict(gflop=1e6, saved_gb=100.0) if ON_CUDA else dict(gflop=1000.0, saved_gb=4.0))


def dense_cost(candidate: str, shape: dict) -> tuple[float, float] | None:
    """(forward GFLOP, GB kept for backward) of a diffusion candidate that forms N x N
    matrices, estimated from its dense work; None for the candidates whose cost is linear
    in N. Newton-Schulz: two N x N products (2 N^3 flop each) per iteration, and two N x N
    iterates kept per iteration; the published stack runs sum(p) = 28 iterations, the
    Newton-Schulz route 16. The spectral route: a symmetric eigendecomposition (~10 N^3
    flop) and its N x N eigenvectors kept."""
    B, n = shape["B"], shape["H"] * shape["W"]
    if candidate in ("published", "published_compiled", "scm_dense"):
        its = sum(PUBLISHED_ITERATIONS)
        return B * its * 2 * 2 * n ** 3 / 1e9, B * its * 2 * n * n * 4 / 1e9
    route = candidate[len("scm_structured_"):] if candidate.startswith("scm_structured_") else (
        default_large_p_route((shape["H"], shape["W"])) if candidate == "scm_structured" else None)
    if route == "newton_schulz":
        its = max(PUBLISHED_ITERATIONS)
        return B * its * 2 * 2 * n ** 3 / 1e9, B * its * 2 * n * n * 4 / 1e9
    if route == "spectral":
        return B * 10 * n ** 3 / 1e9, B * n * n * 4 / 1e9
    return None


def _over_budget(candidate, shape) -> str | None:
    if not ON_CUDA and candidate == "scm_structured_newton_schulz" and shape["H"] != 14:
        # on a CPU it is several times slower than the others already at 14 x 14
        return ("not run: the dense Newton-Schulz route is timed on a CPU at 14 x 14 "
                "only, to keep the run within 10 minutes")
    cost = dense_cost(candidate, shape) if "maps" in shape else None
    if cost is None or (cost[0] <= BUDGET["gflop"] and cost[1] <= BUDGET["saved_gb"]):
        return None
    gflop, gb = cost
    what = (f"its default route here, {default_large_p_route((shape['H'], shape['W']))}, does dense N x N work"
            if candidate == "scm_structured" else "dense N x N work")
    return (f"not run: ~{gflop:,.0f} GFLOP forward and ~{gb:.1f} GB kept for backward per call "
            f"({what}, N = {shape['H'] * shape['W']}), over this benchmark's budget of "
            f"{BUDGET['gflop']:,.0f} GFLOP and {BUDGET['saved_gb']:.0f} GB on {DEVICE.type}")


def candidates(group: str, shape: dict | None = None) -> list[str]:
    """The candidates of a group (at a shape, for the diffusion group). Diffusion: the
    published stack, the structured path with its default route for the p = 16 block
    ("scm_structured") and, at C = 200, with every other accepted route
    ("scm_structured_<route>"; newton_schulz at 14 x 14 only on a CPU). On CUDA also
    torch.compile of the published stack and the dense formulation on scm_ops' operators
    (on a CPU these cost minutes of compilation and matched the published stack within
    0.9-1.25x in earlier runs)."""
    names = ["published"]
    if group == "diffusion":
        default = default_large_p_route((shape["H"], shape["W"])) if shape else None
        names += ["scm_structured"]
        if not shape or shape["C"] == 200:
            # C changes only the neighbour cosines and the final scaling, not the p = 16 block
            names += [f"scm_structured_{r}" for r in large_p_routes() if r != default]
        if ON_CUDA:
            names += ["published_compiled", "scm_dense"]
        return names
    # torch.compile of the published code: CUDA only (on a 2-core CPU each graph compiles for
    # a minute, twice with the memory worker; earlier CPU runs measured 1.0-2.7x)
    names += (["published_compiled"] if ON_CUDA else []) + ["scm_torch"] + (["scm_triton"] if ON_CUDA else [])
    if group == "newton_schulz":
        names += ["torch_linalg_inv", "torch_linalg_solve"] + ([] if ON_CUDA else ["scipy_inv"])
    return names


def modes(group: str, candidate: str) -> list[str]:
    if candidate == "scipy_inv":
        return ["forward"]
    return ["forward", "forward_backward"] if group == "diffusion" else ["forward_backward"]


def selected_cases():
    """(group, candidate, mode, shape, quick) of every case this device runs, and
    NOT_RUN-style rows (group, candidate, shape, reason) of those it leaves out."""
    run, left_out = [], []
    for group, shapes in SHAPES.items():
        for shape in shapes:
            quick = shape.get("quick", False)
            dims = {k: v for k, v in shape.items() if k != "quick"}
            # torch.compile of the published code at the first shape of a group only (it takes
            # a minute a graph on a CPU, and recompiles per shape); the dense formulation on
            # scm_ops' operators (CUDA) at 14 x 14 only
            first = shape is shapes[0]
            for candidate in candidates(group, dims):
                if (candidate == "published_compiled" and not first) or (candidate == "scm_dense" and dims["H"] != 14):
                    continue
                reason = _over_budget(candidate, dims)
                if reason:
                    left_out.append(dict(group=group, candidate=candidate, shape=dims, reason=reason))
                    continue
                for mode in modes(group, candidate):
                    run.append((group, candidate, mode, dims,
                                quick and candidate in ("published", "scm_torch", "scm_structured")))
    return run, left_out


CASES, NOT_RUN = selected_cases()


def _function(group, candidate, shape):
    """The differentiable function a candidate computes, taking the group's inputs."""
    grid = (shape.get("H"), shape.get("W"))
    if group == "cosine":
        ref = cosine_similarity_ref
        ours = {"scm_torch": "torch", "scm_triton": "triton"}
        if candidate in ours:
            return lambda x: scm_ops.cosine_similarity(x, backend=ours[candidate])
    elif group == "laplacian":
        def ref(e, lam):
            return spatial_semantic_laplacian_ref(e, grid, lam)
        ours = {"scm_torch": "torch", "scm_triton": "triton"}
        if candidate in ours:
            return lambda e, lam: scm_ops.spatial_semantic_laplacian(e, grid, lam, backend=ours[candidate])
    elif group == "newton_schulz":
        def ref(L):
            return newton_schulz_inverse_ref(L, NS_ITERATIONS, ALPHA, detach_init=True)
        ours = {"scm_torch": "torch", "scm_triton": "triton"}
        if candidate in ours:
            return lambda L: scm_ops.newton_schulz_inverse(L, NS_ITERATIONS, ALPHA, True, backend=ours[candidate])
        if candidate == "torch_linalg_inv":
            return torch.linalg.inv
        if candidate == "torch_linalg_solve":
            return lambda L: torch.linalg.solve(L, torch.eye(L.shape[-1], dtype=L.dtype, device=L.device))
        if candidate == "scipy_inv":
            import numpy as np
            import scipy.linalg
            return lambda L: torch.from_numpy(np.stack([scipy.linalg.inv(m) for m in L.detach().numpy()]))
    else:
        if candidate.startswith("scm_structured") or candidate == "scm_dense":
            impl = "dense" if candidate == "scm_dense" else "structured"
            route = candidate[len("scm_structured_"):] if candidate.startswith("scm_structured_") else None
            module = scm_ops.ActivationDiffusion(grid, implementation=impl, large_p_route=route).to(DEVICE)
            return lambda f, s: module(f, s)
        lam = torch.ones(4, device=DEVICE, requires_grad=True)
        beta = torch.full((4,), 0.5, device=DEVICE, requires_grad=True)

        def ref(f, s):
            return activation_diffusion_ref(f, s, lam, beta)
    if candidate == "published":
        return ref
    if candidate == "published_compiled":
        return torch.compile(ref)
    raise KeyError(f"no candidate {candidate!r} in group {group!r}")


def make_case(group: str, candidate: str, mode: str, shape: dict):
    """A no-argument callable running one forward (and backward) pass, synchronised."""
    fn = _function(group, candidate, shape)
    leaves = [t.to(DEVICE).requires_grad_(mode == "forward_backward" and t.is_floating_point())
              for t in _inputs(group, shape)]

    def run(after_forward=None):
        if mode == "forward":
            with torch.no_grad():
                out = fn(*leaves)
        else:
            out = fn(*leaves)
            outs = out if isinstance(out, tuple) else (out,)
            if after_forward is not None:
                after_forward(outs)
            torch.autograd.backward([o.sum() for o in outs])
            for t in leaves:
                t.grad = None
        if ON_CUDA:
            torch.cuda.synchronize()
        return out

    return run


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _nbytes(outs) -> int:
    return sum(o.numel() * o.element_size() for o in outs)


def cpu_peak_bytes(run) -> tuple[int, int]:
    """(peak, saved): resident memory above the starting point at the peak of one call of
    `run`, and, between forward and backward, what the forward pass keeps beyond its
    outputs (the activations saved for backward). Linux only.

    The process must run with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_), so
    that every large tensor is mapped and unmapped on its own: then the resident-set high
    water mark (reset through /proc/self/clear_refs) counts every tensor alive at the peak,
    the ones a custom backward keeps included.
    """
    run()  # warm-up: lazy initialisation and compilation are not counted
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_bytes("VmRSS")
    saved = []
    run(lambda outs: saved.append(_rss_bytes("VmRSS") - base - _nbytes(outs)))
    return _rss_bytes("VmHWM") - base, (saved[0] if saved else 0)


class _MemoryWorker:
    """One long-lived process, started with a fixed glibc mmap threshold, that measures
    cases one after another (importing torch once)."""

    def __init__(self):
        import subprocess
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
                   OMP_WAIT_POLICY="PASSIVE", KMP_BLOCKTIME="0")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def measure(self, group, candidate, mode, shape) -> tuple[int, int]:
        self.proc.stdin.write(json.dumps([group, candidate, mode, shape]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("memory worker died; see its stderr above")
        return tuple(json.loads(line))


_worker = None


def memory_bytes(group, candidate, mode, shape) -> tuple[int, int]:
    """(peak, saved-for-backward) bytes of one call (see cpu_peak_bytes): on CUDA from the
    caching allocator's counters in-process; on the CPU in the worker process."""
    global _worker
    if ON_CUDA:
        run = make_case(group, candidate, mode, shape)
        run()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        saved = []
        run(lambda outs: saved.append(torch.cuda.memory_allocated() - base - _nbytes(outs)))
        return torch.cuda.max_memory_allocated() - base, (saved[0] if saved else 0)
    if _worker is None:
        _worker = _MemoryWorker()
    return _worker.measure(group, candidate, mode, shape)


def _serve():
    # Everything a request does happens before its answer: the timing process runs its next
    # case as soon as it reads one, and must not share the cores with this one (resetting
    # Dynamo after answering, which imports it the first time, slowed the next case 1.3-3x).
    for line in sys.stdin:
        group, candidate, mode, shape = json.loads(line)
        peak = cpu_peak_bytes(make_case(group, candidate, mode, shape))
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
        print(json.dumps(peak), flush=True)


if __name__ == "__main__":
    _serve()
