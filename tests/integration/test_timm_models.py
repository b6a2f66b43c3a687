"""ClassAttentionRecorder on real timm models (random initialisation, a few blocks):
F0 against timm's own materialised attention weights, for a plain DeiT-S, a distilled
DeiT-S (2 prefix tokens), a model with a class token and 4 registers, DINOv2, and the Eva
family (DINOv3 with 4 registers, EVA02, the axial and mixed rope ViTs, grouped-query
attention) and BEiT (relative position bias, per block and shared), timm's fused attention
on and off; under bfloat16 autocast; a dynamic image size; the errors a user can hit;
gradients; torch.compile(fullgraph=True).

Needs timm (skipped without it): see tests/integration/README.md for the environment.
"""
import pytest
import torch

timm = pytest.importorskip("timm")

from scm_ops import ClassAttentionRecorder, attention_map_from_blocks  # noqa: E402
from scm_ops.attention import class_token_attention  # noqa: E402

TOL = 1e-4      # on min-max normalised F0 (each measured error is printed; run with -s)


def create(name, **kwargs):
    """timm's model, randomly initialised; the terms timm initialises to zero (BEiT's relative
    position bias tables, the q biases of BEiT and Eva) are drawn too, so that they count."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("relative_position_bias_table", "q_bias")):
                p.normal_(0, 0.5)
    return model


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
    # the Eva family: the rotary embedding comes in as rope= (DINOv3: rotate-half, class token
    # and 4 registers left unrotated; EVA02 and the rope ViTs: interleaved; mixed: per head)
    "dinov3_small": ("vit_small_patch16_dinov3", dict(depth=3), 64, 5, (4, 4), torch.float32),
    "eva02_tiny": ("eva02_tiny_patch14_224", dict(depth=3, img_size=70), 70, 1, (5, 5), torch.float32),
    "rope_axial": ("vit_small_patch16_rope_224", dict(depth=3, img_size=64), 64, 1, (4, 4), torch.float32),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(depth=3, img_size=64), 64, 1, (4, 4), torch.float32),
    "rope_gqa": ("vit_small_patch16_rope_224", dict(depth=3, img_size=64, qkv_fused=False, num_kv_heads=2), 64, 1,
                 (4, 4), torch.float32),
    # BEiT: a relative position bias per block, or one shared by all blocks (shared_rel_pos_bias=)
    "beit": ("beit_base_patch16_224", dict(depth=3, img_size=64, embed_dim=96, num_heads=4), 64, 1, (4, 4),
             torch.float32),
    "beit_shared_bias": ("beit_base_patch16_224", dict(depth=3, img_size=64, embed_dim=96, num_heads=4,
                                                       use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
                         64, 1, (4, 4), torch.float32),
}


@pytest.mark.filterwarnings("ignore:.*pools its tokens")       # Eva and BEiT pool with 'avg' by default
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


# the term each family adds to the logits: the rotary embedding passed as rope=, BEiT's own
# table, or the bias shared by all blocks
POSITION_TERMS = {"dinov3_small": "rope", "eva02_tiny": "rope", "rope_axial": "rope", "rope_mixed": "rope",
                  "rope_gqa": "rope", "beit": "relative_position_bias_table", "beit_shared_bias": "shared_rel_pos_bias"}


@pytest.mark.parametrize("key", sorted(POSITION_TERMS))
def test_the_position_term_is_part_of_the_row(key):
    """class_token_attention with the keywords the block passes equals timm's materialised
    class row; without the position term it does not (so the F0 comparisons can fail)."""
    name, kwargs, size, _, grid, _ = MODELS[key]
    model = create(name, **kwargs)
    attn, term = model.blocks[1].attn, POSITION_TERMS[key]
    seen = {}
    pre = attn.register_forward_pre_hook(lambda m, args, kw: seen.update(x=args[0], kw=dict(kw)), with_kwargs=True)
    set_fused(model, False)
    keep = TimmWeights(model)
    try:
        with torch.no_grad():
            model.forward_features(torch.rand(2, 3, size, size))
    finally:
        pre.remove()
        keep.close()
    expected = keep.weights[1][:, :, 0]                                 # [B, heads, T]
    with torch.no_grad():
        row = class_token_attention(attn, seen["x"], **seen["kw"])
        if term == "relative_position_bias_table":
            table = attn.relative_position_bias_table.clone()
            attn.relative_position_bias_table.zero_()
            without = class_token_attention(attn, seen["x"], **seen["kw"])
            attn.relative_position_bias_table.copy_(table)
        else:
            assert seen["kw"].get(term) is not None
            without = class_token_attention(attn, seen["x"], **{k: v for k, v in seen["kw"].items() if k != term})
    assert row.shape == expected.shape
    torch.testing.assert_close(row, expected, rtol=0, atol=1e-6)        # float32 rows in [0, 1]
    gap = (without - expected).abs().max().item()
    print(f"\ntimm {key}: the class row without {term} is off by {gap:.2e}")
    assert gap > 1e-3


# randomly initialised, DINOv2 attends almost uniformly (see MODELS): its bfloat16 map is noise
AUTOCAST = sorted(k for k in MODELS if MODELS[k][5] == torch.float32)


@pytest.mark.filterwarnings("ignore:.*pools its tokens")
@pytest.mark.parametrize("key", AUTOCAST)
def test_bfloat16_autocast_against_the_materialised_attention(key, check_bfloat16_f0):
    """Under autocast the model forms q, k and its attention in bfloat16. The recorder's
    rows equal the model's materialised class rows up to bfloat16 rounding (the model's
    weights are rounded to 8 bits, 2^-9 relative, and a logit may round one way or the
    other: rtol 2^-7; measured at most 3.8e-3), and, summed in float32, its F0 is within
    0.02 of the float32 model's F0 (measured at most 8.9e-3; the same rows summed in
    bfloat16 are 0.038 to 0.11 off) and no further from it than the map of the model's own
    bfloat16 weights."""
    name, kwargs, size, prefix, grid, _ = MODELS[key]
    model = create(name, **kwargs)
    images = torch.rand(2, 3, size, size)
    recorder = ClassAttentionRecorder.from_model(model)
    with torch.no_grad():
        exact = reference_f0(model, images, grid)                       # float32, materialised
        keep = TimmWeights(model)                                        # fused attention is off
        try:
            with recorder, torch.autocast("cpu", dtype=torch.bfloat16):
                model.forward_features(images)
        finally:
            keep.close()
        f0 = recorder.attention_map()
    check_bfloat16_f0(f"timm {key}", recorder, keep.weights, f0, exact, grid, prefix)


def test_dinov3_any_image_size():
    """DINOv3 takes any multiple of its patch (dynamic_img_size, rope built for the grid)."""
    model = create("vit_small_patch16_dinov3", depth=2)
    with pytest.warns(UserWarning, match="pools its tokens with global_pool='avg'"):
        recorder = ClassAttentionRecorder.from_model(model)
    assert recorder.num_prefix_tokens == 5
    with torch.no_grad(), recorder:
        for size, grid in (((80, 48), (5, 3)), ((96, 96), (6, 6))):
            images = torch.rand(2, 3, *size)
            set_fused(model, True)
            model.forward_features(images)
            f0 = recorder.attention_map()
            err = (f0 - reference_f0(model, images, grid)).abs().max().item()
            print(f"\ntimm dinov3 at {size}: F0 {tuple(f0.shape)}, max abs error {err:.2e}")
            assert f0.shape == (2, *grid) and err < TOL


def test_a_family_not_read_keeps_a_named_error():
    """timm's relative-position ViTs add a bias from a `rel_pos` module: refused by name."""
    model = create("vit_relpos_base_patch16_cls_224", depth=1, embed_dim=64, num_heads=2)
    with pytest.raises(TypeError, match=r"attention_modules\[0\] \(\w+\) adds a relative position bias \(`rel_pos`\)"):
        ClassAttentionRecorder.from_model(model)


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


@pytest.mark.filterwarnings("ignore:.*pools its tokens")
@pytest.mark.parametrize("key, size", [("deit_small_distilled", 224), ("dinov3_small", 64), ("beit", 64)])
def test_compiles_with_fullgraph_and_matches_eager(compiled_f0_error, key, size):
    name, kwargs = MODELS[key][:2]
    err = compiled_f0_error(WithF0(create(name, **dict(kwargs, depth=2))), torch.rand(2, 3, size, size))
    print(f"\ntimm {key} compiled (fullgraph, aot_eager) against eager: F0 max abs error {err:.2e}")
    assert err < 1e-5
