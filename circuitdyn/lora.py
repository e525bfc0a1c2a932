"""LoRA adapters on a HookedTransformer's weights, by `torch.nn.utils.parametrize`.

Each adapted weight ``W`` (stored as TransformerLens stores it, ``[..., d_in, d_out]``, applied as
``x @ W``) becomes ``W + B @ A`` with ``B: [..., d_in, r]`` and ``A: [..., r, d_out]``. The
leading axis of the per-head weights is kept, so every head has its own rank-r adapter:

* ``attn.W_Q``, ``W_K``, ``W_V`` ``[n_heads, d_model, d_head]``: B ``[n_heads, d_model, r]``,
  A ``[n_heads, r, d_head]``;
* ``attn.W_O`` ``[n_heads, d_head, d_model]``: B ``[n_heads, d_head, r]``, A ``[n_heads, r, d_model]``;
* ``mlp.W_in`` ``[d_model, d_mlp]``: B ``[d_model, r]``, A ``[r, d_mlp]``; ``mlp.W_out``
  ``[d_mlp, d_model]``: B ``[d_mlp, r]``, A ``[r, d_model]``

(grouped-query models: ``attn._W_K`` / ``_W_V`` ``[n_kv_heads, ...]``, one adapter per stored
key/value head). ``B`` starts at zero, so the adapted model starts as the base model; ``A`` is
drawn uniformly in ``±1 / sqrt(d_in)`` (PEFT's default bound for its random factor) from a
generator seeded with `seed` (the global RNG is untouched). There is no ``alpha / r`` scaling:
the effective weight is exactly ``W + B @ A``.

The parametrization is permanent while the adapters are on: ``block.attn.W_Q`` *is* the adapted
weight for every reader (TransformerLens's forward, circuitdyn's attribution hooks, evaluation).
While on, the model's parameter names carry ``parametrizations.`` (e.g.
``blocks.0.attn.parametrizations.W_Q.original``); `LoraAdapters.model_state_dict` gives the plain
HookedTransformer state of the adapted model, and `LoraAdapters.merge` folds the adapters into
the weights and removes them, leaving a plain HookedTransformer.

Why not PEFT: PEFT (0.21.2) can target raw ``nn.Parameter``s (``target_parameters``), but its
``ParamWrapper`` replaces the owning module (``blocks.L.attn``) with a wrapper whose forward takes
a positional input (TransformerLens calls attention with keywords only: TypeError), hides the
module's weights (``blocks.L.attn.W_Q`` raises AttributeError), applies the delta only inside that
module's forward (backward hooks that read the weights see the base weights) and renames every
parameter (``blocks.0.attn.base_layer.base_layer...W_Q``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformer_lens import HookedTransformer

ATTN_TARGETS = ("W_Q", "W_K", "W_V", "_W_K", "_W_V", "W_O")  # per head
MLP_TARGETS = ("W_in", "W_out")


class LowRankDelta(nn.Module):
    """The parametrization ``W -> W + B @ A`` of one weight ``[*lead, d_in, d_out]`` (`lead`: the
    head axis of per-head weights, or nothing), with ``B: [*lead, d_in, rank]`` (zeros) and
    ``A: [*lead, rank, d_out]`` (uniform in ``±1/sqrt(d_in)``)."""

    def __init__(self, weight: Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        *lead, d_in, d_out = weight.shape
        bound = 1.0 / math.sqrt(d_in)
        a = (
            torch.rand(*lead, rank, d_out, generator=generator, dtype=torch.float64) * 2 - 1
        ) * bound
        like = {"dtype": weight.dtype, "device": weight.device}
        self.B = nn.Parameter(torch.zeros(*lead, d_in, rank, **like))
        self.A = nn.Parameter(a.to(**like))

    def forward(
        self, weight: Float[Tensor, "*lead d_in d_out"]
    ) -> Float[Tensor, "*lead d_in d_out"]:
        return weight + self.B @ self.A


@dataclass(frozen=True)
class LoraTarget:
    """One adapted weight: its parameter name in the plain model (``blocks.0.attn.W_Q``), the
    module that holds it and its attribute name there."""

    name: str
    module: nn.Module
    attr: str


def lora_targets(model: HookedTransformer) -> list[LoraTarget]:
    """The weights LoRA adapts (with adapters on or not): per layer the attention's W_Q, W_K,
    W_V, W_O (or grouped _W_K, _W_V) and the MLP's W_in, W_out (MLPs without their own
    ``W_in``, e.g. mixtures of experts, get no adapter)."""
    targets: list[LoraTarget] = []
    for layer, block in enumerate(model.blocks):
        for part, names in (("attn", ATTN_TARGETS), ("mlp", MLP_TARGETS)):
            module = getattr(block, part, None)
            if module is None:
                continue
            own = module._parameters  # direct parameters only (W_K of a GQA model is a property)
            for attr in names:
                if own.get(attr) is not None or parametrize.is_parametrized(module, attr):
                    targets.append(LoraTarget(f"blocks.{layer}.{part}.{attr}", module, attr))
    return targets


def check_rank(model: HookedTransformer, rank: int) -> None:
    """ValueError (one line, naming the largest rank that fits) unless ``1 <= rank <=`` both
    matrix dimensions of every adapted weight (per head for the per-head weights)."""
    targets = lora_targets(model)
    if not targets:
        raise ValueError("this model has no W_Q/W_K/W_V/W_O/W_in/W_out weights to adapt with LoRA")
    dims = {t.name: tuple(getattr(t.module, t.attr).shape[-2:]) for t in targets}
    name, shape = min(dims.items(), key=lambda item: min(item[1]))
    if rank < 1 or rank > min(shape):
        raise ValueError(
            f"lora_rank {rank} does not fit {name} ({shape[0]} x {shape[1]} per head or matrix): "
            f"use --lora-rank between 1 and {min(shape)}"
        )


class LoraAdapters:
    """Rank-`rank` adapters on every `lora_targets` weight of `model`, registered at creation.

    Creation freezes every parameter of `model` (``requires_grad=False``): only the adapters
    (`parameters`) train. `merge` folds them in and restores the parameters' ``requires_grad``."""

    def __init__(self, model: HookedTransformer, rank: int, *, seed: int = 0) -> None:
        check_rank(model, rank)
        self.model, self.rank = model, rank
        self.targets = lora_targets(model)
        if any(parametrize.is_parametrized(t.module, t.attr) for t in self.targets):
            raise ValueError("this model already has adapters: merge them first")
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for param in model.parameters():
            param.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        self.deltas: dict[str, LowRankDelta] = {}
        for target in self.targets:
            delta = LowRankDelta(getattr(target.module, target.attr), rank, generator)
            parametrize.register_parametrization(target.module, target.attr, delta)
            self.deltas[target.name] = delta
        self.merged = False

    def parameters(self) -> dict[str, nn.Parameter]:
        """The trainable adapter factors by name (``blocks.0.attn.W_Q.lora_B`` / ``.lora_A``)."""
        out: dict[str, nn.Parameter] = {}
        for name, delta in self.deltas.items():
            out[f"{name}.lora_B"], out[f"{name}.lora_A"] = delta.B, delta.A
        return out

    @property
    def n_params(self) -> int:
        """Number of trainable adapter scalars."""
        return sum(p.numel() for p in self.parameters().values())

    def state_dict(self) -> dict[str, Tensor]:
        """The adapter factors (detached), keyed as `parameters`."""
        return {name: p.detach() for name, p in self.parameters().items()}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Copy saved adapter factors (keys as `parameters`; exactly those) into the adapters."""
        params = self.parameters()
        self._check_keys(tensors)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name])

    @torch.no_grad()
    def model_state_dict(self, factors: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The plain HookedTransformer state of the adapted model (keys as without adapters;
        adapted weights ``W + B @ A``), as `merge` would leave it; with `factors` (keys as
        `parameters`), the state these adapter factors would give instead of the current ones."""
        self._check_on()
        if factors is not None:
            self._check_keys(factors)
        state = {}
        for key, value in self.model.state_dict().items():
            if ".parametrizations." not in key:
                state[key] = value
        for target in self.targets:
            if factors is None:
                weight = getattr(target.module, target.attr).detach().clone()
            else:
                base = target.module.parametrizations[target.attr].original
                b, a = factors[f"{target.name}.lora_B"], factors[f"{target.name}.lora_A"]
                weight = base.detach() + b.to(base) @ a.to(base)
            state[target.name] = weight
        return state

    def merge(self) -> None:
        """Fold every adapter into its weight (``W <- W + B @ A``), remove the adapters and
        restore each parameter's ``requires_grad``: the model is a plain HookedTransformer again."""
        self._check_on()
        for target in self.targets:
            parametrize.remove_parametrizations(target.module, target.attr, leave_parametrized=True)
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, True))
        self.merged = True

    def _check_keys(self, factors: dict[str, Tensor]) -> None:
        names = set(self.parameters())
        if set(factors) != names:
            missing, extra = sorted(names - set(factors)), sorted(set(factors) - names)
            raise ValueError(
                f"LoRA state does not match the adapters: missing {missing}, extra {extra}"
            )

    def _check_on(self) -> None:
        if self.merged:
            raise RuntimeError("the adapters were merged into the model and are gone")


__all__ = ["LoraAdapters", "LoraTarget", "LowRankDelta", "check_rank", "lora_targets"]
