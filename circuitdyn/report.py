"""The analysis of recorded runs as files: tables (``circuitdyn analyze``) and one
self-contained HTML report (``circuitdyn report``).

``analyze`` writes every table of `circuitdyn.analysis` for one run as CSV, and the key numbers
as ``summary.json``; with ``--figures`` also every figure (HTML, plus PNG when kaleido and a
Chromium are installed). ``report`` writes one HTML page, plotly.js embedded once (it works
offline), with the key numbers and all figures of one run, or of several runs with a comparison
section first (final evaluations, dev curves per strategy, where the weights moved, overlap of
the final circuits, and the intrinsic-dimension curve when runs differ in top_n).

Analyses that need the model (head roles, weight change) load
``load_model(manifest["model_name"])``; if that fails, or with ``--no-model``, they are skipped
and the report says why. Head roles are computed at no more than ``max_checkpoints``
checkpoints (evenly spread, the last included) plus the initial model.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from circuitdyn import analysis as A
from circuitdyn import plots as P
from circuitdyn.analysis.weights import initial_parameters
from circuitdyn.store import RunStore


@dataclass
class RunAnalysis:
    """Every table of one run (`analyze_run`), the figures built from them (`run_figures`), and
    notes on what was skipped."""

    store: RunStore
    label: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _spread(steps: Sequence[int], k: int) -> list[int]:
    """At most ``k`` of ``steps``, evenly spread, the last always included."""
    steps = list(steps)
    if len(steps) <= k:
        return steps
    index = np.unique(np.linspace(0, len(steps) - 1, k).round().astype(int))
    return [steps[i] for i in index]


def analyze_run(
    store: RunStore,
    *,
    label: str | None = None,
    model: bool = True,
    top_k: int = 10,
    n_examples: int = 64,
    max_checkpoints: int = 6,
    core_fraction: float = 0.9,
) -> RunAnalysis:
    """Compute the tables of one run. ``model=False`` skips head roles and weight change (the
    analyses that load the model). ``top_k``: edges in trajectories and rank changes."""
    result = RunAnalysis(store, label or A.run_label(store))
    t = result.tables
    if not store.steps:
        raise ValueError(f"{store.directory}: the run has no recorded steps")
    t["metrics"] = store.metrics_frame()
    t["evals"] = store.evals_frame()
    t["sizes"] = A.circuit_sizes(store)
    t["churn"] = A.churn(store)
    t["node_events"] = A.node_events(store)
    t["node_presence"] = A.node_presence(store)
    t["stable_core"] = A.stable_core(store, core_fraction)
    t["edge_presence"] = A.edge_presence(store)
    t["layer_composition"] = A.layer_composition(store)
    t["node_membership"] = A.node_membership(store)
    t["node_scores"] = A.node_score_matrix(store)
    t["edge_trends"] = A.edge_trends(store)
    if A.attributed_steps(store):
        t["edge_trajectories"] = A.edge_trajectories(store, A.top_edges(t["edge_trends"], top_k))
        t["rank_changes"] = A.rank_changes(store, top_k)
    else:
        result.notes.append("no attributed step: edge trajectories and ranks skipped")
    phases = A.phase_steps(store)
    t["phase_membership"] = A.phase_membership(store, phases)
    t["membership_flows"] = A.membership_flows(t["phase_membership"])
    t["phase_overlap"] = A.compare_steps(store, list(dict.fromkeys(phases.values())))
    if model:
        _model_tables(result, n_examples, max_checkpoints)
    else:
        result.notes.append("model analyses (head roles, weight change) skipped: --no-model")
    result.summary = key_numbers(result, core_fraction)
    return result


def _model_tables(result: RunAnalysis, n_examples: int, max_checkpoints: int) -> None:
    store, t = result.store, result.tables
    checkpoints = store.checkpoint_steps()
    if not checkpoints:
        result.notes.append("no checkpoints: head roles and weight change skipped")
        return
    try:
        initial = initial_parameters(store)
    except Exception as error:  # the model may be unavailable (renamed, offline hub name)
        result.notes.append(
            f"model {store.manifest.get('model_name')!r} could not be loaded "
            f"({type(error).__name__}: {error}); head roles and weight change skipped"
        )
        return
    t["weight_changes"] = A.weight_changes(store, initial=initial)
    t["weights_moved"] = A.where_weights_moved(t["weight_changes"])
    try:
        roles = A.head_roles(store, _spread(checkpoints, max_checkpoints), n_examples=n_examples)
    except Exception as error:
        result.notes.append(f"head roles skipped ({type(error).__name__}: {error})")
        return
    t["head_roles"] = roles
    t["head_role_changes"] = A.head_role_changes(roles)


def _number(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def key_numbers(result: RunAnalysis, core_fraction: float = 0.9) -> dict[str, Any]:
    """The headline numbers of one run (JSON-friendly): configuration, first / final dev
    evaluation, circuit size, mean churn, stable-core size, entries / exits, significant edge
    trends, overlap of the first and last circuits."""
    store, t = result.store, result.tables
    config = store.manifest.get("config", {})
    churn = t["churn"]
    trends = t["edge_trends"]
    out: dict[str, Any] = {
        "run": result.label,
        "directory": str(store.directory),
        "model": store.manifest.get("model_name"),
        "task": config.get("task"),
        "strategy": config.get("strategy"),
        "top_n": config.get("top_n"),
        "steps_recorded": len(store.steps),
        "attributed_steps": int(t["sizes"]["attributed"].sum()),
        "checkpoints": len(store.checkpoint_steps()),
        "mean_edges": float(t["sizes"]["n_edges"].mean()),
        "mean_nodes": float(t["sizes"]["n_nodes"].mean()),
        "mean_jaccard_edges_prev": float(churn["jaccard_edges_prev"].mean()),
        "mean_jaccard_nodes_prev": float(churn["jaccard_nodes_prev"].mean()),
        "jaccard_edges_first_last": float(churn["jaccard_edges_last"].iloc[0]),
        "jaccard_nodes_first_last": float(churn["jaccard_nodes_last"].iloc[0]),
        f"stable_core_nodes_{round(core_fraction * 100)}pct": len(t["stable_core"]),
        "node_entries": int((t["node_events"]["event"] == "enter").sum()),
        "node_exits": int((t["node_events"]["event"] == "exit").sum()),
        "edges_strengthening": int((trends["direction"] == "strengthens").sum()),
        "edges_weakening": int((trends["direction"] == "weakens").sum()),
    }
    evals = t["evals"]
    if len(evals):
        first = evals.iloc[0]
        last = evals.iloc[-1]
        for key in evals.columns:
            if key != "step":
                out[f"first_{key}"] = first[key]
                out[f"final_{key}"] = last[key]
        out["final_eval_step"] = int(last["step"])
    if "weights_moved" in t:
        moved = t["weights_moved"]
        last = moved[moved["step"] == moved["step"].max()]
        for row in last.itertuples(index=False):
            out[f"weight_share_{row.component}"] = row.share_sq_change
            out[f"moved_{row.component}s"] = f"{row.n_moved}/{row.n_components}"
    return {k: _number(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------
def run_figures(result: RunAnalysis) -> dict[str, go.Figure]:
    """Every figure of one run, by name (the order of the report)."""
    store, t = result.store, result.tables
    figs: dict[str, go.Figure] = {}
    label = result.label
    figs["training"] = P.training_curves(t["metrics"], t["evals"], title=f"Training: {label}")
    first, last = store.steps[0], store.steps[-1]
    for name, step in (("circuit_first", first), ("circuit_last", last)):
        nodes, edges = A.circuit_tables(store, step)
        figs[name] = P.circuit_graph(
            nodes, edges, title=f"Circuit at step {step} ({len(edges)} edges)"
        )
    nodes, edges = A.circuit_evolution(store)
    figs["circuit_animation"] = P.circuit_animation(
        nodes, edges, title=f"Circuit over training: {label}"
    )
    figs["sizes"] = P.size_figure(t["sizes"])
    figs["churn"] = P.churn_figure(t["churn"])
    figs["membership"] = P.evolution_heatmap(t["node_membership"], kind="membership")
    if t["node_scores"].shape[1]:
        figs["node_scores"] = P.evolution_heatmap(t["node_scores"], kind="score")
    figs["layer_composition"] = P.layer_composition_figure(t["layer_composition"])
    figs["node_events"] = P.events_figure(t["node_events"], store.node_names)
    if len(t["membership_flows"]):
        figs["membership_sankey"] = P.membership_sankey(t["membership_flows"])
    if "edge_trajectories" in t:
        figs["edge_trajectories"] = P.edge_trajectories_figure(
            t["edge_trajectories"], t["edge_trends"]
        )
        figs["rank_changes"] = P.rank_change_figure(t["rank_changes"])
    if "head_roles" in t:
        figs["head_dla"] = P.head_heatmaps(t["head_roles"], "dla")
        figs["head_attention"] = P.head_heatmaps(t["head_roles"], "attention_ratio")
        figs["head_dla_trajectories"] = P.head_role_trajectories(t["head_roles"], "dla")
        figs["head_attention_trajectories"] = P.head_role_trajectories(
            t["head_roles"], "attention_to_subject"
        )
    if "weight_changes" in t:
        figs["weight_changes"] = P.weight_change_heatmaps(t["weight_changes"])
    return figs


def comparison(
    results: Sequence[RunAnalysis],
) -> tuple[dict[str, pd.DataFrame], dict[str, go.Figure], dict[str, Any]]:
    """Tables, figures and key numbers comparing several runs."""
    stores = {r.label: r.store for r in results}
    tables: dict[str, pd.DataFrame] = {}
    figs: dict[str, go.Figure] = {}
    numbers: dict[str, Any] = {}
    finals = A.final_evals(stores)
    tables["final_evals"] = finals
    metrics = [
        m
        for m in ("dev_metric", "dev_accuracy", "general_loss", "faithfulness")
        if m in finals.columns
    ]
    if metrics:
        figs["final_bars"] = P.final_metrics_bars(finals, metrics)
    curves = A.strategy_curves(stores)
    tables["strategy_curves"] = curves
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
        tables["final_weight_changes"] = changes[changes["step"] == last].reset_index(drop=True)
        figs["weight_changes"] = P.weight_change_heatmaps(tables["final_weight_changes"])
        summary = A.where_weights_moved(tables["final_weight_changes"])
        tables["weights_moved"] = summary
        figs["weight_share"] = P.weight_share_bars(summary)
    overlaps = []
    base = A.CircuitSets.from_store(results[0].store, label=results[0].label)
    for other in results[1:]:
        summary, _ = A.compare_circuits(
            base, A.CircuitSets.from_store(other.store, label=other.label)
        )
        overlaps.append(summary)
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
# writing tables and the HTML page
# ---------------------------------------------------------------------------------------------
def write_tables(
    result: RunAnalysis, out_dir: str | Path, *, figures: bool = False
) -> dict[str, Path]:
    """Write each table of ``result`` as ``<name>.csv`` (wide node x step tables keep their node
    index), ``summary.json`` (key numbers and notes) and, with ``figures``, every figure under
    ``figures/`` (`circuitdyn.plots.save_figure`). Returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, table in result.tables.items():
        path = out / f"{name}.csv"
        wide = name in ("node_membership", "node_scores")
        table.to_csv(path, index=wide)
        written[name] = path
    summary = {"summary": result.summary, "notes": result.notes}
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=_number) + "\n")
    written["summary"] = path
    if figures:
        for name, fig in run_figures(result).items():
            for p in P.save_figure(fig, out / "figures" / name):
                written[f"figure:{p.name}"] = p
    return written


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table.numbers { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1em; }
table.numbers td, table.numbers th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.numbers th { background: #f4f4f4; }
.note { color: #8a5300; background: #fff6e5; padding: 4px 8px; border-left: 3px solid #e0a030; }
.figure { margin: 1em 0; }
.scroll { overflow-x: auto; }
nav a { margin-right: 1em; }
"""

# Records uncaught script errors on <body data-js-errors>, so a headless check (and a reader's
# devtools) can tell that every figure was drawn.
_ERROR_PROBE = """
document.addEventListener("DOMContentLoaded", function () {
  document.body.setAttribute("data-js-errors", "0");
});
window.addEventListener("error", function () {
  var b = document.body; if (!b) return;
  b.setAttribute("data-js-errors", String(Number(b.getAttribute("data-js-errors") || 0) + 1));
});
"""


def _table_html(frame: pd.DataFrame, max_rows: int = 30) -> str:
    shown = frame.head(max_rows)
    table = shown.to_html(
        classes="numbers", index=False, border=0, na_rep="–", float_format=lambda v: f"{v:.4g}"
    )
    more = f"<p>({len(frame) - max_rows} more rows not shown)</p>" if len(frame) > max_rows else ""
    return f'<div class="scroll">{table}</div>{more}'


def _numbers_html(numbers: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in numbers.items()
    )
    return f'<table class="numbers">{rows}</table>'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


class _Page:
    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.n_figures = 0

    def section(self, title: str) -> None:
        anchor = f"s{len(self.toc)}"
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def heading(self, text: str) -> None:
        self.parts.append(f"<h3>{html.escape(text)}</h3>")

    def text(self, text: str, css: str | None = None) -> None:
        cls = f' class="{css}"' if css else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def figure(self, fig: go.Figure) -> None:
        self.n_figures += 1
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"fig{self.n_figures}",
            config={"responsive": True, "displaylogo": False},
        )
        self.parts.append(f'<div class="figure">{div}</div>')

    def render(self) -> str:
        from plotly.offline import get_plotlyjs

        nav = " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self.toc)
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(self.title)}</title>\n<style>{_STYLE}</style>\n"
            f"<script>{_ERROR_PROBE}</script>\n"
            f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head>\n<body>\n'
            f"<h1>{html.escape(self.title)}</h1>\n<nav>{nav}</nav>\n"
            + "\n".join(self.parts)
            + "\n</body>\n</html>\n"
        )


_RUN_TABLE_NOTES = {
    "stable_core": "Stable core: nodes in the circuit in at least 90% of the recorded steps.",
    "phase_overlap": "Overlap of the circuits before (first step), during (middle) and after (last step).",
}


def _run_section(page: _Page, result: RunAnalysis, figs: dict[str, go.Figure]) -> None:
    t = result.tables
    page.section(f"Run: {result.label}")
    page.raw(_numbers_html(result.summary))
    for note in result.notes:
        page.text(note, "note")
    groups: list[tuple[str, list[str]]] = [
        ("Training", ["training"]),
        ("The circuit", ["circuit_first", "circuit_last", "circuit_animation"]),
        (
            "Circuit dynamics",
            [
                "sizes",
                "churn",
                "membership",
                "node_scores",
                "layer_composition",
                "node_events",
                "membership_sankey",
            ],
        ),
        ("Edges", ["edge_trajectories", "rank_changes"]),
        (
            "Head roles",
            ["head_dla", "head_attention", "head_dla_trajectories", "head_attention_trajectories"],
        ),
        ("Weight change", ["weight_changes"]),
    ]
    for heading, names in groups:
        present = [n for n in names if n in figs]
        if not present:
            continue
        page.heading(heading)
        for name in present:
            page.figure(figs[name])
        if heading == "Circuit dynamics":
            for key in ("stable_core", "phase_overlap"):
                page.text(_RUN_TABLE_NOTES[key])
                columns = (
                    ["node", "kind", "n_present", "fraction", "n_entries", "n_exits"]
                    if key == "stable_core"
                    else ["step_a", "step_b", "level", "n_a", "n_b", "n_both", "jaccard"]
                )
                page.raw(_table_html(t[key][columns]))
        if heading == "Edges":
            for direction, verb in (("strengthens", "strengthen"), ("weakens", "weaken")):
                rows = A.changing_edges(t["edge_trends"], direction, top_k=10)
                page.text(
                    f"Edges whose |score| trend is to {verb}, significant at BH q < 0.05, "
                    f"steepest first ({len(rows)} shown)."
                )
                if len(rows):
                    page.raw(
                        _table_html(
                            rows[["edge", "mean_score", "slope", "r", "p_value", "q_value"]]
                        )
                    )
        if heading == "Head roles" and "head_role_changes" in t:
            page.text("Largest changes of direct logit attribution (first vs last checkpoint):")
            page.raw(_table_html(t["head_role_changes"].head(10)))


def build_report(
    run_dirs: Sequence[str | Path],
    out: str | Path = "report.html",
    *,
    model: bool = True,
    title: str | None = None,
    top_k: int = 10,
    n_examples: int = 64,
    max_checkpoints: int = 6,
) -> Path:
    """Write one self-contained HTML report of one run, or of several runs with a comparison
    section first, and return its path."""
    if not run_dirs:
        raise ValueError("build_report needs at least one run directory")
    stores = [RunStore.open(d) for d in run_dirs]
    labels = A.run_labels(stores)
    results = [
        analyze_run(
            s,
            label=lab,
            model=model,
            top_k=top_k,
            n_examples=n_examples,
            max_checkpoints=max_checkpoints,
        )
        for s, lab in zip(stores, labels, strict=True)
    ]
    page = _Page(
        title
        or (
            f"circuitdyn report: {labels[0]}"
            if len(results) == 1
            else f"circuitdyn report: {len(results)} runs"
        )
    )
    if len(results) > 1:
        tables, figs, numbers = comparison(results)
        page.section("Comparison of runs")
        columns = [c for c in tables["final_evals"].columns if c != "directory"]
        page.raw(_table_html(tables["final_evals"][columns]))
        for name in (
            "final_bars",
            "curves_dev_metric",
            "curves_general_loss",
            "curves_faithfulness",
            "weight_changes",
            "weight_share",
            "overlap",
        ):
            if name in figs:
                page.figure(figs[name])
        if "final_circuit_overlap" in tables:
            page.text(f"Overlap of each run's final circuit with that of {labels[0]}:")
            page.raw(_table_html(tables["final_circuit_overlap"]))
        for name, fig in figs.items():
            if name.startswith("intrinsic_dimension"):
                page.figure(fig)
                page.raw(_numbers_html(numbers[name]))
    for result in results:
        _run_section(page, result, run_figures(result))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page.render(), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
