"""torch.library registration: opcheck of every operator, torch.compile(fullgraph=True) of
a chain of all three, and the ahead-of-time GPU compilation of every kernel configuration."""
import os
import subprocess
import sys

import pytest
import torch

import scm_ops
from scm_ops.testing import assert_rel_rmse


def test_opcheck_all_operators():
    x = torch.randn(2, 12, 5, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 12, 12, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    L = (torch.eye(12, dtype=torch.float64) * 3 + 0.1 * torch.randn(2, 12, 12, dtype=torch.float64)).requires_grad_()
    torch.library.opcheck(torch.ops.scm_ops.cosine_similarity.default, (x, "torch"))
    torch.library.opcheck(torch.ops.scm_ops.spatial_semantic_laplacian.default, (e, lam, 3, 4, 8, "torch"))
    torch.library.opcheck(torch.ops.scm_ops.newton_schulz_inverse.default, (L, 3, 0.05, False, "torch"))


def test_opcheck_strided_inputs_and_backward_operators():
    """Transposed (non-contiguous) inputs: the fake implementations must give the strides
    the real ones return (a compiled backward asserts them), and the backward operators
    are checked on their own."""
    x = torch.randn(2, 5, 12, dtype=torch.float64).transpose(1, 2)
    e = torch.randn(2, 12, 12, dtype=torch.float64).transpose(1, 2)
    lam = torch.tensor([0.5, 1.5], dtype=torch.float64)
    L = (torch.eye(12, dtype=torch.float64) * 3 + 0.1 * torch.randn(2, 12, 12, dtype=torch.float64)).transpose(1, 2)
    grad = torch.randn(2, 12, 12, dtype=torch.float64).transpose(1, 2)
    ops = torch.ops.scm_ops
    for t in (x, e, lam, L):
        t.requires_grad_()
    torch.library.opcheck(ops.cosine_similarity.default, (x, "torch"))
    torch.library.opcheck(ops.spatial_semantic_laplacian.default, (e, lam, 3, 4, 4, "torch"))
    torch.library.opcheck(ops.newton_schulz_inverse.default, (L, 3, 0.05, False, "torch"))
    torch.library.opcheck(ops.newton_schulz_inverse.default, (L, 0, 0.05, False, "torch"))
    with torch.no_grad():
        e_x, rnorm = ops.cosine_similarity(x, "torch")
        _, xs, ts = ops.newton_schulz_inverse(L, 3, 0.05, False, "torch")
    torch.library.opcheck(ops.cosine_similarity_backward.default, (grad, e_x, x.detach(), rnorm, "torch"))
    torch.library.opcheck(ops.spatial_semantic_laplacian_backward.default,
                          (grad, e.detach(), lam.detach(), 3, 4, 4, "torch"))
    torch.library.opcheck(ops.newton_schulz_inverse_backward.default,
                          (grad, L.detach(), xs, ts, 0.05, True, "torch"))


def test_opcheck_check_operators():
    """The checks ActivationDiffusion keeps in a compiled graph (docs/maths.md, "Checks
    under torch.compile"): registered, and raising on bad values."""
    token = torch.zeros(())
    w, d = 0.1 * torch.randn(2, 2, 3, 4), torch.randn(2, 3, 4)
    lam = torch.tensor(1.0)
    ops = torch.ops.scm_ops
    torch.library.opcheck(ops.assert_finite.default, (token, torch.randn(3), "x"))
    torch.library.opcheck(ops.assert_block_converges.default, (token, torch.rand(2), lam, 0.002, 0))
    torch.library.opcheck(ops.assert_stencil_converges.default, (token, w, d, lam, 0.002, 1, 4))
    dense = 0.1 * torch.randn(2, 5, 5)
    torch.library.opcheck(ops.assert_dense_converges.default, (token, dense, lam, 0.002, 3))
    # the stencil check returns its bound on sigma_max (the series' radius), the dense one a 0-d zero
    assert torch.equal(ops.assert_stencil_converges(token, w, d, lam, 0.002, 1, 4),
                       scm_ops.structured.stencil.sigma_max_bound(w, d, ((0, 1), (1, 0)), 0.002))
    assert torch.equal(ops.assert_dense_converges(token, dense, lam, 0.002, 3), torch.zeros(()))
    with pytest.raises(ValueError, match="x contains NaN"):
        ops.assert_finite(token, torch.tensor([0.0, float("nan")]), "x")
    with pytest.raises(scm_ops.NewtonSchulzDivergenceError, match="block 2: lam=1 .* batch item 1"):
        ops.assert_block_converges(token, torch.tensor([1.0, 40.0]), lam, 0.002, 2)
    with pytest.raises(scm_ops.NewtonSchulzDivergenceError, match="block 1: lam=1 .* batch item 0"):
        ops.assert_stencil_converges(token, w, d * 100, lam, 0.002, 1, 4)
    with pytest.raises(scm_ops.NewtonSchulzDivergenceError, match="block 3: lam=1 .* batch item 1"):
        ops.assert_dense_converges(token, torch.stack([dense[0], 40 * torch.eye(5)]), lam, 0.002, 3)


def scm_block(s, lam):
    e = scm_ops.cosine_similarity(s)
    L = scm_ops.spatial_semantic_laplacian(e, (4, 5), lam)
    return scm_ops.newton_schulz_inverse(L, 4, 0.002, detach_init=True)


def test_torch_compile_fullgraph_chain():
    torch._dynamo.reset()
    s = torch.randn(2, 20, 7, requires_grad=True)
    lam = torch.tensor(1.1, requires_grad=True)
    compiled = torch.compile(scm_block, fullgraph=True, backend="inductor")
    out = compiled(s, lam)
    ref = scm_block(s, lam)
    assert_rel_rmse(out, ref, 1e-6, "compiled forward")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (s, lam), g)
    grads_ref = torch.autograd.grad(ref, (s, lam), g)
    for a, b in zip(grads, grads_ref):
        assert_rel_rmse(a, b, 1e-5, "compiled backward")
    # the checks run inside the operators, so the compiled chain raises as eager does
    with pytest.raises(ValueError, match="x contains NaN"):
        compiled(s.detach().index_fill(1, torch.tensor([3]), float("nan")), lam)
    with pytest.raises(scm_ops.NewtonSchulzDivergenceError, match="batch item 0"):
        compiled(s.detach(), torch.tensor(40.0))


