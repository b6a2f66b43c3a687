"""Benchmark cases: every candidate of every group, as a callable on prepared inputs.

Used by test_benchmarks.py for timing, and run as a worker process for the CPU
peak-memory measurement (``python benchmarks/cases.py --serve``: one JSON request
[group, candidate, mode, shape] per input line, one peak in bytes per output line).

Groups and their shapes are defined here once; candidates that do not apply to a device
(Triton needs CUDA, SciPy runs on the CPU) are left out, never skipped at run time.
"""
from __future__ import annotations

import json
import os
import sys

import torch

import scm_ops
from scm_ops.diffusion import LARGE_P_ROUTES, default_large_p_route
from scm_ops.reference import (activation_diffusion_ref, cosine_similarity_ref,
                               newton_schulz_inverse_ref, spatial_semantic_laplacian_ref)

ALPHA = 0.002
NS_ITERATIONS = 4  # the published p of blocks 2-4; see the README for why not 16

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
OTHER_LARGE_P_ROUTE = next(r for r in LARGE_P_ROUTES if r != default_large_p_route(DEVICE))

# (shape dict, quick?) per group; CPU shapes are scaled to fit the 10-minute budget of a
# 2-core machine, CUDA shapes span batch 8 to 256.
SHAPES = {
    "cosine": [dict(B=64, N=196, D=200, quick=True), dict(B=64, N=196, D=1000)],
    "laplacian": [dict(B=64, H=14, W=14, quick=True), dict(B=16, H=28, W=28)],
    "newton_schulz": ([dict(B=256, N=196), dict(B=128, N=256), dict(B=16, N=576), dict(B=8, N=784)] if ON_CUDA
                      else [dict(B=64, N=196, quick=True), dict(B=16, N=256), dict(B=4, N=576), dict(B=2, N=784)]),
    "diffusion": [dict(B=64, C=200, H=14, W=14, quick=True), dict(B=64, C=1000, H=14, W=14),
                  dict(B=64 if ON_CUDA else 4, C=200, H=28, W=28)],
}


def candidates(group: str) -> list[str]:
    names = ["published", "published_compiled"]
    if group == "diffusion":
        # the structured path with its default route for the p = 16 block on this device,
        # and with the other route (scm_ops.diffusion.default_large_p_route)
        names += ["scm_structured", f"scm_structured_{OTHER_LARGE_P_ROUTE}", "scm_dense"]
    else:
        names += ["scm_torch"] + (["scm_triton"] if ON_CUDA else [])
    if group == "newton_schulz":
        names += ["torch_linalg_inv", "torch_linalg_solve"] + ([] if ON_CUDA else ["scipy_inv"])
    return names


def modes(group: str, candidate: str) -> list[str]:
    if candidate == "scipy_inv":
        return ["forward"]
    return ["forward", "forward_backward"] if group == "diffusion" else ["forward_backward"]


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
    s = torch.randn(shape["B"], shape["C"], shape["H"], shape["W"], generator=g).abs()
    f = torch.rand(shape["B"], shape["H"], shape["W"], generator=g)
    return (f, s)


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
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
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
    for line in sys.stdin:
        group, candidate, mode, shape = json.loads(line)
        print(json.dumps(cpu_peak_bytes(make_case(group, candidate, mode, shape))), flush=True)
        torch._dynamo.reset()


if __name__ == "__main__":
    _serve()
