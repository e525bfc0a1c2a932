import json
import math
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from circuitdyn.replicate import (
    ARMS,
    QUICK,
    UNREACHED_FALLBACK,
    replicate,
    with_fallback_rates,
)
from circuitdyn.store import RunStore

# The quick protocol: 1 seed of every arm at 2 learning rates.
QUICK_RUNS = {f"{arm}-lr{lr:g}_s0" for arm in ARMS for lr in QUICK.lrs}


def test_quick_replication_writes_summary_runs_figures_and_report(replication_dir):
    text = (replication_dir / "summary.json").read_text()
    assert "NaN" not in text  # strict JSON
    summary = json.loads(text)
    arms = {row["arm"]: row for row in summary["arms"]}
    assert set(arms) == set(ARMS)
    for arm, numbers in arms.items():
        assert numbers["lr"] in QUICK.lrs
        assert 0.0 <= numbers["test_accuracy"] <= 1.0
        assert 0.0 < numbers["tunable_pct"] <= 100.0 or arm == "lora"
        assert 0.0 <= numbers["jaccard_nodes_agreement"] <= 1.0
        assert abs(numbers["general_loss_change"]) < 1.0  # test split at both ends
        assert -1.0 <= numbers["cap_mean_change"] <= 1.0  # held-out capabilities measured
    # Full fine-tuning tunes every parameter; circuit arms strictly fewer, fewest with blocks.
    assert arms["full"]["tunable_pct"] == 100.0
    assert arms["circuit"]["tunable_pct"] < 100.0
    # Circuit-tuning moves the model towards disagreement (before tuning: 0% accuracy).
    assert arms["circuit"]["test_accuracy"] > 0.3
    agreement = summary["agreement_circuit"]
    assert 0.0 < agreement["cpr"] <= 1.01 and agreement["cmd"] >= 0.0
    assert 0.0 <= agreement["chance"]["node_iou_mean"] <= 1.0
    curve = pd.read_csv(replication_dir / "agreement" / "faithfulness_curve.csv")
    assert curve["faithfulness"].iloc[-1] == 1.0  # the full circuit is the model
    table = (replication_dir / "summary.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in table
    for name in ["pareto", "strategy_curves", "circuit_animation", "agreement_faithfulness"]:
        assert (replication_dir / "figures" / f"{name}.html").stat().st_size > 1000
    assert (replication_dir / "report.html").exists()
    rows = pd.read_csv(replication_dir / "runs.csv")
    assert set(rows["run"]) == QUICK_RUNS == {p.name for p in (replication_dir / "runs").iterdir()}
    assert rows[["test_metric", "tunable_pct"]].map(math.isfinite).all().all()
    # Every dev evaluation of every run is in the Pareto table, step 0 with zero change.
    evals = pd.read_csv(replication_dir / "evals.csv")
    assert set(evals["run"]) == QUICK_RUNS
    first = evals[evals["step"] == 0]
    assert len(first) == len(QUICK_RUNS) and (first["general_loss_change"] == 0).all()


def test_replication_summary_matches_its_runs(replication_dir):
    """The summary's numbers are those of the runs: the arm's best-rate run, recomputed here from
    its store (1 seed: the mean is the run's own number)."""
    summary = json.loads((replication_dir / "summary.json").read_text())
    for row in summary["arms"]:
        name = f"{row['arm']}-lr{row['lr']:g}_s0"
        tests = RunStore.open(replication_dir / "runs" / name).evals_frame()
        tests = tests.dropna(subset=["test_accuracy"])
        assert row["test_accuracy"] == pytest.approx(float(tests["test_accuracy"].iloc[-1]))


def _files(run: Path) -> dict[str, tuple[int, int, int]]:
    """Every file of a run directory with its modification time, inode and size: a run that is
    trained (or resumed) again rewrites its manifest, snapshots and metrics."""
    return {
        str(path.relative_to(run)): (
            path.stat().st_mtime_ns,
            path.stat().st_ino,
            path.stat().st_size,
        )
        for path in sorted(run.rglob("*"))
        if path.is_file()
    }


def test_replication_resumes_without_redoing_finished_runs(replication_dir):
    runs = replication_dir / "runs"
    before = {name: _files(runs / name) for name in QUICK_RUNS}
    deleted = "circuit-lr0.001_s0"
    final_before = RunStore.open(runs / deleted).evals_frame().dropna(subset=["test_metric"])
    shutil.rmtree(runs / deleted)
    started = time.time_ns()
    replicate(replication_dir, quick=True, progress=False)
    after = {name: _files(runs / name) for name in QUICK_RUNS}
    retrained = {name for name in QUICK_RUNS if after[name] != before[name]}
    # Finished runs are not touched; the deleted one is trained again, from scratch, to the end.
    assert retrained == {deleted}
    assert set(after[deleted]) == set(before[deleted])  # the same files: every step again
    assert all(mtime >= started for mtime, _, _ in after[deleted].values())
    final_after = RunStore.open(runs / deleted).evals_frame().dropna(subset=["test_metric"])
    assert list(final_after["step"]) == list(final_before["step"])
    assert list(final_after["test_metric"]) == pytest.approx(list(final_before["test_metric"]))


def test_an_arm_that_never_reaches_the_level_gets_its_most_accurate_rate():
    best = pd.DataFrame(
        {"strategy": ["circuit", "lora"], "lr": [1e-3, math.nan], "choice": ["all", "never"]}
    )
    rows = pd.DataFrame(
        {
            "arm": ["lora"] * 4 + ["circuit"],
            "lr": [1e-3, 1e-3, 1e-2, 1e-2, 1e-3],
            "test_accuracy": [0.2, 0.4, 0.7, 0.5, 0.95],
        }
    )
    filled = with_fallback_rates(best, rows)
    assert filled["lr"].tolist() == [1e-3, 1e-2]  # lora: mean 0.6 at 1e-2 beats 0.3
    assert filled["choice"].tolist() == ["all", UNREACHED_FALLBACK]
    assert math.isnan(best["lr"].iloc[1])  # the input is not changed
