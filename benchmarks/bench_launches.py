"""Kernel launches (CUDA) or top-level ATen ops (CPU) per step and per mask update; no timing."""
import pytest

from .launches import launch_rows
from .ops import make_method
from .plan import fits, workload


def test_launches(plan, record, launch_case):
    c = launch_case
    reason = fits(c.shape_set, c.dtype, plan.device)
    if reason:
        pytest.skip(reason)
    wl = workload(c.shape_set, c.dtype, plan.device)
    record(launch_rows(wl, make_method(c.method, wl), plan.mode))
