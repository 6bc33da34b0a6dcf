"""Where the course is: the folder holding `solutions/` and `_config.yml`, found from an argument or the working directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def course_root(root: str | os.PathLike | None = None) -> Path:
    """The course folder: `root` if given, else the working directory or the first of its parents that is one."""
    if root is not None:
        path = Path(root).resolve()
        if not _is_course(path):
            raise FileNotFoundError(f"{path} is not a course folder (it needs solutions/ and _config.yml)")
        return path
    for candidate in (Path.cwd(), *Path.cwd().parents):
        if _is_course(candidate):
            return candidate
    raise FileNotFoundError("Run this inside the course folder (the one with solutions/ and _config.yml), "
                            "or pass --root PATH.")


def _is_course(path: Path) -> bool:
    return (path / "solutions").is_dir() and (path / "_config.yml").is_file()


def chapters(root: Path) -> list[str]:
    """The chapter slugs found in `solutions/`, in order."""
    return sorted(p.name for p in (root / "solutions").iterdir()
                  if p.is_dir() and (p / f"{p.name}.ipynb").is_file())


def resolve_chapters(names: list[str] | None, root: Path) -> list[str]:
    """Chapter slugs for `names` (full slugs or their number prefix, e.g. '01'); all when empty."""
    available = chapters(root)
    if not names:
        return available
    picked = []
    for name in names:
        match = [c for c in available if c == name or c.split("_", 1)[0] == name]
        if not match:
            raise SystemExit(f"Unknown chapter {name!r}: choose from {', '.join(available)}")
        picked += match
    return picked


def source_notebook(root: Path, slug: str) -> Path:
    return root / "solutions" / slug / f"{slug}.ipynb"


def tool(name: str) -> str:
    """Path of a console script installed beside this Python (the venv's bin/)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def tool_env() -> dict:
    """The environment for the tools this package runs: the venv's bin/ first on PATH (nbgrader calls alembic)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env
