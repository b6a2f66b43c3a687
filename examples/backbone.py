"""Backbones for the example: its own small ViT, or a timm ViT when timm is installed.

Both expose what the TS-CAM heads need, through one interface (`Backbone`):
``tokens(images)`` -> final-norm class token [B, dim] and patch tokens [B, N, dim], ``attention_modules`` (the
blocks' attention modules, timm's structure, read by scm_ops.attention's
ClassAttentionRecorder to form F0 without editing the model), ``grid``, ``embed_dim``,
``image_size``.
"""
from __future__ import annotations

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


class TimmViT(nn.Module):
    """A timm ViT (e.g. deit_small_patch16_224, the paper's), ImageNet-pretrained by default;
    input [B, 3, S, S] float32 in [0, 1], normalised here with ImageNet statistics."""

    def __init__(self, name: str, image_size=224, pretrained=True):
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"--backbone {name} needs timm (pip install timm, beside a torch it "
                              f"supports); without it use --backbone tiny") from e
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=image_size)
        self.image_size = image_size
        self.patch_size = self.model.patch_embed.patch_size[0]
        self.grid = tuple(self.model.patch_embed.grid_size)
        self.embed_dim = self.model.embed_dim
        self.config = dict(name=name, image_size=image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def attention_modules(self):
        return [b.attn for b in self.model.blocks]

    def tokens(self, images):
        x = self.model.forward_features((images - self.mean) / self.std)   # [B, T, dim], final norm
        return x[:, 0], x[:, x.shape[1] - self.grid[0] * self.grid[1]:]


def build_backbone(name: str, image_size: int | None = None) -> nn.Module:
    """'tiny' -> TinyViT (112 px unless image_size is given), anything else -> a timm model
    of that name (224 px unless given)."""
    if name == "tiny":
        return TinyViT(image_size=image_size or 112)
    return TimmViT(name, image_size=image_size or 224)
