"""Figures: pure functions from analysis tables (`circuitdyn.analysis`) to plotly figures.

Every builder takes pandas tables (never a model or a store) and returns a
``plotly.graph_objects.Figure`` with a title, axis titles with units and, where it has several
traces, a legend. The data in a figure is the table's data (tests check that). `save_figure`
writes standalone HTML (plotly.js embedded: works offline) and, when a static exporter works
(kaleido + a Chromium), PNG / SVG.

Figures:

* `circuit_graph` / `circuit_animation`: the circuit as a layered graph (input, per layer its
  heads then its MLP, logits; left to right), edges as lines whose width and opacity grow with
  |score| and whose colour is the sign; the animation has one frame per step and a slider.
* `evolution_heatmap` (node x step), `churn_figure`, `size_figure`, `layer_composition_figure`,
  `events_figure`.
* `edge_trajectories_figure`, `rank_change_figure`.
* `head_heatmaps` (layer x head, before / after / difference), `head_role_trajectories`.
* `weight_change_heatmaps` (layer x head/MLP, one panel per run), `weight_share_bars`.
* `intrinsic_dimension_figure`, `membership_sankey`, `overlap_figure`.
* `strategy_curves_figure`, `final_metrics_bars`, `training_curves`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuitdyn.graph import parse_node

logger = logging.getLogger(__name__)

POSITIVE = "#2166ac"
NEGATIVE = "#b2182b"
UNSCORED = "#9e9e9e"
KIND_COLOURS = {"input": "#55a868", "logits": "#55a868", "head": "#4c72b0", "mlp": "#dd8452"}
TEMPLATE = "plotly_white"

METRIC_LABELS = {
    "dev_metric": "dev metric: logit(target) − logit(foil) (logits)",
    "dev_accuracy": "dev accuracy (fraction of verbs)",
    "general_loss": "general LM loss (nats/token)",
    "faithfulness": "faithfulness (circuit / model metric, ratio)",
    "loss": "training loss (nats/token)",
    "metric": "training-batch metric (logits)",
    "accuracy": "training-batch accuracy (fraction)",
    "grad_norm": "gradient norm (before clipping)",
    "lr": "learning rate",
}
_SHORT_LABELS = {
    "dev_metric": "dev metric",
    "dev_accuracy": "dev accuracy",
    "general_loss": "general loss",
    "faithfulness": "faithfulness",
}
_UNITS = {
    "dev_metric": "logits",
    "dev_accuracy": "fraction",
    "general_loss": "nats/token",
    "faithfulness": "ratio",
}
ROLE_LABELS = {
    "dla": "direct logit attribution (logits)",
    "attention_to_subject": "attention to subject (probability)",
    "attention_ratio": "attention to subject / uniform (ratio)",
    "uniform_baseline": "uniform attention baseline (probability)",
}

FINAL_METRICS = ("dev_metric", "dev_accuracy", "general_loss", "faithfulness")
"""The metrics of a final evaluation shown side by side (`final_metrics_bars`)."""

_INPUT_OFFSET = {"q": 0.22, "k": 0.0, "v": -0.22, "": 0.0}


def _label(name: str, labels: dict[str, str] = METRIC_LABELS) -> str:
    return labels.get(name, name)


def _finish(
    fig: go.Figure, title: str, x_title: str | None = None, y_title: str | None = None
) -> go.Figure:
    fig.update_layout(title={"text": title}, template=TEMPLATE)
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    named = {t.name for t in fig.data if t.name and t.showlegend is not False}
    fig.update_layout(showlegend=len(named) > 1)
    return fig


def _right_axis_line(
    fig: go.Figure,
    table: pd.DataFrame,
    x: str,
    y: str,
    name: str,
    unit: str,
    mode: str = "lines+markers",
) -> None:
    """A grey dashed line of ``table[y]`` on the right axis of a secondary-y figure, titled
    ``name (unit)``, when the column is there with any value."""
    if y not in table.columns or not table[y].notna().any():
        return
    line = {"color": "#777", "dash": "dash"}
    fig.add_trace(
        go.Scatter(x=table[x], y=table[y], mode=mode, name=name, line=line), secondary_y=True
    )
    fig.update_yaxes(title_text=f"{name} ({unit})", secondary_y=True)


# ---------------------------------------------------------------------------------------------
# the circuit as a layered graph
# ---------------------------------------------------------------------------------------------
def node_positions(node_names: Sequence[str]) -> pd.DataFrame:
    """Layout of the layered graph: ``node``, ``x`` (column: input 0, heads of layer L 2L+1, MLP
    of layer L 2L+2, logits 2 * n_layers + 1), ``y`` (heads spread around 0 by head index,
    everything else at 0), ``column`` (the tick label of x)."""
    infos = [parse_node(name) for name in node_names]
    n_layers = 1 + max((i.layer for i in infos if i.layer is not None), default=-1)
    n_heads = 1 + max((i.head for i in infos if i.head is not None), default=0)
    rows = []
    for info in infos:
        if info.kind == "head":
            y = info.head - (n_heads - 1) / 2
            rows.append((info.name, 2 * info.layer + 1, y, f"L{info.layer} heads"))
        elif info.kind == "mlp":
            rows.append((info.name, 2 * info.layer + 2, 0.0, f"L{info.layer} MLP"))
        elif info.kind == "input":
            rows.append((info.name, 0, 0.0, "input"))
        else:
            rows.append((info.name, 2 * n_layers + 1, 0.0, info.name))
    return pd.DataFrame(rows, columns=["node", "x", "y", "column"])


def _edge_bins(abs_scores: np.ndarray, max_abs: float, n_bins: int) -> np.ndarray:
    if max_abs <= 0 or not np.isfinite(max_abs):
        return np.zeros(abs_scores.shape, dtype=int)
    frac = np.clip(abs_scores / max_abs, 0.0, 1.0)
    return np.minimum((frac * n_bins).astype(int), n_bins - 1)


def _graph_traces(
    nodes: pd.DataFrame,
    edges: pd.DataFrame,
    positions: pd.DataFrame,
    max_abs: float,
    n_bins: int,
) -> list[go.Scatter]:
    """The fixed list of traces of one circuit frame (same count and order for every frame):
    per sign (positive, then negative) n_bins edge-line traces and one legend-only trace; one
    trace of unscored edges; one invisible hover trace at the edge midpoints (its customdata
    holds [edge, score] per edge); nodes in / not in the circuit; three legend-only entries
    for the node colours."""
    pos = positions.set_index("node")
    src_x = pos.loc[edges["src"], "x"].to_numpy(dtype=float)
    src_y = pos.loc[edges["src"], "y"].to_numpy(dtype=float)
    dst_x = pos.loc[edges["dst_node"], "x"].to_numpy(dtype=float)
    offsets = np.array([_INPUT_OFFSET.get(i, 0.0) for i in edges["input"]], dtype=float)
    dst_y = pos.loc[edges["dst_node"], "y"].to_numpy(dtype=float) + offsets
    score = edges["score"].to_numpy(dtype=float)
    finite = np.isfinite(score)
    bins = _edge_bins(np.abs(np.where(finite, score, 0.0)), max_abs, n_bins)
    traces: list[go.Scatter] = []
    for sign, colour, label in ((1, POSITIVE, "positive score"), (-1, NEGATIVE, "negative score")):
        for b in range(n_bins):
            pick = finite & (bins == b) & ((score >= 0) if sign > 0 else (score < 0))
            xs: list[float | None] = []
            ys: list[float | None] = []
            for i in np.flatnonzero(pick):
                xs += [src_x[i], dst_x[i], None]
                ys += [src_y[i], dst_y[i], None]
            frac = (b + 1) / n_bins
            traces.append(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    line={"color": colour, "width": 0.5 + 6.0 * frac},
                    opacity=0.2 + 0.8 * frac,
                    hoverinfo="skip",
                    name=f"edges, {label}",
                    legendgroup=label,
                    showlegend=False,
                )
            )
        # A data-less trace carries the legend entry, so it shows whatever bins are filled.
        traces.append(
            go.Scatter(
                x=[None],
                y=[None],
                mode="lines",
                line={"color": colour, "width": 4},
                name=f"edges, {label} (width ∝ |score|)",
                legendgroup=label,
                hoverinfo="skip",
            )
        )
    xs, ys = [], []
    for i in np.flatnonzero(~finite):
        xs += [src_x[i], dst_x[i], None]
        ys += [src_y[i], dst_y[i], None]
    traces.append(
        go.Scatter(
            x=xs,
            y=ys,
            mode="lines",
            line={"color": UNSCORED, "width": 1, "dash": "dot"},
            hoverinfo="skip",
            name="edges, no score",
            showlegend=bool(xs),
        )
    )
    traces.append(
        go.Scatter(
            x=(src_x + dst_x) / 2,
            y=(src_y + dst_y) / 2,
            mode="markers",
            marker={"size": 8, "color": "rgba(0,0,0,0)"},
            customdata=np.stack([edges["edge"].to_numpy(dtype=object), score.astype(object)], 1)
            if len(edges)
            else np.zeros((0, 2), dtype=object),
            hovertemplate="%{customdata[0]}<br>score %{customdata[1]:.4g}<extra></extra>",
            name="edge scores (hover)",
            showlegend=False,
        )
    )
    node_pos = pos.loc[nodes["node"]]
    inside = nodes["in_circuit"].to_numpy(dtype=bool)
    node_score = nodes["score"].to_numpy(dtype=float)
    for flag, label in ((True, "nodes in circuit"), (False, "nodes not in circuit")):
        pick = inside == flag
        kinds = nodes["kind"].to_numpy()[pick]
        traces.append(
            go.Scatter(
                x=node_pos["x"].to_numpy(dtype=float)[pick],
                y=node_pos["y"].to_numpy(dtype=float)[pick],
                mode="markers+text" if flag else "markers",
                text=nodes["node"].to_numpy()[pick] if flag else None,
                textposition="top center",
                textfont={"size": 9},
                marker={
                    "size": 16 if flag else 9,
                    "color": [KIND_COLOURS.get(k, "#888") for k in kinds] if flag else "#d0d0d0",
                    "line": {"width": 1, "color": "#333" if flag else "#bbb"},
                },
                customdata=np.stack(
                    [nodes["node"].to_numpy(dtype=object)[pick], node_score[pick].astype(object)], 1
                )
                if pick.any()
                else np.zeros((0, 2), dtype=object),
                hovertemplate="%{customdata[0]}<br>node score %{customdata[1]:.4g}<extra></extra>",
                name=label,
                showlegend=not flag,
            )
        )
    for kind, label in (
        ("head", "head in circuit"),
        ("mlp", "MLP in circuit"),
        ("input", "input / logits"),
    ):
        traces.append(  # legend-only entries for the node colours
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker={
                    "size": 12,
                    "color": KIND_COLOURS[kind],
                    "line": {"width": 1, "color": "#333"},
                },
                name=label,
                hoverinfo="skip",
            )
        )
    return traces


def _graph_layout(fig: go.Figure, positions: pd.DataFrame, title: str) -> go.Figure:
    ticks = positions.drop_duplicates("x").sort_values("x")
    fig.update_layout(
        title={"text": title},
        template=TEMPLATE,
        showlegend=True,
        hovermode="closest",
        legend={"orientation": "h", "y": -0.15},
    )
    fig.update_xaxes(
        title_text="position in the residual stream (layer; heads, then MLP)",
        tickmode="array",
        tickvals=ticks["x"].tolist(),
        ticktext=ticks["column"].tolist(),
        showgrid=False,
        zeroline=False,
    )
    fig.update_yaxes(
        title_text="head index (centred; q/k/v inputs offset up/middle/down)",
        showgrid=False,
        zeroline=False,
        showticklabels=False,
    )
    return fig


def circuit_graph(
    nodes: pd.DataFrame,
    edges: pd.DataFrame,
    *,
    title: str | None = None,
    n_width_bins: int = 5,
    max_abs: float | None = None,
) -> go.Figure:
    """The circuit of one step as a layered graph, from `circuitdyn.analysis.circuit_tables`.

    ``nodes``: ``node``, ``kind``, ``score``, ``in_circuit``; ``edges``: ``edge``, ``src``,
    ``dst_node``, ``input``, ``score``. Edge width and opacity grow with |score| / ``max_abs``
    (default: the largest |score| of the table) in ``n_width_bins`` steps; blue = positive,
    red = negative, grey dotted = no score. Hover shows names and scores (metric units).
    """
    positions = node_positions(list(nodes["node"]))
    scores = edges["score"].to_numpy(dtype=float)
    top = max_abs if max_abs is not None else float(np.nanmax(np.abs(scores), initial=0.0))
    fig = go.Figure(_graph_traces(nodes, edges, positions, top, n_width_bins))
    step = nodes["step"].iloc[0] if "step" in nodes.columns and len(nodes) else None
    default = f"Circuit at step {step}" if step is not None else "Circuit"
    return _graph_layout(fig, positions, title or f"{default} ({len(edges)} edges)")


def circuit_animation(
    nodes: pd.DataFrame,
    edges: pd.DataFrame,
    *,
    title: str = "Circuit over training",
    n_width_bins: int = 5,
    frame_ms: int = 400,
) -> go.Figure:
    """The circuit evolving, from `circuitdyn.analysis.circuit_evolution` tables (a ``step``
    column tells the frames apart): one plotly frame per step (frame ``name`` = the step), a
    step slider and play / pause buttons. Edge widths share one scale over all frames."""
    positions = node_positions(list(dict.fromkeys(nodes["node"])))
    steps = list(dict.fromkeys(nodes["step"].tolist()))
    top = float(np.nanmax(np.abs(edges["score"].to_numpy(dtype=float)), initial=0.0))
    frames = []
    for step in steps:
        traces = _graph_traces(
            nodes[nodes["step"] == step],
            edges[edges["step"] == step],
            positions,
            top,
            n_width_bins,
        )
        frames.append(go.Frame(data=traces, name=str(step)))
    fig = go.Figure(data=frames[0].data if frames else [], frames=frames)
    _graph_layout(fig, positions, title)
    slider_steps = [
        {
            "label": str(step),
            "method": "animate",
            "args": [[str(step)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True}}],
        }
        for step in steps
    ]
    fig.update_layout(
        sliders=[
            {
                "active": 0,
                "currentvalue": {"prefix": "training step: "},
                "pad": {"t": 60},
                "steps": slider_steps,
            }
        ],
        updatemenus=[
            {
                "type": "buttons",
                "direction": "left",
                "x": 0.0,
                "y": 1.12,
                "buttons": [
                    {
                        "label": "play",
                        "method": "animate",
                        "args": [
                            None,
                            {"frame": {"duration": frame_ms, "redraw": True}, "fromcurrent": True},
                        ],
                    },
                    {
                        "label": "pause",
                        "method": "animate",
                        "args": [[None], {"mode": "immediate", "frame": {"duration": 0}}],
                    },
                ],
            }
        ],
    )
    return fig


# ---------------------------------------------------------------------------------------------
# dynamics
# ---------------------------------------------------------------------------------------------
def evolution_heatmap(
    matrix: pd.DataFrame, *, kind: str = "score", title: str | None = None
) -> go.Figure:
    """Node x step heatmap of a `node_score_matrix` (``kind="score"``: diverging colours around
    0, metric units) or `node_membership` table (``kind="membership"``: 1 in the circuit, 0
    not). z is the table's values (rows = nodes, columns = steps)."""
    if kind not in ("score", "membership"):
        raise ValueError(f"kind must be 'score' or 'membership', got {kind!r}")
    z = matrix.to_numpy(dtype=float)
    x = [int(c) for c in matrix.columns]
    y = [str(i) for i in matrix.index]
    if kind == "score":
        trace = go.Heatmap(
            z=z,
            x=x,
            y=y,
            colorscale="RdBu",
            zmid=0.0,
            colorbar={"title": {"text": "node score (logits)"}},
            hovertemplate="step %{x}<br>%{y}<br>score %{z:.4g}<extra></extra>",
        )
        default = "Node scores over training"
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
    return _finish(fig, title or default, "training step (update index)", "node")


