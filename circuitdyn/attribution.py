"""Edge attribution: EAP, EAP-IG and exact activation patching, with corrupted, mean or zero
ablation.

Score of edge (s -> d), summed over positions and averaged over examples:

* ``eap``:    (a_s(ablated) - a_s(clean)) . dm/dx_d, the gradient at the clean input.
* ``eap-ig``: the same difference times the gradient averaged over `steps` points on the
  straight line from the ablated input embedding to the clean one (integrated gradients on the
  input; midpoint rule, alpha = (k + 1/2) / steps; EAP-IG's reference code uses the left
  rule k / steps, which converges to the same integral).
* ``exact``:  m(run with only this edge ablated) - m(clean run): one patched forward pass per
  edge (see `circuitdyn.patching`). The ground truth EAP approximates to first order.

How the gradient reaches each destination without split q/k/v inputs: the gradient of the
metric with respect to head h's query input is the norm's vector-Jacobian product of
``(dm/dq_h) @ W_Q[h]^T`` (times the norm weight), taken in a gradient hook on ``hook_q``; the same
for keys and values, for the MLP input through ``ln2`` and for ``logits`` through ``ln_final``.
Each hook multiplies the gradient by the activation differences of the upstream sources at
once (one matrix product per layer), so one EAP pass costs a corrupted forward, a clean forward
and a backward to the activations (no weight gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm import tqdm
from transformer_lens import HookedTransformer

from circuitdyn.activations import (
    ABLATIONS,
    Hook,
    ablated_sources,
    difference_writer,
    is_centering,
    mean_activations,
    norm_vjp,
    position_mask,
    source_hooks,
    work_dtype,
)
from circuitdyn.graph import QKV, Graph
from circuitdyn.memory import examples_per_chunk
from circuitdyn.patching import run_patched
from circuitdyn.registry import Registry
from circuitdyn.scores import Scores
from circuitdyn.tasks.base import Batch, Metric, check_tokens, checked_metric, logit_diff

PositionFilter = Callable[[Batch], Bool[Tensor, "batch pos"]]


def gradient_hooks(
    model: HookedTransformer,
    graph: Graph,
    delta: Float[Tensor, "n_src batch pos d_model"],
    scores: Float[Tensor, "n_src n_dst"],
    weight: float = 1.0,
    active: Callable[[], bool] = lambda: True,
) -> list[Hook]:
    """Forward hooks that, once the run's output is back-propagated, add
    ``weight * sum_{batch, pos} delta_s . dm/dx_d`` to ``scores[s, d]`` for every real edge.

    `delta` must hold the (masked) activation differences of every source before the backward
    pass starts. The gradients are caught by tensor hooks registered during the forward pass;
    they live and die with the run's autograd graph, so nothing outlives the run. `active` is
    asked at each gradient: a run whose graph is back-propagated twice (metric, then training
    loss) turns it off before the second pass.

    Layout: per-head input gradients are built head-major, ``[3 * n_heads, batch * pos,
    d_model]`` per layer (q, k, v), so that one matrix product with the upstream prefix of
    `delta` scores all of a layer's head inputs and no large tensor is permuted."""
    n_src, batch, pos, d_model = delta.shape
    n_heads, tokens = graph.n_heads, batch * pos
    flat_delta = delta.reshape(n_src, tokens * d_model)
    norms: dict[str, dict[str, Tensor]] = {}  # norm -> {"normalized", "scale"} of this run
    qkv_grads: dict[int, Tensor] = {}  # layer -> [3 * n_heads, tokens, d_model]
    qkv_seen: dict[int, int] = {}

    def record(key: str, part: str):
        def hook(act: Tensor, hook) -> None:
            norms.setdefault(key, {})[part] = act.detach().reshape(tokens, -1)

        return hook

    def input_grad(key: str, norm, grad_normed: Tensor, out: Tensor | None = None) -> Tensor:
        """Gradient w.r.t. the norm's input (shape of `grad_normed`, [..., tokens, d_model]), in
        `delta`'s dtype (a 16-bit `delta` meets the norm's float32 statistics here)."""
        stats = norms[key]
        grad = norm_vjp(is_centering(norm), stats["normalized"], stats["scale"], grad_normed, out)
        return grad.to(delta.dtype)

    hooks: list[Hook] = []
    for layer in range(graph.n_layers):
        block = model.blocks[layer]
        hooks += [
            (f"blocks.{layer}.ln1.hook_normalized", record(f"ln1.{layer}", "normalized")),
            (f"blocks.{layer}.ln1.hook_scale", record(f"ln1.{layer}", "scale")),
        ]

        def on_qkv_grad(grad: Tensor, layer: int, index: int, block=block) -> None:
            if not active():
                return
            name = QKV[index].upper()
            W = getattr(block.attn, f"W_{name}").to(delta.dtype)  # [head, d_model, d_head]
            if hasattr(block.ln1, "w"):  # fold the norm's weight into the projection
                W = W * block.ln1.w.to(delta.dtype)[:, None]
            g = grad.to(delta.dtype).permute(2, 0, 1, 3).reshape(n_heads, tokens, -1)
            grad_normed = torch.bmm(g, W.transpose(1, 2))  # [head, tokens, d_model]
            if layer not in qkv_grads:
                qkv_grads[layer] = delta.new_empty(3 * n_heads, tokens, d_model)
            rows = qkv_grads[layer][index * n_heads : (index + 1) * n_heads]
            input_grad(f"ln1.{layer}", block.ln1, grad_normed, out=rows)
            qkv_seen[layer] = qkv_seen.get(layer, 0) + 1
            if qkv_seen[layer] == 3:  # one product per layer: read the upstream deltas once
                stacked = qkv_grads.pop(layer).reshape(3 * n_heads, -1)
                n = graph.n_upstream_attn(layer)
                scores[:n, graph.qkv_dst(layer)] += weight * (flat_delta[:n] @ stacked.T)

        for index, name in enumerate(QKV):

            def register(act: Tensor, hook, layer=layer, index=index, fn=on_qkv_grad) -> None:
                if act.requires_grad:
                    act.register_hook(lambda g: fn(g, layer, index))

            hooks.append((f"blocks.{layer}.attn.hook_{name}", register))

        if graph.mlp_blocks > 1:
            key = f"ln2.{layer}"
            hooks.append((f"blocks.{layer}.ln2.hook_scale", record(key, "scale")))
            hooks.append((f"blocks.{layer}.ln2.hook_normalized", record(key, "normalized")))

            def on_pre_grad(grad: Tensor, layer: int, block=block, key=key) -> None:
                if not active():
                    return
                n_blocks = graph.mlp_blocks
                W = block.mlp.W_in.to(delta.dtype)  # [d_model, d_mlp]
                if hasattr(block.ln2, "w"):  # fold the norm's weight into the projection
                    W = W * block.ln2.w.to(delta.dtype)[:, None]
                W = W.reshape(d_model, n_blocks, -1).permute(1, 2, 0)  # [block, k, d_model]
                g = grad.to(delta.dtype).reshape(tokens, n_blocks, -1).transpose(0, 1)
                grad_normed = torch.bmm(g, W)  # [block, tokens, d_model]
                stacked = input_grad(key, block.ln2, grad_normed).reshape(n_blocks, -1)
                n = graph.n_upstream_mlp(layer)
                scores[:n, graph.mlp_dst(layer)] += weight * (flat_delta[:n] @ stacked.T)

            def register_pre(act: Tensor, hook, layer=layer, fn=on_pre_grad) -> None:
                if act.requires_grad:
                    act.register_hook(lambda g: fn(g, layer))

            hooks.append((f"blocks.{layer}.mlp.hook_pre", register_pre))
        elif graph.has_mlp:
            key = f"ln2.{layer}"
            hooks.append((f"blocks.{layer}.ln2.hook_scale", record(key, "scale")))
            hooks.append(
                (
                    f"blocks.{layer}.ln2.hook_normalized",
                    _single_destination_hook(
                        record(key, "normalized"),
                        lambda g, key=key, norm=block.ln2: input_grad(key, norm, g),
                        graph.n_upstream_mlp(layer),
                        graph.mlp_dst(layer).start,
                        flat_delta,
                        scores,
                        weight,
                        active,
                    ),
                )
            )

    hooks.append(("ln_final.hook_scale", record("ln_final", "scale")))
    hooks.append(
        (
            "ln_final.hook_normalized",
            _single_destination_hook(
                record("ln_final", "normalized"),
                lambda g: input_grad("ln_final", model.ln_final, g),
                graph.n_src,
                graph.logits_dst,
                flat_delta,
                scores,
                weight,
                active,
            ),
        )
    )
    return hooks


