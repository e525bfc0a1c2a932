"""Circuit formation: when each part of the circuit appears, in which order, and whether it
coincides with the jump of the task metric.

Definitions (on the recorded snapshots of a run, in step order; step t = the weights after t
updates, as everywhere):

* **Emergence step** of an edge or node: the first snapshot step from which it stays in the
  circuit for ``window`` consecutive snapshots (a brief appearance does not count). **Exit
  step**: the first snapshot step after its emergence from which it stays *out* for ``window``
  consecutive snapshots. Only the first emergence and the first exit after it are reported; an
  item that leaves less than ``window`` snapshots before the end of the run has no exit step.
* **Order of emergence**: the rank of the emergence step (1 = first; ties share a rank).
* **Phase transition** of a metric curve (``step`` and the metric, e.g. ``dev_accuracy`` from
  `evals_by_step`): ``"steepest"``, the step where the curve rises fastest (the largest slope
  of second-order finite differences on the possibly uneven step grid, optionally after a
  centred moving average), or ``"changepoint"``, the first step of the second segment of the
  best two-segment piecewise-constant fit (least squares).
* **Faithfulness onset**: the first evaluated step from which faithfulness is at least a
  threshold (0.8) for ``window`` consecutive evaluations, counting only evaluations where the
  model's metric is clearly apart from the metric with every edge ablated (``|dev_metric -
  dev_metric_empty|`` at least ``min_gap`` times its largest value in the run; without a
  ``dev_metric_empty`` column, ``|dev_metric|``): faithfulness is a ratio that means nothing
  while its denominator is near zero, as at initialisation.

Membership of a node follows `circuitdyn.analysis.dynamics`: a node is in the circuit when a
circuit edge goes into or out of it (``input`` and ``logits`` included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from circuitdyn.analysis.dynamics import _chunks, node_membership_array
from circuitdyn.analysis.runs import evals_by_step
from circuitdyn.store import RunStore

Unit = Literal["edges", "nodes"]


def circuit_membership(store: RunStore, unit: Unit = "edges") -> pd.DataFrame:
    """Item x step membership (bool) of every edge (``store.edge_names`` order) or node
    (``store.node_names`` order) at every recorded step; index named ``edge`` / ``node``,
    columns the int steps. Reads the masks chunk by chunk."""
    steps = store.steps
    if unit == "nodes":
        steps, member = node_membership_array(store)
        names, label = store.node_names, "node"
    elif unit == "edges":
        names, label = store.edge_names, "edge"
        parts = [store.masks(chunk, edges=names) for chunk in _chunks(steps)]
        member = np.concatenate(parts) if parts else np.zeros((0, len(names)), dtype=bool)
    else:
        raise ValueError(f"unit must be 'edges' or 'nodes', got {unit!r}")
    frame = pd.DataFrame(member.T, index=pd.Index(list(names), name=label), columns=list(steps))
    frame.columns.name = "step"
    return frame


def _first_run(rows: np.ndarray, value: bool, window: int, after: np.ndarray) -> np.ndarray:
    """Per row of bool [n, T]: the first column j > after (after = -1: any) that starts
    `window` consecutive entries equal to `value`; -1 where there is none."""
    n, t = rows.shape
    out = np.full(n, -1, dtype=np.int64)
    if t < window:
        return out
    hits = rows == value
    # run[i, j]: hits[i, j : j + window] all True
    cumsum = np.concatenate([np.zeros((n, 1), dtype=np.int64), hits.cumsum(axis=1)], axis=1)
    run = (cumsum[:, window:] - cumsum[:, :-window]) == window  # [n, t - window + 1]
    columns = np.arange(run.shape[1])
    run &= columns[None, :] > after[:, None]
    found = run.any(axis=1)
    out[found] = run[found].argmax(axis=1)
    return out


def emergence_steps(member: pd.DataFrame, *, window: int = 3) -> pd.DataFrame:
    """Emergence and exit of every item of an item x step membership table (`circuit_membership`,
    `circuitdyn.analysis.node_membership`, ...; see the module docstring for the definitions).

    Columns: the item (the index name, e.g. ``edge``), ``emergence_step`` and ``exit_step``
    (Int64, NA where none), ``order`` (Int64 rank of the emergence step, 1 = first, ties
    share the smallest rank; NA for items that never emerge), ``first_step`` (the first step
    with the item in the circuit at all; NA if never), ``fraction`` (share of the snapshots
    with the item in, 0..1) and ``in_final`` (in the circuit at the last snapshot). Rows sorted
    by emergence step (never-emerged items last), then first step, then the table's order.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    label = member.index.name or "item"
    steps = np.asarray([int(s) for s in member.columns], dtype=np.int64)
    rows = member.to_numpy(dtype=bool)
    n = rows.shape[0]
    emerge = _first_run(rows, True, window, np.full(n, -1))
    exit_ = _first_run(rows, False, window, emerge)
    exit_[emerge < 0] = -1
    first = np.where(rows.any(axis=1), rows.argmax(axis=1), -1) if rows.size else np.full(n, -1)

    def at(index: np.ndarray) -> pd.api.extensions.ExtensionArray:
        return pd.array([int(steps[i]) if i >= 0 else pd.NA for i in index], dtype="Int64")

    table = pd.DataFrame(
        {
            label: list(member.index),
            "emergence_step": at(emerge),
            "exit_step": at(exit_),
            "first_step": at(first),
            "fraction": rows.mean(axis=1) if rows.shape[1] else np.zeros(n),
            "in_final": rows[:, -1] if rows.shape[1] else np.zeros(n, dtype=bool),
        }
    )
    table["order"] = table["emergence_step"].rank(method="min").astype("Int64")
    table["_position"] = np.arange(n)
    table = table.sort_values(
        ["emergence_step", "first_step", "_position"], na_position="last", kind="stable"
    )
    columns = [label, "emergence_step", "exit_step", "order", "first_step", "fraction", "in_final"]
    return table[columns].reset_index(drop=True)