def churn_figure(churn: pd.DataFrame, *, title: str = "Circuit churn") -> go.Figure:
    """Jaccard indices of a `churn` table over steps: nodes and edges against the previous,
    the first and the last step's circuit (6 lines, y = the table's columns)."""
    fig = go.Figure()
    styles = {"prev": "solid", "first": "dash", "last": "dot"}
    names = {"prev": "previous step", "first": "first step", "last": "last step"}
    for level, colour in (("edges", POSITIVE), ("nodes", "#dd8452")):
        for ref in ("prev", "first", "last"):
            column = f"jaccard_{level}_{ref}"
            fig.add_trace(
                go.Scatter(
                    x=churn["step"],
                    y=churn[column],
                    mode="lines",
                    name=f"{level} vs {names[ref]}",
                    line={"color": colour, "dash": styles[ref]},
                )
            )
    fig.update_yaxes(range=[0, 1.05])
    return _finish(fig, title, "training step (update index)", "Jaccard index (0–1)")


def size_figure(sizes: pd.DataFrame, *, title: str = "Circuit size") -> go.Figure:
    """A `circuit_sizes` table: edges, nodes and heads (left axis, counts) and tunable parameters
    (right axis) per step."""
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
    fig.update_yaxes(title_text="edges / nodes / heads (count)", secondary_y=False)
    return _finish(fig, title, "training step (update index)")


