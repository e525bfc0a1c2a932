"""The validation experiment of "Fine-Tuning is Subgraph Search" (arXiv 2502.06106), end to end.

1. The *agreement* circuit of the model before tuning: EAP-IG scores on the agreement task,
   its top-n circuit, and its faithfulness curve (MIB grid) with CPR and CMD.
2. Circuit-tuning to subject-verb *disagreement*, a snapshot of the circuit at every step.
3. Baselines with the same budget (steps, batches): full fine-tuning at two learning rates, the
   fixed step-0 circuit, a random circuit with the same number of tunable parameters.
4. A top-n sweep (intrinsic dimension) and a sweep of K (how often the circuit is re-searched).
5. Analyses and figures, the overlap of the agreement and the disagreement circuits, head roles.
6. A summary (Markdown + JSON): per strategy, mean +- std over seeds.

Runs are independent processes (two at a time on two cores, one torch thread each) writing
`RunStore`s under ``OUT/runs``; a killed replication resumes: finished runs are kept,
unfinished ones resume from their last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from circuitdyn import analysis as A
from circuitdyn import plots
from circuitdyn.activations import ABLATIONS, mean_activations
from circuitdyn.analysis import compare as compare_analysis
from circuitdyn.analysis import pipeline as analysis_pipeline
from circuitdyn.attribution import attribute
from circuitdyn.circuit import Circuit
from circuitdyn.config import TuningConfig
from circuitdyn.evaluate import cmd, cpr, faithfulness_curve
from circuitdyn.graph import Graph
from circuitdyn.models import load_model
from circuitdyn.report import build_report
from circuitdyn.selection import select
from circuitdyn.store import RunStore
from circuitdyn.tasks import TASKS, load_task
from circuitdyn.tasks.base import take_examples
from circuitdyn.tuning import tune


@dataclass(frozen=True)
class Protocol:
    """Settings of one replication."""

    seeds: int = 3
    steps: int = 150
    batch_size: int = 16
    top_n: int = 40  # edges of the circuit (the default model has 262)
    lr: float = 1e-3  # circuit, fixed and random circuits
    full_lrs: tuple[float, ...] = (1e-3, 1e-4)
    sweep_n: tuple[int, ...] = (5, 10, 20, 80, 160)  # plus top_n
    sweep_k: tuple[int, ...] = (4, 16)  # plus K = 1
    eval_every: int = 5
    n_eval: int = 256
    n_train: int = 2000
    n_dev: int = 256
    n_test: int = 512
    n_attribution: int = 256  # examples for the agreement circuit
    ig_steps: int = 5
    checkpoint_every: int = 10  # head roles are measured at every checkpoint


DEFAULT = Protocol()
QUICK = Protocol(
    seeds=1,
    steps=30,
    sweep_n=(10,),
    sweep_k=(4,),
    eval_every=5,
    n_eval=64,
    n_train=480,
    n_dev=64,
    n_test=128,
    n_attribution=64,
    checkpoint_every=10,
)


def _label(
    strategy: str, lr: float | None = None, n: int | None = None, k: int | None = None
) -> str:
    label = strategy
    if lr is not None:
        label += f"-lr{lr:g}"
    if n is not None:
        label += f"-n{n}"
    if k is not None:
        label += f"-K{k}"
    return label


def run_plan(
    protocol: Protocol, model: str, task: str, task_options: dict
) -> dict[str, TuningConfig]:
    """Every tuning run of the replication, by directory name (``<label>_s<seed>``)."""
    p = protocol
    base = TuningConfig(
        model=model,
        task=task,
        task_options=task_options,
        top_n=p.top_n,
        steps=p.steps,
        batch_size=p.batch_size,
        lr=p.lr,
        eval_every=p.eval_every,
        n_eval=p.n_eval,
        checkpoint_every=p.checkpoint_every,
        record_every=1,
    )
    plan: dict[str, TuningConfig] = {}
    for seed in range(p.seeds):
        runs = {
            "circuit": replace(base, strategy="circuit"),
            "fixed": replace(base, strategy="fixed"),
            "random": replace(base, strategy="random"),
        }
        for lr in p.full_lrs:
            runs[_label("full", lr=lr)] = replace(base, strategy="full", lr=lr)
        if seed == 0:
            for n in p.sweep_n:
                runs[_label("circuit", n=n)] = replace(base, top_n=n)
            for k in p.sweep_k:
                runs[_label("circuit", k=k)] = replace(base, research_every=k)
        for label, config in runs.items():
            plan[f"{label}_s{seed}"] = replace(config, seed=seed)
    return plan


def _finished(directory: Path, steps: int) -> bool:
    try:
        evals = RunStore.open(directory).evals_frame()
    except (FileNotFoundError, ValueError):
        return False
    return "test_metric" in evals and bool((evals["step"] == steps).any())


def _tune_in_worker(config: dict[str, Any], out: str) -> str:
    # One torch thread per process: two small-model runs in parallel beat one run on two
    # threads, whose tiny matrix products mostly wait on each other.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    config = TuningConfig.from_dict(config)
    tune(config, out, resume=Path(out, "manifest.json").exists(), progress=False)
    return out


def run_all(plan: dict[str, TuningConfig], runs_dir: Path, workers: int, progress: bool) -> None:
    """Run (or resume) every planned run that has not finished."""
    todo = {name: c for name, c in plan.items() if not _finished(runs_dir / name, c.steps)}
    bar = tqdm(
        total=len(plan), initial=len(plan) - len(todo), desc="tuning runs", disable=not progress
    )
    if workers <= 1:
        for name, config in todo.items():
            _tune_in_worker(config.to_dict(), str(runs_dir / name))
            bar.update()
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_tune_in_worker, config.to_dict(), str(runs_dir / name))
            for name, config in todo.items()
        ]
        for future in as_completed(futures):
            future.result()
            bar.update()
    bar.close()


def agreement_circuit(
    model, task, protocol: Protocol, out: Path, ablation: str | None = None
) -> tuple[Circuit, pd.DataFrame, dict[str, float]]:
    """The agreement circuit of the untuned model, its faithfulness curve, CPR and CMD, with
    `ablation` (default: the task's)."""
    graph = Graph.from_model(model)
    data = list(
        take_examples(task.batches("dev", protocol.batch_size, seed=0), protocol.n_attribution)
    )
    test = list(
        take_examples(task.batches("test", protocol.batch_size, seed=0), protocol.n_attribution)
    )
    ablation = ablation or TASKS[task.name].default_ablation
    means = None
    if ABLATIONS[ablation].needs_means:  # averaged over the train split, never the scored data
        reference = take_examples(task.batches("train", protocol.batch_size, seed=0), 256)
        means = mean_activations(model, graph, reference)
    scores = attribute(
        model,
        graph,
        data,
        task.metric,
        method="eap-ig",
        steps=protocol.ig_steps,
        ablation=ablation,
        means=means,
    )
    circuit = select(scores, protocol.top_n, "top_edges").circuit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curve = faithfulness_curve(
            model, graph, scores, test, task.metric, ablation=ablation, means=means
        )
    numbers = {
        "cpr": cpr(curve),
        "cmd": cmd(curve),
        "n_edges": circuit.n_edges,
        "n_nodes": circuit.n_nodes,
    }
    out.mkdir(parents=True, exist_ok=True)
    scores.to_json(out / "scores.json")
    circuit.to_json(out / "circuit.json", scores)  # EAP-IG / MIB graph JSON
    curve.to_csv(out / "faithfulness_curve.csv", index=False)
    (out / "numbers.json").write_text(json.dumps(numbers, indent=2))
    return circuit, curve, numbers


def _steps_to(evals: pd.DataFrame, column: str, level: float) -> float:
    hit = evals.dropna(subset=[column])
    hit = hit[hit[column] >= level]
    return float(hit["step"].iloc[0]) if len(hit) else math.nan


def run_row(directory: Path, agreement: Circuit, n_params: int) -> dict[str, Any]:
    """The summary numbers of one finished run."""
    store = RunStore.open(directory)
    config = store.config
    evals = store.evals_frame()
    metrics = store.metrics_frame()
    tests = evals.dropna(subset=["test_metric"])
    initial, final_test = tests.iloc[0], tests.iloc[-1]  # step 0 and the final model
    last = store.snapshot(store.steps[-1])
    final_circuit = Circuit(agreement.graph, last.edge_mask)
    row = {
        "run": directory.name,
        "label": directory.name.rsplit("_s", 1)[0],
        "seed": config.seed,
        "strategy": config.strategy,
        "top_n": config.top_n,
        "K": config.research_every,
        "lr": config.lr,
        "test_accuracy": float(final_test["test_accuracy"]),
        "test_metric": float(final_test["test_metric"]),
        "general_loss_change": float(final_test.get("test_general_loss", math.nan))
        - float(initial.get("test_general_loss", math.nan)),
        "tunable_pct": 100.0 * float(metrics["n_tunable"].mean()) / n_params,
        "steps_to_90pct": _steps_to(evals, "dev_accuracy", 0.9),
        "faithfulness": float(evals.dropna(subset=["faithfulness"])["faithfulness"].iloc[-1])
        if "faithfulness" in evals and evals["faithfulness"].notna().any()
        else math.nan,
        "jaccard_nodes_agreement": final_circuit.jaccard_nodes(agreement),
        "jaccard_edges_agreement": final_circuit.jaccard_edges(agreement),
    }
    return row


SUMMARY_COLUMNS = [
    "test_accuracy",
    "test_metric",
    "general_loss_change",
    "tunable_pct",
    "steps_to_90pct",
    "jaccard_nodes_agreement",
    "jaccard_edges_agreement",
]


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of each label's numbers (the main strategies have every seed)."""
    grouped = rows.groupby("label", sort=False)[SUMMARY_COLUMNS]
    table = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=0).add_suffix("_std"))
    table["n_seeds"] = rows.groupby("label", sort=False).size()
    return table.reset_index()


