"""Error measures shared by the tests and benchmarks."""
from __future__ import annotations

import torch


def relative_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / ||expected||_2 over all elements, in float64
    (0 when both are zero)."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    den = e.norm().item()
    num = (a - e).norm().item()
    return num / den if den > 0 else num


def assert_rel_rmse(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{what}: non-finite values")
    err = relative_rmse(actual, expected)
    if not err <= tol:
        raise AssertionError(f"{what}: relative RMSE {err:.3e} > {tol:.1e}")


def device_under_test() -> torch.device:
    """Device the test suite runs the operators on: $SCM_OPS_TEST_DEVICE, else CUDA when
    available, else the CPU (where Triton kernels run in the interpreter)."""
    import os
    name = os.environ.get("SCM_OPS_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# Tolerances on the relative RMSE against a float64 reference, by input dtype. float64 and
# float32 follow from unit roundoff (1.1e-16, 6e-8) times the growth of sums of up to ~1000
# terms and of up to 16 Newton-Schulz products; half types from the storage precision of
# their inputs and outputs (fp16 4.9e-4, bf16 3.9e-3).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def dtype_params():
    """pytest params: float64, float32, float16 everywhere; bfloat16 on CUDA only (the
    Triton CPU interpreter has no bfloat16)."""
    import pytest
    on_cuda = device_under_test().type == "cuda"
    return [torch.float64, torch.float32, torch.float16,
            pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
                not on_cuda, reason="bfloat16 needs CUDA (not in the Triton interpreter)"))]
