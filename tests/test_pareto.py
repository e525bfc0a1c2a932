"""Pareto fronts, matched-performance comparisons and chance overlap (`circuitdyn.analysis.pareto`)
and their figures, on hand-made tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from figure_check import assert_trace_equals, check_figure, trace_named, values

from circuitdyn import plots as P
from circuitdyn.analysis import pareto as A
from circuitdyn.analysis.trajectories import t_test_p_value
from circuitdyn.circuit import Circuit
from circuitdyn.graph import Graph

# Student-t quantiles t_{0.975, df} (published tables, 10 significant digits).
T975 = {1: 12.70620474, 2: 4.302652730, 4: 2.776445105, 9: 2.262157163, 29: 2.045229642}


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) by Simpson integration of the Student-t density (independent of the
    incomplete-beta code under test)."""
    t = abs(t)
    grid = np.linspace(0.0, t, 20001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(grid**2 / df))
    h = grid[1] - grid[0]
    inner = (
        h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())
    )
    return 1.0 - 2.0 * inner


# ---------------------------------------------------------------------------------------------
# Student-t
# ---------------------------------------------------------------------------------------------
def test_t_quantile_matches_tables():
    dfs = list(T975)
    np.testing.assert_allclose(A.t_quantile(0.975, dfs), [T975[d] for d in dfs], rtol=1e-8)
    assert np.isnan(A.t_quantile(0.975, [0, np.nan])).all()
    np.testing.assert_allclose(A.t_quantile(0.975, 1e7), 1.959963985, rtol=1e-6)


def test_interval_equals_hand_computation():
    mean, low, high = A.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = T975[4] * math.sqrt(2.5) / math.sqrt(5)  # sample variance 2.5, n = 5
    assert mean == 3.0
    assert low == pytest.approx(3.0 - half, rel=1e-8)
    assert high == pytest.approx(3.0 + half, rel=1e-8)
    # NaNs dropped; one value: NaN bounds; none: all NaN.
    assert A.interval([1.0, np.nan, 3.0])[1] == pytest.approx(2.0 - T975[1] * 1.0, rel=1e-8)
    m1, l1, h1 = A.interval([2.0, np.nan])
    assert m1 == 2.0 and math.isnan(l1) and math.isnan(h1)
    assert all(math.isnan(v) for v in A.interval([]))
    with pytest.raises(ValueError, match="confidence"):
        A.interval([1.0, 2.0], confidence=1.5)


# ---------------------------------------------------------------------------------------------
# fronts
# ---------------------------------------------------------------------------------------------
def test_pareto_front_of_hand_made_points():
    points = pd.DataFrame(
        {
            "name": ["A", "B", "C", "D", "E", "F", "G"],
            "cost": [0.0, 1.0, 2.0, 3.0, 1.0, np.nan, 3.0],
            "acc": [0.5, 0.8, 0.7, 0.9, 0.8, 1.0, 0.85],
        }
    )
    # Minimise cost, maximise accuracy: C is dominated by B, G by D; B and E are copies (both
    # stay); F has no cost (never on the front).
    front = A.pareto_front(points, "cost", "acc", maximize_x=False, maximize_y=True)
    assert list(front["name"]) == ["A", "B", "E", "D"]
    assert front["cost"].is_monotonic_increasing
    # Maximise both: only D (largest cost and accuracy) survives among the finite points.
    both = A.pareto_front(points, "cost", "acc", maximize_x=True, maximize_y=True)
    assert list(both["name"]) == ["D"]
    # Minimise both: A.
    assert list(
        A.pareto_front(points, "cost", "acc", maximize_x=False, maximize_y=False)["name"]
    ) == ["A"]


def _evals_two_seeds() -> pd.DataFrame:
    """Strategy s, one lr, steps 0/1/2, seeds 0/1; strategy t, one step."""
    rows = [
        # strategy, lr, seed, step, acc, cost
        ("s", 0.1, 0, 0, 0.2, 0.0),
        ("s", 0.1, 1, 0, 0.2, 0.0),
        ("s", 0.1, 0, 1, 0.6, 0.4),
        ("s", 0.1, 1, 1, 0.8, 0.2),  # mean (0.7, 0.3)
        ("s", 0.1, 0, 2, 0.6, 0.6),
        ("s", 0.1, 1, 2, 0.6, 0.8),  # mean (0.6, 0.7): dominated by step 1
        ("t", 1.0, 0, 3, 0.9, 1.0),
    ]
    frame = pd.DataFrame(
        rows, columns=["strategy", "lr", "seed", "step", "target_accuracy", "general_loss_change"]
    )
    frame["run"] = (
        frame["strategy"] + "_lr" + frame["lr"].astype(str) + "_s" + frame["seed"].astype(str)
    )
    return frame