def _single_destination_hook(
    record: Callable,
    to_input_grad: Callable[[Tensor], Tensor],
    n_upstream: int,
    column: int,
    flat_delta: Tensor,
    scores: Tensor,
    weight: float,
    active: Callable[[], bool],
) -> Callable:
    """Hook on a norm's ``hook_normalized`` whose output feeds one destination (an MLP or the
    logits): records the norm and scores the upstream edges when the gradient arrives."""

    def hook(act: Tensor, hook) -> None:
        record(act, hook)
        if not act.requires_grad:
            return

        def on_grad(grad: Tensor) -> None:
            if active():
                grad_in = to_input_grad(grad.to(flat_delta.dtype).reshape(-1, grad.shape[-1]))
                scores[:n_upstream, column] += weight * (
                    flat_delta[:n_upstream] @ grad_in.reshape(-1)
                )

        act.register_hook(on_grad)

    return hook


def _leaf_input_hook(store: dict[str, Tensor], replace_with: Tensor | None = None) -> Hook:
    """Make the embedding a leaf that requires grad, so the backward pass stops there and computes
    no weight gradients; optionally replace it (integrated-gradient interpolation)."""

    def hook(act: Tensor, hook) -> Tensor:
        value = act if replace_with is None else replace_with
        leaf = value.detach().requires_grad_(True)
        store["input"] = leaf
        return leaf

    return ("blocks.0.hook_resid_pre", hook)


