"""Edge trajectories: each edge's score over training, its linear trend and its rank.

Only attributed steps count (`circuitdyn.analysis.dynamics.attributed_steps`): on other steps the
scores are NaN and are skipped, as is any stray non-finite score.

Trend of one edge: ordinary least squares of the signed score (metric units, e.g. logits) on the
step number, over the edge's finite points: ``slope`` (score units per step), ``intercept``,
Pearson ``r`` and the two-sided p-value of the t-test of r = 0 (t = r sqrt((n-2)/(1-r^2)), n - 2
degrees of freedom), with Benjamini-Hochberg q-values across the edges tested. An edge
*strengthens* when the magnitude of its fitted line grows from its first to its last point
(|fit(last)| > |fit(first)|) and *weakens* when it shrinks; that direction is reported only
for significant trends (q < alpha).

The Student-t tail probability is computed here with the regularized incomplete beta function
(`math.lgamma` and a continued fraction, vectorised in numpy), so scipy is not needed.

Memory. `edge_trends` reads the scores of every edge in chunks of steps and keeps only running
sums per edge (O(n_edges) memory, whatever the number of steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from circuitdyn.analysis.dynamics import _chunks, attributed_steps, edge_info
from circuitdyn.store import RunStore


# ---------------------------------------------------------------------------------------------
# Student-t p-values without scipy
# ---------------------------------------------------------------------------------------------
def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray, iterations: int = 300) -> np.ndarray:
    """Continued fraction of the incomplete beta function (modified Lentz), vectorised."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    done = np.zeros(x.shape, dtype=bool)
    for m in range(1, iterations + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        h = np.where(done, h, h * d * c)
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h = np.where(done, h, h * delta)
        done |= np.abs(delta - 1.0) < 3e-16
        if done.all():
            break
    return h


def betainc_regularized(
    a: np.ndarray | float, b: np.ndarray | float, x: np.ndarray | float
) -> np.ndarray:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1]
    (elementwise, broadcasting; relative accuracy ~1e-14)."""
    a, b, x = np.broadcast_arrays(
        np.asarray(a, dtype=float), np.asarray(b, dtype=float), np.asarray(x, dtype=float)
    )
    out = np.full(x.shape, np.nan)
    inside = (x > 0) & (x < 1) & (a > 0) & (b > 0)
    out[(x <= 0) & (a > 0) & (b > 0)] = 0.0
    out[(x >= 1) & (a > 0) & (b > 0)] = 1.0
    if inside.any():
        ai, bi, xi = a[inside], b[inside], x[inside]
        lgamma = np.vectorize(math.lgamma, otypes=[float])
        log_front = lgamma(ai + bi) - lgamma(ai) - lgamma(bi) + ai * np.log(xi) + bi * np.log1p(-xi)
        front = np.exp(log_front)
        direct = xi < (ai + 1.0) / (ai + bi + 2.0)
        value = np.empty_like(xi)
        if direct.any():
            value[direct] = front[direct] * _betacf(ai[direct], bi[direct], xi[direct]) / ai[direct]
        flip = ~direct
        if flip.any():
            value[flip] = 1.0 - front[flip] * _betacf(bi[flip], ai[flip], 1.0 - xi[flip]) / bi[flip]
        out[inside] = np.clip(value, 0.0, 1.0)
    return out


def t_test_p_value(t: np.ndarray | float, df: np.ndarray | float) -> np.ndarray:
    """Two-sided p-value P(|T| >= |t|) of Student's t with ``df`` degrees of freedom
    (elementwise; NaN where df <= 0 or t is NaN; 0 for infinite t)."""
    t, df = np.broadcast_arrays(np.asarray(t, dtype=float), np.asarray(df, dtype=float))
    out = np.full(t.shape, np.nan)
    ok = (df > 0) & ~np.isnan(t)
    if ok.any():
        tt, dd = t[ok], df[ok]
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.where(np.isinf(tt), 0.0, dd / (dd + tt * tt))
        out[ok] = betainc_regularized(dd / 2.0, 0.5, x)
    return out


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (false discovery rate) of ``p_values``; NaNs are ignored (and
    stay NaN), the others are the m tests."""
    p = np.asarray(p_values, dtype=float)
    q = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if m == 0:
        return q
    order = valid[np.argsort(p[valid], kind="stable")]
    ranked = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return q