def test_strategy_fronts_means_intervals_and_front():
    fronts = A.strategy_fronts(_evals_two_seeds()).set_index(["strategy", "step"])
    s1 = fronts.loc[("s", 1)]
    assert s1["n"] == 2
    assert s1["target_accuracy"] == pytest.approx(0.7)
    assert s1["general_loss_change"] == pytest.approx(0.3)
    half = T975[1] * np.std([0.6, 0.8], ddof=1) / math.sqrt(2)
    assert s1["target_accuracy_low"] == pytest.approx(0.7 - half)
    assert s1["target_accuracy_high"] == pytest.approx(0.7 + half)
    assert fronts["on_front"].to_dict() == {
        ("s", 0): True,
        ("s", 1): True,
        ("s", 2): False,
        ("t", 3): True,
    }
    # One seed: NaN interval.
    assert math.isnan(fronts.loc[("t", 3), "general_loss_change_low"])
    # Maximising the cost instead (e.g. capability change): step 2 has the largest cost.
    flipped = A.strategy_fronts(_evals_two_seeds(), minimize_cost=False).set_index(
        ["strategy", "step"]
    )
    assert flipped.loc[("s", 2), "on_front"] and flipped.loc[("s", 1), "on_front"]
    assert not flipped.loc[("s", 0), "on_front"]


# ---------------------------------------------------------------------------------------------
# matched points, best rate, comparison
# ---------------------------------------------------------------------------------------------
def _trajectory(run: str, accs, costs, *, strategy="s", lr=0.1, seed=0, steps=None) -> pd.DataFrame:
    steps = steps if steps is not None else [10 * i for i in range(len(accs))]
    return pd.DataFrame(
        {
            "strategy": strategy,
            "lr": lr,
            "seed": seed,
            "run": run,
            "step": steps,
            "target_accuracy": accs,
            "general_loss_change": costs,
        }
    )


def test_matched_points_first_step_and_interpolated_cost():
    evals = pd.concat(
        [
            # Crosses 0.8 between step 10 (0.5) and 20 (0.9): 3/4 of the way.
            _trajectory("a", [0.2, 0.5, 0.9, 0.95], [0.0, 0.1, 0.3, 0.5], seed=0),
            _trajectory("b", [0.2, 0.4, 0.6], [0.0, 0.2, 0.4], seed=1),  # never reaches 0.8
            _trajectory("c", [0.85, 0.9], [0.0, 0.3], seed=2),  # already at step 0
            # Out-of-order rows and a NaN evaluation: sorted by step, the NaN skipped.
            _trajectory("d", [0.9, np.nan, 0.0], [0.6, 9.0, 0.0], seed=3, steps=[20, 10, 0]),
        ]
    )
    matched = A.matched_points(evals, 0.8).set_index("run")
    a = matched.loc["a"]
    assert a["reached"] and a["step"] == 20 and a["target_value"] == 0.9
    assert a["crossing_step"] == pytest.approx(17.5)
    assert a["cost"] == pytest.approx(0.1 + 0.75 * 0.2)
    b = matched.loc["b"]
    assert not b["reached"] and math.isnan(b["step"]) and math.isnan(b["cost"])
    assert matched.loc["c", "step"] == 0 and matched.loc["c", "cost"] == 0.0
    d = matched.loc["d"]  # from (0, 0.0) to (20, 0.9): 8/9 of the way
    assert d["crossing_step"] == pytest.approx(20 * 8 / 9)
    assert d["cost"] == pytest.approx(0.6 * 8 / 9)
    assert (matched["level"] == 0.8).all() and (matched["cost_name"] == "general_loss_change").all()
    plain = A.matched_points(evals, 0.8, interpolate=False).set_index("run")
    assert plain.loc["a", "cost"] == 0.3 and plain.loc["a", "crossing_step"] == 20
    # Another cost column.
    other = evals.assign(capability_accuracy_change=-evals["general_loss_change"])
    cap = A.matched_points(other, 0.8, cost="capability_accuracy_change").set_index("run")
    assert cap.loc["a", "cost"] == pytest.approx(-0.25)


def _matched(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["strategy", "lr", "seed", "cost"])
    frame["run"] = frame["strategy"] + frame["lr"].astype(str) + "_s" + frame["seed"].astype(str)
    frame["reached"] = frame["cost"].notna()
    frame["level"] = 0.8
    return frame


