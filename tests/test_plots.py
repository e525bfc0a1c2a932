"""Figures carry exactly the data of the tables they are built from, and are labelled."""

from __future__ import annotations

import base64
import shutil
import warnings

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from figure_check import assert_trace_equals, check_figure, trace_named, values

from circuitdyn import plots as P

NODES = ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1", "logits"]


def _nodes(step: int = 0, inside=("input", "a0.h0", "m0", "logits")) -> pd.DataFrame:
    kinds = {"input": "input", "logits": "logits"}
    return pd.DataFrame(
        {
            "node": NODES,
            "kind": [kinds.get(n, "mlp" if n.startswith("m") else "head") for n in NODES],
            "score": np.arange(len(NODES), dtype=float) - 3,
            "in_circuit": [n in inside for n in NODES],
            "step": step,
        }
    )


def _edges(step: int = 0, scores=(0.5, -2.0, 1.0, np.nan)) -> pd.DataFrame:
    rows = [
        ("input->a0.h0<q>", "input", "a0.h0<q>", "a0.h0", "q"),
        ("a0.h0->m0", "a0.h0", "m0", "m0", ""),
        ("m0->logits", "m0", "logits", "logits", ""),
        ("input->a1.h1<v>", "input", "a1.h1<v>", "a1.h1", "v"),
    ][: len(scores)]
    frame = pd.DataFrame(rows, columns=["edge", "src", "dst", "dst_node", "input"])
    frame["score"] = list(scores)
    frame["in_circuit"] = True
    frame["step"] = step
    return frame


def _hover(traces) -> go.Scatter:
    return next(t for t in traces if t.name == "edge scores (hover)")


def _segments(traces, colour: str) -> int:
    """Curves drawn in ``colour`` (each ends with a NaN gap)."""
    lines = [
        t
        for t in traces
        if t.mode == "lines" and t.line.color == colour and t.meta != P.LEGEND_ONLY
    ]
    return sum(int(np.isnan(values(t.x)).sum()) for t in lines)


def _check_labels(fig: go.Figure) -> None:
    check_figure(fig)


def test_node_positions_layered():
    pos = P.node_positions(NODES).set_index("node")
    assert pos.loc["input", "x"] == 0 and pos.loc["logits", "x"] == 5
    assert pos.loc["a1.h0", "x"] == 3 and pos.loc["m1", "x"] == 4
    # Heads stack above the residual lane (y = 0), h0 on top; residual nodes on the lane.
    assert pos.loc["a0.h0", "y"] > pos.loc["a0.h1", "y"] > 0
    assert pos.loc["input", "y"] == pos.loc["m0", "y"] == pos.loc["logits", "y"] == 0
    assert pos.loc["m0", "column"] == "L0 MLP" and pos.loc["a1.h1", "column"] == "L1 heads"
    with pytest.raises(ValueError, match="not a circuitdyn node name"):
        P.node_positions(["input", "blocks.0"])


def test_edge_paths_end_at_ports_and_residual_arcs_do_not_overlap():
    pos = P.node_positions(NODES)
    ports = P.port_positions(pos).set_index("port")
    edges = pd.DataFrame(
        {"src": ["input", "input", "m0", "input"], "dst_node": ["a1.h0", "m0", "m1", "m1"],
         "input": ["q", "", "", ""]}
    )  # fmt: skip
    xs, ys = P.edge_paths(edges, pos)
    # The q edge ends on a1.h0's q port, above the head.
    assert (xs[0, -1], ys[0, -1]) == pytest.approx(
        (ports.loc["a1.h0<q>", "x"], ports.loc["a1.h0<q>", "y"])
    )
    assert ys[0, -1] > pos.set_index("node").loc["a1.h0", "y"]
    # Edges along the residual lane hang below it, longer spans deeper: input -> m1 passes
    # below m0, so it does not run through input -> m0 -> m1.
    lows = ys[1:].min(axis=1)
    assert lows.max() < 0 and lows[2] < lows[0] and lows[2] < lows[1]


