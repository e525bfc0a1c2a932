"""The HTML report of one run or of several (``circuitdyn report``): one self-contained page,
plotly.js embedded once (it works offline), with the key numbers and every figure of each run
(`circuitdyn.analysis.pipeline`), and for several runs a comparison section first (final
evaluations, curves per strategy, where the weights moved, overlap of the final circuits, and the
intrinsic-dimension curve when runs differ in top_n). A partial run (stopped before its final
evaluation) is marked as such, at the top of the page and in its section.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from tqdm import tqdm

from circuitdyn import analysis as A
from circuitdyn.analysis.pipeline import RunAnalysis, analyze_run, comparison, run_figures
from circuitdyn.store import RunStore

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
    progress: bool = False,
) -> Path:
    """Write one self-contained HTML report of one run, or of several runs with a comparison
    section first, and return its path. ``model``, ``top_k``, ``n_examples`` and
    ``max_checkpoints`` go to `circuitdyn.analysis.pipeline.analyze_run`; ``progress``: tqdm
    bars over the runs, the analyses and the figures. Raises FileNotFoundError / `StoreError`
    for a directory that is not a run."""
    if not run_dirs:
        raise ValueError("build_report needs at least one run directory")
    stores = [RunStore.open(d) for d in run_dirs]
    labels = A.run_labels(stores)
    runs = tqdm(
        list(zip(stores, labels, strict=True)), desc="runs", disable=not progress or len(stores) < 2
    )
    options = {"top_k": top_k, "n_examples": n_examples, "max_checkpoints": max_checkpoints}
    results = [
        analyze_run(s, label=label, model=model, progress=progress, **options) for s, label in runs
    ]
    several = len(results) > 1
    page = _Page(title or f"circuitdyn report: {f'{len(results)} runs' if several else labels[0]}")
    for result in results:
        note = result.progress.note()
        if note:
            page.text(f"{result.label}: {note}", "note")
    if several:
        _comparison_section(page, results)
    for result in results:
        _run_section(page, result, run_figures(result, progress=progress))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page.render(), encoding="utf-8")
    return path


_COMPARISON_FIGURES = (
    "final_bars",
    "curves_dev_metric",
    "curves_general_loss",
    "curves_faithfulness",
    "weight_changes",
    "weight_share",
    "overlap",
)


def _comparison_section(page: _Page, results: Sequence[RunAnalysis]) -> None:
    tables, figs, numbers = comparison(results)
    page.section("Comparison of runs")
    page.raw(_table_html(tables["final_evals"].drop(columns="directory")))
    for name in _COMPARISON_FIGURES:
        if name in figs:
            page.figure(figs[name])
    if "final_circuit_overlap" in tables:
        page.text(f"Overlap of each run's final circuit with that of {results[0].label}:")
        page.raw(_table_html(tables["final_circuit_overlap"]))
    for name, fig in figs.items():
        if name.startswith("intrinsic_dimension"):
            page.figure(fig)
            page.raw(_numbers_html(numbers[name]))
