"""``circuitdyn analyze`` (the tables of one run) and ``circuitdyn report`` (an HTML page of one
or more runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from circuitdyn.analysis.pipeline import analyze_run, write_tables
from circuitdyn.cli.common import CliError, check_writable
from circuitdyn.report import build_report
from circuitdyn.store import RunStore


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="write the analysis tables of a run (CSV, JSON)",
        description="Compute circuit dynamics, edge trends, phase comparisons, head roles and "
        "weight change of a recorded run and write them as CSV files plus summary.json.",
    )
    p.add_argument("run_dir", type=Path, help="run directory written by `circuitdyn tune`")
    p.add_argument("--out", default=None, type=Path, help="default: RUN_DIR_analysis beside it")
    _shared_options(p)
    p.add_argument("--figures", action="store_true", help="also write every figure")
    p.set_defaults(func=_analyze)

    p = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of one or more runs",
        description="One HTML page (plotly.js embedded, works offline) with the key numbers and "
        "the figures of one run, or a comparison of several runs.",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories")
    p.add_argument("--out", default=Path("report.html"), type=Path, help="(default: report.html)")
    p.add_argument("--title", default=None, help="page title")
    _shared_options(p)
    p.set_defaults(func=_report)


def _shared_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-model", action="store_true", help="skip head roles and weight change (no model)"
    )
    p.add_argument("--top-k", type=int, default=10, help="edges in trajectories (default: 10)")
    p.add_argument("--examples", type=int, default=64, help="examples for head roles (default: 64)")
    p.add_argument(
        "--max-checkpoints", type=int, default=40, help="checkpoints for head roles (default: 40)"
    )


def _open(run_dir: Path) -> RunStore:
    if not (run_dir / "manifest.json").is_file():
        raise CliError(f"{run_dir} is not a run directory (no manifest.json); make one with tune")
    return RunStore.open(run_dir)


def _analyze(args: argparse.Namespace) -> int:
    out = args.out or args.run_dir.parent / f"{args.run_dir.name}_analysis"
    check_writable(out)
    result = analyze_run(
        _open(args.run_dir),
        model=not args.no_model,
        top_k=args.top_k,
        n_examples=args.examples,
        max_checkpoints=args.max_checkpoints,
        progress=True,
    )
    written = write_tables(result, out, figures=args.figures, progress=True)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {len(written)} files to {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    check_writable(args.out)
    for run_dir in args.run_dirs:
        _open(run_dir)
    path = build_report(
        args.run_dirs,
        args.out,
        model=not args.no_model,
        title=args.title,
        top_k=args.top_k,
        n_examples=args.examples,
        max_checkpoints=args.max_checkpoints,
        progress=True,
    )
    print(f"wrote {path}")
    return 0
