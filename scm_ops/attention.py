"""F0 from the attention of a ViT: materialised weights, or the unmodified modules.

TS-CAM and SCM read F0 from the post-softmax attention of every block (heads averaged,
blocks summed, class-token row, patch columns, min-max per image).

- :func:`attention_map_from_blocks` computes it from materialised weights
  [B, heads, T, T] (e.g. a Hugging Face model loaded with ``attn_implementation="eager"``
  and called with ``output_attentions=True``).
- :class:`ClassAttentionRecorder` hooks each attention module and recomputes only the
  class-token row, softmax(q_cls k^T * scale + bias): one 1 x T row per head instead of a
  T x T matrix, without editing the model, whatever attention implementation it runs (fused
  ``scaled_dot_product_attention``, sdpa, eager). It reads timm's attention modules (one
  ``qkv`` projection, or ``q_proj`` / ``k_proj``; q / k norms; the rotary embedding passed
  as ``rope=`` by Eva, EVA02, DINOv3 and the rope ViTs; BEiT's relative position bias) and
  Hugging Face's (``q_proj`` / ``k_proj``, or ``query`` / ``key`` in transformers 4;
  DINOv3's rotary ``position_embeddings``).

    recorder = ClassAttentionRecorder.from_model(vit).open()   # timm ViT / Eva / BEiT, HF ViT / DINOv3 ...
    tokens = vit.forward_features(images)                      # or vit(pixel_values)
    f0 = recorder.attention_map()                              # [B, H, W]

A sequence is T = P + H * W tokens: P prefix tokens, the class token first (then
distillation or register tokens, left out of F0), then the H x W patches row-major.
Rows, head means and block sums are kept in float32 for float16 / bfloat16 (autocast
included), as the softmax is.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from .class_attention import _Q_NAMES, _Layout, class_token_attention
from .diffusion import minmax_normalize

__all__ = ["ClassAttentionRecorder", "attention_map_from_blocks", "class_token_attention"]

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
        [B, H, W] in the attentions' dtype (computed in float32 for float16 / bfloat16):
        heads averaged, blocks summed, class-token row, patch columns, min-max normalised
        per image (a constant map gives 0).
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
    return _f0_from_rows(a[:, :, :, 0, prefix:], (H, W), a.dtype)


def _f0_from_rows(rows: torch.Tensor, grid, dtype: torch.dtype) -> torch.Tensor:
    """Class rows' patch columns [blocks, B, heads, N] -> F0 [B, H, W] in `dtype`: the head
    mean, block sum and min-max run in float32 for float16 / bfloat16 rows (a sum of
    near-equal low-precision rows loses the differences F0 is made of)."""
    wide = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows
    f0 = wide.mean(2).sum(0)
    return minmax_normalize(f0.reshape(-1, *grid), (1, 2)).to(dtype)


# ----------------------------------------------------------------------------- the recorder
class ClassAttentionRecorder:
    """Records the class-token attention row of every block and builds F0 from it.

    Open it (``open()``, or as a context manager) to register a forward hook on each
    attention module; ``close()`` (or leaving the ``with``) removes them. Each forward pass
    of a module overwrites its row, so :meth:`attention_map` describes the latest pass.

    Modules read (whatever attention implementation they run, fused, sdpa or eager: the
    hook recomputes, from the module's input and current weights, only q of the class
    token and k of every token):

    - timm's ``Attention`` (ViT, DeiT, DINOv2), ``EvaAttention`` and ``AttentionRope``
      (EVA02, DINOv3, the rope ViTs) and BEiT's ``Attention``: ``qkv`` (nn.Linear(dim,
      3 * heads * head_dim), output laid out as (3, heads, head_dim), with ``q_bias`` /
      ``k_bias`` apart) or ``q_proj`` / ``k_proj`` (``num_kv_heads`` key heads),
      ``num_heads``, ``scale``, optional per-head ``q_norm`` / ``k_norm``; the rotary
      embedding passed as ``rope=`` ([..., N, 2 * head_dim], sin then cos, the mixed
      variant's per-head ones included) rotates the tokens after the module's
      ``num_prefix_tokens``, interleaved or (``rotate_half``) in halves; BEiT's
      ``relative_position_bias_table`` / ``relative_position_index`` and
      ``shared_rel_pos_bias=`` are added to the row;
    - Hugging Face ViT / DeiT / DINOv2 / DINOv3 attention: ``q_proj`` / ``k_proj``
      (transformers 5) or ``query`` / ``key`` (transformers 4), heads from
      ``num_attention_heads`` or ``config.num_attention_heads``, scale from ``scaling``;
      DINOv3's ``position_embeddings=(cos, sin)`` rotate the last N tokens in halves;
      BEiT's relative position bias comes in the attention mask (transformers 5) or as
      ``relative_position_bias=`` (transformers 4).

    The scale is the module's ``scale`` or ``scaling``, else 1 / sqrt(head_dim). Hidden
    states may be passed positionally or as ``hidden_states=`` / ``x=``; the other inputs
    are read by the names of the module's ``forward`` parameters; an attention mask
    (``attn_mask=`` / ``attention_mask=``, boolean or additive) is applied to the row.
    Modules that add a position term the recorder does not recompute (a rotary embedding
    held by the module, a relative position bias other than BEiT's, Hugging Face
    ``position_embeddings`` of other models) are refused with a TypeError naming it.

    Mixed precision: under float16 / bfloat16 autocast (or with a float16 / bfloat16
    model) q and k are formed as the module forms them, the softmax, the head mean, the
    block sum and the min-max run in float32, and F0 comes back in the attention inputs'
    dtype (float32 under autocast).

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
        self.rows: list[torch.Tensor | None] = [None] * len(self.modules)   # [B, heads, T] each, float32 or 64
        self.dtype: torch.dtype | None = None            # the attention inputs' dtype, F0's
        self.pass_grid: tuple[int, int] | None = None   # set per pass by from_model's patch-embedding hook
        self._grid_source = None                         # (module, patch size, feature-size function)
        self._handles = []

    @classmethod
    def from_model(cls, model: nn.Module, grid_size=None, num_prefix_tokens: int | None = None
                   ) -> "ClassAttentionRecorder":
        """A recorder over every block of a timm ``VisionTransformer`` (distilled DeiT and
        register models included), ``Eva`` (EVA02, DINOv3, the rope ViTs) or ``Beit``, or a
        Hugging Face ``ViTModel`` / ``DeiTModel`` / ``Dinov2Model`` / ``DINOv3ViTModel`` (or
        a model wrapping one, such as ``ViTForImageClassification``), not yet open.

        The prefix count is read from the model (timm ``num_prefix_tokens``; Hugging Face:
        the class token, plus DeiT's distillation token and any register tokens, 4 for
        DINOv3) unless given. Without ``grid_size`` the grid is read at each pass from the input of the
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
            inputs = layout.inputs(args, kwargs)
            self.rows[index] = layout.class_row(module, inputs)
            self.dtype = inputs["x"].dtype
        return hook

    def _grid_hook(self, module, args, kwargs):
        images = args[0] if args else next(iter(kwargs.values()))
        _, patch, feat_size = self._grid_source
        size = (images.shape[-2], images.shape[-1])
        self.pass_grid = tuple(feat_size(size)) if feat_size is not None else (size[0] // patch[0],
                                                                               size[1] // patch[1])

    # ------------------------------------------------------------------ results
    def attention_map(self, grid_size=None) -> torch.Tensor:
        """F0 [B, H, W] in the attention inputs' dtype: mean over heads, sum over the
        recorded blocks, class-token row, patch columns, min-max per image (a constant map
        gives 0), as :func:`attention_map_from_blocks` on the full weights. For float16 /
        bfloat16 logits (autocast included) the rows, the mean, the sum and the min-max are
        float32.

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
        return _f0_from_rows(torch.stack(self.rows)[..., P:], grid, self.dtype)


# ----------------------------------------------------------------------------- whole models
def _model_layout(model: nn.Module):
    """(attention modules, prefix count, (patch embedding, patch size, feature-size
    function or None)) of a timm VisionTransformer / Eva / Beit or a Hugging Face ViT /
    DeiT / DINOv2 / DINOv3."""
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
    # the model itself (DINOv3ViTModel's base_model is its encoder), else the base model of a wrapper
    base = next((m for m in (model, getattr(model, "base_model", None))
                 if hasattr(getattr(m, "embeddings", None), "patch_embeddings")), None)
    if base is not None:
        emb = base.embeddings
        if getattr(emb, "cls_token", None) is None:
            raise ValueError(f"{name} has no class token (embeddings.cls_token): F0 is the class token's "
                             f"attention row, which this model does not have")
        prefix = 1 + (getattr(emb, "distillation_token", None) is not None)
        registers = getattr(emb, "register_tokens", None)
        prefix += registers.shape[1] if isinstance(registers, torch.Tensor) else 0
        layers = getattr(base, "layers", None)
        for holder in ("encoder", "model"):       # transformers 4 and most models; DINOv3
            if layers is None:
                layers = getattr(getattr(base, holder, None), "layer", None)
        if layers is None:
            raise TypeError(f"{name}: no `layers` (transformers 5), `encoder.layer` or `model.layer` found")
        modules = [_hf_attention(layer, f"{name} layer {i}") for i, layer in enumerate(layers)]
        pe = emb.patch_embeddings                 # DINOv3: an nn.Conv2d, whose stride is the patch
        patch = getattr(pe, "patch_size", None) or getattr(pe, "stride", None)
        return modules, prefix, (pe, _pair(patch, "patch_size"), None)
    raise TypeError(f"from_model reads timm VisionTransformer / Eva / Beit and Hugging Face ViT / DeiT / DINOv2 / "
                    f"DINOv3 models (and models wrapping them), not {name}: build ClassAttentionRecorder("
                    f"attention_modules, grid_size, num_prefix_tokens) from the attention modules")


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
