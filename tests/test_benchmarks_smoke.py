"""The benchmark harness on tiny sizes: rows are well formed and the baselines compute the reference's
perturbation (so the numbers compare like with like). No timing is asserted."""
import math
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import shapes as S  # noqa: E402
from benchmarks.baselines import ForeachSAM, LoopSAM, NaiveFSAM  # noqa: E402
from benchmarks.harness import COLUMNS, Row, append_rows, percentiles_ms, read_rows, run_rounds  # noqa: E402
from benchmarks.ops import OPS, Workload, benchmark_backends, make_method, measure, method_names, method_ops  # noqa: E402
from fsam_kernels import reference as ref  # noqa: E402
from fsam_kernels.layout import ParamLayout  # noqa: E402
from helpers import first_mismatch as _first_mismatch  # noqa: E402

CPU = torch.device("cpu")
TINY = S.sweep(10_000, n_matrices=4)
RHO = 2.0  # large enough that the perturbation survives bf16 rounding


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for shape in TINY.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
        p.grad = torch.randn(shape, generator=gen).to(dtype)
        ps.append(p)
    return ps


def test_shape_sets_match_the_models():
    rl = S.roberta_large()
    assert (rl.numel, rl.n_tensors) == (355_361_794, 393)
    assert 105e6 < S.bert_base().numel < 115e6
    assert 1.2e9 < S.decoder_1p3b().numel < 1.4e9
    llama = S.llama2_7b()  # Llama-2-7B as Hugging Face lists it; measured in bf16 only
    assert (llama.numel, llama.n_tensors) == (6_738_415_616, 291) and llama in S.shape_sets("full")
    assert llama.measures(torch.bfloat16) and not llama.measures(torch.float32) and rl.measures(torch.float32)
    sizes = [s.numel for s in S.shape_sets("full") if s.name.startswith("sweep")]
    assert sizes == sorted(sizes) and sizes[0] <= 1e6 and sizes[-1] >= 0.99e9
    with pytest.raises(ValueError, match="mode"):
        S.shape_sets("huge")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("cls", [LoopSAM, ForeachSAM, NaiveFSAM], ids=lambda c: c.__name__)
def test_baseline_perturbs_like_the_reference(cls, adaptive, dtype):
    masked = issubclass(cls, NaiveFSAM)
    ours, theirs = _params(dtype), _params(dtype)
    originals = [p.detach().clone() for p in ours]
    n = len(ours)
    layout = ParamLayout(ours, [masked] * n, [RHO] * n, [adaptive] * n)
    grads = [p.grad for p in ours]
    bits = None
    with torch.no_grad():
        if masked:
            bits = ref.select_mask_reference(layout, grads, layout.k_for(0.9), scores_are_grads=True)
        norm = ref.grad_norm_reference(layout, grads)
        ref.perturb_reference(layout, grads, bits, norm, 1e-12)

    opt = cls(theirs, rho=RHO, adaptive=adaptive, eps=1e-12)
    their_norm = opt.perturb()
    torch.testing.assert_close(their_norm.float(), norm, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
    if masked and dtype == torch.float32:  # bf16 squares tie too often for torch.topk's tie order
        for j, m in enumerate(ref.unpack_mask(layout, bits)):
            theirs_mask = opt.masks[id(theirs[j])].bool()
            assert torch.equal(theirs_mask, m), f"mask of tensor {j}: {_first_mismatch(theirs_mask, m)}"
    for j, (a, b) in enumerate(zip(theirs, ours)):
        if dtype == torch.float32:  # one rounding of the same fp32 values; only the norm's order may differ
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7,
                                       msg=lambda m, j=j: f"tensor {j}: {m}")
        else:  # the baselines compute e in bf16, the reference in fp32: one bf16 rounding apart
            close = torch.isclose(a.detach().float(), b.detach().float(), rtol=2**-7, atol=1e-3)
            if masked:  # a tie may swap which of two equal scores is kept
                close |= (a.detach() == originals[j]) | (b.detach() == originals[j])
            assert bool(close.all()), f"tensor {j}: {_first_mismatch(a.detach(), b.detach())}"
    assert all(not torch.equal(a.detach(), o) for a, o in zip(theirs, originals)), "a tensor was not perturbed"
    opt.restore()
    for j, (a, o) in enumerate(zip(theirs, originals)):
        assert torch.equal(a.detach(), o), f"restore of tensor {j}: {_first_mismatch(a.detach(), o)}"


