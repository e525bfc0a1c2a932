"""`Scores`: signed edge (and derived node) scores over a `Graph`, with JSON, ``.pt`` and
safetensors I/O.

JSON and ``.pt`` files are EAP-IG / MIB graph files (see `circuitdyn.interop` for the layout), so
EAP-IG's ``Graph.from_json`` / ``from_pt`` and MIB's circuit track read them; circuitdyn adds
``meta`` (method, ablation, number of examples, ...). safetensors files (`save` / `load`) hold
the dense tensors with the graph shape and meta in the header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from circuitdyn import interop
from circuitdyn.graph import Graph


@dataclass
class Scores:
    """Edge scores ``[n_src, n_dst]`` (float32, CPU; 0 on invalid pairs) of a `graph`.

    Convention (DESIGN.md): mean over examples of the sum over positions of
    ``(a_src(ablated) - a_src(clean)) . d metric / d input_dst``, in units of the metric. Larger
    |score| means the edge matters more; the sign says whether ablating it raises or lowers
    the metric (to first order)."""

    graph: Graph
    edges: Float[Tensor, "n_src n_dst"]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.graph.check_shape(self.edges)
        self.edges = self.edges.detach().to("cpu", torch.float32).where(self.graph.edge_valid, 0.0)
        if not bool(torch.isfinite(self.edges).all()):
            bad = [
                self.graph.edge_names[i]
                for i in (~torch.isfinite(self.edges[self.graph.edge_valid]))
                .nonzero()[:5, 0]
                .tolist()
            ]
            raise ValueError(
                f"scores contain NaN/inf (e.g. {bad}); check the metric for NaN on some examples "
                "and the model for overflow (try float32)"
            )

    @property
    def nodes(self) -> Float[Tensor, " n_nodes"]:
        """Node scores derived from edge scores (see `Graph.node_scores`), ordered as `graph.node_names`."""
        return self.graph.node_scores(self.edges)

    def edge(self, name: str) -> float:
        return float(self.edges[self.graph.edge_index(name)])

    def node(self, name: str) -> float:
        return float(self.nodes[self.graph.node_index(name)])

    def flat(self) -> Float[Tensor, " n_edges"]:
        """Scores of the real edges in `graph.edge_names` order."""
        return self.edges[self.graph.edge_valid]

    # ---- I/O ------------------------------------------------------------------------------
    @property
    def d_model(self) -> int | None:
        """The model width, when `meta` records it (``meta["d_model"]``); EAP-IG files carry it."""
        value = self.meta.get("d_model")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def to_json(self, path: str | Path, *, d_model: int | None = None) -> None:
        """Write the scores as an EAP-IG / MIB graph file (`circuitdyn.interop`): ``cfg``,
        ``nodes`` (name -> ``{"in_graph", "score"}``), ``edges`` (name -> ``{"score",
        "in_graph"}``, every edge in: the full model) and circuitdyn's ``meta``. `d_model`
        defaults to ``meta["d_model"]`` (0, "not recorded", when absent)."""
        interop.write_json(path, self._file(d_model))

    def to_pt(self, path: str | Path, *, d_model: int | None = None) -> None:
        """Write the scores in EAP-IG's ``.pt`` layout (``src_nodes``, ``dst_nodes``,
        ``edges_scores``, ``edges_in_graph``, ``nodes_in_graph``, ``nodes_scores``)."""
        interop.write_pt(path, self._file(d_model))

    def _file(self, d_model: int | None) -> interop.EapGraph:
        d_model = self.d_model if d_model is None else d_model
        return interop.EapGraph(self.graph, self.edges, None, d_model, self.meta)

    @classmethod
    def from_json(cls, path: str | Path, *, graph: Graph | None = None) -> Scores:
        """Edge scores of an EAP-IG / MIB JSON graph file, or of one circuitdyn wrote. With
        `graph`, the file must be of that graph. ValueError names what is wrong."""
        return cls._from_file(interop.read_json(path, graph=graph))

    @classmethod
    def from_pt(cls, path: str | Path, *, graph: Graph | None = None) -> Scores:
        """Edge scores of an EAP-IG ``.pt`` graph file (read with ``weights_only=True``)."""
        return cls._from_file(interop.read_pt(path, graph=graph))

    @classmethod
    def _from_file(cls, data: interop.EapGraph) -> Scores:
        meta = dict(data.meta)
        if data.d_model is not None:
            meta.setdefault("d_model", data.d_model)
        return cls(data.graph, data.scores, meta)

    def save(self, path: str | Path) -> None:
        """Dense tensors as safetensors (graph shape and meta in the header)."""
        graph = self.graph
        header = {
            "n_layers": str(graph.n_layers),
            "n_heads": str(graph.n_heads),
            "has_mlp": str(int(graph.has_mlp)),
            "mlp_blocks": str(graph.mlp_blocks),
            "meta": json.dumps(self.meta),
        }
        save_file(
            {"edges": self.edges.contiguous(), "nodes": self.nodes}, str(path), metadata=header
        )

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        try:
            graph = Graph(
                int(header["n_layers"]),
                int(header["n_heads"]),
                bool(int(header["has_mlp"])),
                int(header.get("mlp_blocks", "1")),
            )
        except KeyError as error:
            raise ValueError(f"{path} is not a circuitdyn scores file (missing {error})") from None
        return cls(graph, load_file(str(path))["edges"], json.loads(header.get("meta", "{}")))
