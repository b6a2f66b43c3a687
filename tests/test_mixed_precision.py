"""Mixed precision (docs/maths.md, "Mixed precision"): float16 and bfloat16 inputs are
computed in float32; outputs keep the input dtype, except inside a torch.autocast region,
where half inputs give float32 outputs (as autocast's float32 operators do)."""
import pytest
import torch

import scm_ops
from scm_ops.reference import cosine_similarity_ref, newton_schulz_inverse_ref, spatial_semantic_laplacian_ref
from scm_ops.testing import TOLERANCE, assert_rel_rmse

GRID = (6, 7)


def autocast_dtypes(device):
    """The low-precision dtypes autocast offers on the device under test."""
    return [torch.bfloat16] if device.type == "cpu" else [torch.float16, torch.bfloat16]


def operator_calls(backend):
    """(name, function of one [B, N, *] input, input maker) for the three operators."""
    n = GRID[0] * GRID[1]
    lam = 1.1
    return [
        ("cosine", lambda x: scm_ops.cosine_similarity(x, backend=backend), lambda d: torch.randn(2, n, 9, device=d)),
        ("laplacian", lambda e: scm_ops.spatial_semantic_laplacian(e, GRID, lam, backend=backend),
         lambda d: cosine_similarity_ref(torch.randn(2, n, 9, dtype=torch.float64)).float().to(d)),
        ("newton_schulz", lambda m: scm_ops.newton_schulz_inverse(m, 4, 0.002, True, backend=backend),
         lambda d: spatial_semantic_laplacian_ref(cosine_similarity_ref(torch.randn(2, n, 9, dtype=torch.float64)),
                                                  GRID, lam).float().to(d)),
    ]


@pytest.mark.parametrize("which", ["cosine", "laplacian", "newton_schulz"])
def test_operators_inside_autocast_return_float32(backend, device, which):
    """Inside autocast a half input is cast to float32 and the result is the float32
    operator's on the same values, bit for bit (autocast is off inside the operator:
    without that, the cosine's Gram product ran in bfloat16)."""
    _, call, make = next(c for c in operator_calls(backend) if c[0] == which)
    x32 = make(device)
    for low in autocast_dtypes(device):
        x = x32.to(low).requires_grad_()
        ref_x = x.detach().float().requires_grad_()
        with torch.autocast(device.type, dtype=low):
            out = call(x)
            out_of_float32 = call(x32)
        ref = call(ref_x)
        assert out.dtype == torch.float32 and out_of_float32.dtype == torch.float32
        assert torch.equal(out, ref)
        assert torch.equal(out_of_float32, call(x32))
        grad = torch.randn_like(ref)
        (dx,) = torch.autograd.grad(out, x, grad)
        (dx_ref,) = torch.autograd.grad(ref, ref_x, grad)
        assert dx.dtype == low
        assert torch.equal(dx, dx_ref.to(low))


def test_laplacian_mixes_half_similarity_and_float32_lam_inside_autocast(device):
    e = cosine_similarity_ref(torch.randn(1, 42, 5, dtype=torch.float64)).to(device, torch.bfloat16)
    lam = torch.tensor(0.9, device=device)
    with pytest.raises(TypeError, match="similarity is torch.bfloat16 but lam is torch.float32"):
        scm_ops.spatial_semantic_laplacian(e, GRID, lam)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = scm_ops.spatial_semantic_laplacian(e, GRID, lam)
    assert torch.equal(out, scm_ops.spatial_semantic_laplacian(e.float(), GRID, lam))


@pytest.mark.parametrize("which", ["cosine", "laplacian", "newton_schulz"])
def test_operators_bfloat16_on_the_torch_path(device, which):
    """bfloat16 in, bfloat16 out, computed in float32, on the PyTorch path (the operator
    tests run bfloat16 on CUDA only, since Triton's CPU interpreter has none)."""
    refs = {"cosine": cosine_similarity_ref, "laplacian": lambda e: spatial_semantic_laplacian_ref(e, GRID, 1.1),
            "newton_schulz": lambda m: newton_schulz_inverse_ref(m, 4, 0.002, True)}
    _, call, make = next(c for c in operator_calls("torch") if c[0] == which)
    x = make(device).to(torch.bfloat16).requires_grad_()
    ref_x = x.detach().double().requires_grad_()
    out, ref = call(x), refs[which](ref_x)
    assert out.dtype == torch.bfloat16
    # measured 1.5e-3 (cosine, 2 x 42 x 9): the output's bfloat16 rounding (3.9e-3 unit)
    assert_rel_rmse(out, ref, TOLERANCE[torch.bfloat16], f"{which} bfloat16")
    grad = torch.randn(ref.shape, dtype=torch.float64).to(device, torch.bfloat16)  # rounded once, given to both
    (dx,) = torch.autograd.grad(out, x, grad)
    (dx_ref,) = torch.autograd.grad(ref, ref_x, grad.double())
    assert dx.dtype == torch.bfloat16
    assert_rel_rmse(dx, dx_ref, TOLERANCE[torch.bfloat16], f"{which} bfloat16 gradient")


def module_inputs(device, dtype=torch.float32, batch=2, classes=5):
    g = torch.Generator().manual_seed(3)
    f = torch.rand(batch, *GRID, generator=g)
    s = torch.randn(batch, classes, *GRID, generator=g)
    return f.to(device, dtype), s.to(device, dtype)