def circuit_emergence(store: RunStore, *, unit: Unit = "edges", window: int = 3) -> pd.DataFrame:
    """`emergence_steps` of every edge or node of a recorded run (`circuit_membership`)."""
    return emergence_steps(circuit_membership(store, unit), window=window)


def emergence_raster(
    member: pd.DataFrame, emergence: pd.DataFrame, *, include_transient: bool = False
) -> pd.DataFrame:
    """The rows of a membership table (0/1, int8) in emergence order (`emergence_steps` of the
    same table): the items that emerge, first to emerge on top; with ``include_transient``,
    then the items that were in the circuit only briefly (never emerged)."""
    label = emergence.columns[0]
    keep = emergence["emergence_step"].notna()
    if include_transient:
        keep |= emergence["first_step"].notna()
    names = emergence.loc[keep, label].tolist()
    return member.loc[names].astype(np.int8)


@dataclass(frozen=True)
class PhaseTransition:
    """Where a metric curve jumps: ``step`` (on the curve's step grid), the ``method``
    (``steepest`` or ``changepoint``) and ``column`` used, ``slope`` (the curve's rise per step
    at ``step``, metric units per step), ``before`` / ``after`` (mean of the curve before
    ``step`` and from ``step`` on)."""

    step: int
    method: str
    column: str
    slope: float
    before: float
    after: float

    @property
    def rise(self) -> float:
        """``after - before`` (metric units)."""
        return self.after - self.before


