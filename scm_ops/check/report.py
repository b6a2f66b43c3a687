"""The self-check's report (check lines printed and kept), the context its groups share, and
the settings and helpers more than one group uses."""
from __future__ import annotations

import sys
import time

import torch

BACKENDS = ("triton", "torch")
ALPHA = 0.002
QUICK_ITERATIONS = (7, 2)
# Relative RMSE allowed between the two backends of ActivationDiffusion, (forward, gradients).
# The tests hold each backend to 1e-4 / 2e-3 of the float64 published stack in float32,
# so two of them differ by about twice that at most (the quick set measured up to 1.1e-6 /
# 1.7e-4). In float64 both compute the same sums in another order: the quick set measured
# up to 2e-14 / 3e-14; bound 1e-10 / 1e-7 (the gradient to beta is a sum of cancelling
# terms). bfloat16: the two float32 results rounded to bfloat16 (unit roundoff 3.9e-3).
BACKEND_TOL = {torch.float32: (2e-4, 4e-3), torch.float64: (1e-10, 1e-7), torch.bfloat16: (2e-2, 2e-2)}


class Report:
    """Check lines printed as they come, and kept for the JSON file and the exit status."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.rows = []

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def result(self, status: str, group: str, name: str, detail: str = "", seconds: float | None = None) -> bool:
        self.rows.append(dict(status=status, group=group, name=name, detail=detail, seconds=seconds))
        timing = f" [{seconds:.1f} s]" if seconds is not None else ""
        self.line(f"{status:4s}  {group}: {name}" + (f": {detail}" if detail else "") + timing)
        return status == "PASS"

    def check(self, ok: bool, group: str, name: str, detail: str = "", seconds: float | None = None) -> bool:
        return self.result("PASS" if ok else "FAIL", group, name, detail, seconds)

    def error(self, group: str, name: str, err: BaseException, seconds: float | None = None) -> bool:
        text = (str(err).strip().splitlines() or [""])[0][:300]
        return self.result("FAIL", group, name, f"raised {type(err).__name__}: {text}", seconds)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)


def native_bf16() -> bool:
    """Whether the CUDA device computes in bfloat16 (sm_80 and later), not only emulates it."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:   # an older torch without the argument, which counts sm_80 and later only
        return torch.cuda.is_bf16_supported()


def fmt(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    from ..testing import relative_rmse
    return relative_rmse(a, b)


class Context:
    """What the groups share: device, mode, sizes, deadline, recorded launches."""

    def __init__(self, device: torch.device, quick: bool, repeats: int, deadline: float | None):
        self.device = device
        self.quick = quick
        self.repeats = repeats
        self.deadline = deadline
        self.launches: list = []
        self.interpreted = device.type != "cuda"
        self.bf16 = device.type == "cuda" and native_bf16()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

