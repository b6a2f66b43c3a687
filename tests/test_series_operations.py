"""How many operations a step of the PyTorch series runs: on CUDA tensors (grids above the
Triton kernels' on-chip limits, or backend="torch") each one is a kernel launch, and on the
CPU each costs a fixed ~1.7 us besides its arithmetic (docs/structured.md, "The PyTorch
path's cost per step"). Counted with torch.profiler on the CPU: the operators called inside
each autograd Function, divided by its steps. The bounds sit about one operation above what
the loops run today (Chebyshev forward 13, published backward 17, exact backward 19; the
matrix-free p = 4 blocks 11 and 15 per step, plus set-up spread over their 16 steps), less
than one above what they measure, so a change that adds an operation to every step fails
here."""
from collections import defaultdict

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from scm_ops.structured.chebyshev import ChebyshevFilter
from scm_ops.structured.series import StencilSeries
from scm_ops.testing import STENCIL_OFFSETS, random_stencil

ALPHA = 0.002
# measured (operations per step, set-up included): 13.1-13.2, 17.2, 19.2; p = 4: 15.6, 20.1
BOUNDS = {("ChebyshevFilter", False): 14.0, ("ChebyshevFilterBackward", False): 18.0,
          ("ChebyshevFilter", True): 14.0, ("ChebyshevFilterBackward", True): 20.0,
          ("StencilSeries", False): 16.5, ("StencilSeriesBackward", False): 21.0}


@pytest.fixture(autouse=True)
def torch_loops(monkeypatch):
    """The PyTorch loops (what runs on CUDA above the on-chip limits), not the CPU kernels."""
    monkeypatch.setenv("SCM_OPS_CPU_KERNELS", "0")


def _operations(run, names):
    """{Function name: operators called directly inside it} for one call of run()."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    counts = defaultdict(int)
    for event in prof.events():
        if event.name in names:
            counts[event.name] += len(event.cpu_children)
    return counts


@pytest.mark.parametrize("exact", [False, True], ids=["published_grad", "exact_grad"])
def test_chebyshev_operations_per_step(exact):
    offsets = STENCIL_OFFSETS[4]
    w, d = random_stencil(2, 4, torch.float64, "cpu", grid=(6, 7))
    w, d = (2 * t for t in (w, d))                       # a basis degree of about 400
    f = torch.rand(2, 6, 7, dtype=torch.float64).requires_grad_()
    info = {}

    def run():
        ChebyshevFilter.apply(f, w, d, ALPHA, 16, offsets, exact, info).sum().backward()

    run()
    counts = _operations(run, ("ChebyshevFilter", "ChebyshevFilterBackward"))
    assert info["basis_degree"] > 100
    for name, ops in counts.items():
        per_step = ops / info["basis_degree"]
        assert per_step <= BOUNDS[(name, exact)], f"{name}: {per_step:.1f} operations per step"
    assert len(counts) == 2


def test_matrix_free_operations_per_step():
    offsets = STENCIL_OFFSETS[4]
    w, d = random_stencil(2, 4, torch.float64, "cpu", grid=(6, 7))
    f = torch.rand(2, 6, 7, dtype=torch.float64).requires_grad_()

    def run():
        StencilSeries.apply(f, w, d, ALPHA, 4, offsets, False).sum().backward()

    counts = _operations(run, ("StencilSeries", "StencilSeriesBackward"))
    assert len(counts) == 2
    for name, ops in counts.items():
        assert ops / 16 <= BOUNDS[(name, False)], f"{name}: {ops / 16:.1f} operations per step"
