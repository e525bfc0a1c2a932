"""The validation experiment of "Fine-Tuning is Subgraph Search" (arXiv 2502.06106), end to end,
built to tell circuit-tuning from its baselines.

1. The *agreement* circuit of the model before tuning: EAP-IG scores on the agreement task,
   its top-n circuit, its faithfulness curve (MIB grid) with CPR and CMD, and the chance level of
   overlapping it (random circuits of the same size).
2. Tuning to subject-verb *disagreement* with every strategy ("arm"): circuit-tuning under our
   parameter map and under the paper's, the fixed step-0 circuit, a random circuit matched per
   component type, the gradient-magnitude subset, LoRA and full fine-tuning; each over a sweep of
   learning rates and several seeds, a snapshot of the circuit at every step (circuit arms).
3. What tuning should leave alone, at every evaluation: the held-out LM loss and the accuracy on
   each held-out capability of the embedded language (determiner agreement, lexical selection,
   copying).
4. Per arm: the Pareto front of target accuracy versus forgetting, the forgetting at matched
   target accuracy (mean, 95% interval over seeds, paired tests against circuit-tuning), the
   trainable-parameter fraction, and chance levels for node IoU and churn.
5. With ``full``: a top-n sweep (intrinsic dimension) and a sweep of K (how often the circuit is
   re-searched).
6. Figures, an HTML report and a summary (Markdown + JSON).

Runs are independent processes (one torch thread each) writing `RunStore`s under ``OUT/runs``;
a killed replication resumes: finished runs are kept, unfinished ones resume from their last
checkpoint; Ctrl-C cancels the queued runs at once.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
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
from circuitdyn.analysis import pareto
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

# The arms of the comparison: a name and the `TuningConfig` fields that make it.
ARMS: dict[str, dict[str, Any]] = {
    "circuit": {"strategy": "circuit"},
    "circuit-paper": {"strategy": "circuit", "policy": "paper"},
    "fixed": {"strategy": "fixed"},
    "random-matched": {"strategy": "random-matched"},
    "gradient": {"strategy": "gradient"},
    "lora": {"strategy": "lora"},
    "full": {"strategy": "full"},
}
RESEARCHING = ("circuit", "circuit-paper")  # arms that re-search the circuit every step


@dataclass(frozen=True)
class Protocol:
    """Settings of one replication."""

    seeds: int = 5
    steps: int = 100
    batch_size: int = 16
    top_n: int = 40  # edges of the circuit
    mlp_blocks: int = 16  # MLP neuron blocks per layer (nodes m{L}.b{BB})
    arms: tuple[str, ...] = tuple(ARMS)
    # Every arm, every seed: wide enough that each arm has a rate that learns (LoRA's adapters
    # start at zero and need larger rates) and one that overshoots.
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    match_level: float = 0.9  # the target (dev) accuracy at which arms are compared
    sweep_n: tuple[int, ...] = ()  # circuit-tuning top-n sweep (seed 0), plus top_n
    sweep_k: tuple[int, ...] = ()  # K sweep (seed 0), plus K = 1
    sweep_lr: float = 1e-3  # the rate of the sweeps
    eval_every: int = 10
    n_eval: int = 256
    n_train: int = 2000
    n_dev: int = 256
    n_test: int = 512
    n_attribution: int = 256  # examples for the agreement circuit
    ig_steps: int = 5
    checkpoint_every: int = 20  # head roles are measured at every checkpoint
    chance_draws: int = 500  # random circuits for the chance levels


DEFAULT = Protocol()
QUICK = Protocol(
    seeds=1,
    steps=24,
    lrs=(1e-3, 3e-3),
    match_level=0.5,  # 24 steps: a smoke test, not a result
    eval_every=6,
    n_eval=64,
    n_train=480,
    n_dev=64,
    n_test=128,
    n_attribution=64,
    checkpoint_every=12,
    chance_draws=100,
)
# The default's runs plus the sweeps: `--full` into a default replication's directory adds only
# the sweep runs.
FULL = replace(DEFAULT, sweep_n=(5, 10, 20, 80, 160), sweep_k=(4, 16))
PROTOCOLS = {"default": DEFAULT, "quick": QUICK, "full": FULL}


def _label(arm: str, lr: float | None = None, n: int | None = None, k: int | None = None) -> str:
    label = arm
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
    """Every tuning run of the replication, by directory name (``<label>_s<seed>``); the label
    of the comparison's runs is ``<arm>-lr<rate>``."""
    p = protocol
    unknown = sorted(set(p.arms) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; expected some of {list(ARMS)}")
    base = TuningConfig(
        model=model,
        task=task,
        task_options=task_options,
        top_n=p.top_n,
        mlp_blocks=p.mlp_blocks,
        steps=p.steps,
        batch_size=p.batch_size,
        eval_every=p.eval_every,
        n_eval=p.n_eval,
        checkpoint_every=p.checkpoint_every,
        # The comparison reads accuracy and forgetting; faithfulness of each run's circuit at
        # every evaluation would double the evaluations' cost.
        eval_faithfulness=False,
    )
    plan: dict[str, TuningConfig] = {}
    for seed in range(p.seeds):
        runs: dict[str, TuningConfig] = {}
        for arm in p.arms:
            # Arms that do not re-search record their circuit at each evaluation only: the
            # record costs an attribution pass and does not change their training.
            record = 1 if arm in RESEARCHING else p.eval_every
            for lr in p.lrs:
                runs[_label(arm, lr=lr)] = replace(base, **ARMS[arm], lr=lr, record_every=record)
        if seed == 0:
            sweep = replace(base, strategy="circuit", lr=p.sweep_lr, record_every=1)
            for n in p.sweep_n:
                runs[_label("circuit", n=n)] = replace(sweep, top_n=n)
            for k in p.sweep_k:
                runs[_label("circuit", k=k)] = replace(sweep, research_every=k)
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
    # At most `workers` runs are handed to the pool at any time: on Ctrl-C (or a failed run)
    # nothing is queued behind the runs in flight, which stop with the interrupt (the terminal
    # signals the workers too) and resume from their checkpoints on the next call.
    queue = iter(todo.items())
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))

    def submit_next(running: dict[Future, str]) -> None:
        item = next(queue, None)
        if item is not None:
            name, config = item
            running[pool.submit(_tune_in_worker, config.to_dict(), str(runs_dir / name))] = name

    try:
        running: dict[Future, str] = {}
        for _ in range(workers):
            submit_next(running)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                running.pop(future)
                future.result()
                bar.update()
                submit_next(running)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    bar.close()


