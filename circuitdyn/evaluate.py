"""Run a model with only a circuit's edges; faithfulness; faithfulness curves, CPR and CMD.

Running a circuit (`run_with_circuit`): every edge *not* in the circuit carries its ablated
source activation (corrupted, mean or zero), every circuit edge its clean one; this is
`circuitdyn.patching.run_patched` with weights ``edge_valid & ~circuit``. Patching is limited to
real (unpadded) tokens; padded positions never influence real ones (causal attention, right
padding), so metrics read at real positions are unaffected.

Faithfulness of a circuit C for a metric m (MIB's definition):

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty))

where m(full) is the clean model and m(empty) the run with every edge ablated. The headline
number is MIB's *ratio of means*: each m(.) is first averaged over all examples. The mean of
per-example ratios is reported too; it is unstable when some example's m(full) - m(empty) is
near zero.

Faithfulness curve (MIB circuit localization): f at circuits of ``floor(fraction * n_edges)``
edges for the grid `MIB_GRID`; CPR is the area under f(fraction) and CMD the area under
|1 - f(fraction)|, both by the trapezoid rule over the grid's fractions as given (no
extrapolation to 0 and no normalisation: on `MIB_GRID` a constant f = 1 gives CPR = 0.999).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from circuitdyn.activations import ABLATIONS, ablated_sources
from circuitdyn.circuit import Circuit
from circuitdyn.graph import Graph
from circuitdyn.patching import run_patched
from circuitdyn.scores import Scores
from circuitdyn.selection import SELECTIONS, select
from circuitdyn.tasks.base import Batch, Metric, check_tokens, checked_metric, logit_diff

#: MIB's default grid of circuit sizes, as fractions of all edges.
MIB_GRID: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

#: |m(full) - m(empty)| below max(DEGENERATE_ATOL, DEGENERATE_RTOL * max(|m(full)|, |m(empty)|))
#: makes faithfulness a ratio with a near-zero denominator: a warning is raised.
DEGENERATE_RTOL = 1e-3
DEGENERATE_ATOL = 1e-8


class DegenerateFaithfulnessWarning(UserWarning):
    """m(full) and m(empty) are (nearly) equal: faithfulness divides by a near-zero number."""


# ---------------------------------------------------------------------------------------------
# Running a circuit
# ---------------------------------------------------------------------------------------------
def ablation_weights(
    graph: Graph, circuit: Circuit, device: torch.device | str = "cpu"
) -> Float[Tensor, "n_src n_dst"]:
    """Per-edge ablation weights of `circuit`: 1 on real edges outside it, 0 elsewhere."""
    _check_graph(graph, circuit)
    return (graph.edge_valid & ~circuit.mask).to(device=device, dtype=torch.float32)


def run_with_circuit(
    model: HookedTransformer,
    graph: Graph,
    circuit: Circuit,
    batch: Batch,
    ablation: str = "corrupted",
    means: Float[Tensor, "n_src mean_pos d_model"] | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of `batch.clean` with every edge outside `circuit` ablated (no gradients).

    Args:
        ablation: what removed edges carry: ``corrupted`` (the source on ``batch.corrupted``),
            ``mean`` (`means`, from `circuitdyn.activations.mean_activations`) or ``zero``.

    Cost: the ablated sources (one forward pass of the corrupted tokens; none for mean/zero)
    plus one patched forward pass."""
    _check_graph(graph, circuit)
    batch = batch.to(_device(model))
    ablated = ablated_sources(model, graph, batch, ablation, means)
    return _run(model, graph, batch, ablated, ablation_weights(graph, circuit, ablated.device))


def _run(
    model: HookedTransformer, graph: Graph, batch: Batch, ablated: Tensor, weights: Tensor
) -> Tensor:
    # Patch real tokens only (as attribution does); skip the per-source multiply when the batch
    # has no padding at all.
    mask = batch.attention_mask
    return run_patched(
        model, graph, batch.clean, ablated, weights, None if bool(mask.all()) else mask
    )


@dataclass(frozen=True)
class CircuitMetrics:
    """Per-example metric values (float64, CPU): the clean model, the empty circuit and each
    evaluated circuit (``circuits[i]`` for the i-th circuit), in the order of the data."""

    full: Float[Tensor, " n"]
    empty: Float[Tensor, " n"]
    circuits: Float[Tensor, "k n"]


