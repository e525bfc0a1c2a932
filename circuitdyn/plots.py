"""Figures: pure functions from analysis tables (`circuitdyn.analysis`) to plotly figures.

Every builder takes pandas tables (never a model or a store) and returns a
``plotly.graph_objects.Figure`` with a title, axis titles with units and, where it has several
traces, a legend. The data in a figure is the table's data (the tests check that, and that
every trace has a finite point: `tests/figure_check.py`).

Conventions shared by every figure:

* Step axis: step t is the state before update t (the weights after t updates); the x-axis title
  is `STEP_AXIS` everywhere. Figures over steps take ``keys`` (a `key_steps` table) and mark
  the events (dev metric crossing zero, dev accuracy reaching 50% / 90%) as dotted lines.
* Edge colour (`EDGE_SIGN_NOTE`): the stored score of an edge is m(edge ablated) − m(clean)
  (EAP / EAP-IG); its *effect* is the negative, m(clean) − m(edge ablated). Blue edges support
  the target over the foil (removing them lowers the metric: score < 0), red ones favour the
  foil (score > 0). When the task metric changes sign during tuning, the same edges change
  colour: they carry the same information, now pushing towards the other token.
* Seeds: tables with a ``group`` column and several runs per group are drawn as the mean over
  seeds with a band of ± one standard deviation (`circuitdyn.analysis.seeds.over_seeds`).

Figures:

* The circuit: `circuit_graph` (one step), `circuit_small_multiples` (the key steps side by
  side: the static picture for the README), `circuit_diff_graph` (gained / lost / changed
  edges between two steps), `circuit_explorer` (interactive: step slider, key-step buttons,
  edge-threshold slider, click a node to highlight its edges; needs `figure_html`).
* Dynamics: `evolution_heatmap`, `membership_raster`, `churn_figure`, `size_figure`,
  `layer_composition_figure`, `events_figure`, `membership_sankey`.
* Edges: `edge_trajectories_figure`, `rank_change_figure`.
* Heads and weights: `head_heatmaps`, `head_role_trajectories`, `weight_change_heatmaps`,
  `weight_share_bars`.
* Several runs: `strategy_curves_figure`, `band_figure`, `final_metrics_bars`,
  `intrinsic_dimension_figure`, `overlap_figure`, `faithfulness_curve_figure`,
  `training_curves`.
* Output: `figure_html` (HTML of one figure, never autoplaying, with the explorer's script),
  `save_figure` (HTML and PNG at >= 1400 px wide).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuitdyn.graph import parse_node

logger = logging.getLogger(__name__)

POSITIVE = "#2166ac"
"""Colour of edges that support the target over the foil (score < 0, effect > 0)."""
NEGATIVE = "#b2182b"
"""Colour of edges that favour the foil (score > 0)."""
UNSCORED = "#9e9e9e"
GAINED = "#1a9850"
LOST = "#8c8c8c"
FLIPPED = "#762a83"
KIND_COLOURS = {"input": "#55a868", "logits": "#55a868", "head": "#4c72b0", "mlp": "#dd8452"}
OUT_OF_CIRCUIT = "#e4e4e4"
TEMPLATE = "plotly_white"
FONT = {"size": 13}

STEP_AXIS = "training step t (state before update t)"
"""The x-axis title of every figure over training steps (the one step convention)."""

EDGE_SIGN_NOTE = (
    "blue: the edge supports the target over the foil (score < 0: removing it lowers the "
    "metric); red: it favours the foil (score > 0). score = m(edge ablated) − m(clean)"
)
"""How edge colours read (every circuit figure says it in its legend)."""

SUPPORTS = "supports target over foil (score < 0)"
FAVOURS = "favours the foil (score > 0)"

METRIC_LABELS = {
    "dev_metric": "dev metric: logit(target) − logit(foil) (logits)",
    "dev_accuracy": "dev accuracy (fraction of verbs)",
    "general_loss": "general LM loss (nats/token)",
    "dev_cap_mean": "held-out capability accuracy (mean of determiner, selection, copy)",
    "faithfulness": "faithfulness (circuit / model metric, ratio)",
    "faithfulness_masked": "faithfulness (circuit / model metric; masked where |model metric| is small)",
    "loss": "training loss (nats/token)",
    "metric": "training-batch metric (logits)",
    "accuracy": "training-batch accuracy (fraction)",
    "grad_norm": "gradient norm (before clipping)",
    "lr": "learning rate",
    "n_edges": "circuit edges (count)",
    "n_nodes": "circuit nodes (count)",
    "n_heads": "circuit heads (count)",
    "jaccard_edges_prev_smoothed": "edge Jaccard with the previous step (smoothed, 0–1)",
    "jaccard_edges_first": "edge Jaccard with the first step's circuit (0–1)",
}
_SHORT_LABELS = {
    "dev_metric": "dev metric",
    "dev_accuracy": "dev accuracy",
    "general_loss": "general loss",
    "faithfulness": "faithfulness",
    "test_metric": "test metric",
    "test_accuracy": "test accuracy",
    "test_general_loss": "test general loss",
    "test_cap_mean": "test capability accuracy",
}
_UNITS = {
    "dev_metric": "logits",
    "dev_accuracy": "fraction",
    "general_loss": "nats/token",
    "faithfulness": "ratio",
    "test_metric": "logits",
    "test_accuracy": "fraction",
    "test_general_loss": "nats/token",
}
ROLE_LABELS = {
    "dla": "direct logit attribution (logits)",
    "attention_to_subject": "attention to subject (probability)",
    "attention_ratio": "attention to subject / uniform (ratio)",
    "uniform_baseline": "uniform attention baseline (probability)",
}

FINAL_METRICS = ("dev_metric", "dev_accuracy", "general_loss", "faithfulness")
"""The metrics of a final evaluation shown side by side (`final_metrics_bars`)."""

LEGEND_ONLY = "legend"
"""``trace.meta`` of a data-less trace that only carries a legend entry (figure checks skip it)."""
SLOT = "slot"
"""``trace.meta`` of an explorer trace that may be empty at the shown step (checks skip it)."""


def _label(name: str, labels: dict[str, str] = METRIC_LABELS) -> str:
    return labels.get(name, name)


def _finish(
    fig: go.Figure, title: str, x_title: str | None = None, y_title: str | None = None
) -> go.Figure:
    fig.update_layout(title={"text": title}, template=TEMPLATE, font=FONT)
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    named = {t.name for t in fig.data if t.name and t.showlegend is not False}
    fig.update_layout(showlegend=len(named) > 1)
    return fig


def _legend_entry(name: str, colour: str, *, mode: str = "lines", **style: Any) -> go.Scatter:
    """A data-less trace that shows one legend entry."""
    marker = {"color": colour, "size": 12, **style.get("marker", {})}
    line = {"color": colour, "width": 4, **style.get("line", {})}
    return go.Scatter(
        x=[None],
        y=[None],
        mode=mode,
        marker=marker,
        line=line,
        name=name,
        hoverinfo="skip",
        showlegend=True,
        meta=LEGEND_ONLY,
        legendgroup=style.get("legendgroup"),
    )


def mark_key_steps(fig: go.Figure, keys: pd.DataFrame | None) -> go.Figure:
    """Dotted vertical lines at the events of a `key_steps` table (not its initial / final
    rows) across every subplot, labelled once at the top of the (first) plot area, labels of
    successive events stacked; several events at one step share a line and a label."""
    if keys is None or len(keys) == 0:
        return fig
    events = keys[~keys["key"].isin(["initial", "final"])]
    merged = events.groupby("step", sort=True)["label"].agg(" / ".join)
    for i, (step, label) in enumerate(merged.items()):
        fig.add_vline(x=float(step), line={"dash": "dot", "color": "#555", "width": 1.5})
        fig.add_annotation(
            x=float(step),
            xref="x",
            y=1.0,
            yref="paper",
            yanchor="top",
            xanchor="left",
            xshift=3,
            yshift=-2 - 16 * (i % 3),
            showarrow=False,
            text=f"{label} (t={int(step)})",
            font={"size": 11, "color": "#333"},
            bgcolor="rgba(255,255,255,0.85)",
        )
    return fig


def _right_axis_line(
    fig: go.Figure,
    table: pd.DataFrame,
    x: str,
    y: str,
    name: str,
    unit: str,
    mode: str = "lines+markers",
    from_zero: bool = True,
) -> None:
    """A grey dashed line of ``table[y]`` on the right axis of a secondary-y figure, titled
    ``name (unit)``, when the column is there with any value; `from_zero`: the axis starts at 0
    (off: it fits the values, for small changes of a large quantity)."""
    if y not in table.columns or not table[y].notna().any():
        return
    line = {"color": "#777", "dash": "dash"}
    fig.add_trace(
        go.Scatter(x=table[x], y=table[y], mode=mode, name=name, line=line), secondary_y=True
    )
    fig.update_yaxes(
        title_text=f"{name} ({unit})",
        secondary_y=True,
        rangemode="tozero" if from_zero else "normal",
        tickformat=None if from_zero else ".3f",
        showgrid=False,  # the grid is the left axis's
    )


# ---------------------------------------------------------------------------------------------
# the circuit as a layered graph
# ---------------------------------------------------------------------------------------------
HEAD_GAP = 1.3
"""Height of the lowest head row above the residual lane (y = 0), in head rows."""
PORT_OFFSETS = {"q": (-0.2, 0.26), "k": (-0.26, 0.0), "v": (-0.2, -0.26)}
"""Where a head's q / k / v input port sits relative to the head (x in columns, y in rows)."""
PATH_POINTS = 11
"""Points per drawn edge (a quadratic Bézier curve)."""


def node_positions(node_names: Sequence[str]) -> pd.DataFrame:
    """Layout of the layered graph, layers left to right: ``node``, ``kind``, ``x`` (column:
    input 0, heads of layer L 2L+1, MLP of layer L 2L+2, logits 2 * n_layers + 1), ``y``
    (the residual-stream nodes input, MLPs and logits on the bottom lane y = 0; the heads of a
    layer stacked above it, h0 on top; an MLP split into neuron blocks ``m{L}.b{B}`` has its
    blocks spread over the same height, block 0 on top), ``column`` (the tick label of x).
    Raises ValueError for a name that is not a circuitdyn node."""
    infos = [parse_node(name) for name in node_names]
    n_layers = 1 + max((i.layer for i in infos if i.layer is not None), default=-1)
    n_heads = 1 + max((i.head for i in infos if i.head is not None), default=0)
    n_blocks = 1 + max((getattr(i, "block", None) or 0 for i in infos), default=0)
    rows = []
    for info in infos:
        block = getattr(info, "block", None)
        if info.kind == "mlp" and block is not None:  # MLP neuron blocks: spread up the column
            frac = 1 - block / (n_blocks - 1) if n_blocks > 1 else 0.0
            y = HEAD_GAP + (max(n_heads, 2) - 1) * frac
            rows.append((info.name, "mlp", 2 * info.layer + 2, y, f"L{info.layer} MLP"))
        elif info.kind == "head":
            y = HEAD_GAP + (n_heads - 1 - info.head)
            rows.append((info.name, "head", 2 * info.layer + 1, y, f"L{info.layer} heads"))
        elif info.kind == "mlp":
            rows.append((info.name, "mlp", 2 * info.layer + 2, 0.0, f"L{info.layer} MLP"))
        elif info.kind == "input":
            rows.append((info.name, "input", 0, 0.0, "input"))
        else:
            rows.append((info.name, "logits", 2 * n_layers + 1, 0.0, info.name))
    return pd.DataFrame(rows, columns=["node", "kind", "x", "y", "column"])


def port_positions(positions: pd.DataFrame) -> pd.DataFrame:
    """The q / k / v input ports of every head of a `node_positions` table: ``node``,
    ``input``, ``x``, ``y``, ``port`` (``"a1.h0<q>"``)."""
    heads = positions[positions["kind"] == "head"]
    rows = [
        (row.node, name, row.x + dx, row.y + dy, f"{row.node}<{name}>")
        for row in heads.itertuples(index=False)
        for name, (dx, dy) in PORT_OFFSETS.items()
    ]
    return pd.DataFrame(rows, columns=["node", "input", "x", "y", "port"])


