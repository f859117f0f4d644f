"""Build of fsam_kernels with its optional C++/CUDA extension ``fsam_kernels._C``.

Install with the torch you already have (torch is a build dependency but deliberately not listed in
pyproject.toml, so an isolated build cannot pull a different one)::

    pip install --no-build-isolation .        # or -e . for development

Environment switches (all optional):

    FSAM_NO_NATIVE=1       install pure Python only (backends "torch" and "triton"); nothing is compiled.
    FSAM_NO_CUDA=1         build the C++ CPU extension only, even when a CUDA toolkit is present.
    FSAM_FORCE_CUDA=1      build the CUDA kernels even when no GPU is visible (e.g. in CI); a missing
                           toolkit, a CPU-only torch or a compile/link error is then fatal.
    TORCH_CUDA_ARCH_LIST   GPU architectures to compile for (default "8.0;9.0+PTX": A100 and H100/H200
                           binaries, plus PTX that newer GPUs compile at load time).
    MAX_JOBS               parallel compile jobs (ninja); lower it on machines with little memory.
    CUDA_HOME              the CUDA toolkit to use (default: found by torch, e.g. /usr/local/cuda).

Without those switches: the CUDA kernels are built when torch is a CUDA build and a toolkit is found
(otherwise a message and a CPU-only build); if compiling fails, a warning is printed and the package is
installed without the failing part (CUDA first, then the whole extension), and the pure-PyTorch
backend is used at run time. Every C++ (csrc/*.cpp) and CUDA (csrc/*.cu) source is compiled, so new
op files need no change here.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
EXT_NAME = "fsam_kernels._C"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"fsam_kernels setup: {msg}", file=sys.stderr)


def _sources(pattern: str) -> list:
    # Relative paths: setuptools rejects absolute source paths in some modes.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def _extension(with_cuda: bool):
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cxx = ["-O3", "-ffp-contract=off", "-fopenmp"]  # no fused multiply-add: results match the reference
    macros = [("FSAM_TORCH_VERSION", torch.__version__)]
    sources = _sources("*.cpp")
    if not with_cuda:
        return CppExtension(EXT_NAME, sources, define_macros=macros,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    arch_macro = os.environ["TORCH_CUDA_ARCH_LIST"].strip().replace(";", "/").replace(" ", "/")
    macros += [("FSAM_WITH_CUDA", "1"), ("FSAM_CUDA_ARCHS", arch_macro)]
    nvcc = ["-O3", "--fmad=false"]  # no -std here: torch picks the one its headers need
    return CUDAExtension(EXT_NAME, sources + _sources("*.cu"), define_macros=macros,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])


def _plan():
    """(ext_modules, cmdclass) for this environment."""
    if _flag("FSAM_NO_NATIVE"):
        _say("FSAM_NO_NATIVE=1: installing pure Python (no native backend)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension
    except ImportError:
        _say("torch is not importable in this build environment (isolated build?): installing pure Python. "
             "To build the native backend: pip install --no-build-isolation .")
        return [], {}

    force_cuda = _flag("FSAM_FORCE_CUDA")
    with_cuda = False
    if force_cuda and _flag("FSAM_NO_CUDA"):
        raise SystemExit("fsam_kernels setup: FSAM_FORCE_CUDA=1 and FSAM_NO_CUDA=1 contradict each other")
    if _flag("FSAM_NO_CUDA"):
        _say("FSAM_NO_CUDA=1: building the CPU extension only")
    elif torch.version.cuda is None:
        if force_cuda:
            raise SystemExit(f"fsam_kernels setup: FSAM_FORCE_CUDA=1 but torch {torch.__version__} is not a CUDA build")
        _say(f"torch {torch.__version__} is a CPU build: building the CPU extension only")
    elif CUDA_HOME is None:
        if force_cuda:
            raise SystemExit("fsam_kernels setup: FSAM_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        _say(f"no CUDA toolkit found (torch {torch.__version__} wants CUDA {torch.version.cuda}; set CUDA_HOME): "
             "building the CPU extension only")
    else:
        with_cuda = True
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        _say(f"building CPU and CUDA kernels with {CUDA_HOME} for TORCH_CUDA_ARCH_LIST="
             f"{os.environ['TORCH_CUDA_ARCH_LIST']!r} (torch {torch.__version__}, CUDA {torch.version.cuda})")

    class BuildNative(BuildExtension):
        """Degrades instead of failing: CUDA+CPU -> CPU only -> pure Python (unless FSAM_FORCE_CUDA)."""

        def build_extensions(self):
            cuda = with_cuda
            while True:
                try:
                    super().build_extensions()
                    return
                except Exception as exc:  # compiler missing or broken, nvcc error, link error
                    if force_cuda:
                        raise
                    if cuda:
                        _say(f"WARNING: building the CUDA kernels failed ({type(exc).__name__}: {exc}); "
                             "retrying with the CPU extension only")
                        cuda = False
                        cpu_only = _extension(with_cuda=False)
                        for ext in self.extensions:  # in place: setuptools keeps state on the object
                            for attr in ("sources", "include_dirs", "library_dirs", "libraries", "define_macros",
                                         "extra_compile_args", "extra_link_args", "runtime_library_dirs"):
                                setattr(ext, attr, getattr(cpu_only, attr))
                        continue
                    _say(f"WARNING: building the native extension failed ({type(exc).__name__}: {exc}); "
                         "installing pure Python: backend 'native' will be unavailable")
                    self.extensions = []
                    return

    return [_extension(with_cuda)], {"build_ext": BuildNative}


ext_modules, cmdclass = _plan()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
