"""Tuning strategies: which parameters an update of the tuning engine may move.

Every strategy is attributed and recorded the same way; they differ only in the circuit that
the updates tune. A strategy is a `TuningStrategy` registered in `STRATEGIES`:

* ``circuit``:        circuit-tuning; the circuit is re-searched every `research_every` (K) steps;
* ``fixed``:          the circuit found at step 0, never re-searched;
* ``random``:         a seeded random set of heads/MLPs with (about, from below) the same number of
                      tunable parameters as the step-0 circuit;
* ``random-matched``: at every selection, a seeded random set of head q/k/v/o slots and MLP
                      nodes with exactly as many of each kind as the selected circuit;
* ``gradient``:       the head q/k/v/o slots and MLP nodes with the largest gradient (mean square
                      per parameter) on the step-0 batch, within the step-0 circuit's budget;
* ``lora``:           LoRA adapters of rank `lora_rank` on every W_Q/W_K/W_V/W_O (per head),
                      W_in, W_out; the base weights are frozen (`circuitdyn.lora`);
* ``full``:           plain full fine-tuning.

Slots. A head has four slots, each owning its own parameter rows (`circuitdyn.ownership`): q
(``W_Q[h]``, ``b_Q[h]``), k, v and o (``W_O[h]``); an MLP node owns its MLP (or its neuron
block). The circuit that tunes exactly a set of slots has one edge per head slot,
``input->aL.hH<q>`` (likewise k, v) or ``aL.hH->logits`` (o), and two per MLP node,
``input->mL`` and ``mL->logits`` (so that it owns both sides under a policy with
``mlp_by_side``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float64
from torch import Tensor
from transformer_lens import HookedTransformer

from circuitdyn.circuit import Circuit
from circuitdyn.graph import QKV, Graph, parse_node
from circuitdyn.ownership import ParameterPolicy, count_tunable, parameter_masks
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
    is tuned until the next; otherwise once, at step 0, and its circuit is tuned throughout.
    With `lora` the updates train LoRA adapters instead of the weights (`circuitdyn.lora`);
    `choose` then returns None and the selected circuit is kept for the record only."""

    research: bool
    choose: Callable[[StrategyInput], Circuit | None]
    lora: bool = False


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


def _random_budget(given: StrategyInput) -> Circuit:
    target = count_tunable(given.model, given.selected, given.policy)
    return random_circuit(given.model, given.selected.graph, target, given.policy, given.seed)


# ---- slots: the units of random-matched and gradient --------------------------------------
SLOTS = (*QKV, "o")  # the four slots of a head


def _mlp_nodes(graph: Graph) -> list[str]:
    """The MLP node names (``mL`` or ``mL.bBB``) in source order: layer-major, block-minor, the
    order of ``Components.mlp.reshape(n_layers, -1)`` flattened."""
    return [name for name in graph.src_names if parse_node(name).kind == "mlp"]


def slot_edges(graph: Graph, kind: str, index: int) -> list[str]:
    """The edges that make a circuit own slot `index` of `kind` and nothing else of the heads
    and MLPs: `kind` is q, k, v or o with ``index = layer * n_heads + head``, or ``mlp`` with
    `index` into the MLP nodes in source order."""
    if kind == "mlp":
        node = _mlp_nodes(graph)[index]
        return [f"input->{node}", f"{node}->logits"]
    layer, head = divmod(index, graph.n_heads)
    if kind == "o":
        return [f"a{layer}.h{head}->logits"]
    return [f"input->a{layer}.h{head}<{kind}>"]


def slot_units(graph: Graph) -> list[tuple[str, int]]:
    """Every slot as ``(kind, index)``: per layer and head q, k, v, o (kind-major), then the MLP
    nodes."""
    heads = range(graph.n_layers * graph.n_heads)
    mlps = range(len(_mlp_nodes(graph)))
    return [(kind, i) for kind in SLOTS for i in heads] + [("mlp", i) for i in mlps]


def slot_counts(circuit: Circuit) -> dict[str, int]:
    """How many q, k, v, o slots and MLP nodes `circuit` owns (from `Circuit.components`)."""
    own = circuit.components()
    counts = {kind: int(getattr(own, kind).sum()) for kind in SLOTS}
    counts["mlp"] = int(own.mlp.reshape(circuit.graph.n_layers, -1).sum())
    return counts


