"""Source activations of the graph, ablations, and the norm arithmetic both attribution and
patching need.

A *source activation* is what a source node adds to the residual stream: the embedding
(``blocks.0.hook_resid_pre``), a head's output ``z_h @ W_O[h]`` (without ``b_O``, which belongs to
no node and is never ablated), an MLP's output ``hook_mlp_out``. They are stored source-major,
``[n_src, batch, pos, d_model]``, so the sources upstream of a destination are a prefix view.

Nothing here runs the model with split q/k/v inputs: per-head inputs are recovered from the
shared norm (see `norm_vjp` and `norm`), which is what keeps attribution and patching cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.components import LayerNorm, LayerNormPre

from circuitdyn.graph import Graph
from circuitdyn.registry import Registry
from circuitdyn.tasks.base import Batch

Hook = tuple[str, Callable]


def work_dtype(model: HookedTransformer) -> torch.dtype:
    """Precision of activation differences and scores: float64 for float64 models, else float32
    (bf16/fp16 models are attributed in float32 so sums over positions do not lose precision)."""
    return torch.float64 if model.cfg.dtype == torch.float64 else torch.float32


def is_centering(norm: torch.nn.Module) -> bool:
    """LayerNorm subtracts the mean; RMSNorm does not."""
    return isinstance(norm, (LayerNorm, LayerNormPre))


def norm(
    module: torch.nn.Module, x: Float[Tensor, "... d_model"], *, affine: bool
) -> Float[Tensor, "... d_model"]:
    """The norm `module` applied to `x` of any leading shape, by the fused kernel: with
    `affine`, its full output (weight and bias applied); without, the value of its
    ``hook_normalized`` (before weight and bias). Computed in float32 at least, as
    TransformerLens does, and returned in that precision."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    weight = getattr(module, "w", None) if affine else None
    bias = getattr(module, "b", None) if affine else None
    weight = None if weight is None else weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if is_centering(module):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, module.eps)
    out = torch.nn.functional.rms_norm(x, x.shape[-1:], weight, module.eps)
    return out if bias is None else out + bias


def norm_vjp(
    centering: bool,
    normalized: Float[Tensor, "... d_model"],
    scale: Float[Tensor, "... 1"],
    grad: Float[Tensor, "... d_model"],
    out: Float[Tensor, "... d_model"] | None = None,
) -> Float[Tensor, "... d_model"]:
    """Vector-Jacobian product of x -> (x - mean) / sqrt(var + eps) (or its RMS form).

    `normalized` and `scale` are the norm's recorded `hook_normalized` and `hook_scale` at the
    input x; `grad` is the gradient with respect to `hook_normalized` (i.e. already multiplied by
    the norm's weight). Returns the gradient with respect to x,
    ``(grad - normalized * mean(grad * normalized) [- mean(grad)]) / scale``, written into `out`
    when given. Leading dimensions broadcast, so one recorded norm serves every head."""
    projection = (grad * normalized).mean(-1, keepdim=True)
    out = torch.addcmul(grad, normalized, projection, value=-1, out=out)
    if centering:
        out.sub_(grad.mean(-1, keepdim=True))
    return out.div_(scale)


def head_outputs(
    z: Float[Tensor, "batch pos n_heads d_head"], W_O: Float[Tensor, "n_heads d_head d_model"]
) -> Float[Tensor, "n_heads batch pos d_model"]:
    """Each head's contribution to the residual stream, head-major."""
    return einops.einsum(z, W_O, "b p h e, h e m -> h b p m")


