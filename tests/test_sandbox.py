"""Autograding that a student cannot cheat or break: every submission runs in the sandbox.

The adversarial class of issue 14, graded by the real nbgrader with the course's nbgrader_config.py in a
course folder laid out like this repository, with the README's command (`nbgrader autograde 01_optimizers`,
plus a short cell timeout so the infinite loop costs seconds, not minutes). Two honest students are graded
first; then the attackers, with two more honest students among them. Each attacker scores what its own work
deserves, everyone else is graded as usual, and the gradebook's earlier rows, the source and release
notebooks and the honest students' submissions are byte-identical afterwards.

Then the parts of the sandbox the class does not reach: a missing bubblewrap stops grading (and says how to
install it), the explicit opt-out, the CPU-time limit, and `fasttrain grade --jobs` with its gradebook
written by parallel workers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

from fasttrain_course.sandbox import SandboxedKernelManager
from grading import (ROOT, course_like_repo, edit_solution, nbgrader_command, read_scores, replace_solutions,
                     solution_source, submit)

SLUG = "01_optimizers"
SOLUTION_CELLS = ("sgd_momentum", "rmsprop", "adam", "adamw")
TESTS = {"test_sgd_momentum": 2, "test_rmsprop": 2, "test_adam": 3, "test_adamw": 3}
TIMEOUT = 15  # seconds per cell; the chapter's slowest test cell takes a few
LIMITS = SandboxedKernelManager.class_traits()
PROCESSES = LIMITS["processes"].default_value
QUOTA_MIB = LIMITS["disk_quota"].default_value // 2 ** 20

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bubblewrap is not installed (apt-get install bubblewrap; .ci/run installs it)")

# Chapter 1's hidden tests that cannot be talked round (fasttrain/checks.py): comparisons with functions
# captured before any student code, and classes that must not derive from torch's optimizers.
_CH1_TESTS = "\n".join(solution_source(SLUG, t) for t in TESTS)
CH1_HAS_INTEGRITY = "integrity." in _CH1_TESTS
CH1_HAS_FROM_SCRATCH = "assert_written_from_scratch" in _CH1_TESTS


def _steal(paths: str) -> str:
    """A solution cell that runs, instead of the student's own code, every solution cell of the first notebook found."""
    return f'''import json, pathlib
here = pathlib.Path.cwd()
candidates = [{paths}]
found = [p for p in candidates if p.is_file()]
assert found, "nothing to copy from"
for cell in json.loads(found[0].read_text())["cells"]:
    if cell["metadata"].get("nbgrader", {{}}).get("solution"):
        exec("".join(cell["source"]), globals())
'''


def _wrong_adam() -> str:
    return edit_solution(SLUG, "adam", "m_hat = m / (1 - beta1 ** t)\n                v_hat = v / (1 - beta2 ** t)",
                         "m_hat = m\n                v_hat = v")