def evaluate_circuits(
    model: HookedTransformer,
    graph: Graph,
    circuits: Sequence[Circuit],
    data: Iterable[Batch],
    metric: Metric = logit_diff,
    *,
    ablation: str = "corrupted",
    means: Float[Tensor, "n_src mean_pos d_model"] | None = None,
) -> CircuitMetrics:
    """Metric of the full model, of the empty circuit and of every circuit in `circuits`, per
    example, in one pass over `data` (which may be a one-shot iterator).

    Per batch: one source run for the ablated activations (corrupted ablation), one clean
    forward, one patched run for the empty circuit, one per circuit (full and empty circuits
    reuse the clean / empty values). Mean ablation needs `means`
    (`circuitdyn.activations.mean_activations` over reference batches, never the evaluated ones)."""
    for circuit in circuits:
        _check_graph(graph, circuit)
    device = _device(model)
    if ABLATIONS[ablation].needs_means and means is None:
        raise ValueError(
            f"ablation={ablation!r} needs means=mean_activations(model, graph, reference_batches)"
        )
    full_circuit = Circuit.full(graph)
    kinds = [
        "full" if c == full_circuit else "empty" if c.n_edges == 0 else "run" for c in circuits
    ]
    weights = [
        ablation_weights(graph, c, device) if k == "run" else None
        for c, k in zip(circuits, kinds, strict=True)
    ]
    all_ablated = graph.edge_valid.to(device=device, dtype=torch.float32)
    full_values: list[Tensor] = []
    empty_values: list[Tensor] = []
    circuit_values: list[list[Tensor]] = [[] for _ in circuits]
    for batch in data:
        if not isinstance(batch, Batch):
            raise TypeError(f"data must yield circuitdyn Batch objects, got {type(batch).__name__}")
        batch = batch.to(device)
        check_tokens(batch, model.cfg.d_vocab, model.cfg.n_ctx)
        ablated = ablated_sources(model, graph, batch, ablation, means)
        with torch.no_grad():
            full = _values(metric(model(batch.clean), batch), batch, "the full model")
        empty = _values(
            metric(_run(model, graph, batch, ablated, all_ablated), batch),
            batch,
            "the empty circuit",
        )
        full_values.append(full)
        empty_values.append(empty)
        for i, (kind, w) in enumerate(zip(kinds, weights, strict=True)):
            if kind == "full":
                circuit_values[i].append(full)
            elif kind == "empty":
                circuit_values[i].append(empty)
            else:
                logits = _run(model, graph, batch, ablated, w)
                circuit_values[i].append(_values(metric(logits, batch), batch, f"circuit {i}"))
    if not full_values:
        raise ValueError("no data: the iterable of batches was empty")
    per_circuit = [torch.cat(values) for values in circuit_values]
    n = sum(v.numel() for v in full_values)
    return CircuitMetrics(
        full=torch.cat(full_values),
        empty=torch.cat(empty_values),
        circuits=torch.stack(per_circuit)
        if per_circuit
        else torch.zeros(0, n, dtype=torch.float64),
    )


# ---------------------------------------------------------------------------------------------
# Faithfulness
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Faithfulness:
    """Faithfulness of one circuit.

    `value` is the headline (MIB's ratio of means): ``(mean m(C) - mean m(empty)) /
    (mean m(full) - mean m(empty))``. `mean_of_ratios` averages the per-example ratios
    `per_example` over the examples whose m(full) - m(empty) is not exactly 0 (their ratio is
    NaN/inf in `per_example`); it is unstable when some denominators are merely small. `m_*` are the example means
    of the metric (in its units), `metric_*` the per-example values (float64)."""

    value: float
    mean_of_ratios: float
    per_example: Float[Tensor, " n"]
    m_circuit: float
    m_full: float
    m_empty: float
    metric_circuit: Float[Tensor, " n"]
    metric_full: Float[Tensor, " n"]
    metric_empty: Float[Tensor, " n"]

    @property
    def n_examples(self) -> int:
        return int(self.per_example.numel())

    def __float__(self) -> float:
        return self.value

    @classmethod
    def from_values(cls, circuit: Tensor, full: Tensor, empty: Tensor) -> Faithfulness:
        """Build from per-example metric values; warns (`DegenerateFaithfulnessWarning`) when
        mean m(full) and mean m(empty) nearly coincide."""
        m_c, m_f, m_e = float(circuit.mean()), float(full.mean()), float(empty.mean())
        warn_if_degenerate(m_f, m_e, stacklevel=3)
        denominator = full - empty
        per_example = (circuit - empty) / denominator
        # Examples the ablation does not move at all (denominator exactly 0, e.g. a corrupted
        # prompt identical to the clean one) carry no information: left out of the mean.
        informative = denominator != 0
        mean_of_ratios = float(per_example[informative].mean()) if informative.any() else math.nan
        return cls(
            value=_safe_ratio(m_c - m_e, m_f - m_e),
            mean_of_ratios=mean_of_ratios,
            per_example=per_example,
            m_circuit=m_c,
            m_full=m_f,
            m_empty=m_e,
            metric_circuit=circuit,
            metric_full=full,
            metric_empty=empty,
        )


