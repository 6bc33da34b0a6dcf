# nbgrader configuration of the course (read by the `nbgrader` command run from this folder).
c = get_config()  # noqa: F821

c.CourseDirectory.root = "."
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "course"
c.CourseDirectory.course_id = "fasttrain"

# A student's infinite loop is interrupted after this many seconds per cell; that cell scores 0
# and grading goes on with the next one.
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True
