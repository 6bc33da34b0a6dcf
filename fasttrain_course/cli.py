"""The `fasttrain` command: run chapters, dry-run and estimate the full profile, publish runs, build the book, release assignments."""

from __future__ import annotations

import argparse
import sys
import time

from .paths import course_root, resolve_chapters


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("chapters", nargs="*", help="chapter slugs or numbers (default: all)")
    p.add_argument("--profile", default="smoke", help="smoke (CPU, minutes), cpu (CPU, ~15 min a chapter), full (GPU) "
                                                      "or auto (full on CUDA, smoke elsewhere)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dry-run", nargs="?", const="bf16", default=False, choices=["bf16", "fp16"],
                   help="run every code path of the profile for a few steps (autocast in bf16, or fp16 with a "
                        "GradScaler); its records never count as results")
    p.add_argument("--allow-cpu-full", action="store_true", help="start the full profile even on a CPU")
    p.add_argument("--estimate", action="store_true", help="print the cost estimate of the full profile and stop")
    p.add_argument("--unpublished", action="store_true",
                   help="only the chapters without a committed run in runs/ (what the book would otherwise lack)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fasttrain", description=__doc__)
    parser.add_argument("--root", default=None, help="the course folder (default: found from the working directory)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [("run", "execute chapters with papermill, writing results records"),
                       ("all", "run the chapters, then build the book (the course's main job)")]:
        _add_run_options(sub.add_parser(name, help=text))
    p = sub.add_parser("estimate", help="print (and with --write, record) the cost of each chapter's full profile, "
                                        "from its dry-run records")
    p.add_argument("--write", action="store_true", help="write fasttrain/estimates.json from the dry-run records")
    p = sub.add_parser("gpu-check", help="on a GPU: run every chapter's full profile, publish the runs to runs/full/ "
                                         "for the book, and print metric, target, time and estimate per chapter")
    p.add_argument("chapters", nargs="*")
    p = sub.add_parser("publish", help="copy chapters' last good runs to runs/<profile>/, where the book reads them")
    p.add_argument("chapters", nargs="*")
    p.add_argument("--profile", default="cpu")
    p = sub.add_parser("book", help="derive the chapter pages and the results page, then build the book")
    p.add_argument("--prefer", default="committed", choices=["committed", "local"],
                   help="pages from the committed runs in runs/ (default) or from the last local runs")
    p = sub.add_parser("release", help="regenerate the student notebooks in course/ with nbgrader")
    p.add_argument("chapters", nargs="*")
    sub.add_parser("chapters", help="list the chapters")
    p = sub.add_parser("grade", help="autograde every submission of an assignment, one `nbgrader autograde --student` "
                                     "per core (each in the sandbox of nbgrader_config.py)")
    p.add_argument("assignment")
    p.add_argument("--jobs", "-j", type=int, default=None, help="parallel workers (default: one per core)")
    p.add_argument("--student", action="append", default=None, help="only these students (repeatable)")
    p.add_argument("nbgrader_args", nargs="*", help="after --: more arguments for each `nbgrader autograde`")
    args = parser.parse_args(argv)

    try:
        from . import book, chapters, estimates, release
    except ImportError as exc:
        print(f"The course tooling needs its extra dependencies ({exc.name} is missing): "
              f"pip install -e '.[course]' (or pip install -r requirements.txt)", file=sys.stderr)
        return 2
    if args.command == "grade":  # any nbgrader course folder (the one with nbgrader_config.py)
        from . import grade
        return grade.main(args.root, args.assignment, args.jobs, args.student, args.nbgrader_args)
    root = course_root(args.root)
    if args.command == "chapters":
        print("\n".join(resolve_chapters(None, root)))
        return 0
    if args.command == "release":
        release.release(root, args.chapters)
        return 0
    if args.command == "estimate":
        return estimates.main(root, write=args.write)
    if args.command == "gpu-check":
        return gpu_check(root, args.chapters)
    if args.command == "publish":
        for slug in resolve_chapters(args.chapters, root):
            print(f"published {chapters.publish(slug, args.profile, root).relative_to(root)}")
        return 0
    if args.command in ("run", "all") and args.estimate:
        return estimates.main(root)
    if args.command in ("run", "all"):
        failed = []
        slugs = resolve_chapters(args.chapters, root)
        if args.unpublished:
            slugs = [s for s in slugs if not any((root / "runs" / p / f"{s}.ipynb").is_file() for p in ("full", "cpu"))]
        for slug in slugs:
            label = args.profile + (f", dry run ({args.dry_run})" if args.dry_run else "")
            print(f"== {slug} ({label})", flush=True)
            start = time.perf_counter()
            try:
                outcome = chapters.run_chapter(slug, args.profile, root, parameters={"device": args.device},
                                               dry_run=args.dry_run, allow_cpu_full=args.allow_cpu_full)
                print(f"   done in {outcome.seconds:.0f} s -> {outcome.notebook.relative_to(root)}", flush=True)
            except chapters.ChapterRunFailed as exc:  # report every chapter, then fail
                print(f"   FAILED after {time.perf_counter() - start:.0f} s: {exc}", file=sys.stderr, flush=True)
                failed.append(slug)
        if failed:
            print(f"Chapters that failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        if args.command == "run":
            return 0
        prefer = "committed"
    else:
        prefer = args.prefer
    index = book.build_book(root, prefer=prefer)
    print(f"The book is built: open {index}")
    return 0


def gpu_check(root, names: list[str]) -> int:
    """Run every chapter's full profile on this machine's GPU, publish the passing runs, print what each measured."""
    import torch

    from fasttrain.costs import load_estimates

    from . import chapters

    if not torch.cuda.is_available():
        print("gpu-check runs the full profiles and needs a CUDA GPU; on a CPU check the code paths with "
              "`fasttrain run --profile full --dry-run` instead.", file=sys.stderr)
        return 2
    estimates, failed = load_estimates(), []
    print(f"{'chapter':<22}{'metric':<36}{'value':>10}{'target':>12}{'ok':>5}{'wall s':>9}{'est. H100 s':>12}")
    for slug in resolve_chapters(names, root):
        est = estimates.get(slug, {}).get("full", {}).get("seconds", {}).get("H100")
        try:
            outcome = chapters.run_chapter(slug, "full", root)
            chapters.publish(slug, "full", root)
            record = outcome.record
        except chapters.ChapterRunFailed as exc:
            print(f"{slug:<22}FAILED: {exc}")
            failed.append(slug)
            continue
        for m in record["metrics"]:
            if m["target"] is None:
                continue
            print(f"{slug:<22}{m['metric']:<36}{m['value']:>10.4g}{m['direction'] + ' ' + format(m['target'], 'g'):>12}"
                  f"{'yes' if m['passed'] else 'NO':>5}{record['wall_seconds']:>9.0f}"
                  f"{'' if est is None else format(est, '.0f'):>12}")
    print("The full runs are in runs/full/ (commit them); `fasttrain book` shows them.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