def layer_composition_figure(
    composition: pd.DataFrame, *, title: str = "Circuit nodes per layer"
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
            colorbar={"title": {"text": "nodes (count)"}},
            hovertemplate="step %{x}<br>%{y}: %{z} nodes (%{customdata[0]} heads, "
            "MLP %{customdata[1]})<extra></extra>",
        )
    )
    return _finish(fig, title, "training step (update index)", "layer")


def events_figure(
    events: pd.DataFrame, node_names: Sequence[str], *, title: str = "Node entries and exits"
) -> go.Figure:
    """A `node_events` table as markers: x = step, y = node (in ``node_names`` order); green
    triangles up = entries, red triangles down = exits."""
    fig = go.Figure()
    for event, symbol, colour in (
        ("enter", "triangle-up", "#1a9850"),
        ("exit", "triangle-down", NEGATIVE),
    ):
        rows = events[events["event"] == event]
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
    return _finish(fig, title, "training step (update index)", "node")


# ---------------------------------------------------------------------------------------------
# edges
# ---------------------------------------------------------------------------------------------
def edge_trajectories_figure(
    trajectories: pd.DataFrame,
    trends: pd.DataFrame | None = None,
    *,
    title: str = "Top edge scores over training",
) -> go.Figure:
    """One line per edge of an `edge_trajectories` table (x = step, y = score); with an
    `edge_trends` table, each edge's OLS fit as a dashed line of the same colour."""
    fig = go.Figure()
    palette = _palette()
    fits = trends.set_index("edge") if trends is not None else None
    for i, (edge, rows) in enumerate(trajectories.groupby("edge", sort=False)):
        colour = palette[i % len(palette)]
        fig.add_trace(
            go.Scatter(
                x=rows["step"],
                y=rows["score"],
                mode="lines+markers",
                marker={"size": 4},
                line={"color": colour},
                name=edge,
                legendgroup=edge,
            )
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
                )
            )
    fig.add_hline(y=0, line={"color": "#999", "width": 1})
    return _finish(fig, title, "training step (update index)", "edge score (logits)")


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
        title or "Rank changes of the top edges",
        "attributed step",
        "rank by |score| (1 = strongest, log scale)",
    )