def attackers(course: Path, port: int) -> dict[str, tuple[str, dict[str, str]]]:
    """Each attacker: (base notebook: "blank" or "answered", {solution cell: new source})."""
    root = str(course)
    sol = {g: solution_source(SLUG, g) for g in SOLUTION_CELLS}
    steal_solutions = _steal(
        f'*(b / "solutions" / "{SLUG}" / "{SLUG}.ipynb" for b in [here, *here.parents]), '
        f'pathlib.Path("{root}/solutions/{SLUG}/{SLUG}.ipynb"), pathlib.Path("{ROOT}/solutions/{SLUG}/{SLUG}.ipynb")')
    steal_neighbour = _steal(
        f'*(b / "alice" / "{SLUG}" / "{SLUG}.ipynb" for b in here.parents), '
        f'pathlib.Path("{root}/submitted/alice/{SLUG}/{SLUG}.ipynb"), '
        f'pathlib.Path("{root}/autograded/alice/{SLUG}/{SLUG}.ipynb")')
    gradebook = f'''import pathlib, sqlite3
here = pathlib.Path.cwd()
dbs = [p for p in [pathlib.Path("{root}/gradebook.db"), *(b / "gradebook.db" for b in here.parents)] if p.is_file()]
assert dbs, "no gradebook in sight"
con = sqlite3.connect(dbs[0])
rows = "SELECT grade.id FROM grade JOIN submitted_notebook ON grade.notebook_id = submitted_notebook.id " \\
       "JOIN submitted_assignment ON submitted_notebook.assignment_id = submitted_assignment.id WHERE student_id = ?"
con.execute(f"UPDATE grade SET extra_credit = 100 WHERE id IN ({{rows}})", ("mallory_gradebook",))
con.execute(f"UPDATE grade SET auto_score = 0, manual_score = 0 WHERE id IN ({{rows}})", ("alice",))
con.commit()
'''
    vandal = sol["sgd_momentum"] + f'''
import os, pathlib
here = pathlib.Path.cwd()
attempts = {{
    "write into the course root": lambda: pathlib.Path("{root}/pwned.txt").write_text("pwned"),
    "write above the submission": lambda: [(b / "pwned.txt").write_text("pwned") for b in here.parents],
    "overwrite another student's submission": lambda: pathlib.Path(
        "{root}/submitted/alice/{SLUG}/{SLUG}.ipynb").write_text("{{}}"),
    "overwrite another student's graded notebook": lambda: pathlib.Path(
        "{root}/autograded/alice/{SLUG}/{SLUG}.ipynb").write_text("{{}}"),
    "delete the source notebook": lambda: os.remove("{root}/solutions/{SLUG}/{SLUG}.ipynb"),
    "delete the release": lambda: os.remove("{root}/course/{SLUG}/{SLUG}.ipynb"),
}}
for what, attempt in attempts.items():
    try:
        attempt()
        print("VANDAL SUCCEEDED:", what)
    except OSError as exc:
        print("vandal blocked:", what, type(exc).__name__)
'''
    allclose = _wrong_adam() + "\n\nimport torch\ntorch.allclose = lambda *a, **k: True\n"
    subclasses = {"sgd_momentum": "import torch\nclass SGDMomentum(torch.optim.SGD):\n    pass\n",
                  "rmsprop": "import torch\nclass RMSprop(torch.optim.RMSprop):\n    pass\n",
                  "adam": "import torch\nclass Adam(torch.optim.Adam):\n    pass\n",
                  "adamw": "import torch\nclass AdamW(torch.optim.AdamW):\n    pass\n"}
    memory = "import torch\nhog = torch.ones(2 ** 29)  # 2 GiB of float32\n" + sol["sgd_momentum"]
    loop = "while True:\n    pass\n" + sol["rmsprop"]
    exit_kernel = sol["adam"] + "\n\nimport os\nos._exit(0)\n"
    silent = ("ip = get_ipython()\nip.showtraceback = lambda *a, **k: None\n"
              "ip.set_custom_exc((BaseException,), lambda *a, **k: None)\n") + sol["sgd_momentum"]
    fork_bomb = '''import os, resource, signal, subprocess, sys, time
# (a guard for the machine running this test, not part of the attack: the bomb goes off only under a process limit)
assert resource.getrlimit(resource.RLIMIT_NPROC)[0] <= 4096, "no process limit: the fork bomb stays unlit"
bomb = subprocess.Popen([sys.executable, "-c", "import os\\nwhile True:\\n    try:\\n        os.fork()\\n    "
                         "except OSError:\\n        pass"], start_new_session=True)
peak = 0
for _ in range(30):
    time.sleep(0.1)
    peak = max(peak, sum(name.isdigit() for name in os.listdir("/proc")))
os.killpg(bomb.pid, signal.SIGKILL)
print(f"FORK BOMB PEAK {peak} processes")
''' + sol["sgd_momentum"]
    network = f'''import socket
for address in [("127.0.0.1", {port}), ("1.1.1.1", 80)]:
    try:
        socket.create_connection(address, timeout=3).close()
        print("NETWORK REACHED", address)
    except OSError as exc:
        print("network blocked:", address, type(exc).__name__)
''' + sol["sgd_momentum"]
    disk = '''import os
for folder in [".", "/tmp"]:
    written = 0
    try:
        with open(os.path.join(folder, "fill.bin"), "wb") as f:
            while written < 4 * 2 ** 30:
                f.write(b"x" * 2 ** 20)
                f.flush()
                written += 2 ** 20
    except OSError as exc:
        print(f"DISK FULL in {folder} after {written // 2 ** 20} MiB: {type(exc).__name__}")
    finally:
        os.remove(os.path.join(folder, "fill.bin"))
''' + sol["sgd_momentum"]
    return {
        "mallory_solutions": ("blank", {g: steal_solutions for g in SOLUTION_CELLS}),
        "mallory_gradebook": ("blank", {"sgd_momentum": gradebook}),
        "mallory_vandal": ("answered", {"sgd_momentum": vandal}),
        "mallory_allclose": ("answered", {"adam": allclose}),
        "mallory_subclass": ("answered", subclasses),
        "mallory_memory": ("answered", {"sgd_momentum": memory}),
        "mallory_loop": ("answered", {"rmsprop": loop}),
        "mallory_exit": ("answered", {"adam": exit_kernel}),
        "mallory_traceback": ("answered", {"sgd_momentum": silent, "adam": _wrong_adam()}),
        "mallory_forkbomb": ("answered", {"sgd_momentum": fork_bomb}),
        "mallory_network": ("answered", {"sgd_momentum": network}),
        "mallory_neighbour": ("blank", {g: steal_neighbour for g in SOLUTION_CELLS}),
        "mallory_disk": ("answered", {"sgd_momentum": disk}),
    }


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(db: Path) -> dict[str, set[tuple]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: set(con.execute(f'SELECT * FROM "{t}"')) for t in tables}
    finally:
        con.close()


