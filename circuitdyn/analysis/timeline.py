"""The step axis of a run: its key steps, per-step normalised scores, the edge membership raster
and masks for ratios that are meaningless where their denominator is near zero.

Step convention (the one of every table and figure): **step t is the state before update t**,
i.e. the weights after t updates. A snapshot at step t holds the circuit (and its scores) used
for update t; an evaluation at step t evaluates the weights after t updates (so the final
evaluation sits at ``steps``, one past the last snapshot); a head-role row's ``updates`` column
is on this axis (the initial model is 0, checkpoint ``s``, saved after update s, is s + 1).

Key steps (`key_steps`): ``initial`` (the first snapshot), ``metric_zero`` (the first evaluated
step whose dev metric has the other sign than at the start: the metric crossed zero by then),
``acc50`` / ``acc90`` (the first evaluated step with dev accuracy >= 0.5 / 0.9) and ``final``
(the last snapshot). A key step that never happens is absent from the table.

Normalised scores (`score_shares`): a score divided by the sum of |score| over every valid edge
of its step (a signed fraction; |share| sums to 1 over the edges of a step), so a step where the
task metric changes sign and every score shrinks or flips does not dominate a figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from circuitdyn.analysis.dynamics import _chunks, attributed_steps
from circuitdyn.analysis.runs import evals_by_step
from circuitdyn.store import RunStore

STEP_CONVENTION = "step t = the state before update t (the weights after t updates)"
"""The one step convention, stated once wherever a figure or report needs it."""

STEP_AXIS = "training step t (state before update t)"
"""The x-axis title of every figure over training steps."""

KEY_LABELS = {
    "initial": "initial",
    "metric_zero": "dev metric crosses 0",
    "acc50": "dev accuracy ≥ 50%",
    "acc90": "dev accuracy ≥ 90%",
    "final": "final",
}
"""Short labels of the key steps, in their order."""


def key_steps(
    evals: pd.DataFrame,
    snapshot_steps: Sequence[int] | None = None,
    *,
    metric: str = "dev_metric",
    accuracy: str = "dev_accuracy",
    levels: Sequence[float] = (0.5, 0.9),
) -> pd.DataFrame:
    """The key steps of a run from its evaluations (`evals_by_step`: ``step`` and metric
    columns) and the steps of its snapshots.

    Columns: ``key`` (``initial``, ``metric_zero``, ``acc50``, ``acc90``, ``final``), ``step``
    (on the step axis of the module docstring), ``snapshot_step`` (the snapshot closest to and
    not after ``step``: the circuit to draw for it; NA without snapshots), ``label`` (for
    legends), ``value`` (the evaluated metric / accuracy at the step; NaN for initial / final).
    Rows sorted by step (ties in key order); keys that never happen are absent.
    """
    rows: list[tuple[str, int, float]] = []
    snaps = sorted(int(s) for s in snapshot_steps) if snapshot_steps is not None else []
    if snaps:
        rows.append(("initial", snaps[0], np.nan))
    if metric in evals.columns:
        series = evals.dropna(subset=[metric]).sort_values("step")
        values = series[metric].to_numpy(dtype=float)
        nonzero = np.flatnonzero(values != 0)
        if nonzero.size:
            start = np.sign(values[nonzero[0]])
            flipped = np.flatnonzero(np.sign(values) == -start)
            if flipped.size:
                i = flipped[0]
                rows.append(("metric_zero", int(series["step"].iloc[i]), float(values[i])))
    if accuracy in evals.columns:
        series = evals.dropna(subset=[accuracy]).sort_values("step")
        for level in levels:
            hit = series[series[accuracy] >= level]
            if len(hit):
                key = f"acc{round(level * 100)}"
                rows.append((key, int(hit["step"].iloc[0]), float(hit[accuracy].iloc[0])))
    if snaps:
        rows.append(("final", snaps[-1], np.nan))
    order = list(KEY_LABELS)
    frame = pd.DataFrame(rows, columns=["key", "step", "value"])
    frame["label"] = [
        KEY_LABELS.get(k, k if not k.startswith("acc") else f"dev accuracy ≥ {k[3:]}%")
        for k in frame["key"]
    ]
    frame["snapshot_step"] = pd.array(
        [_snapshot_at(snaps, s) for s in frame["step"]], dtype="Int64"
    )
    frame["_order"] = [order.index(k) if k in order else len(order) for k in frame["key"]]
    frame = frame.sort_values(["step", "_order"], kind="stable").drop(columns="_order")
    return frame[["key", "step", "snapshot_step", "label", "value"]].reset_index(drop=True)


def _snapshot_at(snaps: Sequence[int], step: int) -> int | None:
    earlier = [s for s in snaps if s <= step]
    if earlier:
        return earlier[-1]
    return snaps[0] if snaps else None


def run_key_steps(store: RunStore, **options: object) -> pd.DataFrame:
    """`key_steps` of a recorded run (its evaluations and snapshot steps)."""
    return key_steps(evals_by_step(store), store.steps, **options)  # type: ignore[arg-type]


def marked_steps(keys: pd.DataFrame | None) -> pd.DataFrame:
    """The key steps worth a vertical line on a step axis: the events (metric zero crossing,
    accuracy levels), not the first and last step; several events at one step are merged into
    one row with their labels joined by " / "."""
    if keys is None or keys.empty:
        return pd.DataFrame(columns=["step", "label"])
    events = keys[~keys["key"].isin(["initial", "final"])]
    merged = events.groupby("step", sort=True)["label"].agg(" / ".join).reset_index()
    return merged


# ---------------------------------------------------------------------------------------------
# normalised scores
# ---------------------------------------------------------------------------------------------
def step_score_totals(store: RunStore, steps: Sequence[int] | None = None) -> pd.DataFrame:
    """Per attributed step (or the given ``steps``): ``step``, ``total_abs_score`` (sum of
    |score| over every valid edge, metric units; NaN on an unattributed step) and
    ``max_abs_score``. Reads the scores chunk by chunk."""
    selected = attributed_steps(store) if steps is None else [int(s) for s in steps]
    totals: list[np.ndarray] = []
    maxima: list[np.ndarray] = []
    names = store.edge_names
    for chunk in _chunks(selected):
        values = np.abs(store.scores(chunk, edges=names).astype(np.float64))
        finite = np.isfinite(values)
        any_finite = finite.any(axis=1)
        totals.append(np.where(any_finite, np.where(finite, values, 0.0).sum(axis=1), np.nan))
        maxima.append(np.where(any_finite, np.where(finite, values, 0.0).max(axis=1), np.nan))
    return pd.DataFrame(
        {
            "step": np.asarray(selected, dtype=np.int64),
            "total_abs_score": np.concatenate(totals) if totals else np.zeros(0),
            "max_abs_score": np.concatenate(maxima) if maxima else np.zeros(0),
        }
    )


def score_shares(
    table: pd.DataFrame, totals: pd.DataFrame, *, column: str = "score"
) -> pd.DataFrame:
    """A long table with ``step`` and ``column`` (e.g. `edge_trajectories`, or the edges of
    `circuit_tables`) plus ``share``: the score over its step's ``total_abs_score``
    (`step_score_totals`; a signed fraction, NaN where the step has no total)."""
    total = table["step"].map(totals.set_index("step")["total_abs_score"])
    with np.errstate(invalid="ignore", divide="ignore"):
        share = table[column].to_numpy(dtype=float) / total.to_numpy(dtype=float)
    return table.assign(share=share)


def column_shares(matrix: pd.DataFrame) -> pd.DataFrame:
    """A row x step table (e.g. `node_score_matrix`) with each column divided by its sum of
    |value| (a signed fraction; |values| of a column sum to 1; an all-zero or all-NaN column
    stays NaN)."""
    denominator = matrix.abs().sum(axis=0, min_count=1)
    denominator = denominator.where(denominator > 0)
    return matrix.divide(denominator, axis=1)


def mask_near_zero(
    evals: pd.DataFrame,
    column: str = "faithfulness",
    reference: str = "dev_metric",
    *,
    rel: float = 0.1,
) -> pd.DataFrame:
    """The evaluations with ``<column>_masked``: ``column`` where |``reference``| is at least
    ``rel`` times the run's largest |reference| (the ratio's denominator), NaN elsewhere, e.g.
    faithfulness = m(circuit) / m(model) where the full model's metric is near zero. Without
    the columns the table is returned unchanged."""
    if column not in evals.columns or reference not in evals.columns:
        return evals
    ref = evals[reference].abs()
    scale = float(ref.max()) if ref.notna().any() else np.nan
    keep = ref >= rel * scale
    return evals.assign(**{f"{column}_masked": evals[column].where(keep)})


# ---------------------------------------------------------------------------------------------
# edge membership raster and entry / exit counts
# ---------------------------------------------------------------------------------------------
def edge_membership(
    store: RunStore, steps: Sequence[int] | None = None, *, max_edges: int | None = None
) -> pd.DataFrame:
    """Edge x step membership (1 in the circuit, 0 not) of every edge ever in the circuit,
    rows sorted by the step the edge first entered, then by how long it stayed (longest
    first), then by name order; columns are the int steps. ``max_edges``: keep the edges
    present longest (then re-sorted by entry)."""
    selected = store.steps if steps is None else [int(s) for s in steps]
    names = store.edge_names
    parts = [store.masks(chunk, edges=names) for chunk in _chunks(selected)]
    member = np.concatenate(parts, axis=0) if parts else np.zeros((0, len(names)), dtype=bool)
    ever = np.flatnonzero(member.any(axis=0))
    present = member[:, ever].sum(axis=0)
    if max_edges is not None and len(ever) > max_edges:
        keep = np.argsort(-present, kind="stable")[:max_edges]
        keep.sort()
        ever, present = ever[keep], present[keep]
    first = member[:, ever].argmax(axis=0)
    order = np.lexsort((ever, -present, first))
    rows = ever[order]
    frame = pd.DataFrame(
        member[:, rows].T.astype(np.int8),
        index=pd.Index([names[i] for i in rows], name="edge"),
        columns=selected,
    )
    frame.columns.name = "step"
    return frame


def churn_counts(churn: pd.DataFrame, *, window: int = 5) -> pd.DataFrame:
    """Per step from a `churn` table: ``step``, ``edges_added`` / ``edges_removed`` (counts
    since the previous step), ``jaccard_edges_prev`` and ``jaccard_edges_prev_smoothed`` (its
    centred rolling mean over ``window`` steps, partial windows at the ends)."""
    out = churn[["step", "edges_added", "edges_removed", "jaccard_edges_prev"]].copy()
    out["jaccard_edges_prev_smoothed"] = (
        out["jaccard_edges_prev"].rolling(window, center=True, min_periods=1).mean()
    )
    return out.reset_index(drop=True)


def step_descriptions(metrics: pd.DataFrame, evals: pd.DataFrame | None = None) -> dict[int, str]:
    """One line per recorded step for figures that show a step at a time: the training-batch
    metric of that step and the latest dev evaluation at or before it, e.g. ``"batch metric
    −6.58 · dev metric −6.64, dev accuracy 0% (evaluated at t=0)"``."""
    lines: dict[int, str] = {}
    dev = None
    if evals is not None and "dev_metric" in evals.columns:
        dev = evals.dropna(subset=["dev_metric"]).sort_values("step")
    for row in metrics.itertuples(index=False):
        step = int(row.step)
        parts = []
        value = getattr(row, "metric", np.nan)
        if value is not None and np.isfinite(value):
            parts.append(f"batch metric {value:.3g}")
        if dev is not None and len(dev):
            earlier = dev[dev["step"] <= step]
            if len(earlier):
                last = earlier.iloc[-1]
                text = f"dev metric {last['dev_metric']:.3g}"
                if "dev_accuracy" in last.index and np.isfinite(last["dev_accuracy"]):
                    text += f", dev accuracy {100 * last['dev_accuracy']:.0f}%"
                parts.append(f"{text} (evaluated at t={int(last['step'])})")
        lines[step] = " · ".join(parts)
    return lines


__all__ = [
    "KEY_LABELS",
    "STEP_AXIS",
    "STEP_CONVENTION",
    "churn_counts",
    "column_shares",
    "edge_membership",
    "key_steps",
    "marked_steps",
    "mask_near_zero",
    "run_key_steps",
    "score_shares",
    "step_descriptions",
    "step_score_totals",
]
