# nbgrader configuration of the course (read by the `nbgrader` command run from this folder).
from nbgrader.preprocessors import (CheckCellMetadata, ClearHiddenTests, ClearMarkScheme, ClearOutput,
                                    ComputeChecksums, DeduplicateIds, IncludeHeaderFooter, InstantiateTests,
                                    LockCells, OverwriteKernelspec, SaveCells)

from fasttrain_course.nbgrader_plugins import ExerciseStubs, QuietOverwriteCells

c = get_config()  # noqa: F821

c.CourseDirectory.root = "."
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "course"
c.CourseDirectory.course_id = "fasttrain"

# A student's infinite loop is interrupted after this many seconds per cell; that cell scores 0
# and grading goes on with the next one.
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True

# nbgrader's own pipelines, with two of the course's preprocessors (fasttrain_course/nbgrader_plugins.py):
# stubs that name their exercise, and no false tampering warnings for cells with hidden tests.
c.GenerateAssignment.preprocessors = [
    IncludeHeaderFooter, InstantiateTests, LockCells, ExerciseStubs, ClearOutput, CheckCellMetadata,
    ComputeChecksums, SaveCells, ClearHiddenTests, ClearMarkScheme, ComputeChecksums, CheckCellMetadata,
]
c.Autograde.sanitize_preprocessors = [ClearOutput, DeduplicateIds, OverwriteKernelspec, QuietOverwriteCells,
                                      CheckCellMetadata]

# Every submission's kernel runs in a sandbox (fasttrain_course/sandbox.py, bubblewrap): no network, the system
# and the environment read-only, a private size-limited copy of that one submission's folder, no view of
# solutions/, the gradebook or the other students, limits on memory, processes and CPU time. Without bubblewrap,
# autograding stops and says how to install it.
# nbgrader ignores a config file that raises an Exception (it logs it and goes on), which here would mean
# grading unsandboxed: so a sandbox that cannot be set up stops nbgrader (SystemExit is not an Exception).
try:
    from fasttrain_course.sandbox import RefuseOutsideLinks, autograde_preprocessors
    c.Autograde.autograde_preprocessors = autograde_preprocessors()  # nbgrader's own, with Execute sandboxed
    # nbgrader reads a submission as you: a submitted link to solutions/ would be graded as the solution.
    c.Autograde.sanitize_preprocessors = [RefuseOutsideLinks, *c.Autograde.sanitize_preprocessors]
except Exception as exc:
    raise SystemExit(f"nbgrader_config.py: the sandbox for student code cannot be set up: {exc!r}") from exc
# Limits per submission (these are the defaults):
# c.SandboxedKernelManager.memory_limit = 2 * 2**30   # bytes of data memory per process (RLIMIT_DATA)
# c.SandboxedKernelManager.processes = 128            # processes and threads (RLIMIT_NPROC)
# c.SandboxedKernelManager.cpu_time = 600             # CPU seconds per process (RLIMIT_CPU)
# c.SandboxedKernelManager.disk_quota = 256 * 2**20   # bytes in the private folder ($HOME), and in /tmp
# To grade WITHOUT a sandbox (student code then runs as you, and can read the solutions and rewrite the
# gradebook), only where the deployment already isolates each submission:
# c.SandboxedKernelManager.enabled = False
