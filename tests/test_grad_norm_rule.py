"""One gradient norm on every backend (docs/backends.md, "The gradient norm").

The kernels (native CPU/CUDA, Triton) return the fp64 sum of the squares of ``fl(|w| * g)`` (the
reference's product, in the reference's compute dtype), its root rounded once to the norm dtype: in
fp32 that is one value, bit for bit, whatever the summation order. The reference (davda54/sam's
per-tensor norms, rounded in fp32) is within 2e-6 of it. The norm dtype is the reference's rule on
every backend, for every weight/gradient dtype pair.
"""
import pytest
import torch

from fsam_kernels import reference as ref

from backend_targets import TARGETS, reference_forbidden
from helpers import layout_of, random_tensors

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
MIXED = "mixed"


@pytest.fixture(params=TARGETS)
def target(request):
    return request.param


def exact_norm(layout, grads) -> torch.Tensor:
    """The rule, spelled out: squares of the compute-dtype product summed in fp64, rounded once."""
    total = torch.zeros((), dtype=torch.float64, device=layout.device)
    for p, g, adaptive in zip(layout.params, grads, layout.adaptive):
        if g is None:
            continue
        dtype = ref.compute_dtype(p, g)
        v = g.reshape(-1).to(dtype)
        if adaptive:
            v = p.detach().reshape(-1).to(dtype).abs() * v
        v = v.double()
        total = total + torch.dot(v, v)
    return total.sqrt().to(ref.norm_dtype(layout, grads))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", DTYPES[1:] + [MIXED], ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_grad_norm_is_the_rule_bit_for_bit(target, dtype, adaptive, seed, monkeypatch):
    backend = target.backend()
    shapes = [1, 7, 123, 4097, (9, 11), 20000]
    dtypes = [DTYPES[1 + i % 3] for i in range(len(shapes))] if dtype == MIXED else dtype
    params = random_tensors(shapes, dtypes, target.device, seed=2 * seed)
    grads = random_tensors(shapes, dtypes, target.device, seed=2 * seed + 1)
    if grads[3].dtype != torch.float16:  # squares beyond fp32's range: summed in fp64 all the same
        grads[3] = grads[3] * 1e20
    layout = layout_of(params, adaptive=adaptive)
    with reference_forbidden(monkeypatch):
        got = backend.grad_norm(layout, grads)
    want = exact_norm(layout, grads)
    assert got.dtype == torch.float32 and torch.isfinite(want)
    assert torch.equal(got, want), f"{got.item()!r} != {want.item()!r}"
    # the reference's fp32 rounding: the documented tolerance
    torch.testing.assert_close(got, ref.grad_norm_reference(layout, grads), rtol=2e-6, atol=0)


@pytest.mark.parametrize("w_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_norm_dtype_rule_on_every_weight_gradient_pair(target, w_dtype, g_dtype, adaptive):
    backend = target.backend()
    shapes = [300, 4097]
    params = random_tensors(shapes, w_dtype, target.device, seed=3)
    grads = random_tensors(shapes, g_dtype, target.device, seed=4)
    # a second pair beside it: an fp64 pair makes the whole norm fp64, an fp32 pair's too
    params.append(random_tensors([50], w_dtype if w_dtype == torch.float64 else torch.float32, target.device, seed=5)[0])
    grads.append(random_tensors([50], torch.float32, target.device, seed=6)[0])
    layout = layout_of(params, adaptive=adaptive)
    got = backend.grad_norm(layout, grads)
    want = ref.grad_norm_reference(layout, grads)
    assert got.dtype == want.dtype == ref.norm_dtype(layout, grads)
    if want.dtype == torch.float64:  # fp64 sums on every backend
        torch.testing.assert_close(got, exact_norm(layout, grads), rtol=1e-14, atol=0)
        # the reference rounds the norms of tensors that compute in fp32 to fp32 (davda54/sam's)
        all_fp64 = all(ref.compute_dtype(p, g) == torch.float64 for p, g in zip(params, grads))
        torch.testing.assert_close(got, want, rtol=1e-14 if all_fp64 else 2e-6, atol=0)
    else:
        assert torch.equal(got, exact_norm(layout, grads))
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
