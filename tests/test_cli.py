"""``python -m fsam_kernels``: the build and backend report, on a compiled and a pure-Python install."""
import os
import subprocess
import sys

from helpers import TESTS_DIR, child_env


def _run(code_or_module, pure_python=False, code=None):
    env = child_env(drop=("TRITON_INTERPRET", "FSAM_BACKEND"))
    if code is not None:
        args = [sys.executable, "-c", code]
    elif pure_python:  # as if the extension had not been built: importing it fails
        args = [sys.executable, "-c", "import sys; sys.modules['fsam_kernels._C'] = None; "
                "from fsam_kernels.__main__ import main; sys.exit(main())"]
    else:
        args = [sys.executable, "-m", code_or_module]
    proc = subprocess.run(args, cwd=TESTS_DIR, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_report_names_versions_build_backends_and_auto_choice():
    out = _run("fsam_kernels")
    assert "torch " in out and "triton " in out
    assert "native extension: " in out
    cpu = out[out.index("cpu: backends in auto's order"):]
    for name in ("torch", "triton", "native"):
        assert f"  {name} " in cpu
    assert "  torch   available" in cpu
    # without TRITON_INTERPRET the Triton kernels do not run on CPU tensors, and the report says why
    assert "triton  unavailable: " in cpu and "TRITON_INTERPRET=1" in cpu
    if os.environ.get("FSAM_NO_NATIVE") != "1":
        assert "native extension: CPU kernels" in out
        assert "auto -> native" in cpu


def test_report_on_a_pure_python_install():
    out = _run(None, pure_python=True)
    assert "native extension: not built" in out
    assert "  native  not loaded: " in out or "  native  unavailable: " in out
    assert "auto -> torch" in out


def test_children_import_the_package_the_parent_imported():
    # After a non-editable `pip install .` the source tree's fsam_kernels has no compiled extension:
    # a child that imported it instead of the installed one would test something else.
    import fsam_kernels

    out = _run(None, code="import fsam_kernels; print(fsam_kernels.__file__)")
    assert os.path.samefile(out.strip(), fsam_kernels.__file__)
