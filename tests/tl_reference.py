"""Reference implementations that the tests check circuitdyn against.

Everything here is built on TransformerLens's own split-input modes (`use_split_qkv_input`,
`use_attn_result`, `use_hook_mlp_in`), the way EAP-IG and MIB compute edge scores and edge
patching, and never on circuitdyn's graph layout, norm arithmetic or hooks: edges are
enumerated from the layer rule, source activations are read from ``hook_result`` /
``hook_mlp_out``, every destination's input is rebuilt source by source at its own hook
(``hook_q_input`` / ``hook_k_input`` / ``hook_v_input``, ``[batch, pos, n_heads, d_model]``;
``hook_mlp_in``; the last ``hook_resid_post`` for the logits), and gradients come from autograd
on those hooked inputs. Loops over heads and sources keep it obviously correct; it is only
meant for the tiny test models.

Conventions shared with circuitdyn (DESIGN.md, MIB): sources are ``input``
(``blocks.0.hook_resid_pre``), ``a{L}.h{H}`` (``z_h @ W_O[h]``, without ``b_O``) and ``m{L}``;
destinations are ``a{L}.h{H}<q|k|v>``, ``m{L}`` and ``logits``; an ablated edge carries the
ablated activation of its source instead of the source's activation in the current run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

Metric = Callable[[Tensor, object], Tensor]


# ---- the graph, from the layer rule ---------------------------------------------------------
def _layer_of(src: str) -> tuple[int, int]:
    """(layer, order within the layer): input is before layer 0, heads before the MLP."""
    if src == "input":
        return (-1, 0)
    if src.startswith("a"):
        return (int(src[1:].split(".")[0]), 0)
    return (int(src[1:]), 1)


def sources(model: HookedTransformer) -> list[str]:
    cfg = model.cfg
    names = ["input"]
    for layer in range(cfg.n_layers):
        names += [f"a{layer}.h{h}" for h in range(cfg.n_heads)]
        if not cfg.attn_only:
            names.append(f"m{layer}")
    return names


def upstream(model: HookedTransformer, dst: str) -> list[str]:
    """The sources a destination reads: a head of layer L reads everything written before
    layer L; an MLP of layer L also reads the heads of its own layer; logits read everything."""
    if dst == "logits":
        return sources(model)
    if dst.startswith("a"):
        layer = int(dst[1:].split(".")[0])
        return [s for s in sources(model) if _layer_of(s)[0] < layer]
    layer = int(dst[1:])
    return [s for s in sources(model) if _layer_of(s) < (layer, 1)]


def destinations(model: HookedTransformer) -> list[str]:
    cfg = model.cfg
    names = []
    for layer in range(cfg.n_layers):
        names += [f"a{layer}.h{h}<{c}>" for h in range(cfg.n_heads) for c in "qkv"]
        if not cfg.attn_only:
            names.append(f"m{layer}")
    return [*names, "logits"]


def edge_names(model: HookedTransformer) -> list[str]:
    return [f"{s}->{d}" for d in destinations(model) for s in upstream(model, d)]


def _bias_before(model: HookedTransformer, dst: str) -> Tensor:
    """Sum of the attention output biases b_O (which belong to no node) in dst's input."""
    cfg = model.cfg
    if dst == "logits":
        layers = range(cfg.n_layers)
    elif dst.startswith("a"):
        layers = range(int(dst[1:].split(".")[0]))
    else:
        layers = range(int(dst[1:]) + 1)
    total = torch.zeros(cfg.d_model, dtype=cfg.dtype)
    for layer in layers:
        total = total + model.blocks[layer].attn.b_O
    return total


# ---- split-input runs -------------------------------------------------------------------------
def _split_copy(model: HookedTransformer) -> HookedTransformer:
    """A copy of `model` with TransformerLens's split inputs and per-head results on (the model
    itself is left alone: circuitdyn refuses models in split mode)."""
    split = copy.deepcopy(model)
    split.set_use_split_qkv_input(True)
    split.set_use_attn_result(True)
    if not model.cfg.attn_only:
        split.set_use_hook_mlp_in(True)
    return split


def _source_recorders(model: HookedTransformer, store: dict[str, Tensor]) -> list:
    def put(name: str, head: int | None = None):
        def hook(act: Tensor, hook) -> None:
            store[name] = act if head is None else act[:, :, head]

        return hook

    hooks = [("blocks.0.hook_resid_pre", put("input"))]
    for layer in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            hooks.append((f"blocks.{layer}.attn.hook_result", put(f"a{layer}.h{h}", h)))
        if not model.cfg.attn_only:
            hooks.append((f"blocks.{layer}.hook_mlp_out", put(f"m{layer}")))
    return hooks


def source_activations(model: HookedTransformer, tokens: Tensor) -> dict[str, Tensor]:
    """Every source's activation on `tokens`, ``name -> [batch, pos, d_model]`` (no grad)."""
    split = _split_copy(model)
    store: dict[str, Tensor] = {}
    with torch.no_grad(), split.hooks(fwd_hooks=_source_recorders(split, store)):
        split(tokens, return_type=None)
    return store


