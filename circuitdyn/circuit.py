"""`Circuit`: a subgraph of a `Graph`, how to select one from `Scores`, and which model
parameters it owns.

A circuit is a boolean edge mask ``[n_src, n_dst]`` in the graph's dense layout; only real edges
(``graph.edge_valid``) may be in it. Nodes are derived: a node is in the circuit when at least
one circuit edge goes into or out of it (``input`` and ``logits`` included).

Selection (all deterministic; ties go to the edge that comes first in ``graph.edge_names``, i.e.
row-major (src, dst) order, or to the node that comes first in ``graph.node_names``):

* `Circuit.top_edges`: the n edges with the largest (absolute or signed) score;
* `Circuit.top_nodes`: the n heads/MLPs with the largest node score, with every edge among them,
  ``input`` and ``logits``;
* `Circuit.threshold`: every edge whose score reaches a threshold;
* `Circuit.greedy`: EAP-IG's greedy growth from ``logits``: repeatedly add the best edge whose
  destination node is already in the circuit.

Which model parameters a circuit owns is `circuitdyn.ownership`'s business.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from circuitdyn import interop
from circuitdyn.graph import QKV, Graph
from circuitdyn.scores import Scores


# ---------------------------------------------------------------------------------------------
# Circuit
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Circuit:
    """A set of edges of `graph`, stored as a bool mask ``[n_src, n_dst]`` (CPU).

    Immutable by convention: every operation returns a new circuit; do not modify `mask` in
    place. Equality compares the graph and the mask; circuits are not hashable."""

    graph: Graph
    mask: Bool[Tensor, "n_src n_dst"]

    def __post_init__(self) -> None:
        mask = self.mask
        if not isinstance(mask, Tensor):
            raise TypeError(f"Circuit.mask must be a torch.Tensor, got {type(mask).__name__}")
        self.graph.check_shape(mask)
        if mask.dtype != torch.bool:
            raise ValueError(f"Circuit.mask must be a bool tensor, got dtype {mask.dtype}")
        mask = mask.detach().to("cpu").clone()
        invalid = mask & ~self.graph.edge_valid
        if bool(invalid.any()):
            i, j = invalid.nonzero()[0].tolist()
            raise ValueError(
                f"Circuit.mask is True on {int(invalid.sum())} pairs that are not edges, e.g. "
                f"{self.graph.src_names[i]} -> {self.graph.dst_names[j]} (the source is not "
                "upstream of the destination)"
            )
        object.__setattr__(self, "mask", mask)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def full(cls, graph: Graph) -> Circuit:
        """Every edge of `graph` (the unablated model)."""
        return cls(graph, graph.edge_valid.clone())

    @classmethod
    def empty(cls, graph: Graph) -> Circuit:
        """No edges (every edge ablated)."""
        return cls(graph, torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool))

    @classmethod
    def from_edges(cls, graph: Graph, names: Any) -> Circuit:
        """The circuit of the named edges (e.g. ``["input->a0.h1<q>", "m1->logits"]``);
        raises KeyError for a name that is not an edge of `graph`."""
        if isinstance(names, str):
            raise TypeError("from_edges takes an iterable of edge names, not a single string")
        mask = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
        for name in names:
            mask[graph.edge_index(name)] = True
        return cls(graph, mask)

    @classmethod
    def from_flat(cls, graph: Graph, selected: Bool[Tensor, " n_edges"]) -> Circuit:
        """The circuit of a bool vector over the real edges in ``graph.edge_names`` order."""
        if selected.shape != (graph.n_edges,) or selected.dtype != torch.bool:
            raise ValueError(
                f"expected a bool vector of length n_edges={graph.n_edges}, got "
                f"{selected.dtype} {tuple(selected.shape)}"
            )
        mask = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
        mask[graph.edge_valid] = selected.cpu()
        return cls(graph, mask)

    @classmethod
    def top_edges(cls, scores: Scores, n: int, *, absolute: bool = True) -> Circuit:
        """The `n` edges with the largest score (|score| when `absolute`, else the signed score,
        so strongly negative edges rank last). Ties: earlier in ``graph.edge_names`` first."""
        graph = scores.graph
        keys = _edge_keys(scores, absolute)
        _check_n(n, keys.size, "edges")
        order = np.argsort(-keys, kind="stable")  # stable: ties keep edge_names order
        selected = torch.zeros(keys.size, dtype=torch.bool)
        selected[torch.from_numpy(order[:n].copy())] = True
        return cls.from_flat(graph, selected)

    @classmethod
    def threshold(cls, scores: Scores, t: float, *, absolute: bool = True) -> Circuit:
        """Every edge with |score| >= `t` (or score >= `t` when not `absolute`), as EAP-IG's
        ``apply_threshold``. `t` is in the units of the scores (the metric's units)."""
        if not np.isfinite(t):
            raise ValueError(f"threshold must be a finite number, got {t}")
        keys = _edge_keys(scores, absolute)
        return cls.from_flat(scores.graph, torch.from_numpy(keys >= t))

    @classmethod
    def top_nodes(cls, scores: Scores, n: int, *, absolute: bool = True) -> Circuit:
        """The `n` heads/MLPs with the largest node score (see `Graph.node_scores`), with every
        edge among them, ``input`` and ``logits``. With ``n = 0`` the circuit is the single edge
        ``input->logits``. Ties: earlier in ``graph.node_names`` first."""
        graph = scores.graph
        _check_finite(scores)
        node_scores = scores.nodes.double().numpy()
        # Candidates are the heads and MLPs: input and logits are always in.
        candidates = node_scores[1 : graph.n_src]
        keys = np.abs(candidates) if absolute else candidates
        _check_n(n, keys.size, "head/MLP nodes")
        order = np.argsort(-keys, kind="stable")
        return cls.from_nodes(graph, [graph.src_names[1 + i] for i in order[:n].tolist()])

    @classmethod
    def from_nodes(cls, graph: Graph, names: Any) -> Circuit:
        """Every edge among the named heads/MLPs, ``input`` and ``logits`` (which are always in)."""
        src_in = torch.zeros(graph.n_src, dtype=torch.bool)
        src_in[0] = True
        for name in names:
            if name in ("input", "logits"):
                continue
            src_in[graph.src_index(name)] = True
        node_in = torch.cat([src_in, torch.ones(1, dtype=torch.bool)])  # logits
        dst_in = node_in[graph.dst_node_index]
        return cls(graph, src_in[:, None] & dst_in[None, :] & graph.edge_valid)

    @classmethod
    def greedy(cls, scores: Scores, n: int, *, absolute: bool = True) -> Circuit:
        """EAP-IG's greedy selection: start from ``logits`` and add, `n` times, the best-scoring
        edge whose destination node is already in the circuit; its source node joins the circuit
        and the edges into that node become candidates. The result is connected to ``logits`` by
        construction. A heap keeps it O(n_edges log n_edges). Ties: earlier in
        ``graph.edge_names`` first."""
        graph = scores.graph
        keys = _edge_keys(scores, absolute)
        _check_n(n, keys.size, "edges")
        flat_index = torch.full((graph.n_src, graph.n_dst), -1, dtype=torch.long)
        flat_index[graph.edge_valid] = torch.arange(keys.size)
        # Real edges into each destination column, as (flat index, src) lists.
        valid = graph.edge_valid
        edges_into_dst = [
            [(int(flat_index[s, d]), s) for s in valid[:, d].nonzero()[:, 0].tolist()]
            for d in range(graph.n_dst)
        ]
        # The destination columns of each source node (its q/k/v inputs, or its MLP input).
        columns_of_src: list[list[int]] = [[] for _ in range(graph.n_src)]
        for d, node in enumerate(graph.dst_node_index.tolist()):
            if node < graph.n_src:
                columns_of_src[node].append(d)
        src_of_flat = valid.nonzero()[:, 0].tolist()

        heap: list[tuple[float, int]] = []

        def push_column(d: int) -> None:
            for index, _ in edges_into_dst[d]:
                heapq.heappush(heap, (-float(keys[index]), index))

        push_column(graph.logits_dst)
        src_in = [False] * graph.n_src
        selected = torch.zeros(keys.size, dtype=torch.bool)
        for _ in range(n):
            if not heap:  # cannot happen on a full graph: every source feeds logits
                raise RuntimeError("greedy selection ran out of candidate edges")
            _, index = heapq.heappop(heap)
            selected[index] = True
            src = src_of_flat[index]
            if not src_in[src]:
                src_in[src] = True
                for d in columns_of_src[src]:
                    push_column(d)
        return cls.from_flat(graph, selected)

    # ---- nodes and counts -------------------------------------------------------------------
    @property
    def node_mask(self) -> Bool[Tensor, " n_nodes"]:
        """True for nodes with at least one circuit edge, ordered as ``graph.node_names``."""
        graph = self.graph
        out = torch.zeros(len(graph.node_names), dtype=torch.bool)
        out[: graph.n_src] = self.mask.any(dim=1)
        has_in = self.mask.any(dim=0)  # [n_dst]; several destinations (q/k/v) share a node
        out[graph.dst_node_index[has_in]] = True
        return out

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    @property
    def n_nodes(self) -> int:
        return int(self.node_mask.sum())

    @property
    def edges(self) -> tuple[str, ...]:
        """Names of the circuit's edges, in ``graph.edge_names`` order."""
        selected = self.mask[self.graph.edge_valid].tolist()
        return tuple(
            name for name, keep in zip(self.graph.edge_names, selected, strict=True) if keep
        )

    @property
    def nodes(self) -> tuple[str, ...]:
        """Names of the circuit's nodes, in ``graph.node_names`` order."""
        return tuple(
            name
            for name, keep in zip(self.graph.node_names, self.node_mask.tolist(), strict=True)
            if keep
        )

    def flat(self) -> Bool[Tensor, " n_edges"]:
        """Membership of the real edges in ``graph.edge_names`` order."""
        return self.mask[self.graph.edge_valid]

    def __contains__(self, name: object) -> bool:
        """``"a0.h1->m1" in circuit`` (an edge) or ``"a0.h1" in circuit`` (a node)."""
        if not isinstance(name, str):
            return False
        if "->" in name:
            return bool(self.mask[self.graph.edge_index(name)])
        return bool(self.node_mask[self.graph.node_index(name)])

    def __len__(self) -> int:
        return self.n_edges

    # ---- pruning ----------------------------------------------------------------------------
    def prune(self) -> Circuit:
        """Remove the edges of nodes that do not lie on an input -> logits path of circuit edges.

        A node is kept when it is reached from ``input`` through circuit edges (a head counts as
        reached when any of its q/k/v inputs has a circuit edge from a reached node) and reaches
        ``logits`` through circuit edges. An edge is kept when its source is reached and its
        destination node reaches ``logits``; both properties then hold for both ends, so one pass
        gives the fixed point (pruning again changes nothing)."""
        graph, mask = self.graph, self.mask
        n_src = graph.n_src
        # Forward: reached[s] for every source, layer by layer (sources are in topological order).
        reached = torch.zeros(n_src, dtype=torch.bool)
        reached[0] = True
        for layer in range(graph.n_layers):
            up = graph.n_upstream_attn(layer)
            hits = (mask[:up, graph.qkv_dst(layer)] & reached[:up, None]).any(dim=0)
            reached[graph.head_src(layer)] = hits.reshape(len(QKV), graph.n_heads).any(dim=0)
            if graph.has_mlp:
                up = graph.n_upstream_mlp(layer)
                hits = mask[:up, graph.mlp_dst(layer)] & reached[:up, None]
                reached[graph.mlp_src(layer)] = hits.any(dim=0)
        # Backward: reaches[node] = some circuit edge leads from it to a node that reaches logits.
        reaches = torch.zeros(len(graph.node_names), dtype=torch.bool)
        reaches[-1] = True
        dst_node = graph.dst_node_index
        for layer in reversed(range(graph.n_layers)):
            if graph.has_mlp:
                src = graph.mlp_src(layer)
                reaches[src] = (mask[src] & reaches[dst_node][None, :]).any(dim=1)
            heads = graph.head_src(layer)
            reaches[heads] = (mask[heads] & reaches[dst_node][None, :]).any(dim=1)
        reaches[0] = (mask[0] & reaches[dst_node]).any()
        keep = mask & reached[:, None] & reaches[dst_node][None, :]
        return Circuit(graph, keep)

    # ---- set operations ---------------------------------------------------------------------
    def _same_graph(self, other: object) -> Circuit:
        if not isinstance(other, Circuit):
            raise TypeError(f"expected a Circuit, got {type(other).__name__}")
        if other.graph != self.graph:
            raise ValueError(f"circuits are over different graphs: {self.graph} vs {other.graph}")
        return other

    def __or__(self, other: Circuit) -> Circuit:
        return Circuit(self.graph, self.mask | self._same_graph(other).mask)

    def __and__(self, other: Circuit) -> Circuit:
        return Circuit(self.graph, self.mask & self._same_graph(other).mask)

    def __sub__(self, other: Circuit) -> Circuit:
        return Circuit(self.graph, self.mask & ~self._same_graph(other).mask)

    def complement(self) -> Circuit:
        """Every real edge not in this circuit."""
        return Circuit(self.graph, self.graph.edge_valid & ~self.mask)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Circuit):
            return NotImplemented
        return self.graph == other.graph and torch.equal(self.mask, other.mask)

    __hash__ = None  # type: ignore[assignment]  # mutable tensor inside: not hashable

    def jaccard_edges(self, other: Circuit) -> float:
        """Intersection over union of the edge sets (1.0 when both are empty)."""
        return _iou(self.mask, self._same_graph(other).mask)

    def jaccard_nodes(self, other: Circuit) -> float:
        """Intersection over union of the node sets (1.0 when both are empty)."""
        return _iou(self.node_mask, self._same_graph(other).node_mask)

    # ---- ownership of model components ------------------------------------------------------
    def components(self) -> Components:
        """Which head inputs/outputs, MLPs, input and logits the circuit touches."""
        graph, mask = self.graph, self.mask
        H, L = graph.n_heads, graph.n_layers
        has_in = mask.any(dim=0)  # [n_dst]
        qkv = torch.stack([has_in[graph.qkv_dst(layer)].reshape(3, H) for layer in range(L)])
        out = torch.stack([mask[graph.head_src(layer)].any(dim=1) for layer in range(L)])
        if graph.has_mlp:
            mlp_in = torch.stack([has_in[graph.mlp_dst(layer)] for layer in range(L)])
            mlp_out = torch.stack([mask[graph.mlp_src(layer)].any(dim=1) for layer in range(L)])
        else:
            mlp_in = mlp_out = torch.zeros(L, 1, dtype=torch.bool)
        return Components(
            q=qkv[:, 0],
            k=qkv[:, 1],
            v=qkv[:, 2],
            o=out,
            mlp=mlp_in | mlp_out,
            mlp_in=mlp_in,
            mlp_out=mlp_out,
            input=bool(mask[0].any()),
            logits=bool(has_in[graph.logits_dst]),
        )

    # ---- I/O --------------------------------------------------------------------------------
    # Files are EAP-IG / MIB graph files (layout: `circuitdyn.interop`): a circuit is the set of
    # edges with ``in_graph`` true; with `scores`, the file also carries every edge's score, as
    # EAP-IG's own files do. Version-1 circuitdyn files (``"format": "circuitdyn.circuit"``,
    # ``edges`` a list of names) are still read.
    def to_dict(
        self, scores: Scores | None = None, *, d_model: int | None = None
    ) -> dict[str, Any]:
        """The EAP-IG JSON payload of this circuit: ``cfg``, ``nodes`` (name -> ``{"in_graph"}``,
        plus ``"score"`` with `scores`), ``edges`` (name -> ``{"score", "in_graph"}``; score 0.0
        without `scores`). `d_model` defaults to ``scores.meta["d_model"]`` (0 when unknown)."""
        return interop.to_json_dict(self._file(scores, d_model))

    def to_json(
        self, path: str | Path, scores: Scores | None = None, *, d_model: int | None = None
    ) -> None:
        """Write `to_dict` as JSON: a file EAP-IG's ``Graph.from_json`` loads with this circuit's
        edges ``in_graph`` (and, with `scores`, their scores)."""
        interop.write_json(path, self._file(scores, d_model))

    def to_pt(
        self, path: str | Path, scores: Scores | None = None, *, d_model: int | None = None
    ) -> None:
        """Write the circuit (and `scores`) in EAP-IG's ``.pt`` layout (``Graph.from_pt``)."""
        interop.write_pt(path, self._file(scores, d_model))

    def _file(self, scores: Scores | None, d_model: int | None) -> interop.EapGraph:
        if scores is None:
            return interop.EapGraph(self.graph, None, self.mask, d_model)
        if not isinstance(scores, Scores):
            raise TypeError(f"scores must be circuitdyn Scores, got {type(scores).__name__}")
        if scores.graph != self.graph:
            raise ValueError(f"scores are over {scores.graph}, the circuit over {self.graph}")
        d_model = scores.d_model if d_model is None else d_model
        return interop.EapGraph(self.graph, scores.edges, self.mask, d_model, scores.meta)

    @classmethod
    def from_dict(cls, payload: dict[str, Any], *, graph: Graph | None = None) -> Circuit:
        """Inverse of `to_dict`: the edges with ``in_graph`` true of an EAP-IG / MIB payload
        (``nodes`` may be left out), or the edges of a version-1 circuitdyn payload. With `graph`,
        the payload must be of that graph. ValueError names what is wrong."""
        if isinstance(payload, dict) and isinstance(payload.get("edges"), list):
            return cls._from_v1(payload, graph)
        return cls._from_file(interop.from_json_dict(payload, graph=graph))

    @classmethod
    def from_json(cls, path: str | Path, *, graph: Graph | None = None) -> Circuit:
        """The circuit of an EAP-IG / MIB JSON graph file (or a circuitdyn one)."""
        try:
            payload = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not JSON: {error}") from None
        if isinstance(payload, dict) and isinstance(payload.get("edges"), list):
            return cls._from_v1(payload, graph)
        return cls._from_file(interop.from_json_dict(payload, source=str(path), graph=graph))

    @classmethod
    def from_pt(cls, path: str | Path, *, graph: Graph | None = None) -> Circuit:
        """The circuit of an EAP-IG ``.pt`` graph file (read with ``weights_only=True``)."""
        return cls._from_file(interop.read_pt(path, graph=graph))

    @classmethod
    def _from_file(cls, data: interop.EapGraph) -> Circuit:
        return cls(data.graph, data.in_graph)

    @classmethod
    def _from_v1(cls, payload: dict[str, Any], graph: Graph | None) -> Circuit:
        try:
            cfg = payload["cfg"]
            has_mlp = cfg["has_mlp"] if "has_mlp" in cfg else not cfg.get("attn_only", False)
            loaded = Graph(int(cfg["n_layers"]), int(cfg["n_heads"]), has_mlp=bool(has_mlp))
            names = [str(name) for name in payload["edges"]]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a circuit file: missing or malformed field {error}") from None
        if graph is not None and loaded != graph:
            raise ValueError(f"a circuit of {loaded}, but {graph} was expected")
        return cls.from_edges(loaded, names)

    def __repr__(self) -> str:
        return (
            f"Circuit(edges={self.n_edges}/{self.graph.n_edges}, "
            f"nodes={self.n_nodes}/{len(self.graph.node_names)}, graph={self.graph!r})"
        )


