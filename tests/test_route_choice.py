"""The large-p route measured and cached (scm_ops/route_choice.py), on the CPU: a fake timer
stands in for the GPU's, and should_tune is patched so that CPU tensors take the path of
CUDA tensors."""
import json
import os
import logging
import pathlib
import subprocess
import sys

import pytest
import torch

import scm_ops
from scm_ops import route_choice

GRID, ITERATIONS = (3, 4), (8, 1)      # 2^8 steps: a large-p block, as p = 16
ROUTES = ("chebyshev", "spectral", "newton_schulz")
# what each route adds to a compiled graph
GRAPH_MARK = {"chebyshev": "scm_ops.chebyshev_filter.default", "spectral": "linalg_eigh",
              "newton_schulz": "scm_ops.newton_schulz_inverse.default"}


class FakeTimer:
    """Returns fixed seconds per route and records the routes timed; with `call`, runs each
    route once too; `fail` routes raise."""

    def __init__(self, seconds, call=False, fail=()):
        self.seconds, self.call, self.fail, self.calls = dict(seconds), call, set(fail), []

    def __call__(self, route, run, device):
        self.calls.append(route)
        if route in self.fail:
            raise torch.cuda.OutOfMemoryError(f"{route} does not fit")
        if self.call:
            run()
        return self.seconds[route]


CUDA_ONLY = route_choice.should_tune     # before the fixture patches it
SPECTRAL_FASTEST = {"chebyshev": 3e-3, "spectral": 1e-3, "newton_schulz": 2e-3}


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """A cache folder of the test's own, no pin, tuning on, CPU tensors tuned as CUDA ones."""
    monkeypatch.setenv("SCM_OPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SCM_OPS_LARGE_P_ROUTE", raising=False)
    monkeypatch.delenv("SCM_OPS_ROUTE_TUNING", raising=False)
    monkeypatch.setattr(route_choice, "should_tune", lambda semantic: True)
    route_choice.clear_memory_cache()
    yield
    route_choice.clear_memory_cache()


@pytest.fixture
def timer(monkeypatch):
    fake = FakeTimer(SPECTRAL_FASTEST)
    monkeypatch.setattr(route_choice, "route_timer", fake)
    return fake


def module(grid=GRID, **kwargs):
    torch.manual_seed(0)
    return scm_ops.ActivationDiffusion(grid, iterations=ITERATIONS, backend="torch", lam=[1.1, 0.9],
                                       beta=[0.4, 0.6], **kwargs)


def inputs(batch=2, grid=GRID, dtype=torch.float32, channels=5):
    g = torch.Generator().manual_seed(batch)
    f = torch.rand(batch, *grid, generator=g, dtype=dtype).requires_grad_()
    s = torch.randn(batch, channels, *grid, generator=g, dtype=dtype).requires_grad_()
    return f, s


def route_of(m, s):
    """The route choose_large_p_route gives for semantic maps s (as the module's forward asks)."""
    return route_choice.choose_large_p_route(m, s)


def cache_file(tmp_path):
    return tmp_path / "cache" / "routes.json"


def outputs_and_grads(m, f, s):
    out_f, out_s = m(f, s)
    grads = torch.autograd.grad((out_f * 1.5).sum() + out_s.square().sum(), (f, s, m.lam, m.beta))
    return [out_f, out_s, *grads]


def test_fastest_route_is_chosen_cached_and_the_measuring_call_is_unchanged(monkeypatch, tmp_path):
    fake = FakeTimer(SPECTRAL_FASTEST, call=True)    # the runs really run: they must leave no trace
    monkeypatch.setattr(route_choice, "route_timer", fake)
    tuned = module()
    f, s = inputs()
    out_f, out_s = tuned(f, s)
    assert fake.calls == ["chebyshev", "spectral", "newton_schulz"]     # the static default first
    assert tuned.lam.grad is None and tuned.beta.grad is None and f.grad is None and s.grad is None
    pinned = module(large_p_route="spectral")
    pinned.load_state_dict(tuned.state_dict())
    # the measuring call returns what the chosen route returns, forward and backward
    for ours, ref in zip(outputs_and_grads(tuned, f, s)[2:], outputs_and_grads(pinned, f, s)[2:]):
        assert torch.equal(ours, ref)
    ref_f, ref_s = pinned(f, s)
    assert torch.equal(out_f, ref_f) and torch.equal(out_s, ref_s)
    # in the file: the choice and the timings
    routes = json.loads(cache_file(tmp_path).read_text())["routes"]
    (key, buckets), = routes.items()
    assert key.startswith("cpu | 3x4 | 4 neighbours | float32 | published gradients | forward+backward | torch")
    assert buckets["2"]["route"] == "spectral" and buckets["2"]["ms"] == {"chebyshev": 3.0, "spectral": 1.0,
                                                                          "newton_schulz": 2.0}
    # in memory: no second measurement, in this call or in the module's later calls
    assert route_of(tuned, s) == "spectral"
    assert fake.calls == ["chebyshev", "spectral", "newton_schulz"]
    assert route_choice.explain_large_p_route(tuned, s).startswith("spectral (measured: chebyshev 3.000 ms")


