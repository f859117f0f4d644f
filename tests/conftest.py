import os

import pytest
import torch

from backend_targets import triton_interpreter_selected
from helpers import TinyNet, make_batches


def pytest_configure(config):
    # Triton fixes its mode when fsam_kernels' kernels are first imported (after collection), one mode
    # per process: the interpreter on CPU tensors unless this run cannot select the interpreter target
    # (e.g. -m "gpu and triton" on a GPU machine runs compiled Triton). An explicit TRITON_INTERPRET wins.
    if "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1" if triton_interpreter_selected(config.getoption("markexpr")) else "0"


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def batches():
    return make_batches()
