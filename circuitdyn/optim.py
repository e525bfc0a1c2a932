"""The masked optimizer step: update only the entries a circuit owns, and leave everything else
exactly as it was (values, weight decay, optimizer moments).

Takes plain arguments (parameters, masks, optimizer settings), never a `TuningConfig`, so that
any training loop can use it.

Sharded parameters (FSDP2 ``fully_shard``, see `circuitdyn.sharding`): the masks stay full-shape
plain tensors (`circuitdyn.ownership.parameter_masks` on the sharded model); a parameter or
gradient that is a `DTensor` gets its mask laid out the same way (`sharding.shard_like`, no
communication), so every rank updates exactly the owned entries of its shard.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from circuitdyn.sharding import shard_like


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """``"adamw"`` (with `betas`) or ``"sgd"`` (with `momentum`)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: adamw or sgd")


def restrict_gradients(
    named_params: dict[str, torch.nn.Parameter], masks: dict[str, Tensor] | None
) -> None:
    """Keep only the gradient entries inside `masks` (None: keep all). A parameter missing from
    `masks` loses its gradient altogether, so the optimizer skips it (no update, no weight
    decay, no change of its state)."""
    if masks is None:
        return
    for name, param in named_params.items():
        mask = masks.get(name)
        if param.grad is None:
            continue
        if mask is None or not bool(mask.any()):
            param.grad = None
        elif not bool(mask.all()):
            param.grad.mul_(shard_like(mask, param.grad))


def masked_step(
    optimizer: torch.optim.Optimizer,
    named_params: dict[str, torch.nn.Parameter],
    masks: dict[str, Tensor] | None,
) -> None:
    """One optimizer step that moves only the masked entries (None: every parameter). Call
    after `restrict_gradients`. Partly masked parameters and their tensor-valued optimizer
    state are restored outside the mask after the step (momentum and weight decay would
    otherwise move entries whose gradient is zero)."""
    saved: list[tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]] = []
    for name, param in named_params.items():
        mask = None if masks is None else masks.get(name)
        if mask is None or param.grad is None or bool(mask.all()):
            continue
        state = {
            key: value.clone()
            for key, value in optimizer.state.get(param, {}).items()
            if isinstance(value, Tensor) and value.shape == param.shape
        }
        saved.append((param, shard_like(mask, param), param.detach().clone(), state))
    optimizer.step()
    with torch.no_grad():
        for param, mask, before, state in saved:
            param.copy_(torch.where(mask, param, before))
            for key, old in state.items():
                current = optimizer.state[param][key]
                current.copy_(torch.where(mask, current, old))


__all__ = ["make_optimizer", "masked_step", "restrict_gradients"]
