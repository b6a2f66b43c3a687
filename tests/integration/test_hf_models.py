"""ClassAttentionRecorder on real Hugging Face transformers ViT, DeiT, DINOv2 (with and
without registers) and DINOv3 (random initialisation from small configs): F0 with sdpa and eager attention against the eager
model's own output_attentions=True weights; the classification wrappers; DINOv3's rotary
position embeddings, class token and 4 registers, at any image size; under bfloat16
autocast; BEiT's relative position bias (passed in the attention mask); another image size
through interpolate_pos_encoding; the errors a user can hit; gradients;
torch.compile(fullgraph=True).

Needs transformers (skipped without it): see tests/integration/README.md.
"""
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scm_ops import ClassAttentionRecorder, attention_map_from_blocks  # noqa: E402
from scm_ops.attention import class_token_attention  # noqa: E402

TOL = 1e-4      # on min-max normalised F0 (each measured error is printed; run with -s)
CONFIG = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=224,
              patch_size=16)
KINDS = {"vit": ("ViTConfig", "ViTModel", "ViTForImageClassification", 1),
         "deit": ("DeiTConfig", "DeiTModel", "DeiTForImageClassification", 2)}


def create(kind, attn_implementation, wrapper=False, **overrides):
    config_cls, model_cls, wrapper_cls, _ = KINDS[kind]
    config = getattr(transformers, config_cls)(**dict(CONFIG, **overrides), attn_implementation=attn_implementation)
    torch.manual_seed(0)
    cls = getattr(transformers, wrapper_cls if wrapper else model_cls)
    model = cls(config) if wrapper else cls(config, add_pooling_layer=False)
    return model.eval()


def eager_twin(model):
    """The same weights, eager attention: its output_attentions=True weights are the reference."""
    pooling = "add_pooling_layer" in inspect.signature(type(model).__init__).parameters
    twin = type(model)(model.config.__class__(**{**model.config.to_dict(), "attn_implementation": "eager"}),
                       **({"add_pooling_layer": False} if pooling else {}))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.mark.parametrize("wrapper", [False, True], ids=["model", "for_image_classification"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_f0_matches_the_eager_attention_weights(kind, impl, wrapper):
    prefix = KINDS[kind][3]
    model = create(kind, impl, wrapper)
    assert model.config._attn_implementation == impl
    images = torch.randn(2, 3, 224, 224)
    recorder = ClassAttentionRecorder.from_model(model)
    assert recorder.num_prefix_tokens == prefix and len(recorder.modules) == 3
    with torch.no_grad():
        with recorder:
            out = model(pixel_values=images, output_attentions=True)
        f0 = recorder.attention_map()
        expected = attention_map_from_blocks(eager_twin(model)(pixel_values=images, output_attentions=True).attentions,
                                             (14, 14), num_prefix_tokens=prefix)
    err = (f0 - expected).abs().max().item()
    print(f"\nHF {kind} {'ForImageClassification' if wrapper else 'Model'} ({impl}): F0 max abs error {err:.2e}")
    assert f0.shape == (2, 14, 14) and err < TOL
    if impl == "sdpa":       # sdpa returns no weights: the error says what to do
        assert not out.attentions
        with pytest.raises(ValueError, match='attn_implementation="eager"'):
            attention_map_from_blocks(out.attentions, (14, 14), num_prefix_tokens=prefix)
    else:
        torch.testing.assert_close(attention_map_from_blocks(out.attentions, (14, 14), num_prefix_tokens=prefix),
                                   expected, rtol=0, atol=0)


def test_another_image_size_and_a_mismatched_grid():
    model = create("deit", "sdpa")
    images = torch.randn(2, 3, 288, 288)
    with torch.no_grad(), ClassAttentionRecorder.from_model(model) as recorder:
        model(pixel_values=images, interpolate_pos_encoding=True)
    f0 = recorder.attention_map()
    with torch.no_grad():
        weights = eager_twin(model)(pixel_values=images, interpolate_pos_encoding=True,
                                    output_attentions=True).attentions
    err = (f0 - attention_map_from_blocks(weights, (18, 18), num_prefix_tokens=2)).abs().max().item()
    print(f"\nHF deit 288 px (interpolated positions): F0 {tuple(f0.shape)}, max abs error {err:.2e}")
    assert f0.shape == (2, 18, 18) and err < TOL
    with pytest.raises(ValueError, match=r"326 tokens, but num_prefix_tokens \+ H \* W = 2 \+ 14 \* 14 = 198"):
        recorder.attention_map(grid_size=(14, 14))
    with pytest.raises(ValueError, match=r"326 tokens, but num_prefix_tokens \+ H \* W = 2 \+ 14 \* 14 = 198"):
        attention_map_from_blocks(weights, (14, 14), num_prefix_tokens=2)
    with pytest.raises(ValueError, match=r"326 tokens, but num_prefix_tokens \+ H \* W = 1 \+ 18 \* 18 = 325"):
        attention_map_from_blocks(weights, (18, 18))           # a distilled DeiT has 2 prefix tokens


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gradients_reach_the_attention_weights_as_through_the_eager_weights(kind):
    model = create(kind, "sdpa").double()
    twin = eager_twin(model).double()
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    weight = torch.randn(2, 14, 14, dtype=torch.float64)
    with ClassAttentionRecorder.from_model(model) as recorder:
        model(pixel_values=images)
        (recorder.attention_map() * weight).sum().backward()
    attentions = twin(pixel_values=images, output_attentions=True).attentions
    (attention_map_from_blocks(attentions, (14, 14), num_prefix_tokens=KINDS[kind][3]) * weight).sum().backward()
    twin_grads = dict(twin.named_parameters())
    scale = max(p.grad.abs().max().item() for p in twin.parameters() if p.grad is not None)
    for n, p in model.named_parameters():
        if "q_proj" in n or "k_proj" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        ref = twin_grads[n].grad
        if p.grad is None or ref is None:
            assert (p.grad is None or p.grad.abs().max() == 0) and (ref is None or ref.abs().max() == 0), n
            continue
        # transformers' eager attention takes its softmax in float32 even for float64 models, so
        # the reference carries float32 rounding (measured: at most 1.2e-6 of a tensor's largest
        # gradient; k_proj.bias, whose exact gradient is 0, gets 1e-15 here and float32 noise,
        # 6e-7, in the reference): tolerances relative to the largest gradient of the model
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_with_and_without_registers(registers):
    config_cls, model_cls = ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel") if registers else \
        ("Dinov2Config", "Dinov2Model")
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**dict(CONFIG, image_size=56, patch_size=14), attn_implementation="eager",
                                               **({"num_register_tokens": registers} if registers else {}))
    model = getattr(transformers, model_cls)(config).eval()
    recorder = ClassAttentionRecorder.from_model(model)
    assert recorder.num_prefix_tokens == 1 + registers
    with torch.no_grad(), recorder:
        weights = model(pixel_values=torch.randn(2, 3, 56, 56), output_attentions=True).attentions
    err = (recorder.attention_map() - attention_map_from_blocks(weights, (4, 4), 1 + registers)).abs().max().item()
    print(f"\nHF {model_cls}: F0 max abs error {err:.2e}")
    assert err < TOL


DINOV3 = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=64,
              patch_size=16, num_register_tokens=4)


