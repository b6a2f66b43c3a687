"""ClassAttentionRecorder: F0 from fused-attention modules equals F0 from materialised weights."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scm_ops import attention_map_from_blocks
from scm_ops.attention import ClassAttentionRecorder


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
    with ClassAttentionRecorder(fused.attns, (3, 5)) as recorder:
        fused(x)
    reference(x)
    rows = torch.stack([a.weights.mean(1)[:, 0, 3:] for a in reference.attns]).sum(0)
    rows = rows - rows.amin(1, keepdim=True)
    expected = (rows / rows.amax(1, keepdim=True)).reshape(2, 3, 5)
    torch.testing.assert_close(recorder.attention_map(), expected, rtol=0, atol=1e-12)


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
    fused, _ = twin_models(torch.float32)
    recorder = ClassAttentionRecorder(fused.attns, (3, 5))
    with pytest.raises(RuntimeError, match="no forward pass"):
        recorder.attention_map()
    with pytest.raises(ValueError, match="tokens"), ClassAttentionRecorder(fused.attns, (4, 5)) as wrong_grid:
        fused(torch.randn(1, 16, 32))
        wrong_grid.attention_map()