def _metric_sum(metric: Metric, logits: Tensor, batch: Batch) -> Tensor:
    return checked_metric(metric(logits, batch), batch).sum()


def attribute(
    model: HookedTransformer,
    graph: Graph,
    data: Iterable[Batch],
    metric: Metric = logit_diff,
    *,
    method: str = "eap",
    ablation: str = "corrupted",
    steps: int = 5,
    reference: Iterable[Batch] | None = None,
    per_position: bool = False,
    means: Float[Tensor, "n_src mean_pos d_model"] | None = None,
    positions: PositionFilter | None = None,
    progress: bool = False,
    memory_budget: int | None = None,
    diff_dtype: torch.dtype | None = None,
) -> Scores:
    """Score every edge of `graph` for `metric` over the batches of `data`.

    Args:
        model: any supported HookedTransformer, on any device and dtype.
        graph: `Graph.from_model(model)`.
        data: batches (`Batch`); right-padded; padded positions never contribute.
        metric: ``metric(logits, batch) -> [batch]``, larger = more of the behaviour.
        method: a `METHODS` name: ``eap``, ``eap-ig`` or ``exact``.
        ablation: an `ABLATIONS` name: ``corrupted`` (needs ``batch.corrupted``), ``mean``
            (needs `reference` or `means`) or ``zero``.
        steps: integrated-gradient steps for ``eap-ig``.
        reference: batches whose mean source activations define mean ablation.
        per_position: mean ablation per position instead of one mean over all positions.
        means: precomputed mean activations (`mean_activations`) instead of `reference`.
        positions: optional ``batch -> [batch, pos]`` bool mask restricting the positions whose
            activations are ablated (and summed over).
        memory_budget: bytes the attribution's peak may take, the model's parameters included
            (None: no limit). Each batch is scored in chunks of as many examples as
            `circuitdyn.memory.examples_per_chunk` estimates to fit; the scores are the same
            (sums over examples). ValueError when not even one example fits.
        diff_dtype: dtype of the stored activation differences and per-layer gradient buffers,
            e.g. ``torch.bfloat16`` (default: `work_dtype(model)`, float32 or float64); the
            scores still accumulate in float32 (float64 for float64 differences).

    Returns `Scores` (float32, CPU): mean over examples of the per-example score.
    """
    score_batch = METHODS[method]
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = next(model.parameters()).device
    if ABLATIONS[ablation].needs_means and means is None:
        if reference is None:
            raise ValueError(
                f"ablation={ablation!r} needs reference=<batches> (or means=) to average over"
            )
        means = mean_activations(model, graph, reference, per_position=per_position)
    diff_dtype = diff_dtype or work_dtype(model)
    if not diff_dtype.is_floating_point:
        raise ValueError(f"diff_dtype must be a floating-point dtype, got {diff_dtype}")
    scores = torch.zeros(graph.n_src, graph.n_dst, device=device, dtype=_accumulation(diff_dtype))
    n_examples = 0
    batches = tqdm(data, desc=f"attribute ({method})", disable=not progress)
    for batch in batches:
        if not isinstance(batch, Batch):
            raise TypeError(f"data must yield circuitdyn Batch objects, got {type(batch).__name__}")
        batch = batch.to(device)
        check_tokens(batch, model.cfg.d_vocab, model.cfg.n_ctx)
        mask = position_mask(batch, None if positions is None else positions(batch))
        chunk = batch.size
        if memory_budget is not None:
            options = dict(method=method, ablation=ablation)
            pos = batch.clean.shape[1]
            chunk = examples_per_chunk(model, graph, pos, memory_budget, diff_dtype, **options)
        for start in range(0, batch.size, chunk):
            rows = slice(start, start + chunk)
            part = batch if chunk >= batch.size else batch.select(rows)
            ablated = _ablated_sources(model, graph, part, ablation, means, diff_dtype)
            job = BatchJob(model, graph, part, metric, ablated, mask[rows], steps, progress)
            scores += score_batch(job)
            del ablated, job  # free this chunk's differences before the next one's are built
        n_examples += batch.size
    if n_examples == 0:
        raise ValueError("attribute() got no data: the iterable of batches was empty")
    meta: dict[str, Any] = {
        "method": method,
        "ablation": ablation,
        "n_examples": n_examples,
        "d_model": model.cfg.d_model,  # EAP-IG's graph files need it
        "steps": steps if method == "eap-ig" else None,
        "per_position": per_position if ABLATIONS[ablation].needs_means else None,
        "diff_dtype": str(diff_dtype).removeprefix("torch."),  # the stored differences
        "memory_budget": memory_budget,  # bytes (None: no limit); chunks give the same scores
    }
    return Scores(graph, scores / n_examples, meta)


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """Scores accumulate in float32 at least (float64 for float64 differences)."""
    return torch.promote_types(dtype, torch.float32)