def edge_paths(
    edges: pd.DataFrame, positions: pd.DataFrame, n_points: int = PATH_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """Curves of ``edges`` (``src``, ``dst_node``, ``input``) as (xs, ys), each [n_edges,
    n_points]: quadratic Bézier curves from the source's right side to the destination's
    input port (a head's q / k / v port, the left side of an MLP or the logits). The bend grows
    with the columns an edge spans, so edges along the residual lane (input -> m0 -> m1 ->
    logits ...) become nested arcs below it instead of overlapping segments on one line."""
    pos = positions.set_index("node")
    x0 = pos.loc[edges["src"], "x"].to_numpy(dtype=float) + 0.14
    y0 = pos.loc[edges["src"], "y"].to_numpy(dtype=float)
    x2 = pos.loc[edges["dst_node"], "x"].to_numpy(dtype=float)
    y2 = pos.loc[edges["dst_node"], "y"].to_numpy(dtype=float)
    offsets = [PORT_OFFSETS.get(i, (-0.14, 0.0)) for i in edges["input"]]
    x2 = x2 + np.array([o[0] for o in offsets], dtype=float)
    y2 = y2 + np.array([o[1] for o in offsets], dtype=float)
    span = np.maximum(np.abs(x2 - x0) - 1.0, 0.0)
    on_lane = (y0 == 0) & (y2 == 0)
    # Control-point offset (the curve's sag is half of it): residual-lane arcs hang below the
    # lane, deeper for longer spans; other edges bow gently upward by their span.
    bend = np.where(on_lane, -(0.45 + 0.55 * span**0.8), 0.18 * span**0.8)
    cx, cy = (x0 + x2) / 2, (y0 + y2) / 2 + bend
    t = np.linspace(0.0, 1.0, n_points)[None, :]
    xs = (1 - t) ** 2 * x0[:, None] + 2 * (1 - t) * t * cx[:, None] + t**2 * x2[:, None]
    ys = (1 - t) ** 2 * y0[:, None] + 2 * (1 - t) * t * cy[:, None] + t**2 * y2[:, None]
    return xs, ys


def _width_bins(abs_scores: np.ndarray, max_abs: float, n_bins: int) -> np.ndarray:
    if max_abs <= 0 or not np.isfinite(max_abs):
        return np.zeros(abs_scores.shape, dtype=int)
    frac = np.clip(abs_scores / max_abs, 0.0, 1.0)
    return np.minimum((frac * n_bins).astype(int), n_bins - 1)


def _bin_style(b: int, n_bins: int) -> tuple[float, float]:
    """(line width in px, opacity) of width bin ``b``."""
    frac = (b + 1) / n_bins
    return 1.0 + 7.0 * frac, 0.35 + 0.6 * frac


def _ranks(abs_scores: np.ndarray) -> np.ndarray:
    keys = np.where(np.isfinite(abs_scores), abs_scores, -np.inf)
    order = np.argsort(-keys, kind="stable")
    ranks = np.empty(len(abs_scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(abs_scores) + 1)
    return ranks


def _shown_edges(edges: pd.DataFrame, max_edges: int | None) -> pd.DataFrame:
    """The ``max_edges`` strongest edges by |score| (unscored ones last), table order kept."""
    if max_edges is None or len(edges) <= max_edges:
        return edges
    ranks = _ranks(np.abs(edges["score"].to_numpy(dtype=float)))
    return edges[ranks <= max_edges]


def _polyline(xs: np.ndarray, ys: np.ndarray, pick: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The curves ``pick`` of (xs, ys) joined into one trace's x / y, NaN between curves (a
    gap; numeric arrays keep the figure's JSON small)."""
    rows = np.flatnonzero(pick)
    gap = np.full((len(rows), 1), np.nan)
    px = np.concatenate([xs[rows], gap], axis=1).ravel() if len(rows) else np.zeros(0)
    py = np.concatenate([ys[rows], gap], axis=1).ravel() if len(rows) else np.zeros(0)
    return px.astype(np.float32), py.astype(np.float32)


def _graph_traces(
    nodes: pd.DataFrame,
    edges: pd.DataFrame,
    positions: pd.DataFrame,
    *,
    n_bins: int = 5,
    highlight: str | None = None,
    keep_slots: bool = False,
    legend: bool = True,
    axes: tuple[str, str] = ("x", "y"),
) -> list[go.Scatter]:
    """The traces of one circuit picture, in a fixed order (the explorer's script relies on
    it): per sign (supports target, then favours foil) ``n_bins`` edge-width traces; one trace
    of faded edges (those not touching ``highlight``); one of unscored edges; one invisible
    hover trace at the curve midpoints (customdata [edge, score, share, rank]); the q/k/v
    ports of every head; every node (fixed order, keyed by name); then legend-only entries.
    Without ``keep_slots``, empty edge traces are dropped. Widths are |score| relative to the
    strongest edge of the table."""
    xref, yref = axes
    score = edges["score"].to_numpy(dtype=float)
    share = (
        edges["share"].to_numpy(dtype=float)
        if "share" in edges.columns
        else np.full(len(edges), np.nan)
    )
    finite = np.isfinite(score)
    abs_score = np.abs(np.where(finite, score, 0.0))
    max_abs = float(abs_score.max(initial=0.0))
    bins = _width_bins(abs_score, max_abs, n_bins)
    ranks = _ranks(np.where(finite, abs_score, np.nan))
    xs, ys = edge_paths(edges, positions) if len(edges) else (np.zeros((0, 1)), np.zeros((0, 1)))
    touches = np.ones(len(edges), dtype=bool)
    if highlight is not None:
        touches = (edges["src"] == highlight).to_numpy() | (
            edges["dst_node"] == highlight
        ).to_numpy()
    common = {"xaxis": xref, "yaxis": yref, "hoverinfo": "skip", "showlegend": False}
    traces: list[go.Scatter] = []
    for sign, colour, label in ((-1, POSITIVE, SUPPORTS), (1, NEGATIVE, FAVOURS)):
        side = (score < 0) if sign < 0 else (score > 0)
        if sign < 0:
            side = side | (score == 0)
        for b in range(n_bins):
            pick = finite & touches & side & (bins == b)
            px, py = _polyline(xs, ys, pick)
            width, opacity = _bin_style(b, n_bins)
            traces.append(
                go.Scatter(
                    x=px,
                    y=py,
                    mode="lines",
                    line={"color": colour, "width": width},
                    opacity=opacity,
                    name=f"edges that {label}",
                    meta=SLOT,
                    **common,
                )
            )
    px, py = _polyline(xs, ys, ~touches)
    traces.append(
        go.Scatter(
            x=px,
            y=py,
            mode="lines",
            line={"color": "#cccccc", "width": 1},
            opacity=0.5,
            name="edges not touching the highlighted node",
            meta=SLOT,
            **common,
        )
    )
    px, py = _polyline(xs, ys, ~finite & touches)
    traces.append(
        go.Scatter(
            x=px,
            y=py,
            mode="lines",
            line={"color": UNSCORED, "width": 1.5, "dash": "dot"},
            name="edges without a score",
            meta=SLOT,
            **common,
        )
    )
    mid = PATH_POINTS // 2
    shown = touches
    custom = np.empty((int(shown.sum()), 4), dtype=object)
    if len(custom):
        custom[:, 0] = edges["edge"].to_numpy(dtype=object)[shown]
        custom[:, 1] = score[shown]
        custom[:, 2] = share[shown]
        custom[:, 3] = ranks[shown]
    traces.append(
        go.Scatter(
            x=np.round(xs[shown, mid], 3) if len(edges) else [],
            y=np.round(ys[shown, mid], 3) if len(edges) else [],
            mode="markers",
            marker={"size": 10, "color": "rgba(0,0,0,0)"},
            customdata=custom,
            hovertemplate="<b>%{customdata[0]}</b><br>score %{customdata[1]:.4g} "
            "(m(ablated) − m(clean), logits)<br>share of the step's Σ|score| "
            "%{customdata[2]:.2%}<br>rank %{customdata[3]} by |score|<extra></extra>",
            name="edge scores (hover)",
            showlegend=False,
            xaxis=xref,
            yaxis=yref,
            meta=SLOT,
        )
    )
    ports = port_positions(positions)
    used = set((edges["dst_node"] + "<" + edges["input"] + ">").to_numpy()[touches & finite]) | set(
        (edges["dst_node"] + "<" + edges["input"] + ">").to_numpy()[touches & ~finite]
    )
    inside_nodes = set(nodes.loc[nodes["in_circuit"].astype(bool), "node"])
    port_used = ports["port"].isin(used).to_numpy()
    port_in = ports["node"].isin(inside_nodes).to_numpy()
    traces.append(
        go.Scatter(
            x=ports["x"],
            y=ports["y"],
            ids=ports["port"],
            mode="markers+text",
            text=np.where(port_in, ports["input"], ""),
            textposition="middle left",
            textfont={"size": 10, "color": "#555"},
            marker={
                "size": 7,
                "symbol": "circle",
                "color": np.where(port_used, "#333333", "#ffffff").tolist(),
                "line": {"width": 1, "color": np.where(port_in, "#777", "#ddd").tolist()},
            },
            customdata=ports["port"],
            hovertemplate="%{customdata} input<extra></extra>",
            name="head inputs (q, k, v)",
            showlegend=False,
            xaxis=xref,
            yaxis=yref,
        )
    )
    pos = positions.set_index("node").loc[nodes["node"]]
    inside = nodes["in_circuit"].to_numpy(dtype=bool)
    kinds = pos["kind"].to_numpy()
    node_score = nodes["score"].to_numpy(dtype=float)
    colours = np.where(inside, [KIND_COLOURS.get(k, "#888") for k in kinds], OUT_OF_CIRCUIT)
    line_colours = np.where(inside, "#222222", "#c8c8c8")
    line_widths = np.where(inside, 1.2, 1.0)
    if highlight is not None:
        line_widths = np.where(nodes["node"].to_numpy() == highlight, 4.0, line_widths)
    traces.append(
        go.Scatter(
            x=pos["x"],
            y=pos["y"],
            ids=nodes["node"],
            mode="markers+text",
            text=nodes["node"],
            textposition=["middle right" if k == "head" else "bottom center" for k in kinds],
            textfont={"size": 12, "color": np.where(inside, "#111111", "#aaaaaa").tolist()},
            marker={
                "size": np.where(inside, 20, 12).tolist(),
                "color": colours.tolist(),
                "line": {"width": line_widths.tolist(), "color": line_colours.tolist()},
            },
            customdata=np.stack(
                [nodes["node"].to_numpy(dtype=object), node_score.astype(object), inside], 1
            ),
            hovertemplate="<b>%{customdata[0]}</b><br>node score %{customdata[1]:.4g} "
            "(logits)<br>in circuit: %{customdata[2]}<extra></extra>",
            name="nodes",
            showlegend=False,
            xaxis=xref,
            yaxis=yref,
        )
    )
    if not keep_slots:
        traces = [t for t in traces if t.meta != SLOT or len(t.x)]
        for t in traces:
            t.meta = None
    if legend:
        traces += circuit_legend()
    return traces


def circuit_legend() -> list[go.Scatter]:
    """The legend entries of a circuit picture: edge colours (the sign convention), node
    colours by kind, and nodes outside the circuit."""
    entries = [
        _legend_entry(f"edge {SUPPORTS}", POSITIVE),
        _legend_entry(f"edge {FAVOURS}", NEGATIVE),
        _legend_entry("width ∝ |score|", "#888888"),
    ]
    for kind, label in (
        ("head", "head (q, k, v inputs on its left)"),
        ("mlp", "MLP"),
        ("input", "input / logits"),
    ):
        entries.append(
            _legend_entry(
                label,
                KIND_COLOURS[kind],
                mode="markers",
                marker={"line": {"width": 1, "color": "#222"}},
            )
        )
    entries.append(
        _legend_entry(
            "not in circuit",
            OUT_OF_CIRCUIT,
            mode="markers",
            marker={"line": {"width": 1, "color": "#c8c8c8"}},
        )
    )
    return entries


LEGEND_TITLE = (
    "edge colour: the sign of its effect on logit(target) − logit(foil), "
    "effect = −score = m(clean) − m(edge ablated)"
)


def _graph_axes(fig: go.Figure, positions: pd.DataFrame, **where: Any) -> None:
    ticks = positions.drop_duplicates("x").sort_values("x")
    n_heads = int((positions["kind"] == "head").groupby(positions["x"]).sum().max() or 0)
    top = HEAD_GAP + max(n_heads - 1, 0) + 0.6
    max_span = float(positions["x"].max() - positions["x"].min())
    bottom = -(0.45 + 0.55 * max(max_span - 1.0, 0.0) ** 0.8) / 2 - 0.5
    fig.update_xaxes(
        title_text="layer, left to right (input; per layer its heads, then its MLP; logits)",
        tickmode="array",
        tickvals=ticks["x"].tolist(),
        ticktext=ticks["column"].tolist(),
        showgrid=False,
        zeroline=False,
        range=[float(positions["x"].min()) - 0.5, float(positions["x"].max()) + 0.6],
        **where,
    )
    fig.update_yaxes(
        title_text="heads (h0 on top) above the residual stream lane",
        showgrid=False,
        zeroline=False,
        showticklabels=False,
        range=[bottom, top],
        **where,
    )


def _graph_layout(fig: go.Figure, positions: pd.DataFrame, title: str) -> go.Figure:
    fig.update_layout(
        title={"text": title, "y": 0.98, "yanchor": "top"},
        template=TEMPLATE,
        font=FONT,
        showlegend=True,
        hovermode="closest",
        legend={
            "orientation": "h",
            "y": -0.16,
            "x": 0.0,
            "font": {"size": 12},
            "traceorder": "normal",
            "title": {"text": LEGEND_TITLE, "side": "top"},
        },
        margin={"t": 70, "b": 130, "l": 70, "r": 30},
        height=660,
    )
    _graph_axes(fig, positions)
    return fig


def _circuit_title(edges: pd.DataFrame, nodes: pd.DataFrame, shown: int, step: Any) -> str:
    n_nodes = int(nodes["in_circuit"].astype(bool).sum())
    when = f" at step {step}" if step is not None else ""
    what = f"{len(edges)} edges, {n_nodes} nodes"
    if shown < len(edges):
        what += f"; the {shown} strongest edges drawn"
    return f"Circuit{when} ({what})"


def circuit_graph(
    nodes: pd.DataFrame,
    edges: pd.DataFrame,
    *,
    title: str | None = None,
    max_edges: int | None = 60,
    highlight: str | None = None,
    n_width_bins: int = 5,
) -> go.Figure:
    """The circuit of one step as a layered graph, from `circuitdyn.analysis.circuit_tables`.

    ``nodes``: ``node``, ``kind``, ``score``, ``in_circuit`` (optional ``step``); ``edges``:
    ``edge``, ``src``, ``dst_node``, ``input``, ``score`` (optional ``share``: the score over
    the step's Σ|score|, `circuitdyn.analysis.timeline.score_shares`). Layers run left to
    right; heads stack above the residual lane; each head shows its q / k / v input ports,
    where edges into it end. Edge colour: the sign convention of `EDGE_SIGN_NOTE`; width:
    |score| relative to the strongest edge. Only the ``max_edges`` strongest edges are drawn
    (the title says so). ``highlight``: a node whose edges are drawn and the others faded.
    Hover: names, raw score, share and rank."""
    positions = node_positions(list(nodes["node"]))
    shown = _shown_edges(edges, max_edges)
    fig = go.Figure(
        _graph_traces(nodes, shown, positions, n_bins=n_width_bins, highlight=highlight)
    )
    step = nodes["step"].iloc[0] if "step" in nodes.columns and len(nodes) else None
    return _graph_layout(fig, positions, title or _circuit_title(edges, nodes, len(shown), step))


def circuit_small_multiples(
    nodes: pd.DataFrame,
    edges: pd.DataFrame,
    keys: pd.DataFrame,
    *,
    title: str = "The circuit at the key steps",
    max_edges: int | None = 60,
    n_cols: int = 3,
    n_width_bins: int = 4,
) -> go.Figure:
    """The circuit at each key step side by side (the static picture of the circuit's
    evolution, e.g. for the README). ``nodes`` / ``edges``: `circuit_evolution` tables at the
    key steps' ``snapshot_step`` values; ``keys``: a `key_steps` table (``key``, ``label``,
    ``snapshot_step``, ``step``). One panel per distinct snapshot step, titled with its key
    steps; widths relative to each panel's strongest edge."""
    panels = (
        keys.dropna(subset=["snapshot_step"])
        .groupby("snapshot_step", sort=True)["label"]
        .agg(" / ".join)
    )
    panels = panels[[int(s) in set(nodes["step"].astype(int)) for s in panels.index]]
    n = max(len(panels), 1)
    cols = min(n_cols, n if n <= n_cols else math.ceil(n / 2))
    rows = math.ceil(n / cols)
    titles = []
    for step, label in panels.items():
        n_edges = int((edges["step"] == step).sum())
        titles.append(f"<b>step {int(step)}</b>: {label} ({n_edges} edges)")
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=titles or ["no key step"],
        horizontal_spacing=0.03,
        vertical_spacing=0.16 if rows > 1 else 0.1,
    )
    positions = node_positions(list(dict.fromkeys(nodes["node"])))
    for i, step in enumerate(panels.index):
        row, col = i // cols + 1, i % cols + 1
        axis_number = i + 1
        axes = (
            f"x{axis_number if axis_number > 1 else ''}",
            f"y{axis_number if axis_number > 1 else ''}",
        )
        frame_nodes = nodes[nodes["step"] == step]
        frame_edges = _shown_edges(edges[edges["step"] == step], max_edges)
        for trace in _graph_traces(
            frame_nodes,
            frame_edges,
            positions,
            n_bins=n_width_bins,
            legend=i == 0,
            axes=axes,
        ):
            if trace.meta == LEGEND_ONLY:
                trace.update(xaxis=axes[0], yaxis=axes[1])
            if trace.name == "nodes":
                trace.textfont.size = 10
                trace.marker.size = [14 if s == 20 else 8 for s in trace.marker.size]
            if trace.name == "head inputs (q, k, v)":
                trace.mode = "markers"
                trace.marker.size = 5
            fig.add_trace(trace, row=row, col=col)
        _graph_axes(fig, positions, row=row, col=col)
        fig.update_xaxes(title_text="layer →", row=row, col=col)
        fig.update_yaxes(title_text="heads / residual lane", row=row, col=col)
    fig.update_layout(
        title={"text": title},
        template=TEMPLATE,
        font={"size": 12},
        hovermode="closest",
        height=500 * rows + 150,
        width=1500,
        legend={
            "orientation": "h",
            "y": -0.2 / rows,
            "x": 0.0,
            "font": {"size": 12},
            "traceorder": "normal",
            "title": {"text": LEGEND_TITLE, "side": "top"},
        },
        margin={"t": 90, "b": 120, "l": 40, "r": 20},
    )
    for annotation in fig.layout.annotations:
        annotation.font = {"size": 13}
    return fig


def circuit_diff_graph(
    nodes_a: pd.DataFrame,
    edges_a: pd.DataFrame,
    nodes_b: pd.DataFrame,
    edges_b: pd.DataFrame,
    *,
    title: str | None = None,
    max_edges: int | None = 80,
) -> go.Figure:
    """What changed between two steps' circuits (`circuit_tables` at step a and step b):
    edges gained (in b only, green), lost (in a only, grey dashed), kept with the sign of
    their score flipped (purple) and kept with the same sign (light blue). Width: |score| at
    b (at a for lost edges) relative to the strongest; nodes styled as at b. Hover: the edge,
    its status and both scores."""
    positions = node_positions(list(nodes_b["node"]))
    a = edges_a.set_index("edge")
    b = edges_b.set_index("edge")
    names = list(dict.fromkeys([*edges_a["edge"], *edges_b["edge"]]))
    table = pd.concat([b, a.loc[[n for n in a.index if n not in b.index]]]).loc[names]
    score_a = a["score"].reindex(names).to_numpy(dtype=float)
    score_b = b["score"].reindex(names).to_numpy(dtype=float)
    in_a = np.isin(names, a.index)
    in_b = np.isin(names, b.index)
    flipped = in_a & in_b & (np.sign(score_a) != np.sign(score_b))
    status = np.where(
        in_a & in_b, np.where(flipped, "sign flipped", "kept"), np.where(in_b, "gained", "lost")
    )
    magnitude = np.abs(np.where(in_b, score_b, score_a))
    table = table.reset_index().assign(status=status, magnitude=magnitude)
    if max_edges is not None and len(table) > max_edges:
        table = table[_ranks(np.nan_to_num(magnitude, nan=-1.0)) <= max_edges]
    xs, ys = edge_paths(table, positions)
    top = float(np.nanmax(table["magnitude"], initial=0.0)) or 1.0
    fig = go.Figure()
    styles = {
        "kept": ("#9ecae1", "solid"),
        "sign flipped": (FLIPPED, "solid"),
        "gained": (GAINED, "solid"),
        "lost": (LOST, "dash"),
    }
    for name, (colour, dash) in styles.items():
        rows = np.flatnonzero(table["status"].to_numpy() == name)
        if not len(rows):
            continue
        for i in rows:
            frac = float(np.nan_to_num(table["magnitude"].iloc[i], nan=0.0)) / top
            fig.add_trace(
                go.Scatter(
                    x=np.round(xs[i], 3),
                    y=np.round(ys[i], 3),
                    mode="lines",
                    line={"color": colour, "width": 1.0 + 6.0 * frac, "dash": dash},
                    name=f"{name} ({len(rows)})",
                    legendgroup=name,
                    showlegend=bool(i == rows[0]),
                    hoverinfo="skip",
                )
            )
    mid = PATH_POINTS // 2
    edge_names = table["edge"].to_numpy()
    custom = np.stack(
        [
            edge_names.astype(object),
            table["status"].to_numpy(dtype=object),
            a["score"].reindex(edge_names).to_numpy(dtype=float).astype(object),
            b["score"].reindex(edge_names).to_numpy(dtype=float).astype(object),
        ],
        axis=1,
    )
    step_a = nodes_a["step"].iloc[0] if "step" in nodes_a.columns else "a"
    step_b = nodes_b["step"].iloc[0] if "step" in nodes_b.columns else "b"
    fig.add_trace(
        go.Scatter(
            x=np.round(xs[:, mid], 3),
            y=np.round(ys[:, mid], 3),
            mode="markers",
            marker={"size": 10, "color": "rgba(0,0,0,0)"},
            customdata=custom,
            hovertemplate="<b>%{customdata[0]}</b>: %{customdata[1]}<br>"
            f"score at step {step_a}: %{{customdata[2]:.4g}}<br>"
            f"score at step {step_b}: %{{customdata[3]:.4g}}<extra></extra>",
            name="edge scores (hover)",
            showlegend=False,
        )
    )
    node_traces = _graph_traces(nodes_b, edges_b.iloc[:0], positions, legend=False)
    for trace in node_traces:
        if trace.name in ("nodes", "head inputs (q, k, v)"):
            fig.add_trace(trace)
    title = title or (
        f"Circuit change from step {step_a} to step {step_b}: "
        f"{int((status == 'gained').sum())} edges gained, {int((status == 'lost').sum())} lost, "
        f"{int(flipped.sum())} flipped sign"
    )
    _graph_layout(fig, positions, title)
    fig.update_layout(
        legend_title_text=f"edges from step {step_a} to step {step_b} (width ∝ |score|)"
    )
    return fig


# ---------------------------------------------------------------------------------------------
# the interactive circuit explorer
# ---------------------------------------------------------------------------------------------
THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
"""Explorer threshold choices: hide edges with |score| below this fraction of the step's
strongest edge."""


def _compact(value: float, digits: int = 4) -> float | None:
    if value is None or not np.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _b64(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii")


def circuit_explorer(
    nodes: pd.DataFrame,
    edges: pd.DataFrame,
    *,
    keys: pd.DataFrame | None = None,
    step_text: Mapping[int, str] | None = None,
    title: str = "Circuit over training",
    max_edges: int = 60,
    n_width_bins: int = 5,
    start_step: int | None = None,
) -> go.Figure:
    # Steps are stored compactly: per step the edges (uint16 indices into the catalogue) and
    # scores quantised to int16 relative to the step's largest |score| (relative precision
    # 3e-5), base64; the catalogue's curves as float32.
    """The circuit at every step of `circuit_evolution` tables (a ``step`` column tells the
    steps apart), explorable in a browser: a step slider, one button per key step (``keys``:
    a `key_steps` table), a threshold slider (hide edges weaker than a fraction of the
    step's strongest; the default keeps at most ``max_edges`` per step), and a click on a node
    highlights its edges. ``step_text``: a line per step shown beside the slider (e.g.
    `circuitdyn.analysis.timeline.step_descriptions`: the step's metrics).

    The figure's traces show ``start_step`` (default: the first) exactly as `circuit_graph`
    draws it; the other steps live in ``layout.meta["circuitdyn"]`` (edge catalogue with
    curves, per step the edges, scores, shares and nodes in the circuit) and are drawn by the
    explorer script that `figure_html` (and the report) attach. There is no animation: nothing
    moves until the reader moves a slider, and nodes never change place."""
    steps = [int(s) for s in dict.fromkeys(nodes["step"].tolist())]
    start = steps[0] if start_step is None else int(start_step)
    names = list(dict.fromkeys(nodes["node"]))
    positions = node_positions(names)
    catalogue = edges.drop_duplicates("edge")[["edge", "src", "dst_node", "input"]].reset_index(
        drop=True
    )
    index = {e: i for i, e in enumerate(catalogue["edge"])}
    xs, ys = (
        edge_paths(catalogue, positions) if len(catalogue) else (np.zeros((0, 1)), np.zeros((0, 1)))
    )
    ports = port_positions(positions)
    port_index = {p: i for i, p in enumerate(ports["port"])}
    node_index = {n: i for i, n in enumerate(names)}
    frames = []
    counts = []
    for step in steps:
        e = edges[edges["step"] == step]
        n = nodes[nodes["step"] == step]
        total = np.nan
        if "share" in e.columns and e["share"].notna().any():
            ok = e["share"].notna() & (e["share"] != 0)
            total = (
                float((e.loc[ok, "score"] / e.loc[ok, "share"]).median()) if ok.any() else np.nan
            )
        values = e["score"].to_numpy(dtype=float)
        peak = float(np.nanmax(np.abs(values), initial=0.0)) or 1.0
        quantised = np.where(np.isfinite(values), np.round(values / peak * 32767), -32768)
        frames.append(
            {
                "step": step,
                "e": _b64(np.array([index[x] for x in e["edge"]], dtype="<u2")),
                "q": _b64(quantised.astype("<i2")),
                "m": _compact(peak, 6),
                "T": _compact(float(total)) if np.isfinite(total) else None,
                "n": [node_index[x] for x in n.loc[n["in_circuit"].astype(bool), "node"]],
                "t": (step_text or {}).get(step, ""),
            }
        )
        absolute = np.abs(e["score"].to_numpy(dtype=float))
        top = np.nanmax(absolute, initial=0.0)
        counts.append(
            [int(np.sum(~(absolute < t * top))) if top > 0 else len(e) for t in THRESHOLDS]
        )
    fits = [i for i in range(len(THRESHOLDS)) if all(c[i] <= max_edges for c in counts)]
    theta = fits[0] if fits else len(THRESHOLDS) - 1
    start_nodes = nodes[nodes["step"] == start]
    start_edges = edges[edges["step"] == start]
    top = float(np.nanmax(np.abs(start_edges["score"].to_numpy(dtype=float)), initial=0.0))
    visible = start_edges[
        ~(np.abs(start_edges["score"].to_numpy(dtype=float)) < THRESHOLDS[theta] * top)
    ]
    traces = _graph_traces(
        start_nodes, visible, positions, n_bins=n_width_bins, keep_slots=True, legend=True
    )
    n_slots = 2 * n_width_bins
    spec = {
        "widget": "circuit_explorer",
        "title": title,
        "steps": steps,
        "start": steps.index(start),
        "bins": n_width_bins,
        "thresholds": list(THRESHOLDS),
        "theta": theta,
        "slots": {
            "lines": list(range(n_slots)),
            "faded": n_slots,
            "unscored": n_slots + 1,
            "hover": n_slots + 2,
            "ports": n_slots + 3,
            "nodes": n_slots + 4,
        },
        "nodes": names,
        "kinds": positions["kind"].tolist(),
        "nx": positions["x"].astype(float).round(3).tolist(),
        "ny": positions["y"].astype(float).round(3).tolist(),
        "kindColours": KIND_COLOURS,
        "outColour": OUT_OF_CIRCUIT,
        "edges": catalogue["edge"].tolist(),
        "src": [node_index[s] for s in catalogue["src"]],
        "dst": [node_index[d] for d in catalogue["dst_node"]],
        "port": [
            port_index.get(f"{d}<{i}>", -1)
            for d, i in zip(catalogue["dst_node"], catalogue["input"], strict=True)
        ],
        "portNode": [node_index[n] for n in ports["node"]],
        "points": int(xs.shape[1]) if len(catalogue) else PATH_POINTS,
        "px": _b64(xs.astype("<f4")),
        "py": _b64(ys.astype("<f4")),
        "keys": []
        if keys is None
        else [
            {"step": int(r.snapshot_step), "label": r.label, "key": r.key}
            for r in keys.dropna(subset=["snapshot_step"]).itertuples(index=False)
            if int(r.snapshot_step) in steps
        ],
        "frames": frames,
    }
    fig = go.Figure(traces)
    _graph_layout(
        fig, positions, f"{title}: {_circuit_title(start_edges, start_nodes, len(visible), start)}"
    )
    fig.update_layout(meta={"circuitdyn": spec}, uirevision="circuit")
    return fig


def circuit_animation(
    nodes: pd.DataFrame,
    edges: pd.DataFrame,
    *,
    title: str = "Circuit over training",
    keys: pd.DataFrame | None = None,
    step_text: Mapping[int, str] | None = None,
    **options: Any,
) -> go.Figure:
    """The old name of `circuit_explorer` (which replaced the autoplaying animation)."""
    return circuit_explorer(nodes, edges, keys=keys, step_text=step_text, title=title, **options)


@cache
def _asset_js(name: str) -> str:
    return resources.files("circuitdyn").joinpath("assets", "js", name).read_text(encoding="utf-8")


def explorer_script() -> str:
    """The explorer's JavaScript (defines ``window.circuitdynExplorer(graphDiv)``)."""
    return _asset_js("circuit_explorer.js")


def is_widget(fig: go.Figure) -> bool:
    """Whether ``fig`` is a `circuit_explorer` (its HTML needs `explorer_script`)."""
    meta = fig.layout.meta
    return isinstance(meta, dict) and "circuitdyn" in meta


def figure_html(
    fig: go.Figure,
    *,
    include_plotlyjs: bool | str = True,
    full_html: bool = True,
    div_id: str | None = None,
) -> str:
    """The HTML of one figure: never autoplaying, responsive, without the plotly logo; an
    explorer (`circuit_explorer`) gets its script. ``include_plotlyjs`` as in
    ``Figure.to_html`` (True: embedded, works offline)."""
    post = None
    if is_widget(fig):
        post = (
            explorer_script() + "\nwindow.circuitdynExplorer(document.getElementById('{plot_id}'));"
        )
    return fig.to_html(
        include_plotlyjs=include_plotlyjs,
        full_html=full_html,
        div_id=div_id,
        auto_play=False,
        post_script=post,
        config={"responsive": True, "displaylogo": False},
    )


# ---------------------------------------------------------------------------------------------
# dynamics
# ---------------------------------------------------------------------------------------------
def evolution_heatmap(
    matrix: pd.DataFrame,
    *,
    kind: str = "score",
    title: str | None = None,
    keys: pd.DataFrame | None = None,
) -> go.Figure:
    """Node x step heatmap of a `node_score_matrix` (``kind="score"``: diverging colours around
    0, metric units), its `column_shares` (``kind="share"``: each step's scores over the step's
    Σ|score|, so a step where every score shrinks or flips sign does not wash out the others)
    or a `node_membership` table (``kind="membership"``: 1 in the circuit, 0 not). z is the
    table's values (rows = nodes, columns = steps)."""
    if kind not in ("score", "share", "membership"):
        raise ValueError(f"kind must be 'score', 'share' or 'membership', got {kind!r}")
    z = matrix.to_numpy(dtype=float)
    x = [int(c) for c in matrix.columns]
    y = [str(i) for i in matrix.index]
    if kind in ("score", "share"):
        span = float(np.nanmax(np.abs(z), initial=0.0)) or 1.0
        colour_title = (
            "node score (logits)" if kind == "score" else "share of the step's Σ|node score|"
        )
        trace = go.Heatmap(
            z=z,
            x=x,
            y=y,
            colorscale="RdBu",
            zmid=0.0,
            zmin=-span,
            zmax=span,
            colorbar={"title": {"text": colour_title, "side": "right"}},
            hovertemplate="step %{x}<br>%{y}<br>"
            + ("score %{z:.4g}" if kind == "score" else "share %{z:.2%}")
            + "<extra></extra>",
        )
        default = (
            "Node scores over training (raw, logits)"
            if kind == "score"
            else "Node scores over training, normalised per step"
        )
    else:
        trace = go.Heatmap(
            z=z,
            x=x,
            y=y,
            zmin=0,
            zmax=1,
            colorscale=[[0.0, "#f0f0f0"], [0.5, "#f0f0f0"], [0.5, "#2166ac"], [1.0, "#2166ac"]],
            colorbar={
                "title": {"text": "in circuit"},
                "tickvals": [0, 1],
                "ticktext": ["no", "yes"],
            },
            hovertemplate="step %{x}<br>%{y}<br>in circuit %{z}<extra></extra>",
        )
        default = "Circuit membership over training"
    fig = go.Figure(trace)
    fig.update_yaxes(autorange="reversed")
    mark_key_steps(fig, keys)
    return _finish(fig, title or default, STEP_AXIS, "node")


def membership_raster(
    raster: pd.DataFrame,
    curve: pd.DataFrame | None = None,
    *,
    metric: str = "dev_metric",
    keys: pd.DataFrame | None = None,
    title: str | None = None,
) -> go.Figure:
    """Edges x steps membership (an `edge_membership` table: rows sorted by the step each edge
    entered) under the metric curve (``curve``: ``step`` and ``metric``, e.g. the run's
    evaluations), sharing the step axis. Blue cell: the edge is in the circuit at that step."""
    has_curve = curve is not None and metric in curve.columns and curve[metric].notna().any()
    fig = make_subplots(
        rows=2 if has_curve else 1,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.22, 0.78] if has_curve else [1.0],
        vertical_spacing=0.04,
    )
    row = 1
    if has_curve:
        rows = curve.dropna(subset=[metric])
        fig.add_trace(
            go.Scatter(
                x=rows["step"],
                y=rows[metric],
                mode="lines+markers",
                name=_SHORT_LABELS.get(metric, metric),
                line={"color": "#333"},
                marker={"size": 5},
            ),
            row=1,
            col=1,
        )
        fig.add_hline(y=0, line={"color": "#999", "width": 1}, row=1, col=1)
        fig.update_yaxes(title_text=_SHORT_LABELS.get(metric, metric), row=1, col=1)
        row = 2
    fig.add_trace(
        go.Heatmap(
            z=raster.to_numpy(dtype=np.int8),
            x=[int(c) for c in raster.columns],
            y=[str(e) for e in raster.index],
            zmin=0,
            zmax=1,
            colorscale=[[0.0, "#f4f4f4"], [0.5, "#f4f4f4"], [0.5, POSITIVE], [1.0, POSITIVE]],
            showscale=False,
            name="edge membership",
            hovertemplate="step %{x}<br>%{y}<br>in circuit %{z}<extra></extra>",
        ),
        row=row,
        col=1,
    )
    fig.update_yaxes(
        title_text="edge (sorted by the step it entered)",
        autorange="reversed",
        # Every row named: the figure grows with the rows (8 px each) instead of dropping them.
        showticklabels=len(raster) <= 300,
        tickfont={"size": 9 if len(raster) <= 60 else 7},
        row=row,
        col=1,
    )
    fig.update_xaxes(title_text=STEP_AXIS, row=row, col=1)
    if has_curve:
        fig.update_xaxes(title_text="", row=1, col=1)
    mark_key_steps(fig, keys)
    fig.update_layout(height=max(450, min(2800, 300 + 8 * len(raster))))
    return _finish(
        fig, title or f"Edge membership over training ({len(raster)} edges ever in the circuit)"
    )


def churn_figure(
    churn: pd.DataFrame,
    *,
    title: str = "Circuit churn: edges entering and leaving",
    keys: pd.DataFrame | None = None,
    window: int = 5,
) -> go.Figure:
    """Edges entering (up, green) and leaving (down, red) the circuit at each step, and the
    Jaccard index of the edge set with the previous step's, smoothed (right axis). Takes a
    `churn_counts` table (or a `churn` table: the smoothing, a centred rolling mean over
    ``window`` steps, is then computed here)."""
    table = churn
    if "jaccard_edges_prev_smoothed" not in table.columns:
        table = table.assign(
            jaccard_edges_prev_smoothed=table["jaccard_edges_prev"]
            .rolling(window, center=True, min_periods=1)
            .mean()
        )
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Bar(x=table["step"], y=table["edges_added"], name="edges entering", marker_color=GAINED),
        secondary_y=False,
    )
    fig.add_trace(
        go.Bar(
            x=table["step"],
            y=-table["edges_removed"],
            name="edges leaving (drawn downwards)",
            marker_color=NEGATIVE,
            customdata=table["edges_removed"],
            hovertemplate="step %{x}: %{customdata} edges left<extra></extra>",
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=table["step"],
            y=table["jaccard_edges_prev_smoothed"],
            mode="lines",
            name=f"edge Jaccard with the previous step ({window}-step mean)",
            line={"color": "#333", "width": 2.5},
        ),
        secondary_y=True,
    )
    fig.update_layout(barmode="relative", bargap=0.1)
    fig.update_yaxes(title_text="edges entering (+) / leaving (−) (count)", secondary_y=False)
    fig.update_yaxes(
        title_text="Jaccard index (0–1)",
        range=[0, 1.05],
        tickmode="linear",
        dtick=0.2,
        showgrid=False,
        secondary_y=True,
    )
    mark_key_steps(fig, keys)
    fig.update_layout(legend={"orientation": "h", "y": -0.22})
    return _finish(fig, title, STEP_AXIS)


def size_figure(
    sizes: pd.DataFrame, *, title: str = "Circuit size", keys: pd.DataFrame | None = None
) -> go.Figure:
    """A `circuit_sizes` table: edges, nodes and heads (left axis, counts from 0) and tunable
    parameters (right axis, from 0) per step."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for column, colour in (("n_edges", POSITIVE), ("n_nodes", "#dd8452"), ("n_heads", "#55a868")):
        fig.add_trace(
            go.Scatter(
                x=sizes["step"],
                y=sizes[column],
                mode="lines",
                name=column[2:],
                line={"color": colour},
            ),
            secondary_y=False,
        )
    _right_axis_line(fig, sizes, "step", "n_tunable", "tunable parameters", "count", "lines")
    fig.update_yaxes(
        title_text="edges / nodes / heads (count)", rangemode="tozero", secondary_y=False
    )
    mark_key_steps(fig, keys)
    return _finish(fig, title, STEP_AXIS)


def layer_composition_figure(
    composition: pd.DataFrame,
    *,
    title: str = "Circuit nodes per layer",
    keys: pd.DataFrame | None = None,
) -> go.Figure:
    """Heatmap layer x step of a `layer_composition` table: z = ``n_nodes`` (heads + MLP of the
    layer in the circuit); hover shows heads and MLP separately."""
    z = composition.pivot(index="layer", columns="step", values="n_nodes")
    heads = composition.pivot(index="layer", columns="step", values="n_heads")
    mlp = composition.pivot(index="layer", columns="step", values="mlp")
    custom = np.stack([heads.to_numpy(), mlp.to_numpy()], axis=-1)
    fig = go.Figure(
        go.Heatmap(
            z=z.to_numpy(dtype=float),
            x=[int(c) for c in z.columns],
            y=[f"L{int(i)}" for i in z.index],
            customdata=custom,
            colorscale="Blues",
            zmin=0,
            colorbar={"title": {"text": "nodes (count)"}},
            hovertemplate="step %{x}<br>%{y}: %{z} nodes (%{customdata[0]} heads, "
            "MLP %{customdata[1]})<extra></extra>",
        )
    )
    mark_key_steps(fig, keys)
    return _finish(fig, title, STEP_AXIS, "layer")


def events_figure(
    events: pd.DataFrame,
    node_names: Sequence[str],
    *,
    title: str = "Node entries and exits",
    keys: pd.DataFrame | None = None,
) -> go.Figure:
    """A `node_events` table as markers: x = step, y = node (in ``node_names`` order); green
    triangles up = entries, red triangles down = exits."""
    fig = go.Figure()
    for event, symbol, colour in (
        ("enter", "triangle-up", GAINED),
        ("exit", "triangle-down", NEGATIVE),
    ):
        rows = events[events["event"] == event]
        if rows.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=rows["step"],
                y=rows["node"],
                mode="markers",
                marker={"symbol": symbol, "color": colour, "size": 9},
                name=f"{event}s",
            )
        )
    fig.update_yaxes(categoryorder="array", categoryarray=list(node_names), autorange="reversed")
    mark_key_steps(fig, keys)
    return _finish(fig, title, STEP_AXIS, "node")


# ---------------------------------------------------------------------------------------------
# edges
# ---------------------------------------------------------------------------------------------
def edge_trajectories_figure(
    trajectories: pd.DataFrame,
    trends: pd.DataFrame | None = None,
    *,
    title: str = "Top edge scores over training",
    keys: pd.DataFrame | None = None,
) -> go.Figure:
    """One line per edge of an `edge_trajectories` table (x = step, y = score) with each
    edge's OLS fit (`edge_trends`) dashed; with a ``share`` column (`score_shares`), a second
    panel shows the score as a share of its step's Σ|score|, which a change of sign of the
    task metric does not dominate."""
    has_share = "share" in trajectories.columns and trajectories["share"].notna().any()
    fig = make_subplots(
        rows=1,
        cols=2 if has_share else 1,
        subplot_titles=["raw score (logits)", "share of the step's Σ|score|"]
        if has_share
        else None,
        horizontal_spacing=0.08,
    )
    palette = _palette()
    fits = trends.set_index("edge") if trends is not None else None
    for i, (edge, rows) in enumerate(trajectories.groupby("edge", sort=False)):
        colour = palette[i % len(palette)]
        fig.add_trace(
            go.Scatter(
                x=rows["step"],
                y=rows["score"],
                mode="lines",
                line={"color": colour},
                name=edge,
                legendgroup=edge,
            ),
            row=1,
            col=1,
        )
        if fits is not None and edge in fits.index and np.isfinite(fits.at[edge, "slope"]):
            xs = np.array([rows["step"].min(), rows["step"].max()], dtype=float)
            ys = fits.at[edge, "intercept"] + fits.at[edge, "slope"] * xs
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    line={"color": colour, "dash": "dash", "width": 1},
                    name=f"{edge} trend (p={fits.at[edge, 'p_value']:.2g})",
                    legendgroup=edge,
                    showlegend=False,
                ),
                row=1,
                col=1,
            )
        if has_share and rows["share"].notna().any():
            fig.add_trace(
                go.Scatter(
                    x=rows["step"],
                    y=rows["share"],
                    mode="lines",
                    line={"color": colour},
                    name=f"{edge} (share)",
                    legendgroup=edge,
                    showlegend=False,
                ),
                row=1,
                col=2,
            )
    fig.add_hline(y=0, line={"color": "#999", "width": 1})
    fig.update_yaxes(title_text="edge score (logits)", row=1, col=1)
    if has_share:
        fig.update_yaxes(title_text="score / step Σ|score| (signed fraction)", row=1, col=2)
    mark_key_steps(fig, keys)
    fig.update_layout(height=520)
    return _finish(fig, title, STEP_AXIS)


def rank_change_figure(ranks: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Slope chart of a `rank_changes` table: one line per edge from its rank at the first
    attributed step to its rank at the last (rank 1 = strongest |score|, drawn on top)."""
    fig = go.Figure()
    palette = _palette()
    first = int(ranks["step_first"].iloc[0]) if len(ranks) else 0
    last = int(ranks["step_last"].iloc[0]) if len(ranks) else 0
    for i, row in enumerate(ranks.itertuples(index=False)):
        fig.add_trace(
            go.Scatter(
                x=[f"step {first}", f"step {last}"],
                y=[row.rank_first, row.rank_last],
                mode="lines+markers",
                line={"color": palette[i % len(palette)]},
                name=row.edge,
                hovertemplate=f"{row.edge}<br>rank %{{y}}<extra></extra>",
            )
        )
    fig.update_yaxes(autorange="reversed", type="log")
    return _finish(
        fig,
        title or f"Rank changes of the top edges (step {first} → step {last})",
        "attributed step (state before that update)",
        "rank by |score| (1 = strongest, log scale)",
    )


# ---------------------------------------------------------------------------------------------
# heads and weights
# ---------------------------------------------------------------------------------------------
def _pivot_heads(roles: pd.DataFrame, value: str) -> pd.DataFrame:
    return roles.pivot(index="layer", columns="head", values=value).sort_index()


def _role_step(roles: pd.DataFrame, step: int) -> int:
    """The step-axis position of a head-role row's ``step`` (``updates`` when present)."""
    rows = roles[roles["step"] == step]
    return int(rows["updates"].iloc[0]) if "updates" in rows.columns and len(rows) else int(step)


def head_heatmaps(
    roles: pd.DataFrame,
    value: str = "dla",
    steps: Sequence[int] | None = None,
    *,
    title: str | None = None,
) -> go.Figure:
    """Layer x head heatmaps of a `head_roles` table's ``value`` column at ``steps`` (its
    ``step`` labels; default: the first and the last, i.e. before / after), plus their
    difference (last − first) when two steps are shown. Every panel shares one colour scale
    (diverging around 0 for DLA and for differences), and each cell is annotated with its
    value."""
    all_steps = sorted(roles["step"].unique().tolist())
    chosen = [all_steps[0], all_steps[-1]] if steps is None else list(steps)
    chosen = list(dict.fromkeys(chosen))
    panels = [_pivot_heads(roles[roles["step"] == s], value) for s in chosen]
    names = ["initial model (t = 0)" if s < 0 else f"step {_role_step(roles, s)}" for s in chosen]
    diff = len(panels) == 2
    if diff:
        panels.append(panels[1] - panels[0])
        names.append("difference (last − first)")
    diverging = value == "dla" or diff
    values = np.concatenate([p.to_numpy(dtype=float).ravel() for p in panels])
    span = float(np.nanmax(np.abs(values), initial=0.0)) or 1.0
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=names, horizontal_spacing=0.06)
    for i, panel in enumerate(panels):
        fig.add_trace(
            go.Heatmap(
                z=panel.to_numpy(dtype=float),
                x=[f"h{int(h)}" for h in panel.columns],
                y=[f"L{int(la)}" for la in panel.index],
                coloraxis="coloraxis",
                name=names[i],
                texttemplate="%{z:.2f}",
                textfont={"size": 11},
                hovertemplate="%{y} %{x}: %{z:.4g}<extra>" + names[i] + "</extra>",
            ),
            row=1,
            col=i + 1,
        )
    label = _label(value, ROLE_LABELS)
    fig.update_layout(
        coloraxis={
            "colorscale": "RdBu" if diverging else "Viridis",
            "cmin": -span if diverging else float(np.nanmin(values, initial=0.0)),
            "cmax": span,
            "cmid": 0.0 if diverging else None,
            "colorbar": {"title": {"text": label, "side": "right"}, "len": 0.9},
        }
    )
    fig.update_xaxes(title_text="head")
    fig.update_yaxes(autorange="reversed", title_text="layer")
    return _finish(fig, title or f"Head roles: {label} (one colour scale, values in cells)")


