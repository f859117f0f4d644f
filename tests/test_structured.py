"""N:M structured masks: the reference op against an independent oracle, the Triton and native kernels
against the reference, FSAM(structure=...) end to end, already-sparse models, compact N:M storage and
the semi-structured export."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from fsam_kernels import FSAM
from fsam_kernels import reference as ref
from fsam_kernels.backends.base import Backend
from fsam_kernels.layout import ParamLayout
from fsam_kernels.structured import (
    NMSparse,
    nm_compress,
    nm_eligible,
    nm_restore_,
    parse_structure,
    to_semi_structured,
)
from fsam_kernels.reference import select_nm_mask_reference

STRUCTURES = [(2, 4), (1, 2), (3, 8), (5, 16), (1, 3), (4, 6)]
SHAPES = [(3, 8), (5,), (4, 12), (2, 3, 48), (7, 6), (0, 16)]


def first_bit_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    diff = (a != b).nonzero()
    if diff.numel() == 0:
        return "equal"
    i = int(diff[0])
    return f"first differing mask byte {i}: {int(a[i]):08b} vs {int(b[i]):08b} ({diff.numel()} bytes differ)"


# --------------------------------------------------------------------------- an independent oracle
def oracle_nm(score: torch.Tensor, n: int, m: int, square: bool, weight=None) -> torch.Tensor:
    """Bool mask from first principles: per group of m, rank every element by (larger key, lower index)
    with Python numbers; zeros of ``weight`` rank last and are never kept."""
    vals = score.double().reshape(-1).tolist()
    alive = [True] * len(vals) if weight is None else (weight.reshape(-1) != 0).tolist()
    keys = [(float(torch.tensor(v, dtype=torch.float32) ** 2) if square else v) for v in vals]
    out = []
    for g in range(0, len(vals), m):
        order = sorted(range(g, g + m), key=lambda e: (not alive[e], -keys[e], e))
        keep = set(order[:n])
        out += [e in keep and alive[e] for e in range(g, g + m)]
    return torch.tensor(out, dtype=torch.bool).reshape(score.shape)


def make_case(dtype=torch.float32, seed=0, zeros=False, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    if zeros:
        for p in params:
            p.view(-1)[torch.rand(p.numel(), generator=g) < 0.3] = 0
    # Few distinct values: many ties inside groups.
    scores = [torch.randint(-2, 3, s, generator=g).to(dtype) for s in shapes]
    layout = ParamLayout(params, [True] * len(params), [0.05] * len(params), [False] * len(params))
    return layout, params, scores


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("text, expected", [("2:4", (2, 4)), (" 1 : 2 ", (1, 2)), ("15:16", (15, 16)), (None, None)])
def test_parse_structure_accepts(text, expected):
    assert parse_structure(text) == expected


@pytest.mark.parametrize("bad", ["4:4", "0:4", "2:17", "2-4", "2:4:8", "a:b", ""])
def test_parse_structure_rejects_with_value_error(bad):
    with pytest.raises(ValueError, match="Invalid structure"):
        parse_structure(bad)


def test_fsam_validates_structure_and_preserve_zeros():
    w = torch.nn.Parameter(torch.randn(4, 8))
    with pytest.raises(TypeError, match="Invalid structure"):
        FSAM([w], torch.optim.SGD, lr=0.1, structure=(2, 4))
    with pytest.raises(ValueError, match="Invalid structure"):
        FSAM([w], torch.optim.SGD, lr=0.1, structure="3:2")
    with pytest.raises(TypeError, match="Invalid preserve_zeros"):
        FSAM([w], torch.optim.SGD, lr=0.1, preserve_zeros="yes")
    opt = FSAM([w], torch.optim.SGD, lr=0.1, structure="2:4")
    assert opt.structure == (2, 4) and opt.preserve_zeros is True
    assert FSAM([w], torch.optim.SGD, lr=0.1).preserve_zeros is False


def test_eligibility_rule():
    assert nm_eligible((3, 8), 4) and nm_eligible((2, 3, 12), 4) and nm_eligible((0, 4), 4)
    assert not nm_eligible((8,), 4) and not nm_eligible((4, 6), 4)


# --------------------------------------------------------------------------- the reference op
@pytest.mark.parametrize("n,m", STRUCTURES, ids=[f"{n}:{m}" for n, m in STRUCTURES])
@pytest.mark.parametrize("square", [True, False], ids=["batch", "fisher"])
@pytest.mark.parametrize("with_support", [False, True], ids=["all", "support"])
def test_reference_matches_oracle(n, m, square, with_support):
    layout, params, scores = make_case(zeros=with_support)
    if not square:
        scores = [s.abs() for s in scores]
    support = params if with_support else None
    bits = select_nm_mask_reference(layout, scores, n, m, square, support)
    for j, got in enumerate(ref.unpack_mask(layout, bits)):
        p = params[j]
        if nm_eligible(p.shape, m):
            want = oracle_nm(scores[j], n, m, square, p if with_support else None)
        else:
            want = torch.zeros(p.shape, dtype=torch.bool)
        assert torch.equal(got, want), f"tensor {j} {tuple(p.shape)}: first mismatch at {(got != want).nonzero()[:1].tolist()}"
    # Padding bits stay 0: the mask holds exactly the selected elements.
    assert ref.mask_popcount(bits) == sum(int(mk.sum()) for mk in ref.unpack_mask(layout, bits))


def test_reference_keeps_exactly_n_per_group_without_support():
    layout, params, scores = make_case()
    bits = select_nm_mask_reference(layout, scores, 2, 4, True)
    for p, mk in zip(params, ref.unpack_mask(layout, bits)):
        if nm_eligible(p.shape, 4) and p.numel():
            assert torch.equal(mk.reshape(-1, 4).sum(1), torch.full((p.numel() // 4,), 2))


def test_reference_rejects_bad_arguments():
    layout, params, scores = make_case()
    with pytest.raises(ValueError, match="select_nm_mask: expected 1 <= n < m"):
        select_nm_mask_reference(layout, scores, 4, 4, True)
    with pytest.raises(ValueError, match="expected 6 scores"):
        select_nm_mask_reference(layout, scores[:2], 2, 4, True)
    with pytest.raises(ValueError, match=r"support\[1\]"):
        select_nm_mask_reference(layout, scores, 2, 4, True, [params[0], params[0]] + params[2:])


def test_every_backend_gets_the_default_op():
    class Minimal(Backend):  # implements nothing N:M-specific
        pass

    layout, params, scores = make_case()
    got = Minimal().select_nm_mask(layout, scores, 2, 4, True, params)
    assert torch.equal(got, select_nm_mask_reference(layout, scores, 2, 4, True, params))


# --------------------------------------------------------------------------- kernels
def _interpreted_triton_module():
    """The N:M kernel module in interpreter mode (TRITON_INTERPRET=1 must be set; it is read when the
    kernels are decorated, so the module is reloaded if it was imported compiled)."""
    pytest.importorskip("triton")
    module = importlib.import_module("fsam_kernels.triton_kernels.nm_mask")
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(module._nm_mask_kernel, InterpretedFunction):
        module = importlib.reload(module)
    return module


@pytest.mark.parametrize("n,m", [(2, 4), (1, 3), (5, 16)], ids=["2:4", "1:3", "5:16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_triton_kernel_matches_reference(n, m, dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    nm_mask = _interpreted_triton_module()
    layout, params, scores = make_case(dtype, zeros=True, shapes=[(3, 48), (5,), (2, 3, 16), (0, 16)])
    for square in (True, False):
        s = scores if square else [x.abs() for x in scores]
        for support in (None, [p.to(dtype) for p in params]):
            want = select_nm_mask_reference(layout, s, n, m, square, support)
            got = nm_mask.select_nm_mask(layout, s, n, m, square, support)
            assert torch.equal(got, want), first_bit_mismatch(got, want)


def test_triton_kernel_many_tensors_in_one_launch(monkeypatch):
    # Tensors spanning several programs each, one too small for a whole program, mixed score dtypes
    # (a launch per dtype pair) and a float32 support for bf16 scores.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    nm_mask = _interpreted_triton_module()
    shapes = [(40, 64), (7,), (3, 8), (17, 32), (2, 2, 300), (5, 1024)]
    layout, params, scores = make_case(torch.float32, seed=3, zeros=True, shapes=shapes)
    scores[3], scores[5] = scores[3].bfloat16(), scores[5].bfloat16()
    launches = []
    real = nm_mask._nm_mask_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(nm_mask, "_nm_mask_kernel", Counting())
    for support in (None, params):
        launches.clear()
        want = select_nm_mask_reference(layout, scores, 2, 4, True, support)
        got = nm_mask.select_nm_mask(layout, scores, 2, 4, True, support)
        assert torch.equal(got, want), first_bit_mismatch(got, want)
        assert len(launches) == 2  # fp32 and bf16 scores; (7,) is not eligible, (2, 2, 300) is
    assert sum(g[0] for g in launches) == sum(math.ceil(layout.numel[i] / 512) for i in (0, 2, 3, 4, 5))  # 512 per program


def _native_op():
    try:
        importlib.import_module("fsam_kernels._native_ops").load_library()  # the extension and its fakes
    except ImportError as exc:
        pytest.skip(f"native extension not built: {exc}")
    from fsam_kernels.backends import get_backend

    return get_backend("native", "cpu").select_nm_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["fp32", "fp16", "bf16", "fp64"])
def test_native_cpu_kernel_matches_reference(dtype):
    select = _native_op()
    layout, params, scores = make_case(dtype, zeros=True, shapes=SHAPES + [(64, 96)])
    for n, m in STRUCTURES:
        for square in (True, False):
            s = scores if square else [x.abs() for x in scores]
            for support in (None, params):
                want = select_nm_mask_reference(layout, s, n, m, square, support)
                got = select(layout, s, n, m, square, support)
                assert torch.equal(got, want), f"{n}:{m} square={square}: {first_bit_mismatch(got, want)}"


def test_native_op_checks_its_inputs():
    _native_op()
    op = torch.ops.fsam_kernels.select_nm_mask
    with pytest.raises(ValueError, match="multiple of m=4"):
        op([torch.zeros(6)], [], [0], 64, 2, 4, True)
    with pytest.raises(ValueError, match="1 <= n < m"):
        op([torch.zeros(8)], [], [0], 64, 4, 4, True)
    with pytest.raises(ValueError, match=r"support\[0\]"):
        op([torch.zeros(8)], [torch.zeros(4)], [0], 64, 2, 4, True)


def test_native_fake_describes_the_output_and_the_op_checks_inputs():
    # The fake describes the output; the C++ op checks the arguments (without reading data).
    _native_op()
    from fsam_kernels._native_ops import _select_nm_mask_fake

    meta = [torch.empty(4, 8, device="meta"), torch.empty(2, 16, device="meta")]
    out = _select_nm_mask_fake(meta, [], [0, 512], 128, 2, 4, True)
    assert out.shape == (128,) and out.dtype == torch.uint8 and out.device.type == "meta"
    op = torch.ops.fsam_kernels.select_nm_mask
    scores = [torch.zeros(4, 8), torch.zeros(2, 16)]
    with pytest.raises(ValueError, match="1 <= n < m"):
        op(scores, [], [0, 512], 128, 4, 4, True)
    with pytest.raises(ValueError, match="one bit offset per tensor"):
        op(scores, [], [0], 128, 2, 4, True)
    with pytest.raises(ValueError, match=r"support\[1\] has 8 elements"):
        op(scores, [scores[0], torch.zeros(8)], [0, 512], 128, 2, 4, True)


def test_native_op_passes_opcheck():
    _native_op()
    op = torch.ops.fsam_kernels.select_nm_mask.default
    scores = [torch.randn(4, 8), torch.randn(2, 16)]
    torch.library.opcheck(op, (scores, [], [0, 512], 128, 2, 4, True))
    torch.library.opcheck(op, (scores, [torch.randn(4, 8), torch.randn(2, 16)], [0, 512], 128, 1, 4, False))


# --------------------------------------------------------------------------- FSAM(structure=...)
class Net(torch.nn.Module):
    """Eligible 2:4 weights (last dims 8 and 16), an indivisible one (last dim 6) and 1-D tensors."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 6)
        self.fc3 = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 8, generator=g), torch.randint(0, 3, (10,), generator=g)


