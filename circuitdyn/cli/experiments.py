"""``circuitdyn replicate`` (the paper's validation experiment) and ``circuitdyn pretrain`` (the
embedded model from scratch)."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from circuitdyn.activations import ABLATIONS
from circuitdyn.attribution import METHODS
from circuitdyn.cli.common import CliError, check_output_dir, check_writable, choices_help
from circuitdyn.pretrain import pretrain
from circuitdyn.replicate import replicate
from circuitdyn.selection import SELECTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replicate",
        help="replicate the validation experiment of arXiv 2502.06106 (disagreement)",
        description="Circuit-tuning and its baselines on subject-verb disagreement, several "
        "seeds, with tables, figures and an HTML report. A re-run continues where it stopped.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="small settings (1 seed, 2 rates, 24 steps)"
    )
    size.add_argument(
        "--full",
        action="store_true",
        help="the default protocol plus the top-n and K sweeps of circuit-tuning (seed 0)",
    )
    p.add_argument("--out", default=Path("runs/replication"), type=Path, help="output directory")
    p.add_argument(
        "--seeds", type=int, default=None, help="seeds per arm and rate (default: 5; --quick: 1)"
    )
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
        "seeded random initialisation and save it with its tokenizer and held-out metrics. With "
        "--record-every K the agreement circuit is recorded every K steps: OUT is then a run "
        "directory (for analyze / report) and the model goes to OUT/model, with the same "
        "weights as without recording.",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weights and data seed (default: 0)")
    p.add_argument("--steps", type=int, default=10_000, help="optimizer steps (default: 10000)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per step (default: 64)")
    p.add_argument(
        "--lr", type=float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)"
    )
    p.add_argument(
        "--n-eval", type=int, default=2000, help="held-out sentence pairs measured (default: 2000)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the accelerator)")
    p.add_argument(
        "--save-every",
        type=int,
        default=None,
        help="also save the model every N steps as OUT/models/step_<N> (for `circuitdyn track`)",
    )
    group = p.add_argument_group("recording the circuit while it forms")
    group.add_argument(
        "--record-every", type=int, default=None, help="record the circuit every K steps"
    )
    group.add_argument("--top-n", type=int, default=40, help="circuit size (default: 40)")
    group.add_argument(
        "--selection",
        default="top_edges",
        choices=SELECTIONS.names(),
        help=choices_help(SELECTIONS),
    )
    group.add_argument(
        "--method", default="eap", choices=METHODS.names(), help=choices_help(METHODS)
    )
    group.add_argument(
        "--ablation", default=None, choices=ABLATIONS.names(), help="default: corrupted"
    )
    group.add_argument(
        "--n-probe", type=int, default=32, help="held-out probe examples (default: 32)"
    )
    group.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="resumable checkpoints in OUT every N steps (default: 500)",
    )
    group.add_argument("--resume", action="store_true", help="continue a killed recording run")
    group.add_argument("--overwrite", action="store_true", help="replace an existing run")
    p.set_defaults(func=_pretrain)


def _replicate(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise CliError("--workers must be >= 1")
    check_writable(args.out)
    args.resume_hint = "run the same command again to continue where it stopped"
    options = ("quick", "full", "seeds", "model", "data", "workers", "png", "figures")
    result = replicate(args.out, **{name: getattr(args, name) for name in options})
    print((args.out / "summary.md").read_text())
    print(f"done in {result['wall_time_s']:.0f} s; report: {result['report']}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    recording = args.record_every is not None
    if recording:
        check_output_dir(args.out, resume=args.resume, overwrite=args.overwrite)
        args.resume_hint = "run the same command with --resume to continue"
    else:
        if args.resume or args.overwrite:
            raise CliError("--resume and --overwrite apply to recording runs: add --record-every")
        check_writable(args.out)
    # Tiny models train faster on one thread than on several contending ones; record the
    # setting when the caller chose it, so that the command reproduces the run.
    threads = os.environ.get("OMP_NUM_THREADS")
    command = f"OMP_NUM_THREADS={threads} " if threads else ""
    argv = ["circuitdyn", "pretrain", "--out", str(args.out), "--seed", str(args.seed)]
    argv += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    argv += ["--lr", str(args.lr), "--n-eval", str(args.n_eval)]
    options = ("seed", "steps", "batch_size", "lr", "n_eval", "device", "save_every")
    kwargs = {name: getattr(args, name) for name in options}
    if recording:
        argv += ["--record-every", str(args.record_every), "--top-n", str(args.top_n)]
        argv += ["--selection", args.selection, "--method", args.method]
        argv += ["--ablation", args.ablation] if args.ablation else []
        argv += ["--n-probe", str(args.n_probe)]
        record = {"top_n": args.top_n, "selection": args.selection, "method": args.method}
        record.update(ablation=args.ablation, n_eval=args.n_probe)
        kwargs.update(
            record_every=args.record_every,
            record=record,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    pretrain(args.out, command=command + shlex.join(argv), **kwargs)
    if recording:
        print(f"model: {args.out / 'model'}; circuits: circuitdyn report {args.out}")
    return 0
