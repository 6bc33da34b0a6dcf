"""The first code cell of every chapter: it installs the course library where it is missing (Colab, Binder).

The cell is generated, never edited by hand: its repository URL comes from `repository.url` in
_config.yml (the one place it is set, also read by the launch buttons) and its version from
pyproject.toml, so a student always installs the release the notebook was made with.
`fasttrain release` writes it into every source notebook before generating the student copies.
Setting FASTTRAIN_INSTALL overrides what is installed (a local wheel, for tests).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import nbformat

from .book import repository_url
from .paths import chapters, source_notebook

CELL_ID = "install"
DISTRIBUTION = "fasttrain-course"


def version(root: Path) -> str:
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]


def install_spec(root: Path) -> str:
    """What pip installs: the library at the released tag of the course repository."""
    return f"{DISTRIBUTION} @ git+{repository_url(root)}@v{version(root)}"


def render(root: Path) -> str:
    return (
        "# On Colab, Binder or any fresh machine this installs the course library (nothing happens where it is\n"
        "# installed already). Do not `pip install fasttrain`: that name on PyPI is someone else's package.\n"
        "import importlib, importlib.util, os, subprocess, sys\n"
        "\n"
        "if importlib.util.find_spec(\"fasttrain\") is None:\n"
        f"    spec = os.environ.get(\"FASTTRAIN_INSTALL\", {install_spec(root)!r})\n"
        "    subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"--quiet\", spec], check=True)\n"
        "    importlib.invalidate_caches()"
    )


def cell(root: Path) -> nbformat.NotebookNode:
    new = nbformat.v4.new_code_cell(render(root))
    new.id = CELL_ID
    new.metadata["tags"] = ["install"]
    return new


def sync(root: Path, names: list[str] | None = None) -> list[str]:
    """Write the current install cell into each chapter's source notebook; return the chapters that changed."""
    changed = []
    for slug in names or chapters(root):
        path = source_notebook(root, slug)
        nb = nbformat.read(str(path), as_version=4)
        wanted = cell(root)
        existing = [c for c in nb.cells if c.get("id") == CELL_ID]
        if existing and existing[0].source == wanted.source and existing[0].metadata.get("tags") == ["install"]:
            continue
        if existing:
            existing[0].source, existing[0].metadata["tags"] = wanted.source, ["install"]
        else:
            at = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0
            nb.cells.insert(at, wanted)
        nbformat.write(nb, str(path))
        changed.append(slug)
    return changed
