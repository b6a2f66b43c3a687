"""The SCM stack of activation diffusion blocks: the functional form `activation_diffusion`
and `ActivationDiffusion`, a module that holds lam and beta and calls it."""
from __future__ import annotations

import torch
from torch import nn

from ._common import (assert_finite, autocasting, check_float_tensor, check_same, checks_enabled,
                      compute_dtype, resolve_backend, without_autocast)
from .guards import assert_block_finite, assert_non_negative
from .cosine import cosine_similarity
from .laplacian import spatial_semantic_laplacian
from .newton_schulz import (assert_block_converges, assert_dense_converges, assert_stencil_converges,
                            newton_schulz_inverse)
from .structured import (OFFSETS, GradSlot, NeighbourCosine, ScalePatches, SpectralFilter, chebyshev_filter,
                         grid_masks, stencil_series, stencil_to_dense)

__all__ = ["ActivationDiffusion", "activation_diffusion", "localization_map", "minmax_normalize"]

IMPLEMENTATIONS = ("structured", "dense")
# the names of scm_ops.route_choice that this module also gives (module __getattr__)
_ROUTE_NAMES = ("LARGE_P_ROUTES", "MATRIX_FREE_MAX_STEPS", "FLOAT64_SPECTRAL_MAX_CELLS", "default_large_p_route")


def _routes():
    """scm_ops.route_choice, imported at first use, not with scm_ops: its import loads torch's
    compiler and with it triton, which must wait until TRITON_INTERPRET may have been set."""
    from . import route_choice
    return route_choice


