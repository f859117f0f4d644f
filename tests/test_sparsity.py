"""2:4 sparse models end to end (fsam_kernels.sparsity): prune_nm against the reference on every backend,
FSAM(keep_pruned=True) keeping a pruned model exactly pruned, the perturbation and k on pruned models,
the support in checkpoints, torch.nn.utils.prune interop and the semi-structured export."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fsam_kernels import ESAM, FSAM, GSAM, SAM
from fsam_kernels.layout import ParamLayout
from fsam_kernels import reference as ref
from fsam_kernels.reference import select_nm_mask_reference
from fsam_kernels.sparsity import prune_nm, to_semi_structured
from helpers import cpu_backend_or_skip

BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.native), pytest.param("triton", marks=pytest.mark.triton)]


class Tiny(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 8, dtype=dtype)
        self.fc2 = torch.nn.Linear(8, 6, dtype=dtype)
        self.head = torch.nn.Linear(6, 3, dtype=dtype)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def data(dtype=torch.float32, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def weights(model):
    return [p for p in model.parameters() if p.dim() >= 2]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_still_pruned(model, support):
    for i, (p, alive) in enumerate(zip(weights(model), support)):
        assert torch.equal(p.detach() != 0, alive), f"weight {i}: the support changed"
        assert bool((bits_of(p)[~alive] == 0).all()), f"weight {i}: a pruned weight is not +0.0"


# --------------------------------------------------------------------------- staying 2:4
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "gradscaler"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_2_4_model_stays_exactly_2_4_through_50_adamw_steps(backend, dtype, scaled):
    cpu_backend_or_skip(backend)
    torch.manual_seed(0)
    model = Tiny(dtype)
    result = prune_nm(model, "2:4", backend=backend)
    assert set(result.kept) == {"fc1.weight", "fc2.weight"} and "head.weight" in result.skipped
    support = [p.detach() != 0 for p in weights(model)]
    before = [p.detach().clone() for p in weights(model)]
    opt = FSAM(model.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1, structure="2:4", keep_pruned=True,
               backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaled else None
    x, y = data(dtype)

    def closure():
        loss = F.cross_entropy(model(x).float(), y)
        (scaler.scale(loss) if scaled else loss).backward()
        return loss

    for _ in range(50):
        closure()
        opt.step(closure, scaler=scaler)
        opt.zero_grad()
    assert_still_pruned(model, support)
    for p, b, alive in zip(weights(model), before, support):
        assert not torch.equal(p.detach()[alive], b[alive])  # the survivors trained


def test_without_keep_pruned_adamw_makes_the_pruned_model_dense():
    # What keep_pruned is for: the base optimizer's update moves the zeros.
    torch.manual_seed(0)
    model = Tiny()
    prune_nm(model, "2:4", backend="torch")
    opt = FSAM(model.parameters(), torch.optim.AdamW, lr=1e-2, structure="2:4", backend="torch")
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    opt.step(lambda: F.cross_entropy(model(x), y).backward())
    assert all(bool((p.detach() != 0).all()) for p in weights(model)[:2])


@pytest.mark.parametrize("kind", ["sgd-momentum-accumulated", "esam", "gsam"])
def test_keep_pruned_with_sgd_momentum_accumulation_and_the_family(kind):
    torch.manual_seed(0)
    model = Tiny()
    prune_nm(model, "2:4", backend="torch")
    support = [p.detach() != 0 for p in weights(model)]
    x, y = data()
    if kind == "sgd-momentum-accumulated":
        opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1, structure="2:4",
                   keep_pruned=True, backend="torch")
        for _ in range(10):
            for half in (slice(0, 8), slice(8, 16)):  # two accumulated micro-batches per pass
                (F.cross_entropy(model(x[half]), y[half]) / 2).backward()
            opt.first_step(zero_grad=True)
            for half in (slice(0, 8), slice(8, 16)):
                (F.cross_entropy(model(x[half]), y[half]) / 2).backward()
            opt.second_step(zero_grad=True)
    else:
        cls, extra = (ESAM, dict(beta=0.5, gamma=1.0)) if kind == "esam" else (GSAM, dict(alpha=0.1))
        opt = cls(model.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1, structure="2:4", keep_pruned=True,
                  backend="torch", **extra)
        for _ in range(10):
            losses = F.cross_entropy(model(x), y, reduction="none")
            losses.mean().backward()
            if kind == "esam":
                opt.step(lambda idx: F.cross_entropy(model(x if idx is None else x[idx]), y if idx is None else y[idx],
                                                     reduction="none"), losses=losses)
            else:
                opt.step(lambda: F.cross_entropy(model(x), y).backward())
            opt.zero_grad()
    assert opt.keep_pruned
    assert_still_pruned(model, support)
    stats = opt.memory_stats()  # the support is the only state keep_pruned adds: 1 bit per masked element
    assert stats["support"] == stats["mask"] == opt._mask.bits.numel()


def test_keep_pruned_arguments_are_checked():
    model = Tiny()
    with pytest.raises(ValueError, match="preserve_zeros=False with keep_pruned=True"):
        FSAM(model.parameters(), torch.optim.SGD, lr=0.1, keep_pruned=True, preserve_zeros=False)
    with pytest.raises(TypeError, match="keep_pruned"):
        FSAM(model.parameters(), torch.optim.SGD, lr=0.1, keep_pruned=1)
    with pytest.raises(TypeError, match="keep_pruned"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, keep_pruned=True)
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, keep_pruned=True)
    assert opt.preserve_zeros and opt.keep_pruned and opt.structure is None


# --------------------------------------------------------------------------- prune_nm
def tied_model(seed=0):
    """Weights with few distinct magnitudes (ties in most groups), one indivisible, one 1-D."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-2, 3, s, generator=g).float() for s in [(6, 16), (3, 2, 8), (4, 6), (8,)]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scores", ["magnitude", "given"])
