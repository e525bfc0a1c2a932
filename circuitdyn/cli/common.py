"""What several commands share: one-line errors, output checks, model / task / data options."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from circuitdyn.activations import ABLATIONS
from circuitdyn.distributed import BACKENDS, DEFAULT_TIMEOUT_S, DistContext
from circuitdyn.models import load_model
from circuitdyn.registry import Registry
from circuitdyn.tasks import TASKS, Batch, Task, load_task
from circuitdyn.tasks.base import take_examples
from circuitdyn.tasks.sv_jsonl import MAX_BAD_FRACTION
from circuitdyn.tuning import data_notes

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


def add_distributed_options(parser: argparse.ArgumentParser) -> None:
    """Options that matter only under ``torchrun --nproc-per-node N`` (ignored otherwise)."""
    group = parser.add_argument_group("under torchrun")
    group.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="torch.distributed backend (default: auto = nccl with CUDA, else gloo)",
    )
    group.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds a process waits for the others before failing instead of hanging "
        f"(default: {DEFAULT_TIMEOUT_S:g})",
    )


@contextmanager
def distributed_context(args: argparse.Namespace) -> Iterator[DistContext]:
    """The torchrun job this command runs in (the single process outside torchrun); the
    process group is left at the end, also after an error."""
    dist = DistContext.from_environment(args.backend, args.dist_timeout)
    try:
        yield dist
    finally:
        dist.close()


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
    add_data_options(parser)
    parser.add_argument(
        "--mlp-blocks",
        type=int,
        default=1,
        help="MLP nodes per layer: each MLP split into this many neuron blocks (default: 1)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the accelerator)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order (default: 0)")


def add_data_options(parser: argparse.ArgumentParser, *, general: bool = False) -> None:
    """The options of file-based tasks (sv-jsonl): they become the task's constructor options."""
    group = parser.add_argument_group("data files (sv-jsonl)")
    group.add_argument("--data", default=None, help="the task's data file")
    group.add_argument(
        "--strict",
        action="store_true",
        help="refuse the file on its first unusable row (default: skip such rows, with a summary)",
    )
    group.add_argument(
        "--max-bad-fraction",
        type=float,
        default=MAX_BAD_FRACTION,
        help=f"refuse the file when more than this share of its rows is unusable "
        f"(default: {MAX_BAD_FRACTION})",
    )
    group.add_argument(
        "--prepend-bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepend the tokenizer's BOS token (the paper does not; default: the model's)",
    )
    if general:
        group.add_argument(
            "--general-data",
            default=None,
            help="text file (one passage per line) whose held-out LM loss measures general "
            "capability (default: the non-verb tokens of the held-out rows)",
        )


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The task constructor's options given by the data options."""
    spec = TASKS[args.task]
    general_data = getattr(args, "general_data", None)
    if spec.needs_data and args.data is None:
        raise CliError(f"task {args.task} reads a file: give --data FILE")
    if not spec.needs_data and (args.data is not None or general_data is not None):
        raise CliError(
            f"task {args.task} takes no --data / --general-data file; drop it or use --task sv-jsonl"
        )
    if args.data is None:
        return {}
    for flag, path in (("--data", args.data), ("--general-data", general_data)):
        if path is not None and not Path(path).is_file():
            raise CliError(f"{flag} {path}: no such file")
    options: dict[str, Any] = {"path": args.data, "max_bad_fraction": args.max_bad_fraction}
    if args.strict:
        options["strict"] = True
    if args.prepend_bos is not None:
        options["prepend_bos"] = args.prepend_bos
    if general_data is not None:
        options["general_data"] = general_data
    return options


def ablation_of(args: argparse.Namespace) -> str:
    """--ablation, or the task's default ablation."""
    return args.ablation or TASKS[args.task].default_ablation


def model_and_task(args: argparse.Namespace, **load: Any) -> tuple[Any, Task]:
    """The model and the task, with corrupted twins when the ablation needs them."""
    options = task_options(args)
    model = load_model(args.model, device=args.device, **load)
    ablation = ablation_of(args)
    task = load_task(
        args.task, model, seed=args.seed, twins=ABLATIONS[ablation].needs_corrupted, **options
    )
    data_notes(task, ablation)  # warns about skipped rows' effects and blind read positions
    return model, task


def examples(task: Task, split: str, n: int, batch_size: int, seed: int) -> list[Batch]:
    """The first `n` examples of a split, in batches."""
    if n < 1 or batch_size < 1:
        raise CliError("--n-examples and --batch-size must be >= 1")
    return list(take_examples(task.batches(split, batch_size, seed=seed), n))