def linear_trend(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """OLS trend of y on x for one series (NaN points skipped): ``n``, ``slope`` (y units per x
    unit), ``intercept``, ``r`` (Pearson) and ``p_value`` (two-sided t-test of r = 0, n - 2 df;
    NaN for n < 3 or constant y)."""
    stats = _Sums(1)
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float).reshape(-1, 1)
    stats.add(xs, ys)
    row = stats.finish()
    return {key: float(row[key][0]) for key in ("n", "slope", "intercept", "r", "p_value")}


class _Sums:
    """Running sums of one OLS fit per column (an edge), shifted for numerical stability."""

    def __init__(self, n_series: int) -> None:
        self.x0: float | None = None
        self.y0 = np.zeros(n_series)
        self.y0_set = np.zeros(n_series, dtype=bool)
        shape = (n_series,)
        self.n = np.zeros(shape)
        self.sx, self.sy, self.sxx, self.sxy, self.syy = (np.zeros(shape) for _ in range(5))
        self.sabs = np.zeros(shape)
        self.first_step = np.full(shape, np.nan)
        self.last_step = np.full(shape, np.nan)
        self.first_score = np.full(shape, np.nan)
        self.last_score = np.full(shape, np.nan)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """x: [c] steps; y: [c, n_series] scores (non-finite entries skipped)."""
        y = y.astype(np.float64)
        finite = np.isfinite(y)
        if self.x0 is None and x.size:
            self.x0 = float(x[0])
        if not finite.any():
            return
        # Shift each series by its first finite value, so the sums stay well conditioned.
        first_row = np.argmax(finite, axis=0)
        has = finite.any(axis=0)
        new = has & ~self.y0_set
        self.y0[new] = y[first_row[new], np.flatnonzero(new)]
        self.y0_set |= new
        self.first_step[new] = x[first_row[new]]
        self.first_score[new] = self.y0[new]
        last_row = y.shape[0] - 1 - np.argmax(finite[::-1], axis=0)
        self.last_step[has] = x[last_row[has]]
        self.last_score[has] = y[last_row[has], np.flatnonzero(has)]
        f = finite.astype(np.float64)
        dx = (x.astype(np.float64) - self.x0)[:, None] * f
        dy = np.where(finite, y - self.y0, 0.0)
        self.n += f.sum(axis=0)
        self.sx += dx.sum(axis=0)
        self.sy += dy.sum(axis=0)
        self.sxx += (dx * dx).sum(axis=0)
        self.sxy += (dx * dy).sum(axis=0)
        self.syy += (dy * dy).sum(axis=0)
        self.sabs += np.abs(np.where(finite, y, 0.0)).sum(axis=0)

    def finish(self) -> dict[str, np.ndarray]:
        n = self.n
        with np.errstate(invalid="ignore", divide="ignore"):
            mx, my = self.sx / n, self.sy / n
            vxx = self.sxx - self.sx * mx
            vxy = self.sxy - self.sx * my
            vyy = self.syy - self.sy * my
            vyy = np.where(vyy <= 1e-12 * np.maximum(self.syy, 1e-300), 0.0, vyy)
            slope = np.where(vxx > 0, vxy / vxx, np.nan)
            x0 = self.x0 if self.x0 is not None else 0.0
            intercept = (my + self.y0) - slope * (mx + x0)
            r = np.clip(vxy / np.sqrt(vxx * vyy), -1.0, 1.0)
            r = np.where((vxx > 0) & (vyy > 0), r, np.nan)
            df = n - 2
            t = r * np.sqrt(df / np.maximum(1.0 - r * r, 0.0))
        p = t_test_p_value(np.where(df > 0, t, np.nan), np.where(df > 0, df, 0.0))
        mean_score = np.where(n > 0, my + self.y0, np.nan)
        return {
            "n": n,
            "slope": slope,
            "intercept": intercept,
            "r": r,
            "p_value": p,
            "mean_score": mean_score,
            "mean_abs_score": np.where(n > 0, self.sabs / np.maximum(n, 1), np.nan),
            "first_step": self.first_step,
            "last_step": self.last_step,
            "first_score": self.first_score,
            "last_score": self.last_score,
        }


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def edge_trends(
    store: RunStore,
    edges: Sequence[str] | None = None,
    *,
    alpha: float = 0.05,
    min_points: int = 3,
) -> pd.DataFrame:
    """The linear trend of every edge's score over the attributed steps.

    ``edges``: the edges to fit (default: every valid edge). Columns: ``edge``, ``src``, ``dst``,
    ``n_points`` (finite scores), ``first_step``, ``last_step``, ``first_score``,
    ``last_score``, ``mean_score``, ``mean_abs_score`` (metric units), ``slope`` (metric units
    per step), ``intercept``, ``r``, ``p_value``, ``q_value`` (Benjamini-Hochberg over the edges
    with a p-value), ``significant`` (q < ``alpha``), ``direction`` (``"strengthens"``,
    ``"weakens"`` or ``"n.s."``; see the module docstring). Edges with fewer than ``min_points``
    points get NaN statistics. Rows in the order of ``edges`` (default ``store.edge_names``).
    """
    names = list(store.edge_names if edges is None else edges)
    steps = attributed_steps(store)
    sums = _Sums(len(names))
    for chunk in _chunks(steps):
        sums.add(np.asarray(chunk, dtype=float), store.scores(chunk, edges=names))
    stats = sums.finish()
    few = stats["n"] < max(min_points, 3)
    for key in ("slope", "intercept", "r", "p_value"):
        stats[key] = np.where(few, np.nan, stats[key])
    q = benjamini_hochberg(stats["p_value"])
    significant = np.nan_to_num(q, nan=1.0) < alpha
    fit_first = stats["intercept"] + stats["slope"] * stats["first_step"]
    fit_last = stats["intercept"] + stats["slope"] * stats["last_step"]
    grows = np.abs(fit_last) > np.abs(fit_first)
    direction = np.where(significant, np.where(grows, "strengthens", "weakens"), "n.s.")
    return edge_info(names)[["edge", "src", "dst"]].assign(
        n_points=stats["n"].astype(np.int64),
        first_step=_int_or_na(stats["first_step"]),
        last_step=_int_or_na(stats["last_step"]),
        first_score=stats["first_score"],
        last_score=stats["last_score"],
        mean_score=stats["mean_score"],
        mean_abs_score=stats["mean_abs_score"],
        slope=stats["slope"],
        intercept=stats["intercept"],
        r=stats["r"],
        p_value=stats["p_value"],
        q_value=q,
        significant=significant,
        direction=direction,
    )


