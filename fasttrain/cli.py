"""The `fasttrain` command: run chapters, build the book, release assignments."""

from __future__ import annotations

import argparse
import sys
import time

from . import course


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fasttrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [("run", "execute chapters with papermill, writing results records"),
                       ("all", "run the chapters, then build the book (the course's main job)")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("chapters", nargs="*", help="chapter slugs or numbers (default: all)")
        p.add_argument("--profile", default="smoke", help="smoke (CPU, minutes), full (GPU) or auto")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    sub.add_parser("book", help="derive the chapter pages and the results page, then build the book")
    p = sub.add_parser("release", help="regenerate the student notebooks in course/ with nbgrader")
    p.add_argument("chapters", nargs="*")
    sub.add_parser("chapters", help="list the chapters")
    args = parser.parse_args(argv)

    if args.command == "chapters":
        print("\n".join(course.chapters()))
        return 0
    if args.command == "release":
        course.release(names=args.chapters)
        return 0
    if args.command in ("run", "all"):
        failed = []
        for slug in course.resolve_chapters(args.chapters):
            print(f"== {slug} ({args.profile})", flush=True)
            start = time.perf_counter()
            try:
                out, seconds = course.run_chapter(slug, args.profile, parameters={"device": args.device})
                print(f"   executed in {seconds:.0f} s -> {out}", flush=True)
            except Exception as exc:  # report every chapter, then fail
                print(f"   FAILED after {time.perf_counter() - start:.0f} s: {exc}", file=sys.stderr, flush=True)
                failed.append(slug)
        if failed:
            print(f"Chapters that failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        if args.command == "run":
            return 0
    index = course.build_book()
    print(f"The book is built: open {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
