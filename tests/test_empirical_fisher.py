"""empirical_fisher against a naive per-sample loop."""
import pytest
import torch

from fsam_kernels import empirical_fisher
from helpers import TinyNet, make_batches


def naive_fisher(model, loss_fn, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    n = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            model.zero_grad()
            loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
            for t, p in zip(total, params):
                if p.grad is not None:
                    t.add_(p.grad * p.grad)
            n += 1
    return [t / n for t in total]


@pytest.mark.parametrize("method", ["vmap", "loop", "auto"])
def test_matches_naive_loop(method):
    torch.manual_seed(0)
    model = TinyNet()
    batches = make_batches(n_batches=2, batch=5)
    got = empirical_fisher(model, torch.nn.functional.cross_entropy, batches, method=method)
    want = naive_fisher(model, torch.nn.functional.cross_entropy, batches)
    assert list(got) == list(model.parameters())
    for p, w in zip(model.parameters(), want):
        assert got[p].dtype == torch.float32
        torch.testing.assert_close(got[p], w, rtol=1e-5, atol=1e-9)


class NeedsHostValues(torch.nn.Module):
    """Data-dependent Python control flow: torch.func cannot vmap it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        if x.sum().item() > 0:
            return self.fc(x)
        return self.fc(-x)


def test_falls_back_to_loop_with_a_warning():
    torch.manual_seed(0)
    model = NeedsHostValues()
    batches = [(torch.randn(3, 4), torch.tensor([0, 1, 1]))]
    with pytest.warns(RuntimeWarning, match="per-sample loop"):
        got = empirical_fisher(model, torch.nn.functional.cross_entropy, batches)
    want = naive_fisher(model, torch.nn.functional.cross_entropy, batches)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(got[p], w)
    with pytest.raises(Exception):
        empirical_fisher(model, torch.nn.functional.cross_entropy, batches, method="vmap")


def test_dict_inputs_and_param_subset():
    class KwModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 2)
            self.b = torch.nn.Linear(3, 2)

        def forward(self, left, right):
            return self.a(left) + self.b(right)

    torch.manual_seed(0)
    m = KwModel()
    x = {"left": torch.randn(4, 3), "right": torch.randn(4, 3)}
    y = torch.tensor([0, 1, 0, 1])
    got = empirical_fisher(m, torch.nn.functional.cross_entropy, [(x, y)], params=m.a.parameters())
    assert set(got) == set(m.a.parameters())
    loop = empirical_fisher(m, torch.nn.functional.cross_entropy, [(x, y)], params=m.a.parameters(), method="loop")
    for p in got:
        torch.testing.assert_close(got[p], loop[p])


def test_bad_arguments():
    m = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="method"):
        empirical_fisher(m, torch.nn.functional.cross_entropy, [], method="exact")
    with pytest.raises(ValueError, match="no sample"):
        empirical_fisher(m, torch.nn.functional.cross_entropy, [])
