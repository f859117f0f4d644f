import copy

import pytest
import torch


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


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def batches():
    return make_batches()


def clone_model(model, dtype=None):
    m = copy.deepcopy(model)
    return m.to(dtype) if dtype is not None else m


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    """Where two tensors first differ, for readable assertion messages."""
    diff = (a != b).reshape(-1).nonzero()
    if diff.numel() == 0:
        return "equal"
    i = int(diff[0])
    return f"first mismatch at flat index {i}: {a.reshape(-1)[i].item()} vs {b.reshape(-1)[i].item()} ({diff.numel()} differ)"


def check_sharded_select(backend, layout, scores, k):
    """The sharded top-k's primitives of ``backend`` against the reference, pass by pass (batch keys),
    with the threshold's tie quotas and half of them; the full quotas give select_mask's mask."""
    from fsam_kernels import distributed_select as ds
    from fsam_kernels import reference as ref

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


def halfway_case(dtype):
    """(layout of one dense tensor, its gradients, the norm, the perturbed weights round-to-nearest-even gives)."""
    from fsam_kernels.layout import ParamLayout

    start, rho, want = HALFWAY_CASES[dtype]
    w = torch.tensor(start, dtype=dtype)
    layout = ParamLayout([w], [False], [rho], [False])
    return layout, [torch.ones(2, dtype=dtype)], torch.tensor(1.0), torch.tensor(want, dtype=dtype)
