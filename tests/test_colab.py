"""Students start from a launch button: each student notebook in a fresh environment like Colab's.

The environment is a new virtual environment without the course library, which sees what Colab
preinstalls (torch, torchvision, numpy, matplotlib, scikit-learn, ipywidgets, ipykernel) and
nothing of this repository. The notebook's install cell is pointed at a wheel built from this
checkout (FASTTRAIN_INSTALL, as a student's would fetch the released tag), pip is kept off the
network, and the notebook runs top to bottom: an untouched one must stop at its first
exercise with a message naming it and must never report a target; one with the exercises
answered runs to the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import ROOT
from fasttrain_course.paths import chapters
from grading import replace_solutions
from built_wheel import library_wheel

COLAB_HAS = ("torch", "torchvision", "numpy", "matplotlib", "sklearn", "scikit_learn", "ipywidgets", "ipykernel",
             "jupyter_client", "jupyter_core", "traitlets", "tornado", "zmq", "pyzmq", "IPython", "ipython")
NOT_THE_COURSE = ("fasttrain", "__editable__", "_fasttrain")


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    """(kernel name, environment) of a Colab-like kernel whose venv lacks the course library."""
    base = tmp_path_factory.mktemp("colab")
    wheel = library_wheel()
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The preinstalled packages: every entry of this venv's site-packages except the course's own.
    preinstalled = base / "preinstalled"
    preinstalled.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(NOT_THE_COURSE) and not entry.name.endswith(".pth"):
            (preinstalled / entry.name).symlink_to(entry)
    (site / "colab-preinstalled.pth").write_text(str(preinstalled) + "\n")
    # A new venv brings an old setuptools that would shadow the preinstalled one torch requires (Colab's is new).
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, capture_output=True)
    kernels = base / "jupyter" / "kernels" / "colab"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Colab-like", "language": "python"}))
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('fasttrain'))"],
                           capture_output=True, text=True, check=True, cwd=base).stdout.strip()
    assert probe == "None", "the Colab-like environment must start without the course library"
    (base / "home").mkdir()
    env = {"JUPYTER_PATH": str(base / "jupyter"), "FASTTRAIN_INSTALL": str(wheel), "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HOME": str(base / "home"),
           "FASTTRAIN_CACHE": str(base / "cache"), "FASTTRAIN_DATA": os.environ.get("FASTTRAIN_DATA", "")}
    return "colab", env, python


def execute(nb: nbformat.NotebookNode, colab, cwd: Path, parameters: str = "") -> tuple[nbformat.NotebookNode, Exception | None]:
    kernel, env, _ = colab
    nb = nbformat.from_dict(nb)
    if parameters:
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(parameters))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(cwd)}})
        try:
            client.execute()
            return nb, None
        except CellExecutionError as err:
            return nb, err
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def outputs(nb) -> str:
    return "\n".join(o.get("text", "") + json.dumps(o.get("data", {})) + "".join(o.get("traceback", []))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.parametrize("slug", chapters(ROOT))
def test_an_untouched_student_notebook_installs_the_library_and_stops_at_its_first_exercise(slug, colab, tmp_path):
    nb = nbformat.read(str(ROOT / "course" / slug / f"{slug}.ipynb"), as_version=4)
    exercises = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    ran, error = execute(nb, colab, tmp_path, 'profile = "smoke"')
    assert error is not None, f"{slug}: an untouched notebook ran to the end"
    assert "NotImplementedError" in str(error), f"{slug}: stopped with {str(error)[-500:]}"
    assert exercises[0] in str(error), f"{slug}: the message must name the first exercise ({exercises[0]})"
    text = outputs(ran)
    assert "(target " not in text and "Results of" not in text, f"{slug}: an untouched notebook reported a target"
    install = next(c for c in ran.cells if c.get("id") == "install")
    assert install.get("execution_count"), "the install cell ran"
    _, _, python = colab
    shown = subprocess.run([str(python), "-m", "pip", "show", "fasttrain-course"], capture_output=True, text=True)
    assert "Version:" in shown.stdout, "the install cell installed the library into the Colab-like environment"


ANSWERED = ("01_optimizers",)


@pytest.mark.parametrize("slug", ANSWERED)
def test_a_student_notebook_with_its_exercises_answered_runs_to_the_end(slug, colab, tmp_path):
    released = nbformat.read(str(ROOT / "course" / slug / f"{slug}.ipynb"), as_version=4)
    source = nbformat.read(str(ROOT / "solutions" / slug / f"{slug}.ipynb"), as_version=4)
    answered = replace_solutions(released, {c.metadata["nbgrader"]["grade_id"]: c.source for c in source.cells
                                            if c.metadata.get("nbgrader", {}).get("solution")})
    ran, error = execute(answered, colab, tmp_path, f'profile = "smoke"\nresults_dir = "{tmp_path / "results"}"')
    assert error is None, f"{slug}: {str(error)[-1500:]}"
    text = outputs(ran)
    assert "Results of" in text and "(target " in text and "MISSED" not in text, text[-2000:]