def _check_row(r: Row, timed: bool):
    assert r.device == "cpu" and r.torch == torch.__version__ and r.commit and r.device_name
    assert r.size == TINY.numel and r.n_tensors == TINY.n_tensors and r.shapes == TINY.name
    if timed:
        assert r.rounds == 2
        assert 0 < r.p20_ms <= r.p50_ms <= r.p80_ms and math.isfinite(r.p80_ms)
        assert r.bytes == 0 or r.gbps > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_rows_are_well_formed_and_leave_the_weights_unchanged(dtype):
    wl = Workload(TINY, dtype, CPU)
    before = [p.detach().clone() for p in wl.params]
    names = method_names(benchmark_backends(CPU))
    assert "fsam[torch]" in names and {"sam_loop", "sam_foreach", "fsam_naive"} <= set(names)
    seen = set()
    for name in names:
        method = make_method(name, wl)
        for op in method_ops(name):
            row = measure(wl, method, op, rounds=2, warmup=1, mode="tiny")
            _check_row(row, timed=True)
            assert (row.op, row.method) == (op, name)
            seen.add(op)
        for j, (p, b) in enumerate(zip(wl.params, before)):
            assert torch.equal(p.detach(), b), f"{name} left tensor {j} changed: {_first_mismatch(p.detach(), b)}"
    assert seen == set(OPS) | {"copy"}  # device_copy: the bandwidth yardstick
    with pytest.raises(ValueError, match="method"):
        make_method("sam_magic", wl)


def test_memory_rows_count_the_state():
    from benchmarks.memory import memory_rows

    wl = Workload(TINY, torch.float32, CPU)
    by = {}
    for method in ("fsam[torch]", "sam_loop", "sam_foreach", "fsam_naive"):
        rows = memory_rows(wl, method, "tiny")
        assert [r.op for r in rows] == ["state_bytes", "saved_bytes"]  # no CUDA: no peak row
        for r in rows:
            _check_row(r, timed=False)
        by[method] = {r.op: r.bytes for r in rows}
    n = TINY.numel
    assert by["sam_foreach"]["state_bytes"] == 4 * n  # a persistent copy buffer
    assert by["sam_loop"]["state_bytes"] == 0 and by["sam_loop"]["saved_bytes"] == 4 * n  # a copy per step
    assert by["fsam[torch]"]["state_bytes"] == wl.layout.mask_bytes  # packed mask, < 0.2 B/param here
    assert 0 < by["fsam[torch]"]["saved_bytes"] < 4 * n
    assert by["fsam_naive"]["state_bytes"] == 4 * n  # dense float mask (its weight copy is per step)


def test_launch_rows_count_ops_on_the_cpu():
    from benchmarks.launches import launch_rows

    wl = Workload(TINY, torch.float32, CPU)
    for name in ("fsam[torch]", "sam_loop"):
        rows = launch_rows(wl, make_method(name, wl), "tiny")
        ops = {r.op: r.count for r in rows}
        assert ops["aten_ops_step"] > 0
        assert ("aten_ops_mask_update" in ops) == name.startswith("fsam")
    # a per-tensor loop runs at least one op per tensor
    assert {r.op: r.count for r in launch_rows(wl, make_method("sam_loop", wl), "tiny")}["aten_ops_step"] >= TINY.n_tensors