def test_prune_nm_matches_the_reference_bit_for_bit_with_ties(backend, scores):
    cpu_backend_or_skip(backend)
    params = tied_model()
    g = torch.Generator().manual_seed(5)
    given = [torch.randint(0, 3, p.shape, generator=g).float() for p in params]
    eligible = [params[0], params[1]]
    keys = [p.abs() for p in eligible] if scores == "magnitude" else given[:2]
    layout = ParamLayout(eligible, [True, True], [0.0, 0.0], [False, False])
    want_masks = ref.unpack_mask(layout, select_nm_mask_reference(layout, keys, 2, 4, False))
    want = [p.masked_fill(~m, 0) for p, m in zip(eligible, want_masks)] + [params[2].clone(), params[3].clone()]
    result = prune_nm(params, "2:4", scores="magnitude" if scores == "magnitude" else given, backend=backend)
    for i, (p, w) in enumerate(zip(params, want)):
        assert torch.equal(bits_of(p), bits_of(w)), f"params[{i}] differs from the reference"
    assert result.backend == backend
    assert set(result.skipped) == {"params[2]", "params[3]"}
    assert "not divisible by 4" in result.skipped["params[2]"] and "fewer than 2" in result.skipped["params[3]"]
    for name, p in zip(("params[0]", "params[1]"), params):
        assert result.kept[name] == int(torch.count_nonzero(p)) / p.numel() <= 0.5


def test_prune_nm_ties_go_to_the_lower_index():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.5, 2.0, 2.0, 0.5]])
    prune_nm([w], "2:4", backend="torch")
    assert w.tolist() == [[1.0, -1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0]]


def test_fisher_and_magnitude_pruning_differ_on_a_hand_made_case():
    layer = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))
    fisher = {layer.weight: torch.tensor([[0.0, 0.1, 1.0, 9.0]])}  # saliency w^2 F: 0, 0.9, 4, 9
    by_magnitude = copy.deepcopy(layer)
    prune_nm(by_magnitude, "2:4", scores="magnitude")
    assert by_magnitude.weight.tolist() == [[4.0, 3.0, 0.0, 0.0]]
    result = prune_nm(layer, "2:4", scores="fisher", fisher=fisher)
    assert layer.weight.tolist() == [[0.0, 0.0, 2.0, 1.0]]
    assert result.scores == "fisher" and result.kept == {"weight": 0.5}


def test_prune_nm_takes_the_fisher_of_an_fsam_accumulator():
    torch.manual_seed(0)
    model = Tiny()
    twin, by_magnitude = copy.deepcopy(model), copy.deepcopy(model)
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, fisher="empirical", backend="torch")
    x, y = data()
    for i in range(3):
        F.cross_entropy(model(x[i::3]), y[i::3]).backward()
        opt.accumulate_fisher()
        opt.zero_grad()
    accum = {q: f.clone() for q, f in zip(twin.parameters(), opt._mask.fisher)}
    prune_nm(model, "2:4", scores="fisher", fisher=opt)
    prune_nm(twin, "2:4", scores="fisher", fisher=accum)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    prune_nm(by_magnitude, "2:4")
    assert not torch.equal(by_magnitude.fc1.weight, model.fc1.weight)  # the accumulator was used


