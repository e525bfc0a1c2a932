"""One recorded run analysed as a whole, and several side by side: every table (`analyze_run`),
the headline numbers (`key_numbers`), every figure (`run_figures`), the comparison of runs
(`comparison`) and the tables as files (`write_tables`). ``circuitdyn analyze`` calls
`analyze_run` and `write_tables`; the HTML report (`circuitdyn.report.build_report`) is built on
all of them.

This module assembles figures, so it sits above `circuitdyn.plots`; `circuitdyn.analysis`
itself does not import it.

Analyses that need the model (weight change, head roles) load ``manifest["model_name"]``; when
the manifest names none or it cannot be loaded, they are skipped with a note. Head roles are
computed at no more than ``max_checkpoints`` (default 40: every checkpoint of the
replication) checkpoints (evenly spread, the last included)
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
    max_checkpoints: int = 40,
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
        ("key_steps", lambda: A.run_key_steps(store)),
        ("churn_counts", lambda: A.churn_counts(t["churn"])),
        ("edge_membership", lambda: A.edge_membership(store)),
        ("score_totals", lambda: A.step_score_totals(store)),
        ("node_shares", lambda: A.column_shares(t["node_scores"])),
    ]
    if A.attributed_steps(store):
        stages += [
            (
                "edge_trajectories",
                lambda: A.score_shares(
                    A.edge_trajectories(store, A.top_edges(t["edge_trends"], top_k)),
                    t["score_totals"],
                ),
            ),
            ("rank_changes", lambda: A.rank_changes(store, top_k)),
        ]
    else:
        result.notes.append("no attributed step: edge trajectories and ranks skipped")
    stages += [
        ("phase_membership", lambda: A.phase_membership(store, key_phases(t["key_steps"]))),
        ("membership_flows", lambda: A.membership_flows(t["phase_membership"])),
        (
            "phase_overlap",
            lambda: A.compare_steps(store, list(key_phases(t["key_steps"]).values())),
        ),
    ]
    if model:
        stages += _model_stages(result, n_examples, max_checkpoints)
    else:
        result.notes.append("model analyses (head roles, weight change) not requested: skipped")
    _run_stages(stages, f"analyze {result.label}", progress, into=t)
    result.summary = key_numbers(result, core_fraction)
    return result


def key_phases(keys: pd.DataFrame) -> dict[str, int]:
    """Phases for `phase_membership` from a `key_steps` table: one per distinct snapshot step,
    named ``"step 35 (dev metric crosses 0)"``."""
    rows = keys.dropna(subset=["snapshot_step"])
    merged = rows.groupby("snapshot_step", sort=True)["label"].agg(" / ".join)
    return {f"step {int(step)} ({label})": int(step) for step, label in merged.items()}


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
RECORDING = "circuitdyn.recording"  # the manifest kind of runs made by `CircuitRecorder`

FIGURE_CAPTIONS: dict[str, str] = {
    "formation": "How the circuit forms: the task metric above the circuit's edges sorted by the "
    "step they enter for good. Look for the edges that enter near the jump (shaded) and for "
    "when faithfulness passes 0.8.",
    "training": "Loss and task metric per step. Look for where the dev metric crosses 0 "
    "(dotted line): the model starts to prefer the target verb.",
    "circuit_key_steps": "The circuit at the key steps (initial, dev metric crossing 0, dev "
    "accuracy reaching 50% / 90%, final). Blue edges support the target over the foil, red "
    "ones favour the foil: watch the colours turn as tuning flips the metric.",
    "circuit_explorer": "Drag the step slider (or press a key-step button) to walk through "
    "training; raise the threshold to thin out weak edges; click a node to see only its "
    "edges. Hover an edge for its raw score, share of the step's total |score| and rank.",
    "circuit_diff": "Edges gained (green), lost (grey dashed) and kept with a flipped sign "
    "(purple) between the first and the last step.",
    "sizes": "Circuit size per step, counted from 0. A fixed-size selection keeps the edge "
    "count flat; the node count shows how spread out the circuit is.",
    "churn": "Edges entering (up) and leaving (down) the circuit at each step, and how "
    "similar each step's circuit is to the previous one (smoothed Jaccard). Bursts of churn "
    "near the key steps mark a reorganisation.",
    "edge_membership": "Every edge that was ever in the circuit (rows, by the step it "
    "entered) against the steps, under the dev metric. Long bars are the stable core; "
    "short ones are edges that come and go.",
    "node_scores": "Raw node scores (logits). A change of sign of the task metric flips "
    "and shrinks every score, so compare with the normalised view below.",
    "node_shares": "Node scores as a share of each step's total |node score|: how the "
    "importance is distributed, independent of the metric's scale and sign.",
    "layer_composition": "How many heads and MLPs of each layer are in the circuit per step.",
    "membership_sankey": "Which nodes stay in, leave or join the circuit between the key "
    "steps (hover a link for the node names).",
    "edge_trajectories": "Scores of the strongest edges over training (left, with their "
    "linear trend dashed) and as a share of each step's total |score| (right).",
    "rank_changes": "Rank of the top edges by |score| at the first and last attributed step "
    "(1 = strongest).",
    "head_dla": "Direct logit attribution of each head (logits) before, after and the "
    "difference, on one diverging scale: positive pushes towards the target verb.",
    "head_attention": "Attention from the verb to its subject relative to uniform attention "
    "(1 = uniform), before, after and the difference.",
    "head_dla_trajectories": "Direct logit attribution of the strongest heads at every "
    "checkpoint: when a head changes role, its line crosses zero.",
    "head_attention_trajectories": "Attention to the subject of the strongest heads at every "
    "checkpoint (the dotted line is uniform attention).",
    "weight_changes": "Relative weight change of each head and MLP at the last checkpoint: "
    "where tuning moved the weights.",
}
"""One or two lines under each figure of a run: what to look for."""


def run_figures(result: RunAnalysis, *, progress: bool = False) -> dict[str, go.Figure]:
    """Every figure of one run, by name, in the order of the report (captions:
    `FIGURE_CAPTIONS`); ``progress``: a tqdm bar over the figures."""
    store, t, label = result.store, result.tables, result.label
    keys = t.get("key_steps")

    def with_shares(edges: pd.DataFrame) -> pd.DataFrame:
        totals = t["score_totals"].set_index("step")["total_abs_score"]
        source = edges["score_step"].astype("float")
        return edges.assign(share=edges["score"] / source.map(totals))

    def key_circuits() -> go.Figure:
        steps = [int(s) for s in keys["snapshot_step"].dropna().unique()]
        nodes, edges = A.circuit_evolution(store, steps)
        return P.circuit_small_multiples(
            nodes, with_shares(edges), keys, title=f"The circuit at the key steps: {label}"
        )

    def explorer() -> go.Figure:
        nodes, edges = A.circuit_evolution(store, max_frames=80)
        text = A.step_descriptions(t["metrics"], t["evals"])
        return P.circuit_explorer(
            nodes,
            with_shares(edges),
            keys=keys,
            step_text=text,
            title=f"Circuit over training: {label}",
        )

    def diff() -> go.Figure:
        first, last = store.steps[0], store.steps[-1]
        return P.circuit_diff_graph(*A.circuit_tables(store, first), *A.circuit_tables(store, last))

    def formation() -> go.Figure:
        tables = A.formation_tables(store)
        step = None if tables.transition is None else tables.transition.step
        return P.formation_figure(
            tables.curve,
            tables.raster,
            emergence=tables.emergence,
            transition=step,
            onset=tables.onset,
            title=f"Circuit formation: {label}",
        )

    roles = t.get("head_roles")
    # (figure, the table it needs: skipped when that is absent or empty, builder)
    specs: list[tuple[str, str, Callable[[], go.Figure]]] = [
        (
            "training",
            "metrics",
            lambda: P.training_curves(
                t["metrics"], t["evals"], title=f"Training: {label}", keys=keys
            ),
        ),
        ("circuit_key_steps", "key_steps", key_circuits),
        *([("formation", "evals", formation)] if store.manifest.get("kind") == RECORDING else []),
        ("circuit_explorer", "sizes", explorer),
        ("circuit_diff", "sizes", diff),
        ("sizes", "sizes", lambda: P.size_figure(t["sizes"], keys=keys)),
        ("churn", "churn_counts", lambda: P.churn_figure(t["churn_counts"], keys=keys)),
        (
            "edge_membership",
            "edge_membership",
            lambda: P.membership_raster(t["edge_membership"], t["evals"], keys=keys),
        ),
        ("node_scores", "node_scores", lambda: P.evolution_heatmap(t["node_scores"], keys=keys)),
        (
            "node_shares",
            "node_shares",
            lambda: P.evolution_heatmap(t["node_shares"], kind="share", keys=keys),
        ),
        (
            "layer_composition",
            "layer_composition",
            lambda: P.layer_composition_figure(t["layer_composition"], keys=keys),
        ),
        (
            "membership_sankey",
            "membership_flows",
            lambda: P.membership_sankey(t["membership_flows"]),
        ),
        (
            "edge_trajectories",
            "edge_trajectories",
            lambda: P.edge_trajectories_figure(t["edge_trajectories"], t["edge_trends"], keys=keys),
        ),
        ("rank_changes", "rank_changes", lambda: P.rank_change_figure(t["rank_changes"])),
        ("head_dla", "head_roles", lambda: P.head_heatmaps(roles, "dla")),
        ("head_attention", "head_roles", lambda: P.head_heatmaps(roles, "attention_ratio")),
        (
            "head_dla_trajectories",
            "head_roles",
            lambda: P.head_role_trajectories(roles, "dla", keys=keys),
        ),
        (
            "head_attention_trajectories",
            "head_roles",
            lambda: P.head_role_trajectories(roles, "attention_to_subject", keys=keys),
        ),
        ("weight_changes", "weight_changes", lambda: P.weight_change_heatmaps(t["weight_changes"])),
    ]
    stages = [(name, build) for name, table, build in specs if table in t and t[table].size]
    return _run_stages(stages, f"figures {label}", progress)


COMPARISON_CAPTIONS: dict[str, str] = {
    "final_bars": "The final evaluation of each strategy (mean ± std over seeds where a "
    "strategy has several).",
    "curves_dev_metric": "Dev metric over training per strategy (mean over seeds, band ± "
    "std). Where a curve crosses 0 the model starts to prefer the target.",
    "curves_dev_accuracy": "Dev accuracy over training per strategy: how fast each reaches "
    "50% and 90%.",
    "curves_general_loss": "General language-modelling loss: what tuning costs the model "
    "elsewhere.",
    "curves_faithfulness_masked": "Faithfulness of the circuit (circuit metric / model "
    "metric), left out where the model's metric is within 10% of its largest |value| of 0, "
    "where the ratio is meaningless.",
    "sizes_over_seeds": "Circuit size (edges) per strategy, mean ± std over seeds.",
    "churn_over_seeds": "Edge Jaccard with the previous step (smoothed) per strategy, mean ± "
    "std over seeds: how much the circuit moves.",
    "head_roles_over_seeds": "Direct logit attribution of the strongest heads of the first "
    "strategy over training, mean ± std over its seeds.",
    "weight_changes": "Relative weight change of each head and MLP at the end of each run.",
    "weight_share": "Share of the squared weight change in attention heads and in MLPs.",
    "overlap": "Overlap of the final circuits of the first two runs.",
}
"""Captions of the comparison figures (and of ``intrinsic_dimension_*``: see
`comparison_caption`)."""


def comparison_caption(name: str) -> str:
    """The caption of a comparison figure."""
    if name.startswith("intrinsic_dimension"):
        return (
            "Final dev metric against circuit size: the smallest circuit that reaches 90% of "
            "the best is the task's intrinsic dimension (dashed)."
        )
    return COMPARISON_CAPTIONS.get(name, "")


def comparison(
    results: Sequence[RunAnalysis],
) -> tuple[dict[str, pd.DataFrame], dict[str, go.Figure], dict[str, Any]]:
    """Tables, figures and key numbers comparing several runs. Runs that differ only in their
    seed (`circuitdyn.analysis.seeds.seed_group` of their directory names) form a group, drawn
    as the mean over its seeds with a ± std band: final evaluations (bars), evaluation curves
    (faithfulness masked where the model's metric is near zero), circuit size and churn,
    the head roles of the first group over training; then where the weights moved (one run
    per group), the overlap of the final circuits of the first two groups, and the intrinsic
    dimension of each strategy run at several top_n."""
    stores = {r.label: r.store for r in results}
    group_of = {r.label: A.run_group(r.store) for r in results}
    first_of_group = {}
    for r in results:
        first_of_group.setdefault(group_of[r.label], r)
    tables: dict[str, pd.DataFrame] = {}
    figs: dict[str, go.Figure] = {}
    numbers: dict[str, Any] = {}
    finals = A.final_evals(stores)
    finals.insert(1, "group", finals["run"].map(group_of))
    tables["final_evals"] = finals
    metrics = [m for m in P.FINAL_METRICS if m in finals.columns]
    if metrics:
        figs["final_bars"] = P.final_metrics_bars(finals, metrics)
    curves = A.strategy_curves(stores)
    curves.insert(1, "group", curves["run"].map(group_of))
    curves = pd.concat(
        [A.mask_near_zero(rows) for _, rows in curves.groupby("run", sort=False)],
        ignore_index=True,
    )
    tables["strategy_curves"] = curves
    for metric in ("dev_metric", "dev_accuracy", "general_loss", "faithfulness_masked"):
        if metric in curves.columns and curves[metric].notna().any():
            figs[f"curves_{metric}"] = P.strategy_curves_figure(curves, metric)
    per_run = {
        "sizes": ("sizes", "n_edges", "Circuit size per strategy (edges)", True),
        "churn": (
            "churn_counts",
            "jaccard_edges_prev_smoothed",
            "Circuit churn per strategy: edge Jaccard with the previous step (smoothed)",
            False,
        ),
    }
    for name, (table, value, title, from_zero) in per_run.items():
        frames = [
            r.tables[table][["step", value]].assign(group=group_of[r.label], run=r.label)
            for r in results
            if table in r.tables and len(r.tables[table])
        ]
        if frames:
            joined = tables[f"{name}_over_seeds"] = pd.concat(frames, ignore_index=True)
            figs[f"{name}_over_seeds"] = P.band_figure(
                joined, value, title=title, y_from_zero=from_zero
            )
    with_roles = [r for r in results if "head_roles" in r.tables and len(r.tables["head_roles"])]
    if with_roles:
        group = group_of[with_roles[0].label]
        roles = pd.concat(
            [
                r.tables["head_roles"].assign(run=r.label)
                for r in with_roles
                if group_of[r.label] == group
            ],
            ignore_index=True,
        )
        tables["head_roles_over_seeds"] = roles
        n_seeds = roles["run"].nunique()
        figs["head_roles_over_seeds"] = P.head_role_trajectories(
            roles,
            "dla",
            title=f"Head roles over training ({group}, {n_seeds} seed(s)): direct logit "
            "attribution",
        )
    moved = [
        r.tables["weight_changes"].assign(run=group_of[r.label])
        for r in first_of_group.values()
        if "weight_changes" in r.tables and len(r.tables["weight_changes"])
    ]
    if moved:
        changes = pd.concat(moved, ignore_index=True)
        last = changes.groupby("run")["step"].transform("max")
        final_changes = tables["final_weight_changes"] = changes[changes["step"] == last]
        figs["weight_changes"] = P.weight_change_heatmaps(final_changes)
        summary = tables["weights_moved"] = A.where_weights_moved(final_changes)
        figs["weight_share"] = P.weight_share_bars(summary)
    heads = list(first_of_group.values())
    base = A.CircuitSets.from_store(heads[0].store, label=group_of[heads[0].label])
    overlaps = [
        A.compare_circuits(base, A.CircuitSets.from_store(r.store, label=group_of[r.label]))[0]
        for r in heads[1:]
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
WIDE_TABLES = ("node_membership", "node_scores", "node_shares", "edge_membership")
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
    "COMPARISON_CAPTIONS",
    "FIGURE_CAPTIONS",
    "WIDE_TABLES",
    "RunAnalysis",
    "analyze_run",
    "comparison",
    "comparison_caption",
    "key_numbers",
    "key_phases",
    "run_figures",
    "write_tables",
]