def test_e2e_rows_and_amortized_mask_update():
    pytest.importorskip("transformers")
    from benchmarks.e2e import MASK_UPDATE_INTERVAL, build_model, make_batch, measure_e2e

    model = build_model("tiny-roberta-L2-H64", CPU)
    batch = make_batch(model, 2, 8, CPU)
    plain = measure_e2e(model, batch, "tiny-roberta-L2-H64", "adamw", rounds=1, warmup=0, mode="tiny")
    assert [r.op for r in plain] == ["e2e_step"] and plain[0].p50_ms > 0
    rows = {r.op: r for r in measure_e2e(model, batch, "tiny-roberta-L2-H64", "fsam[torch]", rounds=1, warmup=0,
                                         mode="tiny")}
    assert set(rows) == {"e2e_step", "e2e_mask_step", "e2e_step_amortized"}
    s, u, a = rows["e2e_step"].p50_ms, rows["e2e_mask_step"].p50_ms, rows["e2e_step_amortized"].p50_ms
    assert a == pytest.approx(s + (u - s) / MASK_UPDATE_INTERVAL)
    assert rows["e2e_step"].shapes == "tiny-roberta-L2-H64 b2 s8" and rows["e2e_step"].size > 0


def test_interleaved_e2e_rows_per_method_on_the_mlp():
    from benchmarks.e2e import build_model, make_batch, measure_e2e_interleaved
    from benchmarks.plan import SETTINGS, Plan

    model = build_model("mlp-L24-W512", CPU)
    batch = make_batch(model, 2, 1, CPU)
    storage = [p.data_ptr() for p in model.parameters()]
    rows = measure_e2e_interleaved(model, batch, "mlp-L24-W512", ["sam_loop", "fsam[torch]"], rounds=2, warmup=0,
                                   mode="tiny")
    assert [(r.method, r.op) for r in rows] == [
        ("sam_loop", "e2e_step"), ("sam_loop", "e2e_optimizer"), ("fsam[torch]", "e2e_step"),
        ("fsam[torch]", "e2e_mask_step"), ("fsam[torch]", "e2e_optimizer"), ("fsam[torch]", "e2e_step_amortized")]
    assert all(r.shapes == "mlp-L24-W512 b2 s1" and r.n_tensors == 50 and r.p50_ms > 0 for r in rows)
    assert all(r.rounds == 2 for r in rows)
    ms = {(r.method, r.op): r.p50_ms for r in rows}
    assert all(ms[(m, "e2e_optimizer")] < ms[(m, "e2e_step")] for m in ("sam_loop", "fsam[torch]"))
    # every method trains its own copy: sam_loop's restore rebinds p.data, and would have done it here
    assert [p.data_ptr() for p in model.parameters()] == storage
    # --quick times both end-to-end models with every method in one interleaved case each
    cases = Plan(mode="quick", device=CPU, backends=["torch"], parts=("e2e",), csv=Path("unused.csv")).e2e_cases()
    assert [c.model for c in cases] == [m for m, _, _ in SETTINGS["quick"].e2e_models] == ["tiny-roberta-L2-H64",
                                                                                            "mlp-L24-W512"]
    assert all("sam_foreach" in c.methods and "fsam[torch]" in c.methods for c in cases)
    assert SETTINGS["quick"].e2e_rounds_for("tiny-roberta-L2-H64") > SETTINGS["quick"].e2e_rounds_for("mlp-L24-W512")


