"""The example's --backbone: its own ViT, and the timm and Hugging Face paths (exercised here
with a stand-in timm module; against the real timm and transformers in tests/integration/)."""
import os
import sys
import types

import pytest
import torch
from torch import nn

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
import backbone  # noqa: E402
from train_wsol import WSOLModel  # noqa: E402


class FakeTimmVit(nn.Module):
    """What the example uses of a timm VisionTransformer: patch_embed.patch_size / grid_size,
    embed_dim, blocks[i].attn (timm's Attention layout), forward_features -> [B, T, dim]
    final-norm tokens with num_prefix_tokens in front (here 2, as a distilled DeiT),
    has_class_token and global_pool."""

    def __init__(self, img_size=32, patch=8, dim=16, class_token=True):
        super().__init__()
        grid = img_size // patch
        self.patch_embed = types.SimpleNamespace(patch_size=(patch, patch), grid_size=(grid, grid))
        self.embed_dim, self.num_prefix_tokens = dim, 2
        self.has_class_token, self.global_pool = class_token, "token" if class_token else "avg"
        self.pretrained_cfg = dict(architecture="fake_vit", tag="in1k", hf_hub_id="timm/fake_vit.in1k")
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.prefix = nn.Parameter(torch.randn(1, 2, dim))
        self.blocks = nn.ModuleList(backbone.Block(dim, 2) for _ in range(2))
        self.norm = nn.LayerNorm(dim)

    def _replace_pool(self, pool):
        self.global_pool = pool
        return self

    def forward_features(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.prefix.expand(len(x), -1, -1), x], 1)
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []

    def create_model(name, pretrained, num_classes, img_size, **kwargs):
        calls.append(dict(name=name, pretrained=pretrained, num_classes=num_classes, img_size=img_size, **kwargs))
        model = FakeTimmVit(img_size=img_size, class_token=kwargs.get("class_token", True))
        model.global_pool = kwargs.get("global_pool", model.global_pool)
        return model

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    return calls


def test_timm_path_builds_f0_and_s0_without_editing_the_model(fake_timm):
    bb = backbone.build_backbone("deit_small_distilled_patch16_224", image_size=32)
    assert fake_timm == [dict(name="deit_small_distilled_patch16_224", pretrained=True, num_classes=0, img_size=32)]
    assert bb.grid == (4, 4) and bb.embed_dim == 16 and bb.num_prefix_tokens == 2
    assert bb.weights == "timm pretrained weights fake_vit.in1k (from timm/fake_vit.in1k)"
    model = WSOLModel(bb, num_classes=5, use_scm=True).train()
    nn.init.normal_(model.head.weight, std=0.1)   # a trained head (S0 starts uniform otherwise)
    logits, f0, s0 = model(torch.rand(3, 3, 32, 32))
    assert logits.shape == (3, 5) and f0.shape == (3, 4, 4) and s0.shape == (3, 5, 4, 4)
    assert torch.allclose(f0.amax((1, 2)), torch.ones(3)) and torch.allclose(f0.amin((1, 2)), torch.zeros(3))
    logits.sum().backward()          # SCM training: gradients reach the attention through F0
    assert bb.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # F0 is the recorder's, computed from the patch columns only (the 2 prefix tokens left out)
    from scm_ops.attention import class_token_attention
    with torch.no_grad():
        x = torch.rand(2, 3, 32, 32)
        model.eval()(x)
        rows = []
        h = bb.model.proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([bb.model.prefix.expand(2, -1, -1), h], 1)
        for blk in bb.model.blocks:
            rows.append(class_token_attention(blk.attn, blk.norm1(h)).mean(1))
            h = blk(h)
        f = torch.stack(rows).sum(0)[:, 2:]
        f = (f - f.amin(1, keepdim=True)) / (f - f.amin(1, keepdim=True)).amax(1, keepdim=True)
        torch.testing.assert_close(model.recorder.attention_map(), f.reshape(2, 4, 4), rtol=0, atol=1e-6)


def test_timm_pretrained_none_a_file_and_overrides_are_honoured(fake_timm, tmp_path):
    bb = backbone.build_backbone("deit_small_patch16_224", 32, pretrained="none", overrides={"depth": 2})
    assert fake_timm[-1] == dict(name="deit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2)
    assert bb.weights == "random initialisation (timm deit_small_patch16_224, no pretrained weights)"
    assert bb.config == dict(name="deit_small_patch16_224", image_size=32, depth=2)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    bb = backbone.build_backbone("deit_small_patch16_224", 32, pretrained=str(weights))
    assert fake_timm[-1]["pretrained"] is True
    assert fake_timm[-1]["pretrained_cfg_overlay"] == dict(file=str(weights))
    assert bb.weights == f"timm weights from the local file {weights}"
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        backbone.build_backbone("deit_small_patch16_224", 32, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="has no class token"):       # e.g. a global-pool model with registers
        backbone.build_backbone("vit_little_patch16_reg4_gap_256", 32, "none", {"class_token": False})


def test_offline_pretrained_download_says_what_to_pass(monkeypatch):
    def create_model(name, pretrained, **kwargs):
        raise OSError("no connection")
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    with pytest.raises(RuntimeError, match="--pretrained none.*--pretrained FILE"):
        backbone.build_backbone("deit_small_patch16_224")


def test_missing_timm_or_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)       # import timm -> ImportError
    with pytest.raises(ImportError, match="needs timm.*--backbone tiny"):
        backbone.build_backbone("deit_small_patch16_224")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="needs transformers.*--backbone tiny"):
        backbone.build_backbone("hf:deit")
    with pytest.raises(ValueError, match="takes no --pretrained"):
        backbone.build_backbone("hf:vit", pretrained="weights.pth")
    with pytest.raises(ValueError, match="not 'tiny'"):
        backbone.build_backbone("tiny", overrides={"depth": 2})


def test_tiny_vit_checks_its_input_size():
    bb = backbone.build_backbone("tiny", image_size=32)
    cls, patches = bb.tokens(torch.rand(1, 3, 32, 32))
    assert cls.shape == (1, bb.embed_dim) and patches.shape == (1, 16, bb.embed_dim)
    with pytest.raises(ValueError, match="32, 32"):
        bb.tokens(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of the patch"):
        backbone.build_backbone("tiny", image_size=30)


def test_a_model_pooling_its_tokens_is_read_without_a_warning(fake_timm, recwarn):
    """DINOv3, EVA02 and BEiT pool with 'avg' by default; the TS-CAM heads read the tokens
    themselves, so the recorder's warning about the model's own pooling is not shown."""
    from scm_ops.attention import ClassAttentionRecorder
    with pytest.warns(UserWarning, match="pools its tokens"):        # the recorder does warn on its own
        ClassAttentionRecorder.from_model(FakeTimmVit(img_size=32)._replace_pool("avg"))
    bb = backbone.build_backbone("vit_small_patch16_dinov3", 32, "none", {"global_pool": "avg"})
    assert bb.model.global_pool == "avg" and bb.num_prefix_tokens == 2
    assert not [w for w in recwarn if "pools its tokens" in str(w.message)]


def test_hugging_face_sources_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace())
    with pytest.raises(ValueError, match="give hf:vit, hf:deit, hf:dinov3"):
        backbone.build_backbone("hf:no/such/folder")
    assert backbone._no_pooler("dinov3") == {} and backbone._no_pooler("deit") == dict(add_pooling_layer=False)
    assert backbone.HF_MODEL_TYPES["dinov3_vit"] == "dinov3"
