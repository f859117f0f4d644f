"""Compile every Triton launch of the backend for a CUDA architecture, without a GPU.

``python -m fsam_kernels.triton_kernels.compile_check [ARCH]`` (default 90, an H100/H200):

1. records, in a child process under the Triton interpreter, every launch the backend makes along
   every host path (:mod:`.launches`): kernel, constexprs, ``num_warps``, fp fusion, and the JIT's
   specialisation of each runtime argument;
2. compiles each recorded configuration with Triton's whole compiler (down to PTX and the cubin),
   plus, per recorded launch, the variants with every integer argument generic (not divisible by 16,
   its recorded width) and with every integer argument equal to 1 (which the JIT turns into a
   constant; not the ``do_not_specialize`` ones, which it never does), since other inputs give those;
3. checks that launches with fp fusion off (the kernels whose results must match the reference bit
   for bit) contain no fused multiply-add;
4. prints, per configuration, registers per thread, spilled bytes, shared memory and the resident
   blocks per SM those allow (from ``ptxas -v`` on the PTX, the numbers a GPU would report), and the
   number of 128-bit global loads and stores (the streaming kernels' full-block paths, taken per
   tensor on 16 bytes) and of 8-bit global loads (the mask is read in words: none where it is read).

Must run without ``TRITON_INTERPRET=1``. Exit status 1 if a compile or check fails.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from . import interpreted

# Kernels only tests launch: nothing of the backend's to mirror.
_TEST_ONLY: set[str] = set()

# Per-SM limits of sm_80 and sm_90 (A100 / H100 / H200): registers, threads, blocks, shared memory.
_SM_REGS, _SM_THREADS, _SM_BLOCKS, _SM_SHARED = 65536, 2048, 32, 228 * 1024


@dataclass
class Compiled:
    name: str
    regs: int
    spill_bytes: int
    shared: int
    num_warps: int
    seconds: float
    wide_loads: int  # 128-bit global loads / stores in the PTX (ld.global.v4.b32, st.global.v4.b32)
    wide_stores: int
    byte_loads: int  # 8-bit global loads (the packed mask is read in 32-bit words: none in the streaming kernels)

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM: registers are allocated per warp in units of 256 (8 per thread)."""
        regs_per_warp = -(-max(self.regs, 1) * 32 // 256) * 256
        by_regs = (_SM_REGS // regs_per_warp) // self.num_warps
        by_threads = _SM_THREADS // (32 * self.num_warps)
        by_shared = _SM_SHARED // self.shared if self.shared else _SM_BLOCKS
        return min(by_regs, by_threads, by_shared, _SM_BLOCKS)

    def line(self) -> str:
        return (f"{self.name}: {self.regs} registers, {self.spill_bytes} B spilled, {self.shared} B shared, "
                f"{self.num_warps} warps -> {self.blocks_per_sm} blocks/SM; 128-bit: {self.wide_loads} loads, "
                f"{self.wide_stores} stores; 8-bit: {self.byte_loads} loads ({self.seconds:.1f}s)")


def recorded_launches() -> list[dict]:
    """The backend's launches, recorded in a child process (the interpreter must not leak here)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", f"{__package__}.launches"], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"recording the launches failed:\n{out.stdout[-2000:]}{out.stderr[-4000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def variants(records: list[dict]) -> list[dict]:
    """The recorded launches, plus per kernel configuration its all-generic and all-ones integer variants."""
    out, seen = [], set()

    def add(rec):
        key = json.dumps(rec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(rec)

    for rec in records:
        add(rec)
        ints = {n: kind for n, (kind, _) in rec["runtime"].items() if kind == "constexpr" or kind in ("i32", "i64")}
        if not ints:
            continue
        # generic: no divisibility, the recorded width (a recorded 1 is an i32); ones: every integer 1,
        # except do_not_specialize arguments, which the JIT never turns into constants
        add(dict(rec, runtime={**rec["runtime"], **{n: ["i32" if k == "constexpr" else k, ""] for n, k in ints.items()}}))
        fixed = set(rec.get("unspecialized", ()))
        ones = {n: ["constexpr", 1] for n in ints if n not in fixed}
        if ones:
            add(dict(rec, runtime={**rec["runtime"], **ones}))
    return out


def _signature(fn, rec: dict):
    import triton.language as tl

    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in rec["constexprs"]:
            v = rec["constexprs"][name]
            signature[name] = "constexpr"
            constexprs[(i,)] = tl.dtype(v["dtype"]) if isinstance(v, dict) else v
            continue
        kind, key = rec["runtime"][name]
        if kind == "constexpr":
            signature[name] = "constexpr"
            constexprs[(i,)] = key
            continue
        signature[name] = kind
        if isinstance(key, str):  # as the JIT does, so both share Triton's cache (compile_check warms it)
            attrs[(i,)] = [["tt.divisibility", 16]] if key == "D" else []
    return signature, constexprs, attrs


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill bytes) as ptxas reports them for this PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", src,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return (int(regs.group(1)) if regs else 0), (max(spills) if spills else 0)


def compile_one(rec: dict, arch: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
    signature, constexprs, attrs = _signature(fn, rec)
    options = dict(rec["options"])
    exact = options.get("enable_fp_fusion", True) is False
    t = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - t
    ptx = kernel.asm["ptx"]
    specs = ",".join(f"{n}={k}{'/' + str(v) if v not in (None, '') else ''}" for n, (k, v) in rec["runtime"].items()
                     if k == "constexpr" or k.startswith("i"))
    name = f"{rec['kernel']} {rec['constexprs']} [{specs}]"
    if exact and re.search(r"\bfma\.rn\.f(32|64)\b", ptx):
        raise AssertionError(f"{name}: fused multiply-add in a kernel that must round every product")
    regs, spills = _ptxas_usage(ptx, arch)
    return Compiled(name, regs, spills, int(kernel.metadata.shared), options.get("num_warps", 4), seconds,
                    len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.b32\b", ptx)),
                    len(re.findall(r"\bst\.global(?:\.\w+)*\.v4\.b32\b", ptx)),
                    len(re.findall(r"\bld\.global(?:\.\w+)*\.[bsu]8\b", ptx)))


def unrecorded_kernels(records: list[dict]) -> list[str]:
    """Kernels (``*_kernel`` functions of the kernel modules) that no recorded launch reaches: the
    recorder's scenarios must grow with the backend."""
    from triton.runtime.jit import JITFunction

    from . import KERNEL_MODULES

    launched = {(r["module"], r["kernel"]) for r in records}
    missing = []
    for short in (*KERNEL_MODULES, "nm_mask"):
        module = importlib.import_module(f"{__package__}.{short}")
        for name, obj in vars(module).items():
            qualified = f"{module.__name__}.{name}"
            if (isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.fn.__module__ == module.__name__
                    and (module.__name__, name) not in launched and qualified not in _TEST_ONLY):
                missing.append(qualified)
    return missing


def _compile_or_report(job: tuple[dict, int]) -> tuple[bool, str]:
    rec, arch = job
    try:
        return True, compile_one(rec, arch).line()
    except Exception as exc:  # report every failure, not only the first
        return False, f"FAILED {rec['kernel']} {rec['constexprs']} {rec['runtime']}: {type(exc).__name__}: {exc}"


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fsam_kernels.triton_kernels.compile_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", nargs="?", type=int, default=90, help="CUDA compute capability, e.g. 90 or 80")
    ap.add_argument("--jobs", type=int, default=1,
                    help="compile in this many processes (on a GPU machine, before the GPU tests: the JIT then "
                         "finds every kernel in Triton's cache)")
    ap.add_argument("--kernels", default="",
                    help="comma-separated kernel names: compile only their launches (a quicker look at a few)")
    args = ap.parse_args(argv[1:])
    if interpreted():
        print("compile_check: unset TRITON_INTERPRET to compile the kernels", file=sys.stderr)
        return 2
    arch = args.arch
    failed = 0
    recorded = recorded_launches()
    for name in unrecorded_kernels(recorded):
        failed += 1
        print(f"FAILED {name}: no recorded launch (add a scenario to {__package__}.launches)")
    records = variants(recorded)
    if args.kernels:
        wanted = set(args.kernels.split(","))
        records = [rec for rec in records if rec["kernel"] in wanted]
    print(f"compile_check: {len(records)} launch configurations for sm_{arch}")
    jobs = [(rec, arch) for rec in records]
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(_compile_or_report, jobs, chunksize=1)
    else:
        results = map(_compile_or_report, jobs)
    for ok, line in results:
        failed += not ok
        print(line, flush=True)
    if failed:
        print(f"compile_check: {failed} of {len(records)} configurations failed for sm_{arch}")
        return 1
    print(f"compile_check: every kernel compiled for sm_{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
