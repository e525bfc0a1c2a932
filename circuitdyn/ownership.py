"""Which model parameters a circuit owns, and the policies for parameters that belong to no node.

Per head: head h of layer L owns ``W_Q[h]`` and ``b_Q[h]`` when an edge into ``aL.hh<q>`` is in
the circuit (likewise K and V), and ``W_O[h]`` when an edge out of ``aL.hh`` is; MLP L owns every
parameter of ``blocks.L.mlp`` when ``mL`` is in the circuit. With MLP neuron blocks, block b owns
its columns of ``W_in`` and ``b_in`` and its rows of ``W_out``; ``b_out`` goes with any block of
its MLP. Parameters that belong to no node
(``b_O``, norms, embeddings, unembedding) follow a `ParameterPolicy`, chosen by name from
`POLICIES` (default ``nodes``: not tuned).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import torch
from jaxtyping import Bool
from torch import Tensor
from transformer_lens import HookedTransformer

from circuitdyn.circuit import Circuit, Components
from circuitdyn.graph import Graph
from circuitdyn.registry import Registry


class ParamKind(str, Enum):
    """Role of a model parameter with respect to the graph's nodes."""

    HEAD_Q = "head_q"  # W_Q, b_Q: [n_heads, ...], row h belongs to head h's <q> input
    HEAD_K = "head_k"  # W_K, b_K (or GQA's _W_K, _b_K: [n_kv_heads, ...])
    HEAD_V = "head_v"  # W_V, b_V (or GQA's _W_V, _b_V)
    HEAD_O = "head_o"  # W_O: [n_heads, d_head, d_model], row h is head h's output
    HEAD_SINK = "head_sink"  # attention-sink logits [n_heads] (GPT-OSS): part of the pattern
    ATTN_BIAS_OUT = "attn_bias_out"  # b_O [d_model]: shared by all heads of a layer, no node
    QK_NORM = "qk_norm"  # q_norm / k_norm weights [d_head], shared by all heads of a layer
    MLP = "mlp"  # every parameter under blocks.L.mlp (W_in, b_in, W_out, b_out, W_gate, experts)
    LAYERNORM = "layernorm"  # ln1, ln2, ln_final weights and biases
    EMBED = "embed"  # W_E, W_pos (token-type embeddings too)
    UNEMBED = "unembed"  # W_U, b_U


@dataclass(frozen=True)
class ParamInfo:
    """Where a parameter sits: its kind and layer (None outside the blocks)."""

    kind: ParamKind
    layer: int | None = None


@dataclass(frozen=True)
class ParameterPolicy:
    """Which node-less parameters a circuit also tunes (all off by default: only head and MLP
    weights of circuit nodes are tuned, as in circuit-tuning).

    * `include_layernorm`: the norm that feeds circuit nodes: ``blocks.L.ln1`` when a head of
      layer L has a circuit q/k/v input, ``blocks.L.ln2`` when ``mL`` is in the circuit,
      ``ln_final`` when ``logits`` is; QK-norm weights (``attn.q_norm`` / ``attn.k_norm``) when a
      head of the layer owns its Q / K.
    * `include_embed`: ``embed.W_E`` and ``pos_embed.W_pos`` when ``input`` is in the circuit.
    * `include_unembed`: ``unembed.W_U`` and ``unembed.b_U`` when ``logits`` is in the circuit.
    * `include_attn_bias_out`: ``blocks.L.attn.b_O`` when a head of layer L owns its ``W_O``.

    Two switches change the map itself (the authors' map, arXiv 2502.06106's code):

    * `qkv_per_layer`: a circuit edge into any head's q, k or v input of layer L tunes the whole
      ``W_Q``, ``W_K``, ``W_V`` and their biases of layer L (every head), not that head's rows.
    * `mlp_by_side`: an MLP (block) with a circuit edge *into* it owns its ``W_in`` columns and
      ``b_in`` (and ``W_gate``), one with a circuit edge *out of* it its ``W_out`` rows and
      ``b_out``; otherwise a node owns both sides.
    """

    include_layernorm: bool = False
    include_embed: bool = False
    include_unembed: bool = False
    include_attn_bias_out: bool = False
    qkv_per_layer: bool = False
    mlp_by_side: bool = False


_BLOCK_PARAM = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ATTN_KINDS = {
    "W_Q": ParamKind.HEAD_Q,
    "b_Q": ParamKind.HEAD_Q,
    "W_K": ParamKind.HEAD_K,
    "b_K": ParamKind.HEAD_K,
    "_W_K": ParamKind.HEAD_K,
    "_b_K": ParamKind.HEAD_K,
    "W_V": ParamKind.HEAD_V,
    "b_V": ParamKind.HEAD_V,
    "_W_V": ParamKind.HEAD_V,
    "_b_V": ParamKind.HEAD_V,
    "W_O": ParamKind.HEAD_O,
    "b_O": ParamKind.ATTN_BIAS_OUT,
    "sinks": ParamKind.HEAD_SINK,
    "q_norm.w": ParamKind.QK_NORM,
    "k_norm.w": ParamKind.QK_NORM,
}