def loss_of(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def test_fsam_structure_masks_follow_the_rule():
    torch.manual_seed(0)
    model = Net()
    params = list(model.parameters())
    opt = FSAM(params, torch.optim.SGD, lr=0.1, structure="2:4", sparsity=0.75, backend="torch")
    x, y = batch()
    loss_of(model, x, y).backward()
    grads = [p.grad.clone() for p in params]
    opt.step(lambda: loss_of(model, x, y).backward())
    masks = opt.masks()
    fallback = [j for j, p in enumerate(params) if not nm_eligible(p.shape, 4)]
    for j, (p, mk) in enumerate(zip(params, masks)):
        if j not in fallback:
            assert torch.equal(mk, oracle_nm(grads[j], 2, 4, True, p)), f"param {j} {tuple(p.shape)}"
    # Fallback tensors: global top-k at `sparsity` among themselves (tie: lowest index).
    keys = torch.cat([(grads[j].float() ** 2).reshape(-1) for j in fallback]).double()
    k = round(0.25 * keys.numel())
    order = sorted(range(keys.numel()), key=lambda i: (-keys[i].item(), i))
    want = torch.zeros(keys.numel(), dtype=torch.bool)
    want[order[:k]] = True
    got = torch.cat([masks[j].reshape(-1) for j in fallback])
    assert torch.equal(got, want)


def test_fsam_structure_with_empirical_fisher():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 8))
    b = torch.nn.Parameter(torch.randn(8))
    opt = FSAM([w, b], torch.optim.SGD, lr=0.1, fisher="empirical", structure="1:4", sparsity=0.5,
               backend="torch")
    fisher = {w: torch.randint(0, 3, (4, 8)).float(), b: torch.arange(8.0)}
    opt.update_mask(fisher=fisher)
    mw, mb = opt.masks()
    assert torch.equal(mw, oracle_nm(fisher[w], 1, 4, False))
    assert mb.tolist() == [False] * 4 + [True] * 4  # fallback: top half of the 1-D tensor


