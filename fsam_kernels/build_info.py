"""What the build of the native extension attempted and how each part ended.

``setup.py`` writes ``_build_info.json`` next to the package (installed with it, git-ignored): the torch
and CUDA versions it built against, and for each part (``"cpu"``: the C++ CPU kernels, ``"cuda"``: the
CUDA kernels) whether it was attempted, how it ended and, for a failure, the compiler's last error
lines. ``python -m fsam_kernels`` prints it, one line per part, and ``backend="auto"``'s fallback warning
names the same reason. This module imports nothing but the standard library: setup.py loads it by path.
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys
import threading
from typing import Any, Callable, Optional

FILE_NAME = "_build_info.json"
PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), FILE_NAME)
PART_NAMES = {"cpu": "CPU kernels", "cuda": "CUDA kernels"}

# How to go on after a failed part.
HINTS = {
    "cpu": "rebuild with a working C++ compiler (g++ with OpenMP), or FSAM_NO_NATIVE=1 for pure Python",
    "cuda": "rebuild with CUDA_HOME set to the toolkit, or FSAM_NO_CUDA=1",
}

_ERROR = re.compile(r"error|cannot find|undefined reference|fatal|no such file|not found|killed", re.IGNORECASE)
_LINK = re.compile(r"cannot find -l|undefined reference|collect2|\bld returned|(^|[/ ])ld(\.\w+)?: ", re.IGNORECASE)


# ------------------------------------------------------------------ written by setup.py
def new_record(torch_version: Optional[str], torch_cuda: Optional[str]) -> dict[str, Any]:
    return {"version": 1, "torch": torch_version, "torch_cuda": torch_cuda, "cuda_home": None, "archs": None,
            "parts": {name: {"attempted": False, "status": "not attempted", "reason": None, "errors": []}
                      for name in PART_NAMES}}


def not_attempted(record: dict[str, Any], part: str, reason: str) -> None:
    record["parts"][part].update(attempted=False, status="not attempted", reason=reason, errors=[])


def attempted(record: dict[str, Any], part: str) -> None:
    record["parts"][part].update(attempted=True, status="tried", reason=None, errors=[])


def ended(record: dict[str, Any], part: str, lines: list[str], exc: Optional[BaseException]) -> None:
    """Record how an attempted part ended: built (``exc`` None) or failed, with the build output's last
    error lines."""
    entry = record["parts"][part]
    if exc is None:
        entry.update(status="built", errors=[])
        return
    errors = error_lines(lines)
    linking = any(_LINK.search(line) for line in errors)
    status = "failed to link" if linking else "failed to compile" if errors else "failed"
    if not errors:  # nothing printed an error: the exception says what failed (e.g. a compiler check)
        text = f"{type(exc).__name__}: {exc}".strip()
        errors = [_trim(line) for line in text.splitlines()[-5:] if line.strip()]
    entry.update(status=status, reason=_summary(errors, linking), errors=errors[-10:])


def error_lines(lines: list[str]) -> list[str]:
    """The lines of build output that report an error (compiler command lines, however long, are not)."""
    out = []
    for line in lines:
        line = line.strip()
        if not line or len(line.split()) > 30 or not _ERROR.search(line):
            continue
        out.append(_trim(line))
    return out


def _trim(line: str, limit: int = 300) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _summary(errors: list[str], linking: bool) -> str:
    if not errors:
        return "no error message was captured"
    if linking:
        for line in errors:
            m = re.search(r"cannot find -l\S+|undefined reference to \S+", line)
            if m:
                return m.group(0).rstrip(":")
    first = next((line for line in errors if re.search(r"error", line, re.IGNORECASE)), errors[-1])
    return re.sub(r"^\S*/(ld|nvcc|g\+\+|gcc|c\+\+)(\.\w+)?: ", "", first)


def write(record: dict[str, Any], path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    except OSError as exc:  # a read-only tree must not fail the build
        print(f"fsam_kernels setup: could not write the build record {path}: {exc}", file=sys.stderr)


def captured(fn: Callable[[], Any], keep: int = 400) -> tuple[list[str], Optional[BaseException]]:
    """Run ``fn`` with the process's stdout and stderr (the compilers' too) copied through a pipe: the
    output still reaches the terminal as it comes, and its last ``keep`` lines are returned with the
    exception ``fn`` raised (``None`` if it returned)."""
    lines: collections.deque = collections.deque(maxlen=keep)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        read_end, write_end = os.pipe()
    except OSError:  # no usable stdout/stderr: run without capturing
        saved = None
    if saved is None:
        try:
            fn()
        except Exception as exc:
            return [], exc
        return [], None

    def pump() -> None:
        with os.fdopen(read_end, "rb") as f:
            for raw in f:
                try:
                    os.write(saved[1], raw)
                except OSError:
                    pass
                lines.append(raw.decode(errors="replace").rstrip("\n"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    error = None
    try:
        fn()
    except Exception as exc:
        error = exc
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        thread.join(timeout=30)
    return list(lines), error


# ------------------------------------------------------------------ read by the package
def load(path: str = PATH) -> Optional[dict[str, Any]]:
    """The build record, or ``None`` when there is none (a source tree never built, an editable
    pure-Python install) or it cannot be read."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("parts"), dict) else None


def part_line(record: dict[str, Any], part: str) -> str:
    """One line: how ``part`` of the build ended, and for a failure what to do."""
    entry = record["parts"].get(part) or {}
    name = PART_NAMES[part]
    status = entry.get("status", "not attempted")
    if not entry.get("attempted"):
        return f"{name}: not attempted: {entry.get('reason') or 'unknown reason'}"
    if status == "built":
        where = ""
        if part == "cuda":
            where = f" (CUDA {record.get('torch_cuda')}, TORCH_CUDA_ARCH_LIST={record.get('archs')})"
        return f"{name}: built{where}"
    where = f" (CUDA_HOME={record.get('cuda_home')})" if part == "cuda" else ""
    return f"{name}: tried, {status}: {entry.get('reason')}{where}; {HINTS[part]}"


def report_lines(record: Optional[dict[str, Any]] = None) -> list[str]:
    record = load() if record is None else record
    if record is None:
        return ["build record: none (this tree was not built by setup.py, or it is an editable install)"]
    lines = [f"build record: torch {record.get('torch')}"
             + (f" (CUDA {record['torch_cuda']})" if record.get("torch_cuda") else " (a CPU build)")]
    lines += [part_line(record, part) for part in PART_NAMES]
    return lines


def reason(part: str, record: Optional[dict[str, Any]] = None) -> Optional[str]:
    """Why ``part`` is missing from this install, from the build record (``None`` if it was built or
    there is no record)."""
    record = load() if record is None else record
    if record is None or record["parts"].get(part, {}).get("status") == "built":
        return None
    return part_line(record, part)
