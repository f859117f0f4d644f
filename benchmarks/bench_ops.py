"""Per-op microbenchmarks (pytest-benchmark): every op x method x parameter set x dtype."""
import pytest

from .ops import make_method, measure
from .plan import fits, workload


def test_op(benchmark, plan, record, op_case):
    c = op_case
    reason = fits(c.shape_set, c.dtype, plan.device)
    if reason:
        pytest.skip(reason)
    wl = workload(c.shape_set, c.dtype, plan.device)
    method = make_method(c.method, wl)
    benchmark.group = f"{c.op} {c.shape_set.name} {str(c.dtype)[6:]}"
    s = plan.settings
    row = measure(wl, method, c.op, rounds=s.rounds, warmup=s.warmup, mode=plan.mode, pedantic=benchmark.pedantic)
    record([row])
