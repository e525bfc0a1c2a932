"""``circuitdyn attribute`` (score every edge) and ``circuitdyn evaluate`` (faithfulness curve of
a scores file)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from circuitdyn.activations import ABLATIONS, mean_activations
from circuitdyn.attribution import METHODS, attribute
from circuitdyn.cli.common import (
    CliError,
    ablation_of,
    add_distributed_options,
    add_model_options,
    check_writable,
    choices_help,
    distributed_context,
    examples,
    model_and_task,
)
from circuitdyn.distributed import DistContext, fail
from circuitdyn.evaluate import MIB_GRID, cmd, cpr, faithfulness_curve
from circuitdyn.graph import Graph
from circuitdyn.memory import examples_per_chunk, parse_bytes
from circuitdyn.scores import Scores
from circuitdyn.selection import SELECTIONS
from circuitdyn.tasks import Task


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "attribute",
        help="score every edge of a model's graph on a task (EAP, EAP-IG, exact)",
        description="Score every edge on a task and write the scores as JSON (EAP-IG/MIB "
        "fields) or safetensors (by the --out suffix).",
    )
    add_model_options(p, task="agreement")
    _ablation_options(p)
    p.add_argument("--method", default="eap", choices=METHODS.names(), help=choices_help(METHODS))
    p.add_argument("--steps", type=int, default=5, help="integrated-gradient steps (default: 5)")
    p.add_argument("--split", default="dev", help="split to attribute on (default: dev)")
    p.add_argument("--n-examples", type=int, default=64, help="examples (default: 64)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    p.add_argument(
        "--memory-budget",
        default=None,
        metavar="SIZE",
        help="peak memory attribution may use, parameters included, e.g. 40GB, 512MB, 16GiB or "
        "bytes: each batch is scored in chunks of examples that fit (same scores) "
        "(default: no limit)",
    )
    p.add_argument(
        "--diff-dtype",
        default=None,
        choices=sorted(DIFF_DTYPES),
        help="dtype of the stored activation differences; scores still accumulate in float32 "
        "(default: float32, float64 for float64 models)",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output: .json (EAP-IG / MIB graph JSON), .pt (EAP-IG) or .safetensors",
    )
    add_distributed_options(p)
    p.set_defaults(func=_attribute)

    p = subparsers.add_parser(
        "evaluate",
        help="faithfulness curve (and CPR / CMD) of an edge-scores file on a task",
        description="Select circuits of growing size from edge scores (MIB's grid of edge "
        "fractions), run the model with only each circuit's edges, and report faithfulness "
        "(m(C) - m(empty)) / (m(full) - m(empty)) per size, with CPR and CMD.",
    )
    p.add_argument(
        "--scores",
        required=True,
        type=Path,
        help="scores file: .json or .pt (circuitdyn, EAP-IG, MIB) or .safetensors",
    )
    add_model_options(p, task="agreement")
    _ablation_options(p)
    p.add_argument("--n-examples", type=int, default=256, help="examples (default: 256)")
    p.add_argument("--split", default="test", help="split to evaluate on (default: test)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    p.add_argument(
        "--selection",
        default="top_edges",
        choices=SELECTIONS.names(),
        help=choices_help(SELECTIONS),
    )
    p.add_argument("--signed", action="store_true", help="rank by signed score, not |score|")
    p.add_argument("--no-prune", action="store_true", help="do not prune dangling nodes")
    p.add_argument(
        "--fractions", type=float, nargs="+", default=list(MIB_GRID), help="(default: MIB's grid)"
    )
    p.add_argument("--dtype", default=None, help="model dtype, e.g. float32 (default: saved)")
    p.add_argument("--out", type=Path, default=None, help="write the curve, CPR and CMD as JSON")
    p.set_defaults(func=_evaluate)


DIFF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ablation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ablation",
        default=None,
        choices=ABLATIONS.names(),
        help=f"{choices_help(ABLATIONS)} (default: the task's: mean for sv-jsonl, else corrupted)",
    )


def _means(
    args: argparse.Namespace, model: HookedTransformer, graph: Graph, task: Task
) -> Tensor | None:
    """Mean ablation averages over the train split, never over the scored examples."""
    if not ABLATIONS[ablation_of(args)].needs_means:
        return None
    reference = examples(task, "train", args.n_examples, args.batch_size, args.seed)
    return mean_activations(model, graph, reference)


def _read_scores(path: Path) -> Scores:
    """circuitdyn or EAP-IG scores: .json (EAP-IG / MIB), .pt (EAP-IG) or .safetensors."""
    readers = {".json": Scores.from_json, ".pt": Scores.from_pt, ".safetensors": Scores.load}
    if path.suffix not in readers:
        raise CliError(f"--scores {path}: use a .json, .pt or .safetensors file")
    return readers[path.suffix](path)


def _attribute(args: argparse.Namespace) -> int:
    with distributed_context(args) as dist:
        dist.on_main(lambda: check_writable(args.out))
        return _attribute_on(args, dist)


def _attribute_on(args: argparse.Namespace, dist: DistContext) -> int:
    """`circuitdyn attribute` on this process; under torchrun each rank scores every
    world_size-th batch and the summed scores are all-reduced (rank 0 writes)."""
    budget = None
    if args.memory_budget is not None:
        try:
            budget = parse_bytes(args.memory_budget)
        except ValueError as error:
            raise CliError(f"--memory-budget: {error}") from None
    torch.manual_seed(args.seed)
    if dist.device is not None:  # under torchrun each rank uses its own device
        args.device = str(dist.device)
    model, task = model_and_task(args)
    graph = Graph.from_model(model, args.mlp_blocks)
    data = examples(task, args.split, args.n_examples, args.batch_size, args.seed)
    if len(data) < dist.world_size:
        raise fail(
            f"--n-examples {args.n_examples} in batches of {args.batch_size} gives {len(data)} "
            f"batch(es) for {dist.world_size} processes; use more examples or a smaller "
            "--batch-size"
        )
    diff_dtype = None if args.diff_dtype is None else DIFF_DTYPES[args.diff_dtype]
    if budget is not None:  # a budget too small for one example fails before any computing
        longest = max(batch.clean.shape[1] for batch in data)
        options = dict(method=args.method, ablation=ablation_of(args))
        examples_per_chunk(model, graph, longest, budget, diff_dtype, **options)
    scores = attribute(
        model,
        graph,
        data[dist.rank :: dist.world_size],
        task.metric,
        method=args.method,
        ablation=ablation_of(args),
        steps=args.steps,
        means=_means(args, model, graph, task),
        progress=True,
        memory_budget=budget,
        diff_dtype=diff_dtype,
    )
    scores = dist.mean_scores(scores)
    scores.meta.update(model=args.model, task=args.task, split=args.split, seed=args.seed)
    if not dist.is_main:
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    writers = {".safetensors": scores.save, ".pt": scores.to_pt}
    writers.get(args.out.suffix, scores.to_json)(args.out)
    flat = scores.flat()
    print(f"scored {graph.n_edges} edges on {scores.meta['n_examples']} examples -> {args.out}")
    for index in flat.abs().argsort(descending=True)[:5].tolist():
        print(f"  {graph.edge_names[index]:>24}  {float(flat[index]):+.4f}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_writable(args.out)
    if not args.scores.is_file():
        raise CliError(f"--scores {args.scores}: no such file (make one with circuitdyn attribute)")
    scores = _read_scores(args.scores)
    model, task = model_and_task(args, dtype=args.dtype)
    graph = Graph.from_model(model, scores.graph.mlp_blocks)
    if scores.graph != graph:
        raise CliError(f"{args.scores} scores a graph {scores.graph}, but {args.model} has {graph}")
    curve = faithfulness_curve(
        model,
        graph,
        scores,
        examples(task, args.split, args.n_examples, args.batch_size, args.seed),
        task.metric,
        ablation=ablation_of(args),
        fractions=args.fractions,
        selection=args.selection,
        absolute=not args.signed,
        prune=not args.no_prune,
        means=_means(args, model, graph, task),
    )
    area, distance = cpr(curve), cmd(curve)
    attrs = curve.attrs
    print(
        f"{args.task} on {args.model}: {attrs['n_examples']} examples ({args.split}), "
        f"{ablation_of(args)} ablation, {args.selection}; m(full) = {attrs['m_full']:.4f}, "
        f"m(empty) = {attrs['m_empty']:.4f}"
    )
    print(curve.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"CPR = {area:.4f}  CMD = {distance:.4f}")
    if args.out is not None:
        payload = {
            "scores": str(args.scores),
            "model": args.model,
            "task": args.task,
            "data": args.data,
            "split": args.split,
            **attrs,
            "cpr": area,
            "cmd": distance,
            "curve": curve.to_dict(orient="records"),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
