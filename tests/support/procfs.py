"""What a running process holds, read from Linux's /proc: its children, its command
line, the shared objects it has mapped, and (from ``PYTHONPROFILEIMPORTTIME``'s lines)
the modules it imported."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

HAVE_PROC = os.path.isdir("/proc/self/task")


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (any thread's)."""
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(FileNotFoundError),
                open(f"/proc/{pid}/task/{task}/children") as listing,
            ):
                found += [int(child) for child in listing.read().split()]
    return found


def cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as raw:
            return raw.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def mapped_files(pid: int) -> set[str]:
    """The files ``pid`` has mapped: the interpreter, and every extension module loaded."""
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}


def mentions(paths: Iterable[str], name: str) -> list[str]:
    """The paths with a directory or file named ``name`` (a package or module)."""
    return [
        path
        for path in paths
        if any(part == name or part.startswith(f"{name}.") for part in path.split("/"))
    ]


def imported_modules(stderr_lines: Iterable[str]) -> dict[str, str | None]:
    """The modules a process started with PYTHONPROFILEIMPORTTIME=1 imported, or tried to
    (an import that fails is reported too), each with the module whose import caused it
    (None for a top-level import).

    Each first import prints ``import time: <self> | <cumulative> | <indent><module>``,
    after the imports it caused, which are indented deeper.
    """
    entries = []
    for line in stderr_lines:
        if line.startswith("import time:") and line.count("|") == 2:
            field = line.rstrip("\n").rsplit("|", 1)[1]
            name = field.strip()
            if name and name != "imported package":
                entries.append((len(field) - len(field.lstrip()), name))
    modules: dict[str, str | None] = {}
    for i, (indent, name) in enumerate(entries):
        importer = next((other for depth, other in entries[i + 1 :] if depth < indent), None)
        modules.setdefault(name, importer)
    return modules
