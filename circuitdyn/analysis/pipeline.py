"""One recorded run analysed as a whole, and several side by side: every table (`analyze_run`),
the headline numbers (`key_numbers`), every figure (`run_figures`), the comparison of runs
(`comparison`) and the tables as files (`write_tables`). ``circuitdyn analyze`` calls
`analyze_run` and `write_tables`; the HTML report (`circuitdyn.report.build_report`) is built on
all of them.

This module assembles figures, so it sits above `circuitdyn.plots`; `circuitdyn.analysis`
itself does not import it.

Analyses that need the model (weight change, head roles) load ``manifest["model_name"]``; when
the manifest names none or it cannot be loaded, they are skipped with a note. Head roles are
computed at no more than ``max_checkpoints`` checkpoints (evenly spread, the last included)
plus the initial model. A partial run (stopped before its final evaluation) is analysed up to
its last committed step, and its notes and key numbers say so
(`circuitdyn.analysis.runs.RunProgress`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from tqdm import tqdm

from circuitdyn import analysis as A
from circuitdyn import plots as P
from circuitdyn.analysis.dynamics import spread
from circuitdyn.analysis.runs import (
    RunProgress,
    config_fields,
    evals_by_step,
    model_name,
    run_label,
    run_progress,
)
from circuitdyn.analysis.weights import initial_parameters
from circuitdyn.models import ModelUnavailableError
from circuitdyn.store import RunStore, StoreError

Stage = tuple[str, Callable[[], Any]]
"""A named step of a pipeline (a table or a figure), run under the progress bar."""


@dataclass
class RunAnalysis:
    """Every table of one run (`analyze_run`), its key numbers, how far the run got, and notes
    on what was skipped."""

    store: RunStore
    label: str
    progress: RunProgress
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _run_stages(
    stages: Sequence[Stage], desc: str, progress: bool, into: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the stages in order under a tqdm bar (when ``progress``) and put each non-None
    result under its name into ``into`` (default: a new dict), which is returned; a stage may
    read what the earlier ones put there."""
    done: dict[str, Any] = {} if into is None else into
    bar = tqdm(stages, desc=desc, disable=not progress, leave=False)
    for name, make in bar:
        bar.set_postfix_str(name)
        value = make()
        if value is not None:
            done[name] = value
    return done


def analyze_run(
    store: RunStore,
    *,
    label: str | None = None,
    model: bool = True,
    top_k: int = 10,
    n_examples: int = 64,
    max_checkpoints: int = 6,
    core_fraction: float = 0.9,
    progress: bool = False,
) -> RunAnalysis:
    """Compute the tables of one run. ``model=False`` skips head roles and weight change (the
    analyses that load the model); ``top_k``: edges in trajectories and rank changes;
    ``n_examples``: dev examples for head roles; ``core_fraction``: presence that makes a node
    part of the stable core; ``progress``: a tqdm bar over the tables. Raises ValueError for a
    run without a recorded step."""
    if not store.steps:
        raise ValueError(f"{store.directory}: the run has no recorded steps")
    result = RunAnalysis(store, label or run_label(store), run_progress(store))
    note = result.progress.note()
    if note:
        result.notes.append(note)
    t = result.tables
    phases = A.phase_steps(store)
    stages: list[Stage] = [
        ("metrics", store.metrics_frame),
        ("evals", lambda: evals_by_step(store)),
        ("sizes", lambda: A.circuit_sizes(store)),
        ("churn", lambda: A.churn(store)),
        ("node_events", lambda: A.node_events(store)),
        ("node_presence", lambda: A.node_presence(store)),
        ("stable_core", lambda: A.stable_core(store, core_fraction)),
        ("edge_presence", lambda: A.edge_presence(store)),
        ("layer_composition", lambda: A.layer_composition(store)),
        ("node_membership", lambda: A.node_membership(store)),
        ("node_scores", lambda: A.node_score_matrix(store)),
        ("edge_trends", lambda: A.edge_trends(store)),
    ]
    if A.attributed_steps(store):
        stages += [
            (
                "edge_trajectories",
                lambda: A.edge_trajectories(store, A.top_edges(t["edge_trends"], top_k)),
            ),
            ("rank_changes", lambda: A.rank_changes(store, top_k)),
        ]
    else:
        result.notes.append("no attributed step: edge trajectories and ranks skipped")
    stages += [
        ("phase_membership", lambda: A.phase_membership(store, phases)),
        ("membership_flows", lambda: A.membership_flows(t["phase_membership"])),
        ("phase_overlap", lambda: A.compare_steps(store, list(dict.fromkeys(phases.values())))),
    ]
    if model:
        stages += _model_stages(result, n_examples, max_checkpoints)
    else:
        result.notes.append("model analyses (head roles, weight change) not requested: skipped")
    _run_stages(stages, f"analyze {result.label}", progress, into=t)
    result.summary = key_numbers(result, core_fraction)
    return result