def test_measuring_inside_activation_checkpointing(monkeypatch):
    """The timing runs build their own graphs, outside the region's saved-tensor hooks; the
    recomputation in backward finds the choice cached and runs the same route."""
    fake = FakeTimer(SPECTRAL_FASTEST, call=True)
    monkeypatch.setattr(route_choice, "route_timer", fake)
    tuned, pinned, (f, s) = module(), module(large_p_route="spectral"), inputs()
    ours = torch.utils.checkpoint.checkpoint(tuned, f, s, use_reentrant=False)
    ours = list(ours) + list(torch.autograd.grad(ours[0].sum() + ours[1].square().sum(), (f, s, tuned.lam)))
    ref = pinned(f, s)
    ref = list(ref) + list(torch.autograd.grad(ref[0].sum() + ref[1].square().sum(), (f, s, pinned.lam)))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref)) and len(fake.calls) == 3


def test_a_new_key_measures_again(timer):
    m = module()
    assert route_of(m, inputs(3)[1]) == "spectral" and len(timer.calls) == 3
    assert route_of(m, inputs(4)[1]) == "spectral" and len(timer.calls) == 3          # same bucket (4)
    timer.seconds = {"chebyshev": 1e-3, "spectral": 3e-3, "newton_schulz": 2e-3}
    assert route_of(m, inputs(5)[1]) == "chebyshev" and len(timer.calls) == 6         # bucket 8
    assert route_of(module(connectivity=8), inputs(3)[1]) == "chebyshev" and len(timer.calls) == 9
    assert route_of(module(exact_gradients=True), inputs(3)[1]) == "chebyshev" and len(timer.calls) == 12
    grid = (4, 4)
    assert route_of(module(grid), inputs(3, grid)[1]) == "chebyshev" and len(timer.calls) == 15
    with torch.no_grad():                                                            # forward only
        assert route_of(m, inputs(3)[1]) == "chebyshev" and len(timer.calls) == 18
    assert route_of(m, inputs(3)[1]) == "spectral" and len(timer.calls) == 18        # as measured first


def test_the_cache_file_serves_a_fresh_process(timer, monkeypatch, tmp_path):
    m, s = module(), inputs()[1]
    assert route_of(m, s) == "spectral" and len(timer.calls) == 3
    route_choice.clear_memory_cache()          # what a new process starts with
    assert route_of(m, s) == "spectral" and len(timer.calls) == 3
    monkeypatch.setenv("SCM_OPS_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert route_of(m, s) == "spectral" and len(timer.calls) == 6


@pytest.mark.parametrize("route", ROUTES)
def test_the_environment_and_the_argument_pin_the_route(timer, monkeypatch, route):
    f, s = inputs()
    monkeypatch.setenv("SCM_OPS_LARGE_P_ROUTE", route)
    assert route_of(module(), s) == route
    out = module()(f, s)
    monkeypatch.delenv("SCM_OPS_LARGE_P_ROUTE")
    ref = module(large_p_route=route)(f, s)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert timer.calls == []
    assert route_choice.explain_large_p_route(module(large_p_route=route), s) == f"{route} (large_p_route argument)"


def test_a_bad_pin_names_the_variable(timer, monkeypatch):
    monkeypatch.setenv("SCM_OPS_LARGE_P_ROUTE", "eigh")
    with pytest.raises(ValueError, match="SCM_OPS_LARGE_P_ROUTE"):
        module()(*inputs())


def test_tuning_off_gives_the_static_default(timer, monkeypatch):
    m, s = module(), inputs()[1]
    assert route_of(m, s) == "spectral"                  # measured and cached
    monkeypatch.setenv("SCM_OPS_ROUTE_TUNING", "0")
    assert route_of(m, s) == "chebyshev" and route_of(module(connectivity=8), s) == "chebyshev"
    assert len(timer.calls) == 3
    assert route_choice.explain_large_p_route(m, s) == "chebyshev (static default: SCM_OPS_ROUTE_TUNING=0)"


def test_off_cuda_the_cached_choice_or_the_static_default(timer, monkeypatch):
    m, s = module(), inputs()[1]
    assert route_of(m, s) == "spectral"
    monkeypatch.setattr(route_choice, "should_tune", CUDA_ONLY)
    assert route_of(m, s) == "spectral"                   # cached
    assert route_of(m, inputs(5)[1]) == "chebyshev"       # not cached, not measured on the CPU
    assert len(timer.calls) == 3
    assert route_choice.explain_large_p_route(m, inputs(5)[1]) == "chebyshev (static default: not measured on cpu)"


def test_float64_small_grids_keep_the_spectral_form(timer):
    m = module().double()
    assert route_of(m, inputs(dtype=torch.float64)[1]) == "spectral" and timer.calls == []


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 99, "routes": {}}',
                                     '{"format": 1, "routes": {"k": {"2": {"route": "eigh"}}, "j": 3}}'])