def test_csv_round_trip_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    wl = Workload(TINY, torch.float32, CPU)
    rows = [measure(wl, make_method("fsam[torch]", wl), op, rounds=2, warmup=0, mode="tiny") for op in OPS]
    csv = tmp_path / "cpu-tiny.csv"
    append_rows(csv, rows[:2])
    append_rows(csv, rows[2:])  # appending keeps one header
    assert csv.read_text().splitlines()[0].split(",") == COLUMNS
    back = read_rows(csv)
    assert [r["op"] for r in back] == list(OPS)
    assert back[0]["p50_ms"] == pytest.approx(rows[0].p50_ms) and back[0]["size"] == TINY.numel
    assert plot.main([str(csv), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "cpu-tiny-ops-float32.png").stat().st_size > 0


def test_run_rounds_times_only_the_function_and_percentiles():
    calls = []
    times = run_rounds(lambda: calls.append("fn"), CPU, rounds=3, warmup=2,
                       setup=lambda: calls.append("setup"), teardown=lambda: calls.append("teardown"))
    assert len(times) == 3 and calls == ["setup", "fn", "teardown"] * 5
    assert percentiles_ms([0.001, 0.002, 0.003, 0.004, 0.005]) == pytest.approx((1.8, 3.0, 4.2))
    assert percentiles_ms([0.002]) == (2.0, 2.0, 2.0)


def test_baseline_state_counts_only_memory_kept_between_steps():
    params = _params(torch.float32)
    n_bytes = sum(p.numel() * 4 for p in params)
    loop, foreach = LoopSAM(params, rho=RHO, eps=1e-12), ForeachSAM(params, rho=RHO, eps=1e-12)
    for opt in (loop, foreach):
        opt.perturb()
        opt.restore()
    # davda54/sam rebinds p.data to its copy: afterwards the "copy" is the weights themselves
    assert loop.state_nbytes() == 0
    assert foreach.state_nbytes() == n_bytes  # a persistent copy buffer, reused every step


def test_targets_table_reads_each_target_from_the_rows(tmp_path):
    from benchmarks.table import targets_table

    shapes, model = "roberta-large", "roberta-large b16 s128"

    def row(op, method, shapes=shapes, p50=float("nan"), gbps=float("nan"), nbytes=0):
        return Row(op=op, method=method, backend="", shapes=shapes, size=355_000_000, n_tensors=393,
                   dtype="float32", p50_ms=p50, gbps=gbps, bytes=nbytes)

    rows = [
        row("copy", "device_copy", gbps=3000.0),
        row("fisher_accumulate", "fsam[a]", gbps=2800.0), row("fisher_accumulate", "fsam[b]", gbps=2600.0),
        row("select_mask", "fsam[a]", p50=0.8), row("select_mask", "fsam[b]", p50=2.1),
        row("mask_peak_extra_bytes", "fsam[a]", nbytes=17_000_000), row("mask_peak_extra_bytes", "fsam[b]", nbytes=90_000_000),
        row("norm_perturb", "fsam[a]", p50=0.9), row("restore", "fsam[a]", p50=0.5),
        row("norm_perturb", "fsam[b]", p50=1.0), row("restore", "fsam[b]", p50=0.6),
        row("e2e_step", "sam_loop", shapes=model, p50=115.0), row("e2e_step", "sam_foreach", shapes=model, p50=110.0),
        row("e2e_step_amortized", "fsam[a]", shapes=model, p50=105.0),
        row("e2e_step_amortized", "fsam[b]", shapes=model, p50=112.0),
    ]
    csv = tmp_path / "gpu.csv"
    append_rows(csv, rows)
    lines = targets_table(read_rows(csv), shapes).splitlines()
    a = next(line for line in lines if line.startswith("| fsam[a]"))
    b = next(line for line in lines if line.startswith("| fsam[b]"))
    assert a.count("(met)") == 5 and "missed" not in a
    assert "2800, 93% (met)" in a and "17.0 (met)" in a and "1.400 (met)" in a and "0.91 / 0.95 (met)" in a
    assert "2600, 87% (missed)" in b and "2.100 (missed)" in b and "90.0 (missed)" in b
    assert "1.600 (missed)" in b and "0.97 / 1.02 (missed)" in b
    assert targets_table(read_rows(csv), "another-model") == ""


def test_backend_ranking_prefers_the_end_to_end_step(tmp_path):
    from benchmarks.table import backend_ranking

    def row(op, method, shapes="roberta-large", p50=1.0):
        return Row(op=op, method=method, backend="", shapes=shapes, size=1, n_tensors=1, dtype="float32", p50_ms=p50)

    per_op = [row(op, m, p50=p) for op in OPS for m, p in (("fsam[triton]", 2.0), ("fsam[native]", 1.0))]
    csv = tmp_path / "r.csv"
    append_rows(csv, per_op)
    assert backend_ranking(read_rows(csv), "roberta-large") == (
        "faster first (sum of the 4 ops' p50, roberta-large float32, ms): native 4.000, triton 8.000")
    append_rows(csv, [row("e2e_step_amortized", "fsam[triton]", "roberta-large b16 s128", 100.0),
                      row("e2e_step_amortized", "fsam[native]", "roberta-large b16 s128", 101.5)])
    assert backend_ranking(read_rows(csv), "roberta-large") == (
        "faster first (amortized roberta-large step, ms): triton 100.0, native 101.5")
    assert backend_ranking([r for r in read_rows(csv) if r["method"] == "fsam[triton]"], "roberta-large") == ""