def source_hooks(
    model: HookedTransformer, graph: Graph, write: Callable[[slice | int, Tensor], None]
) -> list[Hook]:
    """Forward hooks that pass every source activation of a run to `write(src_index, value)`,
    where value is ``[batch, pos, d_model]`` for one source or ``[n, batch, pos, d_model]`` for
    a slice of sources. The hooks do not change the run."""

    def writer(index: slice | int, transform: Callable[[Tensor], Tensor] | None = None):
        def hook(act: Tensor, hook) -> None:
            write(index, act if transform is None else transform(act))

        return hook

    hooks: list[Hook] = [("blocks.0.hook_resid_pre", writer(0))]
    # The weights are read when the hook runs, inside the block's forward: under FSDP the
    # block's parameters are gathered then, and sharded when the hooks are built.
    for layer in range(graph.n_layers):
        attn, mlp = model.blocks[layer].attn, getattr(model.blocks[layer], "mlp", None)
        to_heads = lambda z, attn=attn: head_outputs(z, attn.W_O)  # noqa: E731
        hooks.append((f"blocks.{layer}.attn.hook_z", writer(graph.head_src(layer), to_heads)))
        if graph.mlp_blocks > 1:
            to_blocks = lambda post, mlp=mlp: block_outputs(post, mlp.W_out, graph.mlp_blocks)  # noqa: E731
            hooks.append((f"blocks.{layer}.mlp.hook_post", writer(graph.mlp_src(layer), to_blocks)))
        elif graph.has_mlp:  # the whole MLP, b_out included
            to_one = lambda out: out[None]  # noqa: E731
            hooks.append((f"blocks.{layer}.hook_mlp_out", writer(graph.mlp_src(layer), to_one)))
    return hooks


def block_outputs(
    post: Float[Tensor, "batch pos d_mlp"], W_out: Float[Tensor, "d_mlp d_model"], n_blocks: int
) -> Float[Tensor, "n_blocks batch pos d_model"]:
    """Each MLP neuron block's contribution to the residual stream (without ``b_out``)."""
    blocks = post.reshape(*post.shape[:-1], n_blocks, -1)
    return einops.einsum(
        blocks, W_out.reshape(n_blocks, -1, W_out.shape[-1]), "b p n k, n k m -> n b p m"
    )


def difference_writer(
    diff: Float[Tensor, "n_src batch pos d_model"], mask: Bool[Tensor, "batch pos"] | None
) -> Callable[[slice | int, Tensor], None]:
    """A `source_hooks` writer that turns `diff`, filled with the ablated source activations,
    into ``ablated - actual`` for the run it hooks, zero at positions outside `mask` (an all-True
    mask costs nothing). Shared by attribution (the deltas) and patching (the corrections)."""
    pos_mask = None
    if mask is not None and not bool(mask.all()):
        pos_mask = mask.to(diff.device, diff.dtype)[..., None]

    def write(index: slice | int, value: Tensor) -> None:
        diff[index] -= value.detach()
        if pos_mask is not None:
            diff[index] *= pos_mask

    return write


def run_sources(
    model: HookedTransformer, graph: Graph, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "n_src batch pos d_model"]:
    """One no-grad forward pass of `tokens`, returning every source activation (float32)."""
    batch, pos = tokens.shape
    out = torch.empty(
        graph.n_src, batch, pos, model.cfg.d_model, device=tokens.device, dtype=work_dtype(model)
    )

    def write(index: slice | int, value: Tensor) -> None:
        out[index] = value

    with torch.no_grad(), model.hooks(fwd_hooks=source_hooks(model, graph, write)):
        # A right-padded batch needs no attention mask: with causal attention a real token only
        # attends to earlier positions, which are real. Padded positions are masked downstream.
        model(tokens, return_type=None)
    return out


def mean_activations(
    model: HookedTransformer,
    graph: Graph,
    reference: Iterable[Batch],
    *,
    per_position: bool = False,
) -> Float[Tensor, "n_src mean_pos d_model"]:
    """Mean source activations over the real (unpadded) tokens of a reference set.

    Returns ``[n_src, 1, d_model]`` (one mean over all positions) or, with `per_position`,
    ``[n_src, max_pos, d_model]``, the mean at each position over the examples long enough to
    have it. Used for mean ablation."""
    device = next(model.parameters()).device
    total: Tensor | None = None
    count: Tensor | None = None
    for batch in reference:
        batch = batch.to(device)
        acts = run_sources(model, graph, batch.clean)
        mask = batch.attention_mask.to(acts.dtype)  # [batch, pos]
        if per_position:
            summed = einops.einsum(acts, mask, "s b p m, b p -> s p m")
            n = mask.sum(0)[:, None]  # [pos, 1]
        else:
            summed = einops.einsum(acts, mask, "s b p m, b p -> s m")[:, None]
            n = mask.sum().reshape(1, 1)
        if total is None:
            total, count = summed, n
        else:
            if per_position and summed.shape[1] != total.shape[1]:
                width = max(summed.shape[1], total.shape[1])
                summed, n = _pad_pos(summed, width), _pad_pos(n[None], width)[0]
                total, count = _pad_pos(total, width), _pad_pos(count[None], width)[0]
            total, count = total + summed, count + n
    if total is None or count is None:
        raise ValueError("mean ablation needs a non-empty reference set (got no batches)")
    return total / count.clamp(min=1)[None]


