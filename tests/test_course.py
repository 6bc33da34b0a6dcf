"""The course's generated files: student notebooks current, no hidden tests or solutions in them, clean sources."""

import re
import shutil

import nbformat
import pytest

from fasttrain_course.book import book_page
from fasttrain_course.chapters import code_hash
from fasttrain_course.paths import chapters
from fasttrain_course.release import comparable
from grading import _nbgrader

SOLUTION = re.compile(r"### (BEGIN|END) SOLUTION")
HIDDEN = re.compile(r"### (BEGIN|END) HIDDEN TESTS")


@pytest.fixture(scope="module")
def regenerated(repo_root, tmp_path_factory):
    course = tmp_path_factory.mktemp("release")
    shutil.copy(repo_root / "nbgrader_config.py", course / "nbgrader_config.py")
    for slug in chapters(repo_root):
        shutil.copytree(repo_root / "solutions" / slug, course / "source" / slug)
        _nbgrader(["generate_assignment", slug, "--force"], course, timeout=60)
    return course / "release"


def test_every_chapter_has_a_student_notebook(repo_root):
    for slug in chapters(repo_root):
        assert (repo_root / "course" / slug / f"{slug}.ipynb").is_file(), \
            f"course/{slug} is missing: run `fasttrain release`"


def test_student_notebooks_are_current(repo_root, regenerated):
    for slug in chapters(repo_root):
        committed = nbformat.read(str(repo_root / "course" / slug / f"{slug}.ipynb"), as_version=4)
        fresh = nbformat.read(str(regenerated / slug / f"{slug}.ipynb"), as_version=4)
        assert comparable(committed) == comparable(fresh), \
            f"course/{slug} is stale (solutions/{slug} changed since): run `fasttrain release` and commit course/"


def test_student_notebooks_hold_no_solutions_and_no_hidden_tests(repo_root):
    for path in (repo_root / "course").glob("*/*.ipynb"):
        nb = nbformat.read(str(path), as_version=4)
        for cell in nb.cells:
            assert not SOLUTION.search(cell.source), f"{path}: a solution region was released"
            assert not HIDDEN.search(cell.source), f"{path}: hidden tests were released"


def test_student_notebooks_have_stubs_for_every_exercise(repo_root):
    for slug in chapters(repo_root):
        nb = nbformat.read(str(repo_root / "course" / slug / f"{slug}.ipynb"), as_version=4)
        solutions = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
        assert solutions, f"{slug} has no exercises"
        for cell in solutions:
            assert "YOUR CODE HERE" in cell.source, f"{slug}: exercise {cell.metadata['nbgrader']['grade_id']} has no stub"


def test_source_notebooks_are_committed_without_outputs_and_with_stable_ids(repo_root):
    for slug in chapters(repo_root):
        nb = nbformat.read(str(repo_root / "solutions" / slug / f"{slug}.ipynb"), as_version=4)
        ids = [c.get("id") for c in nb.cells]
        assert all(ids) and len(set(ids)) == len(ids), f"{slug}: every cell needs a unique id"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{slug}: cell {cell.id} has outputs"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{slug}: exactly one cell must be tagged `parameters`"
        for name in ("profile", "device", "data_dir", "seed", "results_dir"):
            assert re.search(rf"^{name}\s*=", tagged[0].source, re.M), f"{slug}: parameter {name} missing"


def _executed_copy(repo_root, tmp_path, record_extra=None):
    source = nbformat.read(str(repo_root / "solutions" / "01_optimizers" / "01_optimizers.ipynb"), as_version=4)
    for cell in source.cells:
        if cell.cell_type == "code":
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="kept output\n")]
    record = {"chapter": "01_optimizers", "profile": "smoke", "device": "cpu (2 threads)", "date": "2026-11-23T00:00:00",
              "wall_seconds": 1.0, "torch_version": "x", "source_hash": code_hash(source), **(record_extra or {})}
    source.metadata["fasttrain"] = {"record": record}
    path = tmp_path / "01_optimizers.ipynb"
    nbformat.write(source, str(path))
    return path


def test_book_page_hides_solutions_and_hidden_tests_but_keeps_outputs(repo_root, tmp_path):
    page = book_page(_executed_copy(repo_root, tmp_path), repo_root, tmp_path)
    text = "\n".join(c.source for c in page.cells)
    assert not SOLUTION.search(text) and not HIDDEN.search(text)
    assert "bias correction" not in "".join(c.source for c in page.cells if c.cell_type == "code"
                                            and "test_adam" == c.get("id")), "hidden test text leaked"
    assert "YOUR CODE HERE" in text
    assert all(c.outputs for c in page.cells if c.cell_type == "code")
    header = page.cells[1].source
    assert "profile `smoke`" in header and "older than" not in header
    assert "colab.research.google.com" in header and "course/01_optimizers" in header


def test_book_page_says_when_its_run_is_older_than_the_code(repo_root, tmp_path):
    page = book_page(_executed_copy(repo_root, tmp_path, {"source_hash": "0123"}), repo_root, tmp_path)
    assert "older than the chapter's current code" in page.cells[1].source


