"""Tables of rows (dicts), as Markdown for notebooks and the book, or as aligned plain text for logs."""

from __future__ import annotations

import math
from typing import Iterable


def format_table(rows: Iterable[dict], columns: dict[str, str], formats: dict[str, str] | None = None,
                 markdown: bool = True) -> str:
    """A table of `rows` with `columns` ({key: header}); floats use `formats[key]` (else 4 significant digits); NaN is '-'."""
    formats = formats or {}
    rows = list(rows)

    def cell(key: str, value) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return format(value, formats.get(key, ",.0f" if abs(value) >= 1000 else ".4g"))
        if isinstance(value, int) and not isinstance(value, bool) and key in formats:
            return format(value, formats[key])
        return "" if value is None else str(value)

    body = [[cell(key, row.get(key)) for key in columns] for row in rows]
    headers = list(columns.values())
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    text = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    text += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(text)