def _ablated_sources(
    model: HookedTransformer,
    graph: Graph,
    batch: Batch,
    ablation: str,
    means: Tensor | None,
    dtype: torch.dtype,
) -> Float[Tensor, "n_src batch pos d_model"]:
    """`ablated_sources` in `dtype`. Corrupted ablation writes each source straight into a
    `dtype` tensor (no float32 copy of the whole tensor); mean ablation casts the means first."""
    if dtype == work_dtype(model):
        return ablated_sources(model, graph, batch, ablation, means)
    if ABLATIONS[ablation].needs_corrupted and batch.corrupted is not None:
        size, pos = batch.corrupted.shape
        out = torch.empty(
            graph.n_src, size, pos, model.cfg.d_model, device=batch.clean.device, dtype=dtype
        )

        def write(index: slice | int, value: Tensor) -> None:
            out[index] = value

        with torch.no_grad(), model.hooks(fwd_hooks=source_hooks(model, graph, write)):
            model(batch.corrupted, return_type=None)
        return out
    means = None if means is None else means.to(dtype)
    return ablated_sources(model, graph, batch, ablation, means).to(dtype)


def eap_with_loss(
    model: HookedTransformer,
    graph: Graph,
    batch: Batch,
    metric: Metric,
    loss_fn: Callable[[Tensor, Batch], Tensor],
    ablated: Float[Tensor, "n_src batch pos d_model"],
    positions: Bool[Tensor, "batch pos"] | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Float[Tensor, "n_src n_dst"], Float[Tensor, "batch pos d_vocab"], Tensor]:
    """EAP scores and a training loss from one shared clean forward pass (circuit-tuning).

    Runs the clean forward once with the EAP hooks, back-propagates the metric to the
    activations only (no weight gradients), then returns ``(scores, logits, loss)`` where
    `scores` are *summed* over the batch's examples and `loss` still has its autograd graph:
    ``loss.backward()`` then yields the parameter gradients. `ablated` are the ablated source
    activations (`ablated_sources`); `ablated` is consumed (overwritten with the differences).
    `forward` runs the clean pass instead of ``model(tokens)``: a `DistributedDataParallel`
    wrapper of `model`, so that ``loss.backward()`` all-reduces the gradients."""
    mask = position_mask(batch, positions)
    scores = ablated.new_zeros(graph.n_src, graph.n_dst)
    delta = ablated
    write = difference_writer(delta, mask)
    state = {"metric_pass": True}

    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook) -> None:
        captured["input"] = act

    hooks = [*source_hooks(model, graph, write), ("blocks.0.hook_resid_pre", capture)]
    hooks += gradient_hooks(model, graph, delta, scores, active=lambda: state["metric_pass"])
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = (forward or model)(batch.clean)
    if not captured["input"].requires_grad:
        raise ValueError(
            "eap_with_loss needs a model whose parameters require grad (it trains them)"
        )
    values = checked_metric(metric(logits, batch), batch)
    torch.autograd.grad(values.sum(), captured["input"], retain_graph=True)
    state["metric_pass"] = False
    return scores, logits, loss_fn(logits, batch)