def test_best_rate_prefers_all_seeds_then_lowest_cost_with_fallback():
    matched = _matched(
        [
            ("x", 0.1, 0, 0.5),
            ("x", 0.1, 1, 0.5),  # all reached, cost 0.5
            ("x", 0.3, 0, 0.2),
            ("x", 0.3, 1, 0.4),  # all reached, cost 0.3: chosen
            ("x", 1.0, 0, 0.0),
            ("x", 1.0, 1, None),  # cheaper but one seed missing
            ("y", 0.1, 0, 0.9),
            ("y", 0.1, 1, None),
            ("y", 0.1, 2, None),
            ("y", 0.3, 0, 0.7),
            ("y", 0.3, 1, 0.8),
            ("y", 0.3, 2, None),  # most seeds: chosen
            ("z", 0.1, 0, None),
            ("z", 0.1, 1, None),
        ]
    )
    best = A.best_rate(matched).set_index("strategy")
    assert best.loc["x", "lr"] == 0.3 and best.loc["x", "cost_mean"] == pytest.approx(0.3)
    assert best.loc["x", "choice"] == A.ALL_REACHED and best.loc["x", "all_reached"]
    assert best.loc["y", "lr"] == 0.3 and best.loc["y", "n_reached"] == 2
    assert best.loc["y", "choice"] == A.MOST_REACHED
    assert math.isnan(best.loc["z", "lr"]) and best.loc["z", "choice"] == A.NEVER_REACHED
    # Maximising instead picks the costlier all-reached rate.
    assert A.best_rate(matched, minimize=False).set_index("strategy").loc["x", "lr"] == 0.1


def test_compare_at_matched_detects_a_large_difference_and_not_a_zero_one():
    rng = np.random.default_rng(0)
    ref = 0.1 + 0.01 * rng.standard_normal(5)
    rows = [("circuit", 0.01, s, ref[s]) for s in range(5)]
    rows += [("circuit", 0.1, s, ref[s] - 1.0) for s in range(4)] + [("circuit", 0.1, 4, None)]
    rows += [("full", 1e-3, s, ref[s] + 0.5 + 0.02 * rng.standard_normal()) for s in range(5)]
    zero = [-0.01, 0.01, -0.02, 0.02, 0.0]  # paired differences with mean 0
    rows += [("fixed", 1e-3, s, ref[s] + zero[s]) for s in range(5)]
    hand = [0.1, 0.2, 0.3, 0.4, 0.5]  # paired differences 0.1 .. 0.5; only seeds 0-3 reach
    rows += [("random", 1e-3, s, ref[s] + hand[s]) for s in range(4)] + [("random", 1e-3, 4, None)]
    matched = _matched(rows)
    out = A.compare_at_matched(matched, reference="circuit").set_index("strategy")
    assert list(out.index) == ["fixed", "full", "random"]
    assert (out["reference_lr"] == 0.01).all()  # the rate with every seed reached

    full = out.loc["full"]
    assert full["n_pairs"] == 5 and full["mean_difference"] == pytest.approx(0.5, abs=0.03)
    assert full["low"] > 0 and full["p_paired"] < 0.01 and full["p_welch"] < 0.01

    fixed = out.loc["fixed"]
    assert fixed["mean_difference"] == pytest.approx(0.0, abs=1e-12)
    assert fixed["p_paired"] == pytest.approx(1.0) and fixed["low"] < 0 < fixed["high"]
    assert fixed["p_welch"] > 0.5

    random = out.loc["random"]  # by hand: seeds 0-3, differences 0.1 .. 0.4
    d = np.array(hand[:4])
    t = d.mean() / (d.std(ddof=1) / 2.0)
    assert random["n_pairs"] == 4 and random["mean_difference"] == pytest.approx(0.25)
    assert random["p_paired"] == pytest.approx(t_two_sided_p(t, 3), rel=1e-6)
    half = A.t_quantile(0.975, 3)[0] * d.std(ddof=1) / 2.0
    assert random["low"] == pytest.approx(0.25 - half) and random["high"] == pytest.approx(
        0.25 + half
    )
    # Welch by hand: 4 runs of random against the 5 of circuit.
    a, b = ref[:4] + d, ref
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 5
    t_w = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df_w = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 4)
    assert random["welch_difference"] == pytest.approx(a.mean() - b.mean())
    np.testing.assert_allclose(random["p_welch"], t_test_p_value(t_w, df_w), rtol=1e-10)
    assert random["n"] == 4 and random["n_reference"] == 5

    with pytest.raises(ValueError, match="reference"):
        A.compare_at_matched(matched, reference="lora")


