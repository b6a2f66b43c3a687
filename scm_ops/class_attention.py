"""The class-token attention row of one attention module, recomputed from its input.

softmax(q_cls k^T * scale + bias) for every head: q of the class token and k of every token
are formed from the module's input and current weights as the module forms them (timm's
fused ``qkv`` or separate projections, Hugging Face's projections; q / k norms; grouped key
heads; rotary embeddings; BEiT's relative position bias; masks), giving one 1 x T row per
head, never a T x T matrix. :class:`scm_ops.attention.ClassAttentionRecorder` calls this
from its forward hooks; :func:`class_token_attention` is the same for one call.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["class_token_attention"]

_Q_NAMES = ("q_proj", "query")          # Hugging Face: transformers 5, transformers 4
_K_NAMES = ("k_proj", "key")
# Attention modules holding something that changes the logits which the recorder does not
# recompute (timm BEiT's `relative_position_bias_table` with its index is read).
_UNSUPPORTED = {"rope": "a rotary position embedding held by the module", "rel_pos": "a relative position bias",
                "rel_pos_h": "a relative position bias", "relative_position_bias": "a relative position bias"}
# Hugging Face attention modules whose `position_embeddings=(cos, sin)` rotate the last
# sin.shape[-2] tokens (the patches) in rotate-half layout, prefix tokens untouched.
_HF_ROPE = ("DINOv3ViTAttention",)


class _Layout:
    """How to recompute the class row of one attention module: timm's fused ``qkv`` or
    separate projections (timm's or Hugging Face's), heads (and key / value heads),
    head_dim, scale, q / k norms, rotary embeddings and BEiT's relative position bias."""

    def __init__(self, module: nn.Module, where: str):
        name = type(module).__name__
        self.where = f"{where} ({name})"
        for attr, what in _UNSUPPORTED.items():
            if getattr(module, attr, None) is not None:
                raise TypeError(f"{self.where} adds {what} (`{attr}`) to the attention logits, which "
                                f"ClassAttentionRecorder does not recompute")
        self.q_name = next((n for n in _Q_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
        self.k_name = next((n for n in _K_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
        self.fused = self.q_name is None and isinstance(getattr(module, "qkv", None), nn.Module)
        if not self.fused and (self.q_name is None or self.k_name is None):
            raise TypeError(f"{self.where} is not an attention module the recorder reads: it needs timm's "
                            f"layout (a `qkv` nn.Linear(dim, 3 * heads * head_dim) and `num_heads`) or Hugging "
                            f"Face's (`q_proj` / `k_proj`, or `query` / `key`, with `num_attention_heads` on the "
                            f"module or its `config`)")
        config = getattr(module, "config", None)
        heads = next((v for v in (getattr(module, "num_heads", None), getattr(module, "num_attention_heads", None),
                                  getattr(config, "num_attention_heads", None)) if v is not None), None)
        if not isinstance(heads, int) or heads < 1:
            raise TypeError(f"{self.where} does not say its number of heads (`num_heads`, "
                            f"`num_attention_heads` or `config.num_attention_heads`)")
        self.heads = heads
        self.kv_heads = getattr(module, "num_kv_heads", None) or heads      # grouped-query attention (timm)
        if self.fused:
            out = _out_features(module.qkv, f"{where}.qkv")
            if out % (3 * heads):
                raise ValueError(f"{where}.qkv has {out} outputs, not a multiple of 3 * num_heads = {3 * heads}")
            self.inner = self.k_inner = out // 3
            self.kv_heads = heads
        else:
            self.inner = _out_features(getattr(module, self.q_name), f"{where}.{self.q_name}")
            self.k_inner = _out_features(getattr(module, self.k_name), f"{where}.{self.k_name}")
            if (self.inner % heads or heads % self.kv_heads
                    or self.k_inner * heads != self.inner * self.kv_heads):
                raise ValueError(f"{where}: {self.q_name} has {self.inner} outputs and {self.k_name} "
                                 f"{self.k_inner}; they must be num_heads * head_dim and num_kv_heads * head_dim "
                                 f"with num_heads = {heads}, num_kv_heads = {self.kv_heads}")
        self.head_dim = self.inner // heads
        scale = getattr(module, "scale", None)
        scale = getattr(module, "scaling", None) if scale is None else scale
        # softmax(q k^T / sqrt(head_dim)) unless the module says otherwise
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(self.head_dim)
        # timm's rope= rotates the tokens after the module's num_prefix_tokens, interleaved or
        # rotate-half; Hugging Face's position_embeddings only for the modules in _HF_ROPE
        self.rope_prefix = getattr(module, "num_prefix_tokens", None)
        self.rotate_half = bool(getattr(module, "rotate_half", False))
        self.hf_rope = name in _HF_ROPE
        self.rel_bias = getattr(module, "relative_position_bias_table", None) is not None
        if self.rel_bias:                 # timm BEiT: table [distances, heads], index [T, T]
            table, index = module.relative_position_bias_table, getattr(module, "relative_position_index", None)
            if (not isinstance(index, torch.Tensor) or index.dim() != 2 or index.shape[0] != index.shape[1]
                    or table.dim() != 2 or table.shape[1] != heads):
                raise TypeError(f"{self.where} adds a relative position bias (`relative_position_bias_table`) "
                                f"laid out otherwise than timm's BEiT (table [distances, heads], "
                                f"`relative_position_index` [T, T]), which ClassAttentionRecorder does not "
                                f"recompute")
        self.arg_names = _positional_names(module)

    def inputs(self, args, kwargs) -> dict:
        """The module's call as {parameter name: value}; the hidden states under "x"."""
        named = dict(kwargs)
        if self.arg_names is not None:
            named.update(zip(self.arg_names[1:], args[1:]))
        elif len(args) > 1 and isinstance(args[1], torch.Tensor):      # forward(*args): (x, mask)
            named["attn_mask"] = args[1]
        named["x"] = _hidden_states(args, kwargs)
        return named

    def class_row(self, module: nn.Module, inputs: dict) -> torch.Tensor:
        """[B, heads, T] class rows, float32 for float16 / bfloat16 logits, else their dtype."""
        x = inputs["x"]
        if x.dim() != 3:
            raise ValueError(f"attention input must be [B, T, dim], got {tuple(x.shape)}")
        B, T, _ = x.shape
        heads, hd, inner, k_inner = self.heads, self.head_dim, self.inner, self.k_inner
        if self.fused:
            qkv = module.qkv
            # BEiT / EVA keep the q and k biases apart: inside the projection, as F.linear(x, W,
            # bias), or added to its output in its dtype (qkv_bias_separate), as timm does
            q_bias, k_bias = (b if isinstance(b, torch.Tensor) else None
                              for b in (getattr(module, "q_bias", None), getattr(module, "k_bias", None)))
            separate = bool(getattr(module, "qkv_bias_separate", False))
            if type(qkv) is nn.Linear:     # only the rows of q and k, and q only for the class token
                w, b = qkv.weight, qkv.bias
                q = _project(x[:, :1], w[:inner], None if b is None else b[:inner], q_bias, separate)
                k = _project(x, w[inner:2 * inner], None if b is None else b[inner:2 * inner], k_bias, separate)
            else:                          # a wrapped projection (e.g. low-rank adapters): run it whole
                q, k = qkv(x)[..., :2 * inner].split(inner, -1)
                q = q[:, :1]
                q = q if q_bias is None else (q + q_bias).to(q.dtype)
                k = k if k_bias is None else (k + k_bias).to(k.dtype)
        else:
            q = getattr(module, self.q_name)(x[:, :1])  # [B, 1, inner]
            k = getattr(module, self.k_name)(x)         # [B, T, k_inner]
        projected = k.dtype
        q, k = q.reshape(B, 1, heads, hd), k.reshape(B, T, k_inner // hd, hd)
        # timm's per-head norms act on the last dimension only, so they are applied before
        # the heads move forward (a norm on the transposed view breaks AOTAutograd's backward)
        q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
        if isinstance(q_norm, nn.Module):
            q = q_norm(q)
        if isinstance(k_norm, nn.Module):
            k = k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)       # [B, heads, 1, head_dim], [B, kv_heads, T, head_dim]
        q, k = self._rotate(q, k, inputs, projected)
        if self.kv_heads != heads:                        # key head h // (heads / kv_heads) serves query head h
            k = k.repeat_interleave(heads // self.kv_heads, dim=1)
        logits = (q * self.scale) @ k.transpose(-2, -1)   # [B, heads, 1, T]
        if self.rel_bias:
            index = module.relative_position_index
            if index.shape[-1] != T:
                raise ValueError(f"{self.where} has a relative position bias for {index.shape[-1]} tokens, got "
                                 f"{T}: timm's BEiT takes the image size it was created with")
            logits = logits + module.relative_position_bias_table[index[0]].t()[None, :, None, :]
        for name in ("shared_rel_pos_bias", "relative_position_bias"):   # BEiT's shared bias: timm, transformers 4
            bias = inputs.get(name)
            if isinstance(bias, torch.Tensor):
                logits = logits + bias[..., :1, :]
        mask = inputs.get("attn_mask")
        mask = inputs.get("attention_mask") if mask is None else mask
        if isinstance(mask, torch.Tensor):
            row = mask[..., :1, :] if mask.dim() >= 2 else mask
            logits = logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row
        if inputs.get("is_causal") is True:               # the class token, first, sees itself only
            logits = logits.masked_fill(torch.arange(T, device=logits.device) > 0, float("-inf"))
        low = logits.dtype in (torch.float16, torch.bfloat16)
        return logits.softmax(-1, dtype=torch.float32 if low else None)[:, :, 0]

    def _rotate(self, q, k, inputs, projected):
        """Rotary embeddings on the class query and the keys, as the module applies them."""
        rope, pos = inputs.get("rope"), inputs.get("position_embeddings")
        if rope is not None:              # timm: [..., N, 2 * head_dim] = (sin, cos)
            if not isinstance(self.rope_prefix, int):
                raise TypeError(f"{self.where} was called with a rotary position embedding (rope=) but does not "
                                f"say which tokens it rotates (`num_prefix_tokens`), so ClassAttentionRecorder "
                                f"does not recompute it")
            sin, cos = rope.chunk(2, -1)
            n = self.rope_prefix
            k = torch.cat([k[:, :, :n], _rotated(k[:, :, n:], sin, cos, self.rotate_half).to(k.dtype)], 2)
            if n == 0:
                q = _rotated(q, sin[..., :1, :], cos[..., :1, :], self.rotate_half).to(q.dtype)
            return q.to(projected), k.to(projected)     # timm casts q and k back to v's dtype
        if pos is not None:               # Hugging Face: (cos, sin) [..., N, head_dim] for the last N tokens
            if not self.hf_rope:
                raise TypeError(f"{self.where} was called with rotary position_embeddings, which "
                                f"ClassAttentionRecorder recomputes only for {', '.join(_HF_ROPE)}")
            cos, sin = pos
            n = k.shape[2] - sin.shape[-2]
            k = torch.cat([k[:, :, :n], _rotated(k[:, :, n:], sin, cos, True)], 2)
            if n == 0:
                q = _rotated(q, sin[..., :1, :], cos[..., :1, :], True)
        return q, k


def _project(x, weight, bias, extra_bias, separate: bool) -> torch.Tensor:
    """x W^T + bias + extra_bias: the extra bias inside F.linear (one rounding, as timm's
    F.linear(x, W, cat(q_bias, k_bias, v_bias))), or added to the output in its dtype."""
    if extra_bias is not None and bias is None and not separate:
        return F.linear(x, weight, extra_bias)
    out = F.linear(x, weight, bias)
    return out if extra_bias is None else (out + extra_bias).to(out.dtype)


def _rotated(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, half: bool) -> torch.Tensor:
    """x * cos + rotate(x) * sin, rotating pairs (x[i], x[i + d/2]) (half) or (x[2i], x[2i + 1])."""
    if half:
        x1, x2 = x.chunk(2, -1)
        turned = torch.cat([-x2, x1], -1)
    else:
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return x * cos + turned * sin


def _positional_names(module: nn.Module):
    """Names of the module's forward parameters in order, or None when it takes *args."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD))


def _out_features(linear: nn.Module, where: str) -> int:
    out = getattr(linear, "out_features", None)
    if out is None:
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"{where} ({type(linear).__name__}) must be a linear layer (`out_features` or a "
                            f"2-D `weight`)")
        out = weight.shape[0]
    return int(out)


def class_token_attention(module: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                          **forward_kwargs) -> torch.Tensor:
    """softmax(q_cls k^T * scale + bias) of one attention module (timm or Hugging Face
    layout) for its input x [B, T, dim] -> [B, heads, T], the class-token (first) row of
    every head, in x's dtype (the softmax runs in float32 for float16 / bfloat16).
    ``attn_mask``: an optional boolean (True = attend) or additive mask broadcastable to
    [B, heads, T, T]. ``forward_kwargs``: the other keywords the module is called with
    (timm ``rope=``, ``shared_rel_pos_bias=``, ``is_causal=``; Hugging Face
    ``position_embeddings=``)."""
    layout = _Layout(module, type(module).__name__)
    inputs = dict(forward_kwargs, x=x, attn_mask=attn_mask)
    return layout.class_row(module, inputs).to(x.dtype)


def _hidden_states(args, kwargs) -> torch.Tensor:
    if args:
        return args[0]
    for name in ("hidden_states", "x"):
        if name in kwargs:
            return kwargs[name]
    raise TypeError(f"the attention module was called without a positional input and without hidden_states= "
                    f"or x= (got {sorted(kwargs)})")
