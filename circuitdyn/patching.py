"""Edge patching: run the model with chosen edges carrying their *ablated* source activation.

Semantics (as in EAP-IG / MIB): the input of destination d is

    x_d = residual_d + sum over sources s upstream of d of  w[s, d] * (ablated_s - actual_s)

where ``residual_d`` is the residual stream the destination reads in this (patched) run,
``actual_s`` is what source s outputs in this run, and ``w`` is the ablation weight of the edge
(1 = edge removed, 0 = edge kept; fractions interpolate). A circuit keeps its edges (w = 0) and
ablates the rest (w = 1). With w = 0 everywhere the run is the clean run, bit for bit; with
w = 1 everywhere every destination reads the ablated residual stream, so under corrupted
ablation the run reproduces the corrupted run.

A head's q, k and v inputs are separate destinations. They are rebuilt only in layers where
some edge into them is ablated: one matrix product of the upstream differences per layer gives
every head's q, k and v input, ``ln1`` (fused kernel) and ``W_Q / W_K / W_V`` (batched over
heads) turn them into q, k and v. The model never runs with split q/k/v inputs.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from circuitdyn.activations import Hook, difference_writer, norm, source_hooks
from circuitdyn.graph import QKV, Graph


def patch_hooks(
    model: HookedTransformer,
    graph: Graph,
    ablated: Float[Tensor, "n_src batch pos d_model"],
    weights: Float[Tensor, "n_src n_dst"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> list[Hook]:
    """Forward hooks that make one run of the model an edge-patched run (see module docstring).

    `ablated` are the ablated source activations for the batch; `weights` the per-edge ablation
    weights (entries of invalid edges are ignored); `mask`, if given, limits patching to those
    positions (e.g. real tokens, or the positions attribution is restricted to)."""
    graph.check_shape(weights)
    weights = (weights * graph.edge_valid.to(weights.device)).to(ablated.device, ablated.dtype)
    # diff[s] = ablated_s - actual_s, filled in as each source is computed during the run.
    diff = ablated.clone()
    n_src, batch, pos, d_model = diff.shape
    flat_diff = diff.reshape(n_src, -1)
    write = difference_writer(diff, mask)  # positions outside `mask` are never patched
    resid: dict[str, Tensor] = {}
    n_heads = graph.n_heads

    def correction(n_upstream: int, columns: slice | int) -> Tensor | None:
        """sum_s w[s, d] * diff_s over upstream sources: [(n_dst,) batch, pos, d_model].
        One product over the contiguous [s, batch * pos * d_model] view: no permuted copies."""
        w = weights[:n_upstream, columns]
        if not bool(w.any()):
            return None
        if w.ndim == 1:
            return (w @ flat_diff[:n_upstream]).view(batch, pos, d_model)
        return (w.T @ flat_diff[:n_upstream]).view(-1, batch, pos, d_model)

    def keep(name: str):
        def hook(act: Tensor, hook) -> None:
            resid[name] = act

        return hook

    def replace_input(key: str, module: torch.nn.Module, n_upstream: int, column: int):
        """Hook on a norm's hook_normalized feeding one destination (an MLP or the logits)."""

        def hook(act: Tensor, hook) -> Tensor:
            delta = correction(n_upstream, column)
            if delta is None:
                return act
            return norm(module, resid[key] + delta, affine=False).to(act.dtype)

        return hook

    hooks: list[Hook] = source_hooks(model, graph, write)
    for layer in range(graph.n_layers):
        block = model.blocks[layer]
        hooks.append((f"blocks.{layer}.hook_resid_pre", keep(f"pre{layer}")))
        qkv = graph.qkv_dst(layer)
        n_upstream = graph.n_upstream_attn(layer)
        touched = weights[:n_upstream, qkv].any(0).reshape(3, n_heads)  # [q/k/v, head]
        if not bool(touched.any()):
            continue
        cache: dict[str, Tensor] = {}

        def head_inputs(
            layer=layer, block=block, qkv=qkv, n_upstream=n_upstream, cache=cache
        ) -> Tensor:
            """ln1 of every head's q, k and v input, [3 * n_heads, batch, pos, d_model]; built
            at the first of the layer's q/k/v hooks, shared by the other two."""
            if "x" not in cache:
                x = correction(n_upstream, qkv).add_(resid[f"pre{layer}"])  # in place: no copy
                cache["x"] = norm(block.ln1, x, affine=True)
            return cache["x"]

        for i, name in enumerate(QKV):

            def rebuild(
                act: Tensor, hook, block=block, name=name, i=i, inputs=head_inputs, rows=touched[i]
            ) -> Tensor:
                if not bool(rows.any()):
                    return act
                W = getattr(block.attn, f"W_{name.upper()}")  # [head, d_model, d_head]
                b = getattr(block.attn, f"b_{name.upper()}")  # [head, d_head]
                x = inputs()[i * n_heads : (i + 1) * n_heads].to(W.dtype)
                new = torch.bmm(x.reshape(n_heads, batch * pos, d_model), W)
                new = new.view(n_heads, batch, pos, -1).permute(1, 2, 0, 3) + b
                if bool(rows.all()):
                    return new.to(act.dtype)
                return torch.where(rows[:, None].to(act.device), new.to(act.dtype), act)

            hooks.append((f"blocks.{layer}.attn.hook_{name}", rebuild))
    for layer in range(graph.n_layers if graph.has_mlp else 0):
        hooks.append((f"blocks.{layer}.hook_resid_mid", keep(f"mid{layer}")))
        columns, ln2 = graph.mlp_dst(layer), model.blocks[layer].ln2
        if graph.mlp_blocks == 1:  # the MLP reads one input: rebuild ln2's output
            rebuild = replace_input(f"mid{layer}", ln2, graph.n_upstream_mlp(layer), columns.start)
            hooks.append((f"blocks.{layer}.ln2.hook_normalized", rebuild))
            continue
        touched = weights[: graph.n_upstream_mlp(layer), columns].any(0)  # [block]
        if not bool(touched.any()):
            continue

        def rebuild_blocks(
            act: Tensor, hook, layer=layer, columns=columns, ln2=ln2, touched=touched
        ) -> Tensor:
            """Each block with ablated input edges gets its own input: its pre-activations are
            recomputed from ln2 of (residual + its correction) through its W_in columns."""
            mlp = model.blocks[layer].mlp
            x = correction(graph.n_upstream_mlp(layer), columns).add_(resid[f"mid{layer}"])
            x = norm(ln2, x, affine=True).to(mlp.W_in.dtype)  # [block, batch, pos, d_model]
            n_blocks = graph.mlp_blocks
            W = mlp.W_in.reshape(d_model, n_blocks, -1).transpose(0, 1)  # [block, d_model, k]
            new = torch.bmm(x.reshape(n_blocks, batch * pos, d_model), W)
            new = new.view(n_blocks, batch, pos, -1) + mlp.b_in.reshape(n_blocks, 1, 1, -1)
            old = act.reshape(batch, pos, n_blocks, -1).permute(2, 0, 1, 3)
            merged = torch.where(
                touched[:, None, None, None].to(act.device), new.to(act.dtype), old
            )
            return merged.permute(1, 2, 0, 3).reshape(act.shape)

        hooks.append((f"blocks.{layer}.mlp.hook_pre", rebuild_blocks))
    hooks.append((f"blocks.{graph.n_layers - 1}.hook_resid_post", keep("final")))
    hooks.append(
        (
            "ln_final.hook_normalized",
            replace_input("final", model.ln_final, n_src, graph.logits_dst),
        )
    )
    return hooks


def run_patched(
    model: HookedTransformer,
    graph: Graph,
    tokens: Int[Tensor, "batch pos"],
    ablated: Float[Tensor, "n_src batch pos d_model"],
    weights: Float[Tensor, "n_src n_dst"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of one edge-patched run of `tokens` (no gradients). Costs one forward pass plus,
    in each layer with ablated edges into it, the rebuilt head/MLP inputs."""
    with torch.no_grad(), model.hooks(fwd_hooks=patch_hooks(model, graph, ablated, weights, mask)):
        return model(tokens)
