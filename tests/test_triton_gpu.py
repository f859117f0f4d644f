"""The Triton backend's own checks on a CUDA device (every test skips without one): launch counts and
the single-program against the parallel threshold search. Its results against the reference at real
sizes are in test_backend_conformance.py (target ``triton-cuda``).

Select them with -m "gpu and triton" (or -m gpu): conftest.py then sets TRITON_INTERPRET=0, so
the kernels compile; a plain run loads them in interpreter mode, where the triton-cuda target fails.
"""
import time

import pytest
import torch

from fsam_kernels import FSAM
from fsam_kernels import reference as ref

from backend_targets import Target, roberta_large_shapes
from helpers import layout_of, random_tensors

pytestmark = [pytest.mark.gpu, pytest.mark.triton]


def _backend():
    # fails (not skips) on a GPU machine where the Triton backend cannot run
    return Target("triton", "cuda", "real").backend()


def _layout(shapes, seed=0):
    return layout_of(random_tensors(shapes, torch.float32, "cuda", seed))


def _grads(layout, seed=1):
    grads = random_tensors([p.shape for p in layout.params], torch.float32, "cuda", seed)
    grads[0][:40000] = 0  # unused embedding rows: ties at zero
    return grads


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
@pytest.mark.parametrize("first,last", [(0, 393), (5, 69), (5, 21)], ids=["355M", "50M-4-layers", "12.6M-1-layer"])
def test_single_and_parallel_threshold_search_agree_and_their_times(first, last):
    # The bracket and the candidates' threshold by one program each or by radix passes over many
    # programs (the default from TritonBackend.parallel_select_min values on): same mask; times printed
    # at three sizes, to place parallel_select_min.
    backend = _backend()
    layout = _layout(roberta_large_shapes()[first:last])
    grads = _grads(layout)
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


