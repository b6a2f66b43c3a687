"""F0 from a ViT whose attention never materialises its weights.

TS-CAM and SCM read F0 from the post-softmax attention of every block (heads averaged,
blocks summed, class-token row, patch columns, min-max per image), which
:func:`scm_ops.attention_map_from_blocks` computes from materialised weights. Modern ViTs
(timm's ``Attention``) call a fused ``scaled_dot_product_attention`` and never form those
weights. :class:`ClassAttentionRecorder` hooks each attention module and recomputes only
the class-token row, softmax(q_cls k^T * scale), which costs one 1 x (1 + N) row per head
instead of a (1 + N) x (1 + N) matrix, without editing the model.

    blocks = [blk.attn for blk in vit.blocks]
    with ClassAttentionRecorder(blocks, grid_size=(14, 14)) as recorder:
        tokens = vit.forward_features(images)
        f0 = recorder.attention_map()          # [B, 14, 14]
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion import minmax_normalize

__all__ = ["ClassAttentionRecorder"]


def _check_attention_module(module: nn.Module, index: int) -> None:
    missing = [name for name in ("qkv", "num_heads") if not hasattr(module, name)]
    if missing or not isinstance(module.qkv, nn.Linear):
        raise TypeError(f"attention_modules[{index}] ({type(module).__name__}) must follow timm's "
                        f"Attention structure: a `qkv` nn.Linear(dim, 3 * dim) and `num_heads`; "
                        f"missing or wrong: {missing or ['qkv (not nn.Linear)']}")
    if module.qkv.out_features % (3 * module.num_heads):
        raise ValueError(f"attention_modules[{index}].qkv has {module.qkv.out_features} outputs, "
                         f"not a multiple of 3 * num_heads = {3 * module.num_heads}")


class ClassAttentionRecorder:
    """Records the class-token attention row of every block and builds F0 from it.

    A context manager: entering registers a forward hook on each attention module, leaving
    removes them (``close()`` does the same outside a ``with``). Each forward pass of a
    module overwrites its row, so :meth:`attention_map` always describes the latest pass.

    The hooked modules must follow timm's ``Attention``: the input x [B, T, dim] goes
    through ``qkv`` (an ``nn.Linear(dim, 3 * dim)``, output laid out as (3, heads,
    head_dim)), optional ``q_norm`` / ``k_norm`` modules applied per head, and
    softmax(q k^T * scale) with ``scale`` (default head_dim ** -0.5). Whether the module
    itself runs fused attention does not matter: the hook recomputes, from the module's
    input and its current weights, only what F0 needs (q of the class token, k of all
    tokens).

    Gradients: when grad mode is on, the recorded rows (and F0) are differentiable with
    respect to the module's input and its ``qkv`` (and norm) parameters; under
    ``torch.no_grad()`` nothing is kept for backward.

    Args:
        attention_modules: the attention modules of the blocks to sum, in any order
            (e.g. ``[blk.attn for blk in vit.blocks]``).
        grid_size: (H, W) patch grid (an int for a square grid); the last H * W tokens of
            the sequence are the patches, the first token is the class token, any tokens
            in between (distillation or register tokens) are left out of F0.
    """

    def __init__(self, attention_modules: Iterable[nn.Module], grid_size):
        self.modules = list(attention_modules)
        if not self.modules:
            raise ValueError("attention_modules is empty: give at least one attention module")
        for i, m in enumerate(self.modules):
            _check_attention_module(m, i)
        self.grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        if len(self.grid_size) != 2 or min(self.grid_size) < 1:
            raise ValueError(f"grid_size must be (H, W) with H, W >= 1, got {grid_size}")
        self.rows: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> "ClassAttentionRecorder":
        if self._handles:
            raise RuntimeError("ClassAttentionRecorder is already recording")
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (the recorded rows stay readable)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, index: int):
        def hook(module, args, output):
            self.rows[index] = class_token_attention(module, args[0])
        return hook

    # ------------------------------------------------------------------ results
    def attention_map(self) -> torch.Tensor:
        """F0 [B, H, W] in the dtype of the recorded rows: mean over heads, sum over the
        recorded blocks, class-token row, patch columns, min-max per image (a constant map
        gives 0), as :func:`scm_ops.attention_map_from_blocks` on the full weights."""
        if any(r is None for r in self.rows):
            missing = [i for i, r in enumerate(self.rows) if r is None]
            raise RuntimeError(f"no forward pass recorded for attention modules {missing}: run the "
                               f"model inside the `with` block first")
        H, W = self.grid_size
        T = self.rows[0].shape[-1]
        if T < H * W + 1:
            raise ValueError(f"the sequence has {T} tokens, fewer than 1 + H * W = {1 + H * W} "
                             f"for grid_size {self.grid_size}")
        f0 = torch.stack([r.mean(1) for r in self.rows]).sum(0)[:, T - H * W:]   # [B, N]
        return minmax_normalize(f0.reshape(-1, H, W), (1, 2))


def class_token_attention(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q_cls k^T * scale) of a timm-style attention module for input x [B, T, dim]
    -> [B, heads, T] (the class-token row of every head), in x's dtype."""
    if x.dim() != 3:
        raise ValueError(f"attention input must be [B, T, dim], got {tuple(x.shape)}")
    B, T, _ = x.shape
    heads = module.num_heads
    inner = module.qkv.out_features // 3
    head_dim = inner // heads
    weight, bias = module.qkv.weight, module.qkv.bias
    q = F.linear(x[:, :1], weight[:inner], None if bias is None else bias[:inner])          # [B, 1, inner]
    k = F.linear(x, weight[inner:2 * inner], None if bias is None else bias[inner:2 * inner])  # [B, T, inner]
    q = q.reshape(B, 1, heads, head_dim).transpose(1, 2)     # [B, heads, 1, head_dim]
    k = k.reshape(B, T, heads, head_dim).transpose(1, 2)     # [B, heads, T, head_dim]
    q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    scale = getattr(module, "scale", head_dim ** -0.5)
    return ((q * scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]
