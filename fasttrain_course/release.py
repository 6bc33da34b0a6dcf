"""Release the student notebooks: nbgrader's generate_assignment from solutions/ into course/."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import nbformat

from .paths import course_root, resolve_chapters, tool, tool_env


def release(root: Path | None = None, names: list[str] | None = None) -> None:
    """Regenerate the student notebooks in course/ from solutions/ with nbgrader."""
    root = course_root(root)
    for slug in resolve_chapters(names, root):
        subprocess.run([tool("nbgrader"), "generate_assignment", slug, "--force",
                        f"--CourseDirectory.root={root}"], check=True, env=tool_env(), cwd=str(root))


def comparable(nb: nbformat.NotebookNode) -> list[tuple]:
    """What must match between a committed and a regenerated student notebook: each cell's id, type, source, metadata."""
    nb = copy.deepcopy(nb)
    return [(c.get("id"), c.cell_type, c.source, json.dumps(c.metadata, sort_keys=True)) for c in nb.cells]
