"""The book builds offline with warnings as errors, from the chapters' recorded runs."""

from book_build import built_book
from fasttrain_course.paths import chapters


def test_book_builds_with_warnings_as_errors_and_shows_every_chapter(repo_root):
    html = built_book()
    assert (html / "index.html").is_file()
    for slug in chapters(repo_root):
        page = html / "book" / "chapters" / f"{slug}.html"
        assert page.is_file(), f"no page for {slug}"
        text = page.read_text()
        assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
        assert "data:image/png" in text or "<img" in text, f"{slug}'s page has no figure"
    results = (html / "book" / "results.html").read_text()
    for slug in chapters(repo_root):
        assert slug in results
