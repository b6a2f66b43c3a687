"""pytest-benchmark suite: scm_ops against the published formulation, in the same run.

    pytest benchmarks/ --benchmark-only                 # everything (< 10 min on 2 CPU cores)
    pytest benchmarks/ --benchmark-only -m quick        # the quick selection
    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json && python benchmarks/report.py bench.json

Each case runs one forward (and backward) pass after a warm-up round, so first-call
compilation is not timed; CUDA work is synchronised inside the timed call. Memory of the
same call goes to extra_info: "peak_bytes" (everything alive at the peak above the inputs:
outputs, gradients, temporaries and what backward keeps) and "saved_bytes" (what the
forward pass keeps for backward beyond its outputs); see cases.memory_bytes.
"""
import pytest

from cases import ON_CUDA, SHAPES, candidates, make_case, memory_bytes, modes


def _params():
    for group, shapes in SHAPES.items():
        for shape in shapes:
            quick = shape.get("quick", False)
            dims = {k: v for k, v in shape.items() if k != "quick"}
            tag = "-".join(f"{k}{v}" for k, v in dims.items())
            for candidate in candidates(group):
                for mode in modes(group, candidate):
                    # On a CPU torch.compile costs a minute of compilation per graph, the
                    # dense route is the published one, and the slower p = 16 route only
                    # confirms the choice: one shape per group there
                    if (not ON_CUDA and candidate in ("published_compiled", "scm_dense",
                                                      "scm_structured_newton_schulz")
                            and shape is not shapes[0]):
                        continue
                    marks = [pytest.mark.quick] if quick and candidate in ("published", "scm_torch",
                                                                          "scm_structured") else []
                    yield pytest.param(group, candidate, mode, dims, id=f"{group}-{tag}-{mode}-{candidate}",
                                       marks=marks)


ROUNDS = {"cosine": 5, "laplacian": 5, "newton_schulz": 3, "diffusion": 3}


@pytest.mark.parametrize("group, candidate, mode, shape", list(_params()))
def test_benchmark(benchmark, group, candidate, mode, shape):
    run = make_case(group, candidate, mode, shape)
    benchmark.group = f"{group} {mode} " + " ".join(f"{k}={v}" for k, v in shape.items())
    benchmark.extra_info.update(group=group, candidate=candidate, mode=mode, **shape)
    benchmark.pedantic(run, rounds=ROUNDS[group], warmup_rounds=1, iterations=1)
    peak, saved = memory_bytes(group, candidate, mode, shape)
    benchmark.extra_info.update(peak_bytes=peak, saved_bytes=saved)