def test_circuit_graph_data_equals_table():
    nodes, edges = _nodes(), _edges()
    fig = P.circuit_graph(nodes, edges)
    check_figure(fig, "circuit_graph")
    hover = _hover(fig.data)
    assert list(hover.customdata[:, 0]) == edges["edge"].tolist()
    np.testing.assert_array_equal(hover.customdata[:, 1].astype(float), edges["score"].to_numpy())
    # One curve per edge, in the colour of its sign: score < 0 supports the target (blue).
    assert _segments(fig.data, P.POSITIVE) == 1
    assert _segments(fig.data, P.NEGATIVE) == 2
    assert _segments(fig.data, P.UNSCORED) == 1
    # The strongest edge (|-2|) is in the widest bin, and blue.
    widest = max(
        (t for t in fig.data if t.mode == "lines" and t.meta != P.LEGEND_ONLY),
        key=lambda t: t.line.width,
    )
    assert widest.line.color == P.POSITIVE
    node_trace = trace_named(fig, "nodes")
    assert list(node_trace.ids) == NODES  # every node, keyed, fixed order
    assert list(node_trace.customdata[:, 0]) == NODES
    np.testing.assert_array_equal(
        node_trace.customdata[:, 1].astype(float), nodes["score"].to_numpy()
    )
    assert list(node_trace.customdata[:, 2]) == nodes["in_circuit"].tolist()
    assert node_trace.textfont.size >= 12
    legend = {t.name for t in fig.data if t.meta == P.LEGEND_ONLY}
    assert f"edge {P.SUPPORTS}" in legend and f"edge {P.FAVOURS}" in legend
    assert "target" in fig.layout.legend.title.text  # the sign convention is stated
    # q / k / v ports of every head are drawn.
    ports = trace_named(fig, "head inputs (q, k, v)")
    assert len(ports.x) == 3 * 4


def test_circuit_graph_caps_edges_and_highlights():
    nodes, edges = _nodes(), _edges(scores=(0.5, -2.0, 1.0))
    fig = P.circuit_graph(nodes, edges, max_edges=2)
    assert list(_hover(fig.data).customdata[:, 0]) == ["a0.h0->m0", "m0->logits"]
    assert "2 strongest edges drawn" in fig.layout.title.text
    fig = P.circuit_graph(nodes, edges, highlight="m0")
    assert list(_hover(fig.data).customdata[:, 0]) == ["a0.h0->m0", "m0->logits"]
    faded = trace_named(fig, "edges not touching the highlighted node")
    assert int(np.isnan(values(faded.x)).sum()) == 1


def test_small_multiples_and_diff_graph():
    nodes = pd.concat([_nodes(0), _nodes(5, inside=("input", "m0", "logits"))], ignore_index=True)
    edges = pd.concat([_edges(0), _edges(5, scores=(3.0, 0.25))], ignore_index=True)
    keys = pd.DataFrame(
        {"key": ["initial", "metric_zero", "final"], "step": [0, 5, 5],
         "snapshot_step": [0, 5, 5], "label": ["initial", "dev metric crosses 0", "final"]}
    )  # fmt: skip
    fig = P.circuit_small_multiples(nodes, edges, keys)
    check_figure(fig, "small multiples")
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].startswith("<b>step 0</b>: initial (4 edges)")
    assert "dev metric crosses 0 / final" in titles[1]
    hovers = [t for t in fig.data if t.name == "edge scores (hover)"]
    assert [list(h.customdata[:, 0]) for h in hovers] == [
        edges.loc[edges["step"] == s, "edge"].tolist() for s in (0, 5)
    ]
    diff = P.circuit_diff_graph(
        nodes[nodes["step"] == 0], edges[edges["step"] == 0],
        nodes[nodes["step"] == 5], edges[edges["step"] == 5],
    )  # fmt: skip
    check_figure(diff, "diff")
    status = dict(_hover(diff.data).customdata[:, :2])
    # 0.5 -> 3.0 kept; -2.0 -> 0.25 flipped; the other two lost.
    assert status == {
        "input->a0.h0<q>": "kept",
        "a0.h0->m0": "sign flipped",
        "m0->logits": "lost",
        "input->a1.h1<v>": "lost",
    }
    assert "0 edges gained, 2 lost, 1 flipped sign" in diff.layout.title.text


