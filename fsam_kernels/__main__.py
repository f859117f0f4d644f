"""``python -m fsam_kernels``: what was built, what can run here, and what ``backend="auto"`` picks.

Prints the versions, the compiled extension (CPU and CUDA kernels, the CUDA architectures and the
torch it was built against), what the build attempted and how each part ended (see
:mod:`fsam_kernels.build_info`), each backend's availability per device and why not, and the backend
``"auto"`` picks per device (a warning that choice gives is part of the report, not printed before it). Works on a pure-Python install and without a GPU; probes nothing at
import time of the package, only when run.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import sys
import warnings

import torch


def _native_build() -> str:
    try:
        from ._native_ops import load_library

        ext = load_library()
    except ImportError as exc:
        return f"not built ({exc}); pure-Python install: reinstall with `pip install --no-build-isolation .`"
    text = "CPU kernels"
    if ext.with_cuda:
        archs = ext.cuda_archs.replace("/", ";")
        text += f" + CUDA kernels ({ext.cuda_build}, TORCH_CUDA_ARCH_LIST={archs})"
    else:
        text += " only (no CUDA kernels)"
    return f"{text}, against torch {ext.torch_version}"


def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed"
    import triton

    return triton.__version__


def report() -> str:
    from . import __version__, build_info

    devices = ["cpu"]
    cuda = "not available"
    if torch.cuda.is_available():
        devices.append("cuda")
        cap = torch.cuda.get_device_capability()
        cuda = f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), CUDA {torch.version.cuda}"
    elif torch.version.cuda:
        cuda = f"torch built with CUDA {torch.version.cuda}, but no GPU is visible"
    lines = [
        f"fsam_kernels {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {_triton_version()}",
        f"GPU: {cuda}",
        f"native extension: {_native_build()}",
        *(f"  {line}" for line in build_info.report_lines()),
        f"FSAM_BACKEND: {os.environ.get('FSAM_BACKEND', '(not set)')}",
        "",
    ]
    with warnings.catch_warnings(record=True) as caught:  # auto's fallback warning: a line of the report
        warnings.simplefilter("always")
        lines += _backend_lines(devices)
    lines += [f"warning: {w.message}" for w in caught]
    return "\n".join(lines)


def _backend_lines(devices: list[str]) -> list[str]:
    from .backends import AUTO_ORDER, BackendUnavailable, backend_names, get_backend, load_error

    lines = []
    for dev in devices:
        lines.append(f"{dev}: backends in auto's order {list(AUTO_ORDER.get(dev, ('torch',)))}")
        for name in backend_names():
            err = load_error(name)
            if err is not None:
                lines.append(f"  {name:7s} not loaded: {err}")
                continue
            try:
                get_backend(name, dev)
                lines.append(f"  {name:7s} available")
            except BackendUnavailable as exc:
                lines.append(f"  {name:7s} unavailable: {str(exc).split(': ', 1)[-1]}")
        try:
            lines.append(f"  auto -> {get_backend('auto', dev).name}")
        except (BackendUnavailable, ValueError) as exc:
            lines.append(f"  auto -> error: {exc}")
    return lines


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