def matched_random_circuit(graph: Graph, counts: dict[str, int], seed: int) -> Circuit:
    """A seeded random circuit that owns exactly ``counts[kind]`` slots of each kind (q, k, v,
    o and mlp; see `slot_counts`), drawn uniformly without replacement per kind, with the
    edges of each slot (`slot_edges`)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = {kind: graph.n_layers * graph.n_heads for kind in SLOTS}
    sizes["mlp"] = len(_mlp_nodes(graph))
    edges: list[str] = []
    for kind in (*SLOTS, "mlp"):
        chosen = torch.randperm(sizes[kind], generator=generator)[: counts.get(kind, 0)]
        for index in sorted(chosen.tolist()):
            edges += slot_edges(graph, kind, index)
    return Circuit.from_edges(graph, edges)


def _random_kinds(given: StrategyInput) -> Circuit:
    graph = given.selected.graph
    return matched_random_circuit(graph, slot_counts(given.selected), given.seed)


def slot_gradient_scores(
    model: HookedTransformer, graph: Graph, batch: Batch, loss: Callable[[Tensor, Batch], Tensor]
) -> tuple[list[tuple[str, int]], Float64[Tensor, " n_units"]]:
    """The `slot_units` of `graph` and, for each, the mean square of the gradient of
    ``loss(model(batch.clean), batch)`` over the parameter entries it owns (float64 [n_units];
    units of loss^2 per parameter^2; 0 for a slot whose parameters do not require grad).

    The gradient comes from `torch.autograd.grad`: the parameters' ``.grad`` are untouched, and
    the RNG state is restored afterwards."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    device = next(model.parameters()).device
    # Fork the generator of the model's device type (CUDA, MPS, ...; CPU's is always forked).
    accelerator = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=accelerator, device_type=device.type):
        with torch.enable_grad():
            value = loss(model(batch.clean), batch)
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    squared = {
        name: g.detach().double().square() if g is not None else None
        for name, g in zip(params, grads, strict=True)
    }
    units = slot_units(graph)
    scores = torch.zeros(len(units), dtype=torch.float64)
    for i, (kind, index) in enumerate(units):
        unit = Circuit.from_edges(graph, slot_edges(graph, kind, index))
        masks = parameter_masks(model, unit, "nodes", include_frozen=False)
        total = sum(
            float(squared[name][mask].sum())
            for name, mask in masks.items()
            if squared.get(name) is not None
        )
        n = sum(int(mask.sum()) for mask in masks.values())
        scores[i] = total / n if n else 0.0
    return units, scores


def gradient_circuit(
    model: HookedTransformer,
    graph: Graph,
    batch: Batch,
    loss: Callable[[Tensor, Batch], Tensor],
    budget: int,
    policy: Policy = None,
) -> Circuit:
    """The slots (head q/k/v/o slots, MLP nodes) with the largest gradient, within `budget`
    tunable parameters under `policy`.

    Slots are ranked by the mean square of their gradient per parameter
    (`slot_gradient_scores`; ties: `slot_units` order) and taken greedily, skipping any that
    would take the circuit's `count_tunable` over `budget`: the greedy rule for the largest
    first-order loss decrease (the squared gradient norm of the tuned entries) at a parameter
    budget. The circuit has the edges of the chosen slots (`slot_edges`)."""
    units, scores = slot_gradient_scores(model, graph, batch, loss)
    order = sorted(range(len(units)), key=lambda i: (-float(scores[i]), i))
    edges: list[str] = []
    for i in order:
        candidate = [*edges, *slot_edges(graph, *units[i])]
        if count_tunable(model, Circuit.from_edges(graph, candidate), policy) <= budget:
            edges = candidate
    return Circuit.from_edges(graph, edges)


def _top_gradient(given: StrategyInput) -> Circuit:
    budget = count_tunable(given.model, given.selected, given.policy)
    graph = given.selected.graph
    return gradient_circuit(given.model, graph, given.batch, given.loss, budget, given.policy)


STRATEGIES: Registry[TuningStrategy] = Registry("tuning strategy")
STRATEGIES.add(
    "circuit",
    TuningStrategy(True, _selected),
    help="circuit-tuning: the circuit, re-searched every K steps",
)
STRATEGIES.add("fixed", TuningStrategy(False, _selected), help="the step-0 circuit throughout")
STRATEGIES.add(
    "random",
    TuningStrategy(False, _random_budget),
    help="random heads/MLPs, as many parameters as the step-0 circuit",
)
STRATEGIES.add(
    "random-matched",
    TuningStrategy(True, _random_kinds),
    help="random head q/k/v/o slots and MLPs, as many of each as the circuit, redrawn every K steps",
)
STRATEGIES.add(
    "gradient",
    TuningStrategy(False, _top_gradient),
    help="the head slots/MLPs with the largest step-0 gradient, at the step-0 circuit's budget",
)
STRATEGIES.add(
    "lora",
    TuningStrategy(False, _everything, lora=True),
    help="LoRA adapters of rank --lora-rank on W_Q/W_K/W_V/W_O per head, W_in, W_out",
)
STRATEGIES.add(
    "full",
    TuningStrategy(False, _everything),
    help="full fine-tuning (the circuit is attributed for the record)",
)

__all__ = [
    "SLOTS",
    "STRATEGIES",
    "StrategyInput",
    "TuningStrategy",
    "gradient_circuit",
    "matched_random_circuit",
    "random_circuit",
    "slot_counts",
    "slot_edges",
    "slot_gradient_scores",
    "slot_units",
]
