"""Does circuit-tuning forget less than the baselines at matched target performance?

Pure functions on an ``evals`` table with one row per (run, step) evaluation and the columns
``strategy`` (str), ``lr`` (float), ``seed`` (int), ``run`` (str), ``step`` (int),
``target_accuracy`` (fraction of the tuned task's dev set, 0..1), ``target_metric`` (logit
difference, logits), ``general_loss_change`` (held-out LM loss minus its step-0 value,
nats/token; larger = more forgetting), ``capability_accuracy_change`` (mean held-out capability
accuracy minus its step-0 value, fraction; negative = forgetting) and ``tunable_fraction``
(0..1). Step-0 rows (before training) are part of it.

* `interval`: mean and Student-t confidence interval of the mean over seeds.
* `pareto_front`: the non-dominated rows of a table of points.
* `strategy_fronts`: per strategy, every (lr, step) point as the mean over seeds with
  intervals, and that strategy's target / cost Pareto front.
* `matched_points`: per run, where the target first reaches a level and the cost there
  (linearly interpolated between the two evaluations around the crossing by default).
* `best_rate`: per strategy, the learning rate to compare at (all seeds reach the level, lowest
  mean cost).
* `matched_summary`: per strategy at that rate, the mean matched cost with its interval.
* `compare_at_matched`: each strategy against a reference (circuit-tuning): cost difference at
  matched target with a paired (by seed) t interval and test, and a Welch test.
* `chance_overlap`: chance levels of node IoU and edge Jaccard for random circuits of a given
  size, selected by the same rule as the tuning.

Student-t quantiles and p-values are computed with `circuitdyn.analysis.trajectories`'
regularized incomplete beta function (numpy), so scipy is not needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from circuitdyn.analysis.dynamics import jaccard
from circuitdyn.analysis.trajectories import betainc_regularized, t_test_p_value
from circuitdyn.circuit import Circuit
from circuitdyn.graph import Graph
from circuitdyn.scores import Scores
from circuitdyn.selection import SELECTIONS, select

Numbers = np.ndarray | pd.Series | Sequence[float] | float | int
"""One number or several (an array, a Series, a list)."""

RUN_KEYS = ("strategy", "lr", "seed", "run")
"""The columns that identify one run of the sweep."""


# ---------------------------------------------------------------------------------------------
# Student-t
# ---------------------------------------------------------------------------------------------
def t_quantile(probability: float, df: Numbers) -> np.ndarray:
    """The quantile q of Student's t with ``df`` degrees of freedom, P(T <= q) = `probability`
    for `probability` in (0.5, 1) (elementwise over `df`; NaN where df <= 0 or is NaN).

    Solved by bisection on x = df / (df + q^2), where the two-sided tail I_x(df/2, 1/2) is
    monotone (absolute accuracy of x ~ 2^-80; ~1e-12 relative on q for the usual levels)."""
    if not 0.5 < probability < 1.0:
        raise ValueError(f"probability must be in (0.5, 1), got {probability}")
    df = np.atleast_1d(np.asarray(df, dtype=float))
    out = np.full(df.shape, np.nan)
    ok = np.isfinite(df) & (df > 0)
    if not ok.any():
        return out
    unique, inverse = np.unique(df[ok], return_inverse=True)
    tail = 2.0 * (1.0 - probability)  # two-sided tail probability
    lo, hi = np.zeros_like(unique), np.ones_like(unique)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        below = betainc_regularized(unique / 2.0, 0.5, mid) < tail
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    x = 0.5 * (lo + hi)
    out[ok] = np.sqrt(unique * (1.0 - x) / x)[inverse]
    return out


def _t_bounds(
    mean: Numbers, std: Numbers, n: Numbers, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lower / upper bounds of the t interval of a mean from (mean, sample std, n), vectorised;
    NaN where n < 2."""
    mean, std, n = (np.asarray(a, dtype=float) for a in (mean, std, n))
    q = t_quantile(0.5 + confidence / 2.0, n - 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = q * std / np.sqrt(n)
    half = np.where(n >= 2, half, np.nan)
    return mean - half, mean + half


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def interval(values: Numbers, confidence: float = 0.95) -> tuple[float, ...]:
    """``(mean, low, high)``: the mean of `values` (e.g. one number per seed) and the Student-t
    confidence interval of that mean, mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n) with s the
    sample standard deviation (ddof = 1). NaNs are dropped first; with one value the bounds are
    NaN, with none all three are NaN. Units: those of `values`."""
    _check_confidence(confidence)
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if x.size == 1:
        return (mean, math.nan, math.nan)
    low, high = _t_bounds(
        np.array([mean]), np.array([x.std(ddof=1)]), np.array([x.size]), confidence
    )
    return (mean, float(low[0]), float(high[0]))


def _summary(
    table: pd.DataFrame, by: list[str], columns: Sequence[str], confidence: float
) -> pd.DataFrame:
    """Per group of `by`: for each column ``c``, ``c`` (mean over the group's finite values),
    ``c_low`` / ``c_high`` (t interval), plus ``n`` (the group's rows)."""
    grouped = table.groupby(by, sort=True, dropna=False)
    out = grouped.size().rename("n").to_frame()
    for column in columns:
        stats = grouped[column].agg(["mean", "std", "count"])
        low, high = _t_bounds(stats["mean"], stats["std"], stats["count"], confidence)
        out[column] = stats["mean"]
        out[f"{column}_low"] = low
        out[f"{column}_high"] = high
    return out.reset_index()


# ---------------------------------------------------------------------------------------------
# Pareto fronts
# ---------------------------------------------------------------------------------------------
def _front_mask(xs: np.ndarray, ys: np.ndarray, maximize_x: bool, maximize_y: bool) -> np.ndarray:
    """True for the non-dominated points of (xs, ys); NaN points are never on the front."""
    keep = np.zeros(len(xs), dtype=bool)
    finite = np.isfinite(xs) & np.isfinite(ys)
    if not finite.any():
        return keep
    # Minimise both: a point is dominated when another is <= in both and < in one.
    a = np.where(maximize_x, -xs[finite], xs[finite])
    b = np.where(maximize_y, -ys[finite], ys[finite])
    pairs, inverse = np.unique(np.stack([a, b], axis=1), axis=0, return_inverse=True)
    # Unique pairs are sorted by a, then b: a pair is on the front when its b is below every b
    # of the pairs before it (those have a smaller a, or the same a and a smaller b).
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(pairs[:-1, 1])])
    on_front = pairs[:, 1] < best_before
    keep[np.flatnonzero(finite)] = on_front[inverse.ravel()]
    return keep