def agreement_circuit(
    model, task, protocol: Protocol, out: Path, ablation: str | None = None
) -> tuple[Circuit, pd.DataFrame, dict[str, float]]:
    """The agreement circuit of the untuned model, its faithfulness curve, CPR and CMD, with
    `ablation` (default: the task's)."""
    graph = Graph.from_model(model, protocol.mlp_blocks)
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


def arm_of(label: str) -> str:
    """The arm of a run label (``circuit-paper-lr0.001`` -> ``circuit-paper``)."""
    return label.split("-lr")[0]


def run_row(directory: Path, agreement: Circuit, n_params: int) -> dict[str, Any]:
    """The summary numbers of one finished run: final test numbers, their change from the
    untuned model (test split at both ends), and the circuit's overlap with `agreement`."""
    store = RunStore.open(directory)
    config = store.config
    evals = A.evals_by_step(store)
    metrics = store.metrics_frame()
    tests = evals.dropna(subset=["test_metric"])
    initial, final = tests.iloc[0], tests.iloc[-1]  # step 0 and the final model
    last = store.snapshot(store.steps[-1])
    final_circuit = Circuit(agreement.graph, last.edge_mask)
    label = directory.name.rsplit("_s", 1)[0]
    row = {
        "run": directory.name,
        "label": label,
        "arm": arm_of(label),
        "seed": config.seed,
        "strategy": config.strategy,
        "policy": config.policy,
        "top_n": config.top_n,
        "K": config.research_every,
        "lr": config.lr,
        "test_accuracy": float(final["test_accuracy"]),
        "test_metric": float(final["test_metric"]),
        "general_loss_change": float(final.get("test_general_loss", math.nan))
        - float(initial.get("test_general_loss", math.nan)),
        "tunable_pct": 100.0 * float(metrics["n_tunable"].mean()) / n_params,
        "steps_to_90pct": _steps_to(evals, "dev_accuracy", 0.9),
        "jaccard_nodes_agreement": final_circuit.jaccard_nodes(agreement),
        "jaccard_edges_agreement": final_circuit.jaccard_edges(agreement),
    }
    for column in [c for c in tests.columns if c.startswith("test_cap_")]:
        name = column.removeprefix("test_")
        row[f"{name}_change"] = float(final[column]) - float(initial[column])
    return row


