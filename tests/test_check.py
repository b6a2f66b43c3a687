"""The self-check (python -m scm_ops.check): its quick set passes here, a wrong kernel
result makes it fail; and Triton is optional (scm_ops without triton installed)."""
import json
import os
import subprocess
import sys
import textwrap

import torch

import scm_ops
from scm_ops import check


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("SCM_OPS_BACKEND", "PYTHONPATH")}
    env.update(extra)
    return env


def test_quick_self_check_passes(tmp_path, device):
    """The whole quick set, as a user runs it: one PASS line per check, exit status 0. Without
    CUDA the kernels run in the interpreter, switched on by the self-check itself."""
    out = tmp_path / "check.json"
    env = _env(TRITON_INTERPRET="1") if device.type == "cpu" else _env()
    # cwd away from the source tree, so that the installed package (with its kernels) is used
    proc = subprocess.run([sys.executable, "-m", "scm_ops.check", "--quick", "--json", str(out)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("device: ") for line in lines), text[:2000]
    versions = next(line for line in lines if line.startswith("versions: "))
    for name in ("torch ", "triton ", "scm_ops ", "Python "):
        assert name in versions, versions
    assert not [line for line in lines if line.startswith("FAIL")], text[-6000:]
    assert "ALL CHECKS PASS" in lines[-1]
    rows = json.loads(out.read_text())["rows"]
    passed = {r["group"] for r in rows if r["status"] == "PASS"}
    assert passed >= {"operators", "layouts", "diffusion", "reference", "launches"}, passed
    # every large-p route, against torch, bitwise repeated, and timed
    diffusion = [r for r in rows if r["group"] == "diffusion"]
    for route in ("chebyshev", "spectral", "newton_schulz"):
        assert any(r["name"].startswith(route) and "bitwise equal" in r["detail"] for r in diffusion), route
        assert any(r["status"] == "TIME" and r["name"] == route for r in rows), route
    # every kernel of the AOT tables launched, each in a configuration the AOT check compiles
    assert any(r["group"] == "launches" and r["status"] == "PASS" and r["name"].startswith("every kernel")
               for r in rows)


def test_a_wrong_kernel_result_fails(monkeypatch, capsys):
    """A Triton launcher whose output is off by 1e-3 (relative) gives FAIL lines and exit
    status 1. In-process, with the interpreter that conftest switched on (or CUDA)."""
    original = scm_ops.cosine._cosine_fwd_triton

    def perturbed(x):
        e, rnorm = original(x)
        return e * (1 + 1e-3), rnorm

    monkeypatch.setattr(scm_ops.cosine, "_cosine_fwd_triton", perturbed)
    rc = check.main(["--quick", "--only", "operators"])
    out = capsys.readouterr().out
    assert rc == 1, out
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failed and all("cosine_similarity" in line for line in failed), out
    assert any(line.startswith("FAIL  operators: cosine_similarity float32") for line in failed), out
    assert any(line.startswith("PASS  operators: newton_schulz_inverse") for line in out.splitlines()), out
    assert "CHECK(S) FAILED" in out.splitlines()[-1]


def test_launches_outside_the_aot_tables_fail(monkeypatch, capsys):
    """A launch in a configuration the AOT check does not compile (here: one more warp than
    the table says) is reported as not declared."""
    from scm_ops._common import kernel_module
    laplacian = kernel_module("laplacian")
    configs = {acc: dict(cfg) for acc, cfg in laplacian.CONFIGS.items()}    # one table for both kernels
    configs["fp32"]["num_warps"] = configs["fp32"].get("num_warps", 4) * 2
    monkeypatch.setattr(laplacian, "CONFIGS", configs)
    launches = []
    with check.recording_launches(launches):
        scm_ops.spatial_semantic_laplacian(torch.rand(1, 6, 6), (2, 3), 1.0, backend="triton")
    monkeypatch.undo()   # the AOT tables as shipped
    ctx = check.Context(torch.device("cpu"), True, 2, None)
    ctx.launches = launches
    report = check.Report()
    check.check_launches(report, ctx, complete=False)
    out = capsys.readouterr().out
    assert report.count("FAIL") == 1 and "NOT DECLARED: laplacian_fwd_kernel" in out, out


# -- Triton is optional ---------------------------------------------------------------------------

NO_TRITON = """
import sys
sys.modules["triton"] = None          # as if triton were not installed
"""


def _run_without_triton(code, cwd):
    # cwd away from the source tree, so that the installed package is used
    return subprocess.run([sys.executable, "-c", NO_TRITON + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=_env(), cwd=cwd)


def test_without_triton_the_torch_backend_runs_and_triton_names_the_extra(tmp_path):
    code = """
        import os, warnings
        import torch, scm_ops
        from scm_ops import _common
        assert not _common.TRITON_INSTALLED
        x = torch.randn(2, 6, 4)
        m = scm_ops.ActivationDiffusion((2, 3), iterations=(7, 2))
        f, s = m(torch.rand(2, 2, 3), torch.randn(2, 4, 2, 3))
        (f.sum() + s.sum()).backward()
        scm_ops.newton_schulz_inverse(scm_ops.spatial_semantic_laplacian(scm_ops.cosine_similarity(x), (2, 3), 1.0),
                                      2, 0.002)
        os.environ["TRITON_INTERPRET"] = "1"
        for call in (lambda: scm_ops.cosine_similarity(x, backend="triton"),
                     lambda: scm_ops.ActivationDiffusion((2, 3), backend="triton")(torch.rand(2, 2, 3),
                                                                                  torch.randn(2, 4, 2, 3))):
            try:
                call()
                raise SystemExit("no ImportError")
            except ImportError as err:
                assert "pip install 'scm-ops[triton]'" in str(err), err
        os.environ["SCM_OPS_BACKEND"] = "triton"
        try:
            scm_ops.cosine_similarity(x)
            raise SystemExit("no ImportError")
        except ImportError as err:
            assert "scm-ops[triton]" in str(err), err
        del os.environ["SCM_OPS_BACKEND"]
        try:
            _common.kernel_module("cosine")
            raise SystemExit("no ImportError")
        except ImportError as err:
            assert "scm-ops[triton]" in str(err), err

        class CudaTensor:                  # what resolve_backend reads of a CUDA tensor
            is_cuda = True
            device = torch.device("cuda")

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _common.resolve_backend(None, CudaTensor()) == "torch"
            assert _common.resolve_backend(None, CudaTensor()) == "torch"
        assert len(caught) == 1 and "scm-ops[triton]" in str(caught[0].message), [str(w.message) for w in caught]
        print("OK")
    """
    proc = _run_without_triton(code, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr[-3000:]
    # the self-check says what is missing and exits with status 2
    proc = _run_without_triton("from scm_ops import check\nraise SystemExit(check.main(['--only', 'operators']))",
                               tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    assert "FAIL  setup: triton: not installed" in proc.stdout and "scm-ops[triton]" in proc.stdout, proc.stdout


def test_default_backend_with_triton_installed():
    class CudaTensor:
        is_cuda = True
        device = torch.device("cuda")

    from scm_ops import _common
    assert _common.TRITON_INSTALLED
    assert _common.resolve_backend(None, CudaTensor()) == "triton"
    assert _common.resolve_backend(None, torch.zeros(1)) == "torch"