def test_prune_nm_checks_everything_before_changing_a_weight():
    params = tied_model()
    before = [p.clone() for p in params]
    bad = [torch.ones_like(p) for p in params]
    bad[1][0, 0, 0] = -1.0
    with pytest.raises(ValueError, match=r"scores\[params\[1\]\] must hold finite, non-negative"):
        prune_nm(params, "2:4", scores=bad)
    with pytest.raises(ValueError, match="fisher has no entry for params"):
        prune_nm(params, "2:4", scores="fisher", fisher={params[0]: torch.ones_like(params[0])})
    with pytest.raises(ValueError, match="Invalid scores"):
        prune_nm(params, "2:4", scores="random")
    with pytest.raises(ValueError, match="structure"):
        prune_nm(params, "4:2")
    for p, b in zip(params, before):
        assert torch.equal(p, b)


# --------------------------------------------------------------------------- perturbation and k
def pruned_unstructured(model, fraction=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p[torch.rand(p.shape, generator=g) < fraction] = 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_counts_only_unpruned_weights_and_the_perturbation_never_touches_a_pruned_one(backend):
    cpu_backend_or_skip(backend)
    torch.manual_seed(0)
    model = Tiny()
    pruned_unstructured(model)
    alive = [p.detach() != 0 for p in model.parameters()]
    n_alive = sum(int(a.sum()) for a in alive)
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.1, preserve_zeros=True, fisher="empirical",
               backend=backend)
    # Fisher 0 on half of the unpruned weights too: k (90 % of the unpruned) reaches into ties at 0, which
    # the pruned weights must not win.
    g = torch.Generator().manual_seed(3)
    fisher = [torch.rand(p.shape, generator=g) * (torch.rand(p.shape, generator=g) < 0.5) for p in model.parameters()]
    opt.update_mask(fisher=fisher)
    masks = opt.masks()
    assert sum(int(m.sum()) for m in masks) == round(0.9 * n_alive)
    for m, a in zip(masks, alive):
        assert not bool((m & ~a).any())
    x, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    for p, b, m, a in zip(model.parameters(), before, masks, alive):
        assert torch.equal(bits_of(p)[~m], bits_of(b)[~m])  # outside the mask: untouched, pruned ones included
        assert bool((p.detach()[~a] == 0).all())
    opt.restore()


def test_a_2_4_structured_mask_perturbs_exactly_the_survivors():
    torch.manual_seed(0)
    model = Tiny()
    prune_nm(model, "2:4")
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, structure="2:4", keep_pruned=True, backend="torch")
    support = {name: p.detach() != 0 for name, p in model.named_parameters()}
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    for (name, p), m in zip(model.named_parameters(), opt.masks()):
        if name in ("fc1.weight", "fc2.weight"):
            assert torch.equal(m, support[name])  # exactly the 2 survivors of every 4
            assert bool((bits_of(p)[~support[name]] == 0).all())  # w + e is still +0.0 there
    opt.restore()


# --------------------------------------------------------------------------- checkpoints
def trained_keep_pruned(steps=3):
    torch.manual_seed(0)
    model = Tiny()
    prune_nm(model, "2:4")
    opt = FSAM(model.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1, structure="2:4", keep_pruned=True,
               backend="torch")
    x, y = data()
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
        opt.zero_grad()
    return model, opt


def test_the_support_round_trips_through_a_checkpoint():
    model, opt = trained_keep_pruned()
    sd = opt.state_dict()
    assert sd["fsam"]["support"].dtype == torch.uint8
    clone = copy.deepcopy(model)
    fresh = FSAM(clone.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1, structure="2:4", keep_pruned=True,
                 backend="torch")
    fresh._mask.support = None  # the loaded support, not the one read at construction, must be used
    fresh.load_state_dict(sd)
    assert torch.equal(fresh._mask.support, opt._mask.support)
    assert fresh._mask.support_positions == opt._mask.support_positions == (0, 2)  # fc1.weight, fc2.weight
    support = [p.detach() != 0 for p in weights(clone)]
    x, y = data()
    F.cross_entropy(clone(x), y).backward()
    fresh.step(lambda: F.cross_entropy(clone(x), y).backward())
    assert_still_pruned(clone, support)


def test_a_checkpoint_whose_support_does_not_fit_the_weights_is_refused():
    model, opt = trained_keep_pruned()
    sd = opt.state_dict()
    dense = Tiny()  # the pruned model's weights were not loaded
    other = FSAM(dense.parameters(), torch.optim.AdamW, lr=1e-2, structure="2:4", keep_pruned=True, backend="torch")
    before = other._mask.support.clone()
    with pytest.raises(ValueError, match="support prunes .* non-zero here"):
        other.load_state_dict(sd)
    assert torch.equal(other._mask.support, before) and other.step_count == 0


