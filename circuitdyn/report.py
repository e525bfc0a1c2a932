"""The HTML report of one run or of several (``circuitdyn report``).

One page that works offline (plotly.js embedded once; ``plotlyjs="directory"`` writes it beside
the page instead), laid out as:

1. the title, the conventions (the step convention, the edge-sign convention, the key steps),
   and any warning (a partial run);
2. a nested table of contents;
3. for several runs, the comparison first: final evaluations and curves per strategy (runs
   that differ only in their seed are one strategy: mean ± std over seeds), circuit size and
   churn per strategy, head roles over seeds, where the weights moved, circuit overlap,
   intrinsic dimension;
4. each run in its own collapsible section (open for a single run): key numbers, then its
   figures grouped (training, the circuit, dynamics, edges, head roles, weights), each with a
   caption saying what to look for (`circuitdyn.analysis.pipeline.FIGURE_CAPTIONS`).

Figures are stored as compact JSON (floats as float32, one shared template) and drawn when
they scroll into view, so a long report opens at once; ``details`` limits the per-run
sections to some runs (the comparison still uses every run).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from tqdm import tqdm

from circuitdyn import analysis as A
from circuitdyn import plots as P
from circuitdyn.analysis.pipeline import (
    FIGURE_CAPTIONS,
    RunAnalysis,
    analyze_run,
    comparison,
    comparison_caption,
    run_figures,
)
from circuitdyn.store import RunStore

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1250px; padding: 1em 2em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { margin-top: 1.6em; }
table.numbers { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1em; }
table.numbers td, table.numbers th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.numbers th { background: #f4f4f4; }
.note { color: #8a5300; background: #fff6e5; padding: 4px 8px; border-left: 3px solid #e0a030; }
.conventions { background: #f6f8fa; padding: 6px 12px; border-left: 3px solid #4c72b0; }
figure { margin: 1.2em 0 1.6em; }
figcaption { color: #444; font-size: 0.92em; margin-top: 2px; max-width: 60em; }
div.cd-plot { min-height: 480px; }
.scroll { overflow-x: auto; }
nav.toc ul { margin: 0.2em 0; } nav.toc li { margin: 0.15em 0; }
nav.toc ul ul { padding-left: 1.2em; } nav.toc ul ul li { display: inline; margin-right: 1.1em; }
details.run { border-top: 1px solid #ddd; margin-top: 1.5em; }
details.run > summary { cursor: pointer; font-size: 1.3em; font-weight: 600; padding: 0.5em 0; }
"""

# Records uncaught script errors on <body data-js-errors>, so a headless check (and a reader's
# devtools) can tell that every figure was drawn.
_ERROR_PROBE = """
document.addEventListener("DOMContentLoaded", function () {
  if (!document.body.hasAttribute("data-js-errors")) document.body.setAttribute("data-js-errors", "0");
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


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


class _Page:
    """An HTML page under construction: sections (h2) and subsections (h3) feed a nested table
    of contents; figures are stored as JSON and drawn lazily by the page script."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []
        self.toc: list[tuple[int, str, str]] = []  # (level, anchor, title)
        self.anchors: set[str] = set()
        self.n_figures = 0
        self.figure_bytes = 0

    def _unique(self, text: str) -> str:
        base = anchor = _anchor(text)
        i = 2
        while anchor in self.anchors:
            anchor = f"{base}-{i}"
            i += 1
        self.anchors.add(anchor)
        return anchor

    def section(self, title: str) -> str:
        anchor = self._unique(title)
        self.toc.append((1, anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')
        return anchor

    def heading(self, text: str, *, prefix: str = "") -> None:
        anchor = self._unique(f"{prefix} {text}")
        self.toc.append((2, anchor, text))
        self.parts.append(f'<h3 id="{anchor}">{html.escape(text)}</h3>')

    def text(self, text: str, css: str | None = None) -> None:
        cls = f' class="{css}"' if css else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def figure(self, fig: go.Figure, caption: str = "") -> None:
        self.n_figures += 1
        div_id = f"fig{self.n_figures}"
        data = P.figure_json(fig).replace("</", "<\\/")
        self.figure_bytes += len(data)
        height = int(fig.layout.height or 480)
        caption_html = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(
            f'<figure><div class="cd-plot" id="{div_id}" style="min-height:{height}px"></div>'
            f'<script type="application/json" id="{div_id}-json">{data}</script>'
            f"{caption_html}</figure>"
        )

    def _toc_html(self) -> str:
        out = ['<nav class="toc"><strong>Contents</strong><ul>']
        open_sub = False
        for level, anchor, title in self.toc:
            link = f'<a href="#{anchor}">{html.escape(title)}</a>'
            if level == 1:
                if open_sub:
                    out.append("</ul></li>")
                    open_sub = False
                out.append(f"<li>{link}")
                out.append("<ul>")
                open_sub = True
            else:
                out.append(f"<li>{link}</li>")
        if open_sub:
            out.append("</ul></li>")
        out.append("</ul></nav>")
        return "".join(out).replace("<ul></ul>", "")

    def render(self, plotlyjs: str = "inline") -> str:
        from plotly.offline import get_plotlyjs

        template = json.dumps(pio.templates[P.TEMPLATE].to_plotly_json(), separators=(",", ":"))
        if plotlyjs == "inline":
            library = f'<script type="text/javascript">{get_plotlyjs()}</script>'
        else:
            library = '<script type="text/javascript" src="plotly.min.js"></script>'
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(self.title)}</title>\n<style>{_STYLE}</style>\n"
            f"<script>{_ERROR_PROBE}</script>\n{library}\n"
            f"<script>{P.explorer_script()}</script>\n</head>\n<body>\n"
            f"<h1>{html.escape(self.title)}</h1>\n"
            + "\n".join(self.parts[:1])
            + f"\n{self._toc_html()}\n"
            + "\n".join(self.parts[1:])
            + f'\n<script type="application/json" id="cd-template">{template}</script>\n'
            f"<script>{P._asset_js('report.js')}</script>\n"
            "</body>\n</html>\n"
        )


