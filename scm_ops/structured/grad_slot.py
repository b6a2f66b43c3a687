"""One gradient buffer for S (docs/structured.md, "One gradient of S").

S reaches the output through the neighbour cosines and through the final residual scaling;
GradSlot lets the scaling's backward hand its gradient to the cosines' backward, so the
backward pass holds one [B, C, H, W] gradient of S instead of two.
"""
from __future__ import annotations

import torch

from .neighbour_cosine import channel_dot

__all__ = ["GradSlot", "ScalePatches"]


class GradSlot:
    """Hands the gradient of S from ScalePatches to NeighbourCosine within one backward pass.

    S reaches the output twice: through the residual scaling S * scale and through the
    neighbour cosines that build scale. Autograd would hold one [B, C, H, W] gradient for
    each and add them. Instead ScalePatches, whose backward runs first, leaves the incoming
    gradient and the scale here, and NeighbourCosine forms grad * scale and adds its own
    terms into that one buffer, once the small per-block graph in between (whose spectral
    block needs [B, N, N] temporaries) has been differentiated and freed. What is left here
    is tagged with the graph task that left it and is taken by that task only.

    Uses torch._C._current_graph_task_id and torch._C._will_engine_execute_node (no public
    API does this; tests/test_compile.py fails if a torch lacks them). Not used under
    torch.compile, which cannot trace it (ActivationDiffusion passes no slot there): the
    backward then holds two gradients of S, one [B, C, H, W] tensor more.
    """

    def __init__(self):
        self._task, self._value = None, None

    def put(self, grad: torch.Tensor, scale: torch.Tensor) -> None:
        self._task, self._value = torch._C._current_graph_task_id(), (grad, scale)

    def take_scaled_grad(self) -> torch.Tensor | None:
        """grad * scale (broadcast over C) as a new buffer, or None if nothing was left."""
        value, task = self._value, self._task
        self._task, self._value = None, None
        if value is None or task != torch._C._current_graph_task_id():
            return None
        grad, scale = value
        return grad * scale[:, None]


class ScalePatches(torch.autograd.Function):
    """S [B, C, H, W] * scale [B, H, W] (broadcast over C), whose backward reduces over C
    in chunks instead of forming grad * S. Given a GradSlot and the autograd node of the
    NeighbourCosine of the same S, the gradient of S is left to that node whenever it runs
    in the same backward pass (see GradSlot)."""

    @staticmethod
    def forward(ctx, s, scale, slot=None, cosine_node=None):
        ctx.save_for_backward(s, scale)
        ctx.slot, ctx.cosine_node = slot, cosine_node
        return s * scale[:, None]

    @staticmethod
    def backward(ctx, grad):
        s, scale = ctx.saved_tensors
        grad_s = None
        if ctx.needs_input_grad[0]:
            if (ctx.slot is not None and ctx.cosine_node is not None
                    and torch._C._will_engine_execute_node(ctx.cosine_node)):
                ctx.slot.put(grad, scale)
            else:
                grad_s = grad * scale[:, None]
        grad_scale = channel_dot(grad, s) if ctx.needs_input_grad[1] else None
        return grad_s, grad_scale, None, None
