"""The computational graph of a HookedTransformer, in the MIB / EAP-IG naming convention.

Nodes are ``input`` (token + positional embedding, i.e. ``blocks.0.hook_resid_pre``), every
attention head ``a{L}.h{H}``, every MLP ``m{L}`` and ``logits``. With ``mlp_blocks = B > 1`` each
MLP is split into B nodes ``m{L}.b{BB}`` (block b, two or more digits) of ``d_mlp / B``
contiguous neurons: block b reads the MLP's input through its own columns of ``W_in`` (and
``b_in``) and writes through its own rows of ``W_out``; ``b_out`` belongs to no block. Because the residual stream is a
sum, every node that writes to it (a *source*) reaches every later node that reads from it (a
*destination*) along its own edge. A head reads three times (query, key and value input), so it
is three destinations ``a{L}.h{H}<q>``, ``<k>``, ``<v>``; an MLP reads once (``m{L}``, after the
heads of its own layer); ``logits`` reads the final residual.

Edges are stored densely as ``[n_src, n_dst]`` with a validity mask. Sources are ordered
``input, a0.h0 .. a0.h{H-1}, m0, a1.h0, ...``, so the sources upstream of any destination form a
prefix of the source axis; destinations are ordered per layer as
``[q of every head, k of every head, v of every head, mlp]``, then ``logits``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

QKV = ("q", "k", "v")

# TransformerLens architectures whose norms sit after the residual add (OLMo 2/3).
_POST_NORM_ARCHITECTURES = {"Olmo2ForCausalLM", "Olmo3ForCausalLM"}


_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP = re.compile(r"^m(\d+)(?:\.b(\d+))?$")


@dataclass(frozen=True)
class NodeInfo:
    """What a node name denotes: ``kind`` is ``"input"``, ``"head"``, ``"mlp"`` or ``"logits"``;
    ``layer``, ``head`` and ``block`` (an MLP's neuron block) are None where they do not apply."""

    name: str
    kind: str
    layer: int | None
    head: int | None
    block: int | None = None


def parse_node(name: str) -> NodeInfo:
    """Parse a node name (``input``, ``a{L}.h{H}``, ``m{L}``, ``m{L}.b{B}``, ``logits``; a destination suffix
    ``<q>``/``<k>``/``<v>`` is dropped). The one parser of node names in circuitdyn; raises
    ValueError for anything else."""
    base = name.split("<", 1)[0]
    if base in ("input", "logits"):
        return NodeInfo(base, base, None, None)
    match = _HEAD.match(base)
    if match:
        return NodeInfo(base, "head", int(match.group(1)), int(match.group(2)))
    match = _MLP.match(base)
    if match:
        block = None if match.group(2) is None else int(match.group(2))
        return NodeInfo(base, "mlp", int(match.group(1)), None, block)
    raise ValueError(
        f"not a circuitdyn node name: {name!r} (expected input, aL.hH, mL, mL.bB, logits)"
    )


def split_edge(edge: str) -> tuple[str, str, str, str]:
    """``"a0.h1->a2.h3<q>"`` -> (src ``a0.h1``, dst ``a2.h3<q>``, dst node ``a2.h3``, input
    ``q``; input is ``""`` for MLP and logits destinations)."""
    src, sep, dst = edge.partition("->")
    if not sep:
        raise ValueError(f"edge names look like 'a0.h1->a2.h3<q>', got {edge!r}")
    node, _, rest = dst.partition("<")
    return src, dst, node, rest.rstrip(">")


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be decomposed into circuitdyn's graph."""


def check_supported(cfg: HookedTransformerConfig) -> None:
    """Raise `UnsupportedModelError` naming the feature when the graph would give wrong numbers."""
    problems: list[str] = []
    if cfg.parallel_attn_mlp:
        problems.append(
            "parallel attention+MLP blocks (GPT-J / NeoX style): the MLP reads resid_pre, "
            "not the heads of its own layer"
        )
    if cfg.use_normalization_before_and_after:
        problems.append(
            "a norm after each attention/MLP output (Gemma 2 style): head outputs are not "
            "additive in the residual stream"
        )
    if cfg.original_architecture in _POST_NORM_ARCHITECTURES:
        problems.append(f"post-norm architecture {cfg.original_architecture}")
    if cfg.normalization_type is None:
        problems.append(
            "normalization_type=None: circuitdyn reads head/MLP inputs at the norm hooks; "
            "use 'LN', 'LNPre', 'RMS' or 'RMSPre'"
        )
    if cfg.positional_embedding_type == "shortformer":
        problems.append("shortformer positions (added to q/k only, not the residual stream)")
    grouped = cfg.n_key_value_heads is not None and cfg.n_key_value_heads != cfg.n_heads
    if grouped and not cfg.ungroup_grouped_query_attention:
        problems.append(
            "grouped-query attention: set cfg.ungroup_grouped_query_attention=True so each "
            "query head has its own key/value input"
        )
    if cfg.use_split_qkv_input or cfg.use_attn_in:
        problems.append(
            "use_split_qkv_input / use_attn_in is on: circuitdyn computes per-head inputs itself; "
            "turn them off (model.set_use_split_qkv_input(False), model.set_use_attn_in(False))"
        )
    if getattr(cfg, "load_in_4bit", False):
        problems.append("4-bit quantized weights")
    if problems:
        raise UnsupportedModelError(
            "circuitdyn cannot build an exact graph for this model: " + "; ".join(problems)
        )


@dataclass(frozen=True)
class Graph:
    """Nodes and edges of a HookedTransformer with `n_layers` layers of `n_heads` heads."""

    n_layers: int
    n_heads: int
    has_mlp: bool = True
    mlp_blocks: int = 1  # MLP nodes per layer (neuron blocks); 1: one node per MLP
    src_names: tuple[str, ...] = field(init=False)
    dst_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1:
            raise ValueError(
                f"a graph needs >= 1 layer and head, got {self.n_layers}, {self.n_heads}"
            )
        if self.mlp_blocks < 1 or (self.mlp_blocks > 1 and not self.has_mlp):
            raise ValueError(f"mlp_blocks must be >= 1 (and 1 without MLPs), got {self.mlp_blocks}")
        src, dst = ["input"], []
        for layer in range(self.n_layers):
            src += [f"a{layer}.h{h}" for h in range(self.n_heads)]
            dst += [f"a{layer}.h{h}<{c}>" for c in QKV for h in range(self.n_heads)]
            if self.has_mlp:
                src += self.mlp_names(layer)
                dst += self.mlp_names(layer)
        dst.append("logits")
        object.__setattr__(self, "src_names", tuple(src))
        object.__setattr__(self, "dst_names", tuple(dst))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: HookedTransformer, mlp_blocks: int = 1) -> Graph:
        """The graph of `model`, each MLP split into `mlp_blocks` neuron blocks; raises
        `UnsupportedModelError` for architectures it cannot decompose."""
        if not isinstance(model, HookedTransformer):
            raise UnsupportedModelError(
                f"expected a transformer_lens.HookedTransformer, got {type(model).__name__}"
            )
        return cls.from_config(model.cfg, mlp_blocks)

    @classmethod
    def from_config(cls, cfg: HookedTransformerConfig, mlp_blocks: int = 1) -> Graph:
        check_supported(cfg)
        if mlp_blocks > 1:
            _check_blocks(cfg, mlp_blocks)
        return cls(cfg.n_layers, cfg.n_heads, has_mlp=not cfg.attn_only, mlp_blocks=mlp_blocks)

    @classmethod
    def from_names(cls, src_names: Sequence[str], dst_names: Sequence[str]) -> Graph:
        """The graph whose source and destination names are these (e.g. as a `RunStore` saved
        them); ValueError when no graph has exactly these names in this order."""
        nodes = [parse_node(name) for name in src_names]
        layers = [n.layer for n in nodes if n.layer is not None]
        heads = [n.head for n in nodes if n.head is not None]
        if not layers or not heads:
            raise ValueError("these names hold no attention head: not a circuitdyn graph")
        blocks = [n.block for n in nodes if n.block is not None]
        graph = cls(
            n_layers=max(layers) + 1,
            n_heads=max(heads) + 1,
            has_mlp=any(n.kind == "mlp" for n in nodes),
            mlp_blocks=max(blocks) + 1 if blocks else 1,
        )
        if graph.src_names != tuple(src_names) or graph.dst_names != tuple(dst_names):
            raise ValueError(
                f"these source/destination names are not those of {graph} in its order"
            )
        return graph

    # ---- sizes and layout ---------------------------------------------------------------
    @property
    def n_src(self) -> int:
        return len(self.src_names)

    @property
    def n_dst(self) -> int:
        return len(self.dst_names)

    @property
    def n_mlp_nodes(self) -> int:
        """MLP nodes per layer: `mlp_blocks`, or 0 without MLPs."""
        return self.mlp_blocks if self.has_mlp else 0

    def mlp_names(self, layer: int) -> list[str]:
        """The MLP node names of `layer`: ``m{L}``, or ``m{L}.b{BB}`` per neuron block."""
        if self.mlp_blocks == 1:
            return [f"m{layer}"]
        width = max(2, len(str(self.mlp_blocks - 1)))
        return [f"m{layer}.b{b:0{width}d}" for b in range(self.mlp_blocks)]

    @property
    def _src_per_layer(self) -> int:
        return self.n_heads + self.n_mlp_nodes

    @property
    def _dst_per_layer(self) -> int:
        return 3 * self.n_heads + self.n_mlp_nodes

    def head_src(self, layer: int) -> slice:
        """Source indices of the heads of `layer`."""
        start = 1 + layer * self._src_per_layer
        return slice(start, start + self.n_heads)

    def mlp_src(self, layer: int) -> slice:
        """Source indices of the MLP node(s) of `layer` (one per neuron block)."""
        self._need_mlp()
        start = 1 + layer * self._src_per_layer + self.n_heads
        return slice(start, start + self.mlp_blocks)

    def qkv_dst(self, layer: int) -> slice:
        """Destination indices of layer `layer`'s head inputs, ordered [q heads, k heads, v heads]."""
        start = layer * self._dst_per_layer
        return slice(start, start + 3 * self.n_heads)

    def mlp_dst(self, layer: int) -> slice:
        """Destination indices of the MLP node(s) of `layer` (one per neuron block)."""
        self._need_mlp()
        start = layer * self._dst_per_layer + 3 * self.n_heads
        return slice(start, start + self.mlp_blocks)

    @property
    def logits_dst(self) -> int:
        return self.n_dst - 1

    def n_upstream_attn(self, layer: int) -> int:
        """Number of sources that reach the heads of `layer`: a prefix of the source axis."""
        return 1 + layer * self._src_per_layer

    def n_upstream_mlp(self, layer: int) -> int:
        """Number of sources that reach MLP `layer` (including the heads of its own layer)."""
        return 1 + layer * self._src_per_layer + self.n_heads

    def _need_mlp(self) -> None:
        if not self.has_mlp:
            raise ValueError("this graph is attention-only: it has no MLP nodes")

    @cached_property
    def edge_valid(self) -> Bool[Tensor, "n_src n_dst"]:
        """True where (src, dst) is a real edge (the source is upstream of the destination)."""
        valid = torch.zeros(self.n_src, self.n_dst, dtype=torch.bool)
        for layer in range(self.n_layers):
            valid[: self.n_upstream_attn(layer), self.qkv_dst(layer)] = True
            if self.has_mlp:
                valid[: self.n_upstream_mlp(layer), self.mlp_dst(layer)] = True
        valid[:, self.logits_dst] = True
        return valid

    @property
    def n_edges(self) -> int:
        return int(self.edge_valid.sum())

    # ---- names <-> indices --------------------------------------------------------------
    @cached_property
    def node_names(self) -> tuple[str, ...]:
        """``input``, the heads and MLPs in layer order, ``logits``."""
        return (*self.src_names, "logits")

    @cached_property
    def _src_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.src_names)}

    @cached_property
    def _dst_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.dst_names)}

    @cached_property
    def _node_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.node_names)}

    def src_index(self, name: str) -> int:
        return _lookup(self._src_index, name, "a source node of this graph (e.g. 'a0.h1', 'm0')")

    def dst_index(self, name: str) -> int:
        return _lookup(
            self._dst_index, name, "a destination of this graph (e.g. 'a1.h0<q>', 'm0', 'logits')"
        )

    def node_index(self, name: str) -> int:
        return _lookup(self._node_index, name, "a node of this graph")

    def edge_index(self, name: str) -> tuple[int, int]:
        """(src, dst) indices of an edge named like ``a0.h1->a2.h3<q>``."""
        src, sep, dst = name.partition("->")
        if not sep:
            raise KeyError(f"edge names look like 'a0.h1->a2.h3<q>', got {name!r}")
        i, j = self.src_index(src), self.dst_index(dst)
        if not bool(self.edge_valid[i, j]):
            raise KeyError(f"{name!r} is not an edge: {src} is not upstream of {dst}")
        return i, j

    @cached_property
    def edge_names(self) -> tuple[str, ...]:
        """Names of the real edges in row-major (src, dst) order."""
        src, dst = self.edge_valid.nonzero(as_tuple=True)
        return tuple(
            f"{self.src_names[i]}->{self.dst_names[j]}"
            for i, j in zip(src.tolist(), dst.tolist(), strict=True)
        )

    @staticmethod
    def dst_node(dst_name: str) -> str:
        """The node a destination belongs to: ``a2.h3<q>`` -> ``a2.h3``."""
        return dst_name.split("<", 1)[0]

    @cached_property
    def dst_node_index(self) -> Tensor:
        """For each destination, the index of its node in `node_names` ([n_dst] long)."""
        return torch.tensor([self.node_index(self.dst_node(d)) for d in self.dst_names])

    def edges_of(self, node: str) -> list[str]:
        """Names of all real edges into or out of `node`."""
        self.node_index(node)  # validates the name
        return [
            e
            for e in self.edge_names
            if e.split("->")[0] == node or self.dst_node(e.split("->")[1]) == node
        ]

    # ---- scores -------------------------------------------------------------------------
    def node_scores(self, edge_scores: Float[Tensor, "n_src n_dst"]) -> Float[Tensor, " n_nodes"]:
        """Node scores from edge scores: a source node's score is the sum of its outgoing edges
        (to first order, the effect of ablating the node's output everywhere); ``logits``' score is
        the sum of its incoming edges (to first order, the effect of ablating everything)."""
        self.check_shape(edge_scores)
        masked = edge_scores.where(self.edge_valid.to(edge_scores.device), 0)
        return torch.cat([masked.sum(dim=1), masked[:, self.logits_dst].sum().reshape(1)])

    def check_shape(self, matrix: Tensor) -> None:
        if tuple(matrix.shape) != (self.n_src, self.n_dst):
            raise ValueError(
                f"expected an [n_src, n_dst] = [{self.n_src}, {self.n_dst}] edge matrix for this "
                f"graph, got {tuple(matrix.shape)}"
            )

    def __repr__(self) -> str:
        blocks = f", mlp_blocks={self.mlp_blocks}" if self.mlp_blocks > 1 else ""
        return (
            f"Graph(n_layers={self.n_layers}, n_heads={self.n_heads}, has_mlp={self.has_mlp}"
            f"{blocks}, nodes={len(self.node_names)}, edges={self.n_edges})"
        )


def _check_blocks(cfg: HookedTransformerConfig, mlp_blocks: int) -> None:
    """MLP neuron blocks need an ungated MLP whose width the block count divides."""
    if cfg.attn_only:
        raise UnsupportedModelError(
            "mlp_blocks > 1 needs a model with MLPs (this one is attn_only)"
        )
    if cfg.d_mlp % mlp_blocks != 0:
        raise UnsupportedModelError(
            f"mlp_blocks={mlp_blocks} does not divide d_mlp={cfg.d_mlp}; choose a divisor"
        )
    if cfg.gated_mlp or getattr(cfg, "num_experts", None) or cfg.act_fn in ("solu_ln",):
        raise UnsupportedModelError(
            "mlp_blocks > 1 supports plain MLPs (W_in, activation, W_out); this model's MLP is "
            "gated, mixture-of-experts or has a norm inside: use mlp_blocks=1"
        )


def _lookup(index: dict[str, int], name: str, what: str) -> int:
    try:
        return index[name]
    except KeyError:
        raise KeyError(f"{name!r} is not {what}") from None
