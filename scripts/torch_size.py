"""Prints which torch is installed in this environment, its build (CPU or CUDA) and its size class: the
bytes of torch's files plus the nvidia-* libraries a CUDA build pulls in, read from the installed
distributions' records (torch is not imported). Used by scripts/setup_env.sh."""
from __future__ import annotations

import importlib.metadata as md

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def installed_bytes(dist: md.Distribution) -> int:
    return sum(f.size or 0 for f in dist.files or ())


def describe(dists=None) -> str:
    dists = list(md.distributions()) if dists is None else dists
    torch = next((d for d in dists if (d.metadata["Name"] or "").lower() == "torch"), None)
    if torch is None:
        return "setup_env: torch is not installed"
    nvidia = [d for d in dists if (d.metadata["Name"] or "").lower().startswith("nvidia-")]
    cuda = bool(nvidia) or "+cu" in torch.version or "+rocm" in torch.version
    size = installed_bytes(torch) + sum(installed_bytes(d) for d in nvidia)
    if not cuda:
        return f"setup_env: torch {torch.version}, the CPU build: {size / 1e9:.1f} GB installed"
    return (f"setup_env: torch {torch.version}, a CUDA build ({len(nvidia)} nvidia-* libraries): {size / 1e9:.1f} GB "
            f"installed; on a machine without an NVIDIA GPU the CPU build takes under 1 GB: remove the venv and "
            f"set FSAM_TORCH_INDEX_URL={CPU_INDEX}")


if __name__ == "__main__":
    print(describe())
