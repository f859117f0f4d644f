"""Every Triton kernel compiles for an H100/H200 (sm_90), checked on any machine, GPU or not.

The interpreter tests run the kernels' logic; this runs Triton's compiler on them (in a child
process, since this session's kernels may be loaded in interpreter mode), catching what only the
compiled path sees, and checks that the bit-exact kernels contain no fused multiply-add.
"""
import ast
import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "fsam_kernels.triton_kernels.compile_check", "90"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every kernel compiled for sm_90" in proc.stdout
    lines = proc.stdout.splitlines()
    # the recorded launches, with the backend's own warps (the threshold search runs 16) and
    # integer-equals-1 specialisations, each with its register use and occupancy
    assert any(line.startswith("_bracket_kernel") and "16 warps" in line for line in lines)
    assert any(line.startswith("_perturb_kernel") and "constexpr/1" in line for line in lines)
    assert all(re.search(r"\d+ registers, \d+ B spilled, .* -> \d+ blocks/SM", line)
               for line in lines if line.startswith("_"))
    # The streaming kernels' full-block paths read (the Fisher accumulation also writes) whole blocks
    # with 128-bit accesses: every thread's elements of each stream, in 16-byte pieces, for fp32, fp16
    # and bf16. Alignment is a per-tensor test on the address in the table, so every compiled launch has
    # the vector path, including those recorded from launches mixing tensors on 16 bytes with views at
    # odd offsets (launches.py: "mixed alignment"), whose other tensors take the masked path.
    shape = subprocess.run(
        [sys.executable, "-c", "from fsam_kernels.triton_kernels import perturb as p; "
                               "print(p.PERTURB_WARPS, p.PERTURB_SPLIT)"],
        cwd=root, env=env, capture_output=True, text=True, check=True).stdout.split()
    perturb_shape = (int(shape[0]), int(shape[1]))
    item = {"fp32": 4, "fp16": 2, "bf16": 2}
    streaming = {  # kernel: (constexprs naming the loaded streams' dtypes, the stored ones)
        "_fisher_accumulate_kernel": (("GRAD_DTYPE", "fp32"), ("fp32",)),
        "_perturb_kernel": (("W_DTYPE", "G_DTYPE"), ()),
        "_sumsq_kernel": (("W_DTYPE", "G_DTYPE"), ()),
        "_count_kernel": (("DTYPE",), ()),
        "_write_kernel": (("DTYPE",), ()),
        "_fixup_kernel": (("DTYPE",), ()),
        "_repair_pass_kernel": (("DTYPE",), ()),
        "_histogram_kernel": (("DTYPE",), ()),
    }
    for kernel, (loads, stores) in streaming.items():
        seen = set()
        for line in lines:
            if not line.startswith(kernel + " "):
                continue
            constexprs = ast.literal_eval(re.match(r"\w+ (\{.*?\}) \[", line).group(1))
            warps = int(re.search(r"(\d+) warps", line).group(1))
            blocks = int(re.search(r"-> (\d+) blocks/SM", line).group(1))
            split = constexprs.get("SPLIT", 1)
            if kernel != "_perturb_kernel" or (warps, split) == perturb_shape:  # the launch shape in use
                assert blocks >= 2, line
            per_thread = 4096 // (32 * warps * split)
            dtype = {s: constexprs[s]["dtype"] if s in constexprs else s for s in loads + stores}
            wide_loads, wide_stores = map(int, re.search(r"128-bit: (\d+) loads, (\d+) stores", line).groups())
            assert wide_loads >= sum(item[dtype[s]] * per_thread // 16 for s in loads), line
            assert wide_stores >= sum(item[dtype[s]] * per_thread // 16 for s in stores), line
            seen.add(dtype[loads[0]])
        assert seen == {"fp32", "fp16", "bf16"}, (kernel, seen)
    # The N:M kernel streams: at least 2 blocks per SM and nothing spilled, for every M recorded.
    nm = [line for line in lines if line.startswith("_nm_mask_kernel ")]
    assert nm
    for line in nm:
        assert " 0 B spilled" in line and int(re.search(r"-> (\d+) blocks/SM", line).group(1)) >= 2, line
    # The kernels that read the packed mask read it in 32-bit words, one per 32 elements, expanded with
    # shifts: no 8-bit load (a byte per element before, each byte loaded by 8 threads).
    for kernel in ("_perturb_kernel", "_restore_kernel", "_popcount_kernel"):
        found = [line for line in lines if line.startswith(kernel + " ")]
        assert found, kernel
        for line in found:
            assert int(re.search(r"; 8-bit: (\d+) loads", line).group(1)) == 0, line