def warn_if_degenerate(m_full: float, m_empty: float, *, stacklevel: int = 2) -> bool:
    """Warn and return True when ``|m_full - m_empty|`` is too small to divide by (see
    `DEGENERATE_RTOL` / `DEGENERATE_ATOL`)."""
    gap = abs(m_full - m_empty)
    tolerance = max(DEGENERATE_ATOL, DEGENERATE_RTOL * max(abs(m_full), abs(m_empty)))
    if gap <= tolerance or not math.isfinite(gap):
        warnings.warn(
            f"faithfulness is ill-defined: m(full) = {m_full:.6g} and m(empty) = {m_empty:.6g} "
            f"differ by {gap:.3g} (tolerance {tolerance:.3g}, metric units), so the ratio divides "
            "by a near-zero number; the ablation barely changes the metric on these examples "
            "(check the corrupted prompts, the metric, or use more examples)",
            DegenerateFaithfulnessWarning,
            stacklevel=stacklevel + 1,
        )
        return True
    return False


def faithfulness(
    model: HookedTransformer,
    graph: Graph,
    circuit: Circuit,
    data: Iterable[Batch],
    metric: Metric = logit_diff,
    *,
    ablation: str = "corrupted",
    means: Float[Tensor, "n_src mean_pos d_model"] | None = None,
) -> Faithfulness:
    """Faithfulness of `circuit` on the examples of `data` (see the module docstring); the
    headline ``result.value`` is MIB's ratio of means."""
    values = evaluate_circuits(
        model, graph, [circuit], data, metric, ablation=ablation, means=means
    )
    return Faithfulness.from_values(values.circuits[0], values.full, values.empty)


# ---------------------------------------------------------------------------------------------
# Curves, CPR, CMD
# ---------------------------------------------------------------------------------------------
def faithfulness_curve(
    model: HookedTransformer,
    graph: Graph,
    scores: Scores,
    data: Iterable[Batch],
    metric: Metric = logit_diff,
    *,
    ablation: str = "corrupted",
    fractions: Sequence[float] = MIB_GRID,
    selection: str = "top_edges",
    absolute: bool = True,
    prune: bool = True,
    means: Float[Tensor, "n_src mean_pos d_model"] | None = None,
) -> pd.DataFrame:
    """Faithfulness of the circuits `scores` selects at each fraction of `fractions`.

    At fraction p the circuit has ``floor(p * N)`` selected items (N = edges, or heads + MLPs for
    ``top_nodes``), then is pruned of dangling nodes when `prune` (as MIB does). m(full) and
    m(empty) are computed once per batch, all circuits in the same pass over `data`.

    Returns a DataFrame with one row per fraction: ``fraction``, ``n_selected`` (before pruning),
    ``n_edges`` and ``n_nodes`` (of the evaluated circuit), ``metric`` (mean m(C)),
    ``faithfulness`` (ratio of means, the headline) and ``faithfulness_mean_of_ratios``;
    ``df.attrs`` holds ``m_full``, ``m_empty``, ``n_examples`` and the settings."""
    if scores.graph != graph:
        raise ValueError(f"the scores' graph {scores.graph} does not match {graph}")
    fractions = [float(f) for f in fractions]
    _check_fractions(fractions)
    total = SELECTIONS[selection].n_max(graph)
    counts = [math.floor(f * total + 1e-9) for f in fractions]  # floor as MIB; guard rounding
    circuits = []
    for n in counts:
        circuit = select(scores, n, selection, absolute=absolute).circuit
        circuits.append(circuit.prune() if prune else circuit)
    values = evaluate_circuits(
        model,
        graph,
        circuits,
        data,
        metric,
        ablation=ablation,
        means=means,
    )
    m_full, m_empty = float(values.full.mean()), float(values.empty.mean())
    warn_if_degenerate(m_full, m_empty)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateFaithfulnessWarning)  # warned once above
        for fraction, n, circuit, circuit_values in zip(
            fractions, counts, circuits, values.circuits, strict=True
        ):
            result = Faithfulness.from_values(circuit_values, values.full, values.empty)
            rows.append(
                {
                    "fraction": fraction,
                    "n_selected": n,
                    "n_edges": circuit.n_edges,
                    "n_nodes": circuit.n_nodes,
                    "metric": result.m_circuit,
                    "faithfulness": result.value,
                    "faithfulness_mean_of_ratios": result.mean_of_ratios,
                }
            )
    frame = pd.DataFrame(rows)
    frame.attrs.update(
        {
            "m_full": m_full,
            "m_empty": m_empty,
            "n_examples": int(values.full.numel()),
            "selection": selection,
            "ablation": ablation,
            "absolute": absolute,
            "prune": prune,
        }
    )
    return frame


