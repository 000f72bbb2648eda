"""Is this Python the one lvd was installed into?  Standard library only, so it runs before any other import.

A `ray job submit` entry point runs `python` as found on the PATH of the shell that ran `ray start`: started from a
shell where lvd's virtual environment is not active, that is the system Python, and the job would die on its first
import with a traceback.  The entry points call :func:`require_dependencies` first and say so in one line instead.
"""

from __future__ import annotations

import importlib.util
import sys

#: import names of the dependencies every curation or training process needs (pyproject.toml's list)
REQUIRED = ("yaml", "pydantic", "numpy", "pyarrow", "PIL", "ray", "torch", "faiss", "webdataset", "img2dataset",
            "tqdm")


def missing_dependencies(modules=REQUIRED) -> list[str]:
    missing = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def dependency_problem(modules=REQUIRED, entry: str = "pipelines/curate.py") -> str | None:
    """One line naming what this Python lacks and how to run the right one; None when nothing is missing."""
    missing = missing_dependencies(modules)
    if not missing:
        return None
    return (f"error: this Python ({sys.executable}) lacks lvd's dependencies ({', '.join(missing)}): run lvd with "
            "the Python of its virtual environment, e.g. activate it (source .venv/bin/activate) in the shell "
            "that runs `ray start` and `ray job submit`, or give its path: -- /path/to/lvd/.venv/bin/python "
            f"{entry} ...")


def require_dependencies(entry: str = "pipelines/curate.py", modules=REQUIRED) -> None:
    """Exit with status 2 and the line of :func:`dependency_problem` when a dependency is missing."""
    problem = dependency_problem(modules, entry)
    if problem:
        print(problem, file=sys.stderr)
        raise SystemExit(2)
