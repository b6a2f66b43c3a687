"""Triton kernels of scm-ops (installed as ``scm_ops.kernels``).

One module per operator. Each holds only ``@triton.jit`` functions and the block-size
configurations its launcher in ``scm_ops`` chooses from; the launchers, the plain-PyTorch
paths and the autograd registration live in the ``scm_ops`` module of the same name.

Import these modules lazily and only after ``TRITON_INTERPRET`` has its final value:
Triton decides at decoration time whether a kernel is interpreted.
"""