def evals_table(runs_dir: Path, names: list[str], n_params: int) -> pd.DataFrame:
    """Every dev evaluation of the comparison's runs, in the layout of `analysis.pareto`: arm
    (``strategy``), ``lr``, ``seed``, ``run``, ``step``, ``target_accuracy`` / ``target_metric``
    (the tuned task), ``general_loss_change`` (held-out LM loss minus step 0's, nats),
    ``capability_accuracy_change`` (mean held-out capability accuracy minus step 0's; NaN when
    the task has none) and ``tunable_fraction`` (mean share of parameters tuned per step)."""
    frames = []
    for name in names:
        store = RunStore.open(runs_dir / name)
        evals = A.evals_by_step(store).dropna(subset=["dev_accuracy"])
        first = evals.iloc[0]
        capability = evals.get("dev_cap_mean", pd.Series(math.nan, index=evals.index))
        frames.append(
            pd.DataFrame(
                {
                    "strategy": arm_of(name.rsplit("_s", 1)[0]),
                    "lr": store.config.lr,
                    "seed": store.config.seed,
                    "run": name,
                    "step": evals["step"].astype(int),
                    "target_accuracy": evals["dev_accuracy"],
                    "target_metric": evals["dev_metric"],
                    "general_loss_change": evals["general_loss"] - first["general_loss"],
                    "capability_accuracy_change": capability - capability.iloc[0],
                    "tunable_fraction": float(store.metrics_frame()["n_tunable"].mean()) / n_params,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


SUMMARY_COLUMNS = {
    "test_accuracy": ("test disagreement acc.", 3),
    "test_metric": ("test metric (logit diff.)", 2),
    "general_loss_change": ("Δ held-out LM loss (nats)", 3),
    "cap_mean_change": ("Δ capability acc.", 3),
    "matched_cost": ("Δ LM loss at matched acc.", 3),
    "tunable_pct": ("tunable params (%)", 1),
    "jaccard_nodes_agreement": ("node IoU w/ agreement circuit", 2),
}


def summarize(rows: pd.DataFrame, matched: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
    """Per arm at its best rate (`pareto.best_rate`): mean and 95% interval over seeds of the
    final numbers and of the forgetting at matched target accuracy (``matched_cost``)."""
    records = []
    for _, choice in best.iterrows():
        arm, lr = choice["strategy"], choice["lr"]
        runs = rows[(rows["arm"] == arm) & np.isclose(rows["lr"], lr)]
        at = matched[(matched["strategy"] == arm) & np.isclose(matched["lr"], lr)]
        values = runs.set_index("seed").join(at.set_index("seed")["cost"].rename("matched_cost"))
        record: dict[str, Any] = {"arm": arm, "lr": lr, "n_seeds": len(runs)}
        record["n_reached"] = int(at["reached"].sum())
        for column in [c for c in values.columns if c in SUMMARY_COLUMNS or c.startswith("cap_")]:
            mean, low, high = pareto.interval(values[column].to_numpy(dtype=float))
            record.update({column: mean, f"{column}_low": low, f"{column}_high": high})
        records.append(record)
    return pd.DataFrame(records)


def best_rate_runs(rows: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
    """The rows of `runs.csv` of each arm at its chosen rate (every seed)."""
    return rows.merge(best[["strategy", "lr"]], left_on=["arm", "lr"], right_on=["strategy", "lr"])


UNREACHED_FALLBACK = "no run reached the level: the rate with the highest mean test accuracy"


def with_fallback_rates(best: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """`pareto.best_rate` with a rate for every arm: an arm none of whose runs reached the
    matched level (rate NaN) gets the rate with the highest mean final test accuracy, so that
    its runs are still shown (``choice`` says so)."""
    best = best.copy()
    for i in best.index[best["lr"].isna()]:
        runs = rows[rows["arm"] == best.at[i, "strategy"]]
        best.at[i, "lr"] = runs.groupby("lr")["test_accuracy"].mean().idxmax()
        best.at[i, "choice"] = UNREACHED_FALLBACK
    return best


def _cell(mean: float, low: float, high: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table: mean [95% interval over seeds] per arm."""
    columns = [c for c in SUMMARY_COLUMNS if c in summary]
    lines = [
        "| arm | rate | "
        + " | ".join(SUMMARY_COLUMNS[c][0] for c in columns)
        + " | reached / seeds |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for _, row in summary.iterrows():
        cells = [
            _cell(row[c], row[f"{c}_low"], row[f"{c}_high"], SUMMARY_COLUMNS[c][1]) for c in columns
        ]
        lines.append(
            f"| {row['arm']} | {row['lr']:g} | "
            + " | ".join(cells)
            + f" | {int(row['n_reached'])} / {int(row['n_seeds'])} |"
        )
    return "\n".join(lines)


def comparison_table(comparison: pd.DataFrame, measure: str = "Δ LM loss vs circuit (nats)") -> str:
    """`pareto.compare_at_matched` as Markdown; `measure` heads the difference column."""
    lines = [
        f"| arm | {measure} | 95% interval | paired t p | Welch p | pairs |",
        "|---|---|---|---|---|---|",
    ]

    def number(value: float, spec: str) -> str:
        return "n/a" if math.isnan(value) else format(value, spec)

    for _, row in comparison.iterrows():
        span = "n/a"
        if not math.isnan(row["low"]):
            span = f"[{row['low']:+.3f}, {row['high']:+.3f}]"
        lines.append(
            f"| {row['strategy']} | {number(row['mean_difference'], '+.3f')} | {span} | "
            f"{number(row['p_paired'], '.3g')} | {number(row['p_welch'], '.3g')} | "
            f"{int(row['n_pairs'])} |"
        )
    return "\n".join(lines)


def replication_figures(out: Path) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """The replication's figures by file name, built from the tables `replicate` wrote in `out`
    (and the agreement / final circuit overlap table and the head roles of circuit-tuning's run
    of seed 0). Comparisons over seeds show each arm at its best rate, as the mean over seeds
    with a ± std band; the circuit figures are those of circuit-tuning's run of seed 0, with its
    key steps marked. ``circuit_key_steps`` (the circuit at the key steps, side by side) is the
    README's picture of the circuit's evolution."""
    runs_dir = out / "runs"
    agreement = Circuit.from_json(out / "agreement" / "circuit.json")
    curve = pd.read_csv(out / "agreement" / "faithfulness_curve.csv")
    faith = json.loads((out / "agreement" / "numbers.json").read_text())
    rows = pd.read_csv(out / "runs.csv")
    best = pd.read_csv(out / "best_rates.csv")
    chosen = best_rate_runs(rows, best)
    group_of = dict(zip(chosen["run"], chosen["arm"], strict=True))
    main = {name: RunStore.open(runs_dir / name) for name in group_of}
    circuit_run = chosen[(chosen["arm"] == "circuit") & (chosen["seed"] == 0)]["run"].iloc[0]
    store = main[circuit_run]
    keys = A.run_key_steps(store)
    evals = A.evals_by_step(store)

    finals = compare_analysis.final_evals(main)
    finals.insert(1, "group", finals["run"].map(group_of))
    curves = compare_analysis.strategy_curves(main)
    curves.insert(1, "group", curves["run"].map(group_of))
    curves = pd.concat(
        [A.mask_near_zero(rows) for _, rows in curves.groupby("run", sort=False)],
        ignore_index=True,
    )
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
    researching = {n: s for n, s in main.items() if group_of[n] in RESEARCHING}
    churn = pd.concat(
        [
            A.churn_counts(A.churn(s)).assign(group=group_of[n], run=n)
            for n, s in researching.items()
        ],
        ignore_index=True,
    )
    circuit_seeds = [s for n, s in main.items() if group_of[n] == "circuit"]
    roles_over_seeds = pd.concat(
        [A.head_roles(s).assign(run=str(s.directory)) for s in circuit_seeds], ignore_index=True
    )
    roles = roles_over_seeds[roles_over_seeds["run"] == str(store.directory)].drop(columns="run")
    first, last = store.steps[0], store.steps[-1]
    fronts = pd.read_csv(out / "pareto.csv")
    matched = pd.read_csv(out / "matched.csv")
    comparison = pd.read_csv(out / "comparison.csv")
    figs: dict[str, Any] = {
        "pareto": plots.pareto_figure(fronts, matched),
        "matched_forgetting": plots.matched_cost_figure(
            matched, pareto.matched_summary(matched, best), comparison
        ),
        "agreement_faithfulness": plots.faithfulness_curve_figure(
            curve, faith["cpr"], faith["cmd"]
        ),
        "strategy_curves": plots.strategy_curves_figure(curves, "dev_metric"),
        "strategy_accuracy": plots.strategy_curves_figure(curves, "dev_accuracy"),
        "strategy_capabilities": plots.strategy_curves_figure(curves, "dev_cap_mean")
        if "dev_cap_mean" in curves
        else None,
        "final_metrics": plots.final_metrics_bars(
            finals,
            ("test_accuracy", "test_metric"),
            title="Final test evaluation per arm (each at its best rate)",
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
            title="Circuit churn of the circuit-tuning arms: edge Jaccard with the previous step "
            "(smoothed)",
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
    sweep = rows[rows["label"].str.match(r"circuit-n\d+$")]
    if len(sweep):
        # The sweep's own rate and seed 0, at the protocol's top_n: the n = top_n point.
        base = f"{_label('circuit', lr=float(sweep['lr'].iloc[0]))}_s0"
        finals_n = compare_analysis.final_evals(
            {name: RunStore.open(runs_dir / name) for name in [base, *sweep["run"]]}
        )
        dimension = compare_analysis.intrinsic_dimension(finals_n)
        figs["intrinsic_dimension"] = plots.intrinsic_dimension_figure(
            dimension.curve, saturation_n=dimension.saturation_n, threshold=dimension.threshold
        )
    overlap, _ = compare_analysis.compare_circuits(
        compare_analysis.CircuitSets.from_circuit(agreement, "agreement (before)"),
        compare_analysis.CircuitSets.from_circuit(
            Circuit(agreement.graph, store.snapshot(store.steps[-1]).edge_mask),
            "disagreement (after)",
        ),
    )
    figs["overlap"] = plots.overlap_figure(overlap)
    return {k: v for k, v in figs.items() if v is not None}, overlap, roles


def replicate(
    out: str | Path,
    *,
    quick: bool = False,
    full: bool = False,
    seeds: int | None = None,
    model: str = "default",
    data: str | None = None,
    workers: int = 2,
    png: bool | None = None,
    figures: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the validation experiment into `out` and return the summary (also written as
    ``summary.json`` and ``summary.md``). `quick` / `full`: the small or the complete protocol
    (default: `DEFAULT`). `data`: the paper's sv-jsonl file for real models (``model="gpt2"``);
    without it the embedded language is used. `figures`: where figures go (default
    ``out/figures``); `png`: also write PNGs (default: not with `quick`)."""
    started = time.perf_counter()
    if quick and full:
        raise ValueError("choose one of quick and full")
    protocol = QUICK if quick else FULL if full else DEFAULT
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
    agreement, _, faith = agreement_circuit(the_model, task, protocol, out / "agreement")
    chance = pareto.chance_overlap(
        agreement.graph, protocol.top_n, agreement, draws=protocol.chance_draws, seed=0
    )
    numbers = {**faith, "match_level": protocol.match_level, "chance": chance}
    (out / "agreement" / "numbers.json").write_text(json.dumps(numbers, indent=2))

    plan = run_plan(protocol, model, task_name, train_options)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    run_all(plan, runs_dir, workers, progress)

    rows = pd.DataFrame([run_row(runs_dir / name, agreement, n_params) for name in plan])
    rows.to_csv(out / "runs.csv", index=False)
    compared = [name for name in plan if "-lr" in name]
    evals = evals_table(runs_dir, compared, n_params)
    evals.to_csv(out / "evals.csv", index=False)
    matched = pareto.matched_points(evals, protocol.match_level)
    matched.to_csv(out / "matched.csv", index=False)
    best = with_fallback_rates(pareto.best_rate(matched), rows)
    best.to_csv(out / "best_rates.csv", index=False)
    comparison = pareto.compare_at_matched(matched, reference="circuit", best=best)
    comparison.to_csv(out / "comparison.csv", index=False)
    # The same comparison on the held-out capabilities, at the same rates (when measured).
    capabilities = None
    if evals["capability_accuracy_change"].notna().any():
        matched_capabilities = pareto.matched_points(
            evals, protocol.match_level, cost="capability_accuracy_change"
        )
        capabilities = pareto.compare_at_matched(
            matched_capabilities, reference="circuit", best=best
        )
        capabilities.to_csv(out / "comparison_capabilities.csv", index=False)
    fronts = pareto.strategy_fronts(evals)
    fronts.to_csv(out / "pareto.csv", index=False)
    summary = summarize(rows, matched, best)
    summary.to_csv(out / "summary.csv", index=False)

    figs, overlap, roles = replication_figures(out)
    written = []
    for name, fig in figs.items():
        written += plots.save_figure(fig, figures_dir / name, formats=formats, plotlyjs="directory")
    changes = A.head_role_changes(roles)
    changes.to_csv(out / "head_role_changes.csv", index=False)
    chosen = best_rate_runs(rows, best)
    main_runs = [runs_dir / name for name in chosen["run"]]
    report = build_report(
        main_runs,
        out / "report.html",
        details=[runs_dir / name for name in chosen[chosen["seed"] == 0]["run"]],
        title="Replication: circuit-tuning on subject-verb disagreement",
    )

    base = rows["run"] == f"{_label('circuit', lr=protocol.sweep_lr)}_s0"  # K = 1, top_n
    sweep = rows[rows["label"].str.match(r"circuit-n\d+$") | base]
    sweep = sweep.sort_values("top_n")[
        ["top_n", "test_metric", "test_accuracy", "general_loss_change", "tunable_pct"]
    ]
    ks = rows[rows["label"].str.match(r"circuit-K\d+$") | base]
    ks = ks.sort_values("K")[
        ["K", "test_metric", "test_accuracy", "general_loss_change", "steps_to_90pct"]
    ]
    sections = [
        "# Replication: circuit-tuning on subject-verb disagreement",
        f"Model `{model}` ({n_params:,} parameters); {protocol.seeds} seed(s) per arm and rate, "
        f"{protocol.steps} steps of batch {protocol.batch_size}; circuits of {protocol.top_n} "
        f"edges over {protocol.mlp_blocks} MLP neuron blocks per layer; learning rates "
        f"{', '.join(f'{lr:g}' for lr in protocol.lrs)}. Each arm at its best rate: the one whose "
        f"runs all reach {protocol.match_level:.0%} dev accuracy with the least forgetting. "
        "Intervals: 95% Student-t over seeds.",
        f"Agreement circuit (EAP-IG, {agreement.n_edges} edges, {agreement.n_nodes} nodes): "
        f"CPR {faith['cpr']:.3f}, CMD {faith['cmd']:.3f} (MIB grid). Chance node IoU of a random "
        f"{protocol.top_n}-edge circuit with it: {chance['node_iou_mean']:.2f} "
        f"[{chance['node_iou_low']:.2f}, {chance['node_iou_high']:.2f}]; chance edge Jaccard of "
        f"two random circuits (churn): {chance['churn_mean']:.2f}.",
        markdown_table(summary),
        f"## Forgetting at matched target accuracy ({protocol.match_level:.0%} dev), "
        "each arm against circuit-tuning",
        "Held-out LM loss; positive: the arm forgets more than circuit-tuning.",
        comparison_table(comparison),
    ]
    if capabilities is not None:
        sections += [
            "Mean held-out capability accuracy (determiner agreement, lexical selection, "
            "copying); negative: the arm forgets more than circuit-tuning.",
            comparison_table(capabilities, "Δ capability acc. vs circuit"),
        ]
    if len(protocol.sweep_n):
        sections += ["## Intrinsic dimension (seed 0, circuit-tuning, top-n sweep)"]
        sections += [sweep.to_string(index=False)]
    if len(protocol.sweep_k):
        sections += ["## How often the circuit is re-searched (seed 0)", ks.to_string(index=False)]
    sections += [
        "## Overlap of the agreement circuit with the final disagreement circuit (seed 0)",
        overlap[["level", "n_a", "n_b", "n_both", "jaccard"]].to_string(index=False),
    ]
    result = {
        "protocol": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in protocol.__dict__.items()
        },
        "model": model,
        "n_params": n_params,
        "agreement_circuit": numbers,
        "arms": summary.to_dict(orient="records"),
        "comparison": comparison.to_dict(orient="records"),
        "comparison_capabilities": []
        if capabilities is None
        else capabilities.to_dict(orient="records"),
        "best_rates": best.to_dict(orient="records"),
        "sweep_top_n": sweep.to_dict(orient="records") if len(protocol.sweep_n) else [],
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
    (out / "summary.md").write_text("\n\n".join(sections) + "\n")
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