def head_role_trajectories(
    roles: pd.DataFrame,
    value: str = "dla",
    *,
    top_k: int = 8,
    title: str | None = None,
    keys: pd.DataFrame | None = None,
) -> go.Figure:
    """One line per head (the ``top_k`` with the largest |value| at any checkpoint) of a
    `head_roles` table's ``value`` on the step axis (``updates``: 0 = the initial model). With
    a ``group`` column (several seeds), the mean over seeds with a ± std band."""
    strength = roles.groupby("node")[value].apply(lambda s: s.abs().max())
    chosen = list(strength.sort_values(ascending=False, kind="stable").index[:top_k])
    label = _label(value, ROLE_LABELS)
    table = roles[roles["node"].isin(chosen)].assign(group=lambda t: t["node"])
    table = table.rename(columns={"updates": "x_step"})
    fig = _bands(table, value, x="x_step", order=chosen)
    if value == "attention_to_subject" and "uniform_baseline" in roles.columns:
        base = roles.groupby("updates")["uniform_baseline"].mean()
        fig.add_trace(
            go.Scatter(
                x=base.index,
                y=base.to_numpy(),
                mode="lines",
                name="uniform baseline",
                line={"color": "#999", "dash": "dot"},
            )
        )
    fig.add_hline(y=0, line={"color": "#bbb", "width": 1})
    mark_key_steps(fig, keys)
    return _finish(fig, title or f"Head roles over training: {label}", STEP_AXIS, label)