# ---------------------------------------------------------------------------------------------
# heads and weights
# ---------------------------------------------------------------------------------------------
def _pivot_heads(roles: pd.DataFrame, value: str) -> pd.DataFrame:
    return roles.pivot(index="layer", columns="head", values=value).sort_index()


def head_heatmaps(
    roles: pd.DataFrame,
    value: str = "dla",
    steps: Sequence[int] | None = None,
    *,
    title: str | None = None,
) -> go.Figure:
    """Layer x head heatmaps of a `head_roles` table's ``value`` column at ``steps`` (default:
    its first and last step, i.e. before / after), plus their difference (last - first) when
    two steps are shown. Before/after share one colour axis; the difference has its own."""
    all_steps = sorted(roles["step"].unique().tolist())
    chosen = [all_steps[0], all_steps[-1]] if steps is None else list(steps)
    chosen = list(dict.fromkeys(chosen))
    panels = [_pivot_heads(roles[roles["step"] == s], value) for s in chosen]
    names = [("initial model" if s < 0 else f"after update {s}") for s in chosen]
    diff = len(panels) == 2
    if diff:
        panels.append(panels[1] - panels[0])
        names.append("difference (last − first)")
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=names, horizontal_spacing=0.08)
    shared = np.concatenate([p.to_numpy(dtype=float).ravel() for p in panels[: len(chosen)]])
    diverging = value == "dla"
    for i, panel in enumerate(panels):
        is_diff = diff and i == len(panels) - 1
        fig.add_trace(
            go.Heatmap(
                z=panel.to_numpy(dtype=float),
                x=[f"h{int(h)}" for h in panel.columns],
                y=[f"L{int(la)}" for la in panel.index],
                coloraxis="coloraxis2" if is_diff else "coloraxis",
                name=names[i],
                hovertemplate="%{y} %{x}: %{z:.4g}<extra>" + names[i] + "</extra>",
            ),
            row=1,
            col=i + 1,
        )
    span = float(np.nanmax(np.abs(shared), initial=0.0)) or 1.0
    label = _label(value, ROLE_LABELS)
    fig.update_layout(
        coloraxis={
            "colorscale": "RdBu" if diverging else "Viridis",
            "cmin": -span if diverging else float(np.nanmin(shared, initial=0.0)),
            "cmax": span if diverging else float(np.nanmax(shared, initial=1.0)),
            "colorbar": {"title": {"text": label}, "len": 0.9}
            if not diff
            else {
                "title": {"text": label, "side": "top"},
                "orientation": "h",
                "x": 0.3,
                "xanchor": "center",
                "y": -0.45,
                "len": 0.55,
                "thickness": 12,
            },
        }
    )
    if diff:
        d = panels[-1].to_numpy(dtype=float)
        dspan = float(np.nanmax(np.abs(d), initial=0.0)) or 1.0
        fig.update_layout(
            coloraxis2={
                "colorscale": "PuOr",
                "cmin": -dspan,
                "cmax": dspan,
                "colorbar": {"title": {"text": "change"}, "x": 1.02, "len": 0.9},
            }
        )
    fig.update_xaxes(title_text="head")
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text="layer", row=1, col=1)
    if diff:
        fig.update_layout(margin={"b": 170})
    return _finish(fig, title or f"Head roles: {label}")


