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
import json
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

from fasttrain_course.sandbox import INSTALL_HINT, SandboxedKernelManager
from grading import (ROOT, course_like_repo, edit_solution, nbgrader_command, read_scores, replace_solutions,
                     solution_source, submit)

SLUG = "01_optimizers"
SOLUTION_CELLS = ("sgd_momentum", "rmsprop", "adam", "adamw")
TESTS = {"test_sgd_momentum": 2, "test_rmsprop": 2, "test_adam": 3, "test_adamw": 3}
TIMEOUT = 15  # seconds per cell; the chapter's slowest test cell takes a few
LIMITS = SandboxedKernelManager.class_traits()
PROCESSES = LIMITS["processes"].default_value
QUOTA_MIB = LIMITS["disk_quota"].default_value // 2 ** 20


@pytest.fixture(autouse=True)
def _bubblewrap():
    if shutil.which("bwrap") is None:  # every grading test needs it: fail, do not skip
        pytest.fail(f"bubblewrap is not installed. {INSTALL_HINT}")


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
        link = course / "submitted" / "mallory_link" / SLUG  # the submitted notebook is a link to the solutions
        link.mkdir(parents=True)
        (link / f"{SLUG}.ipynb").symlink_to(course / "solutions" / SLUG / f"{SLUG}.ipynb")
        for honest in ("nora", "zoe"):  # one in the middle of the attackers (sorted), one after all of them
            submit(course, SLUG, honest, answered)
        start = time.perf_counter()
        second = nbgrader_command(["autograde", SLUG, *timeout], course, check=False)
        seconds = time.perf_counter() - start
    finally:
        listener.close()
    students = ["alice", "bob", *attack, "mallory_link", "nora", "zoe"]
    scores = read_scores(course, SLUG, students)
    print(f"\nthe class graded in {seconds:.0f} s (pytest -s shows this):")
    for name, s in scores.items():
        print(f"  {name:20} {s['total']:g}/{s['max']:g}  " + " ".join(f"{t}={s[t]:g}" for t in TESTS))
    return dict(course=course, before=before, after=snapshot(course, ["alice", "bob"]), first=first, second=second,
                seconds=seconds, scores=scores, listener=listener,
                log=second.stdout + second.stderr)


def test_honest_students_are_graded_as_usual(graded):
    s = graded["scores"]
    for name in ("alice", "nora", "zoe"):
        assert s[name]["total"] == s[name]["max"] == 10, f"{name}: {s[name]}"
    assert s["bob"]["total"] == 0


def test_grading_goes_on_for_the_whole_class(graded):
    log = graded["log"]
    failed = {line.split("for student ")[1].strip("' ") for line in log.splitlines()
              if "There was an error processing assignment '" in line}
    assert failed == {"mallory_link"}, log[-4000:]  # refused (below); every other submission is graded
    for name in graded["scores"]:
        graded_nb = graded["course"] / "autograded" / name / SLUG / f"{SLUG}.ipynb"
        assert graded_nb.is_file() == (name != "mallory_link"), name


def test_a_submitted_link_to_the_solutions_is_refused(graded):
    assert "is a link to" in graded["log"] and "outside the submission: not graded" in graded["log"]
    assert graded["scores"]["mallory_link"]["total"] == 0


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


def test_a_replaced_allclose_does_not_pass_a_wrong_adam(graded):
    assert graded["scores"]["mallory_allclose"]["test_adam"] == 0


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


# --- A tiny course (no torch: a kernel starts in a second) for what the class above does not reach ---

