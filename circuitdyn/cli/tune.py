"""``circuitdyn tune``: its options are generated from `TuningConfig`'s fields (help, choices and
defaults included), so every field can be set from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from circuitdyn.cli.common import (
    add_data_options,
    add_distributed_options,
    check_output_dir,
    choices_help,
    distributed_context,
    task_options,
    with_default,
)
from circuitdyn.config import TuningConfig
from circuitdyn.registry import Registry
from circuitdyn.tuning import tune

_SHORT = {"research_every": ["-K"]}
_NOT_OPTIONS = {"task_options"}  # set by --data / --strict


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per `TuningConfig` field, ``--top-n`` for ``top_n``."""
    for f in dataclasses.fields(TuningConfig):
        if f.name in _NOT_OPTIONS:
            continue
        default = f.default
        flags = [*_SHORT.get(f.name, []), "--" + f.name.replace("_", "-")]
        help_text = f.metadata["help"]
        choices = f.metadata.get("choices")
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type.startswith("tuple[float"):
            kwargs.update(type=float, nargs=2, metavar=("B1", "B2"))
            default = " ".join(str(v) for v in default)
        elif f.type.endswith("| None"):
            base = {"int": int, "float": float, "str": str}[f.type.split(" |")[0]]
            if choices is None:
                kwargs.update(type=_optional(base), metavar=base.__name__.upper())
                help_text += " ('none': unset)"
            else:
                kwargs["type"] = base
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[f.type]
        if choices is not None:
            kwargs["choices"] = list(choices)
            if isinstance(choices, Registry):
                help_text += ": " + choices_help(choices)
        kwargs["help"] = with_default(help_text, default)
        parser.add_argument(*flags, **kwargs)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune",
        help="circuit-tune a model on a task with a snapshot of the circuit at every step",
        description="Circuit-tuning (arXiv 2502.06106) and its baselines; writes a run "
        "directory (manifest, per-step snapshots, metrics, dev evaluations, checkpoints).",
    )
    add_config_options(p)
    add_data_options(p, general=True)
    p.add_argument("--out", required=True, type=Path, help="run directory")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in --out")
    group.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    add_distributed_options(p)
    torchrun = next((g for g in p._action_groups if g.title == "under torchrun"), p)
    torchrun.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model over the processes with FSDP2 instead of replicating it (DDP): "
        "each holds 1/N of the weights, gradients and optimizer state; checkpoints stay full, "
        "so a run resumes with or without it (needs torchrun; not with --strategy lora)",
    )
    p.set_defaults(func=_tune)


def config_from_args(args: argparse.Namespace) -> TuningConfig:
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TuningConfig)
        if f.name not in _NOT_OPTIONS
    }
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}  # nargs=2
    return TuningConfig(**values, task_options=task_options(args))


def _tune(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    command = [a for a in _argv(args) if a not in ("--overwrite", "--resume")]
    args.resume_hint = f"continue with: circuitdyn tune {shlex.join(command)} --resume"
    with distributed_context(args) as dist:
        dist.on_main(
            lambda: check_output_dir(args.out, resume=args.resume, overwrite=args.overwrite)
        )
        summary = tune(
            config,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            dist=dist,
            fsdp=args.fsdp,
        )
        if dist.is_main:
            print(summary.line())
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces `args` (every option spelled out)."""
    out: list[str] = []
    for f in dataclasses.fields(TuningConfig):
        if f.name in _NOT_OPTIONS:
            continue
        flag, value = "--" + f.name.replace("_", "-"), getattr(args, f.name)
        if value is None and f.metadata.get("choices") is not None:
            continue  # resolved by the config (the task's default)
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list | tuple):
            out += [flag, *map(str, value)]
        else:
            out += [flag, "none" if value is None else str(value)]
    if args.data:
        out += ["--data", args.data, "--max-bad-fraction", str(args.max_bad_fraction)]
    if args.strict:
        out.append("--strict")
    if args.prepend_bos is not None:
        out.append("--prepend-bos" if args.prepend_bos else "--no-prepend-bos")
    if args.general_data:
        out += ["--general-data", args.general_data]
    if getattr(args, "fsdp", False):
        out.append("--fsdp")
    return [*out, "--out", str(args.out)]