def snapshot(course: Path, students: list[str]) -> dict:
    """What no attacker may change: sources, release, config, these students' submissions and results, the gradebook."""
    state = {"root": sorted(p.name for p in course.iterdir()), "gradebook": _rows(course / "gradebook.db")}
    for part in ["solutions", "course", *(f"{d}/{s}" for d in ("submitted", "autograded") for s in students)]:
        state[part] = _files(course / part)
    state["config"] = hashlib.sha256((course / "nbgrader_config.py").read_bytes()).hexdigest()
    return state


class Listener:
    """A TCP server on the grader's loopback, outside the sandbox, counting who connects."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port, self.connections, self._stop = self.sock.getsockname()[1], 0, False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                pass

    def close(self):
        self._stop = True
        self.thread.join()
        self.sock.close()


def _outputs(course: Path, student: str, grade_id: str) -> str:
    """The text of a cell's outputs in the student's graded notebook."""
    nb = nbformat.read(str(course / "autograded" / student / SLUG / f"{SLUG}.ipynb"), as_version=4)
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == grade_id:
            return "\n".join(o.get("text", "") + o.get("evalue", "") + "\n".join(o.get("traceback", []))
                             for o in cell.get("outputs", []))
    raise KeyError(grade_id)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade the honest students, then the attackers among two more honest ones; keep what is needed to judge."""
    course = tmp_path_factory.mktemp("course")
    source, answered = course_like_repo(SLUG, course)
    released = nbformat.read(str(course / "course" / SLUG / f"{SLUG}.ipynb"), as_version=4)
    base = {"blank": released, "answered": answered}
    timeout = [f"--Execute.timeout={TIMEOUT}"]
    submit(course, SLUG, "alice", answered)
    submit(course, SLUG, "bob", released)
    first = nbgrader_command(["autograde", SLUG, *timeout], course)
    before = snapshot(course, ["alice", "bob"])
    listener = Listener()
    try:
        attack = attackers(course, listener.port)
        for name, (kind, cells) in attack.items():
            submit(course, SLUG, name, replace_solutions(base[kind], cells))
        for honest in ("nora", "zoe"):  # one in the middle of the attackers (sorted), one after all of them
            submit(course, SLUG, honest, answered)
        start = time.perf_counter()
        second = nbgrader_command(["autograde", SLUG, *timeout], course, check=False)
        seconds = time.perf_counter() - start
    finally:
        listener.close()
    students = ["alice", "bob", *attack, "nora", "zoe"]
    return dict(course=course, before=before, after=snapshot(course, ["alice", "bob"]), first=first, second=second,
                seconds=seconds, scores=read_scores(course, SLUG, students), listener=listener,
                log=second.stdout + second.stderr)


def test_honest_students_are_graded_as_usual(graded):
    s = graded["scores"]
    for name in ("alice", "nora", "zoe"):
        assert s[name]["total"] == s[name]["max"] == 10, f"{name}: {s[name]}"
    assert s["bob"]["total"] == 0


def test_grading_goes_on_for_the_whole_class(graded):
    log = graded["log"]
    assert "There was an error processing assignment" not in log, log[-4000:]
    for name in graded["scores"]:
        assert (graded["course"] / "autograded" / name / SLUG / f"{SLUG}.ipynb").is_file(), f"{name} not graded"