def test_circuit_explorer_holds_every_step():
    nodes = pd.concat([_nodes(0), _nodes(5, inside=("input", "m0", "logits"))], ignore_index=True)
    edges = pd.concat([_edges(0), _edges(5, scores=(3.0, 0.25))], ignore_index=True)
    fig = P.circuit_explorer(nodes, edges, step_text={0: "metric -1", 5: "metric 1"})
    check_figure(fig, "explorer")
    assert not fig.frames and P.is_widget(fig)
    spec = fig.layout.meta["circuitdyn"]
    assert spec["steps"] == [0, 5]
    for frame, step in zip(spec["frames"], (0, 5), strict=True):
        expected = edges[edges["step"] == step]
        indices = np.frombuffer(base64.b64decode(frame["e"]), "<u2")
        assert [spec["edges"][i] for i in indices] == expected["edge"].tolist()
        quantised = np.frombuffer(base64.b64decode(frame["q"]), "<i2").astype(float)
        scores = np.where(quantised == -32768, np.nan, quantised / 32767 * frame["m"])
        np.testing.assert_allclose(
            scores, expected["score"], atol=frame["m"] / 30000, equal_nan=True
        )  # int16 relative to the step's largest |score|
        in_circuit = nodes[(nodes["step"] == step) & nodes["in_circuit"]]["node"].tolist()
        assert [spec["nodes"][i] for i in frame["n"]] == in_circuit
    assert spec["frames"][1]["t"] == "metric 1"
    # The trace slots the script fills are where it expects them.
    assert fig.data[spec["slots"]["nodes"]].name == "nodes"
    assert fig.data[spec["slots"]["hover"]].name == "edge scores (hover)"
    html = P.figure_html(fig, include_plotlyjs=False, full_html=False)
    assert "circuitdynExplorer" in html and "Plotly.animate" not in html
    assert P.circuit_animation(nodes, edges).layout.meta["circuitdyn"]["steps"] == [0, 5]


def test_evolution_heatmaps():
    matrix = pd.DataFrame(
        [[0.5, -1.0, 2.0], [0.0, 1.5, np.nan]], index=["a0.h0", "m0"], columns=[0, 10, 20]
    )
    fig = P.evolution_heatmap(matrix)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z, dtype=float), matrix.to_numpy())
    assert list(fig.data[0].x) == [0, 10, 20] and list(fig.data[0].y) == ["a0.h0", "m0"]
    member = matrix.notna() & (matrix > 0)
    fig = P.evolution_heatmap(member, kind="membership")
    np.testing.assert_array_equal(
        np.asarray(fig.data[0].z, dtype=float), member.to_numpy(dtype=float)
    )
    _check_labels(fig)


def test_churn_size_composition_events():
    churn = pd.DataFrame(
        {
            "step": [0, 1, 2],
            **{
                f"jaccard_{lv}_{r}": np.random.default_rng(0).random(3)
                for lv in ("edges", "nodes")
                for r in ("prev", "first", "last")
            },
        }
    )
    churn["edges_added"] = [0, 3, 1]
    churn["edges_removed"] = [0, 2, 1]
    fig = P.churn_figure(churn, window=3)
    assert_trace_equals(trace_named(fig, "edges entering"), x=[0, 1, 2], y=[0, 3, 1])
    assert_trace_equals(trace_named(fig, "edges leaving (drawn downwards)"), y=[0, -2, -1])
    smooth = churn["jaccard_edges_prev"].rolling(3, center=True, min_periods=1).mean()
    assert_trace_equals(
        trace_named(fig, "edge Jaccard with the previous step (3-step mean)"), y=smooth
    )
    _check_labels(fig)

    sizes = pd.DataFrame(
        {
            "step": [0, 1],
            "n_edges": [5, 6],
            "n_nodes": [3, 4],
            "n_heads": [1, 2],
            "n_tunable": [100.0, 200.0],
        }
    )
    fig = P.size_figure(sizes)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["edges"].y) == [5, 6] and list(by_name["tunable parameters"].y) == [
        100.0,
        200.0,
    ]
    _check_labels(fig)

    comp = pd.DataFrame(
        {"step": [0, 0, 1, 1], "layer": [0, 1, 0, 1], "n_heads": [1, 0, 2, 1], "mlp": [1, 0, 0, 1]}
    )
    comp["n_nodes"] = comp["n_heads"] + comp["mlp"]
    fig = P.layer_composition_figure(comp)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), [[2, 2], [0, 2]])
    _check_labels(fig)

    events = pd.DataFrame(
        {"step": [1, 2, 2], "node": ["m0", "a0.h0", "a1.h1"], "event": ["enter", "exit", "enter"]}
    )
    fig = P.events_figure(events, NODES)
    enters = next(t for t in fig.data if t.name == "enters")
    assert list(enters.x) == [1, 2] and list(enters.y) == ["m0", "a1.h1"]
    _check_labels(fig)