def classify_parameter(name: str) -> ParamInfo:
    """The `ParamInfo` of a HookedTransformer parameter name; ValueError for names circuitdyn
    does not know (so that no parameter is silently left out of, or put into, a circuit)."""
    match = _BLOCK_PARAM.match(name)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        if rest.startswith("mlp."):
            return ParamInfo(ParamKind.MLP, layer)
        if rest.startswith(("ln1.", "ln2.")):
            return ParamInfo(ParamKind.LAYERNORM, layer)
        if rest.startswith("attn."):
            kind = _ATTN_KINDS.get(rest[len("attn.") :])
            if kind is not None:
                return ParamInfo(kind, layer)
    elif name.startswith("ln_final."):
        return ParamInfo(ParamKind.LAYERNORM)
    elif name.startswith(("embed.", "pos_embed.", "token_type_embed.")):
        return ParamInfo(ParamKind.EMBED)
    elif name.startswith("unembed."):
        return ParamInfo(ParamKind.UNEMBED)
    raise ValueError(
        f"cannot map model parameter {name!r} to a circuit node or a policy group; "
        "circuitdyn knows the parameters of TransformerLens attention, MLP, norm, embedding "
        "and unembedding components"
    )


def classify_parameters(model: HookedTransformer) -> dict[str, ParamInfo]:
    """`classify_parameter` for every named parameter of `model`."""
    return {name: classify_parameter(name) for name, _ in model.named_parameters()}


