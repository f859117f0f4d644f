#!/usr/bin/env bash
# CI without a GPU: prove that the CUDA kernels (csrc/*.cu) compile AND link, for sm_80 and sm_90
# (+ PTX), against a CUDA build of torch, that the resulting extension imports and defines every op,
# and (cuobjdump) that the .so really holds code for each requested arch. The build is the GPU check's
# (scripts/build_inplace.sh: setup.py build_ext --inplace, pyproject.toml not read).
#
# cuobjdump: the toolkit's (CUDA_HOME/bin), else one on the PATH, else NVIDIA's pip wheel
# nvidia-cuda-cuobjdump (of torch's CUDA major version, installed into the venv), else the one the
# Triton wheel ships (triton/backends/nvidia/bin). None of them: the check FAILS; it never skips.
#
# It makes a fresh venv with torch 2.14.1 built for CUDA 13.0 (from the local package index), which
# brings NVIDIA's CUDA pip wheels (headers and libraries); nvcc comes from CUDA_HOME (default
# /usr/local/cuda, a minimal toolkit). The sources are built in a temporary copy of the tree, so the
# working tree's own (CPU) build is left alone, and everything is deleted at the end: nothing is
# cached between runs. FSAM_FORCE_CUDA=1 makes any compile or link error fatal: a .cu that does not
# compile fails this script.
#
# Knobs: FSAM_CUDA_VENV (reuse this venv instead, e.g. /tmp/fsam-cuda-venv, for quick local
# iterations), FSAM_CUDA_TORCH_SPEC (default torch==2.14.1), TORCH_CUDA_ARCH_LIST (default
# "8.0;9.0+PTX"), MAX_JOBS (default 2), CUDA_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
WORK=$(mktemp -d /tmp/fsam-cuda-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
VENV=${FSAM_CUDA_VENV:-$WORK/venv}
TORCH_SPEC=${FSAM_CUDA_TORCH_SPEC:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
export MAX_JOBS=${MAX_JOBS:-2}
export FSAM_FORCE_CUDA=1
unset FSAM_NO_CUDA FSAM_NO_NATIVE

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q "$TORCH_SPEC" setuptools wheel ninja
echo "cuda-build-check: venv ready in $(( $(date +%s) - start )) s"

# Headers and libraries of NVIDIA's pip wheels (cusparse, cublas, ... are not in the minimal toolkit).
NV_ROOT=$(python -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
export CPATH="$NV_ROOT/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$NV_ROOT/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
python -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build'; print('cuda-build-check: torch', torch.__version__, 'CUDA', torch.version.cuda)"
"$CUDA_HOME/bin/nvcc" --version | tail -1

find_cuobjdump() {  # prints the first cuobjdump that runs, or nothing
  local c cands=("$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)")
  local major site
  major=$(python -c "import torch; print(torch.version.cuda.split('.')[0])")
  site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  if ! ls "$site"/nvidia/cu*/bin/cuobjdump >/dev/null 2>&1; then
    python -m pip install -q "nvidia-cuda-cuobjdump==$major.*" >&2 || echo "cuda-build-check: could not install nvidia-cuda-cuobjdump" >&2
  fi
  cands+=("$site"/nvidia/cu*/bin/cuobjdump)
  cands+=("$(python -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))" 2>/dev/null || true)")
  for c in "${cands[@]}"; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" --version >/dev/null 2>&1; then echo "$c"; return; fi
  done
}

mkdir "$WORK/src"
cp -r setup.py pyproject.toml README.md MANIFEST.in csrc fsam_kernels "$WORK/src/"
mkdir "$WORK/src/scripts" && cp scripts/build_inplace.sh "$WORK/src/scripts/"
find "$WORK/src/fsam_kernels" -name '*.so' -delete
cd "$WORK/src"
build_start=$(date +%s)
PYTHON=python bash scripts/build_inplace.sh -q
echo "cuda-build-check: compiled and linked in $(( $(date +%s) - build_start )) s"

python - <<'PY'
import torch
import fsam_kernels._C as C

assert C.with_cuda == 1, "the extension was built without its CUDA kernels"
for op in ("fisher_accumulate", "select_mask", "select_nm_mask", "key_histogram", "mask_from_threshold",
           "mask_block_prefix", "grad_norm", "masked_perturb",
           "masked_restore"):
    getattr(torch.ops.fsam_kernels, op)
print(f"cuda-build-check: fsam_kernels._C imports ({C.cuda_build}, archs {C.cuda_archs.replace('/', ';')}, "
      f"torch {C.torch_version}; torch.cuda.is_available()={torch.cuda.is_available()})")
PY
# The device code inside the .so: one cubin per requested arch, PTX for "+PTX" entries.
SO=$(ls fsam_kernels/_C*.so)
CUOBJDUMP=$(find_cuobjdump)
if [ -z "$CUOBJDUMP" ]; then
  echo "cuda-build-check: FAILED: no working cuobjdump (tried $CUDA_HOME/bin, the PATH, nvidia-cuda-cuobjdump, Triton's)"
  exit 1
else
  echo "cuda-build-check: $CUOBJDUMP: $("$CUOBJDUMP" --version | tail -1)"
  elfs=$("$CUOBJDUMP" --list-elf "$SO") || { echo "cuda-build-check: FAILED: $CUOBJDUMP --list-elf $SO"; exit 1; }
  ptxs=$("$CUOBJDUMP" --list-ptx "$SO" || true)
  IFS=';' read -ra archs <<< "${TORCH_CUDA_ARCH_LIST// /;}"
  for a in "${archs[@]}"; do
    [ -n "$a" ] || continue
    sm="sm_$(echo "${a%+PTX}" | tr -d .)"
    if ! grep -Eq "${sm}([^0-9a-z]|\$)" <<< "$elfs"; then
      echo "cuda-build-check: FAILED: no $sm cubin in $SO; cuobjdump --list-elf says:"; echo "$elfs"; exit 1
    fi
    if [ "$a" != "${a%+PTX}" ] && ! grep -Eq "${sm}([^0-9a-z]|\$)" <<< "$ptxs"; then
      echo "cuda-build-check: FAILED: no $sm PTX in $SO; cuobjdump --list-ptx says:"; echo "$ptxs"; exit 1
    fi
    kind="a $sm cubin"; [ "$a" = "${a%+PTX}" ] || kind+=" and $sm PTX"
    echo "cuda-build-check: $SO holds $kind"
  done
fi
echo "cuda-build-check: OK in $(( $(date +%s) - start )) s"
