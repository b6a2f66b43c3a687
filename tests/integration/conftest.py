"""Shared by the integration tests."""
import pytest
import torch


def _compiled_f0_error(model, images) -> float:
    """F0 of `model` (returning (logits, f0)) compiled with fullgraph=True (aot_eager backend)
    against eager: asserts one graph over two calls, returns the max abs F0 difference."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            _, f0 = model(images)
            backend = CompileCounterWithBackend("aot_eager")
            compiled = torch.compile(model, fullgraph=True, backend=backend)
            for _ in range(2):
                _, compiled_f0 = compiled(images)
        assert backend.frame_count == 1
        return (compiled_f0 - f0).abs().max().item()
    finally:
        torch._dynamo.reset()


@pytest.fixture
def compiled_f0_error():
    return _compiled_f0_error


def _check_bfloat16_f0(label, recorder, weights, f0, exact, grid, prefix) -> None:
    """Under bfloat16 autocast: every recorded class row (float32) equals the model's own
    bfloat16 row to bfloat16 rounding (2^-7), and F0 (float32) is within 0.02 of the float32
    F0 `exact` and no further from it than the map of the model's own bfloat16 weights, while
    the same rows summed in bfloat16 are further than 0.02 (so the float32 sum is what holds it)."""
    from scm_ops import attention_map_from_blocks
    from scm_ops.diffusion import minmax_normalize
    for row, w in zip(recorder.rows, weights):
        assert row.dtype == torch.float32
        torch.testing.assert_close(row, w[:, :, 0].float(), rtol=2 ** -7, atol=0)
    own = attention_map_from_blocks([w.float() for w in weights], grid, num_prefix_tokens=prefix)
    err, own_err = (f0 - exact).abs().max().item(), (own - exact).abs().max().item()
    summed = torch.stack([r.bfloat16().mean(1) for r in recorder.rows]).sum(0)[:, prefix:]   # rows summed in bfloat16
    low_err = (minmax_normalize(summed.reshape(-1, *grid), (1, 2)).float() - exact).abs().max().item()
    print(f"\n{label} under bfloat16 autocast: F0 against float32 {err:.2e} (the model's own bfloat16 weights: "
          f"{own_err:.2e}), against the materialised bfloat16 attention {(f0 - own).abs().max():.2e}; "
          f"its rows summed in bfloat16: {low_err:.2e}")
    assert f0.dtype == torch.float32 and err < 0.02 < low_err and err <= own_err + 1e-6


@pytest.fixture
def check_bfloat16_f0():
    return _check_bfloat16_f0
