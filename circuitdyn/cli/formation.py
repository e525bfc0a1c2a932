"""``circuitdyn track``: the circuit of each of a series of saved checkpoints, into one run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from circuitdyn.activations import ABLATIONS
from circuitdyn.attribution import METHODS
from circuitdyn.cli.common import (
    CliError,
    add_data_options,
    check_output_dir,
    choices_help,
    task_options,
)
from circuitdyn.recorder import track_checkpoints
from circuitdyn.selection import SELECTIONS
from circuitdyn.tasks import TASKS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "track",
        help="record the circuit of each of a series of saved checkpoints",
        description="Attribute the task on a fixed held-out probe set at each checkpoint of one "
        "training run (model directories in circuitdyn or Hugging Face format, or quoted glob "
        "patterns such as 'run/models/step_*'), select the circuit and evaluate it, and write "
        "the series as a run directory for analyze and report. The step of a checkpoint is "
        "read from its name (step_100, checkpoint-100, ...) or given with --steps.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="directories or globs")
    p.add_argument("--out", required=True, type=Path, help="the run directory to write")
    p.add_argument(
        "--steps",
        nargs="+",
        default=None,
        help="the training step of each checkpoint, in order (e.g. 0,100,200 or 0 100 200)",
    )
    p.add_argument(
        "--task", default="agreement", choices=TASKS.names(), help="(default: agreement)"
    )
    add_data_options(p)
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the task's constructor, e.g. n_dev=64 (JSON values); repeatable",
    )
    p.add_argument("--top-n", type=int, default=40, help="circuit size (default: 40)")
    p.add_argument(
        "--selection",
        default="top_edges",
        choices=SELECTIONS.names(),
        help=choices_help(SELECTIONS),
    )
    p.add_argument("--method", default="eap", choices=METHODS.names(), help=choices_help(METHODS))
    p.add_argument(
        "--ablation",
        default=None,
        choices=ABLATIONS.names(),
        help="what removed edges carry (default: the task's)",
    )
    p.add_argument("--n-probe", type=int, default=32, help="probe examples (default: 32)")
    p.add_argument("--batch-size", type=int, default=64, help="probe batch size (default: 64)")
    p.add_argument("--mlp-blocks", type=int, default=1, help="MLP nodes per layer (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task's data (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the accelerator)")
    p.add_argument("--resume", action="store_true", help="continue, skipping recorded steps")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run")
    p.set_defaults(func=_track)


def _steps(values: list[str] | None) -> list[int] | None:
    if values is None:
        return None
    parts = [part for value in values for part in value.split(",") if part.strip()]
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise CliError(f"--steps takes whole numbers, got {' '.join(values)}") from None


def _task_options(args: argparse.Namespace) -> dict[str, Any]:
    options = task_options(args)
    for item in args.task_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--task-option {item}: give KEY=VALUE, e.g. n_dev=64")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _track(args: argparse.Namespace) -> int:
    check_output_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    args.resume_hint = "run the same command with --resume to continue"
    options = {
        "task": args.task,
        "task_options": _task_options(args),
        "top_n": args.top_n,
        "selection": args.selection,
        "method": args.method,
        "ablation": args.ablation,
        "n_eval": args.n_probe,
        "batch_size": args.batch_size,
        "mlp_blocks": args.mlp_blocks,
        "seed": args.seed,
    }
    store = track_checkpoints(
        args.checkpoints,
        args.out,
        steps=_steps(args.steps),
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        progress=True,
        **options,
    )
    evals = store.evals_frame()
    last = evals.iloc[-1]
    print(
        f"recorded {len(store.steps)} checkpoints (steps {store.steps[0]}..{store.steps[-1]}) "
        f"-> {args.out}; last: accuracy {last['dev_accuracy']:.3f}, faithfulness "
        f"{last['faithfulness']:.3f}"
    )
    return 0