def mean_source_activations(
    model: HookedTransformer, tokens: Tensor, mask: Tensor
) -> dict[str, Tensor]:
    """Each source's mean activation over the real tokens (`mask`), ``name -> [d_model]``."""
    acts = source_activations(model, tokens)
    weight = mask.to(model.cfg.dtype)[..., None]
    return {name: (act * weight).sum((0, 1)) / weight.sum() for name, act in acts.items()}


def _destination_hooks(model: HookedTransformer) -> dict[str, tuple[str, int | None]]:
    """Hook name and head index of every destination's input in a split-input run."""
    hooks: dict[str, tuple[str, int | None]] = {}
    for layer in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            for c in "qkv":
                hooks[f"a{layer}.h{h}<{c}>"] = (f"blocks.{layer}.hook_{c}_input", h)
        if not model.cfg.attn_only:
            hooks[f"m{layer}"] = (f"blocks.{layer}.hook_mlp_in", None)
    hooks["logits"] = (f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", None)
    return hooks


def patched_logits(
    model: HookedTransformer,
    tokens: Tensor,
    ablated: Mapping[str, Tensor],
    weights: Mapping[str, float],
    mask: Tensor | None = None,
) -> Tensor:
    """Logits of a run in which edge ``s->d`` carries ``actual_s + w * (ablated_s - actual_s)``,
    w = ``weights.get(edge, 0)`` (1: the edge is ablated, 0: kept), at the positions of `mask`
    (default: all).

    Every destination's input is rebuilt from scratch as the sum over its upstream sources of
    what each edge carries, plus the b_O of the layers before it; `ablated` maps each source to
    a tensor broadcastable to ``[batch, pos, d_model]``. Outside `mask` the destination reads
    the residual stream of this run unchanged."""
    split = _split_copy(model)
    actual: dict[str, Tensor] = {}
    unknown = set(weights) - set(edge_names(model))
    if unknown:
        raise KeyError(f"not edges of this model: {sorted(unknown)[:5]}")

    def rebuilt(dst: str, like: Tensor) -> Tensor:
        total = _bias_before(split, dst).expand_as(like).clone()
        for src in upstream(split, dst):
            w = weights.get(f"{src}->{dst}", 0.0)
            total = total + actual[src] + w * (ablated[src] - actual[src])
        return total

    def replace(dst_names: list[str], head_dim: bool):
        def hook(act: Tensor, hook) -> Tensor:
            out = act.clone()
            for h, dst in enumerate(dst_names):
                target = out[:, :, h] if head_dim else out
                new = rebuilt(dst, target)
                if mask is not None:
                    new = torch.where(mask[..., None], new, target)
                target.copy_(new)
            return out

        return hook

    by_hook: dict[str, list[str]] = {}
    for dst, (hook_name, _) in _destination_hooks(split).items():
        by_hook.setdefault(hook_name, []).append(dst)
    fwd = _source_recorders(split, actual)
    for hook_name, dsts in by_hook.items():
        fwd.append((hook_name, replace(dsts, head_dim=hook_name.endswith("_input"))))
    with torch.no_grad(), split.hooks(fwd_hooks=fwd):
        return split(tokens)


def circuit_logits(
    model: HookedTransformer,
    tokens: Tensor,
    ablated: Mapping[str, Tensor],
    circuit_edges: set[str] | tuple[str, ...],
    mask: Tensor | None = None,
) -> Tensor:
    """Logits with every edge outside `circuit_edges` ablated."""
    kept = set(circuit_edges)
    weights = {edge: 1.0 for edge in edge_names(model) if edge not in kept}
    return patched_logits(model, tokens, ablated, weights, mask)


def split_hook_eap(
    model: HookedTransformer,
    batch,
    metric: Metric,
    ablated: Mapping[str, Tensor],
) -> dict[str, float]:
    """EAP the way EAP-IG computes it: per edge, the mean over examples of the sum over real
    positions of ``(ablated_s - clean_s) . d sum(metric) / d input_d``, with the gradient taken
    at the destination's own split input (so along that edge's path only)."""
    split = _split_copy(model)
    clean: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}

    def keep_input(hook_name: str):
        def hook(act: Tensor, hook) -> None:
            inputs[hook_name] = act

        return hook

    def leaf(act: Tensor, hook) -> Tensor:  # gradients stop here; no weight gradients
        return act.detach().requires_grad_(True)

    hook_names = sorted({name for name, _ in _destination_hooks(split).values()})
    fwd = [("blocks.0.hook_resid_pre", leaf), *_source_recorders(split, clean)]
    fwd += [(name, keep_input(name)) for name in hook_names]
    split.requires_grad_(False)
    with torch.enable_grad(), split.hooks(fwd_hooks=fwd):
        logits = split(batch.clean)
    total = metric(logits, batch).sum()
    grads = dict(
        zip(hook_names, torch.autograd.grad(total, [inputs[n] for n in hook_names]), strict=True)
    )
    mask = batch.attention_mask[..., None].to(split.cfg.dtype)
    scores = {}
    for dst, (hook_name, head) in _destination_hooks(split).items():
        grad = grads[hook_name] if head is None else grads[hook_name][:, :, head]
        for src in upstream(split, dst):
            delta = (ablated[src] - clean[src].detach()) * mask
            scores[f"{src}->{dst}"] = float((delta * grad).sum()) / batch.clean.shape[0]
    return scores
