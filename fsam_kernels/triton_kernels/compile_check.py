"""Compile every kernel of the Triton backend for a CUDA architecture, without a GPU.

``python -m fsam_kernels.triton_kernels.compile_check [ARCH]`` (default 90, an H100/H200) runs
Triton's whole compiler (down to PTX and the cubin) on every kernel at every dtype the backend
launches, so a CPU-only machine catches the errors the interpreter cannot (typing of the compiled
path), and checks that the kernels whose results must match the reference bit for bit contain no
fused multiply-add. Must run without ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import CHUNK, N_GROUPS, interpreted

_P, _P32, _PF = "*i64", "*i32", "*fp32"
_TYPE_NAMES = {tl.float32: "fp32", tl.float16: "fp16", tl.bfloat16: "bf16"}
_ARG_TYPES = dict(
    acc_ptrs=_P, grad_ptrs=_P, score_ptrs=_P, w_ptrs=_P, g_ptrs=_P, numels=_P, chunk_slot=_P32, chunk_start=_P,
    chunk_ref=_P, chunk_group=_P32, bit_offsets=_P, elem_offsets=_P, params=_P32, counts=_P32, cand=_P32,
    info=_P, sample=_P32, quota=_P, prefix=_P, aux_prefix=_P, mask="*u8", rhos=_PF, adaptive=_P32,
    partials="*fp64", extra="*fp64", out=_PF, norm_ptr=_PF, applied=_P32, n_chunks="i32", capacity="i64",
    n_tensors="i32", n_total="i64", n_samples="i32", n_search="i32", rank_hi="i32", rank_lo="i32", k="i64",
    n="i32", dense_total="i64", eps="fp32", shift="i32", high_shift="i32", keys=_P32, n_ptr=_P, sel=_P, hist=_P32,
)


_NM_TYPES = dict(score_ptrs=_P, support_ptrs=_P, byte_offsets=_P, prog_start=_P, n_tensors="i32", n_search="i32",
                 bits_ptr="*u8")


def _compile(fn, constexprs: dict, target: GPUTarget, num_warps: int = 8, exact: bool = False, **types) -> str:
    names = fn.arg_names
    signature = {a: "constexpr" if a in constexprs else types.get(a, _ARG_TYPES.get(a)) for a in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(a),): v for a, v in constexprs.items()})
    kernel = triton.compile(src, target=target, options={"num_warps": num_warps, "enable_fp_fusion": not exact})
    ptx = kernel.asm["ptx"]
    if exact and "fma.rn.f32" in ptx:
        raise AssertionError(f"{fn.__name__}: fused multiply-add in a kernel that must round every product")
    return ptx


def compile_all(arch: int = 90) -> list[str]:
    """Compile every kernel; return one line per compiled variant."""
    from . import fisher, histogram, nm_mask, norm, perturb, radix, select

    target = GPUTarget("cuda", arch, 32)
    done = []

    def run(fn, constexprs, **kw):
        t = time.perf_counter()
        _compile(fn, constexprs, target, **kw)
        done.append(f"{fn.__name__} {constexprs} {time.perf_counter() - t:.1f}s")

    dtypes = (tl.float32, tl.float16, tl.bfloat16)
    for dt in dtypes:
        run(fisher._fisher_accumulate_kernel, dict(GRAD_DTYPE=dt, BLOCK=CHUNK), exact=True)
        keyed = dict(DTYPE=dt, SQUARE=True, BLOCK=CHUNK)
        for fn in (select._sample_kernel, select._count_kernel, select._write_kernel, select._fixup_kernel):
            run(fn, keyed)
        run(norm._sumsq_kernel, dict(W_DTYPE=dt, G_DTYPE=dt, BLOCK=CHUNK))
        saved = "*" + _TYPE_NAMES[dt]
        run(perturb._perturb_kernel, dict(W_DTYPE=dt, G_DTYPE=dt, BLOCK=CHUNK), exact=True, saved=saved)
        run(perturb._restore_kernel, dict(W_DTYPE=dt, BLOCK=CHUNK), saved=saved)
        run(histogram._histogram_kernel, dict(DTYPE=dt, SQUARE=True, TOP=False, BINS=256, BLOCK=CHUNK),
            out=_P, prefix="i32")
        run(nm_mask._nm_mask_kernel, dict(M=4, SQUARE=True, HAS_SUPPORT=True, S_DTYPE=dt, W_DTYPE=tl.float32,
                                          BLOCK_BYTES=nm_mask.BLOCK_BYTES), **_NM_TYPES)
    run(histogram._histogram_kernel, dict(DTYPE=tl.float32, SQUARE=False, TOP=True, BINS=256, BLOCK=CHUNK),
        out=_P, prefix="i32")
    run(nm_mask._nm_mask_kernel, dict(M=16, SQUARE=False, HAS_SUPPORT=False, S_DTYPE=tl.float32, W_DTYPE=tl.float32,
                                      BLOCK_BYTES=nm_mask.BLOCK_BYTES), **_NM_TYPES)
    run(select._count_kernel, dict(DTYPE=tl.float32, SQUARE=False, BLOCK=CHUNK))
    run(select._bracket_kernel, dict(BLOCK=CHUNK), num_warps=16)
    run(select._resolve_kernel, dict(BLOCK=CHUNK), num_warps=16)
    run(select._scan_kernel, dict(BLOCK=select._SCAN_BLOCK, N_GROUPS=N_GROUPS))
    run(select._popcount_kernel, dict(BLOCK=CHUNK))
    for rows in (1, 2):
        for p in range(radix.PASSES):
            run(radix._radix_hist_kernel, dict(R=rows, PASS=p, BLOCK=CHUNK))
        run(radix._store_selected_kernel, dict(R=rows), out=_P32)
    run(select._bracket_finish_kernel, {})
    run(select._resolve_pre_kernel, dict(BLOCK=CHUNK), num_warps=16)
    run(select._candidate_finish_kernel, {})
    for out in (_PF, "*fp64"):  # the norm dtype
        run(norm._sqrt_of_sum_kernel, dict(BLOCK=norm._FINAL_BLOCK), out=out)
    return done


def main(argv: list[str]) -> int:
    if interpreted():
        print("compile_check: unset TRITON_INTERPRET to compile the kernels", file=sys.stderr)
        return 2
    arch = int(argv[1]) if len(argv) > 1 else 90
    for line in compile_all(arch):
        print(line)
    print(f"compile_check: every kernel compiled for sm_{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
