"""The example: its synthetic data, and quick mode (the README's first command) under torchrun
with two processes, which must localise: both models well above every floor in GT-known Loc."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
from synthetic_shapes import CLASS_COLOURS, CLASSES, make_split  # noqa: E402


def test_synthetic_data_is_deterministic_disjoint_and_boxed():
    a = make_split(40, 3, "train")
    b = make_split(40, 3, "train")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for other in ("test", "pretrain"):
        assert not np.array_equal(a[0], make_split(40, 3, other)[0])
    images, labels, masks, boxes = a
    assert images.shape == (40, 3, 112, 112) and set(labels) <= set(range(len(CLASSES)))
    for img, label, m, (x0, y0, x1, y1) in zip(images, labels, masks, boxes):
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1)
        assert (x1 - x0 + 1) * (y1 - y0 + 1) < 112 * 112 / 2        # a whole-image box cannot pass
        assert min(x1 - x0, y1 - y0) >= 28                          # the object spans many 8-px patches
        # the badge: the pixels of the class colour are a small part of the object
        near = np.abs(img.transpose(1, 2, 0) - CLASS_COLOURS[label]).sum(-1) < 0.35
        assert 0 < (near & m).sum() < 0.35 * m.sum()


@pytest.mark.slow                      # about 30 s: two processes train both models
def test_quick_mode_localises_under_torchrun_with_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(EXAMPLES, "train_wsol.py"), "--mode", "quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "quick mode is a smoke check" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["mode"] == "quick"
    results = metrics["results"]
    assert set(results) == {"baseline", "scm", "pretrained_f0", "whole_image_box", "centred_box", "untrained"}
    floor = max(results[r]["gt_known_loc"] for r in ("whole_image_box", "centred_box", "untrained"))
    # Measured: +23.1 (baseline) and +21.9 (SCM) points over the best floor (the untrained
    # model, 27.7), the same under torchrun with two processes as in one process with two
    # threads (+22.3 for SCM with one thread). Another machine rounds differently and one
    # test image is 0.4 points, so the test asks for 15, which a model that does not localise
    # (at the floor, or with a randomly initialised head: 18.8 %) cannot reach.
    for name in ("baseline", "scm"):
        assert results[name]["gt_known_loc"] >= floor + 15, (name, results)
    assert (tmp_path / "figure.png").stat().st_size > 0
    assert all((tmp_path / f"{name}.pt").exists() for name in ("baseline", "scm"))
