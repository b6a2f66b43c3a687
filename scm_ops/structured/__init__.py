"""The structured fast path of activation diffusion: one file per piece.

Every L that an activation diffusion block builds is a symmetric stencil on the patch grid,
and every Newton-Schulz iterate is a polynomial in L. So no block needs an N x N matrix
except where a route chooses one. The pieces (maths in docs/structured.md):

- stencil: the stencil's PyTorch form (products, row sums, dense matrix, reading a gradient
  at the stencil entries).
- neighbour_cosine: NeighbourCosine, the cosines of grid neighbours only, from S.
- series: StencilSeries, X_p F matrix-free in 2^p steps (blocks with small p).
- spectral: SpectralFilter, X_p F from one eigendecomposition (blocks with large p).
- chebyshev: ChebyshevFilter, X_p F as a Chebyshev series in L^2 (blocks with large p).
- grad_slot: ScalePatches and GradSlot, the residual scaling of S with one gradient buffer.

Each autograd Function has its own backward (both Newton-Schulz gradient semantics); the
Triton kernels live in kernels/structured/ (installed as scm_ops.kernels.structured).
"""
from .chebyshev import ChebyshevFilter, chebyshev_filter, chebyshev_max_cells
from .grad_slot import GradSlot, ScalePatches
from .neighbour_cosine import NeighbourCosine
from .series import StencilSeries, series_max_cells, stencil_series
from .spectral import SpectralFilter
from .stencil import OFFSETS, Stencil, grid_masks, stencil_to_dense

__all__ = ["ChebyshevFilter", "chebyshev_filter", "chebyshev_max_cells", "GradSlot", "ScalePatches", "NeighbourCosine", "StencilSeries", "series_max_cells", "stencil_series", "SpectralFilter",
           "OFFSETS", "Stencil", "grid_masks", "stencil_to_dense"]
