"""The Triton backend on a CUDA device at real sizes (every test skips without one).

Run this file on its own on a GPU machine: if the interpreter tests ran first in the same process,
the kernels were imported in interpreter mode and these tests skip.
"""
import time

import pytest
import torch

from fsam_kernels import FSAM
from fsam_kernels import reference as ref
from fsam_kernels.layout import ParamLayout

from conftest import check_sharded_select, first_mismatch


def _backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fsam_kernels.backends import BackendUnavailable, get_backend

    try:
        return get_backend("triton", "cuda")
    except BackendUnavailable as exc:
        # On a GPU machine this is a failure, not a skip: e.g. TRITON_INTERPRET=1 leaked in from the
        # interpreter tests (run the GPU tests with --ignore=tests/test_triton_interpreter.py).
        pytest.fail(f"CUDA is available but the Triton backend is not: {exc}")


def roberta_large_shapes():
    """The 393 parameter shapes of RoBERTa-large with a classification head (355M values)."""
    h, f = 1024, 4096
    shapes = [(50265, h), (514, h), (1, h), (h,), (h,)]
    for _ in range(24):
        shapes += [(h, h), (h,)] * 4 + [(h,), (h,), (f, h), (f,), (h, f), (h,), (h,), (h,)]
    shapes += [(h, h), (h,), (2, h), (2,)]
    assert len(shapes) == 393
    return shapes


def _layout(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    params = [torch.randn(s, device="cuda", generator=g).to(dtype) for s in shapes]
    n = len(params)
    return ParamLayout(params, [True] * n, [0.05] * n, [False] * n)


def _grads(layout, quantized, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    grads = [torch.randn(p.shape, device="cuda", generator=g).to(p.dtype) for p in layout.params]
    if quantized:  # few distinct values: large ties at the threshold
        grads = [(x * 4).round() / 4 for x in grads]
    grads[0][:40000] = 0  # unused embedding rows: ties at zero
    return grads


@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [False, True], ids=["continuous", "quantized"])
def test_roberta_large_mask_perturb_restore_match_the_reference(quantized):
    backend = _backend()
    layout = _layout(roberta_large_shapes())
    grads = _grads(layout, quantized)
    k = layout.k_for(0.9)
    fallbacks = backend.select_fallbacks
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bits = backend.select_mask(layout, grads, k, True)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    want = ref.select_mask_reference(layout, grads, k, True)
    if not torch.equal(bits, want):
        for j, (a, b) in enumerate(zip(ref.unpack_mask(layout, bits), ref.unpack_mask(layout, want))):
            assert torch.equal(a, b), f"tensor {j}: {first_mismatch(a, b)}"
    assert backend.select_fallbacks == fallbacks, "the sampled bracket missed"
    print(f"select_mask, 393 tensors, N={layout.n_masked}, k={k}: {1e3 * (t1 - t0):.2f} ms (first call)")
    aux = backend.mask_aux(layout, bits)
    originals = [p.clone() for p in layout.params]
    norm = backend.grad_norm(layout, grads)
    torch.testing.assert_close(norm, ref.grad_norm_reference(layout, grads), rtol=1e-5, atol=0)
    saved = backend.perturb(layout, grads, bits, aux, norm, 1e-12)
    twin_params = [p.clone() for p in originals]
    twin = ParamLayout(twin_params, layout.masked, layout.rho, layout.adaptive)
    ref.perturb_reference(twin, grads, bits, norm, 1e-12)
    for i, (p, q) in enumerate(zip(layout.params, twin.params)):
        assert torch.equal(p, q), f"param {i}: {first_mismatch(p, q)}"
    assert backend.saved_nbytes(saved) == k * 4
    backend.restore(layout, bits, aux, saved)
    for i, (p, o) in enumerate(zip(layout.params, originals)):
        assert torch.equal(p, o), f"param {i}: {first_mismatch(p, o)}"
    # Timings for the report (printed with -s, never asserted): medians of warm calls.
    times = {"select_mask": [], "grad_norm + perturb + restore": []}
    for _ in range(5):
        t0 = time.perf_counter()
        backend.select_mask(layout, grads, k, True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        s = backend.perturb(layout, grads, bits, aux, backend.grad_norm(layout, grads), 1e-12)
        backend.restore(layout, bits, aux, s)
        torch.cuda.synchronize()
        times["select_mask"].append(t1 - t0)
        times["grad_norm + perturb + restore"].append(time.perf_counter() - t1)
    for name, ts in times.items():
        print(f"{torch.cuda.get_device_name()}, {name}: {1e3 * sorted(ts)[len(ts) // 2]:.2f} ms")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fisher_accumulate_at_size(dtype):
    backend = _backend()
    shapes = [(4096, 1024), (1024,), (3, 5), (1,), (50265, 64)]
    g = torch.Generator(device="cuda").manual_seed(0)
    accum = [torch.rand(s, device="cuda", generator=g) for s in shapes]
    grads = [torch.randn(s, device="cuda", generator=g).to(dtype) for s in shapes]
    want = [a.clone() for a in accum]
    ref.fisher_accumulate_reference(want, grads)
    backend.fisher_accumulate(accum, grads)
    for a, w in zip(accum, want):
        assert torch.equal(a, w), first_mismatch(a, w)


@pytest.mark.gpu
def test_launch_counts_with_hundreds_of_tensors():
    _backend()
    from fsam_kernels.profiling import fsam_step_launches

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(150)]).cuda()  # 300 tensors
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.01, sparsity=0.9, mask_update_interval=2,
               backend="triton")
    x = torch.randn(8, 64, device="cuda")

    def backward():
        opt.zero_grad()
        model(x).square().mean().backward()

    backward()
    opt.first_step()  # warm-up: compiles the kernels and builds the tables
    opt.restore()
    backward()
    opt.first_step()  # step_count 1 -> 2
    opt.restore()
    backward()
    n_mask, names_mask = fsam_step_launches(opt)  # step_count 2: the mask is rebuilt
    backward()
    n_plain, names_plain = fsam_step_launches(opt)  # step_count 3: no mask update
    print(f"launches: mask-update step {n_mask} {names_mask}; other step {n_plain} {names_plain}")
    assert n_plain <= 6, names_plain
    assert n_mask <= 12, names_mask


