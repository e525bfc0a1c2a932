"""EAP-IG / MIB graph files: read and write the JSON and ``.pt`` layouts of EAP-IG's ``Graph``.

The layout is that of ``Graph.to_json`` / ``from_json`` / ``to_pt`` / ``from_pt`` in EAP-IG
(github.com/hannamw/EAP-IG, ``src/eap/graph.py``), which MIB's circuit track reads. For a model
of ``L`` layers of ``H`` heads::

    JSON  {"cfg":   {"n_layers": L, "n_heads": H, "parallel_attn_mlp": false, "d_model": D},
           "nodes": {"input": {"in_graph": true, "score": 0.3}, "a0.h0": {...}, ...,
                     "m0": {...}, "a1.h0": {...}, ..., "logits": {...}},
           "edges": {"input->a0.h0<q>": {"score": 0.01, "in_graph": true}, ...,
                     "a0.h1->m0": {...}, ..., "m1->logits": {...}},
           "meta":  {...}}                          # circuitdyn's addition; EAP-IG ignores it

    .pt   torch.save of a dict (read back with torch.load(weights_only=True)):
          cfg             the same dict as the JSON's
          src_nodes       list[str], n_forward = 1 + L (H + 1):
                          input, a0.h0 .. a0.h{H-1}, m0, a1.h0, ..., m{L-1}
          dst_nodes       list[str], n_backward = L (3 H + 1) + 1: per layer
                          a{l}.h0<q> .. a{l}.h{H-1}<q>, the same for <k> and <v>, m{l}; then logits
          edges_scores    float32 [n_forward, n_backward] (0 where src is not upstream of dst)
          edges_in_graph  bool [n_forward, n_backward]
          nodes_in_graph  bool [n_forward]
          nodes_scores    float32 [n_forward] (optional)
          meta_json       str, JSON of circuitdyn's meta (circuitdyn's addition; EAP-IG ignores it)

These orders are circuitdyn's own ``Graph.src_names`` / ``dst_names``. Meaning of the fields:

* ``cfg``: EAP-IG's ``Graph.from_model`` reads ``n_layers``, ``n_heads``, ``parallel_attn_mlp``
  and ``d_model`` (the last only to size neuron-level tensors, which ``from_json`` always
  allocates). circuitdyn's graphs know no ``d_model``: it is written from the caller or from
  ``Scores.meta["d_model"]``, and as 0 ("not recorded"; EAP-IG loads it) when neither has it.
  An attention-only graph adds ``"attn_only": true``: EAP-IG always has MLP nodes, so the JSON
  leaves them out (EAP-IG then holds them at score 0, not in the graph) and the ``.pt``, whose
  tensors must have EAP-IG's full size, has zeros / False in their rows and columns.
* edge ``score``: circuitdyn's signed edge score (DESIGN.md), 0.0 when only a circuit was written
  (EAP-IG's value for an unscored graph). ``in_graph``: the edge is in the circuit; a file of
  bare scores has every edge in (the full model, like EAP-IG's ``reset(empty=False)``).
* node ``in_graph``, as EAP-IG's pruning sets it: a source node is in when it has an outgoing
  edge in the circuit and (for nodes other than ``input``) an incoming one; ``logits`` is always
  in. EAP-IG recomputes this (``prune``) before it evaluates a circuit; circuitdyn reads the
  circuit from the edges alone. Node ``score`` (and ``nodes_scores``) is circuitdyn's derived node
  score (`Graph.node_scores`); it is written, never read back (circuitdyn derives it again).

Reading checks the file against the graph its ``cfg`` describes and raises ValueError naming the
problem: missing fields, names of another graph size, wrong tensor shapes or types, neuron-level
circuits (circuitdyn has none), parallel attention+MLP, and ``.pt`` files holding pickled objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuitdyn.graph import Graph

PT_SUFFIXES = (".pt", ".pth")
_MAX_LISTED = 5


@dataclass(frozen=True)
class EapGraph:
    """The content of an EAP-IG graph file, in circuitdyn's dense layout over `graph`. Writing,
    `scores` None means zeros (an unscored graph) and `in_graph` None every edge; read files
    always have both."""

    graph: Graph
    scores: Float[Tensor, "n_src n_dst"] | None = None
    in_graph: Bool[Tensor, "n_src n_dst"] | None = None
    d_model: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# ---- writing ------------------------------------------------------------------------------------
def eap_cfg(graph: Graph, d_model: int | None = None) -> dict[str, Any]:
    """The ``cfg`` of an EAP-IG graph file for `graph` (``d_model`` 0 when unknown)."""
    if d_model is not None and (isinstance(d_model, bool) or not isinstance(d_model, int)):
        raise TypeError(f"d_model must be an int, got {d_model!r}")
    cfg: dict[str, Any] = {
        "n_layers": graph.n_layers,
        "n_heads": graph.n_heads,
        "parallel_attn_mlp": False,
        "d_model": 0 if d_model is None else d_model,
    }
    if not graph.has_mlp:
        cfg["attn_only"] = True
    if graph.mlp_blocks > 1:  # circuitdyn's extension: EAP-IG itself has whole-MLP nodes only
        cfg["mlp_blocks"] = graph.mlp_blocks
    return cfg


def to_json_dict(data: EapGraph) -> dict[str, Any]:
    """The EAP-IG JSON payload of `data`."""
    graph, d_model, meta = data.graph, data.d_model, data.meta
    scores, in_graph = _dense(graph, data.scores, data.in_graph)
    node_in = _nodes_in_graph(graph, in_graph).tolist()
    nodes: dict[str, dict[str, Any]] = {
        name: {"in_graph": node_in[i]} for i, name in enumerate(graph.node_names)
    }
    if scores is not None:
        for name, value in zip(graph.node_names, graph.node_scores(scores).tolist(), strict=True):
            nodes[name]["score"] = value
    flat_scores = scores[graph.edge_valid].tolist() if scores is not None else None
    flat_in = in_graph[graph.edge_valid].tolist()
    edges = {
        name: {"score": 0.0 if flat_scores is None else flat_scores[i], "in_graph": flat_in[i]}
        for i, name in enumerate(graph.edge_names)
    }
    payload: dict[str, Any] = {"cfg": eap_cfg(graph, d_model), "nodes": nodes, "edges": edges}
    if meta:
        payload["meta"] = meta
    return payload


def to_pt_dict(data: EapGraph) -> dict[str, Any]:
    """The dict EAP-IG's ``to_pt`` saves for `data`; tensors in EAP-IG's full size (with MLPs)."""
    graph, d_model, meta = data.graph, data.d_model, data.meta
    scores, in_graph = _dense(graph, data.scores, data.in_graph)
    full, src, dst = _full_layout(graph)
    edges_scores = torch.zeros(full.n_src, full.n_dst, dtype=torch.float32)
    edges_in_graph = torch.zeros(full.n_src, full.n_dst, dtype=torch.bool)
    if scores is not None:
        edges_scores[src[:, None], dst[None, :]] = scores
    edges_in_graph[src[:, None], dst[None, :]] = in_graph
    nodes_in_graph = torch.zeros(full.n_src, dtype=torch.bool)
    nodes_in_graph[src] = _nodes_in_graph(graph, in_graph)[: graph.n_src]
    payload: dict[str, Any] = {
        "cfg": eap_cfg(graph, d_model),
        "src_nodes": list(full.src_names),
        "dst_nodes": list(full.dst_names),
        "edges_scores": edges_scores,
        "edges_in_graph": edges_in_graph,
        "nodes_in_graph": nodes_in_graph,
    }
    if scores is not None:
        nodes_scores = torch.zeros(full.n_src, dtype=torch.float32)
        nodes_scores[src] = graph.node_scores(scores)[: graph.n_src]
        payload["nodes_scores"] = nodes_scores
    if meta:
        payload["meta_json"] = json.dumps(meta)
    return payload


def write_json(path: str | Path, data: EapGraph) -> None:
    """Write `data` as JSON, the file EAP-IG's ``Graph.from_json`` reads."""
    Path(path).write_text(json.dumps(to_json_dict(data)))