def markdown_table(summary: pd.DataFrame, labels: list[str]) -> str:
    names = {
        "test_accuracy": "test disagreement acc.",
        "test_metric": "test metric (logit diff.)",
        "general_loss_change": "Δ general loss (nats)",
        "tunable_pct": "tunable params (%)",
        "steps_to_90pct": "steps to 90% (dev)",
        "jaccard_nodes_agreement": "node IoU w/ agreement circuit",
    }
    lines = [
        "| run | " + " | ".join(names.values()) + " | seeds |",
        "|---" * (len(names) + 2) + "|",
    ]
    for _, row in summary.set_index("label").loc[labels].reset_index().iterrows():
        cells = []
        for column in names:
            mean, std = row[f"{column}_mean"], row[f"{column}_std"]
            digits = 1 if column in ("tunable_pct", "steps_to_90pct") else 3
            cells.append("n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {int(row['n_seeds'])} |")
    return "\n".join(lines)


def replication_figures(
    runs_dir: Path,
    run_names: list[str],
    main_labels: list[str],
    sweep_labels: list[str],
    agreement: Circuit,
    curve: pd.DataFrame,
    faith: dict[str, float],
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """The replication's figures by file name (and the agreement / final circuit overlap table
    and the head roles of the circuit-tuning run of seed 0). Strategies with several seeds are
    drawn as the mean over seeds with a ± std band; the circuit figures are those of the
    circuit-tuning run of seed 0, with its key steps marked. ``circuit_key_steps`` (the circuit
    at the key steps, side by side) is the README's picture of the circuit's evolution."""
    label_of = {name: name.rsplit("_s", 1)[0] for name in run_names}
    every = {name: RunStore.open(runs_dir / name) for name in run_names}
    main = {name: s for name, s in every.items() if label_of[name] in main_labels}
    seed0 = {label_of[name]: s for name, s in every.items() if name.endswith("_s0")}
    store = seed0["circuit"]
    keys = A.run_key_steps(store)
    evals = A.evals_by_step(store)

    finals = compare_analysis.final_evals(main)
    finals.insert(1, "group", finals["run"].map(label_of))
    curves = compare_analysis.strategy_curves(main)
    curves.insert(1, "group", curves["run"].map(label_of))
    curves = pd.concat(
        [A.mask_near_zero(rows) for _, rows in curves.groupby("run", sort=False)],
        ignore_index=True,
    )
    sweep = compare_analysis.final_evals(
        {label: seed0[label] for label in ["circuit", *sweep_labels] if label in seed0}
    )
    dimension = compare_analysis.intrinsic_dimension(sweep[sweep["strategy"] == "circuit"])
    totals = A.step_score_totals(store)

    def with_shares(edges: pd.DataFrame) -> pd.DataFrame:
        source = edges["score_step"].astype("float")
        return edges.assign(
            share=edges["score"] / source.map(totals.set_index("step")["total_abs_score"])
        )

    key_nodes, key_edges = A.circuit_evolution(
        store, [int(s) for s in keys["snapshot_step"].dropna().unique()]
    )
    nodes, edges = A.circuit_evolution(store, max_frames=80)
    sizes = pd.concat(
        [A.circuit_sizes(s).assign(group=label_of[n], run=n) for n, s in main.items()],
        ignore_index=True,
    )
    churn = pd.concat(
        [A.churn_counts(A.churn(s)).assign(group=label_of[n], run=n) for n, s in main.items()],
        ignore_index=True,
    )
    circuit_seeds = [s for n, s in main.items() if label_of[n] == "circuit"]
    roles_over_seeds = pd.concat(
        [A.head_roles(s).assign(run=str(s.directory)) for s in circuit_seeds], ignore_index=True
    )
    roles = roles_over_seeds[roles_over_seeds["run"] == str(store.directory)].drop(columns="run")
    first, last = store.steps[0], store.steps[-1]
    figs: dict[str, Any] = {
        "agreement_faithfulness": plots.faithfulness_curve_figure(
            curve, faith["cpr"], faith["cmd"]
        ),
        "strategy_curves": plots.strategy_curves_figure(curves, "dev_metric"),
        "strategy_accuracy": plots.strategy_curves_figure(curves, "dev_accuracy"),
        "final_metrics": plots.final_metrics_bars(finals),
        "intrinsic_dimension": plots.intrinsic_dimension_figure(
            dimension.curve, saturation_n=dimension.saturation_n, threshold=dimension.threshold
        ),
        "circuit_key_steps": plots.circuit_small_multiples(
            key_nodes,
            with_shares(key_edges),
            keys,
            title="Circuit-tuning (seed 0): the circuit at the key steps",
        ),
        "circuit_animation": plots.circuit_explorer(
            nodes,
            with_shares(edges),
            keys=keys,
            step_text=A.step_descriptions(store.metrics_frame(), evals),
            title="Circuit-tuning (seed 0)",
        ),
        "circuit_diff": plots.circuit_diff_graph(
            *A.circuit_tables(store, first), *A.circuit_tables(store, last)
        ),
        "evolution_heatmap": plots.evolution_heatmap(
            A.column_shares(A.node_score_matrix(store)), kind="share", keys=keys
        ),
        "membership_raster": plots.membership_raster(A.edge_membership(store), evals, keys=keys),
        "churn": plots.churn_figure(A.churn_counts(A.churn(store)), keys=keys),
        "churn_over_seeds": plots.band_figure(
            churn,
            "jaccard_edges_prev_smoothed",
            title="Circuit churn per strategy: edge Jaccard with the previous step (smoothed)",
        ),
        "sizes_over_seeds": plots.band_figure(
            sizes, "n_edges", title="Circuit size per strategy (edges)", y_from_zero=True
        ),
        "membership_sankey": plots.membership_sankey(
            A.membership_flows(A.phase_membership(store, analysis_pipeline.key_phases(keys)))
        ),
        "head_roles": plots.head_heatmaps(roles),
        "head_roles_over_seeds": plots.head_role_trajectories(
            roles_over_seeds,
            "dla",
            keys=keys,
            title=f"Head roles of circuit-tuning over training ({len(circuit_seeds)} seed(s)): "
            "direct logit attribution",
        ),
    }
    overlap, _ = compare_analysis.compare_circuits(
        compare_analysis.CircuitSets.from_circuit(agreement, "agreement (before)"),
        compare_analysis.CircuitSets.from_circuit(
            Circuit(agreement.graph, store.snapshot(store.steps[-1]).edge_mask),
            "disagreement (after)",
        ),
    )
    figs["overlap"] = plots.overlap_figure(overlap)
    return figs, overlap, roles


def replicate(
    out: str | Path,
    *,
    quick: bool = False,
    seeds: int | None = None,
    model: str = "default",
    data: str | None = None,
    workers: int = 2,
    png: bool | None = None,
    figures: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the validation experiment into `out` and return the summary (also written as
    ``summary.json`` and ``summary.md``). `data`: the paper's sv-jsonl file for real models
    (``model="gpt2"``); without it the embedded agreement language is used. `figures`: where
    figures go (default ``out/figures``); `png`: also write PNGs (default: not with `quick`)."""
    started = time.perf_counter()
    protocol = QUICK if quick else DEFAULT
    if seeds is not None:
        protocol = replace(protocol, seeds=seeds)
    out = Path(out)
    figures_dir = Path(figures) if figures is not None else out / "figures"
    png = (not quick) if png is None else png
    formats = ("html", "png") if png else ("html",)
    if data is not None:
        task_name, options = "sv-jsonl", {"path": data}
        agreement_task = ("sv-jsonl", {"path": data, "mode": "agreement"})
        train_options = {**options, "mode": "disagreement"}
    else:
        task_name = "disagreement"
        sizes = {"n_train": protocol.n_train, "n_dev": protocol.n_dev, "n_test": protocol.n_test}
        agreement_task = ("agreement", sizes)
        train_options = sizes

    the_model = load_model(model)
    n_params = sum(p.numel() for p in the_model.parameters())
    twins = ABLATIONS[TASKS[task_name].default_ablation].needs_corrupted
    task = load_task(agreement_task[0], the_model, twins=twins, **agreement_task[1])
    agreement, curve, faith = agreement_circuit(the_model, task, protocol, out / "agreement")

    plan = run_plan(protocol, model, task_name, train_options)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    run_all(plan, runs_dir, workers, progress)

    rows = pd.DataFrame([run_row(runs_dir / name, agreement, n_params) for name in plan])
    rows.to_csv(out / "runs.csv", index=False)
    summary = summarize(rows)
    main_labels = [
        "circuit",
        "fixed",
        "random",
        *[_label("full", lr=lr) for lr in protocol.full_lrs],
    ]
    sweep = rows[(rows["seed"] == 0) & (rows["strategy"] == "circuit") & (rows["K"] == 1)]
    sweep = sweep.sort_values("top_n")[
        ["top_n", "test_metric", "test_accuracy", "general_loss_change", "tunable_pct"]
    ]
    ks = rows[
        (rows["seed"] == 0) & (rows["strategy"] == "circuit") & (rows["top_n"] == protocol.top_n)
    ]
    ks = ks.sort_values("K")[
        ["K", "test_metric", "test_accuracy", "general_loss_change", "steps_to_90pct"]
    ]

    # Figures: the main comparison over seeds, the agreement circuit, the circuit-tuning runs.
    figs, overlap, roles = replication_figures(
        runs_dir,
        list(plan),
        main_labels,
        [_label("circuit", n=n) for n in protocol.sweep_n],
        agreement,
        curve,
        faith,
    )
    written = []
    for name, fig in figs.items():
        written += plots.save_figure(fig, figures_dir / name, formats=formats, plotlyjs="directory")
    changes = A.head_role_changes(roles)
    changes.to_csv(out / "head_role_changes.csv", index=False)
    main_runs = [runs_dir / name for name in plan if name.rsplit("_s", 1)[0] in main_labels]
    report = build_report(
        main_runs,
        out / "report.html",
        details=[runs_dir / f"{label}_s0" for label in main_labels],
        title="Replication: circuit-tuning on subject-verb disagreement",
    )

    summary_md = "\n\n".join(
        [
            "# Replication: circuit-tuning on subject-verb disagreement",
            f"Model `{model}` ({n_params:,} parameters); {protocol.seeds} seed(s), {protocol.steps} "
            f"steps of batch {protocol.batch_size}; circuits of {protocol.top_n} edges.",
            f"Agreement circuit (EAP-IG, {agreement.n_edges} edges, {agreement.n_nodes} nodes): "
            f"CPR {faith['cpr']:.3f}, CMD {faith['cmd']:.3f} (MIB grid).",
            markdown_table(summary, main_labels),
            "## Intrinsic dimension (seed 0, circuit-tuning, top-n sweep)",
            sweep.to_string(index=False),
            "## How often the circuit is re-searched (seed 0)",
            ks.to_string(index=False),
            "## Overlap of the agreement circuit with the final disagreement circuit (seed 0)",
            overlap[["level", "n_a", "n_b", "n_both", "jaccard"]].to_string(index=False),
        ]
    )
    result = {
        "protocol": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in protocol.__dict__.items()
        },
        "model": model,
        "n_params": n_params,
        "agreement_circuit": faith,
        "strategies": {
            row["label"]: {
                c: {"mean": row[f"{c}_mean"], "std": row[f"{c}_std"]} for c in SUMMARY_COLUMNS
            }
            for _, row in summary.iterrows()
        },
        "sweep_top_n": sweep.to_dict(orient="records"),
        "sweep_K": ks.to_dict(orient="records"),
        "overlap": overlap.to_dict(orient="records"),
        "figures": [str(p) for p in written],
        "report": str(report),
        "wall_time_s": time.perf_counter() - started,
    }
    # Strict JSON: NaN (e.g. a run that never reached 90%) becomes null.
    (out / "summary.json").write_text(
        json.dumps(_nan_to_none(result), indent=2, default=_json_default)
    )
    (out / "summary.md").write_text(summary_md + "\n")
    return result


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