def weight_change_heatmaps(
    changes: pd.DataFrame, *, step: int | None = None, title: str | None = None
) -> go.Figure:
    """Relative weight change ||W_t − W_0|| / ||W_0|| per head and MLP (``matrix == "all"`` rows
    of a `weight_changes` / `final_weight_changes` table) as layer x (heads, MLP) heatmaps, one
    panel per ``run`` (if the table has that column) sharing one colour axis. ``step``: the
    checkpoint to show (default: each run's last)."""
    rows = changes[changes["matrix"] == "all"]
    runs = list(dict.fromkeys(rows["run"])) if "run" in rows.columns else [None]
    fig = make_subplots(
        rows=1, cols=len(runs), subplot_titles=[r or "" for r in runs], horizontal_spacing=0.06
    )
    for i, run in enumerate(runs):
        part = rows if run is None else rows[rows["run"] == run]
        chosen = part["step"].max() if step is None else step
        part = part[part["step"] == chosen]
        grid = weight_change_grid(part)
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(dtype=float),
                x=list(grid.columns),
                y=list(grid.index),
                coloraxis="coloraxis",
                name=run or f"step {chosen}",
                hovertemplate="%{y} %{x}: %{z:.3g}<extra></extra>",
            ),
            row=1,
            col=i + 1,
        )
    fig.update_layout(
        coloraxis={
            "colorscale": "Viridis",
            "cmin": 0.0,
            "colorbar": {"title": {"text": "relative change"}},
        }
    )
    fig.update_xaxes(title_text="component (head or MLP)")
    fig.update_yaxes(autorange="reversed", title_text="layer")
    return _finish(fig, title or "Where the weights moved (relative change, ‖W−W₀‖/‖W₀‖)")