def head_role_trajectories(
    roles: pd.DataFrame, value: str = "dla", *, top_k: int = 8, title: str | None = None
) -> go.Figure:
    """One line per head (the ``top_k`` with the largest |value| at any checkpoint) of a
    `head_roles` table's ``value`` over updates (0 = the initial model)."""
    strength = roles.groupby("node")[value].apply(lambda s: s.abs().max())
    chosen = strength.sort_values(ascending=False, kind="stable").index[:top_k]
    fig = go.Figure()
    for node in chosen:
        rows = roles[roles["node"] == node].sort_values("updates")
        fig.add_trace(go.Scatter(x=rows["updates"], y=rows[value], mode="lines+markers", name=node))
    label = _label(value, ROLE_LABELS)
    if value == "attention_to_subject" and "uniform_baseline" in roles.columns:
        base = roles.groupby("updates")["uniform_baseline"].first()
        fig.add_trace(
            go.Scatter(
                x=base.index,
                y=base.to_numpy(),
                mode="lines",
                name="uniform baseline",
                line={"color": "#999", "dash": "dot"},
            )
        )
    return _finish(
        fig,
        title or f"Head roles over training: {label}",
        "updates applied (0 = initial model)",
        label,
    )


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
        coloraxis={"colorscale": "Viridis", "colorbar": {"title": {"text": "relative change"}}}
    )
    fig.update_xaxes(title_text="component (head or MLP)")
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text="layer", row=1, col=1)
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
    _right_axis_line(fig, curve, "top_n", "general_loss", "general LM loss", "nats/token")
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
    fig.update_xaxes(type="log")
    fig.update_yaxes(title_text=_label(metric), secondary_y=False)
    return _finish(fig, title, "circuit size top_n (edges, log scale)")