def phase_transition(
    curve: pd.DataFrame,
    column: str = "dev_accuracy",
    *,
    method: Literal["steepest", "changepoint"] = "steepest",
    smooth: int = 1,
) -> PhaseTransition:
    """The phase transition of ``curve[column]`` over ``curve["step"]`` (rows with a value;
    see the module docstring). ``smooth``: points of the centred moving average applied
    first (1 = none; ``steepest`` only). ValueError with fewer than two points."""
    if column not in curve.columns:
        raise ValueError(f"the curve has no column {column!r} (columns: {list(curve.columns)})")
    rows = curve.dropna(subset=[column]).sort_values("step")
    x = rows["step"].to_numpy(dtype=float)
    y = rows[column].to_numpy(dtype=float)
    if len(x) < 2:
        raise ValueError(f"a phase transition needs at least 2 values of {column}, got {len(x)}")
    if smooth > 1:
        y_used = pd.Series(y).rolling(smooth, center=True, min_periods=1).mean().to_numpy()
    else:
        y_used = y
    slopes = np.gradient(y_used, x)
    if method == "steepest":
        i = int(np.argmax(slopes))
    elif method == "changepoint":
        costs = [
            ((y[:k] - y[:k].mean()) ** 2).sum() + ((y[k:] - y[k:].mean()) ** 2).sum()
            for k in range(1, len(y))
        ]
        i = 1 + int(np.argmin(costs))
    else:
        raise ValueError(f"method must be 'steepest' or 'changepoint', got {method!r}")
    before = float(y[:i].mean()) if i > 0 else float("nan")
    return PhaseTransition(
        step=int(x[i]),
        method=method,
        column=column,
        slope=float(slopes[i]),
        before=before,
        after=float(y[i:].mean()),
    )


def changes_near(emergence: pd.DataFrame, step: int, window: int) -> pd.DataFrame:
    """The circuit changes within ``window`` steps of ``step`` (e.g. a phase transition): one
    row per emergence or exit (from `emergence_steps`) at a step s with |s - step| <= window.

    Columns: the item, ``event`` (``emerge`` / ``exit``), ``step``, ``offset`` (s - step),
    ``in_final``; sorted by step, emergences before exits, then the table's order."""
    label = emergence.columns[0]
    parts = []
    for event, column in (("emerge", "emergence_step"), ("exit", "exit_step")):
        rows = emergence.dropna(subset=[column])
        parts.append(
            pd.DataFrame(
                {
                    label: rows[label].to_numpy(),
                    "event": event,
                    "step": rows[column].to_numpy(dtype=np.int64),
                    "in_final": rows["in_final"].to_numpy(dtype=bool),
                }
            )
        )
    events = pd.concat(parts, ignore_index=True)
    events["offset"] = events["step"] - int(step)
    near = events[events["offset"].abs() <= window]
    near = near.sort_values(["step", "event"], kind="stable")
    return near[[label, "event", "step", "offset", "in_final"]].reset_index(drop=True)


def masked_faithfulness(evals: pd.DataFrame, *, min_gap: float = 0.1) -> pd.DataFrame:
    """The evaluations (`evals_by_step`) with ``faithfulness_masked``: ``faithfulness`` where the
    model's metric is clearly apart from the empty circuit's (see the module docstring), NaN
    elsewhere. Without a ``faithfulness`` column the table is returned unchanged."""
    if "faithfulness" not in evals.columns or "dev_metric" not in evals.columns:
        return evals
    if "dev_metric_empty" in evals.columns:
        gap = (evals["dev_metric"] - evals["dev_metric_empty"]).abs()
    else:
        gap = evals["dev_metric"].abs()
    scale = float(gap.max()) if gap.notna().any() else np.nan
    keep = gap >= min_gap * scale
    return evals.assign(faithfulness_masked=evals["faithfulness"].where(keep))


def faithfulness_onset(
    evals: pd.DataFrame, threshold: float = 0.8, *, window: int = 1, min_gap: float = 0.1
) -> int | None:
    """The first evaluated step from which the circuit's faithfulness is at least `threshold`
    for `window` consecutive evaluations, counting only evaluations with a meaningful ratio
    (`masked_faithfulness`); None when it never is."""
    curve = masked_faithfulness(evals, min_gap=min_gap)
    if "faithfulness_masked" not in curve.columns:
        return None
    curve = curve.sort_values("step")
    above = (curve["faithfulness_masked"] >= threshold).to_numpy()[None, :]
    index = _first_run(above, True, window, np.array([-1]))[0]
    return None if index < 0 else int(curve["step"].iloc[index])