def write_pt(path: str | Path, data: EapGraph) -> None:
    """``torch.save`` `data` in the layout EAP-IG's ``Graph.from_pt`` reads."""
    torch.save(to_pt_dict(data), str(path))


# ---- reading ------------------------------------------------------------------------------------
class _Bad(Exception):
    """A problem in the file; turned into a ValueError naming the file."""


def read(path: str | Path, *, graph: Graph | None = None) -> EapGraph:
    """`read_pt` for ``.pt`` / ``.pth`` files, `read_json` for anything else."""
    if Path(path).suffix in PT_SUFFIXES:
        return read_pt(path, graph=graph)
    return read_json(path, graph=graph)


def read_json(path: str | Path, *, graph: Graph | None = None) -> EapGraph:
    """Read an EAP-IG JSON graph file; with `graph`, it must be a file of that graph."""
    try:
        payload = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not a circuitdyn / EAP-IG graph file: not JSON ({error})"
        ) from None
    return from_json_dict(payload, source=str(path), graph=graph)


def read_pt(path: str | Path, *, graph: Graph | None = None) -> EapGraph:
    """Read an EAP-IG ``.pt`` graph file with ``torch.load(weights_only=True)``; with `graph`, it
    must be a file of that graph."""
    return from_pt_dict(_torch_load(path), source=str(path), graph=graph)