def cpr(curve: pd.DataFrame | Any, *, log_scale: bool = False) -> float:
    """Circuit performance ratio (MIB): area under faithfulness vs. fraction, trapezoid rule
    over the curve's fractions (natural log of the fraction when `log_scale`). Higher is better."""
    x, y = _curve_xy(curve, log_scale)
    return _trapezoid(x, y)


def cmd(curve: pd.DataFrame | Any, *, log_scale: bool = False) -> float:
    """Circuit-model distance (MIB): area under |1 - faithfulness| vs. fraction, trapezoid rule.
    Lower is better (0 = the circuits behave like the model at every size)."""
    x, y = _curve_xy(curve, log_scale)
    return _trapezoid(x, np.abs(1.0 - y))


def _curve_xy(curve: Any, log_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    try:
        x = np.asarray(curve["fraction"], dtype=np.float64)
        y = np.asarray(curve["faithfulness"], dtype=np.float64)
    except (KeyError, TypeError, IndexError):
        raise ValueError("a curve needs 'fraction' and 'faithfulness' columns") from None
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"a curve needs >= 2 points with matching columns, got {x.size}")
    _check_fractions(x.tolist())
    if not np.isfinite(y).all():
        raise ValueError("the curve has NaN/inf faithfulness values; CPR/CMD are undefined")
    if log_scale:
        if (x <= 0).any():
            raise ValueError("log_scale needs fractions > 0")
        x = np.log(x)
    return x, y


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) == 0:
        raise ValueError("fractions is empty")
    array = np.asarray(fractions, dtype=np.float64)
    if not np.isfinite(array).all() or (array < 0).any() or (array > 1).any():
        raise ValueError(f"fractions must lie in [0, 1], got {list(fractions)}")
    if (np.diff(array) <= 0).any():
        raise ValueError(f"fractions must be strictly increasing, got {list(fractions)}")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _device(model: HookedTransformer) -> torch.device:
    return next(model.parameters()).device


def _check_graph(graph: Graph, circuit: Circuit) -> None:
    if not isinstance(circuit, Circuit):
        raise TypeError(f"expected a Circuit, got {type(circuit).__name__}")
    if circuit.graph != graph:
        raise ValueError(f"the circuit's graph {circuit.graph} does not match {graph}")


def _values(values: Tensor, batch: Batch, what: str) -> Float[Tensor, " batch"]:
    return checked_metric(values, batch, what).detach().to("cpu", torch.float64)


def _safe_ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return math.nan if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / denominator + 0.0  # + 0.0 turns -0.0 into 0.0


__all__ = [
    "MIB_GRID",
    "CircuitMetrics",
    "DegenerateFaithfulnessWarning",
    "Faithfulness",
    "ablation_weights",
    "cmd",
    "cpr",
    "evaluate_circuits",
    "faithfulness",
    "faithfulness_curve",
    "run_with_circuit",
    "warn_if_degenerate",
]