def test_fsam_structure_perturbs_only_masked_and_restores_exactly():
    torch.manual_seed(0)
    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, structure="1:4", sparsity=0.5, backend="torch")
    x, y = batch()
    loss_of(model, x, y).backward()
    opt.first_step()
    for p, b, mk in zip(model.parameters(), before, opt.masks()):
        moved = p.detach() != b
        assert not bool((moved & ~mk).any()), "an unmasked element moved"
    opt.restore()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def pruned_2_4(model: torch.nn.Module) -> None:
    """Zero the 2 smallest-magnitude weights of every group of 4 of each eligible weight."""
    with torch.no_grad():
        for p in model.parameters():
            if nm_eligible(p.shape, 4):
                groups = p.view(-1, 4)
                low = groups.abs().topk(2, dim=1, largest=False).indices
                groups.scatter_(1, low, 0.0)


@pytest.mark.parametrize("preserve_zeros", [None, False], ids=["default", "off"])
def test_pruned_model_stays_pruned_when_perturbed(preserve_zeros):
    torch.manual_seed(0)
    model = Net()
    pruned_2_4(model)
    with torch.no_grad():
        model.fc2.bias[:3] = 0.0  # zeros in a fallback tensor too
    zeros = [p.detach() == 0 for p in model.parameters()]
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, structure="2:4", sparsity=0.0,
               preserve_zeros=preserve_zeros, backend="torch")
    x, y = batch()
    loss_of(model, x, y).backward()
    opt.first_step()
    leaked = sum(int((p.detach()[z] != 0).sum()) for p, z in zip(model.parameters(), zeros))
    if preserve_zeros is None:
        assert leaked == 0, f"{leaked} pruned weights became non-zero at w + e"
        for p, mk, z in zip(model.parameters(), opt.masks(), zeros):
            assert not bool((mk & z).any())
            if nm_eligible(p.shape, 4):  # exactly the two survivors of each group are perturbed
                assert torch.equal(mk, ~z)
    else:
        assert leaked > 0  # without it the pruning is broken at w + e: the test can fail
    opt.restore()