@pytest.mark.parametrize("implementation", ["structured", "dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_half_inputs_give_half_outputs(device, implementation, dtype):
    # the default backend of the device (Triton on CUDA): the casts happen before either
    module = scm_ops.ActivationDiffusion(GRID, implementation=implementation).to(device)
    f, s = (t.requires_grad_() for t in module_inputs(device, dtype))
    f32, s32 = (t.detach().float().requires_grad_() for t in (f, s))
    out, ref = module(f, s), module(f32, s32)
    assert [t.dtype for t in out] == [dtype, dtype]
    # measured 1.6e-3 / 1.8e-3 (bfloat16) and 2.0e-4 / 1.8e-4 (float16): the outputs'
    # rounding; the computation itself is float32 on the same values
    for a, b, what in zip(out, ref, ("F", "S")):
        assert_rel_rmse(a, b, TOLERANCE[dtype], f"{what} {dtype}")
    cot = [torch.randn_like(t).to(dtype) for t in ref]  # rounded once, given to both
    grads = torch.autograd.grad(out, (f, s, module.lam, module.beta), cot)
    grads_ref = torch.autograd.grad(ref, (f32, s32, module.lam, module.beta), [c.float() for c in cot])
    assert grads[0].dtype == dtype and grads[2].dtype == torch.float32
    # measured 1.8e-3 / 1.6e-3 (bfloat16) for F0 and S0; lam and beta: 0 (same float32 sums)
    for a, b, what in zip(grads, grads_ref, ("F0", "S0", "lam", "beta")):
        assert_rel_rmse(a, b, TOLERANCE[dtype], f"d{what} {dtype}")


@pytest.mark.parametrize("implementation", ["structured", "dense"])
def test_module_inside_autocast_returns_float32(device, implementation):
    module = scm_ops.ActivationDiffusion(GRID, implementation=implementation).to(device)
    f32, s32 = module_inputs(device)
    ref = module(f32, s32)
    for low in autocast_dtypes(device):
        f, s = f32.to(low), s32.to(low)
        with torch.autocast(device.type, dtype=low):
            out = module(f, s)
            mixed = module(f32, s)         # F0 from a float32 softmax, S0 from a half conv
            full = module(f32, s32)
        assert [t.dtype for t in out + mixed + full] == [torch.float32] * 6
        expected = module(f.float(), s.float())
        # computed in float32 on the same values: identical to the float32 module
        assert all(torch.equal(a, b) for a, b in zip(out, expected))
        assert all(torch.equal(a, b) for a, b in zip(full, ref))
        assert torch.equal(mixed[1], module(f32, s.float())[1])
    with torch.autocast(device.type, dtype=torch.bfloat16):
        f64 = module.double()(*(t.double() for t in (f32, s32)))
        with pytest.raises(TypeError, match="attention is torch.float32 but semantic is torch.float64"):
            module(f32, s32.double())
    assert [t.dtype for t in f64] == [torch.float64] * 2  # autocast leaves float64 alone


class TinyVitHead(torch.nn.Module):
    """Patch features [B, D, H, W] -> F0 from a softmax over patches, S0 from a 3 x 3 conv,
    the published stack, logits GAP(S): a ViT's TS-CAM head in miniature."""

    def __init__(self, features=8, classes=5, **kwargs):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, features, 1)
        self.score = torch.nn.Linear(features, 1, bias=False)  # a bias would cancel in the softmax
        self.head = torch.nn.Conv2d(features, classes, 3, padding=1)
        self.diffusion = scm_ops.ActivationDiffusion(GRID, **kwargs)

    def forward(self, image):
        x = torch.relu(self.embed(image))
        scores = self.score(x.flatten(2).transpose(1, 2))[..., 0]          # [B, N]
        f0 = scm_ops.minmax_normalize(torch.softmax(scores, -1).reshape(-1, *GRID), (1, 2))
        f, s = self.diffusion(f0, self.head(x))
        return s.mean((2, 3))


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward_outside", "backward_inside"])
def test_training_step_under_autocast(device, backward_inside):
    """One SGD step of a tiny model under torch.autocast against the same step in float32;
    the conv and linear layers run in low precision, ActivationDiffusion in float32."""
    torch.manual_seed(0)
    model = TinyVitHead().to(device)
    model32 = TinyVitHead().to(device)
    model32.load_state_dict(model.state_dict())
    image = torch.randn(4, 3, *GRID, device=device)
    labels = torch.tensor([0, 1, 2, 3], device=device)
    low = autocast_dtypes(device)[-1]
    with torch.autocast(device.type, dtype=low):
        logits = model(image)
        assert model.head(torch.relu(model.embed(image))).dtype == low    # S0 arrives in half
        loss = torch.nn.functional.cross_entropy(logits, labels)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    loss32 = torch.nn.functional.cross_entropy(model32(image), labels)
    loss32.backward()
    assert logits.dtype == torch.float32
    # measured (CPU, bfloat16): loss 2.1e-4 relative; gradients 4.7e-3 (head) to 4.2e-2
    # (score), lam 1.3e-2, beta 2.7e-3, inside or outside autocast alike: the conv and
    # linear layers' bfloat16 products (3.9e-3 unit roundoff) propagated through the
    # network. 0.2 is 5x the largest; a gradient of the wrong sign would be off by > 1.
    assert abs(loss.item() - loss32.item()) <= 2e-3 * abs(loss32.item())
    for (name, p), p32 in zip(model.named_parameters(), model32.parameters()):
        assert_rel_rmse(p.grad, p32.grad, 0.2, f"d{name}")
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