def test_edge_trajectories_and_ranks():
    traj = pd.DataFrame(
        {
            "edge": ["e1"] * 3 + ["e2"] * 2,
            "step": [0, 1, 2, 0, 2],
            "score": [1.0, 3.0, 5.0, -1.0, 0.5],
        }
    )
    trends = pd.DataFrame(
        {
            "edge": ["e1", "e2"],
            "slope": [2.0, np.nan],
            "intercept": [1.0, np.nan],
            "p_value": [0.0, np.nan],
        }
    )
    fig = P.edge_trajectories_figure(traj, trends)
    lines = {t.name: t for t in fig.data}
    assert list(lines["e1"].y) == [1.0, 3.0, 5.0] and list(lines["e2"].x) == [0, 2]
    fit = next(t for t in fig.data if t.name.startswith("e1 trend"))
    np.testing.assert_allclose(fit.y, [1.0, 5.0])
    assert not any(t.name.startswith("e2 trend") for t in fig.data)  # no fit, no line
    _check_labels(fig)

    ranks = pd.DataFrame(
        {
            "edge": ["e1", "e2"],
            "step_first": 0,
            "step_last": 9,
            "rank_first": [3, 1],
            "rank_last": [1, 4],
        }
    )
    fig = P.rank_change_figure(ranks)
    assert [list(t.y) for t in fig.data] == [[3, 1], [1, 4]]
    _check_labels(fig)


def _roles() -> pd.DataFrame:
    rows = []
    for step in (-1, 4):
        for layer in range(2):
            for head in range(3):
                rows.append({"step": step, "updates": step + 1, "layer": layer, "head": head,
                             "node": f"a{layer}.h{head}", "dla": step * 0.1 + layer + head / 10,
                             "attention_to_subject": 0.2 + 0.01 * head, "uniform_baseline": 0.1,
                             "attention_ratio": 2 + 0.1 * head})  # fmt: skip
    return pd.DataFrame(rows)


def test_head_heatmaps_and_trajectories():
    roles = _roles()
    fig = P.head_heatmaps(roles, "dla")
    assert len(fig.data) == 3
    before = (
        roles[roles["step"] == -1].pivot(index="layer", columns="head", values="dla").to_numpy()
    )
    after = roles[roles["step"] == 4].pivot(index="layer", columns="head", values="dla").to_numpy()
    np.testing.assert_allclose(np.asarray(fig.data[0].z), before)
    np.testing.assert_allclose(np.asarray(fig.data[1].z), after)
    np.testing.assert_allclose(np.asarray(fig.data[2].z), after - before)
    assert list(fig.data[0].x) == ["h0", "h1", "h2"] and list(fig.data[0].y) == ["L0", "L1"]
    _check_labels(fig)
    fig = P.head_role_trajectories(roles, "attention_to_subject", top_k=2)
    heads = [t for t in fig.data if t.name != "uniform baseline"]
    assert len(heads) == 2 and list(heads[0].x) == [0, 5]
    base = next(t for t in fig.data if t.name == "uniform baseline")
    np.testing.assert_allclose(base.y, [0.1, 0.1])
    _check_labels(fig)