CONVENTIONS = (
    f"Steps: {A.STEP_CONVENTION}; a snapshot at step t holds the circuit used for update t, the "
    "final evaluation sits one past the last snapshot. Edges: score = m(edge ablated) − m(clean) "
    "in logits of m = logit(target) − logit(foil); blue edges support the target over the foil "
    "(score < 0), red ones favour the foil (score > 0). Key steps (dotted lines on every step "
    "axis): where the dev metric crosses 0 and where dev accuracy first reaches 50% and 90%."
)

_RUN_TABLE_NOTES = {
    "stable_core": "Stable core: nodes in the circuit in at least 90% of the recorded steps.",
    "phase_overlap": "Overlap of the circuits at the key steps.",
}

_GROUPS: list[tuple[str, list[str]]] = [
    ("Training", ["training"]),
    ("The circuit", ["circuit_key_steps", "circuit_explorer", "circuit_diff"]),
    (
        "Circuit dynamics",
        [
            "sizes",
            "churn",
            "edge_membership",
            "node_scores",
            "node_shares",
            "layer_composition",
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


def _run_section(
    page: _Page, result: RunAnalysis, figs: dict[str, go.Figure], *, open_: bool
) -> None:
    t = result.tables
    anchor = page._unique(f"run {result.label}")
    page.toc.append((1, anchor, f"Run: {result.label}"))
    final = result.summary.get("final_dev_accuracy")
    brief = f" — final dev accuracy {final:.0%}" if isinstance(final, float) else ""
    page.raw(
        f'<details class="run" id="{anchor}"{" open" if open_ else ""}>'
        f"<summary>Run: {html.escape(result.label)}{html.escape(brief)}</summary>"
    )
    page.raw(_numbers_html(result.summary))
    for note in result.notes:
        page.text(note, "note")
    if "key_steps" in t and len(t["key_steps"]):
        page.text(
            "Key steps: "
            + "; ".join(f"{r.label} at t={r.step}" for r in t["key_steps"].itertuples(index=False))
        )
    for heading, names in _GROUPS:
        present = [n for n in names if n in figs]
        if not present:
            continue
        page.heading(heading, prefix=result.label)
        for name in present:
            page.figure(figs[name], FIGURE_CAPTIONS.get(name, ""))
        if heading == "Circuit dynamics":
            for key in ("stable_core", "phase_overlap"):
                page.text(_RUN_TABLE_NOTES[key])
                columns = (
                    ["node", "kind", "n_present", "fraction", "n_entries", "n_exits"]
                    if key == "stable_core"
                    else ["step_a", "step_b", "level", "n_a", "n_b", "n_both", "jaccard"]
                )
                page.raw(_table_html(t[key][[c for c in columns if c in t[key].columns]]))
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
    page.raw("</details>")


def build_report(
    run_dirs: Sequence[str | Path],
    out: str | Path = "report.html",
    *,
    model: bool = True,
    title: str | None = None,
    top_k: int = 10,
    n_examples: int = 64,
    max_checkpoints: int = 40,
    details: Sequence[str | Path] | None = None,
    plotlyjs: str = "inline",
    progress: bool = False,
) -> Path:
    """Write the HTML report of one run, or of several runs with a comparison first, and
    return its path. ``details``: the runs that get their own section (default: every run;
    the comparison always uses all of them); ``plotlyjs``: ``"inline"`` (one self-contained
    file) or ``"directory"`` (``plotly.min.js`` written beside the page). ``model``, ``top_k``,
    ``n_examples`` and ``max_checkpoints`` go to `circuitdyn.analysis.pipeline.analyze_run`;
    ``progress``: tqdm bars. Raises FileNotFoundError / `StoreError` for a directory that is
    not a run."""
    if not run_dirs:
        raise ValueError("build_report needs at least one run directory")
    stores = [RunStore.open(d) for d in run_dirs]
    labels = A.run_labels(stores)
    detailed = (
        {Path(d).resolve() for d in details}
        if details is not None
        else {Path(s.directory).resolve() for s in stores}
    )
    runs = tqdm(
        list(zip(stores, labels, strict=True)), desc="runs", disable=not progress or len(stores) < 2
    )
    options = {"top_k": top_k, "n_examples": n_examples, "max_checkpoints": max_checkpoints}
    results = [
        analyze_run(s, label=label, model=model, progress=progress, **options) for s, label in runs
    ]
    several = len(results) > 1
    page = _Page(title or f"circuitdyn report: {f'{len(results)} runs' if several else labels[0]}")
    page.raw(f'<p class="conventions">{html.escape(CONVENTIONS)}</p>')
    for result in results:
        note = result.progress.note()
        if note:
            page.text(f"{result.label}: {note}", "note")
    if several:
        _comparison_section(page, results)
    shown = [r for r in results if Path(r.store.directory).resolve() in detailed]
    for result in shown:
        figs = run_figures(result, progress=progress)
        _run_section(page, result, figs, open_=len(shown) == 1)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if plotlyjs == "directory":
        from plotly.offline import get_plotlyjs

        (path.parent / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")
    path.write_text(page.render(plotlyjs), encoding="utf-8")
    return path


_COMPARISON_GROUPS: list[tuple[str, list[str]]] = [
    ("Final evaluation", ["final_bars"]),
    (
        "Learning curves",
        ["curves_dev_metric", "curves_dev_accuracy", "curves_general_loss"],
    ),
    ("Faithfulness", ["curves_faithfulness_masked"]),
    ("Circuit size and churn", ["sizes_over_seeds", "churn_over_seeds"]),
    ("Head roles over seeds", ["head_roles_over_seeds"]),
    ("Where the weights moved", ["weight_changes", "weight_share"]),
    ("Circuit overlap", ["overlap"]),
]


def _comparison_section(page: _Page, results: Sequence[RunAnalysis]) -> None:
    tables, figs, numbers = comparison(results)
    page.section("Comparison of runs")
    finals = tables["final_evals"].drop(columns="directory")
    table = _table_html(finals)
    if len(finals) > 10:  # many runs (seeds x rates): the figures first, the numbers on demand
        table = (
            f"<details><summary>Final evaluation of each run ({len(finals)} runs)</summary>"
            f"{table}</details>"
        )
    page.raw(table)
    for heading, names in _COMPARISON_GROUPS:
        present = [n for n in names if n in figs]
        if not present:
            continue
        page.heading(heading, prefix="comparison")
        for name in present:
            page.figure(figs[name], comparison_caption(name))
        if heading == "Circuit overlap" and "final_circuit_overlap" in tables:
            page.text("Overlap of each strategy's final circuit with the first one's:")
            page.raw(_table_html(tables["final_circuit_overlap"]))
    dimensions = [name for name in figs if name.startswith("intrinsic_dimension")]
    if dimensions:
        page.heading("Intrinsic dimension", prefix="comparison")
        for name in dimensions:
            page.figure(figs[name], comparison_caption(name))
            page.raw(_numbers_html(numbers[name]))


def report_figures(
    run_dirs: Sequence[str | Path], *, model: bool = False, **options: Any
) -> dict[str, go.Figure]:
    """Every figure a report of these runs draws, by ``"comparison/<name>"`` and
    ``"<run label>/<name>"`` (for checks of the figures; the report itself is `build_report`)."""
    stores = [RunStore.open(d) for d in run_dirs]
    results = [
        analyze_run(s, label=label, model=model, **options)
        for s, label in zip(stores, A.run_labels(stores), strict=True)
    ]
    out: dict[str, go.Figure] = {}
    if len(results) > 1:
        out.update({f"comparison/{k}": v for k, v in comparison(results)[1].items()})
    for result in results:
        out.update({f"{result.label}/{k}": v for k, v in run_figures(result).items()})
    return out
