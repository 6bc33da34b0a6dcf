"""Every submission's kernel in a sandbox: what `nbgrader autograde` runs student code in.

nbgrader leaves sandboxing to the deployment: out of the box a student's code runs as the
grader, in the course folder, next to `solutions/`, `gradebook.db` and the other students'
submissions. The course's `nbgrader_config.py` replaces nbgrader's `Execute` preprocessor with
`SandboxedExecute`, whose kernels are started by `SandboxedKernelManager` under bubblewrap
(`bwrap`):

- its own network namespace: no network at all (not even the grader's loopback); the kernel
  talks to the grader over zmq's IPC transport, through a connection file in a private folder
  that is the only thing of the grader's bound writable into the sandbox;
- the system folders, the Python installation, the virtual environment and the packages it
  imports (editable installs included) read-only; nothing else of the machine: not the course
  folder (`solutions/`, the gradebook, `release/`, `autograded/`, `feedback/`, the other
  students), not the home folder, not `/etc` beyond what programs need to start;
- a private writable copy of that one submission's folder (without its notebooks, which at this
  point hold the restored hidden tests) on a size-limited tmpfs, which is also `$HOME`, and a
  size-limited `/tmp`;
- its own PID, IPC, UTS and user namespaces, a new session, no nested user namespaces;
- per-process limits: memory (RLIMIT_DATA), CPU time (RLIMIT_CPU), file size (RLIMIT_FSIZE),
  and processes (RLIMIT_NPROC, counted per sandbox because the sandbox has its own user
  namespace and a non-root uid: a fork bomb stops at the limit); the whole sandbox dies with
  its kernel.

When the grader runs as root, bwrap first builds the sandbox's view of the file system as
root (so the Python installation may live in a folder only root can enter, e.g. pyenv under
/root), then drops to `uid` and starts a second, unprivileged bwrap inside it for the user
namespace (root's processes are exempt from RLIMIT_NPROC). As any other user one unprivileged
bwrap does both.

Where bwrap is missing or cannot start, autograding stops with a message that says how to
install it. It never falls back to running student code unsandboxed unless the instructor opts
out in nbgrader_config.py with `c.SandboxedKernelManager.enabled = False`.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager, KernelManager
from nbclient.exceptions import DeadKernelError
from nbconvert.preprocessors import Preprocessor
from nbgrader.preprocessors import Execute
from traitlets import Bool, Integer, List, Unicode, default

GiB, MiB = 2 ** 30, 2 ** 20

OPT_OUT_HINT = ("To grade without a sandbox (student code then runs as you, and can read the solutions and "
                "rewrite the gradebook), set `c.SandboxedKernelManager.enabled = False` in nbgrader_config.py.")
INSTALL_HINT = ("Install bubblewrap: `sudo apt-get install bubblewrap` (Debian, Ubuntu), `sudo dnf install "
                "bubblewrap` (Fedora), `sudo pacman -S bubblewrap` (Arch); in a container image, add it to the "
                "image. " + OPT_OUT_HINT)

# Inside the sandbox.
HOME = "/home/student"
STAGING = "/run/submission"

# Folders of the system that programs need, bound read-only (symlinks, as on merged-/usr systems, are recreated).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What of /etc a Python kernel needs: the dynamic linker's cache, time zone, user names, fonts; no secrets.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "passwd", "group",
             "nsswitch.conf", "alternatives", "fonts", "mime.types", "os-release", "matplotlibrc")
# The environment the kernel keeps (names or fnmatch patterns); everything else (tokens, keys) is dropped.
ENV_KEEP = ("PATH", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM", "PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONPATH",
            "PYTHONDONTWRITEBYTECODE", "PYDEVD_DISABLE_FILE_VALIDATION", "JPY_*", "NBGRADER_EXECUTION",
            "MPLBACKEND", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
            "FASTTRAIN_DATA", "FASTTRAIN_INSTALL")

# Runs inside the sandbox with `python -I -S -c`: "drop UID GID -- CMD..." switches to the sandbox's uid
# (the root case); "limits NPROC DATA CPU FSIZE WORKDIR -- CMD..." sets the limits, copies the submission
# into the private tmpfs, and starts the kernel there.
_LAUNCHER = r"""
import os, resource, shutil, sys
mode, args = sys.argv[1], sys.argv[2:]
cut = args.index("--")
opts, cmd = args[:cut], args[cut + 1:]
if mode == "drop":
    uid, gid = int(opts[0]), int(opts[1])
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
else:
    nproc, data, cpu, fsize, staging, workdir = opts
    for name, value in (("NPROC", nproc), ("DATA", data), ("FSIZE", fsize), ("CORE", "0")):
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (int(value), int(value)))
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu) + 5))
    shutil.copytree(staging, workdir, symlinks=True, copy_function=shutil.copyfile, dirs_exist_ok=True)
    os.makedirs(os.path.join(os.environ["HOME"], ".cache"), exist_ok=True)
    os.chdir(workdir)
