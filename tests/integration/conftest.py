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
