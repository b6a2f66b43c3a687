"""ClassAttentionRecorder on real timm models (random initialisation, a few blocks):
F0 against timm's own materialised attention weights, for a plain DeiT-S, a distilled
DeiT-S (2 prefix tokens), a model with a class token and 4 registers, a dynamic image
size, and timm's fused attention on and off; the errors a user can hit; gradients;
torch.compile(fullgraph=True).

Needs timm (skipped without it): see tests/integration/README.md for the environment.
"""
import pytest
import torch

timm = pytest.importorskip("timm")

from scm_ops import ClassAttentionRecorder, attention_map_from_blocks  # noqa: E402

TOL = 1e-4      # on min-max normalised F0 (each measured error is printed; run with -s)


def create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


def set_fused(model, fused):
    for blk in model.blocks:
        blk.attn.fused_attn = fused


class TimmWeights:
    """timm's own attention weights: with fused attention off, timm forms softmax(q k^T *
    scale) and passes it through attn_drop; a hook on attn_drop keeps its input."""

    def __init__(self, model):
        self.weights = [None] * len(model.blocks)
        self.handles = [blk.attn.attn_drop.register_forward_hook(self._keep(i)) for i, blk in enumerate(model.blocks)]

    def _keep(self, i):
        def hook(module, args, output):
            self.weights[i] = args[0]            # [B, heads, T, T]
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def reference_f0(model, images, grid):
    """F0 from timm's materialised weights (fused attention off for this pass)."""
    set_fused(model, False)
    keep = TimmWeights(model)
    try:
        model.forward_features(images)
    finally:
        keep.close()
    return attention_map_from_blocks(keep.weights, grid, num_prefix_tokens=model.num_prefix_tokens)


MODELS = {   # name: (timm name, create_model arguments, image size, prefix tokens, grid, dtype)
    "deit_small": ("deit_small_patch16_224", dict(depth=3), 224, 1, (14, 14), torch.float32),
    "deit_small_distilled": ("deit_small_distilled_patch16_224", dict(depth=3), 224, 2, (14, 14), torch.float32),
    "deit_small_reg4": ("deit_small_patch16_224", dict(depth=3, reg_tokens=4), 224, 5, (14, 14), torch.float32),
    # randomly initialised, this DINOv2 attends almost uniformly (the class row's patch columns
    # span 1e-4 of their mean), so min-max turns float32 rounding into 1e-3: run in float64
    "vit_small_reg4_dinov2": ("vit_small_patch14_reg4_dinov2", dict(depth=3, img_size=98), 98, 5, (7, 7),
                              torch.float64),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("key", sorted(MODELS))
def test_f0_matches_timms_attention_weights(key, fused):
    name, kwargs, size, prefix, grid, dtype = MODELS[key]
    model = create(name, **kwargs).to(dtype)
    images = torch.rand(2, 3, size, size, dtype=dtype)
    recorder = ClassAttentionRecorder.from_model(model)
    assert recorder.num_prefix_tokens == prefix
    with torch.no_grad():
        expected = reference_f0(model, images, grid)
        set_fused(model, fused)
        with recorder:
            model.forward_features(images)
        f0 = recorder.attention_map()
    assert f0.shape == (2, *grid) and recorder.pass_grid == grid
    err = (f0 - expected).abs().max().item()
    print(f"\ntimm {key} ({'fused' if fused else 'unfused'} attention): F0 max abs error {err:.2e}")
    assert err < TOL


def test_dynamic_image_size_reads_the_grid_per_pass_and_a_fixed_grid_is_checked():
    model = create("deit_small_patch16_224", depth=2, dynamic_img_size=True)
    recorder = ClassAttentionRecorder.from_model(model)
    with torch.no_grad(), recorder:
        for size, grid in (((288, 288), (18, 18)), ((224, 160), (14, 10))):
            images = torch.rand(2, 3, *size)
            model.forward_features(images)
            f0 = recorder.attention_map()
            expected = reference_f0(model, images, grid)
            set_fused(model, True)
            err = (f0 - expected).abs().max().item()
            print(f"\ntimm deit_small dynamic size {size}: F0 {tuple(f0.shape)}, max abs error {err:.2e}")
            assert f0.shape == (2, *grid) and err < TOL
    # 288 px with the 224 px grid: 1 + 324 tokens are not 1 + 14 * 14, an error rather than the last 196
    fixed = ClassAttentionRecorder.from_model(model, grid_size=(14, 14))
    with torch.no_grad(), fixed:
        model.forward_features(torch.rand(1, 3, 288, 288))
    with pytest.raises(ValueError, match=r"325 tokens, but num_prefix_tokens \+ H \* W = 1 \+ 14 \* 14 = 197"):
        fixed.attention_map()


def test_model_without_class_token_is_refused():
    model = create("vit_little_patch16_reg4_gap_256", depth=1)
    with pytest.raises(ValueError, match=r"has no class token \(has_class_token=False, global_pool='avg', 4 register"):
        ClassAttentionRecorder.from_model(model)


def test_gradients_reach_the_attention_weights_as_through_the_materialised_weights():
    model = create("deit_small_distilled_patch16_224", depth=2).double()
    images = torch.rand(2, 3, 224, 224, dtype=torch.float64)
    weight = torch.randn(2, 14, 14, dtype=torch.float64)
    set_fused(model, True)
    with ClassAttentionRecorder.from_model(model) as recorder:
        model.forward_features(images)
        (recorder.attention_map() * weight).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    (reference_f0(model, images, (14, 14)) * weight).sum().backward()
    for i in range(2):
        assert got[f"blocks.{i}.attn.qkv.weight"].abs().sum() > 0
    for n, p in model.named_parameters():
        if p.grad is None:
            assert n not in got, n
            continue
        torch.testing.assert_close(got[n], p.grad, rtol=1e-7, atol=1e-10, msg=n)


class WithF0(torch.nn.Module):
    def __init__(self, vit):
        super().__init__()
        self.vit = vit
        self.recorder = ClassAttentionRecorder.from_model(vit).open()   # once, before compiling

    def forward(self, images):
        tokens = self.vit.forward_features(images)
        return tokens[:, 0], self.recorder.attention_map()


def test_compiles_with_fullgraph_and_matches_eager(compiled_f0_error):
    err = compiled_f0_error(WithF0(create("deit_small_distilled_patch16_224", depth=2)), torch.rand(2, 3, 224, 224))
    print(f"\ntimm deit_small_distilled compiled (fullgraph, aot_eager) against eager: F0 max abs error {err:.2e}")
    assert err < 1e-5
