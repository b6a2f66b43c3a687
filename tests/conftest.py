"""Test set-up: the device the operators run on, and the backends under test.

Without CUDA the Triton kernels run in Triton's CPU interpreter, switched on here before
any kernel module is imported (scm_ops imports them lazily). On a CUDA machine, or with
SCM_OPS_TEST_DEVICE=cuda, both backends run on CUDA tensors.
"""
import os

import pytest
import torch

from scm_ops.testing import device_under_test

DEVICE = device_under_test()
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("SCM_OPS_BACKEND", None)
# On a GPU the default large-p route would be measured and cached on disk at first use; the
# tests pin what they test (tests/test_route_choice.py switches measuring on where it tests it).
os.environ.setdefault("SCM_OPS_ROUTE_TUNING", "0")


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a case that takes tens of seconds in Triton's interpreter; the "
                                       "default run (and CI) includes them, -m 'not slow' leaves them out")


def pytest_report_header(config):
    return f"scm-ops tests on {DEVICE} (Triton {'interpreter' if DEVICE.type == 'cpu' else 'compiled'})"
