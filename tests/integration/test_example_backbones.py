"""The example (examples/train_wsol.py) end to end, offline, with timm and Hugging Face
backbones shrunk by --backbone-args to two blocks, on a few 64 px synthetic images: a
distilled DeiT (two prefix tokens) and DINOv3 (class token, 4 registers, rotary
embeddings), from timm with --pretrained none and from transformers' config; it runs (F0
from the recorder) and the console and metrics.json say which weights were loaded; then, in
process, a local timm weights file and save_pretrained folders (DeiT, DINOv3) are loaded
(the parameters compared).

Needs timm and transformers (skipped without them): see tests/integration/README.md.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_wsol.py")
SMALL = ["--mode", "quick", "--train-size", "16", "--test-size", "8", "--batch-size", "8", "--epochs", "1",
         "--image-size", "64", "--threads", "1"]
TIMM_ARGS = json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2})
HF_ARGS = json.dumps({"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64})


def run_example(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, EXAMPLE, *SMALL, "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"baseline", "scm", "untrained"} <= set(metrics["results"])
    assert (out / "figure.png").stat().st_size > 0
    return proc.stdout, metrics


def test_timm_backbone_random_initialisation(tmp_path):
    stdout, metrics = run_example(tmp_path, "--backbone", "deit_small_distilled_patch16_224", "--pretrained", "none",
                                  "--backbone-args", TIMM_ARGS)
    expected = "random initialisation (timm deit_small_distilled_patch16_224, no pretrained weights)"
    assert f"backbone weights: {expected}" in stdout
    assert metrics["backbone_weights"] == expected and metrics["backbone_args"] == json.loads(TIMM_ARGS)


def test_timm_dinov3_backbone_random_initialisation(tmp_path):
    stdout, metrics = run_example(tmp_path, "--backbone", "vit_small_patch16_dinov3", "--pretrained", "none",
                                  "--backbone-args", TIMM_ARGS)
    expected = "random initialisation (timm vit_small_patch16_dinov3, no pretrained weights)"
    assert f"backbone weights: {expected}" in stdout and metrics["backbone_weights"] == expected
    bb = backbone.build_backbone("vit_small_patch16_dinov3", 64, "none", json.loads(TIMM_ARGS))
    assert bb.num_prefix_tokens == 5 and bb.grid == (4, 4)


def test_hugging_face_dinov3_backbone_from_a_config(tmp_path):
    stdout, metrics = run_example(tmp_path, "--backbone", "hf:dinov3", "--backbone-args", HF_ARGS)
    expected = ("random initialisation (transformers DINOv3ViTModel from DINOv3ViTConfig: hidden_size 32, 2 layers, "
                "2 heads, patch 16, image 64)")
    assert f"backbone weights: {expected}" in stdout and metrics["backbone_weights"] == expected
    bb = backbone.build_backbone("hf:dinov3", 64, overrides=json.loads(HF_ARGS))
    assert bb.num_prefix_tokens == 5 and bb.grid == (4, 4)               # class token and 4 registers


def test_hugging_face_backbone_from_a_config(tmp_path):
    stdout, metrics = run_example(tmp_path, "--backbone", "hf:deit", "--backbone-args", HF_ARGS)
    expected = ("random initialisation (transformers DeiTModel from DeiTConfig: hidden_size 32, 2 layers, 2 heads, "
                "patch 16, image 64)")
    assert f"backbone weights: {expected}" in stdout and metrics["backbone_weights"] == expected


# ----------------------------------------------------------------------------- loading, in process
sys.path.insert(0, os.path.join(ROOT, "examples"))
import backbone  # noqa: E402


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_timm_local_file_and_hugging_face_folder_are_loaded(tmp_path):
    torch.manual_seed(1)
    saved = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=0, img_size=64,
                              **json.loads(TIMM_ARGS))
    path = tmp_path / "deit_tiny_test.pth"
    torch.save(saved.state_dict(), path)
    bb = backbone.build_backbone("deit_small_patch16_224", 64, str(path), json.loads(TIMM_ARGS))
    assert same_weights(bb.model, saved) and bb.weights == f"timm weights from the local file {path}"
    random = backbone.build_backbone("deit_small_patch16_224", 64, "none", json.loads(TIMM_ARGS))
    assert not same_weights(random.model, saved)

    saved = transformers.DeiTModel(transformers.DeiTConfig(image_size=64, **json.loads(HF_ARGS)),
                                   add_pooling_layer=False)
    _folder_loads_at_96_pixels(saved, tmp_path / "deit", prefix=2)     # positions interpolated


def test_hugging_face_dinov3_folder_is_loaded_at_another_size(tmp_path):
    torch.manual_seed(1)
    saved = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(image_size=64, num_register_tokens=4,
                                                                      **json.loads(HF_ARGS)))
    _folder_loads_at_96_pixels(saved, tmp_path / "dinov3", prefix=5)   # rotary embeddings: any size


def _folder_loads_at_96_pixels(saved, folder, prefix):
    """`saved` (made for 64 px) written to `folder` and read back by the trainer at 96 px: the
    same weights, `prefix` prefix tokens, a 6 x 6 grid, tokens of that size."""
    saved.save_pretrained(folder)
    bb = backbone.build_backbone(f"hf:{folder}", 96)
    assert same_weights(bb.model, saved) and bb.num_prefix_tokens == prefix and bb.grid == (6, 6)
    assert bb.weights == f"transformers {type(saved).__name__}.from_pretrained({folder})"
    cls, patches = bb.tokens(torch.rand(2, 3, 96, 96))
    assert cls.shape == (2, 32) and patches.shape == (2, 36, 32)
