"""Helpers the test files share: a tiny model and its batches, layouts and random tensors, mask and
tensor comparisons with readable messages, and cases several suites run (halfway rounding, the skip
rule, the sharded top-k pass by pass). Fixtures live in conftest.py; the backend targets of the
conformance suite in backend_targets.py.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F

from fsam_kernels import reference as ref
from fsam_kernels.layout import ParamLayout


# ------------------------------------------------------------------------------------ a tiny model
class TinyNet(torch.nn.Module):
    """A few differently shaped tensors (matrix, bias, norm, embedding) — small enough for exact oracles."""

    def __init__(self, vocab=13, dim=8, classes=3):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.fc1 = torch.nn.Linear(dim, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.fc2 = torch.nn.Linear(16, classes)

    def forward(self, tokens):
        h = self.emb(tokens).mean(dim=1)
        return self.fc2(self.norm(torch.relu(self.fc1(h))))


def make_batches(n_batches=6, batch=12, seq=5, vocab=13, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(n_batches)
    ]


def clone_model(model, dtype=None):
    m = copy.deepcopy(model)
    return m.to(dtype) if dtype is not None else m


# ------------------------------------------------------------------------------------ tensors, layouts
def random_tensors(shapes, dtypes=torch.float32, device="cpu", seed: int = 0, quantize: bool = False):
    """Normal values (on ``device``'s generator, so large tensors are made on the GPU); ``quantize``
    rounds to multiples of 1/4: few distinct values, large ties at any threshold."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for s, dt in zip(shapes, dtypes):
        t = torch.randn(s, device=device, generator=g)
        if quantize:
            t = torch.round(t * 4) / 4
        out.append(t.to(dt))
    return out


def layout_of(params, masked=None, adaptive=False, rho=None) -> ParamLayout:
    """A layout of ``params``: every tensor masked unless ``masked`` says otherwise; ``adaptive`` and
    ``rho`` one value for all or one per tensor (rho defaults to 0.05, 0.06, 0.07, 0.05, ...)."""
    n = len(params)
    adaptive = adaptive if isinstance(adaptive, (list, tuple)) else [adaptive] * n
    if rho is None:
        rho = [0.05 + 0.01 * (i % 3) for i in range(n)]
    rho = rho if isinstance(rho, (list, tuple)) else [rho] * n
    return ParamLayout(list(params), masked if masked is not None else [True] * n, rho, adaptive)


# ------------------------------------------------------------------------------------ comparisons
def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    """Where two tensors first differ, for readable assertion messages."""
    diff = (a != b).reshape(-1).nonzero()
    if diff.numel() == 0:
        return "equal"
    i = int(diff[0])
    return f"first mismatch at flat index {i}: {a.reshape(-1)[i].item()} vs {b.reshape(-1)[i].item()} ({diff.numel()} differ)"


def assert_same_mask(layout, got, want, what=""):
    """Packed masks bit for bit; on a difference, the first masked tensor that differs (or the padding)."""
    assert got.dtype == torch.uint8 and got.shape == want.shape, what
    if not torch.equal(got, want):
        for j, (a, b) in enumerate(zip(ref.unpack_mask(layout, got), ref.unpack_mask(layout, want))):
            assert torch.equal(a, b), f"{what} masked tensor {j}: {first_mismatch(a.to(torch.uint8), b.to(torch.uint8))}"
        raise AssertionError(f"{what} padding bits differ: {first_mismatch(got, want)}")


# ------------------------------------------------------------------------------------ shared cases
def check_sharded_select(backend, layout, scores, k):
    """The sharded top-k's primitives of ``backend`` against the reference, pass by pass (batch keys),
    with the threshold's tie quotas and half of them; the full quotas give select_mask's mask."""
    from fsam_kernels import distributed_select as ds

    prefix, remaining = 0, k
    for shift in ds.PASS_SHIFTS:
        rows = backend.key_histogram(layout, scores, True, prefix, shift, ds.RADIX_BITS)
        want = ref.key_histogram_reference(layout, scores, True, prefix, shift, ds.RADIX_BITS)
        assert torch.equal(rows, want), f"key histogram at shift {shift}"
        digit, remaining = ds.next_digit(rows.sum(dim=0).cpu(), remaining)
        prefix = (prefix << ds.RADIX_BITS) | digit
    quotas = ds.tie_quotas(rows[:, digit].unsqueeze(0).cpu(), remaining)[0].tolist()
    for qs in (quotas, [q // 2 for q in quotas]):  # the second stops inside some tensors' ties
        bits = backend.mask_from_threshold(layout, scores, True, prefix, qs)
        assert torch.equal(bits, ref.mask_from_threshold_reference(layout, scores, True, prefix, qs)), qs
    assert torch.equal(backend.mask_from_threshold(layout, scores, True, prefix, quotas),
                       ref.select_mask_reference(layout, scores, k, True))


# bf16 / fp16 perturbations that land exactly halfway between two representable values: w + g * rho
# with g = 1, norm = 1 and rho half a unit in the last place. Round to nearest even keeps 1.0 and
# takes the upper neighbour of 1 + ulp (ties away from zero would move both up).
HALFWAY_CASES = {
    torch.bfloat16: ([1.0, 1.0078125], 2.0**-8, [1.0, 1.015625]),
    torch.float16: ([1.0, 1.0 + 2.0**-10], 2.0**-11, [1.0, 1.0 + 2.0**-9]),
}


def halfway_case(dtype, device="cpu"):
    """(layout of one dense tensor, its gradients, the norm, the perturbed weights round-to-nearest-even gives)."""
    start, rho, want = HALFWAY_CASES[dtype]
    w = torch.tensor(start, dtype=dtype, device=device)
    layout = ParamLayout([w], [False], [rho], [False])
    return (layout, [torch.ones(2, dtype=dtype, device=device)], torch.tensor(1.0, device=device),
            torch.tensor(want, dtype=dtype, device=device))


# The skip rule at its boundaries: (label, gradient values, dtype, adaptive weight or None, perturbed?)
SKIP_RULE_CASES = [
    # fp32: the fp32 sum of squares (4.1e39) overflows, the norm (6.4e19) does not
    ("fp32-sum-overflows", [1e18] * 4096, torch.float32, None, True),
    # fp32: every single square (1e40) overflows fp32
    ("fp32-squares-overflow", [1e20] * 3, torch.float32, None, True),
    # the norm itself, 2 * 1.6e38 = 3.2e38, still fits fp32 ...
    ("fp32-norm-just-fits", [1.6e38] * 4, torch.float32, None, True),
    # ... 2 * 1.8e38 = 3.6e38 does not: the scale could not be represented
    ("fp32-norm-beyond-fp32", [1.8e38] * 4, torch.float32, None, False),
    ("fp32-inf", [1.0, float("inf"), 2.0], torch.float32, None, False),
    ("fp32-nan", [1.0, float("nan"), 2.0], torch.float32, None, False),
    ("bf16-squares-overflow", [1e20] * 5, torch.bfloat16, None, True),
    ("fp16-inf", [1.0, float("-inf")], torch.float16, None, False),
    # ASAM: |w| * g = 1e25 is finite, its fp32 square is not
    ("asam-product-squared-overflows", [1e15] * 6, torch.float32, 1e10, True),
    # ASAM: |w| * g = 0 * inf is NaN
    ("asam-zero-weight-inf-grad", [float("inf")] * 2, torch.float32, 0.0, False),
    # fp64: S = 4e300 fits fp64 ...
    ("fp64-sum-fits", [1e150] * 4, torch.float64, None, True),
    # ... S = 4e310 does not (its squares overflow fp64)
    ("fp64-squares-overflow", [1e155] * 4, torch.float64, None, False),
    # one element: torch.linalg.vector_norm returns |x| without squaring; the rule squares
    ("fp64-one-element", [1e200], torch.float64, None, False),
]


def skip_rule_case(values, dtype, weight, device="cpu"):
    g = torch.tensor(values, dtype=torch.float64).to(dtype).to(device)
    w = torch.full(g.shape, 0.5 if weight is None else weight, dtype=torch.float64).to(dtype).to(device)
    # a second, ordinary tensor: the decision is global
    params, grads = [w, torch.ones(3, dtype=dtype, device=device)], [g, torch.ones(3, dtype=dtype, device=device)]
    adaptive = weight is not None
    return ParamLayout(params, [False, False], [0.05, 0.05], [adaptive, adaptive]), params, grads


def views_into_one_buffer(sizes, dtype, offset, seed, device="cpu"):
    """Contiguous tensors that are views into one flat buffer from element ``offset`` on (a flattened
    model's parameters): with an odd offset none starts on 16 bytes."""
    (flat,) = random_tensors([offset + sum(sizes)], dtype, device, seed)
    out, at = [], offset
    for n in sizes:
        out.append(flat[at : at + n])
        at += n
    return out


def per_sample(model, x, y):
    """Per-sample cross-entropy losses (what ESAM's closure returns)."""
    return F.cross_entropy(model(x), y, reduction="none")


def family_step(kind, opt, model, x, y):
    """One step of a SAM-family optimizer on (x, y) after the first backward: ESAM's closure returns
    per-sample losses of the chosen samples, the others' calls backward(); gradients cleared after."""
    losses = per_sample(model, x, y)
    losses.mean().backward()
    if kind == "esam":
        opt.step(lambda idx: per_sample(model, x, y) if idx is None else per_sample(model, x[idx], y[idx]),
                 losses=losses)
    else:
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    opt.zero_grad()


# ------------------------------------------------------------------------------------ spawned ranks
def leave_spawned_rank() -> None:
    """End a rank started by ``torch.multiprocessing.spawn`` once its results are written and its process
    group destroyed, without the interpreter's teardown: the spawn start method finishes with
    ``sys.exit``, and a distributed thread torch leaves behind can then abort the process ("terminate
    called without an active exception", SIGABRT; seen in a loaded CI run), failing a test that passed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------ child processes
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def child_env(drop=(), **extra):
    """The environment of a child Python process that imports what this one imported: the directory
    fsam_kernels came from (the source tree, or site-packages after a non-editable install) and
    tests/ first on PYTHONPATH. Start the child in TESTS_DIR, not the source tree's root, whose
    fsam_kernels (no compiled extension after ``pip install .``) would come first on sys.path."""
    import fsam_kernels

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(fsam_kernels.__file__)))
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, TESTS_DIR, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def cpu_backend_or_skip(name: str) -> str:
    """``name`` when that backend runs on the CPU here; otherwise the test skips, saying why."""
    import pytest

    from fsam_kernels.backends import BackendUnavailable, get_backend

    try:
        get_backend(name, "cpu")
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    return name