def _pad_pos(x: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1]))


def _corrupted_sources(
    model: HookedTransformer, graph: Graph, batch: Batch, means: Tensor | None
) -> Float[Tensor, "n_src batch pos d_model"]:
    if batch.corrupted is None:
        raise ValueError(
            "corrupted ablation needs corrupted tokens: the batch has none; use a task with "
            "corrupted prompts or ablation='mean' / 'zero'"
        )
    return run_sources(model, graph, batch.corrupted)


def _zero_sources(
    model: HookedTransformer, graph: Graph, batch: Batch, means: Tensor | None
) -> Float[Tensor, "n_src batch pos d_model"]:
    batch_size, pos = batch.clean.shape
    return torch.zeros(
        graph.n_src,
        batch_size,
        pos,
        model.cfg.d_model,
        device=batch.clean.device,
        dtype=work_dtype(model),
    )


def _mean_sources(
    model: HookedTransformer, graph: Graph, batch: Batch, means: Tensor | None
) -> Float[Tensor, "n_src batch pos d_model"]:
    batch_size, pos = batch.clean.shape
    if means is None:
        raise ValueError("mean ablation needs mean activations: pass a reference set")
    if means.shape[0] != graph.n_src or means.shape[-1] != model.cfg.d_model:
        raise ValueError(f"means must be [n_src, pos, d_model], got {tuple(means.shape)}")
    if means.shape[1] == 1:
        return means[:, None].expand(-1, batch_size, pos, -1).to(batch.clean.device).contiguous()
    if means.shape[1] < pos:
        raise ValueError(
            f"per-position means cover {means.shape[1]} positions but the batch has {pos}; "
            "use a reference set with sequences at least as long"
        )
    return means[:, None, :pos].expand(-1, batch_size, -1, -1).to(batch.clean.device).contiguous()


@dataclass(frozen=True)
class AblationRule:
    """What an edge outside the circuit carries instead of its clean source activation:
    ``values(model, graph, batch, means) -> [n_src, batch, pos, d_model]``. `needs_means`: the
    rule reads mean activations (`mean_activations` over a reference set); `needs_corrupted`: it
    reads the batch's corrupted twins."""

    values: Callable[[HookedTransformer, Graph, Batch, Tensor | None], Tensor]
    needs_means: bool = False
    needs_corrupted: bool = False


ABLATIONS: Registry[AblationRule] = Registry("ablation")
ABLATIONS.add(
    "corrupted",
    AblationRule(_corrupted_sources, needs_corrupted=True),
    help="the source's activation on the corrupted twin of the prompt",
)
ABLATIONS.add(
    "mean",
    AblationRule(_mean_sources, needs_means=True),
    help="the source's mean activation over a reference set (per position or not)",
)
ABLATIONS.add("zero", AblationRule(_zero_sources), help="nothing (zero)")


def ablated_sources(
    model: HookedTransformer,
    graph: Graph,
    batch: Batch,
    ablation: str,
    means: Float[Tensor, "n_src mean_pos d_model"] | None = None,
) -> Float[Tensor, "n_src batch pos d_model"]:
    """What each source carries when ablated (an `ABLATIONS` name), for every example and
    position of `batch`."""
    return ABLATIONS[ablation].values(model, graph, batch, means)


def position_mask(
    batch: Batch, positions: Bool[Tensor, "batch pos"] | None
) -> Bool[Tensor, "batch pos"]:
    """The positions whose activations count: real tokens, optionally restricted further."""
    mask = batch.attention_mask
    if positions is not None:
        if positions.shape != mask.shape:
            raise ValueError(
                f"positions must be a [batch, pos] bool mask like the tokens {tuple(mask.shape)}, "
                f"got {tuple(positions.shape)}"
            )
        mask = mask & positions.to(mask.device, torch.bool)
    return mask