@dataclass(frozen=True)
class BatchJob:
    """What an attribution method scores: one batch of `model`'s `graph` for `metric`, with the
    ablated source activations ``ablated`` [n_src, batch, pos, d_model] (the method may
    overwrite them), the positions that count ``mask`` [batch, pos], and the options."""

    model: HookedTransformer
    graph: Graph
    batch: Batch
    metric: Metric
    ablated: Tensor
    mask: Tensor
    steps: int = 5  # integrated-gradient steps
    progress: bool = False


def _eap_batch(job: BatchJob) -> Tensor:
    """Summed (not averaged) EAP scores of one batch: the gradient at the clean input."""
    model, graph, batch, metric, ablated = job.model, job.graph, job.batch, job.metric, job.ablated
    scores = ablated.new_zeros(graph.n_src, graph.n_dst, dtype=_accumulation(ablated.dtype))
    delta = ablated  # becomes ablated - clean, masked, as the clean run writes each source
    leaf: dict[str, Tensor] = {}
    hooks = [
        *source_hooks(model, graph, difference_writer(delta, job.mask)),
        _leaf_input_hook(leaf),
    ]
    hooks += gradient_hooks(model, graph, delta, scores)
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(batch.clean)
        torch.autograd.grad(_metric_sum(metric, logits, batch), leaf["input"])
    return scores


def _eap_ig_batch(job: BatchJob) -> Tensor:
    """Summed EAP-IG scores of one batch: the clean run fixes the differences; each of `steps`
    passes back-propagates from an input interpolated between the ablated and the clean one."""
    model, graph, batch, metric, ablated = job.model, job.graph, job.batch, job.metric, job.ablated
    scores = ablated.new_zeros(graph.n_src, graph.n_dst, dtype=_accumulation(ablated.dtype))
    delta = ablated
    write = difference_writer(delta, job.mask)
    leaf: dict[str, Tensor] = {}

    def write_and_keep_input(index: slice | int, value: Tensor) -> None:
        if index == 0:
            leaf["clean_input"] = value.detach().clone()
        write(index, value)

    with torch.no_grad(), model.hooks(fwd_hooks=source_hooks(model, graph, write_and_keep_input)):
        model(batch.clean, return_type=None)
    clean_input = leaf["clean_input"]
    # delta[0] is zero outside the mask, so positions that are not ablated stay clean.
    ablated_input = clean_input + delta[0].to(clean_input.dtype)
    steps = job.steps
    for k in range(steps):
        alpha = (k + 0.5) / steps
        interpolated = ablated_input + alpha * (clean_input - ablated_input)
        hooks = [_leaf_input_hook(leaf, interpolated)]
        hooks += gradient_hooks(model, graph, delta, scores, weight=1.0 / steps)
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(batch.clean)
            torch.autograd.grad(_metric_sum(metric, logits, batch), leaf["input"])
    return scores


def _exact_batch(job: BatchJob) -> Tensor:
    """Summed exact scores of one batch: one patched forward pass per real edge."""
    model, graph, batch, metric, ablated = job.model, job.graph, job.batch, job.metric, job.ablated
    scores = ablated.new_zeros(graph.n_src, graph.n_dst, dtype=_accumulation(ablated.dtype))
    with torch.no_grad():
        clean = _metric_sum(metric, model(batch.clean), batch)
        weights = ablated.new_zeros(graph.n_src, graph.n_dst)
        edges = graph.edge_valid.nonzero().tolist()
        for i, j in tqdm(edges, desc="exact patching", disable=not job.progress, leave=False):
            weights[i, j] = 1.0
            logits = run_patched(model, graph, batch.clean, ablated, weights, job.mask)
            scores[i, j] = _metric_sum(metric, logits, batch) - clean
            weights[i, j] = 0.0
    return scores


BatchScorer = Callable[[BatchJob], Tensor]
"""An attribution method: the scores ``[n_src, n_dst]`` of one batch, summed over its examples."""

METHODS: Registry[BatchScorer] = Registry("attribution method")
METHODS.add("eap", _eap_batch, help="gradient at the clean input (one backward pass)")
METHODS.add(
    "eap-ig",
    _eap_ig_batch,
    help="gradient averaged over --ig-steps inputs between ablated and clean (midpoint rule)",
)
METHODS.add("exact", _exact_batch, help="one patched forward pass per edge (ground truth)")

__all__ = ["METHODS", "BatchJob", "BatchScorer", "attribute", "eap_with_loss", "gradient_hooks"]