os.execvp(cmd[0], cmd)
"""


class SandboxUnavailable(KeyboardInterrupt):
    """The sandbox cannot start (bubblewrap missing or refused).

    A KeyboardInterrupt on purpose: nbgrader catches every Exception per submission, records the
    submission as failed and goes on with the next one, which would fail every student the same
    way; on a KeyboardInterrupt it removes the half-graded submission and stops, which is what
    should happen: nothing is graded until the sandbox works (or the instructor opts out).
    """


class SandboxError(RuntimeError):
    """This one submission cannot be sandboxed (e.g. its folder is larger than the disk quota)."""


def _is_within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or inside it (both absolute, normalized)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _editable_paths(site_dir: Path) -> list[str]:
    """Folders that editable installs in `site_dir` import from (setuptools' finder maps and path .pth lines)."""
    found = []
    for finder in site_dir.glob("__editable__*finder.py"):
        for line in finder.read_text().splitlines():
            if line.startswith("MAPPING"):
                found += list(ast.literal_eval(line.split("=", 1)[1].strip()).values())
    for pth in site_dir.glob("*.pth"):
        for line in pth.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "import ", "import\t")) and os.path.isdir(line):
                found.append(line)
    return found


class SandboxedKernelManager(AsyncKernelManager):
    """A kernel manager that starts each kernel under bubblewrap (see the module's docstring)."""

    enabled = Bool(True, config=True, help=(
        "Run every kernel in the sandbox. False grades without one (student code then runs as the grader, "
        "with access to the solutions and the gradebook): only where the deployment isolates grading itself."))
    bwrap = Unicode("bwrap", config=True, help="The bubblewrap executable (a name on PATH or a path).")
    uid = Integer(65534, config=True, help=(
        "The uid (and gid) the kernel runs as when the grader runs as root (root is exempt from the process "
        "limit). Default: nobody. Processes are counted per sandbox (each has its own user namespace)."))
    memory_limit = Integer(2 * GiB, config=True, help=(
        "Bytes of data memory (heap, anonymous mappings; RLIMIT_DATA) each process of the sandbox may use. "
        "A Python kernel with torch imported uses about 0.9 GiB of it."))
    processes = Integer(128, config=True, help="Processes and threads the sandbox may run at once (RLIMIT_NPROC).")
    cpu_time = Integer(600, config=True, help="Seconds of CPU time each process of the sandbox may use (RLIMIT_CPU).")
    disk_quota = Integer(256 * MiB, config=True, help=(
        "Bytes the submission's private folder (also $HOME) may hold, and separately /tmp (both are tmpfs)."))
    read_only_paths = List(Unicode(), config=True, help=(
        "More folders bound read-only at the same path (e.g. a data set). $FASTTRAIN_DATA is bound when set. "
        "A folder that contains the course (or the grader's home) is refused."))
    devices = List(Unicode(), config=True, help="Device files to expose, e.g. ['/dev/nvidia0', '/dev/nvidiactl'].")
    env_keep = List(Unicode(), list(ENV_KEEP), config=True,
                    help="Environment variables (names or fnmatch patterns) the kernel keeps; the rest is dropped.")

    _private: str | None = None
    _submission: str | None = None

    # --- the kernel's life -------------------------------------------------------------------------

    async def _async_pre_start_kernel(self, **kw):
        if self.enabled:
            self._check_bwrap()
            self._submission = os.path.abspath(kw.get("cwd") or os.getcwd())
            self._private = tempfile.mkdtemp(prefix="ftsbx-")
            conn = os.path.join(self._private, "conn")
            os.mkdir(conn, 0o700)
            if os.geteuid() == 0:
                os.chown(conn, self.uid, self.uid)
            self.transport = "ipc"
            self.connection_file = os.path.join(conn, "kernel.json")
            self.ip = os.path.join(conn, "k")
        return await super()._async_pre_start_kernel(**kw)

    def write_connection_file(self, **kwargs) -> None:
        super().write_connection_file(**kwargs)
        if self.enabled and os.geteuid() == 0 and os.path.exists(self.connection_file):
            os.chown(self.connection_file, self.uid, self.uid)  # the kernel must read it, as `uid`

    async def _async_launch_kernel(self, kernel_cmd, **kw):
        if self.enabled:
            staging = os.path.join(self._private, "submission")
            self._stage(self._submission, staging)
            kw["env"] = self._kernel_env(kw.get("env") or dict(os.environ))
            kw["cwd"] = self._private
            self._preflight(staging, kw["env"])
            kernel_cmd = self._command(kernel_cmd, staging, os.path.basename(self._submission))
            self.log.debug("Sandboxed kernel: %s", kernel_cmd)
        else:
            self.log.warning("Grading WITHOUT a sandbox (c.SandboxedKernelManager.enabled = False): student code "
                             "runs as %s, with access to the course folder", os.environ.get("USER", "the grader"))
        return await super()._async_launch_kernel(kernel_cmd, **kw)

    async def _async_interrupt_kernel(self) -> None:
        """Interrupt by a message on the control channel: a SIGINT to the process group would hit bwrap."""
        if not self.enabled:
            return await KernelManager._async_interrupt_kernel(self)
        if not self.has_kernel:
            raise RuntimeError("Cannot interrupt kernel. No kernel is running!")
        self._connect_control_socket()
        self.session.send(self._control_socket, self.session.msg("interrupt_request", content={}))

    async def _async_cleanup_resources(self, restart: bool = False) -> None:
        await KernelManager._async_cleanup_resources(self, restart=restart)
        if self._private and not restart:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    interrupt_kernel = _async_interrupt_kernel
    cleanup_resources = _async_cleanup_resources

    # --- what the sandbox is made of -------------------------------------------------------------

    def _check_bwrap(self) -> None:
        if shutil.which(self.bwrap) is None:
            msg = f"Autograding stopped: the sandbox for student code needs bubblewrap ({self.bwrap!r} not found). "
            self.log.error(msg + INSTALL_HINT)
            raise SandboxUnavailable(msg + INSTALL_HINT)

    _works: bool = False  # the sandbox started once in this process

    def _preflight(self, staging: str, env: dict[str, str]) -> None:
        """Start the sandbox once with `python -c pass`: if bwrap cannot build it here, stop with its reason."""
        if SandboxedKernelManager._works:
            return
        cmd = self._command([sys.executable, "-I", "-S", "-c", "pass"], staging, "preflight")
        try:
            proc = subprocess.run(cmd, env=env, cwd=self._private, capture_output=True, text=True, timeout=60)
            failed, reason = proc.returncode != 0, proc.stderr.strip()[-2000:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            failed, reason = True, repr(exc)
        if failed:
            msg = (f"Autograding stopped: bubblewrap could not build the sandbox for student code on this machine: "
                   f"{reason or 'no message'}. bwrap needs unprivileged user namespaces (sysctl "
                   f"kernel.unprivileged_userns_clone=1 on older Debian kernels; on Ubuntu 24.04 and later an AppArmor "
                   f"profile for bwrap, or kernel.apparmor_restrict_unprivileged_userns=0) and, inside a container, "
                   f"a seccomp profile that allows creating namespaces. " + OPT_OUT_HINT)
            self.log.error(msg)
            raise SandboxUnavailable(msg)
        SandboxedKernelManager._works = True

    def protected(self) -> list[str]:
        """Folders no read-only bind may contain: the course (grader's working folder), the submission, home."""
        folders = [os.getcwd(), os.path.expanduser("~")]
        if self._submission:
            folders.append(self._submission)
        return [os.path.realpath(f) for f in folders]

    def python_paths(self, kernel_python: str) -> list[str]:
        """The Python installation, the environment and the folders its editable installs import from."""
        paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                 os.path.dirname(os.path.dirname(os.path.realpath(kernel_python)))}
        sites = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
        for entry in sys.path:  # PYTHONPATH and the like
            if entry and os.path.isdir(entry):
                paths.add(entry)
        for s in sites:
            if os.path.isdir(s):
                paths.update(_editable_paths(Path(s)))
        return sorted(os.path.realpath(p) for p in paths)

    def _stage(self, source: str, staging: str) -> None:
        """Copy the submission's folder (not its notebooks, not special files or symlinks' targets) for the sandbox."""
        budget = [self.disk_quota]

        def ignore(folder, names):
            skipped = []
            for name in names:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                if name.endswith(".ipynb") or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
                                                   or stat.S_ISLNK(st.st_mode)):
                    skipped.append(name)
                elif stat.S_ISREG(st.st_mode):
                    budget[0] -= st.st_size
            if budget[0] < 0:
                raise SandboxError(f"The submission folder {source} holds more than the sandbox's disk quota "
                                   f"({self.disk_quota / MiB:.0f} MiB; c.SandboxedKernelManager.disk_quota).")
            return skipped

        shutil.copytree(source, staging, symlinks=True, ignore=ignore)
        if os.geteuid() == 0:
            for folder, dirs, files in os.walk(staging):
                for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                    os.lchown(name, self.uid, self.uid)

    def _kernel_env(self, env: dict[str, str]) -> dict[str, str]:
        kept = {k: v for k, v in env.items() if any(fnmatch.fnmatchcase(k, pattern) for pattern in self.env_keep)}
        kept.update(HOME=HOME, USER="student", LOGNAME="student", TMPDIR="/tmp",
                    PATH=f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin")
        return kept

    def _command(self, kernel_cmd: list[str], staging: str, name: str) -> list[str]:
        """The bwrap command line around the kernel's."""
        bwrap = shutil.which(self.bwrap)
        conn = os.path.dirname(self.connection_file)
        protected = self.protected()
        binds = []
        for path in [*self.python_paths(kernel_cmd[0]), *self.read_only_paths,
                     *([os.environ["FASTTRAIN_DATA"]] if os.environ.get("FASTTRAIN_DATA") else [])]:
            path = os.path.realpath(path)
            if not os.path.exists(path) or any(_is_within(path, s) for s in SYSTEM_DIRS):
                continue
            if any(_is_within(p, path) for p in protected):
                log = self.log.warning if path in self.read_only_paths else self.log.debug
                log("Sandbox: not binding %s (it contains the course or the home folder)", path)
                continue
            binds.append(path)
        binds = [p for p in binds if not any(q != p and _is_within(p, q) for q in binds)]  # outermost only

        view = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--hostname", "sandbox", "--die-with-parent"]
        for d in SYSTEM_DIRS:
            if os.path.islink(d):
                view += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                view += ["--ro-bind", d, d]
        view += ["--perms", "0755", "--dir", "/etc"]
        for f in ETC_FILES:
            view += ["--ro-bind-try", f"/etc/{f}", f"/etc/{f}"]
        view += ["--proc", "/proc", "--dev", "/dev"]
        for dev in self.devices:
            view += ["--dev-bind-try", dev, dev]
        parents = sorted({str(p) for b in [*binds, conn, HOME, STAGING] for p in Path(b).parents if str(p) != "/"},
                         key=lambda p: p.count("/"))
        for p in parents:
            view += ["--perms", "0755", "--dir", p]
        for b in binds:
            view += ["--ro-bind", b, b]
        view += ["--ro-bind", staging, STAGING, "--perms", "0755", "--dir", HOME]

        # (JPY_PARENT_PID, which jupyter_client sets, is the grader's pid: it means nothing in the sandbox's PID
        # namespace, where the kernel's parent may be pid 1, which ipykernel takes for "my parent died". 1 tells
        # ipykernel not to watch its parent (--die-with-parent does that job) and not to print a banner.)
        private = ["--unshare-user", "--disable-userns", "--new-session", "--die-with-parent",
                   "--setenv", "JPY_PARENT_PID", "1",
                   "--size", str(self.disk_quota), "--tmpfs", HOME,
                   "--size", str(self.disk_quota), "--tmpfs", "/tmp"]
        for b in binds:  # what the two tmpfs just covered (a venv under /tmp, say) is bound again on top
            if _is_within(b, "/tmp") or _is_within(b, HOME):
                private += ["--ro-bind", b, b]
        private += ["--bind", conn, conn, "--remount-ro", "/"]
        workdir = f"{HOME}/{name}"
        python = sys.executable
        kernel = [python, "-I", "-S", "-c", _LAUNCHER, "limits", str(self.processes), str(self.memory_limit),
                  str(self.cpu_time), str(self.disk_quota), STAGING, workdir, "--", *kernel_cmd]
        if os.geteuid() == 0:
            return [bwrap, *view, "--bind", conn, conn, "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--",
                    python, "-I", "-S", "-c", _LAUNCHER, "drop", str(self.uid), str(self.uid), "--",
                    bwrap, "--dev-bind", "/", "/", *private, "--", *kernel]
        return [bwrap, *view, *private, "--", *kernel]


class SandboxedExecute(Execute):
    """nbgrader's Execute preprocessor, with every kernel started by SandboxedKernelManager.

    (`c.Execute.kernel_manager_class` cannot do this: nbgrader's Execute passes its own
    kernel_manager_class to the constructor, and traitlets lets constructor arguments win over
    configuration.)
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("kernel_manager_class", SandboxedKernelManager)
        super().__init__(*args, **kwargs)

    @default("shutdown_kernel")
    def _shutdown_kernel_default(self) -> str:
        return "immediate"  # the sandbox is thrown away: no need to wait a second for a polite shutdown

    def preprocess(self, nb, resources=None, km=None):
        self._dead = None
        return super().preprocess(nb, resources, km)

    def preprocess_cell(self, cell, resources, index):
        """Run the cell; once the kernel has died (os._exit, a crash, a limit), fail this and every later code cell.

        nbgrader alone aborts the whole submission on a dead kernel (no grades at all, and the error is
        logged as a grading failure); here the tests that passed before keep their points, the ones after
        score 0, and the graded notebook says why.
        """
        if cell.cell_type != "code":
            return cell, resources
        if self._dead is None:
            try:
                return super().preprocess_cell(cell, resources, index)
            except DeadKernelError as exc:
                self._dead = index
                self.log.warning("The kernel died in cell %d (%s); the cells after it are marked as failed", index, exc)
                cell.outputs.append(_error("DeadKernelError", "the kernel died while running this cell (it exited, "
                                           "crashed or went past a limit of the sandbox)"))
                return cell, self.resources
        cell.outputs = [_error("DeadKernelError", f"not run: the kernel died in cell {self._dead}")]
        return cell, self.resources


def _error(ename: str, evalue: str):
    from nbformat.v4 import new_output
    return new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


class RefuseOutsideLinks(Preprocessor):
    """Fail a submission whose folder holds a symbolic link to anything outside it.

    nbgrader reads the submitted notebook and copies the submission's other files as the grader,
    following links: a submitted notebook that is a link to solutions/.../*.ipynb would be graded as
    the solution itself, before any sandbox starts. (Archives unpacked into submitted/ keep links.)
    Put first in c.Autograde.sanitize_preprocessors; nbgrader then reports that one submission as
    failed, removes what it copied, and goes on with the class.
    """

    enabled = Bool(True, help="nbconvert's preprocessors are off unless enabled: this one is always on").tag(config=True)

    def preprocess(self, nb, resources):
        given = os.path.abspath(resources.get("metadata", {}).get("path") or ".")
        for path in (given, os.path.dirname(given)):  # submitted/<student>/<assignment> and submitted/<student>
            if os.path.islink(path):
                raise SandboxError(f"{path} is a link to {os.readlink(path)}: not graded (submit the folder itself)")
        folder = os.path.realpath(given)
        for here, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = os.path.join(here, name)
                if os.path.islink(path) and not _is_within(os.path.realpath(path), folder):
                    raise SandboxError(f"{path} is a link to {os.readlink(path)}, outside the submission: "
                                       f"not graded (replace it with the file itself)")
        return nb, resources


def autograde_preprocessors() -> list:
    """nbgrader's default autograde pipeline with Execute replaced by SandboxedExecute."""
    from nbgrader.converters import Autograde
    default = list(Autograde.class_traits()["autograde_preprocessors"].default())
    if Execute not in default:
        raise RuntimeError("nbgrader's autograde pipeline has no Execute step: update fasttrain_course/sandbox.py")
    return [SandboxedExecute if pp is Execute else pp for pp in default]
