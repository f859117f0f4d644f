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
