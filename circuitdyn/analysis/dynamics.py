"""Circuit dynamics: how the recorded circuit of a run changes from step to step.

Everything here reads a `RunStore` and returns pandas tables; nothing needs the model.

Membership. The circuit at step t is the snapshot's edge mask (the circuit used for update t).
A node is in the circuit when at least one circuit edge goes into or out of it (``input`` and
``logits`` included), as in `circuitdyn.circuit.Circuit.node_mask`. Jaccard indices of two empty
sets are 1.0 (identical), as in `circuitdyn.circuit`.

Memory. Masks are read in chunks of `CHUNK_STEPS` snapshots and reduced on the fly (to node
membership, edge counts, Jaccard indices), so a table costs O(n_steps * n_nodes) memory, not
O(n_steps * n_src * n_dst); only a single dense mask per reference circuit (first, previous,
last) is held beside a chunk.

Node names follow `circuitdyn.graph`: ``input``, ``a{L}.h{H}``, ``m{L}``, ``logits``; destination
names add ``<q>`` / ``<k>`` / ``<v>`` for a head's inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from circuitdyn.graph import parse_node, split_edge
from circuitdyn.store import RunStore

CHUNK_STEPS = 64
"""Snapshots read at once by the chunked readers (memory ~ CHUNK_STEPS * n_src * n_dst bytes)."""


# ---------------------------------------------------------------------------------------------
# small helpers shared by the analysis modules
# ---------------------------------------------------------------------------------------------
def attributed_steps(store: RunStore) -> list[int]:
    """Steps whose edge scores were computed (not NaN). Read from the ``attributed`` training
    metric when the run logs it (circuitdyn.tuning does), else from finite node scores."""
    metrics = store.metrics_frame()
    if "attributed" in metrics.columns and len(metrics):
        flags = metrics["attributed"].fillna(1.0).to_numpy() > 0.5
        return [int(s) for s in metrics["step"].to_numpy()[flags]]
    steps = store.steps
    if not steps:
        return []
    finite = np.isfinite(store.node_scores(steps)).all(axis=1)
    return [s for s, ok in zip(steps, finite, strict=True) if ok]


def _chunks(steps: Sequence[int], size: int | None = None) -> Iterator[list[int]]:
    size = size or CHUNK_STEPS  # read at call time, so the module setting can be changed
    for start in range(0, len(steps), size):
        yield list(steps[start : start + size])


def nodes_of_masks(store: RunStore, masks: np.ndarray) -> np.ndarray:
    """Node membership of dense masks: bool [n, n_src, n_dst] -> bool [n, n_nodes] in the order of
    ``store.graph.node_names`` (a node is in when any circuit edge goes into or out of it)."""
    graph = store.graph
    out = np.zeros((masks.shape[0], len(graph.node_names)), dtype=bool)
    out[:, : graph.n_src] = masks.any(axis=2)
    has_in = masks.any(axis=1)  # [n, n_dst]
    dst_of_node = np.zeros((graph.n_dst, len(graph.node_names)), dtype=np.int64)
    dst_of_node[np.arange(graph.n_dst), graph.dst_node_index.numpy()] = 1
    return out | ((has_in.astype(np.int64) @ dst_of_node) > 0)


def jaccard(a: np.ndarray, b: np.ndarray, axis: int | tuple[int, ...] = -1) -> np.ndarray:
    """Jaccard index (intersection over union, 0..1) of boolean membership arrays along
    ``axis``, broadcasting; 1.0 where both are empty. The one Jaccard of the analyses."""
    union = (a | b).sum(axis=axis)
    inter = (a & b).sum(axis=axis)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def node_info(store: RunStore) -> pd.DataFrame:
    """One row per graph node (``store.graph.node_names`` order): ``node``, ``kind``
    (``input``, ``head``, ``mlp``, ``logits``), ``layer`` and ``head`` (Int64, NA where they do
    not apply), as `circuitdyn.graph.parse_node` reads the names."""
    infos = [parse_node(name) for name in store.graph.node_names]
    return pd.DataFrame(
        {
            "node": [i.name for i in infos],
            "kind": [i.kind for i in infos],
            "layer": pd.array([i.layer for i in infos], dtype="Int64"),
            "head": pd.array([i.head for i in infos], dtype="Int64"),
        }
    )


def edge_info(edges: Sequence[str]) -> pd.DataFrame:
    """One row per edge name: ``edge``, ``src``, ``dst`` (with its ``<q>``/``<k>``/``<v>``),
    ``dst_node`` and ``input`` (``q``/``k``/``v``, ``""`` for MLP and logits destinations), as
    `circuitdyn.graph.split_edge` reads the names."""
    parts = [split_edge(name) for name in edges]
    return pd.DataFrame(
        {
            "edge": list(edges),
            "src": [p[0] for p in parts],
            "dst": [p[1] for p in parts],
            "dst_node": [p[2] for p in parts],
            "input": [p[3] for p in parts],
        }
    )


def spread(steps: Sequence[int], k: int) -> list[int]:
    """At most ``k`` of ``steps``, evenly spread, the first and the last always included."""
    steps = list(steps)
    if len(steps) <= k:
        return steps
    index = np.unique(np.linspace(0, len(steps) - 1, k).round().astype(int))
    return [steps[i] for i in index]


def _resolve_steps(store: RunStore, steps: Sequence[int] | None) -> list[int]:
    selected = store.steps if steps is None else [int(s) for s in steps]
    if not selected:
        raise ValueError(f"{store.directory}: the run has no recorded steps")
    return selected


# ---------------------------------------------------------------------------------------------
# membership over steps
# ---------------------------------------------------------------------------------------------
def node_membership_array(
    store: RunStore, steps: Sequence[int] | None = None
) -> tuple[list[int], np.ndarray]:
    """(steps, bool [n_steps, n_nodes]): which nodes are in the circuit at each step, nodes in
    ``store.node_names`` order. Reads masks chunk by chunk."""
    selected = _resolve_steps(store, steps)
    parts = [nodes_of_masks(store, store.masks(chunk)) for chunk in _chunks(selected)]
    return selected, np.concatenate(parts, axis=0)


def node_membership(store: RunStore, steps: Sequence[int] | None = None) -> pd.DataFrame:
    """Node x step membership table: index ``node`` (``store.node_names`` order), one bool column
    per step (column labels are the int steps)."""
    selected, member = node_membership_array(store, steps)
    frame = pd.DataFrame(member.T, index=pd.Index(store.node_names, name="node"), columns=selected)
    frame.columns.name = "step"
    return frame


def node_score_matrix(
    store: RunStore, steps: Sequence[int] | None = None, *, attributed_only: bool = True
) -> pd.DataFrame:
    """Node x step table of node scores (metric units, e.g. logits: the sum of a node's outgoing
    edge scores; ``logits``: of its incoming ones). Columns are the attributed steps by default
    (NaN columns of unattributed steps are dropped); index ``node``."""
    selected = _resolve_steps(store, steps)
    if attributed_only:
        keep = set(attributed_steps(store))
        selected = [s for s in selected if s in keep]
    values = store.node_scores(selected) if selected else np.zeros((0, len(store.node_names)))
    frame = pd.DataFrame(values.T, index=pd.Index(store.node_names, name="node"), columns=selected)
    frame.columns.name = "step"
    return frame


# ---------------------------------------------------------------------------------------------
# size and churn
# ---------------------------------------------------------------------------------------------
def circuit_sizes(store: RunStore) -> pd.DataFrame:
    """Circuit size per step.

    Columns: ``step``; ``n_edges``, ``n_nodes`` (counted from the masks; nodes include ``input``
    and ``logits``), ``n_heads``, ``n_mlps`` (heads / MLPs in the circuit); ``n_tunable``
    (parameters the step updated, from the run's metrics; NaN if not logged); ``attributed``
    (bool: the step's scores were computed). One row per recorded step.
    """
    steps = _resolve_steps(store, None)
    kinds = node_info(store)["kind"].to_numpy()
    n_edges: list[np.ndarray] = []
    nodes: list[np.ndarray] = []
    for chunk in _chunks(steps):
        masks = store.masks(chunk)
        n_edges.append(masks.sum(axis=(1, 2)))
        nodes.append(nodes_of_masks(store, masks))
    member = np.concatenate(nodes, axis=0)
    metrics = store.metrics_frame().set_index("step")
    n_tunable = (
        metrics["n_tunable"].reindex(steps).to_numpy(dtype=float)
        if "n_tunable" in metrics.columns
        else np.full(len(steps), np.nan)
    )
    attributed = set(attributed_steps(store))
    return pd.DataFrame(
        {
            "step": steps,
            "n_edges": np.concatenate(n_edges).astype(np.int64),
            "n_nodes": member.sum(axis=1).astype(np.int64),
            "n_heads": member[:, kinds == "head"].sum(axis=1).astype(np.int64),
            "n_mlps": member[:, kinds == "mlp"].sum(axis=1).astype(np.int64),
            "n_tunable": n_tunable,
            "attributed": [s in attributed for s in steps],
        }
    )


def churn(store: RunStore) -> pd.DataFrame:
    """How much the circuit changes: per step, Jaccard indices (intersection over union, 0..1) of
    its node set and edge set with the previous step's (NaN at the first step), the first
    step's and the last step's circuit, and the number of edges / nodes added and removed since
    the previous step.

    Columns: ``step``, ``jaccard_edges_prev``, ``jaccard_nodes_prev``, ``jaccard_edges_first``,
    ``jaccard_nodes_first``, ``jaccard_edges_last``, ``jaccard_nodes_last``, ``edges_added``,
    ``edges_removed``, ``nodes_added``, ``nodes_removed`` (counts; 0 at the first step).
    """
    steps = _resolve_steps(store, None)
    first = store.masks([steps[0]])
    last = store.masks([steps[-1]])
    first_nodes, last_nodes = nodes_of_masks(store, first), nodes_of_masks(store, last)
    columns: dict[str, list[np.ndarray]] = {
        key: []
        for key in (
            "jaccard_edges_prev",
            "jaccard_nodes_prev",
            "jaccard_edges_first",
            "jaccard_nodes_first",
            "jaccard_edges_last",
            "jaccard_nodes_last",
            "edges_added",
            "edges_removed",
            "nodes_added",
            "nodes_removed",
        )
    }
    prev_mask: np.ndarray | None = None
    prev_nodes: np.ndarray | None = None
    for chunk in _chunks(steps):
        masks = store.masks(chunk)
        nodes = nodes_of_masks(store, masks)
        if prev_mask is None:  # the very first step compares with itself: no change
            before_m = np.concatenate([masks[:1], masks[:-1]], axis=0)
            before_n = np.concatenate([nodes[:1], nodes[:-1]], axis=0)
        else:
            before_m = np.concatenate([prev_mask, masks[:-1]], axis=0)
            before_n = np.concatenate([prev_nodes, nodes[:-1]], axis=0)
        jp_e = jaccard(masks, before_m, (1, 2)).astype(float)
        jp_n = jaccard(nodes, before_n, (1,)).astype(float)
        if prev_mask is None:
            jp_e[0] = jp_n[0] = np.nan
        columns["jaccard_edges_prev"].append(jp_e)
        columns["jaccard_nodes_prev"].append(jp_n)
        columns["jaccard_edges_first"].append(jaccard(masks, first, (1, 2)))
        columns["jaccard_nodes_first"].append(jaccard(nodes, first_nodes, (1,)))
        columns["jaccard_edges_last"].append(jaccard(masks, last, (1, 2)))
        columns["jaccard_nodes_last"].append(jaccard(nodes, last_nodes, (1,)))
        columns["edges_added"].append((masks & ~before_m).sum(axis=(1, 2)))
        columns["edges_removed"].append((~masks & before_m).sum(axis=(1, 2)))
        columns["nodes_added"].append((nodes & ~before_n).sum(axis=1))
        columns["nodes_removed"].append((~nodes & before_n).sum(axis=1))
        prev_mask, prev_nodes = masks[-1:], nodes[-1:]
    out = {"step": steps}
    for key, parts in columns.items():
        values = np.concatenate(parts)
        out[key] = values.astype(np.int64) if key.endswith(("added", "removed")) else values
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------
# node events, presence, stable core, layer composition
# ---------------------------------------------------------------------------------------------
def node_events(store: RunStore, *, include_initial: bool = False) -> pd.DataFrame:
    """Node entry and exit events between consecutive recorded steps.

    Columns: ``step`` (the first step at which the change is seen), ``node``, ``event``
    (``"enter"``: in the circuit at ``step`` but not at the previous step; ``"exit"``: the
    reverse). With ``include_initial``, the first step's nodes are listed as ``"enter"`` at the
    first step. Rows sorted by step, then node order.
    """
    steps, member = node_membership_array(store)
    names = store.node_names
    rows: list[tuple[int, str, str]] = []
    if include_initial:
        rows += [(steps[0], names[j], "enter") for j in np.flatnonzero(member[0])]
    change = member[1:].astype(np.int8) - member[:-1].astype(np.int8)
    for i, j in zip(*np.nonzero(change), strict=True):
        rows.append((steps[i + 1], names[j], "enter" if change[i, j] > 0 else "exit"))
    frame = pd.DataFrame(rows, columns=["step", "node", "event"])
    order = {name: i for i, name in enumerate(names)}
    frame["_order"] = frame["node"].map(order)
    frame = frame.sort_values(["step", "_order"], kind="stable").drop(columns="_order")
    return frame.reset_index(drop=True).astype({"step": "int64"})


def node_presence(store: RunStore) -> pd.DataFrame:
    """For each node of the graph: how often it is in the circuit.

    Columns: ``node``, ``kind``, ``layer``, ``head`` (nullable ints), ``n_present`` (steps with
    the node in the circuit), ``fraction`` (of the recorded steps, 0..1), ``first_step`` /
    ``last_step`` (first and last step with the node in; NA if never), ``n_entries`` /
    ``n_exits`` (events between consecutive steps, as in `node_events`). Rows in graph order.
    """
    steps, member = node_membership_array(store)
    step_arr = np.asarray(steps)
    present = member.sum(axis=0)
    change = member[1:].astype(np.int8) - member[:-1].astype(np.int8)
    first = [int(step_arr[column].min()) if column.any() else pd.NA for column in member.T]
    last = [int(step_arr[column].max()) if column.any() else pd.NA for column in member.T]
    return node_info(store).assign(
        n_present=present.astype(np.int64),
        fraction=present / len(steps),
        first_step=pd.array(first, dtype="Int64"),
        last_step=pd.array(last, dtype="Int64"),
        n_entries=(change > 0).sum(axis=0).astype(np.int64),
        n_exits=(change < 0).sum(axis=0).astype(np.int64),
    )


def stable_core(store: RunStore, min_fraction: float = 0.9) -> pd.DataFrame:
    """The stable core: the rows of `node_presence` whose node is in the circuit in at least
    ``min_fraction`` (0..1] of the recorded steps, most present first (ties in graph order)."""
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    presence = node_presence(store)
    # A small tolerance so that e.g. 9 of 10 steps counts as >= 0.9.
    core = presence[presence["fraction"] >= min_fraction - 1e-12]
    return core.sort_values("fraction", ascending=False, kind="stable").reset_index(drop=True)


def edge_presence(store: RunStore) -> pd.DataFrame:
    """For each edge ever in the circuit: ``edge``, ``n_present`` (steps in the circuit),
    ``fraction`` (of the recorded steps), most present first (ties in ``store.edge_names``
    order). Reads masks chunk by chunk."""
    steps = _resolve_steps(store, None)
    names = store.edge_names
    counts = np.zeros(len(names), dtype=np.int64)
    for chunk in _chunks(steps):
        counts += store.masks(chunk, edges=names).sum(axis=0)
    keep = np.flatnonzero(counts)
    frame = pd.DataFrame(
        {
            "edge": [names[i] for i in keep],
            "n_present": counts[keep],
            "fraction": counts[keep] / len(steps),
        }
    )
    return frame.sort_values("n_present", ascending=False, kind="stable").reset_index(drop=True)


def layer_composition(store: RunStore) -> pd.DataFrame:
    """Per step and layer, what of the layer is in the circuit (long format).

    Columns: ``step``, ``layer``, ``n_heads`` (heads of that layer in the circuit), ``mlp`` (1 if
    the layer's MLP is, else 0), ``n_nodes`` (their sum). One row per (step, layer).
    """
    steps, member = node_membership_array(store)
    info = node_info(store)
    n_layers = store.graph.n_layers

    def per_layer(kind: str) -> np.ndarray:  # [n_steps, n_layers] nodes of that kind in
        pick = (info["kind"] == kind).to_numpy()
        layers = info["layer"][pick].to_numpy(dtype=np.int64)
        return member[:, pick].astype(np.int64) @ np.eye(n_layers, dtype=np.int64)[layers]

    heads, mlps = per_layer("head"), per_layer("mlp")
    return pd.DataFrame(
        {
            "step": np.repeat(steps, n_layers),
            "layer": np.tile(np.arange(n_layers), len(steps)),
            "n_heads": heads.reshape(-1),
            "mlp": mlps.reshape(-1),
            "n_nodes": (heads + mlps).reshape(-1),
        }
    )


# ---------------------------------------------------------------------------------------------
# the circuit at one step, as tables for the graph figure
# ---------------------------------------------------------------------------------------------
def _score_step(store: RunStore, step: int, attributed: Sequence[int]) -> int | None:
    """The latest attributed step <= step (whose scores chose the circuit at ``step``)."""
    earlier = [s for s in attributed if s <= step]
    return earlier[-1] if earlier else None


def circuit_tables(
    store: RunStore, step: int, *, all_edges: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The circuit at ``step`` as (nodes, edges) tables for `circuitdyn.plots.circuit_graph`.

    Scores come from ``score_step``, the latest attributed step <= ``step`` (on an unattributed
    step, the circuit is the one those scores selected; NaN if there is none).

    nodes: one row per graph node: ``node``, ``kind``, ``layer``, ``head``, ``score`` (node
    score, metric units), ``in_circuit`` (bool), ``step``, ``score_step``.
    edges: one row per circuit edge (every valid edge if ``all_edges``): ``edge``, ``src``,
    ``dst``, ``dst_node``, ``input`` (``q``/``k``/``v`` or ``""``), ``score`` (signed, metric
    units), ``in_circuit``, ``step``, ``score_step``; in ``store.edge_names`` order.
    """
    return _circuit_tables(store, step, attributed_steps(store), all_edges=all_edges)


def _circuit_tables(
    store: RunStore, step: int, attributed: Sequence[int], *, all_edges: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    source = _score_step(store, step, attributed)
    names = store.edge_names
    member = store.masks([step], edges=names)[0]
    member_nodes = nodes_of_masks(store, store.masks([step]))[0]
    if source is None:
        edge_scores = np.full(len(names), np.nan, dtype=np.float32)
        node_scores = np.full(len(store.node_names), np.nan, dtype=np.float32)
    else:
        edge_scores = store.scores([source], edges=names)[0]
        node_scores = store.node_scores([source])[0]
    nodes = node_info(store).assign(
        score=node_scores.astype(float),
        in_circuit=member_nodes,
        step=step,
        score_step=pd.array([source] * len(member_nodes), dtype="Int64"),
    )
    keep = np.arange(len(names)) if all_edges else np.flatnonzero(member)
    edges = edge_info([names[i] for i in keep]).assign(
        score=edge_scores[keep].astype(float),
        in_circuit=member[keep],
        step=step,
        score_step=pd.array([source] * len(keep), dtype="Int64"),
    )
    return nodes, edges


def circuit_evolution(
    store: RunStore, steps: Sequence[int] | None = None, *, max_frames: int = 40
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`circuit_tables` at several steps, concatenated (a ``step`` column tells them apart), for
    the animated circuit figure. Default steps: at most ``max_frames`` steps evenly spread over
    the recorded ones, always including the first and the last."""
    if steps is None:
        selected = spread(_resolve_steps(store, None), max_frames)
    else:
        selected = [int(s) for s in steps]
    attributed = attributed_steps(store)
    tables = [_circuit_tables(store, s, attributed, all_edges=False) for s in selected]
    nodes = pd.concat([t[0] for t in tables], ignore_index=True)
    edges = pd.concat([t[1] for t in tables], ignore_index=True)
    return nodes, edges
