"""ClassAttentionRecorder on real Hugging Face transformers ViT and DeiT (random
initialisation from small configs): F0 with sdpa and eager attention against the eager
model's own output_attentions=True weights; the classification wrappers; another image
size through interpolate_pos_encoding; the errors a user can hit; gradients;
torch.compile(fullgraph=True).

Needs transformers (skipped without it): see tests/integration/README.md.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from scm_ops import ClassAttentionRecorder, attention_map_from_blocks  # noqa: E402

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
    twin = type(model)(model.config.__class__(**{**model.config.to_dict(), "attn_implementation": "eager"}),
                       **({} if hasattr(model, "classifier") else {"add_pooling_layer": False}))
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


class WithF0(torch.nn.Module):
    def __init__(self, vit):
        super().__init__()
        self.vit = vit
        self.recorder = ClassAttentionRecorder.from_model(vit).open()   # once, before compiling

    def forward(self, images):
        tokens = self.vit(pixel_values=images).last_hidden_state
        return tokens[:, 0], self.recorder.attention_map()


def test_compiles_with_fullgraph_and_matches_eager(compiled_f0_error):
    err = compiled_f0_error(WithF0(create("deit", "sdpa")), torch.randn(2, 3, 224, 224))
    print(f"\nHF deit compiled (fullgraph, aot_eager) against eager: F0 max abs error {err:.2e}")
    assert err < 1e-5
