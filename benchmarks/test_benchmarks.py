"""pytest-benchmark suite: scm_ops against the published formulation, in the same run.

    pytest benchmarks/ --benchmark-only                 # everything (< 10 min on 2 CPU cores)
    pytest benchmarks/ --benchmark-only -m quick        # the quick selection
    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json && python benchmarks/report.py bench.json

Each case runs one forward (and backward) pass after a warm-up call, so first-call
compilation is not timed; CUDA work is synchronised inside the timed call. The number of
timed rounds is the group's (ROUNDS), fewer where the warm-up call took more than
SLOW_SECONDS: then as many as fit in TIMED_SECONDS (at least one). Memory of the same call goes to extra_info:
"peak_bytes" (everything alive at the peak above the inputs: outputs, gradients,
temporaries and what backward keeps) and "saved_bytes" (what the forward pass keeps for
backward beyond its outputs); see cases.memory_bytes. Cases over this machine's budget are
not collected; conftest.py writes them, with the reason, to the JSON as "not_run".
"""
import time

import pytest

from cases import CASES, make_case, memory_bytes

ROUNDS = {"cosine": 5, "laplacian": 5, "newton_schulz": 3, "diffusion": 5}
TIMED_SECONDS = 12.0
SLOW_SECONDS = 2.0


def _params():
    for group, candidate, mode, shape, quick in CASES:
        tag = "-".join(f"{k}{v}" for k, v in shape.items())
        yield pytest.param(group, candidate, mode, shape, id=f"{group}-{tag}-{mode}-{candidate}",
                           marks=[pytest.mark.quick] if quick else [])


@pytest.mark.parametrize("group, candidate, mode, shape", list(_params()))
def test_benchmark(benchmark, group, candidate, mode, shape):
    run = make_case(group, candidate, mode, shape)
    benchmark.group = f"{group} {mode} " + " ".join(f"{k}={v}" for k, v in shape.items())
    benchmark.extra_info.update(group=group, candidate=candidate, mode=mode, **shape)
    start = time.perf_counter()
    run()  # warm-up
    once = time.perf_counter() - start
    # a first call also pays lazy initialisation: only a slow one cuts the rounds
    rounds = ROUNDS[group] if once < SLOW_SECONDS else max(1, min(ROUNDS[group], int(TIMED_SECONDS / once)))
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0, iterations=1)
    peak, saved = memory_bytes(group, candidate, mode, shape)
    benchmark.extra_info.update(peak_bytes=peak, saved_bytes=saved)