def test_keep_pruned_and_dense_checkpoints_do_not_mix():
    model, opt = trained_keep_pruned()
    plain = FSAM(model.parameters(), torch.optim.AdamW, lr=1e-2, structure="2:4", backend="torch")
    with pytest.raises(ValueError, match="construct the optimizer with keep_pruned=True"):
        plain.load_state_dict(opt.state_dict())
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    plain.step(lambda: F.cross_entropy(model(x), y).backward())
    plain.zero_grad()
    with pytest.raises(ValueError, match="no support of pruned weights"):
        opt.load_state_dict(plain.state_dict())


# --------------------------------------------------------------------------- torch.nn.utils.prune
def test_torch_nn_utils_prune_interop():
    import torch.nn.utils.prune as prune
    torch.manual_seed(0)
    model = Tiny()
    twin = copy.deepcopy(model)
    prune_nm(twin, "2:4")  # the same 2:4 pattern, as a parametrization
    for name in ("fc1", "fc2"):
        prune.custom_from_mask(getattr(model, name), "weight", getattr(twin, name).weight != 0)
    # prune_nm leaves parametrized weights alone and says how to make them permanent
    assert "prune.remove" in prune_nm(model, "2:4").skipped["fc1.weight"]
    x, y = data()

    # Kept parametrization: FSAM sees weight_orig, whose gradient is exactly zero at the pruned
    # positions, so w + e == w there bit for bit, and the effective weight stays zero.
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, backend="torch")
    orig = [model.fc1.weight_orig, model.fc2.weight_orig]
    pruned = [model.fc1.weight_mask == 0, model.fc2.weight_mask == 0]
    before = [w.detach().clone() for w in orig]
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    for w, b, z in zip(orig, before, pruned):
        assert torch.equal(bits_of(w)[z], bits_of(b)[z])
    opt.restore()

    # Made permanent (the documented path): zeros in the weights, keep_pruned keeps them, k counts the rest.
    for name in ("fc1", "fc2"):
        prune.remove(getattr(model, name), "weight")
    support = [p.detach() != 0 for p in weights(model)]
    opt = FSAM(model.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1, sparsity=0.5, keep_pruned=True,
               backend="torch")
    for _ in range(5):
        F.cross_entropy(model(x), y).backward()
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
        opt.zero_grad()
    assert_still_pruned(model, support)
    n_alive = sum(int((p != 0).sum()) for p in model.parameters())
    assert sum(int(m.sum()) for m in opt.masks()) == round(0.5 * n_alive)


# --------------------------------------------------------------------------- export
def test_export_reports_why_each_layer_stays_dense_on_the_cpu():
    torch.manual_seed(0)
    model = Tiny(torch.bfloat16)
    prune_nm(model, "2:4", backend="torch")
    with torch.no_grad():
        model.fc2.weight[0, :4] = 1.0  # no longer 2:4
    before = [p.detach().clone() for p in model.parameters()]
    report = to_semi_structured(model)
    assert report.converted == []
    assert "CUDA" in report.skipped["fc1.weight"]
    assert "not 2:4 sparse" in report.skipped["fc2.weight"]
    assert "not divisible by 4" in report.skipped["head.weight"]
    assert "fc1.weight: dense" in str(report)
    for p, b in zip(model.parameters(), before):
        assert type(p.data) is torch.Tensor and torch.equal(p, b)


@pytest.mark.gpu
def test_exported_model_matches_the_dense_2_4_model_on_gpu():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a CUDA GPU of compute capability 8.0+")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128)).cuda().bfloat16()
    prune_nm(model, "2:4")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        dense = model(x)
        report = to_semi_structured(model)
        sparse = model(x)
    assert report.converted == ["0.weight", "2.weight"], str(report)
    torch.testing.assert_close(sparse, dense, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- the fine-tuning example
def test_finetune_example_prune_options():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "finetune_glue.py")
    spec = importlib.util.spec_from_file_location("finetune_glue", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = ["--task", "cb", "--data-dir", "x"]
    args = script.parse_args(base + ["--optimizer", "adam", "fsam-nm", "--prune", " 2 : 4 ", "--prune-scores", "fisher"])
    assert (args.prune, args.prune_scores) == ("2:4", "fisher")
    assert script.parse_args(base).prune is None
    for bad in (["--prune", "4:2"], ["--prune", "2:4", "--optimizer", "sam"], ["--prune-scores", "random"],
                ["--prune", "2:4", "--prune-fisher-samples", "0"]):
        with pytest.raises(SystemExit):
            script.parse_args(base + bad)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    assert script.make_optimizer("fsam-nm", model, args).keep_pruned
    assert not script.make_optimizer("fsam-nm", model, script.parse_args(base + ["--optimizer", "fsam-nm"])).keep_pruned
    prune_nm(model, "2:4")
    assert [tuple(z.shape) for _, z in script.pruned_support(model)] == [(4, 8)]