def test_a_corrupt_cache_file_is_ignored(timer, tmp_path, content):
    path = cache_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    m, s = module(), inputs()[1]
    assert route_of(m, s) == "spectral" and len(timer.calls) == 3
    data = json.loads(path.read_text())                   # rewritten whole
    assert data["format"] == route_choice.CACHE_FORMAT
    assert [b["route"] for k, b in ((k, v.get("2")) for k, v in data["routes"].items()) if b] == ["spectral"]
    assert not list(path.parent.glob(".routes-*"))         # no temporary file left


def test_an_unwritable_cache_keeps_the_choice_in_memory(timer, monkeypatch, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("SCM_OPS_CACHE_DIR", str(blocker))  # a file where the folder should be
    m, s = module(), inputs()[1]
    assert route_of(m, s) == "spectral" and route_of(m, s) == "spectral" and len(timer.calls) == 3


@pytest.mark.parametrize("writable", ["file", "folder"])
def test_a_cache_file_others_can_write_is_never_used(timer, tmp_path, writable):
    """An entry naming another route, in a file or folder anyone can write: ignored with a
    warning naming the path, the route measured again; the same entry in this user's private
    file is used (so the check is what keeps it out)."""
    path = cache_file(tmp_path)
    m, s = module(), inputs()[1]
    assert route_of(m, s) == "spectral" and len(timer.calls) == 3
    data = json.loads(path.read_text())
    for buckets in data["routes"].values():
        buckets["2"]["route"] = "newton_schulz"
    path.write_text(json.dumps(data))
    route_choice.clear_memory_cache()
    assert route_of(m, s) == "newton_schulz" and len(timer.calls) == 3          # trusted: used
    route_choice.clear_memory_cache()
    os.chmod(path if writable == "file" else path.parent, 0o666 if writable == "file" else 0o777)
    refused = path if writable == "file" else path.parent
    with pytest.warns(RuntimeWarning, match=f"{refused}.* writable by its group or by others"):
        assert route_of(m, s) == "spectral"
    assert len(timer.calls) == 6


def test_routes_that_fail_are_not_chosen(monkeypatch, tmp_path):
    fake = FakeTimer(SPECTRAL_FASTEST, fail={"spectral"})
    monkeypatch.setattr(route_choice, "route_timer", fake)
    m, s = module(), inputs()[1]
    assert route_of(m, s) == "newton_schulz"
    entry = json.loads(cache_file(tmp_path).read_text())["routes"].popitem()[1]["2"]
    assert entry["failed"] == {"spectral": "OutOfMemoryError: spectral does not fit"}
    # every route failing: the static default, kept in memory (not timed again in this
    # process) and not written to the file
    fake.fail = set(ROUTES)
    m8 = module(connectivity=8)
    assert route_of(m8, s) == "chebyshev" and route_of(m8, s) == "chebyshev" and len(fake.calls) == 6
    assert len(json.loads(cache_file(tmp_path).read_text())["routes"]) == 1
    assert route_choice.explain_large_p_route(m8, s).startswith("chebyshev (static default: no route could be timed")
    route_choice.clear_memory_cache()
    assert route_of(m8, s) == "chebyshev" and len(fake.calls) == 9


def test_timings_are_logged_at_debug_level(timer, caplog):
    with caplog.at_level(logging.DEBUG, logger="scm_ops"):
        route_of(module(), inputs()[1])
    (record,) = [r for r in caplog.records if "large-p route" in r.getMessage()]
    assert record.levelno == logging.DEBUG and record.name == "scm_ops"
    assert "chebyshev 3.000 ms, spectral 1.000 ms, newton_schulz 2.000 ms -> spectral" in record.getMessage()


def test_dense_routes_are_not_timed_on_large_grids():
    s = torch.zeros(1, 1, 33, 32)
    assert route_choice.candidate_routes(module((33, 32)), s, "chebyshev") == ("chebyshev",)
    assert route_choice.candidate_routes(module((32, 32)), s[..., :32, :], "chebyshev") == ROUTES


def test_the_real_timer_runs_every_route(monkeypatch):
    monkeypatch.setattr(route_choice, "REPEATS", 1)
    m, (f, s) = module(), inputs()
    assert route_of(m, s) in ROUTES
    assert m.lam.grad is None and s.grad is None


def _graph_targets(gm):
    return {str(n.target) for sub in gm.modules() if isinstance(sub, torch.fx.GraphModule)
            for n in sub.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "static"])
