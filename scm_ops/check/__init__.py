"""The self-check of scm_ops on this machine (``python -m scm_ops.check``, installed as
``scm-ops-check``): the Triton kernels against the PyTorch path. The command line and what
each group checks: ``cli.py``. One module per concern:

- ``cli.py``: the command line, the header (device, versions) and the order of the groups.
- ``report.py``: the check lines (``Report``), what the groups share (``Context``), settings.
- ``operators.py``: the groups "operators" and "layouts".
- ``stack.py``: the groups "diffusion" and "reference" (ActivationDiffusion).
- ``kernels.py``: the groups "launches" and "resources" (the AOT tables, registers, spills).
- ``timing.py``: the group "timing" (the large-p routes; not a check).
"""
from .cli import GROUPS, describe_machine, main
from .kernels import aot_kernels, check_launches, check_resources, recording_launches
from .operators import check_layouts, check_operators
from .report import BACKENDS, Context, Report, native_bf16
from .stack import check_diffusion, check_reference, diffusion_configs, large_p_routes, largest_grids
from .timing import time_routes

__all__ = ["main", "GROUPS", "BACKENDS", "Report", "Context", "native_bf16", "describe_machine", "check_operators",
           "check_layouts", "check_diffusion", "check_reference", "diffusion_configs", "large_p_routes",
           "largest_grids", "aot_kernels", "recording_launches", "check_launches", "check_resources", "time_routes"]
