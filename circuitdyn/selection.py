"""Circuit-selection rules by name, and the one dispatcher that every caller uses.

A rule turns `Scores` into a `Circuit` of size n, counted in edges or in heads/MLP nodes. `select`
clamps n to what the graph has and returns the n actually used, so that a run records the
circuit size it really had (``--top-n 10000`` on a 262-edge graph selects 262 edges).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from circuitdyn.circuit import Circuit
from circuitdyn.graph import Graph
from circuitdyn.registry import Registry
from circuitdyn.scores import Scores


@dataclass(frozen=True)
class SelectionRule:
    """`choose(scores, n, absolute=...)` picks n items; `unit` says what n counts."""

    choose: Callable[..., Circuit]
    unit: Literal["edges", "nodes"]

    def n_max(self, graph: Graph) -> int:
        """How many items the rule can rank in `graph`: edges, or heads + MLPs."""
        return graph.n_edges if self.unit == "edges" else graph.n_src - 1


SELECTIONS: Registry[SelectionRule] = Registry("selection rule")
SELECTIONS.add(
    "top_edges",
    SelectionRule(Circuit.top_edges, "edges"),
    help="the n edges with the largest |score|",
)
SELECTIONS.add(
    "greedy",
    SelectionRule(Circuit.greedy, "edges"),
    help="EAP-IG's greedy growth from logits, n edges",
)
SELECTIONS.add(
    "top_nodes",
    SelectionRule(Circuit.top_nodes, "nodes"),
    help="the n heads/MLPs with the largest node score, with every edge among them",
)


@dataclass(frozen=True)
class Selection:
    """A selected circuit and the n it was selected with (after clamping)."""

    circuit: Circuit
    n: int


def select(scores: Scores, n: int, rule: str = "top_edges", *, absolute: bool = True) -> Selection:
    """The circuit that `rule` (a `SELECTIONS` name) picks from `scores`, with n clamped to
    ``[0, what the graph has]``."""
    if n < 0:
        raise ValueError(f"the circuit size n must be >= 0, got {n}")
    chosen = SELECTIONS[rule]
    n = min(n, chosen.n_max(scores.graph))
    return Selection(chosen.choose(scores, n, absolute=absolute), n)


__all__ = ["SELECTIONS", "Selection", "SelectionRule", "select"]