def _tiny_course(course: Path) -> nbformat.NotebookNode:
    """A course with one assignment `a1`: a solution cell defining f, and two tests of a point each."""
    from nbformat.v4 import new_code_cell, new_notebook

    def meta(**kw):
        return {"nbgrader": {"schema_version": 3, **kw}}

    (course / "solutions" / "a1").mkdir(parents=True)
    shutil.copy(ROOT / "nbgrader_config.py", course / "nbgrader_config.py")
    nb = new_notebook(cells=[
        new_code_cell("def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
                      metadata=meta(solution=True, grade=False, locked=False, grade_id="f")),
        new_code_cell("assert f(2) == 4", metadata=meta(solution=False, grade=True, locked=True, grade_id="t1",
                                                        points=1)),
        new_code_cell("assert f(3) == 6", metadata=meta(solution=False, grade=True, locked=True, grade_id="t2",
                                                        points=1)),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(course / "solutions" / "a1" / "a1.ipynb"))
    nbgrader_command(["generate_assignment", "a1", "--force"], course)
    return nb


def _tiny_scores(course: Path, students) -> dict:
    return {name: s["total"] for name, s in read_scores(course, "a1", students).items()}


@pytest.mark.parametrize("bwrap", ["missing", "refusing"])
def test_without_a_working_bubblewrap_grading_stops_and_says_why(tmp_path, bwrap):
    nb = _tiny_course(tmp_path)
    for name in ("s1", "s2"):
        submit(tmp_path, "a1", name, nb)
    fake = tmp_path / "bwrap"
    if bwrap == "refusing":  # as where user namespaces are not allowed
        fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
        fake.chmod(0o755)
    proc = nbgrader_command(["autograde", "a1", f"--SandboxedKernelManager.bwrap={fake}"], tmp_path, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    expected = "apt-get install bubblewrap" if bwrap == "missing" else "No permissions to create new namespace"
    assert expected in log and "c.SandboxedKernelManager.enabled = False" in log
    assert "Sanitizing" in log and "submitted/s2" not in log, "grading must stop at the first submission"
    assert not list((tmp_path / "autograded").glob("*/a1")), "a stopped run must leave nothing graded"


def test_grading_without_the_sandbox_takes_an_explicit_opt_out(tmp_path):
    nb = _tiny_course(tmp_path)
    peek = f"import pathlib\nassert pathlib.Path({str(tmp_path / 'gradebook.db')!r}).is_file()\ndef f(x):\n    return 2 * x"
    submit(tmp_path, "a1", "sandboxed", replace_solutions(nb, {"f": peek}))
    nbgrader_command(["autograde", "a1"], tmp_path)
    submit(tmp_path, "a1", "unsandboxed", replace_solutions(nb, {"f": peek}))
    proc = nbgrader_command(["autograde", "a1", "--SandboxedKernelManager.enabled=False"], tmp_path)
    assert "WITHOUT a sandbox" in proc.stdout + proc.stderr
    assert _tiny_scores(tmp_path, ["sandboxed", "unsandboxed"]) == {"sandboxed": 0, "unsandboxed": 2}


def test_the_kernel_sees_only_its_own_folder_and_no_secrets(tmp_path):
    nb = _tiny_course(tmp_path)
    (tmp_path / "submitted" / "s1" / "a1").mkdir(parents=True)
    (tmp_path / "submitted" / "s1" / "a1" / "data.txt").write_text("the student's own file")
    hidden = [str(tmp_path), str(tmp_path / "gradebook.db"), str(ROOT / "solutions"), str(ROOT / "gradebook.db"),
              str(ROOT / "README.md"), str(Path.home() / ".bashrc"), "/etc/shadow", "/var", "/srv", "/mnt"]
    look = f'''import json, os
print("VIEW", json.dumps({{"cwd": os.getcwd(), "files": sorted(os.listdir(".")), "env": sorted(os.environ),
                          "seen": [p for p in {hidden!r} if os.path.exists(p)], "uid": os.getuid(),
                          "home": os.environ["HOME"]}}))
open("data.txt", "a").write(" and more")  # the private copy is writable
def f(x):
    return 2 * x
'''
    nbformat.write(replace_solutions(nb, {"f": look}), str(tmp_path / "submitted" / "s1" / "a1" / "a1.ipynb"))
    env = dict(os.environ, GRADER_SECRET_TOKEN="do-not-leak")
    proc = subprocess.run([sys.executable, "-m", "nbgrader", "autograde", "a1"], cwd=tmp_path, capture_output=True,
                          text=True, env=dict(env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    graded = nbformat.read(str(tmp_path / "autograded" / "s1" / "a1" / "a1.ipynb"), as_version=4)
    view = json.loads(graded.cells[0].outputs[0]["text"].split("VIEW ", 1)[1])
    assert view["files"] == ["data.txt"], view  # its own files, not the notebook holding the hidden tests
    assert view["cwd"] == view["home"] + "/a1"
    assert view["seen"] == [], "the course, the repository and the home folder must be out of sight"
    assert "GRADER_SECRET_TOKEN" not in view["env"] and "NBGRADER_EXECUTION" in view["env"]
    assert view["uid"] != 0
    assert _tiny_scores(tmp_path, ["s1"]) == {"s1": 2}
    assert (tmp_path / "submitted" / "s1" / "a1" / "data.txt").read_text() == "the student's own file"


def test_a_process_past_its_cpu_time_is_killed_and_grading_goes_on(tmp_path):
    nb = _tiny_course(tmp_path)
    burn = "def f(x):\n    return 2 * x\nwhile True:\n    pass"
    submit(tmp_path, "a1", "burner", replace_solutions(nb, {"f": burn}))
    submit(tmp_path, "a1", "honest", nb)
    start = time.perf_counter()
    proc = nbgrader_command(["autograde", "a1", "--SandboxedKernelManager.cpu_time=3", "--Execute.timeout=60"],
                            tmp_path)
    assert time.perf_counter() - start < 40, "the CPU-time limit, not the 60 s cell timeout, must stop the loop"
    assert "The kernel died" in proc.stdout + proc.stderr
    assert _tiny_scores(tmp_path, ["burner", "honest"]) == {"burner": 0, "honest": 2}


class _LockedGradebook:
    """Hold the gradebook's write lock (in SQLite's default journal mode it keeps readers out too) until
    `seconds` have passed, or until the block ends when `seconds` is None."""

    def __init__(self, db: Path, seconds: float | None = None):
        self.db, self.seconds = db, seconds
        self.locked, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self):
        con = sqlite3.connect(self.db, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        self.locked.set()
        self.release.wait(self.seconds)
        con.execute("COMMIT")
        con.close()

    def __enter__(self):
        self.thread.start()
        self.locked.wait()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join()


def test_a_class_graded_in_parallel_writes_the_gradebook_safely(tmp_path):
    nb = _tiny_course(tmp_path)
    wrong = replace_solutions(nb, {"f": "def f(x):\n    return x + 2"})  # right for 2, wrong for 3
    expected = {}
    for i in range(6):
        submit(tmp_path, "a1", f"s{i}", nb if i % 2 else wrong)
        expected[f"s{i}"] = 2 if i % 2 else 1
    # nbgrader alone, with its default gradebook URL, loses a student to another writer that holds the lock
    # for longer than SQLite's default busy timeout (5 s) ...
    with _LockedGradebook(tmp_path / "gradebook.db"):
        alone = nbgrader_command(["autograde", "a1", "--student", "s0"], tmp_path, check=False)
    assert alone.returncode != 0 and "database is locked" in alone.stdout + alone.stderr
    # ... `fasttrain grade` waits for it (held 20 s from the start: a few for the workers to start, the rest
    # longer than 5 s), with two workers writing at once.
    shutil.rmtree(tmp_path / "autograded", ignore_errors=True)
    with _LockedGradebook(tmp_path / "gradebook.db", 20):
        proc = subprocess.run([str(Path(sys.executable).parent / "fasttrain"), "grade", "a1", "--jobs", "2"],
                              cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 submissions of a1" in proc.stdout
    assert _tiny_scores(tmp_path, expected) == expected