def _int_or_na(values: np.ndarray) -> pd.arrays.IntegerArray:
    return pd.array([None if np.isnan(v) else int(v) for v in values], dtype="Int64")


def changing_edges(trends: pd.DataFrame, direction: str, top_k: int | None = None) -> pd.DataFrame:
    """The significant ``"strengthens"`` or ``"weakens"`` rows of an `edge_trends` table, the
    steepest (largest |slope|) first; at most ``top_k`` rows."""
    if direction not in ("strengthens", "weakens"):
        raise ValueError(f"direction must be 'strengthens' or 'weakens', got {direction!r}")
    rows = trends[trends["direction"] == direction]
    rows = rows.reindex(rows["slope"].abs().sort_values(ascending=False, kind="stable").index)
    rows = rows.reset_index(drop=True)
    return rows if top_k is None else rows.head(top_k)


def top_edges(trends: pd.DataFrame, k: int = 10) -> list[str]:
    """The ``k`` edges with the largest mean |score| in an `edge_trends` table."""
    order = trends["mean_abs_score"].fillna(-1.0).sort_values(ascending=False, kind="stable")
    return [trends.at[i, "edge"] for i in order.index[:k] if order[i] >= 0]


def edge_trajectories(
    store: RunStore, edges: Sequence[str] | None = None, *, top_k: int = 10
) -> pd.DataFrame:
    """Scores of some edges over the attributed steps, long format: ``edge``, ``step``,
    ``score`` (metric units); non-finite scores are dropped. ``edges`` default: the ``top_k``
    edges with the largest mean |score| (one streaming pass over all edges). Rows grouped by
    edge (in the given / ranked order), then by step."""
    if edges is None:
        edges = top_edges(edge_trends(store), top_k)
    names = list(edges)
    steps = attributed_steps(store)
    values = (
        store.scores(steps, edges=names) if steps and names else np.zeros((len(steps), len(names)))
    )
    frames = []
    for j, name in enumerate(names):
        column = values[:, j].astype(float)
        keep = np.isfinite(column)
        frames.append(
            pd.DataFrame(
                {
                    "edge": name,
                    "step": np.asarray(steps, dtype=np.int64)[keep],
                    "score": column[keep],
                }
            )
        )
    if not frames:
        return pd.DataFrame(
            {
                "edge": pd.Series([], dtype=object),
                "step": pd.Series([], dtype="int64"),
                "score": pd.Series([], dtype=float),
            }
        )
    return pd.concat(frames, ignore_index=True)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of each entry by |score| (1 = largest; ties: earlier first; NaN ranks last)."""
    keys = np.where(np.isfinite(scores), np.abs(scores), -np.inf)
    order = np.argsort(-keys, kind="stable")
    ranks = np.empty(scores.size, dtype=np.int64)
    ranks[order] = np.arange(1, scores.size + 1)
    return ranks


def rank_changes(
    store: RunStore, top_k: int = 20, steps: tuple[int, int] | None = None
) -> pd.DataFrame:
    """How the top edges' ranks (by |score|, 1 = strongest, among all valid edges) changed
    between the first and the last attributed step (or the two ``steps`` given).

    Rows: the edges in the top ``top_k`` at either step. Columns: ``edge``, ``step_first``,
    ``step_last``, ``score_first``, ``score_last`` (metric units), ``rank_first``,
    ``rank_last``, ``rank_change`` (rank_first - rank_last: positive means the edge rose),
    ``top_first``, ``top_last`` (bool). Sorted by ``rank_last``.
    """
    if steps is None:
        attributed = attributed_steps(store)
        if not attributed:
            raise ValueError(f"{store.directory}: no attributed step (all scores are NaN)")
        steps = (attributed[0], attributed[-1])
    first, last = steps
    names = store.edge_names
    values = store.scores([first, last], edges=names).astype(float)
    rank_first, rank_last = _ranks(values[0]), _ranks(values[1])
    keep = np.flatnonzero((rank_first <= top_k) | (rank_last <= top_k))
    frame = pd.DataFrame(
        {
            "edge": [names[i] for i in keep],
            "step_first": first,
            "step_last": last,
            "score_first": values[0, keep],
            "score_last": values[1, keep],
            "rank_first": rank_first[keep],
            "rank_last": rank_last[keep],
            "rank_change": rank_first[keep] - rank_last[keep],
            "top_first": rank_first[keep] <= top_k,
            "top_last": rank_last[keep] <= top_k,
        }
    )
    return frame.sort_values("rank_last", kind="stable").reset_index(drop=True)