def test_nothing_outside_the_sandbox_changed(graded):
    before, after = graded["before"], graded["after"]
    for part in before:
        if part != "gradebook":
            assert after[part] == before[part], f"{part} changed"
    for table, rows in before["gradebook"].items():
        assert rows <= after["gradebook"][table], f"gradebook table {table}: rows changed or removed"
    assert not (graded["course"] / "pwned.txt").exists()


def test_reading_the_solutions_gets_no_credit(graded):
    assert graded["scores"]["mallory_solutions"]["total"] == 0
    assert "nothing to copy from" in _outputs(graded["course"], "mallory_solutions", "sgd_momentum")


def test_editing_the_gradebook_changes_nothing(graded):
    s = graded["scores"]
    assert s["mallory_gradebook"]["total"] == 0, s["mallory_gradebook"]
    assert s["alice"]["total"] == 10
    assert "no gradebook in sight" in _outputs(graded["course"], "mallory_gradebook", "sgd_momentum")


def test_vandalism_is_blocked_and_the_honest_work_keeps_its_marks(graded):
    out = _outputs(graded["course"], "mallory_vandal", "sgd_momentum")
    assert "VANDAL SUCCEEDED" not in out and out.count("vandal blocked") == 6, out
    assert graded["scores"]["mallory_vandal"]["total"] == 10


@pytest.mark.xfail(not CH1_HAS_INTEGRITY, strict=True,
                   reason="chapter 1's hidden tests do not yet compare with functions captured before the student's "
                          "code (fasttrain.checks.Integrity): a replaced torch.allclose still passes test_adam")
def test_a_replaced_allclose_does_not_pass_a_wrong_adam(graded):
    assert graded["scores"]["mallory_allclose"]["test_adam"] == 0


@pytest.mark.xfail(not CH1_HAS_FROM_SCRATCH, strict=True,
                   reason="chapter 1's hidden tests do not yet fail subclasses of torch's optimizers "
                          "(fasttrain.checks.assert_written_from_scratch)")
def test_subclassing_torchs_optimizers_gets_no_credit(graded):
    assert graded["scores"]["mallory_subclass"]["total"] == 0


def test_a_2_gib_allocation_fails_and_the_kernel_lives_on(graded):
    s = graded["scores"]["mallory_memory"]
    assert "can't allocate memory" in _outputs(graded["course"], "mallory_memory", "sgd_momentum")
    assert s["test_sgd_momentum"] == 0 and s["total"] == 8, s


def test_an_infinite_loop_is_interrupted(graded):
    s = graded["scores"]["mallory_loop"]
    assert s["test_rmsprop"] == 0 and s["total"] == 8, s


def test_a_kernel_that_exits_keeps_the_marks_earned_before(graded):
    s = graded["scores"]["mallory_exit"]
    assert s["test_sgd_momentum"] == 2 and s["test_rmsprop"] == 2 and s["test_adam"] == 0 and s["test_adamw"] == 0, s


def test_a_suppressed_traceback_still_fails_the_test(graded):
    s = graded["scores"]["mallory_traceback"]
    assert s["test_adam"] == 0 and s["total"] == 7, s


def test_a_fork_bomb_is_bounded(graded):
    out = _outputs(graded["course"], "mallory_forkbomb", "sgd_momentum")
    peak = int(out.split("FORK BOMB PEAK ")[1].split()[0])
    assert 20 < peak <= PROCESSES, out
    assert graded["scores"]["mallory_forkbomb"]["total"] == 10


def test_there_is_no_network(graded):
    out = _outputs(graded["course"], "mallory_network", "sgd_momentum")
    assert "NETWORK REACHED" not in out and out.count("network blocked") == 2, out
    assert graded["listener"].connections == 0
    assert graded["scores"]["mallory_network"]["total"] == 10


def test_another_students_folder_is_out_of_sight(graded):
    assert graded["scores"]["mallory_neighbour"]["total"] == 0
    assert "nothing to copy from" in _outputs(graded["course"], "mallory_neighbour", "sgd_momentum")


def test_filling_the_disk_stops_at_the_quota(graded):
    out = _outputs(graded["course"], "mallory_disk", "sgd_momentum")
    for folder in (".", "/tmp"):
        mib = int(out.split(f"DISK FULL in {folder} after ")[1].split()[0])
        assert 0 < mib <= QUOTA_MIB, out
    assert graded["scores"]["mallory_disk"]["total"] == 10