def membership_sankey(
    flows: pd.DataFrame, *, title: str = "Node membership: before → during → after"
) -> go.Figure:
    """Sankey of a `membership_flows` table: one Sankey node per (phase, state), one link per
    row with value = ``count`` (nodes) and the node names on hover."""
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
        POSITIVE if "in circuit" in lab and "not" not in lab else "#bbbbbb" for lab in labels
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
    fig.update_layout(title={"text": title + " (link width = number of nodes)"}, template=TEMPLATE)
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


def strategy_curves_figure(
    curves: pd.DataFrame, metric: str = "dev_metric", *, title: str | None = None
) -> go.Figure:
    """One line per ``run`` of a `strategy_curves` table: ``metric`` over steps."""
    fig = go.Figure()
    for run, rows in curves.groupby("run", sort=False):
        rows = rows.dropna(subset=[metric]) if metric in rows.columns else rows.iloc[:0]
        fig.add_trace(
            go.Scatter(x=rows["step"], y=rows[metric], mode="lines+markers", name=str(run))
        )
    label = _label(metric)
    return _finish(fig, title or f"{label} per run", "training step (updates seen)", label)


def final_metrics_bars(
    finals: pd.DataFrame,
    metrics: Sequence[str] = FINAL_METRICS,
    *,
    title: str = "Final evaluation per run",
) -> go.Figure:
    """One bar panel per metric of a `final_evals` table, one bar per run (y = the table's
    values)."""
    present = [m for m in metrics if m in finals.columns]
    fig = make_subplots(
        rows=1,
        cols=max(1, len(present)),
        subplot_titles=[_SHORT_LABELS.get(m, m) for m in present],
        horizontal_spacing=0.1,
    )
    palette = _palette()
    runs = finals["run"].astype(str).tolist()
    for i, metric in enumerate(present):
        fig.add_trace(
            go.Bar(
                x=runs,
                y=finals[metric],
                name=metric,
                marker_color=[palette[j % len(palette)] for j in range(len(runs))],
                showlegend=False,
            ),
            row=1,
            col=i + 1,
        )
        fig.update_yaxes(title_text=_UNITS.get(metric, metric), row=1, col=i + 1)
    fig.update_xaxes(title_text="run")
    return _finish(fig, title)