def parameter_masks(
    model: HookedTransformer,
    circuit: Circuit,
    policy: ParameterPolicy | str | None = None,
    *,
    include_frozen: bool = True,
) -> dict[str, Bool[Tensor, "..."]]:
    """For each parameter of `model`, a bool mask shaped like it (on its device): True on the
    scalars the circuit owns (see the module docstring and `ParameterPolicy`).

    Per-head slicing: ``W_Q``/``b_Q``/``W_K``/... are ``[n_heads, ...]`` and row h is set when head
    h owns that input; ``W_O`` row h when head h's output is in the circuit. Grouped-query models
    (graph requires ``ungroup_grouped_query_attention=True``) store ``_W_K``/``_W_V``/``_b_K``/``_b_V``
    as ``[n_kv_heads, ...]``, each row shared by ``n_heads / n_kv_heads`` consecutive query heads:
    a shared row is owned when *any* head of its group owns that input (tuning it also changes
    the group's other heads; exact per-head ownership is impossible without untying weights).

    Use: zero gradients outside the mask (``p.grad.mul_(mask)``) *and* restore frozen entries
    after each optimizer step (``p.data = torch.where(mask, p.data, before)``), because momentum
    and weight decay move entries whose gradient is zero.

    Args:
        include_frozen: also return all-False masks for parameters the circuit does not touch
            (default; every parameter name is then a key). With False only parameters with some
            True entry appear, which saves memory on large models.
    """
    policy = resolve_policy(policy)
    graph = Graph.from_model(model, circuit.graph.mlp_blocks)
    if circuit.graph != graph:
        raise ValueError(f"the circuit's graph {circuit.graph} does not match the model's {graph}")
    own = circuit.components()
    cfg = model.cfg
    any_qkv = own.q | own.k | own.v  # [n_layers, n_heads]
    per_head = {
        ParamKind.HEAD_Q: own.q,
        ParamKind.HEAD_K: own.k,
        ParamKind.HEAD_V: own.v,
        ParamKind.HEAD_O: own.o,
        ParamKind.HEAD_SINK: own.q | own.k,  # the sink logit shapes the pattern, as Q and K do
    }
    masks: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        info = classify_parameter(name)
        layer = info.layer
        kind = info.kind
        if kind is ParamKind.MLP:
            assert layer is not None
            mask = _mlp_mask(name, param, own, layer, policy.mlp_by_side)
        elif kind in per_head:
            assert layer is not None
            rows = per_head[kind][layer]  # [n_heads]
            if policy.qkv_per_layer and kind in (
                ParamKind.HEAD_Q,
                ParamKind.HEAD_K,
                ParamKind.HEAD_V,
            ):
                rows = any_qkv[layer].any().expand(cfg.n_heads)
            n_rows = param.shape[0]
            if n_rows != cfg.n_heads:
                # Grouped K/V: head h uses stored row h // (n_heads / n_rows).
                if cfg.n_heads % n_rows != 0:
                    raise ValueError(f"{name}: {n_rows} rows do not divide n_heads={cfg.n_heads}")
                rows = rows.reshape(n_rows, cfg.n_heads // n_rows).any(dim=1)
            mask = rows.reshape(-1, *([1] * (param.ndim - 1))).expand(param.shape)
        else:
            owned = _owns_whole(name, kind, layer, own, any_qkv, policy)
            mask = torch.full(param.shape, owned, dtype=torch.bool)
        mask = mask.to(param.device).contiguous()
        if include_frozen or bool(mask.any()):
            masks[name] = mask
    return masks


def _owns_whole(
    name: str,
    kind: ParamKind,
    layer: int | None,
    own: Components,
    any_qkv: Tensor,
    policy: ParameterPolicy,
) -> bool:
    """Whether a parameter that is not sliced per head is owned as a whole."""
    if kind is ParamKind.ATTN_BIAS_OUT:
        return policy.include_attn_bias_out and bool(own.o[layer].any())
    if kind is ParamKind.QK_NORM:
        owner = own.q if ".q_norm." in name else own.k
        return policy.include_layernorm and bool(owner[layer].any())
    if kind is ParamKind.LAYERNORM:
        if not policy.include_layernorm:
            return False
        if layer is None:  # ln_final feeds logits
            return own.logits
        return bool(any_qkv[layer].any()) if ".ln1." in name else bool(own.mlp[layer].any())
    if kind is ParamKind.EMBED:
        return policy.include_embed and own.input
    if kind is ParamKind.UNEMBED:
        return policy.include_unembed and own.logits
    raise AssertionError(f"unhandled parameter kind {kind}")


_MLP_INPUT_SIDE = ("W_in", "b_in", "W_gate")  # the rest (W_out, b_out) is the output side


def _mlp_mask(
    name: str, param: Tensor, own: Components, layer: int, by_side: bool
) -> Bool[Tensor, "..."]:
    """The entries of an MLP parameter that the circuit owns: per neuron block, ``W_in`` columns,
    ``b_in`` entries and ``W_out`` rows; any other MLP parameter (``b_out``, or every parameter
    of an MLP that is one node) goes with any owned block. With `by_side`, input-side
    parameters follow the blocks with an incoming circuit edge, output-side ones those with an
    outgoing edge."""
    leaf = name.rsplit(".", 1)[-1]
    if by_side:
        blocks = (own.mlp_in if leaf in _MLP_INPUT_SIDE else own.mlp_out)[layer]
    else:
        blocks = own.mlp[layer]
    if blocks.numel() == 1 or leaf not in ("W_in", "b_in", "W_out"):
        return torch.full(param.shape, bool(blocks.any()), dtype=torch.bool)
    neurons = blocks.repeat_interleave(param.shape[-1 if leaf != "W_out" else 0] // blocks.numel())
    if leaf == "W_in":  # [d_model, d_mlp]
        return neurons[None, :].expand(param.shape)
    if leaf == "W_out":  # [d_mlp, d_model]
        return neurons[:, None].expand(param.shape)
    return neurons  # b_in [d_mlp]


def count_tunable(
    model: HookedTransformer, circuit: Circuit, policy: ParameterPolicy | str | None = None
) -> int:
    """Exact number of scalars `circuit` owns under `policy` (the size of circuit-tuning)."""
    masks = parameter_masks(model, circuit, policy, include_frozen=False)
    return int(sum(int(mask.sum()) for mask in masks.values()))


POLICIES: Registry[ParameterPolicy] = Registry("parameter policy")
POLICIES.add("nodes", ParameterPolicy(), help="only the weights of circuit heads and MLPs")
POLICIES.add(
    "nodes+norms",
    ParameterPolicy(include_layernorm=True),
    help="also the norms that feed circuit nodes (ln1, ln2, ln_final, QK-norms)",
)
POLICIES.add(
    "paper",
    ParameterPolicy(include_attn_bias_out=True, qkv_per_layer=True, mlp_by_side=True),
    help="the authors' map: any q/k/v input tunes the layer's whole W_Q/W_K/W_V; head outputs "
    "their W_O rows (and b_O); MLP inputs W_in/b_in, MLP outputs W_out/b_out",
)
POLICIES.add(
    "nodes+all",
    ParameterPolicy(
        include_layernorm=True,
        include_embed=True,
        include_unembed=True,
        include_attn_bias_out=True,
    ),
    help="also norms, embeddings, unembedding and b_O, each when its node is in the circuit",
)


def resolve_policy(policy: ParameterPolicy | str | None) -> ParameterPolicy:
    """A policy given by name (`POLICIES`), as an object, or None (``nodes``)."""
    if policy is None:
        return POLICIES["nodes"]
    if isinstance(policy, ParameterPolicy):
        return policy
    return POLICIES[policy]


__all__ = [
    "POLICIES",
    "ParamInfo",
    "ParamKind",
    "ParameterPolicy",
    "classify_parameter",
    "classify_parameters",
    "count_tunable",
    "parameter_masks",
    "resolve_policy",
]