def weight_change_grid(rows: pd.DataFrame) -> pd.DataFrame:
    """Layer x component grid of ``rel_change`` from ``matrix == "all"`` rows of one step: index
    ``L{layer}``, columns ``h0 .. h{H-1}`` then ``MLP``."""
    heads = rows[rows["component"] == "head"]
    grid = heads.pivot(index="layer", columns="head", values="rel_change")
    grid.columns = [f"h{int(h)}" for h in grid.columns]
    mlp = rows[rows["component"] == "mlp"].set_index("layer")["rel_change"]
    if len(mlp):
        grid = grid.join(mlp.rename("MLP"), how="outer")
    grid = grid.sort_index()
    grid.index = [f"L{int(i)}" for i in grid.index]
    return grid


def weight_share_bars(
    summary: pd.DataFrame, *, title: str = "Share of the weight change"
) -> go.Figure:
    """Stacked bars of a `where_weights_moved` table's last step per run (or per step without a
    ``run`` column): the share (0..1) of the squared weight change in heads and in MLPs."""
    key = "run" if "run" in summary.columns else "step"
    if key == "run":
        last = summary.groupby("run")["step"].transform("max")
        summary = summary[summary["step"] == last]
    fig = go.Figure()
    for component, colour in (("head", KIND_COLOURS["head"]), ("mlp", KIND_COLOURS["mlp"])):
        rows = summary[summary["component"] == component]
        fig.add_trace(
            go.Bar(
                x=rows[key].astype(str),
                y=rows["share_sq_change"],
                name="attention heads" if component == "head" else "MLPs",
                marker_color=colour,
            )
        )
    fig.update_layout(barmode="stack")
    return _finish(fig, title, key, "share of Σ‖ΔW‖² (0–1)")


