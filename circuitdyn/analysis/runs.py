"""What a run is, read through the store's typed views: its tuning config (or none), a label,
its evaluations one row per step, and how far it got (finished or partial).

Runs without a tuning config (stores made by hand, circuits recorded from other training loops)
are analysable: their config fields read as None, their label is the directory name, and whether
they finished is ``"unknown"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from circuitdyn.config import TuningConfig
from circuitdyn.store import RunStore


def tuning_config(store: RunStore) -> TuningConfig | None:
    """The run's `TuningConfig`, or None when its manifest holds none. A config that is there
    but invalid raises `circuitdyn.store.StoreError`."""
    return None if store.manifest.get("config") is None else store.config


def model_name(store: RunStore) -> str | None:
    """The name `circuitdyn.models.load_model` loads the run's initial model by (the manifest's
    ``model_name``), or None when it names none (a run tuned from a model built in memory)."""
    return store.manifest.get("model_name") or None


def config_fields(store: RunStore, names: Sequence[str]) -> dict[str, Any]:
    """The named `TuningConfig` fields of the run (all None for a run without a config)."""
    config = tuning_config(store)
    return {name: None if config is None else getattr(config, name) for name in names}


def run_label(store: RunStore) -> str:
    """A short label: ``"<dir name> (<strategy>, n=<top_n>)"``, or the directory name for a run
    without a tuning config."""
    config = tuning_config(store)
    name = Path(store.directory).name
    return name if config is None else f"{name} ({config.strategy}, n={config.top_n})"


def run_labels(stores: Sequence[RunStore]) -> list[str]:
    """`run_label` of each run, made unique by a ``#i`` suffix where two coincide."""
    labels = [run_label(s) for s in stores]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        if labels.count(label) > 1:
            seen[label] = seen.get(label, 0) + 1
            label = f"{label} #{seen[label]}"
        out.append(label)
    return out


def evals_by_step(store: RunStore) -> pd.DataFrame:
    """The run's evaluations, one row per evaluated step (ascending): ``step``, then one column
    per metric. Records logged at the same step are merged (where two hold a metric, the later
    wins): `circuitdyn.tuning` logs the dev and the test evaluation of steps 0 and ``steps`` as
    two records, so the raw `RunStore.evals_frame` has two rows there, each NaN in the other's
    columns, and its last row holds no dev metric."""
    evals = store.evals_frame()
    return evals.groupby("step", sort=True).last().reset_index()


@dataclass(frozen=True)
class RunProgress:
    """How far a run got: its first and last committed step (None when it has none), the
    number of steps it planned (``config.steps``; None without a tuning config) and whether its
    final evaluation (logged at step == planned steps, after the last update) is there."""

    first_step: int | None
    last_step: int | None
    planned_steps: int | None
    final_eval: bool

    @property
    def status(self) -> str:
        """``"finished"``, ``"partial"`` (stopped before its final evaluation) or
        ``"unknown"`` (no tuning config: nothing says how long the run was meant to be)."""
        if self.planned_steps is None:
            return "unknown"
        return "finished" if self.final_eval else "partial"

    def note(self) -> str | None:
        """A one-line warning for a partial run, else None."""
        if self.status != "partial":
            return None
        recorded = (
            "no step" if self.last_step is None else f"steps {self.first_step}..{self.last_step}"
        )
        return (
            f"partial run: {recorded} of {self.planned_steps} recorded, no final evaluation "
            f"(the run stopped early; 'final' numbers are those of the last recorded step)"
        )


def run_progress(store: RunStore) -> RunProgress:
    """The `RunProgress` of a run, from its committed steps, config and evaluations."""
    steps = store.steps
    planned = config_fields(store, ["steps"])["steps"]
    evaluated = set(store.evals_frame()["step"].tolist())
    return RunProgress(
        first_step=steps[0] if steps else None,
        last_step=steps[-1] if steps else None,
        planned_steps=planned,
        final_eval=planned is not None and planned in evaluated,
    )


__all__ = [
    "RunProgress",
    "config_fields",
    "evals_by_step",
    "model_name",
    "run_label",
    "run_labels",
    "run_progress",
    "tuning_config",
]