def _changes() -> pd.DataFrame:
    rows = []
    for run, scale in (("circuit", 1.0), ("full", 2.0)):
        for layer in range(2):
            for head in range(2):
                rows.append({"run": run, "step": 9, "layer": layer, "component": "head", "head": head,
                             "node": f"a{layer}.h{head}", "matrix": "all",
                             "rel_change": scale * (layer + head), "norm_change": scale})  # fmt: skip
            rows.append({"run": run, "step": 9, "layer": layer, "component": "mlp", "head": pd.NA,
                         "node": f"m{layer}", "matrix": "all", "rel_change": scale * 10,
                         "norm_change": 2 * scale})  # fmt: skip
    return pd.DataFrame(rows)


def test_weight_change_heatmaps_and_shares():
    changes = _changes()
    fig = P.weight_change_heatmaps(changes)
    assert len(fig.data) == 2
    np.testing.assert_allclose(np.asarray(fig.data[0].z), [[0, 1, 10], [1, 2, 10]])
    np.testing.assert_allclose(np.asarray(fig.data[1].z), [[0, 2, 20], [2, 4, 20]])
    assert list(fig.data[0].x) == ["h0", "h1", "MLP"]
    _check_labels(fig)
    summary = pd.DataFrame({"run": ["a", "a", "b", "b"], "step": [9] * 4, "component": ["head", "mlp"] * 2,
                            "share_sq_change": [0.2, 0.8, 0.5, 0.5]})  # fmt: skip
    fig = P.weight_share_bars(summary)
    assert list(fig.data[0].y) == [0.2, 0.5] and list(fig.data[1].y) == [0.8, 0.5]
    _check_labels(fig)


def test_intrinsic_dimension_sankey_overlap():
    curve = pd.DataFrame(
        {
            "top_n": [2, 4, 8],
            "n_runs": 1,
            "dev_metric": [1.0, 2.6, 3.0],
            "general_loss": [4.0, 4.1, 4.2],
        }
    )
    fig = P.intrinsic_dimension_figure(curve, saturation_n=4, threshold=2.6)
    assert list(fig.data[0].y) == [1.0, 2.6, 3.0] and list(fig.data[1].y) == [4.0, 4.1, 4.2]
    assert fig.layout.xaxis.type == "log"
    assert any(s.x0 == 4 for s in fig.layout.shapes)
    _check_labels(fig)

    flows = pd.DataFrame(
        {"source_phase": ["before", "before", "during"], "source_state": ["in", "out", "in"],
         "target_phase": ["during", "during", "after"], "target_state": ["in", "in", "out"],
         "count": [3, 1, 2], "nodes": ["a;b;c", "d", "a;b"]}
    )  # fmt: skip
    fig = P.membership_sankey(flows)
    sankey = fig.data[0]
    labels = list(sankey.node.label)
    assert list(sankey.link.value) == [3, 1, 2]
    assert [labels[i] for i in sankey.link.source] == [
        "before: in circuit",
        "before: not in circuit",
        "during: in circuit",
    ]
    assert [labels[i] for i in sankey.link.target] == [
        "during: in circuit",
        "during: in circuit",
        "after: not in circuit",
    ]
    assert fig.layout.title.text

    summary = pd.DataFrame({"level": ["nodes", "edges"], "label_a": "A", "label_b": "B", "n_only_a": [1, 5],
                            "n_both": [3, 10], "n_only_b": [0, 2], "jaccard": [0.75, 10 / 17]})  # fmt: skip
    fig = P.overlap_figure(summary)
    assert [list(t.y) for t in fig.data] == [[1, 5], [3, 10], [0, 2]]
    _check_labels(fig)


def test_run_comparison_figures():
    curves = pd.DataFrame(
        {"run": ["a", "a", "b", "b"], "step": [0, 5, 0, 5], "dev_metric": [0.0, 1.0, 0.0, 2.0]}
    )
    fig = P.strategy_curves_figure(curves)
    assert [list(t.y) for t in fig.data] == [[0.0, 1.0], [0.0, 2.0]] and [
        t.name for t in fig.data
    ] == ["a", "b"]
    _check_labels(fig)
    finals = pd.DataFrame({"run": ["a", "b"], "dev_metric": [1.0, 2.0], "general_loss": [4.0, 5.0]})
    fig = P.final_metrics_bars(finals)
    assert [list(t.y) for t in fig.data] == [[1.0, 2.0], [4.0, 5.0]]
    _check_labels(fig)
    metrics = pd.DataFrame({"step": [0, 1, 2], "loss": [3.0, 2.0, 1.0], "metric": [0.0, 0.5, 1.0]})
    evals = pd.DataFrame({"step": [0, 2], "dev_metric": [0.1, 0.9], "general_loss": [4.0, 3.5]})
    fig = P.training_curves(metrics, evals)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["training loss"].y) == [3.0, 2.0, 1.0] and list(
        by_name["dev metric"].y
    ) == [0.1, 0.9]
    _check_labels(fig)