def __getattr__(name):
    if name in _ROUTE_NAMES:
        return getattr(_routes(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _safe_div(num, den):
    """num / den with 0 where den == 0: the limit at the published code's 0/0."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def minmax_normalize(x: torch.Tensor, dims) -> torch.Tensor:
    """(x - min) / max(x - min) over `dims`; a constant map gives 0 (not NaN)."""
    x = x - x.amin(dims, keepdim=True)
    return _safe_div(x, x.amax(dims, keepdim=True))


def check_config(grid_size, iterations, alpha, connectivity, implementation, backend, large_p_route):
    """Validate the stack's settings (ValueError naming the argument); returns grid_size as an
    (H, W) tuple of ints and iterations as a tuple."""
    if isinstance(grid_size, int):
        grid_size = (grid_size, grid_size)
    grid_size = tuple(grid_size)
    if len(grid_size) != 2 or not all(isinstance(g, int) and g >= 1 for g in grid_size):
        raise ValueError(f"grid_size must be an int or a pair of positive ints, got {grid_size!r}")
    iterations = tuple(iterations)
    if not iterations or not all(isinstance(p, int) and p >= 0 for p in iterations):
        raise ValueError(f"iterations must be a non-empty sequence of ints >= 0, got {iterations!r}")
    if connectivity not in OFFSETS:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be 'structured' or 'dense', got {implementation!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    routes = _routes().LARGE_P_ROUTES
    if large_p_route not in (None,) + routes:
        raise ValueError(f"large_p_route must be one of {routes} or None, got {large_p_route!r}")
    return grid_size, iterations


_tokens: dict = {}


def _default_check_token(device: torch.device) -> torch.Tensor:
    """The check token of the functional form on `device`: one 0-d tensor per device, kept
    here, so that a compiled graph sees it as an input (a tensor made inside the graph would
    let the compiler drop the checks that write it)."""
    token = _tokens.get(device)
    if token is None:
        token = _tokens[device] = torch.zeros((), device=device)
    return token


def activation_diffusion(attention: torch.Tensor, semantic: torch.Tensor, lam: torch.Tensor, beta: torch.Tensor,
                         *, grid_size, iterations=(16, 4, 4, 4), alpha: float = 0.002, connectivity: int = 4,
                         exact_gradients: bool = False, implementation: str = "structured",
                         backend: str | None = None, large_p_route: str | None = None,
                         check_token: torch.Tensor | None = None):
    """The Spatial Calibration Module's stack of activation diffusion blocks as a function of
    its inputs and its per-block lam and beta (docs/maths.md, "One activation diffusion
    block" and "The stack"); `ActivationDiffusion` is a module over it.

    Each block computes the cosine similarity E of the C-vectors of S, the masked Laplacian
    L = (D - A) * (lam E - 1) of the grid, M = X_p^T from p Newton-Schulz iterations
    (X_0 = alpha L^T), and updates F <- F + tau, S <- S * (1 + tau) with
    tau = minmax(tanhshrink(M F / (beta * max F))).

    Args:
        attention: F0, [B, N] or [B, H, W], non-negative.
        semantic: S0, [B, C, H, W] (C >= 1).
        lam, beta: [blocks] tensors, one value per block (published start 1.0 and 0.5); any
            float dtype, cast to the compute dtype; gradients flow to them.
        grid_size: (H, W) patch grid (an int for a square grid), N = H * W.
        iterations: Newton-Schulz iterations p of each block; the length sets the number of
            blocks. Default (16, 4, 4, 4), the published configuration.
        alpha: X_0 = alpha L^T (published 0.002).
        connectivity: 4 (published) or 8 grid neighbours.
        exact_gradients: False (published): X_0 carries no gradient. True: the exact
            gradient of the truncated iteration.
        implementation: "structured" (default): the fast path of docs/structured.md (neighbour
            cosines only, matrix-free blocks for small p, large_p_route for large p).
            "dense": the published dense formulation, run by scm_ops' three operators.
        backend: "triton", "torch" or None (SCM_OPS_BACKEND, else Triton kernels for CUDA
            tensors and PyTorch for the others). In the structured implementation the
            neighbour cosines, the matrix-free blocks and the Chebyshev series have Triton
            kernels; the spectral route of the large-p block is PyTorch on both backends.
        large_p_route: how the structured implementation runs blocks with 2^p > 64 steps
            (the p = 16 block): "chebyshev" (a Chebyshev series in L^2: cost and memory
            linear in N, degree proportional to the Gershgorin bound R of L, so cheaper
            on smooth or positive semantic maps; one Triton program per image on the
            Triton backend), "spectral" (eigh and the closed-form derivative, O(N^3)),
            "newton_schulz" (dense Newton-Schulz on the L of the stencil, scm_ops'
            operator, Triton products on the Triton backend) or None:
            SCM_OPS_LARGE_P_ROUTE if set; else the spectral form for float64 inputs up to
            32 x 32 cells (exact up to rounding); else, on CUDA, the route measured fastest
            on your GPU at the first call of a configuration (scm_ops/route_choice.py,
            cached in memory and in ~/.cache/scm_ops/routes.json; docs/gpu.md); else (CPU,
            SCM_OPS_ROUTE_TUNING=0, or inside torch.compile without a cached choice)
            Chebyshev (default_large_p_route).
        check_token: a 0-d tensor on the inputs' device that the value checks declare they
            write, so that torch.compile keeps them (docs/maths.md, "Checks under
            torch.compile"); None: one per device kept by scm_ops. ActivationDiffusion
            passes a buffer of its own.

    Returns:
        (attention, semantic) after the stack, same shapes. B may be 0 (empty outputs, zero
        gradients for lam and beta). float16, bfloat16, float32 or float64, computed in
        float32 (float64 for float64); outputs keep the input dtype, or are float32 inside
        torch.autocast (docs/maths.md, "Mixed precision").

    Where the published code divides 0 by 0 (a constant map in min-max, a zero semantic
    vector in the cosine, an all-zero attention map) the result is the limit 0, not NaN.
    Bad settings, shapes, dtypes or devices raise ValueError or TypeError naming the
    argument. Checks at call time (skipped with SCM_OPS_CHECKS=0): a lam or alpha that makes
    a block's Newton-Schulz iteration diverge (alpha sigma_max(L)^2 >= 2) raises
    NewtonSchulzDivergenceError; a negative attention map, NaN or infinity in the inputs,
    lam or beta raise ValueError; and, as a last line of defence, a block whose output is
    not finite raises NonFiniteOutputError (naming the block, its route, the batch item and
    lam) instead of passing NaN on.
    """
    grid_size, iterations = check_config(grid_size, iterations, alpha, connectivity, implementation, backend,
                                         large_p_route)
    for name, value in (("lam", lam), ("beta", beta)):
        check_float_tensor(name, value, 1, f"[{len(iterations)}] (one value per block)")
        if value.shape[0] != len(iterations):
            raise ValueError(f"{name} must have one value per block of iterations {iterations}: shape "
                             f"[{len(iterations)}], got shape {tuple(value.shape)}")
    if check_token is None and isinstance(semantic, torch.Tensor):
        check_token = _default_check_token(semantic.device)
    stack = _Stack(grid_size, iterations, float(alpha), connectivity, bool(exact_gradients), implementation,
                   backend, large_p_route, lam, beta, check_token)
    return stack.forward(attention, semantic)


class _Stack:
    """One call's settings, lam and beta, and the stack's computation. It is what
    route_choice is given: a shallow copy with large_p_route pinned is what it times."""

    def __init__(self, grid_size, iterations, alpha, connectivity, exact_gradients, implementation, backend,
                 large_p_route, lam, beta, token):
        self.grid_size, self.iterations, self.alpha = grid_size, iterations, alpha
        self.connectivity, self.exact_gradients, self.implementation = connectivity, exact_gradients, implementation
        self.backend, self.large_p_route = backend, large_p_route
        self.lam, self.beta, self.token = lam, beta, token

    def _check_inputs(self, attention, semantic):
        """Validate the inputs; returns (compute dtype, output dtype of attention, of semantic)
        by the rule of docs/maths.md, "Mixed precision"."""
        H, W = self.grid_size
        check_float_tensor("semantic", semantic, 4, "[B, C, H, W]")
        check_float_tensor("attention", attention, (2, 3), "[B, N] or [B, H, W]")
        if attention.device != semantic.device:
            raise ValueError(f"attention is on {attention.device} but semantic is on {semantic.device}")
        autocast = autocasting(semantic.device)
        if not autocast or torch.float64 in (attention.dtype, semantic.dtype):
            check_same("attention", attention, "semantic", semantic)
        B, C = semantic.shape[:2]
        if tuple(semantic.shape[2:]) != (H, W):
            raise ValueError(f"semantic must have shape [B, C, {H}, {W}] for grid_size {self.grid_size}, "
                             f"got {tuple(semantic.shape)}")
        if C == 0:
            raise ValueError("semantic must have C >= 1 channels, got C = 0")
        if attention.shape[0] != B:
            raise ValueError(f"attention has batch size {attention.shape[0]} but semantic has {B}")
        if tuple(attention.shape[1:]) not in ((H * W,), (H, W)):
            raise ValueError(f"attention must have shape [B, {H * W}] or [B, {H}, {W}] for grid_size "
                             f"{self.grid_size}, got {tuple(attention.shape)}")
        token = self.token
        assert_finite(token, "attention", attention)
        assert_non_negative(token, "attention", attention)
        assert_finite(token, "semantic", semantic)
        assert_finite(token, "lam or beta of ActivationDiffusion", torch.cat([self.lam.flatten(), self.beta.flatten()]))
        compute = compute_dtype(semantic.dtype)
        if autocast:
            return compute, compute, compute
        return compute, attention.dtype, semantic.dtype

    def forward(self, attention: torch.Tensor, semantic: torch.Tensor):
        """(attention [B, N] or [B, H, W], semantic [B, C, H, W]) -> the same after the stack;
        computes with autocast off inside (activation_diffusion)."""
        compute, f_dtype, s_dtype = self._check_inputs(attention, semantic)
        B, C, H, W = semantic.shape
        with without_autocast(semantic.device):
            f = attention.to(compute).reshape(B, H, W)
            s = semantic.to(compute)
            lam = self.lam.to(compute)
            beta = self.beta.to(compute)
            if B == 0:
                # nothing to diffuse; outputs stay attached to lam and beta (zero gradients)
                anchor = (lam.sum() + beta.sum()) * 0
                f, s = f + anchor, s + anchor
            else:
                forward = self._forward_structured if self.implementation == "structured" else self._forward_dense
                f, s = forward(f, s, lam, beta, resolve_backend(self.backend, semantic))
        return f.reshape(attention.shape).to(f_dtype), s.to(s_dtype)

    def _update(self, f, u, beta):
        """tau = minmax(tanhshrink(u / (beta max F))) per image, [B, H, W]."""
        t = nn.functional.tanhshrink(_safe_div(u, beta * f.amax((1, 2), keepdim=True)))
        return minmax_normalize(t, (1, 2))

    def _forward_structured(self, f, s, lam, beta, backend):
        """docs/structured.md. The residual update S <- S (1 + tau) scales each patch vector by a
        positive number (tau is in [0, 1]), and cosines do not see positive scales: every
        block's E equals the first block's, in value and, the cosine being homogeneous of
        degree 0, in gradient. So the neighbour cosines are computed once, and S is scaled
        once at the end by the product of the (1 + tau)."""
        H, W = f.shape[1:]
        offsets = OFFSETS[self.connectivity]
        valid, degree = grid_masks(H, W, self.connectivity, s.dtype, s.device)
        # The backward holds one gradient of S, not two (GradSlot), except under torch.compile,
        # which cannot trace the hand-over: there it holds one more [B, C, H, W] tensor.
        slot = None if torch.compiler.is_compiling() else GradSlot()
        e, e_self = NeighbourCosine.apply(s, offsets, backend, slot)
        scale = torch.ones_like(f)
        matrix_free_max_steps = _routes().MATRIX_FREE_MAX_STEPS
        for block, p in enumerate(self.iterations):
            w = valid * (1 - lam[block] * e)                    # L[n, n + o_k]
            d = degree * (lam[block] * e_self - 1)              # L[n, n]
            if 2 ** p <= matrix_free_max_steps:
                if checks_enabled():
                    self._check_convergence_stencil(w, d, offsets, block, lam[block])
                route = "matrix-free series"
                u = stencil_series(f, w, d, self.alpha, p, offsets, self.exact_gradients, backend)
            elif (route := self._large_p_route(s)) == "chebyshev":
                # the check's bound on sigma_max(L) is the series' radius: computed once, and
                # the check runs before the series in a compiled graph too (it names the block)
                sigma = (self._check_convergence_stencil(w, d, offsets, block, lam[block]) if checks_enabled()
                         else None)
                u = chebyshev_filter(f, w, d, self.alpha, p, offsets, self.exact_gradients, backend, sigma)
            elif route == "spectral":
                u, eigenvalues = SpectralFilter.apply(f, w, d, self.alpha, p, offsets, self.exact_gradients)
                if checks_enabled():
                    assert_block_converges(self.token, eigenvalues.abs().amax(1), lam[block], self.alpha, block,
                                           self.connectivity)
            else:
                u = self._newton_schulz_apply(stencil_to_dense(w, d, offsets), f, p, block, lam[block], backend)
            assert_block_finite(self.token, u, lam[block], block, f"{route} route, p={p}")
            tau = self._update(f, u, beta[block])
            f = f + tau
            scale = scale * (1 + tau)
        return f, ScalePatches.apply(s, scale, slot, None if slot is None else e.grad_fn)

    def _large_p_route(self, s):
        """The route of the large-p blocks for semantic maps s [B, C, H, W] (compute dtype):
        large_p_route, else route_choice.choose_large_p_route. Decided at forward, so the
        backward runs the same route."""
        if self.large_p_route is not None:
            return self.large_p_route
        return _routes().choose_large_p_route(self, s)

    def _forward_dense(self, f, s, lam, beta, backend):
        """The published formulation, block by block, on scm_ops' three operators."""
        B, C, H, W = s.shape
        for block, p in enumerate(self.iterations):
            e = cosine_similarity(s.reshape(B, C, H * W).transpose(1, 2), backend=backend)
            L = spatial_semantic_laplacian(e, (H, W), lam[block], self.connectivity, backend=backend)
            u = self._newton_schulz_apply(L, f, p, block, lam[block], backend)
            assert_block_finite(self.token, u, lam[block], block, f"dense, p={p}")
            tau = self._update(f, u, beta[block])
            f = f + tau
            s = s * (1 + tau[:, None])
        return f, s

    def _newton_schulz_apply(self, L, f, p, block, lam, backend):
        """u = M F with M = X_p^T from Newton-Schulz on a block's dense L [B, N, N], for
        f [B, H, W]. The convergence check names the block and its lam, in eager mode and
        in a compiled graph (a custom operator), before the operator's own check."""
        if checks_enabled() and p > 0:
            L = assert_dense_converges(self.token, L, lam, self.alpha, block, self.connectivity)
        x = newton_schulz_inverse(L, p, self.alpha, detach_init=not self.exact_gradients, backend=backend)
        return (x.transpose(1, 2) @ f.reshape(*L.shape[:2], 1)).reshape(f.shape)

    def _check_convergence_stencil(self, w, d, offsets, block, lam):
        """Raise NewtonSchulzDivergenceError, naming the block and its lam, if the stencil L
        (w, d) makes Newton-Schulz diverge (a custom operator: kept in a compiled graph);
        returns the bound on sigma_max(L) per item, [B] float64."""
        return assert_stencil_converges(self.token, w, d, lam, self.alpha, block, 2 * len(offsets))


class ActivationDiffusion(nn.Module):
    """The Spatial Calibration Module's stack of activation diffusion blocks as a module: one
    learnable lam and beta per block, and a call of `activation_diffusion` (its docstring
    gives the computation, the routes, the checks and the errors).

    Args:
        grid_size, iterations, alpha, connectivity, exact_gradients, implementation,
        backend, large_p_route: as activation_diffusion's (published: iterations
            (16, 4, 4, 4), alpha 0.002, 4 neighbours); checked here.
        lam, beta: initial value of each block's learnable lam and beta (published 1.0, 0.5);
            a number for all blocks or a sequence with one per block. Parameters of shape
            [blocks], float32.

    Shapes:
        forward(attention, semantic): attention [B, N] or [B, H, W], semantic [B, C, H, W];
        returns (attention, semantic) after the stack, same shapes, as activation_diffusion.

    Wiring it into a timm-style ViT (attention weights exposed per block)::

        attn = [blk.attn.attn_weights for blk in vit.blocks]      # [B, heads, 1+N, 1+N] each
        f0 = scm_ops.attention_map_from_blocks(attn, grid)         # [B, H, W]
        tokens = vit.norm(x)[:, 1:]                                 # patch tokens [B, N, D]
        s0 = head(tokens.transpose(1, 2).reshape(B, D, H, W))       # 3x3 conv to C classes
        if training:
            f, s = diffusion(f0, s0)
            loss = F.cross_entropy(s.mean((2, 3)), labels)
        else:
            maps = scm_ops.localization_map(f0, s0, s0.mean((2, 3)).argmax(1))

    Any model that returns patch tokens works the same way; F0 may come from any
    non-negative [B, H, W] activation map.
    """

    def __init__(self, grid_size, iterations=(16, 4, 4, 4), alpha: float = 0.002, lam=1.0,
                 beta=0.5, connectivity: int = 4, exact_gradients: bool = False,
                 implementation: str = "structured", backend: str | None = None,
                 large_p_route: str | None = None):
        super().__init__()
        self.grid_size, self.iterations = check_config(grid_size, iterations, alpha, connectivity, implementation,
                                                       backend, large_p_route)
        self.alpha = float(alpha)
        self.connectivity = connectivity
        self.exact_gradients = bool(exact_gradients)
        self.implementation = implementation
        self.backend = backend
        self.large_p_route = large_p_route
        self.lam = nn.Parameter(self._per_block("lam", lam))
        self.beta = nn.Parameter(self._per_block("beta", beta))
        # Written by no one and read by no one: the finite-value and divergence checks are
        # custom operators that declare they write it, so that torch.compile keeps them in
        # its graph (docs/maths.md, "Checks under torch.compile"). Not in the state dict.
        self.register_buffer("_check_token", torch.zeros(()), persistent=False)

    def _per_block(self, name, value) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float32).flatten()
        if t.numel() == 1:
            t = t.repeat(len(self.iterations))
        if t.numel() != len(self.iterations):
            raise ValueError(f"{name} must be a number or have one value per block "
                             f"({len(self.iterations)}), got {t.numel()}")
        return t.clone()

    def extra_repr(self) -> str:
        return (f"grid_size={self.grid_size}, iterations={self.iterations}, alpha={self.alpha}, "
                f"connectivity={self.connectivity}, exact_gradients={self.exact_gradients}, "
                f"implementation={self.implementation!r}, backend={self.backend!r}, "
                f"large_p_route={self.large_p_route!r}")

    def forward(self, attention: torch.Tensor, semantic: torch.Tensor):
        """(attention [B, N] or [B, H, W], semantic [B, C, H, W]) -> the same after the stack
        (activation_diffusion with this module's settings, lam, beta and check token)."""
        return activation_diffusion(attention, semantic, self.lam, self.beta, grid_size=self.grid_size,
                                    iterations=self.iterations, alpha=self.alpha, connectivity=self.connectivity,
                                    exact_gradients=self.exact_gradients, implementation=self.implementation,
                                    backend=self.backend, large_p_route=self.large_p_route,
                                    check_token=self._check_token)


def localization_map(attention: torch.Tensor, semantic: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Inference map F0 * S0[c] (docs/maths.md, "F0 and S0"): attention [B, H, W], semantic
    [B, C, H, W], classes [B] (long) or [B, k] -> [B, H, W] or [B, k, H, W]."""
    if classes.dim() == 1:
        return attention * semantic[torch.arange(semantic.shape[0], device=semantic.device), classes]
    picked = torch.gather(semantic, 1, classes[:, :, None, None].expand(-1, -1, *semantic.shape[2:]))
    return attention[:, None] * picked