def from_json_dict(
    payload: Any, *, source: str = "payload", graph: Graph | None = None
) -> EapGraph:
    """Parse an EAP-IG JSON payload (see the module docstring); ``nodes`` may be left out."""
    try:
        result = _from_json(payload)
    except _Bad as problem:
        raise ValueError(f"{source} is not a circuitdyn / EAP-IG graph file: {problem}") from None
    return _expect(result, graph, source)


def from_pt_dict(payload: Any, *, source: str = "payload", graph: Graph | None = None) -> EapGraph:
    """Parse the dict of an EAP-IG ``.pt`` file (see the module docstring)."""
    try:
        result = _from_pt(payload)
    except _Bad as problem:
        raise ValueError(f"{source} is not a circuitdyn / EAP-IG graph file: {problem}") from None
    return _expect(result, graph, source)


def _torch_load(path: str | Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # torch raises many kinds for files it cannot read safely
        text = str(error)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            why = (
                f"it holds a pickled {found.group(1)} object, which torch.load(weights_only=True) "
                "refuses; EAP-IG graph files hold only tensors, lists, dicts, str and numbers"
            )
        else:
            first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
            why = f"torch.load(weights_only=True) cannot read it ({first})"
        raise ValueError(f"{path} is not a circuitdyn / EAP-IG graph file: {why}") from None


def _expect(result: EapGraph, graph: Graph | None, source: str) -> EapGraph:
    if graph is not None and result.graph != graph:
        raise ValueError(f"{source} is a file of {result.graph}, but {graph} was expected")
    return result


def _graph_from_cfg(cfg: Any) -> tuple[Graph, int | None]:
    if not isinstance(cfg, Mapping):
        raise _Bad(f"'cfg' must be a dict, got {type(cfg).__name__}")
    sizes = []
    for key in ("n_layers", "n_heads"):
        if key not in cfg:
            raise _Bad(f"'cfg' has no {key!r}")
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _Bad(f"cfg[{key!r}] must be a positive int, got {value!r}")
        sizes.append(value)
    if cfg.get("parallel_attn_mlp", False):
        raise _Bad("parallel attention+MLP graphs (cfg['parallel_attn_mlp']) are not supported")
    if "has_mlp" in cfg:  # circuitdyn's own circuit files, version 1
        has_mlp = bool(cfg["has_mlp"])
    else:
        has_mlp = not cfg.get("attn_only", False)
    d_model = cfg.get("d_model")
    if d_model is not None and (
        isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 0
    ):
        raise _Bad(f"cfg['d_model'] must be an int >= 0, got {d_model!r}")
    blocks = cfg.get("mlp_blocks", 1)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise _Bad(f"cfg['mlp_blocks'] must be a positive int, got {blocks!r}")
    return Graph(sizes[0], sizes[1], has_mlp=has_mlp, mlp_blocks=blocks), (d_model or None)


def _from_json(payload: Any) -> EapGraph:
    if not isinstance(payload, Mapping):
        raise _Bad(f"expected a JSON object, got {type(payload).__name__}")
    for key in ("cfg", "edges"):
        if key not in payload:
            raise _Bad(f"missing field {key!r}")
    graph, d_model = _graph_from_cfg(payload["cfg"])
    full, _, _ = _full_layout(graph)
    edges = payload["edges"]
    if not isinstance(edges, Mapping):
        raise _Bad(
            f"'edges' must map edge names to {{'score', 'in_graph'}}, got {type(edges).__name__}"
        )
    scores = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.float32)
    in_graph = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    seen = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    for name, entry in edges.items():
        if not isinstance(entry, Mapping):
            raise _Bad(f"edges[{name!r}] must be a dict with 'score' and 'in_graph', got {entry!r}")
        for key in ("score", "in_graph"):
            if key not in entry:
                raise _Bad(f"edges[{name!r}] has no {key!r}")
        score, inside = entry["score"], entry["in_graph"]
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise _Bad(f"edges[{name!r}]['score'] must be a number, got {score!r}")
        if not isinstance(inside, bool):
            raise _Bad(f"edges[{name!r}]['in_graph'] must be true or false, got {inside!r}")
        try:
            i, j = graph.edge_index(name)
        except KeyError:
            if _is_absent_mlp_edge(graph, full, name):
                if score != 0 or inside:
                    raise _Bad(
                        f"edge {name!r} has score {score} / in_graph {inside}, but cfg says "
                        "the model is attention-only"
                    ) from None
                continue
            raise _Bad(
                f"{name!r} is not an edge of {graph}: a file of another graph size?"
            ) from None
        scores[i, j], in_graph[i, j], seen[i, j] = score, inside, True
    missing = graph.edge_valid & ~seen
    if bool(missing.any()):
        names = [
            n
            for n, m in zip(graph.edge_names, missing[graph.edge_valid].tolist(), strict=True)
            if m
        ]
        raise _Bad(
            f"{len(names)} of the {graph.n_edges} edges of {graph} are missing, e.g. "
            f"{names[:_MAX_LISTED]}: a file of another graph size?"
        )
    nodes = payload.get("nodes")
    if nodes is not None:
        _check_json_nodes(graph, full, nodes)
    meta = payload.get("meta", {})
    if not isinstance(meta, Mapping):
        raise _Bad(f"'meta' must be a dict, got {type(meta).__name__}")
    return EapGraph(graph, scores, in_graph, d_model, dict(meta))


