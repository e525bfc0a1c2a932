import json
import math
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from circuitdyn.replicate import replicate
from circuitdyn.store import RunStore

# The quick protocol: 1 seed of the five main runs, plus a top-n sweep (n = 10) and a K sweep
# (K = 4) of circuit-tuning.
QUICK_RUNS = {
    "circuit_s0",
    "fixed_s0",
    "random_s0",
    "full-lr0.001_s0",
    "full-lr0.0001_s0",
    "circuit-n10_s0",
    "circuit-K4_s0",
}


def test_quick_replication_writes_summary_runs_figures_and_report(replication_dir):
    text = (replication_dir / "summary.json").read_text()
    assert "NaN" not in text  # strict JSON
    summary = json.loads(text)
    labels = {"circuit", "fixed", "random", "full-lr0.001", "full-lr0.0001"}
    assert labels <= set(summary["strategies"])
    for label in labels:
        numbers = summary["strategies"][label]
        assert 0.0 <= numbers["test_accuracy"]["mean"] <= 1.0
        assert 0.0 < numbers["tunable_pct"]["mean"] <= 100.0
        assert 0.0 <= numbers["jaccard_nodes_agreement"]["mean"] <= 1.0
        assert abs(numbers["general_loss_change"]["mean"]) < 0.5  # test split at both ends
    # Full fine-tuning tunes every parameter; circuit strategies strictly fewer.
    assert summary["strategies"]["full-lr0.001"]["tunable_pct"]["mean"] == 100.0
    assert summary["strategies"]["circuit"]["tunable_pct"]["mean"] < 100.0
    # Circuit-tuning moves the model towards disagreement (before tuning: 0% accuracy).
    assert summary["strategies"]["circuit"]["test_accuracy"]["mean"] > 0.3
    agreement = summary["agreement_circuit"]
    assert 0.0 < agreement["cpr"] <= 1.01 and agreement["cmd"] >= 0.0
    curve = pd.read_csv(replication_dir / "agreement" / "faithfulness_curve.csv")
    assert curve["faithfulness"].iloc[-1] == 1.0  # the full circuit is the model
    table = (replication_dir / "summary.md").read_text()
    for label in labels:
        assert f"| {label} |" in table
    for name in ["strategy_curves", "circuit_animation", "agreement_faithfulness", "head_roles"]:
        assert (replication_dir / "figures" / f"{name}.html").stat().st_size > 1000
    assert (replication_dir / "report.html").exists()
    rows = pd.read_csv(replication_dir / "runs.csv")
    assert set(rows["run"]) == QUICK_RUNS == {p.name for p in (replication_dir / "runs").iterdir()}
    assert rows[["test_metric", "tunable_pct"]].map(math.isfinite).all().all()


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
    deleted = "circuit-K4_s0"
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
