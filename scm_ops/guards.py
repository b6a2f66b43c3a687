"""ActivationDiffusion's value checks that need host values: non-negative attention, and the
last line of defence, a finite output of every block.

Like the finite-input and divergence checks (docs/maths.md, "Checks under torch.compile"),
each is a custom operator that declares it writes `token` (a 0-d tensor of the module that
is never read): opaque to the tracer and never removed as dead code, it raises at once in
eager mode and when the graph reaches it under torch.compile. SCM_OPS_CHECKS=0 turns them off.
"""
from __future__ import annotations

import torch

from ._common import all_finite, checks_enabled

__all__ = ["NonFiniteOutputError", "assert_non_negative", "assert_block_finite"]


class NonFiniteOutputError(FloatingPointError):
    """A block of ActivationDiffusion produced NaN or infinity from finite inputs on which its
    iteration converges: a result that must not flow on into training."""


@torch.library.custom_op("scm_ops::assert_non_negative", mutates_args=("token",))
def _assert_non_negative_op(token: torch.Tensor, t: torch.Tensor, name: str) -> None:
    flat = t.flatten(1) if t.dim() > 1 else t.reshape(-1, 1)
    if flat.numel() == 0:
        return
    smallest = flat.amin(1)
    if bool((smallest < 0).any()):
        item = int((smallest < 0).nonzero()[0, 0])
        raise ValueError(f"{name} must be non-negative (F0 is a min-max normalised attention map, or any "
                         f"activation map >= 0); batch item {item} has minimum {float(smallest[item]):.4g}. "
                         "Shift or min-max normalise it first (scm_ops.minmax_normalize).")


@_assert_non_negative_op.register_fake
def _(token, t, name):
    return None


def assert_non_negative(token: torch.Tensor, name: str, t: torch.Tensor) -> None:
    """Raise ValueError naming `name` and the first batch item with a negative entry of t [B, ...]."""
    if checks_enabled():
        _assert_non_negative_op(token, t.detach(), name)


@torch.library.custom_op("scm_ops::assert_block_finite", mutates_args=("token",))
def _assert_block_finite_op(token: torch.Tensor, u: torch.Tensor, lam: torch.Tensor, block: int,
                            route: str) -> None:
    if all_finite(u):
        return
    finite = torch.isfinite(u.flatten(1) if u.dim() > 1 else u.reshape(-1, 1)).all(1)
    if not bool(finite.all()):
        item = int((~finite).nonzero()[0, 0])
        raise NonFiniteOutputError(
            f"ActivationDiffusion block {block} ({route}) produced NaN or infinity for batch item {item} "
            f"(lam={float(lam):.6g}) from finite inputs on which its iteration converges. This is a bug: "
            "please report it with the inputs (torch.save of F0, S0 and the module's state).")


@_assert_block_finite_op.register_fake
def _(token, u, lam, block, route):
    return None


def assert_block_finite(token: torch.Tensor, u: torch.Tensor, lam: torch.Tensor, block: int, route: str) -> None:
    """Raise NonFiniteOutputError naming the block, its route, the batch item and lam if the
    block's diffused map u [B, ...] holds NaN or infinity."""
    if checks_enabled():
        _assert_block_finite_op(token, u.detach(), lam.detach(), block, route)