def test_under_compile_nothing_is_timed(timer, cached):
    """fullgraph=True (a graph break would raise), forward and backward: the cached route, or
    the static default, is in the graph, and the timer is never called."""
    from torch._dynamo.backends.registry import lookup_backend
    m, (f, s) = module(), inputs()
    if cached:
        assert route_of(m, s) == "spectral"
    timer.calls.clear()
    targets = set()

    def backend(gm, example_inputs):
        targets.update(_graph_targets(gm))             # before aot_eager rewrites it
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    try:
        out_f, out_s = torch.compile(m, fullgraph=True, backend=backend)(f, s)
        (out_f.sum() + out_s.sum()).backward()
    finally:
        torch._dynamo.reset()
    assert timer.calls == []
    expected = "spectral" if cached else "chebyshev"
    assert {r for r, mark in GRAPH_MARK.items() if any(mark in t for t in targets)} == {expected}
    ref_f, ref_s = module(large_p_route=expected)(f, s)
    torch.testing.assert_close(out_f, ref_f)
    torch.testing.assert_close(out_s, ref_s)


def test_the_functional_form_is_measured_and_cached_as_the_module(monkeypatch):
    """activation_diffusion with large_p_route=None measures on its own lam and beta (the
    measuring runs leave no gradient), and the module of the same configuration reads the
    same cache entry: the key does not depend on which of the two calls."""
    fake = FakeTimer(SPECTRAL_FASTEST, call=True)
    monkeypatch.setattr(route_choice, "route_timer", fake)
    m = module()
    lam, beta = (p.detach().clone().requires_grad_() for p in (m.lam, m.beta))
    f, s = inputs()
    settings = dict(grid_size=GRID, iterations=ITERATIONS, backend="torch")
    out = scm_ops.activation_diffusion(f, s, lam, beta, **settings)
    assert fake.calls == list(ROUTES) and lam.grad is None and beta.grad is None
    pinned = scm_ops.activation_diffusion(f, s, lam, beta, large_p_route="spectral", **settings)
    assert all(torch.equal(a, b) for a, b in zip(out, pinned))
    fake.calls.clear()
    assert route_of(m, s) == "spectral" and fake.calls == []


# -- where the route choice lives -----------------------------------------------------------------

def _scm_ops_imports(path):
    """The scm_ops modules that the file at `path` imports, at module level or inside functions."""
    import ast
    package = "scm_ops." + ".".join(path.relative_to(pathlib.Path(scm_ops.__file__).parent).with_suffix("").parts)
    package = package.removesuffix(".__init__")
    base = package.split(".") if path.name == "__init__.py" else package.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            where = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            found |= {f"{where}.{a.name}" if f"{where}.{a.name}" in MODULES else where for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return package, {m for m in found if m in MODULES and m != package}


MODULES = {("scm_ops." + ".".join(p.relative_to(pathlib.Path(scm_ops.__file__).parent).with_suffix("").parts))
           .removesuffix(".__init__") for p in pathlib.Path(scm_ops.__file__).parent.rglob("*.py")}


def test_no_two_modules_import_each_other_and_route_choice_imports_only_common():
    imports = dict(_scm_ops_imports(p) for p in pathlib.Path(scm_ops.__file__).parent.rglob("*.py"))
    assert imports["scm_ops.route_choice"] == {"scm_ops._common", "scm_ops.cache"}
    assert imports["scm_ops.cache"] == set()
    mutual = sorted({tuple(sorted((a, b))) for a, targets in imports.items() for b in targets
                     if a in imports.get(b, ())})
    assert mutual == []


def test_importing_scm_ops_leaves_triton_and_the_compiler_unimported():
    """TRITON_INTERPRET may be set after `import scm_ops` (the self-check does, the tests'
    conftest does): nothing may import triton before the first call that needs it."""
    code = ("import sys, scm_ops, scm_ops.check\n"
            "print(sorted(m for m in ('triton', 'triton.language', 'torch._dynamo', 'scm_ops.route_choice')"
            " if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout
