"""The course's nbgrader preprocessors, set in nbgrader_config.py.

`ExerciseStubs` writes a stub per exercise that says which exercise it is and what to write:
the text after `BEGIN SOLUTION` on the delimiter line, e.g.
`### BEGIN SOLUTION (Exercise 3: the bias-corrected Adam update)`.

`QuietOverwriteCells` keeps nbgrader's protection of locked cells but stops crying wolf. nbgrader
restores a locked test cell from the gradebook whenever its checksum differs from the source's,
and it warns each time; a cell with hidden tests always differs (the student never saw them), so
every submission logged "Attribute 'checksum' ... has changed!" once per such cell. Here a locked
cell that is exactly its released form (the source without its hidden tests) is restored silently;
any other change is reported as tampering, loudly.
"""

from __future__ import annotations

import re

from nbformat.notebooknode import NotebookNode
from nbgrader import utils
from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions, OverwriteCells

BEGIN = "BEGIN SOLUTION"


class ExerciseStubs(ClearSolutions):
    """ClearSolutions whose stub raises NotImplementedError naming the exercise and what to write."""

    def _replace_solution_region(self, cell, language: str) -> bool:
        if cell.cell_type != "code" or language != "python":
            return super()._replace_solution_region(cell, language)
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id", "this exercise")
        lines, out, in_solution, replaced = cell.source.split("\n"), [], False, False
        for line in lines:
            if BEGIN in line:
                if in_solution:
                    raise RuntimeError(f"nested {BEGIN} in cell {grade_id}")
                in_solution = replaced = True
                indent = re.match(r"\s*", line).group(0)
                hint = line.split(BEGIN, 1)[1].strip().strip("()").strip(" :-")
                message = hint or f"write this part of {grade_id} (see the text above the cell)"
                out += [f"{indent}# YOUR CODE HERE",
                        f"{indent}raise NotImplementedError({f'{grade_id}: {message}'!r})"]
            elif self.end_solution_delimeter in line:
                in_solution = False
            elif not in_solution:
                out.append(line)
        if in_solution:
            raise RuntimeError(f"no END SOLUTION in cell {grade_id}")
        cell.source = "\n".join(out)
        return replaced


def released_source(source: str) -> str:
    """A locked cell's source as the student notebook shows it: without its hidden tests."""
    cell = NotebookNode(cell_type="code", source=source, metadata={})
    ClearHiddenTests()._remove_hidden_test_region(cell)
    return cell.source


class QuietOverwriteCells(OverwriteCells):
    """OverwriteCells that restores released test cells silently and reports only real changes."""

    def report_change(self, name: str, attr: str, old, new) -> None:
        if attr == "checksum" and getattr(self, "_released_unchanged", False):
            return
        self.log.warning("Tampering: attribute '%s' of locked cell %s was changed in the submission "
                         "(should be %s, got %s); the cell was restored from the source.", attr, name, old, new)

    def preprocess_cell(self, cell, resources, cell_index):
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        self._released_unchanged = False
        if grade_id is not None and utils.is_locked(cell):
            try:
                source = self.gradebook.find_source_cell(grade_id, self.notebook_id, self.assignment_id)
            except Exception:  # a cell the gradebook does not know: nbgrader itself reports it
                source = None
            if source is not None and cell.source.strip() == released_source(source.source).strip():
                self._released_unchanged = True
        return super().preprocess_cell(cell, resources, cell_index)