# ---------------------------------------------------------------------------------------------
# several runs, phases
# ---------------------------------------------------------------------------------------------
def intrinsic_dimension_figure(
    curve: pd.DataFrame,
    *,
    metric: str = "dev_metric",
    saturation_n: int | None = None,
    threshold: float | None = None,
    title: str = "Final metric versus circuit size",
) -> go.Figure:
    """The final ``metric`` versus top_n (log x) of an `intrinsic_dimension` curve, general loss
    on the right axis when present, the threshold (dotted) and the saturation n (dashed)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Scatter(x=curve["top_n"], y=curve[metric], mode="lines+markers", name=_label(metric)),
        secondary_y=False,
    )
    _right_axis_line(
        fig, curve, "top_n", "general_loss", "general LM loss", "nats/token", from_zero=False
    )
    if threshold is not None and np.isfinite(threshold):
        fig.add_hline(
            y=threshold,
            line={"dash": "dot", "color": "#555"},
            annotation_text="saturation threshold",
            secondary_y=False,
        )
    if saturation_n is not None:
        fig.add_vline(
            x=saturation_n,
            line={"dash": "dash", "color": NEGATIVE},
            annotation_text=f"n = {saturation_n}",
        )
    # An explicit range: a vline on a log axis otherwise stretches autorange to 10**x.
    sizes = curve["top_n"].astype(float)
    span = [math.log10(sizes.min() / 1.3), math.log10(sizes.max() * 1.3)]
    fig.update_xaxes(type="log", range=span)
    fig.update_yaxes(title_text=_label(metric), secondary_y=False)
    return _finish(fig, title, "circuit size top_n (edges, log scale)")


def membership_sankey(
    flows: pd.DataFrame, *, title: str = "Node membership across the key steps"
) -> go.Figure:
    """Sankey of a `membership_flows` table: one Sankey node per (phase, state), one link per
    row with value = ``count`` (nodes) and the node names on hover. Name the phases after
    their steps (e.g. ``"step 35 (dev metric crosses 0)"``) when building the table."""
    labels: list[str] = []
    index: dict[tuple[str, str], int] = {}
    for phase_col, state_col in (
        ("source_phase", "source_state"),
        ("target_phase", "target_state"),
    ):
        for phase, state in zip(flows[phase_col], flows[state_col], strict=True):
            if (phase, state) not in index:
                index[(phase, state)] = len(labels)
                labels.append(f"{phase}: {'in circuit' if state == 'in' else 'not in circuit'}")
    colours = [
        POSITIVE if "in circuit" in lab and "not in" not in lab else "#bbbbbb" for lab in labels
    ]
    fig = go.Figure(
        go.Sankey(
            node={"label": labels, "color": colours, "pad": 20},
            link={
                "source": [
                    index[(p, s)]
                    for p, s in zip(flows["source_phase"], flows["source_state"], strict=True)
                ],
                "target": [
                    index[(p, s)]
                    for p, s in zip(flows["target_phase"], flows["target_state"], strict=True)
                ],
                "value": flows["count"].tolist(),
                "customdata": [n.replace(";", ", ") for n in flows["nodes"]],
                "hovertemplate": "%{value} nodes: %{customdata}<extra></extra>",
            },
        )
    )
    fig.update_layout(
        title={"text": title + " (link width = number of nodes)"}, template=TEMPLATE, font=FONT
    )
    return fig


def overlap_figure(summary: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Stacked bars of a `compare_circuits` summary: per level (nodes, edges), how many are only
    in A, in both, only in B; Jaccard in the hover."""
    a = summary["label_a"].iloc[0] if len(summary) else "A"
    b = summary["label_b"].iloc[0] if len(summary) else "B"
    fig = go.Figure()
    for column, name, colour in (
        ("n_only_a", f"only in {a}", "#dd8452"),
        ("n_both", "in both", "#55a868"),
        ("n_only_b", f"only in {b}", POSITIVE),
    ):
        fig.add_trace(
            go.Bar(
                x=summary["level"],
                y=summary[column],
                name=name,
                marker_color=colour,
                customdata=summary["jaccard"],
                hovertemplate="%{x}: %{y}<br>Jaccard %{customdata:.3f}<extra></extra>",
            )
        )
    fig.update_layout(barmode="stack")
    return _finish(fig, title or f"Circuit overlap: {a} vs {b}", "level", "count")


def faithfulness_curve_figure(
    curve: pd.DataFrame, cpr: float, cmd: float, *, title: str = "Faithfulness of top-n circuits"
) -> go.Figure:
    """Faithfulness versus circuit size (a `evaluate.faithfulness_curve` table: ``fraction``,
    ``faithfulness``, ``n_edges``) on a log axis, with CPR and CMD in the title."""
    fig = go.Figure(
        go.Scatter(
            x=curve["fraction"],
            y=curve["faithfulness"],
            mode="lines+markers",
            name="faithfulness",
            customdata=curve["n_edges"],
            hovertemplate="fraction %{x}<br>edges %{customdata}<br>faithfulness %{y:.3f}",
        )
    )
    fig.add_hline(y=1.0, line_dash="dot", annotation_text="full model")
    fig.update_xaxes(type="log")
    return _finish(
        fig,
        f"{title} (CPR {cpr:.3f}, CMD {cmd:.3f})",
        "circuit size (fraction of edges, log scale)",
        "faithfulness (m(C) - m(empty)) / (m(full) - m(empty))",
    )


