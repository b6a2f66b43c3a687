"""torch.library registration: opcheck of every operator, torch.compile(fullgraph=True) of
a chain of all three, and the ahead-of-time GPU compilation of every kernel configuration."""
import os
import subprocess
import sys

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


def test_every_kernel_configuration_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    # cwd away from the source tree, so that the installed package (with its kernels) is used
    proc = subprocess.run([sys.executable, "-m", "scm_ops.aot", "--json", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json
    rows = json.loads(out.read_text())
    assert {r["sm"] for r in rows} == {80, 90}
    assert {r["kernel"] for r in rows} >= {"cosine_fwd_kernel", "cosine_bwd_kernel", "laplacian_fwd_kernel",
                                           "laplacian_bwd_kernel", "bmm_axpby_kernel",
                                           "neighbour_cosine_fwd_kernel", "neighbour_cosine_bwd_kernel",
                                           "stencil_series_fwd_kernel", "stencil_series_bwd_kernel"}
    # every block size the series launcher can choose is compiled
    assert {r["config"]["BLOCK_N"] for r in rows if r["kernel"] == "stencil_series_fwd_kernel"} == {256, 512, 1024}
    over = [(r["kernel"], r["dtype"], r["sm"], r["config"], r["problems"]) for r in rows if r["problems"]]
    assert not over, over