def _model_stages(result: RunAnalysis, n_examples: int, max_checkpoints: int) -> list[Stage]:
    """Weight change and head roles, or nothing (with a note) when the run has no checkpoint
    or its model cannot be loaded."""
    store, t = result.store, result.tables
    checkpoints = store.checkpoint_steps()
    if not checkpoints:
        result.notes.append("no checkpoints: head roles and weight change skipped")
        return []
    try:
        initial = initial_parameters(store)
    except (StoreError, ModelUnavailableError) as error:
        result.notes.append(f"{error}; head roles and weight change skipped")
        return []

    def head_roles() -> pd.DataFrame | None:
        try:
            return A.head_roles(store, spread(checkpoints, max_checkpoints), n_examples=n_examples)
        except (StoreError, FileNotFoundError) as error:  # no task to run, or its data is gone
            result.notes.append(f"head roles skipped: {error}")
            return None

    return [
        ("weight_changes", lambda: A.weight_changes(store, initial=initial)),
        ("weights_moved", lambda: A.where_weights_moved(t["weight_changes"])),
        ("head_roles", head_roles),
        (
            "head_role_changes",
            lambda: A.head_role_changes(t["head_roles"]) if "head_roles" in t else None,
        ),
    ]


def _number(value: Any) -> Any:
    """A JSON-friendly scalar (numpy scalars as Python ones, non-finite floats as None)."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def key_numbers(result: RunAnalysis, core_fraction: float = 0.9) -> dict[str, Any]:
    """The headline numbers of one run (JSON-friendly): configuration, how far the run got
    (``status``: finished / partial / unknown, ``last_step``, ``planned_steps``), first / final
    evaluation, circuit size, mean churn, stable-core size, entries / exits, significant edge
    trends, overlap of the first and last circuits, where the weights moved."""
    store, t, run = result.store, result.tables, result.progress
    churn, trends, events = t["churn"], t["edge_trends"], t["node_events"]
    out: dict[str, Any] = {
        "run": result.label,
        "directory": str(store.directory),
        "model": model_name(store),
        **config_fields(store, ("task", "strategy", "top_n")),
        "status": run.status,
        "planned_steps": run.planned_steps,
        "last_step": run.last_step,
        "steps_recorded": len(store.steps),
        "attributed_steps": int(t["sizes"]["attributed"].sum()),
        "checkpoints": len(store.checkpoint_steps()),
        "mean_edges": t["sizes"]["n_edges"].mean(),
        "mean_nodes": t["sizes"]["n_nodes"].mean(),
        "mean_jaccard_edges_prev": churn["jaccard_edges_prev"].mean(),
        "mean_jaccard_nodes_prev": churn["jaccard_nodes_prev"].mean(),
        "jaccard_edges_first_last": churn["jaccard_edges_last"].iloc[0],
        "jaccard_nodes_first_last": churn["jaccard_nodes_last"].iloc[0],
        f"stable_core_nodes_{round(core_fraction * 100)}pct": len(t["stable_core"]),
        "node_entries": int((events["event"] == "enter").sum()),
        "node_exits": int((events["event"] == "exit").sum()),
        "edges_strengthening": int((trends["direction"] == "strengthens").sum()),
        "edges_weakening": int((trends["direction"] == "weakens").sum()),
    }
    evals = t["evals"]
    if len(evals):
        first, last = evals.iloc[0].drop("step"), evals.iloc[-1].drop("step")
        out.update({f"first_{k}": v for k, v in first.items()})
        out.update({f"final_{k}": v for k, v in last.items()})
        out["final_eval_step"] = int(evals["step"].iloc[-1])
    if "weights_moved" in t:
        moved = t["weights_moved"]
        for row in moved[moved["step"] == moved["step"].max()].itertuples(index=False):
            out[f"weight_share_{row.component}"] = row.share_sq_change
            out[f"moved_{row.component}s"] = f"{row.n_moved}/{row.n_components}"
    return {k: _number(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------
def run_figures(result: RunAnalysis, *, progress: bool = False) -> dict[str, go.Figure]:
    """Every figure of one run, by name, in the order of the report; ``progress``: a tqdm bar
    over the figures."""
    store, t, label = result.store, result.tables, result.label

    def circuit_at(step: int) -> go.Figure:
        nodes, edges = A.circuit_tables(store, step)
        return P.circuit_graph(nodes, edges, title=f"Circuit at step {step} ({len(edges)} edges)")

    def evolution() -> go.Figure:
        title = f"Circuit over training: {label}"
        return P.circuit_animation(*A.circuit_evolution(store), title=title)

    roles = t.get("head_roles")
    # (figure, the table it needs: skipped when that is absent or empty, builder)
    specs: list[tuple[str, str, Callable[[], go.Figure]]] = [
        (
            "training",
            "metrics",
            lambda: P.training_curves(t["metrics"], t["evals"], title=f"Training: {label}"),
        ),
        ("circuit_first", "sizes", lambda: circuit_at(store.steps[0])),
        ("circuit_last", "sizes", lambda: circuit_at(store.steps[-1])),
        ("circuit_animation", "sizes", evolution),
        ("sizes", "sizes", lambda: P.size_figure(t["sizes"])),
        ("churn", "churn", lambda: P.churn_figure(t["churn"])),
        (
            "membership",
            "node_membership",
            lambda: P.evolution_heatmap(t["node_membership"], kind="membership"),
        ),
        ("node_scores", "node_scores", lambda: P.evolution_heatmap(t["node_scores"])),
        (
            "layer_composition",
            "layer_composition",
            lambda: P.layer_composition_figure(t["layer_composition"]),
        ),
        ("node_events", "node_events", lambda: P.events_figure(t["node_events"], store.node_names)),
        (
            "membership_sankey",
            "membership_flows",
            lambda: P.membership_sankey(t["membership_flows"]),
        ),
        (
            "edge_trajectories",
            "edge_trajectories",
            lambda: P.edge_trajectories_figure(t["edge_trajectories"], t["edge_trends"]),
        ),
        ("rank_changes", "rank_changes", lambda: P.rank_change_figure(t["rank_changes"])),
        ("head_dla", "head_roles", lambda: P.head_heatmaps(roles, "dla")),
        ("head_attention", "head_roles", lambda: P.head_heatmaps(roles, "attention_ratio")),
        ("head_dla_trajectories", "head_roles", lambda: P.head_role_trajectories(roles, "dla")),
        (
            "head_attention_trajectories",
            "head_roles",
            lambda: P.head_role_trajectories(roles, "attention_to_subject"),
        ),
        ("weight_changes", "weight_changes", lambda: P.weight_change_heatmaps(t["weight_changes"])),
    ]
    stages = [(name, build) for name, table, build in specs if table in t and t[table].size]
    return _run_stages(stages, f"figures {label}", progress)


def comparison(
    results: Sequence[RunAnalysis],
) -> tuple[dict[str, pd.DataFrame], dict[str, go.Figure], dict[str, Any]]:
    """Tables, figures and key numbers comparing several runs: final evaluations (bars), the
    curves of each run, where the weights moved, the overlap of each final circuit with the
    first run's, and the intrinsic dimension of each strategy run at several top_n."""
    stores = {r.label: r.store for r in results}
    tables: dict[str, pd.DataFrame] = {}
    figs: dict[str, go.Figure] = {}
    numbers: dict[str, Any] = {}
    finals = tables["final_evals"] = A.final_evals(stores)
    metrics = [m for m in P.FINAL_METRICS if m in finals.columns]
    if metrics:
        figs["final_bars"] = P.final_metrics_bars(finals, metrics)
    curves = tables["strategy_curves"] = A.strategy_curves(stores)
    for metric in ("dev_metric", "general_loss", "faithfulness"):
        if metric in curves.columns and curves[metric].notna().any():
            figs[f"curves_{metric}"] = P.strategy_curves_figure(curves, metric)
    moved = [
        r.tables["weight_changes"].assign(run=r.label)
        for r in results
        if "weight_changes" in r.tables and len(r.tables["weight_changes"])
    ]
    if moved:
        changes = pd.concat(moved, ignore_index=True)
        last = changes.groupby("run")["step"].transform("max")
        final_changes = tables["final_weight_changes"] = changes[changes["step"] == last]
        figs["weight_changes"] = P.weight_change_heatmaps(final_changes)
        summary = tables["weights_moved"] = A.where_weights_moved(final_changes)
        figs["weight_share"] = P.weight_share_bars(summary)
    base = A.CircuitSets.from_store(results[0].store, label=results[0].label)
    overlaps = [
        A.compare_circuits(base, A.CircuitSets.from_store(r.store, label=r.label))[0]
        for r in results[1:]
    ]
    if overlaps:
        tables["final_circuit_overlap"] = pd.concat(overlaps, ignore_index=True)
        figs["overlap"] = P.overlap_figure(overlaps[0])
    if "dev_metric" in finals.columns:
        for strategy, rows in finals.groupby("strategy"):
            if rows["top_n"].nunique() >= 2:
                idim = A.intrinsic_dimension(rows)
                tables[f"intrinsic_dimension_{strategy}"] = idim.curve
                numbers[f"intrinsic_dimension_{strategy}"] = idim.summary()
                figs[f"intrinsic_dimension_{strategy}"] = P.intrinsic_dimension_figure(
                    idim.curve,
                    saturation_n=idim.saturation_n,
                    threshold=idim.threshold,
                    title=f"Final dev metric versus circuit size ({strategy})",
                )
    return tables, figs, numbers


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
WIDE_TABLES = ("node_membership", "node_scores")
"""Tables written with their index (node x step)."""


