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
backend is used at run time. What was attempted and how each part ended (with the compiler's last
error lines) is recorded in fsam_kernels/_build_info.json, installed with the package and printed by
``python -m fsam_kernels``. Every C++ (csrc/*.cpp) and CUDA (csrc/*.cu) source is compiled, so new
op files need no change here.
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
EXT_NAME = "fsam_kernels._C"


def _load_build_info():
    # fsam_kernels/build_info.py by path: importing the package would import torch and the extension.
    spec = importlib.util.spec_from_file_location("_fsam_build_info", os.path.join(ROOT, "fsam_kernels", "build_info.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_info = _load_build_info()
RECORD = build_info.new_record(None, None)  # what the build attempted and how each part ended


class RecordingBuildPy(build_py):
    """Installs the build record with the package (build_ext, when it runs, rewrites it at its end)."""

    def run(self):
        super().run()
        build_info.write(RECORD, os.path.join(self.build_lib, "fsam_kernels", build_info.FILE_NAME))


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
        for part in build_info.PART_NAMES:
            build_info.not_attempted(RECORD, part, "FSAM_NO_NATIVE=1 (pure-Python install)")
        return [], {"build_py": RecordingBuildPy}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension
    except ImportError:
        _say("torch is not importable in this build environment (isolated build?): installing pure Python. "
             "To build the native backend: pip install --no-build-isolation .")
        for part in build_info.PART_NAMES:
            build_info.not_attempted(RECORD, part, "torch was not importable in the build environment (an isolated "
                                                   "build?); reinstall with pip install --no-build-isolation .")
        return [], {"build_py": RecordingBuildPy}
    RECORD.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_home=CUDA_HOME)

    force_cuda = _flag("FSAM_FORCE_CUDA")
    with_cuda = False
    if force_cuda and _flag("FSAM_NO_CUDA"):
        raise SystemExit("fsam_kernels setup: FSAM_FORCE_CUDA=1 and FSAM_NO_CUDA=1 contradict each other")
    if _flag("FSAM_NO_CUDA"):
        _say("FSAM_NO_CUDA=1: building the CPU extension only")
        build_info.not_attempted(RECORD, "cuda", "FSAM_NO_CUDA=1")
    elif torch.version.cuda is None:
        if force_cuda:
            raise SystemExit(f"fsam_kernels setup: FSAM_FORCE_CUDA=1 but torch {torch.__version__} is not a CUDA build")
        _say(f"torch {torch.__version__} is a CPU build: building the CPU extension only")
        build_info.not_attempted(RECORD, "cuda", f"torch {torch.__version__} is a CPU build")
    elif CUDA_HOME is None:
        if force_cuda:
            raise SystemExit("fsam_kernels setup: FSAM_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        _say(f"no CUDA toolkit found (torch {torch.__version__} wants CUDA {torch.version.cuda}; set CUDA_HOME): "
             "building the CPU extension only")
        build_info.not_attempted(RECORD, "cuda", f"no CUDA toolkit found (torch {torch.__version__} wants CUDA "
                                                 f"{torch.version.cuda}); set CUDA_HOME to the toolkit and rebuild")
    else:
        with_cuda = True
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        RECORD["archs"] = os.environ["TORCH_CUDA_ARCH_LIST"]
        _say(f"building CPU and CUDA kernels with {CUDA_HOME} for TORCH_CUDA_ARCH_LIST="
             f"{os.environ['TORCH_CUDA_ARCH_LIST']!r} (torch {torch.__version__}, CUDA {torch.version.cuda})")

    class BuildNative(BuildExtension):
        """Degrades instead of failing: CUDA+CPU -> CPU only -> pure Python (unless FSAM_FORCE_CUDA)."""

        def run(self):
            try:
                super().run()
            finally:  # in place (--inplace, pip install -e): the record goes next to the copied extension too
                if self.inplace:
                    build_info.write(RECORD, os.path.join(ROOT, "fsam_kernels", build_info.FILE_NAME))

        def build_extensions(self):
            try:
                self._build_with_fallbacks()
            finally:
                build_info.write(RECORD, os.path.join(os.path.dirname(self.get_ext_fullpath(EXT_NAME)),
                                                      build_info.FILE_NAME))

        def _attempt(self, cuda: bool):
            """Build; record how the part tried ended (the CUDA attempt builds the CPU part too)."""
            part = "cuda" if cuda else "cpu"
            build_info.attempted(RECORD, part)
            lines, exc = build_info.captured(super().build_extensions)
            build_info.ended(RECORD, part, lines, exc)
            if exc is None and cuda:
                build_info.attempted(RECORD, "cpu")
                build_info.ended(RECORD, "cpu", [], None)
            if exc is not None:
                raise exc

        def _build_with_fallbacks(self):
            cuda = with_cuda
            while True:
                try:
                    self._attempt(cuda)
                    return
                except Exception as exc:  # compiler missing or broken, nvcc error, link error
                    if force_cuda:
                        build_info.not_attempted(RECORD, "cpu", "FSAM_FORCE_CUDA=1 stops the build at the CUDA failure")
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
cmdclass.setdefault("build_py", RecordingBuildPy)
setup(ext_modules=ext_modules, cmdclass=cmdclass)
