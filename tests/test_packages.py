"""The two packages: the teaching library imports none of the course tooling, and its wheel works outside the repository."""

import pkgutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import fasttrain
from built_wheel import library_wheel

TOOLING = ("papermill", "nbgrader", "nbformat", "nbclient", "jupyter_book", "myst_nb", "sphinx", "yaml",
           "fasttrain_course")


def _library_modules() -> list[str]:
    return sorted(f"fasttrain.{m.name}" for m in pkgutil.iter_modules(fasttrain.__path__))


def test_importing_every_library_module_loads_no_course_tooling():
    code = (f"import sys, importlib\n"
            f"for name in {_library_modules()!r}: importlib.import_module(name)\n"
            f"print(sorted(m for m in {TOOLING!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"the teaching library pulled in course tooling: {out}"


def test_the_library_never_imports_the_tooling_package():
    root = Path(fasttrain.__file__).parent
    for path in root.glob("*.py"):
        assert "fasttrain_course" not in path.read_text(), f"{path.name} refers to the course tooling"


def test_a_wheel_of_the_library_imports_outside_the_repository(repo_root, tmp_path):
    wheel = library_wheel()
    names = zipfile.ZipFile(wheel).namelist()
    assert "fasttrain/targets.csv" in names and "fasttrain/estimates.json" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # A fresh interpreter that sees the wheel and the venv's third-party packages, but neither the repository
    # nor the editable install of it (-S: no site module, so no .pth finder), run from an unrelated folder.
    site_packages = sysconfig.get_paths()["purelib"]
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import fasttrain, fasttrain.runtime, fasttrain.results\n"
            "print(fasttrain.__file__)\n"
            "print(len(fasttrain.results.load_targets()))")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(target), site_packages], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith(str(target)), f"imported {out[0]}, not the wheel"
    assert int(out[1]) > 20, "the targets table travels with the wheel"