def test_matched_summary_at_best_rate():
    matched = _matched(
        [("x", 0.1, s, c) for s, c in enumerate([1.0, 2.0, 3.0])] + [("z", 0.1, 0, None)]
    )
    summary = A.matched_summary(matched).set_index("strategy")
    assert summary.loc["x", "cost"] == 2.0 and summary.loc["x", "n"] == 3
    assert summary.loc["x", "cost_high"] == pytest.approx(2.0 + T975[2] / math.sqrt(3))
    assert summary.loc["z", "n"] == 0 and math.isnan(summary.loc["z", "cost"])


# ---------------------------------------------------------------------------------------------
# chance overlap
# ---------------------------------------------------------------------------------------------
def _expected_random_jaccard(total: int, n: int) -> float:
    """E[|A∩B| / |A∪B|] of two independent uniform n-subsets of `total` items (hypergeometric)."""
    out = 0.0
    for k in range(max(0, 2 * n - total), n + 1):
        p = math.comb(n, k) * math.comb(total - n, n - k) / math.comb(total, n)
        out += p * (k / (2 * n - k) if 2 * n - k else 1.0)
    return out


def test_chance_overlap_matches_independent_estimates():
    graph = Graph(2, 2)
    n = 10
    reference = Circuit.from_edges(graph, graph.edge_names[:n])
    draws = 300
    chance = A.chance_overlap(graph, n, reference, draws=draws, seed=1)
    assert chance["n"] == n and chance["draws"] == draws and chance["selection"] == "top_edges"
    for key in ("node_iou", "edge_iou", "churn", "node_churn"):
        assert 0.0 <= chance[f"{key}_low"] <= chance[f"{key}_mean"] <= chance[f"{key}_high"] <= 1.0

    # Edge Jaccard of two random n-edge sets: exact hypergeometric expectation.
    total = graph.n_edges
    expected = _expected_random_jaccard(total, n)
    assert chance["churn_mean"] == pytest.approx(expected, abs=0.02)
    assert chance["edge_iou_mean"] == pytest.approx(expected, abs=0.02)  # reference: n fixed edges

    # Node IoU with the reference: an independent Monte Carlo with numpy permutations.
    rng = np.random.default_rng(123)
    ious = []
    for _ in range(2000):
        pick = torch.zeros(total, dtype=torch.bool)
        pick[torch.from_numpy(rng.permutation(total)[:n])] = True
        ious.append(Circuit.from_flat(graph, pick).jaccard_nodes(reference))
    assert chance["node_iou_mean"] == pytest.approx(np.mean(ious), abs=0.03)

    # Deterministic per seed.
    again = A.chance_overlap(graph, n, reference, draws=draws, seed=1)
    assert again == chance


def test_chance_overlap_with_every_edge_and_other_rules():
    graph = Graph(2, 2)
    full = Circuit.full(graph)
    chance = A.chance_overlap(graph, graph.n_edges + 50, full, draws=5)  # n clamped
    assert chance["n"] == graph.n_edges
    for key in ("node_iou", "edge_iou", "churn", "node_churn"):
        assert chance[f"{key}_mean"] == 1.0 and chance[f"{key}_low"] == 1.0
    nodes = A.chance_overlap(graph, 2, full, draws=20, selection="top_nodes")
    assert nodes["n"] == 2 and 0.0 < nodes["node_iou_mean"] < 1.0
    circuits, used = A.random_circuits(graph, 6, 4, selection="greedy", seed=0)
    assert used == 6 and all(c.n_edges == 6 for c in circuits)
    with pytest.raises(ValueError, match="another graph"):
        A.chance_overlap(Graph(1, 2), 3, full, draws=2)


# ---------------------------------------------------------------------------------------------
# a synthetic sweep, end to end, and the figures
# ---------------------------------------------------------------------------------------------
STRATEGIES = {"circuit": 0.2, "full": 1.0, "lora": 0.6}  # forgetting per unit of progress