def _check_json_nodes(graph: Graph, full: Graph, nodes: Any) -> None:
    if not isinstance(nodes, Mapping):
        raise _Bad(
            f"'nodes' must map node names to {{'in_graph', 'score'}}, got {type(nodes).__name__}"
        )
    known = set(graph.node_names)
    for name, entry in nodes.items():
        if isinstance(entry, bool):  # circuitdyn's scores files before version 2
            inside = entry
        elif isinstance(entry, Mapping):
            if name != "logits" and "in_graph" not in entry:
                raise _Bad(f"nodes[{name!r}] has no 'in_graph'")
            inside = entry.get("in_graph", True)
            neurons = entry.get("neurons")
            if neurons is not None and not all(bool(n) for n in neurons):
                raise _Bad(f"nodes[{name!r}] is a neuron-level circuit; circuitdyn has none")
        else:
            raise _Bad(f"nodes[{name!r}] must be a dict with 'in_graph', got {entry!r}")
        if name in known:
            continue
        if name in full.node_names and not graph.has_mlp:
            if inside:
                raise _Bad(
                    f"node {name!r} is in the graph, but cfg says the model is attention-only"
                )
            continue
        raise _Bad(f"{name!r} is not a node of {graph}: a file of another graph size?")


def _from_pt(payload: Any) -> EapGraph:
    if not isinstance(payload, Mapping):
        raise _Bad(f"expected a dict, got {type(payload).__name__}")
    required = ("cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph")
    missing = [key for key in required if key not in payload]
    if missing:
        raise _Bad(f"missing field(s) {missing} (found {sorted(map(str, payload))})")
    graph, d_model = _graph_from_cfg(payload["cfg"])
    full, src, dst = _full_layout(graph)
    for key, names in (("src_nodes", full.src_names), ("dst_nodes", full.dst_names)):
        got = payload[key]
        if not isinstance(got, (list, tuple)) or tuple(got) != names:
            raise _Bad(
                f"{key!r} is not the {len(names)} names EAP-IG orders for cfg n_layers="
                f"{graph.n_layers}, n_heads={graph.n_heads} (got "
                f"{len(got) if isinstance(got, (list, tuple)) else type(got).__name__}"
                f"{' names' if isinstance(got, (list, tuple)) else ''}): "
                "a file of another graph size?"
            )
    shape = (full.n_src, full.n_dst)
    scores_full = _tensor(payload, "edges_scores", shape, floating=True)
    in_full = _tensor(payload, "edges_in_graph", shape, floating=False)
    _tensor(payload, "nodes_in_graph", (full.n_src,), floating=False)
    if payload.get("nodes_scores") is not None:
        _tensor(payload, "nodes_scores", (full.n_src,), floating=True)
    neurons = payload.get("neurons_in_graph")
    if neurons is not None and not (isinstance(neurons, Tensor) and bool(neurons.bool().all())):
        raise _Bad("'neurons_in_graph' holds a neuron-level circuit; circuitdyn has none")
    bogus = in_full & ~full.edge_valid
    if bool(bogus.any()):
        i, j = bogus.nonzero()[0].tolist()
        raise _Bad(
            f"edges_in_graph is True at ({full.src_names[i]}, {full.dst_names[j]}), which is not "
            "an edge (the source is not upstream of the destination)"
        )
    outside = torch.ones(shape, dtype=torch.bool)
    outside[src[:, None], dst[None, :]] = False
    if bool((outside & ((scores_full != 0) | in_full)).any()):
        raise _Bad(
            "MLP edges have scores or are in the graph, but cfg says the model is attention-only"
        )
    scores = scores_full[src[:, None], dst[None, :]].to(torch.float32)
    in_graph = in_full[src[:, None], dst[None, :]] & graph.edge_valid
    meta: dict[str, Any] = {}
    if payload.get("meta_json") is not None:
        try:
            meta = json.loads(payload["meta_json"])
        except (TypeError, json.JSONDecodeError) as error:
            raise _Bad(f"'meta_json' is not a JSON string ({error})") from None
        if not isinstance(meta, dict):
            raise _Bad("'meta_json' must hold a JSON object")
    return EapGraph(graph, scores, in_graph, d_model, meta)


