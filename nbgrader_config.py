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
