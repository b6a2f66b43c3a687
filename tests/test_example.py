"""The example: its synthetic data, and the trainer under torchrun with two processes."""
import json
import os
import subprocess
import sys

import numpy as np

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
from synthetic_shapes import CLASSES, make_split  # noqa: E402


def test_synthetic_data_is_deterministic_disjoint_and_boxed():
    a = make_split(40, 3, "train")
    b = make_split(40, 3, "train")
    c = make_split(40, 3, "test")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    images, labels, masks, boxes = a
    assert images.shape == (40, 3, 64, 64) and set(labels) <= set(range(len(CLASSES)))
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1)
        assert (x1 - x0 + 1) * (y1 - y0 + 1) < 64 * 64 / 3   # a whole-image box cannot pass


def test_trainer_runs_under_torchrun_with_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(EXAMPLES, "train_wsol.py"), "--mode", "quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert set(metrics["results"]) == {"baseline", "scm", "pretrained", "whole_image_box", "centred_box", "untrained"}
    for row in metrics["results"].values():
        assert set(row) == {"top1_cls", "top1_loc", "gt_known_loc", "maxboxacc_v2"}
    assert (tmp_path / "figure.png").stat().st_size > 0
    assert all((tmp_path / f"{name}.pt").exists() for name in ("pretrained", "baseline", "scm"))