@dataclass(frozen=True)
class Components:
    """What a circuit touches, per layer and head. ``q[L, h]``: an edge into ``aL.hh<q>`` is in
    the circuit (same for k, v); ``o[L, h]``: an edge out of ``aL.hh`` is; ``mlp[L, b]``: MLP
    node ``mL`` (block b of it, with neuron blocks) is a node of the circuit, ``mlp_in`` /
    ``mlp_out``: it has a circuit edge into / out of it; ``input`` / ``logits``: those nodes
    have a circuit edge."""

    q: Bool[Tensor, "n_layers n_heads"]
    k: Bool[Tensor, "n_layers n_heads"]
    v: Bool[Tensor, "n_layers n_heads"]
    o: Bool[Tensor, "n_layers n_heads"]
    mlp: Bool[Tensor, "n_layers n_blocks"]
    mlp_in: Bool[Tensor, "n_layers n_blocks"]
    mlp_out: Bool[Tensor, "n_layers n_blocks"]
    input: bool
    logits: bool


def jaccard_edges(a: Circuit, b: Circuit) -> float:
    """Intersection over union of the edge sets of two circuits (1.0 when both are empty)."""
    return a.jaccard_edges(b)


def jaccard_nodes(a: Circuit, b: Circuit) -> float:
    """Intersection over union of the node sets of two circuits (1.0 when both are empty)."""
    return a.jaccard_nodes(b)


def _iou(a: Tensor, b: Tensor) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def _check_finite(scores: Scores) -> None:
    if not isinstance(scores, Scores):
        raise TypeError(f"expected circuitdyn Scores, got {type(scores).__name__}")
    if not bool(torch.isfinite(scores.edges).all()):
        raise ValueError("scores contain NaN/inf: cannot rank edges")


def _edge_keys(scores: Scores, absolute: bool) -> np.ndarray:
    """Ranking keys of the real edges (edge_names order), float64."""
    _check_finite(scores)
    flat = scores.flat().double().numpy()
    return np.abs(flat) if absolute else flat


def _check_n(n: int, available: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > available:
        raise ValueError(f"asked for {n} {what} but the graph has only {available}")


__all__ = ["Circuit", "Components", "jaccard_edges", "jaccard_nodes"]
