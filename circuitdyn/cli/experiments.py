"""``circuitdyn replicate`` (the paper's validation experiment) and ``circuitdyn pretrain`` (the
embedded model from scratch)."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from circuitdyn.cli.common import CliError, check_writable
from circuitdyn.pretrain import pretrain
from circuitdyn.replicate import replicate


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replicate",
        help="replicate the validation experiment of arXiv 2502.06106 (disagreement)",
        description="Circuit-tuning and its baselines on subject-verb disagreement, several "
        "seeds, with tables, figures and an HTML report. A re-run continues where it stopped.",
    )
    p.add_argument("--quick", action="store_true", help="small settings (1 seed, 30 steps)")
    p.add_argument("--out", default=Path("runs/replication"), type=Path, help="output directory")
    p.add_argument("--seeds", type=int, default=None, help="seeds per strategy (default: 3)")
    p.add_argument("--model", default="default", help="'default' or a TransformerLens name")
    p.add_argument("--data", default=None, help="the paper's sv-jsonl file (for real models)")
    p.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes"
    )
    p.add_argument("--figures", default=None, type=Path, help="figures (default: OUT/figures)")
    p.add_argument(
        "--png", action=argparse.BooleanOptionalAction, default=None, help="also write PNGs"
    )
    p.set_defaults(func=_replicate)

    p = subparsers.add_parser(
        "pretrain",
        help="pretrain the embedded agreement-language model from scratch",
        description="Train the embedded model's architecture on the agreement language from a "
        "seeded random initialisation and save it with its tokenizer and held-out metrics.",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weights and data seed (default: 0)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default: 3000)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per step (default: 64)")
    p.add_argument(
        "--lr", type=float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)"
    )
    p.add_argument(
        "--n-eval", type=int, default=2000, help="held-out sentence pairs measured (default: 2000)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the accelerator)")
    p.set_defaults(func=_pretrain)


def _replicate(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise CliError("--workers must be >= 1")
    check_writable(args.out)
    args.resume_hint = "run the same command again to continue where it stopped"
    options = ("quick", "seeds", "model", "data", "workers", "png", "figures")
    result = replicate(args.out, **{name: getattr(args, name) for name in options})
    print((args.out / "summary.md").read_text())
    print(f"done in {result['wall_time_s']:.0f} s; report: {result['report']}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    check_writable(args.out)
    # Tiny models train faster on one thread than on several contending ones; record the
    # setting when the caller chose it, so that the command reproduces the run.
    threads = os.environ.get("OMP_NUM_THREADS")
    command = f"OMP_NUM_THREADS={threads} " if threads else ""
    argv = ["circuitdyn", "pretrain", "--out", str(args.out), "--seed", str(args.seed)]
    argv += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    command += shlex.join([*argv, "--lr", str(args.lr), "--n-eval", str(args.n_eval)])
    options = ("seed", "steps", "batch_size", "lr", "n_eval", "device")
    pretrain(args.out, command=command, **{name: getattr(args, name) for name in options})
    return 0
