"""What several commands share: one-line errors, output checks, model / task / data options."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from circuitdyn.models import load_model
from circuitdyn.registry import Registry
from circuitdyn.tasks import TASKS, Batch, Task, load_task
from circuitdyn.tasks.base import take_examples

# Exceptions that report a problem with the user's input, files or environment: shown as one
# line. ValueError covers StoreError, UnsupportedModelError and bad options; OSError covers
# missing, existing and read-only paths (FileNotFoundError, FileExistsError, PermissionError).
UserErrors: tuple[type[BaseException], ...] = (ValueError, OSError)


class CliError(Exception):
    """A problem with the command line itself; the message says what to do instead."""


def one_line(error: BaseException) -> str:
    """The error's message on one line."""
    text = str(error) or type(error).__name__
    if isinstance(error, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def with_default(help: str, default: Any) -> str:
    return f"{help} (default: {'none' if default is None else default})"


def choices_help(registry: Registry[Any]) -> str:
    return "; ".join(f"{name}: {registry.help(name)}" for name in registry)


def check_output_dir(path: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Before any computing: an existing run needs --resume or --overwrite, and the directory
    (or the nearest existing folder above it) must be writable."""
    if path.exists() and not path.is_dir():
        raise CliError(f"--out {path} is a file; give a directory")
    if path.is_dir() and any(path.iterdir()) and not (resume or overwrite):
        raise CliError(f"--out {path} already holds a run; use --resume or --overwrite")
    check_writable(path)


def check_writable(path: Path) -> None:
    """CliError unless files can be created at `path` (a file or directory to be written),
    tried by creating and removing a probe file in the nearest existing folder, so that a
    read-only place fails before any computing."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    folder = existing if existing.is_dir() else existing.parent
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".circuitdyn-probe-"):
            pass
    except OSError as error:
        raise CliError(
            f"cannot write to {path}: {folder} is not writable ({error.strerror}); "
            "choose another --out"
        ) from None


def add_model_options(parser: argparse.ArgumentParser, *, task: str) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (the embedded model), a TransformerLens name or a model directory "
        "(default: default)",
    )
    parser.add_argument(
        "--task",
        default=task,
        choices=TASKS.names(),
        help=f"{choices_help(TASKS)} (default: {task})",
    )
    parser.add_argument("--data", default=None, help="data file of file-based tasks (sv-jsonl)")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse a data file on its first bad row (default: skip bad rows with a warning)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the accelerator)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order (default: 0)")


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The task constructor's options given by --data / --strict."""
    spec = TASKS[args.task]
    if spec.needs_data and args.data is None:
        raise CliError(f"task {args.task} reads a file: give --data FILE")
    if not spec.needs_data and args.data is not None:
        raise CliError(f"task {args.task} takes no --data file; drop --data or use --task sv-jsonl")
    if args.data is None:
        return {}
    if not Path(args.data).is_file():
        raise CliError(f"--data {args.data}: no such file")
    return {"path": args.data, "strict": args.strict}


def model_and_task(args: argparse.Namespace, **load: Any) -> tuple[Any, Task]:
    options = task_options(args)
    model = load_model(args.model, device=args.device, **load)
    return model, load_task(args.task, model, seed=args.seed, **options)


def examples(task: Task, split: str, n: int, batch_size: int, seed: int) -> list[Batch]:
    """The first `n` examples of a split, in batches."""
    if n < 1 or batch_size < 1:
        raise CliError("--n-examples and --batch-size must be >= 1")
    return list(take_examples(task.batches(split, batch_size, seed=seed), n))
