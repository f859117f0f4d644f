"""Sizes of the Triton global top-k (:mod:`.select`) for ``N`` masked values, and its memory bound.

Host arithmetic only (no Triton, no allocation), so the plan of a 70B-value model can be computed and
checked anywhere. The selection (see :mod:`.select`) samples ``S`` keys, brackets the k-th largest
key between two order statistics of the sample, and compacts the keys strictly inside the bracket
into a candidate buffer. About ``10 N sqrt(q (1 - q) / S)`` keys fall inside (``q = k / N``), so:

* the sample grows with ``N``: ``S ~ (3.125 N)**(2/3)`` (a power of two) minimises ``4 S`` bytes of
  sample plus ``4 * 1.25 * 5 N / sqrt(S)`` bytes of candidates at ``q = 1/2``;
* the candidate buffer follows the bracket's expected count (plus a quarter), within what the
  budget leaves after every other temporary.

Temporaries stay within :func:`budget` = 64 MiB + N / 64 bytes: at 7B values that is ~176 MB against
the 28 GB of keys a concatenating top-k reads. A bracket that misses the k-th key, or candidates that
overflow the buffer, are finished exactly by radix passes over the scores themselves (no extra
memory), so no size of model or value of ``k`` needs more.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import CHUNK, N_GROUPS

BUDGET_BASE = 64 << 20
BUDGET_DIVISOR = 64
MAX_BUFFER = (1 << 31) - 1  # sample and candidate buffers are indexed by int64 but counted in int32 bins
SMALL_TABLES = 64 << 10  # params, info, selection rows, radix histograms: a few KiB


def budget(n_total: int) -> int:
    """Bytes of temporaries a mask update of ``n_total`` values may use: 64 MiB + N / 64."""
    return BUDGET_BASE + n_total // BUDGET_DIVISOR


def sample_count(n_total: int, least: int, most: int) -> int:
    """Keys sampled for the bracket: ~(3.125 N)**(2/3) as a power of two, within [least, most], <= N."""
    ideal = (3.125 * max(n_total, 1)) ** (2.0 / 3.0)
    s = 1 << max(0, round(math.log2(ideal)))
    return min(n_total, max(least, min(most, s)))


def bracket_ranks(n_total: int, k: int, n_samples: int) -> tuple[int, int]:
    """1-based sample ranks of the bracket keys ``hi`` and ``lo`` (out of range: no bound)."""
    q = k / n_total
    r = q * n_samples
    margin = 5.0 * math.sqrt(n_samples * q * (1.0 - q)) + 4.0
    return math.floor(r - margin), math.ceil(r + margin) + 1


def expected_candidates(n_total: int, n_samples: int, rank_hi: int, rank_lo: int) -> int:
    """Keys expected strictly inside the bracket: its span in sample ranks times N / S."""
    span = max(0, min(rank_lo, n_samples + 1) - max(rank_hi, 0) - 1)
    return span * -(-n_total // n_samples)


def candidate_capacity(n_total: int, n_samples: int, rank_hi: int, rank_lo: int, floor: int, ceiling: int) -> int:
    """Candidate buffer size for a bracket: the keys expected inside it plus a quarter, within
    ``[floor, ceiling]`` and at most N."""
    expected = expected_candidates(n_total, n_samples, rank_hi, rank_lo)
    return min(n_total, max(floor, min(ceiling, expected + expected // 4)))


@dataclass(frozen=True)
class SelectPlan:
    """What one mask update of ``n_total`` values in ``n_chunks`` chunks allocates and launches."""

    n_total: int
    n_chunks: int
    k: int
    n_samples: int  # 0: as few keys as a sample, all of them are candidates
    rank_hi: int
    rank_lo: int
    capacity: int
    expected_candidates: int
    parallel: bool  # radix passes over many programs, multi-program scan (large models)
    scan_block: int  # chunks per program of the multi-program scan
    budget: int
    temporaries: tuple[tuple[str, int], ...]  # (name, bytes)

    @property
    def temporary_bytes(self) -> int:
        return sum(b for _, b in self.temporaries)

    @property
    def scan_blocks(self) -> int:
        return -(-self.n_chunks // self.scan_block)


def plan_select(n_total: int, n_chunks: int, k: int, *, least_samples: int, most_samples: int,
                least_capacity: int, most_capacity: int | None, parallel_min: int, scan_block: int) -> SelectPlan:
    """The sizes of a mask update; ``most_capacity`` None: as many candidates as the budget allows.

    Raises ``ValueError`` if the settings leave no room for a candidate buffer within the budget."""
    if not 1 <= k <= n_total:
        raise ValueError(f"select_mask: expected 1 <= k <= {n_total}, got k={k}")
    if scan_block < 2 or scan_block & (scan_block - 1):
        raise ValueError(f"select_mask: expected scan_block a power of two >= 2, got {scan_block}")
    parallel = n_total >= parallel_min
    limit = budget(n_total)
    scan_blocks = -(-n_chunks // scan_block)
    fixed = [
        ("chunk counts (3 x int32 per chunk)", 12 * n_chunks),
        ("tie quotas (int64 per chunk)", 8 * n_chunks),
        ("prefix counts (int64 per chunk, kept with the mask)", 8 * n_chunks),
        ("scan block sums and carries", 8 * (3 * N_GROUPS + 1) * scan_blocks if parallel else 0),
        ("small tables", SMALL_TABLES),
    ]
    if n_total <= min(least_capacity, least_samples):  # all keys are candidates, no sampling
        n_samples, rank_hi, rank_lo, cap, expected = 0, 0, 1, n_total, n_total
    else:
        n_samples = sample_count(n_total, least_samples, min(most_samples, MAX_BUFFER))
        rank_hi, rank_lo = bracket_ranks(n_total, k, n_samples)
        expected = expected_candidates(n_total, n_samples, rank_hi, rank_lo)
        room = (limit - sum(b for _, b in fixed) - 4 * n_samples) // 4
        ceiling = min(room, MAX_BUFFER, most_capacity if most_capacity is not None else room)
        if ceiling < 1:
            raise ValueError(f"select_mask: {n_samples} samples leave no room for candidates within the "
                             f"{limit}-byte budget of {n_total} values")
        cap = min(candidate_capacity(n_total, n_samples, rank_hi, rank_lo, least_capacity, ceiling), ceiling)
    temporaries = tuple(fixed) + (("sample (int32 keys)", 4 * max(n_samples, 1)),
                                  ("candidates (int32 keys)", 4 * max(cap, 1)))
    return SelectPlan(n_total=n_total, n_chunks=n_chunks, k=k, n_samples=n_samples, rank_hi=rank_hi,
                      rank_lo=rank_lo, capacity=cap, expected_candidates=expected, parallel=parallel,
                      scan_block=scan_block, budget=limit, temporaries=temporaries)


def chunks_of(numels) -> int:
    """Chunks of :data:`CHUNK` values the kernels cut these tensor sizes into."""
    return sum(-(-n // CHUNK) for n in numels)
