"""Optimizer-state, saved-value and (CUDA) peak extra bytes per method; no timing."""
import pytest

from .memory import memory_rows
from .plan import fits, workload


def test_memory(plan, record, memory_case):
    c = memory_case
    reason = fits(c.shape_set, c.dtype, plan.device)
    if reason:
        pytest.skip(reason)
    record(memory_rows(workload(c.shape_set, c.dtype, plan.device), c.method, plan.mode))
