"""ClassAttentionRecorder: F0 from fused-attention modules (timm's layout and Hugging Face's)
equals F0 from materialised weights; attention_map_from_blocks; the model-level recorder
under torch.compile(fullgraph=True); rows and sums in float32 under float16 / bfloat16
autocast; timm's rope= keyword, additive bias keywords, and the position terms refused.
The same against the real timm and transformers packages: tests/integration/."""
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scm_ops
from scm_ops import attention_map_from_blocks
from scm_ops.attention import ClassAttentionRecorder, class_token_attention
from scm_ops.diffusion import minmax_normalize


class FusedAttention(nn.Module):
    """Laid out as timm's Attention: qkv, num_heads, scale, q_norm / k_norm, fused SDPA."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.weights = None   # set only by the materialising reference below

    def qkv_heads(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(y.transpose(1, 2).flatten(2))


class MaterialisingAttention(FusedAttention):
    """The reference: the same module, forming softmax(q k^T * scale) and keeping it."""

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        self.weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)   # [B, heads, T, T]
        return self.proj((self.weights @ v).transpose(1, 2).flatten(2))


class ViT(nn.Module):
    def __init__(self, attention, dim=32, depth=3, heads=4, prefix=1, grid=(3, 5), qk_norm=False):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(1, prefix + grid[0] * grid[1], dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attns = nn.ModuleList(attention(dim, heads, qk_norm) for _ in range(depth))

    def forward(self, x):
        x = x + self.tokens
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        return x


def twin_models(dtype, qk_norm=False, grid=(3, 5)):
    fused = ViT(FusedAttention, qk_norm=qk_norm, grid=grid).to(dtype)
    reference = ViT(MaterialisingAttention, qk_norm=qk_norm, grid=grid).to(dtype)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


# Measured worst differences over 20 seeds: float64 1.6e-15, float32 9.5e-7 (the same softmax
# formula on both sides; fused attention changes only the later blocks' inputs, by rounding).
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 2e-14), (torch.float32, 1e-5)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_f0_equals_the_materialised_weights_version(dtype, tol, qk_norm):
    fused, reference = twin_models(dtype, qk_norm)
    x = torch.randn(2, 16, 32, dtype=dtype)
    with torch.no_grad():
        with ClassAttentionRecorder(fused.attns, (3, 5)) as recorder:
            out = fused(x)
            f0 = recorder.attention_map()
        ref_out = reference(x)
    expected = attention_map_from_blocks([a.weights for a in reference.attns], (3, 5))
    assert f0.shape == (2, 3, 5) and f0.dtype == dtype
    torch.testing.assert_close(out, ref_out, rtol=0, atol=100 * tol)   # the twins are the same model
    torch.testing.assert_close(f0, expected, rtol=0, atol=tol)


def test_extra_prefix_tokens_are_left_out():
    fused = ViT(FusedAttention, prefix=3).double()
    reference = ViT(MaterialisingAttention, prefix=3).double()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 18, 32, dtype=torch.float64)
    with ClassAttentionRecorder(fused.attns, (3, 5), num_prefix_tokens=3) as recorder:
        fused(x)
    reference(x)
    rows = torch.stack([a.weights.mean(1)[:, 0, 3:] for a in reference.attns]).sum(0)
    rows = rows - rows.amin(1, keepdim=True)
    expected = (rows / rows.amax(1, keepdim=True)).reshape(2, 3, 5)
    torch.testing.assert_close(recorder.attention_map(), expected, rtol=0, atol=1e-12)
    weights = [a.weights for a in reference.attns]
    torch.testing.assert_close(attention_map_from_blocks(weights, (3, 5), num_prefix_tokens=3), expected,
                               rtol=0, atol=1e-12)
    # the prefix count is part of the check: 18 tokens are neither 1 + 15 nor 3 + 16
    with pytest.raises(ValueError, match=r"18 tokens.*1 \+ 3 \* 5 = 16"):
        recorder_with(fused, x, (3, 5), 1)
    with pytest.raises(ValueError, match=r"18 tokens.*1 \+ 3 \* 5 = 16"):
        attention_map_from_blocks(weights, (3, 5))


def recorder_with(model, x, grid, prefix):
    with ClassAttentionRecorder(model.attns, grid, num_prefix_tokens=prefix) as recorder:
        model(x)
    return recorder.attention_map()


def test_hooks_are_removed_and_the_latest_pass_is_kept():
    fused, _ = twin_models(torch.float64)
    x1, x2 = torch.randn(2, 1, 16, 32, dtype=torch.float64)
    recorder = ClassAttentionRecorder(fused.attns, (3, 5))
    with recorder:
        assert all(len(a._forward_hooks) == 1 for a in fused.attns)
        fused(x1)
        first = recorder.attention_map()
        fused(x2)
        second = recorder.attention_map()
    assert all(len(a._forward_hooks) == 0 for a in fused.attns)
    fused(x1)                                   # not recorded any more
    torch.testing.assert_close(recorder.attention_map(), second)
    assert not torch.allclose(first, second)


def test_gradients_reach_the_model_like_the_reference():
    fused, reference = twin_models(torch.float64, qk_norm=True)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    weight = torch.randn(2, 3, 5, dtype=torch.float64)
    with ClassAttentionRecorder(fused.attns, (3, 5)) as recorder:
        fused(x)
        (recorder.attention_map() * weight).sum().backward()
    reference(x)
    (attention_map_from_blocks([a.weights for a in reference.attns], (3, 5)) * weight).sum().backward()
    grads = dict(fused.named_parameters())
    for name, p in reference.named_parameters():
        if p.grad is None:          # the last block's projection does not reach F0
            assert grads[name].grad is None, name
            continue
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert grads["attns.0.qkv.weight"].grad.abs().sum() > 0


def test_bad_modules_and_missing_passes_are_named():
    with pytest.raises(TypeError, match="qkv"):
        ClassAttentionRecorder([nn.Linear(4, 4)], (2, 2))
    with pytest.raises(ValueError, match="empty"):
        ClassAttentionRecorder([], (2, 2))
    rotary = FusedAttention(32, 4)
    rotary.rope = nn.Identity()                 # logits the recorder would not reproduce
    with pytest.raises(TypeError, match="rotary position embedding"):
        ClassAttentionRecorder([rotary], (3, 5))
    fused, _ = twin_models(torch.float32)
    recorder = ClassAttentionRecorder(fused.attns, (3, 5))
    with pytest.raises(RuntimeError, match="no forward pass"):
        recorder.attention_map()
    with pytest.raises(ValueError, match=r"16 tokens, but num_prefix_tokens \+ H \* W = 1 \+ 4 \* 5 = 21"), \
            ClassAttentionRecorder(fused.attns, (4, 5)) as wrong_grid:
        fused(torch.randn(1, 16, 32))
        wrong_grid.attention_map()
    with pytest.raises(ValueError, match="no class token"):
        ClassAttentionRecorder(fused.attns, (3, 5), num_prefix_tokens=0)
    with pytest.raises(ValueError, match="no grid_size"), ClassAttentionRecorder(fused.attns) as no_grid:
        fused(torch.randn(1, 16, 32))
        no_grid.attention_map()
    assert no_grid.attention_map(grid_size=(3, 5)).shape == (1, 3, 5)     # a grid per pass
    with pytest.raises(RuntimeError, match="already recording"), ClassAttentionRecorder(fused.attns, 3) as twice:
        twice.open()


# ----------------------------------------------------------------------------- Hugging Face layout
class HFAttention(nn.Module):
    """Laid out as transformers' ViT / DeiT attention: separate projections, heads in the
    config, `scaling`; fused SDPA (weights never formed) or eager (weights returned).
    `names` picks transformers 5's (q_proj, k_proj, v_proj) or 4's (query, key, value)."""

    def __init__(self, dim, num_heads, names=("q_proj", "k_proj", "v_proj"), eager=False):
        super().__init__()
        self.config = types.SimpleNamespace(num_attention_heads=num_heads)
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.names, self.eager = names, eager
        for n in names:
            setattr(self, n, nn.Linear(dim, dim))
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, hidden_states, attention_mask=None):
        B, T, D = hidden_states.shape
        q, k, v = (getattr(self, n)(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2) for n in self.names)
        if self.eager:
            logits = (q @ k.transpose(-2, -1)) * self.scaling
            if attention_mask is not None:
                logits = logits + attention_mask
            weights = logits.softmax(-1)
            y = weights @ v
        else:
            y, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scaling), None
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D)), weights


class HFViT(nn.Module):
    """Pre-norm layers calling attention positionally or with hidden_states=; returns the
    tokens and the eager weights (a tuple, empty when the attention is fused)."""

    def __init__(self, dim=32, depth=3, heads=4, prefix=2, grid=(3, 5), keyword=False, **kwargs):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(1, prefix + grid[0] * grid[1], dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attns = nn.ModuleList(HFAttention(dim, heads, **kwargs) for _ in range(depth))
        self.keyword = keyword

    def forward(self, x, attention_mask=None):
        x, weights = x + self.tokens, []
        for norm, attn in zip(self.norms, self.attns):
            h = norm(x)
            y, w = attn(hidden_states=h, attention_mask=attention_mask) if self.keyword else attn(h, attention_mask)
            x = x + y
            if w is not None:
                weights.append(w)
        return x, tuple(weights)


@pytest.mark.parametrize("names", [("q_proj", "k_proj", "v_proj"), ("query", "key", "value")])
@pytest.mark.parametrize("keyword", [False, True])
def test_hugging_face_layout_equals_its_eager_weights(names, keyword):
    fused = HFViT(names=names, keyword=keyword).double()
    eager = HFViT(names=names, keyword=keyword, eager=True).double()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    with torch.no_grad(), ClassAttentionRecorder(fused.attns, (3, 5), num_prefix_tokens=2) as recorder:
        out, no_weights = fused(x)
        ref_out, weights = eager(x)
    assert no_weights == () and len(weights) == 3
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    expected = attention_map_from_blocks(weights, (3, 5), num_prefix_tokens=2)
    torch.testing.assert_close(recorder.attention_map(), expected, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        attention_map_from_blocks(no_weights, (3, 5), num_prefix_tokens=2)


def test_attention_masks_are_applied_to_the_row():
    """An additive mask (Hugging Face) and a boolean one (timm's attn_mask=) on the keys."""
    fused, eager = HFViT().double(), HFViT(eager=True).double()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    keep = torch.rand(2, 1, 1, 17) > 0.3
    keep[..., 0] = True
    additive = torch.zeros(2, 1, 17, 17, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    with torch.no_grad(), ClassAttentionRecorder(fused.attns, (3, 5), num_prefix_tokens=2) as recorder:
        fused(x, additive)
        _, weights = eager(x, additive)
    torch.testing.assert_close(recorder.attention_map(),
                               attention_map_from_blocks(weights, (3, 5), num_prefix_tokens=2), rtol=0, atol=1e-13)
    module, h = fused.attns[0], torch.randn(2, 17, 32, dtype=torch.float64)
    torch.testing.assert_close(class_token_attention(module, h, keep.expand(2, 1, 17, 17)),
                               class_token_attention(module, h, additive), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the default scale
class NoScaleAttention(FusedAttention):
    """timm's layout without a `scale` attribute (SDPA's default scale, 1 / sqrt(head_dim)):
    the recorder must use 1 / sqrt(head_dim) too."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__(dim, num_heads, qk_norm)
        del self.scale

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_default_scale_is_one_over_sqrt_head_dim():
    dim, heads = 64, 8                     # head_dim 8: 1/sqrt(8) = 0.354, against 1/sqrt(64) = 0.125
    module = NoScaleAttention(dim, heads).double()
    assert not hasattr(module, "scale")
    x = torch.randn(3, 17, dim, dtype=torch.float64) * 3
    q, k, _ = module.qkv(x).reshape(3, 17, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)

    def row(scale):                         # recomputed independently, from the full weights
        return torch.softmax((q @ k.transpose(-2, -1)) * scale, -1)[:, :, 0]   # [B, heads, T]

    got = class_token_attention(module, x)
    torch.testing.assert_close(got, row(1 / math.sqrt(dim // heads)), rtol=0, atol=1e-14)
    assert (got - row(1 / math.sqrt(dim))).abs().max() > 1e-2      # the other convention is far off
    with ClassAttentionRecorder([module], (4, 4)) as recorder:
        module(x)
    f = row(1 / math.sqrt(dim // heads)).mean(1)[:, 1:]
    f = (f - f.amin(1, keepdim=True)) / (f - f.amin(1, keepdim=True)).amax(1, keepdim=True)
    torch.testing.assert_close(recorder.attention_map(), f.reshape(3, 4, 4), rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- attention_map_from_blocks
def test_attention_map_from_blocks_prefix_and_errors():
    attn = torch.softmax(torch.randn(2, 3, 4, 8, 8, dtype=torch.float64), -1)    # 2 prefix + 2 x 3
    f0 = attention_map_from_blocks(attn, (2, 3), num_prefix_tokens=2)
    expected = attn.mean(2).sum(0)[:, 0, 2:].reshape(3, 2, 3)
    expected = expected - expected.amin((1, 2), keepdim=True)
    torch.testing.assert_close(f0, expected / expected.amax((1, 2), keepdim=True), rtol=0, atol=1e-15)
    assert scm_ops.attention_map_from_blocks is attention_map_from_blocks
    with pytest.raises(ValueError, match=r'empty sequence.*attn_implementation="eager".*ClassAttentionRecorder'):
        attention_map_from_blocks((), (2, 3))
    with pytest.raises(ValueError, match=r"None entries.*attn_implementation"):
        attention_map_from_blocks((None, None), (2, 3))
    with pytest.raises(ValueError, match=r"8 tokens, but num_prefix_tokens \+ H \* W = 1 \+ 2 \* 3 = 7"):
        attention_map_from_blocks(attn, (2, 3))
    with pytest.raises(ValueError, match="no class token"):
        attention_map_from_blocks(attn, (2, 4), num_prefix_tokens=0)
    with pytest.raises(ValueError, match=r"\[blocks, B, heads, T, T\]"):
        attention_map_from_blocks(attn[0], (2, 3), num_prefix_tokens=2)


# ----------------------------------------------------------------------------- from_model
class PatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.patch_size = (patch, patch)
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmLikeViT(nn.Module):
    """The attributes from_model reads of timm's VisionTransformer: blocks[i].attn,
    patch_embed, num_prefix_tokens, has_class_token, global_pool, num_reg_tokens; any
    image size (as timm's dynamic_img_size, without position embeddings)."""

    def __init__(self, dim=32, heads=4, depth=2, patch=4, class_token=True, registers=0):
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch)
        self.has_class_token, self.num_reg_tokens = class_token, registers
        self.num_prefix_tokens = int(class_token) + registers
        self.global_pool = "token" if class_token else "avg"
        self.prefix = nn.Parameter(torch.randn(1, self.num_prefix_tokens, dim))
        self.blocks = nn.ModuleList(nn.Module() for _ in range(depth))
        for blk in self.blocks:
            blk.norm, blk.attn = nn.LayerNorm(dim), FusedAttention(dim, heads)

    def forward(self, images):
        x = torch.cat([self.prefix.expand(len(images), -1, -1), self.patch_embed(images)], 1)
        for blk in self.blocks:
            x = x + blk.attn(blk.norm(x))
        return x


def test_from_model_reads_prefix_and_grid_and_refuses_no_class_token():
    model = TimmLikeViT(registers=4).double()
    recorder = ClassAttentionRecorder.from_model(model)
    assert recorder.num_prefix_tokens == 5 and recorder.modules == [b.attn for b in model.blocks]
    with recorder, torch.no_grad():
        for size in ((16, 24), (12, 12)):           # the grid is read at each pass
            images = torch.rand(2, 3, *size, dtype=torch.float64)
            x = model(images)
            f0 = recorder.attention_map()
            assert f0.shape == (2, size[0] // 4, size[1] // 4)
    h = torch.cat([model.prefix.expand(2, -1, -1), model.patch_embed(images)], 1)
    rows = []
    for blk in model.blocks:
        rows.append(class_token_attention(blk.attn, blk.norm(h)).mean(1)[:, 5:])
        h = h + blk.attn(blk.norm(h))
    f = torch.stack(rows).sum(0)
    f = (f - f.amin(1, keepdim=True)) / (f - f.amin(1, keepdim=True)).amax(1, keepdim=True)
    torch.testing.assert_close(f0, f.reshape(2, 3, 3).detach(), rtol=0, atol=1e-13)
    assert torch.equal(x, h)
    fixed = ClassAttentionRecorder.from_model(model, grid_size=(4, 6))   # a fixed grid is checked
    with fixed, pytest.raises(ValueError, match=r"14 tokens, but num_prefix_tokens \+ H \* W = 5 \+ 4 \* 6"):
        model(images)
        fixed.attention_map()
    with pytest.raises(ValueError, match=r"no class token \(has_class_token=False, global_pool='avg', 4 register"):
        ClassAttentionRecorder.from_model(TimmLikeViT(class_token=False, registers=4))
    with pytest.raises(TypeError, match="from_model reads timm VisionTransformer / Eva / Beit and Hugging Face"):
        ClassAttentionRecorder.from_model(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- torch.compile
class WithF0(nn.Module):
    """The model-level way: the recorder is opened once, in __init__, before compiling."""

    def __init__(self, vit, grid, prefix):
        super().__init__()
        self.vit = vit
        self.recorder = ClassAttentionRecorder(vit.attns, grid, num_prefix_tokens=prefix).open()

    def forward(self, x):
        out = self.vit(x)
        tokens = out[0] if isinstance(out, tuple) else out
        return tokens.mean(-1), self.recorder.attention_map()


@pytest.mark.parametrize("layout", ["timm", "hugging_face"])
def test_compiles_with_fullgraph_and_matches_eager(layout):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward
    through AOTAutograd (the graph Inductor would get) without the C++ compile."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    vit, prefix = (ViT(FusedAttention, qk_norm=True), 1) if layout == "timm" else (HFViT(keyword=True), 2)
    model = WithF0(vit, (3, 5), prefix)
    x = torch.randn(2, prefix + 15, 32)
    tokens, f0 = model(x)
    grads = torch.autograd.grad(f0.square().sum(), list(vit.parameters()), allow_unused=True)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for _ in range(3):                      # one graph, no recompilation on later passes
        c_tokens, c_f0 = compiled(x)
    c_grads = torch.autograd.grad(c_f0.square().sum(), list(vit.parameters()), allow_unused=True)
    assert backend.frame_count == 1
    # measured: 0 (aot_eager runs the same kernels in the same order)
    torch.testing.assert_close(c_f0, f0, rtol=0, atol=1e-6)
    torch.testing.assert_close(c_tokens, tokens, rtol=0, atol=1e-6)
    for p, g, c in zip(vit.parameters(), grads, c_grads):    # unused: None in eager, None or 0 compiled
        zero = torch.zeros_like(p)
        torch.testing.assert_close(zero if c is None else c, zero if g is None else g, rtol=1e-5, atol=1e-6)
    assert any(c is not None and c.abs().sum() > 0 for c in c_grads)      # F0 reaches the projections
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- mixed precision
def near_flat(model):
    """Small q / k weights: near-uniform attention, as a randomly initialised ViT has (the
    class row's patch columns then differ by a few percent of their mean)."""
    with torch.no_grad():
        for attn in model.attns:
            attn.qkv.weight[:64] *= 0.1
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_rows_and_f0_are_float32(dtype):
    """Under autocast the model forms q, k and its attention in low precision; the recorder
    keeps its rows, their head mean, block sum and min-max in float32. Measured over seeds
    0-19: F0 within 8.3e-3 (bfloat16) / 1.4e-3 (float16) of the float32 model's F0, while
    summing the same rows in bfloat16 / float16 moves it by 0.65-1.0 / 0.075-0.18.
    Tolerances: 0.02 / 3e-3. The rows equal the model's own low-precision class rows to
    rtol = eps (its weights are rounded to eps / 2; measured 4.0e-3 / 5.0e-4)."""
    tol = {torch.bfloat16: 0.02, torch.float16: 3e-3}[dtype]
    torch.manual_seed(0)
    fused, reference = twin_models(torch.float32)
    near_flat(fused), reference.load_state_dict(fused.state_dict())
    x = torch.randn(4, 16, 32)
    with torch.no_grad():
        reference(x)
        exact = attention_map_from_blocks([a.weights for a in reference.attns], (3, 5))
        with ClassAttentionRecorder(fused.attns, (3, 5)) as recorder, torch.autocast("cpu", dtype=dtype):
            fused(x)
            reference(x)                                   # the materialised attention under autocast
        f0 = recorder.attention_map()
    assert all(r.dtype == torch.float32 for r in recorder.rows) and f0.dtype == torch.float32
    weights = [a.weights for a in reference.attns]
    assert weights[0].dtype == dtype
    for row, w in zip(recorder.rows, weights):
        torch.testing.assert_close(row, w[:, :, 0].float(), rtol=torch.finfo(dtype).eps, atol=0)
    err = (f0 - exact).abs().max().item()
    low_sum = torch.stack([r.to(dtype).mean(1) for r in recorder.rows]).sum(0)[:, 1:].reshape(-1, 3, 5)
    control = (minmax_normalize(low_sum, (1, 2)).float() - exact).abs().max().item()
    assert err < tol < control
    # attention_map_from_blocks sums low-precision weights in float32 too, and returns their dtype
    from_weights = attention_map_from_blocks(weights, (3, 5))
    assert from_weights.dtype == dtype
    torch.testing.assert_close(from_weights.float(), attention_map_from_blocks([w.float() for w in weights], (3, 5)),
                               rtol=0, atol=torch.finfo(dtype).eps)


# ----------------------------------------------------------------------------- rotary embeddings
def rotate(x, sin, cos, half):
    """The rotation written out per pair of dimensions, independently of the recorder's."""
    d = x.shape[-1]
    pairs = [(i, i + d // 2) for i in range(d // 2)] if half else [(2 * i, 2 * i + 1) for i in range(d // 2)]
    out = x.clone()
    for a, b in pairs:
        out[..., a] = x[..., a] * cos[..., a] - x[..., b] * sin[..., a]
        out[..., b] = x[..., b] * cos[..., b] + x[..., a] * sin[..., b]
    return out


class RopeAttention(FusedAttention):
    """Laid out as timm's EvaAttention: the rotary embedding comes in as rope= [N, 2 *
    head_dim] (sin, cos), rotating the tokens after num_prefix_tokens; materialises its weights."""

    def __init__(self, dim, num_heads, prefix, half):
        super().__init__(dim, num_heads)
        self.num_prefix_tokens, self.rotate_half = prefix, half

    def forward(self, x, rope=None):
        q, k, v = self.qkv_heads(x)
        n = self.num_prefix_tokens
        sin, cos = rope.chunk(2, -1)
        q = torch.cat([q[:, :, :n], rotate(q[:, :, n:], sin, cos, self.rotate_half)], 2)
        k = torch.cat([k[:, :, :n], rotate(k[:, :, n:], sin, cos, self.rotate_half)], 2)
        self.weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((self.weights @ v).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("half", [False, True], ids=["interleaved", "rotate_half"])
@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_rope_keyword_is_applied_as_the_module_applies_it(prefix, half):
    torch.manual_seed(0)
    attn = RopeAttention(32, 4, prefix, half).double()
    T = 1 + 15 if prefix == 0 else prefix + 15
    x = torch.randn(2, T, 32, dtype=torch.float64)
    angles = torch.randn(T - prefix, 4, dtype=torch.float64) * 3
    freqs = (angles.repeat_interleave(2, -1) if not half else angles.repeat(1, 2))   # [N, head_dim]
    rope = torch.cat([freqs.sin(), freqs.cos()], -1)
    with ClassAttentionRecorder([attn], (3, 5), num_prefix_tokens=max(prefix, 1)) as recorder:
        attn(x, rope=rope)
    torch.testing.assert_close(recorder.rows[0], attn.weights[:, :, 0], rtol=0, atol=1e-14)
    attn(x, rope)                                            # positionally: read by the parameter's name
    torch.testing.assert_close(class_token_attention(attn, x, rope=rope), attn.weights[:, :, 0], rtol=0, atol=1e-14)
    assert (class_token_attention(attn, x) - attn.weights[:, :, 0]).abs().max() > 1e-2   # the rope counts


def test_position_terms_the_recorder_does_not_recompute_are_named():
    module = HFAttention(32, 4)
    cos, sin = torch.ones(15, 8), torch.zeros(15, 8)
    with pytest.raises(TypeError, match=r"position_embeddings, which ClassAttentionRecorder recomputes only for "
                                        r"DINOv3ViTAttention"):
        class_token_attention(module, torch.randn(1, 16, 32), position_embeddings=(cos, sin))
    with pytest.raises(TypeError, match=r"rope=\) but does not say which tokens it rotates"):
        class_token_attention(FusedAttention(32, 4), torch.randn(1, 16, 32), rope=torch.randn(15, 16))
    table = FusedAttention(32, 4)
    table.relative_position_bias_table = nn.Parameter(torch.zeros(10, 4))      # no index: not BEiT's layout
    with pytest.raises(TypeError, match="laid out otherwise than timm's BEiT"):
        ClassAttentionRecorder([table], (3, 5))


def test_additive_bias_keywords_are_added_to_the_row():
    """BEiT's bias shared by all blocks: timm's shared_rel_pos_bias=, transformers 4's
    relative_position_bias=; both are added to the logits as an additive mask is."""
    module, x = HFAttention(32, 4).double(), torch.randn(2, 17, 32, dtype=torch.float64)
    bias = torch.randn(1, 4, 17, 17, dtype=torch.float64)
    expected = class_token_attention(module, x, bias)
    assert (expected - class_token_attention(module, x)).abs().max() > 1e-2
    for name in ("shared_rel_pos_bias", "relative_position_bias"):
        torch.testing.assert_close(class_token_attention(module, x, **{name: bias}), expected, rtol=0, atol=1e-15)
