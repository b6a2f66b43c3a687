"""examples/scm_figure.py: per-block outputs from prefix modules, and the figure's panels,
titles, shared colour scales, boxes and legend (rendered with the Agg backend)."""
import os
import sys

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
import scm_ops  # noqa: E402
from scm_figure import block_outputs, prefix_module, render  # noqa: E402

GRID = (6, 7)


def _module():
    m = scm_ops.ActivationDiffusion(GRID, lam=(1.3, 1.1, 1.2, 0.9), beta=(0.4, 0.5, 0.6, 0.7), connectivity=8)
    return m


def _sample(seed, image=True):
    g = torch.Generator().manual_seed(seed)
    f0 = torch.rand(GRID, generator=g)
    s0 = torch.randn(3, *GRID, generator=g) + 1
    out = dict(f0=f0, s0=s0.numpy(), label=1, predicted={"SCM": 2, "TS-CAM baseline": 1},
               extra_f={"TS-CAM baseline: F0": (f0 * 0.9).numpy()}, extra_s={"TS-CAM baseline: S0[c]": s0[1].numpy()},
               extra_maps={"TS-CAM baseline: F0 * S0[c]": (f0 * 0.5).numpy()})
    if image:
        out["image"] = torch.rand(3, 48, 56, generator=g).numpy()     # [3, H, W], any size
        out["boxes"] = {"ground truth": [(4, 5, 30, 40)], "TS-CAM baseline": (6, 6, 20, 20), "SCM": (6, 6, 20, 20)}
    return out


def test_prefix_modules_copy_lam_beta_and_settings():
    m = _module()
    p = prefix_module(m, 2)
    assert p.iterations == (16, 4)
    assert torch.equal(p.lam, m.lam[:2].detach()) and torch.equal(p.beta, m.beta[:2].detach())
    assert (p.connectivity, p.alpha, p.exact_gradients, p.implementation) == (8, m.alpha, False, "structured")
    f0, s0 = torch.rand(2, *GRID), torch.randn(2, 3, *GRID)
    outs = block_outputs(m, f0, s0)
    with torch.no_grad():
        f, s = m(f0, s0)
        f2, _ = scm_ops.ActivationDiffusion(GRID, iterations=(16, 4), lam=(1.3, 1.1), beta=(0.4, 0.5),
                                            connectivity=8)(f0, s0)
    assert len(outs) == 4
    torch.testing.assert_close(outs[-1][0], f, rtol=0, atol=0)
    torch.testing.assert_close(outs[-1][1], s, rtol=0, atol=0)
    torch.testing.assert_close(outs[1][0], f2, rtol=0, atol=0)


def test_figure_panels_titles_scales_and_legend(tmp_path):
    path = tmp_path / "scm.png"
    fig = render([_sample(0), _sample(1)], _module(), class_names=["disk", "square", "cross"], title="two images")
    titles = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title()]
    assert titles == ["image, boxes", "F0", "F after block 1 (p=16)", "F after block 2 (p=4)",
                      "F after block 3 (p=4)", "F after block 4 (p=4)", "TS-CAM baseline: F0", "S0[c]",
                      "S[c] after the stack", "TS-CAM baseline: S0[c]", "F0 * S0[c] (inference)",
                      "TS-CAM baseline: F0 * S0[c]"]
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert sum(t.startswith("true: square, predicted:\n  cross (SCM)\n  square (TS-CAM baseline)") for t in texts) == 2
    # per row: a label, 1 image, 6 F panels, 3 S panels, 2 maps, 3 colour bars (these hold no AxesImage)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 * (1 + 6 + 3 + 2)
    assert len(fig.axes) == 2 * (1 + 1 + 6 + 3 + 2 + 3)
    row = panels[:12]
    f_lims = {ax.images[0].get_clim() for ax in row[1:7]}
    s_lims = {ax.images[0].get_clim() for ax in row[7:10]}
    m_lims = {ax.images[0].get_clim() for ax in row[10:12]}
    assert len(f_lims) == len(s_lims) == len(m_lims) == 1                 # one scale per group
    assert f_lims != s_lims
    # boxes on the image: 3 (ground truth, baseline, SCM), each style different
    rects = row[0].patches
    assert len(rects) == 3
    assert len({(r.get_edgecolor(), r.get_linestyle()) for r in rects}) == 3
    assert row[0].get_xlabel() == "baseline box = SCM box"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["ground truth box", "TS-CAM baseline box", "SCM box"]
    fig.savefig(path, dpi=40)
    plt.close(fig)
    assert path.stat().st_size > 10_000


def test_figure_without_module_or_image(tmp_path):
    sample = _sample(2, image=False)
    sample["predicted"] = 0
    path = tmp_path / "plain.png"
    fig = render([sample], None, class_names=["disk", "square", "cross"])
    titles = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title()]
    assert titles == ["F0", "TS-CAM baseline: F0", "S0[c]", "TS-CAM baseline: S0[c]", "F0 * S0[c] (inference)",
                      "TS-CAM baseline: F0 * S0[c]"]
    assert any(t.get_text() == "true: square, predicted: disk" for ax in fig.axes for t in ax.texts)
    assert not fig.legends
    fig.savefig(path, dpi=40)
    plt.close(fig)
    with pytest.raises(ValueError):
        render([], None)