@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [False, True], ids=["continuous", "quantized"])
def test_sharded_select_primitives_match_the_reference(quantized):
    # FSDP2's top-k: per-pass key histograms and the mask from a threshold, one launch each.
    backend = _backend()
    layout = _layout(roberta_large_shapes()[:60])
    check_sharded_select(backend, layout, _grads(layout, quantized), layout.k_for(0.9))


@pytest.mark.gpu
@pytest.mark.parametrize("first,last", [(0, 393), (5, 69), (5, 21)], ids=["355M", "50M-4-layers", "12.6M-1-layer"])
def test_single_and_parallel_threshold_search_agree_and_their_times(first, last):
    # The bracket and the candidates' threshold by one program each or by radix passes over many
    # programs (the default from TritonBackend.parallel_select_min values on): same mask; times printed
    # at three sizes, to place parallel_select_min.
    backend = _backend()
    layout = _layout(roberta_large_shapes()[first:last])
    grads = _grads(layout, quantized=False)
    k = layout.k_for(0.9)
    want = ref.select_mask_reference(layout, grads, k, True)
    saved_min = backend.parallel_select_min
    fallbacks = backend.select_fallbacks  # a search that failed would fall back silently: not here
    try:
        for name, minimum in (("parallel", 0), ("single", layout.n_masked + 1)):
            backend.parallel_select_min = minimum
            assert torch.equal(backend.select_mask(layout, grads, k, True), want), name
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                backend.select_mask(layout, grads, k, True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            print(f"{torch.cuda.get_device_name()}, select_mask ({name} threshold search), {last - first} tensors, "
                  f"N={layout.n_masked}: {1e3 * sorted(times)[2]:.2f} ms")
    finally:
        backend.parallel_select_min = saved_min
    assert backend.select_fallbacks == fallbacks, "a threshold search fell back to the reference"


@pytest.mark.gpu
def test_nm_mask_at_size_matches_the_reference():
    # 2:4 over RoBERTa-large's first 40 tensors (79M values) in one launch, with a weight support.
    _backend()
    from fsam_kernels.structured import select_nm_mask_reference
    from fsam_kernels.triton_kernels import nm_mask

    layout = _layout(roberta_large_shapes()[:40])
    grads = _grads(layout, quantized=True)
    support = [p.masked_fill(p.abs() < 0.3, 0) for p in layout.params]
    for sup in (None, support):
        got = nm_mask.select_nm_mask(layout, grads, 2, 4, True, sup)
        assert torch.equal(got, select_nm_mask_reference(layout, grads, 2, 4, True, sup))