def pareto_front(
    points: pd.DataFrame, x: str, y: str, *, maximize_x: bool, maximize_y: bool
) -> pd.DataFrame:
    """The rows of `points` that no other row dominates, sorted by `x` (ascending).

    Row a dominates row b when a is at least as good as b in both `x` and `y` and strictly
    better in one (better = larger where ``maximize_*``, else smaller). Identical points do not
    dominate each other (all copies stay); rows with NaN in `x` or `y` are never on the front."""
    mask = _front_mask(
        points[x].to_numpy(dtype=float), points[y].to_numpy(dtype=float), maximize_x, maximize_y
    )
    return points[mask].sort_values([x, y], kind="stable")


def strategy_fronts(
    evals: pd.DataFrame,
    target: str = "target_accuracy",
    cost: str = "general_loss_change",
    *,
    minimize_cost: bool = True,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Every (strategy, lr, step) point as the mean over seeds, and each strategy's Pareto
    front of target against cost.

    Columns: ``strategy``, ``lr``, ``step``, ``n`` (seeds at the point), `target` and `cost`
    (means over seeds, in their own units), ``{target}_low`` / ``{target}_high`` and
    ``{cost}_low`` / ``{cost}_high`` (Student-t `confidence` interval of the mean over seeds;
    NaN with one seed) and ``on_front``: True for the strategy's non-dominated points
    (maximise target; minimise cost, or maximise it with ``minimize_cost=False``, e.g. for
    ``capability_accuracy_change`` where negative = forgetting). The fronts are over all of a
    strategy's learning rates and steps, step 0 (the untuned model, cost 0) included. Rows are
    sorted by strategy, lr, step."""
    _check_confidence(confidence)
    table = _summary(evals, ["strategy", "lr", "step"], [target, cost], confidence)
    on_front = np.zeros(len(table), dtype=bool)
    for _, index in table.groupby("strategy", sort=False).indices.items():
        rows = table.iloc[index]
        on_front[index] = _front_mask(
            rows[cost].to_numpy(dtype=float),
            rows[target].to_numpy(dtype=float),
            maximize_x=not minimize_cost,
            maximize_y=True,
        )
    table["on_front"] = on_front
    return table


# ---------------------------------------------------------------------------------------------
# matched target performance
# ---------------------------------------------------------------------------------------------
def matched_points(
    evals: pd.DataFrame,
    level: float,
    target: str = "target_accuracy",
    cost: str = "general_loss_change",
    *,
    interpolate: bool = True,
) -> pd.DataFrame:
    """Per run, where `target` first reaches `level` and the `cost` there.

    The run's evaluations are taken in step order (rows with NaN `target` skipped); the first
    evaluated step with ``target >= level`` is ``step``. With `interpolate` (default), the cost
    is interpolated linearly in `target` between that evaluation and the one before it, at
    ``target = level`` exactly (``crossing_step`` likewise); without it, or when the first
    evaluation already reaches the level, the cost is the one at ``step``.

    Columns: ``strategy``, ``lr``, ``seed``, ``run``, ``level``, ``reached`` (bool), ``step``
    (first evaluated step at or above the level), ``crossing_step`` (interpolated, float),
    ``target_value`` (target at ``step``), ``cost`` (the `cost` column's value at the crossing,
    in its units), ``target_name`` / ``cost_name`` (the column names used). Runs that never
    reach the level have ``reached = False`` and NaN step / cost. One row per run, sorted by
    strategy, lr, seed."""
    keys = list(RUN_KEYS)
    rows = evals.dropna(subset=[target]).sort_values([*keys, "step"], kind="stable")
    grouped = rows.groupby(keys, sort=False)
    previous = pd.DataFrame(
        {
            "prev_step": grouped["step"].shift(),
            "prev_target": grouped[target].shift(),
            "prev_cost": grouped[cost].shift(),
        }
    )
    hits = pd.concat([rows, previous], axis=1)[rows[target] >= level]
    first = hits.groupby(keys, sort=False).head(1)
    step = first["step"].to_numpy(dtype=float)
    value = first[target].to_numpy(dtype=float)
    at_cost = first[cost].to_numpy(dtype=float)
    crossing, matched_cost = step.copy(), at_cost.copy()
    if interpolate:
        prev_t = first["prev_target"].to_numpy(dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = (level - prev_t) / (value - prev_t)
        between = np.isfinite(frac)
        prev_step = first["prev_step"].to_numpy(dtype=float)
        prev_cost = first["prev_cost"].to_numpy(dtype=float)
        crossing = np.where(between, prev_step + frac * (step - prev_step), step)
        matched_cost = np.where(between, prev_cost + frac * (at_cost - prev_cost), at_cost)
    found = pd.DataFrame(
        {
            **{k: first[k].to_numpy() for k in keys},
            "step": step,
            "crossing_step": crossing,
            "target_value": value,
            "cost": matched_cost,
        }
    )
    runs = evals[keys].drop_duplicates()
    out = runs.merge(found, on=keys, how="left")
    out["reached"] = out["step"].notna()
    out["level"] = float(level)
    out["target_name"] = target
    out["cost_name"] = cost
    columns = [*keys, "level", "reached", "step", "crossing_step", "target_value", "cost"]
    return (
        out[[*columns, "target_name", "cost_name"]]
        .sort_values(["strategy", "lr", "seed"], kind="stable")
        .reset_index(drop=True)
    )


ALL_REACHED = "all seeds reached the level; lowest mean cost"
MOST_REACHED = "fallback: no rate with every seed reaching the level; the rate with most seeds"
NEVER_REACHED = "no run reached the level"


def best_rate(matched: pd.DataFrame, *, minimize: bool = True) -> pd.DataFrame:
    """Per strategy, the learning rate to compare it at, from a `matched_points` table.

    Among the rates at which every run (seed) reached the level, the one with the lowest mean
    matched cost (highest with ``minimize=False``); when no rate has every seed reaching it,
    the rate with the most seeds reaching it (ties: the better mean cost); ties after that go
    to the smaller rate. Columns: ``strategy``, ``lr`` (NaN when no run reached the level),
    ``n_runs``, ``n_reached``, ``all_reached`` (bool), ``cost_mean`` (mean cost over the runs
    that reached the level at that rate), ``choice`` (which rule chose the rate, in words)."""
    per_rate = (
        matched.assign(reached=matched["reached"].astype(bool))
        .groupby(["strategy", "lr"], sort=True)
        .agg(
            n_runs=("run", "size"),
            n_reached=("reached", "sum"),
            cost_mean=("cost", "mean"),
        )
        .reset_index()
    )
    per_rate["all_reached"] = per_rate["n_reached"] == per_rate["n_runs"]
    per_rate["rank_cost"] = per_rate["cost_mean"] if minimize else -per_rate["cost_mean"]
    ranked = per_rate.sort_values(
        ["strategy", "all_reached", "n_reached", "rank_cost", "lr"],
        ascending=[True, False, False, True, True],
        kind="stable",
        na_position="last",
    )
    best = ranked.groupby("strategy", sort=False).head(1).reset_index(drop=True)
    best["choice"] = np.where(
        best["all_reached"],
        ALL_REACHED,
        np.where(best["n_reached"] > 0, MOST_REACHED, NEVER_REACHED),
    )
    best.loc[best["n_reached"] == 0, "lr"] = np.nan
    best["n_reached"] = best["n_reached"].astype(int)
    return best[["strategy", "lr", "n_runs", "n_reached", "all_reached", "cost_mean", "choice"]]


def matched_summary(
    matched: pd.DataFrame, best: pd.DataFrame | None = None, *, confidence: float = 0.95
) -> pd.DataFrame:
    """Per strategy at its chosen rate (`best`, default ``best_rate(matched)``): the matched
    cost over the runs (seeds) that reached the level.

    Columns: ``strategy``, ``lr``, ``n_runs``, ``n`` (runs that reached the level), ``cost``
    (mean, in the cost column's units), ``cost_low`` / ``cost_high`` (Student-t `confidence`
    interval of the mean; NaN for fewer than 2 runs), ``choice`` (from `best`). Strategies
    that never reached the level have n = 0 and NaN cost. Rows in the order of `best`."""
    _check_confidence(confidence)
    best = best_rate(matched) if best is None else best
    rows = matched[matched["reached"].astype(bool)].merge(
        best[["strategy", "lr"]], on=["strategy", "lr"]
    )
    stats = rows.groupby("strategy", sort=False)["cost"].agg(["mean", "std", "count"])
    low, high = _t_bounds(stats["mean"], stats["std"], stats["count"], confidence)
    stats = pd.DataFrame(
        {"n": stats["count"], "cost": stats["mean"], "cost_low": low, "cost_high": high},
        index=stats.index,
    )
    out = best[["strategy", "lr", "n_runs", "choice"]].set_index("strategy").join(stats)
    out["n"] = out["n"].fillna(0).astype(int)
    return out.reset_index()[
        ["strategy", "lr", "n_runs", "n", "cost", "cost_low", "cost_high", "choice"]
    ]


def compare_at_matched(
    matched: pd.DataFrame,
    reference: str = "circuit",
    *,
    best: pd.DataFrame | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Each strategy against `reference` at matched target performance.

    Every strategy (the reference included) is taken at its own learning rate from `best`
    (default: ``best_rate(matched)``), using only its runs that reached the level. For each
    other strategy: the **difference = cost(strategy) − cost(reference)** in the cost's units
    (with ``general_loss_change``, nats: a positive difference means the strategy forgets
    *more* than the reference, i.e. the reference forgets less).

    Columns: ``strategy``, ``lr``, ``reference``, ``reference_lr``, ``n_pairs`` (seeds where
    both reached the level: the same seed means the same data order), ``mean_difference``
    (mean over those seeds of the per-seed difference), ``low`` / ``high`` (its Student-t
    `confidence` interval, paired), ``p_paired`` (two-sided paired t-test of a zero mean
    difference; n_pairs - 1 df; NaN for fewer than 2 pairs; 1.0 when every difference is 0),
    ``n``, ``n_reference`` (reached runs of each), ``mean``, ``reference_mean`` (their mean
    costs), ``welch_difference`` (mean − reference_mean) and ``p_welch`` (two-sided Welch
    t-test, unequal variances, Welch–Satterthwaite df; NaN when a side has fewer than 2 runs).
    Rows in the order of `best`; the reference is not a row."""
    _check_confidence(confidence)
    best = best_rate(matched) if best is None else best
    if reference not in set(best["strategy"]):
        raise ValueError(f"reference strategy {reference!r} is not in the table")
    chosen = matched[matched["reached"].astype(bool)].merge(
        best[["strategy", "lr"]], on=["strategy", "lr"]
    )
    ref = chosen[chosen["strategy"] == reference]
    others = chosen[chosen["strategy"] != reference]
    reference_lr = float(best.loc[best["strategy"] == reference, "lr"].iloc[0])

    pairs = others.merge(ref[["seed", "cost"]], on="seed", suffixes=("", "_reference"))
    pairs["difference"] = pairs["cost"] - pairs["cost_reference"]
    paired = pairs.groupby("strategy", sort=False)["difference"].agg(["mean", "std", "count"])
    low, high = _t_bounds(paired["mean"], paired["std"], paired["count"], confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = paired["mean"] / (paired["std"] / np.sqrt(paired["count"]))
    p_paired = t_test_p_value(t.to_numpy(dtype=float), (paired["count"] - 1).to_numpy(dtype=float))
    p_paired = np.where((paired["std"] == 0) & (paired["mean"] == 0), 1.0, p_paired)
    p_paired = np.where(paired["count"] >= 2, p_paired, np.nan)
    paired_table = pd.DataFrame(
        {
            "n_pairs": paired["count"].astype(int),
            "mean_difference": paired["mean"],
            "low": low,
            "high": high,
            "p_paired": p_paired,
        },
        index=paired.index,
    )

    sides = others.groupby("strategy", sort=False)["cost"].agg(["mean", "var", "count"])
    r_mean, r_var, r_n = ref["cost"].mean(), ref["cost"].var(), len(ref)
    with np.errstate(invalid="ignore", divide="ignore"):
        # r_n may be 0 (the reference never reached the level): NaN, not ZeroDivisionError.
        a, b = sides["var"] / sides["count"], np.float64(r_var) / np.float64(r_n)
        welch_t = (sides["mean"] - r_mean) / np.sqrt(a + b)
        welch_df = (a + b) ** 2 / (a**2 / (sides["count"] - 1) + b**2 / (r_n - 1))
    p_welch = t_test_p_value(welch_t.to_numpy(dtype=float), welch_df.to_numpy(dtype=float))
    p_welch = np.where((sides["count"] >= 2) & (r_n >= 2), p_welch, np.nan)
    welch_table = pd.DataFrame(
        {
            "n": sides["count"].astype(int),
            "n_reference": r_n,
            "mean": sides["mean"],
            "reference_mean": r_mean,
            "welch_difference": sides["mean"] - r_mean,
            "p_welch": p_welch,
        },
        index=sides.index,
    )
    rows = best.loc[best["strategy"] != reference, ["strategy", "lr"]].set_index("strategy")
    out = rows.join(paired_table).join(welch_table).reset_index()
    out.insert(2, "reference", reference)
    out.insert(3, "reference_lr", reference_lr)
    out["n_pairs"] = out["n_pairs"].fillna(0).astype(int)
    out["n"] = out["n"].fillna(0).astype(int)
    out["n_reference"] = r_n
    out["reference_mean"] = r_mean
    return out


# ---------------------------------------------------------------------------------------------
# chance overlap of random circuits
# ---------------------------------------------------------------------------------------------
def _jaccard(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise Jaccard of two bool matrices, by the analyses' one Jaccard."""
    return jaccard(a.numpy(), b.numpy())


def _spread(values: np.ndarray, prefix: str) -> dict[str, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return {
        f"{prefix}_mean": float(values.mean()),
        f"{prefix}_low": float(low),
        f"{prefix}_high": float(high),
    }


def random_circuits(
    graph: Graph, n: int, draws: int, *, seed: int = 0, selection: str = "top_edges"
) -> tuple[list[Circuit], int]:
    """`draws` random circuits of size `n` (in the rule's unit) and the n actually used:
    standard-normal edge scores (one seeded generator, drawn at once as ``[draws, n_src,
    n_dst]``) fed to `circuitdyn.selection.select` with rule `selection`, as the tuning
    selects its circuit. For ``top_edges`` each is a uniformly random set of n edges."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(draws, graph.n_src, graph.n_dst, generator=generator)
    chosen = [select(Scores(graph, noise[i]), n, selection) for i in range(draws)]
    used = chosen[0].n if chosen else min(n, SELECTIONS[selection].n_max(graph))
    return [c.circuit for c in chosen], used


def chance_overlap(
    graph: Graph,
    n: int,
    reference: Circuit,
    draws: int = 200,
    seed: int = 0,
    selection: str = "top_edges",
) -> dict[str, Any]:
    """Chance levels of circuit overlap for random circuits of size `n` (edges for
    ``top_edges`` / ``greedy``, heads + MLPs for ``top_nodes``; clamped to what the graph has).

    `draws` pairs of independent random circuits (`random_circuits`, seeded by `seed`; 2 ·
    `draws` circuits in all). Returned keys, each ``*_mean`` with ``*_low`` / ``*_high`` (the
    2.5 / 97.5 percentiles over draws), all Jaccard indices in 0..1 (1.0 for two empty sets):

    * ``node_iou``: node-set Jaccard of a random circuit with `reference`;
    * ``edge_iou``: edge-set Jaccard of a random circuit with `reference`;
    * ``churn``: edge-set Jaccard between two independent random circuits of the same size
      (the overlap two unrelated selections share by chance);
    * ``node_churn``: the same for node sets;

    and ``n`` (the size used), ``draws``, ``selection``."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if reference.graph != graph:
        raise ValueError("the reference circuit is of another graph")
    circuits, used = random_circuits(graph, n, 2 * draws, seed=seed, selection=selection)
    edges = torch.stack([c.flat() for c in circuits])
    nodes = torch.stack([c.node_mask for c in circuits])
    first, second = slice(0, draws), slice(draws, 2 * draws)
    ref_edges, ref_nodes = reference.flat()[None, :], reference.node_mask[None, :]
    return {
        **_spread(_jaccard(nodes[first], ref_nodes), "node_iou"),
        **_spread(_jaccard(edges[first], ref_edges), "edge_iou"),
        **_spread(_jaccard(edges[first], edges[second]), "churn"),
        **_spread(_jaccard(nodes[first], nodes[second]), "node_churn"),
        "n": used,
        "draws": draws,
        "selection": selection,
    }


__all__ = [
    "ALL_REACHED",
    "MOST_REACHED",
    "NEVER_REACHED",
    "RUN_KEYS",
    "best_rate",
    "chance_overlap",
    "compare_at_matched",
    "interval",
    "matched_points",
    "matched_summary",
    "pareto_front",
    "random_circuits",
    "strategy_fronts",
    "t_quantile",
]