@dataclass(frozen=True)
class FormationTables:
    """What the formation figure and summary need: ``curve`` (evaluations with
    ``faithfulness_masked``), ``membership`` (item x step), ``emergence`` (`emergence_steps`),
    ``raster`` (`emergence_raster`), ``transition`` (`PhaseTransition` or None when the run has
    fewer than 2 evaluations) and ``onset`` (`faithfulness_onset`)."""

    curve: pd.DataFrame
    membership: pd.DataFrame
    emergence: pd.DataFrame
    raster: pd.DataFrame
    transition: PhaseTransition | None
    onset: int | None


def formation_tables(
    store: RunStore,
    *,
    unit: Unit = "edges",
    window: int = 3,
    column: str = "dev_accuracy",
    method: Literal["steepest", "changepoint"] = "steepest",
    smooth: int = 1,
    threshold: float = 0.8,
) -> FormationTables:
    """The formation analyses of a recorded run in one call (see `FormationTables`)."""
    curve = masked_faithfulness(evals_by_step(store))
    member = circuit_membership(store, unit)
    emergence = emergence_steps(member, window=window)
    transition = None
    if column in curve.columns and curve[column].notna().sum() >= 2:
        transition = phase_transition(curve, column, method=method, smooth=smooth)
    return FormationTables(
        curve=curve,
        membership=member,
        emergence=emergence,
        raster=emergence_raster(member, emergence),
        transition=transition,
        onset=faithfulness_onset(curve, threshold),
    )


def formation_summary(tables: FormationTables, *, near: int | None = None) -> dict[str, Any]:
    """The headline numbers of `formation_tables`.

    Keys: ``n_emerged`` (items that emerge), ``n_initial`` (of those, the ones in from the
    first snapshot: the circuit a fixed-size selection finds in any model, even untrained),
    ``first_to_emerge`` / ``first_emergence_step`` (the items at the smallest emergence step
    after the first snapshot), ``n_final`` (items in the final circuit), ``final_initial`` (of
    those, in from the first snapshot), ``median_emergence`` (of the final circuit's items that
    emerged after the first snapshot), ``faithfulness_onset``, ``near`` (default: 5% of the
    recorded step range); with a transition: ``transition_step``, ``transition_column``,
    ``metric_before`` / ``metric_after``, ``emerged_near`` (the items that emerge within
    ``near`` steps of it, in emergence order) and ``final_near`` (how many of the final
    circuit's later-emerging items do).
    """
    emergence = tables.emergence
    label = emergence.columns[0]
    steps = [int(s) for s in tables.membership.columns]
    if near is None:
        near = max(1, round(0.05 * (steps[-1] - steps[0]))) if steps else 1
    emerged = emergence.dropna(subset=["emergence_step"])
    start = steps[0] if steps else 0
    initial = emerged["emergence_step"] == start
    later = emerged[~initial]
    final = emerged[emerged["in_final"]]
    final_later = final[final["emergence_step"] > start]
    first_step = int(later["emergence_step"].min()) if len(later) else None
    out: dict[str, Any] = {
        "n_emerged": len(emerged),
        "n_initial": int(initial.sum()),
        "first_to_emerge": later[later["emergence_step"] == first_step][label].tolist(),
        "first_emergence_step": first_step,
        "n_final": int(emergence["in_final"].sum()),
        "final_initial": int((final["emergence_step"] == start).sum()),
        "median_emergence": float(final_later["emergence_step"].astype(float).median())
        if len(final_later)
        else None,
        "faithfulness_onset": tables.onset,
        "near": near,
    }
    t = tables.transition
    if t is not None:
        close = (later["emergence_step"].astype(float) - t.step).abs() <= near
        final_close = (final_later["emergence_step"].astype(float) - t.step).abs() <= near
        out.update(
            transition_step=t.step,
            transition_column=t.column,
            metric_before=t.before,
            metric_after=t.after,
            emerged_near=later.loc[close, label].tolist(),
            final_near=int(final_close.sum()),
        )
    return out


__all__ = [
    "FormationTables",
    "PhaseTransition",
    "changes_near",
    "circuit_emergence",
    "circuit_membership",
    "emergence_raster",
    "emergence_steps",
    "faithfulness_onset",
    "formation_summary",
    "formation_tables",
    "masked_faithfulness",
    "phase_transition",
]