def create_dinov3(attn_implementation):
    torch.manual_seed(0)
    config = transformers.DINOv3ViTConfig(**DINOV3, attn_implementation=attn_implementation)
    return transformers.DINOv3ViTModel(config).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dinov3_f0_matches_the_eager_attention_weights_at_any_size(impl):
    """Rotary position embeddings on the patches only (class token and 4 registers left
    unrotated), at the config's size and at two others (the rope is built per grid)."""
    model = create_dinov3(impl)
    twin = eager_twin(model)
    recorder = ClassAttentionRecorder.from_model(model)
    assert recorder.num_prefix_tokens == 5 and len(recorder.modules) == 3
    for size in ((64, 64), (80, 48), (96, 112)):
        grid = (size[0] // 16, size[1] // 16)
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            with recorder:
                model(pixel_values=images)
            f0 = recorder.attention_map()
            expected = attention_map_from_blocks(twin(pixel_values=images, output_attentions=True).attentions, grid,
                                                 num_prefix_tokens=5)
        err = (f0 - expected).abs().max().item()
        print(f"\nHF DINOv3 ({impl}) at {size}: F0 {tuple(f0.shape)}, max abs error {err:.2e}")
        assert f0.shape == (2, *grid) and recorder.pass_grid == grid and err < TOL


def test_dinov3_rotary_embedding_is_part_of_the_row():
    """class_token_attention with DINOv3's position_embeddings equals the eager class row;
    without them it does not (so the comparisons above can fail)."""
    model = create_dinov3("eager")
    attn, seen = model.model.layer[1].attention, {}
    pre = attn.register_forward_pre_hook(lambda m, args, kw: seen.update(x=kw.get("hidden_states", args[0] if args
                                                                                   else None), kw=dict(kw)),
                                         with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(pixel_values=torch.randn(2, 3, 64, 64), output_attentions=True)
    finally:
        pre.remove()
    expected = out.attentions[1][:, :, 0]                              # [B, heads, 5 + 16]
    kw = {k: v for k, v in seen["kw"].items() if k in ("position_embeddings", "attention_mask")}
    with torch.no_grad():
        row = class_token_attention(attn, seen["x"], **kw)
        without = class_token_attention(attn, seen["x"], attention_mask=kw.get("attention_mask"))
    torch.testing.assert_close(row, expected, rtol=0, atol=1e-6)
    gap = (without - expected).abs().max().item()
    print(f"\nHF DINOv3: the class row without the rotary embedding is off by {gap:.2e}")
    assert gap > 1e-3


def create_beit(bias):
    torch.manual_seed(0)
    config = transformers.BeitConfig(**dict(CONFIG, image_size=64), **{bias: True}, attn_implementation="eager")
    model = transformers.BeitModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("relative_position_bias_table"):       # zero at initialisation: drawn, so it counts
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("bias", ["use_relative_position_bias", "use_shared_relative_position_bias"])
def test_beit_relative_position_bias_comes_in_as_the_attention_mask(bias):
    """transformers' BEiT adds its relative position bias (per layer or shared) to the
    attention mask it passes to the attention: the recorder applies it to the row."""
    model = create_beit(bias)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with ClassAttentionRecorder.from_model(model) as recorder:
            weights = model(pixel_values=images, output_attentions=True).attentions
    expected = attention_map_from_blocks(weights, (4, 4))
    err = (recorder.attention_map() - expected).abs().max().item()
    print(f"\nHF BEiT ({bias}): F0 max abs error {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov3", "beit"])
def test_bfloat16_autocast_against_the_eager_attention_weights(kind, check_bfloat16_f0):
    """Under autocast the eager model returns bfloat16 weights. The recorder's rows (on the
    same pass) equal its class rows up to bfloat16 rounding (the weights are rounded to 8
    bits, 2^-9 relative, and a logit may round either way: rtol 2^-7), and, summed in
    float32, its F0 is within 0.02 of the float32 model's (measured at most 7.1e-3; the
    same rows summed in bfloat16 are 0.13 to 0.28 off) and no further from it than the map
    of the model's own bfloat16 weights."""
    if kind == "dinov3":
        model, prefix, grid = create_dinov3("eager"), 5, (4, 4)
    elif kind == "beit":
        model, prefix, grid = create_beit("use_relative_position_bias"), 1, (4, 4)
    else:
        model, prefix, grid = create(kind, "eager"), KINDS[kind][3], (14, 14)
    images = torch.randn(2, 3, 16 * grid[0], 16 * grid[1])
    recorder = ClassAttentionRecorder.from_model(model)
    with torch.no_grad():
        exact = attention_map_from_blocks(model(pixel_values=images, output_attentions=True).attentions, grid,
                                          num_prefix_tokens=prefix)
        with recorder, torch.autocast("cpu", dtype=torch.bfloat16):
            weights = model(pixel_values=images, output_attentions=True).attentions
        f0 = recorder.attention_map()
    assert weights[0].dtype == torch.bfloat16
    check_bfloat16_f0(f"HF {kind}", recorder, weights, f0, exact, grid, prefix)


def test_a_family_not_read_keeps_a_named_error():
    model = transformers.SwinModel(transformers.SwinConfig(image_size=32, embed_dim=16, depths=[1], num_heads=[2]))
    with pytest.raises(ValueError, match=r"SwinModel has no class token \(embeddings.cls_token\)"):
        ClassAttentionRecorder.from_model(model)


class WithF0(torch.nn.Module):
    def __init__(self, vit):
        super().__init__()
        self.vit = vit
        self.recorder = ClassAttentionRecorder.from_model(vit).open()   # once, before compiling

    def forward(self, images):
        tokens = self.vit(pixel_values=images).last_hidden_state
        return tokens[:, 0], self.recorder.attention_map()


@pytest.mark.parametrize("kind", ["deit", "dinov3"])
def test_compiles_with_fullgraph_and_matches_eager(compiled_f0_error, kind):
    model, size = (create_dinov3("sdpa"), 64) if kind == "dinov3" else (create(kind, "sdpa"), 224)
    err = compiled_f0_error(WithF0(model), torch.randn(2, 3, size, size))
    print(f"\nHF {kind} compiled (fullgraph, aot_eager) against eager: F0 max abs error {err:.2e}")
    assert err < 1e-5
