"""Triton kernels of the structured fast path (scm_ops.structured), one module per piece.

L is a stencil on the H x W grid: (L x)[n] = d[n] x[n] + sum_k w_k[n] x[n + o_k] +
w_k[n - o_k] x[n - o_k], with offsets o_k = (0, 1), (1, 0) and, for 8 neighbours, also
(1, 1), (1, -1). Planes are row-major and contiguous: w [B, K, H, W], d and vectors
[B, H, W], the semantic map S [B, C, H, W].

- stencil: device functions shared by the kernels (shifted loads, the on-chip stencil
  product of a vector held by one program, gradient planes read as pair sums).
- neighbour_cosine: cosines of the C-vectors of grid neighbours, forward and backward.
- series: u = X_p F as 2^p matrix-free steps, one program per image, forward and backward.
- chebyshev: u = X_p F as a Chebyshev series in L^2 (large p), one program per image,
  forward and backward (both gradient semantics).
- cpu.c (C, not Triton): both series on the CPU, one image at a time with its vectors in
  cache; built at first use and called by scm_ops/structured/cpu.py.
"""
