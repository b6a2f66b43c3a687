"""Backbones for the example: its own small ViT, a timm ViT (DeiT, DINOv2, DINOv3, EVA02,
rope ViTs, BEiT: any model ClassAttentionRecorder.from_model reads), or a Hugging Face ViT /
DeiT / DINOv3.

All expose what the TS-CAM heads need, through one interface:
``tokens(images)`` -> final-norm class token [B, dim] and patch tokens [B, N, dim];
``attention_modules`` (the blocks' attention modules, read by scm_ops.attention's
ClassAttentionRecorder to form F0 without editing the model) and ``num_prefix_tokens``
(class token first, then distillation / register tokens); ``grid``, ``embed_dim``,
``image_size``, ``config``; and ``weights``, a sentence saying what was loaded.

    build_backbone("tiny")                                    # the example's ViT (112 px)
    build_backbone("deit_small_patch16_224")                  # timm, its pretrained weights (download)
    build_backbone("deit_small_patch16_224", pretrained="none")          # timm, random initialisation
    build_backbone("deit_small_patch16_224", pretrained="deit_s.safetensors")   # timm, a local file
    build_backbone("vit_small_patch16_dinov3", pretrained="none")        # timm DINOv3 (4 registers, rope)
    build_backbone("hf:deit")                                 # transformers DeiTModel, random, from a config
    build_backbone("hf:dinov3")                               # transformers DINOv3ViTModel, random
    build_backbone("hf:path/to/folder")                       # transformers from_pretrained(folder)
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Attention(nn.Module):
    """Multi-head self-attention laid out as timm's: `qkv`, `num_heads`, `scale`,
    `q_norm` / `k_norm`, fused scaled_dot_product_attention (weights never formed)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """The example's ViT: patch 8, class token, learnt positions, pre-norm blocks.
    Input images [B, 3, S, S] float32 in [0, 1], S = image_size."""

    num_prefix_tokens = 1
    weights = "random initialisation"     # until a checkpoint is loaded (train_wsol.load_pretrained)

    def __init__(self, image_size=112, patch=8, dim=64, depth=4, num_heads=4):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of the patch size {patch}")
        self.image_size, self.patch_size, self.embed_dim = image_size, patch, dim
        self.config = dict(image_size=image_size, patch=patch, dim=dim, depth=depth, num_heads=num_heads)
        self.grid = (image_size // patch, image_size // patch)
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    @property
    def attention_modules(self):
        return [b.attn for b in self.blocks]

    def tokens(self, images):
        """[B, 3, S, S] -> final-norm class token [B, dim] and patch tokens [B, N, dim]."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be [B, 3, {self.image_size}, {self.image_size}], "
                             f"got {tuple(images.shape)}")
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1:]


def _recorder_layout(model: nn.Module, name: str):
    """(attention modules, prefix count) of a timm or Hugging Face ViT, as
    ClassAttentionRecorder.from_model reads them; a model without a class token is refused."""
    import warnings
    from scm_ops.attention import ClassAttentionRecorder
    try:
        with warnings.catch_warnings():       # the TS-CAM heads read the tokens, not the model's own pooling
            warnings.filterwarnings("ignore", message=".*pools its tokens")
            found = ClassAttentionRecorder.from_model(model)
    except ValueError as e:
        raise ValueError(f"--backbone {name}: {e}") from e
    return found.modules, found.num_prefix_tokens


class TimmViT(nn.Module):
    """A timm ViT (e.g. deit_small_patch16_224, the paper's, or a distilled DeiT); input
    [B, 3, S, S] float32 in [0, 1], normalised here with ImageNet statistics.

    pretrained: True (timm's pretrained weights, downloaded or from the cache), False
    (random initialisation) or the path of a local weights file (.safetensors / .pth).
    overrides: keyword arguments for timm.create_model (e.g. depth=2, embed_dim=32)."""

    def __init__(self, name: str, image_size=224, pretrained=True, overrides=None):
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"--backbone {name} needs timm (pip install timm, beside a torch it "
                              f"supports); without it use --backbone tiny") from e
        overrides = dict(overrides or {})
        kwargs = dict(pretrained=bool(pretrained), num_classes=0, img_size=image_size, **overrides)
        if isinstance(pretrained, str):
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"--pretrained {pretrained}: no such weights file for timm's {name}")
            kwargs["pretrained_cfg_overlay"] = dict(file=os.path.abspath(pretrained))
        try:
            self.model = timm.create_model(name, **kwargs)
        except Exception as e:
            if pretrained is not True:
                raise
            raise RuntimeError(f"timm could not load the pretrained weights of {name} ({type(e).__name__}: {e}); "
                               f"offline, pass --pretrained none (random initialisation) or --pretrained FILE "
                               f"(a local weights file)") from e
        self.image_size = image_size
        self.patch_size = self.model.patch_embed.patch_size[0]
        self.grid = tuple(self.model.patch_embed.grid_size)
        self.embed_dim = self.model.embed_dim
        self._attention, self.num_prefix_tokens = _recorder_layout(self.model, name)
        self.config = dict(name=name, image_size=image_size, **overrides)
        if pretrained is True:
            cfg = getattr(self.model, "pretrained_cfg", None) or {}
            tag = f"{cfg.get('architecture', name)}.{cfg['tag']}" if cfg.get("tag") else name
            source = cfg.get("hf_hub_id") or cfg.get("url") or "timm's default source"
            self.weights = f"timm pretrained weights {tag} (from {source})"
        elif pretrained:
            self.weights = f"timm weights from the local file {pretrained}"
        else:
            self.weights = f"random initialisation (timm {name}, no pretrained weights)"
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def attention_modules(self):
        return list(self._attention)

    def tokens(self, images):
        x = self.model.forward_features((images - self.mean) / self.std)   # [B, T, dim], final norm
        return x[:, 0], x[:, self.num_prefix_tokens:]


HF_MODELS = {"vit": ("ViTConfig", "ViTModel", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
             "deit": ("DeiTConfig", "DeiTModel", IMAGENET_MEAN, IMAGENET_STD),
             "dinov3": ("DINOv3ViTConfig", "DINOv3ViTModel", IMAGENET_MEAN, IMAGENET_STD)}
# config fields set beside the library's defaults: the released DINOv3 ViTs have 4 registers
HF_DEFAULTS = {"dinov3": dict(num_register_tokens=4)}
HF_MODEL_TYPES = {"vit": "vit", "deit": "deit", "dinov3_vit": "dinov3"}     # config.model_type -> HF_MODELS


class HFViT(nn.Module):
    """A Hugging Face ViTModel, DeiTModel (without its pooler) or DINOv3ViTModel
    (transformers); input [B, 3, S, S] float32 in [0, 1], normalised with the image
    processor's statistics.

    source: "vit", "deit" or "dinov3" (random initialisation from a config: the library's
    defaults, ViT-Base sizes for ViT / DeiT, ViT-S/16 for DINOv3 with 4 registers, with
    image_size and the overrides, e.g. hidden_size=32, num_hidden_layers=2) or a local
    folder written by save_pretrained (weights loaded with from_pretrained; for ViT / DeiT,
    images of another size than its config's interpolate the position embeddings; DINOv3's
    rotary embeddings take any size). Any attention implementation: F0 comes from the
    recorder."""

    def __init__(self, source: str, image_size=None, overrides=None):
        super().__init__()
        try:
            import transformers
        except ImportError as e:
            raise ImportError(f"--backbone hf:{source} needs transformers (pip install transformers, beside a "
                              f"torch it supports); without it use --backbone tiny") from e
        overrides = dict(overrides or {})
        if source in HF_MODELS:
            config_cls, model_cls, mean, std = HF_MODELS[source]
            defaults = dict(HF_DEFAULTS.get(source, {}), image_size=image_size or 224)
            config = getattr(transformers, config_cls)(**dict(defaults, **overrides))
            self.model = getattr(transformers, model_cls)(config, **_no_pooler(source))
            self.weights = (f"random initialisation (transformers {model_cls} from {config_cls}: hidden_size "
                            f"{config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} "
                            f"heads, patch {config.patch_size}, image {config.image_size})")
        elif os.path.isdir(source):
            config = transformers.AutoConfig.from_pretrained(source, **overrides)
            kind = HF_MODEL_TYPES.get(config.model_type)
            if kind is None:
                raise ValueError(f"--backbone hf:{source} is a {config.model_type!r} model; the example reads "
                                 f"ViT, DeiT and DINOv3 ({', '.join(repr(t) for t in HF_MODEL_TYPES)})")
            _, model_cls, mean, std = HF_MODELS[kind]
            self.model = getattr(transformers, model_cls).from_pretrained(source, config=config, **_no_pooler(kind))
            processor = os.path.join(source, "preprocessor_config.json")
            if os.path.isfile(processor):
                with open(processor) as f:
                    stats = json.load(f)
                mean, std = stats.get("image_mean", mean), stats.get("image_std", std)
            self.weights = f"transformers {model_cls}.from_pretrained({source})"
        else:
            raise ValueError(f"--backbone hf:{source}: give hf:vit, hf:deit, hf:dinov3 (random initialisation from "
                             f"a config) or hf:FOLDER (a folder written by save_pretrained)")
        config = self.model.config
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        native = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        self.image_size = image_size or native
        if self.image_size % patch:
            raise ValueError(f"image_size {self.image_size} must be a multiple of the patch size {patch}")
        # ViT / DeiT interpolate their learnt positions to another size; DINOv3 has none to interpolate
        self.interpolate = self.image_size != native and config.model_type != "dinov3_vit"
        self.patch_size, self.grid = patch, (self.image_size // patch, self.image_size // patch)
        self.embed_dim = config.hidden_size
        self._attention, self.num_prefix_tokens = _recorder_layout(self.model, f"hf:{source}")
        self.config = dict(name=f"hf:{source}", image_size=self.image_size, **overrides)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def attention_modules(self):
        return list(self._attention)

    def tokens(self, images):
        extra = dict(interpolate_pos_encoding=True) if self.interpolate else {}
        out = self.model(pixel_values=(images - self.mean) / self.std, **extra)
        x = out.last_hidden_state                                           # [B, T, dim], final norm
        return x[:, 0], x[:, self.num_prefix_tokens:]


def _no_pooler(kind: str) -> dict:
    """ViTModel / DeiTModel are built without their pooler; DINOv3ViTModel has none."""
    return {} if kind == "dinov3" else dict(add_pooling_layer=False)


def build_backbone(name: str, image_size: int | None = None, pretrained=None, overrides=None) -> nn.Module:
    """'tiny' -> TinyViT (112 px unless image_size is given; its checkpoints are loaded by
    train_wsol), 'hf:vit' / 'hf:deit' / 'hf:dinov3' / 'hf:FOLDER' -> HFViT, anything else ->
    a timm model of that name (224 px unless given).

    pretrained (timm): None or True -> timm's pretrained weights, 'none' or False -> random
    initialisation, a file path -> that file. For 'hf:' backbones the weights come from the
    name (a folder) and pretrained must be None or 'none'. overrides: a dict of model
    arguments (timm.create_model keywords, or transformers config fields)."""
    if name == "tiny":
        if overrides:
            raise ValueError("--backbone-args applies to timm and Hugging Face backbones, not 'tiny'")
        return TinyViT(image_size=image_size or 112)
    if name.startswith("hf:"):
        if pretrained not in (None, "none", False):
            raise ValueError(f"--backbone {name} takes no --pretrained {pretrained}: use --backbone hf:FOLDER "
                             f"for weights written by save_pretrained")
        return HFViT(name[3:], image_size=image_size, overrides=overrides)
    weights = True if pretrained in (None, True) else False if pretrained in ("none", False) else pretrained
    return TimmViT(name, image_size=image_size or 224, pretrained=weights, overrides=overrides)