def write_tables(
    result: RunAnalysis, out_dir: str | Path, *, figures: bool = False, progress: bool = False
) -> dict[str, Path]:
    """Write each table of ``result`` as ``<name>.csv`` (the node x step tables `WIDE_TABLES`
    keep their node index), ``summary.json`` (key numbers and notes) and, with ``figures``,
    every figure under ``figures/`` (`circuitdyn.plots.save_figure`: HTML, and PNG when a
    static exporter works). ``progress``: tqdm bars over the tables and the figures. Returns
    name -> path (figures as ``figure:<file name>``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    tables = tqdm(result.tables.items(), desc="tables", unit="table", disable=not progress)
    for name, table in tables:
        written[name] = out / f"{name}.csv"
        table.to_csv(written[name], index=name in WIDE_TABLES)
    written["summary"] = out / "summary.json"
    summary = {"summary": result.summary, "notes": result.notes}
    written["summary"].write_text(json.dumps(summary, indent=2, default=_number) + "\n")
    if figures:
        for name, fig in run_figures(result, progress=progress).items():
            for path in P.save_figure(fig, out / "figures" / name):
                written[f"figure:{path.name}"] = path
    return written


__all__ = [
    "WIDE_TABLES",
    "RunAnalysis",
    "analyze_run",
    "comparison",
    "key_numbers",
    "run_figures",
    "write_tables",
]
