"""Release the student notebooks: nbgrader's generate_assignment from solutions/ into course/."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import nbformat

from .paths import course_root, resolve_chapters, tool, tool_env


def release(root: Path | None = None, names: list[str] | None = None) -> None:
    """Write the install cell into each source notebook, then regenerate the student notebooks in course/ with nbgrader."""
    from .install_cell import sync

    root = course_root(root)
    slugs = resolve_chapters(names, root)
    sync(root, slugs)
    for slug in slugs:
        subprocess.run([tool("nbgrader"), "generate_assignment", slug, "--force",
                        f"--CourseDirectory.root={root}"], check=True, env=tool_env(), cwd=str(root))


def comparable(nb: nbformat.NotebookNode) -> list[tuple]:
    """What must match between a committed and a regenerated student notebook: each cell's id, type, source, metadata."""
    nb = copy.deepcopy(nb)
    return [(c.get("id"), c.cell_type, c.source, json.dumps(c.metadata, sort_keys=True)) for c in nb.cells]