def test_torch_compile_fullgraph_chain_inside_autocast():
    """Compiled inside torch.autocast, a bfloat16 input gives the float32 result of eager
    float32 on the same values (the casts and the autocast rule trace into the graph)."""
    torch._dynamo.reset()
    s = torch.randn(2, 20, 7).bfloat16()
    lam = torch.tensor(1.1)
    compiled = torch.compile(scm_block, fullgraph=True, backend="inductor")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(s, lam)
    assert out.dtype == torch.float32
    assert_rel_rmse(out, scm_block(s.float(), lam), 1e-6, "compiled under autocast")


# sm_80 and sm_90 (A100, H100/H200) in every run; sm_75, sm_86 and sm_89 (T4, RTX 30xx/A10,
# RTX 40xx/L4) with the slow cases (about 2.5 min more uncached).
@pytest.mark.parametrize("targets", ["80,90", pytest.param("75,86,89", marks=pytest.mark.slow)])
def test_every_kernel_configuration_compiles_for_every_target(tmp_path, targets):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    # cwd away from the source tree, so that the installed package (with its kernels) is used
    proc = subprocess.run([sys.executable, "-m", "scm_ops.aot", "--json", str(out), "--sm", targets], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json
    rows = json.loads(out.read_text())
    from scm_ops import aot
    assert set(aot.CAPABILITIES) == {75, 80, 86, 89, 90}
    assert {r["sm"] for r in rows} == {int(sm) for sm in targets.split(",")}
    assert {r["kernel"] for r in rows} >= {"cosine_fwd_kernel", "cosine_bwd_kernel", "laplacian_fwd_kernel",
                                           "laplacian_bwd_kernel", "bmm_axpby_kernel",
                                           "neighbour_cosine_fwd_kernel", "neighbour_cosine_bwd_kernel",
                                           "stencil_series_fwd_kernel", "stencil_series_bwd_kernel",
                                           "chebyshev_fwd_kernel", "chebyshev_bwd_kernel"}
    # every block size the series launchers can choose is compiled, forward and backward, up
    # to each kernel's 8-neighbour limit with 8 neighbours
    from scm_ops.kernels.structured import chebyshev, series
    for module, prefix in ((series, "stencil_series"), (chebyshev, "chebyshev")):
        for direction in ("fwd", "bwd"):
            for eight, limit in ((False, max(module.BLOCK_N_CHOICES)), (True, module.EIGHT_NEIGHBOUR_MAX_BLOCK_N)):
                sizes = {r["config"]["BLOCK_N"] for r in rows if r["kernel"] == f"{prefix}_{direction}_kernel"
                         and r["config"]["EIGHT_NEIGHBOURS"] == eight}
                assert sizes == {b for b in module.BLOCK_N_CHOICES if b <= limit}, (prefix, direction, eight, sizes)
    over = [(r["kernel"], r["dtype"], r["sm"], r["config"], r["problems"]) for r in rows if r["problems"]]
    assert not over, over
