"""Backend choice, input validation, mixed precision, the checks that stay in a compiled
graph, and the lazy import of the Triton kernels."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_EXTRA_HINT = ("install it with pip install 'scm-ops[triton]' (PyTorch's CUDA wheels already "
                     "bring the Triton they were built with), or use backend='torch'")


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


# Whether the triton package can be found, decided once at import (without importing it):
# a constant, so that resolve_backend traces into a torch.compile graph without a break.
TRITON_INSTALLED = _find_triton()
_warned_fallback = False


def triton_missing_error() -> ImportError:
    return ImportError(f"the Triton backend of scm_ops needs the triton package, which is not installed: "
                       f"{TRITON_EXTRA_HINT}")


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """The backend an operator runs for `tensor`.

    Order: the per-call argument, then the environment variable SCM_OPS_BACKEND, then the
    device: Triton kernels for CUDA tensors, plain PyTorch for everything else.
    A forced Triton backend on a CPU tensor needs TRITON_INTERPRET=1.

    Triton is optional (the extra ``scm-ops[triton]``; PyTorch's CUDA wheels include it).
    Without it, a Triton backend asked for by name (the argument or SCM_OPS_BACKEND) raises
    ImportError naming the extra, while the default for a CUDA tensor falls back to
    "torch" with a one-time RuntimeWarning: the same results, without the fused kernels.
    """
    global _warned_fallback
    choice = backend if backend is not None else os.environ.get("SCM_OPS_BACKEND") or None
    if choice is None:
        if not tensor.is_cuda:
            return "torch"
        if not TRITON_INSTALLED:
            if not _warned_fallback:
                _warned_fallback = True
                warnings.warn("scm_ops: triton is not installed, so CUDA tensors run the PyTorch backend "
                              f"(same results, without the fused kernels); {TRITON_EXTRA_HINT}",
                              RuntimeWarning, stacklevel=3)
            return "torch"
        return "triton"
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {choice!r}")
    if choice == "triton" and not tensor.is_cuda and not interpreting():
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            f"imported to run the kernels on the CPU; got a tensor on {tensor.device}")
    if choice == "triton" and not TRITON_INSTALLED:
        raise triton_missing_error()
    return choice


def checks_enabled() -> bool:
    """Finite-value and convergence checks synchronise with the device; SCM_OPS_CHECKS=0
    turns them off (shape, dtype and device checks always run)."""
    return os.environ.get("SCM_OPS_CHECKS", "1") != "0"


def check_float_tensor(name: str, t, ndim: int | tuple[int, ...], shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}")


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of t is finite (a host sync). Screened by the sum, one pass
    that allocates nothing: a NaN or an infinity makes any sum NaN or infinite, so a finite
    sum proves every element finite; a non-finite sum (one of them, or an overflow of the
    sum itself) is settled element by element."""
    if not t.is_floating_point() and not t.is_complex():
        return True
    # float16 and bfloat16 are summed into float32: a half-precision sum of many positive
    # values overflows (65504) and would send every such check to the slow path
    total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ValueError naming `name` if `t` holds a NaN or an infinity (a host sync; call it
    inside a custom op, where torch.compile does not look)."""
    if checks_enabled() and not all_finite(t):
        raise ValueError(f"{name} contains NaN or infinite values")


@torch.library.custom_op("scm_ops::assert_finite", mutates_args=("token",))
def _assert_finite_op(token: torch.Tensor, t: torch.Tensor, name: str) -> None:
    check_finite(name, t)


@_assert_finite_op.register_fake
def _(token, t, name):
    return None


def assert_finite(token: torch.Tensor, name: str, t: torch.Tensor) -> None:
    """check_finite as an operator that torch.compile keeps in its graph (docs/maths.md,
    "Checks under torch.compile").

    A check needs the values on the host, which a traced graph cannot branch on. As a
    custom operator it is opaque to the tracer; declared as writing `token` (a 0-d tensor
    that is never read), it has a side effect and is never removed as dead code. In eager
    mode it raises at once; in a compiled graph it raises when the graph reaches it."""
    if checks_enabled():
        _assert_finite_op(token, t.detach(), name)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocasting(device: torch.device) -> bool:
    """True inside a torch.autocast region enabled for `device`'s type."""
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def autocast_to_float32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operators' autocast rule (docs/maths.md, "Mixed precision"): inside an autocast
    region for the tensors' device, float16 and bfloat16 inputs are cast to float32, so the
    operator returns float32, as autocast's float32 operators (softmax, layer_norm) do.
    Outside autocast the tensors are returned unchanged (half in, half out, computed in
    float32)."""
    if not autocasting(tensors[0].device):
        return tensors
    return tuple(t.float() if t.dtype in HALF_DTYPES else t for t in tensors)


def without_autocast(device: torch.device):
    """A context in which autocast is off for `device`: scm_ops' own computations choose
    their precision (float32 or float64) and must not be cast down by an enclosing
    autocast region."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kernel_module(name: str):
    """Import scm_ops.kernels.<name> (lazily, so TRITON_INTERPRET is read at first use, and
    so that scm_ops imports without Triton: ImportError naming the extra if it is missing)."""
    try:
        return importlib.import_module(f"scm_ops.kernels.{name}")
    except ModuleNotFoundError as err:
        if err.name is not None and (err.name == "triton" or err.name.startswith("triton.")):
            raise triton_missing_error() from err
        if err.name not in ("scm_ops.kernels", f"scm_ops.kernels.{name}"):
            raise
        here = os.path.dirname(os.path.abspath(__file__))
        raise ImportError(
            f"scm_ops.kernels is missing: scm_ops was imported from {here}, which is "
            "neither an installed package nor the scm_ops/ folder of a clone (with kernels/ and "
            "pyproject.toml beside it). Install the package (pip install .).") from err


def kernel_config(module, dtype: torch.dtype, kernel: str | None = None) -> tuple[dict, dict]:
    """(constexpr block sizes, launch options) the launcher uses for `dtype`: from
    ``module.CONFIGS[kernel]`` when the kernel has a configuration of its own, else from the
    module's shared ``module.CONFIGS``; each maps "fp32" / "fp64" (the accumulation dtype)
    to a dict of block sizes plus num_warps / num_stages."""
    table = module.CONFIGS.get(kernel, module.CONFIGS) if kernel else module.CONFIGS
    cfg = dict(table["fp64" if dtype == torch.float64 else "fp32"])
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    return cfg, launch