def _tensor(
    payload: Mapping[str, Any], key: str, shape: tuple[int, ...], *, floating: bool
) -> Tensor:
    value = payload[key]
    if not isinstance(value, Tensor):
        raise _Bad(f"{key!r} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise _Bad(
            f"{key!r} has shape {tuple(value.shape)}, expected {shape}: a file of another graph size?"
        )
    if floating and not value.dtype.is_floating_point:
        raise _Bad(f"{key!r} must be a float tensor, got {value.dtype}")
    if not floating and value.dtype != torch.bool:
        raise _Bad(f"{key!r} must be a bool tensor, got {value.dtype}")
    return value.detach().cpu()


# ---- helpers ------------------------------------------------------------------------------------
def _dense(
    graph: Graph, scores: Tensor | None, in_graph: Tensor | None
) -> tuple[Tensor | None, Tensor]:
    if scores is not None:
        graph.check_shape(scores)
        scores = scores.detach().to("cpu", torch.float32).where(graph.edge_valid, 0.0)
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("scores contain NaN/inf: EAP-IG graph files need finite scores")
    if in_graph is None:
        in_graph = graph.edge_valid.clone()
    else:
        graph.check_shape(in_graph)
        in_graph = in_graph.detach().to("cpu", torch.bool) & graph.edge_valid
    return scores, in_graph


def _nodes_in_graph(graph: Graph, in_graph: Tensor) -> Bool[Tensor, " n_nodes"]:
    """EAP-IG's node membership: an outgoing circuit edge and (but for ``input``) an incoming one;
    ``logits`` always."""
    incoming = torch.zeros(len(graph.node_names), dtype=torch.bool)
    incoming[graph.dst_node_index[in_graph.any(dim=0)]] = True
    incoming[0] = True
    out = torch.ones(len(graph.node_names), dtype=torch.bool)
    out[: graph.n_src] = in_graph.any(dim=1) & incoming[: graph.n_src]
    return out


def _full_layout(graph: Graph) -> tuple[Graph, Tensor, Tensor]:
    """EAP-IG's graph for `graph`'s cfg (always with MLPs) and where `graph`'s sources and
    destinations sit in it."""
    if graph.has_mlp:
        return graph, torch.arange(graph.n_src), torch.arange(graph.n_dst)
    full = Graph(graph.n_layers, graph.n_heads, has_mlp=True)
    src = torch.tensor([full.src_index(name) for name in graph.src_names])
    dst = torch.tensor([full.dst_index(name) for name in graph.dst_names])
    return full, src, dst


def _is_absent_mlp_edge(graph: Graph, full: Graph, name: str) -> bool:
    if graph.has_mlp:
        return False
    try:
        full.edge_index(name)
    except KeyError:
        return False
    return True


__all__ = [
    "PT_SUFFIXES",
    "EapGraph",
    "eap_cfg",
    "from_json_dict",
    "from_pt_dict",
    "read",
    "read_json",
    "read_pt",
    "to_json_dict",
    "to_pt_dict",
    "write_json",
    "write_pt",
]