def test_no_committed_run_is_older_than_its_chapters_code(repo_root):
    """The book shows runs/ as the chapters' results: each must have run the code the chapter has now."""
    stale = []
    for path in sorted((repo_root / "runs").glob("*/*.ipynb")):
        record = nbformat.read(str(path), as_version=4).metadata["fasttrain"]["record"]
        source = nbformat.read(str(repo_root / "solutions" / path.stem / f"{path.stem}.ipynb"), as_version=4)
        if record.get("source_hash") != code_hash(source):
            stale.append(f"{path.relative_to(repo_root)} (run {record.get('date')})")
    assert not stale, ("committed runs older than their chapter's code: " + ", ".join(stale) + ". Refresh each with "
                       "`fasttrain run NN --profile <profile>` then `fasttrain publish NN --profile <profile>`")


def test_every_committed_run_was_judged_by_the_targets_the_table_has_now(repo_root):
    """A run's record keeps the target and its meaning; the book shows them beside the run's numbers."""
    from fasttrain.results import load_targets
    table = {(t.chapter, t.metric, t.profile): t for t in load_targets(repo_root / "fasttrain" / "targets.csv")}
    differ = []
    for path in sorted((repo_root / "runs").glob("*/*.ipynb")):
        record = nbformat.read(str(path), as_version=4).metadata["fasttrain"]["record"]
        for m in record["metrics"]:
            t = table.get((record["chapter"], m["metric"], record["profile"]))
            if t is None:
                continue  # a metric the chapter reports without a target
            if (m.get("target"), m.get("direction"), m.get("meaning")) != (t.target, t.direction, t.meaning):
                differ.append(f"{path.relative_to(repo_root)}: {m['metric']} ran against "
                              f"{m.get('direction')} {m.get('target')} ({m.get('meaning')!r}), the table now says "
                              f"{t.direction} {t.target} ({t.meaning!r})")
    assert not differ, ("committed runs judged by other targets than the table's: " + "; ".join(differ)
                        + ". Run the chapter again and publish it")


def test_publishing_drops_the_warnings_about_the_machine_and_keeps_the_chapters_own(repo_root):
    """A run's data cache lives on its machine: its rebuild warning names the machine's paths, and the book
    would show them; any other warning is the chapter's and stays."""
    from fasttrain_course.chapters import strip_for_publishing
    nb = nbformat.v4.new_notebook()
    stale = ("/tmp/ipykernel_1/2.py:57: CacheStaleWarning: The CIFAR-10 cache /tmp/c/train.pt was built from "
             "/work/shared/data/train.npz, which has changed since. Rebuilding it.\n  x, y = load_cifar10('train')\n")
    own = "/tmp/ipykernel_1/2.py:9: UserWarning: the learning rate is at the grid's edge\n  tune(rates)\n"
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text=stale),
        nbformat.v4.new_output("stream", name="stderr", text=stale + own),
        nbformat.v4.new_output("stream", name="stdout", text="epoch 1 CacheStaleWarning: a word in the output\n")])]
    outputs = strip_for_publishing(nb).cells[0].outputs
    assert [o.text for o in outputs] == [own, "epoch 1 CacheStaleWarning: a word in the output\n"]
    for path in sorted((repo_root / "runs").glob("*/*.ipynb")):
        for cell in nbformat.read(str(path), as_version=4).cells:
            for out in cell.get("outputs", []):
                assert "CacheStaleWarning" not in out.get("text", ""), f"{path}: publish it again"


def test_the_book_shows_a_runs_results_table_not_the_repr_of_its_record(repo_root):
    """The last cell returns the record; its repr (chapter 5's held every range-test loss) ran to pages."""
    from fasttrain.runtime import RunRecord
    from fasttrain_course.chapters import strip_for_publishing
    record = RunRecord(chapter="05_lr_finder", profile="cpu", status="passed",
                       metrics=[{"metric": "a", "target": 1.0, "passed": True}, {"metric": "b", "target": None}])
    from IPython.lib.pretty import pretty
    assert pretty(record) == "<results record of 05_lr_finder (cpu): passed, 1 of 1 targets reached, 2 metrics; a dict>"
    assert record == dict(record) and isinstance(record, dict)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("run.log('x', 1)\nrun.finish()", outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="Results of 05_lr_finder ...\n"),
        nbformat.v4.new_output("execute_result", data={"text/plain": "{'chapter': '05_lr_finder', ...}"},
                               execution_count=1)]),
                nbformat.v4.new_code_cell("1 + 1", outputs=[
        nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=2)])]
    cells = strip_for_publishing(nb).cells
    assert [o.output_type for o in cells[0].outputs] == ["stream"]
    assert [o.output_type for o in cells[1].outputs] == ["execute_result"]
    for path in sorted((repo_root / "runs").glob("*/*.ipynb")):
        last = [c for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "code"][-1]
        assert not [o for o in last.outputs if o.output_type == "execute_result"], f"{path}: publish it again"
