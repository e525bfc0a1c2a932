"""Tuning strategies: which parameters an update of the tuning engine may move.

Every strategy is attributed and recorded the same way; they differ only in the circuit that
the updates tune. A strategy is a `TuningStrategy` registered in `STRATEGIES`:

* ``circuit``: circuit-tuning; the circuit is re-searched every `research_every` (K) steps;
* ``fixed``:   the circuit found at step 0, never re-searched;
* ``random``:  a seeded random set of heads/MLPs with (about, from below) the same number of
               tunable parameters as the step-0 circuit;
* ``full``:    plain full fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from circuitdyn.circuit import Circuit
from circuitdyn.graph import Graph
from circuitdyn.ownership import ParameterPolicy, count_tunable
from circuitdyn.registry import Registry
from circuitdyn.tasks.base import Batch

Policy = ParameterPolicy | str | None  # an object or a `POLICIES` name


@dataclass(frozen=True)
class StrategyInput:
    """What a strategy may look at when it picks the circuit an update tunes: the model (with
    this step's parameters), the circuit selected from this step's scores, the parameter
    policy, a seed (the run's seed plus the step), this step's first training micro-batch and
    the task's training loss (e.g. for gradient-based selection)."""

    model: HookedTransformer
    selected: Circuit
    policy: Policy
    seed: int
    batch: Batch
    loss: Callable[[Tensor, Batch], Tensor]


@dataclass(frozen=True)
class TuningStrategy:
    """`choose(input) -> Circuit | None` picks the circuit the updates tune (None: every
    parameter). With `research` it is called at every selection (every K steps) and its circuit
    is tuned until the next; otherwise once, at step 0, and its circuit is tuned throughout."""

    research: bool
    choose: Callable[[StrategyInput], Circuit | None]


def _selected(given: StrategyInput) -> Circuit:
    return given.selected


def _everything(given: StrategyInput) -> None:
    return None


def random_circuit(
    model: HookedTransformer, graph: Graph, target: int, policy: Policy, seed: int
) -> Circuit:
    """A seeded random set of heads and MLPs whose tunable parameters add up to at most
    `target` and as close to it as the random order allows (nodes are taken in random order,
    skipping any that would overshoot). The circuit has every edge among the chosen nodes."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(graph.n_src - 1, generator=generator) + 1  # heads and MLPs
    chosen: list[str] = []
    total = 0
    for index in order.tolist():
        name = graph.src_names[index]
        size = count_tunable(model, Circuit.from_nodes(graph, [name]), policy)
        if total + size <= target:
            chosen.append(name)
            total += size
    return Circuit.from_nodes(graph, chosen)


def _random_matched(given: StrategyInput) -> Circuit:
    target = count_tunable(given.model, given.selected, given.policy)
    return random_circuit(given.model, given.selected.graph, target, given.policy, given.seed)


STRATEGIES: Registry[TuningStrategy] = Registry("tuning strategy")
for _name, _research, _first, _help in (
    ("circuit", True, _selected, "circuit-tuning: the circuit, re-searched every K steps"),
    ("fixed", False, _selected, "the step-0 circuit throughout"),
    ("random", False, _random_matched, "random heads/MLPs, as many parameters as the circuit"),
    ("full", False, _everything, "full fine-tuning (the circuit is attributed for the record)"),
):
    STRATEGIES.add(_name, TuningStrategy(_research, _first), help=_help)

__all__ = ["STRATEGIES", "StrategyInput", "TuningStrategy", "random_circuit"]