def synthetic_evals(seeds: int = 5) -> pd.DataFrame:
    """Accuracy rises as 1 - exp(-lr·step/20); the LM loss rises by the strategy's forgetting
    rate times lr·step/20 (plus seeded noise): circuit-tuning forgets least at every accuracy."""
    rng = np.random.default_rng(0)
    frames = []
    for strategy, forget in STRATEGIES.items():
        for lr in (0.5, 1.0, 2.0):
            for seed in range(seeds):
                steps = np.arange(0, 101, 10)
                progress = lr * steps / 20.0
                noise = rng.normal(0, 0.01, len(steps))
                noise[0] = 0.0
                frames.append(
                    pd.DataFrame(
                        {
                            "strategy": strategy,
                            "lr": lr,
                            "seed": seed,
                            "run": f"{strategy}_lr{lr}_s{seed}",
                            "step": steps,
                            "target_accuracy": np.clip(1 - 0.8 * np.exp(-progress) + noise, 0, 1),
                            "target_metric": progress,
                            "general_loss_change": forget * progress * (1 + lr / 4) + noise,
                            "capability_accuracy_change": -forget * progress / 10,
                            "tunable_fraction": 0.1 if strategy == "circuit" else 1.0,
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)


def test_synthetic_sweep_circuit_forgets_less():
    evals = synthetic_evals()
    matched = A.matched_points(evals, 0.8)
    assert matched["reached"].all() and len(matched) == 3 * 3 * 5
    best = A.best_rate(matched).set_index("strategy")
    assert (best["lr"] == 0.5).all()  # the smallest rate forgets least per unit of progress
    out = A.compare_at_matched(matched).set_index("strategy")
    assert (out["mean_difference"] > 0).all() and (out["p_paired"] < 0.01).all()
    assert out.loc["full", "mean_difference"] > out.loc["lora", "mean_difference"]


def _figures():
    evals = synthetic_evals()
    fronts = A.strategy_fronts(evals)
    matched = A.matched_points(evals, 0.8)
    summary = A.matched_summary(matched)
    compare = A.compare_at_matched(matched)
    return (
        fronts,
        matched,
        summary,
        P.pareto_figure(fronts, matched),
        P.matched_cost_figure(matched, summary, compare),
    )


def test_pareto_figure_draws_every_point_and_each_front():
    fronts, _, _, fig, _ = _figures()
    check_figure(fig, "pareto")
    assert fig.layout.xaxis.title.text == P.PARETO_LABELS["general_loss_change"]
    for strategy in STRATEGIES:
        rows = fronts[fronts["strategy"] == strategy]
        every = trace_named(fig, f"{strategy}: every lr and step")
        assert_trace_equals(
            every, x=rows["general_loss_change"].tolist(), y=rows["target_accuracy"].tolist()
        )
        front = rows[rows["on_front"]].sort_values(["general_loss_change", "target_accuracy"])
        line = trace_named(fig, strategy)
        assert_trace_equals(
            line, x=front["general_loss_change"].tolist(), y=front["target_accuracy"].tolist()
        )
        np.testing.assert_allclose(
            values(line.error_y.array),
            (front["target_accuracy_high"] - front["target_accuracy"]).to_numpy(),
        )
        assert strategy in line.hovertemplate and "seeds" in line.hovertemplate
    dashed = [s for s in fig.layout.shapes if s.line.dash == "dash"]
    assert len(dashed) == 1 and dashed[0].y0 == 0.8


def test_matched_cost_figure_draws_seeds_and_means():
    _, matched, summary, _, fig = _figures()
    check_figure(fig, "matched cost")
    for strategy in STRATEGIES:
        row = summary.set_index("strategy").loc[strategy]
        mean = trace_named(fig, strategy)
        assert_trace_equals(mean, y=[row["cost"]])
        np.testing.assert_allclose(values(mean.error_y.array), [row["cost_high"] - row["cost"]])
        seeds = trace_named(fig, f"{strategy}: per seed")
        runs = matched[
            (matched["strategy"] == strategy) & (matched["lr"] == row["lr"])
        ].sort_values("seed")
        assert_trace_equals(seeds, y=runs["cost"].tolist())
    full = A.compare_at_matched(matched).set_index("strategy").loc["full"]
    assert f"Δ {full['mean_difference']:+.3g}" in fig.layout.xaxis.ticktext[1]
    assert "circuit's" in fig.layout.xaxis.title.text
    # Without a comparison, and for one strategy only.
    check_figure(P.matched_cost_figure(matched, summary.iloc[:1]), "one strategy")


def test_figures_keep_strategy_colours_and_show_strategies_that_never_reach():
    _, matched, _, pareto, cost = _figures()
    for fig in (pareto, cost):
        assert trace_named(fig, "circuit").marker.color == P.STRATEGY_COLOURS["circuit"]
        assert trace_named(fig, "full").marker.color == P.STRATEGY_COLOURS["full"]
    # A strategy that never reaches the level: a labelled column without traces.
    never = matched.assign(reached=matched["strategy"] != "lora")
    never.loc[~never["reached"], ["step", "cost"]] = np.nan
    fig = P.matched_cost_figure(never, A.matched_summary(never), A.compare_at_matched(never))
    check_figure(fig, "one strategy never reaches")
    assert any("never reached" in t for t in fig.layout.xaxis.ticktext)
    assert all(not t.name.startswith("lora") for t in fig.data)