def test_unstructured_fsam_can_preserve_zeros_too():
    torch.manual_seed(0)
    model = Net()
    pruned_2_4(model)
    zeros = [p.detach() == 0 for p in model.parameters()]
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.3, preserve_zeros=True, backend="torch")
    x, y = batch()
    loss_of(model, x, y).backward()
    opt.first_step()
    for p, z in zip(model.parameters(), zeros):
        assert bool((p.detach()[z] == 0).all())
    opt.restore()


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_preserve_zeros_fallback_selects_among_the_support(backend):
    # A 1-D tensor takes the unstructured fallback: its zeros have the largest gradients, yet the top-k
    # runs among its support (selecting the zeros, then dropping them, would keep none), and k counts the
    # non-zero weights only: round(0.5 * 4) = 2, the two largest gradients of the support.
    from fsam_kernels import available_backends

    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} does not run on this CPU")
    w = torch.nn.Parameter(torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0]))
    opt = FSAM([w], torch.optim.SGD, lr=0.1, sparsity=0.5, structure="2:4", backend=backend)
    w.grad = torch.tensor([9.0, 0.1, 8.0, 0.2, 7.0, 0.3, 6.0, 0.4])
    opt.update_mask()
    assert opt.masks()[0].tolist() == [False, False, False, False, False, True, False, True]


