"""The README's Quickstart runs as written: its code blocks, with a small model, loader and loss in scope."""
from __future__ import annotations

import os
import re

import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def quickstart_blocks() -> list[str]:
    text = open(README, encoding="utf-8").read()
    start = text.index("## Quickstart")
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_quickstart_trains_in_both_forms():
    blocks = quickstart_blocks()
    assert len(blocks) == 2, "expected the two-call loop and the closure form"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    loader = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(4)]
    before = [p.detach().clone() for p in model.parameters()]
    scope = {"model": model, "loader": loader, "loss_fn": torch.nn.functional.cross_entropy}

    exec(compile(blocks[0], "README Quickstart", "exec"), scope)  # the two-call loop
    opt = scope["opt"]
    assert opt.step_count == 4 and opt.phase.name == "IDLE"
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())), "no weight moved"
    assert opt.masks() and sum(int(m.sum()) for m in opt.masks()) > 0

    exec(compile(blocks[1], "README closure form", "exec"), scope)  # x, y: the loop's last batch
    assert isinstance(scope["loss"], torch.Tensor) and torch.isfinite(scope["loss"])
    assert opt.step_count == 5 and all(p.grad is None for p in model.parameters())
