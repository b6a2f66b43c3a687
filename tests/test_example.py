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
    # Measured: +23.1 (baseline) and +23.1 (SCM) points over the best floor (the untrained
    # model, 27.7) in one process with two threads (+22.7 for SCM with one thread). Another machine rounds differently and one
    # test image is 0.4 points, so the test asks for 15, which a model that does not localise
    # (at the floor, or with a randomly initialised head: 18.8 %) cannot reach.
    for name in ("baseline", "scm"):
        assert results[name]["gt_known_loc"] >= floor + 15, (name, results)
    assert (tmp_path / "figure.png").stat().st_size > 0
    assert all((tmp_path / f"{name}.pt").exists() for name in ("baseline", "scm"))


def test_lam_and_beta_train_without_weight_decay_and_the_schedules():
    import torch
    from backbone import build_backbone
    from train_wsol import WSOLModel, lr_factor, param_groups
    model = WSOLModel(build_backbone("tiny", None, None, None), 4, use_scm=True)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}   # noqa: E731
    assert {id(model.scm.lam), id(model.scm.beta), id(model.head.bias)} <= ids(no_decay)
    assert id(model.head.weight) in ids(decay) and not ids(decay) & ids(no_decay)
    assert len(ids(decay)) + len(ids(no_decay)) == len(list(model.parameters()))
    # a step of AdamW with zero gradients leaves lam and beta where they are and shrinks the conv weight
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=0.1)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert model.scm.lam.tolist() == [1.0] * 4 and model.scm.beta.tolist() == [0.5] * 4
    assert torch.allclose(model.head.weight, torch.full_like(model.head.weight, 1 - 0.1 * 0.05))
    # the published schedule: constant, /10 for the last epoch (3 epochs of 5 steps)
    assert [lr_factor("step", t, 15, 5) for t in (0, 9, 10, 14)] == [1.0, 1.0, 0.1, 0.1]
    assert lr_factor("step", 3, 5, 5) == 1.0                      # one epoch: constant
    assert lr_factor("cosine", 0, 100, 10) == 0.1 and lr_factor("cosine", 99, 100, 10) < 0.01


def test_spreading_measure_counts_the_top_patches_in_the_box():
    import torch
    from train_wsol import box_patches, top_share
    masks = box_patches([np.array([[0, 0, 31, 15]]), np.array([[0, 0, 7, 7], [104, 104, 111, 111]])], (14, 14), 112)
    assert masks[0].sum() == 4 * 2 and masks[0][:2, :4].all()     # patch centres 4, 12, ... in x <= 31, y <= 15
    assert masks[1].sum() == 2 and masks[1][0, 0] and masks[1][13, 13]
    inside = torch.where(masks, 1.0, 0.0)
    assert top_share(inside + 0.1 * torch.rand(2, 14, 14), masks) == 1.0
    assert top_share(1.0 - inside, masks) == 0.0
    half = inside.clone()
    half[0, 0, :2] = 0.0                      # 2 of image 0's 8 patches fall below 2 outside ones
    half[0, 13, :2] = 0.5
    assert top_share(half, masks) == (6 / 8 + 1.0) / 2


def test_study_runs_seeds_paired_logs_lam_beta_and_resumes(tmp_path):
    """study.py end to end on a tiny scale: two seeds, the JSON's layout and CI, the per-step
    history, and a second call that reuses the runs."""
    runs, out = tmp_path / "runs", tmp_path / "study.json"
    tiny = ["--train-size", "48", "--test-size", "16", "--epochs", "2", "--batch-size", "16", "--probe-images", "4"]
    cmd = [sys.executable, os.path.join(EXAMPLES, "study.py"), "--seeds", "0-1", "--jobs", "2", "--runs", str(runs),
           "--json", str(out), "--", *tiny]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = json.loads(out.read_text())
    assert [e["seed"] for e in study["seeds"]] == [0, 1]
    for e in study["seeds"]:
        assert e["command"].startswith(f"python examples/train_wsol.py --mode study --seed {e['seed']} --threads 1")
        assert e["command"].endswith(f"--out {runs / ('seed%d' % e['seed'])}")
        metrics = json.loads((runs / f"seed{e['seed']}" / "metrics.json").read_text())
        assert e["results"] == metrics["results"] and {"baseline", "scm"} <= set(e["results"])
        history = metrics["history"]
        # 48 images, batch 16, 2 epochs: 6 steps
        assert history["scm"]["step"] == history["baseline"]["step"] == [1, 2, 3, 4, 5, 6]
        assert np.shape(history["scm"]["lam"]) == np.shape(history["scm"]["beta"]) == (6, 4)
        assert history["baseline"]["lam"] == [] and history["scm"]["lr"][-1] == history["scm"]["lr"][0] / 10
        probe = history["scm"]["probe"]
        assert probe[0]["step"] == 0 and probe[-1]["step"] == 6 and len(probe[-1]["f"]) == 4
        assert all(0 <= p["f0"] <= 1 and 0 <= p["map"] <= 1 for p in probe + history["baseline"]["probe"])
        maps = np.load(runs / f"seed{e['seed']}" / "probe_maps.npz")   # F0 and F per block of 2 probe images
        assert maps["scm_step6"].shape == (2, 5, 14, 14) and maps["baseline_step0"].shape == (2, 1, 14, 14)
        assert np.array_equal(maps["scm_step0"][:, 0], maps["baseline_step0"][:, 0])   # one start for both
    p = study["paired_gt_known_loc"]
    d = [e["results"]["scm"]["gt_known_loc"] - e["results"]["baseline"]["gt_known_loc"] for e in study["seeds"]]
    assert p["mean"] == pytest.approx(np.mean(d), abs=0.01) and p["ci95"][0] <= p["mean"] <= p["ci95"][1]
    assert min(d) - 0.01 <= p["ci95"][0] and p["ci95"][1] <= max(d) + 0.01
    assert os.path.getsize(tmp_path / "study.png") > 0 and os.path.getsize(tmp_path / "study_maps.png") > 0
    stamp = (runs / "seed0" / "metrics.json").stat().st_mtime
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and "seed 0:" not in again.stdout
    assert (runs / "seed0" / "metrics.json").stat().st_mtime == stamp
