"""scm-ops: differentiable operators for the Spatial Calibration Module (SCM, ECCV 2022).

Operators (batched over the leading dimension, registered as ``torch.ops.scm_ops.*``):

- :func:`cosine_similarity` -- pairwise cosine of patch vectors, [B, N, D] -> [B, N, N]
- :func:`spatial_semantic_laplacian` -- L = (D - A) * (lam * E - 1) on an H x W grid
- :func:`newton_schulz_inverse` -- X_0 = alpha L^T, X_{k+1} = X_k (2I - L X_k)

Backends: CUDA tensors run Triton kernels, CPU tensors plain PyTorch; ``backend=`` or the
environment variable ``SCM_OPS_BACKEND=triton|torch`` forces one.

Every operator and :class:`ActivationDiffusion` take float16, bfloat16, float32 and
float64 and compute in float32 (float64 for float64); outputs keep the input dtype, or are
float32 inside ``torch.autocast``. They compile with ``torch.compile(fullgraph=True)``,
checks included, and accept an empty batch. The maths: docs/maths.md.
"""
import sys as _sys

from ._source_tree import attach_source_kernels as _attach_source_kernels

_attach_source_kernels(_sys.modules[__name__])   # from a clone's root: the top-level kernels/

from .cosine import cosine_similarity
from .laplacian import grid_laplacian, spatial_semantic_laplacian
from .newton_schulz import NewtonSchulzDivergenceError, newton_schulz_inverse, spectral_norm_bound

__version__ = "0.1.0"

__all__ = [
    "cosine_similarity",
    "spatial_semantic_laplacian",
    "grid_laplacian",
    "newton_schulz_inverse",
    "NewtonSchulzDivergenceError",
    "spectral_norm_bound",
]

from .guards import NonFiniteOutputError
from .diffusion import ActivationDiffusion, activation_diffusion, localization_map, minmax_normalize

__all__ += ["ActivationDiffusion", "activation_diffusion", "NonFiniteOutputError", "localization_map",
            "minmax_normalize"]

from .attention import ClassAttentionRecorder, attention_map_from_blocks

__all__ += ["ClassAttentionRecorder", "attention_map_from_blocks"]
