#!/usr/bin/env bash
# Build fsam_kernels' native extension in place (fsam_kernels/_C*.so next to the Python sources), with
# the Python and torch at hand, without pip and without reading pyproject.toml:
#
#   PYTHON=python3 bash scripts/build_inplace.sh            # then: PYTHONPATH=. python3 -m fsam_kernels
#
# For machines whose environment must not change (the GPU image: nothing can be installed there, and
# its setuptools may be older than pyproject.toml's metadata needs). `setup.py build_ext` in the
# repository root would validate pyproject.toml's [project] table with that setuptools (`license =
# "Apache-2.0"` needs setuptools >= 77), so this runs setup.py from a build folder that holds only a
# copy of setup.py and a link to csrc/: setup.py's switches (FSAM_FORCE_CUDA, FSAM_NO_CUDA,
# TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME) work as documented there, any setuptools that builds
# extensions will do, and the finished files (the .so and whatever else the build writes into the
# package) are moved into fsam_kernels/ by rename, so a process importing the package meanwhile never
# sees a half-written library. The folder (FSAM_BUILD_DIR, default build/inplace, git-ignored) keeps
# the object files: a second build recompiles only changed sources. Extra arguments go to build_ext.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
DIR=${FSAM_BUILD_DIR:-$ROOT/build/inplace}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
cp "$ROOT/setup.py" "$DIR/setup.py"
ln -sfn "$ROOT/csrc" "$DIR/csrc"
rm -rf "$DIR/fsam_kernels"  # the last build's output, already moved
mkdir "$DIR/fsam_kernels"   # where build_ext --inplace puts it
cp "$ROOT/fsam_kernels/build_info.py" "$DIR/fsam_kernels/"  # setup.py records the build's outcome with it
"$PY" -c 'import setuptools, sys; print(f"build_inplace: setuptools {setuptools.__version__}, python {sys.version.split()[0]}")'
(cd "$DIR" && "$PY" setup.py build_ext --inplace "$@")
rm -rf "$DIR/fsam_kernels/build_info.py" "$DIR/fsam_kernels/__pycache__"  # sources, not build output
shopt -s nullglob
built=("$DIR"/fsam_kernels/*)
if [ ${#built[@]} -eq 0 ]; then
  echo "build_inplace: nothing was built (see setup.py's messages above)"
  exit 0
fi
for f in "${built[@]}"; do
  # a copy next to the target, then a rename on the same file system: atomic for importers
  cp -r "$f" "$ROOT/fsam_kernels/.$(basename "$f").new"
  mv -fT "$ROOT/fsam_kernels/.$(basename "$f").new" "$ROOT/fsam_kernels/$(basename "$f")"
  echo "build_inplace: fsam_kernels/$(basename "$f")"
done