def _rgba(colour: str, alpha: float) -> str:
    colour = colour.lstrip("#")
    r, g, b = (int(colour[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _bands(
    table: pd.DataFrame,
    value: str,
    *,
    x: str = "step",
    group: str = "group",
    order: Sequence[str] | None = None,
) -> go.Figure:
    """One line per ``group`` of ``table`` (rows: one per run and x): the mean of ``value``
    over the group's runs, with a ± std band when the group has several runs."""
    fig = go.Figure()
    groups = list(order) if order is not None else list(dict.fromkeys(table[group]))
    palette = _group_colours(groups)
    for i, name in enumerate(groups):
        rows = table[(table[group] == name)].dropna(subset=[value])
        if rows.empty:
            continue
        stats = rows.groupby(x, sort=True)[value].agg(["mean", "std", "size"])
        stats["std"] = rows.groupby(x, sort=True)[value].agg(lambda s: float(np.std(s)))
        colour = palette[i % len(palette)]
        n_seeds = int(stats["size"].max())
        if n_seeds > 1:
            xs = stats.index.to_numpy(dtype=float)
            lo = (stats["mean"] - stats["std"]).to_numpy(dtype=float)
            hi = (stats["mean"] + stats["std"]).to_numpy(dtype=float)
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([xs, xs[::-1]]),
                    y=np.concatenate([hi, lo[::-1]]),
                    fill="toself",
                    fillcolor=_rgba(colour, 0.18),
                    line={"width": 0},
                    hoverinfo="skip",
                    name=f"{name} ± std",
                    legendgroup=str(name),
                    showlegend=False,
                )
            )
        fig.add_trace(
            go.Scatter(
                x=stats.index,
                y=stats["mean"],
                mode="lines+markers" if len(stats) <= 40 else "lines",
                marker={"size": 5},
                line={"color": colour, "width": 2},
                name=f"{name} (mean of {n_seeds} seeds ± std)" if n_seeds > 1 else str(name),
                legendgroup=str(name),
                customdata=stats["size"],
                hovertemplate=f"{name}<br>step %{{x}}: %{{y:.4g}} (n = %{{customdata}})"
                "<extra></extra>",
            )
        )
    return fig


def band_figure(
    table: pd.DataFrame,
    value: str,
    *,
    x: str = "step",
    group: str = "group",
    title: str | None = None,
    y_title: str | None = None,
    keys: pd.DataFrame | None = None,
    zero_line: bool = False,
    y_from_zero: bool = False,
) -> go.Figure:
    """``value`` over ``x`` per ``group`` of a long table with one row per run and step: the
    mean over a group's runs (seeds) and a band of ± one standard deviation."""
    fig = _bands(table, value, x=x, group=group)
    if zero_line:
        fig.add_hline(y=0, line={"color": "#999", "width": 1})
    if y_from_zero:
        fig.update_yaxes(rangemode="tozero")
    mark_key_steps(fig, keys)
    label = y_title or _label(value)
    return _finish(fig, title or f"{label} per run", STEP_AXIS if x == "step" else x, label)


def strategy_curves_figure(
    curves: pd.DataFrame,
    metric: str = "dev_metric",
    *,
    title: str | None = None,
    keys: pd.DataFrame | None = None,
) -> go.Figure:
    """``metric`` over steps per run of a `strategy_curves` table; with a ``group`` column
    (runs of several seeds), the mean per group with a ± std band over its seeds."""
    table = curves if "group" in curves.columns else curves.assign(group=curves["run"])
    fig = _bands(table, metric)
    if metric in ("dev_metric", "faithfulness", "faithfulness_masked"):
        fig.add_hline(
            y=0 if metric == "dev_metric" else 1,
            line={"color": "#999", "width": 1},
        )
    mark_key_steps(fig, keys)
    label = _label(metric)
    default = (
        f"{label}: mean over seeds ± std"
        if table.groupby("group")["run"].nunique().max() > 1
        else f"{label} per run"
    )
    return _finish(fig, title or default, STEP_AXIS, label)


def final_metrics_bars(
    finals: pd.DataFrame,
    metrics: Sequence[str] = FINAL_METRICS,
    *,
    title: str = "Final evaluation per run",
) -> go.Figure:
    """One bar panel per metric of a `final_evals` table, one bar per run (y = the table's
    values); with a ``group`` column, one bar per group at the mean over its runs (seeds) with
    ± std error bars."""
    present = [m for m in metrics if m in finals.columns and finals[m].notna().any()]
    fig = make_subplots(
        rows=1,
        cols=max(1, len(present)),
        subplot_titles=[_SHORT_LABELS.get(m, m) for m in present],
        horizontal_spacing=0.08,
    )
    key = "group" if "group" in finals.columns else "run"
    palette = _group_colours([str(g) for g in dict.fromkeys(finals[key])])
    seeds = finals.groupby(key, sort=False).size().max() > 1 if len(finals) else False
    for i, metric in enumerate(present):
        stats = finals.groupby(key, sort=False)[metric].agg(
            mean="mean", std=lambda s: float(np.std(s.dropna())), n="count"
        )
        several = bool((stats["n"] > 1).any())
        fig.add_trace(
            go.Bar(
                x=stats.index.astype(str),
                y=stats["mean"],
                error_y={"type": "data", "array": stats["std"], "visible": several},
                name=metric,
                marker_color=[palette[j % len(palette)] for j in range(len(stats))],
                customdata=stats["n"],
                hovertemplate="%{x}: %{y:.4g}"
                + (" ± %{error_y.array:.2g} (%{customdata} seeds)" if several else "")
                + "<extra></extra>",
                showlegend=False,
            ),
            row=1,
            col=i + 1,
        )
        fig.update_yaxes(title_text=_UNITS.get(metric, metric), row=1, col=i + 1)
    fig.update_xaxes(title_text="strategy (mean ± std over seeds)" if seeds else "run")
    return _finish(fig, title)


def training_curves(
    metrics: pd.DataFrame,
    evals: pd.DataFrame | None = None,
    *,
    title: str = "Training",
    keys: pd.DataFrame | None = None,
) -> go.Figure:
    """Training loss (left panel, nats/token) and the task metric (right panel, logits) per step
    from a run's metrics table, with the dev metric from its evaluations table."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss", "task metric"])
    fig.add_trace(
        go.Scatter(x=metrics["step"], y=metrics["loss"], mode="lines", name="training loss"),
        row=1,
        col=1,
    )
    if (
        evals is not None
        and "general_loss" in evals.columns
        and evals["general_loss"].notna().any()
    ):
        rows = evals.dropna(subset=["general_loss"])
        fig.add_trace(
            go.Scatter(
                x=rows["step"],
                y=rows["general_loss"],
                mode="lines+markers",
                name="general LM loss (dev)",
            ),
            row=1,
            col=1,
        )
    if "metric" in metrics.columns:
        fig.add_trace(
            go.Scatter(
                x=metrics["step"], y=metrics["metric"], mode="lines", name="training-batch metric"
            ),
            row=1,
            col=2,
        )
    if evals is not None and "dev_metric" in evals.columns and evals["dev_metric"].notna().any():
        rows = evals.dropna(subset=["dev_metric"])
        fig.add_trace(
            go.Scatter(
                x=rows["step"], y=rows["dev_metric"], mode="lines+markers", name="dev metric"
            ),
            row=1,
            col=2,
        )
    fig.add_hline(y=0, line={"color": "#999", "width": 1}, row=1, col=2)
    fig.update_xaxes(title_text=STEP_AXIS)
    fig.update_yaxes(title_text="loss (nats/token)", row=1, col=1)
    fig.update_yaxes(title_text="logit(target) − logit(foil) (logits)", row=1, col=2)
    mark_key_steps(fig, keys)
    return _finish(fig, title)


def _palette() -> list[str]:
    import plotly.colors

    return list(plotly.colors.qualitative.Plotly) + list(plotly.colors.qualitative.D3)


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
PNG_WIDTH = 1500
"""Pixel width of exported PNGs (the figure is laid out at its own width, then scaled)."""

_STATIC_PROBLEM: str | None = None  # why static export failed once (then it is not retried)


def _static_export_errors() -> tuple[type[BaseException], ...]:
    """What a static export raises when it cannot be done here: RuntimeError (plotly: kaleido
    missing or no Chrome found; choreographer: the browser failed to start or closed; kaleido: a
    JavaScript error), kaleido's KaleidoError and the devtools protocol's error, the browser
    pipe closing (ChannelClosedError) and a render timeout (TimeoutError)."""
    try:
        from choreographer.errors import ChannelClosedError, DevtoolsProtocolError
        from kaleido.errors import KaleidoError
    except ImportError:  # no kaleido: plotly raises RuntimeError
        return (RuntimeError,)
    return (RuntimeError, KaleidoError, DevtoolsProtocolError, ChannelClosedError, TimeoutError)


def static_export_available() -> bool:
    """Whether PNG/SVG export can be attempted (kaleido importable, no earlier failure)."""
    if _STATIC_PROBLEM is not None:
        return False
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return True


def _export_size(fig: go.Figure) -> dict[str, float]:
    """write_image options: the figure's own size (default 1100 x its height or 600) scaled so
    the image is `PNG_WIDTH` pixels wide."""
    width = fig.layout.width or 1100
    height = fig.layout.height or 600
    return {"width": width, "height": height, "scale": PNG_WIDTH / width}


def save_figure(
    fig: go.Figure,
    path_stem: str | Path,
    formats: Sequence[str] = ("html", "png"),
    *,
    plotlyjs: bool | str = True,
) -> list[Path]:
    """Write ``fig`` as ``<path_stem>.<format>`` for each of ``formats`` (``html``, ``png``,
    ``svg``, ``pdf``) and return the paths written. HTML (`figure_html`) works offline:
    plotly.js is embedded (``plotlyjs=True``) or, with ``plotlyjs="directory"``, written once
    as ``plotly.min.js`` beside the HTML files. PNGs are `PNG_WIDTH` (1500) pixels wide. Static
    formats need kaleido (``pip install kaleido``) and a Chromium; if export fails, a warning
    says so once per process and only the HTML is kept."""
    global _STATIC_PROBLEM
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write_html(path: Path) -> None:
        if plotlyjs == "directory":
            from plotly.offline import get_plotlyjs

            script = path.parent / "plotly.min.js"
            if not script.exists():
                script.write_text(get_plotlyjs(), encoding="utf-8")
        path.write_text(figure_html(fig, include_plotlyjs=plotlyjs), encoding="utf-8")

    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        if fmt == "html":
            write_html(path)
            written.append(path)
            continue
        if _STATIC_PROBLEM is not None:
            continue
        try:
            fig.write_image(path, **_export_size(fig))
            written.append(path)
        except _static_export_errors() as error:
            _STATIC_PROBLEM = f"{type(error).__name__}: {error}".splitlines()[0]
            message = (
                f"static figure export ({fmt}) is unavailable ({_STATIC_PROBLEM}); keeping HTML "
                "only. Install it with `pip install kaleido` and a Chromium (e.g. "
                "`apt-get install chromium`)."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            logger.warning(message)
    if not written:  # every static format failed and no HTML was asked for: keep the HTML
        html = stem.with_name(f"{stem.name}.html")
        write_html(html)
        written.append(html)
    return written


def _narrow_typed_array(value: dict[str, Any]) -> dict[str, Any]:
    """A plotly typed array (base64 ``bdata``) of float64 as float32, of int64 as int32 (when
    the values fit): half the bytes, and float32's 7 digits are more than a figure shows."""
    source = np.frombuffer(base64.b64decode(value["bdata"]), dtype="<" + value["dtype"])
    if value["dtype"] == "f8":
        narrow = source.astype("<f4")
    elif source.size and (source.min() < -(2**31) or source.max() >= 2**31):
        return value
    else:
        narrow = source.astype("<i4")
    kind = "f4" if value["dtype"] == "f8" else "i4"
    return {**value, "dtype": kind, "bdata": base64.b64encode(narrow.tobytes()).decode("ascii")}


def figure_json(fig: go.Figure, *, digits: int = 4, template: bool = False) -> str:
    """Compact JSON of a figure for embedding (the report): floats rounded to ``digits``
    significant digits, no template unless ``template`` (the page applies one to all)."""
    data = json.loads(fig.to_json())
    if not template:
        data.get("layout", {}).pop("template", None)
    return json.dumps(_round(data, digits), separators=(",", ":"), allow_nan=False)


def _round(value: Any, digits: int) -> Any:
    if isinstance(value, dict) and "bdata" in value and value.get("dtype") in ("f8", "i8"):
        return _narrow_typed_array(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# Circuit formation: the metric curve above the membership raster sorted by emergence step
# ---------------------------------------------------------------------------------------------
FORMATION_IN_CIRCUIT = "#2166ac"
"""Raster colour of an item in the circuit (the blue of `circuitdyn.plots`)."""
FORMATION_TRANSITION = "#d95f02"
FORMATION_ONSET = "#1b9e77"
FORMATION_CURVE_COLOURS = {
    "dev_accuracy": "#222222",
    "faithfulness_masked": "#7570b3",
    "faithfulness": "#7570b3",
}
FORMATION_CURVE_LABELS = {
    "dev_accuracy": "dev accuracy (fraction)",
    "faithfulness_masked": "faithfulness (ratio; where defined)",
    "faithfulness": "faithfulness (ratio)",
    "dev_metric": "dev metric (logits)",
}


def formation_figure(
    curve: pd.DataFrame,
    raster: pd.DataFrame,
    *,
    emergence: pd.DataFrame | None = None,
    metrics: Sequence[str] = ("dev_accuracy", "faithfulness_masked"),
    transition: int | None = None,
    near: int | None = None,
    onset: int | None = None,
    threshold: float = 0.8,
    title: str | None = None,
) -> go.Figure:
    """The metric curve above the membership raster sorted by emergence step.

    Args:
        curve: ``step`` and the ``metrics`` columns (e.g. `masked_faithfulness` of the run's
            evaluations); columns that are absent or all NaN are skipped.
        raster: item x step table of 0/1 (`emergence_raster`: rows in emergence order, columns
            the int steps); its index name (``edge`` / ``node``) labels the y axis.
        emergence: `emergence_steps` of the same items: a marker at each emergence step.
        transition: the step of the metric's phase transition (a vertical line), with a band of
            ``near`` steps on either side when given.
        onset: the step from which faithfulness stays >= ``threshold`` (a dashed line).
        title: the figure title (default: says what is drawn).
    """
    unit = raster.index.name or "item"
    shown = [m for m in metrics if m in curve.columns and curve[m].notna().any()]
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.3, 0.7],
        vertical_spacing=0.05,
    )
    for metric in shown:
        rows = curve.dropna(subset=[metric]).sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=rows["step"],
                y=rows[metric],
                mode="lines",
                name=FORMATION_CURVE_LABELS.get(metric, metric),
                line={"color": FORMATION_CURVE_COLOURS.get(metric, "#555"), "width": 2},
            ),
            row=1,
            col=1,
        )
    if any(m.startswith("faithfulness") for m in shown):
        fig.add_hline(y=threshold, line={"color": "#999", "width": 1, "dash": "dot"}, row=1, col=1)
    fig.update_yaxes(title_text="accuracy / faithfulness", row=1, col=1)

    steps = [int(s) for s in raster.columns]
    names = [str(name) for name in raster.index]
    fig.add_trace(
        go.Heatmap(
            z=raster.to_numpy(dtype=np.int8),
            x=steps,
            y=names,
            zmin=0,
            zmax=1,
            colorscale=[
                [0.0, "#f4f4f4"],
                [0.5, "#f4f4f4"],
                [0.5, FORMATION_IN_CIRCUIT],
                [1.0, FORMATION_IN_CIRCUIT],
            ],
            showscale=False,
            name=f"{unit} in the circuit",
            hovertemplate="step %{x}<br>%{y}<br>in circuit %{z}<extra></extra>",
        ),
        row=2,
        col=1,
    )
    if emergence is not None:
        label = emergence.columns[0]
        marks = emergence[emergence[label].astype(str).isin(names)].dropna(
            subset=["emergence_step"]
        )
        if len(marks):
            fig.add_trace(
                go.Scatter(
                    x=marks["emergence_step"].astype(float),
                    y=marks[label].astype(str),
                    mode="markers",
                    name="emergence step",
                    marker={"symbol": "line-ns-open", "size": 9, "color": "#111"},
                    hovertemplate="%{y} emerges at step %{x}<extra></extra>",
                ),
                row=2,
                col=1,
            )
    fig.update_yaxes(
        title_text=f"{unit} (sorted by emergence step)",
        autorange="reversed",
        showticklabels=len(names) <= 100,
        tickmode="array",
        tickvals=names,
        tickfont={"size": 9 if len(names) <= 60 else 8},
        showgrid=False,
        row=2,
        col=1,
    )
    fig.update_xaxes(title_text=STEP_AXIS, row=2, col=1)

    if transition is not None:
        if near:
            fig.add_vrect(
                x0=transition - near,
                x1=transition + near,
                fillcolor=FORMATION_TRANSITION,
                opacity=0.12,
                line_width=0,
                row="all",
                col=1,
            )
        fig.add_vline(
            x=float(transition),
            line={"color": FORMATION_TRANSITION, "width": 2},
            annotation_text=f"steepest rise (t={transition})",
            annotation_position="top left",
            annotation_font={"size": 11, "color": FORMATION_TRANSITION},
            row=1,
            col=1,
        )
        fig.add_vline(
            x=float(transition), line={"color": FORMATION_TRANSITION, "width": 2}, row=2, col=1
        )
    if onset is not None:
        fig.add_vline(
            x=float(onset),
            line={"color": FORMATION_ONSET, "width": 2, "dash": "dash"},
            annotation_text=f"faithfulness ≥ {threshold:g} (t={onset})",
            annotation_position="bottom right",
            annotation_font={"size": 11, "color": FORMATION_ONSET},
            row=1,
            col=1,
        )
        fig.add_vline(
            x=float(onset),
            line={"color": FORMATION_ONSET, "width": 2, "dash": "dash"},
            row=2,
            col=1,
        )
    default = (
        f"Circuit formation: task metric and the {len(names)} {unit}s of the circuit by emergence"
    )
    fig.update_layout(
        title={"text": title or default},
        template="plotly_white",
        font={"size": 13},
        height=max(500, min(1300, 300 + 11 * len(names))),
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
        showlegend=True,
    )
    return fig


