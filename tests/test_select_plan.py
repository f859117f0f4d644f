"""The Triton select's host-side plan at 1.3B to 2**36 values: sizes and memory, nothing allocated.

Every temporary of a mask update must fit 64 MiB + N / 64 bytes, and the candidate buffer must hold
the bracket's expected count, so the exact repair (radix passes over the scores) stays the rare path.
No path reaches the reference (that is checked at run time under the interpreter, in
tests/test_triton_interpreter.py); here, that nothing in the plan grows with N faster than the bound.
"""
import pytest

from benchmarks import shapes as S
from fsam_kernels.backends.triton_backend import TritonBackend
from fsam_kernels.triton_kernels.select_plan import MAX_BUFFER, bracket_ranks, budget, candidate_capacity, chunks_of

SIZES = {
    "decoder-1.3b": (S.decoder_1p3b().numel, chunks_of(S.decoder_1p3b().numel_list)),
    "llama-2-7b": (S.llama2_7b().numel, chunks_of(S.llama2_7b().numel_list)),
    "70b": (70 * 10**9, 70 * 10**9 // 4096 + 1000),
    "2**36": (1 << 36, (1 << 36) // 4096 + 1000),
}


@pytest.mark.parametrize("model", list(SIZES))
@pytest.mark.parametrize("kept", [1e-4, 0.1, 0.5, 0.9, 1.0])
def test_plan_fits_the_memory_bound(model, kept):
    n, chunks = SIZES[model]
    plan = TritonBackend().select_plan(n, chunks, max(1, int(kept * n)))
    assert plan.budget == budget(n) == (64 << 20) + n // 64
    assert plan.temporary_bytes <= plan.budget, dict(plan.temporaries)
    assert plan.parallel  # many programs for the searches and the scan
    assert 1 << 18 <= plan.n_samples <= 1 << 26 and plan.capacity <= MAX_BUFFER
    # the common path holds the bracket's expected candidates, with the usual quarter to spare
    assert plan.capacity >= 1.25 * plan.expected_candidates - 1, (plan.capacity, plan.expected_candidates)


def test_plan_at_7b_values():
    # Llama-2-7B at 10 % kept: the numbers the README states
    n, chunks = SIZES["llama-2-7b"]
    plan = TritonBackend().select_plan(n, chunks, n // 10)
    assert plan.n_samples == 1 << 23
    assert plan.temporary_bytes < 160e6 < plan.budget
    # a fixed 2**18-key sample and 2**24-key buffer (what overflowed at this size) would not hold it
    old = TritonBackend()
    old.max_sample_size, old.max_candidate_capacity = 1 << 18, 1 << 24
    stale = old.select_plan(n, chunks, n // 10)
    assert stale.expected_candidates > stale.capacity


def test_sample_grows_with_n_and_plan_rejects_bad_settings():
    backend = TritonBackend()
    sizes = [backend.select_plan(n, n // 4096 + 1, n // 2).n_samples for n in (10**8, 10**9, 10**10, 10**11)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    with pytest.raises(ValueError, match="k="):
        backend.select_plan(100, 1, 0)
    backend.scan_block = 3
    with pytest.raises(ValueError, match="scan_block"):
        backend.select_plan(100, 1, 5)


def test_candidate_buffer_grows_with_the_bracket():
    floor, ceiling, samples = 1 << 22, 1 << 24, 1 << 18
    for n, q in ((355_000_000, 0.1), (1_300_000_000, 0.1), (1_300_000_000, 0.5), (100_000_000, 0.5)):
        hi, lo = bracket_ranks(n, int(q * n), samples)
        cap = candidate_capacity(n, samples, hi, lo, floor, ceiling)
        expected = (lo - hi - 1) * n / samples  # keys strictly inside the bracket, on average
        assert floor <= cap <= ceiling and cap >= min(1.2 * expected, ceiling), (n, q, cap, expected)
    # 1.3B values at 10 % or 50 % kept outgrow a 4M-key buffer: the fixed buffer fell back on every update
    hi, lo = bracket_ranks(1_300_000_000, 130_000_000, samples)
    assert (lo - hi - 1) * 1_300_000_000 / samples > floor
    assert candidate_capacity(1000, 64, 10, 30, 4, 1 << 20) == min(1000, 19 * 16 + 19 * 16 // 4)


def test_candidates_grown_to_the_budget_leave_room_for_the_sample():
    # At 2**34 values the sample is 2**25 keys (128 MiB of a 320 MiB budget): a candidate buffer grown
    # as far as the budget allows must leave those bytes, or the mask update overruns its bound.
    n = 1 << 34
    backend = TritonBackend()
    backend.candidate_capacity = MAX_BUFFER  # the floor above the room: the buffer takes all that is left
    plan = backend.select_plan(n, n // 4096 + 1000, n // 2)
    temporaries = dict(plan.temporaries)
    assert temporaries["sample (int32 keys)"] == 4 * plan.n_samples >= 4 << 24
    assert plan.temporary_bytes <= plan.budget, temporaries
    assert plan.budget - plan.temporary_bytes < 4  # the candidates took the rest