def test_structure_survives_state_dict_round_trip():
    torch.manual_seed(0)
    model = Net()
    opt = FSAM(model.parameters(), torch.optim.Adam, lr=1e-2, structure="2:4", backend="torch")
    x, y = batch()
    loss_of(model, x, y).backward()
    opt.step(lambda: loss_of(model, x, y).backward())
    opt.zero_grad()
    sd = opt.state_dict()
    fresh = FSAM(model.parameters(), torch.optim.Adam, lr=1e-2, structure="2:4", backend="torch")
    fresh.load_state_dict(sd)
    for a, b in zip(opt.masks(), fresh.masks()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- compact N:M values
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nm_compress_round_trip_is_exact(dtype):
    torch.manual_seed(0)
    w = torch.randn(6, 16).to(dtype)
    mask = oracle_nm(torch.randn(6, 16), 2, 4, False)
    mask[0, :4] = False  # a group with fewer than n selected (a pruned group)
    mask[0, 1] = True
    saved = nm_compress(w, mask, 2, 4)
    assert saved.values.shape == (24, 2) and saved.indices.dtype == torch.uint8
    assert bool((saved.indices.long() < 4).all())
    assert saved.nbytes == 24 * 2 * w.element_size() + 24 * 2
    original = w.clone()
    w[mask] = 123.0  # the perturbation
    nm_restore_(w, saved)
    assert torch.equal(w, original)


def test_nm_compress_rejects_masks_that_are_not_n_m():
    w = torch.randn(2, 8)
    with pytest.raises(ValueError, match="not 2:4"):
        nm_compress(w, torch.ones(2, 8, dtype=torch.bool), 2, 4)
    with pytest.raises(ValueError, match="last dimension divisible by 4"):
        nm_compress(torch.randn(8), torch.ones(8, dtype=torch.bool), 2, 4)


# --------------------------------------------------------------------------- semi-structured export
def test_export_falls_back_on_cpu():
    torch.manual_seed(0)
    e = torch.randn(8, 16)
    e[~oracle_nm(torch.randn(8, 16), 2, 4, False)] = 0
    out = to_semi_structured(e, "2:4")
    assert isinstance(out, NMSparse) and "CUDA" in out.reason
    assert torch.equal(out.to_dense(), e)
    other = to_semi_structured(torch.zeros(4, 8), "3:8")
    assert isinstance(other, NMSparse) and "2:4 only" in other.reason


def test_export_rejects_dense_tensors():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        to_semi_structured(torch.ones(4, 8), "2:4")


@pytest.mark.gpu
def test_export_on_gpu_round_trips():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    e = torch.randn(128, 128, device="cuda", dtype=torch.float16)
    e[~oracle_nm(torch.randn(128, 128), 2, 4, False).cuda()] = 0
    out = to_semi_structured(e, "2:4")
    assert torch.equal(out.to_dense(), e)


# --------------------------------------------------------------------------- the benchmark's rows
def test_structured_benchmark_rows_are_well_formed():
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import shapes as S
    from benchmarks.bench_structured import semi_structured_matmul_rows, structured_rows

    tiny = S.ShapeSet("tiny", ((16, 32), (32,), (8, 16)))
    rows = structured_rows(torch.device("cpu"), mode="tiny", backends=["torch"], shape_set=tiny)
    got = {(r.op, r.method) for r in rows}
    assert got == {(op, m) for op in ("mask_update", "perturb_restore", "saved_bytes", "mask_bytes")
                   for m in ("unstructured-50%", "2:4")}
    saved = {r.method: r.bytes for r in rows if r.op == "saved_bytes"}
    # Same 50 % density: both keep 336 of 672 values, so both save 336 fp32 originals.
    assert saved == {"unstructured-50%": 336 * 4, "2:4": 336 * 4}
    assert all(r.p50_ms >= 0 for r in rows if r.op in ("mask_update", "perturb_restore"))
    assert semi_structured_matmul_rows(torch.device("cpu"), mode="tiny", m=64, k=64, n=64) == []