# ---------------------------------------------------------------------------------------------
# forgetting against target performance (`circuitdyn.analysis.pareto`)
# ---------------------------------------------------------------------------------------------
PARETO_LABELS = {
    "general_loss_change": "Δ held-out LM loss (nats, ↑ = more forgetting)",
    "capability_accuracy_change": "Δ held-out capability accuracy (fraction, ↓ = more forgetting)",
    "target_accuracy": "target-task dev accuracy (fraction)",
    "target_metric": "target-task dev metric: logit(target) − logit(foil) (logits)",
    "tunable_fraction": "tunable fraction of parameters (0–1)",
}
PARETO_SHORT = {
    "general_loss_change": "Δ LM loss",
    "capability_accuracy_change": "Δ capability accuracy",
    "target_accuracy": "target accuracy",
    "target_metric": "target metric",
}
"""Axis titles (with units and the direction of forgetting) of the Pareto figures."""


STRATEGY_COLOURS = {
    "circuit": "#1f77b4",
    "circuit-paper": "#17becf",
    "fixed": "#2ca02c",
    "random": "#7f7f7f",
    "random-matched": "#8c564b",
    "gradient": "#9467bd",
    "lora": "#ff7f0e",
    "full": "#d62728",
}
"""One colour per tuning strategy, the same in every Pareto figure (others: the palette)."""


def _group_colours(groups: Sequence[str]) -> list[str]:
    """One colour per group, in order: the strategies' own colours when every group is a
    strategy (so an arm looks the same in every figure), else the palette."""
    if set(groups) <= set(STRATEGY_COLOURS):
        return [STRATEGY_COLOURS[name] for name in groups]
    return _palette()


def _strategy_colours(strategies: Sequence[str]) -> dict[str, str]:
    """Colours of `strategies`: `STRATEGY_COLOURS`, then unused palette colours in order."""
    spare = [c for c in _palette() if c not in STRATEGY_COLOURS.values()]
    out: dict[str, str] = {}
    for strategy in strategies:
        if strategy in STRATEGY_COLOURS:
            out[strategy] = STRATEGY_COLOURS[strategy]
        else:
            out[strategy] = spare[len([s for s in out if s not in STRATEGY_COLOURS]) % len(spare)]
    return out


def _error(high: pd.Series, low: pd.Series, mean: pd.Series) -> dict[str, Any]:
    """An asymmetric error-bar spec from interval bounds (no bar where a bound is NaN)."""
    plus = (high - mean).fillna(0.0).to_numpy(dtype=float)
    minus = (mean - low).fillna(0.0).to_numpy(dtype=float)
    return {
        "type": "data",
        "symmetric": False,
        "array": plus,
        "arrayminus": minus,
        "thickness": 1.2,
        "width": 3,
    }


def _fit_fronts(fig: go.Figure, rows: pd.DataFrame, x: str) -> None:
    """Zoom the x axis onto the fronts (with their intervals) when far-off points (e.g. a rate
    that overshoots) would squeeze them into a corner; say how many points are left out."""
    front = rows[rows["on_front"].astype(bool)]
    if front.empty:
        return
    ends = pd.concat([front[x], front[f"{x}_low"], front[f"{x}_high"]]).dropna()
    low, high = float(ends.min()), float(ends.max())
    margin = 0.15 * max(high - low, 1e-9)
    low, high = min(low - margin, 0.0), high + margin
    outside = rows[(rows[x] < low) | (rows[x] > high)]
    everything = float(rows[x].max() - rows[x].min())
    if outside.empty or (high - low) > 0.5 * everything:
        return
    fig.update_xaxes(range=[low, high])
    fig.add_annotation(
        x=1,
        y=0,
        xref="paper",
        yref="paper",
        xanchor="right",
        yanchor="bottom",
        showarrow=False,
        font={"size": 11, "color": "#555"},
        text=f"{len(outside)} mean points lie off the axis (up to {rows[x].max():.3g}); every "
        "front point is shown",
    )


def pareto_figure(
    fronts: pd.DataFrame,
    matched: pd.DataFrame | None = None,
    *,
    x: str = "general_loss_change",
    y: str = "target_accuracy",
    title: str | None = None,
) -> go.Figure:
    """Target performance against forgetting per strategy, from a `strategy_fronts` table.

    One colour per strategy: every (lr, step) point (the mean over seeds) as a faint marker,
    and the strategy's Pareto front (``on_front``) as a line with markers and error bars on both
    axes (the table's ``*_low`` / ``*_high`` intervals over seeds; none with one seed). Hover:
    strategy, lr, step, number of seeds, both values with their intervals. With `matched` (a
    `matched_points` table), a dashed horizontal line at its ``level``."""
    fig = go.Figure()
    strategies = list(dict.fromkeys(fronts["strategy"]))
    colours = _strategy_colours(strategies)
    x_label, y_label = PARETO_LABELS.get(x, x), PARETO_LABELS.get(y, y)
    columns = ["lr", "step", "n", f"{x}_low", f"{x}_high", f"{y}_low", f"{y}_high"]
    values = (
        "lr %{customdata[0]:.3g}, step %{customdata[1]}, %{customdata[2]} seeds<br>"
        f"{x}: %{{x:.4g}} [%{{customdata[3]:.3g}}, %{{customdata[4]:.3g}}]<br>"
        f"{y}: %{{y:.4g}} [%{{customdata[5]:.3g}}, %{{customdata[6]:.3g}}]<extra></extra>"
    )
    for strategy in strategies:
        hover = f"<b>{strategy}</b><br>" + values
        rows = fronts[(fronts["strategy"] == strategy)].dropna(subset=[x, y])
        if rows.empty:
            continue
        colour = colours[strategy]
        fig.add_trace(
            go.Scatter(
                x=rows[x],
                y=rows[y],
                mode="markers",
                marker={"color": colour, "size": 6, "opacity": 0.25},
                name=f"{strategy}: every lr and step",
                legendgroup=str(strategy),
                showlegend=False,
                customdata=rows[columns].to_numpy(dtype=float),
                hovertemplate=hover,
            )
        )
        front = rows[rows["on_front"].astype(bool)].sort_values([x, y])
        if front.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=front[x],
                y=front[y],
                mode="lines+markers",
                marker={"color": colour, "size": 8},
                line={"color": colour, "width": 2},
                error_x={
                    **_error(front[f"{x}_high"], front[f"{x}_low"], front[x]),
                    "color": colour,
                },
                error_y={
                    **_error(front[f"{y}_high"], front[f"{y}_low"], front[y]),
                    "color": colour,
                },
                name=str(strategy),
                legendgroup=str(strategy),
                customdata=front[columns].to_numpy(dtype=float),
                hovertemplate=hover,
            )
        )
    if matched is not None and len(matched):
        level = float(matched["level"].iloc[0])
        fig.add_hline(
            y=level,
            line={"dash": "dash", "color": "#555", "width": 1.5},
            annotation_text=f"matched level: {PARETO_SHORT.get(y, y)} = {level:g}",
            annotation_position="bottom right",
            annotation_font={"size": 11, "color": "#333"},
        )
    if x in ("general_loss_change", "capability_accuracy_change"):
        fig.add_vline(x=0, line={"color": "#999", "width": 1})
    _fit_fronts(fig, fronts.dropna(subset=[x, y]), x)
    n_seeds = int(fronts["n"].max()) if len(fronts) else 0
    default = (
        f"{PARETO_SHORT.get(y, y).capitalize()} against forgetting per strategy: means over {n_seeds} seeds; "
        "lines: each strategy's Pareto front (95% t-intervals)"
    )
    _finish(fig, title or default, x_label, y_label)
    fig.update_layout(showlegend=True, legend={"title": {"text": "strategy (Pareto front)"}})
    return fig


def matched_cost_figure(
    matched: pd.DataFrame,
    summary: pd.DataFrame,
    compare: pd.DataFrame | None = None,
    *,
    title: str | None = None,
) -> go.Figure:
    """The cost (forgetting) at matched target performance, one column per strategy.

    `summary` (a `matched_summary` table) gives each strategy's learning rate, mean cost and
    its interval (drawn as a marker with error bars); `matched` (a `matched_points` table) the
    runs: one dot per seed that reached the level at that rate. A line at zero marks no change
    from step 0. With `compare` (a `compare_at_matched` table), each strategy's tick label
    adds its difference from the reference with the 95% interval and the paired p-value."""
    fig = go.Figure()
    strategies = [s for s in summary["strategy"] if s in set(matched["strategy"])]
    colours = _strategy_colours(strategies)
    cost = str(matched["cost_name"].iloc[0]) if "cost_name" in matched and len(matched) else "cost"
    target = str(matched["target_name"].iloc[0]) if "target_name" in matched else "target"
    level = float(matched["level"].iloc[0]) if len(matched) else float("nan")
    stats = summary.set_index("strategy")
    notes = compare.set_index("strategy") if compare is not None else None
    ticks: list[str] = []
    for i, strategy in enumerate(strategies):
        row = stats.loc[strategy]
        runs = matched[
            (matched["strategy"] == strategy)
            & (matched["lr"] == row["lr"])
            & matched["reached"].astype(bool)
        ].sort_values("seed")
        label = (
            f"<b>{strategy}</b><br>lr {row['lr']:.3g}<br>{int(row['n'])}/{int(row['n_runs'])} seeds"
            if int(row["n"]) > 0
            else f"<b>{strategy}</b><br>never reached<br>the level"
        )
        if notes is not None and strategy in notes.index:
            note = notes.loc[strategy]
            if np.isfinite(float(note["mean_difference"])):
                label += f"<br>Δ {note['mean_difference']:+.3g}"
            if np.isfinite(float(note["low"])):  # an interval and a test need 2+ seeds
                label += f"<br>[{note['low']:+.2g}, {note['high']:+.2g}]"
                label += f"<br>p = {note['p_paired']:.2g}"
        ticks.append(label)
        colour = colours[strategy]
        if len(runs):
            offsets = np.linspace(-0.18, 0.18, len(runs)) if len(runs) > 1 else np.zeros(1)
            fig.add_trace(
                go.Scatter(
                    x=i + offsets,
                    y=runs["cost"],
                    mode="markers",
                    marker={"color": colour, "size": 7, "opacity": 0.55},
                    name=f"{strategy}: per seed",
                    legendgroup=str(strategy),
                    showlegend=False,
                    customdata=np.stack(
                        [runs["seed"].to_numpy(dtype=float), runs["crossing_step"].to_numpy(float)],
                        axis=1,
                    ),
                    hovertemplate=f"{strategy}, seed %{{customdata[0]}}: %{{y:.4g}} "
                    "(reached at step %{customdata[1]:.1f})<extra></extra>",
                )
            )
        if np.isfinite(row["cost"]):
            one = pd.Series([row["cost"]])
            fig.add_trace(
                go.Scatter(
                    x=[i + 0.3],
                    y=[row["cost"]],
                    mode="markers",
                    marker={"color": colour, "size": 12, "symbol": "diamond"},
                    error_y={
                        **_error(pd.Series([row["cost_high"]]), pd.Series([row["cost_low"]]), one),
                        "color": colour,
                        "thickness": 2,
                        "width": 6,
                    },
                    name=str(strategy),
                    legendgroup=str(strategy),
                    hovertemplate=f"{strategy}: mean %{{y:.4g}} "
                    f"[{row['cost_low']:.3g}, {row['cost_high']:.3g}] "
                    f"over {int(row['n'])} seeds<extra></extra>",
                )
            )
    fig.add_hline(
        y=0,
        line={"color": "#999", "width": 1, "dash": "dot"},
        annotation_text="no change from step 0",
        annotation_position="bottom left",
        annotation_font={"size": 11, "color": "#555"},
    )
    fig.update_xaxes(
        tickmode="array",
        tickvals=list(range(len(strategies))),
        ticktext=ticks,
        tickangle=0,
        tickfont={"size": 11},
        range=[-0.6, len(strategies) - 0.4],
    )
    x_title = "strategy (at its best learning rate)"
    if notes is not None and len(notes):
        reference = str(notes["reference"].iloc[0])
        x_title += (
            f"; Δ = its cost − {reference}'s (mean over seeds paired by seed, 95% t-interval, "
            "paired t-test p)"
        )
    default = (
        f"Forgetting at matched {PARETO_SHORT.get(target, target)} (≥ {level:g}), each strategy "
        "at its best rate<br><sup>dots: seeds; diamonds: mean with 95% t-interval</sup>"
    )
    _finish(
        fig,
        title or default,
        x_title,
        f"at the matched level: {PARETO_LABELS.get(cost, cost)}",
    )
    fig.update_layout(showlegend=False)
    return fig