def training_curves(
    metrics: pd.DataFrame, evals: pd.DataFrame | None = None, *, title: str = "Training"
) -> go.Figure:
    """Training loss (left panel, nats/token) and the task metric (right panel, logits) per step
    from a run's metrics table, with the dev metric from its evaluations table."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss", "task metric"])
    fig.add_trace(
        go.Scatter(x=metrics["step"], y=metrics["loss"], mode="lines", name="training loss"),
        row=1,
        col=1,
    )
    if evals is not None and "general_loss" in evals.columns:
        fig.add_trace(
            go.Scatter(
                x=evals["step"],
                y=evals["general_loss"],
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
    if evals is not None and "dev_metric" in evals.columns:
        fig.add_trace(
            go.Scatter(
                x=evals["step"], y=evals["dev_metric"], mode="lines+markers", name="dev metric"
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="training step (update index)")
    fig.update_yaxes(title_text="loss (nats/token)", row=1, col=1)
    fig.update_yaxes(title_text="logit(target) − logit(foil) (logits)", row=1, col=2)
    return _finish(fig, title)


def _palette() -> list[str]:
    import plotly.colors

    return list(plotly.colors.qualitative.Plotly) + list(plotly.colors.qualitative.D3)


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
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


def save_figure(
    fig: go.Figure,
    path_stem: str | Path,
    formats: Sequence[str] = ("html", "png"),
    *,
    plotlyjs: bool | str = True,
) -> list[Path]:
    """Write ``fig`` as ``<path_stem>.<format>`` for each of ``formats`` (``html``, ``png``,
    ``svg``, ``pdf``) and return the paths written. HTML works offline: plotly.js is embedded
    (``plotlyjs=True``) or, with ``plotlyjs="directory"``, written once as ``plotly.min.js``
    beside the HTML files (much smaller when many figures share a folder). Static formats need
    kaleido (``pip install kaleido``) and a Chromium; if export fails, a warning says so once
    per process and only the HTML is kept."""
    global _STATIC_PROBLEM
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        if fmt == "html":
            fig.write_html(path, include_plotlyjs=plotlyjs, full_html=True)
            written.append(path)
            continue
        if _STATIC_PROBLEM is not None:
            continue
        try:
            fig.write_image(path)
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
        fig.write_html(html, include_plotlyjs=plotlyjs, full_html=True)
        written.append(html)
    return written
