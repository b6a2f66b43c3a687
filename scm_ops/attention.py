"""F0 from the attention of a ViT: materialised weights, or the unmodified modules.

TS-CAM and SCM read F0 from the post-softmax attention of every block (heads averaged,
blocks summed, class-token row, patch columns, min-max per image).

- :func:`attention_map_from_blocks` computes it from materialised weights
  [B, heads, T, T] (e.g. a Hugging Face model loaded with ``attn_implementation="eager"``
  and called with ``output_attentions=True``).
- :class:`ClassAttentionRecorder` hooks each attention module and recomputes only the
  class-token row, softmax(q_cls k^T * scale): one 1 x T row per head instead of a T x T
  matrix, without editing the model, whatever attention implementation it runs (fused
  ``scaled_dot_product_attention``, sdpa, eager). It reads timm's ``Attention`` (one
  ``qkv`` projection) and Hugging Face ViT / DeiT attention (separate ``q_proj`` /
  ``k_proj``, or ``query`` / ``key`` in transformers 4).

    recorder = ClassAttentionRecorder.from_model(vit).open()   # timm ViT / HF ViTModel, DeiTModel
    tokens = vit.forward_features(images)                      # or vit(pixel_values)
    f0 = recorder.attention_map()                              # [B, H, W]

A sequence is T = P + H * W tokens: P prefix tokens, the class token first (then
distillation or register tokens, left out of F0), then the H x W patches row-major.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion import minmax_normalize

__all__ = ["ClassAttentionRecorder", "attention_map_from_blocks", "class_token_attention"]

_Q_NAMES = ("q_proj", "query")          # Hugging Face: transformers 5, transformers 4
_K_NAMES = ("k_proj", "key")
# Attention modules that add something to the logits which the recorder does not recompute.
_UNSUPPORTED = {"rope": "a rotary position embedding", "relative_position_bias_table": "a relative position bias",
                "rel_pos_h": "a relative position bias", "relative_position_bias": "a relative position bias"}

_NO_WEIGHTS = ("no attention weights to build F0 from ({what}): Hugging Face models return () or None for "
               "output_attentions=True unless they run eager attention; load the model with "
               "attn_implementation=\"eager\" (from_pretrained(..., attn_implementation=\"eager\"), or "
               "model.set_attn_implementation(\"eager\")), or use scm_ops.ClassAttentionRecorder, which "
               "needs no attention weights")


def _pair(size, name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be (H, W) with H, W >= 1, got {size}")
    return pair


def _check_prefix(num_prefix_tokens) -> int:
    if not isinstance(num_prefix_tokens, int) or isinstance(num_prefix_tokens, bool) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 1, got {num_prefix_tokens!r}")
    if num_prefix_tokens == 0:
        raise ValueError("num_prefix_tokens=0: the sequence has no class token, and F0 is the class token's "
                         "attention row; use a model with a class token")
    return num_prefix_tokens


def _token_count_error(T: int, prefix: int, grid) -> ValueError:
    H, W = grid
    return ValueError(f"the attention sequence has {T} tokens, but num_prefix_tokens + H * W = {prefix} + "
                      f"{H} * {W} = {prefix + H * W} for grid_size {tuple(grid)}: the grid does not match the "
                      f"input (a 288 px image cut into 16 px patches is 18 x 18) or the prefix count does not "
                      f"match the model (class token, then distillation / register tokens)")


# ----------------------------------------------------------------------------- F0 from weights
def attention_map_from_blocks(attentions, grid_size, num_prefix_tokens: int = 1) -> torch.Tensor:
    """F0 (docs/maths.md, "F0 and S0") from per-block attention weights.

    Args:
        attentions: a sequence of post-softmax attention tensors [B, heads, T, T] (one per
            block, e.g. a Hugging Face model's ``outputs.attentions``), or one stacked tensor
            [blocks, B, heads, T, T]; any float dtype. T = num_prefix_tokens + H * W.
        grid_size: (H, W) patch grid (an int for a square grid).
        num_prefix_tokens: tokens before the patches, the class token first (1 for ViT, 2
            for a distilled DeiT: class and distillation tokens; 1 + registers with
            register tokens).
    Returns:
        [B, H, W] in the attentions' dtype: heads averaged, blocks summed, class-token row,
        patch columns, min-max normalised per image (a constant map gives 0).
    Raises:
        ValueError: an empty sequence or a None entry (a Hugging Face model without eager
            attention), a wrong rank, or T != num_prefix_tokens + H * W.
    """
    H, W = _pair(grid_size, "grid_size")
    prefix = _check_prefix(num_prefix_tokens)
    if isinstance(attentions, torch.Tensor):
        a = attentions
    else:
        items = list(attentions) if attentions is not None else []
        if not items or any(x is None for x in items):
            raise ValueError(_NO_WEIGHTS.format(what="an empty sequence" if not items else "None entries"))
        a = torch.stack(items)
    if a.dim() != 5 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"attentions must be [blocks, B, heads, T, T] (or a sequence of [B, heads, T, T]), "
                         f"got {tuple(a.shape)}")
    if a.shape[-1] != prefix + H * W:
        raise _token_count_error(a.shape[-1], prefix, (H, W))
    f0 = a.mean(2).sum(0)[:, 0, prefix:]
    return minmax_normalize(f0.reshape(-1, H, W), (1, 2))


# ----------------------------------------------------------------------------- one module
class _Layout:
    """How to read q (class token) and k (all tokens) from one attention module: timm's
    fused ``qkv`` or Hugging Face's separate projections, heads, head_dim and scale."""

    def __init__(self, module: nn.Module, where: str):
        name = type(module).__name__
        for attr, what in _UNSUPPORTED.items():
            if getattr(module, attr, None) is not None:
                raise TypeError(f"{where} ({name}) adds {what} (`{attr}`) to the attention logits, which "
                                f"ClassAttentionRecorder does not recompute")
        self.q_name = next((n for n in _Q_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
        self.k_name = next((n for n in _K_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
        self.fused = self.q_name is None and isinstance(getattr(module, "qkv", None), nn.Module)
        if not self.fused and (self.q_name is None or self.k_name is None):
            raise TypeError(f"{where} ({name}) is not an attention module the recorder reads: it needs timm's "
                            f"layout (a `qkv` nn.Linear(dim, 3 * heads * head_dim) and `num_heads`) or Hugging "
                            f"Face's (`q_proj` / `k_proj`, or `query` / `key`, with `num_attention_heads` on the "
                            f"module or its `config`)")
        config = getattr(module, "config", None)
        heads = next((v for v in (getattr(module, "num_heads", None), getattr(module, "num_attention_heads", None),
                                  getattr(config, "num_attention_heads", None)) if v is not None), None)
        if not isinstance(heads, int) or heads < 1:
            raise TypeError(f"{where} ({name}) does not say its number of heads (`num_heads`, "
                            f"`num_attention_heads` or `config.num_attention_heads`)")
        self.heads = heads
        if self.fused:
            out = _out_features(module.qkv, f"{where}.qkv")
            if out % (3 * heads):
                raise ValueError(f"{where}.qkv has {out} outputs, not a multiple of 3 * num_heads = {3 * heads}")
            self.inner = out // 3
        else:
            self.inner = _out_features(getattr(module, self.q_name), f"{where}.{self.q_name}")
            k_out = _out_features(getattr(module, self.k_name), f"{where}.{self.k_name}")
            if k_out != self.inner or self.inner % heads:
                raise ValueError(f"{where}: {self.q_name} has {self.inner} outputs and {self.k_name} {k_out}; "
                                 f"both must be num_heads * head_dim with num_heads = {heads}")
        self.head_dim = self.inner // heads
        scale = getattr(module, "scale", None)
        scale = getattr(module, "scaling", None) if scale is None else scale
        # softmax(q k^T / sqrt(head_dim)) unless the module says otherwise
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(self.head_dim)

    def class_row(self, module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"attention input must be [B, T, dim], got {tuple(x.shape)}")
        B, T, _ = x.shape
        heads, hd, inner = self.heads, self.head_dim, self.inner
        if self.fused:
            qkv = module.qkv
            if type(qkv) is nn.Linear:     # only the rows of q and k, and q only for the class token
                w, b = qkv.weight, qkv.bias
                q = F.linear(x[:, :1], w[:inner], None if b is None else b[:inner])
                k = F.linear(x, w[inner:2 * inner], None if b is None else b[inner:2 * inner])
            else:                          # a wrapped projection (e.g. low-rank adapters): run it whole
                q, k = qkv(x)[..., :2 * inner].split(inner, -1)
                q = q[:, :1]
            q_bias, k_bias = getattr(module, "q_bias", None), getattr(module, "k_bias", None)
            if isinstance(q_bias, torch.Tensor):        # BEiT / EVA keep the q (and k) biases apart
                q = q + q_bias
            if isinstance(k_bias, torch.Tensor):
                k = k + k_bias
        else:
            q = getattr(module, self.q_name)(x[:, :1])  # [B, 1, inner]
            k = getattr(module, self.k_name)(x)         # [B, T, inner]
        q, k = q.reshape(B, 1, heads, hd), k.reshape(B, T, heads, hd)
        # timm's per-head norms act on the last dimension only, so they are applied before
        # the heads move forward (a norm on the transposed view breaks AOTAutograd's backward)
        q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
        if isinstance(q_norm, nn.Module):
            q = q_norm(q)
        if isinstance(k_norm, nn.Module):
            k = k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)       # [B, heads, 1, head_dim], [B, heads, T, head_dim]
        logits = (q * self.scale) @ k.transpose(-2, -1)   # [B, heads, 1, T]
        if mask is not None:
            row = mask[..., :1, :] if mask.dim() >= 2 else mask
            logits = logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row
        low = logits.dtype in (torch.float16, torch.bfloat16)
        return logits.softmax(-1, dtype=torch.float32 if low else None).to(logits.dtype)[:, :, 0]


def _out_features(linear: nn.Module, where: str) -> int:
    out = getattr(linear, "out_features", None)
    if out is None:
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"{where} ({type(linear).__name__}) must be a linear layer (`out_features` or a "
                            f"2-D `weight`)")
        out = weight.shape[0]
    return int(out)


def class_token_attention(module: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q_cls k^T * scale) of one attention module (timm or Hugging Face layout) for
    its input x [B, T, dim] -> [B, heads, T], the class-token (first) row of every head, in
    x's dtype (the softmax runs in float32 for float16 / bfloat16). ``attn_mask``: an
    optional boolean (True = attend) or additive mask broadcastable to [B, heads, T, T]."""
    return _Layout(module, type(module).__name__).class_row(module, x, attn_mask)


def _hidden_states(args, kwargs) -> torch.Tensor:
    if args:
        return args[0]
    for name in ("hidden_states", "x"):
        if name in kwargs:
            return kwargs[name]
    raise TypeError(f"the attention module was called without a positional input and without hidden_states= "
                    f"or x= (got {sorted(kwargs)})")


def _mask(args, kwargs):
    mask = kwargs.get("attn_mask", kwargs.get("attention_mask"))
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    return mask if isinstance(mask, torch.Tensor) else None


# ----------------------------------------------------------------------------- the recorder
class ClassAttentionRecorder:
    """Records the class-token attention row of every block and builds F0 from it.

    Open it (``open()``, or as a context manager) to register a forward hook on each
    attention module; ``close()`` (or leaving the ``with``) removes them. Each forward pass
    of a module overwrites its row, so :meth:`attention_map` describes the latest pass.

    Modules read (whatever attention implementation they run, fused, sdpa or eager: the
    hook recomputes, from the module's input and current weights, only q of the class
    token and k of every token):

    - timm's ``Attention``: ``qkv`` (nn.Linear(dim, 3 * heads * head_dim), output laid out
      as (3, heads, head_dim)), ``num_heads``, ``scale``, optional per-head ``q_norm`` /
      ``k_norm``;
    - Hugging Face ViT / DeiT attention: ``q_proj`` / ``k_proj`` (transformers 5) or
      ``query`` / ``key`` (transformers 4), heads from ``num_attention_heads`` or
      ``config.num_attention_heads``, scale from ``scaling``.

    The scale is the module's ``scale`` or ``scaling``, else 1 / sqrt(head_dim). Hidden
    states may be passed positionally or as ``hidden_states=`` / ``x=``; an attention mask
    (``attn_mask=`` / ``attention_mask=`` or the second positional argument, boolean or
    additive) is applied to the row. Modules that add a rotary embedding or a relative
    position bias to the logits are refused.

    Gradients: in grad mode the rows (and F0) are differentiable with respect to the
    module's input and its projection (and norm) parameters; under ``torch.no_grad()``
    nothing is kept for backward.

    ``torch.compile(model, fullgraph=True)``: open the recorder once, outside the forward,
    before compiling (e.g. in the model's ``__init__``), and call :meth:`attention_map`
    inside the forward; the hooks are then traced into the graph with no break.

    Args:
        attention_modules: the attention modules of the blocks to sum, in any order (e.g.
            ``[blk.attn for blk in vit.blocks]``).
        grid_size: (H, W) patch grid (an int for a square grid), or None to give it per pass
            (``attention_map(grid_size=...)``, or read from the model by :meth:`from_model`).
        num_prefix_tokens: tokens before the patches, the class token first (1 for ViT, 2
            for a distilled DeiT, 1 + registers with register tokens). 0 (no class token)
            is refused.
    """

    def __init__(self, attention_modules: Iterable[nn.Module], grid_size=None, num_prefix_tokens: int = 1):
        self.modules = list(attention_modules)
        if not self.modules:
            raise ValueError("attention_modules is empty: give at least one attention module")
        self._layouts = [_Layout(m, f"attention_modules[{i}]") for i, m in enumerate(self.modules)]
        self.grid_size = None if grid_size is None else _pair(grid_size, "grid_size")
        self.num_prefix_tokens = _check_prefix(num_prefix_tokens)
        self.rows: list[torch.Tensor | None] = [None] * len(self.modules)
        self.pass_grid: tuple[int, int] | None = None   # set per pass by from_model's patch-embedding hook
        self._grid_source = None                         # (module, patch size, feature-size function)
        self._handles = []

    @classmethod
    def from_model(cls, model: nn.Module, grid_size=None, num_prefix_tokens: int | None = None
                   ) -> "ClassAttentionRecorder":
        """A recorder over every block of a timm ``VisionTransformer`` (distilled DeiT and
        register models included) or a Hugging Face ``ViTModel`` / ``DeiTModel`` (or a
        model wrapping one, such as ``ViTForImageClassification``), not yet open.

        The prefix count is read from the model (timm ``num_prefix_tokens``; Hugging Face:
        the class token, plus DeiT's distillation token and any register tokens) unless
        given. Without ``grid_size`` the grid is read at each pass from the input of the
        model's patch embedding (so timm's ``dynamic_img_size`` and Hugging Face's
        ``interpolate_pos_encoding`` work at any image size); with it, every pass is
        checked against it. A model without a class token (timm ``class_token=False``,
        e.g. global-pool models with registers) is refused with a ValueError."""
        modules, prefix, grid_source = _model_layout(model)
        recorder = cls(modules, grid_size, prefix if num_prefix_tokens is None else num_prefix_tokens)
        if grid_size is None:
            recorder._grid_source = grid_source
        return recorder

    # ------------------------------------------------------------------ hooks
    def open(self) -> "ClassAttentionRecorder":
        """Register the hooks; returns self. Raises RuntimeError if already open."""
        if self._handles:
            raise RuntimeError("ClassAttentionRecorder is already recording")
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(self._hook(i), with_kwargs=True))
        if self._grid_source is not None:
            self._handles.append(self._grid_source[0].register_forward_pre_hook(self._grid_hook, with_kwargs=True))
        return self

    def __enter__(self) -> "ClassAttentionRecorder":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (the recorded rows stay readable)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, index: int):
        layout = self._layouts[index]

        def hook(module, args, kwargs, output):
            if kwargs.get("rope") is not None:      # timm's EVA-style blocks pass the rotary embedding in
                raise TypeError(f"attention_modules[{index}] ({type(module).__name__}) was called with a rotary "
                                f"position embedding (rope=), which ClassAttentionRecorder does not recompute")
            self.rows[index] = layout.class_row(module, _hidden_states(args, kwargs), _mask(args, kwargs))
        return hook

    def _grid_hook(self, module, args, kwargs):
        images = args[0] if args else next(iter(kwargs.values()))
        _, patch, feat_size = self._grid_source
        size = (images.shape[-2], images.shape[-1])
        self.pass_grid = tuple(feat_size(size)) if feat_size is not None else (size[0] // patch[0],
                                                                               size[1] // patch[1])

    # ------------------------------------------------------------------ results
    def attention_map(self, grid_size=None) -> torch.Tensor:
        """F0 [B, H, W] in the dtype of the recorded rows (the attention inputs' dtype): mean
        over heads, sum over the recorded blocks, class-token row, patch columns, min-max
        per image (a constant map gives 0), as :func:`attention_map_from_blocks` on the
        full weights.

        grid_size: (H, W) for this pass; default the recorder's, else the one read from
        the model's patch embedding. Raises ValueError when the recorded sequence does not
        have num_prefix_tokens + H * W tokens, RuntimeError when a module has not run."""
        if any(r is None for r in self.rows):
            missing = [i for i, r in enumerate(self.rows) if r is None]
            raise RuntimeError(f"no forward pass recorded for attention modules {missing}: open the recorder "
                               f"and run the model first")
        grid = _pair(grid_size, "grid_size") if grid_size is not None else self.grid_size or self.pass_grid
        if grid is None:
            raise ValueError("no grid_size: give it to the recorder or to attention_map(), or build the recorder "
                             "with ClassAttentionRecorder.from_model to read it from the model")
        H, W = grid
        P, T = self.num_prefix_tokens, self.rows[0].shape[-1]
        if T != P + H * W:
            raise _token_count_error(T, P, grid)
        f0 = torch.stack([r.mean(1) for r in self.rows]).sum(0)[:, P:]   # [B, N]
        return minmax_normalize(f0.reshape(-1, H, W), (1, 2))


# ----------------------------------------------------------------------------- whole models
def _model_layout(model: nn.Module):
    """(attention modules, prefix count, (patch embedding, patch size, feature-size
    function or None)) of a timm VisionTransformer or a Hugging Face ViT / DeiT."""
    name = type(model).__name__
    if hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        has_cls = getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None)
        pool = getattr(model, "global_pool", None)
        registers = getattr(model, "num_reg_tokens", 0)
        if not has_cls:
            raise ValueError(f"{name} has no class token (has_class_token=False, global_pool={pool!r}, {registers} "
                             f"register tokens, num_prefix_tokens={model.num_prefix_tokens}): F0 is the class "
                             f"token's attention row, which this model does not have; use a model with a class "
                             f"token (e.g. deit_small_patch16_224)")
        if pool not in (None, "token"):
            warnings.warn(f"{name} pools its tokens with global_pool={pool!r}, not the class token: F0 is read "
                          f"from a class token that its classifier does not use", stacklevel=3)
        modules = []
        for i, blk in enumerate(model.blocks):
            if not isinstance(getattr(blk, "attn", None), nn.Module):
                raise TypeError(f"{name}.blocks[{i}] ({type(blk).__name__}) has no `attn` module: build the "
                                f"recorder from the attention modules directly")
            modules.append(blk.attn)
        pe = model.patch_embed
        return modules, int(model.num_prefix_tokens), (pe, _pair(pe.patch_size, "patch_size"),
                                                       getattr(pe, "dynamic_feat_size", None))
    base = getattr(model, "base_model", model)
    emb = getattr(base, "embeddings", None)
    if emb is not None and hasattr(emb, "patch_embeddings"):
        if getattr(emb, "cls_token", None) is None:
            raise ValueError(f"{name} has no class token (embeddings.cls_token): F0 is the class token's "
                             f"attention row, which this model does not have")
        prefix = 1 + (getattr(emb, "distillation_token", None) is not None)
        registers = getattr(emb, "register_tokens", None)
        prefix += registers.shape[1] if isinstance(registers, torch.Tensor) else 0
        layers = getattr(base, "layers", None)
        if layers is None:
            layers = getattr(getattr(base, "encoder", None), "layer", None)
        if layers is None:
            raise TypeError(f"{name}: no `layers` (transformers 5) or `encoder.layer` (transformers 4) found")
        modules = [_hf_attention(layer, f"{name} layer {i}") for i, layer in enumerate(layers)]
        pe = emb.patch_embeddings
        return modules, prefix, (pe, _pair(pe.patch_size, "patch_size"), None)
    raise TypeError(f"from_model reads timm VisionTransformer and Hugging Face ViT / DeiT models (and models wrapping "
                    f"them), not {name}: build ClassAttentionRecorder(attention_modules, grid_size, "
                    f"num_prefix_tokens) from the attention modules")


def _hf_attention(layer: nn.Module, where: str) -> nn.Module:
    """The module holding the q / k projections in a Hugging Face layer: layer.attention
    (transformers 5) or layer.attention.attention (transformers 4)."""
    module = getattr(layer, "attention", None)
    for _ in range(2):
        if module is None:
            break
        if any(isinstance(getattr(module, n, None), nn.Module) for n in _Q_NAMES):
            return module
        module = getattr(module, "attention", None)
    raise TypeError(f"{where} ({type(layer).__name__}): no attention module with q_proj / k_proj or query / key")