def test_save_figure_html_is_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_STATIC_PROBLEM", None)
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]), layout={"title": {"text": "t"}})
    paths = P.save_figure(fig, tmp_path / "sub" / "churn", formats=("html",))
    assert paths == [tmp_path / "sub" / "churn.html"]
    text = paths[0].read_text()
    assert "<script src=" not in text.replace('<script src="data:', "")  # no CDN: plotly.js inline
    assert len(text) > 1_000_000  # the embedded plotly.js bundle


def test_save_figure_falls_back_to_html_once(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_STATIC_PROBLEM", None)
    calls = []

    def broken(self, *args, **kwargs):
        calls.append(args)
        raise RuntimeError("no Chromium here")

    monkeypatch.setattr(go.Figure, "write_image", broken)
    fig = go.Figure(go.Scatter(x=[1], y=[2]), layout={"title": {"text": "t"}})
    with pytest.warns(RuntimeWarning, match="static figure export"):
        paths = P.save_figure(fig, tmp_path / "a", formats=("html", "png", "svg"))
    # Tried at most once (never, when kaleido itself is missing), then HTML only.
    assert paths == [tmp_path / "a.html"] and len(calls) <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        paths = P.save_figure(fig, tmp_path / "b", formats=("png",))
    assert paths == [tmp_path / "b.html"]  # HTML kept even though only PNG was asked for


def test_save_figure_export_errors(tmp_path, monkeypatch):
    """Kaleido's own error (not a RuntimeError) falls back to HTML; any other error is a bug and
    propagates."""
    errors = pytest.importorskip("kaleido.errors")
    fig = go.Figure(go.Scatter(x=[1], y=[2]), layout={"title": {"text": "t"}})
    for error, caught in (
        (errors.KaleidoError(525, "render failed"), True),
        (KeyError("x"), False),
    ):
        monkeypatch.setattr(P, "_STATIC_PROBLEM", None)

        def broken(self, *args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(go.Figure, "write_image", broken)
        if caught:
            with pytest.warns(RuntimeWarning, match="render failed"):
                assert P.save_figure(fig, tmp_path / "k", formats=("png",)) == [tmp_path / "k.html"]
        else:
            with pytest.raises(KeyError):
                P.save_figure(fig, tmp_path / "b", formats=("png",))


@pytest.mark.skipif(
    not P.static_export_available() or shutil.which("chromium") is None,
    reason="static export needs kaleido and a Chromium (pip install kaleido; apt-get install chromium)",
)
def test_save_figure_png(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_STATIC_PROBLEM", None)
    fig = go.Figure(go.Scatter(x=[1, 2], y=[2, 1]), layout={"title": {"text": "t"}})
    paths = P.save_figure(fig, tmp_path / "fig", formats=("html", "png"))
    assert paths == [tmp_path / "fig.html", tmp_path / "fig.png"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_faithfulness_curve_figure_holds_the_curve():
    import pandas as pd

    from circuitdyn.plots import faithfulness_curve_figure

    curve = pd.DataFrame(
        {"fraction": [0.01, 0.1, 1.0], "faithfulness": [0.2, 0.7, 1.0], "n_edges": [3, 26, 262]}
    )
    fig = faithfulness_curve_figure(curve, 0.5, 0.4)
    assert list(fig.data[0].x) == [0.01, 0.1, 1.0]
    assert list(fig.data[0].y) == [0.2, 0.7, 1.0]
    assert "CPR 0.500" in fig.layout.title.text and fig.layout.xaxis.title.text
