"""The CPU kernels (kernels/structured/cpu.c) built for different instruction sets, timed alone.

    python benchmarks/cpu_kernel_flags.py [calls]

Builds the library with -O3 -fopenmp and -march x86-64 (SSE2), x86-64-v3 (AVX2), x86-64-v4
(AVX-512) and native, each into a private temporary cache, then times the Chebyshev basis
(degree 226, kept and not kept) and the matrix-free p = 4 forward on B = 64, 14 x 14, 4
neighbours, with one thread, calls interleaved across builds. The time is the CPU time of
the calling thread, which other jobs on the machine do not inflate; minimum and median of
`calls` calls (default 40). docs/structured.md, "Built at first use, not at install time".
An -march the CPU or compiler lacks is reported and left out.
"""
import atexit
import os
import shutil
import sys
import tempfile
import time

import torch

os.environ["SCM_OPS_CACHE_DIR"] = tempfile.mkdtemp(prefix="scm_ops_flags-")
atexit.register(shutil.rmtree, os.environ["SCM_OPS_CACHE_DIR"], True)

from scm_ops.structured import cpu  # noqa: E402
from scm_ops.structured.stencil import OFFSETS  # noqa: E402
from scm_ops.testing import random_stencil  # noqa: E402

BUILDS = {"x86-64 (SSE2)": ["-O3", "-fopenmp"], "x86-64-v3 (AVX2)": ["-O3", "-march=x86-64-v3", "-fopenmp"],
          "x86-64-v4 (AVX-512)": ["-O3", "-march=x86-64-v4", "-fopenmp"], "native": ["-O3", "-march=native", "-fopenmp"]}


def main(calls: int = 40) -> None:
    torch.set_num_threads(1)
    libraries = {}
    for name, flags in BUILDS.items():
        cpu._FLAG_SETS, cpu._LIBRARIES = (flags,), {}
        lib = cpu.library()
        if lib is None:
            print(f"{name}: did not build here, left out")
        else:
            libraries[name] = lib
    w, d = random_stencil(64, 4, torch.float64, "cpu", grid=(14, 14))
    f = torch.rand(64, 14, 14, dtype=torch.float64)
    coef = torch.rand(120, dtype=torch.float64) * 1e-3
    cases = {
        "Chebyshev basis, degree 226, kept": lambda lib: cpu.chebyshev_basis(lib, f, w, d, OFFSETS[4], 0.4, coef, 226, True),
        "Chebyshev phi(Z) F, degree 226, no basis":
            lambda lib: cpu.chebyshev_basis(lib, f, w, d, OFFSETS[4], 0.4, coef, 226, False),
        "matrix-free p = 4 forward": lambda lib: cpu.series_forward(lib, f, w, d, OFFSETS[4], 0.002, 16, 2),
    }
    times = {(n, c): [] for n in libraries for c in cases}
    for _ in range(calls):
        for n, lib in libraries.items():
            for c, run in cases.items():
                start = time.thread_time()
                run(lib)
                times[n, c].append(time.thread_time() - start)
    for c in cases:
        print(c)
        for n in libraries:
            t = sorted(times[n, c])
            print(f"  {n:22s} min {1e3 * t[0]:7.2f} ms  median {1e3 * t[len(t) // 2]:7.2f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
