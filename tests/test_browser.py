"""The built book as a reader sees it: every page opened in headless Chromium (Playwright), offline.

The pages are served from _build/html on loopback. MathJax, which the book loads from a CDN,
is served from a local copy of npm's `mathjax@3` (_build/mathjax, installed by .ci/run); every
other request that leaves the machine is refused, so a page that needs the network shows it.
A screenshot of every page goes to _build/screenshots/.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from book_build import built_book
from conftest import ROOT
from fasttrain_course.paths import chapters

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MATHJAX = ROOT / "_build" / "mathjax" / "node_modules" / "mathjax"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CDN = "https://cdn.jsdelivr.net/npm/mathjax@3/"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the skip message says what to do
    sync_playwright = None

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or sync_playwright is None or not MATHJAX.is_dir(),
    reason="needs Debian's chromium (apt-get install chromium), Playwright (pip install playwright) and a local "
           "MathJax (npm install --prefix _build/mathjax mathjax@3); .ci/run installs all three")

# What a reader must never see: the build machine's paths, raw maths delimiters, widget remains.
MACHINE_PATHS = [str(ROOT), str(Path.home()), "/tmp/", "/work/"]


@pytest.fixture(scope="module")
def site():
    html = built_book()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", html
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def pages(html: Path) -> list[str]:
    """Every page of the book (relative paths), the home page first."""
    found = sorted(str(p.relative_to(html)) for p in (html / "book").rglob("*.html"))
    return ["index.html", *[p for p in found if not p.startswith("_")]]


def open_page(browser, base: str, page_path: str, width: int = 1280):
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    offline = []

    def route(r):
        url = r.request.url
        if url.startswith(base):
            return r.continue_()
        if url.startswith(CDN):
            local = MATHJAX / url[len(CDN):].split("?")[0]
            if local.is_file():
                return r.fulfill(path=str(local))
        offline.append(url)
        return r.abort()

    page.route("**/*", route)
    page.goto(f"{base}/{page_path}", wait_until="load")
    page.wait_for_function("() => !window.MathJax || !window.MathJax.startup || window.MathJax.startup.promise")
    page.evaluate("() => window.MathJax && window.MathJax.startup ? window.MathJax.startup.promise : null")
    return context, page, offline


READER_TEXT = """() => {
  const main = document.querySelector('main') || document.body;
  const copy = main.cloneNode(true);
  copy.querySelectorAll('pre, code, .highlight, mjx-container, script, style').forEach(e => e.remove());
  return copy.innerText;
}"""


def test_every_page_reads_as_a_book_page(site, browser):
    base, html = site
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    problems = []
    for page_path in pages(html):
        context, page, offline = open_page(browser, base, page_path)
        name = page_path.replace("/", "_").removesuffix(".html")
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
        text = page.evaluate(READER_TEXT)
        for raw in ("\\(", "\\)", "\\[", "$$"):
            if raw in text:
                problems.append(f"{page_path}: raw maths delimiter {raw!r} in the prose")
        if re.search(r"(?<![\w$])\$[^$\s][^$]*\$(?![\w$])", text):
            problems.append(f"{page_path}: untypeset inline maths ($...$)")
        h1 = page.locator("main article h1").count()
        if h1 != 1:
            problems.append(f"{page_path}: {h1} h1 headings")
        sidebar = page.locator("nav.bd-docs-nav").inner_text() if page.locator("nav.bd-docs-nav").count() else ""
        if "#" in sidebar:
            problems.append(f"{page_path}: '#' in the sidebar")
        broken = page.evaluate("() => [...document.querySelectorAll('main img')]"
                               ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
        problems += [f"{page_path}: image not loaded: {src[:80]}" for src in broken]
        widgets = page.locator(".jupyter-widgets, .widget-area, .jp-OutputArea-output .widget-box").count()
        if widgets or "Loading widget" in text or "Error displaying widget" in text:
            problems.append(f"{page_path}: widget leftovers")
        full_text = page.evaluate("() => document.body.innerText")
        problems += [f"{page_path}: shows a path of the build machine ({p})" for p in MACHINE_PATHS if p in full_text]
        problems += [f"{page_path}: requested {url} (the book must read offline)" for url in offline
                     if "mathjax" in url]
        context.close()
    assert not problems, "\n".join(problems)


def test_maths_is_typeset_on_the_chapters_that_have_maths(site, browser):
    base, _ = site
    for slug in ("01_optimizers", "03_vgg", "06_one_cycle", "07_local_complexity"):
        context, page, _ = open_page(browser, base, f"book/chapters/{slug}.html")
        assert page.locator("mjx-container").count() > 5, f"{slug}: MathJax typeset no maths"
        context.close()


def test_each_chapter_has_colab_and_binder_links_to_its_student_notebook(site, browser):
    base, _ = site
    for slug in chapters(ROOT):
        context, page, _ = open_page(browser, base, f"book/chapters/{slug}.html")
        links = page.evaluate("() => [...document.querySelectorAll('main a')].map(a => a.href)")
        target = f"course/{slug}/{slug}.ipynb"
        assert any("colab.research.google.com" in h and h.endswith(target) for h in links), f"{slug}: no Colab link"
        assert any("mybinder.org" in h and h.endswith(target) for h in links), f"{slug}: no Binder link"
        context.close()


def test_the_results_page_shows_every_column_at_1280_pixels(site, browser):
    base, _ = site
    context, page, _ = open_page(browser, base, "book/results.html", width=1280)
    overflow = page.evaluate("""() => [...document.querySelectorAll('main table')].map(t => {
        const box = t.closest('.pst-scrollable-table-container') || t.parentElement;
        return {scroll: box.scrollWidth, client: box.clientWidth, right: t.getBoundingClientRect().right,
                width: window.innerWidth};
    }).filter(b => b.scroll > b.client + 1 || b.right > b.width)""")
    assert page.locator("main table").count() >= 1
    assert overflow == [], f"tables that scroll sideways at 1280 px: {overflow}"
    context.close()
